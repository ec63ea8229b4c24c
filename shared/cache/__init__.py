"""The cache format: the contract between `teacher_cache` (writer) and `student_train` (reader).

A cache is one Zarr v3 group. Each row is one `(example, view)` pair. The examples are stored in a seeded permuted
order, the V views of each in adjacent rows (`row_sources`; older caches are view-major, and still read), so that
any chunk, and any batch drawn from a few chunks, is a uniform sample of the transfer set even when the dataset is
sorted by class, and a chunk holds whole examples, whose views the build renders from one decode. Every array is
chunked along rows only, `chunk_rows` rows per chunk; a chunk is the unit of writing, resuming and reading. Every
chunk carries a CRC-32C checksum and is written even when it is all zeros, so damage and missing chunks can be told
apart from data.

The group attributes hold `CacheSpec.to_attrs()` under "stillroom" (including the list of arrays present, each
with its role) and, written last, a completion record under "stillroom_complete". A store without the completion
record is not complete, whatever it holds. The record binds the store together (`record.COMPLETION_FIELDS`): the
digest of the spec as stored, so that a spec edited afterwards is refused, and the checksum of every chunk of every
array but the bookkeeping ones, so that a chunk swapped, copied or rewritten afterwards is refused by the reader
that reads it (and by `open_cache` for a complete store, from the checksums the chunks store).

One module per part of the contract:
  * `layout`: the arrays a cache may hold (`LAYOUT`) and the arrays of one store (`ArraySpec`).
  * `spec`: `CacheSpec` and its parts, as the group attributes hold them, and the schema versions.
  * `rows`: the row order, which view of which example each row holds.
  * `store`: `open_cache` and the opened `Cache`.
  * `integrity`: whether a store is whole (arrays as listed, every chunk committed, present and in its place).
  * `record`: the completion record, which binds each chunk to its position and the spec to the store.
  * `writer`: creating a store's arrays and writing its chunks (`teacher_cache` writes caches through it).
  * `stats`: teacher statistics from the stored eval logits.
"""

from shared.cache.integrity import (check_integrity, completion_problem, integrity_problems, layout_problems,
                                    missing_chunks, uncommitted_chunks)
from shared.cache.layout import (CLASS_IDS, EVAL_ROWS, FEATURE_DTYPE, FEATURE_KINDS, FEATURE_NAME, FEATURE_RANKS,
                                 LAYOUT, POSITIONS, ROLES, ROWS, STORAGE, STORAGE_DTYPES, ArrayLayout, ArraySpec,
                                 committed_name, layout_of)
from shared.cache.record import (CHUNK_TABLE, COMPLETION_FIELDS, SPEC_DIGEST, chunk_crc32c, chunk_table,
                                 completion_record, position_problems, spec_digest, spec_record_problem)
from shared.cache.rows import GROUPED, PERMUTED, ROW_ORDERS, example_runs, mixed_rows, replay_rows, row_sources
from shared.cache.spec import (BINDING_SCHEMA_VERSION, COMPLETE_KEY, DENSE_SCHEMA_VERSION, FEATURE_SCHEMA_VERSION,
                               MIX_SCHEMA_VERSION, READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION, SPARSE_SCHEMA_VERSION,
                               SPEC_KEY, SPECIALIST_SCHEMA_VERSION, TARGET_KINDS, CacheSpec, FeatureSpec, MemberSpec,
                               TOKEN_SCHEMA_VERSION, SpecialistSpec, legacy_schema_version, now_iso, parse_features,
                               parse_targets, validate_settings)
from shared.cache.stats import eval_accuracies, ratio
from shared.cache.store import Cache, open_cache
from shared.cache.writer import ChunkWriter, create_arrays, writable
from shared.cache.zarr_async import gather, raise_first_failure

__all__ = [
    "BINDING_SCHEMA_VERSION", "CHUNK_TABLE", "CLASS_IDS", "COMPLETE_KEY", "COMPLETION_FIELDS",
    "DENSE_SCHEMA_VERSION", "EVAL_ROWS", "FEATURE_DTYPE", "FEATURE_KINDS", "FEATURE_NAME", "FEATURE_RANKS",
    "FEATURE_SCHEMA_VERSION", "GROUPED", "PERMUTED", "LAYOUT", "MIX_SCHEMA_VERSION", "READABLE_SCHEMA_VERSIONS",
    "POSITIONS", "ROLES", "ROWS", "ROW_ORDERS", "SCHEMA_VERSION", "TOKEN_SCHEMA_VERSION",
    "SPARSE_SCHEMA_VERSION", "SPECIALIST_SCHEMA_VERSION", "SPEC_DIGEST", "SPEC_KEY", "STORAGE", "STORAGE_DTYPES",
    "TARGET_KINDS", "ArrayLayout", "ArraySpec", "Cache", "CacheSpec", "ChunkWriter", "FeatureSpec", "MemberSpec",
    "SpecialistSpec", "check_integrity", "chunk_crc32c", "completion_problem", "chunk_table", "committed_name",
    "completion_record",
    "create_arrays", "eval_accuracies", "example_runs", "gather", "integrity_problems", "layout_of", "layout_problems",
    "legacy_schema_version", "missing_chunks", "now_iso", "open_cache", "parse_features", "parse_targets",
    "mixed_rows", "position_problems", "raise_first_failure", "ratio", "replay_rows", "row_sources", "spec_digest",
    "spec_record_problem", "uncommitted_chunks", "validate_settings", "writable",
]
