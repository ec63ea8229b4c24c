"""`student-train fit`: the one training loop, for teachers, scratch baselines and distilled students.

Without a cache, a run trains on hard labels, reading its dataset batch by batch. With `--cache`, it streams the cache's
rows, rebuilds each row's input from the dataset the cache records (the same view the teacher labelled), and
trains on `alpha · CE + (1 − alpha) · soft`; `--finetune-epochs` then adds epochs on hard labels only.

`fit_group` trains several runs that share a batch stream (they may differ in seed, T, alpha, loss, rule and
members) as K students of one vmapped step; `fit` is a group of one, so both go through the same loop and the
same numerics. The same command on an existing run dir resumes from its last checkpoint: a group resumes from the
newest epoch all of its runs saved, and a run killed and resumed ends with the parameters of an uninterrupted one.
"""

import contextlib
import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
import optax
from flax import nnx

from shared import distributed, limits
from shared.errors import StillroomError, raise_if_interrupted
from shared.log import logger, progress
from shared.models import WEIGHTS, build_model
from shared.outputs import RUN_DIR, OutputLock, check_not_an_input, check_output
from shared.parallel import (FSDP, batch_sharding, bytes_per_device, check_batch_size, data_mesh, needs_step_sync,
                             on_devices, process_rows, put_replicated, put_sharded, weight_shardings)
from shared.runs import check_checkpoint_path
from shared.workers import BatchRenderer, resolve_workers
from student_train import run_dir as files
from student_train.config import FitConfig
from student_train.evaluate import cached_teacher_top1, eval_line, predict_log_probs
from student_train.terms.features import Distilled, Regressors
from student_train.loader import ArrayLoader, CacheLoader
from student_train.plan import Opened, RunPlan, plan_run
from student_train.steps import (Hypers, group_switches, make_predict, make_train_step, stack_hypers, stack_states,
                                 stacked_batch_sharding, unstack_state)

EpochCallback = Callable[[RunPlan, dict], None]


_LOG = logger(__name__)


def make_schedule(config: FitConfig, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate per step: `--schedule` over the distillation epochs from `--lr` (after `--hint-epochs`,
  which have an optimizer of their own), then a cosine decay from `--finetune-lr` over the fine-tuning epochs."""
  distill_epochs = config.epochs - config.hint_epochs
  steps = max(1, distill_epochs * steps_per_epoch)
  if config.schedule == "constant":
    first = optax.constant_schedule(config.lr)
  elif config.schedule == "cosine":
    first = optax.cosine_decay_schedule(config.lr, steps)
  else:
    warmup = min(steps - 1, round(config.warmup_epochs * steps_per_epoch))
    first = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, steps)
  if not config.finetune_epochs:
    return first
  return optax.join_schedules([first, optax.cosine_decay_schedule(config.finetune_lr,
                                                                  config.finetune_epochs * steps_per_epoch)],
                              [distill_epochs * steps_per_epoch])


def make_optimizer(config: FitConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """`--optimizer` from optax with `make_schedule`'s learning rate (AdamW and a cosine decay by default)."""
  lr, decay, momentum = make_schedule(config, steps_per_epoch), config.weight_decay, config.momentum
  with_decay = lambda tx: optax.chain(optax.add_decayed_weights(decay), tx) if decay else tx  # noqa: E731
  return {
      "adamw": lambda: optax.adamw(lr, weight_decay=decay),
      "adam": lambda: optax.adam(lr),
      "sgd": lambda: with_decay(optax.sgd(lr)),
      "momentum": lambda: with_decay(optax.sgd(lr, momentum=momentum)),
      "nesterov": lambda: with_decay(optax.sgd(lr, momentum=momentum, nesterov=True)),
      "rmsprop": lambda: optax.rmsprop(lr, momentum=momentum),
      "lamb": lambda: optax.lamb(lr, weight_decay=decay),
      "lion": lambda: optax.lion(lr, weight_decay=decay),
  }[config.optimizer]()


def make_loader(plan: RunPlan, fields: tuple[str, ...], rows: np.ndarray | None = None):
  """The batch stream of a run: cache rows (with the teacher arrays in `fields`) or a dataset's examples; `rows` of
  each batch (`shared.parallel.process_rows`; None: all)."""
  config = plan.config
  workers = resolve_workers(config.workers, plan.transfer_set)
  if plan.cache is not None:
    return CacheLoader(plan.cache, plan.transfer_set, batch_size=config.batch_size, seed=config.data_seed,
                       fields=fields, examples=plan.examples, window_chunks=config.shuffle_window, workers=workers,
                       rows=rows, epochs=config.epochs + config.finetune_epochs)
  return ArrayLoader(plan.transfer_set, batch_size=config.batch_size, seed=config.data_seed,
                     augmentation=plan.augmentation, augment=config.augment, examples=plan.examples, workers=workers,
                     rows=rows, sampler=plan.sampler)


def fit(config: FitConfig, *, log_epochs: bool = True, on_epoch: EpochCallback | None = None) -> dict:
  """Trains (or resumes, or confirms) one run; returns its final metrics. See `fit_group`.

  A run may be one job of several processes (`--coordinator`, or a multi-task `srun` step; see
  `shared.distributed`): they train on one mesh over all their devices, each reading and rendering its part of
  every batch; process 0 writes the run dir's files, and every process takes part in its checkpoints.
  """
  distributed.initialize(config.coordinator, config.num_processes, config.process_id, config.heartbeat_timeout,
                         config.join_timeout)
  distributed.check_same_settings(config)
  return fit_group([config], log_epochs=log_epochs, on_epoch=on_epoch)[0]


def fit_group(configs: list[FitConfig], *, log_epochs: bool = True,
              on_epoch: EpochCallback | None = None) -> list[dict]:
  """Trains runs that share a batch stream together, as K students of one vmapped step.

  The configs may differ only in what the step takes per student (the settings declared with scope "student": seed,
  T, alpha, loss, rule, members, feature weights) and their run dirs. Finished runs are confirmed and left alone;
  the others train together, each writing its run dir as a run of its own would.

  Args:
    configs: the runs.
    log_epochs: log one line per run and epoch (they are always in each run's metrics.jsonl).
    on_epoch: called with (plan, metrics line) after every run's epoch, e.g. to drive a progress bar.

  Returns:
    Each run's final metrics, in the order of `configs`.

  Raises:
    StillroomError: bad settings, data, cache or model; a run dir holding another config or being written by
      another process; runs that do not share a batch stream; in a job of several processes, any of these in
      another process ("process k of the job failed: ...").
    Diverged: some runs' loss or state became non-finite (after the others have finished), or did in an earlier
      attempt; each holds `diverged.json` and its last finite checkpoint.
  """
  mesh = data_mesh(job_wide=True)
  opened = Opened()
  with contextlib.ExitStack() as locks:

    def plan_and_lock(lock: bool) -> list[RunPlan]:
      plans = [plan_run(config, opened) for config in configs]
      check_batch_size(plans[0].config.batch_size, mesh)
      stream = plans[0].stream_key()
      for plan in plans[1:]:
        differing = sorted(k for k in stream if plan.stream_key()[k] != stream[k])
        if differing:
          raise StillroomError(f"runs {plans[0].config.out!r} and {plan.config.out!r} cannot train together: they "
                               f"differ in {', '.join(differing)}, which decide the batches.")
      for plan in plans:
        check_not_an_input(plan.config.out, plan.input_paths(), "--out")
        if lock:
          check_output(plan.config.out, RUN_DIR, plan.config.overwrite)
          check_checkpoint_path(plan.config.out)
          # A finished run on a read-only mount is only read: reported without the lock.
          locks.enter_context(OutputLock(plan.config.out, "student-train fit",
                                         lambda c=plan.config: not c.overwrite and files.is_finished(c.out)))
      return plans

    # Process 0 plans first (preparing a dataset in a shared data dir), checks and locks the run dirs; then the
    # others plan, reading what it prepared. A failure in any process stops every process with its message.
    plans = distributed.first_then_others(lambda: plan_and_lock(True), lambda: plan_and_lock(False))
    return _fit_locked(plans, mesh, log_epochs and distributed.is_first(), on_epoch)


def _fit_locked(plans: list[RunPlan], mesh, log_epochs: bool, on_epoch: EpochCallback | None) -> list[dict]:
  """`fit_group` once every run dir is locked: confirms finished runs, resumes and trains the others.

  In a job of several processes, process 0 prepares the run dirs and the others then check them; what each run
  does next (finished, diverged earlier, resumed from which epoch) is what process 0 sees, so that every process
  calls the same checkpoint collectives.
  """
  finished = distributed.first_then_others(lambda: [files.prepare_run_dir(plan) for plan in plans],
                                           lambda: [files.prepare_run_dir(plan, joining=True) for plan in plans])
  finals, earlier = distributed.from_process_0((
      [files.read_final(plan.config.out) if done else None for plan, done in zip(plans, finished)],
      [None if done else files.read_diverged(plan.config.out) for plan, done in zip(plans, finished)]))
  results, diverged, todo = {}, [], []
  for i, final in enumerate(finals):
    if final is not None:
      if log_epochs:
        _LOG.info(f"{plans[i].config.out} already finished; nothing to do.")
      results[i] = final
    elif earlier[i]:
      diverged.append(f"{plans[i].config.out} {earlier[i]}")
    else:
      todo.append(i)
  checkpoints = {i: files.Checkpoints(plans[i].config.out) for i in todo}
  saved = distributed.from_process_0([sorted(checkpoints[i].epochs()) for i in todo])
  resumes = files.resume_groups([set(epochs) for epochs in saved]) if todo else []
  if len(resumes) > 1:
    _LOG.info("these runs saved different epochs, so each set resumes as a group of its own: "
              + "; ".join(f"epoch {epoch}: {', '.join(plans[todo[k]].config.out for k in members)}"
              for epoch, members in resumes))
  for epoch, members in resumes:
    group = [todo[k] for k in members]
    for i in group:
      checkpoints[i].discard_after(epoch)
    held = distributed.from_process_0([files.MidEpochCheckpoints.held(plans[i].config.out) for i in group])
    mids = [files.MidEpochCheckpoints(plans[i].config.out) if plans[i].config.checkpoint_every_steps or held[k]
            else None for k, i in enumerate(group)]
    try:
      finals = _train([plans[i] for i in group], [checkpoints[i] for i in group], epoch, mesh, log_epochs, on_epoch,
                      mids, _mid_epoch_position(mids, epoch))
    except Diverged as e:
      diverged.append(str(e).removesuffix(DIVERGED_ADVICE))
      continue
    results.update(zip(group, finals))
  if diverged:
    raise Diverged("; ".join(diverged) + DIVERGED_ADVICE)
  return [results[i] for i in range(len(plans))]


def _mid_epoch_position(mids: list, epoch: int) -> dict | None:
  """Where a group whose epoch checkpoints resume it at `epoch` resumes instead, inside that epoch or a later one:
  the newest mid-epoch checkpoint every run holds at the same position, as {"epoch", "step", "global", "metas"
  (each run's)}; None (and its mid-epoch checkpoints deleted, being unusable) when there is none. Unreadable ones
  (half-written or half-deleted by a kill) are deleted, and so are damaged ones (their files differ from their
  digests), with a warning: the group resumes from the point before them, as an uninterrupted run would have
  computed it. Decided from what process 0 reads."""
  found = distributed.from_process_0([None if mid is None else mid.positions() for mid in mids])

  def discard(mid, step: int, damage: str) -> None:
    _LOG.warning(f"{mid.out}: discarding {mid.folder.where(step)}, which is damaged ({damage}); resuming from the "
                 "checkpoint before it")
    mid.delete(step)

  for mid, positions in zip(mids, found):
    for step, meta, damage in positions or ():
      if damage:
        discard(mid, step, damage)
      elif meta is None:
        mid.delete(step)
  found = [None if f is None else {step: meta for step, meta, _ in f if meta is not None} for f in found]
  while all(f is not None for f in found):
    usable = []
    for step in set.intersection(*(set(f) for f in found)):
      metas = [f[step] for f in found]
      if metas[0]["epoch"] >= epoch and all((m["epoch"], m["step"]) == (metas[0]["epoch"], metas[0]["step"])
                                           for m in metas):
        usable.append(step)
    if not usable:
      break
    step = max(usable)
    # The position's other files (its state), checked before the group commits to it (by process 0: hashing).
    damages = distributed.from_process_0(distributed.job_step(
        lambda step=step: [mid.damage(step) for mid in mids] if distributed.is_first() else None))
    if not any(damages):
      return {"epoch": found[0][step]["epoch"], "step": found[0][step]["step"], "global": step,
              "metas": [f[step] for f in found]}
    for mid, f, damage in zip(mids, found, damages):
      if damage:
        discard(mid, step, damage)
        del f[step]
  for mid in mids:
    if mid is not None:
      mid.clear()
  return None


def _sums_of(sums: dict, k: int) -> dict:
  """Student k's partial metric sums (fetched from the device), as JSON: {name: [value, dtype]}; a float32 value is
  exact in a double."""
  return {name: [np.asarray(value[k]).item(), str(np.asarray(value).dtype)] for name, value in sums.items()}


def _stacked_sums(runs: list[dict]) -> dict:
  """The inverse of `_sums_of` for K students, stacked along axis 0."""
  return {name: jax.numpy.asarray(np.array([run[name][0] for run in runs], dtype=runs[0][name][1]))
          for name in runs[0]}


def _train(group: list[RunPlan], checkpoints: list[files.Checkpoints], start_epoch: int, mesh, log_epochs: bool,
           on_epoch: EpochCallback | None, mids: list, position: dict | None) -> list[dict]:
  """The loop: one vmapped step over the group's stacked states per batch; eval, metrics and checkpoints per
  epoch (and every `--checkpoint-every-steps` steps inside one); the final files once every run has saved its last
  epoch. Resumes from `start_epoch` (0: from scratch), which every run has saved, or from `position` in that
  epoch or a later one (see `_mid_epoch_position`) of its mid-epoch checkpoints `mids`.

  Its phases: `_set_up`, then per epoch `_train_epoch`, `_drop_diverged`, `_evaluate` and `_checkpoint`, and
  `_finish`."""
  first = group[0]
  config = first.config
  fields = tuple(sorted({f for plan in group for f in plan.fields()}))
  loader = make_loader(first, fields, process_rows(mesh, config.batch_size))
  eval_render = None
  try:
    loader.read_ahead(position["epoch"] if position is not None else start_epoch)  # Overlaps the set-up below.
    eval_render = None if first.eval_set is None else BatchRenderer(
        first.eval_set, first.augmentation, workers=resolve_workers(config.workers, first.eval_set))
    run = _set_up(group, checkpoints, mids, start_epoch, position, mesh, loader, eval_render, log_epochs, on_epoch)
    for epoch in range(run.start_epoch, run.total_epochs):
      totals, seconds = _train_epoch(run, epoch)
      totals = _drop_diverged(run, epoch, totals)
      if not run.group:
        break
      _evaluate(run, epoch, totals, seconds)
      _checkpoint(run, epoch)
    return _finish(run)
  finally:
    loader.close()
    if eval_render is not None:
      eval_render.close()


@dataclasses.dataclass(eq=False)
class _Training:
  """What the phases of `_train` share. `group` and the lists beside it (and the stacked states and hypers) lose
  the students that diverge; `first` stays the group's first plan, whose settings every student shares."""

  first: RunPlan
  group: list[RunPlan]
  checkpoints: list[files.Checkpoints]
  mids: list  # Each run's `files.MidEpochCheckpoints`, or None.
  to_close: list  # Every checkpoint manager of the group, diverged students' included, closed at the end.
  mesh: object
  loader: object
  eval_render: BatchRenderer | None
  log_epochs: bool
  on_epoch: EpochCallback | None
  graphdef: object
  stacked: object  # The students' states, stacked along axis 0, on the mesh as `state_shardings` places them.
  state_shardings: object  # `--param-sharding`'s `NamedSharding` of each array of `stacked` (never along axis 0).
  per_student: Hypers  # The step's per-student hypers, stacked and replicated.
  distill_alpha: np.ndarray  # float32 [K] each student's alpha while distilling.
  step: Callable
  predict: Callable
  teacher_top1: list
  start_epoch: int
  start_step: int = 0
  resumed_sums: dict | None = None
  resumed_seconds: float = 0.0
  diverged: list[str] = dataclasses.field(default_factory=list)

  @property
  def config(self) -> FitConfig:
    return self.first.config

  @property
  def total_epochs(self) -> int:
    return self.config.epochs + self.config.finetune_epochs


def _initial_states(group: list[RunPlan], loader, mesh) -> tuple[object, list]:
  """Each run's model (and hint regressors) and optimizers, as one graphdef and each run's state on the devices, as
  `--param-sharding` places it (where checkpoints restore to)."""
  states = []
  for plan in group:
    model = build_model(plan.model_spec, seed=plan.config.seed)
    if plan.initial_params is not None:  # --init-from (a resumed run then restores its own checkpoint).
      weights = nnx.state(model, WEIGHTS)
      nnx.replace_by_pure_dict(weights, plan.initial_params)
      nnx.update(model, weights)
    trainable = model
    if any(term.regressor is not None for term in plan.feature_terms):  # The hints' regressors train beside it.
      trainable = Distilled(model, Regressors(plan.feature_terms, nnx.Rngs(
          jax.random.fold_in(jax.random.key(plan.config.seed), REGRESSOR_STREAM))))
    optimizers = [nnx.Optimizer(trainable, make_optimizer(plan.config, loader.steps_per_epoch), wrt=nnx.Param)]
    if plan.config.hint_epochs:  # FitNets' stage 1: an optimizer of its own, with its own schedule.
      stage1 = dataclasses.replace(plan.config, epochs=plan.config.hint_epochs, hint_epochs=0, finetune_epochs=0)
      optimizers.append(nnx.Optimizer(trainable, make_optimizer(stage1, loader.steps_per_epoch), wrt=nnx.Param))
    graphdef, state = nnx.split((trainable, *optimizers))
    # Where checkpoints restore to, on every process's devices.
    states.append(put_sharded(state, weight_shardings(state, mesh, plan.config.param_sharding)))
  return graphdef, states


def _set_up(group: list[RunPlan], checkpoints: list[files.Checkpoints], mids: list, start_epoch: int,
            position: dict | None, mesh, loader, eval_render, log_epochs: bool,
            on_epoch: EpochCallback | None) -> _Training:
  """The group's states, fresh or restored (from `position`, else from epoch `start_epoch`), its metrics truncated
  to where it resumes, and its stacked states, hypers and compiled step."""
  first = group[0]
  config = first.config
  total_epochs = config.epochs + config.finetune_epochs
  graphdef, states = _initial_states(group, loader, mesh)
  start_step, resumed_sums, resumed_seconds = 0, None, 0.0
  if position is not None:
    start_epoch, start_step = position["epoch"], position["step"]
    resumed_sums = _stacked_sums([meta["sums"] for meta in position["metas"]])
    resumed_seconds = position["metas"][0]["seconds"]
    states = [mid.restore(state, position["global"]) for mid, state in zip(mids, states)]
    _LOG.info(f"resuming {', '.join(p.config.out for p in group)} after step {start_step} of epoch {start_epoch + 1} "
              f"of {total_epochs}")
  elif start_epoch:
    states = [c.restore(state, start_epoch) for c, state in zip(checkpoints, states)]
    _LOG.info(f"resuming {', '.join(p.config.out for p in group)} after epoch {start_epoch} of {total_epochs}")
  distributed.job_step(functools.partial(_write_each, files.truncate_metrics,
                                         {plan.config.out: start_epoch for plan in group}))
  num_members = first.cache.spec.num_members if first.cache is not None else 1
  per_student = stack_hypers([plan.hypers(num_members) for plan in group], [plan.config.seed for plan in group])
  distill_alpha = per_student.alpha
  stacked, state_shardings = place_states(stack_states(states), mesh, config.param_sharding, log_epochs)
  switches = group_switches(per_student)
  per_student = put_replicated(per_student, mesh)
  step = make_train_step(graphdef, first.normalization, mesh, switches, first.feature_terms, state_shardings,
                         first.augmentation.image_size, stacked=config.steps_per_call > 1)
  predict = make_predict(graphdef, first.normalization, mesh, state_shardings)
  teacher_top1 = [cached_teacher_top1(plan) for plan in group]
  _say_what_eval_reports(first, teacher_top1[0] is not None)
  if len(group) > 1 and log_epochs:
    _LOG.info(f"training {len(group)} students together in one vmapped step")
  return _Training(first=first, group=list(group), checkpoints=list(checkpoints), mids=list(mids),
                   to_close=list(checkpoints) + [mid for mid in mids if mid is not None], mesh=mesh,
                   loader=loader, eval_render=eval_render, log_epochs=log_epochs, on_epoch=on_epoch,
                   graphdef=graphdef, stacked=stacked, state_shardings=state_shardings, per_student=per_student,
                   distill_alpha=distill_alpha,
                   step=step, predict=predict, teacher_top1=teacher_top1, start_epoch=start_epoch,
                   start_step=start_step, resumed_sums=resumed_sums, resumed_seconds=resumed_seconds)


def place_states(stacked, mesh, sharding: str, log: bool = True) -> tuple[object, object]:
  """The group's stacked states on the mesh as `--param-sharding` places them: replicated, or (fsdp) each array
  split along its longest axis after the students' axis 0 that divides evenly over the devices
  (`shared.parallel.fsdp_spec`). With fsdp and `log`, it says what each device holds, or warns that nothing
  splits.

  Returns:
    `(states placed, their NamedShardings)`, the same structure.
  """
  shardings = weight_shardings(stacked, mesh, sharding, group_axes=1)
  placed = put_sharded(stacked, shardings)
  if sharding == FSDP and log and mesh.devices.size > 1:
    whole, held = bytes_per_device(placed)
    if held == whole:
      _LOG.warning(f"--param-sharding fsdp: no array of the students' parameters and optimizer state has an axis "
                   f"divisible by the {mesh.devices.size} devices; they are replicated on each of them.")
    else:
      _LOG.info(f"--param-sharding fsdp: {limits.human_bytes(held)} of the students' {limits.human_bytes(whole)} "
                f"of parameters and optimizer state on each of the {mesh.devices.size} devices")
  return placed, shardings


def _epoch_hypers(run: _Training, epoch: int) -> Hypers:
  """The step's hypers in `epoch`: alpha is 1 while fine-tuning."""
  config, group = run.config, run.group
  finetuning = epoch >= config.epochs
  alpha = np.ones(len(group), np.float32) if finetuning else run.distill_alpha
  # Traced, so that the stages share one compilation: FitNets' stage 1 trains on the hints alone, and
  # fine-tuning on hard labels alone.
  alpha, hint_only, features_on = put_replicated(
      (alpha, np.full(len(group), epoch < config.hint_epochs), np.full(len(group), not finetuning, np.float32)),
      run.mesh)
  return run.per_student.replace(alpha=alpha, hint_only=hint_only, features_on=features_on)


def _train_epoch(run: _Training, epoch: int) -> tuple[dict, float]:
  """One epoch's steps (from the resumed step in the first), one per call or `--steps-per-call` N (see
  `stack_calls`), with its mid-epoch checkpoints, which land between calls.

  Returns:
    `(totals, seconds)`: the epoch's metric sums [K] fetched from the devices, and its seconds over all attempts.
  """
  config, loader = run.config, run.loader
  finetuning = epoch >= config.epochs
  epoch_hypers = _epoch_hypers(run, epoch)
  first_step = run.start_step if epoch == run.start_epoch else 0
  sums = run.resumed_sums if first_step else None
  started = time.perf_counter() - (run.resumed_seconds if first_step else 0.0)  # The epoch's seconds, all attempts.
  every_steps = config.checkpoint_every_steps
  sync, per_call = needs_step_sync(run.mesh), config.steps_per_call
  batches = loader.epoch(epoch, first_step)
  calls = on_devices(batches, batch_sharding(run.mesh)) if per_call == 1 else on_devices(
      stack_calls(batches, per_call, first_step), stacked_batch_sharding(run.mesh))
  # Each epoch logs its own summary line: off a terminal, the bar adds none.
  bar = progress(total=loader.num_rows, initial=min(first_step * config.batch_size, loader.num_rows), unit="row",
                 unit_scale=True, enabled=config.progress and distributed.is_first(), summary=False, leave=False,
                 desc=f"epoch {epoch + 1}/{run.total_epochs}" + (" (fine-tune)" if finetuning else ""))
  done = first_step
  for _, placed in calls:  # One step, or with --steps-per-call N up to N stacked batches.
    raise_if_interrupted()
    index = done
    run.stacked, metrics = run.step(run.stacked, placed, epoch_hypers)
    if sync:
      jax.block_until_ready(metrics)
    sums = accumulate(_empty_sums(metrics) if sums is None else sums, metrics, index)
    done = index + (1 if per_call == 1 else placed["mask"].shape[0])
    # The batches' rows over the whole job (this process renders only its part of them).
    bar.update(min(done * config.batch_size, loader.num_rows) - min(index * config.batch_size, loader.num_rows))
    # Mid-epoch checkpoints, only while every student is finite: one that diverged is dropped at the epoch's end,
    # and until then the group saves none.
    if every_steps and done % every_steps == 0 and done < loader.steps_per_epoch \
        and bool(np.all(jax.device_get(params_finite(run.stacked)))):
      fetched, seconds = jax.device_get(sums), time.perf_counter() - started
      for k, mid in enumerate(run.mids):
        mid.save(unstack_state(run.stacked, k), epoch * loader.steps_per_epoch + done,
                 {"epoch": epoch, "step": done, "seconds": seconds, "sums": _sums_of(fetched, k)})
  bar.close()
  return jax.device_get(sums), time.perf_counter() - started


def _drop_diverged(run: _Training, epoch: int, totals: dict) -> dict:
  """Marks the students whose loss or state went non-finite this epoch as diverged, and trains on without them.

  Returns:
    The totals of the students that go on (`run.group` is empty when none does).
  """
  problems = _non_finite(run.group, run.checkpoints, epoch, totals, params_finite(run.stacked),
                         run.loader.steps_per_epoch)
  if not problems:
    return totals
  # Those runs stop here, before this epoch is written; the others go on without them.
  marks = {run.group[k].config.out: f"diverged in epoch {epoch + 1}: {problem}" for k, problem in problems.items()}
  distributed.job_step(functools.partial(_write_each, files.write_diverged, marks))
  run.diverged += [f"{out} {mark}" for out, mark in marks.items()]
  keep = [k for k in range(len(run.group)) if k not in problems]
  if not keep:
    run.group = []
    return {}
  run.group, run.checkpoints, run.mids = ([run.group[k] for k in keep], [run.checkpoints[k] for k in keep],
                                          [run.mids[k] for k in keep])
  run.teacher_top1 = [run.teacher_top1[k] for k in keep]
  run.stacked, run.per_student = jax.tree.map(lambda a: a[np.array(keep)], (run.stacked, run.per_student))
  run.stacked = put_sharded(run.stacked, run.state_shardings)  # Where the step takes them (K is never split).
  run.distill_alpha = run.distill_alpha[keep]
  run.step = make_train_step(run.graphdef, run.first.normalization, run.mesh,
                             group_switches(jax.device_get(run.per_student)), run.first.feature_terms,
                             run.state_shardings, run.first.augmentation.image_size,
                             stacked=run.config.steps_per_call > 1)
  return {name: value[keep] for name, value in totals.items()}


def _say_what_eval_reports(first: RunPlan, agreement: bool) -> None:
  """One info line when the per-epoch evaluation leaves metrics out: those that need labels on an unlabeled eval
  set, the agreement with the teachers where the cache stores no logits for it."""
  if first.eval_set is None:
    return
  data = f"{first.eval_set.name} {first.eval_set.split!r}"
  # The options of `teacher-cache build` that label that split: --eval-dataset too for another dataset's.
  options = ("" if first.eval_set.name == first.transfer_set.name else f"--eval-dataset {first.eval_set.name} ") + \
      f"--eval-split {first.eval_set.split}"
  no_logits = (f"the cache stores no teacher logits for {data} (build it with {options})"
               if first.cache is not None and not agreement else None)
  if first.eval_set.labeled:
    if no_logits:
      _LOG.info(f"{no_logits}: eval_teacher_agreement is not reported.")
  elif agreement:
    _LOG.info(f"{data} is unlabeled: eval accuracy, nll and ece (which need labels) are not reported; "
              "eval_teacher_agreement is.")
  else:
    _LOG.info(f"{data} is unlabeled" + (f" and {no_logits}" if no_logits else "")
              + ": no eval metrics are reported (accuracy, nll and ece need labels).")


def _evaluates(run: "_Training") -> bool:
  """Whether the epoch's evaluation has anything to report (see `_say_what_eval_reports`)."""
  eval_set = run.first.eval_set
  return eval_set is not None and (eval_set.labeled or any(top1 is not None for top1 in run.teacher_top1))


def _evaluate(run: _Training, epoch: int, totals: dict, seconds: float) -> None:
  """Each run's metrics line of the epoch (with the eval split's metrics), appended to its metrics.jsonl, logged and
  handed to `on_epoch`."""
  group = run.group
  eval_log_probs = None if not _evaluates(run) else predict_log_probs(
      run.predict, run.stacked, run.eval_render, run.config.batch_size, run.mesh)
  lines = {}
  for k, plan in enumerate(group):
    lines[plan.config.out] = _epoch_line(plan, epoch, {name: value[k] for name, value in totals.items()}, seconds,
                                         len(group))
    if eval_log_probs is not None:
      lines[plan.config.out].update(eval_line(eval_log_probs[k], plan, run.teacher_top1[k]))
  # Before the checkpoint: see `files.truncate_metrics`.
  distributed.job_step(functools.partial(_write_each, files.append_metrics, lines))
  for plan in group:
    line = lines[plan.config.out]
    if run.log_epochs:
      _LOG.info(f"{plan.config.out}: {_summary(line)}" if len(group) > 1 else _summary(line))
    if run.on_epoch is not None:
      run.on_epoch(plan, line)


def _checkpoint(run: _Training, epoch: int) -> None:
  """Each run's epoch checkpoint, every `--checkpoint-every` epochs and after the last."""
  if (epoch + 1) % run.config.checkpoint_every == 0 or epoch + 1 == run.total_epochs:
    for k, checkpoint in enumerate(run.checkpoints):
      checkpoint.save(run.graphdef, unstack_state(run.stacked, k), epoch + 1)
    for mid in run.mids:
      if mid is not None:
        mid.clear()  # This epoch checkpoint supersedes them.


def _finish(run: _Training) -> list[dict]:
  """Closes every checkpoint manager and writes the final files of the runs that finished; returns their finals.

  Raises:
    Diverged: some runs diverged (after the others have finished).
  """
  for checkpoint in run.to_close:
    checkpoint.close()
  finals = distributed.job_step(lambda: [files.write_final(plan.config.out, run.total_epochs) for plan in run.group])
  if run.diverged:  # The others have finished; these have not.
    raise Diverged("; ".join(run.diverged) + DIVERGED_ADVICE)
  return finals


def _write_each(write, values: dict) -> None:
  """`write(out, value)` for each run dir's value (process 0 writes; see `student_train.run_dir`)."""
  for out, value in values.items():
    write(out, value)


_NEVER = np.iinfo(np.int32).max  # "No non-finite step yet".
REGRESSOR_STREAM = 0x4E6  # Folded into the seed for the hints' regressors, apart from the student's initialisation.


def _per_step(metrics: dict) -> dict:
  """A call's metrics with a leading axis of steps, [N, K] (a call of one step returns [K])."""
  return metrics if metrics["rows"].ndim == 2 else jax.tree.map(lambda value: value[None], metrics)


def _empty_sums(metrics: dict) -> dict:
  metrics = {name: value[0] for name, value in _per_step(metrics).items()}
  return {**{name: jax.numpy.zeros_like(value) for name, value in metrics.items()},
          "first_nonfinite": jax.numpy.full_like(metrics["rows"], _NEVER, dtype=jax.numpy.int32)}


@functools.partial(jax.jit, donate_argnums=0)
def accumulate(sums: dict, metrics: dict, batch_index) -> dict:
  """Adds a call's row-weighted metrics to the epoch's sums, step after step (the additions N calls of one step
  make), and keeps each student's first batch with a non-finite loss: on the device, one dispatch per call, read
  once at the end of the epoch.

  Args:
    sums: the epoch's sums so far, each [K].
    metrics: the call's metrics, [K] for one step or [N, K] for N (`--steps-per-call`).
    batch_index: the epoch's batch of the call's first step (its step i is batch `batch_index + i`).
  """
  steps = _per_step(metrics)
  for i in range(steps["rows"].shape[0]):  # Static: unrolled.
    step = {name: value[i] for name, value in steps.items()}
    added = {name: sums[name] + (value if name == "rows" else value * step["rows"]) for name, value in step.items()}
    finite = jax.numpy.isfinite(step["loss"])
    added["first_nonfinite"] = jax.numpy.where(finite, sums["first_nonfinite"],
                                               jax.numpy.minimum(sums["first_nonfinite"], batch_index + i))
    sums = added
  return sums


def stack_calls(batches: Iterator[dict], steps_per_call: int, first_step: int = 0) -> Iterator[dict]:
  """An epoch's batches from batch `first_step` on, grouped into the calls of `--steps-per-call` N, each array
  stacked along a new leading axis of steps (what `make_train_step(..., stacked=True)` takes).

  The calls cover batches [kN, (k + 1)N) of the epoch, and the epoch's last call its remainder; a run resumed at a
  batch off that grid (saved with another N) first takes the batches up to it, so that later calls, and the
  mid-epoch checkpoints between them, land where an uninterrupted run's do.

  Args:
    batches: the epoch's batches from batch `first_step` on, each a dict of [B, ...] arrays.
    steps_per_call: N.
    first_step: the epoch's batch the stream starts at.

  Yields:
    Dicts of the same names, each array [n, B, ...] with n = N but for the first call of an off-grid resume and the
    epoch's remainder.
  """
  batches = iter(batches)
  size = steps_per_call - first_step % steps_per_call
  while chunk := list(itertools.islice(batches, size)):
    yield {name: np.stack([batch[name] for batch in chunk]) for name in chunk[0]}
    size = steps_per_call


@jax.jit
def params_finite(states) -> jax.Array:
  """bool [K]: whether every parameter and optimizer value of each stacked student is finite."""
  leaves = [leaf for leaf in jax.tree.leaves(states) if jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)]
  return jax.numpy.stack([jax.numpy.isfinite(leaf).reshape(leaf.shape[0], -1).all(axis=1) for leaf in leaves]).all(0)


class Diverged(StillroomError):
  """Runs whose loss or state became non-finite (each run dir holds `diverged.json`)."""


DIVERGED_ADVICE = (". Each keeps its last finite checkpoint and is not trained again: change its settings (a lower "
                   "--lr, say) and pass --overwrite, or choose another --out.")


def _non_finite(group: list[RunPlan], checkpoints, epoch: int, totals: dict, finite_params,
                steps_per_epoch: int) -> dict[int, str]:
  """The students whose loss or state went non-finite this epoch, with where, read once per epoch.

  Returns:
    {position in the group: "its loss became non-finite at step s of n (step g of the run); it keeps its
    checkpoint of epoch c"}.
  """
  first_bad = np.asarray(totals.pop("first_nonfinite"))
  finite_params = np.asarray(finite_params)
  problems = {}
  for k in range(len(group)):
    if first_bad[k] == _NEVER and finite_params[k]:
      continue
    # The loss was finite at every step but the state is not: the epoch's last update made it so.
    step = int(first_bad[k]) + 1 if first_bad[k] != _NEVER else steps_per_epoch
    what = "loss" if first_bad[k] != _NEVER else "state (parameters or optimizer moments)"
    kept = max(checkpoints[k].epochs(), default=0)
    problems[k] = (f"its {what} became non-finite at step {step} of {steps_per_epoch} (step "
                   f"{epoch * steps_per_epoch + step} of the run); "
                   + (f"it keeps its checkpoint of epoch {kept}" if kept else "it has no checkpoint yet"))
  return problems


def _epoch_line(plan: RunPlan, epoch: int, totals: dict, seconds: float, students: int) -> dict:
  """An epoch's metrics line: each metric the mean over the epoch's rows, or for a language model over its
  predicting positions (`student_train.steps.example_mask`), which the line counts as `tokens` instead of `rows`."""
  config = plan.config
  finetuning = epoch >= config.epochs
  phase = "fine-tune" if finetuning else "hint" if epoch < config.hint_epochs else "distill" if plan.cache else "train"
  unit = "tokens" if plan.tokens else "rows"
  return {"epoch": epoch + 1, "phase": phase,
          "alpha": 1.0 if finetuning else float(config.alpha),
          **{k: float(v / totals["rows"]) for k, v in totals.items() if k != "rows"},
          unit: int(totals["rows"]), "seconds": seconds, f"{unit}_per_second": float(totals["rows"]) / seconds,
          "students_in_step": students}


def _summary(line: dict) -> str:
  text = f"epoch {line['epoch']} ({line['phase']}): loss {line['loss']:.4f}"
  if "eval_perplexity" in line:
    text += f", eval perplexity {line['eval_perplexity']:.3f}, accuracy {100 * line['eval_accuracy']:.2f}%"
  elif "eval_accuracy" in line:
    text += f", eval accuracy {100 * line['eval_accuracy']:.2f}%, nll {line['eval_nll']:.4f}"
  if "eval_teacher_agreement" in line and "eval_accuracy" not in line:  # An unlabeled eval set: all it reports.
    text += f", eval agreement with the teachers {100 * line['eval_teacher_agreement']:.2f}%"
  if "tokens_per_second" in line:
    return text + f", {line['tokens_per_second']:.0f} tokens/s"
  return text + f", {line['rows_per_second']:.0f} rows/s"
