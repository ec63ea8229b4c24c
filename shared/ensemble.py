"""Combining ensemble members into one softened distribution (computed in float32, in log space).

One implementation serves the cache build (fixed rule, all members) and the student's step (per-student T, rule
and member subset, all traced), so stored and re-derived targets come from the same arithmetic.
"""

import math

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


def top_k_targets(log_probs: jax.Array, k: int) -> dict[str, jax.Array]:
  """A distribution's K most probable classes and the mass of all the others (what a `topk:K` cache stores).

  Args:
    log_probs: [..., C] log-probabilities.
    k: K <= C.

  Returns:
    "ids" int32 [..., K] in decreasing probability, "log_probs" [..., K] theirs, "log_rest" [...] the log of the
    other classes' total probability (−inf when K = C), each float32.
  """
  log_probs = log_probs.astype(jnp.float32)
  top, ids = jax.lax.top_k(log_probs, k)

  def rest(row, ids):  # [C], [K]
    return jax.nn.logsumexp(row.at[ids].set(-jnp.inf))

  return {"ids": ids.astype(jnp.int32), "log_probs": top,
          "log_rest": jnp.vectorize(rest, signature="(c),(k)->()")(log_probs, ids)}


def sampled_targets(log_probs: jax.Array, k: int, keys: jax.Array) -> dict[str, jax.Array]:
  """K classes drawn with replacement from each row's distribution, as distinct ids and their counts (what a
  `sample:K` cache stores; `shared.losses.sampled_kl` is the estimator that uses them).

  A draw inverts the cumulative distribution in two levels, first over blocks of about √C classes, then within the
  block: O(C + K √C) work per row, where `jax.random.categorical` would draw K × C Gumbel variates. One level would
  be biased at large C, since a float32 uniform cannot resolve classes below 2⁻²⁴ of the total (at C = 10⁵,
  thousands of classes could never be drawn); per block it resolves 2⁻²⁴ of the block's mass. Running maxima keep
  the float32 cumulative sums monotone.

  Args:
    log_probs: [B, C] log-probabilities.
    k: draws per row.
    keys: [B] PRNG keys, one per row (a row's draws depend on its key alone).

  Returns:
    "ids" int32 [B, K], the distinct ids in increasing order, then padding (id 0, count 0); "counts" int32 [B, K]
    (each row's sum to K); "log_probs" float32 [B, K] of the ids.
  """
  classes = log_probs.shape[-1]
  width = math.isqrt(classes - 1) + 1  # ceil(sqrt(C)) classes a block.
  blocks = -(-classes // width)

  def inverse(mass: jax.Array, uniform: jax.Array) -> jax.Array:
    """The first position [K] whose cumulative `mass` [N] exceeds `uniform` [K] × the total (one of zero mass
    never)."""
    cumulative = jax.lax.cummax(jnp.cumsum(mass))
    at = jnp.searchsorted(cumulative, uniform * cumulative[-1], side="right")
    # `uniform` × total may round up to the total: the last position with mass, never one after it.
    return jnp.minimum(at, jnp.argmax(cumulative >= cumulative[-1]))

  def one(row, key):
    probs = jnp.pad(jnp.exp(row - jnp.max(row)), (0, blocks * width - classes)).reshape(blocks, width)
    block_key, class_key = jax.random.split(key)
    block = inverse(probs.sum(axis=1), jax.random.uniform(block_key, (k,)))  # [K]
    slot = jax.vmap(inverse)(probs[block], jax.random.uniform(class_key, (k,)))  # [K]
    draws = jnp.sort(block * width + slot)
    first = jnp.concatenate([jnp.ones(1, bool), draws[1:] != draws[:-1]])
    position = jnp.cumsum(first) - 1
    ids = jnp.zeros(k, jnp.int32).at[position].set(draws.astype(jnp.int32))
    counts = jnp.zeros(k, jnp.int32).at[position].add(1)
    return {"ids": ids, "counts": counts, "log_probs": row[ids]}

  return jax.vmap(one)(log_probs.astype(jnp.float32), keys)
