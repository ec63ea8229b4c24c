"""A run directory's files: config.json, metrics.jsonl, final.json and the orbax checkpoints.

  RUN_DIR/config.json        `RunRecord` (model, normalisation, cross-fitting fold) + the resolved config
  RUN_DIR/metrics.jsonl      one JSON line per epoch
  RUN_DIR/tensorboard/events.out.tfevents.stillroom   the same lines as TensorBoard scalars (tag: the metric's
                             name; step: the epoch)
  RUN_DIR/final.json         the last epoch's line, written when the run has finished
  RUN_DIR/checkpoints/<E>/   orbax checkpoint after E epochs: "state" (model and optimizer, without RNG streams),
                             "params" (the model's parameters, what teachers load), "meta" ({"epoch": E})
  RUN_DIR/checkpoints_mid/<G>/  with --checkpoint-every-steps: the last two checkpoints inside an epoch, after G
                             steps of the run: "state", "meta" ({"epoch": E, "step": S, "sums": the epoch's
                             partial metric sums, "seconds"}); deleted when an epoch checkpoint is written
  RUN_DIR/checkpoints.json, RUN_DIR/checkpoints_mid.json   the committed checkpoints of each folder and the digests
                             of their files (`shared.runs.CheckpointFolder`; config.json's "checkpoint_digests"
                             says the run dir keeps them): a resumed run discards a checkpoint they do not list (a
                             save that a kill interrupted) and a damaged mid-epoch one (resuming from the point
                             before it), and refuses a damaged epoch checkpoint, naming the epoch it could resume
                             from once that checkpoint is deleted

Every file is read through `shared.runs.read_run_file`: a damaged one is one error naming it and how to recover.

In a job of several processes, process 0 writes the JSON files (the others compute the same lines and write
nothing), and every process takes part in each checkpoint's save, restore and deletion (orbax's multi-process
checkpointing): every process must call those in the same order.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import struct
import sys
import time

import jax
import orbax.checkpoint as ocp
from flax import nnx

from shared import __version__, storage
from shared.distributed import from_process_0, is_first
from shared.errors import StillroomError
from shared.log import logger
from shared.outputs import RUN_DIR, clear_for_overwrite
from shared.runs import (CONFIG_FILE, DIGESTS_MARKER, DIVERGED_FILE, FINAL_FILE, METRICS_FILE, MID_EPOCH_DIR,
                         PARAMS_ITEM, RETRAIN, REWRITE_FINAL, CheckpointFolder, CrossFit, RunRecord, params_of,
                         read_run_file)
from shared.settings import differences as settings_differences
from shared.settings import names_where
from student_train.config import FitConfig, default_of
from student_train.terms.features import student_of
from student_train.plan import Resolved, RunPlan

TENSORBOARD_DIR, TENSORBOARD_FILE = "tensorboard", "events.out.tfevents.stillroom"
STATE_ITEM, META_ITEM = "state", "meta"
_STORAGE_FAILURES = ("No space left on device", "Read-only file system", "Permission denied", "Disk quota exceeded")
CHECKPOINTS_KEPT = 2  # A group killed between two students' saves rolls back to the previous, common one.


_LOG = logger(__name__)


def is_finished(out: str) -> bool:
  return storage.exists(storage.join(out, FINAL_FILE))


def prepare_run_dir(plan: RunPlan, joining: bool = False) -> bool:
  """Creates the run dir or checks that an existing one belongs to this command; True if it already finished.

  Args:
    joining: a process of a multi-process job other than process 0, once process 0 has prepared the run dir: it
      only checks that the run dir holds its config (it never clears or creates one).

  Raises:
    StillroomError: the dir holds a run of another config, or is not a run dir (unless --overwrite).
  """
  out, record = plan.config.out, plan.record()
  path = storage.join(out, CONFIG_FILE)
  if plan.config.overwrite and not joining:
    clear_for_overwrite(out, RUN_DIR)
  if storage.exists(path):
    existing = read_run_file(out, CONFIG_FILE, "pass --overwrite to replace the run, or choose another --out")
    wanted = _as_recorded_by_version_1(existing.get("resolved", {}), json.loads(json.dumps(record)), plan)
    wanted = _without_added_defaults(existing.get("resolved", {}), wanted)
    differences = settings_differences(existing.get("resolved", {}), wanted, "run dir")
    if differences:
      raise StillroomError(f"run dir {out!r} holds a run with another config: " + "; ".join(differences)
                           + (". Start every process of the job with the same flags and data." if joining else
                              ". Pass --overwrite to replace it, or choose another --out."))
    return is_finished(out)
  if joining:
    raise StillroomError(f"run dir {out!r} has no {CONFIG_FILE}, which process 0 writes: do the processes of the job "
                         "share one file system?")
  if storage.has_entries(out) and not plan.config.overwrite:  # With it, what is left is what --overwrite kept.
    raise StillroomError(f"--out {out!r} exists and is not a run dir; pass --overwrite or choose another --out.")
  storage.make_dirs(out)
  config = plan.config
  cross_fit = CrossFit(folds=config.folds, holdout_fold=config.holdout_fold) if config.folds > 1 else None
  run_record = RunRecord(model=plan.model_spec, normalization=plan.normalization, cross_fit=cross_fit,
                         image_size=plan.augmentation.image_size, specialist=plan.specialist)
  where = {"out": storage.absolute(out), "cache": None if plan.cache is None else storage.absolute(plan.cache.path)}
  # The digests marker is outside "resolved", which alone is compared: run dirs written before it still resume.
  _write_json(path, {**run_record.to_json(), "resolved": record, "paths": where, "software_version": __version__,
                     DIGESTS_MARKER: 1})
  return False


def _as_recorded_by_version_1(stored: dict, wanted: dict, plan: RunPlan) -> dict:
  """A run dir of stillroom <= 0.2 recorded version-1 fingerprints of its data: where the data still matches them,
  the record to compare is the one it would have written (`TransferSet.as_recorded`)."""
  for key, data in (("dataset", plan.transfer_set), ("eval", plan.eval_set)):
    old, new = stored.get(key), wanted.get(key)
    if not (isinstance(old, dict) and old.get("fingerprint") and new and data is not None):
      continue
    fingerprint, version = data.as_recorded(old["fingerprint"], old.get("fingerprint_version", 1))
    wanted[key] = {**new, "fingerprint": fingerprint}
    if version == 1:
      wanted[key].pop("fingerprint_version", None)
  return wanted


def _without_added_defaults(stored: dict, wanted: dict) -> dict:
  """A run dir recorded before a setting existed (declared `added`, or a resolved value) ran with its default: the
  record to compare leaves out such settings where the command keeps the default."""
  recorded = stored.get("config", {})
  added = {**{name: default_of(name) for name in names_where(FitConfig, added=True)},
           **dataclasses.asdict(Resolved())}
  config = {k: v for k, v in wanted.get("config", {}).items() if k in recorded or k not in added or v != added[k]}
  return {**wanted, "config": config}


def _write_json(path: str, value) -> None:
  """Written whole (`storage.write_text`): a kill never leaves half a file."""
  storage.write_text(path, json.dumps(value, indent=2))


def checkpointable(state) -> dict:
  """The state minus RNG streams (dropout keys are re-derived each step from fold_in(key, step))."""
  return nnx.to_pure_dict(nnx.filter_state(state, nnx.Not(nnx.RngState)))


@contextlib.contextmanager
def _quiet_orbax_failures():
  """While saving: orbax logs every failed background write with a traceback, and its threads then report a closed
  event loop, hundreds of lines for one full disk. The failure itself still raises, and is reported in one line."""
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
  levels, hook = [named.level for named in loggers], sys.unraisablehook

  def quiet_hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and "closed" in str(unraisable.exc_value)):
      hook(unraisable)

  for named in loggers:
    named.setLevel(logging.CRITICAL)
  sys.unraisablehook = quiet_hook
  yield  # After a failure orbax's threads keep reporting it until the process exits: stay quiet then too.
  for named, level in zip(loggers, levels):
    named.setLevel(level)
  sys.unraisablehook = hook


@contextlib.contextmanager
def _saving(what: str):
  """Saving a checkpoint: orbax's storage failures (wrapped in several types, with long messages) become one line.

  Raises:
    StillroomError: naming `what` and the cause; the run keeps its earlier checkpoints and resumes from them.
  """
  try:
    with _quiet_orbax_failures():
      yield
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    cause = next((known for known in _STORAGE_FAILURES if known in message), message[:240])
    raise StillroomError(f"saving {what} failed: {cause}; the run keeps its previous checkpoint and resumes from "
                         "it.") from e


def _restore_state(folder: CheckpointFolder, step: int, state, recover: str = RETRAIN):
  """`state` with checkpoint `step`'s "state" item restored into it (RNG streams kept: they are re-derived), every
  file of the checkpoint checked against its digest first (the resumed run carries the checkpoint on).

  Raises:
    StillroomError: the checkpoint is damaged or unreadable: the run cannot resume from it (`recover`).
  """
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpointable(state))
  restored = folder.restore(step, ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}), recover,
                            whole=True)
  rng_state = nnx.filter_state(state, nnx.RngState)
  state = nnx.filter_state(state, nnx.Not(nnx.RngState))
  nnx.replace_by_pure_dict(state, restored[STATE_ITEM])
  return nnx.merge_state(state, rng_state)


class Checkpoints:
  """One run's orbax checkpoints, numbered by the epochs trained, with their digests (`CheckpointFolder`)."""

  def __init__(self, out: str):
    self.out = out
    self.folder = CheckpointFolder(out, max_to_keep=CHECKPOINTS_KEPT)

  def epochs(self) -> set[int]:
    """The committed epochs. Where the newest listed is absent (deleted by hand, as a damaged one's refusal
    advises) the run resumes from the newest present (`discard_after` says so and unlists it).

    Raises:
      StillroomError: the newest listed is absent and no other is kept: the run cannot resume.
    """
    newest, committed = self.folder.newest(), self.folder.committed()
    if newest is not None and newest not in committed and not committed:
      raise self.folder.missing(newest, RETRAIN)
    return set(committed)

  def save(self, graphdef, state, epoch: int) -> None:
    """Saves the state after `epoch` epochs (and the student's parameters on their own, for teachers and exports:
    without a hint's regressors).

    Raises:
      StillroomError: the save failed (disk full, read-only, ...); the previous checkpoints are kept.
    """
    params = params_of(student_of(nnx.merge(graphdef, state)[0]))
    with _saving(f"the checkpoint of {self.out} after epoch {epoch}"):
      self.folder.save(epoch, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardSave(checkpointable(state)), PARAMS_ITEM: ocp.args.StandardSave(params),
          META_ITEM: ocp.args.JsonSave({"epoch": epoch})}))

  def restore(self, state, epoch: int):
    """`state` with the checkpoint of `epoch` restored into it (RNG streams kept).

    Raises:
      StillroomError: it is damaged or unreadable. The run never rolls back on its own past a damaged epoch
        checkpoint (the epochs it trained would be lost): where an earlier one is kept, the message says which
        folder to delete for the same command to resume from it.
    """
    earlier = [kept for kept in self.folder.committed() if kept < epoch]
    recover = RETRAIN if not earlier else (
        f"delete {storage.join(self.out, self.folder.where(epoch))} and run the same command to resume from epoch "
        f"{max(earlier)}, or {RETRAIN}")
    return _restore_state(self.folder, epoch, state, recover)

  def discard_after(self, epoch: int) -> None:
    """Deletes the checkpoints after `epoch` (a run rolled back to resume with its group), and those not committed
    (saves that a kill interrupted before they were listed: the run resumes as if they never happened), and unlists
    those listed but absent (the newest of them deleted by hand: said). What to delete is decided from what process
    0 reads, so that every process of a job deletes the same steps in the same order."""
    def decide() -> tuple[list[int], list[int], list[int], int | None]:
      return (self.folder.uncommitted(), [saved for saved in sorted(self.epochs()) if saved > epoch],
              self.folder.absent(), self.folder.newest())
    uncommitted, later, absent, newest = from_process_0(decide())
    for step in uncommitted:
      _LOG.info(f"{self.out}: discarding {self.folder.where(step)}, whose save was interrupted")
    if newest in absent:
      _LOG.warning(f"{self.out}: its newest checkpoint, {self.folder.where(newest)} (listed in "
                   f"{self.folder.digests_file}), is missing; resuming from the checkpoint before it")
    for saved in later:
      _LOG.info(f"{self.out}: rolling back to epoch {epoch}, where its group resumes (discarding epoch {saved})")
    self.folder.unlist(absent)
    self.folder.delete(uncommitted + later)

  def close(self) -> None:
    self.folder.close()


class MidEpochCheckpoints:
  """One run's checkpoints inside epochs (`--checkpoint-every-steps`), numbered by the run's global step: its
  state, its position (epoch E, 0-based, and S steps into it), the epoch's partial metric sums and seconds, so that
  a resumed run finishes the epoch as an uninterrupted one. Two are kept, as for epochs: a kill between two
  students' saves leaves a position every student of the group holds."""

  def __init__(self, out: str):
    self.out = out
    self.folder = CheckpointFolder(out, MID_EPOCH_DIR, max_to_keep=CHECKPOINTS_KEPT)

  @staticmethod
  def held(out: str) -> bool:
    """Whether the run dir holds mid-epoch checkpoints (of an earlier attempt, which may have used them)."""
    return storage.exists(storage.join(out, MID_EPOCH_DIR))

  def positions(self) -> list[tuple[int, dict | None, str | None]]:
    """[(global step, {"epoch": E, "step": S, "sums": {...}, "seconds": s}, None), ...], read from each
    checkpoint's "meta" item alone (the other items' files are not read). The position is None for one that is not
    committed (a save that a kill interrupted: see `CheckpointFolder`), for one that is damaged (the third entry
    says how), or, in a folder without digests, for one that cannot be read (half-written or half-deleted by a
    kill).

    Raises:
      StillroomError: the folder's list of digests is damaged (see `CheckpointFolder.uncommitted`), or missing
        where the run dir records digests.
    """
    found, listed, interrupted = [], self.folder.listed(), self.folder.uncommitted()
    for step in self.folder.on_disk():
      if step in interrupted:
        found.append((step, None, None))
        continue
      damage = self.folder.damage(step, [META_ITEM])
      if damage is None:
        try:
          found.append((step, self.folder.restore(step, ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}),
                                                  RETRAIN)[META_ITEM], None))
          continue
        except StillroomError:  # Without digests, half-deleted or half-written: unusable either way.
          damage = None if listed is None else "orbax cannot read its position"
      found.append((step, None, damage))
    return found

  def damage(self, global_step: int) -> str | None:
    """What differs in the checkpoint at `global_step` (any of its files) from its digests, or None."""
    return self.folder.damage(global_step)

  def delete(self, global_step: int) -> None:
    self.folder.delete([global_step])

  def save(self, state, global_step: int, meta: dict) -> None:
    """Saves the state at `global_step` with its position and partial sums `meta` (see `positions`).

    Raises:
      StillroomError: the save failed; the run keeps its earlier checkpoints.
    """
    with _saving(f"the mid-epoch checkpoint of {self.out}"):
      self.folder.save(global_step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardSave(checkpointable(state)), META_ITEM: ocp.args.JsonSave(meta)}), force=True)

  def restore(self, state, global_step: int):
    """`state` with the checkpoint at `global_step` restored into it (RNG streams kept)."""
    return _restore_state(self.folder, global_step, state)

  def clear(self) -> None:
    """Deletes them all: the run resumes from a later epoch checkpoint, or from an earlier point of its group. The
    steps are those process 0 finds (every process deletes the same ones)."""
    self.folder.delete(from_process_0(self.folder.on_disk()))

  def close(self) -> None:
    self.folder.close()


def resume_groups(saved: list[set[int]]) -> list[tuple[int, list[int]]]:
  """Where each run of a group resumes, given the epochs each has saved: `[(epoch, [run positions]), ...]`.

  A kill between two runs' saves leaves some runs one checkpoint ahead of the others. They roll back to the newest
  epoch all of them saved, so the group resumes whole and computes exactly what an uninterrupted group does (the
  same students in the same vmapped step). Runs further apart, such as a run added to a sweep whose other runs
  have trained for a while, are never rolled back: the runs at each epoch resume as a group of their own.
  """
  latest = [max(epochs, default=0) for epochs in saved]
  oldest = min(latest)

  def one_save_ahead(epochs: set[int]) -> bool:
    return max((e for e in epochs if e < max(epochs)), default=0) == oldest

  if all(last == oldest or one_save_ahead(epochs) for last, epochs in zip(latest, saved)):
    return [(oldest, list(range(len(saved))))]
  groups: dict[int, list[int]] = {}
  for position, last in enumerate(latest):
    groups.setdefault(last, []).append(position)
  return sorted(groups.items())


def _write_metrics(out: str, lines: list[dict]) -> None:
  """Rewrites metrics.jsonl (a JSON line per epoch) and their TensorBoard events whole, on every store alike: an
  object store has no appends (one line per epoch keeps the files small), and a run resumed after dropping lines
  (`truncate_metrics`) leaves no stale points behind."""
  lines = [json.dumps(line) for line in lines]
  storage.write_text(storage.join(out, METRICS_FILE), "".join(line + "\n" for line in lines))
  storage.make_dirs(storage.join(out, TENSORBOARD_DIR))
  storage.write_bytes(storage.join(out, TENSORBOARD_DIR, TENSORBOARD_FILE), tensorboard_events(lines))


def tensorboard_events(lines: list[str]) -> bytes:
  """Metrics lines (JSON) as a TensorBoard event file: a scalar per numeric entry (tag: its name; step: the epoch), in
  tensorboardX's event protocol buffers, each framed as a TFRecord (length, masked CRC-32C of the length, the
  event, its masked CRC-32C). Written whole rather than through `SummaryWriter`, which appends to a new file per
  process start: a resumed run would show the epochs it dropped beside the ones it trained again. A line's records
  are made once (`_line_records`), so rewriting the file each epoch costs its bytes, not their encoding."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  header = _framed(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
  return header + b"".join(_line_records(line) for line in lines)


@functools.lru_cache(maxsize=1 << 14)
def _line_records(line_json: str) -> bytes:
  """One metrics line's scalar events, framed (stamped with the time the line is first written)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  from tensorboardX.summary import scalar  # pylint: disable=import-outside-toplevel
  line, now = json.loads(line_json), time.time()
  return b"".join(_framed(event_pb2.Event(wall_time=now, step=line["epoch"], summary=scalar(name, value)))
                  for name, value in line.items()
                  if name != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool))


def _framed(event) -> bytes:
  """An event as a TFRecord: its length, the length's masked CRC-32C, the event, the event's masked CRC-32C."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=import-outside-toplevel
  data = event.SerializeToString()
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def append_metrics(out: str, line: dict) -> None:
  """Adds an epoch's line (process 0 of a job; the others compute the same line and write nothing)."""
  if is_first():
    _write_metrics(out, read_metrics(out) + [line])


def read_metrics(out: str) -> list[dict]:
  """metrics.jsonl's lines (none before the first epoch).

  Raises:
    StillroomError: the file is damaged (garbled, truncated, a line without its epoch): the run cannot resume.
  """
  return read_run_file(out, METRICS_FILE, RETRAIN, missing=[])


def truncate_metrics(out: str, epochs_done: int) -> None:
  """Drops lines of epochs not in the checkpoint resumed from (a kill between the metrics line and the save).

  Raises:
    StillroomError: metrics.jsonl is damaged, or lacks a line of an epoch the checkpoint covers.
  """
  if is_first():
    lines = [line for line in read_metrics(out) if line["epoch"] <= epochs_done]
    if len(lines) != epochs_done:  # The epochs are ascending from 1: all of them, or some are missing.
      raise StillroomError(f"run dir {out!r}: {METRICS_FILE} holds {len(lines)} of the {epochs_done} epochs its "
                           f"checkpoint has trained (one line per epoch); {RETRAIN}.")
    _write_metrics(out, lines)


def write_final(out: str, total_epochs: int) -> dict:
  """final.json: the last epoch's metrics line, the run dir and its epochs (written by process 0 of a job, which
  has written every line when the others read them)."""
  final = {**read_metrics(out)[-1], "run_dir": out, "epochs": total_epochs}
  if is_first():
    _write_json(storage.join(out, FINAL_FILE), final)
  return final


def write_diverged(out: str, message: str) -> None:
  """Marks a run that stopped on non-finite values; the same command then refuses it instead of training it."""
  if is_first():
    _write_json(storage.join(out, DIVERGED_FILE), {"message": message})


def read_diverged(out: str) -> str | None:
  """The message of a run that diverged, or None.

  Raises:
    StillroomError: diverged.json is damaged.
  """
  diverged = read_run_file(out, DIVERGED_FILE, "the run stopped on non-finite values: delete it and run the same "
                           "command to train on from its last finite checkpoint, or pass --overwrite with other "
                           "settings (a lower --lr, say)", missing=None)
  return None if diverged is None else diverged["message"]


def read_final(out: str) -> dict:
  """final.json of a finished run.

  Raises:
    StillroomError: it is absent or damaged.
  """
  return read_run_file(out, FINAL_FILE, REWRITE_FINAL)
