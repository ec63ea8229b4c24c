"""Logit KD (Hinton et al. 2015): T²·KL on dense, top-k or sampled targets, and logit MSE, its high-T limit.

The maths is in `shared.losses` (`soft_kl`, `topk_kl`, `sampled_kl`, `logit_mse`), tested there against NumPy.
"""

import jax
import jax.numpy as jnp

from shared.cache import TARGET_KINDS
from shared.losses import logit_mse, sampled_kl, soft_kl, topk_kl
from student_train.terms import LogitTerm, Teacher, register


@register
class KL(LogitTerm):
  """`T² · KL(p_T || softmax(s / T))`: on dense targets `soft_kl`; on a sparse cache's stored targets `topk_kl` (the
  K stored classes and a bin of the rest) or `sampled_kl` (an unbiased estimate from the drawn classes)."""

  name = "kl"
  description = "T²·KL(p_T || softmax(s/T)) (top-k or sampled KL on a sparse cache's targets)"
  stored = TARGET_KINDS  # Every kind of stored targets: dense, top-k and sampled.

  def serves(self, teacher: Teacher) -> bool:
    return teacher.log_probs is not None or teacher.sparse is not None

  def loss(self, student_logits: jax.Array, teacher: Teacher, temperature, settings) -> jax.Array:
    sparse, use_sparse = teacher.sparse, teacher.use_sparse
    if sparse is not None and (teacher.log_probs is None or use_sparse is True):
      return _sparse_kl(student_logits, sparse, temperature)
    dense = soft_kl(student_logits, teacher.log_probs, temperature)
    if sparse is None or use_sparse is False:
      return dense
    return jnp.where(use_sparse, _sparse_kl(student_logits, sparse, temperature), dense)


def _sparse_kl(student_logits: jax.Array, sparse: dict, temperature) -> jax.Array:
  """`topk_kl` or `sampled_kl` of a sparse cache's stored targets (see `Teacher.sparse`)."""
  if "counts" in sparse:
    return sampled_kl(student_logits, sparse["ids"], sparse["counts"], sparse["log_probs"], temperature)
  return topk_kl(student_logits, sparse["ids"], sparse["log_probs"], sparse["log_rest"], temperature)


@register
class MSE(LogitTerm):
  """`logit_mse` of the members' mean logits: T²·KL's high-temperature limit, the same at any T."""

  name = "mse"
  description = "its high-T limit (1/2C)·||zero-meaned logits difference||², against the members' mean logits"

  def serves(self, teacher: Teacher) -> bool:
    return teacher.logits is not None

  def loss(self, student_logits: jax.Array, teacher: Teacher, temperature, settings) -> jax.Array:
    return logit_mse(student_logits, teacher.logits)
