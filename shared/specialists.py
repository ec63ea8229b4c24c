"""Hinton, Vinyals & Dean (2015, §5): specialists on confusable class subsets, and their combination with the
generalist.

- `cluster_classes`: the subsets, from K-means on the columns of the covariance of the generalist's predictions.
- `SpecialistPlan`: the plan file `teacher-cache specialists` writes and `student-train fit --specialist` reads.
- `dustbin_labels`, `dustbin_correction`: a specialist's training labels (its classes, then one dustbin for the
  rest) and the log-odds by which its dustbin logit is raised to undo the enriched sampling.
- `combine_specialists`: the distribution q over all classes that minimises
  `KL(p_g ‖ q) + Σ_{m active} KL(p_m ‖ q_m)`, where `q_m` is q on m's classes plus, as m's dustbin, q's mass outside
  them.
"""

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from shared import storage
from shared.errors import StillroomError
from shared.settings import seed_check

PLAN_KIND = "stillroom specialists"
PLAN_VERSION = 1
# `combine_specialists` stops when an EM step changes no q_c by more than this fraction of it (float32 resolves
# 6e-8), or after this many accelerated rounds.
COMBINE_TOLERANCE, COMBINE_MAX_STEPS = 1e-6, 1000


def cluster_classes(covariance: np.ndarray, clusters: int, seed: int = 0) -> list[list[int]]:
  """Disjoint class subsets: K-means (scikit-learn's, k-means++ with 10 restarts) on the columns of a covariance.

  Args:
    covariance: float [C, C] covariance of the generalist's class probabilities over the transfer rows.
    clusters: K, 2 <= K <= C.
    seed: K-means' seed.

  Returns:
    K lists of class ids, each sorted, ordered by their smallest class id; together every class once.
  """
  from sklearn.cluster import KMeans  # pylint: disable=import-outside-toplevel  (only this command needs it)
  covariance = np.asarray(covariance, np.float64)
  if not 2 <= clusters <= len(covariance):
    raise StillroomError(f"--clusters must be in 2..{len(covariance)} (the classes), got {clusters}.")
  if seed_check(seed) is not True:
    raise StillroomError(f"--seed {seed_check(seed)}, got {seed}.")
  assignment = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit_predict(covariance.T)
  subsets = [sorted(np.flatnonzero(assignment == k).tolist()) for k in range(clusters)]
  return sorted((s for s in subsets if s), key=lambda s: s[0])


@dataclasses.dataclass(frozen=True)
class SpecialistPlan:
  """Which classes each specialist covers, and where that came from.

  Attributes:
    subsets: K disjoint lists of class ids (sorted).
    num_classes: C of the generalist.
    cache: the cache the covariance was computed from.
    dataset_fingerprint: its transfer set's fingerprint.
    clusters: the K asked for (empty clusters are dropped, so `len(subsets)` may be less).
    seed: K-means' seed.
    within_mass: per subset, the mean generalist probability (T = 1) that falls within the subset on the rows whose
      label (or, unlabelled, the generalist's top class) is in it.
    examples: per subset, the rows of those classes.
  """

  subsets: tuple[tuple[int, ...], ...]
  num_classes: int
  cache: str = ""
  dataset_fingerprint: str = ""
  clusters: int = 0
  seed: int = 0
  within_mass: tuple[float, ...] = ()
  examples: tuple[int, ...] = ()

  def to_json(self) -> str:
    specialists = [{"classes": list(s), "size": len(s), "within_mass": m, "rows": n}
                   for s, m, n in zip(self.subsets, self.within_mass, self.examples)]
    return json.dumps({"kind": PLAN_KIND, "version": PLAN_VERSION, "num_classes": self.num_classes,
                       "cache": self.cache, "dataset_fingerprint": self.dataset_fingerprint,
                       "clusters": self.clusters, "seed": self.seed, "specialists": specialists}, indent=2)

  @classmethod
  def read(cls, path: str) -> "SpecialistPlan":
    """Reads and checks a plan file.

    Raises:
      StillroomError: it cannot be read, is not a plan, or its subsets are not disjoint class ids.
    """
    try:
      d = storage.read_json(path)
    except (OSError, ValueError) as e:
      raise StillroomError(f"specialist plan {path!r} cannot be read ({type(e).__name__}: {e}).") from e
    if not isinstance(d, dict) or d.get("kind") != PLAN_KIND:
      raise StillroomError(f"{path!r} is not a specialist plan (written by `teacher-cache specialists`).")
    if d.get("version") != PLAN_VERSION:
      raise StillroomError(f"specialist plan {path!r} has version {d.get('version')}; this stillroom reads "
                           f"{PLAN_VERSION}.")
    try:
      specialists = d["specialists"]
      plan = cls(subsets=tuple(tuple(int(c) for c in s["classes"]) for s in specialists),
                 num_classes=int(d["num_classes"]), cache=d.get("cache", ""),
                 dataset_fingerprint=d.get("dataset_fingerprint", ""), clusters=int(d.get("clusters", 0)),
                 seed=int(d.get("seed", 0)), within_mass=tuple(float(s.get("within_mass", math.nan))
                                                               for s in specialists),
                 examples=tuple(int(s.get("rows", 0)) for s in specialists))
    except (KeyError, TypeError, ValueError) as e:
      raise StillroomError(f"specialist plan {path!r} is damaged ({type(e).__name__}: {e}).") from e
    every = [c for s in plan.subsets for c in s]
    if not plan.subsets or any(not s for s in plan.subsets) or len(set(every)) != len(every) \
        or not all(0 <= c < plan.num_classes for c in every):
      raise StillroomError(f"specialist plan {path!r}: the subsets must be non-empty, disjoint lists of class ids "
                           f"in 0..{plan.num_classes - 1}.")
    return plan


def parse_specialist(text: str) -> tuple[str, int]:
  """`PLAN.json:k` -> (plan path, k).

  Raises:
    StillroomError: no `:k`, or k not a number.
  """
  path, sep, k = text.rpartition(":")
  if not sep or not path or not re.fullmatch(r"[0-9]+", k):
    raise StillroomError(f"--specialist takes PLAN.json:k (k: which specialist of the plan, from 0), got {text!r}.")
  return path, int(k)


def dustbin_labels(labels: np.ndarray, subset, num_classes: int) -> np.ndarray:
  """A specialist's labels: class `subset[i]` becomes i, every other class the dustbin `len(subset)`.

  Args:
    labels: int [N] labels in 0..C-1 (negative: unlabelled, kept).
    subset: the specialist's classes.
    num_classes: C.

  Returns:
    int32 [N] labels in 0..len(subset).
  """
  mapping = np.full(num_classes, len(subset), np.int32)
  mapping[np.asarray(subset, np.int64)] = np.arange(len(subset), dtype=np.int32)
  labels = np.asarray(labels)
  return np.where(labels >= 0, mapping[np.clip(labels, 0, num_classes - 1)], labels).astype(np.int32)


def dustbin_correction(natural: float, enriched: float) -> float:
  """What to add to a specialist's dustbin logit after enriched sampling, so that its probabilities are for the
  natural class frequencies again.

  Sampling the subset's examples with probability `enriched` instead of their natural share `natural` multiplies
  the posterior odds of every subset class against the dustbin by `(enriched / natural) / ((1 - enriched) /
  (1 - natural))` (Bayes' rule with the priors scaled). Raising the dustbin logit by the log of that factor undoes
  it exactly: Hinton et al.'s "log of the proportion by which the specialist class is oversampled".

  Args:
    natural: the subset's share of the training examples, in (0, 1).
    enriched: its share in the enriched sampling, in (0, 1).
  """
  return math.log(enriched / natural) - math.log((1 - enriched) / (1 - natural))


def combine_specialists(generalist_log_probs: jax.Array, specialist_log_probs: jax.Array, classes: jax.Array,
                        active: jax.Array, tolerance: float = COMBINE_TOLERANCE,
                        max_steps: int = COMBINE_MAX_STEPS) -> jax.Array:
  """Hinton et al.'s combination of a generalist with its active specialists, for one row.

  Finds the q on the C classes that minimises `KL(p_g ‖ q) + Σ_{m active} KL(p_m ‖ q_m)`, with `q_m` = q on m's
  classes and, as m's dustbin, `1 − Σ_{c ∈ S_m} q_c`. Up to constants that is maximising
  `Σ_c a_c log q_c + Σ_m b_m log(1 − Q_m)`, with `a_c = p_g(c) + Σ_{m ∋ c} p_m(c)` and `b_m = p_m(dustbin)`: a
  concave problem whose dustbin terms are censored observations ("some class outside S_m"), so EM converges to
  its maximum: each step spreads b_m over the classes outside S_m in proportion to q, and renormalises. EM alone
  crawls when the dustbins hold most of the mass, so it is accelerated by SQUAREM (Varadhan & Roland 2008: an
  extrapolation along two EM steps, kept only when it stays a distribution) and runs until one EM step changes
  every q_c by less than `tolerance` times q_c, or `max_steps` rounds. The subsets are disjoint; inactive specialists
  drop out.
  Sums are elementwise (no matrix products), so that no device rounds them to lower precision (TF32).

  Args:
    generalist_log_probs: float32 [C] log p_g.
    specialist_log_probs: float32 [S, P] log p_m: columns 0..|S_m|-1 over m's classes, the last column its dustbin,
      padding between them ignored.
    classes: int32 [S, P - 1] the class of each of those columns, -1 for padding.
    active: bool [S] which specialists take part.
    tolerance: the largest relative change of any q_c in one EM step at which to stop.
    max_steps: the most rounds (each two EM steps and one extrapolation).

  Returns:
    float32 [C] log q.
  """
  num_classes = generalist_log_probs.shape[-1]
  p_m = jnp.exp(specialist_log_probs.astype(jnp.float32)) * active[:, None]
  valid = classes >= 0
  safe = jnp.where(valid, classes, 0)
  a = jnp.exp(generalist_log_probs.astype(jnp.float32)).at[safe].add(jnp.where(valid, p_m[:, :-1], 0.0))  # [C]
  dustbin = p_m[:, -1]  # b_m [S]
  outside = 1.0 - class_matrix_mask(classes, num_classes).astype(jnp.float32)  # [S, C]: 1 where c ∉ S_m
  total = jnp.sum(a) + jnp.sum(dustbin)  # 1 + the active specialists' count: each distribution sums to 1.

  def em(q):
    mass_outside = jnp.maximum(jnp.sum(outside * q, axis=1), 1e-30)  # [S]
    spread = jnp.sum((dustbin / mass_outside)[:, None] * outside, axis=0)  # [C]
    return (a + q * spread) / total

  def squarem(state):
    q, _, steps = state
    q1 = em(q)
    q2 = em(q1)
    r, v = q1 - q, q2 - 2 * q1 + q
    alpha = jnp.minimum(-jnp.sqrt(jnp.sum(r * r)) / jnp.maximum(jnp.sqrt(jnp.sum(v * v)), 1e-30), -1.0)
    jump = q - 2 * alpha * r + alpha * alpha * v
    q3 = jnp.where(jnp.all(jump > 0), jump / jnp.sum(jump), q2)  # Only a distribution is kept; else two EM steps.
    q4 = em(q3)
    return q4, jnp.max(jnp.abs(q4 - q3) / jnp.maximum(q3, 1e-30)), steps + 1

  q, _, _ = jax.lax.while_loop(lambda state: (state[1] > tolerance) & (state[2] < max_steps), squarem,
                               (a / jnp.sum(a), jnp.float32(jnp.inf), 0))
  return jnp.log(jnp.maximum(q, jnp.finfo(jnp.float32).tiny))


def initial_params(target: dict, generalist: dict, subset=None, what: str = "--init-from") -> dict:
  """Parameters to start a run from another run's (`--init-from`), as pure dicts of arrays.

  Every array is copied where the shapes agree. For a specialist (`subset` given), the head (the arrays of a
  module named `head`) maps the generalist's C outputs to the subset's classes and a dustbin: each subset class
  keeps its output's weights, and the dustbin gets the mean of the other classes' weights and bias plus the log of
  their count, so that its logit starts at their mean logit + log n, a lower bound of their log-sum-exp.

  Args:
    target: the new model's parameters (for their structure and shapes).
    generalist: the parameters of the run to start from.
    subset: the specialist's classes, or None.
    what: how errors name the run.

  Returns:
    A dict of `target`'s structure.

  Raises:
    StillroomError: the structures differ (another model), naming the first parameter that does not fit.
  """
  def merge(new, old, path):
    if isinstance(new, dict):
      if not isinstance(old, dict) or set(new) != set(old):
        raise StillroomError(f"{what}: its parameters at {'/'.join(path) or 'the top'} are not this model's "
                             "(another model?).")
      return {key: merge(new[key], old[key], path + (str(key),)) for key in new}
    old = np.asarray(old)
    if subset is not None and len(path) >= 2 and path[-2] == "head":
      rest = np.setdiff1d(np.arange(old.shape[-1]), subset)
      kept = np.take(old, np.asarray(subset), axis=-1)
      dustbin = np.take(old, rest, axis=-1).mean(axis=-1, keepdims=True)
      if path[-1] == "bias":
        dustbin = dustbin + np.log(len(rest))
      old = np.concatenate([kept, dustbin], axis=-1)
    if old.shape != tuple(new.shape):
      raise StillroomError(f"{what}: parameter {'/'.join(path)} has shape {old.shape}; this model's is "
                           f"{tuple(new.shape)} (another model?).")
    return old.astype(new.dtype)

  return merge(target, generalist, ())


def class_matrix(subsets, width: int) -> np.ndarray:
  """int32 [S, width - 1]: each specialist's classes in its output order, -1 for padding (see
  `combine_specialists`)."""
  classes = np.full((len(subsets), max(width - 1, 0)), -1, np.int32)
  for m, subset in enumerate(subsets):
    classes[m, :len(subset)] = subset
  return classes


def specialist_log_probs(generalist_logits: jax.Array, specialist_logits: jax.Array, classes: np.ndarray,
                         temperature: float, top_n: int) -> tuple[jax.Array, jax.Array]:
  """The targets of a cache of specialists, from the logits it stores.

  Args:
    generalist_logits: [B, C] the generalist's raw logits.
    specialist_logits: [B, S, P] each specialist's raw logits, its classes first, its dustbin (already raised by its
      correction) in the last column, padding between ignored.
    classes: int32 [S, P - 1] (`class_matrix`).
    temperature: T of the distributions combined.
    top_n: a specialist takes part in a row when one of its classes is among the generalist's `top_n` most
      probable.

  Returns:
    `(active bool [B, S], log q float32 [B, C])`, q by `combine_specialists` of the distributions at T.
  """
  generalist = generalist_logits.astype(jnp.float32) / temperature
  num_classes = generalist.shape[-1]
  valid = jnp.concatenate([jnp.asarray(classes) >= 0, jnp.ones((len(classes), 1), bool)], axis=1)  # [S, P]
  scaled = jnp.where(valid, specialist_logits.astype(jnp.float32) / temperature, -jnp.inf)
  inside = class_matrix_mask(classes, num_classes)  # [S, C]
  _, top = jax.lax.top_k(generalist, top_n)
  in_top = jnp.zeros_like(generalist, bool).at[jnp.arange(len(generalist))[:, None], top].set(True)  # [B, C]
  active = jnp.any(in_top[:, None, :] & inside[None], axis=-1)
  combine = jax.vmap(combine_specialists, in_axes=(0, 0, None, 0))
  return active, combine(jax.nn.log_softmax(generalist, axis=-1), jax.nn.log_softmax(scaled, axis=-1),
                         jnp.asarray(classes), active)


def class_matrix_mask(classes, num_classes: int) -> jax.Array:
  """bool [S, C]: class c is one of specialist m's, from `classes` int [S, P - 1] (`class_matrix`; -1 padding)."""
  return jnp.any(jnp.asarray(classes)[:, :, None] == jnp.arange(num_classes), axis=1)
