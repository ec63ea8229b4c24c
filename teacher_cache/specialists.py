"""`teacher-cache specialists`: the class subsets of Hinton et al.'s specialists, from a cache of the generalist.

The covariance is of the cached ensemble's class probabilities at T = 1 (re-derived from the stored member logits),
over all rows, accumulated chunk by chunk in float64; K-means runs on its columns (`shared.specialists`).
"""

import numpy as np

from shared import storage
from shared.cache import open_cache
from shared.ensemble import combine_log_probs
from shared.errors import StillroomError
from shared.outputs import check_not_an_input
from shared.settings import seed_check
from shared.specialists import SpecialistPlan, cluster_classes


def plan_specialists(cache_path: str, clusters: int, out: str, *, seed: int = 0,
                     overwrite: bool = False) -> SpecialistPlan:
  """Writes the plan of `clusters` specialists for the generalist a cache holds; returns it.

  Args:
    cache_path: a complete cache whose members' logits are stored (every dense cache; sparse with --member-logits).
    clusters: K, the subsets (2..C).
    out: the plan file (JSON), a path or a URL.
    seed: K-means' seed.
    overwrite: replace an existing `out`.

  Raises:
    StillroomError: a cache without member logits; bad K; an existing `out` without `overwrite`.
  """
  cache = open_cache(cache_path)
  spec = cache.spec
  if not spec.member_logits:
    raise StillroomError(f"cache {cache_path!r} stores no member logits, which the covariance at T=1 needs; build it "
                         "with dense targets or --member-logits.")
  if not 2 <= clusters <= spec.num_classes:
    raise StillroomError(f"--clusters must be in 2..{spec.num_classes} (the classes), got {clusters}.")
  if seed_check(seed) is not True:
    raise StillroomError(f"--seed {seed_check(seed)}, got {seed}.")
  check_not_an_input(out, [cache_path], "--out")
  if storage.exists(out):
    if not overwrite:
      raise StillroomError(f"--out {out!r} exists; pass --overwrite to replace it, or choose another --out.")
    try:
      SpecialistPlan.read(out)
    except StillroomError as e:
      raise StillroomError(f"--overwrite: {out!r} is not a specialist plan, so it is left alone; choose another "
                           "--out.") from e
  num_classes = spec.num_classes
  total, outer, rows = np.zeros(num_classes), np.zeros((num_classes, num_classes)), 0
  by_class, per_class = np.zeros((num_classes, num_classes)), np.zeros(num_classes, np.int64)
  for chunk in range(spec.num_chunks):
    arrays = cache.read_chunk(chunk, ("member_logits", "labels"))
    p = np.exp(np.asarray(combine_log_probs(arrays["member_logits"], 1.0, spec.combine), np.float64))
    total += p.sum(0)
    outer += p.T @ p
    rows += len(p)
    # Whose mass: the label's class, or (unlabelled) the generalist's top class.
    owner = np.where(arrays["labels"] >= 0, arrays["labels"], np.argmax(p, axis=1))
    np.add.at(by_class, owner, p)
    per_class += np.bincount(owner, minlength=num_classes)
  mean = total / rows
  covariance = outer / rows - np.outer(mean, mean)
  subsets = cluster_classes(covariance, clusters, seed)
  within = [float(by_class[np.ix_(s, s)].sum() / max(1, per_class[s].sum())) for s in subsets]
  plan = SpecialistPlan(subsets=tuple(tuple(s) for s in subsets), num_classes=num_classes,
                        cache=storage.absolute(cache_path), dataset_fingerprint=spec.dataset.fingerprint,
                        clusters=clusters, seed=seed, within_mass=tuple(within),
                        examples=tuple(int(per_class[s].sum()) for s in subsets))
  storage.write_text(out, plan.to_json())
  return plan
