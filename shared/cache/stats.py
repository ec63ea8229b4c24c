"""Teacher statistics from the logits a store holds, which both stages report: `teacher-cache info` and the
students' sweeps and demo compare themselves with them."""

import numpy as np

from shared.cache.layout import EVAL_ROWS
from shared.cache.store import Cache
from shared.ensemble import combine_log_probs


def ratio(a, b) -> float | None:
  """`a / b` as a float, None when `b` is 0 (an accuracy over no labelled rows)."""
  return float(a / b) if b else None


def eval_accuracies(cache: Cache) -> dict:
  """Each member's and both ensembles' (AM, GM at T=1) accuracy on the eval split, from the stored eval logits.

  Returns:
    {"split", "count", "members": [accuracy, ...], "arithmetic": accuracy, "geometric": accuracy}; accuracies are
    None when the eval split is unlabeled. For token rows, accuracies are per predicting position (next token).
  """
  spec = cache.spec
  member_hits, ensemble_hits, labelled = np.zeros(spec.num_members), {"arithmetic": 0, "geometric": 0}, 0
  for chunk in range(spec.chunks_of(EVAL_ROWS)):
    arrays = cache.read_chunk(chunk, ("eval_member_logits", "eval_labels"), EVAL_ROWS)
    logits, labels = arrays["eval_member_logits"], arrays["eval_labels"]
    has_label = labels >= 0
    labelled += int(has_label.sum())
    # Per token for token rows (logits [E, L, M, C], labels [E, L]): every labelled position counts.
    hits = (logits.argmax(-1) == labels[..., None]) & has_label[..., None]
    member_hits += hits.reshape(-1, spec.num_members).sum(axis=0)
    for rule in ensemble_hits:
      top1 = np.asarray(combine_log_probs(logits, 1.0, rule)).argmax(-1)
      ensemble_hits[rule] += int(((top1 == labels) & has_label).sum())
  return {"split": spec.eval_dataset.split, "count": spec.num_eval_rows,
          "members": [ratio(hits, labelled) for hits in member_hits],
          **{rule: ratio(hits, labelled) for rule, hits in ensemble_hits.items()}}
