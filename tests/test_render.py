"""Crop views rendered on the device (`--renderer device`): `render_on_device` against PIL, and the build and the
student's step rendering the same pixels from a cache's boxes and flips."""

import jax
import numpy as np
import pytest
from PIL import Image

import conftest
from shared.augment import Augmentation
from shared.cache import open_cache
from shared.data import open_transfer_set
from shared.render import MAX_LEVELS_FROM_PIL, MEAN_LEVELS_FROM_PIL, inputs_of, render_on_device, with_inputs
from shared.runs import load_teacher
from student_train.loader import ArrayLoader, CacheLoader
from teacher_cache.build import BuildConfig, build_cache

S = 8


def _pil(image: np.ndarray, box, flip: bool, size: int) -> np.ndarray:
  """The independent reference: PIL's bilinear resize (antialiased) of the cropped box, then the flip."""
  top, left, height, width = (int(v) for v in box)
  single = image.ndim == 3 and image.shape[2] == 1
  crop = Image.fromarray(image[..., 0] if single else image).crop((left, top, left + width, top + height))
  out = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
  out = out[:, ::-1] if flip else out
  return out[..., None] if single else out


def _random_boxes(rng, count: int, height: int, width: int) -> np.ndarray:
  """Boxes of every kind: random ones, the whole image, single pixels and thin strips at the far edges, boxes
  smaller than S (upscales) and larger (downscales)."""
  top, left = rng.integers(0, height, count), rng.integers(0, width, count)
  h = np.maximum(1, (rng.random(count) * (height - top + 1)).astype(int)).clip(max=height - top)
  w = np.maximum(1, (rng.random(count) * (width - left + 1)).astype(int)).clip(max=width - left)
  boxes = np.stack([top, left, h, w], -1).astype(np.int32)
  edges = [[0, 0, height, width], [height - 1, width - 1, 1, 1], [0, width - 2, height, 2],
           [height - 3, 0, 3, width], [1, 1, S // 2, S - 3], [0, 0, S, S]]
  boxes[:len(edges)] = edges[:count]
  return boxes


@pytest.mark.fast
@pytest.mark.parametrize("channels", [3, 1, None])
def test_render_on_device_is_pil_within_its_stated_bound(channels):
  rng = np.random.default_rng(0)
  height, width, count = 37, 29, 96
  shape = (count, height, width) + (() if channels is None else (channels,))
  canvas = rng.integers(0, 256, shape, dtype=np.uint8)
  # Smooth images too, where most sums are near a whole grey level rather than spread over it.
  canvas[: count // 2] = np.clip(128 + np.cumsum(rng.integers(-12, 13, shape[1:]), axis=1), 0, 255).astype(np.uint8)
  boxes, flip = _random_boxes(rng, count, height, width), rng.random(count) < 0.5
  assert (boxes[:, 2] < S).any() and (boxes[:, 2] > S).any()  # Upscales and downscales.
  out = np.asarray(render_on_device(canvas, boxes, flip, S))
  assert out.dtype == np.uint8 and out.shape == (count, S, S) + shape[3:]
  expected = np.stack([_pil(c[..., None] if channels is None else c, b, f, S) for c, b, f in zip(canvas, boxes, flip)])
  difference = np.abs(out.reshape(expected.shape).astype(int) - expected)
  assert difference.max() <= MAX_LEVELS_FROM_PIL, difference.max()
  assert difference.mean() <= MEAN_LEVELS_FROM_PIL, difference.mean()


@pytest.mark.fast
def test_the_canvas_beyond_the_box_is_never_read_and_flip_reverses_columns():
  rng = np.random.default_rng(1)
  canvas = rng.integers(0, 256, (4, 20, 24, 3), dtype=np.uint8)
  boxes = np.array([[2, 3, 11, 15], [0, 0, 20, 24], [5, 9, 4, 6], [0, 0, 0, 0]], np.int32)  # The last: padding.
  plain = np.asarray(render_on_device(canvas, boxes, np.zeros(4, bool), S))
  flipped = np.asarray(render_on_device(canvas, boxes, np.ones(4, bool), S))
  np.testing.assert_array_equal(flipped, plain[:, :, ::-1])
  # Other pixels outside each box change nothing (PIL crops before it resizes).
  outside = np.ones((4, 20, 24), bool)
  for k, (top, left, h, w) in enumerate(boxes):
    outside[k, top:top + max(h, 1), left:left + max(w, 1)] = False
  noisy = np.where(outside[..., None], 255 - canvas, canvas)
  np.testing.assert_array_equal(np.asarray(render_on_device(noisy, boxes, np.zeros(4, bool), S)), plain)
  np.testing.assert_array_equal(plain[3], np.broadcast_to(canvas[3, 0, 0], (S, S, 3)))  # A padding row's box.


@pytest.mark.fast
def test_render_on_device_compiles_once_for_a_batch_shape():
  rng = np.random.default_rng(2)
  shape = (5, 16, 16, 3)  # A shape no other test renders.
  before = render_on_device._cache_size()  # pylint: disable=protected-access
  for _ in range(3):
    canvas = rng.integers(0, 256, shape, dtype=np.uint8)
    render_on_device(canvas, _random_boxes(rng, 5, 16, 16), rng.random(5) < 0.5, S)
  assert render_on_device._cache_size() == before + 1  # pylint: disable=protected-access
  # Inside another jitted function (the student's step) it traces with it: once per batch shape.
  traces = []

  @jax.jit
  def step(batch):
    traces.append(1)
    return with_inputs(batch, S)["x"]

  for _ in range(3):
    batch = {"canvas": rng.integers(0, 256, shape, dtype=np.uint8), "crop": _random_boxes(rng, 5, 16, 16),
             "flip": rng.random(5) < 0.5}
    np.testing.assert_array_equal(step(batch), render_on_device(batch["canvas"], batch["crop"], batch["flip"], S))
  assert len(traces) == 1


@pytest.fixture(scope="module")
def device_cache(tmp_path_factory):
  """A cache of crop views rendered on the device from an npz: of uint8 images (their own canvases)."""
  root = tmp_path_factory.mktemp("device")
  rng = np.random.default_rng(3)
  np.savez(root / "images.npz", x=rng.integers(0, 256, (24, 13, 11, 3), dtype=np.uint8), y=rng.integers(0, 10, 24))
  dataset = f"npz:{root / 'images.npz'}"
  teacher = conftest.make_teacher(root / "t", model="mlp-small", input_shape=(S, S, 3),
                                  normalization={"shift": 0.0, "scale": 255.0})
  out = str(root / "c.zarr")
  build_cache(BuildConfig(dataset=dataset, teachers=(teacher,), image_size=S, views=3, flip=True, renderer="device",
                          chunk_rows=30, batch_size=16, out=out, progress=False, dtype="float32", eval_split="none"))
  return dataset, teacher, out


def test_a_device_build_records_its_renderer_and_stores_the_teachers_outputs_on_device_views(device_cache, capsys):
  from teacher_cache.cli import main as cache_main  # pylint: disable=import-outside-toplevel
  dataset, teacher, out = device_cache
  cache = open_cache(out)
  assert cache.spec.augmentation.renderer == "device" and cache.spec.augmentation.to_dict()["renderer"] == "device"
  code, printed, err = conftest.run_cli(cache_main, ["info", out], capsys)
  assert code == 0 and "crop views at 8x8" in printed and "rendered on the device" in printed, err
  assert "renderer" not in Augmentation(image_size=S).to_dict()  # Host views record none, as older caches.
  data = open_transfer_set(dataset)
  rows = cache.read_chunk(0, ("index", "view", "crop", "flip", "member_logits"))
  images = data.read(data.positions(rows["index"]))[0]
  views = np.asarray(render_on_device(images, rows["crop"], rows["flip"], S))  # Recomputed independently.
  member = load_teacher(teacher)
  logits = np.asarray(member.apply_fn(member.params, views.astype(np.float32) / 255))
  np.testing.assert_allclose(rows["member_logits"][:, 0], logits, rtol=1e-5, atol=1e-5)
  # Within the stated bound of the host renderer's views of the same boxes.
  host = Augmentation(image_size=S).render(images, {"crop": rows["crop"], "flip": rows["flip"]})
  assert np.abs(host.astype(int) - views).max() <= MAX_LEVELS_FROM_PIL


def test_a_student_of_a_device_cache_renders_its_teachers_pixels_in_the_step(device_cache):
  dataset, teacher, out = device_cache
  cache, data = open_cache(out), open_transfer_set(dataset)
  loader = CacheLoader(cache, data, batch_size=16, seed=0, fields=("member_logits",))
  batch = next(iter(loader.epoch(0)))
  loader.close()
  assert "x" not in batch and batch["canvas"].dtype == np.uint8  # The host moved canvases, boxes and flips.
  seen = jax.jit(lambda b: with_inputs(b, S)["x"])({k: v for k, v in batch.items() if k != "index"})
  np.testing.assert_array_equal(seen, render_on_device(batch["canvas"], batch["crop"], batch["flip"], S))
  member = load_teacher(teacher)
  logits = np.asarray(member.apply_fn(member.params, np.asarray(seen).astype(np.float32) / 255))
  real = batch["mask"] > 0
  np.testing.assert_allclose(logits[real], batch["member_logits"][real, 0], rtol=1e-5, atol=1e-5)
  # Hard-label training draws the same views on the device as on the host, within the bound.
  device = ArrayLoader(data, batch_size=8, seed=1, augmentation=Augmentation(seed=1, image_size=S, flip=True,
                                                                             renderer="device"), augment=True)
  host = ArrayLoader(data, batch_size=8, seed=1, augmentation=Augmentation(seed=1, image_size=S, flip=True),
                     augment=True)
  for ours, theirs in zip(device.epoch(0), host.epoch(0)):
    np.testing.assert_array_equal(ours["index"], theirs["index"])
    assert np.abs(np.asarray(inputs_of(ours, S)).astype(int) - theirs["x"]).max() <= MAX_LEVELS_FROM_PIL
  device.close()
  host.close()


def test_fit_on_a_device_cache_trains_on_the_device_views(device_cache, tmp_path, capsys):
  """`fit --cache` of a device cache trains, and several steps per call (the views rendered inside the scanned step)
  train the run one step per call trains, within float rounding."""
  from student_train.cli import main as student_main  # pylint: disable=import-outside-toplevel
  from shared.runs import load_run_teacher  # pylint: disable=import-outside-toplevel
  for steps in (1, 2):
    code, _, err = conftest.run_cli(student_main, [
        "fit", "--cache", device_cache[2], "--model", "mlp-tiny", "--epochs", "1", "--batch-size", "16",
        "--steps-per-call", str(steps), "--no-progress", "--out", tmp_path / f"r{steps}"], capsys)
    assert code == 0, err
  one, two = (load_run_teacher(str(tmp_path / f"r{steps}")).params for steps in (1, 2))
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
