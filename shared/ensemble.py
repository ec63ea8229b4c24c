"""Combining ensemble members into one softened distribution (computed in float32, in log space)."""

import jax
import jax.numpy as jnp

COMBINE_RULES = ("arithmetic", "geometric")


def combine_log_probs(member_logits: jax.Array, temperature: float, combine: str) -> jax.Array:
  """Log-probabilities of the ensemble's distribution at temperature T.

  Arithmetic mean (AM): `log mean_m softmax(z_m / T)`.
  Geometric mean (GM), normalised: `log_softmax(mean_m z_m / T)`, i.e. `prod_m softmax(z_m / T)^(1/M)` renormalised.

  Args:
    member_logits: [..., M, C] raw member logits (any float dtype; computed in float32).
    temperature: T > 0.
    combine: "arithmetic" or "geometric".

  Returns:
    float32 [..., C] log-probabilities.
  """
  scaled = member_logits.astype(jnp.float32) / jnp.float32(temperature)
  if combine == "arithmetic":
    num_members = member_logits.shape[-2]
    return jax.nn.logsumexp(jax.nn.log_softmax(scaled, axis=-1), axis=-2) - jnp.log(jnp.float32(num_members))
  if combine == "geometric":
    return jax.nn.log_softmax(jnp.mean(scaled, axis=-2), axis=-1)
  raise ValueError(f"unknown combine rule {combine!r}; valid: {COMBINE_RULES}")
