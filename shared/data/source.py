"""Where a transfer set's records come from: the `Source` protocol every backend implements (`npz`, `imagefolder`,
`tfds`, `prepared`, `text`), `ArraySource` (examples held in memory), and the checks every source's inputs get."""

import hashlib
import typing

import numpy as np

from shared.errors import StillroomError

READ_BATCH = 4096  # Records per batched read when a whole split is read.


class Source(typing.Protocol):
  """Reads a dataset's records by key: an example's position in its unsliced split.

  Attributes:
    shape: one example's shape as stored; None for a side whose size varies between examples.
    dtype: the stored inputs' dtype.
    labeled: whether the data has labels.
    class_names: the classes' names in class-id order (folder names, TFDS ClassLabel names), or None.
    kept_in_memory: whether the examples are (or, once read, will be) arrays in memory.
    inputs_checked: whether every input was checked (`check_inputs`) when the source was opened.
  """

  shape: tuple[int | None, ...]
  dtype: np.dtype
  labeled: bool
  class_names: tuple[str, ...] | None
  kept_in_memory: bool
  inputs_checked: bool

  def __len__(self) -> int:
    """The examples of the unsliced split."""

  def read(self, keys: np.ndarray) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """`(inputs [B, ...] as stored (a list of B arrays when sizes vary), int64 labels [B], -1 where unlabeled)`;
    packed token rows (`text`) have int64 labels [B, L] per position, -1 where a position predicts nothing."""

  def labels(self, keys: np.ndarray) -> np.ndarray:
    """int64 [B] labels (-1 where unlabeled; [B, L] of token rows), without decoding inputs where the source can."""

  def image_sizes(self, keys: np.ndarray) -> np.ndarray:
    """int64 [B, 2] each example's stored (height, width), without decoding where the source can."""

  def identity(self) -> dict:
    """What identifies the data without reading it all (`shared.data.fingerprint`); never a path or a time."""

  def record_bytes(self, keys: np.ndarray) -> list[bytes]:
    """Each record's raw bytes and label, as the fingerprint hashes them."""

  # Optional, for `--renderer device` (`shared.render`): a source whose images sit on a fixed canvas offers
  #   canvas_shape: (Hc, Wc, C) (a property; (Hc, Wc) for images stored without a channel axis), and
  #   read_canvas(keys) -> (uint8 [B, Hc, Wc(, C)] canvases, int32 [B, 2] each image's (height, width)): image b
  #     occupies canvas[b, :h, :w], and beyond it the canvas holds its edge pixels replicated.
  # `canvas_of(source)` is None for a source without them.


class OpenedSource(typing.NamedTuple):
  """What a backend's `open_source(name, split, data_dir)` returns."""

  source: Source
  split_sizes: dict[str, int]  # The unsliced splits the split spec may name, and their sizes.
  num_classes: int | None  # None when unknown (unlabeled data).


def little_endian(x: np.ndarray) -> bytes:
  return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()


class ArraySource:
  """Examples held in memory: an `npz:` archive, or a small TFDS split after its first read.

  Args:
    inputs: [N, ...] as stored.
    labels: int64 [N], -1 where unlabeled.
    labeled: whether the data has labels.
  """

  class_names = None
  kept_in_memory = True
  inputs_checked = True  # As the source of `npz:`: its loader checked every input.

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
    digest = hashlib.sha256(little_endian(self.inputs))
    digest.update(self._labels.astype("<i8").tobytes())
    return {"kind": "arrays", "shape": list(self.inputs.shape), "dtype": self.dtype.str, "sha256": digest.hexdigest()}

  def record_bytes(self, keys: np.ndarray) -> list[bytes]:
    return [little_endian(self.inputs[k]) + self._labels[k].astype("<i8").tobytes() for k in keys]

  @property
  def canvas_shape(self) -> tuple[int, ...] | None:
    """Images of one shape are their own canvases: uint8 [H, W] or [H, W, C]; None for other inputs."""
    return self.shape if self.dtype == np.uint8 and len(self.shape) in (2, 3) else None

  def read_canvas(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(uint8 [B, H, W(, C)] the images, int32 [B, 2] their (height, width))` (see `Source`)."""
    if self.canvas_shape is None:
      raise StillroomError(f"inputs of shape {self.shape} and dtype {self.dtype} are not uint8 image canvases.")
    return self.inputs[keys], np.tile(np.asarray(self.shape[:2], np.int32), (len(keys), 1))


def canvas_of(source) -> tuple[int, ...] | None:
  """The canvas shape of a source that offers canvases (`Source`), else None."""
  return getattr(source, "canvas_shape", None)


def check_dtype(name: str, split: str, dtype: np.dtype) -> None:
  """Inputs must be real numbers: a model cannot take strings and would drop an imaginary part."""
  if dtype == bool or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
    raise StillroomError(f"dataset {name!r} split {split!r}: inputs have dtype {dtype}; they must be real "
                         "numbers (integers or floats).")


def check_inputs(name: str, split: str, indices: np.ndarray, inputs) -> None:
  """Inputs must be finite: a NaN or Inf input makes every loss and metric NaN (their dtype is `check_dtype`'s).

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
