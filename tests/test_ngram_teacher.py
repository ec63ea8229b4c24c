"""The worked example's external teacher (scripts/ngram_teacher.py): the NumPy n-gram model against a pure-Python
Kneser-Ney reference, each document piece scored on its own, cross-fitting, and its vLLM prompt-logprobs lines
against the distributions they come from."""

import collections
import importlib.util
import json
import math
import os

import numpy as np
import pytest

import conftest
from shared.data.text import next_token_labels
from teacher_cache.cli import main as cache_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
  spec = importlib.util.spec_from_file_location("ngram_teacher", os.path.join(REPO, "scripts", "ngram_teacher.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ngram = _load_script()


def random_rows(count: int, length: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Packed rows of random pieces (segments 1, 2, ...; some rows end in padding)."""
  rng = np.random.default_rng(seed)
  tokens, segments = np.zeros((count, length), np.int64), np.zeros((count, length), np.int64)
  for r in range(count):
    used = length - int(rng.integers(0, length // 3 + 1)) if r % 2 else length
    start, segment = 0, 1
    while start < used:
      size = min(int(rng.integers(1, length // 2 + 2)), used - start)
      tokens[r, start:start + size] = rng.integers(0, vocab, size)
      segments[r, start:start + size] = segment
      start, segment = start + size, segment + 1
  return tokens, segments


def pieces_of(tokens, segments) -> list[list[int]]:
  return [[int(t) for t, s in zip(row, segs) if s == segment] for row, segs in zip(tokens, segments)
          for segment in sorted(set(segs.tolist()) - {0})]


def reference_kn(pieces: list[list[int]], order: int, vocab: int):
  """Pure Python interpolated Kneser-Ney as the script's docstring states it: the top order's raw counts, lower
  orders' distinct left contexts (a piece's start one of them), one discount n1 / (n1 + 2 n2) per order (clipped
  to [0.05, 0.95]; 0.75 without both), down to uniform. Returns p(context tuple) -> [V]."""
  counts = [collections.Counter() for _ in range(order)]
  lefts = [collections.defaultdict(set) for _ in range(order)]
  for piece in pieces:
    for j in range(len(piece) - 1):
      for m in range(min(order - 1, j + 1) + 1):
        context, token = tuple(piece[j - m + 1:j + 1]), piece[j + 1]
        counts[m][context, token] += 1
        lefts[m][context, token].add(piece[j - m] if j - m >= 0 else "BOS")
  tables = []
  for m in range(order):
    table = dict(counts[m]) if m == order - 1 else {key: len(v) for key, v in lefts[m].items()}
    n1 = sum(1 for c in table.values() if c == 1)
    n2 = sum(1 for c in table.values() if c == 2)
    discount = min(max(n1 / (n1 + 2 * n2), 0.05), 0.95) if n1 and n2 else 0.75
    by_context = collections.defaultdict(dict)
    for (context, token), c in table.items():
      by_context[context][token] = c
    tables.append((by_context, discount))

  def p(context: tuple) -> list[float]:
    probs = [1 / vocab] * vocab
    for m in range(len(context) + 1):
      by_context, discount = tables[m]
      here = context[len(context) - m:] if m else ()
      if here not in by_context:
        continue
      followers = by_context[here]
      total = sum(followers.values())
      probs = [discount * len(followers) / total * q + max(followers.get(w, 0) - discount, 0) / total
               for w, q in enumerate(probs)]
    return probs
  return p


@pytest.mark.fast
@pytest.mark.parametrize("order", [1, 3, 4])
def test_the_ngram_model_is_kneser_ney_within_each_piece(order):
  vocab = 6
  tokens, segments = random_rows(12, 16, vocab)
  model = ngram.NgramLM(order, vocab).fit(tokens, segments)
  probs = model.probs(tokens, segments)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-12)
  reference = reference_kn(pieces_of(tokens, segments), order, vocab)
  for r in range(len(tokens)):
    for j in range(tokens.shape[1]):
      if segments[r, j] == 0:
        continue
      start = j - int(ngram.piece_offsets(segments[r:r + 1])[0, j])
      context = tuple(int(t) for t in tokens[r, max(start, j - order + 2):j + 1]) if order > 1 else ()
      np.testing.assert_allclose(probs[r, j], reference(context), rtol=1e-10, err_msg=f"row {r} position {j}")


@pytest.mark.fast
def test_a_piece_never_sees_the_tokens_of_another():
  vocab = 5
  tokens, segments = random_rows(8, 20, vocab, seed=1)
  model = ngram.NgramLM(4, vocab).fit(tokens, segments)
  probs = model.probs(tokens, segments)
  changed = tokens.copy()
  # Change every token of every first piece: the other pieces' distributions stay the same.
  first = segments == 1
  changed[first] = (changed[first] + 1) % vocab
  again = model.probs(changed, segments)
  np.testing.assert_array_equal(probs[~first], again[~first])


@pytest.mark.fast
def test_cross_fitting_scores_each_row_by_the_model_of_the_other_folds():
  vocab = 6
  tokens, segments = random_rows(10, 12, vocab, seed=2)
  row = np.arange(10) + 100
  models = ngram.fold_models(tokens, segments, row, 3, vocab, 4)
  probs = ngram.cross_fitted_probs(models, tokens, segments, row)
  for r in (0, 5, 9):
    others = row % 4 != row[r] % 4
    alone = ngram.NgramLM(3, vocab).fit(tokens[others], segments[others])
    np.testing.assert_array_equal(probs[r], alone.probs(tokens[r:r + 1], segments[r:r + 1])[0])


@pytest.mark.fast
def test_vllm_lines_hold_the_top_k_and_the_prompt_s_token_with_its_rank():
  vocab, k = 12, 3
  tokens, segments = random_rows(4, 16, vocab, seed=3)
  probs = ngram.NgramLM(3, vocab).fit(tokens, segments).probs(tokens, segments)
  probs[0, 0] = 0.0  # A zero: -inf, written as vLLM writes it.
  probs[0, 0, :2] = 0.5
  decoded = [f"<{t}>" for t in range(vocab)]
  outside = 0
  for r in range(len(tokens)):
    lines = list(ngram.vllm_lines(100 + r, tokens[r], segments[r], probs[r], k, decoded))
    assert len(lines) == len(set(segments[r].tolist()) - {0})
    labels = next_token_labels(np.stack([tokens[r], segments[r]])[None])[0]
    covered = []
    for line in lines:
      json.dumps(line, allow_nan=False)  # Plain JSON: no NaN or Infinity.
      start, ids, entries = line["start"], line["prompt_token_ids"], line["prompt_logprobs"]
      assert line["row"] == 100 + r and entries[0] is None and len(entries) == len(ids)
      assert ids == tokens[r, start:start + len(ids)].tolist()
      assert set(segments[r, start:start + len(ids)].tolist()) == {segments[r, start]}
      for i, entry in enumerate(entries[1:], 1):
        j = start + i - 1
        covered.append(j)
        assert labels[j] == ids[i]  # Entry i is the distribution of the piece's token i: position j predicts it.
        order = np.argsort(-probs[r, j], kind="stable")
        top = {str(t): rank + 1 for rank, t in enumerate(order[:k])}
        assert {key: value["rank"] for key, value in list(entry.items())[:k]} == top  # The top k first, ranks 1..k.
        for key, value in entry.items():
          lp = math.log(probs[r, j, int(key)]) if probs[r, j, int(key)] > 0 else -9999.0
          assert value["logprob"] == pytest.approx(lp, abs=1e-6) and value["decoded_token"] == f"<{key}>"
        if str(ids[i]) in top:
          assert len(entry) == k
        else:
          outside += 1
          assert len(entry) == k + 1
          # vLLM's rank: 1 + the ids of higher probability (a tie with the k-th keeps its rank k).
          assert list(entry)[k] == str(ids[i])
          assert entry[str(ids[i])]["rank"] == 1 + int((probs[r, j] > probs[r, j, ids[i]]).sum()) >= k
    assert covered == np.flatnonzero(labels >= 0).tolist()  # Every predicting position once, nothing else.
  assert outside > 0
  assert any(v["logprob"] == -9999.0 for line in ngram.vllm_lines(0, tokens[0], segments[0], probs[0], vocab,
                                                                    decoded) for e in line["prompt_logprobs"][1:2]
             for v in e.values())


def test_score_reads_the_views_and_refuses_views_of_images(tmp_path, capsys, data_dir):
  folder = conftest.write_documents(tmp_path / "docs", ["the cat sat on the mat. the cat sat.", "hello, world",
                                                        "a b a b a b a b"])
  views = tmp_path / "views"
  assert conftest.run_cli(cache_main, ["views", "--dataset", f"text:{folder}", "--seq-len", "16", "--no-progress",
                                       "--out", views], capsys)[0] == 0
  out = tmp_path / "ngram.jsonl"
  ngram.main(["score", str(views), str(out), "--order", "3", "--top-k", "4", "--folds", "2"])
  assert "wrote" in capsys.readouterr().out
  rows = ngram.read_all_views(str(views))
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert sorted({line["row"] for line in lines}) == rows["row"].tolist()
  labels = next_token_labels(np.stack([rows["x"], rows["segment_ids"]], axis=1))
  assert sum(len(line["prompt_logprobs"]) - 1 for line in lines) == int((labels >= 0).sum())
  (tmp_path / "images").mkdir()
  assert conftest.run_cli(cache_main, ["views", "--dataset", "digits", "--data-dir", data_dir, "--no-progress",
                                       "--out", tmp_path / "images"], capsys)[0] == 0
  with pytest.raises(SystemExit) as raised:
    ngram.main(["score", str(tmp_path / "images"), str(tmp_path / "x.jsonl")])
  assert raised.value.code == 2 and "not token rows" in capsys.readouterr().err
  assert not (tmp_path / "x.jsonl").exists()


def test_the_worked_example_end_to_end_at_a_tiny_size(tmp_path, compilation_cache):
  """`pipeline --smoke`: views -> n-gram JSONL -> `import --logprobs` -> students, and the JAX teacher's cache of the
  same rows: the imported cache holds the n-gram's own top k (a second reader: the model scored again), the arms'
  paired differences, the outputs."""
  from shared.cache import open_cache
  from teacher_cache.verify import verify_cache
  results = ngram.run_pipeline(str(tmp_path / "work"), str(tmp_path / "results"), seeds=1, smoke=True, order=3,
                               folds=2)
  assert set(results["students"]) == {"hard labels", "n-gram KD", "JAX-teacher KD"}
  for name, arm in results["students"].items():
    assert len(arm["bits_per_byte"]["values"]) == 1 and all(np.isfinite(arm["bits_per_byte"]["values"]))
    if name != "hard labels":
      np.testing.assert_allclose(arm["bits_per_byte"]["paired_difference"]["values"],
                                 np.array(arm["bits_per_byte"]["values"]) -
                                 results["students"]["hard labels"]["bits_per_byte"]["values"])
  comparison = results["comparison"]
  assert comparison["ngram_top1_is_its_own_argmax"] == 1.0  # The import kept the n-gram's own most probable token.
  assert 0.0 <= comparison["top1_agreement"] <= 1.0 and comparison["kl_jax_to_ngram_nats"] >= 0.0
  assert all(value > 0 for value in results["teachers_bits_per_byte"].values())
  ngram_cache = next((tmp_path / "work").glob("ngram_*.zarr"))
  cache = open_cache(str(ngram_cache))
  assert not [c for c in verify_cache(str(ngram_cache)) if c.failed]
  assert cache.spec.targets == "topk:20" and cache.spec.temperature == 1.0
  rows = ngram.read_all_views(str(next((tmp_path / "work").glob("ngram_*_views"))))
  models = ngram.fold_models(rows["x"], rows["segment_ids"], rows["row"], 3, 256, 2)
  probs = ngram.cross_fitted_probs(models, rows["x"], rows["segment_ids"], rows["row"])
  labels = np.asarray(cache["labels"][:])
  at = labels >= 0
  stored = np.exp(np.asarray(cache["target_log_probs"][:], np.float64))
  expected = np.take_along_axis(probs, np.asarray(cache["target_ids"][:], np.int64), axis=-1)
  np.testing.assert_allclose(stored[at], expected[at], atol=2e-3)  # float16 log-probabilities.
  for name in ("ngram.json", "ngram.md"):
    assert os.path.getsize(tmp_path / "results" / name) > 0
