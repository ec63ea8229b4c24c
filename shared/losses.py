"""Distillation losses: small per-example functions (a batch is a `jax.vmap` or a broadcast away).

Notation: s student logits [C], y hard label, p_T the teacher's distribution at temperature T (given as
log-probabilities), z the teacher's (mean member) logits, C the number of classes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

LOSSES = ("kl", "mse")


def hard_cross_entropy(student_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`CE(y, softmax(s))`.

  Args:
    student_logits: [..., C].
    labels: int [...] class ids.

  Returns:
    [...] cross-entropy in nats.
  """
  return optax.softmax_cross_entropy_with_integer_labels(student_logits, labels)


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


def distillation_loss(student_logits: jax.Array, labels: jax.Array, alpha, *, temperature,
                      target_log_probs: jax.Array | None, teacher_logits: jax.Array | None = None,
                      mse=False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`alpha · CE(y, softmax(s)) + (1 − alpha) · soft`, soft being `soft_kl` or (with `mse`) `logit_mse`.

  Hard-label training passes neither `target_log_probs` nor `teacher_logits`: the soft term is zero.

  Args:
    student_logits: [..., C].
    labels: int [...]; ignored (may be -1) where alpha is 0.
    alpha: weight of the hard term in [0, 1] (a float or a traced scalar).
    temperature: T of the soft term.
    target_log_probs: [..., C] teacher log-probabilities at T; needed by "kl".
    teacher_logits: [..., C] mean teacher logits; needed by "mse".
    mse: use `logit_mse` instead of `soft_kl`: a Python or NumPy bool (only that term is computed), or a traced
      bool (both are computed and one is selected, as students of one vmapped step may differ in their loss).

  Returns:
    `(total, hard, soft)`, each [...].
  """
  hard = hard_cross_entropy(student_logits, jnp.maximum(labels, 0))
  if target_log_probs is None and teacher_logits is None:
    soft = jnp.zeros_like(hard)
  elif isinstance(mse, (bool, np.bool_)):  # Known when tracing: compute the one term.
    if (teacher_logits if mse else target_log_probs) is None:
      raise ValueError(f"the {'mse' if mse else 'kl'} loss needs {'teacher_logits' if mse else 'target_log_probs'}")
    soft = logit_mse(student_logits, teacher_logits) if mse else soft_kl(student_logits, target_log_probs,
                                                                          temperature)
  else:
    if teacher_logits is None or target_log_probs is None:
      raise ValueError("a traced loss choice needs both target_log_probs and teacher_logits")
    soft = jnp.where(mse, logit_mse(student_logits, teacher_logits),
                     soft_kl(student_logits, target_log_probs, temperature))
  return alpha * hard + (1.0 - alpha) * soft, hard, soft
