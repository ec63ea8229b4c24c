"""The fingerprint that stands for a transfer set's bytes in a cache or run record, in its two versions.

Version 2 hashes the dataset's identity and the bytes of `FINGERPRINT_SAMPLE` records, chosen by a seeded hash of
their indices, without reading the dataset. Version 1 (stillroom <= 0.2) hashed every example; caches and runs that
record it are checked against it.
"""

import hashlib
import json
import typing

import numpy as np

from shared.augment import counter_hash
from shared.data.source import READ_BATCH, little_endian
from shared.errors import StillroomError

if typing.TYPE_CHECKING:
  from shared.data.transfer_set import TransferSet

FINGERPRINT_VERSION = 2
FINGERPRINT_SAMPLE = 256
FINGERPRINT_SAMPLE_SEED = 0
_STREAM_FINGERPRINT = 6
FINGERPRINT_V1_FULL_BYTES = 1 << 30  # Version 1 hashed a seeded sample of examples above this.


def sampled_indices(data: "TransferSet") -> np.ndarray:
  """int64 [min(N, FINGERPRINT_SAMPLE)]: the example indices whose bytes the fingerprint hashes, chosen by a
  seeded hash of the indices (the same examples on every host and NumPy version), in index order."""
  if len(data) <= FINGERPRINT_SAMPLE:
    return data.indices
  keys = counter_hash(FINGERPRINT_SAMPLE_SEED, _STREAM_FINGERPRINT, data.indices, np.zeros_like(data.indices))
  return np.sort(data.indices[np.argpartition(keys, FINGERPRINT_SAMPLE)[:FINGERPRINT_SAMPLE]])


def fingerprint(data: "TransferSet") -> str:
  """SHA-256 of the data's identity and a sample of its records (version 2), without reading the dataset.

  Hashes the canonical split, the stored shape and dtype, the source's identity (`npz:`: every value;
  `imagefolder:`: the sorted relative paths and file sizes; TFDS: name, version, split sizes and the split's files
  with their sizes) and the raw bytes and labels of `FINGERPRINT_SAMPLE` examples chosen by a seeded hash of
  their indices. So it changes when files are added, removed, renamed, reordered or change size, or when a
  sampled example changes; it cannot see a change that keeps every size and spares the sampled examples (a
  pixel edited in an unsampled image of the same file size). Never includes a path or a modification time, so a
  moved or copied dataset keeps its fingerprint.
  """
  digest = hashlib.sha256()
  header = {"version": FINGERPRINT_VERSION, "split": data.canonical_split, "count": len(data),
            "input_shape": list(data.input_shape), "input_dtype": data.input_dtype.str,
            "source": data.source.identity()}
  digest.update(json.dumps(header, sort_keys=True).encode())
  sample = sampled_indices(data)
  for start in range(0, len(sample), READ_BATCH):
    keys = sample[start:start + READ_BATCH]
    for key, record in zip(keys, data.source.record_bytes(keys)):
      digest.update(np.int64(key).astype("<i8").tobytes() + np.int64(len(record)).astype("<i8").tobytes())
      digest.update(record)
  return digest.hexdigest()


def fingerprint_v1(data: "TransferSet") -> str:
  """The version-1 fingerprint (stillroom <= 0.2), to check caches and runs that recorded it: SHA-256 of the
  canonical split, count, shapes, dtypes, indices, input and label bytes of every example (of a seeded sample
  above 1 GiB). Reads the whole set; fixed-shape data only."""
  if not data.fixed_shape:
    raise StillroomError(f"dataset {data.name!r} has images of varying size, which fingerprint version 1 never "
                         "described.")
  digest = hashlib.sha256()
  header = {"split": data.canonical_split, "count": len(data), "input_shape": list(data.input_shape),
            "input_dtype": data.input_dtype.str, "label_dtype": "<i8"}
  digest.update(json.dumps(header, sort_keys=True).encode())
  total_bytes = len(data) * (int(np.prod(data.input_shape)) * data.input_dtype.itemsize + 8)
  selected = np.arange(len(data))
  if total_bytes > FINGERPRINT_V1_FULL_BYTES:
    sample = max(1, int(len(data) * FINGERPRINT_V1_FULL_BYTES // total_bytes))
    selected = np.sort(np.random.default_rng(0).choice(len(data), sample, replace=False))
    digest.update(b"sample" + selected.astype("<i8").tobytes())
  for start in range(0, len(selected), 65536):
    rows = selected[start:start + 65536]
    inputs, labels = data.read(rows)
    digest.update(data.indices[rows].astype("<i8").tobytes())
    digest.update(little_endian(inputs))
    digest.update(labels.astype("<i8").tobytes())
  return digest.hexdigest()


def as_recorded(data: "TransferSet", recorded: str, version: int) -> tuple[str, int]:
  """The (fingerprint, version) a record of this data holds, given an existing record's: that record's own when
  it is a version-1 fingerprint (stillroom <= 0.2) of this data, else the current version's."""
  if version == 1 and data.fixed_shape and fingerprint_v1(data) == recorded:
    return recorded, 1
  return data.fingerprint, FINGERPRINT_VERSION
