"""What a command may do to its output: hold it alone (a lock), and replace it only when stillroom made it.

A build writes a store and a `fit` writes a run dir; each first takes `OutputLock` on it: an `flock` on a file
beside it, `OUT.lock`, which names its holder (host, pid, since when, command). (Beside, not inside: a Zarr group
lists its directory's entries, and `--overwrite` removes the directory.) A second writer gets an error naming the
holder; the lock of a process that died is free again, since the kernel drops a dead process's locks. On object
stores (`shared.storage`) the same role falls to a lease: the object `OUT.lock`, written with a conditional create
(`If-None-Match: *`) and renewed while the writer lives.

`--overwrite` removes an output only if it is a stillroom store (its `zarr.json` holds the spec attributes) or a
run dir (its `config.json` holds a run record), and never one of the command's own inputs; and of it only what
stillroom wrote there, keeping (and naming) anything else, such as a user's notes.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from shared import storage
from shared.cache import COMPLETE_KEY, SPEC_KEY
from shared.data.prepared import COMPLETE_KEY as PREPARED_COMPLETE_KEY
from shared.data.prepared import SPEC_KEY as PREPARED_SPEC_KEY
from shared.errors import StillroomError
from shared.log import logger

LOCK_SUFFIX = ".lock"
LEASE_SECONDS = 120  # A lease not renewed for this long belongs to a writer that died.
CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)  # A read-only mount, or no write permission.
STORE = "store"
RUN_DIR = "run dir"


_LOG = logger(__name__)


class OutputLock:
  """An exclusive lock on an output (a store or a run dir), held from `acquire` to `release`.

  The lock file `OUT.lock` carries an `flock` held for as long as the writer lives: the kernel drops it when the
  process dies, however it dies, so a lock file without a live holder is stale and is taken over, with no race
  between two takers. The file's content only names the holder in errors.

  A command that may find its output finished (a run, a complete store) passes `done`: where the lock file cannot
  be written (a read-only mount, no permission) and `done()` is true, the command will only read, so it goes on
  without the lock, saying so in one line.

  Raises (on acquire):
    StillroomError: another live process holds it, naming the holder; the lock file cannot be written (a read-only
      mount, no permission) and the output is not `done`, naming the output and how to recover.
    OSError: another failure of the file system.
  """

  def __new__(cls, output: str, command: str, done: Callable[[], bool] | None = None):
    if storage.is_url(storage.local(output)):
      return ObjectLease(output, command, done)
    return super().__new__(cls)

  def __init__(self, output: str, command: str, done: Callable[[], bool] | None = None):
    self.output, self.command, self.done = os.path.realpath(storage.local(output)), command, done
    self.path = self.output + LOCK_SUFFIX
    self._fd: int | None = None

  def acquire(self) -> "OutputLock":
    while True:
      try:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
      except OSError as e:
        if e.errno not in CANNOT_WRITE:
          raise
        if _read_only_done(self.output, self.done, e.strerror):
          return self
        raise cannot_write(self.output, e) from e
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise _held(self.output, holder) from None
      try:
        same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same_file = False
      if not same_file:  # The holder released (and removed) it between our open and our flock: try again.
        os.close(fd)
        continue
      previous = _read_holder(fd)
      if previous:
        _LOG.info(f"taking over the lock on {self.output} left by process {previous.get('pid')} on "
                  f"{previous.get('host')} (no longer running)")
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(_holder_record(self.command)).encode(), 0)
      self._fd = fd
      return self

  def release(self) -> None:
    if self._fd is not None:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)  # Still holding the flock: nobody else holds this file.
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "OutputLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


class ObjectLease:
  """The lock of an output on an object store: the object `OUT.lock`, made with a conditional create (of two
  writers, exactly one creates it) and rewritten every `LEASE_SECONDS / 4` by a thread while the writer lives. A
  lease whose object was last written `LEASE_SECONDS` ago (the store's modification time against this host's
  clock: hosts must agree within a minute) belongs to a writer that died, and is taken over; so, at once, is one
  whose holder ran on this machine in this boot and is no longer running.

  Each lease carries a random token. On S3 the writer renews it only if it is unchanged since its last write (`If-Match`
  on the ETag that write returned), and a taker replaces a stale lease only if it is still the one it found:
  of two takers one wins, and a writer that lost its lease (paused past `LEASE_SECONDS`) finds out at its next
  renewal, says so and stops renewing. Elsewhere (gs://) renewal and takeover read, then write: two takers of one
  stale lease in the same round trip could both succeed. A writer deletes its lease only while it holds its token.

  Raises (on acquire):
    StillroomError: another live process holds it, naming the holder and when it was last renewed.
  """

  def __init__(self, output: str, command: str, done: Callable[[], bool] | None = None):
    self.output, self.command, self.done = storage.absolute(output), command, done
    bucket, _, key = self.output.split("://", 1)[1].partition("/")
    if not bucket or not key:  # The lease sits beside the output: a bucket has nothing beside it.
      raise StillroomError(f"{output!r}: give a path inside a bucket, e.g. "
                           f"{self.output.split('://')[0]}://{bucket or 'BUCKET'}/NAME.")
    self.path = self.output + LOCK_SUFFIX
    self._fs, self._key = storage.filesystem(self.path)
    self._data = json.dumps({**_holder_record(command), "token": secrets.token_hex(16)}).encode()
    self._conditional = self.path.startswith("s3://")  # s3fs passes If-Match to S3's PutObject.
    self._etag: str | None = None  # Of our last write.
    self._stop = threading.Event()
    self._renewer: threading.Thread | None = None
    self.lost = False

  def _holder(self) -> tuple[dict, float, str] | None:
    """(the lease's record, seconds since it was written, its ETag), or None when there is none."""
    self._fs.invalidate_cache()
    try:
      data, info = self._fs.cat_file(self._key), self._fs.info(self._key)
      written = self._fs.modified(self._key)
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(data)
    except ValueError:
      holder = {}
    return (holder if isinstance(holder, dict) else {}), time.time() - written.timestamp(), info.get("ETag", "")

  def _ours(self) -> bool:
    found = self._holder()
    return found is not None and found[0] == json.loads(self._data)

  def _put(self, **conditions) -> None:
    response = self._fs.pipe_file(self._key, self._data, **conditions)
    self._etag = response.get("ETag") if isinstance(response, dict) else None

  def acquire(self) -> "ObjectLease":
    for _ in range(3):  # A lease released or taken over between our create and our read: try again.
      try:
        self._put(mode="create")
        break
      except FileNotFoundError as e:
        raise StillroomError(f"{self.output!r}: {e} (does the bucket exist?)") from e
      except PermissionError:  # Read-only credentials.
        if _read_only_done(self.output, self.done, "no permission to write"):
          return self
        raise
      except FileExistsError:
        found = self._holder()
        if found is None:
          continue
        holder, age, etag = found
        dead_here = _died_on_this_machine(holder)
        if age < LEASE_SECONDS and not dead_here:
          raise _held(self.output, holder, f"its lease was renewed {age:.0f} s ago, and is taken over once "
                                           f"{LEASE_SECONDS} s old if that process is gone") from None
        _LOG.info(f"taking over the lease on {self.output} left by process {holder.get('pid')} on {holder.get('host')} "
                  + ("(no longer running)" if dead_here else f"(not renewed for {age:.0f} s)"))
        if self._conditional:
          try:
            self._put(IfMatch=etag)  # Only if it is still the stale lease: another taker may have been first.
            break
          except OSError:
            continue
        self._fs.rm(self._key)
    else:
      raise StillroomError(f"cannot take the lease {self.path!r}: other processes keep taking it.")
    if not self._ours():  # A store that ignores conditional writes lets two creators "succeed"; this catches some.
      raise StillroomError(f"cannot take the lease {self.path!r}: another writer holds it (does this store honour "
                           "conditional writes, If-None-Match?).")
    self._renewer = threading.Thread(target=self._renew, daemon=True, name="stillroom-lease")
    self._renewer.start()
    return self

  def _renew(self) -> None:
    while not self._stop.wait(LEASE_SECONDS / 4):
      try:
        if self._conditional and self._etag:
          self._put(IfMatch=self._etag)
          continue
        if self._ours():
          self._put()
          continue
      except FileNotFoundError:
        pass  # Deleted: lost, as when replaced.
      except OSError as e:
        if "pre-condition" not in str(e) and "Precondition" not in str(e):
          _LOG.info(f"renewing the lease on {self.output} failed ({str(e)[:120]}); retrying")
          continue
      except Exception as e:  # pylint: disable=broad-except  # Retried; the lease lasts four periods.
        _LOG.info(f"renewing the lease on {self.output} failed ({type(e).__name__}: {str(e)[:120]}); retrying")
        continue
      self.lost = True
      _LOG.info(f"error: the lease on {self.output} was taken over by another process: stop this one, since two now "
                "write the same output")
      return

  def release(self) -> None:
    if self._renewer is not None:
      self._stop.set()
      self._renewer.join()
      self._renewer = None
      with contextlib.suppress(OSError):  # Gone, or the store is unreachable: the lease then runs out.
        if not self.lost and self._ours():
          self._fs.rm(self._key)

  def __enter__(self) -> "ObjectLease":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_only_done(output: str, done: Callable[[], bool] | None, why: str) -> bool:
  """Whether a command whose lock cannot be written may go on without it: its output is `done`, so it only reads."""
  if done is None or not done():
    return False
  _LOG.info(f"{output} cannot be written here ({why}); it is finished, so it is only read, without the writer's lock")
  return True


def cannot_write(output: str, error: OSError) -> StillroomError:
  """The error for an output that cannot be written (`CANNOT_WRITE`: a read-only mount, no permission)."""
  where = f": {error.filename}" if error.filename else ""
  recover = ("choose an --out on a writable file system" if error.errno == errno.EROFS else
             "give yourself write permission there, or choose another --out")
  return StillroomError(f"{output!r} cannot be written ({error.strerror or error}{where}); {recover}.")


@contextlib.contextmanager
def writing(output: str):
  """Turns a write into `output` refused by the file system (`CANNOT_WRITE`) into `cannot_write`'s one line."""
  try:
    yield
  except OSError as e:
    if e.errno in CANNOT_WRITE:
      raise cannot_write(output, e) from e
    raise


def _boot_id() -> str | None:
  """This machine's boot: two machines (or containers) may share a host name, never a boot id."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return None


def _holder_record(command: str) -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "boot": _boot_id(),
          "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def process_gone(pid: int) -> bool:
  """Whether no process of this number runs on this machine."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except OSError:  # Running, under another user.
    return False
  return False


def _died_on_this_machine(holder: dict) -> bool:
  """Whether a lease's holder ran on this machine, in this boot, and is no longer running: its lease is taken over
  at once instead of after `LEASE_SECONDS` (as the kernel frees a local lock at once)."""
  return (holder.get("boot") is not None and holder.get("boot") == _boot_id() and isinstance(holder.get("pid"), int)
          and process_gone(holder["pid"]))


def _held(output: str, holder: dict, state: str = "") -> StillroomError:
  who = (f"process {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}) since "
         f"{holder.get('since')}") if holder else "another process"
  return StillroomError(f"{output!r} is being written by {who}" + (f"; {state}" if state else "")
                        + "; wait for it to finish.")


def _read_holder(fd: int) -> dict:
  try:
    holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


@contextlib.contextmanager
def storage_errors(what: str):
  """Turns a failure of the file system (disk full, read-only, no permission) into one clear line."""
  try:
    yield
  except OSError as e:
    where = f" ({e.filename})" if e.filename else ""
    raise StillroomError(f"{what} failed: {e.strerror or e}{where}.") from e


def is_store(path: str, complete: bool = False) -> bool:
  """A Zarr group whose attributes hold a stillroom cache spec (or a prepared image store's), and (`complete`) its
  completion record (readers check the rest)."""
  try:
    attributes = storage.read_json(storage.join(path, "zarr.json")).get("attributes", {})
    return any({spec, *([done] if complete else [])} <= set(attributes)
               for spec, done in ((SPEC_KEY, COMPLETE_KEY), (PREPARED_SPEC_KEY, PREPARED_COMPLETE_KEY)))
  except (OSError, ValueError, AttributeError, TypeError):
    return False


def is_run_dir(path: str) -> bool:
  """A directory whose config.json holds a run record (a model spec and its normalisation), or whose config.json is
  damaged (garbled, truncated, another JSON value) beside a file only stillroom's trainer writes (checkpoints.json,
  metrics.jsonl): a run dir whose damage `--overwrite` recovers from, as its refusal advises."""
  try:
    config = storage.read_json(storage.join(path, "config.json"))
    if isinstance(config, dict) and {"model", "normalization"} <= set(config):
      return True
  except FileNotFoundError:
    return False
  except (OSError, ValueError):
    pass
  return any(storage.is_file(storage.join(path, name)) for name in _TRAINER_FILES)


def _resolved(path: str) -> str:
  path = storage.local(path)
  return path.rstrip("/") if storage.is_url(path) else os.path.realpath(path)


def check_not_an_input(out: str, inputs: list[str], option: str) -> None:
  """Refuses an output that is, contains or lies inside one of the command's inputs."""
  target = _resolved(out)
  for given in inputs:
    if not given:
      continue
    source = _resolved(given)
    if target == source or source.startswith(target + "/") or target.startswith(source + "/"):
      raise StillroomError(f"{option} {out!r} is (or holds, or lies inside) this command's input {given!r}; "
                           "choose another output.")


def check_output(out: str, kind: str, overwrite: bool, option: str = "--out") -> None:
  """Refuses an output that is a file, and (with `--overwrite`) one that stillroom did not make as `kind`."""
  if storage.is_file(out):
    raise StillroomError(f"{option} {out!r} is a file; give a directory path for the {kind}.")
  if overwrite and storage.has_entries(out):
    made_by_us = is_store(out) if kind == STORE else is_run_dir(out)
    if not made_by_us:
      raise StillroomError(f"--overwrite: {out!r} is not a stillroom {kind}, so it is left alone; choose another "
                           f"{option}, or remove it yourself.")


# What stillroom writes in a run dir (see `student_train.run_dir`), in the order `--overwrite` deletes it: first what
# marks the run finished or diverged, last config.json, which makes it a run dir (a kill in between leaves a run dir
# that `--overwrite` clears again); a checkpoint folder before its digests list, so that no kill leaves checkpoints
# that a reader would take for an earlier stillroom's, unchecked.
RUN_DIR_ENTRIES = ("final.json", "diverged.json", "checkpoints_mid", "checkpoints_mid.json", "checkpoints",
                   "checkpoints.json", "metrics.jsonl", "tensorboard", "config.json")
_TRAINER_FILES = ("checkpoints.json", "metrics.jsonl")  # Beside a damaged config.json, they make it a run dir.
TEMPORARY_SUFFIXES = (".tmp", ".partial")  # `storage.write_bytes`'s, zarr's LocalStore's: left beside by a kill.


def _ours(out: str, kind: str, name: str, is_dir: bool) -> bool:
  """Whether the entry `name` of a stillroom `kind` is one stillroom wrote: a run dir's files and folders
  (`RUN_DIR_ENTRIES`, each folder whole); a store's `zarr.json` and its arrays (folders holding a `zarr.json`); and
  the temporary file beside either's own file: exactly its name plus a temporary suffix (a user's
  `config.json.tmp.orig` is not one)."""
  base = next((name[:-len(suffix)] for suffix in TEMPORARY_SUFFIXES if name.endswith(suffix)), name)
  if kind == RUN_DIR:
    return base in RUN_DIR_ENTRIES
  return base == "zarr.json" or (is_dir and storage.exists(storage.join(out, name, "zarr.json")))


def _drop_completion_record(store: str) -> None:
  """Rewrites a store's zarr.json without its completion record (whole: a kill leaves the old or the new), so that
  no kill while its arrays are deleted leaves a store that claims to be complete."""
  path = storage.join(store, "zarr.json")
  try:
    metadata = storage.read_json(path)
  except (OSError, ValueError):
    return  # Nothing that claims anything.
  attributes = metadata.get("attributes") if isinstance(metadata, dict) else None
  if isinstance(attributes, dict) and {COMPLETE_KEY, PREPARED_COMPLETE_KEY} & set(attributes):
    for key in (COMPLETE_KEY, PREPARED_COMPLETE_KEY):
      attributes.pop(key, None)
    storage.write_text(path, json.dumps(metadata, indent=2))


def clear_for_overwrite(out: str, kind: str) -> None:
  """Deletes what stillroom wrote in a `kind` (STORE or RUN_DIR) for `--overwrite`, and keeps anything else (a
  user's notes), naming it in one line; the directory goes too when nothing is kept. Call it holding the output's
  lock. What is kept does not make the output "not a run dir / store" for the command that cleared it.

  Raises:
    StillroomError: the directory holds something else than a stillroom `kind`; nothing is deleted.
  """
  if not storage.has_entries(out):
    return
  check_output(out, kind, overwrite=True)
  entries = storage.scan(out)
  ours = [(name, is_dir) for name, is_dir, _ in entries if _ours(out, kind, name, is_dir)]
  kept = [name + ("/" if is_dir else "") for name, is_dir, _ in entries if (name, is_dir) not in ours]
  _LOG.info(f"--overwrite: removing the {kind} {out}" + (f", keeping what stillroom did not write there: "
                                                         f"{', '.join(kept)}" if kept else ""))
  if kind == RUN_DIR:
    ours.sort(key=lambda entry: RUN_DIR_ENTRIES.index(entry[0]) if entry[0] in RUN_DIR_ENTRIES else -1)
  else:  # The completion record first, then the arrays, zarr.json (the spec) last: see RUN_DIR_ENTRIES.
    _drop_completion_record(out)
    ours.sort(key=lambda entry: entry[0] == "zarr.json")
  for name, is_dir in ours:
    path = storage.join(out, name)
    with contextlib.suppress(FileNotFoundError):
      if is_dir:
        storage.remove_tree(path)
      else:
        storage.remove_file(path)
  if not storage.has_entries(out):
    with contextlib.suppress(FileNotFoundError):
      storage.remove_tree(out)
