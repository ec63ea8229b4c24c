"""Divergences of the language-model distillation tools: reverse KL and the generalised Jensen-Shannon divergence.

Notation as in `shared.losses`: s the student's logits [C], q = softmax(s / T) the student's distribution and p the
teacher's, both at temperature T. Each is scaled by T², as `soft_kl` is, so that `alpha` weighs it against the hard
term at any T. Both need the teacher's whole distribution: a cache's dense targets, or targets re-derived from its
member logits (a sparse cache without them is refused, with the remedy, when the run is planned).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from student_train.terms import LogitTerm, Teacher, register

DEFAULT_BETA = 0.5  # `--loss jsd` without a β: the symmetric Jensen-Shannon divergence.


def _kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
  """`KL(a || b) = Σ_c a_c (log a_c − log b_c)` over the last axis, from log-probabilities."""
  return jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)


def reverse_kl(student_logits: jax.Array, target_log_probs: jax.Array, temperature) -> jax.Array:
  """`T² · KL(q || p) = T² · Σ_c q_c (log q_c − log p_c)`, the reverse (mode-seeking) KL.

  Forward KL (`soft_kl`) weighs the classes by the teacher's mass, so the student must cover every class the teacher
  gives mass to; reverse KL weighs them by the student's, so it may concentrate on the teacher's main modes (Gu et
  al. 2024, "MiniLLM"). Its gradient is `T · q_j (log q_j − log p_j − KL(q || p))`.

  Args:
    student_logits: [..., C].
    target_log_probs: [..., C] the teacher's log-probabilities at T (finite).
    temperature: T > 0 (a float or a traced scalar).

  Returns:
    [...] T²-scaled reverse KL in nats.
  """
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return temperature ** 2 * _kl(student, target_log_probs.astype(jnp.float32))


def generalized_jsd(student_logits: jax.Array, target_log_probs: jax.Array, beta, temperature) -> jax.Array:
  """`T² · JSD_β(p || q)`, the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1):

      m = β·p + (1 − β)·q,    JSD_β = β·KL(p || m) + (1 − β)·KL(q || m),

  with TRL's `GKDTrainer.generalized_jsd_loss` convention: β weighs the teacher in the mixture and its KL to it,
  and the ends are the two KLs, `JSD_0 = KL(p || q)` (forward, `soft_kl`) and `JSD_1 = KL(q || p)` (reverse,
  `reverse_kl`). In between, `m ≥ β·p` and `m ≥ (1 − β)·q` bound it by the binary entropy of β,
  `JSD_β ≤ −β log β − (1 − β) log(1 − β) ≤ log 2` (finite where a KL is not), and β = 0.5 is the symmetric
  Jensen-Shannon divergence. The ends are limits of the scaled divergence, not of JSD_β itself (which tends to 0 at
  both ends): `JSD_β / β → KL(p || q)` as β → 0 and `JSD_β / (1 − β) → KL(q || p)` as β → 1; hence TRL's ends.
  (axolotl's `kd_beta` loss swaps the mixture's weights, `m = β·q + (1 − β)·p`; the two agree at β = 0.5.)

  Args:
    student_logits: [..., C].
    target_log_probs: [..., C] the teacher's log-probabilities at T (finite).
    beta: β in [0, 1] (a float or a traced scalar).
    temperature: T > 0 (a float or a traced scalar).

  Returns:
    [...] the T²-scaled divergence in nats.
  """
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  teacher = target_log_probs.astype(jnp.float32)
  inside = (beta > 0) & (beta < 1)
  # At the ends log β or log(1 − β) is −inf: the mixture is computed at a β inside, and that branch not selected
  # (its gradient is then 0, not 0 × ∞).
  b = jnp.where(inside, beta, 0.5)
  mixture = jnp.logaddexp(teacher + jnp.log(b), student + jnp.log1p(-b))
  jsd = b * _kl(teacher, mixture) + (1 - b) * _kl(student, mixture)
  ends = jnp.where(beta == 0, _kl(teacher, student), _kl(student, teacher))
  return temperature ** 2 * jnp.where(inside, jsd, ends)


@register
class ReverseKL(LogitTerm):
  """`reverse_kl`, on the teacher's dense distribution."""

  name = "reverse-kl"
  description = "T²·KL(softmax(s/T) || p_T), mode-seeking (needs dense targets or member logits)"
  stored = ("dense",)  # The whole distribution: a sparse cache's targets do not serve it.

  def loss(self, student_logits: jax.Array, teacher: Teacher, temperature, settings) -> jax.Array:
    return reverse_kl(student_logits, teacher.log_probs, temperature)


@struct.dataclass
class JSDSettings:
  """A `jsd` student's settings, traced per student: students of one group that differ in β share a compilation.

  Attributes:
    beta: float32 β in [0, 1].
  """

  beta: np.ndarray


@register
class JSD(LogitTerm):
  """`generalized_jsd` with a β of its own (`--loss jsd:BETA`), on the teacher's dense distribution."""

  name = "jsd"
  argument = "[:β]"
  description = (f"T²·generalised Jensen-Shannon divergence with β in [0, 1] (default {DEFAULT_BETA}; as TRL's GKD): "
                 "β·KL(p_T||m) + (1−β)·KL(q_T||m), m = β·p_T + (1−β)·q_T, q_T = softmax(s/T), which vanishes as β "
                 "goes to 0 or 1, so β=0 is defined as the forward KL and β=1 as the reverse, as TRL does (axolotl's "
                 "kd_beta swaps the mixture's weights); needs dense targets or member logits")
  stored = ("dense",)

  def parse(self, argument: str | None) -> JSDSettings:
    if argument is None:
      return JSDSettings(beta=np.float32(DEFAULT_BETA))
    try:
      beta = float(argument)
    except ValueError:
      beta = None
    if beta is None or not 0.0 <= beta <= 1.0:  # NaN too.
      raise ValueError(f"jsd takes β in [0, 1] as jsd:BETA (e.g. jsd:0.1), not {argument!r}")
    return JSDSettings(beta=np.float32(beta))

  def loss(self, student_logits: jax.Array, teacher: Teacher, temperature, settings: JSDSettings) -> jax.Array:
    return generalized_jsd(student_logits, teacher.log_probs, settings.beta, temperature)
