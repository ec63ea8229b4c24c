"""The completion record: written last, it binds every chunk to its position and the spec to the store.

Every chunk carries the CRC-32C of its bytes (Zarr's `crc32c` codec: the last 4 bytes of the chunk object, the
checksum of the chunk's raw little-endian bytes, an edge chunk padded to the full chunk shape with the fill value 0),
so a damaged chunk fails to decode. But a chunk moved to another position still matches its own checksum: the
record therefore lists, for each position, the checksum the build left there. Opening a complete store compares
every chunk's stored checksum with the list (4 bytes read per chunk, all issued together) and refuses one that holds
another position's data; a reader checks each chunk it reads against the list (the checksum of the values read,
padded to the chunk shape), which also refuses a chunk rewritten after the build, or replaced since the store was
opened. The record also holds a digest of the spec as stored, so that a spec edited after the build (its
temperature, combine rule or members) is refused rather than trusted.

`COMPLETION_FIELDS` documents the record. A store whose spec is of schema 6 (`CacheSpec.binds`, every store this
stillroom writes) must hold both fields: one without them was edited or damaged, and every reader refuses it, so that
deleting them does not turn the checks off. Stores of earlier schemas, completed by a stillroom before these fields,
hold only `finished_at` and `rows`, and stay readable without the two checks (`teacher-cache verify` says so).
"""

import hashlib
import json
import typing

import google_crc32c
import numpy as np
import zarr

from shared import storage
from shared.cache.layout import layout_of
from shared.cache.spec import SPEC_KEY, now_iso

if typing.TYPE_CHECKING:
  from shared.cache.store import Cache

SPEC_DIGEST = "spec_sha256"  # The completion record's key of the spec's digest...
CHUNK_TABLE = "chunk_crc32c"  # ...and of the chunk table.
_HEX = 8  # Hex digits of one chunk's entry.
COMPLETION_FIELDS = {
    "finished_at": "ISO time at which the build finished",
    "rows": "R, the transfer set's rows",
    SPEC_DIGEST: f"SHA-256 (hex) of the spec attribute `{SPEC_KEY}` as canonical JSON (keys sorted, separators `,` and "
                 "`:`, ASCII): a spec edited after the build no longer matches it, and every reader refuses the store",
    CHUNK_TABLE: "for every array but the bookkeeping ones, one string of 8 lowercase hex digits per chunk along the "
                 "rows, chunk 0 first: the CRC-32C that the chunk's `crc32c` codec stores as its last 4 bytes "
                 "(little-endian), of its raw little-endian bytes (an edge chunk padded to the chunk shape with 0). "
                 "Every reader checks the chunks it reads against it, so a chunk swapped, copied or rewritten after "
                 "the build is refused",
}


def spec_digest(spec_attrs) -> str:
  """SHA-256 (hex) of a spec attribute as canonical JSON: the same for any spelling of the same JSON."""
  text = json.dumps(spec_attrs, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(text.encode()).hexdigest()


def tabled_arrays(cache: "Cache") -> list[str]:
  """The arrays the chunk table lists: every array of the spec but the bookkeeping ones, in the spec's order."""
  return [a.name for a in cache.spec.arrays if a.role != "bookkeeping"]


def chunk_count(cache: "Cache", name: str) -> int:
  """Chunks of array `name` along its rows."""
  return cache.spec.chunks_of(layout_of(name).row_set)


def chunk_crc32c(values: np.ndarray, chunk_shape: tuple[int, ...]) -> int:
  """The CRC-32C that Zarr's `crc32c` codec stores for a chunk whose values (its rows within the array) are
  `values`: of its raw little-endian bytes, padded to `chunk_shape` with the fill value 0."""
  values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
  if values.shape != tuple(chunk_shape):
    padded = np.zeros(chunk_shape, values.dtype)
    padded[tuple(slice(0, n) for n in values.shape)] = values
    values = padded
  return google_crc32c.value(values.reshape(-1).view(np.uint8))


def stored_checksums(cache: "Cache", names: list[str]) -> dict[str, list[int | None]]:
  """The CRC-32C stored in each chunk of each array (its last 4 bytes), read together: on an object store, one
  round trip's latency rather than one per chunk. None for a chunk that is not there."""
  paths, owners = [], []
  for name, array in cache.arrays(names).items():
    trailing = (0,) * (array.ndim - 1)
    for k in range(chunk_count(cache, name)):
      paths.append(storage.join(cache.path, *array.path.split("/"),
                                *array.metadata.encode_chunk_key((k, *trailing)).split("/")))
      owners.append(name)
  found: dict[str, list[int | None]] = {name: [] for name in names}
  for name, tail in zip(owners, storage.read_tails(paths, 4)):
    found[name].append(None if tail is None or len(tail) < 4 else int(np.frombuffer(tail, "<u4")[0]))
  return found


def completion_record(cache: "Cache") -> dict:
  """The completion record of a store whose every chunk is written: its rows, the digest of its spec as stored and
  the checksum of every chunk of every array but the bookkeeping ones.

  Raises:
    OSError: the store cannot be read.
    ValueError: a chunk is missing (the caller checks first that none is).
  """
  stored = zarr.open_group(storage.zarr_store(cache.path, read_only=True), mode="r").attrs.asdict()[SPEC_KEY]
  names = tabled_arrays(cache)
  checksums = stored_checksums(cache, names)
  missing = [name for name in names if None in checksums[name]]
  if missing:
    raise ValueError(f"array {missing[0]!r} is missing chunk {checksums[missing[0]].index(None)}")
  return {"finished_at": now_iso(), "rows": cache.spec.num_rows, SPEC_DIGEST: spec_digest(stored),
          CHUNK_TABLE: {name: "".join(f"{crc:08x}" for crc in checksums[name]) for name in names}}


_LOST = "which every store of schema 6 records (the record was edited or damaged)"


def spec_record_problem(completion, spec_attrs, binds: bool) -> tuple[bool | None, str]:
  """Whether a store's spec is the one its completion record covers.

  Args:
    completion: the completion record (None: none).
    spec_attrs: the spec attribute as stored.
    binds: whether the spec says the record binds it (`CacheSpec.binds`): then a record without the digest is damaged.

  Returns:
    `(True, "")`; `(None, why)` when there is nothing to check against (no record, or one of a schema before 6, written
    before records held the digest); `(False, what is wrong)`.
  """
  if not isinstance(completion, dict):
    return None, "no completion record" if completion is None else "the completion record is not an object"
  if SPEC_DIGEST not in completion:
    if binds:
      return False, f"its completion record holds no digest of the spec, {_LOST}"
    return None, "its completion record holds no digest of the spec (a store completed before stillroom recorded one)"
  if completion[SPEC_DIGEST] != spec_digest(spec_attrs):
    return False, ("its spec was changed after the build completed (a hand-edited temperature, combine rule, member "
                   "list or other setting: it no longer matches the digest in its completion record)")
  return True, ""


def chunk_table(cache: "Cache") -> tuple[dict[str, np.ndarray] | None, str]:
  """The completion record's chunk table, `{array name: uint32 [chunks] the checksum recorded for each position}`.

  Returns:
    `(table, "")`; `(None, why)` when there is none to check against (no record, or one of a schema before 6, written
    before records held it); `({}, what is wrong)` when it is damaged (absent from a record of schema 6, an array
    missing, an entry of the wrong length or not hex).
  """
  completion = cache.completion
  if not isinstance(completion, dict):
    return None, "no completion record"
  if CHUNK_TABLE not in completion:
    if cache.spec.binds:
      return {}, f"its completion record holds no chunk table, {_LOST}"
    return None, "its completion record holds no chunk table (a store completed before stillroom recorded one)"
  recorded = completion[CHUNK_TABLE]
  if not isinstance(recorded, dict):
    return {}, "the completion record's chunk table is damaged (not an object)"
  table = {}
  for name in tabled_arrays(cache):
    text, count = recorded.get(name), chunk_count(cache, name)
    if not isinstance(text, str) or len(text) != _HEX * count:
      return {}, (f"the completion record's chunk table is damaged: array {name!r} has "
                  + ("no entry" if not isinstance(text, str) else f"{len(text)} hex digits for {count} chunks"))
    try:
      table[name] = np.array([int(text[i:i + _HEX], 16) for i in range(0, len(text), _HEX)], np.uint32)
    except ValueError:
      return {}, f"the completion record's chunk table is damaged: array {name!r}'s entry is not hex digits"
  return table, ""


def misplaced(table: np.ndarray, found: dict[int, int | None], unknown: bool = True) -> list[str]:
  """Where the checksums `found` (`{chunk: its checksum}`, None for one not checked) differ from `table`: "chunk 3
  holds chunk 1's data" (of the chunks whose data it is, one that is not in its place, if any: the other side of a
  swap), or (`unknown`) "chunk 3" when its checksum is none of the table's."""
  wrong = [k for k, crc in found.items() if crc is not None and crc != table[k]]
  problems = []
  for k in wrong:
    sources = [int(j) for j in np.flatnonzero(table == found[k])]
    if sources:
      problems.append(f"chunk {k} holds chunk {next((j for j in sources if j in wrong), sources[0])}'s data")
    elif unknown:
      problems.append(f"chunk {k}")
  return problems


def position_problems(cache: "Cache", unknown: bool = False, skip=frozenset()) -> list[str]:
  """Where a complete store's chunks differ from its completion record's chunk table, from the checksums stored in
  the chunks (one read of 4 bytes per chunk, all issued together): each array with a chunk that holds another
  position's data (swapped or copied), and a damaged table. Nothing for a store without a table, or for chunks that
  are missing (`missing_chunks` reports those).

  Args:
    unknown: also the chunks whose stored checksum is none the table lists (rewritten after the build, from another
      store, or damaged: a reader that decodes them finds which).
    skip: `(array name, chunk)` pairs not to report (found damaged when decoded).
  """
  table, problem = chunk_table(cache)
  if table is None:
    return []
  if problem:
    return [problem]
  problems = []
  for name, found in stored_checksums(cache, list(table)).items():
    wrong = misplaced(table[name], {k: crc for k, crc in enumerate(found) if (name, k) not in skip}, unknown)
    if wrong:
      problems.append(f"array {name!r}: {describe_misplaced(wrong)}")
  return problems


def describe_misplaced(wrong: list[str]) -> str:
  """One line for the chunks of one array that are not the ones recorded for their positions (`misplaced`)."""
  shown = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
  return (f"{shown}: not the chunk{'s' if len(wrong) > 1 else ''} its completion record lists for "
          f"{'those positions' if len(wrong) > 1 else 'that position'} (swapped, copied or rewritten after the build)")
