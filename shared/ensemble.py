"""Combining ensemble members into one softened distribution (computed in float32, in log space).

One implementation serves the cache build (fixed rule, all members) and the student's step (per-student T, rule
and member subset, all traced), so stored and re-derived targets come from the same arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np

COMBINE_RULES = ("arithmetic", "geometric")


def member_weights(members, num_members: int) -> np.ndarray:
  """Uniform weights over a member subset: float32 [num_members], `1/|S|` on the members in S, 0 elsewhere."""
  weights = np.zeros(num_members, np.float32)
  weights[list(members)] = 1.0 / len(members)
  return weights


def ensemble_log_probs(member_logits: jax.Array, temperature, *, geometric, weights=None) -> jax.Array:
  """Log-probabilities of a weighted ensemble at temperature T.

  Arithmetic mean (AM): `log Σ_m w_m softmax(z_m / T)`.
  Geometric mean (GM), normalised: `log_softmax(Σ_m w_m z_m / T)`, i.e. `Π_m softmax(z_m / T)^{w_m}` renormalised.
  With `w_m = 1/M` these are Hinton et al.'s AM and GM; with `1/|S|` on a subset S, the subset's ensemble.

  Args:
    member_logits: [..., M, C] raw member logits (any float dtype; computed in float32).
    temperature: T > 0, a Python float or a traced scalar.
    geometric: GM if true, else AM. A Python bool picks the rule when tracing; a traced bool selects per call
      (both are computed), which is how students of one vmapped step use different rules.
    weights: [M] non-negative member weights summing to 1; default uniform. A zero weight drops a member.

  Returns:
    float32 [..., C] log-probabilities.
  """
  scaled = member_logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  num_members = member_logits.shape[-2]
  if weights is None:
    weights = jnp.full((num_members,), 1.0 / num_members, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)[:, None]  # [M, 1], broadcasts against [..., M, C].

  def arithmetic():
    return jax.nn.logsumexp(jax.nn.log_softmax(scaled, axis=-1) + jnp.log(weights), axis=-2)

  def geometric_mean():
    return jax.nn.log_softmax(jnp.sum(weights * scaled, axis=-2), axis=-1)

  if isinstance(geometric, (bool, np.bool_)):
    return geometric_mean() if geometric else arithmetic()
  return jnp.where(geometric, geometric_mean(), arithmetic())


def combine_log_probs(member_logits: jax.Array, temperature: float, combine: str) -> jax.Array:
  """`ensemble_log_probs` of all members with equal weights, the rule given by name.

  Args:
    member_logits: [..., M, C] raw member logits.
    temperature: T > 0.
    combine: "arithmetic" or "geometric".

  Returns:
    float32 [..., C] log-probabilities.
  """
  if combine not in COMBINE_RULES:
    raise ValueError(f"unknown combine rule {combine!r}; valid: {COMBINE_RULES}")
  return ensemble_log_probs(member_logits, temperature, geometric=combine == "geometric")


def mean_logits(member_logits: jax.Array, weights=None) -> jax.Array:
  """The weighted mean of the members' logits, float32 [..., C]: the teacher logits that `logit_mse` matches
  (the high-temperature limit of either rule)."""
  num_members = member_logits.shape[-2]
  if weights is None:
    weights = jnp.full((num_members,), 1.0 / num_members, jnp.float32)
  return jnp.sum(jnp.asarray(weights, jnp.float32)[:, None] * member_logits.astype(jnp.float32), axis=-2)
