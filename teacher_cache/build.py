"""`teacher-cache build`: run a teacher ensemble once over a transfer set and write a resumable Zarr v3 cache.

The build runs chunk by chunk: first the eval split's member logits (if any), then the transfer set's rows. Each
chunk's rows are computed in batches that start at the chunk's first row, so a resumed build computes every batch
exactly as an uninterrupted one does; the inputs are decoded and rendered ahead in worker processes
(`shared.workers`). A background thread writes finished chunks (and then marks each in its
bookkeeping array) while the devices compute the next batches; the completion record is written only after the
last chunk is committed.
"""

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import zarr

from shared import __version__, distributed, limits, storage
from shared.augment import CANVAS, MIX_LABELS, NO_MIX, Augmentation, fold_of, make_augmentation, parse_mix
from shared.cache import (COMPLETE_KEY, EVAL_ROWS, FEATURE_DTYPE, FEATURE_KINDS, GROUPED, PERMUTED, ROWS, SPEC_KEY,
                          STORAGE_DTYPES, Cache, CacheSpec, ChunkWriter, FeatureSpec, MemberSpec, SpecialistSpec,
                          parse_features, committed_name, completion_record, create_arrays, example_runs,
                          integrity_problems, layout_of, missing_chunks, mixed_rows, now_iso, open_cache,
                          uncommitted_chunks, validate_settings)
from shared.data import (NO_EVAL, Normalization, TransferSet, check_eval_set, default_eval_split, local_path,
                         open_transfer_set)
from shared.data.prepared import check_views as check_prepared_views
from shared.data.text import check_views as check_text_views
from shared.ensemble import COMBINE_RULES, combine_log_probs, sampled_targets, top_k_targets
from shared.errors import StillroomError, raise_if_interrupted
from shared.log import logger, progress
from shared.losses import stored_feature
from shared.models import check_input_shape
from shared.outputs import (STORE, OutputLock, check_not_an_input, check_output, clear_for_overwrite, is_store,
                            storage_errors)
from shared.parallel import (FSDP, REPLICATED, SHARDINGS, batch_sharding, bytes_per_device, cap_batch,
                             check_batch_size, data_mesh, pad_rows, put_sharded, weight_shardings)
from shared.precision import DEFAULT_COMPUTE_DTYPE, target_tolerance
from shared.render import DEVICE_INPUTS, PARTNER_INPUTS, inputs_of
from shared.runs import Teacher, load_teacher
from shared.options import (BUILD, CONVERT, DEFAULT_SPLIT, DEMO_BUILD, DERIVE, EXTEND, IMPORT, VIEWS,
                            ComputeSettings, DataSettings, JobSettings, OutputSettings, ViewSettings, resolve_dataset,
                            text_options)
from shared.settings import setting, workers_check
from shared.specialists import SpecialistPlan, class_matrix, specialist_log_probs
from shared.workers import BatchRenderer, resolve_workers


DEFAULT_CHUNK_ROWS = 4096
TOKEN_CHUNK_MIB = 64  # The default chunk of token rows holds about this many MiB (`token_chunk_rows`).


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig(DataSettings, ViewSettings, ComputeSettings, JobSettings, OutputSettings):
  """Settings of `teacher-cache build`, and of `views` and `import` where they offer them (the CLI's options, defaults
  and help come from here; the data, view, compute, job and output settings are the shared ones of
  `shared.options`)."""

  COMMANDS: ClassVar[tuple[str, ...]] = (BUILD,)  # Who offers a field that names no commands.

  teachers: tuple[str, ...] = setting((), "ensemble members", commands=(), given_by="--teacher")
  combine: str = setting("arithmetic", "ensemble rule: arithmetic mean of member distributions or normalised "
                                       "geometric mean", choices=COMBINE_RULES, group="teachers",
                         commands=(BUILD, IMPORT))
  temperature: float = setting(4.0, "softmax temperature T > 0 of the stored targets", group="teachers",
                               commands=(BUILD, IMPORT, DEMO_BUILD))
  targets: str = setting("dense", "what to store of the ensemble distribution at T: 'dense' (every class), "
                                  "'topk:K' (its K most probable classes and the others' total mass), or 'sample:K' "
                                  "(K classes drawn from it per row, as ids and counts: an unbiased estimate)",
                         metavar="dense|topk:K|sample:K", group="teachers", commands=(BUILD, IMPORT, CONVERT))
  member_logits: bool = setting(False, "sparse targets: also store each member's logits, which students need to "
                                       "re-derive targets at another T, rule or member subset, or for `student-train "
                                       "fit --loss mse` (dense caches always store them)", group="teachers",
                                commands=(BUILD, IMPORT, CONVERT))
  specialist_plan: str | None = setting(None, "the plan of the specialists (`teacher-cache specialists`)",
                                        commands=(), given_by="--specialists")
  specialist_runs: tuple[str, ...] = setting((), "specialist run dirs (`student-train fit --specialist`)",
                                             commands=(), given_by="--specialists")
  top_n: int = setting(2, "with --specialists: a specialist takes part in a row's targets when one of its classes is "
                          "among the generalist's N most probable", metavar="N", group="teachers")
  features: str | None = setting(
      None, "also store named intermediate features of the members for feature-based distillation (`student-train "
            "fit --hint/--attention/--similarity`): KIND 'map' (the whole feature, the default), 'attention' (its "
            "normalised H×W attention map) or 'pooled' (averaged over H×W); @MEMBER: that member's only (default: "
            "every member's). `teacher-cache models` lists each model's features; `info` their bytes per row",
      metavar="NAME[:KIND][@MEMBER],...", group="teachers")
  views: int = setting(1, "views per example, view 0 un-augmented; 1 = no augmentation", group="views",
                       commands=(BUILD, VIEWS, IMPORT, DEMO_BUILD))
  seed: int = setting(0, "seed of the views and of the order in which examples are stored", group="views",
                      commands=(BUILD, VIEWS, IMPORT, DEMO_BUILD))
  folds: int = setting(1, "cross-fitted targets: each member is K runs given in fold order, run k trained with "
                          "`student-train fit --folds K --holdout-fold k`; a row takes each member's logits from "
                          "the run that did not see its fold (1: no cross-fitting)", group="teachers")
  batch_size: int = setting(256, "rows per forward pass, a multiple of the device count", group="run",
                            commands=(BUILD, VIEWS, IMPORT, EXTEND), helps={VIEWS: ("rows rendered at a time", None)})
  chunk_rows: int | None = setting(None, f"rows per Zarr chunk: the unit of writing, resuming and reading; a "
                                         f"multiple of --views (when more), so that a chunk holds whole examples "
                                         f"and the build decodes each image once (default: {DEFAULT_CHUNK_ROWS} "
                                         f"rounded down to a multiple of --views; for token rows, text: data, "
                                         f"as many rows as {TOKEN_CHUNK_MIB} MiB of the cache's arrays hold, at most "
                                         f"{DEFAULT_CHUNK_ROWS}, at least 1)", metavar="N",
                            group="run", commands=(BUILD, VIEWS, IMPORT, EXTEND, *DERIVE),
                            helps={VIEWS: ("rows per views_*.npz file, a multiple of --views (token rows: by "
                                           f"default as many as {TOKEN_CHUNK_MIB} MiB of their token and segment ids "
                                           f"hold, at most {DEFAULT_CHUNK_ROWS})", None),
                                   EXTEND: ("rows per Zarr chunk of the extended cache, a multiple of its views "
                                            "(default: the cache's if it is one, else the build's default for "
                                            "those views)", None),
                                   **{c: ("rows per Zarr chunk of the new cache (default: the source's, or for "
                                          "views not dividing them a build's default)", None) for c in DERIVE}})
  dtype: str = setting("float16", "storage dtype of logits and targets", choices=STORAGE_DTYPES, group="teachers",
                       commands=(BUILD, IMPORT))
  teacher_sharding: str = setting(
      REPLICATED, "how each teacher's weights lie on this process's devices: 'replicated' (whole on every device) or "
                  "'fsdp' (each weight array split along its longest axis that divides evenly over the devices, "
                  "gathered inside each forward pass: a teacher need not fit on one device); the batch is split over "
                  "the same devices either way, and the store is the same within float rounding", choices=SHARDINGS,
      group="run", identity=False, scope="process", commands=(BUILD, EXTEND))
  generation_temperature: float = setting(
      1.0, "log-probabilities imported: the temperature the teacher's log-probabilities were computed at (vLLM's "
           "raw log-probabilities: 1); the cache's temperature", metavar="Tg", group="teachers", commands=(IMPORT,),
      check=lambda v: 0 < v < math.inf or "must be > 0 and finite")
  retemper: float | None = setting(
      None, "log-probabilities imported: re-temper them from Tg to T: the top k exactly (p^(Tg/T)), the rest as if "
            "spread evenly over the other tokens, its bounds recorded (default: keep Tg)", metavar="T",
      group="teachers", commands=(IMPORT,), check=lambda v: v is None or 0 < v < math.inf or "must be > 0 and finite")
  max_padding_mass: float = setting(
      1e-3, "log-probabilities imported: the most top-k mass a position may put on ids past the vocabulary (a "
            "padded teacher vocabulary's padding, trimmed)", metavar="MASS", group="teachers", commands=(IMPORT,),
      check=lambda v: 0 <= v < 1 or "must be in [0, 1)")
  teacher_tokenizer: str | None = setting(
      None, "log-probabilities imported: the teacher's tokenizer.json, when it is not the student's: its ids are "
            "mapped to the student's by exact token strings, unmapped mass goes to the rest",
      metavar="TOKENIZER.json", group="teachers", commands=(IMPORT,))
  min_mapped_share: float = setting(
      0.9, "a teacher tokenizer given: the least mean share of the teacher's top-k mass that must map to student "
           "tokens", metavar="SHARE", group="teachers", commands=(IMPORT,),
      check=lambda v: 0 <= v <= 1 or "must be in [0, 1]")
  ignore_limits: bool = setting(False, "start even when the output's projected size exceeds the free space of its "
                                       "file system, or its chunks' working memory the available memory (both are "
                                       "checked before anything is written)", group="run",
                                commands=(BUILD, VIEWS, IMPORT, EXTEND, *DERIVE), identity=False, scope="process")


def resolve_defaults(config: BuildConfig) -> BuildConfig:
  """The config with the dataset and split a build reads when none is given, and the default chunk rows rounded
  down to a multiple of `--views` (`check_settings` refuses other chunk rows above `--views` that are not one); a
  build of token rows sizes its default chunk by bytes once the data is opened (`token_chunk_rows`)."""
  config = dataclasses.replace(config, dataset=resolve_dataset(config.dataset), split=config.split or DEFAULT_SPLIT)
  if config.chunk_rows is None:  # Only the default is rounded: a --chunk-rows given is checked (`check_settings`).
    config = dataclasses.replace(config, chunk_rows=default_chunk_rows(config.views))
    if config.chunk_rows != DEFAULT_CHUNK_ROWS:
      _LOG.info(f"chunks of {config.chunk_rows} rows: the default {DEFAULT_CHUNK_ROWS} rounded down to a multiple "
                f"of --views {config.views}")
  return config


def default_chunk_rows(views) -> int:
  """The default chunk rows for `views` views: `DEFAULT_CHUNK_ROWS` rounded down to whole examples."""
  if isinstance(views, int) and 1 <= views < DEFAULT_CHUNK_ROWS:
    return DEFAULT_CHUNK_ROWS // views * views
  return DEFAULT_CHUNK_ROWS


def token_chunk_rows(spec: CacheSpec) -> int:
  """The default chunk rows of a cache of token rows (`spec.positions` L > 0), sized by bytes rather than rows: as many
  rows as `TOKEN_CHUNK_MIB` (64 MiB) holds of the arrays of a row set (every array but the bookkeeping ones, the
  larger per row of the transfer and the eval rows'), at most `DEFAULT_CHUNK_ROWS`, at least 1. A token row holds L
  positions' targets and logits: 4096 rows at L = 256 of dense targets over V = 256 and 2 members' logits in float16
  would be about 1.6 GB a chunk, and the build and the student's shuffle window hold several at once; sized by bytes
  the chunk is about 64 MiB, what a class-level default chunk of 4096 rows of a 1000-class ensemble's dense targets
  and logits holds (4096 · 1000 · 2 bytes · (1 + 2 members) ≈ 25 MB) within a small factor."""
  per_row = max(sum(a.row_bytes for a in spec.arrays if a.role != "bookkeeping" and layout_of(a.name).row_set == rows)
                for rows in (ROWS, EVAL_ROWS))
  return rows_in_token_chunk(per_row)


def rows_in_token_chunk(row_bytes: int) -> int:
  """How many token rows of `row_bytes` each a default chunk (of a cache, or of `teacher-cache views`' files) holds:
  as many as `TOKEN_CHUNK_MIB` holds, at most `DEFAULT_CHUNK_ROWS`, at least 1."""
  return max(1, min(DEFAULT_CHUNK_ROWS, TOKEN_CHUNK_MIB * 2 ** 20 // max(row_bytes, 1)))


def kept_chunk_rows(given: int | None, source: int, views: int) -> int:
  """The chunk rows of a cache derived from one of `source` chunk rows (`extend`, `convert`, `subset`, `merge`): those
  given, else the source's when they hold whole examples of `views` views (or fewer rows than a view count), else
  the build's default for `views` (`default_chunk_rows`)."""
  if given is not None:
    return given
  return source if source % views == 0 or source < views else default_chunk_rows(views)


SAMPLE_STREAM = 0x5A17  # Folded into the build's seed for `sample:K` draws, apart from the views' randomness.


_LOG = logger(__name__)


def _member_specs(teachers: list[Teacher], transfer_set: TransferSet, input_shape: tuple[int, ...],
                  batch_size: int, positions: int = 0) -> tuple[list[MemberSpec], int]:
  """Checks every member against the rendered views' `input_shape` (at the batch size it will run at) and each
  other (with token rows of `positions` L, that each outputs [B, L, V] logits); returns their specs and the class
  count."""
  specs, classes, digests = [], {}, {}
  for teacher in teachers:
    if teacher.record is not None and teacher.record.specialist is not None:
      raise StillroomError(f"{teacher.source!r} is a specialist run (its outputs are classes "
                           f"{list(teacher.record.specialist.classes)} and a dustbin), not an ensemble member: give it "
                           "after --specialists PLAN.json.")
    if teacher.digest in digests:
      raise StillroomError(f"teachers {digests[teacher.digest]!r} and {teacher.source!r} have the same parameters; "
                           "an ensemble member given twice only weighs it double.")
    digests[teacher.digest] = teacher.source
    spec, classes[teacher.name] = _member_spec(teacher, transfer_set, input_shape, batch_size, positions)
    specs.append(spec)
  if len(set(classes.values())) != 1:
    raise StillroomError(f"ensemble members have different class counts: {classes}.")
  num_classes = next(iter(classes.values()))
  if transfer_set.num_classes is not None and transfer_set.num_classes > num_classes:
    raise StillroomError(
        f"dataset {transfer_set.name!r} has {transfer_set.num_classes} classes but the teachers output "
        f"{num_classes} logits.")
  return specs, num_classes


def _member_spec(teacher: Teacher, transfer_set: TransferSet, input_shape: tuple[int, ...],
                 batch_size: int, positions: int = 0) -> tuple[MemberSpec, int]:
  """A teacher's spec and class count, once it is known to take the rendered views' `input_shape` (and with token
  rows of `positions` L, to output logits [B, L, V])."""
  normalization = teacher.normalization or transfer_set.normalization
  what = f"teacher {teacher.name!r} ({teacher.model})"
  trained_on = None if teacher.record is None else tuple(teacher.record.model.input_shape)
  if trained_on is not None and trained_on != tuple(input_shape):
    rendered = tuple(transfer_set.input_shape) != tuple(input_shape)
    raise StillroomError(f"{what} takes inputs of shape {trained_on}, but "
                         + (f"the views are rendered at {tuple(input_shape)} (--image-size {input_shape[0]}); build "
                            "with the --image-size it was trained at." if rendered else
                            f"{transfer_set.name!r} holds inputs of shape {tuple(input_shape)}."))
  out = check_input_shape(teacher.apply_fn, teacher.params, input_shape, what, batch_size)
  # `check_input_shape` holds token rows' models to [B, L, V]; a class-level cache takes [B, C] of any other input.
  if not positions and len(out.shape) != 2:
    raise StillroomError(f"{what} outputs logits of shape {tuple(out.shape)}; a class-level cache takes [B, C] (a "
                         "language model's [B, L, V] needs a text transfer set, `--dataset text:PATH`).")
  return MemberSpec(name=teacher.name, source=teacher.source, model=teacher.model, num_params=teacher.num_params,
                    digest=teacher.digest, trained_epochs=teacher.trained_epochs,
                    normalization=normalization.to_dict()), int(out.shape[-1])


def _specialists(config: BuildConfig, teachers: list[Teacher], transfer_set: TransferSet, input_shape: tuple,
                 num_classes: int) -> tuple[list[Teacher], list[SpecialistSpec]]:
  """The specialist runs of `--specialists PLAN.json RUN...`, in the plan's order, and their specs.

  Raises:
    StillroomError: not one generalist; sparse targets; a run that is not a specialist of this plan, or is one of
      another's classes twice; a plan for another class count.
  """
  if len(teachers) != 1 or config.folds > 1:
    raise StillroomError("--specialists combine with one generalist: give one --teacher (and no --folds).")
  if not 1 <= config.top_n <= num_classes:
    raise StillroomError(f"--top-n must be in 1..{num_classes} (the classes), got {config.top_n}.")
  if CacheSpec.canonical_targets(config.targets) != "dense":
    raise StillroomError("a cache of specialists stores dense targets (their combination q): drop --targets.")
  if not config.specialist_runs:
    raise StillroomError("--specialists takes PLAN.json and then the specialist run dirs.")
  plan = SpecialistPlan.read(config.specialist_plan)
  if plan.dataset_fingerprint and plan.dataset_fingerprint != transfer_set.fingerprint:
    _LOG.warning(f"specialist plan {config.specialist_plan!r} was made from a cache of other data (fingerprint "
                 f"{plan.dataset_fingerprint[:16]}…) than {transfer_set.name!r} {transfer_set.split!r}.")
  if plan.num_classes != num_classes:
    raise StillroomError(f"specialist plan {config.specialist_plan!r} is for {plan.num_classes} classes; the "
                         f"generalist outputs {num_classes}.")
  found = {}
  for reference in config.specialist_runs:
    run = load_teacher(reference, config.compute_dtype, host=True)
    record = None if run.record is None else run.record.specialist
    if record is None:
      raise StillroomError(f"{reference!r} is not a specialist run (one trained with `student-train fit "
                           "--specialist`).")
    if record.classes not in plan.subsets:
      raise StillroomError(f"specialist {reference!r} covers classes {list(record.classes)}, which are not a subset "
                           f"of the plan {config.specialist_plan!r}.")
    if record.generalist_digest is not None and record.generalist_digest != teachers[0].digest:
      raise StillroomError(f"specialist {reference!r} was started from another generalist (parameters "
                           f"{record.generalist_digest[:12]}…) than --teacher {teachers[0].source!r} "
                           f"({teachers[0].digest[:12]}…): give the generalist it was trained from.")
    if record.classes in found:
      raise StillroomError(f"specialists {found[record.classes][0].source!r} and {run.source!r} both cover classes "
                           f"{list(record.classes)}; give one.")
    member, outputs = _member_spec(run, transfer_set, input_shape, config.batch_size)
    if outputs != len(record.classes) + 1:
      raise StillroomError(f"specialist {reference!r} outputs {outputs} logits; its {len(record.classes)} classes "
                           "and a dustbin are one more.")
    found[record.classes] = run, SpecialistSpec(run=member, classes=record.classes,
                                                dustbin_correction=record.dustbin_correction)
  ordered = [found[subset] for subset in plan.subsets if subset in found]
  return [run for run, _ in ordered], [spec for _, spec in ordered]


def _check_folds(teachers: list[Teacher], folds: int) -> None:
  """With cross-fitting, run k of each member must have been trained without fold k (as its record says)."""
  if len(teachers) % folds:
    raise StillroomError(f"--folds {folds} needs {folds} runs per member (member-major: member 0's runs for folds "
                         f"0..{folds - 1}, then member 1's, ...); got {len(teachers)} teachers.")
  for position, teacher in enumerate(teachers):
    if teacher.record is None:
      _LOG.info(f"cross-fitting: cannot check which fold {teacher.name!r} held out (not a stillroom run); trusting the "
                f"order given (fold {position % folds}).")
      continue
    cross_fit = teacher.record.cross_fit
    recorded = (None, None) if cross_fit is None else (cross_fit.folds, cross_fit.holdout_fold)
    if recorded != (folds, position % folds):
      raise StillroomError(
          f"teacher {teacher.source!r} is run {position % folds} of member {position // folds}, so it must be "
          f"trained with `student-train fit --folds {folds} --holdout-fold {position % folds}`; its record says "
          f"`--folds {recorded[0]} --holdout-fold {recorded[1]}` (student-train).")


def targets_of_logits(spec: CacheSpec):
  """What a cache stores of its members' logits, as a pure (jittable) function of them: the one place where both
  `build` and `import` turn logits into stored arrays.

  Returns:
    `(logits float32 [B, M, C], example indices uint32 [B], views int32 [B]) -> (stored logits [B, M, C] in the
    storage dtype, targets, finite [B, M], finite targets [B])`, the targets a dict of what the spec stores
    (`{"targets": [B, C]}`, or the sparse arrays). Targets are computed from the logits *as stored* (rounded to the
    storage dtype), so that a reader re-deriving them from `member_logits` gets the stored `targets` back. A
    `sample:K` row's draws depend on the build's seed, its example and its view alone. A token cache (`positions`
    L) takes logits [B, L, M, C] (position j's predicting token j + 1) and stores [B, L, ...] arrays; its finite
    flags are per row ([B, M], [B]: every position's), and a `sample:K` draw of position j depends on (seed,
    example, view, j) alone.
  """
  storage_dtype = jnp.dtype(spec.dtype)
  dtypes = {a.name: jnp.dtype(a.dtype) for a in spec.arrays}
  draws = jax.random.fold_in(jax.random.key(spec.augmentation.seed), SAMPLE_STREAM)

  def row_keys(index, view):
    """[B] one key per row (or [B, L] one per position of a token row): a function of its example and view alone."""
    keys = jax.vmap(lambda i, v: jax.random.fold_in(jax.random.fold_in(draws, v), i))(
        index.astype(jnp.uint32), view.astype(jnp.uint32))
    if not spec.positions:
      return keys
    return jax.vmap(lambda key: jax.vmap(lambda j: jax.random.fold_in(key, j))(
        jnp.arange(spec.positions, dtype=jnp.uint32)))(keys)

  def stored_targets(log_probs, index, view) -> dict:
    if spec.target_kind == "dense":
      return {"targets": log_probs}
    if spec.target_kind == "topk":
      sparse = top_k_targets(log_probs, spec.target_k)
      return {"target_ids": sparse["ids"], "target_log_probs": sparse["log_probs"], "target_rest": sparse["log_rest"]}
    keys = row_keys(index, view)
    # Token rows: every position a row of its own, drawn with its own key (the draws are a function of each row).
    sparse = sampled_targets(log_probs.reshape(-1, log_probs.shape[-1]), spec.target_k, keys.reshape(-1))
    sparse = {name: values.reshape(*log_probs.shape[:-1], spec.target_k) for name, values in sparse.items()}
    return {"target_ids": sparse["ids"], "target_log_probs": sparse["log_probs"], "target_counts": sparse["counts"]}

  def stored_and_targets(logits, index, view):
    stored = logits.astype(storage_dtype)
    log_probs = combine_log_probs(stored, spec.temperature, spec.combine)
    if spec.target_kind == "dense":
      log_probs = log_probs.astype(storage_dtype)  # Rounded once, as stored.
    targets = {name: values.astype(dtypes[name]) for name, values in stored_targets(log_probs, index, view).items()}
    finite, finite_members = jnp.all(jnp.isfinite(log_probs), axis=-1), jnp.all(jnp.isfinite(stored), axis=-1)
    if spec.positions:  # Per row: every position's.
      finite, finite_members = jnp.all(finite, axis=1), jnp.all(finite_members, axis=1)
    return stored, targets, finite_members, finite

  return stored_and_targets


def _make_forwards(teachers: list[Teacher], spec: CacheSpec, mesh, param_shardings):
  """The two jitted forwards of all runs, both with finite flags `[B, M]` for the stored logits, the weights `params`
  (every run's, in order) placed with `param_shardings` (`place_teachers`):

  A token cache's member logits are [B, L, M, C] (a language model's [B, L, C] per member), its finite flags still
  per row.

  - rows: `(params, inputs [B, ...], folds [B], example indices [B], views [B]) -> (member logits [B, M, C],
    targets, finite, finite targets [B])` (`targets_of_logits`). Cross-fitted, each row takes each member's logits
    from the run that held out the row's fold.
  - eval: `(params, inputs [B, ...]) -> (member logits [B, M, C], finite)`, a cross-fitted member's logits being the
    mean of its runs (none of them trained on the eval split).
  """
  normalizations = [Normalization.from_dict(m.normalization) for m in spec.members]
  apply_fns = [t.apply_fn for t in teachers]
  storage_dtype = jnp.dtype(spec.dtype)
  stored_and_targets = targets_of_logits(spec)
  num_runs = len(spec.members)  # Then the specialists, in the spec's order.

  def run_logits(params, x, features: bool = False):
    """`[B, M, K, C]` logits of every run, and with `features` the stored features (a cache with features has one
    run per member)."""
    outputs, stored = [], {}
    for run, (f, p, n) in enumerate(zip(apply_fns, params, normalizations)):
      wanted = [feature for feature in spec.features if feature.member == run] if features else []
      if wanted:
        z, named = teachers[run].features_fn(p, n.apply(x))
        # Features of a teacher computing in bfloat16 are bfloat16: attention maps and pooling are float32.
        stored.update({feature.array_name: stored_feature(named[feature.name].astype(jnp.float32),
                                                          feature.kind).astype(FEATURE_DTYPE)
                       for feature in wanted})
      else:
        z = f(p, n.apply(x))
      outputs.append(z.astype(jnp.float32))  # Before the ensemble's log-softmax and log-sum-exp.
    # Members at axis -2 ([B, R, C], or a language model's [B, L, R, C]), as `shared.ensemble` takes them.
    runs = jnp.stack(outputs, axis=-2)
    return runs.reshape(*runs.shape[:-2], spec.num_members, spec.folds, runs.shape[-1]), stored

  def rows_forward(params, x, fold, index, view):
    runs, features = run_logits(params[:num_runs], x, features=True)  # [B, M, K, C] ([B, L, M, 1, C]: one fold)
    if spec.positions:
      logits = runs[..., 0, :]
    else:
      logits = jnp.take_along_axis(runs, jnp.maximum(fold, 0)[:, None, None, None], axis=2)[:, :, 0]
    if spec.specialists:
      return specialist_forward(params[num_runs:], x, logits)
    stored, targets, finite, finite_targets = stored_and_targets(logits, index, view)
    return stored, {**targets, **features}, finite, finite_targets

  def specialist_forward(params, x, logits):
    """The generalist's logits [B, 1, C] and each specialist's (dustbin corrected, padded to [B, S, P]) as stored,
    and their combination q as the targets (`shared.specialists.specialist_log_probs`)."""
    width, outputs = spec.specialist_width, []
    for f, p, specialist in zip(apply_fns[num_runs:], params, spec.specialists):
      z = f(p, Normalization.from_dict(specialist.run.normalization).apply(x)).astype(jnp.float32)
      n = len(specialist.classes)
      padded = jnp.zeros((z.shape[0], width), jnp.float32).at[:, :n].set(z[:, :n])
      outputs.append(padded.at[:, -1].set(z[:, n] + specialist.dustbin_correction))
    stored, specialist_logits = logits.astype(storage_dtype), jnp.stack(outputs, axis=1).astype(storage_dtype)
    active, log_q = specialist_log_probs(stored[:, 0], specialist_logits, classes, spec.temperature, spec.top_n)
    targets = {"targets": log_q.astype(storage_dtype), "specialist_logits": specialist_logits,
               "specialist_active": active}
    finite = jnp.all(jnp.isfinite(log_q), axis=-1) & jnp.all(jnp.isfinite(specialist_logits), axis=(1, 2))
    return stored, targets, jnp.all(jnp.isfinite(stored), axis=-1), finite

  classes = class_matrix([s.classes for s in spec.specialists], spec.specialist_width)

  def eval_forward(params, x):
    stored = jnp.mean(run_logits(params[:num_runs], x)[0], axis=-2).astype(storage_dtype)
    finite = jnp.all(jnp.isfinite(stored), axis=-1)
    return stored, jnp.all(finite, axis=1) if spec.positions else finite

  data, params = batch_sharding(mesh), param_shardings
  return (jax.jit(rows_forward, in_shardings=(params, data, data, data, data), out_shardings=(data, data, data, data)),
          jax.jit(eval_forward, in_shardings=(params, data), out_shardings=(data, data)))


def place_teachers(teachers: list[Teacher], mesh, sharding: str) -> tuple[list, list]:
  """Every run's weights on this process's devices, from the host arrays each process loaded (`load_teacher(...,
  host=True)`): replicated, or with `sharding` "fsdp" each array split over the devices
  (`shared.parallel.fsdp_spec`). With FSDP it logs what each device holds, and warns of a teacher none of whose
  arrays divides evenly over the devices (it stays whole on every device).

  Returns:
    `(params, shardings)`: the weights of each run, in order, as placed, and their `NamedSharding`s (same structure).
  """
  weights = [teacher.params for teacher in teachers]
  shardings = weight_shardings(weights, mesh, sharding)
  params = put_sharded(weights, shardings)
  if sharding == FSDP and mesh.devices.size > 1:
    for teacher, placed in zip(teachers, params):
      whole, held = bytes_per_device(placed)
      if held == whole:
        _LOG.warning(f"--teacher-sharding fsdp: no weight array of teacher {teacher.name!r} has an axis divisible by "
                     f"the {mesh.devices.size} devices; it is replicated on each of them.")
    whole, held = bytes_per_device(params)
    _LOG.info(f"--teacher-sharding fsdp: {limits.human_bytes(held)} of the teachers' {limits.human_bytes(whole)} of "
              f"weights on each of {mesh.devices.size} devices")
  return params, shardings


def _as_recorded(spec: CacheSpec, existing: CacheSpec, data: dict) -> CacheSpec:
  """The spec to compare with an existing store's, as that store's stillroom would have written it: a store of
  stillroom <= 0.2 recorded version-1 fingerprints (where the data still matches them, those), one written before
  schema 6 its own version (the same build, whose completion record binds nothing or, resumed here, binds), and one
  written before the grouped row order its permuted order (and its default chunk rows). `data`
  maps "dataset" / "eval_dataset" to the opened transfer sets."""
  changes = {}
  if existing.schema_version == spec.legacy_schema_version():
    changes["schema_version"] = existing.schema_version
  if existing.row_order == PERMUTED and spec.row_order == GROUPED:
    # A store built before the grouped order is resumed (or confirmed) in its own order, and in its chunk rows where
    # the command's are the default (then a whole number of examples, before the old default, 4096).
    changes["row_order"] = PERMUTED
    if spec.chunk_rows == default_chunk_rows(spec.views) and existing.chunk_rows == DEFAULT_CHUNK_ROWS:
      changes.update(chunk_rows=existing.chunk_rows, arrays=())  # The arrays' chunks derived again.
  for field, transfer_set in data.items():
    recorded = getattr(existing, field)
    if transfer_set is not None and recorded is not None:
      fingerprint, version = transfer_set.as_recorded(recorded.fingerprint, recorded.fingerprint_version)
      changes[field] = dataclasses.replace(getattr(spec, field), fingerprint=fingerprint, fingerprint_version=version)
  return dataclasses.replace(spec, **changes) if changes else spec


def open_store(config: BuildConfig, spec: CacheSpec, data: dict) -> Cache | None:
  """Creates the store, or reopens one with the same build key to resume; None when it is already complete.
  `data` maps "dataset" / "eval_dataset" to the opened transfer sets. Call it holding the output's lock."""
  if config.overwrite:
    clear_for_overwrite(config.out, STORE)  # What it keeps is not a store: the store is created beside it.
  if storage.has_entries(config.out) and not config.overwrite:
    try:
      existing = open_cache(config.out, mode="r+", require_complete=False)
    except StillroomError as e:
      raise StillroomError(f"--out {config.out!r} exists and is not a usable stillroom cache ({e}); pass "
                           "--overwrite to replace it, or choose another --out.") from e
    _same_settings(existing, spec, data, config.out, "other settings",
                   "Pass --overwrite to replace it, or choose another --out.")
    if existing.complete:
      problems = integrity_problems(existing)
      if problems:
        raise StillroomError(f"--out {config.out!r} holds a complete cache with these settings, but it is damaged: "
                             f"{'; '.join(problems)}. Pass --overwrite to rebuild it.")
      _LOG.info(f"{config.out} is already complete with these settings; nothing to do.")
      return None
    _remove_partial_files(config.out)
    create_arrays(existing.group, existing.spec)
    return existing
  with storage_errors(f"creating the store {config.out}"):
    # Not open_group's mode "w-", which refuses a directory holding anything, such as what --overwrite kept.
    group = zarr.create_group(storage.zarr_store(config.out), overwrite=False, attributes={SPEC_KEY: spec.to_attrs()})
    create_arrays(group, spec)
  return Cache(path=config.out, group=group, spec=spec, completion=None)


def _same_settings(existing: Cache, spec: CacheSpec, data: dict, out: str, which: str, advice: str) -> Cache:
  """Returns `existing` if it was built with the settings of `spec`.

  Raises:
    StillroomError: listing the differences.
  """
  differences = existing.spec.mismatches(_as_recorded(spec, existing.spec, data))
  if differences:
    raise StillroomError(f"--out {out!r} holds a cache built with {which}: " + "; ".join(differences) + ". "
                         + advice)
  return existing


def _remove_partial_files(path: str) -> None:
  """Deletes the temporary files a killed build left: zarr's LocalStore writes `<key>.<uuid>.partial`, then
  renames it, so a `.partial` file is never part of the store. (An object store writes each object whole.)"""
  path = storage.local(path)
  if storage.is_url(path):
    return
  stale = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names
           if name.endswith(".partial")]
  for file in stale:
    os.remove(file)
  if stale:
    _LOG.info(f"removed {len(stale)} partial file(s) left by the interrupted build")


def _input_paths(config: BuildConfig) -> list[str]:
  """The files and directories the build reads: teacher run dirs, npz and image-folder datasets, the data dir."""
  runs = [*config.teachers, *config.specialist_runs, *([config.specialist_plan] if config.specialist_plan else [])]
  paths = [run for run in runs if storage.exists(run)]
  datasets = [local_path(name) for name in (config.dataset, config.eval_dataset) if name]
  return paths + [path for path in datasets + [config.data_dir] if path]


def _eval_set(config: BuildConfig) -> TransferSet | None:
  """The eval split whose member logits the cache stores: as asked, or 'test' if the dataset has one."""
  if config.eval_split == NO_EVAL:
    return None
  if config.eval_dataset:
    eval_set = open_transfer_set(config.eval_dataset, config.eval_split or default_eval_split(config.eval_dataset),
                                 config.data_dir, text=text_options(config))
  elif config.eval_split is not None:
    eval_set = open_transfer_set(config.dataset, config.eval_split, config.data_dir, text=text_options(config))
  else:
    try:
      eval_set = open_transfer_set(config.dataset, "test", config.data_dir, text=text_options(config))
    except StillroomError:
      return None  # No test split: nothing to store unless asked for.
  return eval_set


def open_views(config: BuildConfig) -> tuple[TransferSet, Augmentation]:
  """The transfer set and the views of its rows that `config` asks for (build, `views` and `import` alike).

  Raises:
    StillroomError: bad data, or view settings that do not fit it.
  """
  transfer_set = open_transfer_set(config.dataset, config.split, config.data_dir, text=text_options(config))
  check_text_views(config, transfer_set)
  if config.views > 1 and len(transfer_set.input_shape) < 2:
    raise StillroomError(f"--views {config.views} needs image inputs; {config.dataset!r} holds flat vectors of "
                         f"shape {transfer_set.input_shape}, which take no augmentation. Use --views 1.")
  if config.image_size is not None and config.max_shift != BuildConfig.max_shift:
    raise StillroomError("--max-shift shapes shift views; crop views (--image-size) take no shift.")
  check_prepared_views(transfer_set, config.image_size)
  augmentation = make_augmentation(
      transfer_set.input_shape, transfer_set.input_dtype, config.dataset, seed=config.seed,
      max_shift=config.max_shift, flip=config.flip, image_size=config.image_size, crop_area=config.crop_area,
      crop_aspect=config.crop_aspect, renderer=config.renderer, canvas_shape=transfer_set.canvas_shape,
      mix=config.mix)
  return transfer_set, augmentation


def make_spec(config: BuildConfig, transfer_set: TransferSet, eval_set: TransferSet | None,
              augmentation: Augmentation, members: list[MemberSpec], num_classes: int,
              specialists: tuple[SpecialistSpec, ...] = (), features: tuple[FeatureSpec, ...] = ()) -> CacheSpec:
  """The spec of a cache of `members`' outputs (and `specialists`', and `features`) with the build settings of
  `config`."""
  targets = CacheSpec.canonical_targets(config.targets)
  dataset = transfer_set.describe()
  return CacheSpec(
      temperature=float(config.temperature), combine=config.combine, members=tuple(members),
      dataset=dataset, eval_dataset=None if eval_set is None else eval_set.describe(), positions=positions_of(dataset),
      num_classes=num_classes, views=config.views, augmentation=augmentation,
      dtype=config.dtype, chunk_rows=config.chunk_rows, folds=config.folds, targets=targets,
      member_logits=config.member_logits or targets == "dense", software_version=__version__, created_at=now_iso(),
      specialists=tuple(specialists), top_n=config.top_n if specialists else 0,
      features=tuple(features), compute_dtype=config.compute_dtype,
      # The bound is the ensemble rules' (`shared.precision`): none is claimed for the specialists' combination q,
      # but a float32 build's, q's included, is reproducible.
      target_tolerance=None if specialists and config.compute_dtype != DEFAULT_COMPUTE_DTYPE else
      target_tolerance(config.compute_dtype, config.temperature))


def _plan(config: BuildConfig, chunk_rows_given: bool = True) -> tuple:
  """What a build computes, from its settings: `(config with the batch size capped to a chunk, mesh, transfer set,
  eval set or None, teachers, spec)`. Without `chunk_rows_given` (no --chunk-rows), a cache of token rows takes
  `token_chunk_rows` of its spec, known once the data and teachers are opened, in the config and the spec.

  Raises:
    StillroomError: bad settings, data or teachers.
  """
  mesh = data_mesh()
  check_batch_size(config.batch_size, mesh)
  batch_size = cap_batch(config.batch_size, config.chunk_rows, mesh.devices.size)  # A batch never spans chunks.
  if batch_size < config.batch_size:
    _LOG.info(f"--batch-size {config.batch_size} is more than a chunk ({config.chunk_rows} rows): batches of "
              f"{batch_size}")
    config = dataclasses.replace(config, batch_size=batch_size)
  transfer_set, augmentation = open_views(config)
  positions = positions_of(transfer_set.describe())
  if positions:
    check_token_settings(config, positions)
  eval_set = _eval_set(config) if not config.specialist_plan else None
  if config.specialist_plan and (config.eval_split not in (None, NO_EVAL) or config.eval_dataset):
    _LOG.info("a cache of specialists stores no eval split (its students evaluate on their own): --eval-* ignored")
  teachers = [load_teacher(reference, config.compute_dtype, host=True)  # Placed by `place_teachers`.
              for reference in config.teachers]
  if config.folds > 1:
    _check_folds(teachers, config.folds)
  input_shape = augmentation.output_shape(transfer_set.input_shape)
  members, num_classes = _member_specs(teachers, transfer_set, input_shape, config.batch_size, positions)
  if eval_set is not None:
    check_eval_set(eval_set, transfer_set, augmentation, num_classes)
  specialists, specialist_specs = [], []
  if config.specialist_plan:
    specialists, specialist_specs = _specialists(config, teachers, transfer_set, input_shape, num_classes)
  if config.features is not None and (config.folds > 1 or config.specialist_plan):
    raise StillroomError("--features stores the features of plain members: not with --folds or --specialists.")
  features = _feature_specs(config.features, teachers, input_shape) if config.features is not None else ()
  spec = make_spec(config, transfer_set, eval_set, augmentation, members, num_classes, tuple(specialist_specs),
                   features)
  rows = token_chunk_rows(spec) if positions and not chunk_rows_given else spec.chunk_rows
  if rows != spec.chunk_rows:
    _LOG.info(f"chunks of {rows:,} token rows: about {TOKEN_CHUNK_MIB} MiB each (--chunk-rows sets them)")
    config = dataclasses.replace(config, chunk_rows=rows,
                                 batch_size=cap_batch(config.batch_size, rows, mesh.devices.size))
    spec = dataclasses.replace(spec, chunk_rows=rows, arrays=())  # The arrays' chunks derived again.
  if features:
    feature_bytes = sum(a.row_bytes for a in spec.arrays if a.role == "feature")
    teacher_bytes = sum(a.row_bytes for a in spec.arrays if a.role == "teacher")
    _LOG.info(f"--features: {feature_bytes:,} bytes per row, {feature_bytes / teacher_bytes:.1f}x the "
              f"{teacher_bytes:,} of the targets and logits; "
              f"{feature_bytes * spec.num_rows / 2 ** 20:,.1f} MiB of features for {spec.num_rows:,} rows")
  return config, mesh, transfer_set, eval_set, teachers + specialists, spec


def _feature_specs(text: str, teachers: list[Teacher], input_shape: tuple[int, ...]) -> tuple[FeatureSpec, ...]:
  """The features `--features` asks for, with their stored shapes.

  Raises:
    StillroomError: a malformed entry; a member out of range, without named features, or without that feature
      (naming the ones it has); a kind its feature cannot take.
  """
  found, member_features = [], {}
  for name, kind, member in parse_features(text):
    if member is not None and member >= len(teachers):
      raise StillroomError(f"--features {name}@{member}: the ensemble has members 0..{len(teachers) - 1}.")
    for m in [member] if member is not None else range(len(teachers)):
      teacher = teachers[m]
      if teacher.features_fn is None:
        raise StillroomError(f"--features: teacher {teacher.name!r} (member {m}) names no features (registry models "
                             "and NNX modules with a `features` method do).")
      if m not in member_features:  # Traced once per member, whatever the number of its features asked for.
        member_features[m] = jax.eval_shape(teacher.features_fn, teacher.params,
                                            jax.ShapeDtypeStruct((2, *input_shape), jnp.float32))[1]
      named = member_features[m]
      if name not in named:
        raise StillroomError(f"--features {name}: teacher {teacher.name!r} (member {m}) has features "
                             f"{', '.join(named) or 'none'}.")
      value = named[name]
      if not (hasattr(value, "shape") and len(value.shape) in (2, 4) and value.shape[0] == 2 and min(value.shape)):
        raise StillroomError(f"--features {name}: teacher {teacher.name!r} (member {m}) gives it shape "
                             f"{getattr(value, 'shape', type(value).__name__)} for a batch of 2; a cache stores "
                             "[B, D] vectors and [B, H, W, C] maps.")
      if kind == "attention" and len(value.shape) != 4:
        raise StillroomError(f"--features {name}:attention (member {m}): the attention map of a vector "
                             f"{list(value.shape[1:])} is not defined; use :map or :pooled.")
      shape = jax.eval_shape(lambda f: stored_feature(f, kind), value).shape[1:]
      found.append(FeatureSpec(name=name, kind=kind, member=m, shape=tuple(shape)))
  if len({f.array_name for f in found}) != len(found):
    raise StillroomError(f"--features {text!r} names a feature twice.")
  # One order however the list was written, so that a rebuild spelled otherwise is the same build.
  return tuple(sorted(found, key=lambda f: (f.member, f.name, list(FEATURE_KINDS).index(f.kind))))


def positions_of(dataset) -> int:
  """L of a transfer set of token rows (its `DatasetSpec` records `text`, `shared.data.text`): the positions a
  cache of it holds per row; 0 for other data (a class-level cache)."""
  text = getattr(dataset, "text", None)
  return int(text["seq_len"]) if text else 0


# What a cache of token rows does not take beyond the view settings (`shared.data.text.check_views` refuses those
# as the data is opened): (the option, whether `config` sets it, why).
TOKEN_REFUSALS = (
    ("--specialists", lambda c: bool(c.specialist_plan), "specialists are class-level (Hinton et al.'s classes)"),
    ("--folds", lambda c: c.folds != 1, "cross-fitting is class-level"),
    ("--features", lambda c: c.features is not None, "teacher features of token rows are not stored"),
)


def check_token_settings(config: BuildConfig, positions: int) -> None:
  """Refuses, naming the option, what a cache of token rows (`positions` L) does not take.

  Raises:
    StillroomError: the first such option given.
  """
  for option, given, why in TOKEN_REFUSALS:
    if given(config):
      raise StillroomError(f"{option}: {config.dataset!r} holds token rows ({positions} positions, a language "
                           f"model's next tokens): {why}.")


def check_settings(config: BuildConfig, out: str = "CACHE.zarr") -> None:
  """The scalar settings of `build`, `views` and `import`, checked before anything is read or written; `out` is how
  the error for a missing `--out` names it.

  Raises:
    StillroomError: naming the option and the value.
  """
  validate_settings(temperature=config.temperature, combine=config.combine, dtype=config.dtype,
                    views=config.views, chunk_rows=config.chunk_rows, seed=config.seed, folds=config.folds,
                    targets=config.targets)
  if config.chunk_rows % config.views and config.chunk_rows > config.views:
    # A chunk of whole examples: the build decodes each image once (the grouped row order stores an example's views
    # in adjacent rows), also when chunks are shared out among processes or resumed. (Views more than a chunk's rows
    # span chunks whatever their size: each image is then decoded once per chunk it is in.)
    below = config.chunk_rows // config.views * config.views
    raise StillroomError(f"--chunk-rows {config.chunk_rows} is not a multiple of --views {config.views}, so a chunk "
                         f"would split an example's views (each image is decoded once per chunk it is in); give "
                         f"{below} or {below + config.views}, or none (the default is a multiple of --views)" + (
                             # Only a store already at --out may be one written before the grouped row order.
                             "; a store built with these chunk rows before the grouped row order can only be rebuilt "
                             "(--overwrite)" if config.out and storage.has_entries(config.out) else "") + ".")
  if config.batch_size < 1:
    raise StillroomError(f"--batch-size must be >= 1, got {config.batch_size}.")
  if config.features is not None:
    parse_features(config.features)
  if workers_check(config.workers) is not True:
    raise StillroomError(f"--workers {workers_check(config.workers)}, got {config.workers}.")
  if parse_mix(config.mix or NO_MIX)[0] != NO_MIX and config.views < 2:
    raise StillroomError(f"--mix {config.mix} mixes views 1.. with partner views 1.. (view 0 stays clean): give "
                         f"--views 2 or more, got {config.views}.")
  if not config.out:
    raise StillroomError(f"give --out {out}.")


IGNORE_LIMITS = "--ignore-limits"
# How many chunks' worth of its arrays a build holds at once: 4.2 measured on a local disk (`bench/build_memory.py`:
# peak RSS of 8 chunks of 99 MB, less that of 1.5 MB chunks; the chunk being computed, its concatenated copy and the
# one being written, with Zarr's encoded copy), and 2 more for the chunks the writer's queue holds when the store is
# slower than the teachers (an object store), which that local measurement does not reach.
WORKING_CHUNKS = 6


def chunk_bytes(spec: CacheSpec) -> int:
  """The bytes of one chunk of every array of a row set (the larger of the transfer and the eval rows'), padded to
  the chunk shape as Zarr writes it."""
  return max(sum(a.chunk_bytes for a in spec.arrays if a.role != "bookkeeping" and layout_of(a.name).row_set == rows)
             for rows in (ROWS, EVAL_ROWS))


def projected_bytes(spec: CacheSpec, block: int = 1) -> int:
  """The bytes a complete store of `spec` takes on a file system of allocation unit `block`: every chunk of every
  array whole (an edge chunk padded to the chunk shape) with its checksum, each file in whole blocks, and (block > 1,
  a local store) the directories and metadata files Zarr makes: three per array and one per chunk and dimension
  beyond the first."""
  def metadata_files(array) -> int:
    return 3 + (len(array.shape) - 1) * math.ceil(array.shape[0] / array.chunks[0]) if block > 1 else 0
  return 2 * block + sum(a.stored_bytes(block) + metadata_files(a) * block for a in spec.arrays)


def check_limits(config: BuildConfig, spec: CacheSpec, disk: bool = True) -> None:
  """Refuses, before anything is written, a build (or import) whose chunks would not fit in the available memory
  (`WORKING_CHUNKS` of them at once), or (`disk`) whose store would not fit in the free space of `--out`'s file
  system (`projected_bytes`, less what a store already there holds: a resumed build rewrites it in place, and
  `--overwrite` deletes it first: `shared.limits.check_disk`). `--ignore-limits` skips both checks; an object store's
  free space is not known.

  Raises:
    StillroomError: naming both sizes and the option.
  """
  if config.ignore_limits:
    return
  limits.check_limits(
      config.out, unit=f"one chunk of {spec.chunk_rows:,} rows", unit_bytes=chunk_bytes(spec), copies=WORKING_CHUNKS,
      held="computed, queued and written", advice=f"give a smaller --chunk-rows (the store has {spec.num_rows:,} rows)",
      what=f"the store of {spec.num_rows:,} rows ({spec.num_examples:,} examples x {spec.views:,} views)",
      total=projected_bytes(spec, limits.block_size(config.out)) if disk else 0, override=IGNORE_LIMITS, disk=disk)


def build_cache(config: BuildConfig) -> str:
  """Builds (or resumes, or confirms) a cache; returns its path.

  Raises:
    StillroomError: bad settings, data or teachers; an existing store with other settings; non-finite teacher
      outputs (naming the member and example index; the store is left incomplete).
  """
  chunk_rows_given = config.chunk_rows is not None  # Else token rows take `token_chunk_rows` (`_plan`).
  config = resolve_defaults(config)
  check_settings(config)
  if not config.teachers:
    raise StillroomError("give at least one --teacher (a run dir or module:function).")
  distributed.initialize(config.coordinator, config.num_processes, config.process_id, config.heartbeat_timeout,
                         config.join_timeout)
  distributed.check_same_settings(config)
  first = distributed.is_first()
  with contextlib.ExitStack() as lock:

    def plan(is_process_0: bool):
      check_not_an_input(config.out, _input_paths(config), "--out")
      if is_process_0:
        check_output(config.out, STORE, config.overwrite)
        # A complete store on a read-only mount is only read: confirmed without the lock.
        lock.enter_context(OutputLock(config.out, "teacher-cache build",
                                      lambda: not config.overwrite and is_store(config.out, complete=True)))
      planned = _plan(config, chunk_rows_given)  # (config, ..., spec)
      check_limits(planned[0], planned[-1], disk=is_process_0)  # Each process holds its chunks; process 0 creates.
      return planned

    # Process 0 takes the lock and plans first (preparing a dataset in a shared data dir), then the others plan;
    # process 0 creates (or checks) the store, then the others open it and check that they compute the same. Every
    # process writes its share of the chunks, and process 0 declares the store complete once all have finished.
    # A failure of one process is every process's: each step ends at `distributed.agree`, which raises it everywhere.
    config, mesh, transfer_set, eval_set, teachers, spec = distributed.first_then_others(lambda: plan(True),
                                                                                        lambda: plan(False))
    data = {"dataset": transfer_set, "eval_dataset": eval_set}
    cache = distributed.first_then_others(lambda: open_store(config, spec, data), lambda: _same_settings(
        open_cache(config.out, mode="r+", require_complete=False), spec, data, config.out,
        "settings other than this process's", "Start every process of the job with the same flags and data."))
    if cache is None or cache.complete:
      if not first:
        _LOG.info(f"{config.out} is already complete with these settings; nothing to do.")
      return config.out
    distributed.job_step(lambda: _write_chunks(cache, transfer_set, eval_set, teachers, mesh, config))
    if not first:
      return config.out
    declare_complete(cache)
  spec = cache.spec
  _LOG.info(f"wrote {spec.num_rows} rows ({len(transfer_set)} examples x {spec.views} views, {spec.num_members} members"
            + (f" of {spec.folds} cross-fitted runs" if spec.folds > 1 else "")
            + (f" and {len(spec.specialists)} specialists (top-{spec.top_n})" if spec.specialists else "")
            + f", {spec.num_classes} classes"
            + (f", computed in {spec.compute_dtype}" if spec.compute_dtype != DEFAULT_COMPUTE_DTYPE else "") + ")"
            + (f" and {spec.num_eval_rows} eval rows ({spec.eval_dataset.split})" if spec.eval_dataset else "")
            + f" to {config.out}")
  return config.out


def declare_complete(cache: Cache) -> None:
  """Writes the completion record, after checking that every chunk is there: the last write of a cache. It binds
  each chunk to its position and the spec to the store (`shared.cache.record`): in a job of several processes,
  process 0 writes it once every process has written its chunks.

  Raises:
    StillroomError: the store is not whole (a chunk missing or uncommitted).
  """
  problems = integrity_problems(cache)
  if problems:
    raise StillroomError(f"{cache.path} is not whole after writing every chunk: {'; '.join(problems)}.")
  with storage_errors(f"writing the completion record of {cache.path}"):
    cache.group.attrs[COMPLETE_KEY] = completion_record(cache)


def _write_chunks(cache: Cache, transfer_set: TransferSet, eval_set: TransferSet | None, teachers: list[Teacher],
                  mesh, config: BuildConfig) -> None:
  """Computes and writes every uncommitted chunk: the eval rows first, then the transfer set's rows."""
  spec = cache.spec
  row_sets = [EVAL_ROWS, ROWS] if eval_set is not None else [ROWS]
  cache.arrays([array.name for array in spec.arrays])  # Every handle at once: one round trip to an object store.
  # Chunks are independent: in a job of several processes, each computes and writes its share.
  todo = {row_set: distributed.my_share(chunks_to_write(cache, row_set)) for row_set in row_sets}
  mine = {row_set: distributed.my_share(list(range(spec.chunks_of(row_set)))) for row_set in row_sets}

  def rows_of(chunks: dict) -> int:
    return sum(cache.chunk_bounds(c, s)[1] - cache.chunk_bounds(c, s)[0] for s in row_sets for c in chunks[s])
  total, remaining = rows_of(mine), rows_of(todo)
  process = f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""
  if remaining < total:
    _LOG.info(f"resuming {cache.path}{process}: {total - remaining} of {total} rows already committed")
  params, shardings = place_teachers(teachers, mesh, config.teacher_sharding)
  rows_forward, eval_forward = _make_forwards(teachers, spec, mesh, shardings)
  writer = ChunkWriter(cache)
  bar = progress(total=total, initial=total - remaining, unit="row", unit_scale=True, enabled=config.progress,
                 summary=False, desc="teacher-cache build" + process)  # The build logs its own line at the end.
  started = time.perf_counter()
  try:
    if eval_set is not None:
      for chunk, rows, (logits, finite) in _computed_chunks(cache, EVAL_ROWS, todo[EVAL_ROWS], eval_set, config,
                                                            lambda x, *_: eval_forward(params, x), mesh):
        _check_finite(finite, lambda row, member: (spec.member_name(member), member, rows["index"][row],
                                                   "eval split"), cache)
        writer.put(EVAL_ROWS, chunk, *cache.chunk_bounds(chunk, EVAL_ROWS), {
            "eval_member_logits": logits, "eval_index": rows["index"], "eval_labels": rows["labels"]})
        bar.update(len(logits))
    for chunk, rows, (logits, targets, finite, finite_targets) in _computed_chunks(
        cache, ROWS, todo[ROWS], transfer_set, config, functools.partial(rows_forward, params), mesh):
      put_rows(writer, cache, chunk, rows, logits, targets, finite, finite_targets)
      bar.update(len(rows["index"]))
  finally:
    bar.close()
    writer.close()
  if remaining:
    _LOG.info(f"{remaining} rows{process} in {time.perf_counter() - started:.1f} s")


def put_rows(writer: ChunkWriter, cache: Cache, chunk: int, rows: dict, logits: np.ndarray, targets: dict,
             finite: np.ndarray, finite_targets: np.ndarray) -> None:
  """Queues one chunk of transfer rows, once its stored logits and targets are known to be finite.

  Args:
    rows: the chunk's row arrays (`index`, `view`, `fold`, `labels` and the view parameters), each [R].
    logits, targets, finite, finite_targets: `targets_of_logits`'s outputs on the chunk's rows.

  Raises:
    StillroomError: naming the first member and example whose logits (or targets) are not finite.
  """
  spec = cache.spec
  index, view, fold = rows["index"], rows["view"], rows["fold"]
  _check_finite(finite, lambda row, member: (
      spec.members[member * spec.folds + max(int(fold[row]), 0)].name, member, index[row],
      f"view {int(view[row])}"), cache)
  if not finite_targets.all():
    row = int(np.argmin(finite_targets))
    what = "a specialist's logits or their combination q are" if spec.specialists else \
        f"the {spec.combine} targets at T={spec.temperature:g} are"
    raise StillroomError(f"{what} not finite for example index {int(index[row])} (view {int(view[row])}) although "
                         f"every member's logits are: T is too small for these logits; the store {cache.path} is "
                         "left incomplete.")
  for feature in spec.features:
    finite_rows = np.isfinite(targets[feature.array_name].reshape(len(index), -1)).all(axis=1)
    if not finite_rows.all():
      row = int(np.argmin(finite_rows))
      raise StillroomError(f"teacher {spec.member_name(feature.member)!r} (member {feature.member})'s feature "
                           f"{feature.name!r} ({feature.kind}) is not finite in {FEATURE_DTYPE} for example index "
                           f"{int(index[row])} (view {int(view[row])}): beyond ±65504?; the store {cache.path} is "
                           "left incomplete.")
  logits = {"member_logits": logits} if spec.member_logits else {}
  writer.put(ROWS, chunk, *cache.chunk_bounds(chunk), {**targets, **logits, **rows})


def _computed_chunks(cache: Cache, row_set: str, chunks: list[int], data: TransferSet, config: BuildConfig,
                     forward, mesh, select: Callable | None = None):
  """The teachers' outputs on the rows of `chunks`, a chunk at a time.

  Each chunk's rows go in padded batches that start at its first row (so a resumed build computes what an
  uninterrupted one does). They are read and rendered ahead, in worker processes (`shared.workers`), in parts of
  about a batch that never split an example's rows (`example_runs`): an example's views, adjacent in the grouped row
  order, are rendered from one decode of its image. The outputs stay device arrays until the chunk's last batch is
  dispatched, so the devices run ahead of the host.

  Args:
    forward: `(x [B, ...], fold, example index, view: int32 [B]) -> a tuple of [B, ...] device arrays (or dicts
      of them)`.
    select: transfer rows only: `select(chunk) -> int [n] rows of it (from its first, increasing)`, the only rows
      computed (`teacher_cache.grow`, where sources hold the others; a chunk's selection must not be empty), called
      once per chunk, in the renderer's thread, as the chunk's rows are read (a few chunks ahead); None: all.

  Yields:
    `(chunk, rows, outputs)`: rows has the chunk's `index`, `labels` and view parameters (and for transfer rows
    `view` and `fold`), each [R]; outputs are `forward`'s, each array concatenated to [R, ...] in NumPy.
  """
  spec, batch_size, sharding = cache.spec, config.batch_size, batch_sharding(mesh)

  def parts():
    for chunk in chunks:
      start, stop = cache.chunk_bounds(chunk, row_set)
      if row_set == EVAL_ROWS:
        position, view = np.arange(start, stop), np.zeros(stop - start, np.int32)
      else:
        view, position = spec.row_sources(np.arange(start, stop))
        if select is not None:
          selected = select(chunk)
          view, position = view[selected], position[selected]
      index = data.indices[position]
      fold = fold_of(index, spec.folds)
      # Mixed views: each row's partner and λ, drawn here (the partner is read and mixed where the row is rendered).
      mix = mixed_rows(spec, index, view, data.indices) if row_set == ROWS else {}
      runs = example_runs(position, batch_size)
      for k, run in enumerate(runs):
        yield {"position": position[run], "index": index[run], "view": view[run], "fold": fold[run],
               **{name: values[run] for name, values in mix.items()}, "chunk": chunk, "last": k == len(runs) - 1}

  if not chunks:
    return
  workers = resolve_workers(config.workers, data)
  outputs, done, rendered = [], [], []  # Device outputs and their rows; rendered rows of the chunk not yet sent.
  size = spec.augmentation.image_size
  with BatchRenderer(data, spec.augmentation, workers=workers) as render:
    for part in render(parts()):
      raise_if_interrupted()
      rendered.append({k: v for k, v in part.items() if k not in ("chunk", "last")})
      held = sum(len(p["index"]) for p in rendered)
      while held >= batch_size or part["last"] and held:
        batch, rendered = _first_rows(rendered, batch_size)
        held -= len(batch["index"])
        fold, index, view = (jax.device_put(pad_rows(a, batch_size), sharding) for a in (
            batch["fold"], batch["index"].astype(np.uint32), batch["view"]))
        # Host views as rendered; device views rendered here from the canvases, boxes and flips (`shared.render`).
        names = [k for k in DEVICE_INPUTS if k in batch] if CANVAS in batch else ("x",)
        x = inputs_of({k: jax.device_put(pad_rows(batch[k], batch_size), sharding) for k in names}, size)
        outputs.append(forward(x, fold, index, view))
        # What the store keeps of the rows: not their inputs, nor a mixed row's partner inputs and label.
        done.append({k: v for k, v in batch.items() if k not in ("x", CANVAS, *PARTNER_INPUTS, MIX_LABELS)})
      if part["last"]:
        count = sum(len(rows["index"]) for rows in done)
        rows = {k: np.concatenate([rows[k] for rows in done]) for k in done[0]}
        if row_set == EVAL_ROWS:
          rows = {"index": rows["index"], "labels": rows["labels"]}
        yield part["chunk"], rows, jax.tree.map(lambda *parts: np.concatenate([np.asarray(p) for p in parts])[:count],
                                                *outputs)
        outputs, done = [], []


def _first_rows(parts: list[dict], count: int) -> tuple[dict, list[dict]]:
  """The first `count` rows of consecutive parts (dicts of [n, ...] arrays), and the parts of the rest."""
  rows = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  rest = {k: v[count:] for k, v in rows.items()}
  return {k: v[:count] for k, v in rows.items()}, [rest] if len(rest["index"]) else []


def chunks_to_write(cache: Cache, row_set: str) -> list[int]:
  """The chunks a (resumed) build must write: the uncommitted ones, and committed ones whose files are gone."""
  committed = committed_name(row_set)
  names = [name for name in cache.spec.arrays_of(row_set) if cache.spec.array(name).role != "bookkeeping"]
  absent = missing_chunks(cache, [*names, committed])  # One listing of the store.
  if len(absent.get(committed, ())) == cache.spec.chunks_of(row_set):
    return list(range(cache.spec.chunks_of(row_set)))  # A new store (or one killed before any commit).
  try:
    todo = set(uncommitted_chunks(cache, row_set).tolist())
  except StillroomError as e:
    raise StillroomError(f"cannot resume {cache.path}: {e}. Pass --overwrite to rebuild it.") from e
  missing = {chunk for name in names for chunk in absent.get(name, ())} if cache.spec.has_checksums else set()
  if missing - todo:
    _LOG.info(f"{len(missing - todo)} committed chunk(s) of {cache.path} are missing: writing them again")
  return sorted(todo | missing)


def _check_finite(finite: np.ndarray, describe, cache: Cache) -> None:
  """Raises for the first row and member with a non-finite stored logit; `describe(row, member)` gives
  (run name, member, example index, where)."""
  if finite.all():
    return
  row, member = np.argwhere(~finite)[0]
  name, member, index, where = describe(int(row), int(member))
  raise StillroomError(f"teacher {name!r} (member {member}) produced non-finite logits for example index "
                       f"{int(index)} ({where}); the store {cache.path} is left incomplete.")
