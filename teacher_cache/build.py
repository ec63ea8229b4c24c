"""`teacher-cache build`: run a teacher ensemble once over a transfer set and write a resumable Zarr v3 cache.

The build runs chunk by chunk. Each chunk's rows are computed in batches that start at the chunk's first row, so a
resumed build computes every batch exactly as an uninterrupted one does. A background thread writes finished
chunks (and then marks each in `chunk_committed`) while the devices compute the next batches; the completion
record is written only after the last chunk is committed.
"""

import dataclasses
import os
import queue
import shutil
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import zarr
from tqdm import tqdm

from shared import __version__
from shared.augment import Augmentation, apply_view, fold_of
from shared.cache import (COMPLETE_KEY, SPEC_KEY, Cache, CacheSpec, MemberSpec, layout_problems, now_iso,
                          open_cache, validate_settings)
from shared.data import Normalization, TransferSet, open_transfer_set
from shared.ensemble import combine_log_probs
from shared.errors import StillroomError
from shared.models import check_input_shape
from shared.parallel import batch_sharding, check_batch_size, data_mesh, pad_rows, replicated
from shared.runs import Teacher, load_teacher


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
  """Settings of `teacher-cache build` (the CLI's defaults come from here)."""

  dataset: str = "digits"
  split: str = "train"
  data_dir: str | None = None
  teachers: tuple[str, ...] = ()
  combine: str = "arithmetic"
  temperature: float = 4.0
  views: int = 1
  seed: int = 0
  max_shift: int = 1
  flip: bool = False
  out: str = ""
  batch_size: int = 256
  chunk_rows: int = 4096
  dtype: str = "float16"
  folds: int = 1
  overwrite: bool = False
  progress: bool = True


def _log(message: str) -> None:
  print(f"teacher-cache: {message}", file=sys.stderr, flush=True)


def _member_specs(teachers: list[Teacher], transfer_set: TransferSet) -> tuple[list[MemberSpec], int]:
  """Checks every member against the data and each other; returns their specs and the class count."""
  specs, classes = [], {}
  for teacher in teachers:
    normalization = teacher.normalization or transfer_set.normalization
    what = f"teacher {teacher.name!r} ({teacher.model})"
    out = check_input_shape(teacher.apply_fn, teacher.params, transfer_set.input_shape, what)
    classes[teacher.name] = int(out.shape[-1])
    specs.append(MemberSpec(name=teacher.name, source=teacher.source, model=teacher.model,
                            num_params=teacher.num_params, digest=teacher.digest,
                            checkpoint_step=teacher.checkpoint_step, normalization=normalization.to_dict()))
  if len(set(classes.values())) != 1:
    raise StillroomError(f"ensemble members have different class counts: {classes}.")
  num_classes = next(iter(classes.values()))
  if transfer_set.num_classes is not None and transfer_set.num_classes > num_classes:
    raise StillroomError(
        f"dataset {transfer_set.name!r} has {transfer_set.num_classes} classes but the teachers output "
        f"{num_classes} logits.")
  return specs, num_classes


def _check_folds(teachers: list[Teacher], folds: int) -> None:
  """With cross-fitting, run k of each member must have been trained without fold k (as its config records)."""
  if len(teachers) % folds:
    raise StillroomError(f"--folds {folds} needs {folds} runs per member (member-major: member 0's runs for folds "
                         f"0..{folds - 1}, then member 1's, ...); got {len(teachers)} teachers.")
  for position, teacher in enumerate(teachers):
    if teacher.config is None:
      _log(f"cross-fitting: cannot check which fold {teacher.name!r} held out (not a stillroom run); trusting the "
           f"order given (fold {position % folds}).")
      continue
    recorded = teacher.config.get("resolved", {}).get("config", {})
    if (recorded.get("folds"), recorded.get("holdout_fold")) != (folds, position % folds):
      raise StillroomError(
          f"teacher {teacher.source!r} is run {position % folds} of member {position // folds}, so it must be "
          f"trained with --folds {folds} --holdout-fold {position % folds}; its config says --folds "
          f"{recorded.get('folds')} --holdout-fold {recorded.get('holdout_fold')}.")


def _make_forward(teachers: list[Teacher], spec: CacheSpec, mesh):
  """One jitted forward of all runs: (inputs [B, ...], folds [B]) -> (member logits [B, M, C], targets [B, C],
  finite [B, M]).

  Cross-fitted, each row takes each member's logits from the run that held out the row's fold. Targets are
  computed from the logits *as stored* (rounded to the storage dtype), so that a reader re-deriving them from
  `member_logits` gets the stored `targets` back.
  """
  normalizations = [Normalization.from_dict(m.normalization) for m in spec.members]
  apply_fns = [t.apply_fn for t in teachers]
  storage_dtype = jnp.dtype(spec.dtype)

  def forward(params, x, fold):
    runs = jnp.stack([f(p, n.apply(x)) for f, p, n in zip(apply_fns, params, normalizations)], axis=1)
    runs = runs.reshape(runs.shape[0], spec.num_members, spec.folds, runs.shape[-1])  # [B, M, K, C]
    logits = jnp.take_along_axis(runs, jnp.maximum(fold, 0)[:, None, None, None], axis=2)[:, :, 0]
    stored = logits.astype(jnp.float32).astype(storage_dtype)
    targets = combine_log_probs(stored, spec.temperature, spec.combine).astype(storage_dtype)
    return stored, targets, jnp.all(jnp.isfinite(stored), axis=-1)

  data = batch_sharding(mesh)
  return jax.jit(forward, in_shardings=(replicated(mesh), data, data), out_shardings=(data, data, data))


def _ensure_arrays(group: zarr.Group, spec: CacheSpec) -> None:
  """Creates the arrays a store lacks (a build may have been killed while creating them); checks the others."""
  problems = layout_problems(group, spec, missing_ok=True)
  if problems:
    raise StillroomError(f"the store {group.store} does not match its spec: {'; '.join(problems)}. Use --overwrite.")
  for name, (shape, dtype, chunks) in spec.array_shapes().items():
    if name not in group:
      # Uncompressed: float16 logits compress ~1.1x and compression halves write speed (TECH_NOTES).
      group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0, compressors=None)


def _open_store(config: BuildConfig, spec: CacheSpec) -> Cache | None:
  """Creates the store, or reopens one with the same build key to resume; None when it is already complete."""
  if os.path.exists(config.out) and config.overwrite:
    _log(f"--overwrite: removing {config.out}")
    shutil.rmtree(config.out) if os.path.isdir(config.out) else os.remove(config.out)
  if os.path.exists(config.out):
    try:
      existing = open_cache(config.out, mode="r+", require_complete=False)
    except StillroomError as e:
      raise StillroomError(f"--out {config.out!r} exists and is not a usable stillroom cache ({e}); pass "
                           "--overwrite to replace it, or choose another --out.") from e
    differences = existing.spec.mismatches(spec)
    if differences:
      raise StillroomError(
          f"--out {config.out!r} holds a cache built with other settings:\n  " + "\n  ".join(differences)
          + "\nPass --overwrite to replace it, or choose another --out.")
    if existing.complete:
      _log(f"{config.out} is already complete with these settings; nothing to do.")
      return None
    _remove_partial_files(config.out)
    _ensure_arrays(existing.group, existing.spec)
    return existing
  group = zarr.open_group(config.out, mode="w-", attributes={SPEC_KEY: spec.to_attrs()})
  _ensure_arrays(group, spec)
  return Cache(path=config.out, group=group, spec=spec, completion=None)


def _remove_partial_files(path: str) -> None:
  """Deletes the temporary files a killed build left: zarr's LocalStore writes `<key>.<uuid>.partial`, then
  renames it, so a `.partial` file is never part of the store."""
  stale = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names
           if name.endswith(".partial")]
  for file in stale:
    os.remove(file)
  if stale:
    _log(f"removed {len(stale)} partial file(s) left by the interrupted build")


class _ChunkWriter:
  """Writes finished chunks in a background thread, in order, marking each committed after its data."""

  def __init__(self, group: zarr.Group, depth: int = 2):
    self._group = group
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
    self._thread.start()

  def _run(self):
    while (item := self._queue.get()) is not None:
      chunk, start, stop, arrays = item
      if self._error is not None:
        continue  # Drain after a failure; the main thread raises it.
      try:
        for name, values in arrays.items():
          self._group[name][start:stop] = values
        self._group["chunk_committed"][chunk] = True
      except BaseException as e:  # pylint: disable=broad-except
        self._error = e

  def put(self, chunk: int, start: int, stop: int, arrays: dict) -> None:
    self._raise_if_failed()
    self._queue.put((chunk, start, stop, arrays))

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join()
    self._raise_if_failed()

  def _raise_if_failed(self):
    if self._error is not None:
      raise StillroomError(f"writing the cache failed: {self._error}") from self._error


def build_cache(config: BuildConfig) -> str:
  """Builds (or resumes, or confirms) a cache; returns its path.

  Raises:
    StillroomError: bad settings, data or teachers; an existing store with other settings; non-finite teacher
      outputs (naming the member and example index; the store is left incomplete).
  """
  validate_settings(temperature=config.temperature, combine=config.combine, dtype=config.dtype,
                    views=config.views, chunk_rows=config.chunk_rows)
  if not config.teachers:
    raise StillroomError("give at least one --teacher (a run dir or module:function).")
  if not config.out:
    raise StillroomError("give --out CACHE.zarr.")
  mesh = data_mesh()
  check_batch_size(config.batch_size, mesh)
  transfer_set = open_transfer_set(config.dataset, config.split, config.data_dir)
  if config.views > 1 and len(transfer_set.input_shape) < 2:
    raise StillroomError(f"--views {config.views} needs image inputs; {config.dataset!r} holds flat vectors of "
                         f"shape {transfer_set.input_shape}, which take no augmentation. Use --views 1.")
  teachers = [load_teacher(reference) for reference in config.teachers]
  if config.folds > 1:
    _check_folds(teachers, config.folds)
  members, num_classes = _member_specs(teachers, transfer_set)
  spec = CacheSpec(
      temperature=float(config.temperature), combine=config.combine, members=tuple(members),
      dataset=transfer_set.describe(), num_classes=num_classes, views=config.views,
      augmentation=Augmentation(seed=config.seed, max_shift=config.max_shift, flip=config.flip),
      dtype=config.dtype, chunk_rows=config.chunk_rows, folds=config.folds, software_version=__version__,
      created_at=now_iso())
  cache = _open_store(config, spec)
  if cache is None:
    return config.out
  _write_rows(cache, transfer_set, teachers, mesh, config)
  cache.group.attrs[COMPLETE_KEY] = {"finished_at": now_iso(), "rows": cache.spec.num_rows}
  _log(f"wrote {cache.spec.num_rows} rows ({len(transfer_set)} examples x {cache.spec.views} views, "
       f"{cache.spec.num_members} members" + (f" of {cache.spec.folds} cross-fitted runs" if cache.spec.folds > 1
                                                 else "") + f", {cache.spec.num_classes} classes) to {config.out}")
  return config.out


def _write_rows(cache: Cache, transfer_set: TransferSet, teachers: list[Teacher], mesh, config: BuildConfig):
  spec = cache.spec
  committed = cache["chunk_committed"][:]
  first = int(np.argmin(committed)) if not committed.all() else spec.num_chunks
  if first:
    _log(f"resuming {cache.path}: {first} of {spec.num_chunks} chunks already committed")
  forward = _make_forward(teachers, spec, mesh)
  params = jax.device_put([t.params for t in teachers], replicated(mesh))
  data_sharding = batch_sharding(mesh)
  num_examples, batch_size = len(transfer_set), config.batch_size
  labels = np.where(transfer_set.labels >= 0, transfer_set.labels, -1).astype(np.int32)
  writer = _ChunkWriter(cache.group)
  bar = tqdm(total=spec.num_rows, initial=cache.chunk_bounds(first)[0] if first < spec.num_chunks else spec.num_rows,
             unit="row", unit_scale=True, desc="teacher-cache build", disable=not config.progress)
  started = time.perf_counter()
  try:
    for chunk in range(first, spec.num_chunks):
      start, stop = cache.chunk_bounds(chunk)
      rows = np.arange(start, stop)
      view, position = (rows // num_examples).astype(np.int32), rows % num_examples
      index = transfer_set.indices[position]
      shift, flip = spec.augmentation.view_params(index, view)
      fold = fold_of(index, spec.folds)
      outputs = []  # Device arrays; dispatch runs ahead of the host while it renders the next batch.
      for offset in range(0, len(rows), batch_size):
        part = slice(offset, offset + batch_size)
        x = pad_rows(apply_view(transfer_set.inputs[position[part]], shift[part], flip[part]), batch_size)
        fold_part = pad_rows(fold[part], batch_size)
        outputs.append(forward(params, jax.device_put(x, data_sharding), jax.device_put(fold_part, data_sharding)))
      logits, targets, finite = (np.concatenate([np.asarray(o[k]) for o in outputs])[:len(rows)] for k in range(3))
      if not finite.all():
        row, member = np.argwhere(~finite)[0]
        run = spec.members[member * spec.folds + max(int(fold[row]), 0)]
        raise StillroomError(
            f"teacher {run.name!r} (member {member}) produced non-finite logits for example "
            f"index {int(index[row])} (view {int(view[row])}); the store {cache.path} is left incomplete.")
      writer.put(chunk, start, stop, {
          "targets": targets, "member_logits": logits, "index": index, "view": view,
          "labels": labels[position], "shift": shift, "flip": flip, "fold": fold})
      bar.update(len(rows))
  finally:
    bar.close()
    writer.close()
  elapsed = time.perf_counter() - started
  if first < spec.num_chunks:
    _log(f"{spec.num_rows - cache.chunk_bounds(first)[0]} rows in {elapsed:.1f} s")
