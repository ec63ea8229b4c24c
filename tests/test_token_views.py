"""`teacher-cache views` of token rows (`text:` data): the views are the rows a token cache build of the same
settings holds (its `index` read back as packed rows and its `labels` against the views' next tokens: a second
reader), written once (a rerun does nothing, an unfinished write is redone), sized by bytes, and refused on other
settings; `import --logits` of token rows points to `import --logprobs`."""

import os

import numpy as np
import pytest

import conftest
from shared.cache import open_cache
from shared.data import open_transfer_set
from shared.data.text import TextOptions, next_token_labels
from shared.errors import StillroomError
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.cli import main as cache_main
from teacher_cache.external import chunk_file, read_views, token_views_chunk_rows, write_views

DOCUMENTS = ["the cat sat on the mat.", "hello, world", "packing documents into rows of tokens.", "a", "xyz xyz."]
SEQ_LEN, SEED = 8, 3


def views_args(text_dir: str, out, *extra) -> list[str]:
  return ["views", "--dataset", f"text:{text_dir}", "--seq-len", str(SEQ_LEN), "--seed", str(SEED), "--no-progress",
          "--out", str(out), *extra]


def read_all_views(out: str) -> dict:
  record = read_views(out)
  chunks = -(-record["rows"] // record["chunk_rows"])
  parts = []
  for chunk in range(chunks):
    with np.load(os.path.join(out, chunk_file(chunk))) as files:
      parts.append({name: files[name] for name in files.files})
  return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def test_token_views_are_the_rows_of_a_token_cache_with_the_same_settings(tmp_path, text_dir, capsys):
  out = tmp_path / "views"
  code, printed, err = conftest.run_cli(cache_main, views_args(text_dir, out, "--chunk-rows", "4"), capsys)
  assert code == 0, err
  record = read_views(str(out))
  data = open_transfer_set(f"text:{text_dir}", text=TextOptions(seq_len=SEQ_LEN))
  assert record["layout"] == "tokens" and record["seq_len"] == SEQ_LEN and record["vocab_size"] == 256
  assert record["views"] == 1 and record["rows"] == len(data) and record["chunk_rows"] == 4
  assert record["dataset"]["text"]["seq_len"] == SEQ_LEN and f"wrote {len(data)} rows" in printed
  assert sorted(os.listdir(out)) == sorted(["views.json", *(chunk_file(c) for c in range(-(-len(data) // 4)))])
  views = read_all_views(str(out))
  assert views["x"].dtype == np.int32 and views["segment_ids"].dtype == np.int32 and views["row"].dtype == np.int64
  assert views["x"].shape == views["segment_ids"].shape == (len(data), SEQ_LEN)
  np.testing.assert_array_equal(views["row"], np.arange(len(data)))
  # The second reader: a token cache built with the same settings, its rows' examples and labels.
  cache = open_cache(build_cache(BuildConfig(
      dataset=f"text:{text_dir}", seq_len=SEQ_LEN, seed=SEED, teachers=("lm_teachers:byte_teacher",),
      eval_split="none", targets="topk:4", chunk_rows=4, batch_size=4, out=str(tmp_path / "c.zarr"), progress=False)))
  assert cache.spec.dataset.fingerprint == record["dataset"]["fingerprint"]
  index = np.asarray(cache["index"][:])
  x, _ = data.read(data.positions(index))
  np.testing.assert_array_equal(views["x"], x[:, 0])
  np.testing.assert_array_equal(views["segment_ids"], x[:, 1])
  assert not np.array_equal(index, np.arange(len(data)))  # The seeded row order, not the packed one.
  labels = next_token_labels(np.stack([views["x"], views["segment_ids"]], axis=1))
  np.testing.assert_array_equal(labels, cache["labels"][:])
  assert (labels >= 0).any()


def test_token_views_are_written_once_redone_when_unfinished_and_refused_for_other_settings(tmp_path, text_dir,
                                                                                           capsys):
  out = tmp_path / "views"
  assert conftest.run_cli(cache_main, views_args(text_dir, out), capsys)[0] == 0
  files = sorted(os.listdir(out))
  assert files == ["views.json", chunk_file(0)]  # The default: 4096 rows a file at this L.
  first = read_all_views(str(out))
  stamps = {name: os.stat(out / name).st_mtime_ns for name in files}
  code, printed, err = conftest.run_cli(cache_main, views_args(text_dir, out), capsys)
  assert code == 0 and "already holds these views; nothing to do" in printed + err
  assert {name: os.stat(out / name).st_mtime_ns for name in files} == stamps
  # An unfinished write (no views.json, a chunk missing): written again, the same.
  os.remove(out / "views.json")
  os.remove(out / chunk_file(0))
  assert conftest.run_cli(cache_main, views_args(text_dir, out), capsys)[0] == 0
  again = read_all_views(str(out))
  assert all(np.array_equal(first[name], again[name]) for name in first)
  # Other settings: refused in one line, nothing changed; --overwrite writes them.
  code, _, err = conftest.run_cli(cache_main, views_args(text_dir, out, "--pack-seed", "1"), capsys)
  assert code == 2 and "holds views of other settings" in err and "--overwrite" in err and len(err.splitlines()) == 1
  assert all(np.array_equal(first[name], read_all_views(str(out))[name]) for name in first)
  assert conftest.run_cli(cache_main, views_args(text_dir, out, "--pack-seed", "1", "--overwrite"), capsys)[0] == 0
  assert read_views(str(out))["dataset"]["text"]["pack_seed"] == 1


@pytest.mark.fast
def test_token_views_files_are_sized_by_bytes():
  assert token_views_chunk_rows(8) == 4096 and token_views_chunk_rows(2048) == 4096
  assert token_views_chunk_rows(8192) == 1024 and token_views_chunk_rows(1 << 24) == 1
  # At most 64 MiB of x and segment ids a file.
  for seq_len in (100, 3000, 70000):
    assert token_views_chunk_rows(seq_len) * 8 * seq_len <= 64 << 20 or token_views_chunk_rows(seq_len) == 1


def test_token_views_refuse_image_view_settings(tmp_path, text_dir):
  for changes, flag in (({"views": 2}, "--views 2"), ({"flip": True}, "--flip")):
    config = BuildConfig(dataset=f"text:{text_dir}", seq_len=SEQ_LEN, out=str(tmp_path / "v"), progress=False,
                         **changes)
    with pytest.raises(StillroomError, match=rf"^{flag}: dataset 'text:.*' is text, whose one view is its packed rows"):
      write_views(config)
    assert not (tmp_path / "v").exists()
