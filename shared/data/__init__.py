"""Transfer sets: one way to name data everywhere (`--dataset NAME --split SPLIT [--data-dir DIR]`).

Four kinds of name:
  * `digits`: the embedded offline dataset (scikit-learn's 8x8 digits as a TFDS builder), prepared on first use.
  * `npz:PATH`: a NumPy archive with `x` [N, ...] and optional `y` [N] (no `y`: an unlabeled transfer set);
    its one split is `train`.
  * `imagefolder:DIR`: JPEG/PNG files, one sub-folder of DIR per class (the sorted folder names are the class ids,
    as torchvision's `ImageFolder`), or directly in DIR for an unlabeled set; its one split is `train`, whose
    examples are the files in sorted relative-path order. Images may differ in size; they are decoded to RGB.
  * any other name: a TFDS dataset prepared in the data dir with `file_format="array_record"`.

Splits use TFDS slicing syntax (`train`, `train[:80%]`, `train[100:200]`). Every example keeps its position in the
unsliced split as its index, so slices, folds and fractions of one split share indices.

Sources are lazy: opening a dataset lists it (a TFDS split's size, a folder's file names and sizes) and reads no
example; `TransferSet.read` reads the records of the examples asked for, and checks them there (finite values,
labels in range), naming the example. Only `npz:` archives and TFDS splits of fixed-shape examples smaller than
`SMALL_SPLIT_BYTES` (such as `digits`) are held in memory, after their first read.
"""

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import sys
import types

import numpy as np
import tensorflow_datasets as tfds

from shared import digits as digits_lib
from shared import storage
from shared.augment import counter_hash
from shared.errors import StillroomError

EMBEDDED_DATASETS = ("digits",)
NPZ_PREFIX = "npz:"
IMAGEFOLDER_PREFIX = "imagefolder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# PIL modes an imagefolder: refuses rather than clip to 8 bits.
UNSUPPORTED_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer", "F": "float"}
NO_EVAL = "none"  # `--eval-split none`: no evaluation split.
SMALL_SPLIT_BYTES = 64 << 20  # A fixed-shape TFDS split this small is kept in memory after its first read.
READ_BATCH = 4096  # Records per batched read when a whole split is read.
# The fingerprint (version 2) hashes the dataset's identity and the bytes of this many records, chosen by a seeded
# hash of their indices. Version 1 (stillroom <= 0.2) hashed every example; caches that record it are checked
# against it.
FINGERPRINT_VERSION = 2
FINGERPRINT_SAMPLE = 256
FINGERPRINT_SAMPLE_SEED = 0
_STREAM_FINGERPRINT = 6
FINGERPRINT_V1_FULL_BYTES = 1 << 30  # Version 1 hashed a seeded sample of examples above this.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Normalization:
  """Input normalisation, applied to the stored inputs: `x' = (float32(x) - shift) / scale`."""

  shift: float = 0.0
  scale: float = 1.0

  def apply(self, x):
    """Works on NumPy and JAX arrays alike; returns float32."""
    return (x.astype(np.float32) - np.float32(self.shift)) / np.float32(self.scale)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Normalization":
    return cls(**d)


def local_path(name: str) -> str | None:
  """The file or folder a dataset name points to (`npz:PATH`, `imagefolder:DIR`), or None for named datasets."""
  for prefix in (NPZ_PREFIX, IMAGEFOLDER_PREFIX):
    if name.startswith(prefix):
      return name[len(prefix):]
  return None


def default_eval_split(eval_dataset: str | None) -> str:
  """The eval split when only `--eval-dataset` is given: `train`, the one split of an `npz:` or `imagefolder:`
  dataset; `test` for a TFDS dataset."""
  return "train" if eval_dataset and local_path(eval_dataset) else "test"


def default_normalization(name: str, input_dtype: np.dtype) -> Normalization:
  """The normalisation a dataset gets unless a run says otherwise: pixels to [0, 1], other data as stored."""
  if name == "digits":
    return Normalization(scale=16.0)  # Pixel values 0..16.
  if np.dtype(input_dtype) == np.uint8:
    return Normalization(scale=255.0)
  return Normalization()


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSpec:
  """What a cache or a run records about its data: everything but the bytes, which the fingerprint stands for.

  Attributes:
    name: the dataset name as given (`digits`, `npz:/path/x.npz`, `imagefolder:/data/train`, a TFDS name).
    split: the split spec as given (`train[:80%]`).
    canonical_split: the split with absolute bounds (`train[0:1150]`).
    count: number of examples.
    fingerprint: SHA-256 standing for the data (see `TransferSet.fingerprint`).
    input_shape: one example's shape as stored; None for a side whose size varies between examples.
    input_dtype: the stored inputs' dtype name.
    num_classes: class count, or None when unknown (unlabeled data).
    labeled: every example has a label.
    fingerprint_version: how `fingerprint` was computed (1: every example's bytes; 2: identity and a sample).
  """

  name: str
  split: str
  canonical_split: str
  count: int
  fingerprint: str
  input_shape: tuple[int | None, ...]
  input_dtype: str
  num_classes: int | None
  labeled: bool
  fingerprint_version: int = FINGERPRINT_VERSION

  def indices(self) -> np.ndarray:
    """int64 [count]: each example's position in the unsliced split, from the canonical split alone."""
    parts = []
    for part in self.canonical_split.split("+"):
      start, stop = part[part.index("[") + 1:-1].split(":")
      parts.append(np.arange(int(start), int(stop), dtype=np.int64))
    return np.concatenate(parts)

  def to_dict(self) -> dict:
    d = {**dataclasses.asdict(self), "input_shape": list(self.input_shape)}
    if self.fingerprint_version == 1:
      del d["fingerprint_version"]  # As stillroom 0.2 wrote it.
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "DatasetSpec":
    return cls(**{"fingerprint_version": 1, **d, "input_shape": tuple(d["input_shape"])})


def _little_endian(x: np.ndarray) -> bytes:
  return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()


class ArraySource:
  """Examples held in memory: an `npz:` archive, or a small TFDS split after its first read.

  Args:
    inputs: [N, ...] as stored.
    labels: int64 [N], -1 where unlabeled.
    labeled: whether the data has labels.
  """

  def __init__(self, inputs: np.ndarray, labels: np.ndarray, labeled: bool):
    self.inputs, self._labels, self.labeled = inputs, labels, labeled
    self.shape, self.dtype = tuple(inputs.shape[1:]), inputs.dtype

  def __len__(self) -> int:
    return len(self.inputs)

  def read(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.inputs[keys], self._labels[keys]

  def labels(self, keys: np.ndarray) -> np.ndarray:
    return self._labels[keys]

  def image_sizes(self, keys: np.ndarray) -> np.ndarray:
    return np.tile(np.asarray(self.shape[:2], np.int64), (len(keys), 1))

  def identity(self) -> dict:
    """The whole content's digest: the arrays are in memory, so hashing them all is cheap."""
    digest = hashlib.sha256(_little_endian(self.inputs))
    digest.update(self._labels.astype("<i8").tobytes())
    return {"kind": "arrays", "shape": list(self.inputs.shape), "dtype": self.dtype.str, "sha256": digest.hexdigest()}

  def record_bytes(self, keys: np.ndarray) -> list[bytes]:
    return [_little_endian(self.inputs[k]) + self._labels[k].astype("<i8").tobytes() for k in keys]


class TfdsSource:
  """A TFDS split prepared as array_record, read by batched random access (no TensorFlow).

  A split of fixed-shape examples under `SMALL_SPLIT_BYTES` is read whole on first use and kept in memory.
  """

  def __init__(self, builder, split: str, data_source, keys: tuple[str, str], labeled: bool):
    self.builder, self.split, self._source = builder, split, data_source
    self.image_key, self.label_key = keys
    self.labeled = labeled
    feature = builder.info.features[self.image_key]
    self.shape = tuple(feature.shape)
    self.dtype = np.dtype(feature.np_dtype)
    self._count = len(data_source)
    try:
      self._files = [str(path) for path in builder.info.splits[split].filepaths]
    except (KeyError, ValueError):  # Mock data, or a split without a file template: identified without files.
      self._files = []
    self._memory: ArraySource | None = None
    self._label_source = None
    label = builder.info.features[self.label_key] if labeled else None
    self.class_names = tuple(label.names) if getattr(label, "names", None) else None

  def __len__(self) -> int:
    return self._count

  @property
  def fixed_shape(self) -> bool:
    return None not in self.shape

  def _records(self, keys, source=None) -> list[dict]:
    """Records of `keys` from `source` (default: the decoding data source), in one batched read."""
    source = self._source if source is None else source
    keys = [int(k) for k in keys]
    try:
      return source.__getitems__(keys)  # One batched read of the array_record files.
    except TypeError:  # tfds.testing.mock_data's sources only read one record at a time.
      return [source[key] for key in keys]

  def _from_records(self, records: list[dict]):
    inputs = [np.asarray(r[self.image_key]) for r in records]
    labels = np.asarray([r.get(self.label_key, -1) for r in records], np.int64)
    return (np.stack(inputs) if self.fixed_shape else inputs), labels

  @property
  def decoded_bytes(self) -> int | None:
    """The split's size decoded (fixed shapes only)."""
    return len(self) * int(np.prod(self.shape)) * self.dtype.itemsize if self.fixed_shape else None

  @property
  def kept_in_memory(self) -> bool:
    return self.fixed_shape and self.decoded_bytes <= SMALL_SPLIT_BYTES

  def _in_memory(self) -> ArraySource | None:
    if self._memory is None and self.kept_in_memory:
      parts = [self._from_records(self._records(range(start, min(start + READ_BATCH, len(self)))))
               for start in range(0, len(self), READ_BATCH)]
      self._memory = ArraySource(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                 self.labeled)
    return self._memory

  def read(self, keys: np.ndarray):
    memory = self._in_memory()
    return memory.read(keys) if memory is not None else self._from_records(self._records(keys))

  def labels(self, keys: np.ndarray) -> np.ndarray:
    """Labels without decoding the images (a second data source that skips their decoding)."""
    memory = self._in_memory()
    if memory is not None:
      return memory.labels(keys)
    if not self.labeled:
      return np.full(len(keys), -1, np.int64)
    if self._label_source is None:
      self._label_source = self.builder.as_data_source(
          split=self.split, decoders={self.image_key: tfds.decode.SkipDecoding()})
    labels = [np.asarray([r[self.label_key] for r in self._records(keys[start:start + READ_BATCH],
                                                                   self._label_source)], np.int64)
              for start in range(0, len(keys), READ_BATCH)]
    return np.concatenate(labels) if labels else np.zeros(0, np.int64)

  def image_sizes(self, keys: np.ndarray) -> np.ndarray:
    if self.fixed_shape:
      return np.tile(np.asarray(self.shape[:2], np.int64), (len(keys), 1))
    return np.array([np.shape(r[self.image_key])[:2] for r in self._records(keys)], np.int64).reshape(-1, 2)

  def identity(self) -> dict:
    """Name, version and config, every split's size, and the split's files with their sizes."""
    files = [[os.path.basename(path), os.path.getsize(path) if os.path.exists(path) else None]
             for path in sorted(self._files)]
    return {"kind": "tfds", "dataset": self.builder.info.full_name,
            "splits": {name: int(split.num_examples) for name, split in sorted(self.builder.info.splits.items())},
            "files": files}

  def record_bytes(self, keys: np.ndarray) -> list[bytes]:
    out = []
    for record in self._records(keys):
      image = np.asarray(record[self.image_key])
      out.append(json.dumps(list(image.shape)).encode() + _little_endian(image)
                 + np.int64(record.get(self.label_key, -1)).astype("<i8").tobytes())
    return out


def _png_bit_depth(file) -> int:
  """The bit depth in a PNG's IHDR chunk (byte 24 of the file), read from an open binary file."""
  file.seek(0)
  header = file.read(25)
  return header[24] if len(header) == 25 else 8


class ImageFolderSource:
  """`imagefolder:DIR`: image files listed once in sorted order, decoded to RGB uint8 [H, W, 3] when read."""

  def __init__(self, name: str, root: str, files: list[str], sizes: list[int], labels: np.ndarray,
               classes: list[str]):
    self.name, self.root, self.files, self.sizes = name, root, files, sizes
    self._labels, self.classes = labels, classes
    self.labeled = bool(classes)
    self.shape, self.dtype = (None, None, 3), np.dtype(np.uint8)

  @property
  def class_names(self) -> tuple[str, ...] | None:
    return tuple(self.classes) or None

  def __len__(self) -> int:
    return len(self.files)

  def _open(self, key: int, use):
    """`use(image)` of example `key`'s opened PIL image; a file that cannot be read is an error naming it."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    path = storage.join(self.root, self.files[key])
    try:
      # Local files are opened lazily (reading sizes reads headers only); an object is fetched whole.
      with contextlib.ExitStack() as stack:
        file = stack.enter_context(open(path, "rb") if not storage.is_url(path) else io.BytesIO(
            storage.read_bytes(path)))
        image = stack.enter_context(Image.open(file))
        deep = None
        if image.mode in UNSUPPORTED_MODES:
          deep = f"a {image.mode} image ({UNSUPPORTED_MODES[image.mode]})"
        elif image.format == "PNG" and _png_bit_depth(file) == 16:  # PIL opens these as 8-bit RGB(A).
          deep = f"a 16-bit {image.mode} image"
        if deep:
          raise StillroomError(f"dataset {self.name!r}: example index {key} ({path}) is {deep}; imagefolder: reads "
                               "8-bit images.")
        return use(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      raise StillroomError(f"dataset {self.name!r}: cannot decode example index {key} ({path}): {e}") from e

  def _decode(self, key: int) -> np.ndarray:
    # As torchvision's ImageFolder loader: PIL's convert("RGB") (grey and palette expanded, alpha dropped).
    return self._open(key, lambda image: np.asarray(image.convert("RGB")))

  def read(self, keys: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    return [self._decode(int(k)) for k in keys], self._labels[keys]

  def labels(self, keys: np.ndarray) -> np.ndarray:
    return self._labels[keys]

  def image_sizes(self, keys: np.ndarray) -> np.ndarray:
    """(height, width) of each image, from the file headers (no decoding)."""
    sizes = [self._open(int(key), lambda image: (image.height, image.width)) for key in keys]
    return np.asarray(sizes, np.int64).reshape(-1, 2)

  def identity(self) -> dict:
    """The sorted relative paths and their sizes (no modification times: a copy elsewhere keeps them)."""
    digest = hashlib.sha256()
    for path, size in zip(self.files, self.sizes):
      digest.update(f"{path}\0{size}\n".encode())
    return {"kind": "imagefolder", "classes": self.classes, "files": len(self.files), "sha256": digest.hexdigest()}

  def record_bytes(self, keys: np.ndarray) -> list[bytes]:
    paths = [storage.join(self.root, self.files[int(key)]) for key in keys]
    try:
      contents = storage.read_many(paths)  # On an object store, the requests together.
    except OSError as e:
      failed = keys[paths.index(e.filename)] if e.filename in paths else keys[0]
      raise StillroomError(f"dataset {self.name!r}: cannot read example index {int(failed)} ({e.filename}): "
                           f"{e.strerror or e}") from e
    return [data + np.int64(self._labels[key]).astype("<i8").tobytes() for key, data in zip(keys, contents)]


def label_ids(labels: np.ndarray) -> np.ndarray:
  """Labels as a cache and a batch hold them: int32, -1 where unlabeled."""
  labels = np.asarray(labels)
  return np.where(labels >= 0, labels, -1).astype(np.int32)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TransferSet:
  """A split (or slice of one), read lazily from its source.

  Attributes:
    name: the dataset name as given (`digits`, `mnist`, `npz:/path/x.npz`, `imagefolder:/data/train`).
    split: the split spec as given (`train[:80%]`).
    base_split: the unsliced split the indices refer to (`train`).
    base_count: number of examples in the unsliced split.
    indices: int64 [N] each example's position in the unsliced split.
    source: reads records by position in the unsliced split (`ArraySource`, `TfdsSource`, `ImageFolderSource`).
    num_classes: number of classes, or None when unknown (unlabeled data).
    normalization: the dataset's default input normalisation.
    canonical_split: the split with absolute bounds (`train[0:1150]`), part of the fingerprint.
    label_map: int32 [C] the label each stored label is read as (`relabeled`), or None.
  """

  name: str
  split: str
  base_split: str
  base_count: int
  indices: np.ndarray
  source: object
  num_classes: int | None
  normalization: Normalization
  canonical_split: str
  label_map: np.ndarray | None = None

  def relabeled(self, label_map: np.ndarray, num_classes: int) -> "TransferSet":
    """The same examples (and fingerprint), their labels read through `label_map` int [C] into 0..num_classes-1:
    e.g. a specialist's classes and its dustbin (`shared.specialists.dustbin_labels`)."""
    return dataclasses.replace(self, label_map=np.asarray(label_map, np.int32), num_classes=num_classes)

  def _mapped(self, labels: np.ndarray) -> np.ndarray:
    if self.label_map is None:
      return labels
    return np.where(labels >= 0, self.label_map[np.maximum(labels, 0)], labels).astype(labels.dtype)

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def input_shape(self) -> tuple[int | None, ...]:
    """One example's shape as stored; None for a side that varies between examples."""
    return self.source.shape

  @property
  def fixed_shape(self) -> bool:
    return None not in self.input_shape

  @property
  def input_dtype(self) -> np.dtype:
    return self.source.dtype

  @property
  def labeled(self) -> bool:
    return self.source.labeled

  @property
  def in_memory(self) -> bool:
    """Whether the examples are (or, once read, will be) arrays in memory: `npz:`, a small fixed-shape TFDS split."""
    return isinstance(self.source, ArraySource) or getattr(self.source, "kept_in_memory", False)

  @property
  def class_names(self) -> tuple[str, ...] | None:
    """The classes' names in class-id order (`imagefolder:` folders, TFDS ClassLabel names), or None."""
    return getattr(self.source, "class_names", None)

  def read(self, positions: np.ndarray):
    """Reads examples by position in this transfer set (0..N-1), checking them.

    Returns:
      `(inputs, labels)`: inputs [B, ...] as stored (a list of B arrays when sizes vary), int64 labels [B] (-1 where
      unlabeled).

    Raises:
      StillroomError: naming the first example (index in the unsliced split) with a non-finite input or a label
        outside 0..num_classes-1, or one that cannot be read.
    """
    keys = self.indices[np.asarray(positions, np.int64)]
    inputs, labels = self.source.read(keys)
    # Only floats can be non-finite (the dtype was checked at open); arrays in memory were checked when loaded.
    if np.issubdtype(self.input_dtype, np.floating) and not isinstance(self.source, ArraySource):
      _check_inputs(self.name, self.split, keys, inputs)
    self._check_labels(keys, labels)
    return inputs, self._mapped(labels)

  def image_sizes(self, positions: np.ndarray) -> np.ndarray:
    """int64 [B, 2] each example's stored (height, width), without decoding where the source can."""
    return self.source.image_sizes(self.indices[np.asarray(positions, np.int64)])

  def read_all(self):
    """`read` of every example, in split order: for small sets (tests, fixed-size evaluation data)."""
    return self.read(np.arange(len(self)))

  def _check_labels(self, keys: np.ndarray, labels: np.ndarray) -> None:
    """Checks stored labels (before any `label_map`) against the stored class count."""
    classes = self.num_classes if self.label_map is None else len(self.label_map)
    if classes is None or not self.labeled:
      return
    outside = (labels < 0) | (labels >= classes)
    if outside.any():
      bad = int(np.argmax(outside))
      raise StillroomError(f"dataset {self.name!r} split {self.split!r}: example index {int(keys[bad])} has label "
                           f"{int(labels[bad])}, outside 0..{classes - 1}.")

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """int64 [N] every example's label (-1 where unlabeled). Cheap for `npz:`, `imagefolder:` and small TFDS
    splits; a large TFDS split is read once for it."""
    labels = self.source.labels(self.indices)
    self._check_labels(self.indices, labels)
    return self._mapped(labels)

  @functools.cached_property
  def _position_of_index(self) -> np.ndarray:
    position = np.full(self.base_count, -1, np.int64)
    position[self.indices] = np.arange(len(self.indices))
    return position

  def positions(self, example_indices: np.ndarray) -> np.ndarray:
    """Maps example indices (positions in the unsliced split) to positions in this transfer set.

    Raises:
      StillroomError: naming the first index that is not part of this transfer set.
    """
    example_indices = np.asarray(example_indices, np.int64)
    inside = (example_indices >= 0) & (example_indices < self.base_count)
    positions = np.where(inside, self._position_of_index[np.clip(example_indices, 0, self.base_count - 1)], -1)
    if np.any(positions < 0):
      bad = int(example_indices[np.argmax(positions < 0)])
      raise StillroomError(f"example index {bad} is not part of {self.name} split {self.split!r}")
    return positions

  def fingerprint_sample(self) -> np.ndarray:
    """int64 [min(N, FINGERPRINT_SAMPLE)]: the example indices whose bytes the fingerprint hashes, chosen by a
    seeded hash of the indices (the same examples on every host and NumPy version), in index order."""
    if len(self) <= FINGERPRINT_SAMPLE:
      return self.indices
    keys = counter_hash(FINGERPRINT_SAMPLE_SEED, _STREAM_FINGERPRINT, self.indices, np.zeros_like(self.indices))
    return np.sort(self.indices[np.argpartition(keys, FINGERPRINT_SAMPLE)[:FINGERPRINT_SAMPLE]])

  @functools.cached_property
  def fingerprint(self) -> str:
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
    header = {"version": FINGERPRINT_VERSION, "split": self.canonical_split, "count": len(self),
              "input_shape": list(self.input_shape), "input_dtype": self.input_dtype.str,
              "source": self.source.identity()}
    digest.update(json.dumps(header, sort_keys=True).encode())
    sample = self.fingerprint_sample()
    for start in range(0, len(sample), READ_BATCH):
      keys = sample[start:start + READ_BATCH]
      for key, record in zip(keys, self.source.record_bytes(keys)):
        digest.update(np.int64(key).astype("<i8").tobytes() + np.int64(len(record)).astype("<i8").tobytes())
        digest.update(record)
    return digest.hexdigest()

  def fingerprint_v1(self) -> str:
    """The version-1 fingerprint (stillroom <= 0.2), to check caches and runs that recorded it: SHA-256 of the
    canonical split, count, shapes, dtypes, indices, input and label bytes of every example (of a seeded sample
    above 1 GiB). Reads the whole set; fixed-shape data only."""
    if not self.fixed_shape:
      raise StillroomError(f"dataset {self.name!r} has images of varying size, which fingerprint version 1 never "
                           "described.")
    digest = hashlib.sha256()
    header = {"split": self.canonical_split, "count": len(self), "input_shape": list(self.input_shape),
              "input_dtype": self.input_dtype.str, "label_dtype": "<i8"}
    digest.update(json.dumps(header, sort_keys=True).encode())
    total_bytes = len(self) * (int(np.prod(self.input_shape)) * self.input_dtype.itemsize + 8)
    selected = np.arange(len(self))
    if total_bytes > FINGERPRINT_V1_FULL_BYTES:
      sample = max(1, int(len(self) * FINGERPRINT_V1_FULL_BYTES // total_bytes))
      selected = np.sort(np.random.default_rng(0).choice(len(self), sample, replace=False))
      digest.update(b"sample" + selected.astype("<i8").tobytes())
    for start in range(0, len(selected), 65536):
      rows = selected[start:start + 65536]
      inputs, labels = self.read(rows)
      digest.update(self.indices[rows].astype("<i8").tobytes())
      digest.update(_little_endian(inputs))
      digest.update(labels.astype("<i8").tobytes())
    return digest.hexdigest()

  def as_recorded(self, fingerprint: str, version: int) -> tuple[str, int]:
    """The (fingerprint, version) a record of this data holds, given an existing record's: that record's own when
    it is a version-1 fingerprint (stillroom <= 0.2) of this data, else the current version's."""
    if version == 1 and self.fixed_shape and self.fingerprint_v1() == fingerprint:
      return fingerprint, 1
    return self.fingerprint, FINGERPRINT_VERSION

  def matches(self, recorded: DatasetSpec) -> bool:
    """Whether this is the data `recorded` describes, by the fingerprint version it recorded."""
    return self.as_recorded(recorded.fingerprint, recorded.fingerprint_version) == \
        (recorded.fingerprint, recorded.fingerprint_version)

  def describe(self) -> DatasetSpec:
    """What a cache or run records about its data (everything except the bytes)."""
    return DatasetSpec(name=self.name, split=self.split, canonical_split=self.canonical_split, count=len(self),
                       fingerprint=self.fingerprint, input_shape=self.input_shape,
                       input_dtype=self.input_dtype.name, num_classes=self.num_classes, labeled=self.labeled)


def check_eval_set(eval_set: TransferSet, transfer_set: TransferSet, augmentation, num_classes: int) -> None:
  """An eval set must fit the models of a transfer set: its views (by `augmentation`, a `shared.augment.Augmentation`)
  have the transfer set's shape, and its class ids mean the transfer set's: the same class names where both have
  them (an image folder with a class more or less shifts every id), and no label beyond the models' `num_classes`.

  Raises:
    StillroomError: naming both datasets and the first difference.
  """
  what = "eval dataset"
  if augmentation.output_shape(eval_set.input_shape) != augmentation.output_shape(transfer_set.input_shape) or (
      augmentation.kind == "shift" and not eval_set.fixed_shape):
    raise StillroomError(f"{what} {eval_set.name} {eval_set.split!r} has inputs of shape {eval_set.input_shape}, the "
                         f"transfer set {transfer_set.input_shape}.")
  ours, theirs = transfer_set.class_names, eval_set.class_names
  if ours is not None and theirs is not None and ours != theirs:
    first = next((k for k in range(min(len(ours), len(theirs))) if ours[k] != theirs[k]), min(len(ours), len(theirs)))
    name = lambda names: names[first] if first < len(names) else "(none)"  # noqa: E731
    raise StillroomError(
        f"{what} {eval_set.name!r} has {len(theirs)} classes, {transfer_set.name!r} {len(ours)}: class id {first} is "
        f"{name(theirs)!r} there and {name(ours)!r} here, so their labels would not line up. Give both the same "
        "classes (the same class folders).")
  if eval_set.labeled and eval_set.num_classes is not None and eval_set.num_classes > num_classes:
    raise StillroomError(f"{what} {eval_set.name!r} has {eval_set.num_classes} classes, more than the "
                         f"{num_classes} the models output.")


def _parse_split(split: str, split_sizes: dict[str, int], dataset: str) -> tuple[str, np.ndarray, str]:
  """Parses a TFDS split spec against the sizes of the unsliced splits.

  Returns:
    `(base_split, indices, canonical_split)`: the one split referred to, int64 positions in it, and the spec
    with absolute bounds.
  """
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(
        {name: types.SimpleNamespace(num_examples=n, shard_lengths=[n]) for name, n in split_sizes.items()})
  except (ValueError, AssertionError) as e:
    raise StillroomError(
        f"bad split {split!r} for dataset {dataset!r}: {str(e).rstrip('.')}. Valid splits: {sorted(split_sizes)}; "
        "slices use the TFDS syntax, e.g. 'train[:80%]' or 'train[100:200]'.") from e
  base_splits = {instruction.splitname for instruction in instructions}
  if len(base_splits) != 1:
    raise StillroomError(
        f"split {split!r} mixes splits {sorted(base_splits)}; an example's index is its position in one split, "
        "so use slices of a single split.")
  base = base_splits.pop()
  parts, canonical = [], []
  for instruction in instructions:
    start, stop, _ = slice(instruction.from_, instruction.to).indices(split_sizes[base])
    parts.append(np.arange(start, stop, dtype=np.int64))
    canonical.append(f"{base}[{start}:{stop}]")
  indices = np.concatenate(parts)
  if len(np.unique(indices)) != len(indices):
    raise StillroomError(f"split {split!r} names some examples twice; use non-overlapping slices.")
  if not len(indices):
    raise StillroomError(f"split {split!r} of dataset {dataset!r} is empty.")
  return base, indices, "+".join(canonical)


def _load_npz(name: str) -> tuple[ArraySource, int | None]:
  path = name[len(NPZ_PREFIX):]
  if not storage.is_file(path):
    raise StillroomError(f"dataset {name!r}: no such file {path!r}.")
  try:  # A local archive is read from its file (its arrays loaded one by one); an object, fetched whole.
    with np.load(io.BytesIO(storage.read_bytes(path)) if storage.is_url(storage.local(path)) else storage.local(path),
                 allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
  except Exception as e:  # A corrupt or non-NumPy file: say which one.
    raise StillroomError(f"dataset {name!r}: cannot read {path!r} as a NumPy .npz archive ({e}).") from e
  if "x" not in arrays:
    raise StillroomError(f"dataset {name!r}: the archive has no 'x' array (it has {sorted(arrays)}).")
  x = arrays["x"]
  if x.ndim < 2 or not len(x):
    raise StillroomError(f"dataset {name!r}: 'x' must have shape (N, ...) with N > 0, got {x.shape}.")
  _check_inputs(name, "train", np.arange(len(x)), x)  # Held in memory: checked once, here.
  if "y" not in arrays:
    return ArraySource(x, np.full(len(x), -1, np.int64), labeled=False), None
  y = arrays["y"]
  if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
    raise StillroomError(
        f"dataset {name!r}: 'y' must be integer class ids of shape ({len(x)},), got {y.dtype} {y.shape}.")
  if np.any(y < 0):
    raise StillroomError(f"dataset {name!r}: 'y' has a negative label at example {int(np.argmax(y < 0))}.")
  return ArraySource(x, y.astype(np.int64), labeled=True), int(y.max()) + 1


def _list_image_folder(name: str) -> tuple[ImageFolderSource, int | None]:
  """Lists `imagefolder:DIR`: class sub-folders (sorted names are the class ids) of image files, or image files
  directly in DIR (unlabeled). Files are in sorted relative-path order."""
  root = name[len(IMAGEFOLDER_PREFIX):]
  if not storage.is_dir(root):
    raise StillroomError(f"dataset {name!r}: no such directory {root!r}.")
  entries = storage.scan(root)
  classes = [entry for entry, folder, _ in entries if folder]
  loose = [entry for entry, folder, _ in entries if not folder and entry.lower().endswith(IMAGE_EXTENSIONS)]
  others = [entry for entry, folder, _ in entries if not folder and not entry.lower().endswith(IMAGE_EXTENSIONS)]
  if classes and loose:
    raise StillroomError(f"dataset {name!r}: {root!r} holds both class folders ({', '.join(classes[:3])}, ...) and "
                         f"image files ({loose[0]}, ...); put every image in its class folder, or use a folder of "
                         "images only for an unlabeled set.")
  files, sizes, labels, empty = [], [], [], []
  skipped = others if classes else []

  def walk(folder: str, relative: str, label: int) -> int:
    found = 0
    for entry, is_folder, size in storage.scan(folder):
      path = f"{relative}/{entry}" if relative else entry
      if is_folder:
        if label >= 0:  # Class folders may nest their images; an unlabeled set is flat.
          found += walk(storage.join(folder, entry), path, label)
      elif entry.lower().endswith(IMAGE_EXTENSIONS):
        files.append(path)
        sizes.append(size)
        labels.append(label)
        found += 1
      else:
        skipped.append(path)
    return found

  if classes:
    for label, folder in enumerate(classes):
      if not walk(storage.join(root, folder), folder, label):
        empty.append(folder)
  else:
    walk(root, "", -1)
  if not files:
    raise StillroomError(f"dataset {name!r}: no {'/'.join(IMAGE_EXTENSIONS)} files in {root!r}.")
  if skipped:
    print(f"stillroom: dataset {name!r}: ignored {len(skipped)} file(s) that are not {'/'.join(IMAGE_EXTENSIONS)} "
          f"images (e.g. {skipped[0]})", file=sys.stderr)
  if empty:
    print(f"stillroom: dataset {name!r}: class folder(s) {', '.join(empty[:5])} hold no images (their class ids "
          "stay reserved)", file=sys.stderr)
  source = ImageFolderSource(name, root, files, sizes, np.asarray(labels, np.int64), classes)
  return source, (len(classes) or None)


def _offline_preparation_hint(name: str, data_dir: str | None) -> str:
  target = data_dir or "~/tensorflow_datasets"
  return (
      f"Prepare it on a machine with network access: python -c \"import tensorflow_datasets as tfds; "
      f"tfds.builder('{name}', data_dir='DIR', file_format='array_record').download_and_prepare()\", then copy DIR "
      f"to this machine and pass --data-dir DIR (looked in {target}).")


def _open_tfds(name: str, data_dir: str | None):
  """Opens a TFDS builder; returns (split -> TfdsSource, num_classes)."""
  try:
    if name == "digits":
      builder = digits_lib.Digits(data_dir=data_dir, file_format="array_record")
      if not builder.is_prepared():
        print(f"preparing the embedded digits dataset in {builder.data_dir}", file=sys.stderr)
        tfds.disable_progress_bar()
        builder.download_and_prepare()
    else:
      builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise StillroomError(
        f"unknown dataset {name!r}. Use 'digits' (embedded, offline), 'npz:PATH' (a NumPy archive with x and "
        f"optional y), 'imagefolder:DIR' (a folder of class folders of images), or the name of a TFDS dataset "
        f"prepared in --data-dir.") from e
  features = builder.info.features
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  if image_key not in features:
    raise StillroomError(f"dataset {name!r} has no {image_key!r} feature (it has {sorted(features)}); stillroom "
                         "reads its supervised keys, or 'image' and 'label'.")
  num_classes = getattr(features[label_key], "num_classes", None) if label_key in features else None

  def source_of(split_name: str) -> TfdsSource:
    try:
      data_source = builder.as_data_source(split=split_name)
    except Exception as e:  # tfds raises several types here for "not prepared" or "wrong file format".
      known = list(builder.info.splits.keys())
      if known and split_name not in known:
        raise StillroomError(f"dataset {name!r} has no split {split_name!r}; valid splits: {known}.") from e
      raise StillroomError(
          f"dataset {name!r} (split {split_name!r}) is not prepared for random access in "
          f"{data_dir or 'the default data dir'}, and nothing can be downloaded here. "
          + _offline_preparation_hint(name, data_dir)) from e
    return TfdsSource(builder, split_name, data_source, (image_key, label_key), labeled=label_key in features)

  return source_of, num_classes


def open_transfer_set(name: str, split: str = "train", data_dir: str | None = None) -> TransferSet:
  """Opens a transfer set without reading its examples (see the module docstring).

  Args:
    name: `digits`, `npz:PATH`, `imagefolder:DIR` or a TFDS dataset name.
    split: a TFDS split spec of one split, e.g. `train` or `train[:80%]`.
    data_dir: TFDS data dir (where `digits` is prepared on first use); default: TFDS's own default.

  Returns:
    The transfer set, examples in split order.

  Raises:
    StillroomError: unknown dataset or split, missing file or folder, bad archive, dataset not prepared (with how
      to prepare it offline).
  """
  data_dir = storage.local(data_dir) if data_dir else data_dir
  if data_dir and storage.is_url(data_dir):
    raise StillroomError(f"--data-dir {data_dir!r}: TFDS reads examples through array_record, which opens local files "
                         "only. Mount the bucket (mountpoint-s3, gcsfuse, rclone mount) and pass the mount's path, or "
                         "copy the prepared dataset (DATA_DIR/NAME/VERSION) to a local disk.")
  if name.startswith(NPZ_PREFIX) or name.startswith(IMAGEFOLDER_PREFIX):
    source, num_classes = (_load_npz if name.startswith(NPZ_PREFIX) else _list_image_folder)(name)
    base, indices, canonical = _parse_split(split, {"train": len(source)}, name)
  else:
    source_of, num_classes = _open_tfds(name, data_dir)
    named = {part.split("[")[0].strip() for part in split.split("+")}
    if len(named) != 1:
      raise StillroomError(
          f"split {split!r} mixes splits {sorted(named)}; an example's index is its position in one split, "
          "so use slices of a single split.")
    source = source_of(named.pop())
    base, indices, canonical = _parse_split(split, {source.split: len(source)}, name)
  _check_dtype(name, split, source.dtype)
  return TransferSet(name=name, split=split, base_split=base, base_count=len(source), indices=indices,
                     source=source, num_classes=num_classes,
                     normalization=default_normalization(name, source.dtype), canonical_split=canonical)


def _check_dtype(name: str, split: str, dtype: np.dtype) -> None:
  """Inputs must be real numbers: a model cannot take strings and would drop an imaginary part."""
  if dtype == bool or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
    raise StillroomError(f"dataset {name!r} split {split!r}: inputs have dtype {dtype}; they must be real "
                         "numbers (integers or floats).")


def _check_inputs(name: str, split: str, indices: np.ndarray, inputs) -> None:
  """Inputs must be finite: a NaN or Inf input makes every loss and metric NaN (their dtype is `_check_dtype`'s).

  Args:
    indices: int64 [B] the examples' indices in the unsliced split.
    inputs: [B, ...] or a list of B arrays.

  Raises:
    StillroomError: naming the first example with a non-finite value.
  """
  if isinstance(inputs, np.ndarray):
    finite = np.isfinite(inputs.reshape(len(inputs), -1)).all(axis=1) if np.issubdtype(inputs.dtype, np.floating) \
        else np.ones(len(inputs), bool)
  else:
    finite = np.array([not np.issubdtype(x.dtype, np.floating) or bool(np.isfinite(x).all()) for x in inputs])
  if not finite.all():
    raise StillroomError(f"dataset {name!r} split {split!r}: example index {int(indices[np.argmin(finite)])} has a "
                         f"non-finite input value (NaN or Inf); {int((~finite).sum())} example(s) in all.")
