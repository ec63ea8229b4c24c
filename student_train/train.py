"""`student-train fit` and `student-train eval`: one trainer for teachers, scratch baselines and distilled students.

Without a cache, `fit` trains on hard labels from a dataset held in memory. With `--cache`, it streams the cache's
rows, rebuilds each row's input from the dataset the cache records (the same view the teacher labelled), and
trains on `alpha · CE + (1 − alpha) · soft`; `--finetune-epochs` then adds epochs on hard labels only.

A run dir holds config.json (resolved), metrics.jsonl (one line per epoch), final.json and orbax checkpoints
(every `--checkpoint-every` epochs and after the last). The same command on an existing run dir resumes from its
last checkpoint; a run killed and resumed ends with the parameters of an uninterrupted one.
"""

import dataclasses
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from shared import __version__
from shared.cache import Cache, open_cache
from shared.data import Normalization, TransferSet, open_transfer_set
from shared.ensemble import COMBINE_RULES, combine_log_probs
from shared.errors import StillroomError
from shared.losses import LOSSES
from shared.metrics import classification_metrics
from shared.models import ModelSpec, build_model, check_input_shape
from shared.parallel import batch_sharding, check_batch_size, data_mesh, pad_rows, replicated
from shared.runs import CONFIG_FILE, PARAMS_ITEM, Teacher, checkpoint_manager, load_run_teacher, load_teacher
from shared.augment import Augmentation, fold_of
from student_train.loader import ArrayLoader, CacheLoader
from student_train.steps import (Teaching, make_multi_train_step, make_predict, make_train_step, stack_states,
                                 unstack_state)

METRICS_FILE = "metrics.jsonl"
FINAL_FILE = "final.json"
STATE_ITEM, META_ITEM = "state", "meta"
DEFAULT_KD_ALPHA = 0.1  # Hinton et al. 2015 and the Keras example weight the hard term lightly.


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitConfig:
  """Settings of `student-train fit` (the CLI's defaults come from here). None means "resolved from the data"."""

  model: str = "mlp-small"
  out: str = ""
  dataset: str | None = None
  split: str = "train"
  data_dir: str | None = None
  cache: str | None = None
  loss: str = "kl"
  alpha: float | None = None  # Hard labels: 1. Cache: DEFAULT_KD_ALPHA, or 0 on an unlabeled cache.
  temperature: float | None = None  # Cache: the cache's T.
  combine: str | None = None  # Cache: the cache's rule.
  members: tuple[int, ...] | None = None  # Cache: all members.
  epochs: int = 20
  finetune_epochs: int = 0
  batch_size: int = 128
  lr: float = 3e-3
  finetune_lr: float | None = None  # Default: lr / 10.
  weight_decay: float = 1e-4
  dropout: float = 0.0
  augment: bool = False
  max_shift: int = 1
  flip: bool = False
  label_fraction: float = 1.0
  folds: int = 1  # Cross-fitting teachers: with --holdout-fold k, train without the examples of fold k.
  holdout_fold: int | None = None
  seed: int = 0
  data_seed: int | None = None  # Default: seed.
  eval_dataset: str | None = None  # Default: the training dataset, if it has a 'test' split.
  eval_split: str | None = None
  checkpoint_every: int = 1  # Epochs between checkpoints; the last epoch is always checkpointed.
  overwrite: bool = False
  progress: bool = True


# Settings that do not change what a run computes; a resumed run may differ in them.
_NOT_IDENTITY = ("overwrite", "progress", "data_dir", "checkpoint_every")


def _log(message: str) -> None:
  print(f"student-train: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
  """Everything a run needs, resolved from its config, its data and its cache."""

  config: FitConfig  # With every None resolved.
  transfer_set: TransferSet
  cache: Cache | None
  teaching: Teaching | None
  model_spec: ModelSpec
  normalization: Normalization
  examples: np.ndarray | None  # Label-fraction subset of example indices, or None for all.
  eval_set: TransferSet | None

  def record(self) -> dict:
    """The resolved config written to config.json (and compared on resume)."""
    return {
        "config": {k: v for k, v in dataclasses.asdict(self.config).items() if k not in _NOT_IDENTITY},
        "model": self.model_spec.to_dict(),
        "normalization": self.normalization.to_dict(),
        "dataset": self.transfer_set.describe(),
        "cache": None if self.cache is None else {
            "path": os.path.abspath(self.cache.path), "build_key": self.cache.spec.build_key()},
        "teaching": None if self.teaching is None else dataclasses.asdict(self.teaching),
        "eval": None if self.eval_set is None else {"dataset": self.eval_set.name, "split": self.eval_set.split,
                                                     "fingerprint": self.eval_set.fingerprint},
        "examples": None if self.examples is None else len(self.examples),
    }


def _check_ranges(config: FitConfig) -> None:
  if config.alpha is not None and not 0.0 <= config.alpha <= 1.0:
    raise StillroomError(f"--alpha must be in [0, 1], got {config.alpha}.")
  if config.temperature is not None and not config.temperature > 0:
    raise StillroomError(f"--temperature must be > 0, got {config.temperature}.")
  if config.loss not in LOSSES:
    raise StillroomError(f"unknown --loss {config.loss!r}; valid: {', '.join(LOSSES)}.")
  if config.combine is not None and config.combine not in COMBINE_RULES:
    raise StillroomError(f"unknown --combine {config.combine!r}; valid: {', '.join(COMBINE_RULES)}.")
  if not 0.0 < config.label_fraction <= 1.0:
    raise StillroomError(f"--label-fraction must be in (0, 1], got {config.label_fraction}.")
  if config.folds < 1 or (config.folds > 1) != (config.holdout_fold is not None) or (
      config.holdout_fold is not None and not 0 <= config.holdout_fold < config.folds):
    raise StillroomError(f"--folds {config.folds} --holdout-fold {config.holdout_fold}: give both, with the "
                         "held-out fold in 0..K-1 (or neither).")
  if config.checkpoint_every < 1:
    raise StillroomError(f"--checkpoint-every must be >= 1 epoch, got {config.checkpoint_every}.")
  if config.epochs < 0 or config.finetune_epochs < 0 or config.epochs + config.finetune_epochs < 1:
    raise StillroomError("--epochs and --finetune-epochs must be >= 0 with at least one epoch in all.")
  if not config.out:
    raise StillroomError("give --out RUN_DIR.")


def _plan(config: FitConfig) -> _Plan:
  _check_ranges(config)
  cache = teaching = None
  resolved: dict = {"data_seed": config.seed if config.data_seed is None else config.data_seed}
  if config.cache:
    cache = open_cache(config.cache)
    spec = cache.spec
    dataset, split = config.dataset or spec.dataset["name"], (config.split if config.dataset else
                                                              spec.dataset["split"])
    transfer_set = open_transfer_set(dataset, split, config.data_dir)
    if transfer_set.fingerprint != spec.dataset["fingerprint"]:
      raise StillroomError(
          f"dataset {dataset!r} split {split!r} (fingerprint {transfer_set.fingerprint[:16]}…) is not the data the "
          f"cache {config.cache!r} was built from ({spec.dataset['name']} {spec.dataset['split']}, fingerprint "
          f"{spec.dataset['fingerprint'][:16]}…).")
    if config.folds > 1:
      raise StillroomError("--folds/--holdout-fold select teacher training data; a cache brings its own rows.")
    members = tuple(range(spec.num_members)) if config.members is None else tuple(config.members)
    bad = [m for m in members if not 0 <= m < spec.num_members]
    if bad or not members or len(set(members)) != len(members):
      raise StillroomError(f"--members {list(members)}: give distinct indices in 0..{spec.num_members - 1} "
                           f"(the cache has {spec.num_members} members).")
    labeled = spec.dataset["labeled"]
    alpha = config.alpha if config.alpha is not None else (DEFAULT_KD_ALPHA if labeled else 0.0)
    if alpha > 0 and not labeled:
      raise StillroomError(f"--alpha {alpha} weights hard labels, but the cache {config.cache!r} is unlabeled; "
                           "use --alpha 0.")
    if config.finetune_epochs and not labeled:
      raise StillroomError("--finetune-epochs trains on hard labels, but the cache is unlabeled.")
    temperature = spec.temperature if config.temperature is None else float(config.temperature)
    combine = config.combine or spec.combine
    stored = (config.loss == "kl" and temperature == spec.temperature and combine == spec.combine
              and members == tuple(range(spec.num_members)))
    teaching = Teaching(loss=config.loss, temperature=temperature, combine=combine, members=members,
                        stored_targets=stored)
    num_classes = spec.num_classes
    resolved.update(dataset=dataset, split=split, alpha=alpha, temperature=temperature, combine=combine,
                    members=members)
  else:
    if not config.dataset:
      raise StillroomError("give --dataset (hard-label training) or --cache (distillation).")
    if config.alpha not in (None, 1.0):
      raise StillroomError(f"--alpha {config.alpha} mixes in soft targets, which need --cache.")
    transfer_set = open_transfer_set(config.dataset, config.split, config.data_dir)
    if not transfer_set.labeled:
      raise StillroomError(f"{config.dataset!r} {config.split!r} is unlabeled; hard-label training needs labels.")
    num_classes = transfer_set.num_classes
    resolved.update(alpha=1.0)
  if config.augment and len(transfer_set.input_shape) < 2:
    raise StillroomError(f"--augment needs image inputs; {transfer_set.name!r} holds flat vectors.")
  config = dataclasses.replace(config, **resolved, finetune_lr=config.finetune_lr or config.lr / 10)
  model_spec = ModelSpec(name=config.model, input_shape=transfer_set.input_shape, num_classes=num_classes,
                         dropout=config.dropout)
  abstract = nnx.eval_shape(lambda: build_model(model_spec))
  graphdef, params = nnx.split(abstract)
  check_input_shape(lambda p, x: nnx.merge(graphdef, p)(x), params, transfer_set.input_shape,
                    f"model {config.model!r}")
  examples = None
  if config.folds > 1:
    examples = transfer_set.indices[fold_of(transfer_set.indices, config.folds) != config.holdout_fold]
  if config.label_fraction < 1.0:
    pool = transfer_set.indices if examples is None else examples
    keep = max(1, round(config.label_fraction * len(pool)))
    examples = np.sort(np.random.default_rng(config.data_seed).choice(pool, keep, replace=False))
  eval_set = _eval_set(config, transfer_set)
  return _Plan(config=config, transfer_set=transfer_set, cache=cache, teaching=teaching, model_spec=model_spec,
               normalization=transfer_set.normalization, examples=examples, eval_set=eval_set)


def check_config(config: FitConfig) -> None:
  """Everything `fit` checks before training (data, cache, model, ranges), without training.

  Raises:
    StillroomError: as `fit` would.
  """
  _plan(config)


def _eval_set(config: FitConfig, transfer_set: TransferSet) -> TransferSet | None:
  if config.eval_dataset or config.eval_split:
    return open_transfer_set(config.eval_dataset or transfer_set.name, config.eval_split or "test", config.data_dir)
  try:
    return open_transfer_set(transfer_set.name, "test", config.data_dir)
  except StillroomError:
    return None  # No test split: no per-epoch evaluation unless asked for.


def _prepare_run_dir(plan: _Plan) -> bool:
  """Creates the run dir or checks that an existing one belongs to this command; True if it already finished."""
  out, record = plan.config.out, plan.record()
  path = os.path.join(out, CONFIG_FILE)
  if os.path.exists(out) and plan.config.overwrite:
    _log(f"--overwrite: removing {out}")
    shutil.rmtree(out)
  if os.path.exists(path):
    with open(path) as f:
      existing = json.load(f)
    differences = _differences(existing.get("resolved", {}), json.loads(json.dumps(record)))
    if differences:
      raise StillroomError(f"run dir {out!r} holds a run with another config:\n  " + "\n  ".join(differences)
                           + "\nPass --overwrite to replace it, or choose another --out.")
    return os.path.exists(os.path.join(out, FINAL_FILE))
  if os.path.exists(out) and os.listdir(out):
    raise StillroomError(f"--out {out!r} exists and is not a run dir; pass --overwrite or choose another --out.")
  os.makedirs(out, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"model": record["model"], "normalization": record["normalization"], "resolved": record,
               "software_version": __version__}, f, indent=2)
  os.replace(path + ".tmp", path)  # A kill never leaves half a config.
  return False


def _differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
  """`["config.lr: 0.003 (run dir) vs 0.01 (command)", ...]` for the leaves that differ."""
  lines = []
  for key in sorted(set(stored) | set(wanted)):
    a, b = stored.get(key), wanted.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      lines += _differences(a, b, f"{prefix}{key}.")
    elif a != b:
      lines.append(f"{prefix}{key}: {a} (run dir) vs {b} (command)")
  return lines


def _optimizer(config: FitConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """AdamW with a cosine decay over the distillation epochs, then another from `finetune_lr` over fine-tuning."""
  schedules = [optax.cosine_decay_schedule(config.lr, max(1, config.epochs * steps_per_epoch))]
  boundaries = []
  if config.finetune_epochs:
    schedules.append(optax.cosine_decay_schedule(config.finetune_lr, config.finetune_epochs * steps_per_epoch))
    boundaries.append(config.epochs * steps_per_epoch)
  schedule = optax.join_schedules(schedules, boundaries) if boundaries else schedules[0]
  return optax.adamw(schedule, weight_decay=config.weight_decay)


def _checkpointable(state) -> dict:
  """The state minus RNG streams (dropout keys are re-derived each step from fold_in(key, step))."""
  return nnx.to_pure_dict(nnx.filter_state(state, nnx.Not(nnx.RngState)))


def _evaluate(predict, state, transfer_set: TransferSet, batch_size: int, mesh) -> np.ndarray:
  """Log-probabilities [N, C] of the model over a transfer set (un-augmented), in padded batches."""
  outputs = []
  for start in range(0, len(transfer_set), batch_size):
    x = transfer_set.inputs[start:start + batch_size]
    padded = jax.device_put(pad_rows(x, batch_size), batch_sharding(mesh))
    outputs.append(np.asarray(predict(state, padded))[:len(x)])
  return np.concatenate(outputs)


def _restore(manager: ocp.CheckpointManager, state, out: str, total_epochs: int):
  """Restores the latest checkpoint into `state` (RNG streams kept); returns (state, first epoch to run)."""
  if manager.latest_step() is None:
    return state, 0
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _checkpointable(state))
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardRestore(target), META_ITEM: ocp.args.JsonRestore()}))
  rng_state = nnx.filter_state(state, nnx.RngState)
  state = nnx.filter_state(state, nnx.Not(nnx.RngState))
  nnx.replace_by_pure_dict(state, restored[STATE_ITEM])
  start_epoch = restored[META_ITEM]["epoch"] + 1
  _log(f"resuming {out} after epoch {start_epoch} of {total_epochs}")
  return nnx.merge_state(state, rng_state), start_epoch


def _loader(plan: _Plan, fields: tuple[str, ...] | None = None):
  config = plan.config
  if plan.cache is not None:
    return CacheLoader(plan.cache, plan.transfer_set, batch_size=config.batch_size, seed=config.data_seed,
                       fields=fields or plan.teaching.fields, examples=plan.examples)
  augmentation = Augmentation(seed=config.data_seed, max_shift=config.max_shift, flip=config.flip)
  return ArrayLoader(plan.transfer_set, batch_size=config.batch_size, seed=config.data_seed,
                     augmentation=augmentation if config.augment else None, examples=plan.examples)


def _accumulate(sums: dict, metrics: dict) -> None:
  """Adds a step's row-weighted metrics to the epoch's sums (on the device: no sync per step)."""
  for name, value in metrics.items():
    sums[name] = sums.get(name, 0.0) + (value if name == "rows" else value * metrics["rows"])


def _epoch_line(plan: _Plan, epoch: int, totals: dict, seconds: float) -> dict:
  config = plan.config
  finetuning = epoch >= config.epochs
  return {"epoch": epoch + 1, "phase": "fine-tune" if finetuning else ("distill" if plan.cache else "train"),
          "alpha": 1.0 if finetuning else float(config.alpha),
          **{k: float(v / totals["rows"]) for k, v in totals.items() if k != "rows"},
          "rows": int(totals["rows"]), "seconds": seconds, "examples_per_second": float(totals["rows"]) / seconds}


def _end_epoch(plan: _Plan, manager, graphdef, state, line: dict, predict, teacher_top1, mesh) -> dict:
  """Evaluates, appends the metrics line, then checkpoints (in that order: see `_truncate_metrics`).

  Checkpoints every `checkpoint_every` epochs and after the last one: a resumed run restarts from the latest
  checkpoint and recomputes the epochs after it exactly (data order and dropout are functions of epoch and step).
  """
  if plan.eval_set is not None:
    log_probs = _evaluate(predict, state, plan.eval_set, plan.config.batch_size, mesh)
    line.update({f"eval_{k}": v for k, v in classification_metrics(log_probs, plan.eval_set.labels).items()})
    if teacher_top1 is not None:
      line["eval_teacher_agreement"] = float(np.mean(log_probs.argmax(axis=-1) == teacher_top1))
  _append_metrics(plan.config.out, line)
  config = plan.config
  if line["epoch"] % config.checkpoint_every == 0 or line["epoch"] == config.epochs + config.finetune_epochs:
    manager.save(line["epoch"] - 1, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(_checkpointable(state)),
        PARAMS_ITEM: ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))),
        META_ITEM: ocp.args.JsonSave({"epoch": line["epoch"] - 1})}))
    manager.wait_until_finished()
  _log(_summary(line))
  return line


def _write_final(plan: _Plan, line: dict) -> dict:
  final = {**line, "run_dir": plan.config.out, "epochs": plan.config.epochs + plan.config.finetune_epochs}
  with open(os.path.join(plan.config.out, FINAL_FILE), "w") as f:
    json.dump(final, f, indent=2)
  return final


def _read_final(out: str) -> dict:
  _log(f"{out} already finished; nothing to do.")
  with open(os.path.join(out, FINAL_FILE)) as f:
    return json.load(f)


def fit(config: FitConfig) -> dict:
  """Trains (or resumes, or confirms) a run; returns its final metrics.

  Raises:
    StillroomError: bad settings, data, cache or model; a run dir holding another config.
  """
  mesh = data_mesh()
  check_batch_size(config.batch_size, mesh)
  plan = _plan(config)
  config = plan.config
  if _prepare_run_dir(plan):
    return _read_final(config.out)
  loader = _loader(plan)
  model = build_model(plan.model_spec, seed=config.seed)
  optimizer = nnx.Optimizer(model, _optimizer(config, loader.steps_per_epoch), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  manager = checkpoint_manager(config.out, max_to_keep=2)
  total_epochs = config.epochs + config.finetune_epochs
  state, start_epoch = _restore(manager, state, config.out, total_epochs)
  _truncate_metrics(config.out, start_epoch)
  state = jax.device_put(state, replicated(mesh))
  train_step = make_train_step(graphdef, plan.normalization, plan.teaching, jax.random.key(config.seed), mesh)
  predict = make_predict(graphdef, plan.normalization, mesh)
  sharding, several_devices = batch_sharding(mesh), mesh.devices.size > 1
  teacher_top1 = _teacher_eval_top1(plan)
  line = {}
  for epoch in range(start_epoch, total_epochs):
    finetuning = epoch >= config.epochs
    alpha = np.float32(1.0 if finetuning else config.alpha)
    started = time.perf_counter()
    sums: dict = {}
    bar = tqdm(total=loader.num_rows, unit="row", unit_scale=True, disable=not config.progress, leave=False,
               desc=f"epoch {epoch + 1}/{total_epochs}" + (" (fine-tune)" if finetuning else ""))
    for batch in loader.epoch(epoch):
      rows_in_batch = int(batch["mask"].sum())
      batch = jax.device_put({k: v for k, v in batch.items() if k != "index"}, sharding)
      state, metrics = train_step(state, batch, alpha)
      if several_devices:
        jax.block_until_ready(metrics)  # Queued collectives on fake CPU devices can deadlock (TECH_NOTES).
      _accumulate(sums, metrics)
      bar.update(rows_in_batch)
    bar.close()
    line = _epoch_line(plan, epoch, jax.device_get(sums), time.perf_counter() - started)
    line = _end_epoch(plan, manager, graphdef, state, line, predict, teacher_top1, mesh)
  manager.close()
  return _write_final(plan, line)


def fit_group(configs: list[FitConfig]) -> list[dict]:
  """Trains distillation runs that share a student architecture and a batch stream in one vmapped step.

  The configs must differ only in what the step takes per student (seed, T, alpha, loss, rule, members) and
  their run dirs; each run dir ends as `fit` would write it. Runs already finished are confirmed; runs at
  different epochs (or a group that cannot share a step) fall back to `fit` one by one.

  Returns:
    Each run's final metrics, in the order of `configs`.
  """
  mesh = data_mesh()
  plans = [_plan(config) for config in configs]
  finished = [_prepare_run_dir(plan) for plan in plans]
  todo = [i for i, done in enumerate(finished) if not done]
  results: dict[int, dict] = {i: _read_final(plans[i].config.out) for i, done in enumerate(finished) if done}
  shared = {k for k in dataclasses.asdict(plans[0].config) if k not in GROUP_VARYING}
  groupable = todo and all(plans[i].cache is not None and all(
      getattr(plans[i].config, k) == getattr(plans[todo[0]].config, k) for k in shared) for i in todo)
  if not groupable or len(todo) < 2:
    return [results[i] if i in results else fit(configs[i]) for i in range(len(configs))]
  group = [plans[i] for i in todo]
  first = group[0]
  config = first.config
  check_batch_size(config.batch_size, mesh)
  loader = _loader(first, fields=("member_logits",))
  total_epochs = config.epochs + config.finetune_epochs
  states, managers, start_epochs = [], [], set()
  for plan in group:
    model = build_model(plan.model_spec, seed=plan.config.seed)
    graphdef, state = nnx.split((model, nnx.Optimizer(model, _optimizer(plan.config, loader.steps_per_epoch),
                                                      wrt=nnx.Param)))
    managers.append(checkpoint_manager(plan.config.out, max_to_keep=2))
    state, start = _restore(managers[-1], state, plan.config.out, total_epochs)
    states.append(state)
    start_epochs.add(start)
  if len(start_epochs) != 1:  # Killed between two students' checkpoints: finish each on its own.
    for manager in managers:
      manager.close()
    return [results[i] if i in results else fit(configs[i]) for i in range(len(configs))]
  start_epoch = start_epochs.pop()
  for plan in group:
    _truncate_metrics(plan.config.out, start_epoch)
  num_members = first.cache.spec.num_members
  weights = np.zeros((len(group), num_members), np.float32)
  for k, plan in enumerate(group):
    weights[k, list(plan.teaching.members)] = 1.0 / len(plan.teaching.members)
  hypers = {"temperature": np.array([p.teaching.temperature for p in group], np.float32),
            "geometric": np.array([p.teaching.combine == "geometric" for p in group]),
            "mse": np.array([p.teaching.loss == "mse" for p in group]), "member_weights": weights,
            "key": jax.numpy.stack([jax.random.key(p.config.seed) for p in group])}
  distill_alpha = np.array([p.config.alpha for p in group], np.float32)
  stacked = jax.device_put(stack_states(states), replicated(mesh))
  hypers = jax.device_put(hypers, replicated(mesh))
  step = make_multi_train_step(graphdef, first.normalization, mesh)
  predict = make_predict(graphdef, first.normalization, mesh)
  top1_by_teaching: dict = {}  # Students with the same targets share one teacher evaluation.
  for plan in group:
    key = (plan.teaching.members, plan.teaching.temperature, plan.teaching.combine)
    if key not in top1_by_teaching:
      top1_by_teaching[key] = _teacher_eval_top1(plan)
  teacher_top1 = [top1_by_teaching[(p.teaching.members, p.teaching.temperature, p.teaching.combine)] for p in group]
  sharding = batch_sharding(mesh)
  lines = [{} for _ in group]
  _log(f"training {len(group)} students together in one vmapped step")
  for epoch in range(start_epoch, total_epochs):
    alpha = np.ones(len(group), np.float32) if epoch >= config.epochs else distill_alpha
    epoch_hypers = {**hypers, "alpha": jax.device_put(alpha, replicated(mesh))}
    started = time.perf_counter()
    sums: dict = {}
    for batch in loader.epoch(epoch):
      batch = jax.device_put({k: v for k, v in batch.items() if k != "index"}, sharding)
      stacked, metrics = step(stacked, batch, epoch_hypers)
      if mesh.devices.size > 1:
        jax.block_until_ready(metrics)
      _accumulate(sums, metrics)
    totals = jax.device_get(sums)
    seconds = time.perf_counter() - started
    for k, plan in enumerate(group):
      line = _epoch_line(plan, epoch, {name: value[k] for name, value in totals.items()}, seconds)
      line["students_in_step"] = len(group)
      lines[k] = _end_epoch(plan, managers[k], graphdef, unstack_state(stacked, k), line, predict,
                            teacher_top1[k], mesh)
  for k, plan in enumerate(group):
    managers[k].close()
    results[todo[k]] = _write_final(plan, lines[k])
  return [results[i] for i in range(len(configs))]


# Settings that students of one vmapped step may differ in.
GROUP_VARYING = ("seed", "temperature", "alpha", "loss", "combine", "members", "out")


def _summary(line: dict) -> str:
  text = f"epoch {line['epoch']} ({line['phase']}): loss {line['loss']:.4f}"
  if "eval_accuracy" in line:
    text += f", eval accuracy {100 * line['eval_accuracy']:.2f}%, nll {line['eval_nll']:.4f}"
  return text + f", {line['examples_per_second']:.0f} rows/s"


def _append_metrics(out: str, line: dict) -> None:
  with open(os.path.join(out, METRICS_FILE), "a") as f:
    f.write(json.dumps(line) + "\n")


def _truncate_metrics(out: str, epochs_done: int) -> None:
  """Drops lines of epochs not in the checkpoint (a kill between the metrics line and the checkpoint)."""
  path = os.path.join(out, METRICS_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip() and json.loads(line)["epoch"] <= epochs_done]
  with open(path, "w") as f:
    f.writelines(lines)


def _teacher_logits(teacher: Teacher, normalization: Normalization | None, transfer_set: TransferSet,
                    batch_size: int, what: str) -> np.ndarray:
  """A teacher's logits [N, C] over a transfer set's un-augmented inputs."""
  normalization = normalization or transfer_set.normalization
  check_input_shape(teacher.apply_fn, teacher.params, transfer_set.input_shape, what)
  apply = jax.jit(lambda params, x: teacher.apply_fn(params, normalization.apply(x)))
  return np.concatenate([np.asarray(apply(teacher.params, transfer_set.inputs[start:start + batch_size]))
                         for start in range(0, len(transfer_set), batch_size)])


def _teacher_eval_top1(plan: _Plan) -> np.ndarray | None:
  """The cached ensemble's top-1 class on the eval set, from the members the cache records (None if any of them
  cannot be loaded any more, or its parameters changed since the cache was built)."""
  if plan.cache is None or plan.eval_set is None:
    return None
  spec = plan.cache.spec
  try:
    logits = []
    for member in plan.teaching.members:
      runs = []  # A cross-fitted member's runs are averaged: none of them held out the eval set.
      for run in spec.member_runs(member):
        teacher = load_teacher(run.source)
        if teacher.digest != run.digest:
          raise StillroomError(f"teacher {run.source!r} changed since the cache was built")
        runs.append(_teacher_logits(teacher, Normalization.from_dict(run.normalization), plan.eval_set, 256,
                                    f"teacher {run.name!r}"))
      logits.append(np.mean(runs, axis=0))
  except StillroomError as e:
    _log(f"no teacher agreement on the eval set: {e}")
    return None
  combined = combine_log_probs(np.stack(logits, axis=1), plan.teaching.temperature, plan.teaching.combine)
  return np.asarray(combined).argmax(axis=-1)


def evaluate_runs(run_dirs: list[str], dataset: str, split: str, data_dir: str | None = None,
                  combine: str = "arithmetic", batch_size: int = 256) -> dict:
  """Evaluates one run, or several as an ensemble (combined at T=1).

  Returns:
    {"accuracy", "nll", "ece", "count", "runs", "members": per-run metrics}.
  """
  if combine not in COMBINE_RULES:
    raise StillroomError(f"unknown --combine {combine!r}; valid: {', '.join(COMBINE_RULES)}.")
  transfer_set = open_transfer_set(dataset, split, data_dir)
  if not transfer_set.labeled:
    raise StillroomError(f"{dataset!r} {split!r} is unlabeled; evaluation needs labels.")
  member_logits, members = [], []
  for run_dir in run_dirs:
    teacher = load_run_teacher(run_dir)
    logits = _teacher_logits(teacher, teacher.normalization, transfer_set, batch_size, f"run {run_dir!r}")
    member_logits.append(logits)
    members.append({"run": run_dir, **classification_metrics(
        np.asarray(jax.nn.log_softmax(logits, axis=-1)), transfer_set.labels)})
  stacked = np.stack(member_logits, axis=1)  # [N, M, C]
  log_probs = np.asarray(combine_log_probs(stacked, 1.0, combine))
  return {**classification_metrics(log_probs, transfer_set.labels), "runs": list(run_dirs), "combine": combine,
          "dataset": dataset, "split": split, "members": members}
