"""`teacher-cache import --logprobs` (issue 35, parts 1 and 2): files written from a known distribution (a JAX
teacher's log-softmax over byte rows) in every layout import to the cache a build of that teacher writes; re-tempering
against NumPy; the rest bucket; every misalignment refused in one line with nothing written."""

import json
import os

import jax
import numpy as np
import pytest

import lm_teachers
from shared.cache import open_cache
from shared.data import open_transfer_set
from shared.errors import StillroomError
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.logprobs import (PLACEHOLDER, REST_RULE, import_logprobs, read_jsonl, retemper)
from teacher_cache.info import cache_info
from teacher_cache.verify import verify_cache

SEQ_LEN, K, V = 16, 8, 256
DOCUMENTS = ["the cat sat on the mat.", "a b c d e f g h i j k l m n o p", "hello, world", "zz",
             "packing documents into rows of sixteen tokens each.", "ok"]
TEACHER = "lm_teachers:soft_byte_teacher"


def settings(text_dir: str, out, **changes) -> BuildConfig:
  return BuildConfig(dataset=f"text:{text_dir}", split="train", eval_split="none", seq_len=SEQ_LEN, dtype="float32",
                     chunk_rows=4, batch_size=4, out=str(out), progress=False, **changes)


def read_all(path: str, names=("target_ids", "target_log_probs", "target_rest", "labels", "index")) -> dict:
  cache = open_cache(path)
  return {n: np.concatenate([cache.read_chunk(c, [n])[n] for c in range(cache.spec.num_chunks)]) for n in names}


@pytest.fixture(scope="module")
def built(tmp_path_factory, text_dir) -> dict:
  """Caches the build writes of the soft byte teacher at T = 1 and 2 (top-8, float32), and the teacher's full
  log-softmax at Tg = 1 and 2 on the cache rows (float64 [R, L, V]) with the rows x [R, 2, L]."""
  root = tmp_path_factory.mktemp("built")
  caches = {t: build_cache(settings(text_dir, root / f"t{t}.zarr", teachers=(TEACHER,), temperature=float(t),
                                    targets=f"topk:{K}")) for t in (1, 2)}
  rows = read_all(caches[1])
  data = open_transfer_set(f"text:{text_dir}", "train", None, text=open_cache(caches[1]).spec.dataset.text_options())
  x, _ = data.read(data.positions(rows["index"]))
  x = np.asarray(x)
  apply_fn, params = lm_teachers.soft_byte_teacher()
  logits = np.asarray(apply_fn(params, jax.numpy.asarray(x, np.float32)), np.float64)
  full = {t: logits / t - np.logaddexp.reduce(logits / t, axis=-1, keepdims=True) for t in (1, 2)}
  return {"caches": caches, "x": x, "full": full, "labels": rows["labels"], "root": root}


def verified(path: str) -> bool:
  failed = {c.name: c.detail for c in verify_cache(path) if c.failed}
  assert not failed, failed
  return True


def topk(full: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
  ids = np.argsort(-full, axis=-1, kind="stable")[..., :k]
  return ids, np.take_along_axis(full, ids, -1)


def scored(x: np.ndarray, r: int) -> int:
  """The row's scored length: its tokens before the padding."""
  return int((x[r, 1] > 0).sum())


def write_vllm(path, x, full, rows=None, k=K, token_ids=True, segments=False):
  """vLLM prompt-logprobs lines: each entry the top k plus the prompt's own token (k + 1 entries when it is outside,
  with its true rank); -inf as -9999.0. `segments`: one line per document piece, with `start`."""
  ids, lps = topk(full, k)
  with open(path, "w", encoding="utf-8") as f:
    for r in rows if rows is not None else range(len(x)):
      n = scored(x, r)
      pieces = [(0, n)]
      if segments:
        seg = x[r, 1, :n]
        cuts = [0, *np.flatnonzero(seg[1:] != seg[:-1]) + 1, n]
        pieces = list(zip(cuts[:-1], cuts[1:]))
      for start, stop in pieces:
        entries = [None]
        for i in range(start + 1, stop):
          entry = {str(int(t)): {"logprob": float(v), "rank": q + 1, "decoded_token": "?"}
                   for q, (t, v) in enumerate(zip(ids[r, i - 1], lps[r, i - 1]))}
          token = int(x[r, 0, i])
          if str(token) not in entry:
            rank = int((full[r, i - 1] > full[r, i - 1, token]).sum()) + 1
            value = full[r, i - 1, token]
            entry[str(token)] = {"logprob": float(value) if value > -9999 else -9999.0, "rank": rank}
          entries.append(entry)
        line = {"row": int(r), "start": int(start), "prompt_logprobs": entries}
        if token_ids:
          line["prompt_token_ids"] = x[r, 0, start:stop].tolist()
        f.write(json.dumps(line) + "\n")
  return str(path)


def write_axolotl(path, x, full, version, shift=0):
  ids, lps = topk(full)
  with open(path, "w", encoding="utf-8") as f:
    for r in range(len(x)):
      n = scored(x, r)
      line = {"row": r, "input_ids": np.roll(x[r, 0, :n], shift).tolist()}
      if version == 1:
        line["logprobs"] = [[{"token": f"token_id:{int(t)}", "logprob": float(v)} for t, v in zip(ids[r, j], lps[r, j])]
                            for j in range(n - 1)]
      else:
        line["logprobs"] = lps[r, :n - 1].tolist()
        line["target_token_ids"] = ids[r, :n - 1].tolist()
      f.write(json.dumps(line) + "\n")
  return str(path)


def arrays_of(x, full, k=K):
  ids, lps = topk(full, k)
  has = np.zeros(x.shape[::2], bool)
  for r in range(len(x)):
    has[r, :scored(x, r) - 1] = True
  return {"row": np.arange(len(x)), "token_ids": x[:, 0].copy(), "topk_ids": np.where(has[..., None], ids, -1),
          "topk_log_probs": np.where(has[..., None], lps, -np.inf)}


def write_npz(path, arrays):
  np.savez(path, **arrays)
  return str(path)


def write_parquet(path, arrays):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  lps = np.where(np.isinf(arrays["topk_log_probs"]), -9999.0, arrays["topk_log_probs"])
  pq.write_table(pa.table({"row": arrays["row"], "token_ids": arrays["token_ids"].tolist(),
                           "topk_ids": arrays["topk_ids"].tolist(), "topk_log_probs": lps.tolist()}), path)
  return str(path)


def assert_same_targets(imported: str, reference: str, x: np.ndarray, labels=None):
  """The imported top-k equal the build's where the file holds a distribution (every non-padding position but a
  scored run's last), placeholders elsewhere."""
  got, want = read_all(imported), read_all(reference)
  np.testing.assert_array_equal(got["labels"], want["labels"])
  np.testing.assert_array_equal(got["index"], want["index"])
  has = np.zeros(x.shape[::2], bool)
  for r in range(len(x)):
    has[r, :scored(x, r) - 1] = True
  if labels is not None:
    has = labels >= 0
  np.testing.assert_array_equal(got["target_ids"][has], want["target_ids"][has])
  np.testing.assert_allclose(got["target_log_probs"][has], want["target_log_probs"][has], atol=2e-5)
  np.testing.assert_allclose(got["target_rest"][has], want["target_rest"][has], atol=2e-5)
  return got, has


@pytest.mark.parametrize("layout", ["vllm", "vllm-no-ids", "axolotl-v1", "axolotl-v2", "npz", "parquet"])
def test_an_import_equals_the_build_of_the_same_distribution(built, text_dir, tmp_path, layout):
  x, full = built["x"], built["full"][1]
  writers = {"vllm": lambda p: write_vllm(p, x, full), "vllm-no-ids": lambda p: write_vllm(p, x, full, token_ids=False),
             "axolotl-v1": lambda p: write_axolotl(p, x, full, 1), "axolotl-v2": lambda p: write_axolotl(p, x, full, 2),
             "npz": lambda p: write_npz(p, arrays_of(x, full)),
             "parquet": lambda p: write_parquet(p, arrays_of(x, full))}
  suffix = {"npz": ".npz", "parquet": ".parquet"}.get(layout, ".jsonl")
  path = writers[layout](tmp_path / f"teacher{suffix}")
  out = import_logprobs(settings(text_dir, tmp_path / "c.zarr"), [path])
  got, has = assert_same_targets(out, built["caches"][1], x)
  # Elsewhere: no mass in the k, all of it in the rest.
  assert (got["target_log_probs"][~has] == PLACEHOLDER).all() and (got["target_rest"][~has] == 0).all()
  assert verified(out)
  spec = open_cache(out).spec
  assert spec.temperature == 1.0 and spec.target_kind == "topk" and spec.target_k == K and not spec.member_logits
  assert spec.members[0].model == "imported" and spec.imported["generation_temperature"] == 1.0
  assert spec.imported["format"] == layout.replace("-no-ids", "").replace("npz", "arrays").replace("parquet", "arrays")


def test_a_generation_temperature_of_2_equals_a_build_at_t2_and_info_shows_the_import(built, text_dir, tmp_path):
  x = built["x"]
  path = write_npz(tmp_path / "t2.npz", arrays_of(x, built["full"][2]))
  out = import_logprobs(settings(text_dir, tmp_path / "c.zarr", generation_temperature=2.0), [path])
  assert open_cache(out).spec.temperature == 2.0
  assert_same_targets(out, built["caches"][2], x)
  info = cache_info(out)
  assert info["spec"]["imported"]["generation_temperature"] == 2.0
  # A cache that was not imported records nothing: its attributes read as before.
  assert "imported" not in cache_info(built["caches"][1])["spec"]


def test_a_row_scored_per_segment_equals_the_whole_row_import(built, text_dir, tmp_path):
  x, full = built["x"], built["full"][1]
  whole = import_logprobs(settings(text_dir, tmp_path / "w.zarr"), [write_vllm(tmp_path / "w.jsonl", x, full)])
  assert (x[:, 1].max(axis=1) > 1).sum() >= 2  # Rows of several pieces.
  # Two shards: the pieces of the even rows and of the odd rows.
  shards = [write_vllm(tmp_path / f"s{p}.jsonl", x, full, rows=range(p, len(x), 2), segments=True) for p in (0, 1)]
  pieces = import_logprobs(settings(text_dir, tmp_path / "s.zarr"), shards)
  assert_same_targets(pieces, whole, x, labels=built["labels"])
  assert verified(pieces)


def test_the_rest_bucket_is_one_minus_the_top_k_mass(built, text_dir, tmp_path):
  x, full = built["x"], built["full"][1]
  out = import_logprobs(settings(text_dir, tmp_path / "c.zarr", targets="topk:3"),
                        [write_npz(tmp_path / "t.npz", arrays_of(x, full))])
  got = read_all(out)
  has = built["labels"] >= 0
  ids, lps = topk(full, 3)
  np.testing.assert_array_equal(got["target_ids"][has], ids[has])
  np.testing.assert_allclose(np.exp(got["target_rest"][has]), 1 - np.exp(lps[has]).sum(-1), rtol=1e-5)


@pytest.mark.fast
def test_retempering_is_exact_on_the_top_k_and_the_true_rest_lies_within_the_bounds():
  rng = np.random.default_rng(0)
  n_vocab, k = 300, 10
  zipf = 1 / np.arange(1, n_vocab + 1) ** 1.1
  peaked = np.exp(rng.normal(size=n_vocab) + 9 * (np.arange(n_vocab) == 0))
  for p in (zipf / zipf.sum(), np.sort(peaked / peaked.sum())[::-1]):
    top, tail = p[:k], p[k:]
    for tg, t in ((1.0, 2.0), (1.0, 0.5), (2.0, 4.0), (1.0, 1.7)):
      a = tg / t
      log_p, log_rest, low, high = retemper(np.log(top)[None], np.log([1 - top.sum()]), a, n_vocab - k)
      true = p ** a / (p ** a).sum()  # The whole distribution re-tempered: what the file cannot hold.
      np.testing.assert_allclose(np.diff(log_p[0]), np.diff(np.log(true[:k])), atol=1e-12)  # Exact ratios.
      assert abs(np.logaddexp.reduce(log_p[0]) - np.log(1 - np.exp(log_rest[0]))) < 1e-12  # Renormalised.
      true_share = true[k:].sum()
      assert low[0] - 1e-12 <= true_share <= high[0] + 1e-12
      assert low[0] <= np.exp(log_rest[0]) <= high[0] + 1e-12
      # The rule: of the tail as one token, spread evenly and the bounds' geometric midpoint, the closest.
      tail_mass = tail.sum()
      lo, hi = sorted([tail_mass ** a, (n_vocab - k) ** (1 - a) * tail_mass ** a])  # KD_NOTES section 9.
      s = (top ** a).sum()
      shares = {"one": tail_mass ** a, "even": (n_vocab - k) ** (1 - a) * tail_mass ** a, "geo": np.sqrt(lo * hi)}
      errors = {rule: abs(r / (s + r) - true_share) for rule, r in shares.items()}
      assert min(errors, key=errors.get) == REST_RULE, errors


def test_retemper_through_the_import_records_its_bounds(built, text_dir, tmp_path):
  x, full = built["x"], built["full"][1]
  out = import_logprobs(settings(text_dir, tmp_path / "c.zarr", retemper=2.0),
                        [write_npz(tmp_path / "t.npz", arrays_of(x, full))])
  spec = open_cache(out).spec
  assert spec.temperature == 2.0
  record = spec.imported["retemper"]
  assert record["a"] == 0.5 and record["rule"] == REST_RULE and 0 < record["bounds_width_max"] < 1
  got = read_all(out)
  has = built["labels"] >= 0
  ids, lps = topk(full)
  np.testing.assert_array_equal(got["target_ids"][has], ids[has])
  # Exact ratios at T = 2: the re-tempered top k differ by half the T = 1 differences.
  np.testing.assert_allclose(np.diff(got["target_log_probs"][has], axis=-1), np.diff(lps[has], axis=-1) / 2, atol=1e-5)
  # The true rest at T = 2 (the full distribution's) lies within the recorded rule's bounds: check per position.
  at_2 = built["full"][2][has]
  true_rest = 1 - np.exp(np.take_along_axis(at_2, ids[has], -1)).sum(-1)
  tail = 1 - np.exp(lps[has]).sum(-1)
  low, high = tail ** 0.5, (V - K) ** 0.5 * tail ** 0.5  # a = 1/2 < 1: [r^a, n^(1-a) r^a].
  top = np.exp(0.5 * lps[has]).sum(-1)
  assert ((low / (top + low) <= true_rest + 1e-9) & (true_rest <= high / (top + high) + 1e-9)).all()
  assert verified(out)
  # The member's digest: of the canonical arrays and the import settings, not of the file's name.
  again = import_logprobs(settings(text_dir, tmp_path / "a.zarr", retemper=2.0),
                          [write_npz(tmp_path / "other-name.npz", arrays_of(x, full))])
  kept = import_logprobs(settings(text_dir, tmp_path / "k.zarr"), [str(tmp_path / "t.npz")])
  digests = [open_cache(c).spec.members[0].digest for c in (out, again, kept)]
  assert digests[0] == digests[1] != digests[2]


@pytest.mark.fast
def test_vllm_lines_take_k_or_k_plus_one_entries_and_minus_9999_as_minus_inf(tmp_path):
  path = tmp_path / "v.jsonl"
  lines = [{"row": 0, "prompt_token_ids": [5, 6, 7], "prompt_logprobs": [
      None, {"6": {"logprob": -0.1, "rank": 1}, "9": {"logprob": -9999.0, "rank": 2}},
      {"8": {"logprob": -0.2, "rank": 1}, "4": {"logprob": -3.0, "rank": 2}, "7": {"logprob": -5.0, "rank": 9}}]}]
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  layout, (segment,) = read_jsonl(str(path), 1)
  assert layout == "vllm" and segment.ids.shape == (3, 2)
  np.testing.assert_array_equal(segment.ids[:2], [[6, 9], [8, 4]])
  assert segment.log_probs[0, 1] == -np.inf and segment.present.tolist() == [True, True, False]


# --- refusals: one line, nothing written ------------------------------------------------------------------------


def refused(text_dir, tmp_path, files, pattern, **changes):
  out = tmp_path / "refused.zarr"
  with pytest.raises(StillroomError, match=pattern) as caught:
    import_logprobs(settings(text_dir, out, **changes), files)
  assert "\n" not in str(caught.value)
  assert not os.path.exists(out)
  return str(caught.value)


def test_shifted_tokens_are_refused_naming_the_document(built, text_dir, tmp_path):
  x, full = built["x"], built["full"][1]
  message = refused(text_dir, tmp_path, [write_axolotl(tmp_path / "s.jsonl", x, full, 2, shift=1)],
                    r"shifted by one position")
  assert "row 0" in message and "position" in message and "its token" in message and "s.jsonl" in message


def test_other_tokens_are_refused_with_the_tokenizer_hint(built, text_dir, tmp_path):
  x, full = built["x"], built["full"][1]
  other = x.copy()
  other[:, 0] = np.where(other[:, 1] > 0, other[:, 0] + 3, 0)  # Another tokenizer's ids: 3 specials first.
  refused(text_dir, tmp_path, [write_vllm(tmp_path / "o.jsonl", other, full)],
          r"other tokens \(scored with another tokenizer\? pass --teacher-tokenizer")
  # vLLM without token ids: an entry lacking the row's token.
  refused(text_dir, tmp_path, [write_vllm(tmp_path / "n.jsonl", other, full, token_ids=False)],
          r"does not hold the row's token .*: other tokens")


def test_a_distribution_shifted_by_one_is_refused_by_its_rates(built, text_dir, tmp_path):
  x, full = built["x"], built["full"][1]
  arrays = arrays_of(x, full)
  # Position j holds the distribution of token j (not j + 1): the token ids are right, the top-k are not.
  for name in ("topk_ids", "topk_log_probs"):
    arrays[name][:, 1:] = arrays[name][:, :-1].copy()
  refused(text_dir, tmp_path, [write_npz(tmp_path / "d.npz", arrays)],
          r"d\.npz': the distributions are shifted by one position: position j's top-k holds token j in \d")


def test_mass_on_padded_vocabulary_ids_is_bounded(built, text_dir, tmp_path):
  x, full = built["x"], built["full"][1]
  arrays = arrays_of(x, full)
  has = arrays["topk_ids"][..., -1] >= 0
  for mass, accepted in ((0.01, False), (1e-5, True)):
    padded = {**arrays, "topk_ids": arrays["topk_ids"].copy(), "topk_log_probs": arrays["topk_log_probs"].copy()}
    padded["topk_ids"][..., -1] = np.where(has, 300, -1)  # The last of the k: a padding id of a 320-id vocabulary.
    padded["topk_log_probs"][..., -1] = np.where(has, np.log(mass), -np.inf)
    path = write_npz(tmp_path / f"p{mass}.npz", padded)
    if not accepted:
      refused(text_dir, tmp_path, [path], r"puts 0\.01 of its mass on ids >= 256 .* --max-padding-mass 0\.001")
      continue
    out = import_logprobs(settings(text_dir, tmp_path / "ok.zarr"), [path])
    record = open_cache(out).spec.imported["padding"]
    assert record["mass_max"] == pytest.approx(1e-5) and record["bound"] == 1e-3
    got = read_all(out)
    assert (got["target_ids"] < V).all() and verified(out)
    # The rest renormalised: the kept top k of 7 over the real vocabulary, their mass scaled by 1 / (1 - 1e-5).
    ids, lps = topk(full, 7)
    p = built["labels"] >= 0
    np.testing.assert_allclose(got["target_log_probs"][p][:, :7], lps[p] - np.log1p(-1e-5), atol=2e-5)


def test_a_teacher_tokenizer_maps_ids_by_strings_and_a_low_share_is_refused(built, text_dir, tmp_path):
  """A byte-level BPE teacher whose vocabulary puts 3 special tokens before the 256 bytes (ids + 3): refused
  without a map, imported with one; a teacher that knows only half the bytes is below the mapped-share threshold."""
  from shared.data.text import byte_level_alphabet  # pylint: disable=import-outside-toplevel
  x, full = built["x"], built["full"][1]
  alphabet = byte_level_alphabet()

  def tokenizer(strings):
    path = tmp_path / f"tok{abs(hash(tuple(strings)))}.json"  # A file per vocabulary: tokenizers are cached by path.
    vocab = {s: i for i, s in enumerate(strings)}
    path.write_text(json.dumps({"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
                                "post_processor": None, "decoder": None,
                                "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}))
    return str(path)
  shifted = {**arrays_of(x, full)}
  has = shifted["topk_ids"] >= 0
  shifted["topk_ids"] = np.where(has, shifted["topk_ids"] + 3, -1)
  shifted["token_ids"] = np.where(x[:, 1] > 0, x[:, 0] + 3, 0)
  path = write_npz(tmp_path / "t.npz", shifted)
  refused(text_dir, tmp_path, [path], r"other tokens \(scored with another tokenizer")
  teacher = tokenizer(["<unk>", "<s>", "</s>", *alphabet])
  out = import_logprobs(settings(text_dir, tmp_path / "m.zarr", teacher_tokenizer=teacher), [path])
  assert_same_targets(out, built["caches"][1], x)
  imported = open_cache(out).spec.imported
  record = imported["tokenizer_map"]
  assert record["mapped_share_mean"] == 1.0 and record["threshold"] == 0.9
  assert imported["shift_rates"]["aligned"] > 0.9 > imported["shift_rates"]["shifted"]  # In student ids.
  # Half the byte strings unknown to the student (a teacher of other strings): their mass goes to the rest...
  half = ["<unk>", "<s>", "</s>", *[s if b in x[:, 0] else s + "#" for b, s in enumerate(alphabet)]]
  out = import_logprobs(settings(text_dir, tmp_path / "h.zarr", teacher_tokenizer=tokenizer(half),
                                 min_mapped_share=0.0), [path])
  record = open_cache(out).spec.imported["tokenizer_map"]
  assert 0.05 < record["mapped_share_mean"] < 0.9 and verified(out)
  # The share against NumPy: each predicting position's top-k mass on the bytes the student knows, over its top-k's.
  ids, lps = topk(full)
  known = np.isin(ids, x[:, 0])
  share = (np.exp(lps) * known).sum(-1) / np.exp(lps).sum(-1)
  where = built["labels"] >= 0
  assert record["mapped_share_mean"] == pytest.approx(share[where].mean(), rel=1e-9)
  assert record["mapped_share_min"] == pytest.approx(share[where].min(), abs=1e-12)
  # The unmapped mass is in the rest: the stored top-k holds the known bytes' mass only.
  got = read_all(out)
  np.testing.assert_allclose(1 - np.exp(got["target_rest"][where]), (np.exp(lps) * known).sum(-1)[where], atol=2e-5)
  # ...and below the threshold, refused.
  refused(text_dir, tmp_path, [path], r"of the teacher's top-k mass maps to the student's tokens on average \(least "
          r"0\.0%: --logprobs '.*t\.npz' row \d+ of the arrays \(row \d+, position \d+, doc\d\.txt, its token \d+\)\), "
          r"below --min-mapped-share 0\.9", teacher_tokenizer=tokenizer(half))


def test_missing_repeated_and_unknown_rows_and_positions_are_refused(built, text_dir, tmp_path):
  x, full = built["x"], built["full"][1]
  arrays = arrays_of(x, full)
  r, j = np.argwhere(built["labels"] >= 0)[3]
  holes = {**arrays, "topk_ids": arrays["topk_ids"].copy()}
  holes["topk_ids"][r, j] = -1
  refused(text_dir, tmp_path, [write_npz(tmp_path / "h.npz", holes)],
          rf"\(row {r}, position {j}, .*\): 1 position\(s\) that predict a token have no distribution")
  some = {name: values[:-1] for name, values in arrays.items()}
  refused(text_dir, tmp_path, [write_npz(tmp_path / "m.npz", some)],
          rf"no log-probabilities for 1 of the {len(x)} rows")
  refused(text_dir, tmp_path, [write_npz(tmp_path / "a.npz", arrays), write_npz(tmp_path / "b.npz", arrays)],
          r"position 0 is given twice")
  unknown = {**arrays, "row": arrays["row"] + 1}
  refused(text_dir, tmp_path, [write_npz(tmp_path / "u.npz", unknown)], r"are not rows of this transfer set")


def test_temperature_with_logprobs_is_refused(built, text_dir, tmp_path):
  x, full = built["x"], built["full"][1]
  refused(text_dir, tmp_path, [write_npz(tmp_path / "t.npz", arrays_of(x, full))],
          r"--temperature 2 with --logprobs: .* --generation-temperature Tg .* --retemper T", temperature=2.0)
  refused(text_dir, tmp_path, [], r"^--retemper must be > 0 and finite, got 0\.0\.$", retemper=0.0)
  refused(text_dir, tmp_path, [], r"^--generation-temperature must be > 0 and finite, got nan\.$",
          generation_temperature=float("nan"))


@pytest.mark.fast
def test_empty_slots_take_the_smallest_ids_a_position_does_not_hold():
  from teacher_cache.logprobs import _fill_ids  # pylint: disable=import-outside-toplevel
  ids = np.array([[[0, 2, -1, -1], [-1, -1, -1, -1], [5, 1, 0, -1], [3, 1, 2, 0]]])
  filled = _fill_ids(ids, 6)
  np.testing.assert_array_equal(np.where(ids >= 0, ids, filled), [[[0, 2, 1, 3], [0, 1, 2, 3], [5, 1, 0, 2],
                                                                   [3, 1, 2, 0]]])
  assert _fill_ids(np.array([[4, -1, -1]]), 5).tolist()[0][1:] == [0, 1]  # A small vocabulary: ids below V.


def test_info_prints_the_import_record(built, text_dir, tmp_path, capsys):
  from teacher_cache.cli import main  # pylint: disable=import-outside-toplevel
  out = import_logprobs(settings(text_dir, tmp_path / "c.zarr", retemper=4.0),
                        [write_npz(tmp_path / "t.npz", arrays_of(built["x"], built["full"][1]))])
  main(["info", out])
  printed = capsys.readouterr().out
  assert "imported        (log-probs)" in printed  # The member's line: neither parameters nor logits.
  lines = [line for line in printed.splitlines() if line.startswith("import ")]
  assert "arrays top-8 log-probabilities, generation temperature 1" in lines[0]
  assert "re-tempered from T=1 to T=4 (a = 0.25)" in lines[1] and "rule 'even'" in lines[1]


def test_the_rows_of_views_are_the_rows_import_aligns_to(built, text_dir, tmp_path):
  """A teacher scoring the rows `teacher-cache views` writes (x, row) gives files that import with --views-dir."""
  from teacher_cache.external import write_views  # pylint: disable=import-outside-toplevel
  write_views(settings(text_dir, tmp_path / "views"))
  with np.load(tmp_path / "views" / "views_00000.npz") as views:
    np.testing.assert_array_equal(views["x"], built["x"][views["row"], 0])
    np.testing.assert_array_equal(views["segment_ids"], built["x"][views["row"], 1])
  path = write_npz(tmp_path / "t.npz", arrays_of(built["x"], built["full"][1]))
  out = import_logprobs(settings(text_dir, tmp_path / "c.zarr"), [path], views_dir=str(tmp_path / "views"))
  assert_same_targets(out, built["caches"][1], built["x"])
  with pytest.raises(StillroomError, match="holds views of other settings"):
    import_logprobs(settings(text_dir, tmp_path / "d.zarr", seed=1), [path], views_dir=str(tmp_path / "views"))


@pytest.mark.fast
def test_a_vllm_server_response_is_read_from_its_first_choice(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text(json.dumps({"row": 1, "start": 4, "choices": [{"prompt_token_ids": [3, 4], "prompt_logprobs": [
      None, {"4": {"logprob": -0.5, "rank": 1}}]}]}) + "\n")
  layout, (segment,) = read_jsonl(str(path), 2)
  assert layout == "vllm" and (segment.row, segment.start) == (1, 4) and segment.tokens.tolist() == [3, 4]
  assert segment.ids[0, 0] == 4 and segment.log_probs[0, 0] == -0.5


@pytest.mark.fast
def test_ragged_parquet_columns_are_refused(tmp_path):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from teacher_cache.logprobs import read_arrays  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "r.parquet")
  pq.write_table(pa.table({"row": [0, 1], "token_ids": [[1, 2], [3]], "topk_ids": [[[2], [-1]], [[-1]]],
                           "topk_log_probs": [[[-0.1], [-9999.0]], [[-9999.0]]]}), path)
  with pytest.raises(StillroomError, match=r"r\.parquet'.*: column `token_ids` is ragged or not numbers \(lists of "
                                           r"lengths \[1, 2\]"):
    read_arrays(path, 2)


@pytest.mark.fast
def test_malformed_jsonl_lines_are_refused_naming_the_line(tmp_path):
  cases = {'{"row": 0, "input_ids": [1, "x"], "logprobs": [[{"token": "token_id:2", "logprob": -0.1}]]}':
           r"line 1: is malformed \(ValueError",
           '{"row": 0, "prompt_logprobs": [null, {"a": {"logprob": -0.1}}]}': r"line 1: .*has key 'a', not a token id",
           '{"row": 0, "input_ids": [1, 2]}': r"line 1: is none of the layouts",
           '{"row": 5, "input_ids": [1, 2], "logprobs": [[]]}': r"line 1: row 5 is not a row of this transfer set",
           'not json': r"line 1: is not JSON"}
  for line, pattern in cases.items():
    path = tmp_path / "m.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(StillroomError, match=pattern):
      read_jsonl(str(path), 2)


@pytest.mark.fast
def test_vllm_k_is_read_from_ranks_when_every_prompt_token_is_outside_the_top_k(tmp_path):
  """Entries of k + 1 (the prompt's token outside: of rank 9; tied with the k-th: a repeated rank) and none of k:
  top-2, not top-3 with the prompt's token as the third; a rank repeated inside a top-k of ties (competition ranks)
  does not lower k; entries of the prompt's token alone (prompt_logprobs 0) refused."""
  path = tmp_path / "v.jsonl"
  lines = [{"row": 0, "prompt_token_ids": [5, 6, 7], "prompt_logprobs": [
      None, {"6": {"logprob": -9.0, "rank": 9}, "1": {"logprob": -0.1, "rank": 1}, "2": {"logprob": -3.0, "rank": 2}},
      {"7": {"logprob": -3.0, "rank": 2}, "8": {"logprob": -0.2, "rank": 1}, "4": {"logprob": -3.0, "rank": 2}}]}]
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  _, (segment,) = read_jsonl(str(path), 1)
  assert segment.ids.shape == (3, 2)
  np.testing.assert_array_equal(segment.ids[0], [1, 2])
  assert segment.ids[1, 0] == 8 and segment.log_probs[1].tolist() == [-0.2, -3.0]
  path.write_text(json.dumps({"row": 0, "prompt_token_ids": [5, 6], "prompt_logprobs": [
      None, {"6": {"logprob": -0.1, "rank": 1}, "1": {"logprob": -3.0, "rank": 2}, "2": {"logprob": -3.0, "rank": 2}}]})
                  + "\n")
  assert read_jsonl(str(path), 1)[1][0].ids.shape == (2, 3)
  path.write_text(json.dumps({"row": 0, "prompt_token_ids": [5, 6], "prompt_logprobs": [
      None, {"6": {"logprob": -2.0, "rank": 4}}]}) + "\n")
  with pytest.raises(StillroomError, match=r"only the prompt's own token, no top-k .*prompt_logprobs k >= 1"):
    read_jsonl(str(path), 1)


@pytest.mark.fast
def test_vllm_entries_of_several_k_are_cut_to_the_fewest_with_a_warning(tmp_path, caplog):
  path = tmp_path / "w.jsonl"
  path.write_text(json.dumps({"row": 0, "prompt_token_ids": [5, 6, 7], "prompt_logprobs": [
      None, {"6": {"logprob": -0.1, "rank": 1}, "2": {"logprob": -3.0, "rank": 2}},
      {"7": {"logprob": -0.2, "rank": 1}}]}) + "\n")
  with caplog.at_level("WARNING"):
    _, (segment,) = read_jsonl(str(path), 1)
  assert segment.ids.shape == (3, 1) and segment.ids[:2, 0].tolist() == [6, 7]
  assert [r.message for r in caplog.records if "cut to its top 1" in r.message], caplog.text


def test_vllm_lines_without_token_ids_whose_prompt_tokens_are_shifted_are_refused_as_shifted(built, text_dir, tmp_path):
  x, full = built["x"], built["full"][1]
  moved = x.copy()
  moved[:, 0] = np.where(x[:, 1] > 0, np.roll(x[:, 0], 1, axis=-1), 0)  # Entry i holds the row's token i - 1.
  refused(text_dir, tmp_path, [write_vllm(tmp_path / "m.jsonl", moved, full, token_ids=False)],
          r"m\.jsonl' line \d+ \(row \d+, position \d+, .*\): vLLM's prompt_logprobs\[\d+\] does not hold the row's "
          r"token \d+: its tokens are the row's shifted by one position")


@pytest.mark.fast
def test_retemper_takes_each_positions_tail_size():
  """A position whose top-k has empty slots (padding trimmed, ids unmapped) has a tail of V less its stored tokens:
  its uniform tail (every tail token of mass r / n) re-tempers to exactly the even rule's rest, within the bounds."""
  n_vocab, k, a = 40, 4, 0.5
  log_probs = np.array([[0.4, 0.2, 0.1, 0.05], [0.4, 0.2, -np.inf, -np.inf]])
  log_probs[0], log_probs[1, :2] = np.log(log_probs[0]), np.log(log_probs[1, :2])
  log_rest = np.log(1 - np.exp(log_probs).sum(-1))
  tails = n_vocab - np.array([4, 2])
  log_p, out_rest, low, high = retemper(log_probs, log_rest, a, tails)
  for q in range(2):
    p = np.concatenate([np.exp(log_probs[q, :k - 2 * q]), np.full(tails[q], np.exp(log_rest[q]) / tails[q])])
    true = p ** a / (p ** a).sum()
    assert np.exp(out_rest[q]) == pytest.approx(true[k - 2 * q:].sum(), rel=1e-12)
    assert low[q] <= np.exp(out_rest[q]) <= high[q] * (1 + 1e-12)
    one = retemper(log_probs[q], log_rest[q], a, int(tails[q]))  # Per position as a scalar: the same.
    np.testing.assert_allclose(one[1], out_rest[q], rtol=1e-12)
