"""View augmentation: pure in (seed, index, view), view 0 is the identity, zero-filled shifts."""

import numpy as np
import pytest

from shared.augment import Augmentation, apply_view

pytestmark = pytest.mark.fast  # Pure unit tests: `make test-fast` runs them (see pyproject.toml).


def reference_view(image: np.ndarray, dy: int, dx: int, flip: bool) -> np.ndarray:
  """One image, the slow obvious way: out[y, x] = flipped[y - dy, x - dx], zero outside."""
  source = image[:, ::-1] if flip else image
  out = np.zeros_like(image)
  for y in range(image.shape[0]):
    for x in range(image.shape[1]):
      if 0 <= y - dy < image.shape[0] and 0 <= x - dx < image.shape[1]:
        out[y, x] = source[y - dy, x - dx]
  return out


def test_views_match_a_per_pixel_reference():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 255, size=(64, 6, 5, 2), dtype=np.uint8)
  augmentation = Augmentation(seed=3, max_shift=2, flip=True)
  index, view = np.arange(64), np.repeat(np.arange(4), 16)
  shift, flip = augmentation.view_params(index, view).values()
  rendered = apply_view(images, shift, flip)
  for i in range(64):
    np.testing.assert_array_equal(rendered[i], reference_view(images[i], *shift[i], flip[i]))
  assert rendered.dtype == np.uint8 and (rendered[view > 0] == 0).any()  # Zero fill, never wrap-around.


def test_view_zero_is_identity_and_params_are_pure():
  augmentation = Augmentation(seed=7, max_shift=1, flip=True)
  index = np.arange(1000)
  shift0, flip0 = augmentation.view_params(index, np.zeros(1000, int)).values()
  assert not shift0.any() and not flip0.any()
  shift, flip = augmentation.view_params(index, np.full(1000, 2)).values()
  again = augmentation.view_params(index[::-1], np.full(1000, 2))  # Order and batching do not matter.
  np.testing.assert_array_equal(shift[::-1], again["shift"])
  np.testing.assert_array_equal(flip[::-1], again["flip"])
  assert set(np.unique(shift)) == {-1, 0, 1} and 0.4 < flip.mean() < 0.6
  other_seed = Augmentation(seed=8, max_shift=1, flip=True).view_params(index, np.full(1000, 2))
  assert (other_seed["shift"] != shift).any()
  other_view = augmentation.view_params(index, np.full(1000, 3))
  assert (other_view["shift"] != shift).any()
  no_flip = Augmentation(seed=7, max_shift=1, flip=False).view_params(index, np.full(1000, 2))
  assert not no_flip["flip"].any()


def test_flat_vectors_take_no_augmentation():
  x = np.ones((3, 10), np.float32)
  assert apply_view(x, np.zeros((3, 2), np.int8), np.zeros(3, bool)) is x
  with pytest.raises(ValueError, match="flat input vectors"):
    apply_view(x, np.ones((3, 2), np.int8), np.zeros(3, bool))
