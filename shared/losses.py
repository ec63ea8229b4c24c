"""Distillation losses: small per-example functions (a batch is a `jax.vmap` or a broadcast away).

Notation: s student logits [C], y hard label, p_T the teacher's distribution at temperature T (given as
log-probabilities), z the teacher's (mean member) logits, C the number of classes. The trainer uses them through the
registered distillation terms of `student_train.terms`.
"""

import jax
import jax.numpy as jnp
import optax


def hard_cross_entropy(student_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`CE(y, softmax(s))`.

  Args:
    student_logits: [..., C].
    labels: int [...] class ids.

  Returns:
    [...] cross-entropy in nats.
  """
  return optax.softmax_cross_entropy_with_integer_labels(student_logits, labels)


def mixed_cross_entropy(student_logits: jax.Array, labels: jax.Array, partner_labels: jax.Array,
                        lam: jax.Array) -> jax.Array:
  """`λ·CE(y, softmax(s)) + (1 − λ)·CE(y_partner, softmax(s))`: the hard-label term of a mixed view (mixup, CutMix),
  the cross-entropy against the λ-mixed one-hot labels.

  Args:
    student_logits: [..., C].
    labels: int [...] the view's class ids.
    partner_labels: int [...] the partner view's class ids (any valid id where λ is 1).
    lam: float [...] the view's share λ.

  Returns:
    [...] cross-entropy in nats.
  """
  return lam * hard_cross_entropy(student_logits, labels) + (1.0 - lam) * hard_cross_entropy(student_logits,
                                                                                             partner_labels)


def soft_kl(student_logits: jax.Array, target_log_probs: jax.Array, temperature) -> jax.Array:
  """`T² · KL(p_T || softmax(s / T))`, Hinton et al.'s soft term.

  The soft term's gradient scales as 1/T², so the T² factor keeps its weight against the hard term
  independent of T. KL rather than soft cross-entropy: they differ by the teacher's entropy (a constant, same
  gradients), and KL is zero when the student matches the teacher.

  Args:
    student_logits: [..., C].
    target_log_probs: [..., C] teacher log-probabilities at temperature T.
    temperature: T > 0 (a float or a traced scalar).

  Returns:
    [...] T²-scaled KL divergence in nats.
  """
  student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = optax.losses.kl_divergence_with_log_targets(student_log_probs, target_log_probs.astype(jnp.float32))
  return temperature ** 2 * kl


def logit_mse(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """`(1 / 2C) · Σ_c (ŝ_c − ẑ_c)²`, ŝ and ẑ the zero-meaned logits: the high-temperature limit of `soft_kl`.

  For T ≫ |logits|, `T² · KL(softmax(z/T) || softmax(s/T)) → (1 / 2C) Σ_c (ŝ_c − ẑ_c)²` (Hinton et al. 2015,
  §2.1), so `alpha` weighs the hard term against the same scale with either loss, at any C.

  Args:
    student_logits: [..., C].
    teacher_logits: [..., C] (the mean of the members' logits for an ensemble).

  Returns:
    [...] the scaled squared error.
  """
  centered = lambda z: z - jnp.mean(z, axis=-1, keepdims=True)  # noqa: E731
  squared = optax.l2_loss(centered(student_logits.astype(jnp.float32)), centered(teacher_logits.astype(jnp.float32)))
  return jnp.mean(squared, axis=-1)  # l2_loss is ½(a − b)²; the mean over C supplies the 1/C.


def topk_kl(student_logits: jax.Array, ids: jax.Array, log_probs: jax.Array, log_rest: jax.Array,
            temperature) -> jax.Array:
  """`T² · KL` over K + 1 bins: the teacher's K stored classes, and every other class as one bin.

  With K = C (no other class) it is `soft_kl` exactly. The student's bin of the other classes is a log-sum-exp over
  them (not `log(1 − Σ_top q)`, which rounds to log 0 once the top classes hold all but 1e-7 of the mass).

  Args:
    student_logits: [..., C].
    ids: int [..., K] distinct class ids.
    log_probs: [..., K] the teacher's log-probabilities at T of those classes.
    log_rest: [...] log of the teacher's probability of every other class at T (−inf when there is none).
    temperature: T > 0.

  Returns:
    [...] T²-scaled KL divergence in nats.
  """
  def one(logits, ids, log_probs, log_rest):  # [C], [K], [K], [].
    student = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
    log_probs, log_rest = log_probs.astype(jnp.float32), log_rest.astype(jnp.float32)
    top = jnp.sum(jnp.exp(log_probs) * (log_probs - student[ids]))
    stored = jnp.zeros(student.shape, bool).at[ids].set(True)
    has_rest = jnp.isfinite(log_rest) & ~jnp.all(stored)
    # Where there is no rest bin, its term is 0; the log-sum-exp then runs over every class so that its gradient
    # stays finite (0 × a NaN gradient would be NaN).
    student_rest = jax.nn.logsumexp(jnp.where(stored & has_rest, -jnp.inf, student))
    safe_rest = jnp.where(has_rest, log_rest, 0.0)
    return top + jnp.where(has_rest, jnp.exp(safe_rest) * (safe_rest - student_rest), 0.0)

  per_row = jnp.vectorize(one, signature="(c),(k),(k),()->()")
  return temperature ** 2 * per_row(student_logits, ids, log_probs, log_rest)


def sampled_kl(student_logits: jax.Array, ids: jax.Array, counts: jax.Array, log_probs: jax.Array,
               temperature) -> jax.Array:
  """`T² · Σ_k w_k (log p_k − log q_k)` with `w_k = counts_k / Σ counts`: for ids drawn from the teacher's p_T,
  an unbiased estimate of `T² · KL(p_T || softmax(s / T))` and of its gradient `T (q_T − p_T)` (Anshumann et al.
  2025, "Sparse Logit Sampling").

  Args:
    student_logits: [..., C].
    ids: int [..., K] the distinct drawn class ids (padding: count 0).
    counts: [..., K] how many draws gave each id.
    log_probs: [..., K] the teacher's log-probabilities at T of those classes.
    temperature: T > 0.

  Returns:
    [...] the T²-scaled estimate in nats.
  """
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  counts = counts.astype(jnp.float32)
  weights = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
  drawn = counts > 0  # Padding may hold any log-probability: its weight is 0, and so must its term be.
  gap = jnp.where(drawn, log_probs.astype(jnp.float32), 0.0) - jnp.take_along_axis(student, ids, axis=-1)
  return temperature ** 2 * jnp.sum(jnp.where(drawn, weights * gap, 0.0), axis=-1)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """The mean of `values` [B] over the rows `mask` [B] keeps (0 when it keeps none)."""
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def hint_loss(regressed: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """FitNets' hint term (Romero et al. 2015): `½ · mean((r(u) − v)²)` over each example's feature elements, r(u) the
  student's features through the learned regressor, v the teacher's "hint" features.

  The paper writes `½‖v − r(u)‖²`; the mean instead of the sum keeps the weight of the term independent of the
  feature map's size.

  Args:
    regressed: [B, *F] the regressed student features.
    teacher_features: [B, *F] the teacher's features of the same shape.

  Returns:
    [B] the loss per example.
  """
  if regressed.shape != teacher_features.shape:
    raise ValueError(f"feature shapes differ: {regressed.shape} vs {teacher_features.shape}")
  difference = regressed.astype(jnp.float32) - teacher_features.astype(jnp.float32)
  return 0.5 * jnp.mean(difference ** 2, axis=tuple(range(1, difference.ndim)))


def _safe_norm(x: jax.Array) -> jax.Array:
  """The L2 norm over the last axis (kept), 1 where it is 0: an all-zero row (a dead ReLU map, a padded row)
  normalises to zeros with a finite gradient (the gradient of √x at 0 is not)."""
  squared = jnp.sum(x * x, axis=-1, keepdims=True)
  return jnp.sqrt(jnp.where(squared > 0, squared, 1.0))


def normalized(x: jax.Array) -> jax.Array:
  """`x` L2-normalised over its last axis (an all-zero row stays zero, with a finite gradient)."""
  return x / _safe_norm(x)


def attention_map(features: jax.Array, power: float = 2.0) -> jax.Array:
  """Zagoruyko & Komodakis's spatial attention map: `Q = Σ_c |A_c|^p` over channels, flattened and L2-normalised.

  Args:
    features: [..., H, W, C] a feature map (channels last).
    power: p (the paper's default is 2).

  Returns:
    [..., H·W] the normalised map (zero where the features are all zero).
  """
  features = features.astype(jnp.float32)
  return normalized(jnp.sum(jnp.abs(features) ** power, axis=-1).reshape(*features.shape[:-3], -1))


def attention_transfer(student_features: jax.Array, teacher_map: jax.Array, power: float = 2.0) -> jax.Array:
  """Attention transfer: `mean_j (Q̂_S − Q̂_T)_j²` over the H·W positions of one example, Q̂ the normalised maps (as
  the authors' code computes it; the paper's `½‖Q̂_S − Q̂_T‖_p` differs by a constant factor and the power).

  Args:
    student_features: [..., H, W, C] the student's feature map.
    teacher_map: [..., H·W] the teacher's normalised map (`attention_map`, as a cache stores it).
    power: p of the student's map.

  Returns:
    [...] the loss per example.
  """
  student_map = attention_map(student_features, power)
  if student_map.shape != teacher_map.shape:
    raise ValueError(f"attention maps differ in size: {student_map.shape} vs {teacher_map.shape}")
  return jnp.mean((student_map - teacher_map.astype(jnp.float32)) ** 2, axis=-1)


def similarity_preserving(student_features: jax.Array, teacher_features, mask: jax.Array) -> jax.Array:
  """Similarity-preserving KD (Tung & Mori 2019), a batch loss: `‖G̃_S − G̃_T‖_F² / b²`, with `G = F Fᵀ` the batch's
  Gram matrix of flattened features, each row L2-normalised, over the b rows that `mask` keeps.

  Args:
    student_features: [B, ...] the student's features of a batch.
    teacher_features: [B, ...] the teacher's (any feature shape: only the batch's similarities are compared), or a
      list of several members' (their normalised Grams are averaged: members' channels need not align).
    mask: [B] 1 for real rows, 0 for padding; padded rows take part in no similarity.

  Returns:
    [] the loss of the batch.
  """
  mask = mask.astype(jnp.float32)

  def gram(features):
    flat = features.astype(jnp.float32).reshape(features.shape[0], -1) * mask[:, None]
    return normalized(flat @ flat.T)

  members = teacher_features if isinstance(teacher_features, (list, tuple)) else [teacher_features]
  target = sum(gram(f) for f in members) / len(members)
  rows = jnp.maximum(jnp.sum(mask), 1.0)
  return jnp.sum((gram(student_features) - target) ** 2) / rows ** 2


def stored_feature(feature: jax.Array, kind: str) -> jax.Array:
  """What a cache stores of a named feature as `kind` (see `shared.cache.FEATURE_KINDS`); students apply the same
  to their own features.

  Args:
    feature: [B, H, W, C] a feature map, or [B, D] a vector.
    kind: "map" (as it is), "attention" (`attention_map`, [B, H, W]) or "pooled" (mean over H and W, [B, C]; a
      vector as it is).

  Raises:
    ValueError: "attention" of a vector.
  """
  if kind == "map" or (kind == "pooled" and feature.ndim == 2):
    return feature
  if feature.ndim != 4:
    raise ValueError(f"the {kind} of a feature needs a [B, H, W, C] map; it has shape {feature.shape}")
  if kind == "attention":
    return attention_map(feature).reshape(feature.shape[:3])
  if kind == "pooled":
    return jnp.mean(feature.astype(jnp.float32), axis=(1, 2))
  raise ValueError(f"unknown feature kind {kind!r}")


def pool_factors(teacher_hw: tuple[int, int], student_hw: tuple[int, int]) -> tuple[int, int] | None:
  """The (fy, fx) average pooling that takes a teacher map of H×W `teacher_hw` to the student's `student_hw`, or
  None when the teacher's sides are not whole multiples of the student's."""
  (th, tw), (sh, sw) = teacher_hw, student_hw
  if th % sh or tw % sw:
    return None
  return th // sh, tw // sw


def average_pool(x: jax.Array, factors: tuple[int, int]) -> jax.Array:
  """[B, H, W, ...] averaged over non-overlapping fy×fx windows: [B, H/fy, W/fx, ...]."""
  fy, fx = factors
  if (fy, fx) == (1, 1):
    return x
  b, h, w, *rest = x.shape
  return jnp.mean(x.astype(jnp.float32).reshape(b, h // fy, fy, w // fx, fx, *rest), axis=(2, 4))
