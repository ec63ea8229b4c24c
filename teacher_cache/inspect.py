"""`teacher-cache info` and `teacher-cache verify`: what a cache holds, and whether it can be trusted.

Both read the store chunk by chunk, so they run in memory bounded by one chunk.
"""

import dataclasses
import os

import numpy as np

from shared.augment import fold_of
from shared.cache import Cache, layout_problems, open_cache
from shared.data import open_transfer_set
from shared.ensemble import combine_log_probs


def _iter_chunks(cache: Cache, names: tuple[str, ...]):
  for chunk in range(cache.spec.num_chunks):
    start, stop = cache.chunk_bounds(chunk)
    yield start, stop, {name: cache[name][start:stop] for name in names}


def _store_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def cache_info(path: str) -> dict:
  """The spec plus teacher statistics computed from the store.

  Returns:
    A JSON-able dict: "spec", "complete", "rows", "bytes", and (for a complete store) "stats" with each member's
    and the ensemble's accuracy on labelled rows (all views and view 0), the mean entropy of the targets (nats,
    at T), the mean top-1 probability, the fraction of rows where all members agree on the top-1 class, and the
    mean pairwise top-1 agreement of members.
  """
  cache = open_cache(path, require_complete=False)
  spec = cache.spec
  info = {"path": path, "complete": cache.complete, "completion": cache.completion, "rows": spec.num_rows,
          "bytes": _store_bytes(path), "spec": spec.to_attrs()}
  if not cache.complete:
    return info
  num_members = spec.num_members
  member_correct = np.zeros(num_members)
  member_correct_view0 = np.zeros(num_members)
  ensemble_correct = ensemble_correct_view0 = labelled = labelled_view0 = 0
  entropy_sum = top1_sum = all_agree = 0.0
  pair_agree = np.zeros((num_members, num_members))
  for _, _, arrays in _iter_chunks(cache, ("targets", "member_logits", "labels", "view")):
    log_probs = arrays["targets"].astype(np.float32)
    probs = np.exp(log_probs)
    entropy_sum += float(-(probs * log_probs).sum())
    top1_sum += float(probs.max(axis=-1).sum())
    member_top1 = arrays["member_logits"].argmax(axis=-1)  # [rows, M]
    all_agree += float((member_top1 == member_top1[:, :1]).all(axis=1).sum())
    pair_agree += (member_top1[:, :, None] == member_top1[:, None, :]).sum(axis=0)
    labels, view0 = arrays["labels"], arrays["view"] == 0
    has_label = labels >= 0
    labelled += int(has_label.sum())
    labelled_view0 += int((has_label & view0).sum())
    member_hit = (member_top1 == labels[:, None]) & has_label[:, None]
    ensemble_hit = (log_probs.argmax(axis=-1) == labels) & has_label
    member_correct += member_hit.sum(axis=0)
    member_correct_view0 += member_hit[view0].sum(axis=0)
    ensemble_correct += int(ensemble_hit.sum())
    ensemble_correct_view0 += int(ensemble_hit[view0].sum())
  rows = spec.num_rows
  off_diagonal = pair_agree[~np.eye(num_members, dtype=bool)]
  ratio = lambda a, b: float(a / b) if b else None  # noqa: E731
  info["stats"] = {
      "members": [{"name": spec.member_name(i), "model": spec.member_runs(i)[0].model,
                   "accuracy": ratio(member_correct[i], labelled),
                   "accuracy_view0": ratio(member_correct_view0[i], labelled_view0)} for i in range(num_members)],
      "ensemble": {"combine": spec.combine, "accuracy": ratio(ensemble_correct, labelled),
                   "accuracy_view0": ratio(ensemble_correct_view0, labelled_view0)},
      "mean_target_entropy_nats": entropy_sum / rows,
      "max_entropy_nats": float(np.log(spec.num_classes)),
      "mean_top1_probability": top1_sum / rows,
      "all_members_agree": all_agree / rows,
      "mean_pairwise_agreement": float(off_diagonal.mean() / rows) if num_members > 1 else 1.0,
      "labelled_rows": labelled,
  }
  return info


@dataclasses.dataclass(frozen=True)
class Check:
  name: str
  ok: bool
  detail: str = ""


def _storage_tolerance(dtype: np.dtype, reference: np.ndarray) -> np.ndarray:
  """Two units in the last place of the storage dtype: the stored targets were rounded once to it."""
  return 2 * np.finfo(dtype).eps * np.maximum(1.0, np.abs(reference))


def verify_cache(path: str, dataset: str | None = None, split: str | None = None,
                 data_dir: str | None = None) -> list[Check]:
  """Checks a cache: completeness, layout, finite values, targets re-derived from member logits, rows' view
  parameters replayed from the seed, and (given the dataset) the fingerprint and labels.

  Returns:
    One `Check` per property; the cache is sound when all are ok.
  """
  cache = open_cache(path, require_complete=False)
  spec = cache.spec
  checks = [Check("complete", cache.complete, "" if cache.complete else "no completion record: build interrupted")]
  problems = layout_problems(cache.group, spec)
  checks.append(Check("layout", not problems, "; ".join(problems)))
  if problems:
    return checks
  committed = cache["chunk_committed"][:]
  checks.append(Check("all chunks committed", bool(committed.all()),
                      "" if committed.all() else f"{int((~committed).sum())} of {len(committed)} chunks not committed"))
  transfer_set = None
  if dataset is not None:
    transfer_set = open_transfer_set(dataset, split or spec.dataset["split"], data_dir)
    same = transfer_set.fingerprint == spec.dataset["fingerprint"]
    checks.append(Check("dataset fingerprint", same, "" if same else
                        f"{dataset} {transfer_set.split}: {transfer_set.fingerprint[:16]}… vs cache "
                        f"{spec.dataset['fingerprint'][:16]}…"))
    if not same:
      transfer_set = None
  nonfinite, worst_target_error, target_failures, row_failures, label_failures = 0, 0.0, [], [], []
  num_examples = spec.num_examples
  first_view_index = cache["index"][:num_examples]  # Every view lists the examples in this order.
  for start, stop, arrays in _iter_chunks(cache, ("targets", "member_logits", "index", "view", "labels", "shift",
                                                  "flip", "fold")):
    logits, targets = arrays["member_logits"], arrays["targets"]
    nonfinite += int((~np.isfinite(logits)).sum() + (~np.isfinite(targets)).sum())
    derived = np.asarray(combine_log_probs(logits, spec.temperature, spec.combine))
    error = np.abs(derived - targets.astype(np.float32))
    bad = error > _storage_tolerance(np.dtype(spec.dtype), derived)
    if bad.any() and len(target_failures) < 3:
      target_failures.append(start + int(np.argwhere(bad)[0][0]))
    worst_target_error = max(worst_target_error, float(np.nan_to_num(error, nan=np.inf).max(initial=0.0)))
    rows = np.arange(start, stop)
    shift, flip = spec.augmentation.view_params(arrays["index"], arrays["view"])
    consistent = ((arrays["view"] == rows // num_examples) & (arrays["index"] == first_view_index[rows % num_examples])
                  & (arrays["shift"] == shift).all(axis=1) & (arrays["flip"] == flip)
                  & (arrays["fold"] == fold_of(arrays["index"], spec.folds)))
    if not consistent.all() and len(row_failures) < 3:
      row_failures.append(start + int(np.argmin(consistent)))
    if transfer_set is not None:
      expected = transfer_set.labels[transfer_set.positions(arrays["index"])]
      wrong = arrays["labels"] != np.where(expected >= 0, expected, -1)
      if wrong.any() and len(label_failures) < 3:
        label_failures.append(start + int(np.argmax(wrong)))
  checks.append(Check("finite values", nonfinite == 0, f"{nonfinite} non-finite values" if nonfinite else ""))
  checks.append(Check("targets re-derived from member_logits", not target_failures,
                      f"max abs error {worst_target_error:.3g}"
                      + (f"; first bad rows {target_failures}" if target_failures else "")))
  checks.append(Check("rows' index/view/shift/flip/fold replay from the seed", not row_failures,
                      f"first bad rows {row_failures}" if row_failures else ""))
  if transfer_set is not None:
    checks.append(Check("labels match the dataset", not label_failures,
                        f"first bad rows {label_failures}" if label_failures else ""))
  return checks
