"""Text transfer sets (`text:PATH`, shared.data.text): packing against a pure-Python reference, next-token labels,
splits, fingerprints, tokenizers and the one-line refusals."""

import dataclasses
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest

from shared.data import DatasetSpec, open_transfer_set
from shared.data import text as text_lib
from shared.data.text import TextOptions, next_token_labels, pack_order
from shared.errors import StillroomError
from shared.options import text_options


DOCS_A = ["hello world\n", "", "ça va? ünïcode ✓\n" * 3, "def f(x):\n  return x + 1\n"]
DOCS_B = ["abc", "", "de", "a much longer document that crosses several rows of the packed stream" * 2]
PINNED_ORDER = [7, 1, 6, 2, 3, 5, 0, 4]  # pack_order(8, 0) as first computed.


def write_corpus(root) -> list[str]:
  """A folder with .txt and .jsonl files (and files it ignores); returns its documents in listing order (sorted
  relative paths; each jsonl line in order), empty ones included."""
  os.makedirs(os.path.join(root, "sub", "deeper"), exist_ok=True)
  os.makedirs(os.path.join(root, ".hidden"), exist_ok=True)
  with open(os.path.join(root, "a.txt"), "w", encoding="utf-8") as f:
    f.write(DOCS_A[0])
  with open(os.path.join(root, "b_empty.txt"), "w", encoding="utf-8") as f:
    f.write(DOCS_A[1])
  with open(os.path.join(root, "sub", "c.jsonl"), "w", encoding="utf-8") as f:
    f.write("\n".join(json.dumps({"text": d, "id": k}) for k, d in enumerate(DOCS_B)) + "\n\n")
  with open(os.path.join(root, "sub", "deeper", "d.txt"), "w", encoding="utf-8") as f:
    f.write(DOCS_A[2])
  with open(os.path.join(root, "notes.csv"), "w", encoding="utf-8") as f:
    f.write("ignored: not .txt/.md/.py/.jsonl")
  with open(os.path.join(root, "sub", "e.py"), "w", encoding="utf-8") as f:
    f.write(DOCS_A[3])
  with open(os.path.join(root, ".hidden", "e.txt"), "w", encoding="utf-8") as f:
    f.write("ignored: hidden")
  return [DOCS_A[0], DOCS_A[1], *DOCS_B, DOCS_A[2], DOCS_A[3]]  # a, b_empty, sub/c, sub/deeper/d, sub/e.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("corpus"))
  return root, write_corpus(root)


def reference_rows(token_lists: list[list[int]], order, seq_len: int) -> list[tuple[list[int], list[int], list[int]]]:
  """Pure Python: non-empty documents in `order`, concatenated, cut into rows of seq_len; segments number the document
  pieces of a row from 1, padding (token 0, segment 0) after the end. Returns (tokens, segments, document ids)."""
  stream, owner = [], []
  for doc in order:
    stream += token_lists[doc]
    owner += [doc] * len(token_lists[doc])
  rows = []
  for start in range(0, len(stream), seq_len):
    tokens, segments, docs = [], [], []
    for p in range(start, start + seq_len):
      if p < len(stream):
        if not docs or docs[-1] != owner[p]:
          segment = (segments[-1] if segments else 0) + 1
        tokens.append(stream[p])
        segments.append(segment)
        docs.append(owner[p])
      else:
        tokens.append(0)
        segments.append(0)
        docs.append(-1)
    rows.append((tokens, segments, docs))
  return rows


def reference_labels(tokens, docs) -> list[int]:
  return [tokens[j + 1] if j + 1 < len(tokens) and docs[j] >= 0 and docs[j + 1] == docs[j] else -1
          for j in range(len(tokens))]


@pytest.mark.fast
@pytest.mark.parametrize("seq_len,seed", [(2, 0), (7, 0), (16, 3), (64, 1), (500, 0)])
def test_packing_matches_a_pure_python_reference(corpus, seq_len, seed):
  root, documents = corpus
  data = open_transfer_set(f"text:{root}", text=TextOptions(seq_len=seq_len, pack_seed=seed))
  token_lists = [list(d.encode("utf-8")) for d in documents if d]
  order = pack_order(len(token_lists), seed)
  assert sorted(order) == list(range(len(token_lists)))
  expected = reference_rows(token_lists, order, seq_len)
  x, labels = data.read_all()
  assert x.dtype == np.int32 and x.shape == (len(expected), 2, seq_len) and data.input_shape == (2, seq_len)
  assert labels.shape == (len(expected), seq_len)
  for row, (tokens, segments, docs) in enumerate(expected):
    assert x[row, 0].tolist() == tokens and x[row, 1].tolist() == segments
    assert labels[row].tolist() == reference_labels(tokens, docs)
  assert data.num_classes == 256 and data.labeled and data.class_names is None
  assert (x[:-1, 1] > 0).all()  # Padding in the last row only.
  assert data.normalization.shift == 0.0 and data.normalization.scale == 1.0
  # In memory: one byte per token of the byte tokenizer (the text's size), and the documents' offsets.
  stream = data.source.stream
  assert stream.dtype == np.uint8 and stream.nbytes == sum(len(t) for t in token_lists)
  assert stream.nbytes == data.source.identity()["tokens"]
  assert data.in_memory


@pytest.mark.fast
def test_the_order_is_a_seeded_permutation():
  assert pack_order(50, 0).tolist() == pack_order(50, 0).tolist()
  assert pack_order(50, 0).tolist() != pack_order(50, 1).tolist()
  assert pack_order(50, 0).tolist() != list(range(50))
  assert sorted(pack_order(50, 7).tolist()) == list(range(50))
  assert pack_order(8, 0).tolist() == PINNED_ORDER  # A counter hash: the same on every host and NumPy version.


@pytest.mark.fast
def test_the_stream_dtype_is_the_narrowest_for_the_vocabulary():
  assert [text_lib.token_dtype(v) for v in (256, 257, 65536, 65537)] == [np.uint8, np.uint16, np.uint16, np.int32]


@pytest.mark.fast
def test_next_token_labels_never_cross_documents_or_padding():
  rng = np.random.default_rng(0)
  x = np.zeros((64, 2, 12), np.int32)
  x[:, 0] = rng.integers(0, 256, (64, 12))
  for row in range(64):  # Non-decreasing segment ids from 1, then padding (0) at the end.
    cuts = np.sort(rng.integers(0, 13, 3))
    x[row, 1] = np.searchsorted(cuts, np.arange(12), side="right") + 1
    pad = int(rng.integers(0, 13))
    x[row, 1, 12 - pad:] = 0
    x[row, 0, 12 - pad:] = 0
  labels = next_token_labels(x)
  assert labels.dtype == np.int32 and labels.shape == (64, 12)
  for row in range(64):
    for j in range(12):
      same = j + 1 < 12 and x[row, 1, j] != 0 and x[row, 1, j + 1] == x[row, 1, j]
      assert labels[row, j] == (x[row, 0, j + 1] if same else -1)
  assert next_token_labels(x[3]).tolist() == labels[3].tolist()  # Any leading axes.


@pytest.mark.fast
def test_splits_slice_rows(corpus):
  root, _ = corpus
  options = TextOptions(seq_len=8)
  whole = open_transfer_set(f"text:{root}", text=options)
  part = open_transfer_set(f"text:{root}", "train[2:5]", text=options)
  assert part.canonical_split == "train[2:5]" and part.indices.tolist() == [2, 3, 4]
  np.testing.assert_array_equal(part.read_all()[0], whole.read(np.arange(2, 5))[0])
  half = open_transfer_set(f"text:{root}", "train[:50%]", text=options)
  assert half.indices.tolist() == list(range(len(half))) and abs(len(half) - len(whole) / 2) <= 1  # TFDS rounds.
  with pytest.raises(StillroomError, match="bad split"):
    open_transfer_set(f"text:{root}", "test", text=options)
  assert whole.labels.shape == (len(whole), 8)  # Per-position labels pass the label checks (-1 included).


@pytest.mark.fast
def test_jsonl_file_and_txt_file_alone(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text("\ufeff" + "\r\n".join(json.dumps({"text": d}) for d in DOCS_B), encoding="utf-8")  # BOM, CRLF.
  data = open_transfer_set(f"text:{path}", text=TextOptions(seq_len=5))
  token_lists = [list(d.encode()) for d in DOCS_B if d]
  expected = reference_rows(token_lists, pack_order(len(token_lists), 0), 5)
  assert data.read_all()[0][:, 0].tolist() == [tokens for tokens, _, _ in expected]
  txt = tmp_path / "one.csv"  # Any file but .jsonl is plain text.
  txt.write_text("just one document", encoding="utf-8")
  rows = open_transfer_set(f"text:{txt}", text=TextOptions(seq_len=4)).read_all()[0]
  assert bytes(rows[:, 0].reshape(-1)[:17].astype(np.uint8)).decode() == "just one document"
  assert rows[:, 1].reshape(-1).tolist() == [1] * 17 + [0] * 3


@pytest.mark.fast
def test_default_options_when_none_are_given(corpus):
  root, _ = corpus
  data = open_transfer_set(f"text:{root}")
  assert data.input_shape == (2, text_lib.DEFAULT_SEQ_LEN)
  assert data.text == {"seq_len": 256, "tokenizer": {"kind": "bytes", "vocab_size": 256}, "pack_seed": 0}


def fingerprint(root, **options) -> str:
  return open_transfer_set(f"text:{root}", text=TextOptions(**{"seq_len": 8, **options})).fingerprint


@pytest.mark.fast
def test_the_fingerprint_follows_content_tokenizer_length_and_seed_not_the_path(tmp_path):
  root = str(tmp_path / "a")
  write_corpus(root)
  base = fingerprint(root)
  moved = str(tmp_path / "elsewhere" / "b")
  shutil.copytree(root, moved)
  assert fingerprint(moved) == base
  assert fingerprint(root, seq_len=9) != base
  assert fingerprint(root, pack_seed=1) != base
  with open(os.path.join(moved, "a.txt"), "w", encoding="utf-8") as f:
    f.write(DOCS_A[0].replace("h", "j"))  # Same size, one byte changed.
  assert fingerprint(moved) != base
  os.rename(os.path.join(moved, "a.txt"), os.path.join(moved, "z.txt"))  # Relative paths are part of it.
  assert fingerprint(moved) != fingerprint(root)


@pytest.mark.fast
def test_dataset_spec_records_text_and_old_records_read_the_same(corpus):
  old = {"name": "digits", "split": "train[:80%]", "canonical_split": "train[0:1438]", "count": 1438,
         "fingerprint": "ab" * 32, "input_shape": [8, 8], "input_dtype": "float32", "num_classes": 10,
         "labeled": True, "fingerprint_version": 2}
  assert DatasetSpec.from_dict(old).to_dict() == old
  assert DatasetSpec.from_dict(old).text is None and DatasetSpec.from_dict(old).text_options() is None
  root, _ = corpus
  data = open_transfer_set(f"text:{root}", text=TextOptions(seq_len=8, pack_seed=2))
  spec = DatasetSpec.from_dict(json.loads(json.dumps(data.describe().to_dict())))
  assert spec.text == {"seq_len": 8, "tokenizer": {"kind": "bytes", "vocab_size": 256}, "pack_seed": 2}
  assert spec.input_shape == (2, 8) and spec.num_classes == 256
  reopened = open_transfer_set(spec.name, spec.split, text=spec.text_options())
  assert reopened.matches(spec)
  assert TextOptions.from_dict(spec.text) == TextOptions(seq_len=8, pack_seed=2)


@pytest.mark.fast
def test_text_options_of_a_config_take_the_record_where_not_given():
  config = types.SimpleNamespace(seq_len=None, tokenizer=None, pack_seed=None)
  assert text_options(config) is None
  recorded = {"seq_len": 32, "tokenizer": {"kind": "bytes", "vocab_size": 256}, "pack_seed": 4}
  assert text_options(config, recorded) == TextOptions(seq_len=32, pack_seed=4)
  given = dataclasses.replace(TextOptions(), seq_len=16)
  assert text_options(types.SimpleNamespace(seq_len=16, tokenizer=None, pack_seed=None)) == given
  assert text_options(types.SimpleNamespace(seq_len=16, tokenizer=None, pack_seed=None), recorded) == \
      TextOptions(seq_len=16, pack_seed=4)
  assert text_options(config, recorded, "text:corpus") == TextOptions(seq_len=32, pack_seed=4)
  assert text_options(config, recorded, "digits") is None  # Another dataset than the record's: no options to refuse.


@pytest.mark.fast
def test_byte_tokenizer():
  tokenizer = TextOptions().tokenizer()
  ids = tokenizer.encode("héllo ✓")
  assert ids.dtype == np.int32 and ids.tolist() == list("héllo ✓".encode())
  assert tokenizer.decode(ids) == "héllo ✓" and tokenizer.vocab_size == 256
  assert tokenizer.byte_lengths.tolist() == [1] * 256
  assert tokenizer.identity() == {"kind": "bytes", "vocab_size": 256}


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
  tokenizers = pytest.importorskip("tokenizers")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator([*DOCS_A, *DOCS_B] * 4, trainer)
  path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
  tokenizer.save(path)
  return path


@pytest.mark.fast
def test_a_bpe_tokenizer_round_trips_and_is_fingerprinted(corpus, bpe_file, tmp_path):
  options = TextOptions(seq_len=8, tokenizer_name=bpe_file)
  tokenizer = options.tokenizer()
  text = "hello world, ça va? ✓"
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and tokenizer.decode(ids) == text
  assert int(tokenizer.byte_lengths[ids].sum()) == len(text.encode("utf-8"))  # Bytes each token stands for.
  assert tokenizer.byte_lengths[0] == 0  # The special token stands for none.
  identity = tokenizer.identity()
  assert identity["kind"] == "tokenizers" and identity["vocab_size"] == tokenizer.vocab_size
  root, documents = corpus
  data = open_transfer_set(f"text:{root}", text=options)
  assert data.num_classes == tokenizer.vocab_size and data.text["tokenizer"] == identity
  token_lists = [tokenizer.encode(d).tolist() for d in documents if d]
  expected = reference_rows(token_lists, pack_order(len(token_lists), 0), 8)
  assert data.read_all()[0][:, 0].tolist() == [tokens for tokens, _, _ in expected]
  assert data.fingerprint != open_transfer_set(f"text:{root}", text=TextOptions(seq_len=8)).fingerprint
  assert "path" not in data.source.identity()["tokenizer"]
  assert TextOptions.from_dict(data.text).tokenizer_sha256 == identity["sha256"]
  assert data.source.stream.dtype == np.uint16  # Two bytes per token below 65,536 ids.
  moved = str(tmp_path / "elsewhere.json")
  shutil.copy(bpe_file, moved)
  elsewhere = open_transfer_set(f"text:{root}", text=TextOptions(seq_len=8, tokenizer_name=moved))
  assert elsewhere.fingerprint == data.fingerprint  # Where the tokenizer file lies is not part of it.


@pytest.mark.fast
def test_a_changed_tokenizer_file_is_refused(tmp_path, bpe_file):
  copy = str(tmp_path / "tokenizer.json")
  shutil.copy(bpe_file, copy)
  record = TextOptions(seq_len=8, tokenizer_name=copy).to_dict()
  with open(copy, "a", encoding="utf-8") as f:
    f.write("\n")
  with pytest.raises(StillroomError, match="changed since it was recorded"):
    TextOptions.from_dict(record).tokenizer()


@pytest.mark.fast
def test_a_file_that_is_no_tokenizer_is_refused(tmp_path, bpe_file):
  for name, content in (("junk.json", b'{"model": 3}'), ("latin.json", b"\xff\xfe")):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(StillroomError, match=r"not a Hugging Face tokenizer\.json \(.+\)\.$") as raised:
      TextOptions(tokenizer_name=str(tmp_path / name)).tokenizer()
    assert "\n" not in str(raised.value)


@pytest.mark.fast
def test_without_the_tokenizers_library_a_one_line_error(tmp_path, monkeypatch):
  path = tmp_path / "tokenizer.json"
  path.write_text("{}", encoding="utf-8")
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  with pytest.raises(StillroomError, match=r"pip install 'stillroom\[text\]'") as raised:
    TextOptions(tokenizer_name=str(path)).tokenizer()
  assert "\n" not in str(raised.value)


def one_line_error(name, options=None) -> str:
  with pytest.raises(StillroomError) as raised:
    open_transfer_set(name, text=options)
  assert "\n" not in str(raised.value)
  return str(raised.value)


@pytest.mark.fast
def test_bad_files_are_refused_naming_file_and_line(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"line one\nline two \xff\xfe\n")
  message = one_line_error(f"text:{bad}")
  assert "bad.txt line 2" in message and "not UTF-8" in message
  for content, expected in (('{"text": "a"}\n{"text": oops}\n', "line 2: not JSON"),
                            ('{"text": "a"}\n\n{"txt": "b"}\n', "line 3: no string 'text' field"),
                            ('{"text": 3}\n', "line 1: no string 'text' field"), ('["a"]\n', "line 1: no string")):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    assert "bad.jsonl " + expected in one_line_error(f"text:{path}")


@pytest.mark.fast
def test_no_text_is_refused(tmp_path):
  (tmp_path / "empty").mkdir()
  assert "no .txt/.md/.py/.jsonl files in" in one_line_error(f"text:{tmp_path / 'empty'}")
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "a.txt").write_text("")
  (tmp_path / "blank" / "b.jsonl").write_text('{"text": ""}\n')
  assert "no text in" in one_line_error(f"text:{tmp_path / 'blank'}")
  assert "no such file or directory" in one_line_error(f"text:{tmp_path / 'absent'}")


@pytest.mark.fast
def test_text_options_for_other_data_and_bad_options_are_refused(tmp_path):
  np.savez(tmp_path / "x.npz", x=np.zeros((4, 3), np.float32))
  assert "is not text" in one_line_error(f"npz:{tmp_path / 'x.npz'}", TextOptions(seq_len=8))
  with pytest.raises(StillroomError, match="--seq-len 1"):
    TextOptions(seq_len=1)


@pytest.mark.fast
def test_image_views_are_refused_on_text(corpus):
  root, _ = corpus
  data = open_transfer_set(f"text:{root}", text=TextOptions(seq_len=8))
  text_lib.check_views(types.SimpleNamespace(views=1, flip=False, image_size=None, mix=None), data)
  for settings, flag in (({"views": 2}, "--views 2"), ({"flip": True}, "--flip"), ({"image_size": 32}, "--image-size"),
                         ({"mix": "mixup:0.2"}, "--mix"), ({"augment": True}, "--augment")):
    config = types.SimpleNamespace(**{"views": 1, "flip": False, "image_size": None, "mix": None, **settings})
    with pytest.raises(StillroomError, match=flag):
      text_lib.check_views(config, data)


def test_a_folder_on_s3_reads_as_its_local_copy(s3, tmp_path):
  root = str(tmp_path / "corpus")
  write_corpus(root)
  s3.put(root, "stillroom-test/text/corpus", recursive=True)
  options = TextOptions(seq_len=16)
  local, remote = (open_transfer_set(f"text:{where}", text=options)
                   for where in (root, "s3://stillroom-test/text/corpus"))
  assert remote.fingerprint == local.fingerprint and len(remote) == len(local)
  np.testing.assert_array_equal(remote.read_all()[0], local.read_all()[0])


@pytest.mark.fast
def test_predicting_positions_counts_the_labels_of_the_packed_rows():
  """`predicting_positions` (the open's check that some position has a next token) against the labels of the rows
  packed and labelled by `pack_rows` and `next_token_labels`, documents of 1 to 5 tokens at several L."""
  from shared.data.text import next_token_labels, pack_rows, predicting_positions
  rng = np.random.default_rng(0)
  for trial in range(200):
    lengths = rng.integers(1, 6, rng.integers(1, 8))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seq_len = int(rng.integers(2, 7))
    stream = rng.integers(0, 256, int(starts[-1])).astype(np.uint8)
    rows = pack_rows(stream, starts, np.arange(-(-len(stream) // seq_len)), seq_len)
    expected = int((next_token_labels(rows) >= 0).sum())
    assert predicting_positions(starts, seq_len) == expected, (trial, lengths, seq_len)


@pytest.mark.fast
def test_text_a_tokenizer_cannot_encode_is_refused_in_one_line(tmp_path):
  """A WordLevel tokenizer without an unknown token raises on a word it lacks: one line, from `sample`'s prompt
  (`encode`) and from the data's open (`encode_many`), not the library's exception."""
  tokenizers = pytest.importorskip("tokenizers")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"def": 0, "x": 1}, unk_token=None))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer.save(str(tmp_path / "words.json"))
  options = TextOptions(seq_len=4, tokenizer_name=str(tmp_path / "words.json"))
  assert options.tokenizer().encode("def x").tolist() == [0, 1]
  with pytest.raises(StillroomError, match=r"words\.json: cannot encode the text \(.+\); use a tokenizer that") as e:
    options.tokenizer().encode("def zzz")
  assert "\n" not in str(e.value)
  (tmp_path / "a.txt").write_text("def x def zzz")
  with pytest.raises(StillroomError, match=r"cannot encode the text"):
    open_transfer_set(f"text:{tmp_path / 'a.txt'}", text=options)


# Each non-empty document of `write_corpus` in listing order, by the name `document_at` gives it.
CORPUS_NAMES = ["a.txt", "sub/c.jsonl line 1", "sub/c.jsonl line 3", "sub/c.jsonl line 4", "sub/deeper/d.txt",
                "sub/e.py"]


@pytest.mark.fast
@pytest.mark.parametrize("seq_len,seed", [(7, 0), (64, 2)])
def test_document_at_names_each_position_s_document_and_token(corpus, seq_len, seed):
  root, documents = corpus
  data = open_transfer_set(f"text:{root}", text=TextOptions(seq_len=seq_len, pack_seed=seed))
  token_lists = [list(d.encode("utf-8")) for d in documents if d]
  assert len(token_lists) == len(CORPUS_NAMES)
  # Pure Python: the packed stream's (document name, token number in it) at each position.
  stream = [f"{CORPUS_NAMES[doc]}, its token {t:,}" for doc in pack_order(len(token_lists), seed)
            for t in range(len(token_lists[doc]))]
  rows = -(-len(stream) // seq_len)
  assert len(data) == rows
  names = [data.document_at(row, j) for row in range(rows) for j in range(seq_len)]
  assert names == stream + ["padding after the last document"] * (rows * seq_len - len(stream))
  assert data.source.document_at(0, 0) == names[0]
  with pytest.raises(IndexError):
    data.source.document_at(rows, 0)


@pytest.mark.fast
def test_document_at_of_a_file_alone_uses_its_path_and_a_bpe_token_count(tmp_path, bpe_file):
  path = tmp_path / "corpus.jsonl"
  path.write_text(json.dumps({"text": "ab"}) + "\n\n" + json.dumps({"text": "hello world"}) + "\n", encoding="utf-8")
  data = open_transfer_set(f"text:{path}", text=TextOptions(seq_len=64))
  order = pack_order(2, 0).tolist()
  lengths, lines = [2, 11], [1, 3]
  expected = [f"{path} line {lines[d]}, its token {t}" for d in order for t in range(lengths[d])]
  assert [data.document_at(0, j) for j in range(13)] == expected
  assert data.document_at(0, 13) == "padding after the last document"
  bpe = open_transfer_set(f"text:{path}", text=TextOptions(seq_len=64, tokenizer_name=bpe_file))
  tokenizer = bpe.source.tokenizer
  lengths = [len(tokenizer.encode("ab")), len(tokenizer.encode("hello world"))]
  expected = [f"{path} line {lines[d]}, its token {t}" for d in order for t in range(lengths[d])]
  assert [bpe.document_at(0, j) for j in range(sum(lengths))] == expected
  digits = open_transfer_set("digits")
  with pytest.raises(StillroomError, match="not text"):
    digits.document_at(0, 0)


@pytest.mark.fast
def test_byte_token_strings_are_gpt2_s_byte_level_alphabet():
  tokenizers = pytest.importorskip("tokenizers")
  strings = TextOptions().tokenizer().token_strings()
  assert len(strings) == 256 and len(set(strings)) == 256 and all(len(s) == 1 for s in strings)
  assert set(strings) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  # The library's own byte-to-character map, byte by byte over all 256 bytes.
  spell = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  text = bytes(range(256)).decode("latin-1")  # Every byte value once, as UTF-8 of 1 or 2 bytes each.
  spelled = "".join(piece for piece, _ in spell.pre_tokenize_str(text))
  assert spelled == "".join(strings[b] for b in text.encode("utf-8"))
  assert strings[ord(" ")] == "\u0120" and strings[ord("\n")] == "\u010a" and strings[ord("a")] == "a"


@pytest.mark.fast
def test_bpe_token_strings_are_the_vocabulary_s(bpe_file):
  tokenizers = pytest.importorskip("tokenizers")
  library = tokenizers.Tokenizer.from_file(bpe_file)
  strings = TextOptions(tokenizer_name=bpe_file).tokenizer().token_strings()
  vocabulary = library.get_vocab(with_added_tokens=True)
  assert len(strings) == len(vocabulary) and {s: i for i, s in enumerate(strings)} == vocabulary
  assert strings[0] == "<pad>"
  # A byte-level BPE token spells its bytes in the byte alphabet the byte tokenizer's strings use.
  alphabet = {c: b for b, c in enumerate(TextOptions().tokenizer().token_strings())}
  ids = library.encode("héllo wörld\n").ids
  assert bytes(alphabet[c] for i in ids for c in strings[i]).decode("utf-8") == "héllo wörld\n"
