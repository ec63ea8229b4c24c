"""Natural-image transfer sets: imagefolder:, lazy TFDS sources of varying size, crop views, fingerprint v2."""

import json
import re
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import conftest
from shared.augment import Augmentation, crop_boxes, render_crops
from shared.cache import open_cache, writable
from shared.data import FINGERPRINT_SAMPLE, TfdsSource, open_transfer_set
from shared.errors import StillroomError
from shared.runs import load_teacher
from shared.shapes import CLASSES, ShapesConfig, write_shapes
from student_train.loader import ArrayLoader, CacheLoader
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.verify import verify_cache


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
  """A small shapes tree: 10 classes x 8 train and 3 test JPEGs of 20-48 px."""
  root = str(tmp_path_factory.mktemp("shapes") / "s")
  write_shapes(root, ShapesConfig(train_per_class=8, test_per_class=3, min_side=20, max_side=48))
  return root


def test_imagefolder_lists_classes_in_sorted_order_and_reads_lazily(shapes):
  data = open_transfer_set(f"imagefolder:{shapes}/train", "train[10:30]")
  assert data.num_classes == len(CLASSES) and data.labeled and data.input_shape == (None, None, 3)
  assert data.normalization.scale == 255.0 and len(data) == 20 and data.indices[0] == 10
  files = sorted(os.path.relpath(os.path.join(d, f), f"{shapes}/train") for d, _, fs in os.walk(f"{shapes}/train")
                 for f in fs)
  np.testing.assert_array_equal(data.labels, [sorted(CLASSES).index(files[i].split("/")[0]) for i in range(10, 30)])
  images, labels = data.read(np.array([0, 5]))
  for image, index in zip(images, (10, 15)):  # Decoded as PIL decodes the file: RGB uint8 of the file's size.
    np.testing.assert_array_equal(image, np.asarray(Image.open(f"{shapes}/train/{files[index]}").convert("RGB")))
  np.testing.assert_array_equal(data.image_sizes(np.array([0, 5])), [im.shape[:2] for im in images])


def test_imagefolder_bad_trees_are_named(tmp_path, shapes):
  with pytest.raises(StillroomError, match="no such directory"):
    open_transfer_set(f"imagefolder:{tmp_path / 'nope'}")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(StillroomError, match="no .jpg/.jpeg/.png files"):
    open_transfer_set(f"imagefolder:{tmp_path / 'empty'}")
  mixed = tmp_path / "mixed"
  shutil.copytree(f"{shapes}/test", mixed)
  shutil.copy(f"{shapes}/test/bar/00000.jpg", mixed / "loose.jpg")
  with pytest.raises(StillroomError, match="both class folders .* and image files"):
    open_transfer_set(f"imagefolder:{mixed}")
  broken = tmp_path / "broken"
  shutil.copytree(f"{shapes}/test", broken)
  with open(broken / "circle" / "00001.jpg", "wb") as f:
    f.write(b"not a jpeg")
  data = open_transfer_set(f"imagefolder:{broken}")  # Listing reads no image...
  with pytest.raises(StillroomError, match=r"cannot decode example index 4 \(.*circle/00001.jpg\)"):
    data.read(np.arange(len(data)))  # ... the read names the example and its file.
  unlabeled = tmp_path / "unlabeled"
  shutil.copytree(f"{shapes}/test/star", unlabeled)
  data = open_transfer_set(f"imagefolder:{unlabeled}")
  assert not data.labeled and data.num_classes is None and (data.labels == -1).all() and len(data) == 3


def _unsampled_and_sampled(data) -> tuple[int, int]:
  sample = set(data.fingerprint_sample().tolist())
  assert len(sample) == FINGERPRINT_SAMPLE
  return (next(i for i in range(len(data)) if i not in sample), next(i for i in range(len(data)) if i in sample))


def _flip_a_byte(path: str) -> None:
  """Changes pixels without changing the file's size: one byte of the entropy-coded data."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x10
    f.seek(0)
    f.write(data)


@pytest.mark.fast
def test_fingerprint_detects_and_misses_what_it_documents(tmp_path):
  root = tmp_path / "big"
  write_shapes(str(root), ShapesConfig(train_per_class=30, test_per_class=0, min_side=8, max_side=12))
  name = f"imagefolder:{root}/train"
  base = open_transfer_set(name)
  assert len(base) == 300 > FINGERPRINT_SAMPLE
  files = [os.path.join(root, "train", path) for path in base.source.files]

  def fingerprint(tree=root / "train") -> str:
    return open_transfer_set(f"imagefolder:{tree}").fingerprint

  original = base.fingerprint
  copy = tmp_path / "copy"
  shutil.copytree(root / "train", copy)  # Another place, new modification times: same data.
  os.utime(copy / "bar" / "00000.jpg", (0, 0))
  assert fingerprint(copy) == original
  unsampled, sampled = _unsampled_and_sampled(base)
  # Missed (documented): a changed pixel in an unsampled image whose file keeps its size.
  _flip_a_byte(str(copy / base.source.files[unsampled]))
  assert fingerprint(copy) == original
  # Detected: the same change in a sampled image.
  _flip_a_byte(str(copy / base.source.files[sampled]))
  assert fingerprint(copy) != original
  shutil.copy(files[sampled], copy / base.source.files[sampled])
  assert fingerprint(copy) == original
  # Detected: added, removed, renamed, reordered and resized files, and a class renamed.
  shutil.copy(files[0], copy / "bar" / "extra.jpg")
  assert fingerprint(copy) != original
  os.remove(copy / "bar" / "extra.jpg")
  assert fingerprint(copy) == original
  os.remove(copy / base.source.files[unsampled])
  assert fingerprint(copy) != original
  shutil.copy(files[unsampled], copy / base.source.files[unsampled])
  os.rename(copy / "star" / "00003.jpg", copy / "star" / "00003b.jpg")
  assert fingerprint(copy) != original
  os.rename(copy / "star" / "00003b.jpg", copy / "star" / "00003.jpg")
  a, b = copy / "ring" / "00001.jpg", copy / "ring" / "00002.jpg"
  assert os.path.getsize(a) != os.path.getsize(b)
  os.rename(a, copy / "swap.tmp"), os.rename(b, a), os.rename(copy / "swap.tmp", b)  # Reordered.
  assert fingerprint(copy) != original
  os.rename(a, copy / "swap.tmp"), os.rename(b, a), os.rename(copy / "swap.tmp", b)
  assert fingerprint(copy) == original
  Image.open(files[unsampled]).resize((13, 9)).save(copy / base.source.files[unsampled])  # Resized.
  assert fingerprint(copy) != original
  shutil.copy(files[unsampled], copy / base.source.files[unsampled])
  os.rename(copy / "trapezoid", copy / "zz_trapezoid")
  assert fingerprint(copy) != original
  # The slice is part of it; the path is not.
  assert open_transfer_set(name, "train[:50%]").fingerprint != original


@pytest.mark.fast
def test_crop_boxes_are_pure_fit_the_image_and_follow_the_ranges():
  augmentation = Augmentation(seed=5, image_size=16, flip=True, crop_area=(0.2, 0.9), crop_aspect=(0.5, 2.0))
  rng = np.random.default_rng(0)
  count = 4000
  index, view = rng.integers(0, 10**6, count), rng.integers(0, 20, count)
  sizes = rng.integers(20, 300, size=(count, 2))
  params = augmentation.view_params(index, view, sizes)
  boxes = params["crop"]
  order = rng.permutation(count)  # Order and batching do not matter: each box is a function of its row alone.
  again = augmentation.view_params(index[order], view[order], sizes[order])
  np.testing.assert_array_equal(again["crop"], boxes[order])
  np.testing.assert_array_equal(again["flip"], params["flip"][order])
  top, left, height, width = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
  assert (top + height <= sizes[:, 0]).all() and (left + width <= sizes[:, 1]).all()
  centre = view == 0  # View 0: the central square, never flipped.
  side = sizes[centre].min(axis=1)
  np.testing.assert_array_equal(height[centre], side)
  np.testing.assert_array_equal(width[centre], side)
  np.testing.assert_array_equal(top[centre], (sizes[centre, 0] - side) // 2)
  np.testing.assert_array_equal(left[centre], (sizes[centre, 1] - side) // 2)
  assert not params["flip"][centre].any() and 0.4 < params["flip"][~centre].mean() < 0.6
  area = height * width / (sizes[:, 0] * sizes[:, 1])
  ratio = width / height
  # Each other box is either torchvision's fallback (computed here independently: the largest central crop at the
  # nearest allowed ratio, the whole image when its ratio is allowed) or a random crop within the ranges, up to
  # the rounding of its sides.
  image_h, image_w = sizes[:, 0], sizes[:, 1]
  image_ratio = image_w / image_h
  fallback_w = np.where(image_ratio > 2.0, np.round(image_h * 2.0), image_w)
  fallback_h = np.where(image_ratio < 0.5, np.round(image_w / 0.5), image_h)
  fallback = np.stack([(image_h - fallback_h) // 2, (image_w - fallback_w) // 2, fallback_h, fallback_w], -1)
  is_fallback = ~centre & (boxes == fallback).all(axis=1)
  random = ~centre & ~is_fallback
  moderate = ~centre & (image_ratio >= 0.5) & (image_ratio <= 2.0)  # Where a random crop nearly always fits.
  assert is_fallback.any() and is_fallback[moderate].mean() < 0.05
  assert (area[random] > 0.2 * 0.85).all() and (area[random] < 0.9 * 1.15).all()
  assert (ratio[random] > 0.5 * 0.85).all() and (ratio[random] < 2.0 * 1.18).all()
  other = Augmentation(seed=6, image_size=16, crop_area=(0.2, 0.9), crop_aspect=(0.5, 2.0))
  assert (other.view_params(index, view, sizes)["crop"][~centre] != boxes[~centre]).any(axis=1).mean() > 0.9
  np.testing.assert_array_equal(crop_boxes(augmentation, index, view, sizes), boxes)


@pytest.mark.fast
def test_render_is_pil_bilinear_of_the_box_then_the_flip():
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((30, 50), (41, 17))]
  boxes, flip = np.array([[3, 5, 20, 30], [0, 0, 41, 17]]), np.array([True, False])
  out = render_crops(images, boxes, flip, 12)
  assert out.shape == (2, 12, 12, 3) and out.dtype == np.uint8
  reference = Image.fromarray(images[0][3:23, 5:35]).resize((12, 12), Image.Resampling.BILINEAR)
  np.testing.assert_array_equal(out[0], np.asarray(reference)[:, ::-1])
  np.testing.assert_array_equal(out[1], np.asarray(Image.fromarray(images[1]).resize((12, 12),
                                                                                     Image.Resampling.BILINEAR)))


def test_crop_cache_replays_the_teachers_view_for_the_student(tmp_path, shapes):
  teachers = [conftest.make_teacher(tmp_path / f"t{k}", model=model, input_shape=(16, 16, 3), seed=k,
                                    normalization={"shift": 0.0, "scale": 255.0})
              for k, model in enumerate(("cnn-small", "mlp-small"))]
  out = str(tmp_path / "c.zarr")
  build_cache(BuildConfig(dataset=f"imagefolder:{shapes}/train", eval_dataset=f"imagefolder:{shapes}/test",
                          teachers=tuple(teachers), image_size=16, views=3, flip=True, chunk_rows=63, out=out,
                          progress=False, dtype="float32"))
  cache = open_cache(out)
  assert cache.spec.augmentation.kind == "crop" and cache.spec.array("crop") is not None
  assert cache.spec.array("shift") is None and cache.spec.eval_dataset.name == f"imagefolder:{shapes}/test"
  assert all(check.ok for check in verify_cache(out)), [c for c in verify_cache(out) if not c.ok]
  data = open_transfer_set(f"imagefolder:{shapes}/train")
  rows = cache.read_chunk(0, ("index", "view", "crop", "flip", "member_logits", "labels"))
  # Crop parameters replay exactly from (seed, index, view, image size).
  positions = data.positions(rows["index"])
  replayed = cache.spec.augmentation.view_params(rows["index"], rows["view"], data.image_sizes(positions))
  np.testing.assert_array_equal(replayed["crop"], rows["crop"])
  np.testing.assert_array_equal(replayed["flip"], rows["flip"])
  np.testing.assert_array_equal(rows["labels"], data.labels[positions])
  # The student's batch holds exactly the teacher's view: the teachers' logits on it are the cached ones.
  loader = CacheLoader(cache, data, batch_size=32, seed=0, fields=("member_logits",))
  batch = next(iter(loader.epoch(0)))
  members = [load_teacher(t) for t in teachers]
  logits = np.stack([np.asarray(m.apply_fn(m.params, batch["x"].astype(np.float32) / 255)) for m in members], 1)
  # Equal up to float32 rounding on CPU; GPUs run float32 convolutions and matmuls in TF32 by default.
  tolerance = 1e-5 if jax.default_backend() == "cpu" else 2e-2
  np.testing.assert_allclose(logits, batch["member_logits"], rtol=tolerance, atol=tolerance)
  assert (batch["x"].shape == (32, 16, 16, 3))


def test_hard_label_training_draws_a_fresh_crop_each_epoch(shapes, tmp_path, capsys):
  data = open_transfer_set(f"imagefolder:{shapes}/train")
  augmentation = Augmentation(seed=1, image_size=12, flip=True)
  loader = ArrayLoader(data, batch_size=16, seed=1, augmentation=augmentation, augment=True)
  epochs = [{int(i): x for b in loader.epoch(e) for i, x, m in zip(b["index"], b["x"], b["mask"]) if m}
            for e in (0, 1)]
  assert sorted(epochs[0]) == list(range(len(data)))
  assert sum((epochs[0][i] != epochs[1][i]).any() for i in range(len(data))) > 0.8 * len(data)
  centre = ArrayLoader(data, batch_size=16, seed=1, augmentation=augmentation)  # No --augment: centre crops.
  first = {int(i): x for b in centre.epoch(0) for i, x, m in zip(b["index"], b["x"], b["mask"]) if m}
  second = {int(i): x for b in centre.epoch(1) for i, x, m in zip(b["index"], b["x"], b["mask"]) if m}
  assert all((first[i] == second[i]).all() for i in first)
  from student_train.cli import main as student_main
  code, out, err = conftest.run_cli(student_main, [
      "fit", "--dataset", f"imagefolder:{shapes}/train", "--eval-dataset", f"imagefolder:{shapes}/test",
      "--image-size", "12", "--augment", "--model", "mlp-tiny", "--epochs", "1", "--out", tmp_path / "r",
      "--no-progress"], capsys)
  assert code == 0, err
  code, out, err = conftest.run_cli(student_main, [
      "fit", "--dataset", f"imagefolder:{shapes}/train", "--model", "mlp-tiny", "--epochs", "1",
      "--out", tmp_path / "r2", "--no-progress"], capsys)
  assert code == 2 and "varying size; give --image-size S" in err and "Traceback" not in err, err


class VaryingImages(tfds.core.GeneratorBasedBuilder):
  """A local array_record builder of images of varying size (zlib-encoded tensors: no TensorFlow needed)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
        "label": tfds.features.ClassLabel(num_classes=3)}), supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(30)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((10 + i, 20 + 2 * i, 3), i, np.uint8), "label": i % 3}


@pytest.mark.fast
def test_tfds_dataset_of_varying_size_loads_lazily(tmp_path, monkeypatch):
  VaryingImages(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  read = []
  original = TfdsSource._records
  monkeypatch.setattr(TfdsSource, "_records", lambda self, keys, source=None: (  # Reads that decode images.
      source is None and read.extend(keys)) or original(self, keys, source))
  data = open_transfer_set("varying_images", "train[5:]", str(tmp_path / "tfds"))
  assert read == [] and len(data) == 25 and data.input_shape == (None, None, 3) and not data.fixed_shape
  images, labels = data.read(np.array([0, 3]))
  assert read == [5, 8]  # Only the records asked for.
  # The records are shuffled.
  reference = tfds.data_source("varying_images", split="train", data_dir=str(tmp_path / "tfds"))
  for image, label, key in zip(images, labels, (5, 8)):
    np.testing.assert_array_equal(image, reference[key]["image"])
    value = int(image[0, 0, 0])  # Example i is (10 + i) x (20 + 2i), filled with i, label i % 3.
    assert image.shape == (10 + value, 20 + 2 * value, 3) and label == value % 3
  assert images[0].shape != images[1].shape
  read.clear()
  assert data.fingerprint and len(read) == 25  # Fewer records than FINGERPRINT_SAMPLE: all of them.
  with pytest.raises(StillroomError, match="varying size; give --image-size S"):
    build_cache(BuildConfig(dataset="varying_images", data_dir=str(tmp_path / "tfds"), teachers=("x",),
                            out=str(tmp_path / "c")))


def test_run_dirs_and_caches_of_stillroom_0_2_are_still_recognised(tmp_path, data_dir, capsys):
  """0.2 recorded version-1 fingerprints (and no crop settings): a rerun confirms such a run and such a cache."""
  import json
  from student_train.cli import main as student_main
  from student_train.train import FitConfig, fit
  run = str(tmp_path / "r")
  fit(FitConfig(dataset="digits", split="train[:200]", data_dir=data_dir, model="mlp-tiny", epochs=1, out=run,
                progress=False), log_epochs=False)
  path = os.path.join(run, "config.json")
  with open(path) as f:
    stored = json.load(f)
  resolved = stored["resolved"]
  train = open_transfer_set("digits", "train[:200]", data_dir)
  test = open_transfer_set("digits", "test", data_dir)
  resolved["dataset"]["fingerprint"] = train.fingerprint_v1()
  del resolved["dataset"]["fingerprint_version"]
  resolved["eval"]["fingerprint"] = test.fingerprint_v1()
  del resolved["eval"]["fingerprint_version"]
  assert "crop_area" not in resolved["config"] and "image_size" not in stored
  del resolved["config"]["image_size"]  # The record as stillroom 0.2 wrote it.
  with open(path, "w") as f:
    json.dump(stored, f)
  code, _, err = conftest.run_cli(student_main, ["fit", "--dataset", "digits", "--split", "train[:200]",
                                                 "--data-dir", data_dir, "--model", "mlp-tiny", "--epochs", "1",
                                                 "--out", run], capsys)
  assert code == 0 and "already finished" in err, err
  resolved["dataset"]["fingerprint"] = "0" * 64  # Other data than the record's: refused, as before.
  with open(path, "w") as f:
    json.dump(stored, f)
  code, _, err = conftest.run_cli(student_main, ["fit", "--dataset", "digits", "--split", "train[:200]",
                                                 "--data-dir", data_dir, "--model", "mlp-tiny", "--epochs", "1",
                                                 "--out", run], capsys)
  assert code == 2 and "holds a run with another config: dataset.fingerprint" in err, err


@pytest.mark.fast
def test_image_modes_decode_as_torchvision_and_deep_images_are_refused(tmp_path):
  root = tmp_path / "modes" / "a"
  os.makedirs(root)
  rgba = np.random.default_rng(0).integers(0, 256, size=(5, 7, 4), dtype=np.uint8)
  Image.fromarray(rgba, "RGBA").save(root / "0_rgba.png")
  Image.fromarray(rgba[..., 0], "L").convert("P").save(root / "1_palette.png")
  Image.fromarray(rgba[..., 0], "L").save(root / "2_grey.png")
  data = open_transfer_set(f"imagefolder:{tmp_path / 'modes'}")
  images, _ = data.read(np.arange(3))
  np.testing.assert_array_equal(images[0], rgba[..., :3])  # Alpha dropped, as PIL's convert("RGB").
  np.testing.assert_array_equal(images[2], np.repeat(rgba[..., :1], 3, axis=2))
  np.testing.assert_array_equal(images[1], np.asarray(Image.open(root / "1_palette.png").convert("RGB")))
  Image.fromarray(rgba[..., 0].astype(np.uint16) * 257).save(root / "3_deep.png")  # Mode I;16.
  data = open_transfer_set(f"imagefolder:{tmp_path / 'modes'}")
  with pytest.raises(StillroomError, match=r"example index 3 \(.*3_deep.png\) is a I;16 image \(16-bit\)"):
    data.read(np.arange(4))


def test_crop_options_are_checked_before_anything_is_written(tmp_path, capsys):
  from student_train.cli import main as student_main
  from teacher_cache.cli import main as cache_main
  x = np.random.default_rng(0).normal(size=(20, 6, 6, 1)).astype(np.float32)
  np.savez(tmp_path / "f.npz", x=x, y=np.arange(20) % 2)
  code, _, err = conftest.run_cli(student_main, ["fit", "--dataset", f"npz:{tmp_path / 'f.npz'}", "--image-size", 4,
                                                 "--out", tmp_path / "r"], capsys)
  assert code == 2 and "--image-size renders uint8 images; " in err and "stores float32" in err, err
  assert not os.path.exists(tmp_path / "r")
  code, _, err = conftest.run_cli(cache_main, ["build", "--dataset", f"npz:{tmp_path / 'f.npz'}", "--image-size", 4,
                                               "--teacher", "x", "--out", tmp_path / "c.zarr"], capsys)
  assert code == 2 and "--image-size renders uint8 images" in err and not os.path.exists(tmp_path / "c.zarr"), err
  code, _, err = conftest.run_cli(student_main, ["fit", "--dataset", f"npz:{tmp_path / 'f.npz'}", "--crop-area",
                                                 "0.5,1", "--out", tmp_path / "r"], capsys)
  assert code == 2 and "--crop-area/--crop-aspect shape crop views, which need --image-size" in err, err


def test_eval_of_a_crop_trained_run_uses_its_centre_crops(tmp_path, shapes, capsys):
  from student_train.cli import main as student_main
  run = tmp_path / "r"
  code, _, err = conftest.run_cli(student_main, [
      "fit", "--dataset", f"imagefolder:{shapes}/train", "--eval-dataset", f"imagefolder:{shapes}/test",
      "--image-size", "12", "--model", "mlp-tiny", "--epochs", "1", "--out", run, "--no-progress"], capsys)
  assert code == 0, err
  final = json.loads((run / "final.json").read_text())
  code, out, err = conftest.run_cli(student_main, ["eval", run, "--dataset", f"imagefolder:{shapes}/test",
                                                   "--split", "train"], capsys)
  assert code == 0 and "accuracy" in out, err
  from student_train.evaluate import EvalConfig, evaluate_runs
  result = evaluate_runs(EvalConfig(runs=(str(run),), dataset=f"imagefolder:{shapes}/test", split="train"))
  # The eval command and the run's own last evaluation saw the same centre crops, so they agree.
  assert result["accuracy"] == pytest.approx(final["eval_accuracy"])
  teacher = load_teacher(str(run))
  test = open_transfer_set(f"imagefolder:{shapes}/test")
  images, labels = test.read_all()
  crops = Augmentation(image_size=12).render_views(images, test.indices, np.zeros(len(test), int))[0]
  logits = np.asarray(teacher.apply_fn(teacher.params, crops.astype(np.float32) / 255))
  assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == labels))


def test_verify_without_the_dataset_leaves_crop_boxes_unchecked(tmp_path, shapes):
  teacher = conftest.make_teacher(tmp_path / "t", input_shape=(8, 8, 3), normalization={"shift": 0.0, "scale": 255.0})
  copy = tmp_path / "train"
  shutil.copytree(f"{shapes}/train", copy)
  out = str(tmp_path / "c.zarr")
  build_cache(BuildConfig(dataset=f"imagefolder:{copy}", teachers=(teacher,), image_size=8, views=2, out=out,
                          progress=False, eval_split="none"))
  checks = {c.name: c for c in verify_cache(out)}
  assert checks["rows' crop boxes replay from the seed and the image sizes"].ok is True
  cache = open_cache(out, mode="r+")
  row = cache["crop"][0]
  writable(cache.group["crop"])[0] = row + np.array([0, 0, 1, 0], np.int32)  # A box one pixel taller.
  checks = {c.name: c for c in verify_cache(out)}
  assert checks["rows' crop boxes replay from the seed and the image sizes"].ok is False
  assert "first bad rows 0" in checks["rows' crop boxes replay from the seed and the image sizes"].detail
  shutil.rmtree(copy)
  checks = {c.name: c for c in verify_cache(out)}
  assert checks["rows' crop boxes replay from the seed and the image sizes"].ok is None
  assert checks["rows' index/view/flip/fold replay from the seed"].ok is True


def test_eval_data_whose_classes_differ_is_refused(tmp_path, shapes, capsys):
  from student_train.cli import main as student_main
  from teacher_cache.cli import main as cache_main
  teacher = conftest.make_teacher(tmp_path / "t", input_shape=(8, 8, 3), normalization={"shift": 0.0, "scale": 255.0})
  extra, missing = tmp_path / "extra", tmp_path / "missing"
  shutil.copytree(f"{shapes}/test", extra)
  shutil.copytree(f"{shapes}/test/bar", extra / "zzz")
  shutil.copytree(f"{shapes}/test", missing)
  shutil.rmtree(missing / "bar")
  for folder, message in ((extra, "has 11 classes, .* 10: class id 10 is 'zzz' there and '\\(none\\)' here"),
                          (missing, "has 9 classes, .* 10: class id 0 is 'circle' there and 'bar' here")):
    code, _, err = conftest.run_cli(cache_main, [
        "build", "--dataset", f"imagefolder:{shapes}/train", "--eval-dataset", f"imagefolder:{folder}",
        "--image-size", 8, "--teacher", teacher, "--out", tmp_path / "c.zarr", "--no-progress"], capsys)
    assert code == 2 and re.search(message, err) and not os.path.exists(tmp_path / "c.zarr"), err
    code, _, err = conftest.run_cli(student_main, [
        "fit", "--dataset", f"imagefolder:{shapes}/train", "--eval-dataset", f"imagefolder:{folder}",
        "--image-size", 8, "--model", "mlp-tiny", "--out", tmp_path / "r"], capsys)
    assert code == 2 and re.search(message, err) and not os.path.exists(tmp_path / "r"), err


def test_a_student_of_an_imagefolder_cache_evaluates_where_the_cache_stores_teacher_logits(tmp_path, shapes):
  from student_train.train import FitConfig, fit
  teacher = conftest.make_teacher(tmp_path / "t", input_shape=(8, 8, 3), normalization={"shift": 0.0, "scale": 255.0})
  out = str(tmp_path / "c.zarr")
  build_cache(BuildConfig(dataset=f"imagefolder:{shapes}/train", eval_dataset=f"imagefolder:{shapes}/test",
                          teachers=(teacher,), image_size=8, views=2, out=out, progress=False))
  final = fit(FitConfig(cache=out, model="mlp-tiny", epochs=1, out=str(tmp_path / "s"), progress=False),
              log_epochs=False)
  assert final["eval_count"] == 30 and "eval_teacher_agreement" in final
  # A crop box that no longer fits its image (the image changed after the build) is named, not rendered.
  cache = open_cache(out, mode="r+")
  writable(cache.group["crop"])[0] = np.array([0, 0, 1000, 5], np.int32)
  conftest.reseal(out)  # Changed before the build completed, as far as the completion record shows.
  index = int(cache["index"][0])
  with pytest.raises(StillroomError, match=f"example index {index} is .* but its cached crop box .* does not fit"):
    list(CacheLoader(open_cache(out), open_transfer_set(f"imagefolder:{shapes}/train"), batch_size=16, seed=0,
                     fields=("targets",)).epoch(0))


def test_deep_png_shift_options_with_crops_and_out_of_memory_are_one_line_errors(tmp_path, shapes, capsys):
  from shared.cli import run_or_exit
  from student_train.cli import main as student_main
  root = tmp_path / "deep" / "a"
  os.makedirs(root)
  rgb = np.random.default_rng(0).integers(0, 65535, size=(4, 5, 3), dtype=np.uint16)
  with open(root / "0.png", "wb") as f:  # A 16-bit RGB PNG, which PIL would open as 8-bit RGB.
    import zlib
    import struct
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind, data):
      return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 4, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
  assert Image.open(root / "0.png").mode == "RGB"
  with pytest.raises(StillroomError, match=r"example index 0 \(.*0.png\) is a 16-bit RGB image"):
    open_transfer_set(f"imagefolder:{tmp_path / 'deep'}").read(np.array([0]))
  code, _, err = conftest.run_cli(student_main, [
      "fit", "--dataset", f"imagefolder:{shapes}/train", "--image-size", 8, "--max-shift", 2, "--augment",
      "--out", tmp_path / "r"], capsys)
  assert code == 2 and "crop views (--image-size) take no shift" in err, err
  code, _, err = conftest.run_cli(student_main, [
      "fit", "--dataset", f"imagefolder:{shapes}/train", "--image-size", 8, "--crop-area", "0.5,1",
      "--out", tmp_path / "r"], capsys)
  assert code == 2 and "give --augment too" in err, err

  def exhausted():
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2 TiB.\nmore")
  with pytest.raises(SystemExit) as e:
    run_or_exit("student-train", exhausted)
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and "out of memory (RESOURCE_EXHAUSTED" in err, err


@pytest.mark.fast
def test_a_large_fixed_shape_tfds_split_stays_lazy_and_eval_splits_default_alike(tmp_path, monkeypatch):
  import shared.data.tfds
  from shared.data import default_eval_split
  from test_data import TinyImages
  TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  monkeypatch.setattr(shared.data.tfds, "SMALL_SPLIT_BYTES", 100)  # 40 examples of 48 bytes: "large" here.
  read = []
  original = TfdsSource._records
  monkeypatch.setattr(TfdsSource, "_records", lambda self, keys, source=None: (  # Reads that decode images.
      source is None and read.extend(keys)) or original(self, keys, source))
  data = open_transfer_set("tiny_images", "train", str(tmp_path))
  inputs, labels = data.read(np.array([3, 1]))
  assert read == [3, 1] and inputs.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(labels, inputs[:, 0, 0, 0] % 5)
  read.clear()
  np.testing.assert_array_equal(data.labels[[3, 1]], labels)  # Labels come without decoding the images.
  assert read == []
  # Build and fit take the same eval split when given only --eval-dataset.
  assert default_eval_split("imagefolder:/x") == default_eval_split("npz:/x.npz") == "train"
  assert default_eval_split("mnist") == default_eval_split(None) == "test"


def test_eval_data_of_another_shape_is_refused_by_build_and_fit(tmp_path, data_dir, teachers, capsys):
  from student_train.cli import main as student_main
  from teacher_cache.cli import main as cache_main
  np.savez(tmp_path / "rgb.npz", x=np.zeros((10, 8, 8, 3), np.uint8), y=np.arange(10))
  for main, args in ((cache_main, ["build", "--teacher", teachers[0], "--out", tmp_path / "c.zarr"]),
                     (student_main, ["fit", "--model", "mlp-tiny", "--out", tmp_path / "r"])):
    code, _, err = conftest.run_cli(main, args + ["--dataset", "digits", "--data-dir", data_dir, "--eval-dataset",
                                                  f"npz:{tmp_path / 'rgb.npz'}"], capsys)
    assert code == 2 and "has inputs of shape (8, 8, 3), the transfer set (8, 8, 1)" in err, err
  assert not os.path.exists(tmp_path / "c.zarr") and not os.path.exists(tmp_path / "r")
