"""`teacher-cache info`: what a cache holds and how its teachers do on it.

It reads the store chunk by chunk, so it runs in memory bounded by one chunk.
"""

import numpy as np

from shared import storage
from shared.cache import CHUNK_TABLE, ROWS, check_integrity, eval_accuracies, open_cache, ratio
from shared.settings import with_short_digests
from shared.data import prepared
from shared.ensemble import combine_log_probs
from shared.errors import StillroomError


def cache_info(path: str) -> dict:
  """The spec plus teacher statistics computed from the store.

  Returns:
    A JSON-able dict: "spec", "complete", "completion" (the completion record, its chunk table as each array's
    count of chunks), "rows", "bytes", "bytes_per_row" (per array), "compute_dtype" (the teachers') and
    "target_tolerance" (the bound its targets keep against a float32 build's; `CacheSpec`), and (for a complete
    store) "stats" with the ensemble's accuracy on labelled rows (all views and view 0), the mean entropy of the
    targets (nats, at T), the mean top-1 probability, the mean probability the top-k classes hold (top-k), each
    member's accuracy, the fraction of rows where all members agree on the top-1 class and the mean pairwise top-1
    agreement of members; with eval logits stored, each member's and the ensemble's accuracy on the eval split
    ("eval"). The whole distribution comes from dense targets or stored member logits; a sparse cache without
    member logits has no entropy or member statistics (None), a top-1 probability only with top-k, and with
    sampled targets its ensemble top-1 is the most probable class drawn (`ensemble.top1` says which).
    A cache of token rows (`positions` L) also gives "positions", "tokens" (R·L) and "bytes_per_token" (each row
    array's bytes per position, and their "total" over the teacher arrays: what its targets cost per token), and its
    statistics are over the predicting positions (those with a next token, `labels` >= 0), each a row of its own
    ("labelled_rows" counts them).
  """
  cache = open_cache(path, require_complete=False)
  spec = cache.spec
  completion = cache.completion
  if isinstance(completion, dict) and isinstance(completion.get(CHUNK_TABLE), dict):
    # The chunk table as each array's count of chunks: its hex digits (8 per chunk) are for readers, not people.
    completion = {**completion, CHUNK_TABLE: {name: len(digits) // 8 if isinstance(digits, str) else None
                                              for name, digits in completion[CHUNK_TABLE].items()}}
  info = {"path": path, "complete": cache.complete, "completion": completion, "rows": spec.num_rows,
          "bytes": storage.size(path), "spec": spec.to_attrs(), "compute_dtype": spec.compute_dtype,
          "target_tolerance": spec.target_tolerance,
          "bytes_per_row": {name: spec.array(name).row_bytes
                            for name in spec.arrays_of(ROWS) if spec.array(name).role != "bookkeeping"}}
  if spec.positions:
    info.update(positions=spec.positions, tokens=spec.num_rows * spec.positions, bytes_per_token=bytes_per_token(spec))
  prepared_from = _prepared_from(spec.dataset.name)
  if prepared_from:
    info["prepared_from"] = prepared_from
  if not cache.complete:
    return info
  check_integrity(cache)
  members = ("member_logits",) if spec.member_logits else ()
  names = (*spec.target_arrays, *members, "labels", "view")
  whole = spec.target_kind == "dense" or bool(members)
  cache.require(names, "the teacher statistics of `info`")
  num_members = spec.num_members
  member_correct = np.zeros(num_members)
  member_correct_view0 = np.zeros(num_members)
  ensemble_correct = ensemble_correct_view0 = labelled = labelled_view0 = 0
  entropy_sum = top1_sum = mass_sum = all_agree = 0.0
  pair_agree = np.zeros((num_members, num_members))
  rows = 0
  for chunk in range(spec.num_chunks):
    arrays = cache.read_chunk(chunk, names)
    if spec.positions:
      arrays = _predicting_positions(arrays, spec.positions)
    rows += len(arrays["labels"])
    if whole:  # The whole distribution: stored, or re-derived as the build did.
      log_probs = arrays["targets"].astype(np.float32) if spec.target_kind == "dense" else np.asarray(
          combine_log_probs(arrays["member_logits"], spec.temperature, spec.combine))
      probs = np.exp(log_probs)
      entropy_sum += float(-(probs * log_probs).sum())
      top1_sum += float(probs.max(axis=-1).sum())
      ensemble_top1 = log_probs.argmax(axis=-1)
    else:
      stored = arrays["target_log_probs"].astype(np.float32)
      best = stored.argmax(axis=-1)
      ensemble_top1 = np.take_along_axis(arrays["target_ids"], best[:, None], axis=1)[:, 0]
      if spec.target_kind == "topk":
        top1_sum += float(np.exp(stored[:, 0]).sum())
    if spec.target_kind == "topk":
      mass_sum += float(np.exp(arrays["target_log_probs"].astype(np.float64)).sum())
    labels, view0 = arrays["labels"], arrays["view"] == 0
    has_label = labels >= 0
    labelled += int(has_label.sum())
    labelled_view0 += int((has_label & view0).sum())
    ensemble_hit = (ensemble_top1 == labels) & has_label
    ensemble_correct += int(ensemble_hit.sum())
    ensemble_correct_view0 += int(ensemble_hit[view0].sum())
    if members:
      member_top1 = arrays["member_logits"].argmax(axis=-1)  # [rows, M]
      all_agree += float((member_top1 == member_top1[:, :1]).all(axis=1).sum())
      pair_agree += (member_top1[:, :, None] == member_top1[:, None, :]).sum(axis=0)
      member_hit = (member_top1 == labels[:, None]) & has_label[:, None]
      member_correct += member_hit.sum(axis=0)
      member_correct_view0 += member_hit[view0].sum(axis=0)
  rows = max(rows, 1)  # A token cache may have no predicting position.
  off_diagonal = pair_agree[~np.eye(num_members, dtype=bool)]
  from_members = lambda value: value if members else None  # noqa: E731
  info["stats"] = {
      "members": [{"name": spec.member_name(i), "model": spec.member_runs(i)[0].model,
                   "accuracy": from_members(ratio(member_correct[i], labelled)),
                   "accuracy_view0": from_members(ratio(member_correct_view0[i], labelled_view0))}
                  for i in range(num_members)],
      "ensemble": {"combine": spec.combine, "accuracy": ratio(ensemble_correct, labelled),
                   "accuracy_view0": ratio(ensemble_correct_view0, labelled_view0),
                   "top1": "the most probable" if whole or spec.target_kind == "topk" else
                   "the most probable class drawn"},
      "mean_target_entropy_nats": entropy_sum / rows if whole else None,
      "max_entropy_nats": float(np.log(spec.num_classes)),
      "mean_top1_probability": top1_sum / rows if whole or spec.target_kind == "topk" else None,
      "mean_topk_mass": mass_sum / rows if spec.target_kind == "topk" else None,
      "all_members_agree": from_members(all_agree / rows),
      "mean_pairwise_agreement": from_members(float(off_diagonal.mean() / rows) if num_members > 1 else 1.0),
      "labelled_rows": labelled,
  }
  if spec.eval_dataset is not None:
    info["stats"]["eval"] = eval_accuracies(cache)
  return info


def bytes_per_token(spec) -> dict:
  """A token cache's bytes per position of each teacher array (targets, member logits) and their "total": what its
  targets cost per token (`cache_info`'s "bytes_per_token"). `spec` is the cache's `CacheSpec` (`positions` > 0)."""
  per_token = {name: spec.array(name).row_bytes / spec.positions
               for name in spec.arrays_of(ROWS) if spec.array(name).role == "teacher"}
  return {**per_token, "total": sum(per_token.values())}


def _predicting_positions(arrays: dict, positions: int) -> dict:
  """A chunk of token rows as rows of their predicting positions (`labels` >= 0): [R, L, ...] arrays flattened to
  [n, ...], row arrays ([R]) repeated for each position."""
  keep = arrays["labels"].reshape(-1) >= 0
  return {name: (np.repeat(values, positions, axis=0) if values.ndim == 1 else
                 values.reshape(-1, *values.shape[2:]))[keep] for name, values in arrays.items()}


def history_lines(spec: dict) -> list[str]:
  """How a grown cache was made, one line per `history` entry of its spec attributes (`CacheSpec.to_attrs`), oldest
  first, e.g. "2026-12-06T15:44:01: extend (added_members ['t1']) from 6d5b9c23917c…": a member's digest shown as
  its name where the cache holds that member, another digest by its first 12 hex digits, and a [before, after] pair
  that did not change (views [2, 2]) left out."""
  names = {member["digest"]: member["name"] for member in spec.get("members", ())}

  def shown(value):
    if isinstance(value, list):
      return [shown(v) for v in value]
    if isinstance(value, str) and value in names:
      return names[value]
    return with_short_digests(value)

  lines = []
  for entry in spec.get("history", ()):
    what = ", ".join(f"{key} {shown(value)}" for key, value in entry.items()
                     if key not in ("command", "sources", "at")
                     and not (isinstance(value, list) and len(value) == 2 and value[0] == value[1]))
    lines.append(f"{entry.get('at')}: {entry.get('command')}" + (f" ({what})" if what else "")
                 + f" from {', '.join(shown(entry.get('sources', [])))}")
  return lines


def _prepared_from(name: str) -> dict | None:
  """The source a cache's prepared store (`prepared:STORE`) was made from, as that store records it; None for other
  datasets, or where the store cannot be read here."""
  if not name.startswith(prepared.PREFIX):
    return None
  try:
    spec, _ = prepared.open_prepared(name[len(prepared.PREFIX):], name)
  except StillroomError:
    return None
  return {key: spec.source[key] for key in ("name", "split", "count", "fingerprint")}


def prepared_info(path: str) -> dict:
  """What a prepared image store (`teacher-cache prepare`) holds: `path`, `complete`, `bytes`, `spec` (its
  `PreparedSpec` attributes) and, once complete, `fingerprint` (the dataset `prepared:PATH`'s)."""
  spec, complete = prepared.open_prepared(path)
  info = {"path": path, "kind": "prepared images", "complete": complete is not None, "bytes": storage.size(path),
          "spec": spec.to_attrs()}
  if complete is not None:
    from shared.data import open_transfer_set  # pylint: disable=import-outside-toplevel
    info["fingerprint"] = open_transfer_set(prepared.PREFIX + path).fingerprint
  return info
