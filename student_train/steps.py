"""The training and evaluation steps: pure functions of (states, batch), jitted once, state buffers donated.

Every run trains through the same step: K students of one architecture, `jax.vmap`ped over their stacked states
(`nnx.state((model, optimizer))` stacked along axis 0) and their per-student settings; a single run is a group of
one. Dropout draws from `fold_in(key, step)`, so a resumed run draws what an uninterrupted one does. With
`--steps-per-call N` a call runs that same step N times over N stacked batches (`train_call_fn`, a `lax.scan`).

What a batch holds decides, statically, what the step computes: the cache's stored soft targets (`targets`, or a
sparse cache's `target_*` arrays) and/or `member_logits` (to re-derive targets at another T, rule or member subset,
and for logit terms that the stored targets do not serve); neither for hard-label training. Per student,
`use_stored` picks the stored targets when both are present. The loss is the weighted sum of the registered
distillation terms the run uses (`student_train.terms`): its logit term beside the hard labels, and its feature
terms.

BatchNorm: in the step each student normalises with the statistics of the batch's real rows (the padding rows that
`mask` marks are left out, for a model that takes the mask: `shared.models.takes_row_mask`), over the whole global
batch on a mesh (the batch is one array split over the devices, so XLA reduces across them), and updates its own
running averages, part of its state; `make_predict` normalises with the running averages.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from shared.augment import MIX_LABELS, MIX_LAMBDA
from shared.data import Normalization
from shared.ensemble import ensemble_log_probs, mean_logits
from shared.losses import masked_mean
from shared.models import row_mask_of
from shared.parallel import batch_sharding, replicated
from shared.render import with_inputs
from student_train.terms import FEATURE_LOSSES, LOSS_NAMES, Teacher, distillation_loss, loss_settings
from student_train.terms.features import FeatureTerm, feature_losses, student_of


def switch(default):
  """A field of `Hypers` that picks what the step computes. When every student of a group holds one value of it,
  that value is fixed when the step is traced (a Python value: only its branch is computed); otherwise it is traced
  and every branch the group holds is computed (see `group_switches`)."""
  return struct.field(default=default, metadata={"switch": True})


@struct.dataclass
class Hypers:
  """One student's settings for the step. Stacked for a group (`stack_hypers`), every leaf has a leading axis K.
  The defaults are a hard-label student's (of the KL loss, `--loss`'s default); a run's come from
  `student_train.plan.RunPlan.hypers`.

  Attributes:
    member_weights: float32 [M] the ensemble members' weights (0 for those left out).
    alpha: float32, the weight of the hard-label cross-entropy (1 while fine-tuning).
    temperature: float32, T of the soft term.
    geometric: bool switch: the geometric ensemble rule for re-derived targets (else arithmetic).
    use_stored: bool switch: learn the cache's stored targets (else targets re-derived from member logits).
    loss: int32 switch: its logit term, an index into `student_train.terms.LOGIT_TERMS`.
    loss_settings: every logit term's settings in `LOGIT_TERMS` order (`student_train.terms.loss_settings`): its own
      term's from `--loss`, the others' defaults. Traced: students that differ in them share one compilation.
    feature_weights: float32 per feature family of `student_train.terms.FEATURE_LOSSES` (`--hint-weight`, ...).
    hint_only: bool, set per epoch: FitNets' stage 1, the hint loss alone.
    features_on: float32, set per epoch: 0 while fine-tuning (no feature loss), else 1.
    key: its dropout's PRNG key (`stack_hypers` adds it from the seed).
  """

  member_weights: np.ndarray
  alpha: np.ndarray = np.float32(1.0)
  temperature: np.ndarray = np.float32(1.0)
  geometric: np.ndarray = switch(np.bool_(False))
  use_stored: np.ndarray = switch(np.bool_(False))
  loss: np.ndarray = switch(np.int32(LOSS_NAMES.index("kl")))
  loss_settings: tuple = struct.field(default_factory=loss_settings)
  feature_weights: tuple = tuple(np.float32(0.0) for _ in FEATURE_LOSSES)
  hint_only: np.ndarray = np.bool_(False)
  features_on: np.ndarray = np.float32(1.0)
  key: jax.Array | None = None


SWITCHES = tuple(f.name for f in dataclasses.fields(Hypers) if f.metadata.get("switch"))


def group_switches(hypers: Hypers) -> dict[str, tuple]:
  """The values each switch of stacked `hypers` takes over the group's students, as Python values (see
  `train_step_fn`): one value fixes the switch when the step is traced."""
  return {name: tuple(np.unique(np.asarray(getattr(hypers, name))).tolist()) for name in SWITCHES}


SPARSE_ARRAYS = {"target_ids": "ids", "target_log_probs": "log_probs", "target_rest": "log_rest",
                 "target_counts": "counts"}  # A sparse cache's arrays, as `Teacher.sparse` names them.


def sparse_targets(batch: dict) -> dict | None:
  """A sparse cache's stored targets in the batch, named as `Teacher.sparse` names them; None if it has none."""
  return {key: batch[name] for name, key in SPARSE_ARRAYS.items() if name in batch} or None


def _teacher_top1(teacher: Teacher) -> jax.Array | None:
  """The teacher's predicted class per row [B]: argmax of the dense targets, or the most probable stored sparse id
  (with sampled targets, the most probable class drawn)."""
  targets, sparse, use_stored = teacher.log_probs, teacher.sparse, teacher.use_sparse
  dense = None if targets is None else jnp.argmax(targets, -1)
  if sparse is None:
    return dense
  top = jnp.take_along_axis(sparse["ids"], jnp.argmax(sparse["log_probs"], -1)[..., None], -1)[..., 0]
  if dense is None or use_stored is True:
    return top
  return dense if use_stored is False else jnp.where(use_stored, top, dense)


def soft_targets(batch: dict, hyper: Hypers) -> tuple[jax.Array | None, jax.Array | None]:
  """One student's dense teacher inputs from a batch: `(target log-probs [B, C] at its T, mean teacher logits
  [B, C])`.

  Stored targets are used as stored (`use_stored`, when the student's T, rule and members are the cache's);
  otherwise targets are re-derived from `member_logits` with the student's settings. Either may be None when the
  batch lacks the arrays for it (`(None, None)` for hard-label training).
  """
  derived = teacher_logits = None
  if "member_logits" in batch:
    weights = hyper.member_weights
    derived = ensemble_log_probs(batch["member_logits"], hyper.temperature, geometric=hyper.geometric,
                                 weights=weights)
    teacher_logits = mean_logits(batch["member_logits"], weights)
  if "targets" not in batch:
    return derived, teacher_logits
  stored = batch["targets"].astype(jnp.float32)
  if derived is None or hyper.use_stored is True:
    return stored, teacher_logits
  if hyper.use_stored is False:
    return derived, teacher_logits
  return jnp.where(hyper.use_stored, stored, derived), teacher_logits


def teacher_of(batch: dict, hyper: Hypers) -> Teacher:
  """What the batch gives one student's logit term: its dense targets and mean logits (`soft_targets`), and a
  sparse cache's stored targets, learned where `use_stored`."""
  log_probs, logits = soft_targets(batch, hyper)
  return Teacher(log_probs=log_probs, logits=logits, sparse=sparse_targets(batch), use_sparse=hyper.use_stored)


def example_mask(batch: dict) -> jax.Array:
  """What each loss and metric averages over: the batch's real rows (`mask` float32 [B], 0 for an epoch's padding
  rows), or for token rows (labels int32 [B, L], a language model's next tokens) each real row's positions that
  predict a next token (float32 [B, L]: 0 on padding, on a document's last token and on a row's last position)."""
  mask = batch["mask"]
  labels = batch["labels"]
  return mask if labels.ndim == 1 else mask[:, None] * (labels >= 0)


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


def train_step_fn(graphdef, normalization: Normalization, switches: dict[str, tuple] | None = None,
                  terms: tuple[FeatureTerm, ...] = (), image_size: int | None = None):
  """The pure step `(states, batch, hypers) -> (states, metrics)` before jitting (see `make_train_step`).

  `switches` holds the values the group's students take of each switch of `Hypers` (`group_switches`): a switch of
  one value replaces the traced one, so the step computes one ensemble rule, one logit term and one target source
  when that is all the group needs; a traced `loss` computes the terms the group holds. `terms` are the group's
  feature terms (`student_train.terms.features`), which add to the logit loss with their weights. A batch of
  canvases (`--renderer device`) has its views rendered first, at `image_size` (`shared.render.with_inputs`), once
  for the whole group.
  """
  switches = switches or {}
  fixed = {name: values[0] for name, values in switches.items() if len(values) == 1}
  candidates = switches.get("loss")

  def one_student(state, batch, hyper: Hypers):
    hyper = hyper.replace(**fixed)
    trainable, optimizer, *hint_stage = nnx.merge(graphdef, state)
    steps_taken = optimizer.step[...] + (hint_stage[0].step[...] if hint_stage else 0)  # Each counts its stage's.
    nnx.reseed(trainable, default=jax.random.fold_in(hyper.key, steps_taken))
    teacher = teacher_of(batch, hyper)
    mask = example_mask(batch)

    def loss_fn(trainable):
      x = normalization.apply(batch["x"])
      # BatchNorm's batch statistics leave the padding rows out (where the model takes the mask: `takes_row_mask`).
      forward = student_of(trainable).features if terms else student_of(trainable)
      out = forward(x, **row_mask_of(forward, mask))
      logits, named = out if terms else (out, {})
      # Whatever the model computes in (`--compute-dtype`), the losses' softmax and log-sum-exp are float32.
      logits = logits.astype(jnp.float32)
      # Mixed views (`--mix`): the hard term on the λ-mixed labels of the view and its partner.
      mix = (batch[MIX_LABELS], batch[MIX_LAMBDA]) if MIX_LABELS in batch else None
      total, hard, soft = distillation_loss(logits, batch["labels"], hyper.alpha, teacher,
                                            temperature=hyper.temperature, loss=hyper.loss,
                                            settings=hyper.loss_settings, candidates=candidates, mix=mix)
      loss = masked_mean(total, mask)
      features = feature_losses(terms, named, batch, mask, trainable)
      if features:
        weights = dict(zip((family.name for family in FEATURE_LOSSES), hyper.feature_weights))
        weighted = sum(weights[name] * value for name, value in features.items())
        # Stage 1 trains on the hint alone, unweighted: its weight is the hint's share beside the logit loss after.
        loss = jnp.where(hyper.hint_only, features.get("hint", 0.0), loss + hyper.features_on * weighted)
      return loss, (logits, hard, soft, features)

    (loss, (logits, hard, soft, features)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(trainable)
    if hint_stage:
      _update_with_one_of(trainable, grads, hint_stage[0], optimizer, hyper.hint_only)
    else:
      optimizer.update(trainable, grads)
    labelled = mask * (batch["labels"] >= 0)
    predicted = jnp.argmax(logits, -1)
    metrics = {"loss": loss, "hard_ce": masked_mean(hard, labelled), "soft": masked_mean(soft, mask),
               "train_accuracy": masked_mean(predicted == batch["labels"], labelled), "rows": jnp.sum(mask),
               **features}
    teacher_top1 = _teacher_top1(teacher)
    if teacher_top1 is not None:
      metrics["teacher_agreement"] = masked_mean(predicted == teacher_top1, mask)
    return nnx.state((trainable, optimizer, *hint_stage)), metrics

  students = jax.vmap(one_student, in_axes=(0, None, 0))

  def step(states, batch, hypers):
    return students(states, with_inputs(batch, image_size), hypers)

  return step


def train_call_fn(step, unroll: bool = False):
  """N steps in one call: `(states, batches, hypers) -> (states, metrics)`, a `jax.lax.scan` of the pure `step`
  (`train_step_fn`'s, the same function a call of one step runs) over `batches`, whose every array has a leading
  axis of N steps; the metrics are stacked per step, [N, K]. Each step reseeds dropout from its own step count
  (`fold_in(key, step)`), so N steps in one call draw what N calls of one step draw.

  Args:
    step: `(states, batch, hypers) -> (states, metrics [K])`, as `train_step_fn` returns it.
    unroll: the N steps as straight-line code rather than a loop (see `make_train_step`).

  Returns:
    `(states, batches, hypers) -> (states, metrics [N, K])`, each array of `batches` [N, B, ...].
  """

  def call(states, batches, hypers):
    return jax.lax.scan(lambda carried, batch: step(carried, batch, hypers), states, batches, unroll=unroll)

  return call


def stacked_batch_sharding(mesh) -> NamedSharding:
  """Where N stacked batches lie: the steps' axis whole on every device, each batch split as `batch_sharding`
  splits it."""
  return NamedSharding(mesh, PartitionSpec(None, *batch_sharding(mesh).spec))


def make_train_step(graphdef, normalization: Normalization, mesh, switches: dict[str, tuple] | None = None,
                    terms: tuple[FeatureTerm, ...] = (), state_shardings=None, image_size: int | None = None,
                    stacked: bool = False):
  """Builds the jitted step `(states, batch, hypers) -> (states, metrics)` for K students trained together.

  Args:
    graphdef: from `nnx.split((trainable, optimizer))` of one student (all share it): the model (or a
      `Distilled` with hints' regressors), and with `--hint-epochs` a stage-1 optimizer after the other.
    normalization: input normalisation of the students.
    mesh: data-parallel mesh; batches are split along it.
    switches: the values the group's students take of each switch, from `group_switches(hypers)` (see
      `train_step_fn`); None: every switch traced, and the logit term any that the batch serves.
    terms: the group's feature terms.
    state_shardings: where the stacked states lie on the mesh, a tree of `NamedSharding`s of their structure
      (`shared.parallel.weight_shardings` with `group_axes=1`); the updated states stay there. None: replicated.
    image_size: the side of device-rendered views (`Augmentation.image_size`), for batches of canvases.
    stacked: several steps per call (`--steps-per-call`, `train_call_fn`): every array of the batch, and every
      metric, has a leading axis of steps; a call of another number of steps (an epoch's remainder) compiles once
      more. On CPU devices the steps are unrolled: XLA:CPU runs a convolution inside a loop's body on a slow path
      (`cnn-small`, batch 256, 8 steps: 37 s as a loop against 3.5 s in 8 calls and 2.5 s unrolled, 2-core CPU),
      so its compilation grows with N there; elsewhere the call is a loop, compiled once for any N.

  Returns:
    The step. `states` stacks K states along axis 0, the batch is shared (`x`, `labels` int32 [B] with -1 for
    none, `mask` float32 [B], and optionally `targets` [B, C] / a sparse cache's `target_*` arrays /
    `member_logits` [B, M, C], and the feature terms' teacher features), and `hypers` is a `Hypers` stacked over the
    students (leading axis K); with the device renderer the batch holds `canvas`, `crop` and `flip` instead of `x`
    (`shared.render`); a batch of mixed views (`--mix`) holds `mix_lambda` float32 [B] and the partners'
    `mix_labels` int32 [B] for the hard-label term (and their canvases, with the device renderer). Metrics are per
    student, [K]: "loss", "hard_ce", "soft", "train_accuracy", "rows", with soft targets "teacher_agreement", and
    each feature family's loss ("hint", "attention", "similarity"), unweighted. A batch of token rows (labels
    [B, L], a language model's logits [B, L, V]) averages each over its predicting positions (`example_mask`):
    "train_accuracy" is per token, and "rows" counts the predicting positions (tokens), which weigh each step's
    means in the epoch's (the epoch line calls them `tokens`). `alpha` and every setting but the
    fixed switches are traced, so distillation and fine-tuning, and any mix of settings, share one compilation.
  """

  states = replicated(mesh) if state_shardings is None else state_shardings
  step = train_step_fn(graphdef, normalization, switches, terms, image_size)
  unroll = next(iter(mesh.devices.flat)).platform == "cpu"
  return jax.jit(train_call_fn(step, unroll) if stacked else step, donate_argnums=0,
                 in_shardings=(states, stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh),
                               replicated(mesh)),
                 out_shardings=(states, replicated(mesh)))


def make_predict(graphdef, normalization: Normalization, mesh, state_shardings=None):
  """Jitted `(states, x) -> log-probabilities [K, B, C]` of K stacked students in eval mode (no dropout), the
  states where `state_shardings` places them (see `make_train_step`); [K, B, L, V] for language models (per
  position, normalised over the vocabulary).

  The output is replicated, so that each process of a job can read the whole batch's (one all-gather of [K, B, C]
  per batch, small beside the forward pass)."""

  def predict(state, x):
    model = student_of(nnx.merge(graphdef, state)[0])
    model.eval()
    return jax.nn.log_softmax(model(normalization.apply(x)).astype(jnp.float32), axis=-1)

  states = replicated(mesh) if state_shardings is None else state_shardings
  return jax.jit(jax.vmap(predict, in_axes=(0, None)), in_shardings=(states, batch_sharding(mesh)),
                 out_shardings=replicated(mesh))


def stack_hypers(hypers: list[Hypers], seeds: list[int]) -> Hypers:
  """K students' step settings stacked along a new leading axis, with PRNG keys from their seeds."""
  stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *hypers)
  return stacked.replace(key=jnp.stack([jax.random.key(seed) for seed in seeds]))


def stack_states(states: list) -> object:
  """Stacks K states (same structure) along a new leading axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def unstack_state(states, index: int) -> object:
  """Student `index` of stacked states."""
  return jax.tree.map(lambda leaf: leaf[index], states)
