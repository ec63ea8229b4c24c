"""`teacher-cache verify`: whether a cache can be trusted.

Every check is recomputed from the store and an independent source (the seed, the dataset), chunk by chunk, in
memory bounded by one chunk. A damaged chunk is reported as a failure and the other chunks are still checked.
"""

import dataclasses

import jax
import numpy as np

from shared import storage
from shared.cache import (EVAL_ROWS, ROWS, layout_problems, missing_chunks, open_cache, replay_rows,
                          uncommitted_chunks)
from shared.data import DatasetSpec, TransferSet, label_ids, open_transfer_set
from shared.ensemble import combine_log_probs
from shared.specialists import class_matrix, specialist_log_probs
from shared.errors import StillroomError

_SHOWN = 3  # Failures listed per check.


@dataclasses.dataclass(frozen=True)
class Check:
  """One property of a cache: ok, failed, or (ok None) not checked, with why."""

  name: str
  ok: bool | None
  detail: str = ""

  @property
  def failed(self) -> bool:
    return self.ok is False


def _storage_tolerance(dtype: np.dtype, reference: np.ndarray) -> np.ndarray:
  """Two units in the last place of the storage dtype: the stored targets were rounded once to it."""
  return 2 * np.finfo(dtype).eps * np.maximum(1.0, np.abs(reference))


def _sparse_target_failures(arrays: dict, spec) -> np.ndarray:
  """Rows [R] whose sparse targets are not what the build writes: ids outside 0..C-1 or repeated, log-probabilities
  that are not finite or positive; top-k: log-probabilities not in decreasing order, or with the rest not summing to
  1; sampled: counts not summing to K, drawn ids out of order, padding other than (id 0, count 0); and with member
  logits, log-probabilities (and the top-k rest) other than the ensemble's, or top-k ids that are not the K most
  probable. Tolerances are the rounding of the storage dtype."""
  ids, log_probs = arrays["target_ids"].astype(np.int64), arrays["target_log_probs"].astype(np.float64)
  dtype = np.dtype(spec.dtype)
  # A stored log-probability x is within eps/2·|x| of its float32 value: its probability within that factor.
  tolerance = _storage_tolerance(dtype, log_probs)
  bad = ((ids < 0) | (ids >= spec.num_classes)).any(1) | ~np.isfinite(log_probs).all(1) | (log_probs > tolerance).any(1)
  if spec.target_kind == "topk":
    rest = arrays["target_rest"].astype(np.float64)
    ordered = np.sort(ids, axis=1)
    bad |= (ordered[:, 1:] == ordered[:, :-1]).any(1) | (np.diff(log_probs, axis=1) > tolerance[:, 1:]).any(1)
    bad |= np.isnan(rest) | np.isposinf(rest)
    with np.errstate(invalid="ignore"):
      total = np.logaddexp(np.logaddexp.reduce(log_probs, axis=1), rest)  # log of the mass: 0.
    # The mass is within Σ_k p_k·eps·|x_k| of 1 (the rest is float32: its own rounding is negligible).
    bad |= ~(np.abs(total) <= 2 * (np.exp(log_probs) * tolerance).sum(1) + 1e-6)
  else:
    counts = arrays["target_counts"].astype(np.int64)
    drawn = counts > 0
    bad |= counts.sum(1) != spec.target_k
    bad |= (drawn[:, 1:] & ~drawn[:, :-1]).any(1)  # Padding only at the end...
    bad |= (drawn[:, 1:] & (ids[:, 1:] <= ids[:, :-1])).any(1)  # ...after distinct ids in increasing order.
    bad |= (~drawn & (ids != 0)).any(1)
  if "member_logits" in arrays:
    derived = np.asarray(combine_log_probs(arrays["member_logits"], spec.temperature, spec.combine), np.float64)
    safe_ids = np.clip(ids, 0, spec.num_classes - 1)
    at_ids = np.take_along_axis(derived, safe_ids, axis=1)
    used = np.ones_like(ids, bool) if spec.target_kind == "topk" else arrays["target_counts"] > 0
    at_tolerance = _storage_tolerance(dtype, at_ids)
    bad |= (used & ~(np.abs(at_ids - log_probs) <= at_tolerance)).any(1)
    if spec.target_kind == "topk":
      others = derived.copy()
      np.put_along_axis(others, safe_ids, -np.inf, axis=1)
      bad |= others.max(1, initial=-np.inf) > at_ids.min(1) + at_tolerance.max(1)
      with np.errstate(divide="ignore"):
        rest = np.log(np.exp(others).sum(1))  # −inf when there are no others.
      stored_rest = arrays["target_rest"].astype(np.float64)
      bad |= ~((rest == stored_rest) | (np.abs(rest - stored_rest) <= 1e-4 * np.maximum(1.0, np.abs(rest))))
  return bad


def listed(items: list, total: int | None = None) -> str:
  """The first few of `items`, and how many more (of `total`, when given)."""
  shown = ", ".join(map(str, items[:_SHOWN]))
  more = len(items) - _SHOWN if total is None else total - min(total, _SHOWN)
  return shown + (f" and {more} more" if more > 0 else "")


def _open_dataset(recorded: DatasetSpec, name: str | None, split: str | None, data_dir: str | None,
                  what: str, given: bool) -> tuple[TransferSet | None, Check]:
  """The dataset to check against: the one given, else the one the spec names if it can be opened here.

  Returns:
    The transfer set when its fingerprint matches (else None), and the fingerprint check (not checked when the
    spec's dataset cannot be opened here and `given` is false: the command line named neither dataset nor split).

  Raises:
    StillroomError: a dataset or split given on the command line cannot be opened.
  """
  try:
    transfer_set = open_transfer_set(name or recorded.name, split or recorded.split, data_dir)
  except StillroomError as e:
    if given:  # The command line named the dataset or split: that it cannot be opened is an error.
      raise
    return None, Check(f"{what} fingerprint", None, f"not checked: {str(e).splitlines()[0]} (give --dataset, "
                                                    "--split, --data-dir)")
  same = transfer_set.matches(recorded)
  detail = "" if same else (f"{transfer_set.name} {transfer_set.split}: {transfer_set.fingerprint[:16]}… vs cache "
                            f"{recorded.fingerprint[:16]}…")
  return (transfer_set if same else None), Check(f"{what} fingerprint", same, detail)


def verify_cache(path: str, dataset: str | None = None, split: str | None = None,
                 data_dir: str | None = None) -> list[Check]:
  """Checks a cache: completeness, layout, every chunk present and intact, finite values, targets re-derived from
  member logits, each row's example/view/fold replayed from the seed, and, given the dataset or when the one the
  spec names opens here, the fingerprints and labels.

  Returns:
    One `Check` per property; the cache is sound when all are ok.
  """
  try:
    cache = open_cache(path, require_complete=False)
  except StillroomError as e:
    if not storage.exists(path):
      raise
    return [Check("spec", False, str(e))]  # A damaged spec is a finding, not a crash.
  spec = cache.spec
  checks = [Check("complete", cache.complete, "" if cache.complete else "no completion record: build interrupted")]
  problems = layout_problems(cache.group, spec)
  checks.append(Check("layout", not problems, "; ".join(problems)))
  if problems:
    return checks
  row_sets = [ROWS] + ([EVAL_ROWS] if spec.eval_dataset is not None else [])
  not_committed = []
  for row_set in row_sets:
    try:
      count = len(uncommitted_chunks(cache, row_set))
      if count:
        not_committed.append(f"{count} of {spec.chunks_of(row_set)} {'eval ' if row_set == EVAL_ROWS else ''}chunks "
                             "not committed")
    except StillroomError as e:
      not_committed.append(str(e))
  checks.append(Check("all chunks committed", not not_committed, "; ".join(not_committed)))
  if spec.has_checksums:
    missing = missing_chunks(cache)
    checks.append(Check("every chunk present", not missing, "; ".join(
        f"{name}: chunks {listed(chunks)} missing" for name, chunks in missing.items())))
  given = dataset is not None or split is not None
  transfer_set, fingerprint = _open_dataset(spec.dataset, dataset, split, data_dir, "dataset", given)
  checks.append(fingerprint)
  eval_set = None
  if spec.eval_dataset is not None:
    same_dataset = spec.eval_dataset.name == spec.dataset.name  # A given --dataset stands for both.
    eval_set, eval_fingerprint = _open_dataset(spec.eval_dataset, dataset if same_dataset else None,
                                               spec.eval_dataset.split, data_dir, "eval split",
                                               dataset is not None and same_dataset)
    checks.append(eval_fingerprint)

  damaged: list[str] = []

  def read(chunk: int, names, row_set: str) -> dict | None:
    """One chunk of each array; None (and the damage recorded) if any of them cannot be read."""
    arrays = {}
    for name in names:
      try:
        arrays.update(cache.read_chunk(chunk, (name,), row_set))
      except StillroomError as e:
        cause = e.__cause__
        damaged.append(f"{name} chunk {chunk} ({type(cause).__name__}: {str(cause)[:80]})")
    return arrays if len(arrays) == len(names) else None

  nonfinite, worst_target_error = 0, 0.0
  target_failures, row_failures, label_failures = [], [], []
  expected_index = spec.dataset.indices()
  row_arrays = [name for name in spec.arrays_of(ROWS) if spec.array(name).role != "bookkeeping"]
  teacher_arrays = spec.arrays_of(ROWS, "teacher") + spec.arrays_of(ROWS, "feature")
  rederive = {"targets", "member_logits"} <= set(teacher_arrays)
  if spec.specialists:  # The targets are the generalist's combination with its specialists: solved again.
    classes = class_matrix([s.classes for s in spec.specialists], spec.specialist_width)
    resolve = jax.jit(lambda g, s: specialist_log_probs(g, s, classes, spec.temperature, spec.top_n))
  sparse = spec.target_kind != "dense"
  sparse_failures: list[int] = []
  crops = spec.augmentation.kind == "crop"
  box_failures: list[int] = []
  # Every example's (height, width), read once from the file headers (or records), for replaying crop boxes.
  sizes = transfer_set.image_sizes(np.arange(len(transfer_set))) if crops and transfer_set is not None else None
  for chunk in range(spec.num_chunks):
    arrays = read(chunk, row_arrays, ROWS)
    if arrays is None:
      continue
    start, stop = cache.chunk_bounds(chunk)
    # A top-k row's rest is −inf when its other classes have no mass (K = C, or underflow): not a failure.
    nonfinite += sum(int((~np.isfinite(arrays[name]) if name != "target_rest" else
                          np.isnan(arrays[name]) | np.isposinf(arrays[name])).sum()) for name in teacher_arrays)
    if sparse:
      bad = _sparse_target_failures(arrays, spec)
      if bad.any():
        sparse_failures.append(start + int(np.argmax(bad)))
    if rederive:
      if spec.specialists:
        active, derived = resolve(arrays["member_logits"][:, 0], arrays["specialist_logits"])
        derived, wrong = np.asarray(derived), np.asarray(active) != arrays["specialist_active"]
        if wrong.any():
          target_failures.append(start + int(np.argwhere(wrong)[0][0]))
      else:
        derived = np.asarray(combine_log_probs(arrays["member_logits"], spec.temperature, spec.combine))
      error = np.abs(derived - arrays["targets"].astype(np.float32))
      # q is solved to a relative 1e-6 per class: two solves (in batches of other shapes) agree to ~1e-5 in log q.
      bad = error > _storage_tolerance(np.dtype(spec.dtype), derived) + (1e-4 if spec.specialists else 0.0)
      if bad.any():
        target_failures.append(start + int(np.argwhere(bad)[0][0]))
      worst_target_error = max(worst_target_error, float(np.nan_to_num(error, nan=np.inf).max(initial=0.0)))
    # A crop box depends on the image's size: without the dataset, only its flip replays.
    position, expected = replay_rows(spec, start, stop, expected_index, sizes if sizes is not None or not crops
                                     else np.ones((spec.num_examples, 2), np.int64))
    if crops:
      if sizes is not None:
        wrong_box = (arrays["crop"] != expected["crop"]).any(axis=1)
        if wrong_box.any():
          box_failures.append(start + int(np.argmax(wrong_box)))
      del expected["crop"]
    consistent = np.ones(stop - start, bool)
    for name, values in expected.items():
      consistent &= (arrays[name] == values).reshape(stop - start, -1).all(axis=1)
    if not consistent.all():
      row_failures.append(start + int(np.argmin(consistent)))
    if transfer_set is not None:
      expected = transfer_set.labels[position]
      wrong = arrays["labels"] != label_ids(expected)
      if wrong.any():
        label_failures.append(start + int(np.argmax(wrong)))
  eval_failures, eval_label_failures = [], []
  if spec.eval_dataset is not None:
    expected_eval_index = spec.eval_dataset.indices()
    eval_arrays = [name for name in spec.arrays_of(EVAL_ROWS) if spec.array(name).role != "bookkeeping"]
    for chunk in range(spec.chunks_of(EVAL_ROWS)):
      arrays = read(chunk, eval_arrays, EVAL_ROWS)
      if arrays is None:
        continue
      start, stop = cache.chunk_bounds(chunk, EVAL_ROWS)
      nonfinite += int((~np.isfinite(arrays["eval_member_logits"])).sum())
      if (arrays["eval_index"] != expected_eval_index[start:stop]).any():
        eval_failures.append(start + int(np.argmax(arrays["eval_index"] != expected_eval_index[start:stop])))
      if eval_set is not None:
        expected = label_ids(eval_set.labels[start:stop])
        if (arrays["eval_labels"] != expected).any():
          eval_label_failures.append(start + int(np.argmax(arrays["eval_labels"] != expected)))
  checks.append(Check("chunks intact (checksums)" if spec.has_checksums else "chunks readable", not damaged,
                      f"{len(damaged)} damaged: {listed(damaged)}" if damaged else
                      ("" if spec.has_checksums else "schema 1: no checksums, damage may go unseen")))
  checks.append(Check("finite values", nonfinite == 0, f"{nonfinite} non-finite values" if nonfinite else ""))
  if rederive:
    checks.append(Check("targets re-derived from member_logits" + (
        " and specialist_logits (q and the active specialists)" if spec.specialists else ""), not target_failures,
                        f"max abs error {worst_target_error:.3g}"
                        + (f"; first bad rows {listed(target_failures)}" if target_failures else "")))
  if sparse:
    checks.append(Check(f"{spec.targets} targets well-formed" + (" and re-derived from member_logits"
                                                                  if spec.member_logits else ""),
                        not sparse_failures, f"first bad rows {listed(sparse_failures)}" if sparse_failures else ""))
  replayed = "/".join(("index", "view", *(name for name in spec.augmentation.param_names if name != "crop"), "fold"))
  checks.append(Check(f"rows' {replayed} replay from the seed", not row_failures,
                      f"first bad rows {listed(row_failures)}" if row_failures else ""))
  if crops:
    checks.append(Check("rows' crop boxes replay from the seed and the image sizes", None,
                        "not checked: they need the dataset's image sizes") if sizes is None else Check(
        "rows' crop boxes replay from the seed and the image sizes", not box_failures,
        f"first bad rows {listed(box_failures)}" if box_failures else ""))
  if spec.eval_dataset is not None:
    checks.append(Check("eval rows' index replays from the eval split", not eval_failures,
                        f"first bad eval rows {listed(eval_failures)}" if eval_failures else ""))
  unchecked = "not checked: the dataset is not available or not the one recorded"
  checks.append(Check("labels match the dataset", None, unchecked) if transfer_set is None else Check(
      "labels match the dataset", not label_failures,
      f"first bad rows {listed(label_failures)}" if label_failures else ""))
  if spec.eval_dataset is not None:
    checks.append(Check("eval labels match the eval split", None, unchecked) if eval_set is None else Check(
        "eval labels match the eval split", not eval_label_failures,
        f"first bad eval rows {listed(eval_label_failures)}" if eval_label_failures else ""))
  return checks
