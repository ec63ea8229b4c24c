"""Distillation losses: small per-example functions (a batch is a `jax.vmap` or a broadcast away).

Notation: s student logits [C], y hard label, p_T the teacher's distribution at temperature T (given as
log-probabilities), z the teacher's (mean member) logits.
"""

import jax
import jax.numpy as jnp
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


def soft_kl(student_logits: jax.Array, target_log_probs: jax.Array, temperature: float) -> jax.Array:
  """`T² · KL(p_T || softmax(s / T))`, Hinton et al.'s soft term.

  The soft term's gradient scales as 1/T², so the T² factor keeps its weight against the hard term
  independent of T. KL rather than soft cross-entropy: they differ by the teacher's entropy (a constant, same
  gradients), and KL is zero when the student matches the teacher.

  Args:
    student_logits: [..., C].
    target_log_probs: [..., C] teacher log-probabilities at temperature T.
    temperature: T > 0.

  Returns:
    [...] T²-scaled KL divergence in nats.
  """
  student_log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = optax.losses.kl_divergence_with_log_targets(student_log_probs, target_log_probs.astype(jnp.float32))
  return temperature ** 2 * kl


def logit_mse(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """`0.5 · Σ_c (ŝ_c − ẑ_c)²` with ŝ, ẑ the zero-meaned logits: the high-temperature limit of the soft term.

  Args:
    student_logits: [..., C].
    teacher_logits: [..., C] (the mean of the members' logits for an ensemble).

  Returns:
    [...] squared error.
  """
  centered = lambda z: z - jnp.mean(z, axis=-1, keepdims=True)  # noqa: E731
  return jnp.sum(optax.l2_loss(centered(student_logits.astype(jnp.float32)),
                               centered(teacher_logits.astype(jnp.float32))), axis=-1)


def distillation_loss(student_logits, labels, alpha, *, loss: str, temperature: float, target_log_probs=None,
                      teacher_logits=None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`alpha · CE(y, softmax(s)) + (1 − alpha) · soft`, soft being `soft_kl` ("kl") or `logit_mse` ("mse").

  Args:
    student_logits: [..., C].
    labels: int [...]; ignored (may be -1) where alpha is 0.
    alpha: weight of the hard term, a scalar in [0, 1].
    loss: "kl" or "mse".
    temperature: T for "kl" (ignored by "mse").
    target_log_probs: [..., C], needed for "kl".
    teacher_logits: [..., C], needed for "mse".

  Returns:
    `(total, hard, soft)`, each [...].
  """
  hard = hard_cross_entropy(student_logits, jnp.maximum(labels, 0))
  if loss == "kl":
    soft = soft_kl(student_logits, target_log_probs, temperature)
  elif loss == "mse":
    soft = logit_mse(student_logits, teacher_logits)
  else:
    raise ValueError(f"unknown loss {loss!r}; valid: {LOSSES}")
  return alpha * hard + (1.0 - alpha) * soft, hard, soft
