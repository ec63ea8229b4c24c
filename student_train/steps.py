"""The training and evaluation steps: pure functions of (state, batch), jitted once, state buffers donated.

The state is `nnx.state((model, optimizer))`; each step merges it with the graph definition made by one
`nnx.split`. Dropout draws from `fold_in(key, step)`, so a resumed run draws what an uninterrupted one does.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from shared.data import Normalization
from shared.ensemble import combine_log_probs
from shared.losses import distillation_loss, hard_cross_entropy, logit_mse, soft_kl
from shared.parallel import batch_sharding, replicated


@dataclasses.dataclass(frozen=True, kw_only=True)
class Teaching:
  """Where a step's soft targets come from (None of it in hard-label training).

  Attributes:
    loss: "kl" or "mse".
    temperature: T of the soft term.
    combine: ensemble rule used when re-deriving targets.
    members: member indices used when re-deriving (a subset of the cache's members).
    stored_targets: use the cache's `targets` as stored (its T, rule and members equal ours); otherwise re-derive
      them from `member_logits` inside the step.
  """

  loss: str
  temperature: float
  combine: str
  members: tuple[int, ...]
  stored_targets: bool

  @property
  def fields(self) -> tuple[str, ...]:
    """The cache arrays a batch needs."""
    return ("targets",) if self.stored_targets else ("member_logits",)

  def targets(self, batch: dict) -> dict:
    """Soft-term inputs for `distillation_loss`: target log-probs [B, C] or mean teacher logits [B, C]."""
    if self.stored_targets:
      return {"target_log_probs": batch["targets"].astype(jnp.float32)}
    member_logits = batch["member_logits"][:, jnp.asarray(self.members)]
    if self.loss == "mse":
      return {"teacher_logits": jnp.mean(member_logits.astype(jnp.float32), axis=1)}
    return {"target_log_probs": combine_log_probs(member_logits, self.temperature, self.combine)}


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _optimizer_step(model, optimizer, loss_fn, batch: dict, teacher_scores: jax.Array | None) -> dict:
  """Applies one update of `loss_fn(model) -> (loss, (logits, hard [B], soft [B]))`; returns the step's metrics.

  `teacher_scores` [B, C] (target log-probs or teacher logits) adds the top-1 agreement with the teacher.
  """
  mask = batch["mask"]
  (loss, (logits, hard, soft)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  labelled = mask * (batch["labels"] >= 0)
  metrics = {"loss": loss, "hard_ce": _masked_mean(hard, labelled), "soft": _masked_mean(soft, mask),
             "train_accuracy": _masked_mean(jnp.argmax(logits, -1) == batch["labels"], labelled),
             "rows": jnp.sum(mask)}
  if teacher_scores is not None:
    metrics["teacher_agreement"] = _masked_mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_scores, -1), mask)
  return metrics


def train_step_fn(graphdef, normalization: Normalization, teaching: Teaching | None, key: jax.Array):
  """The pure step `(state, batch, alpha) -> (state, metrics)` (see `make_train_step`)."""

  def train_step(state, batch, alpha):
    model, optimizer = nnx.merge(graphdef, state)
    nnx.reseed(model, default=jax.random.fold_in(key, optimizer.step[...]))
    soft_inputs = teaching.targets(batch) if teaching else {}
    mask = batch["mask"]

    def loss_fn(model):
      logits = model(normalization.apply(batch["x"]))
      if teaching is None:
        hard = hard_cross_entropy(logits, batch["labels"])
        return _masked_mean(hard, mask), (logits, hard, jnp.zeros_like(hard))
      total, hard, soft = distillation_loss(logits, batch["labels"], alpha, loss=teaching.loss,
                                            temperature=teaching.temperature, **soft_inputs)
      return _masked_mean(total, mask), (logits, hard, soft)

    teacher_scores = soft_inputs.get("target_log_probs", soft_inputs.get("teacher_logits")) if teaching else None
    metrics = _optimizer_step(model, optimizer, loss_fn, batch, teacher_scores)
    return nnx.state((model, optimizer)), metrics

  return train_step


def make_train_step(graphdef, normalization: Normalization, teaching: Teaching | None, key: jax.Array, mesh):
  """Builds the jitted step `(state, batch, alpha) -> (state, metrics)`.

  Args:
    graphdef: from `nnx.split((model, optimizer))`.
    normalization: input normalisation of the model.
    teaching: soft-target settings, or None for hard labels only.
    key: base PRNG key; the step's dropout key is `fold_in(key, optimizer step)`.
    mesh: data-parallel mesh; batches are split along it, the state replicated.

  Returns:
    The jitted step. `alpha` is a traced scalar so distillation and fine-tuning share one compilation.
  """
  train_step = train_step_fn(graphdef, normalization, teaching, key)
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(replicated(mesh), batch_sharding(mesh), replicated(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)))


def make_predict(graphdef, normalization: Normalization, mesh):
  """Jitted `(state, x) -> log-probabilities [B, C]` of the model in eval mode (no dropout)."""

  def predict(state, x):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return jax.nn.log_softmax(model(normalization.apply(x)).astype(jnp.float32), axis=-1)

  return jax.jit(predict, in_shardings=(replicated(mesh), batch_sharding(mesh)), out_shardings=batch_sharding(mesh))


def weighted_soft_targets(member_logits: jax.Array, temperature: jax.Array, member_weights: jax.Array,
                          geometric: jax.Array) -> jax.Array:
  """Ensemble log-probabilities with traced settings, for students that differ in T, rule and members.

  With weights `1/|S|` on a member subset S this is `combine_log_probs` of that subset: AM
  `log Σ_m w_m softmax(z_m / T)`, GM `log_softmax(Σ_m w_m z_m / T)`.

  Args:
    member_logits: [B, M, C].
    temperature: scalar T > 0.
    member_weights: [M], non-negative, summing to 1 (0 drops a member).
    geometric: scalar bool, GM if true else AM.

  Returns:
    float32 [B, C] log-probabilities.
  """
  scaled = member_logits.astype(jnp.float32) / temperature
  arithmetic = jax.nn.logsumexp(jax.nn.log_softmax(scaled, axis=-1) + jnp.log(member_weights)[None, :, None], axis=1)
  geometric_mean = jax.nn.log_softmax(jnp.sum(member_weights[None, :, None] * scaled, axis=1), axis=-1)
  return jnp.where(geometric, geometric_mean, arithmetic)


def make_multi_train_step(graphdef, normalization: Normalization, mesh):
  """K students of one architecture in one jitted step, `jax.vmap`ped over their stacked states.

  The step is `(states, batch, hypers) -> (states, metrics)`: `states` stacks K `nnx.state((model, optimizer))`
  along axis 0, the batch (with `member_logits`) is shared, and `hypers` holds per-student arrays [K]:
  "temperature", "alpha", "geometric" (bool), "mse" (bool), "key" (PRNG keys) and "member_weights" [K, M].
  Each student computes what `make_train_step` computes for its settings (targets always re-derived).
  """

  def one_student(state, batch, hyper):
    model, optimizer = nnx.merge(graphdef, state)
    nnx.reseed(model, default=jax.random.fold_in(hyper["key"], optimizer.step[...]))
    weights = hyper["member_weights"]
    targets = weighted_soft_targets(batch["member_logits"], hyper["temperature"], weights, hyper["geometric"])
    teacher_logits = jnp.sum(weights[None, :, None] * batch["member_logits"].astype(jnp.float32), axis=1)
    mask, alpha = batch["mask"], hyper["alpha"]

    def loss_fn(model):
      logits = model(normalization.apply(batch["x"]))
      hard = hard_cross_entropy(logits, jnp.maximum(batch["labels"], 0))
      soft = jnp.where(hyper["mse"], logit_mse(logits, teacher_logits),
                       soft_kl(logits, targets, hyper["temperature"]))
      return _masked_mean(alpha * hard + (1.0 - alpha) * soft, mask), (logits, hard, soft)

    teacher_scores = jnp.where(hyper["mse"], teacher_logits, targets)
    metrics = _optimizer_step(model, optimizer, loss_fn, batch, teacher_scores)
    return nnx.state((model, optimizer)), metrics

  return jax.jit(jax.vmap(one_student, in_axes=(0, None, 0)), donate_argnums=0,
                 in_shardings=(replicated(mesh), batch_sharding(mesh), replicated(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)))


def stack_states(states: list) -> object:
  """Stacks K states (same structure) along a new leading axis, for `make_multi_train_step`."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def unstack_state(states, index: int) -> object:
  """Student `index` of stacked states."""
  return jax.tree.map(lambda leaf: leaf[index], states)
