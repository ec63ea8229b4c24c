"""Transfer sets: one way to name data everywhere (`--dataset NAME --split SPLIT [--data-dir DIR]`).

Three kinds of name:
  * `digits`: the embedded offline dataset (scikit-learn's 8x8 digits as a TFDS builder), prepared on first use.
  * `npz:PATH`: a NumPy archive with `x` [N, ...] and optional `y` [N] (no `y`: an unlabeled transfer set);
    its one split is `train`.
  * any other name: a TFDS dataset prepared in the data dir with `file_format="array_record"`.

Splits use TFDS slicing syntax (`train`, `train[:80%]`, `train[100:200]`). Every example keeps its position in the
unsliced split as its index, so slices, folds and fractions of one split share indices.
"""

import dataclasses
import functools
import hashlib
import json
import os
import sys
import types

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from shared import digits as digits_lib
from shared.errors import StillroomError

EMBEDDED_DATASETS = ("digits",)
NPZ_PREFIX = "npz:"
NO_EVAL = "none"  # `--eval-split none`: no evaluation split.
FINGERPRINT_FULL_BYTES = 1 << 30  # Above this, the fingerprint hashes a seeded sample of examples.
FINGERPRINT_SAMPLE_SEED = 0


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
  """The file a dataset name points to (`npz:PATH`), or None for named datasets."""
  return name[len(NPZ_PREFIX):] if name.startswith(NPZ_PREFIX) else None


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
    name: the dataset name as given (`digits`, `npz:/path/x.npz`, a TFDS name).
    split: the split spec as given (`train[:80%]`).
    canonical_split: the split with absolute bounds (`train[0:1150]`).
    count: number of examples.
    fingerprint: SHA-256 of the examples (see `TransferSet.fingerprint`).
    input_shape: one example's shape as stored.
    input_dtype: the stored inputs' dtype name.
    num_classes: class count, or None when unknown (unlabeled `npz:`).
    labeled: every example has a label.
  """

  name: str
  split: str
  canonical_split: str
  count: int
  fingerprint: str
  input_shape: tuple[int, ...]
  input_dtype: str
  num_classes: int | None
  labeled: bool

  def indices(self) -> np.ndarray:
    """int64 [count]: each example's position in the unsliced split, from the canonical split alone."""
    parts = []
    for part in self.canonical_split.split("+"):
      start, stop = part[part.index("[") + 1:-1].split(":")
      parts.append(np.arange(int(start), int(stop), dtype=np.int64))
    return np.concatenate(parts)

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "input_shape": list(self.input_shape)}

  @classmethod
  def from_dict(cls, d: dict) -> "DatasetSpec":
    return cls(**{**d, "input_shape": tuple(d["input_shape"])})


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TransferSet:
  """A split (or slice of one) held in host memory.

  Attributes:
    name: the dataset name as given (`digits`, `mnist`, `npz:/path/x.npz`).
    split: the split spec as given (`train[:80%]`).
    base_split: the unsliced split the indices refer to (`train`).
    base_count: number of examples in the unsliced split.
    indices: int64 [N] each example's position in the unsliced split.
    inputs: [N, ...] inputs as stored (any dtype).
    labels: int64 [N] labels, -1 everywhere for an unlabeled set.
    num_classes: number of classes, or None when unknown (unlabeled `npz:`).
    normalization: the dataset's default input normalisation.
    canonical_split: the split with absolute bounds (`train[0:1150]`), part of the fingerprint.
  """

  name: str
  split: str
  base_split: str
  base_count: int
  indices: np.ndarray
  inputs: np.ndarray
  labels: np.ndarray
  num_classes: int | None
  normalization: Normalization
  canonical_split: str

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.inputs.shape[1:])

  @property
  def labeled(self) -> bool:
    return bool(len(self.labels)) and bool(np.all(self.labels >= 0))

  @functools.cached_property
  def _position_of_index(self) -> np.ndarray:
    position = np.full(self.base_count, -1, np.int64)
    position[self.indices] = np.arange(len(self.indices))
    return position

  def positions(self, example_indices: np.ndarray) -> np.ndarray:
    """Maps example indices (positions in the unsliced split) to rows of `inputs`/`labels`.

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

  @functools.cached_property
  def fingerprint(self) -> str:
    """SHA-256 of the canonical split, count, shapes, dtypes, indices, input and label bytes.

    Above `FINGERPRINT_FULL_BYTES` of data, a seeded sample of examples is hashed instead of all of them.
    Never includes a file path, so a moved or copied dataset keeps its fingerprint.
    """
    digest = hashlib.sha256()
    header = {"split": self.canonical_split, "count": len(self), "input_shape": list(self.input_shape),
              "input_dtype": self.inputs.dtype.str, "label_dtype": "<i8"}
    digest.update(json.dumps(header, sort_keys=True).encode())
    total_bytes = self.inputs.nbytes + self.labels.nbytes
    selected = np.arange(len(self))
    if total_bytes > FINGERPRINT_FULL_BYTES:
      sample = max(1, int(len(self) * FINGERPRINT_FULL_BYTES // total_bytes))
      selected = np.sort(np.random.default_rng(FINGERPRINT_SAMPLE_SEED).choice(len(self), sample, replace=False))
      digest.update(b"sample" + selected.astype("<i8").tobytes())
    little_endian = self.inputs.dtype.newbyteorder("<")
    for start in range(0, len(selected), 65536):
      rows = selected[start:start + 65536]
      digest.update(self.indices[rows].astype("<i8").tobytes())
      digest.update(np.ascontiguousarray(self.inputs[rows], dtype=little_endian).tobytes())
      digest.update(self.labels[rows].astype("<i8").tobytes())
    return digest.hexdigest()

  def describe(self) -> DatasetSpec:
    """What a cache or run records about its data (everything except the bytes)."""
    return DatasetSpec(name=self.name, split=self.split, canonical_split=self.canonical_split, count=len(self),
                       fingerprint=self.fingerprint, input_shape=self.input_shape,
                       input_dtype=self.inputs.dtype.name, num_classes=self.num_classes, labeled=self.labeled)


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
        f"bad split {split!r} for dataset {dataset!r}: {e}. Valid splits: {sorted(split_sizes)}; slices use the "
        "TFDS syntax, e.g. 'train[:80%]' or 'train[100:200]'.") from e
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


def _load_npz(name: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int | None]:
  path = name[len(NPZ_PREFIX):]
  if not os.path.isfile(path):
    raise StillroomError(f"dataset {name!r}: no such file {path!r}.")
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
  except Exception as e:  # A corrupt or non-NumPy file: say which one.
    raise StillroomError(f"dataset {name!r}: cannot read {path!r} as a NumPy .npz archive ({e}).") from e
  if "x" not in arrays:
    raise StillroomError(f"dataset {name!r}: the archive has no 'x' array (it has {sorted(arrays)}).")
  x = arrays["x"]
  if x.ndim < 2 or not len(x):
    raise StillroomError(f"dataset {name!r}: 'x' must have shape (N, ...) with N > 0, got {x.shape}.")
  if "y" not in arrays:
    return {"train": (x, np.full(len(x), -1, np.int64))}, None
  y = arrays["y"]
  if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
    raise StillroomError(
        f"dataset {name!r}: 'y' must be integer class ids of shape ({len(x)},), got {y.dtype} {y.shape}.")
  if np.any(y < 0):
    raise StillroomError(f"dataset {name!r}: 'y' has a negative label at example {int(np.argmax(y < 0))}.")
  return {"train": (x, y.astype(np.int64))}, int(y.max()) + 1


def _offline_preparation_hint(name: str, data_dir: str | None) -> str:
  target = data_dir or "~/tensorflow_datasets"
  return (
      f"Prepare it on a machine with network access: python -c \"import tensorflow_datasets as tfds; "
      f"tfds.builder('{name}', data_dir='DIR', file_format='array_record').download_and_prepare()\", then copy DIR "
      f"to this machine and pass --data-dir DIR (looked in {target}).")


def _open_tfds(name: str, data_dir: str | None):
  """Opens a TFDS builder's random-access data source; returns (source_of_split, num_classes, keys)."""
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
        f"optional y), or the name of a TFDS dataset prepared in --data-dir.") from e
  features = builder.info.features
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  num_classes = getattr(features[label_key], "num_classes", None) if label_key in features else None

  def source_of(split_name: str):
    try:
      return builder.as_data_source(split=split_name)
    except Exception as e:  # tfds raises several types here for "not prepared" or "wrong file format".
      known = list(builder.info.splits.keys())
      if known and split_name not in known:
        raise StillroomError(f"dataset {name!r} has no split {split_name!r}; valid splits: {known}.") from e
      raise StillroomError(
          f"dataset {name!r} (split {split_name!r}) is not prepared for random access in "
          f"{data_dir or 'the default data dir'}, and nothing can be downloaded here. "
          + _offline_preparation_hint(name, data_dir)) from e

  return source_of, num_classes, (image_key, label_key)


def _read_records(source, keys: list[int]) -> list[dict]:
  try:
    return source.__getitems__(keys)  # One batched read of the array_record files.
  except TypeError:  # tfds.testing.mock_data's sources only read one record at a time.
    return [source[key] for key in keys]


def open_transfer_set(name: str, split: str = "train", data_dir: str | None = None) -> TransferSet:
  """Loads a transfer set into host memory.

  Args:
    name: `digits`, `npz:PATH` or a TFDS dataset name.
    split: a TFDS split spec of one split, e.g. `train` or `train[:80%]`.
    data_dir: TFDS data dir (where `digits` is prepared on first use); default: TFDS's own default.

  Returns:
    The transfer set, examples in split order.

  Raises:
    StillroomError: unknown dataset or split, missing file, dataset not prepared (with how to prepare it offline).
  """
  if name.startswith(NPZ_PREFIX):
    splits, num_classes = _load_npz(name)
    base, indices, canonical = _parse_split(split, {k: len(v[0]) for k, v in splits.items()}, name)
    x, y = splits[base]
    inputs, labels, base_count = x[indices], y[indices], len(x)
  else:
    source_of, num_classes, (image_key, label_key) = _open_tfds(name, data_dir)
    named = {part.split("[")[0].strip() for part in split.split("+")}
    if len(named) != 1:
      raise StillroomError(
          f"split {split!r} mixes splits {sorted(named)}; an example's index is its position in one split, "
          "so use slices of a single split.")
    base = named.pop()
    source = source_of(base)
    base, indices, canonical = _parse_split(split, {base: len(source)}, name)
    base_count = len(source)
    xs, ys = [], []
    batch = 4096
    for start in tqdm(range(0, len(indices), batch), desc=f"reading {name} {split}", unit="batch",
                      disable=len(indices) < 50_000, leave=False):
      records = _read_records(source, indices[start:start + batch].tolist())
      xs.append(np.stack([np.asarray(r[image_key]) for r in records]))
      ys.append(np.asarray([r.get(label_key, -1) for r in records], np.int64))
    inputs, labels = np.concatenate(xs), np.concatenate(ys)
  _check_inputs(name, split, indices, inputs)
  return TransferSet(
      name=name, split=split, base_split=base, base_count=base_count, indices=indices, inputs=inputs,
      labels=labels, num_classes=num_classes, normalization=default_normalization(name, inputs.dtype),
      canonical_split=canonical)


def _check_inputs(name: str, split: str, indices: np.ndarray, inputs: np.ndarray) -> None:
  """Inputs must be real numbers and finite: a model cannot take strings, would drop an imaginary part, and a
  NaN or Inf input makes every loss and metric NaN.

  Raises:
    StillroomError: naming the dtype, or the first example (index in the unsliced split) with a non-finite value.
  """
  if inputs.dtype == bool or not (np.issubdtype(inputs.dtype, np.integer) or np.issubdtype(inputs.dtype, np.floating)):
    raise StillroomError(f"dataset {name!r} split {split!r}: inputs have dtype {inputs.dtype}; they must be real "
                         "numbers (integers or floats).")
  if np.issubdtype(inputs.dtype, np.floating):
    finite = np.isfinite(inputs.reshape(len(inputs), -1)).all(axis=1)
    if not finite.all():
      raise StillroomError(f"dataset {name!r} split {split!r}: example index {int(indices[np.argmin(finite)])} has a "
                           f"non-finite input value (NaN or Inf); {int((~finite).sum())} example(s) in all.")
