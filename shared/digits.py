"""The embedded offline dataset: scikit-learn's bundled 8x8 digits as a TFDS builder.

scikit-learn ships the 1,797 images in its wheel, so this dataset needs no network. The builder writes
`array_record` files, which `tfds` reads back through `as_data_source` without TensorFlow.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 360  # 1,437 train / 360 test, as docs/data.md documents.
SPLIT_SEED = 0


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Returns the fixed, seeded, stratified train/test split of scikit-learn's digits.

  Returns:
    `{"train": (x, y), "test": (x, y)}` with `x` uint8 [N, 8, 8, 1] (pixel values 0..16) and `y` int64 [N].
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  bunch = load_digits()
  images = bunch.images.astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int64)
  positions = np.arange(len(labels))
  train_pos, test_pos = train_test_split(
      positions, test_size=NUM_TEST, random_state=SPLIT_SEED, stratify=labels)
  # Sorted positions keep each split in scikit-learn's original order, so the split is easy to audit.
  train_pos, test_pos = np.sort(train_pos), np.sort(test_pos)
  return {"train": (images[train_pos], labels[train_pos]), "test": (images[test_pos], labels[test_pos])}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (UCI optdigits test set), 10 classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Seeded stratified split: 1,437 train / 360 test."}

  def _info(self) -> tfds.core.DatasetInfo:
    # Written out because a builder defined outside the tfds package cannot read its metadata directory.
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's bundled 8x8 digits; pixel values 0..16.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        # Keep generation order, so an example's index is its position in the seeded split.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    arrays = digits_arrays()
    return {name: self._generate_examples(*arrays[name]) for name in arrays}

  def _generate_examples(self, images, labels):
    for position, (image, label) in enumerate(zip(images, labels)):
      yield position, {"image": image, "label": int(label)}
