"""Whether a store is whole: its arrays as its spec lists them, every chunk committed and present, and (complete) each
where its completion record puts it.

These checks read metadata, the store's listing and the checksum each chunk stores (its last 4 bytes), never the
chunks' contents (their checksums are checked as they are read); `teacher-cache verify` checks the contents.
"""

import json
import math
import typing

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from shared.cache.layout import EVAL_ROWS, ROWS, committed_name
from shared.cache.record import position_problems
from shared.cache.spec import REBUILD, CacheSpec
from shared.cache.zarr_async import open_arrays
from shared.errors import StillroomError

if typing.TYPE_CHECKING:
  from shared.cache.store import Cache


def integrity_problems(cache: "Cache") -> list[str]:
  """What makes a store that claims to be complete unusable: its arrays differ from its spec, a chunk is not
  committed, the completion record disagrees with the spec, (schema 2 on, which writes every chunk) a chunk is
  missing, or a chunk is not the one its completion record lists for its position (swapped, copied or rewritten).
  Reads metadata, the store's listing and each chunk's stored checksum, never the chunks' contents (their checksums
  are checked as they are read)."""
  problems = layout_problems(cache.group, cache.spec, opened=cache.try_arrays([a.name for a in cache.spec.arrays]))
  if problems:
    return problems
  spec = cache.spec
  for row_set in (ROWS, EVAL_ROWS):
    if spec.chunks_of(row_set) and spec.array(committed_name(row_set)) is not None:
      try:
        uncommitted = uncommitted_chunks(cache, row_set)
      except StillroomError as e:
        problems.append(str(e))
        continue
      if len(uncommitted):
        problems.append(f"{len(uncommitted)} chunk(s) of {committed_name(row_set)!r} are not committed "
                        f"(first: chunk {int(uncommitted[0])})")
  if cache.complete and (problem := completion_problem(cache)):
    problems.append(problem)
  if spec.has_checksums:
    for name, missing in missing_chunks(cache).items():
      problems.append(f"array {name!r} is missing chunk(s) {', '.join(map(str, missing[:3]))}"
                      + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
  if cache.complete:
    problems += position_problems(cache)
  return problems


def completion_problem(cache: "Cache") -> str | None:
  """What is wrong with a complete store's completion record itself (not an object, or another row count than the
  spec's), or None."""
  record = cache.completion
  if not isinstance(record, dict):
    return f"the completion record is {json.dumps(record)[:60]}, not an object"
  if record.get("rows") != cache.spec.num_rows:
    return f"the completion record says {json.dumps(record.get('rows'))[:60]} rows, the spec {cache.spec.num_rows}"
  return None


def uncommitted_chunks(cache: "Cache", row_set: str = ROWS) -> np.ndarray:
  """The chunk numbers of a row set that its bookkeeping array does not mark committed, ascending.

  Raises:
    StillroomError: the bookkeeping array itself is damaged.
  """
  name = committed_name(row_set)
  try:
    committed = cache[name][:]
  except Exception as e:  # A damaged chunk of the bookkeeping array: checksum or decode errors.
    raise StillroomError(f"array {name!r} is damaged ({type(e).__name__}: {str(e)[:120]})") from e
  return np.flatnonzero(~committed)


def check_integrity(cache: "Cache") -> None:
  """Raises `StillroomError` naming what is wrong when `integrity_problems` finds anything."""
  problems = integrity_problems(cache)
  if problems:
    raise StillroomError(f"cache {cache.path!r} is damaged: {'; '.join(problems)}. `teacher-cache verify` lists "
                         f"every problem; {REBUILD}.")


def layout_problems(group: zarr.Group, spec: CacheSpec, *, missing_ok: bool = False,
                    opened: dict | None = None) -> list[str]:
  """Differences between a store's arrays and the arrays its spec lists (missing, shapes, dtypes, chunks).

  Args:
    group: the store's group.
    spec: its spec.
    missing_ok: do not report missing arrays (a build resuming after a kill creates them).
    opened: the arrays as `Cache.try_arrays` opened them (default: opened here).
  """
  problems = []
  if opened is None:
    names = [array.name for array in spec.arrays]
    opened = dict(zip(names, open_arrays(group, names)))
  for array in spec.arrays:
    stored = opened[array.name]
    if isinstance(stored, KeyError):
      if not missing_ok:
        problems.append(f"array {array.name!r} is missing")
      continue
    if isinstance(stored, Exception):  # Garbled metadata: zarr raises JSON, value or type errors.
      problems.append(f"the metadata of array {array.name!r} is unreadable ({type(stored).__name__})")
      continue
    if isinstance(stored, BaseException):
      raise stored
    if stored.shape != array.shape or stored.dtype != np.dtype(array.dtype) or stored.chunks != array.chunks:
      problems.append(f"array {array.name!r} has shape {stored.shape}, dtype {stored.dtype}, chunks {stored.chunks}; "
                      f"expected {array.shape}, {array.dtype}, {array.chunks}")
  return problems


def missing_chunks(cache: "Cache", names=None) -> dict[str, list[int]]:
  """Chunks that are not in the store (schema 2 on writes every chunk, so any missing one is damage), from one listing
  of the whole store rather than one per array.

  Args:
    cache: the opened store.
    names: the arrays to check (default: every array the spec lists).

  Returns:
    `{name: missing chunk numbers along the rows, ascending}` for the arrays with any missing.
  """
  async def listing():
    return {key async for key in cache.group.store.list_prefix("")}

  stored = zarr_sync(listing())
  missing = {}
  names = list(names if names is not None else [a.name for a in cache.spec.arrays])
  for name, array in cache.arrays(names).items():
    trailing = (0,) * (array.ndim - 1)
    count = math.ceil(array.shape[0] / array.chunks[0]) if array.shape[0] else 0
    absent = [k for k in range(count)
              if f"{array.path}/{array.metadata.encode_chunk_key((k, *trailing))}" not in stored]
    if absent:
      missing[name] = absent
  return missing
