"""A language model from outside JAX: a NumPy n-gram model scores the token rows of `teacher-cache views` and writes
its top-k log-probabilities in vLLM's prompt-logprobs JSONL layout, which `teacher-cache import --logprobs` reads.

    teacher-cache views --dataset text:corpus/ --seq-len 64 --out views
    python scripts/ngram_teacher.py score views ngram.jsonl [--order 5] [--top-k 20] [--folds 4]
    teacher-cache import --dataset text:corpus/ --seq-len 64 --logprobs ngram.jsonl --out ngram.zarr

    python scripts/ngram_teacher.py pipeline [--work DIR] [--results DIR] [--seeds N] [--smoke]

The model (`NgramLM`): interpolated Kneser-Ney of order N over the token ids (one absolute discount per order from
its counts of counts; the lower orders count distinct left contexts, a document piece's start counting as one), down
to a uniform floor over the V ids, so that every id has mass. It is fit on the views' own rows, and scores each
document piece (segment) on its own, as a prompt: a position's context is its piece's tokens up to it, never a
token across a segment boundary. `--folds F` (default 4) cross-fits: row r is scored by the model fit on the rows
of the other folds (r mod F), so that the teacher does not score text it counted (`--folds 1`: in-sample).

The file: one line per document piece, `{"row": r, "start": s, "prompt_token_ids": [...], "prompt_logprobs":
[null, {...}, ...]}`: entry i (i >= 1) holds the distribution of the piece's token i given its tokens before i,
keyed by token id strings, `{"logprob", "rank", "decoded_token"}`: the top k by probability (ranks 1..k) plus the
piece's own token i with its rank when it is not among them (k + 1 entries), -inf written as -9999.0: what a vLLM
server returns for `{"prompt": ids, "max_tokens": 0, "echo": true, "prompt_logprobs": k}` (`max_logprobs` 20).

`pipeline` is the worked example of issue 35 on the text demo's data and machinery (`stillroom.demo`:
`text_data`, `text_teachers`, `text_cache`, `text_students`): views -> this n-gram -> `teacher-cache import
--logprobs` -> `lm-tiny` students; the demo's `lm-small` JAX teacher's `topk:20` cache of the same rows; it compares
the two teachers on those rows (top-1 agreement, KL on the JAX teacher's top k), each teacher's held-out bits per
byte, and the students' (hard labels, n-gram KD, JAX-teacher KD) over paired seeds. Results:
RESULTS/ngram.json and ngram.md. `--smoke`: tiny sizes that check that it runs; its figures mean nothing.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shared.data.text import next_token_labels  # noqa: E402
from shared.errors import StillroomError  # noqa: E402
from teacher_cache.external import read_views  # noqa: E402

VLLM_NEG_INF = -9999.0  # How vLLM writes a log-probability of -inf.
TOP_K = 20  # vLLM's default `max_logprobs`.
# Held-out bits per byte of orders 2..7 on the demo's validation files (fit on 384 rows of 64 bytes of its training
# files): 4.64, 4.30, 4.08, 3.93, 3.89, 3.88.
ORDER = 6
FOLDS = 4
_BATCH_VALUES = 1 << 23  # Probabilities held at once (float64: 64 MiB): positions x V.


def piece_offsets(segments: np.ndarray) -> np.ndarray:
  """int64 [R, L]: each position's offset from the start of its document piece (its segment's first position in
  the row); -1 at padding (segment 0).

  Args:
    segments: int [R, L] segment ids (1, 2, ... per piece; 0 padding).
  """
  segments = np.asarray(segments)
  j = np.arange(segments.shape[-1])
  start = np.ones(segments.shape, bool)
  start[:, 1:] = segments[:, 1:] != segments[:, :-1]
  first = np.maximum.accumulate(np.where(start, j, 0), axis=1)
  return np.where(segments > 0, j - first, -1)


def context_keys(tokens: np.ndarray, order: int, vocab_size: int) -> list[np.ndarray]:
  """[order] int64 [R, L]: key m encodes the m tokens ending at each position (tokens[j - m + 1 .. j], the most
  recent the least significant digit in base V); meaningful where the piece holds them (offset >= m - 1)."""
  tokens = np.asarray(tokens, np.int64)
  keys = [np.zeros(tokens.shape, np.int64)]
  for m in range(1, order):
    shifted = np.zeros_like(tokens)
    shifted[:, m - 1:] = tokens[:, :tokens.shape[1] - m + 1]
    keys.append(keys[-1] + shifted * vocab_size ** (m - 1))
  return keys


@dataclasses.dataclass
class _Level:
  """The counts of one context length m: n-grams `keys` (context·V + token, sorted), their `counts`, the distinct
  `contexts` (sorted) with each one's `first` n-gram, `total` count and `types` (distinct next tokens), and the
  discount."""

  keys: np.ndarray
  counts: np.ndarray
  contexts: np.ndarray
  first: np.ndarray
  total: np.ndarray
  types: np.ndarray
  discount: float


class NgramLM:
  """Interpolated Kneser-Ney n-gram language model over token ids 0..V-1 (see the module). It computes dense [V]
  distributions, 64 MiB of them at a time: meant for small vocabularies (the byte tokenizer's 256).

  Args:
    order: N, the longest n-gram (a context of N - 1 tokens).
    vocab_size: V.
  """

  def __init__(self, order: int, vocab_size: int):
    if order < 1 or vocab_size ** order >= 2 ** 62:
      raise StillroomError(f"--order {order}: must be >= 1 with V^N < 2^62 (V = {vocab_size}): the n-gram keys are "
                           "int64.")
    self.order, self.vocab_size = order, vocab_size
    self.levels: list[_Level] = []

  def fit(self, tokens: np.ndarray, segments: np.ndarray) -> "NgramLM":
    """Counts the n-grams of packed rows, never across a segment boundary.

    Args:
      tokens, segments: int [R, L] token ids and segment ids of the rows (as `teacher-cache views` writes them).
    """
    v = self.vocab_size
    labels = next_token_labels(np.stack([tokens, segments], axis=1)).astype(np.int64)
    offset, predicts = piece_offsets(segments), labels >= 0
    keys = context_keys(tokens, self.order, v)
    raw = []
    for m in range(self.order):
      at = predicts & (offset >= m - 1)
      raw.append((keys[m][at] * v + labels[at], keys[m][predicts & (offset == m - 1)] * v + labels[
          predicts & (offset == m - 1)]))
    levels: list[_Level | None] = [None] * self.order
    for m in reversed(range(self.order)):
      if m == self.order - 1:
        unique, counts = np.unique(raw[m][0], return_counts=True)
      else:  # Distinct left contexts: the longer n-grams less their oldest token, and a piece's start.
        longer = levels[m + 1].keys
        shorter = (longer // v) % (v ** m) * v + longer % v
        unique, counts = np.unique(np.concatenate([shorter, np.unique(raw[m][1])]), return_counts=True)
      counts = counts.astype(np.float64)
      contexts, first = np.unique(unique // v, return_index=True)
      n1, n2 = np.count_nonzero(counts == 1), np.count_nonzero(counts == 2)
      discount = float(np.clip(n1 / (n1 + 2 * n2), 0.05, 0.95)) if n1 and n2 else 0.75
      levels[m] = _Level(unique, counts, contexts, first, np.add.reduceat(counts, first),
                         np.diff(np.append(first, len(unique))), discount)
    self.levels = levels
    return self

  def probs(self, tokens: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """float64 [R, L, V]: at each position j, the distribution of token j + 1 given its piece's tokens up to j (the
    last N - 1 of them); every row sums to 1 (padding positions get the model's empty-context distribution)."""
    v, n_rows, length = self.vocab_size, *np.shape(tokens)
    keys = [k.reshape(-1) for k in context_keys(tokens, self.order, v)]
    longest = np.minimum(piece_offsets(segments).reshape(-1) + 1, self.order - 1)
    out = np.empty((n_rows * length, v))
    batch = max(1, _BATCH_VALUES // v)
    for start in range(0, n_rows * length, batch):
      part = slice(start, start + batch)
      out[part] = self._probs_of(longest[part], [k[part] for k in keys])
    return out.reshape(n_rows, length, v)

  def _probs_of(self, longest: np.ndarray, keys: list[np.ndarray]) -> np.ndarray:
    v = self.vocab_size
    base = self.levels[0]
    unigram = np.zeros(v)
    np.add.at(unigram, base.keys % v, np.maximum(base.counts - base.discount, 0.0))
    total = base.total[0] if len(base.total) else 1.0
    unigram = unigram / total + base.discount * len(base.keys) / total / v if len(base.keys) else np.full(v, 1 / v)
    p = np.tile(unigram, (len(longest), 1))
    for m in range(1, self.order):
      level = self.levels[m]
      if not len(level.contexts):
        continue
      where = np.minimum(np.searchsorted(level.contexts, keys[m]), len(level.contexts) - 1)
      rows = np.flatnonzero((longest >= m) & (level.contexts[where] == keys[m]))
      context = where[rows]
      total, types = level.total[context], level.types[context]
      p[rows] *= (level.discount * types / total)[:, None]  # The lower order's share.
      entries = np.repeat(level.first[context] - np.cumsum(types) + types, types) + np.arange(int(types.sum()))
      p[np.repeat(rows, types), level.keys[entries] % v] += \
          np.maximum(level.counts[entries] - level.discount, 0.0) / np.repeat(total, types)
    return p


def read_all_views(views: str) -> dict:
  """The rows of `teacher-cache views` of token rows: {"row", "x", "segment_ids"} over every file, and the record.

  Raises:
    StillroomError: not views of token rows, or unfinished ones.
  """
  record = read_views(views)
  if record.get("layout") != "tokens":
    raise StillroomError(f"{views!r} holds views of {record['dataset']['name']!r}, not token rows; write them with "
                         "`teacher-cache views --dataset text:PATH --seq-len L`.")
  parts = []
  for path in sorted(glob.glob(os.path.join(views, "views_*.npz"))):
    with np.load(path) as files:
      parts.append({name: files[name] for name in ("row", "x", "segment_ids")})
  arrays = {name: np.concatenate([p[name] for p in parts]) for name in ("row", "x", "segment_ids")}
  return {**arrays, "record": record}


def fold_models(x: np.ndarray, segments: np.ndarray, row: np.ndarray, order: int, vocab_size: int,
                folds: int) -> list[NgramLM]:
  """[F] the models of each fold f: fit on the rows whose id mod F is not f (F = 1: one model on every row)."""
  if folds == 1:
    return [NgramLM(order, vocab_size).fit(x, segments)]
  return [NgramLM(order, vocab_size).fit(x[row % folds != f], segments[row % folds != f]) for f in range(folds)]


def cross_fitted_probs(models: list[NgramLM], x: np.ndarray, segments: np.ndarray, row: np.ndarray) -> np.ndarray:
  """float64 [R, L, V]: each row's distributions by its fold's model (`fold_models`)."""
  out = np.empty((*x.shape, models[0].vocab_size))
  for f, model in enumerate(models):
    here = row % len(models) == f
    if here.any():
      out[here] = model.probs(x[here], segments[here])
  return out


def vllm_lines(row: int, tokens: np.ndarray, segments: np.ndarray, probs: np.ndarray, k: int,
               decoded: list[str]):
  """The vLLM prompt-logprobs lines of one row: one per document piece (see the module).

  Args:
    row: the row id.
    tokens, segments: int [L] the row's token and segment ids.
    probs: float [L, V] position j's distribution of token j + 1.
    k: the top k.
    decoded: [V] each id's text (`decoded_token`).

  Yields:
    dicts, one per piece, in order.
  """
  with np.errstate(divide="ignore"):
    logp = np.log(probs)
  top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  for segment in np.unique(segments[segments > 0]):
    positions = np.flatnonzero(segments == segment)
    start, stop = int(positions[0]), int(positions[-1]) + 1
    entries: list = [None]
    for j in range(start, stop - 1):
      actual = int(tokens[j + 1])
      entry = {str(int(t)): {"logprob": _written(logp[j, t]), "rank": r + 1, "decoded_token": decoded[t]}
               for r, t in enumerate(top[j])}
      if str(actual) not in entry:  # vLLM adds the prompt's own token with its true rank.
        rank = 1 + int(np.count_nonzero(probs[j] > probs[j, actual]))
        entry[str(actual)] = {"logprob": _written(logp[j, actual]), "rank": rank, "decoded_token": decoded[actual]}
      entries.append(entry)
    yield {"row": int(row), "start": start, "prompt_token_ids": [int(t) for t in tokens[start:stop]],
           "prompt_logprobs": entries}


def _written(logprob: float) -> float:
  return VLLM_NEG_INF if not math.isfinite(logprob) else round(float(logprob), 6)


def score(views: str, out: str, order: int = ORDER, k: int = TOP_K, folds: int = FOLDS) -> dict:
  """`score`: fits the n-gram model on the views' rows and writes its vLLM-layout JSONL of every row to `out`.

  Returns:
    {"rows", "lines", "positions", "order", "top_k", "folds", "seconds"}.
  """
  started = time.perf_counter()
  views_data = read_all_views(views)
  record = views_data["record"]
  x, segments, row = views_data["x"], views_data["segment_ids"], views_data["row"]
  vocab_size = int(record["vocab_size"])
  decoded = _decoded(record)
  models = fold_models(x, segments, row, order, vocab_size, folds)
  lines = positions = 0
  with open(out + ".partial", "w", encoding="utf-8") as f:
    batch = max(1, _BATCH_VALUES // (x.shape[1] * vocab_size))
    for start in range(0, len(row), batch):
      part = slice(start, start + batch)
      probs = cross_fitted_probs(models, x[part], segments[part], row[part])
      for r, tokens, segs, p in zip(row[part], x[part], segments[part], probs):
        for line in vllm_lines(int(r), tokens, segs, p, k, decoded):
          f.write(json.dumps(line, ensure_ascii=False) + "\n")
          lines += 1
          positions += len(line["prompt_logprobs"]) - 1
  os.replace(out + ".partial", out)  # Whole or not at all.
  return {"rows": int(len(row)), "lines": lines, "positions": positions, "order": order, "top_k": k, "folds": folds,
          "seconds": time.perf_counter() - started}


def _decoded(record: dict) -> list[str]:
  """[V] each token id's text, by the views' tokenizer."""
  from shared.data.text import TextOptions  # pylint: disable=import-outside-toplevel
  tokenizer = TextOptions.from_dict(record["dataset"]["text"]).tokenizer()
  return [tokenizer.decode([t]) for t in range(tokenizer.vocab_size)]


def bits_per_byte(model: NgramLM, data) -> float:
  """The model's bits per byte on a transfer set of token rows, counted by `student-train eval`'s own functions
  (`student_train.evaluate.predicted_positions`, `language_model_metrics`)."""
  # pylint: disable-next=import-outside-toplevel
  from student_train.evaluate import language_model_metrics, predicted_positions
  x, labels = data.read(np.arange(len(data)))
  log_probs = np.log(model.probs(x[:, 0], x[:, 1]))
  return language_model_metrics(predicted_positions(log_probs, labels),
                                data.source.tokenizer.byte_lengths)["bits_per_byte"]


# --- the pipeline: the worked example ---


def example_sizes(smoke: bool):
  """The example's sizes: the text demo's data, teacher and students (`TextDemo`) on rows of 64 bytes, the first 768
  of them (half the demo's tokens), 6 student epochs, so that the whole run takes about 10 minutes on 2 CPU cores;
  `smoke`: tiny (its figures mean nothing)."""
  from stillroom.demo import TextDemo  # pylint: disable=import-outside-toplevel
  if smoke:
    return TextDemo(seq_len=16, train_rows=16, test_rows=4, teacher_epochs=1, student_epochs=1, batch_size=8,
                    teacher_model="lm-tiny", seeds=2, topk=(TOP_K,))
  return TextDemo(seq_len=64, train_rows=768, test_rows=192, teacher_epochs=3, student_epochs=6, batch_size=16,
                  seeds=3, topk=(TOP_K,))


def compare_teachers(ngram_cache: str, jax_cache: str, probs: np.ndarray) -> dict:
  """The two teachers on the same rows: their top-1 agreement on the predicting positions, and KL(JAX || n-gram) over
  the JAX teacher's top-k bins (its k ids and the rest), the n-gram's mass on those ids from its own distributions
  (`shared.losses.topk_kl` at T = 1, the student's top-k loss).

  Args:
    ngram_cache, jax_cache: the imported and the built `topk` caches (the same rows, checked by their `index`).
    probs: float [R, L, V] the n-gram's distributions of the cache's rows, in row order (those it imported).
  """
  from shared.cache import open_cache  # pylint: disable=import-outside-toplevel
  from shared.losses import topk_kl  # pylint: disable=import-outside-toplevel
  ngram, jax_ = open_cache(ngram_cache), open_cache(jax_cache)
  if not np.array_equal(ngram["index"][:], jax_["index"][:]):
    raise StillroomError(f"{ngram_cache} and {jax_cache} hold other rows.")
  labels = np.asarray(jax_["labels"][:])
  at = labels >= 0
  top_ngram, top_jax = np.asarray(ngram["target_ids"][:, :, 0]), np.asarray(jax_["target_ids"][:])
  kl = np.asarray(topk_kl(np.log(probs), top_jax, np.asarray(jax_["target_log_probs"][:]),
                          np.asarray(jax_["target_rest"][:]), 1.0))
  own = np.argmax(probs, axis=-1)
  return {"top1_agreement": float((top_ngram == top_jax[..., 0])[at].mean()),
          "kl_jax_to_ngram_nats": float(kl[at].mean()),
          "ngram_top1_is_its_own_argmax": float((top_ngram == own)[at].mean()),
          "positions": int(at.sum())}


def run_pipeline(work: str, results_dir: str, seeds: int, smoke: bool = False, order: int = ORDER,
                 folds: int = FOLDS) -> dict:
  """The worked example (see the module); reuses what finished in `work`. Returns the results."""
  from shared.data import open_transfer_set  # pylint: disable=import-outside-toplevel
  from shared.data.text import TextOptions  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from stillroom.demo import (DemoConfig, _Stages, summarise_text_arms, text_cache, text_data, text_students,
                              text_teachers)
  from teacher_cache.cli import main as cache_main  # pylint: disable=import-outside-toplevel

  started, load = time.perf_counter(), os.getloadavg()
  sizes = dataclasses.replace(example_sizes(smoke), seeds=seeds)
  config = DemoConfig(text=True, work_dir=work, results_dir=results_dir, teachers=1, seeds=seeds)
  stages = _Stages()
  data = text_data(config, sizes)
  teachers, teacher_lines = text_teachers(config, sizes, data, stages)
  tag = f"L{sizes.seq_len}_r{sizes.train_rows}"
  common = ["--dataset", data["dataset"], "--split", data["split"], "--seq-len", str(sizes.seq_len), "--no-progress"]

  clock = time.perf_counter()
  views = os.path.join(work, f"ngram_{tag}_views")
  _cli(cache_main, ["views", *common, "--out", views])
  stages.seconds["views"] = time.perf_counter() - clock
  clock = time.perf_counter()
  jsonl = os.path.join(work, f"ngram_{tag}_o{order}_f{folds}.jsonl")
  scored = score(views, jsonl, order, TOP_K, folds) if not os.path.exists(jsonl) else None
  stages.seconds["n-gram teacher"] = time.perf_counter() - clock
  clock = time.perf_counter()
  ngram_cache = os.path.join(work, f"ngram_{tag}_o{order}_f{folds}.zarr")
  if not os.path.exists(os.path.join(ngram_cache, "zarr.json")):
    _cli(cache_main, ["import", *common, "--views-dir", views, "--logprobs", jsonl, "--out", ngram_cache])
  stages.seconds["import"] = time.perf_counter() - clock
  clock = time.perf_counter()
  jax_cache = text_cache(config, sizes, data, teachers, f"topk:{TOP_K}", 1.0)
  stages.seconds["JAX teacher's cache"] = time.perf_counter() - clock

  # The teachers on the same rows, and on the held-out text.
  rows = read_all_views(views)
  models = fold_models(rows["x"], rows["segment_ids"], rows["row"], order, int(rows["record"]["vocab_size"]), folds)
  comparison = compare_teachers(ngram_cache, jax_cache,
                                cross_fitted_probs(models, rows["x"], rows["segment_ids"], rows["row"]))
  held_out = open_transfer_set(data["eval_dataset"], data["eval_split"], text=TextOptions(seq_len=sizes.seq_len))
  full = NgramLM(order, int(rows["record"]["vocab_size"])).fit(rows["x"], rows["segment_ids"])
  teachers_bpb = {f"n-gram (order {order}, NumPy)": bits_per_byte(full, held_out),
                  f"JAX teacher ({sizes.teacher_model})": teacher_lines[0].get("eval_bits_per_byte")}

  arms = {"hard labels": (ngram_cache, {"alpha": 1.0}), "n-gram KD": (ngram_cache, {}),
          "JAX-teacher KD": (jax_cache, {})}
  name = f"ngram_students_{tag}_o{order}_f{folds}_a{sizes.alpha:g}_e{sizes.student_epochs}"
  finals = text_students(config, sizes, data, stages, arms, seeds, name)
  results = {"smoke": smoke, "seeds": seeds, "order": order, "folds": folds, "top_k": TOP_K,
             "sizes": dataclasses.asdict(sizes), "scored": scored, "comparison": comparison,
             "teachers_bits_per_byte": teachers_bpb, "students": summarise_text_arms(finals, "hard labels"),
             "stage_seconds": stages.seconds, "total_seconds": time.perf_counter() - started,
             "machine": {"cpus": os.cpu_count(), "load_at_start": list(load), "load_at_end": list(os.getloadavg())}}
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, "ngram.json"), "w") as f:
    json.dump(results, f, indent=2)
  table = format_table(results)
  with open(os.path.join(results_dir, "ngram.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  return results


def _cli(main, args: list[str]) -> None:
  """Runs a `teacher-cache` command in this process; a refusal stops the pipeline with its message."""
  try:
    main(args)
  except SystemExit as e:
    if e.code not in (0, None):
      raise StillroomError(f"teacher-cache {args[0]} failed (exit {e.code}); see its message above.") from e


def format_table(results: dict) -> str:
  """The worked example as Markdown."""
  s, c = results["sizes"], results["comparison"]
  lines = [f"Transfer set: the first {s['train_rows']} rows of {s['seq_len']} byte tokens of the text demo's training "
           f"files; held-out: the first {s['test_rows']} rows of its test files. n-gram: order {results['order']}, "
           f"cross-fitted over {results['folds']} folds, top {results['top_k']} in vLLM's JSONL layout, imported; "
           f"JAX teacher: `{s['teacher_model']}` ({s['teacher_epochs']} epochs), `topk:{results['top_k']}` cache at "
           f"T=1. Students `{s['student_model']}`, {s['student_epochs']} epochs, batch {s['batch_size']}, alpha "
           f"{s['alpha']:g} (hard labels: 1), {results['seeds']} paired seeds.", "",
           f"Teachers on the same {c['positions']:,} predicting positions: top-1 agreement "
           f"{c['top1_agreement']:.4f}, KL(JAX || n-gram) over the JAX teacher's top-{results['top_k']} bins "
           f"{c['kl_jax_to_ngram_nats']:.4f} nats/token.", "",
           "| model | held-out bits/byte | Δ bits/byte (vs hard labels, paired) |", "|---|---|---|"]
  for name, value in results["teachers_bits_per_byte"].items():
    lines.append(f"| teacher: {name} | {'' if value is None else f'{value:.4f}'} | |")
  for name, arm in results["students"].items():
    bpb = arm["bits_per_byte"]
    diff = "" if "paired_difference" not in bpb else \
        f"{bpb['paired_difference']['mean']:+.4f} ± {bpb['paired_difference']['std']:.4f}"
    lines.append(f"| student, {name} | {bpb['mean']:.4f} ± {bpb['std']:.4f} | {diff} |")
  m = results["machine"]
  lines += ["", "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["stage_seconds"].items()) +
            f"; total {results['total_seconds']:.0f} s on {m['cpus']} CPUs, load average "
            f"{m['load_at_start'][0]:.1f} at the start, {m['load_at_end'][0]:.1f} at the end."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  scorer = commands.add_parser("score", help="score the rows of `teacher-cache views` into vLLM-layout JSONL")
  scorer.add_argument("views", help="the directory `teacher-cache views --dataset text:... --seq-len L` wrote")
  scorer.add_argument("out", help="the .jsonl file to write")
  pipeline = commands.add_parser("pipeline", help="the worked example: views, n-gram, import, students, comparison")
  pipeline.add_argument("--work", default="demo", help="teachers, caches and students; reused (default: the demo's "
                                                       "work dir, whose stdlib copy it shares)")
  pipeline.add_argument("--results", default="results/ngram_teacher", help="where ngram.json and ngram.md go")
  pipeline.add_argument("--seeds", type=int, default=3, help="paired student seeds per arm (default: 3)")
  pipeline.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
  for sub in (scorer, pipeline):
    sub.add_argument("--order", type=int, default=ORDER, help=f"n-gram order N (default: {ORDER})")
    sub.add_argument("--folds", type=int, default=FOLDS, help=f"cross-fitting folds, 1: in-sample (default: {FOLDS})")
  scorer.add_argument("--top-k", type=int, default=TOP_K, help=f"log-probabilities per position (default: {TOP_K})")
  args = parser.parse_args(argv)
  for flag, value in (("--order", args.order), ("--folds", args.folds), ("--seeds", getattr(args, "seeds", 1)),
                      ("--top-k", getattr(args, "top_k", 1))):
    if value < 1:
      parser.error(f"{flag} must be at least 1, got {value}")
  try:
    if args.command == "score":
      done = score(args.views, args.out, args.order, args.top_k, args.folds)
      print(f"wrote {done['lines']} lines ({done['positions']} positions of {done['rows']} rows) to {args.out}")
    else:
      run_pipeline(args.work, args.results, args.seeds, args.smoke, args.order, args.folds)
  except StillroomError as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
  main()
