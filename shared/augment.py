"""View augmentation as a pure function of `(seed, example index, view id)`.

The teacher-cache stage stores one row per `(example, view)` with the view's parameters, and the student replays
the exact same view from the same three integers, so teacher and student always see the same input.

A view is a horizontal flip (optional) followed by a zero-filled shift of up to `max_shift` pixels on each spatial
axis: `out[y, x] = flipped[y - dy, x - dx]`, zero where that falls outside the image. Zero fill, not wrap-around:
on small images such as 8x8 digits a wrapped pixel lands on the wrong side of the digit.
View 0 is always the un-augmented input.
"""

import dataclasses
import functools

import numpy as np

from shared.errors import StillroomError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAM_DY, _STREAM_DX, _STREAM_FLIP, _STREAM_FOLD, _STREAM_ORDER = 1, 2, 3, 4, 5
FOLD_SEED = 0  # Fold assignment is fixed: runs and caches made apart must agree on it.


def _splitmix64(z: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser: a bijective, well-mixed hash of uint64 arrays (wraps modulo 2**64)."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def counter_hash(seed: int, stream: int, index: np.ndarray, view: np.ndarray) -> np.ndarray:
  """Counter-based random bits: uint64 [B] from a seed, a stream id and per-row (index, view)."""
  with np.errstate(over="ignore"):
    z = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + np.uint64(stream))
    z = _splitmix64(z ^ np.asarray(index, np.int64).astype(np.uint64))
    return _splitmix64(z ^ (np.asarray(view, np.int64).astype(np.uint64) * _GOLDEN))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Augmentation:
  """How views are drawn.

  Attributes:
    seed: seeds every view's parameters.
    max_shift: largest shift in pixels along each spatial axis (0 disables shifts).
    flip: whether views may be flipped horizontally (each with probability 1/2).
  """

  seed: int = 0
  max_shift: int = 1
  flip: bool = False

  def __post_init__(self):
    if self.max_shift < 0:
      raise ValueError(f"max_shift must be >= 0, got {self.max_shift}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Augmentation":
    return cls(**d)

  def view_params(self, index: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draws each row's view parameters.

    Args:
      index: int [B] example indices (positions in the unsliced split).
      view: int [B] view ids; view 0 is the identity.

    Returns:
      `(shift, flip)`: int8 [B, 2] as (dy, dx), and bool [B].
    """
    index, view = np.asarray(index), np.asarray(view)
    augmented = view != 0
    span = np.uint64(2 * self.max_shift + 1)
    dy = (counter_hash(self.seed, _STREAM_DY, index, view) % span).astype(np.int64) - self.max_shift
    dx = (counter_hash(self.seed, _STREAM_DX, index, view) % span).astype(np.int64) - self.max_shift
    shift = (np.stack([dy, dx], axis=-1) * augmented[:, None]).astype(np.int8)
    flip = self.flip & augmented & ((counter_hash(self.seed, _STREAM_FLIP, index, view) >> np.uint64(63)) == 1)
    return shift, flip


def check_max_shift(max_shift: int, input_shape: tuple[int, ...], option: str) -> None:
  """A shift must leave part of the image: 0 <= max_shift < the smaller spatial side (for image inputs).

  Raises:
    StillroomError: naming the option, the value and the image size.
  """
  if len(input_shape) < 2:
    if max_shift < 0:
      raise StillroomError(f"{option} must be >= 0, got {max_shift}.")
  elif not 0 <= max_shift < min(input_shape[:2]):
    raise StillroomError(f"{option} must be in 0..{min(input_shape[:2]) - 1} for {input_shape[0]}x{input_shape[1]} "
                         f"images, got {max_shift}.")


def fold_of(index: np.ndarray, folds: int) -> np.ndarray:
  """Cross-fitting fold of each example: a fixed hash of its index, int32 [B] in [0, folds).

  Hashed rather than `index % folds`, since a split's order can follow the classes (scikit-learn's digits cycle
  through 0..9).
  """
  index = np.asarray(index)
  if folds <= 1:
    return np.full(index.shape, -1, np.int32)
  return (counter_hash(FOLD_SEED, _STREAM_FOLD, index, np.zeros_like(index)) % np.uint64(folds)).astype(np.int32)


@functools.lru_cache(maxsize=2)  # A build or a check walks the views in order: one or two are live at a time.
def row_permutation(seed: int, view: int, count: int) -> np.ndarray:
  """The order in which a cache stores one view's examples: a seeded permutation of positions 0..count-1.

  A pure function of (seed, view, count), from the same counter hash as the views (portable across NumPy
  versions, unlike a Generator's stream). Each view gets its own order, so no two chunks hold the same examples.

  Returns:
    int64 [count], read-only: entry k is the position of the k-th stored example of this view.
  """
  keys = counter_hash(seed, _STREAM_ORDER, np.arange(count), np.full(count, view))
  order = np.argsort(keys, kind="stable")
  order.flags.writeable = False
  return order


def apply_view(x: np.ndarray, shift: np.ndarray, flip: np.ndarray) -> np.ndarray:
  """Renders views: flip each image horizontally where asked, then shift it with zero fill.

  Args:
    x: [B, H, W] or [B, H, W, C] images, any dtype; or [B, D] flat vectors, which take no augmentation.
    shift: int [B, 2] as (dy, dx).
    flip: bool [B].

  Returns:
    Array of the same shape and dtype as `x`.
  """
  if x.ndim < 3:
    if np.any(shift) or np.any(flip):
      raise ValueError("flat input vectors cannot be shifted or flipped")
    return x
  if not np.any(flip) and not np.any(shift):
    return x
  x = np.where(flip.reshape((-1,) + (1,) * (x.ndim - 1)), x[:, :, ::-1], x)
  height, width = x.shape[1], x.shape[2]
  pad = int(np.abs(shift).max())
  padded = np.pad(x, [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 3))
  rows = np.arange(height)[None, :] + pad - shift[:, 0:1].astype(np.int64)  # [B, H]
  cols = np.arange(width)[None, :] + pad - shift[:, 1:2].astype(np.int64)  # [B, W]
  batch = np.arange(x.shape[0])[:, None, None]
  return padded[batch, rows[:, :, None], cols[:, None, :]]
