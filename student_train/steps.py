"""The training and evaluation steps: pure functions of (states, batch), jitted once, state buffers donated.

Every run trains through the same step: K students of one architecture, `jax.vmap`ped over their stacked states
(`nnx.state((model, optimizer))` stacked along axis 0) and their per-student settings; a single run is a group of
one. Dropout draws from `fold_in(key, step)`, so a resumed run draws what an uninterrupted one does.

What a batch holds decides, statically, what the step computes: the cache's stored soft targets (`targets`, or a
sparse cache's `target_*` arrays) and/or `member_logits` (to re-derive targets at another T, rule or member subset,
and for the logit-MSE loss); neither for hard-label training. Per student, `use_stored` picks the stored targets
when both are present.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shared.data import Normalization
from shared.ensemble import ensemble_log_probs, mean_logits
from shared.losses import distillation_loss, masked_mean
from shared.parallel import batch_sharding, replicated
from student_train.features import FeatureTerm, feature_losses, student_of

# Per-student switches that pick what the step computes. When every student of a group agrees on one, it is
# passed as a Python bool, so the step computes only that branch; otherwise it is traced and both are computed.
FLAGS = ("geometric", "mse", "use_stored")


SPARSE_ARRAYS = {"target_ids": "ids", "target_log_probs": "log_probs", "target_rest": "log_rest",
                 "target_counts": "counts"}  # A sparse cache's arrays, as `shared.losses.sparse_kl` names them.


def sparse_targets(batch: dict) -> dict | None:
  """A sparse cache's stored targets in the batch, named for `shared.losses.sparse_kl`; None if it has none."""
  return {key: batch[name] for name, key in SPARSE_ARRAYS.items() if name in batch} or None


def _teacher_top1(targets: jax.Array | None, sparse: dict | None, use_stored) -> jax.Array | None:
  """The teacher's predicted class per row [B]: argmax of the dense targets, or the most probable stored sparse id
  (with sampled targets, the most probable class drawn)."""
  dense = None if targets is None else jnp.argmax(targets, -1)
  if sparse is None:
    return dense
  top = jnp.take_along_axis(sparse["ids"], jnp.argmax(sparse["log_probs"], -1)[..., None], -1)[..., 0]
  if dense is None or use_stored is True:
    return top
  return dense if use_stored is False else jnp.where(use_stored, top, dense)


def soft_targets(batch: dict, hyper: dict) -> tuple[jax.Array | None, jax.Array | None]:
  """One student's soft-term inputs from a batch: `(target log-probs [B, C] at its T, mean teacher logits [B, C])`.

  Stored targets are used as stored (`use_stored`, when the student's T, rule and members are the cache's);
  otherwise targets are re-derived from `member_logits` with the student's settings. Either may be None when the
  batch lacks the arrays for it (`(None, None)` for hard-label training).
  """
  derived = teacher_logits = None
  if "member_logits" in batch:
    weights = hyper["member_weights"]
    derived = ensemble_log_probs(batch["member_logits"], hyper["temperature"], geometric=hyper["geometric"],
                                 weights=weights)
    teacher_logits = mean_logits(batch["member_logits"], weights)
  if "targets" not in batch:
    return derived, teacher_logits
  stored = batch["targets"].astype(jnp.float32)
  if derived is None or hyper["use_stored"] is True:
    return stored, teacher_logits
  if hyper["use_stored"] is False:
    return derived, teacher_logits
  return jnp.where(hyper["use_stored"], stored, derived), teacher_logits


def static_flags(hypers: dict) -> dict[str, bool]:
  """The `FLAGS` every student of stacked `hypers` agrees on, as Python bools (see `train_step_fn`)."""
  return {name: bool(np.asarray(hypers[name]).flat[0]) for name in FLAGS
          if name in hypers and np.all(np.asarray(hypers[name]) == np.asarray(hypers[name]).flat[0])}


def _update_with_one_of(trainable: nnx.Module, grads, first: nnx.Optimizer, second: nnx.Optimizer,
                        use_first: jax.Array) -> None:
  """Updates `trainable` with optimizer `first` where `use_first` (traced), else with `second`; the other's state
  is left as it was. FitNets' two stages are two trainings: stage 2 starts with fresh moments and step count (its
  own schedule), not with those of layers that the hint alone never reached."""
  snapshot = lambda tree: jax.tree.map(lambda leaf: leaf, tree)  # noqa: E731
  params = snapshot(nnx.state(trainable, nnx.Param))
  first_state, second_state = snapshot(nnx.state(first)), snapshot(nnx.state(second))
  first.update(trainable, grads)
  by_first, first_updated = snapshot(nnx.state(trainable, nnx.Param)), snapshot(nnx.state(first))
  nnx.update(trainable, params)
  second.update(trainable, grads)
  pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(use_first, x, y), a, b)  # noqa: E731
  nnx.update(trainable, pick(by_first, nnx.state(trainable, nnx.Param)))
  nnx.update(first, pick(first_updated, first_state))
  nnx.update(second, pick(second_state, nnx.state(second)))


def train_step_fn(graphdef, normalization: Normalization, fixed: dict[str, bool] | None = None,
                  terms: tuple[FeatureTerm, ...] = ()):
  """The pure step `(states, batch, hypers) -> (states, metrics)` before jitting (see `make_train_step`).

  `fixed` holds the `FLAGS` the whole group agrees on (`static_flags`): they replace the traced values, so the
  step computes one ensemble rule, one loss and one target source when that is all the group needs. `terms` are
  the group's feature losses (`student_train.features`), which add to the logit loss with their weights.
  """

  def one_student(state, batch, hyper):
    hyper = {**hyper, **(fixed or {})}
    trainable, optimizer, *hint_stage = nnx.merge(graphdef, state)
    steps_taken = optimizer.step[...] + (hint_stage[0].step[...] if hint_stage else 0)  # Each counts its stage's.
    nnx.reseed(trainable, default=jax.random.fold_in(hyper["key"], steps_taken))
    targets, teacher_logits = soft_targets(batch, hyper)
    sparse = sparse_targets(batch)
    mask = batch["mask"]

    def loss_fn(trainable):
      x = normalization.apply(batch["x"])
      logits, named = student_of(trainable).features(x) if terms else (student_of(trainable)(x), {})
      total, hard, soft = distillation_loss(logits, batch["labels"], hyper["alpha"], temperature=hyper["temperature"],
                                            target_log_probs=targets, teacher_logits=teacher_logits,
                                            mse=hyper["mse"] if teacher_logits is not None else False,
                                            sparse=sparse, use_sparse=hyper["use_stored"])
      loss = masked_mean(total, mask)
      features = feature_losses(terms, named, batch, mask, trainable)
      if features:
        weighted = sum(hyper[f"{name}_weight"] * value for name, value in features.items())
        # Stage 1 trains on the hint alone, unweighted: its weight is the hint's share beside the logit loss after.
        loss = jnp.where(hyper["hint_only"], features.get("hint", 0.0), loss + hyper["features_on"] * weighted)
      return loss, (logits, hard, soft, features)

    (loss, (logits, hard, soft, features)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(trainable)
    if hint_stage:
      _update_with_one_of(trainable, grads, hint_stage[0], optimizer, hyper["hint_only"])
    else:
      optimizer.update(trainable, grads)
    labelled = mask * (batch["labels"] >= 0)
    predicted = jnp.argmax(logits, -1)
    metrics = {"loss": loss, "hard_ce": masked_mean(hard, labelled), "soft": masked_mean(soft, mask),
               "train_accuracy": masked_mean(predicted == batch["labels"], labelled), "rows": jnp.sum(mask),
               **features}
    teacher_top1 = _teacher_top1(targets, sparse, hyper["use_stored"])
    if teacher_top1 is not None:
      metrics["teacher_agreement"] = masked_mean(predicted == teacher_top1, mask)
    return nnx.state((trainable, optimizer, *hint_stage)), metrics

  return jax.vmap(one_student, in_axes=(0, None, 0))


def make_train_step(graphdef, normalization: Normalization, mesh, fixed: dict[str, bool] | None = None,
                    terms: tuple[FeatureTerm, ...] = ()):
  """Builds the jitted step `(states, batch, hypers) -> (states, metrics)` for K students trained together.

  Args:
    graphdef: from `nnx.split((trainable, optimizer))` of one student (all share it): the model (or a
      `features.Distilled` with hints' regressors), and with `--hint-epochs` a stage-1 optimizer after the other.
    normalization: input normalisation of the students.
    mesh: data-parallel mesh; batches are split along it, states replicated.
    fixed: the flags the group agrees on, from `static_flags(hypers)` (see `train_step_fn`).
    terms: the group's feature losses.

  Returns:
    The step. `states` stacks K states along axis 0, the batch is shared (`x`, `labels` int32 [B] with -1 for
    none, `mask` float32 [B], and optionally `targets` [B, C] / `member_logits` [B, M, C]), and `hypers` holds per
    student (leading axis K): "key" (PRNG key), "alpha", "temperature", "geometric" (bool), "mse" (bool),
    "member_weights" [K, M], "use_stored" (bool), the feature losses' "hint_weight", "attention_weight" and
    "similarity_weight", and per epoch "hint_only" (bool: the hint loss alone) and "features_on" (0 while
    fine-tuning). The batch then holds the terms' teacher features too. Metrics are per student, [K]: "loss",
    "hard_ce", "soft", "train_accuracy", "rows", with soft targets "teacher_agreement", and each feature loss
    ("hint", "attention", "similarity"), unweighted. `alpha` and every setting are traced, so
    distillation and fine-tuning, and any mix of settings, share one compilation.
  """

  return jax.jit(train_step_fn(graphdef, normalization, fixed, terms), donate_argnums=0,
                 in_shardings=(replicated(mesh), batch_sharding(mesh), replicated(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)))


def make_predict(graphdef, normalization: Normalization, mesh):
  """Jitted `(states, x) -> log-probabilities [K, B, C]` of K stacked students in eval mode (no dropout).

  The output is replicated, so that each process of a job can read the whole batch's (one all-gather of [K, B, C]
  per batch, small beside the forward pass)."""

  def predict(state, x):
    model = student_of(nnx.merge(graphdef, state)[0])
    model.eval()
    return jax.nn.log_softmax(model(normalization.apply(x)).astype(jnp.float32), axis=-1)

  return jax.jit(jax.vmap(predict, in_axes=(0, None)), in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=replicated(mesh))


def stack_hypers(hypers: list[dict], seeds: list[int]) -> dict:
  """K students' step settings (each a dict of the `HYPERS` but "key") stacked, with PRNG keys from their seeds."""
  stacked = {name: np.stack([h[name] for h in hypers]) for name in hypers[0]}
  stacked["key"] = jnp.stack([jax.random.key(seed) for seed in seeds])
  return stacked


def stack_states(states: list) -> object:
  """Stacks K states (same structure) along a new leading axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def unstack_state(states, index: int) -> object:
  """Student `index` of stacked states."""
  return jax.tree.map(lambda leaf: leaf[index], states)
