"""Run directories and teachers: the one save/load path both stages use.

A run directory, as written by `student-train fit`:
  RUN_DIR/config.json          a `RunRecord` (the model's spec, its input normalisation, its cross-fitting fold)
                               plus the trainer's resolved config under "resolved", and `DIGESTS_MARKER`.
  RUN_DIR/checkpoints/<epoch>/ orbax checkpoints, named by the number of epochs trained; item "params" holds the
                               model's weights (parameters and BatchNorm statistics) as a pure dict (the trainer
                               adds its own items beside it).
  RUN_DIR/checkpoints.json     the committed checkpoints and the SHA-256 and size of each of their files (see
                               `CheckpointFolder`); every read of a checkpoint checks the files it reads first.
The trainer adds metrics.jsonl, final.json and diverged.json (`student_train.run_dir`); every run-dir file is read
through `read_run_file`, which turns a damaged file into one error naming it and how to recover.

A teacher is either such a run dir or `module:function` for a JAX model that is not a stillroom run: the function
takes no arguments and returns an `nnx.Module`, or a pair `(apply_fn, params)` with `apply_fn(params, x) -> logits`.
Teachers receive inputs normalised as their config says (external teachers: the dataset's default normalisation).
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from shared import storage
from shared.data import Normalization
from shared.distributed import is_first
from shared.errors import StillroomError
from shared.json_checks import EXPECTED, described, is_kind
from shared.log import logger
from shared.models import WEIGHTS, ModelSpec, build_model, import_function, is_reference
from shared.precision import DEFAULT_COMPUTE_DTYPE
from shared.outputs import process_gone

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_FILE = "final.json"
DIVERGED_FILE = "diverged.json"
CHECKPOINT_DIR = "checkpoints"
MID_EPOCH_DIR = "checkpoints_mid"  # The trainer's checkpoints inside epochs (`student_train.run_dir`).
CHECKPOINT_FOLDERS = (CHECKPOINT_DIR, MID_EPOCH_DIR)
DIGESTS_SUFFIX = ".json"  # RUN_DIR/<checkpoint folder>.json: the digests of the folder's committed checkpoints.
DIGESTS_FILES = tuple(folder + DIGESTS_SUFFIX for folder in CHECKPOINT_FOLDERS)
# A top-level entry of config.json in a run dir whose checkpoints carry digests: without it a run dir was written
# before stillroom recorded them, and its checkpoints are read unchecked; with it a missing digests list is damage.
DIGESTS_MARKER = "checkpoint_digests"
PARAMS_ITEM = "params"
RETRAIN = "pass --overwrite to retrain the run, or choose another --out"  # What recovers a run that cannot resume.
# What recovers a damaged final.json (whichever command read it: eval's, export's and fit's alike).
REWRITE_FINAL = "delete it and run the command that trained the run again (`student-train fit` or `sweep`), which " \
    "rewrites it"

_LOG = logger(__name__)


COMMIT_FILE = "commit_success.txt"  # What marks a checkpoint on an object store complete (orbax's own name).


def checkpoint_manager(run_dir: str, max_to_keep: int | None = None, this_process_only: bool = False,
                       subdir: str = CHECKPOINT_DIR):
  """The orbax manager of a run dir's checkpoints (one place, so both stages agree on the layout).

  Args:
    max_to_keep: the newest checkpoints kept (None: all).
    this_process_only: read an existing checkpoint dir without the other processes of a multi-process job (orbax
      would otherwise wait for them at its barriers): each process loads teachers on its own.
    subdir: the run dir's folder of these checkpoints.

  Returns:
    An `ocp.CheckpointManager`, or for a run dir on an object store a `StagedCheckpointManager` with the same
    methods (`all_steps`, `latest_step`, `save`, `wait_until_finished`, `restore`, `delete`, `close`).
  """
  directory = storage.join(storage.local(run_dir), subdir)
  if storage.is_url(directory):
    return StagedCheckpointManager(directory, max_to_keep=max_to_keep)
  processes = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={jax.process_index()}) \
      if this_process_only else ocp.options.MultiprocessingOptions()
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                    create=not this_process_only,
                                                                    cleanup_tmp_directories=not this_process_only,
                                                                    multiprocessing_options=processes))


def _this_process() -> ocp.options.MultiprocessingOptions:
  return ocp.options.MultiprocessingOptions(primary_host=None, active_processes={jax.process_index()})


def _host_copy(tree, keep: bool = True):
  """The arrays of `tree` as NumPy arrays on this host: a replicated array's local copy is all of it; one split over
  the devices of several processes (`student-train fit --param-sharding fsdp`) is gathered from them, a collective:
  in a job of several processes, every process calls it, in the same order. `keep=False` (the processes that do not
  write the checkpoint): only takes part in those gathers, copies nothing else, and returns None."""
  def copy(leaf):
    if not isinstance(leaf, jax.Array) or (not keep and (leaf.is_fully_replicated or leaf.is_fully_addressable)):
      return leaf  # Not an array, or not this process's to copy.
    if leaf.is_fully_replicated:
      return np.asarray(leaf.addressable_data(0))
    return np.asarray(leaf if leaf.is_fully_addressable else multihost_utils.process_allgather(leaf, tiled=True))
  copied = jax.tree.map(copy, tree)
  return copied if keep else None


def _on_first_local_device(tree):
  """Restore targets placed on this process's first device (the saving job's devices may not exist here)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
                      if isinstance(leaf, jax.ShapeDtypeStruct) else leaf, tree)


STAGING_PREFIX = "stillroom-checkpoint-"  # + PID: staging directories under $TMPDIR.


def _ascii_number(name: str) -> bool:
  """Whether a name read from disk (a checkpoint's folder, a key of a digests list, a PID) is a number in ASCII digits
  (`str.isdigit` also accepts "²", which `int` refuses)."""
  return name.isascii() and name.isdigit()


def _remove_stale_staging() -> None:
  """Deletes the staging directories of processes that are gone (a kill skips their own cleanup)."""
  root = tempfile.gettempdir()
  for name in os.listdir(root):
    pid = name[len(STAGING_PREFIX):].split("-")[0]
    if name.startswith(STAGING_PREFIX) and _ascii_number(pid) and process_gone(int(pid)):
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class StagedCheckpointManager:
  """Checkpoints of a run dir on an object store, with the methods of `ocp.CheckpointManager` that stillroom uses.

  orbax 0.12 writes arrays through TensorStore kvstores, which it sets up for `gs://` and local paths only (an
  `s3://` URL becomes the local path `s3:/...`), and its default atomicity renames a temporary directory, which an
  object store cannot do. So orbax writes each checkpoint into a local staging directory (under `$TMPDIR`), the
  files are uploaded, and `commit_success.txt` is written last: a step without it is a save that a kill
  interrupted, and is neither listed nor restored; the next save of that step replaces it, and a save of a later
  step deletes it. A committed step loses its commit object first when it is deleted or saved again. Restores
  download only the items they read.

  In a job of several processes, process 0 alone saves and deletes (a replicated state's host copy is all of it; a
  state split over the processes' devices is gathered to every host first), and each process restores on its own,
  to host memory; the trainer then places the state on the devices. The staging directory is removed when the
  manager is closed or collected, or the process exits; one that a killed process left is removed by the next
  manager made on the machine.
  """

  def __init__(self, url: str, max_to_keep: int | None = None):
    self.url, self.max_to_keep = url.rstrip("/"), max_to_keep
    _remove_stale_staging()
    self._staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-")
    self._cleanup = weakref.finalize(self, shutil.rmtree, self._staging, True)
    # This process's own manager of the staging directory (orbax's Checkpointer would wait for the other processes).
    self._local = ocp.CheckpointManager(self._staging, options=ocp.CheckpointManagerOptions(
        create=False, multiprocessing_options=_this_process()))

  def all_steps(self) -> list[int]:
    """The committed steps, in order."""
    fs, inner = storage.filesystem(self.url)
    found = (key[len(inner) + 1:].split("/")[0] for key in fs.glob(f"{inner}/*/{COMMIT_FILE}"))
    return sorted(int(name) for name in found if _ascii_number(name))

  def latest_step(self) -> int | None:
    """The newest committed step, or None."""
    return max(self.all_steps(), default=None)

  def save(self, step: int, args: ocp.args.Composite, force: bool = False) -> bool:
    """Writes, uploads and commits checkpoint `step` (process 0 of a job; the others return), replacing one of that
    step; then keeps only the newest `max_to_keep`, and drops earlier steps that a kill left uncommitted."""
    del force  # Every save is written: the trainer decides when to save.
    # Every process: gathering a state split over several processes' devices is a collective; only process 0, which
    # writes, copies the rest to host memory.
    first = is_first()
    items = {name: ocp.args.StandardSave(_host_copy(arg.item, keep=first)) if isinstance(arg, ocp.args.StandardSave)
             else arg for name, arg in args.items()}
    if not first:
      return False
    target = storage.join(self.url, str(step))
    try:
      self._local.save(step, args=ocp.args.Composite(**items), force=True)
      self._local.wait_until_finished()
      self.delete(step)  # A committed step of that number (uncommitted first), or a save a kill interrupted.
      storage.upload(os.path.join(self._staging, str(step)), target, skip=frozenset({COMMIT_FILE}))
      storage.write_text(storage.join(target, COMMIT_FILE), f"checkpoint {step} committed\n")
    finally:
      self._forget(step)
    committed = self.all_steps()
    for old in committed[:-self.max_to_keep] if self.max_to_keep else ():
      self.delete(old)
    for entry, is_folder, _ in storage.scan(self.url):
      if is_folder and _ascii_number(entry) and int(entry) < step and int(entry) not in committed:
        storage.remove_tree(storage.join(self.url, entry))
    return True

  def wait_until_finished(self) -> None:
    """Saves are synchronous: nothing is pending."""

  def restore(self, step: int, args: ocp.args.Composite):
    """The items `args` names of committed step `step`, downloaded and restored as host (NumPy) arrays.

    Raises:
      FileNotFoundError: `step` is not a committed checkpoint.
    """
    if step not in self.all_steps():
      raise FileNotFoundError(f"{self.url}/{step} is not a committed checkpoint")
    items = set(args.keys())
    try:
      storage.download(storage.join(self.url, str(step)), os.path.join(self._staging, str(step)),
                       keep=lambda key: "/" not in key or key.split("/")[0] in items)
      self._local.reload()
      restored = self._local.restore(step, args=ocp.args.Composite(**{
          name: ocp.args.StandardRestore(_on_first_local_device(arg.item)) if isinstance(arg, ocp.args.StandardRestore)
          else arg for name, arg in args.items()}))
      return {name: jax.device_get(restored[name]) for name in items}
    finally:
      self._forget(step)

  def _forget(self, step: int) -> None:
    """Removes step `step` from the staging directory."""
    shutil.rmtree(os.path.join(self._staging, str(step)), ignore_errors=True)
    self._local.reload()

  def delete(self, step: int) -> None:
    """Uncommits step `step`, then deletes its objects (process 0 of a job): a kill in between leaves no usable half.
    Nothing happens for a step that is not there."""
    if not is_first():
      return
    target = storage.join(self.url, str(step))
    with contextlib.suppress(FileNotFoundError):
      storage.remove_file(storage.join(target, COMMIT_FILE))
    if storage.exists(target):
      storage.remove_tree(target)

  def close(self) -> None:
    """Removes the staging directory."""
    self._local.close()
    self._cleanup()


def _object_problem(value, **kinds) -> str | None:
  """What makes `value` other than a JSON object with entries of these kinds (a type, such as `int` (not a bool),
  `str` or `dict`, or a tuple of them; None allows null: `shared.json_checks`), or None when nothing does."""
  if not isinstance(value, dict):
    return f"it holds {described(value)}, not an object"
  for key, kind in kinds.items():
    kinds_of = kind if isinstance(kind, tuple) else (kind,)
    if key not in value:
      return f"no {key!r} entry"
    found = value[key]
    if not any(is_kind(found, k) for k in kinds_of):
      return f"its {key!r} is {described(found)}, not {' or '.join(EXPECTED[k] for k in kinds_of)}"
  return None


_METRIC_STRINGS = ("phase", "run_dir")  # The entries of a metrics line or final.json that are not numbers.


def _metrics_line_problem(line) -> str | None:
  """A metrics line or final.json: an object with its epoch, every entry a number but `_METRIC_STRINGS`' strings."""
  problem = _object_problem(line, epoch=int)
  for key, value in line.items() if problem is None else ():
    kind = str if key in _METRIC_STRINGS else (int, float)
    if not isinstance(value, kind) or isinstance(value, bool):
      return f"its {key!r} is {json.dumps(value)[:60]}, not {'a string' if kind is str else 'a number'}"
  return problem


def _metrics_problem(lines: list) -> str | None:
  """metrics.jsonl: a JSON object per line (see `_metrics_line_problem`), the epochs ascending."""
  last = 0
  for number, line in enumerate(lines, 1):
    problem = _metrics_line_problem(line)
    if problem is None and line["epoch"] <= last:
      problem = f"epoch {line['epoch']} follows epoch {last}"
    if problem:
      return f"line {number}: {problem}"
    last = line["epoch"]
  return None


def _digests_problem(value) -> str | None:
  """RUN_DIR/<checkpoint folder>.json: {"checkpoints": {step: {"files": {path: {"sha256", "bytes"}} or null}}}."""
  problem = _object_problem(value, checkpoints=dict)
  if problem:
    return problem
  for step, entry in value["checkpoints"].items():
    problem = None if _ascii_number(step) else "is not a step number"
    problem = problem or _object_problem(entry, files=(dict, None))
    for path, digest in (entry["files"] or {}).items() if problem is None else ():
      if _object_problem(digest, sha256=str, bytes=int) or len(digest["sha256"]) != 64:
        problem = f"file {path!r} has no valid digest"
        break
    if problem:
      return f"checkpoint {step!r}: {problem}"
  return None


def _config_problem(value) -> str | None:
  """config.json: an object, the trainer's resolved config (when recorded) an object too."""
  problem = _object_problem(value)
  if problem is None and "resolved" in value:
    problem = _object_problem(value, resolved=dict)
  return problem


_CHECKS = {CONFIG_FILE: _config_problem, FINAL_FILE: _metrics_line_problem,
           DIVERGED_FILE: lambda v: _object_problem(v, message=str), METRICS_FILE: _metrics_problem,
           **{name: _digests_problem for name in DIGESTS_FILES}}
_LINES = (METRICS_FILE,)  # Files of one JSON document per line.
_REQUIRED = object()


def read_run_file(run_dir: str, name: str, recover: str, missing=_REQUIRED):
  """A run dir's file as stillroom wrote it: config.json, final.json, diverged.json, a checkpoint folder's digests
  (objects), or metrics.jsonl (a list of objects, one per line). The one reader of them: damage (a garbled or
  truncated file, a missing entry, an entry of the wrong type) is one error naming the file.

  Args:
    run_dir: the run dir (a path or a URL).
    name: the file's name in it.
    recover: how the user recovers from damage, for the message ("pass --overwrite to retrain the run").
    missing: returned when the file is absent (default: an absent file is an error too).

  Raises:
    StillroomError: the file is absent (unless `missing` is given), unreadable or damaged, naming it and `recover`.
    ValueError: `name` is not one of these files (a programming error).
  """
  if name not in _CHECKS:
    raise ValueError(f"read_run_file: {name!r} is not a run-dir file (one of {', '.join(sorted(_CHECKS))})")
  path = storage.join(run_dir, name)
  try:
    data = storage.read_bytes(path)
  except FileNotFoundError as e:
    if missing is not _REQUIRED:
      return missing
    raise StillroomError(f"run dir {run_dir!r} has no {name}; {recover}.") from e
  except OSError as e:  # No permission, a directory of that name, an I/O error: the file may well be intact.
    raise StillroomError(f"run dir {run_dir!r}: cannot read {name} ({e.strerror or e}); make it readable (its "
                         f"permissions, the storage), or {recover}.") from e
  problem = None
  try:
    text = data.decode()
    if name in _LINES:
      value = []
      for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
          try:
            value.append(json.loads(line))
          except ValueError as e:
            problem = f"line {number} is not JSON: {e}"
            break
    else:
      value = json.loads(text)
  except ValueError as e:  # UnicodeDecodeError too.
    problem = f"not JSON: {e}"
  if problem is None:
    problem = _CHECKS[name](value)
  if problem:
    raise StillroomError(f"run dir {run_dir!r}: cannot read {name} ({problem}); {recover}.")
  return value


class CheckpointFolder:
  """A run dir's folder of orbax checkpoints (`checkpoints/`, the trainer's `checkpoints_mid/`) with their digests:
  the one path by which checkpoints are saved, listed, checked, read and deleted.

  A checkpoint is committed once `RUN_DIR/<folder>.json`, written whole by process 0 after orbax has finished the
  save, lists it with the SHA-256 and size of each of its files (hidden ones too); the file lists exactly the
  checkpoints kept. A checkpoint on disk that it does not list is a save that a kill interrupted: it is not
  committed, readers ignore it, and a resumed run discards it (`uncommitted`). A checkpoint is unlisted before it is
  deleted, so a kill never leaves a listed half; one listed but absent was pruned by orbax (`max_to_keep`) just
  before a kill, or deleted by hand (an error when it is the newest: `newest`). Every read checks the checkpoint's
  files against the list first (`check`): all of them for a restore by resume or of a teacher (`whole`), those of
  the "meta" item alone while resume looks for its position among mid-epoch checkpoints.

  A run dir whose config.json holds `DIGESTS_MARKER` was written with digests: there a missing list (with
  checkpoints on disk), or a checkpoint listed without digests, is damage. A folder of a run dir without it was
  written before stillroom recorded digests: all its checkpoints count as committed, and are read unchecked (logged
  once); its first save lists them without digests.
  """

  def __init__(self, run_dir: str, subdir: str = CHECKPOINT_DIR, max_to_keep: int | None = None,
               reading: bool = False, recover: str = RETRAIN):
    """
    Args:
      run_dir: the run dir (a path or a URL).
      subdir: the folder of these checkpoints (one of `CHECKPOINT_FOLDERS`).
      max_to_keep: the newest checkpoints kept (None: all).
      reading: only read (orbax's manager of this process alone; nothing is written).
      recover: how the user recovers from a damaged or missing list of digests, for the message.

    Raises:
      StillroomError: config.json is damaged.
      ValueError: `subdir` is not a checkpoint folder of a run dir (a programming error).
    """
    if subdir not in CHECKPOINT_FOLDERS:
      raise ValueError(f"CheckpointFolder: {subdir!r} is not one of {CHECKPOINT_FOLDERS}")
    self.run_dir, self.subdir, self.recover = run_dir, subdir, recover
    self.digests_file = subdir + DIGESTS_SUFFIX
    self.directory = storage.join(storage.local(run_dir), subdir)
    config = read_run_file(run_dir, CONFIG_FILE, recover, missing={})
    self.required = bool(config.get(DIGESTS_MARKER))
    self.manager = checkpoint_manager(run_dir, max_to_keep=max_to_keep, this_process_only=reading, subdir=subdir)
    self._checked: dict[int, set] = {}  # step: the items checked (None: all its files).
    self._said_unchecked = False
    if not reading and is_first() and not self.manager.all_steps() and \
        read_run_file(run_dir, self.digests_file, recover, missing=None) is None:
      self._write({})  # A new folder: from now on a checkpoint is committed when the file lists it.

  def listed(self) -> dict[int, dict | None] | None:
    """{step: its files' digests ({path: {"sha256", "bytes"}}), or None for one listed without them}; None for a
    folder whose checkpoints carry no digests (written before stillroom recorded them).

    Raises:
      StillroomError: the list is damaged, or missing where config.json says the run dir records digests and the
        folder holds checkpoints (a deleted list would otherwise turn the checks off).
    """
    value = read_run_file(self.run_dir, self.digests_file, self.recover, missing=None)
    if value is None:
      if not self.required:
        return None
      if self.manager.all_steps():
        raise StillroomError(f"run dir {self.run_dir!r} has no {self.digests_file}, which lists the checkpoints in "
                             f"{self.subdir}/ and the digests of their files ({CONFIG_FILE} records that this run "
                             f"dir keeps them), so they cannot be checked; {self.recover}.")
      return {}
    return {int(step): entry["files"] for step, entry in value["checkpoints"].items()}

  def _write(self, listed: dict[int, dict | None]) -> None:
    storage.write_text(storage.join(self.run_dir, self.digests_file), json.dumps(
        {"checkpoints": {str(step): {"files": listed[step]} for step in sorted(listed)}}, indent=1))

  def on_disk(self) -> list[int]:
    """The steps orbax finds in the folder, committed or not, in order."""
    return list(self.manager.all_steps())

  def committed(self) -> list[int]:
    """The steps listed and present, in order."""
    listed, found = self.listed(), self.on_disk()
    return found if listed is None else [step for step in found if step in listed]

  def uncommitted(self) -> list[int]:
    """The step present but not listed, a save that a kill interrupted before it was listed: [] or [step]. A kill
    leaves at most one, newer than every listed step (saves are listed one at a time; `delete` goes newest first).

    Raises:
      StillroomError: any other unlisted checkpoint (a list emptied or edited by hand), naming the list and the
        checkpoints: nothing is deleted.
    """
    listed = self.listed()
    unlisted = [] if listed is None else [step for step in self.on_disk() if step not in listed]
    if len(unlisted) > 1 or (unlisted and unlisted[0] < max(listed, default=-1)):
      named = ", ".join(self.where(step) for step in unlisted)
      raise StillroomError(f"run dir {self.run_dir!r}: {self.digests_file} does not list {named}, which no kill "
                           f"leaves (only the newest checkpoint, alone, can be a save a kill interrupted), so the "
                           f"list is damaged and nothing is deleted; restore {self.digests_file} listing every "
                           f"checkpoint kept, or {self.recover}.")
    return unlisted

  def absent(self) -> list[int]:
    """The steps listed but not present (pruned by orbax just before a kill, or deleted by hand), in order."""
    listed, found = self.listed(), set(self.on_disk())
    return [] if listed is None else sorted(step for step in listed if step not in found)

  def newest(self) -> int | None:
    """The newest listed step (for a folder without digests, the newest present), or None: it may be absent."""
    listed = self.listed()
    return max(self.on_disk() if listed is None else listed, default=None)

  def where(self, step: int) -> str:
    return f"{self.subdir}/{step}"

  def missing(self, step: int, recover: str, said: str | None = None) -> StillroomError:
    """The error for newest checkpoint `step`, absent; `said`: what names it (default: this folder's list)."""
    return StillroomError(f"run dir {self.run_dir!r}: its newest checkpoint, {self.where(step)} "
                          f"({said or 'listed in ' + self.digests_file}), is missing; {recover}.")

  def save(self, step: int, args: ocp.args.Composite, force: bool = False) -> None:
    """Saves checkpoint `step` (every process of a job; see `checkpoint_manager`), then lists it with its digests
    and drops from the list the steps orbax deleted (process 0)."""
    self.manager.save(step, args=args, force=force)
    self.manager.wait_until_finished()
    if is_first():
      listed = self.listed()
      kept = {s: None if listed is None else listed[s] for s in self.on_disk()
              if s != step and (listed is None or s in listed)}
      self._write({**kept, step: self._digests(step)})
    self._checked.pop(step, None)

  def _digests(self, step: int) -> dict:
    root = storage.join(self.directory, str(step))
    return {path: dict(zip(("sha256", "bytes"), storage.file_digest(storage.join(root, path))))
            for path in storage.files_under(root)}

  def delete(self, steps) -> None:
    """Deletes these steps, each of them on disk (every process of a job, in the same order: decide them in one
    process), one at a time, newest first. One newer than every step that stays listed is unlisted first (process
    0), so that a kill leaves at most one unlisted checkpoint, the newest (see `uncommitted`); an older one is
    unlisted after, so that a kill leaves it listed and half-deleted: damage, which every reader names."""
    for step in sorted(steps, reverse=True):
      listed = self.listed() if is_first() else None
      newest = listed is None or step > max((s for s in listed if s != step), default=-1)
      if newest:
        self.unlist([step])
      self.manager.delete(step)
      if not newest:
        self.unlist([step])

  def unlist(self, steps) -> None:
    """Drops these steps from the list (process 0): steps listed but absent, or about to be deleted."""
    steps = list(steps)
    listed = self.listed() if is_first() else None
    if listed is not None and any(step in listed for step in steps):
      self._write({s: files for s, files in listed.items() if s not in steps})
    for step in steps:
      self._checked.pop(step, None)

  def damage(self, step: int, items=None) -> str | None:
    """What differs in committed checkpoint `step` from its digests, or None: in the files of `items` (the names
    of the item folders a read restores) and the checkpoint's top-level files, or in all its files (None). The
    folders of other items are not read.

    Raises:
      StillroomError: the list is damaged or missing (see `listed`), or lists `step` without digests in a run dir
        that records them.
    """
    checked = self._checked.get(step, set())
    if None in checked or (items is not None and set(items) <= checked):
      return None
    listed = self.listed()
    if listed is not None and step not in listed:
      return f"{self.digests_file} does not list it (a save that a kill interrupted)"
    expected = None if listed is None else listed[step]
    if expected is None:
      if self.required:
        raise StillroomError(f"run dir {self.run_dir!r}: {self.digests_file} lists checkpoint {self.where(step)} "
                             f"without the digests of its files, which this run dir records; {self.recover}.")
      if not self._said_unchecked:
        _LOG.info(f"{self.run_dir}: the checkpoints in {self.subdir}/ carry no digests (written by an earlier "
                  "stillroom); they are read unchecked")
        self._said_unchecked = True
      return None
    root = storage.join(self.directory, str(step))
    found = set(storage.files_under(root)) if storage.exists(root) else set()
    if items is not None:  # The checkpoint's own files and those of `items`; the other items' are not read.
      def read(path: str) -> bool:
        return "/" not in path or path.split("/")[0] in items
      expected = {path: digest for path, digest in expected.items() if read(path)}
      found = {path for path in found if read(path)}
    for path in sorted(set(expected) | found):
      if path not in found:
        return f"its file {path} is missing"
      if path not in expected:
        return f"it holds a file {self.digests_file} does not list, {path}"
      digest, size = storage.file_digest(storage.join(root, path))
      if (digest, size) != (expected[path]["sha256"], expected[path]["bytes"]):
        return f"its file {path} differs from its digest in {self.digests_file}" + (
            f" ({size} bytes, {expected[path]['bytes']} recorded)" if size != expected[path]["bytes"] else "")
    self._checked[step] = checked | ({None} if items is None else set(items))
    return None

  def check(self, step: int, recover: str, items=None) -> None:
    """Checks the files of committed checkpoint `step` that a read of `items` reads (see `damage`) against their
    digests.

    Raises:
      StillroomError: a file differs from its digest, is missing or is not listed, naming the run dir, the
        checkpoint, the file and `recover`; the list is damaged or missing.
    """
    problem = self.damage(step, items)
    if problem:
      raise StillroomError(f"run dir {self.run_dir!r}: checkpoint {self.where(step)} is damaged: {problem}; "
                           f"{recover}.")

  def restore(self, step: int, args: ocp.args.Composite, recover: str, whole: bool = False):
    """The items `args` names of checkpoint `step`, the files read checked first (`check`).

    Args:
      whole: check every file of the checkpoint, not only those of the items restored (a resumed run carries the
        checkpoint on as its own).

    Raises:
      StillroomError: the checkpoint is damaged, or orbax cannot read it, naming it and `recover`.
    """
    self.check(step, recover, None if whole else list(args.keys()))
    try:
      return self.manager.restore(step, args=args)
    except Exception as e:  # orbax raises many types for unreadable or mismatched checkpoints.
      # The first line of orbax's message, without the TensorStore spec it may append.
      first = (str(e).splitlines() or [type(e).__name__])[0].split(" See full TensorStore details")[0][:240]
      raise StillroomError(f"run dir {self.run_dir!r}: cannot read checkpoint {self.where(step)} ({first}); "
                           f"{recover}.") from e

  def close(self) -> None:
    self.manager.close()


def params_of(model: nnx.Module) -> dict:
  """The model's weights (`shared.models.WEIGHTS`: parameters and BatchNorm's running statistics) as a pure nested
  dict of arrays: what checkpoints hold as their "params" item and what a teacher runs with."""
  return nnx.to_pure_dict(nnx.state(model, WEIGHTS))


def param_digest(params: Any) -> str:
  """SHA-256 over every parameter leaf's path, shape, dtype and bytes: identifies a teacher's weights."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
    array = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype.str}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrossFit:
  """A run trained without one fold of K (`student-train fit --folds K --holdout-fold k`)."""

  folds: int
  holdout_fold: int


@dataclasses.dataclass(frozen=True)
class SpecialistRecord:
  """A specialist run (`student-train fit --specialist`): its outputs are `classes` in order, then the dustbin.

  Attributes:
    classes: the generalist's class ids of its outputs 0..n-1.
    dustbin_correction: the log-odds to add to its dustbin logit to undo its enriched sampling.
    generalist_digest: the parameter digest of the generalist it started from.
  """

  classes: tuple[int, ...]
  dustbin_correction: float
  generalist_digest: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunRecord:
  """What a run dir's config.json says about its model: what loading it as a teacher needs.

  Attributes:
    model: the model's structure.
    normalization: the input normalisation it trained with.
    cross_fit: the fold it held out, or None if it trained on all its examples.
    image_size: S when its inputs were crop views rendered at SxS (evaluation shows it the centre crop at S), or
      None when it saw the images as stored.
    specialist: for a specialist run, its classes and dustbin correction; else None.
  """

  model: ModelSpec
  normalization: Normalization
  cross_fit: CrossFit | None = None
  image_size: int | None = None
  specialist: SpecialistRecord | None = None

  def to_json(self) -> dict:
    d = {"model": self.model.to_dict(), "normalization": self.normalization.to_dict(),
         "cross_fit": None if self.cross_fit is None else dataclasses.asdict(self.cross_fit)}
    if self.image_size is not None:
      d["image_size"] = self.image_size
    if self.specialist is not None:
      d["specialist"] = {"classes": list(self.specialist.classes),
                         "dustbin_correction": self.specialist.dustbin_correction,
                         "generalist_digest": self.specialist.generalist_digest}
    return d

  @classmethod
  def from_json(cls, d: dict, where: str) -> "RunRecord":
    try:
      cross_fit = d.get("cross_fit")
      if "cross_fit" not in d and "resolved" in d:  # Written by stillroom 0.1: the fold is in the resolved config.
        trained = d["resolved"]["config"]
        cross_fit = {"folds": trained["folds"], "holdout_fold": trained["holdout_fold"]} if trained["folds"] > 1 \
            else None
      specialist = d.get("specialist")
      return cls(model=ModelSpec.from_dict(d["model"]), normalization=Normalization.from_dict(d["normalization"]),
                 cross_fit=None if cross_fit is None else CrossFit(**cross_fit), image_size=d.get("image_size"),
                 specialist=None if specialist is None else SpecialistRecord(
                     tuple(int(c) for c in specialist["classes"]), float(specialist["dustbin_correction"]),
                     specialist.get("generalist_digest")))
    except (KeyError, TypeError, AttributeError) as e:
      raise StillroomError(f"{where}: {CONFIG_FILE} lacks a valid 'model', 'normalization' or 'cross_fit' entry "
                           f"({type(e).__name__}: {e}).") from e


UNREADABLE_TEACHER = "retrain the run (`student-train fit` with --overwrite)"  # What recovers a damaged teacher.


def read_config(run_dir: str) -> dict:
  """A teacher's config.json (see `read_run_file`).

  Raises:
    StillroomError: `run_dir` is a file, absent, not a run dir, or its config.json is unreadable or damaged.
  """
  if storage.is_file(run_dir):
    raise StillroomError(f"{run_dir!r} is a file, not a run dir.")
  if not storage.exists(run_dir):
    raise StillroomError(f"teacher run dir {run_dir!r} does not exist.")
  config = read_run_file(run_dir, CONFIG_FILE, UNREADABLE_TEACHER, missing=None)
  if config is None:
    raise StillroomError(f"{run_dir!r} is not a run dir: it has no {CONFIG_FILE}.")
  return config


def save_run(run_dir: str, record: RunRecord, model: nnx.Module, trained_epochs: int = 0) -> None:
  """Writes a minimal run dir: `config.json` and one checkpoint with the model's parameters (and its digests).

  The trainer writes richer checkpoints through `CheckpointFolder`; this is for models made elsewhere
  (tests, conversions) that should be usable as teachers.

  Args:
    run_dir: directory to create.
    record: the model's spec, normalisation and cross-fitting fold.
    model: the model whose parameters to save.
    trained_epochs: the checkpoint's number.
  """
  storage.make_dirs(run_dir)
  storage.write_text(storage.join(run_dir, CONFIG_FILE), json.dumps({**record.to_json(), DIGESTS_MARKER: 1}, indent=2))
  folder = CheckpointFolder(run_dir)
  folder.save(trained_epochs, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params_of(model))}))
  folder.close()


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Teacher:
  """A loaded teacher: a pure `apply_fn(params, x) -> logits [B, C]` and its parameters.

  Attributes:
    name: short display name (run dir basename, or `module:function`).
    source: where it came from (run dir path or `module:function`).
    model: registry name, or "external".
    apply_fn: pure function of (params, normalised float32 inputs [B, ...]) to logits [B, C].
    params: parameter pytree.
    normalization: input normalisation, or None to use the dataset's default.
    trained_epochs: epochs trained when the checkpoint was written (None for external teachers).
    record: the run dir's `RunRecord` (None for external teachers).
    features_fn: `(params, x) -> (logits, {name: feature [B, ...]})` when the model names its features (its
      `features` method, `shared.models`), else None.
  """

  name: str
  source: str
  model: str
  apply_fn: Callable
  params: Any
  normalization: Normalization | None
  trained_epochs: int | None = None
  record: RunRecord | None = None
  features_fn: Callable | None = None

  @property
  def digest(self) -> str:
    return param_digest(self.params)

  @property
  def num_params(self) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(self.params)))


def _module_apply_fn(model: nnx.Module) -> tuple[Callable, Any, Callable | None]:
  """Splits an NNX module into pure functions over its weights (`WEIGHTS`: parameters and BatchNorm's running
  statistics), in eval mode: `(apply_fn, params, features_fn)`, the last None when the module has no `features`
  method."""
  model.eval()
  graphdef, params, rest = nnx.split(model, WEIGHTS, ...)

  def apply_fn(params, x):
    return nnx.merge(graphdef, params, rest)(x)

  def features_fn(params, x):
    return nnx.merge(graphdef, params, rest).features(x)

  return apply_fn, params, features_fn if callable(getattr(model, "features", None)) else None


def check_checkpoint_path(run_dir: str, option: str = "--out") -> None:
  """Refuses a run dir whose path holds a bracketed part: orbax 0.12 writes checkpoints there but cannot read them
  back (tensorstore's OCDBT lookups fail on `[...]`, e.g. `runs/train[:80%]`), so the run could never resume or
  teach.

  Raises:
    StillroomError: naming the path.
  """
  path = storage.absolute(run_dir)
  if re.search(r"\[[^/]*\]", path):
    raise StillroomError(f"{option} {run_dir!r}: orbax cannot read checkpoints back from a path holding '[...]' "
                         f"({path}); choose a name without brackets.")


def load_run_teacher(run_dir: str, epoch: int | None = None, epoch_option: str | None = None,
                     host: bool = False, compute_dtype: str | None = None) -> Teacher:
  """Loads a checkpoint of a run dir as a teacher, its files checked against their digests: the newest, or the one
  after `epoch` epochs.

  The newest is the newest the run dir lists (checkpoints.json, and final.json's "epochs"): when it is absent, the
  run dir is refused rather than read at an older checkpoint.

  Args:
    run_dir: the run dir (a path or a URL).
    epoch: the epochs trained of the checkpoint to load (None: the newest).
    epoch_option: the calling command's option that sets `epoch` (`--epoch`), which the errors name when another
      checkpoint could be used; None for a command without one.
    host: restore the weights into host memory (NumPy arrays), for a caller that places them on its devices itself
      (the build, which may split them over its devices: a teacher need not fit on one); else onto this process's
      first device.
    compute_dtype: the dtype its model computes in (`shared.precision.COMPUTE_DTYPES`); None: the one its run
      recorded (`ModelSpec.dtype`). Its weights load the same at either.

  Raises:
    StillroomError: missing or unreadable dir, config or checkpoint; a damaged or absent newest checkpoint, or
      `epoch` not kept (naming the epochs kept); unknown model; your own model asked to compute in bfloat16.
  """
  check_checkpoint_path(run_dir, "run dir")
  config = read_config(run_dir)
  record = RunRecord.from_json(config, repr(run_dir))
  spec = record.model if compute_dtype is None else dataclasses.replace(record.model, dtype=compute_dtype)
  model = nnx.eval_shape(lambda: build_model(spec))
  apply_fn, abstract, features_fn = _module_apply_fn(model)
  if not storage.exists(storage.join(run_dir, CHECKPOINT_DIR)):
    raise StillroomError(f"teacher run dir {run_dir!r} has no {CHECKPOINT_DIR}/ directory: is it trained?")
  # stillroom 0.1's trainer numbered its checkpoints from 0 at the end of the first epoch.
  offset = 1 if config.get("software_version") == "0.1.0" else 0
  folder = CheckpointFolder(run_dir, reading=True, recover=UNREADABLE_TEACHER)
  try:
    kept = folder.committed()

    def otherwise(step: int) -> str:
      """How to recover when checkpoint `step` cannot be used."""
      others = [s + offset for s in kept if s != step]
      if epoch_option and others:
        return (f"pass {epoch_option} N to use another checkpoint (kept: epochs "
                f"{', '.join(str(e) for e in others)})")
      return UNREADABLE_TEACHER

    if epoch is not None:
      step = epoch - offset
      if step not in kept:
        raise StillroomError(f"run dir {run_dir!r} keeps no checkpoint after epoch {epoch}; "
                             + (f"it keeps epochs {', '.join(str(s + offset) for s in kept)}." if kept else
                                "it keeps none: train it first (`student-train fit`)."))
    else:
      step, said = folder.newest(), None
      final = read_run_file(run_dir, FINAL_FILE, REWRITE_FINAL, missing=None)
      if final is not None and is_kind(final.get("epochs"), int) and (step is None or final["epochs"] - offset > step):
        step, said = final["epochs"] - offset, f"{FINAL_FILE} records {final['epochs']} epochs trained"
      if step is None:
        raise StillroomError(f"teacher run dir {run_dir!r} has no finished checkpoint.")
      if step not in kept:
        raise folder.missing(step, otherwise(step), said)
    # On this process's first device (the saved sharding names the saving job's devices, which may be another
    # process's here), or as NumPy arrays in host memory.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype) if host else
                          jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(abstract))
    # Every file checked, the optimizer state's too, although only the parameters are restored: a checkpoint with
    # any damage is not used (a reader cannot tell what else a damaged copy has lost).
    restored = folder.restore(step, ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}),
                              otherwise(step), whole=True)
  finally:
    folder.close()
  params = abstract
  nnx.replace_by_pure_dict(params, restored[PARAMS_ITEM])
  source = storage.absolute(run_dir)
  return Teacher(name=source.rstrip("/").rsplit("/", 1)[-1], source=source, model=spec.name,
                 apply_fn=apply_fn, params=params, normalization=record.normalization, trained_epochs=step + offset,
                 record=record, features_fn=features_fn)


def load_external_teacher(reference: str, host: bool = False) -> Teacher:
  """Loads `module:function` (the current directory is importable, as with `python -m`).

  Args:
    host: its parameters copied to host memory (NumPy arrays), as `load_run_teacher`'s.

  Raises:
    StillroomError: it cannot be imported, it raises (naming the reference and its exception), or it returns
      something else than an nnx.Module or (apply_fn, params).
  """
  factory = import_function(reference, "teacher")
  try:
    made = factory()
  except Exception as e:  # pylint: disable=broad-except  # The factory's own failure, named.
    first_line = (str(e).splitlines() or [""])[0][:300]  # The error stays one line.
    raise StillroomError(f"teacher {reference!r}() failed: {type(e).__name__}: {first_line}; fix the function, or "
                         "give another --teacher.") from e
  features_fn = None
  if isinstance(made, nnx.Module):
    apply_fn, params, features_fn = _module_apply_fn(made)
  elif isinstance(made, tuple) and len(made) == 2 and callable(made[0]):
    apply_fn, params = made
  else:
    raise StillroomError(
        f"teacher {reference!r} returned {type(made).__name__}; it must return an nnx.Module or "
        "(apply_fn, params).")
  if host:
    params = jax.device_get(params)
  return Teacher(name=reference, source=reference, model="external", apply_fn=apply_fn, params=params,
                 normalization=None, features_fn=features_fn)


def load_teacher(reference: str, compute_dtype: str | None = None, host: bool = False) -> Teacher:
  """A run dir path, or `module:function` when no such path exists and the text has one colon.

  Args:
    reference: the run dir or `module:function`.
    compute_dtype: the dtype a run dir's model computes in (None: the one it recorded; see `load_run_teacher`).
      Your own function computes as its code does: it is refused with any dtype but float32, which stillroom
      cannot make it compute in.
    host: its weights in host memory (see `load_run_teacher`).

  Raises:
    StillroomError: see `load_run_teacher` and `load_external_teacher`; your own function with bfloat16.
  """
  path = storage.local(reference)
  if not storage.is_url(path) and not os.path.exists(path) and is_reference(reference):
    if compute_dtype not in (None, DEFAULT_COMPUTE_DTYPE):
      raise StillroomError(f"teacher {reference!r} is your own function, which computes as its code does: stillroom "
                           f"cannot make it compute in {compute_dtype}; build with --compute-dtype "
                           f"{DEFAULT_COMPUTE_DTYPE}.")
    return load_external_teacher(reference, host)
  return load_run_teacher(reference, host=host, compute_dtype=compute_dtype)
