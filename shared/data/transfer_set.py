"""The transfer set: a split (or slice of one) of a dataset, read lazily from its source, and what a cache or run
records about it (`DatasetSpec`, `Normalization`)."""

import dataclasses
import functools

import numpy as np

from shared import storage
from shared.data import fingerprint as fingerprint_lib
from shared.data.backends import is_text, open_source
from shared.data.fingerprint import FINGERPRINT_VERSION
from shared.data.source import Source, canvas_of, check_dtype, check_inputs
from shared.data.splits import canonical_indices, parse_split
from shared.data.text import TextOptions
from shared.errors import StillroomError


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


def default_normalization(name: str, input_dtype: np.dtype) -> Normalization:
  """The normalisation a dataset gets unless a run says otherwise: pixels to [0, 1], other data (token rows of
  `text:` among them) as stored."""
  if is_text(name):
    return Normalization()  # Token ids: the model casts them back to int32.
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
    text: how a `text:` dataset's rows were made (`shared.data.text.TextOptions.to_dict`: seq_len, the tokenizer's
      identity, pack_seed); None for other data, and then absent from `to_dict` (records from before text read the
      same).
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
  text: dict | None = None

  def indices(self) -> np.ndarray:
    """int64 [count]: each example's position in the unsliced split, from the canonical split alone."""
    return canonical_indices(self.canonical_split)

  def to_dict(self) -> dict:
    d = {**dataclasses.asdict(self), "input_shape": list(self.input_shape)}
    if self.fingerprint_version == 1:
      del d["fingerprint_version"]  # As stillroom 0.2 wrote it.
    if self.text is None:
      del d["text"]  # As stillroom 0.3 wrote records of image data.
    return d

  def text_options(self) -> TextOptions | None:
    """The options that re-open this `text:` data (`open_transfer_set(..., text=)`), or None for other data."""
    return None if self.text is None else TextOptions.from_dict(self.text)

  @classmethod
  def from_dict(cls, d: dict) -> "DatasetSpec":
    return cls(**{"fingerprint_version": 1, **d, "input_shape": tuple(d["input_shape"])})


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
    source: reads records by position in the unsliced split (a `shared.data.source.Source`).
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
  source: Source
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
    return self.source.kept_in_memory

  @property
  def class_names(self) -> tuple[str, ...] | None:
    """The classes' names in class-id order (`imagefolder:` folders, TFDS ClassLabel names), or None."""
    return self.source.class_names

  def read(self, positions: np.ndarray):
    """Reads examples by position in this transfer set (0..N-1), checking them.

    Returns:
      `(inputs, labels)`: inputs [B, ...] as stored (a list of B arrays when sizes vary), int64 labels [B] (-1 where
      unlabeled); `text:` rows: int32 [B, 2, L] and int64 [B, L] next-token labels (-1 where none).

    Raises:
      StillroomError: naming the first example (index in the unsliced split) with a non-finite input or a label
        outside 0..num_classes-1, or one that cannot be read.
    """
    keys = self.indices[np.asarray(positions, np.int64)]
    inputs, labels = self.source.read(keys)
    # Only floats can be non-finite (the dtype was checked at open); arrays in memory were checked when loaded.
    if np.issubdtype(self.input_dtype, np.floating) and not self.source.inputs_checked:
      check_inputs(self.name, self.split, keys, inputs)
    self._check_labels(keys, labels)
    return inputs, self._mapped(labels)

  def image_sizes(self, positions: np.ndarray) -> np.ndarray:
    """int64 [B, 2] each example's stored (height, width), without decoding where the source can."""
    return self.source.image_sizes(self.indices[np.asarray(positions, np.int64)])

  @property
  def canvas_shape(self) -> tuple[int, ...] | None:
    """The fixed canvas its images sit on, (Hc, Wc, C), where the source offers one (`Source`), else None: what
    `--renderer device` reads."""
    return canvas_of(self.source)

  def read_canvas(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reads examples' canvases by position in this transfer set.

    Returns:
      `(uint8 [B, Hc, Wc(, C)] canvases, int32 [B, 2] each image's (height, width))`: image b occupies
      canvas[b, :h, :w].

    Raises:
      StillroomError: the source offers no canvases.
    """
    if self.canvas_shape is None:
      raise StillroomError(f"dataset {self.name!r} offers no fixed-size image canvases (for --renderer device).")
    return self.source.read_canvas(self.indices[np.asarray(positions, np.int64)])

  def read_all(self):
    """`read` of every example, in split order: for small sets (tests, fixed-size evaluation data)."""
    return self.read(np.arange(len(self)))

  def _check_labels(self, keys: np.ndarray, labels: np.ndarray) -> None:
    """Checks stored labels (before any `label_map`) against the stored class count."""
    classes = self.num_classes if self.label_map is None else len(self.label_map)
    if classes is None or not self.labeled:
      return
    # Per-position labels ([B, L] of token rows) are -1 where a position predicts nothing.
    outside = (labels < 0) | (labels >= classes) if labels.ndim == 1 else \
        ((labels < -1) | (labels >= classes)).reshape(len(labels), -1).any(axis=1)
    if outside.any():
      bad = int(np.argmax(outside))
      if labels.ndim > 1:
        raise StillroomError(f"dataset {self.name!r} split {self.split!r}: example index {int(keys[bad])} has a "
                             f"label outside -1..{classes - 1}.")
      raise StillroomError(f"dataset {self.name!r} split {self.split!r}: example index {int(keys[bad])} has label "
                           f"{int(labels[bad])}, outside 0..{classes - 1}.")

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """int64 [N] every example's label (-1 where unlabeled); [N, L] next-token labels of `text:` rows. Cheap for
    `npz:`, `imagefolder:` and small TFDS splits; a large TFDS split is read once for it."""
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
    """int64 [min(N, FINGERPRINT_SAMPLE)]: the example indices whose bytes the fingerprint hashes (see
    `shared.data.fingerprint`)."""
    return fingerprint_lib.sampled_indices(self)

  @functools.cached_property
  def fingerprint(self) -> str:
    """SHA-256 of the data's identity and a sample of its records (version 2; see `shared.data.fingerprint`)."""
    return fingerprint_lib.fingerprint(self)

  def fingerprint_v1(self) -> str:
    """The version-1 fingerprint (stillroom <= 0.2), to check caches and runs that recorded it; reads the whole
    set."""
    return fingerprint_lib.fingerprint_v1(self)

  def as_recorded(self, fingerprint: str, version: int) -> tuple[str, int]:
    """The (fingerprint, version) a record of this data holds, given an existing record's: that record's own when
    it is a version-1 fingerprint (stillroom <= 0.2) of this data, else the current version's."""
    return fingerprint_lib.as_recorded(self, fingerprint, version)

  def matches(self, recorded: DatasetSpec) -> bool:
    """Whether this is the data `recorded` describes, by the fingerprint version it recorded."""
    return self.as_recorded(recorded.fingerprint, recorded.fingerprint_version) == \
        (recorded.fingerprint, recorded.fingerprint_version)

  @property
  def text(self) -> dict | None:
    """How `text:` rows were made (`DatasetSpec.text`), or None for other data."""
    return getattr(self.source, "text", None)

  def document_at(self, key: int, position: int) -> str:
    """`text:` data: the document (and its token) at `position` of the row whose index in the unsliced split is
    `key` (a cache's `index`), e.g. "corpus.jsonl line 12, its token 7" (`shared.data.text.TextSource.document_at`).

    Raises:
      StillroomError: the data is not text.
    """
    if self.text is None:
      raise StillroomError(f"dataset {self.name!r}: not text, whose rows have no documents.")
    return self.source.document_at(int(key), int(position))

  def text_options(self) -> TextOptions | None:
    """The options that re-open this `text:` data, or None for other data."""
    return None if self.text is None else TextOptions.from_dict(self.text)

  def describe(self) -> DatasetSpec:
    """What a cache or run records about its data (everything except the bytes)."""
    return DatasetSpec(name=self.name, split=self.split, canonical_split=self.canonical_split, count=len(self),
                       fingerprint=self.fingerprint, input_shape=self.input_shape,
                       input_dtype=self.input_dtype.name, num_classes=self.num_classes, labeled=self.labeled,
                       text=self.text)


def check_eval_set(eval_set: TransferSet, transfer_set: TransferSet, augmentation, num_classes: int) -> None:
  """An eval set must fit the models of a transfer set: with the device renderer it offers canvases; its views (by
  `augmentation`, a `shared.augment.Augmentation`) have the transfer set's shape, and its class ids mean the
  transfer set's: the same class names where both have them (an image folder with a class more or less shifts every
  id), and no label beyond the models' `num_classes`.

  Raises:
    StillroomError: naming both datasets and the first difference.
  """
  what = "eval dataset"
  if augmentation.renderer == "device" and eval_set.canvas_shape is None:  # One renderer per cache, and per run.
    raise StillroomError(f"--renderer device renders the eval split too, but {what} {eval_set.name!r} "
                         f"{eval_set.split!r} offers no fixed-size canvases: give an eval dataset that does, or "
                         "--eval-split none, or --renderer host.")
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


def open_transfer_set(name: str, split: str = "train", data_dir: str | None = None,
                      text: TextOptions | None = None) -> TransferSet:
  """Opens a transfer set without reading its examples (see `shared.data`), by the backend its name chooses.

  Args:
    name: `digits`, `npz:PATH`, `imagefolder:DIR`, `prepared:STORE`, `text:PATH` or a TFDS dataset name.
    split: a TFDS split spec of one split, e.g. `train` or `train[:80%]`.
    data_dir: TFDS data dir (where `digits` is prepared on first use); default: TFDS's own default.
    text: how `text:PATH` becomes packed rows (default: `TextOptions()`); refused for other data.

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
  source, split_sizes, num_classes = open_source(name, split, data_dir, text)
  base, indices, canonical = parse_split(split, split_sizes, name)
  check_dtype(name, split, source.dtype)
  return TransferSet(name=name, split=split, base_split=base, base_count=len(source), indices=indices,
                     source=source, num_classes=num_classes,
                     normalization=default_normalization(name, source.dtype), canonical_split=canonical)
