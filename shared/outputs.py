"""What a command may do to its output: hold it alone (a lock), and replace it only when stillroom made it.

A build writes a store and a `fit` writes a run dir; each first takes `OutputLock` on it: a file beside it,
`OUT.lock`, created with `O_CREAT | O_EXCL`, that names its holder (host, pid, since when, command). (Beside,
not inside: a Zarr group lists its directory's entries, and `--overwrite` removes the directory.) A second writer
gets an error naming the holder; a lock left by a dead process on the same host is taken over. The same protocol
maps onto object stores as a lease object written with a conditional create (`If-None-Match: *`).

`--overwrite` removes an output only if it is a stillroom store (its `zarr.json` holds the spec attributes) or a
run dir (its `config.json` holds a run record), and never one of the command's own inputs.
"""

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys

from shared.errors import StillroomError

LOCK_SUFFIX = ".lock"
STORE = "store"
RUN_DIR = "run dir"


def _log(message: str) -> None:
  print(f"stillroom: {message}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's process: alive.
  return True


class OutputLock:
  """An exclusive lock on an output (a store or a run dir), held from `acquire` to `release`.

  Raises (on acquire):
    StillroomError: another live process holds it, naming the holder.
  """

  def __init__(self, output: str, command: str):
    self.output, self.command = os.path.normpath(output), command
    self.path = self.output + LOCK_SUFFIX
    self.held = False

  def _holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, json.JSONDecodeError):
      return {}  # Being written, or garbled: treat as held by an unknown process.

  def acquire(self) -> "OutputLock":
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is None:
          continue  # Released meanwhile: try again.
        if holder.get("host") == record["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
          _log(f"taking over the lock on {self.output} left by process {holder['pid']} (no longer running)")
          stale = f"{self.path}.stale-{os.getpid()}"
          with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, stale)  # Only one of several takers moves it; the others retry.
            os.remove(stale)
          continue
        who = (f"process {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}) since "
               f"{holder.get('since')}") if holder else "another process"
        raise StillroomError(f"{self.output!r} is being written by {who}; wait for it to finish, or remove "
                             f"{self.path} if that process is gone.")
      with os.fdopen(fd, "w") as f:
        json.dump(record, f)
      self.held = True
      return self
    raise StillroomError(f"cannot take the lock {self.path}: it keeps changing hands.")

  def release(self) -> None:
    if self.held:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
      self.held = False

  def __enter__(self) -> "OutputLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def storage_errors(what: str):
  """Turns a failure of the file system (disk full, read-only, no permission) into one clear line."""
  try:
    yield
  except OSError as e:
    where = f" ({e.filename})" if e.filename else ""
    raise StillroomError(f"{what} failed: {e.strerror or e}{where}.") from e


def is_store(path: str) -> bool:
  """A Zarr group whose attributes hold a stillroom cache spec."""
  try:
    with open(os.path.join(path, "zarr.json")) as f:
      return "stillroom" in json.load(f).get("attributes", {})
  except (OSError, json.JSONDecodeError, AttributeError):
    return False


def is_run_dir(path: str) -> bool:
  """A directory whose config.json holds a run record (a model spec and its normalisation)."""
  try:
    with open(os.path.join(path, "config.json")) as f:
      config = json.load(f)
    return isinstance(config, dict) and {"model", "normalization"} <= set(config)
  except (OSError, json.JSONDecodeError):
    return False


def check_not_an_input(out: str, inputs: list[str], option: str) -> None:
  """Refuses an output that is, contains or lies inside one of the command's inputs."""
  target = os.path.realpath(out)
  for given in inputs:
    if not given:
      continue
    source = os.path.realpath(given)
    if target == source or source.startswith(target + os.sep) or target.startswith(source + os.sep):
      raise StillroomError(f"{option} {out!r} is (or holds, or lies inside) this command's input {given!r}; "
                           "choose another output.")


def check_output(out: str, kind: str, overwrite: bool, option: str = "--out") -> None:
  """Refuses an output that is a file, and (with `--overwrite`) one that stillroom did not make as `kind`."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise StillroomError(f"{option} {out!r} is a file; give a directory path for the {kind}.")
  if overwrite and os.path.exists(out) and os.listdir(out):
    made_by_us = is_store(out) if kind == STORE else is_run_dir(out)
    if not made_by_us:
      raise StillroomError(f"--overwrite: {out!r} is not a stillroom {kind}, so it is left alone; choose another "
                           f"{option}, or remove it yourself.")


def clear_for_overwrite(out: str, kind: str) -> None:
  """Deletes a stillroom `kind` (STORE or RUN_DIR) for `--overwrite`; call it holding the output's lock.

  Raises:
    StillroomError: the directory holds something else; nothing is deleted.
  """
  if not os.path.exists(out):
    return
  check_output(out, kind, overwrite=True)
  _log(f"--overwrite: removing {out}")
  shutil.rmtree(out)
