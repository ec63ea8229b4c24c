"""The writer's side of the format: creating a store's arrays, and writing its chunks with their commit marks.

A chunk is the unit of writing and resuming: its arrays are written together, and then it is marked in its row
set's bookkeeping array; a chunk not marked is written again by a resumed build.
"""

import queue
import threading
import warnings

import zarr
from zarr.codecs import Crc32cCodec

from shared.cache.integrity import layout_problems
from shared.cache.layout import committed_name
from shared.cache.spec import CacheSpec
from shared.cache.store import Cache
from shared.cache.zarr_async import async_group, gather, raise_first_failure
from shared.errors import StillroomError


def create_arrays(group: zarr.Group, spec: CacheSpec) -> None:
  """Creates the arrays the spec lists that the store lacks (a build may have been killed while creating them).

  Every chunk carries a CRC-32C checksum. Arrays are uncompressed: float16 logits compress about 1.1× (see the
  storage figures in docs/benchmarks.md), which does not pay for the slower writes.

  Raises:
    StillroomError: an existing array differs from the spec.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      present = set(group.array_keys())
  except Exception:  # pylint: disable=broad-except  # Garbled metadata: `layout_problems` names the array.
    present = None
  problems = layout_problems(group, spec, missing_ok=True) if present != set() else []  # A new store: nothing to check.
  if problems:
    raise StillroomError(f"the store {group.store} does not match its spec: {'; '.join(problems)}. Use --overwrite.")
  raise_first_failure(gather([async_group(group).create_array(  # Together: one round trip to an object store.
      array.name, shape=array.shape, dtype=array.dtype, chunks=array.chunks, fill_value=0,
      compressors=[Crc32cCodec()] if spec.has_checksums else None) for array in spec.arrays
      if array.name not in (present or set())]))


def writable(array: zarr.Array) -> zarr.Array:
  """The array's handle that writes every chunk, all-zero ones included (zarr skips those by default, and a missing
  chunk then reads back as zeros, indistinguishable from data)."""
  return array.with_config({"write_empty_chunks": True})


class ChunkWriter:
  """Writes finished chunks in a background thread, in order, marking each committed after all of its data."""

  def __init__(self, cache: Cache, depth: int = 2):
    # Every array's handle opened at once (one round trip to an object store), each writing all-zero chunks too.
    self._arrays = {name: writable(array) for name, array in cache.arrays([a.name for a in cache.spec.arrays]).items()}
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
    self._thread.start()

  def _run(self):
    while (item := self._queue.get()) is not None:
      row_set, chunk, start, stop, arrays = item
      if self._error is not None:
        continue  # Drain after a failure; the main thread raises it.
      try:
        # The chunk's arrays together (on an object store, one round trip instead of one per array), then its mark.
        raise_first_failure(gather([self._arrays[name].async_array.setitem(slice(start, stop), values)
                                    for name, values in arrays.items()]))
        self._arrays[committed_name(row_set)][chunk] = True
      except BaseException as e:  # pylint: disable=broad-except
        self._error = e

  def put(self, row_set: str, chunk: int, start: int, stop: int, arrays: dict) -> None:
    """Queues one chunk of the arrays of `row_set` (`ROWS` or `EVAL_ROWS`): `{name: values [stop - start, ...]}`."""
    self._raise_if_failed()
    self._queue.put((row_set, chunk, start, stop, arrays))

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join()
    self._raise_if_failed()

  def _raise_if_failed(self):
    if self._error is not None:
      raise StillroomError(f"writing the cache failed: {self._error}") from self._error
