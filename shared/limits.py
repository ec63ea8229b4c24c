"""Limits checked before work starts: the disk space an output will take and the memory a step will hold, against
what the machine has, so that a command that cannot finish says so at once, naming both sizes, instead of filling
the disk or being killed by the kernel hours later.
"""

import os
import shutil

from shared import storage
from shared.errors import StillroomError
from shared.log import logger

_LOG = logger(__name__)
_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB")


def human_bytes(count: float) -> str:
  """A byte count in decimal units with three significant digits: "512 B", "1.50 MB", "130 GB"."""
  unit = 0
  while abs(count) >= 999.5 and unit < len(_UNITS) - 1:
    count /= 1000
    unit += 1
  if unit == 0:
    return f"{int(count)} B"
  return f"{count:.{2 if count < 9.995 else 1 if count < 99.95 else 0}f} {_UNITS[unit]}"


def free_space(path: str) -> int | None:
  """Bytes free (to an unprivileged user) on the file system that holds, or would hold, the local path `path`; None
  for an object store, whose free space is not known."""
  parent = _nearest_existing(path)
  return None if parent is None else shutil.disk_usage(parent).free


def block_size(path: str) -> int:
  """The allocation unit of the file system that holds, or would hold, `path` (a file takes whole units); 1 for an
  object store."""
  parent = _nearest_existing(path)
  return 1 if parent is None else max(1, os.statvfs(parent).f_frsize)


def _nearest_existing(path: str) -> str | None:
  """`path` itself or its nearest parent that exists (where it would be created); None for an object store."""
  path = storage.local(path)
  if storage.is_url(path):
    return None
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  return parent


def _read_number(path: str, key: str | None = None) -> int | None:
  """An integer from a `/proc` or `/sys` file: its whole content, or the value of the line `key ...`."""
  try:
    with open(path) as f:
      for line in f:
        fields = line.split()
        if key is None:
          return int(fields[0]) if fields and fields[0].isdigit() else None
        if fields and fields[0].rstrip(":") == key:
          return int(fields[1]) * (1024 if fields[-1] == "kB" else 1)
  except (OSError, ValueError, IndexError):
    return None
  return None


def available_memory() -> int | None:
  """Bytes of memory a new allocation can take without swapping: the kernel's `MemAvailable` (or, without
  `/proc/meminfo`, the free physical pages), and within a cgroup v2 memory limit (a container's) what the group has
  left besides reclaimable file cache; None when neither is known."""
  known = []
  system = _read_number("/proc/meminfo", "MemAvailable")
  if system is None:
    try:
      system = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
      system = None
  if system is not None:
    known.append(system)
  limit = _read_number("/sys/fs/cgroup/memory.max")  # "max" (no limit) reads as None.
  anonymous = _read_number("/sys/fs/cgroup/memory.stat", "anon")
  if limit is not None and anonymous is not None:
    known.append(max(0, limit - anonymous))
  return min(known) if known else None


def check_disk(path: str, total: int, what: str, override: str) -> None:
  """Refuses to start writing an output of `total` bytes at `path` when its file system has less free than it
  needs: `total`, less what an output already there holds (a resumed write rewrites it in place, and `--overwrite`
  deletes it first).

  Args:
    what: what takes the bytes, as the message names it ("the store of 400 rows").
    override: the option that skips the check.

  Raises:
    StillroomError: naming both sizes, the file system and `override`.
  """
  free = free_space(path)
  if free is None:
    _LOG.info(f"{what} will take about {human_bytes(total)}; the free space of an object store is not checked")
    return
  needed = total - (storage.size(path) if os.path.isdir(storage.local(path)) else 0)
  if needed > free:
    raise StillroomError(f"{what} would take {human_bytes(needed)}, more than the {human_bytes(free)} free on the "
                         f"file system of {path}; free some space or choose another --out, or pass {override} to "
                         "start anyway.")


def check_limits(out: str, *, unit: str, unit_bytes: int, copies: int, held: str, advice: str, what: str,
                 total: int, override: str, disk: bool = True) -> None:
  """Refuses, before anything is written, an output whose unit of work would not fit in the available memory
  (`copies` of its `unit_bytes` at once: `check_memory`) or (`disk`) whose `total` bytes would not fit in the free
  space of `out`'s file system (`check_disk`). The one path of `build`, `import` and `views`.

  Args:
    out: where the output goes.
    unit: what one unit of work is, as the message names it ("one chunk of 4,096 rows").
    unit_bytes: its bytes.
    copies: how many of them are held at once.
    held: what holds them ("computed, queued and written").
    advice: how to need less memory.
    what: what takes the disk space ("the store of 400 rows").
    total: the output's bytes on disk.
    override: the option that skips the checks (the caller skips them when it is given).
    disk: check the disk too.

  Raises:
    StillroomError: naming both sizes, `advice` and `override`.
  """
  check_memory(copies * unit_bytes, f"{unit} ({human_bytes(unit_bytes)}, held about {copies} times while it is "
                                    f"{held})", advice, override)
  if disk:
    check_disk(out, total, what, override)


def check_memory(needed: int, what: str, advice: str, override: str) -> None:
  """Refuses to start a step that holds `needed` bytes at once when less memory is available (`available_memory`).

  Args:
    what: what holds the bytes, as the message names it ("one chunk of 4,096 rows").
    advice: how to need less.
    override: the option that skips the check.

  Raises:
    StillroomError: naming both sizes, `advice` and `override`.
  """
  available = available_memory()
  if available is not None and needed > available:
    raise StillroomError(f"{what} needs about {human_bytes(needed)} of memory, more than the {human_bytes(available)} "
                         f"available; {advice}, or pass {override} to start anyway.")
