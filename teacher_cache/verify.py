"""`teacher-cache verify`: whether a cache can be trusted.

Every check is recomputed from the store and an independent source (the seed, the dataset), chunk by chunk, in
memory bounded by one chunk. A damaged chunk is reported as a failure and the other chunks are still checked.

`verify_cache` runs `STEPS` in order: the checks of the store's metadata, one scan that reads each chunk once and
hands it to the checks of its contents (`ROW_CHECKS`, `EVAL_ROW_CHECKS`), and then the reports of those checks.
"""

import collections
import dataclasses
import functools
import typing

import jax
import numpy as np

from shared import storage
from shared.cache import (EVAL_ROWS, ROWS, SPEC_KEY, Cache, CacheSpec, chunk_table, completion_problem,
                          layout_problems, missing_chunks, open_cache, position_problems, replay_rows,
                          spec_record_problem, uncommitted_chunks)
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
    transfer_set = open_transfer_set(name or recorded.name, split or recorded.split, data_dir,
                                     text=recorded.text_options())
  except StillroomError as e:
    if given:  # The command line named the dataset or split: that it cannot be opened is an error.
      raise
    return None, Check(f"{what} fingerprint", None, f"not checked: {str(e).splitlines()[0]} (give --dataset, "
                                                    "--split, --data-dir)")
  same = transfer_set.matches(recorded)
  detail = "" if same else (f"{transfer_set.name} {transfer_set.split}: {transfer_set.fingerprint[:16]}… vs cache "
                            f"{recorded.fingerprint[:16]}…")
  return (transfer_set if same else None), Check(f"{what} fingerprint", same, detail)


@dataclasses.dataclass
class _Verification:
  """What the steps of one verification share: the cache, the datasets it is checked against, and what the checks
  of its chunks found (each check's first bad row of every chunk where it found one, under the check's key)."""

  cache: Cache
  dataset: str | None
  split: str | None
  data_dir: str | None
  stopped: bool = False  # The store cannot be checked further (its arrays differ from its spec).
  transfer_set: TransferSet | None = None
  eval_set: TransferSet | None = None
  sizes: np.ndarray | None = None  # int64 [N, 2] every example's (height, width), for replaying crop boxes.
  damaged: list[str] = dataclasses.field(default_factory=list)
  damaged_chunks: set[tuple[str, int]] = dataclasses.field(default_factory=set)  # (array, chunk) of `damaged`.
  nonfinite: int = 0
  worst_target_error: float = 0.0
  bad_rows: dict[str, list[int]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  @property
  def spec(self) -> CacheSpec:
    return self.cache.spec

  @property
  def has_eval(self) -> bool:
    return self.spec.eval_dataset is not None

  @property
  def teacher_arrays(self) -> tuple[str, ...]:
    return self.spec.arrays_of(ROWS, "teacher") + self.spec.arrays_of(ROWS, "feature")

  @property
  def rederives(self) -> bool:
    """Whether the targets are re-derived from the stored member logits (dense targets)."""
    return {"targets", "member_logits"} <= set(self.teacher_arrays)

  @property
  def sparse(self) -> bool:
    return self.spec.target_kind != "dense"

  @property
  def crops(self) -> bool:
    return self.spec.augmentation.kind == "crop"

  @functools.cached_property
  def eval_indices(self) -> np.ndarray:
    """int64 [E] the eval rows' example indices, from the eval split the spec records."""
    return self.spec.eval_dataset.indices()

  @functools.cached_property
  def resolve(self):
    """The targets of a cache of specialists, solved again: the generalist's combination with its specialists."""
    spec = self.spec
    classes = class_matrix([s.classes for s in spec.specialists], spec.specialist_width)
    return jax.jit(lambda g, s: specialist_log_probs(g, s, classes, spec.temperature, spec.top_n))

  def read(self, chunk: int, names, row_set: str) -> dict | None:
    """One chunk of each array; None (and the damage recorded) if any of them cannot be read."""
    arrays = {}
    for name in names:
      try:  # Chunk positions are checked from the checksums the chunks store, by `_positions`.
        arrays.update(self.cache.read_chunk(chunk, (name,), row_set, check_positions=False))
      except StillroomError as e:
        cause = e.__cause__
        self.damaged.append(f"{name} chunk {chunk} ({type(cause).__name__}: {str(cause)[:80]})")
        self.damaged_chunks.add((name, chunk))
    return arrays if len(arrays) == len(names) else None

  def first_bad(self, key: str, start: int, bad: np.ndarray) -> None:
    """Records the first row of a chunk starting at `start` where the check `key` found `bad` [R] true."""
    if bad.any():
      self.bad_rows[key].append(start + int(np.argmax(bad)))


class _Chunk(typing.NamedTuple):
  """One chunk of rows `[start, stop)` as the checks of its contents see it."""

  arrays: dict[str, np.ndarray]  # Every array of its row set but the bookkeeping, [R, ...].
  start: int
  stop: int
  # Transfer rows: each row's int64 position in the transfer set, and the row arrays, replayed from the seed
  # (`shared.cache.replay_rows`); None for eval rows.
  position: np.ndarray | None = None
  expected: dict[str, np.ndarray] | None = None


def _bad_rows(v: _Verification, key: str, what: str = "rows") -> str:
  return f"first bad {what} {listed(v.bad_rows[key])}" if v.bad_rows[key] else ""


# The checks of the store's metadata.


def _complete(v: _Verification) -> list[Check]:
  if not v.cache.complete:
    return [Check("complete", False, "no completion record: build interrupted")]
  problem = completion_problem(v.cache)
  return [Check("complete", problem is None, problem or "")]


def _spec_record(v: _Verification) -> list[Check]:
  if not v.spec.has_checksums:  # Schema 1 predates the record (and its chunks' checksums: see "chunks readable").
    return []
  ok, detail = spec_record_problem(v.cache.completion, v.cache.group.attrs.asdict()[SPEC_KEY], v.spec.binds)
  return [Check("spec as the completion record covers it", ok, detail if ok is not None else f"not checked: {detail}")]


def _layout(v: _Verification) -> list[Check]:
  problems = layout_problems(v.cache.group, v.spec)
  v.stopped = bool(problems)
  return [Check("layout", not problems, "; ".join(problems))]


def _committed(v: _Verification) -> list[Check]:
  not_committed = []
  for row_set in [ROWS] + ([EVAL_ROWS] if v.has_eval else []):
    try:
      count = len(uncommitted_chunks(v.cache, row_set))
      if count:
        not_committed.append(f"{count} of {v.spec.chunks_of(row_set)} {'eval ' if row_set == EVAL_ROWS else ''}"
                             "chunks not committed")
    except StillroomError as e:
      not_committed.append(str(e))
  return [Check("all chunks committed", not not_committed, "; ".join(not_committed))]


def _present(v: _Verification) -> list[Check]:
  if not v.spec.has_checksums:
    return []
  missing = missing_chunks(v.cache)
  return [Check("every chunk present", not missing, "; ".join(
      f"{name}: chunks {listed(chunks)} missing" for name, chunks in missing.items()))]


def _fingerprints(v: _Verification) -> list[Check]:
  """Opens the datasets to check the rows against (given, or the ones the spec names), and checks their fingerprints."""
  given = v.dataset is not None or v.split is not None
  v.transfer_set, fingerprint = _open_dataset(v.spec.dataset, v.dataset, v.split, v.data_dir, "dataset", given)
  if not v.has_eval:
    return [fingerprint]
  same_dataset = v.spec.eval_dataset.name == v.spec.dataset.name  # A given --dataset stands for both.
  v.eval_set, eval_fingerprint = _open_dataset(v.spec.eval_dataset, v.dataset if same_dataset else None,
                                               v.spec.eval_dataset.split, v.data_dir, "eval split",
                                               v.dataset is not None and same_dataset)
  return [fingerprint, eval_fingerprint]


# The checks of the contents, fed one chunk at a time.


def _count_nonfinite(v: _Verification, chunk: _Chunk) -> None:
  # A top-k row's rest is −inf when its other classes have no mass (K = C, or underflow): not a failure.
  v.nonfinite += sum(int((~np.isfinite(chunk.arrays[name]) if name != "target_rest" else
                          np.isnan(chunk.arrays[name]) | np.isposinf(chunk.arrays[name])).sum())
                     for name in v.teacher_arrays)


def _check_sparse_targets(v: _Verification, chunk: _Chunk) -> None:
  if not v.sparse:
    return
  if not v.spec.positions:
    v.first_bad("sparse", chunk.start, _sparse_target_failures(chunk.arrays, v.spec))
    return
  # Token rows: each position's targets are a row of their own to the checks; a row is bad where one of them is.
  rows, positions = chunk.stop - chunk.start, v.spec.positions
  per_position = {name: values.reshape(rows * positions, *values.shape[2:]) for name, values in chunk.arrays.items()
                  if v.spec.array(name).role == "teacher"}
  v.first_bad("sparse", chunk.start, _sparse_target_failures(per_position, v.spec).reshape(rows, positions).any(1))


def _rederive_targets(v: _Verification, chunk: _Chunk) -> None:
  if not v.rederives:
    return
  spec, arrays = v.spec, chunk.arrays
  if spec.specialists:  # The targets are the generalist's combination with its specialists: solved again.
    active, derived = v.resolve(arrays["member_logits"][:, 0], arrays["specialist_logits"])
    derived, wrong = np.asarray(derived), np.asarray(active) != arrays["specialist_active"]
    if wrong.any():
      v.bad_rows["targets"].append(chunk.start + int(np.argwhere(wrong)[0][0]))
  else:
    derived = np.asarray(combine_log_probs(arrays["member_logits"], spec.temperature, spec.combine))
  error = np.abs(derived - arrays["targets"].astype(np.float32))
  # q is solved to a relative 1e-6 per class: two solves (in batches of other shapes) agree to ~1e-5 in log q.
  bad = error > _storage_tolerance(np.dtype(spec.dtype), derived) + (1e-4 if spec.specialists else 0.0)
  if bad.any():
    v.bad_rows["targets"].append(chunk.start + int(np.argwhere(bad)[0][0]))
  v.worst_target_error = max(v.worst_target_error, float(np.nan_to_num(error, nan=np.inf).max(initial=0.0)))


def _check_replayed_rows(v: _Verification, chunk: _Chunk) -> None:
  """The row arrays against the seed's replay; crop boxes only with the image sizes (without them, only their
  flip replays)."""
  if v.crops and v.sizes is not None:
    v.first_bad("boxes", chunk.start, (chunk.arrays["crop"] != chunk.expected["crop"]).any(axis=1))
  consistent = np.ones(chunk.stop - chunk.start, bool)
  for name, values in chunk.expected.items():
    if name != "crop":
      consistent &= (chunk.arrays[name] == values).reshape(chunk.stop - chunk.start, -1).all(axis=1)
  v.first_bad("rows", chunk.start, ~consistent)


def _check_labels(v: _Verification, chunk: _Chunk) -> None:
  if v.transfer_set is not None:
    wrong = chunk.arrays["labels"] != label_ids(v.transfer_set.labels[chunk.position])
    v.first_bad("labels", chunk.start, wrong.reshape(len(wrong), -1).any(1))  # Token rows: any position's.


ROW_CHECKS = (_count_nonfinite, _check_sparse_targets, _rederive_targets, _check_replayed_rows, _check_labels)


def _count_nonfinite_eval(v: _Verification, chunk: _Chunk) -> None:
  v.nonfinite += int((~np.isfinite(chunk.arrays["eval_member_logits"])).sum())


def _check_eval_index(v: _Verification, chunk: _Chunk) -> None:
  v.first_bad("eval index", chunk.start, chunk.arrays["eval_index"] != v.eval_indices[chunk.start:chunk.stop])


def _check_eval_labels(v: _Verification, chunk: _Chunk) -> None:
  if v.eval_set is not None:
    wrong = chunk.arrays["eval_labels"] != label_ids(v.eval_set.labels[chunk.start:chunk.stop])
    v.first_bad("eval labels", chunk.start, wrong.reshape(len(wrong), -1).any(1))  # Token rows: any position's.


EVAL_ROW_CHECKS = (_count_nonfinite_eval, _check_eval_index, _check_eval_labels)


def _scan(v: _Verification) -> list[Check]:
  """Reads every chunk once (the transfer rows, then the eval rows) and hands it to `ROW_CHECKS` and
  `EVAL_ROW_CHECKS`; their reports follow."""
  spec = v.spec
  # Every example's (height, width), read once from the file headers (or records), for replaying crop boxes.
  if v.crops and v.transfer_set is not None:
    v.sizes = v.transfer_set.image_sizes(np.arange(len(v.transfer_set)))
  indices = spec.dataset.indices()
  sizes = v.sizes if v.sizes is not None or not v.crops else np.ones((spec.num_examples, 2), np.int64)
  names = [name for name in spec.arrays_of(ROWS) if spec.array(name).role != "bookkeeping"]
  for chunk in range(spec.num_chunks):
    arrays = v.read(chunk, names, ROWS)
    if arrays is None:
      continue
    start, stop = v.cache.chunk_bounds(chunk)
    position, expected = replay_rows(spec, start, stop, indices, sizes)
    for check in ROW_CHECKS:
      check(v, _Chunk(arrays, start, stop, position, expected))
  if v.has_eval:
    names = [name for name in spec.arrays_of(EVAL_ROWS) if spec.array(name).role != "bookkeeping"]
    for chunk in range(spec.chunks_of(EVAL_ROWS)):
      arrays = v.read(chunk, names, EVAL_ROWS)
      if arrays is not None:
        for check in EVAL_ROW_CHECKS:
          check(v, _Chunk(arrays, *v.cache.chunk_bounds(chunk, EVAL_ROWS)))
  return []


# The reports of the checks of the contents.


def _intact(v: _Verification) -> list[Check]:
  return [Check("chunks intact (checksums)" if v.spec.has_checksums else "chunks readable", not v.damaged,
                f"{len(v.damaged)} damaged: {listed(v.damaged)}" if v.damaged else
                ("" if v.spec.has_checksums else "schema 1: no checksums, damage may go unseen"))]


def _positions(v: _Verification) -> list[Check]:
  """Each chunk against the completion record's chunk table, from the checksum it stores: a chunk that holds
  another position's data, or whose checksum is none the table lists (except the damaged ones, which "chunks intact"
  reports)."""
  if not v.spec.has_checksums:
    return []
  name = "chunks where the completion record puts them"
  table, why = chunk_table(v.cache)
  if table is None:
    return [Check(name, None, f"not checked: {why}")]
  problems = position_problems(v.cache, unknown=True, skip=v.damaged_chunks)  # A damaged table is one of them.
  return [Check(name, not problems, "; ".join(problems))]


def _finite(v: _Verification) -> list[Check]:
  return [Check("finite values", v.nonfinite == 0, f"{v.nonfinite} non-finite values" if v.nonfinite else "")]


def _targets_rederived(v: _Verification) -> list[Check]:
  if not v.rederives:
    return []
  return [Check("targets re-derived from member_logits" + (
      " and specialist_logits (q and the active specialists)" if v.spec.specialists else ""), not v.bad_rows["targets"],
                f"max abs error {v.worst_target_error:.3g}"
                + (f"; first bad rows {listed(v.bad_rows['targets'])}" if v.bad_rows["targets"] else ""))]


def _sparse_targets(v: _Verification) -> list[Check]:
  if not v.sparse:
    return []
  return [Check(f"{v.spec.targets} targets well-formed" + (" and re-derived from member_logits"
                                                            if v.spec.member_logits else ""),
                not v.bad_rows["sparse"], _bad_rows(v, "sparse"))]


def _rows_replay(v: _Verification) -> list[Check]:
  replayed = "/".join(("index", "view", *(name for name in v.spec.augmentation.param_names if name != "crop"), "fold"))
  return [Check(f"rows' {replayed} replay from the seed", not v.bad_rows["rows"], _bad_rows(v, "rows"))]


def _crop_boxes(v: _Verification) -> list[Check]:
  if not v.crops:
    return []
  name = "rows' crop boxes replay from the seed and the image sizes"
  if v.sizes is None:
    return [Check(name, None, "not checked: they need the dataset's image sizes")]
  return [Check(name, not v.bad_rows["boxes"], _bad_rows(v, "boxes"))]


def _eval_index(v: _Verification) -> list[Check]:
  if not v.has_eval:
    return []
  return [Check("eval rows' index replays from the eval split", not v.bad_rows["eval index"],
                _bad_rows(v, "eval index", "eval rows"))]


_UNCHECKED = "not checked: the dataset is not available or not the one recorded"


def _labels(v: _Verification) -> list[Check]:
  if v.transfer_set is None:
    return [Check("labels match the dataset", None, _UNCHECKED)]
  return [Check("labels match the dataset", not v.bad_rows["labels"], _bad_rows(v, "labels"))]


def _eval_labels(v: _Verification) -> list[Check]:
  if not v.has_eval:
    return []
  if v.eval_set is None:
    return [Check("eval labels match the eval split", None, _UNCHECKED)]
  return [Check("eval labels match the eval split", not v.bad_rows["eval labels"],
                _bad_rows(v, "eval labels", "eval rows"))]


# What `verify_cache` runs, in order; each step returns its checks. After `_layout` fails, nothing more is checked.
STEPS = (_complete, _spec_record, _layout, _committed, _present, _fingerprints, _scan, _intact, _positions, _finite,
         _targets_rederived, _sparse_targets, _rows_replay, _crop_boxes, _eval_index, _labels, _eval_labels)


def verify_cache(path: str, dataset: str | None = None, split: str | None = None,
                 data_dir: str | None = None) -> list[Check]:
  """Checks a cache: completeness, the spec against the completion record's digest, layout, every chunk present,
  where the completion record puts it and intact, finite values, targets re-derived from member logits, each row's
  example/view/fold and view parameters (a mixed view's partner, λ and box too) replayed from the seed, and, given
  the dataset or when the one the spec names opens here, the fingerprints and labels.

  Returns:
    One `Check` per property; the cache is sound when all are ok.
  """
  try:
    cache = open_cache(path, require_complete=False, check_spec=False)  # A changed spec is `_spec_record`'s finding.
  except StillroomError as e:
    if not storage.exists(path):
      raise
    return [Check("spec", False, str(e))]  # A damaged spec is a finding, not a crash.
  verification = _Verification(cache, dataset, split, data_dir)
  checks = []
  for step in STEPS:
    checks += step(verification)
    if verification.stopped:
      break
  return checks
