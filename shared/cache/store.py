"""The opened store: `open_cache` validates a cache's spec (and, for a complete one, its integrity) and returns a
`Cache`, through which readers and writers reach its arrays."""

import dataclasses
import functools

import numpy as np
import zarr

from shared import storage
from shared.cache.integrity import check_integrity
from shared.cache.layout import ROWS
from shared.cache.record import chunk_crc32c, chunk_table, describe_misplaced, misplaced, spec_record_problem
from shared.cache.spec import COMPLETE_KEY, REBUILD, SPEC_KEY, CacheSpec
from shared.cache.zarr_async import gather, open_arrays, raise_first_failure
from shared.data.prepared import SPEC_KEY as PREPARED_KEY
from shared.errors import StillroomError
from shared.log import logger


_LOG = logger(__name__)
# What `teacher-cache extend CACHE` keeps beside CACHE (`teacher_cache.extend`): the grown store, built until complete,
# and CACHE moved out of the way between the two renames of its switch-over (where no atomic exchange is offered).
SWITCH_SUFFIXES = (".extending", ".replaced")


def _left_by_a_switch(path: str) -> str:
  """What a missing cache's error adds where an extend was killed during its switch-over, which left no CACHE but
  `CACHE.extending` and `CACHE.replaced`: "" where neither is there."""
  left = [path.rstrip("/") + suffix for suffix in SWITCH_SUFFIXES]
  left = [p for p in left if storage.exists(p)]
  if not left:
    return ""
  return (f", but {' and '.join(map(repr, left))} {'are' if len(left) > 1 else 'is'} there: an extend of it was "
          "interrupted while switching to the extended store; run that `teacher-cache extend` again to finish the "
          "switch")


@dataclasses.dataclass(frozen=True, eq=False)
class Cache:
  """An opened cache: its group, spec and completion record (None while incomplete). Array handles are opened once.

  Index it by array name (`cache["targets"]`), and call `require` first for the arrays a reader needs.
  """

  path: str
  group: zarr.Group
  spec: CacheSpec
  completion: dict | None
  _arrays: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def complete(self) -> bool:
    return self.completion is not None

  def __getitem__(self, name: str) -> zarr.Array:
    return self.arrays((name,))[name]

  def arrays(self, names) -> dict[str, zarr.Array]:
    """Handles of the arrays `names`, the ones not opened yet opened together (one round trip to a remote store).

    Raises:
      KeyError: the store has no such array; zarr's errors for unreadable metadata.
    """
    opened = self.try_arrays(names)
    raise_first_failure(opened.values())
    return opened

  def try_arrays(self, names) -> dict:
    """`arrays`, an exception in place of each array that cannot be opened (KeyError: there is none)."""
    missing = [name for name in dict.fromkeys(names) if name not in self._arrays]
    failed = {}
    for name, array in zip(missing, open_arrays(self.group, missing)):
      if isinstance(array, BaseException):
        failed[name] = array
      else:
        self._arrays[name] = zarr.Array(array)
    return {name: self._arrays.get(name, failed.get(name)) for name in names}

  def require(self, names, purpose: str) -> None:
    """Raises unless the store holds every array in `names`, naming the missing ones and what needs them."""
    missing = [name for name in names if self.spec.array(name) is None]
    if missing:
      raise StillroomError(f"cache {self.path!r} has no {', '.join(repr(m) for m in missing)} array"
                           f"{'s' if len(missing) > 1 else ''}, which {purpose} needs.")

  def chunk_bounds(self, chunk: int, row_set: str = ROWS) -> tuple[int, int]:
    return self.spec.chunk_bounds(chunk, row_set)

  @functools.cached_property
  def chunk_table(self) -> dict[str, np.ndarray]:
    """The checksum the completion record lists for each chunk of each array (`shared.cache.record`); empty for a
    store without one (incomplete, or completed before records held it) or with a damaged one (which
    `integrity_problems` reports)."""
    return chunk_table(self)[0] or {}

  def misplaced_chunk(self, name: str, chunk: int, values: np.ndarray) -> str | None:
    """Whether chunk `chunk` of array `name`, read as `values`, is the one the completion record lists for that
    position: None if it is (or there is no record to check against), else what is wrong."""
    table = self.chunk_table.get(name)
    if table is None:
      return None
    wrong = misplaced(table, {chunk: chunk_crc32c(values, self.spec.array(name).chunks)})
    return describe_misplaced(wrong) if wrong else None

  def read_chunk(self, chunk: int, names, row_set: str = ROWS, check_positions: bool = True) -> dict[str, np.ndarray]:
    """Whole-chunk reads of several arrays (the fast way to read a Zarr store).

    Args:
      check_positions: check each chunk against the completion record's chunk table (`misplaced_chunk`).

    Raises:
      StillroomError: a chunk fails its checksum or cannot be decoded, or (`check_positions`) is not the one the
        completion record lists for its position, naming the array and the chunk.
    """
    start, stop = self.chunk_bounds(chunk, row_set)
    names = tuple(names)
    handles = self.arrays(names)
    # Every array's chunk requested at once: on an object store, one round trip's latency instead of one each.
    read = gather([handles[name].async_array.getitem((slice(start, stop),)) for name in names])
    for name, values in zip(names, read):
      if isinstance(values, Exception):  # zarr: ValueError for bad checksums, others for truncated or garbled chunks.
        raise StillroomError(f"cache {self.path!r}: chunk {chunk} of array {name!r} is damaged "
                             f"({type(values).__name__}: {str(values)[:120]}); `teacher-cache verify` lists all "
                             f"damage, and {REBUILD}.") from values
      if isinstance(values, BaseException):
        raise values
      wrong = self.misplaced_chunk(name, chunk, values) if check_positions else None
      if wrong:
        raise StillroomError(f"cache {self.path!r}: array {name!r}: {wrong}; `teacher-cache verify` lists all "
                             f"damage, and {REBUILD}.")
    return dict(zip(names, read))


def open_cache(path: str, mode: str = "r", require_complete: bool = True, check_spec: bool = True) -> Cache:
  """Opens a cache and validates its spec.

  Args:
    path: the store's directory, or its URL (`shared.storage`).
    mode: zarr open mode ("r" to read, "r+" to resume writing).
    require_complete: raise unless the completion record is present (and the store whole: `check_integrity`).
    check_spec: raise if the spec of a complete store is not the one its completion record covers (`teacher-cache
      verify` reports it as a check instead).

  Raises:
    StillroomError: no such store, not a stillroom cache, unsupported schema version, damaged spec, a spec changed
      after the build (or, schema 6, a completion record without its digest), or incomplete.
  """
  if not storage.exists(path):
    raise StillroomError(f"no cache at {path!r}{_left_by_a_switch(path)}.")
  try:
    group = zarr.open_group(storage.zarr_store(path, read_only=mode == "r"), mode=mode)
  except Exception as e:  # zarr raises several types for "not a group".
    raise StillroomError(f"{path!r} is not a Zarr v3 group: {e}") from e
  attrs = group.attrs.asdict()
  if SPEC_KEY not in attrs:
    if PREPARED_KEY in attrs:  # A user's easy slip: the images, not the teachers' outputs on them.
      raise StillroomError(f"{path!r} is a prepared image store (`teacher-cache prepare`), not a cache: build a cache "
                           f"of its images with `teacher-cache build --dataset prepared:{path} ...`.")
    raise StillroomError(f"{path!r} is a Zarr group but not a stillroom cache (no '{SPEC_KEY}' attributes).")
  try:
    spec = CacheSpec.from_attrs(attrs[SPEC_KEY])
  except StillroomError as e:
    raise StillroomError(f"cache {path!r}: {e}") from e
  if not spec.has_checksums and mode == "r":
    _LOG.info(f"cache {path!r} has schema version {spec.schema_version}: its chunks carry no checksums and all-zero "
              "chunks may be absent, so damage cannot be detected. Rebuild it with this stillroom to get both.")
  cache = Cache(path=path, group=group, spec=spec, completion=attrs.get(COMPLETE_KEY))
  covered, problem = spec_record_problem(cache.completion, attrs[SPEC_KEY], spec.binds)
  if check_spec and covered is False:
    raise StillroomError(f"cache {path!r}: {problem}. Undo the edit, or rebuild the store with the build command and "
                         "--overwrite.")
  if require_complete:
    if not cache.complete:
      # The command that writes it: a grown cache's last history entry (`extend --out`, `convert`, ...), else.
      command = spec.history[-1].get("command", "build") if spec.history else \
          "import" if spec.members[0].model == "imported" else "build"
      raise StillroomError(f"cache {path!r} is not complete (its build was interrupted or failed); run the same "
                           f"`teacher-cache {command}` command again to finish it.")
    check_integrity(cache)
  return cache
