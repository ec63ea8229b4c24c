"""Transfer sets: digits, npz, TFDS (mock data and a local array_record builder), slicing, fingerprints."""

import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from shared.data import open_transfer_set
from shared.digits import digits_arrays
from shared.errors import StillroomError

pytestmark = pytest.mark.fast  # Pure unit tests: `make test-fast` runs them (see pyproject.toml).


def test_digits_fixed_stratified_splits(data_dir):
  train = open_transfer_set("digits", "train", data_dir)
  test = open_transfer_set("digits", "test", data_dir)
  assert (len(train), len(test)) == (1437, 360)
  assert train.input_shape == (8, 8, 1) and train.read_all()[0].dtype == np.uint8 and train.num_classes == 10
  assert train.read_all()[0].max() == 16 and train.normalization.scale == 16.0
  # Stratified: every class holds 35 or 36 of the 360 test examples.
  assert set(np.bincount(test.labels)) <= {35, 36, 37}
  # The TFDS build holds exactly the seeded scikit-learn split (an independent path to the same arrays).
  x, y = digits_arrays()["test"]
  np.testing.assert_array_equal(test.read_all()[0], x)
  np.testing.assert_array_equal(test.labels, y)
  from sklearn.datasets import load_digits
  all_images = load_digits().images.astype(np.uint8)
  # Train and test together are the whole dataset, each image once.
  together = np.concatenate([train.read_all()[0][..., 0], test.read_all()[0][..., 0]]).reshape(1797, -1)
  assert len(np.unique(together, axis=0)) == len(np.unique(all_images.reshape(1797, -1), axis=0))


def test_slices_keep_positions_of_the_unsliced_split(data_dir):
  full = open_transfer_set("digits", "train", data_dir)
  head = open_transfer_set("digits", "train[:80%]", data_dir)
  tail = open_transfer_set("digits", "train[80%:]", data_dir)
  assert len(head) + len(tail) == len(full)
  np.testing.assert_array_equal(tail.indices, np.arange(len(head), len(full)))
  np.testing.assert_array_equal(tail.read_all()[0], full.read_all()[0][len(head):])
  some = open_transfer_set("digits", "train[10:20]+train[100:105]", data_dir)
  np.testing.assert_array_equal(some.indices, np.r_[10:20, 100:105])
  np.testing.assert_array_equal(some.read_all()[0][some.positions(np.array([102]))], full.read_all()[0][[102]])
  with pytest.raises(StillroomError, match="example index 50 is not part"):
    some.positions(np.array([50]))
  assert head.fingerprint != full.fingerprint != tail.fingerprint


@pytest.mark.parametrize("split, message", [
    ("validation", "no split 'validation'; valid splits"),
    ("train+test", "mixes splits"),
    ("train[:10]+train[5:20]", "names some examples twice"),
    ("train[5:5]", "empty"),
])
def test_bad_splits_are_named(data_dir, split, message):
  with pytest.raises(StillroomError, match=message):
    open_transfer_set("digits", split, data_dir)


def test_unknown_and_unprepared_datasets_say_what_to_do(tmp_path):
  with pytest.raises(StillroomError, match="unknown dataset 'no_such_dataset'.*digits.*npz:PATH"):
    open_transfer_set("no_such_dataset", "train", str(tmp_path))
  with pytest.raises(StillroomError, match="(?s)not prepared.*array_record.*download_and_prepare.*--data-dir"):
    open_transfer_set("mnist", "train", str(tmp_path))


def test_npz_labelled_unlabelled_and_fingerprint_ignores_path(tmp_path):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(50, 7)).astype(np.float32), rng.integers(0, 3, 50)
  np.savez(tmp_path / "a.npz", x=x, y=y)
  labelled = open_transfer_set(f"npz:{tmp_path / 'a.npz'}", "train[20%:]")
  assert labelled.labeled and labelled.num_classes == 3 and labelled.indices[0] == 10
  np.testing.assert_array_equal(labelled.read_all()[0], x[10:])
  assert labelled.normalization.scale == 1.0  # Float features are used as stored.
  os.makedirs(tmp_path / "elsewhere")
  shutil.copy(tmp_path / "a.npz", tmp_path / "elsewhere" / "b.npz")
  moved = open_transfer_set(f"npz:{tmp_path / 'elsewhere' / 'b.npz'}", "train[20%:]")
  assert moved.fingerprint == labelled.fingerprint
  x[30, 2] += 1.0  # One changed input value changes the fingerprint.
  np.savez(tmp_path / "c.npz", x=x, y=y)
  assert open_transfer_set(f"npz:{tmp_path / 'c.npz'}", "train[20%:]").fingerprint != labelled.fingerprint
  np.savez(tmp_path / "u.npz", x=x)
  unlabelled = open_transfer_set(f"npz:{tmp_path / 'u.npz'}", "train")
  assert not unlabelled.labeled and unlabelled.num_classes is None and (unlabelled.labels == -1).all()


@pytest.mark.parametrize("arrays, message", [
    ({"z": np.zeros((3, 2))}, "no 'x' array"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(2, int)}, "'y' must be integer class ids of shape"),
    ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 1])}, "negative label at example 1"),
])
def test_bad_npz_files_are_explained(tmp_path, arrays, message):
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(StillroomError, match=message):
    open_transfer_set(f"npz:{tmp_path / 'bad.npz'}")


def test_tfds_dataset_through_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=30):
    mnist = open_transfer_set("mnist", "train[10:]", str(tmp_path))
  assert len(mnist) == 20 and mnist.input_shape == (28, 28, 1) and mnist.num_classes == 10
  assert mnist.read_all()[0].dtype == np.uint8 and mnist.normalization.scale == 255.0
  np.testing.assert_array_equal(mnist.indices, np.arange(10, 30))


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A local array_record builder, as a user would prepare their own dataset offline."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=5)}), supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(40)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((4, 4, 3), i, np.uint8), "label": i % 5}


def test_local_array_record_builder_by_name(tmp_path):
  TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  tiny = open_transfer_set("tiny_images", "train[:25%]", str(tmp_path))
  assert len(tiny) == 10 and tiny.num_classes == 5
  # Positions are those of the prepared split (tfds shuffles records when it writes them).
  source = tfds.data_source("tiny_images", split="train", data_dir=str(tmp_path))
  np.testing.assert_array_equal(tiny.read_all()[0], np.stack([source[i]["image"] for i in range(10)]))
  np.testing.assert_array_equal(tiny.labels, [source[i]["label"] for i in range(10)])
  np.testing.assert_array_equal(tiny.labels, tiny.read_all()[0][:, 0, 0, 0] % 5)
