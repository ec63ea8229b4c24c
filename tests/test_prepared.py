"""`teacher-cache prepare` and the `prepared:` dataset: pixels against an independent PIL resize of the decoded
source, the edge-replicated canvas, an interrupted prepare refused then resumed to the uninterrupted store, and a
cache built from prepared images streamed by a student that renders the same pixels (and refused the JPEGs)."""

import json
import os
import pickle

import numpy as np
import pytest
import zarr
from PIL import Image

from conftest import make_teacher, run_cli
from shared.augment import render_crops
from shared.cache import ROWS, open_cache
from shared.data import open_transfer_set
from shared.data import prepared as prepared_lib
from shared.errors import StillroomError
from student_train.cli import main as student_main
from student_train.loader import CacheLoader
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.cli import main as cache_main
from teacher_cache.prepare import PrepareConfig, prepare_images

S = 8


def write_images(root, count: int = 10, seed: int = 0) -> str:
  """`count` JPEGs and PNGs of 20-60 px (smooth, so that JPEG keeps them recognisable) in two class folders."""
  rng = np.random.default_rng(seed)
  for k in range(count):
    folder = os.path.join(root, "ab"[k % 2])
    os.makedirs(folder, exist_ok=True)
    h, w = (int(v) for v in rng.integers(20, 61, 2))
    y, x = np.mgrid[:h, :w]
    image = np.stack([(x * 255 // w), (y * 255 // h), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
    Image.fromarray(image).save(os.path.join(folder, f"{k:02d}.{'png' if k % 3 else 'jpg'}"))
  return str(root)


def _reference(path: str, short_side: int, max_aspect: float) -> np.ndarray:
  """The decoded file resized with PIL (shorter side to `short_side`, the other in proportion, rounded; never
  enlarged) and centre-cropped to `max_aspect`: computed here from the file, not by the code under test."""
  with Image.open(path) as image:
    image = image.convert("RGB")
    w, h = image.size
    side = min(short_side, h, w)
    size = (round(w * side / h), side) if h <= w else (side, round(h * side / w))
    resized = np.asarray(image.resize(size, Image.Resampling.BILINEAR) if size != (w, h) else image)
  cap = int(np.floor(max_aspect * side + 1e-9))
  top, left = (resized.shape[0] - min(cap, resized.shape[0])) // 2, (resized.shape[1] - min(cap, resized.shape[1])) // 2
  return resized[top:top + cap, left:left + cap]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
  return write_images(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="module")
def store(images, tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("prepared") / "p.zarr")
  prepare_images(PrepareConfig(dataset=f"imagefolder:{images}", image_size=S, out=out, chunk_images=4, workers=0,
                               progress=False))
  return out


@pytest.mark.parametrize("in_memory", [True, False])
def test_prepared_pixels_are_the_pil_resize_of_the_decoded_source_on_an_edge_replicated_canvas(images, store,
                                                                                               in_memory, monkeypatch):
  if not in_memory:  # Each batch read from the shards' files.
    monkeypatch.setattr(prepared_lib, "SMALL_STORE_BYTES", 0)
  data = open_transfer_set(f"prepared:{store}")
  assert data.in_memory == in_memory
  source = open_transfer_set(f"imagefolder:{images}")
  spec = data.source.spec
  assert (spec.short_side, spec.canvas, len(data)) == (2 * S, (21, 21, 3), len(source))
  assert data.class_names == source.class_names and np.array_equal(data.labels, source.labels)
  assert spec.source["fingerprint"] == source.fingerprint and data.fingerprint != source.fingerprint
  got, _ = data.read(np.arange(len(data)))
  canvas, sizes = data.source.read_canvas(np.arange(len(data))[::-1])
  cropped = 0
  for k, file in enumerate(source.source.files):
    expected = _reference(os.path.join(images, file), 2 * S, 4 / 3)
    np.testing.assert_array_equal(got[k], expected)
    h, w = sizes[len(data) - 1 - k]
    board = canvas[len(data) - 1 - k]
    np.testing.assert_array_equal(board[:h, :w], expected)
    # Beyond the image, its last row and column repeated (and the corner pixel in the corner).
    np.testing.assert_array_equal(board[h:, :w], np.broadcast_to(expected[-1:], board[h:, :w].shape))
    np.testing.assert_array_equal(board[:, w:], np.broadcast_to(board[:, w - 1:w], board[:, w:].shape))
    with Image.open(os.path.join(images, file)) as image:
      cropped += max(image.size) / min(image.size) > 4 / 3 + 0.05
  assert cropped >= 1  # The aspect cap was exercised.
  np.testing.assert_array_equal(data.image_sizes(np.arange(len(data))), [x.shape[:2] for x in got])
  # As an input worker receives it: the path and small arrays, the shards read there.
  copy = pickle.loads(pickle.dumps(data.source))
  assert copy._memory is None and not copy._indexes  # pylint: disable=protected-access
  np.testing.assert_array_equal(copy.read_canvas(np.arange(len(data))[::-1])[0], canvas)


def test_an_interrupted_prepare_is_refused_then_resumed_to_the_uninterrupted_store(images, store, tmp_path,
                                                                                   monkeypatch, capsys):
  out = str(tmp_path / "p.zarr")
  config = PrepareConfig(dataset=f"imagefolder:{images}", image_size=S, out=out, chunk_images=4, workers=0,
                         progress=False)
  real, calls = prepared_lib.shard_digest, []

  def killed_after_one(arrays):
    calls.append(len(arrays["index"]))
    if len(calls) == 2:
      raise KeyboardInterrupt  # As a kill between a shard's arrays and its digest.
    return real(arrays)

  monkeypatch.setattr(prepared_lib, "shard_digest", killed_after_one)
  with pytest.raises(KeyboardInterrupt):
    prepare_images(config)
  with pytest.raises(StillroomError, match="incomplete.*run the same command again"):
    open_transfer_set(f"prepared:{out}")
  code, printed, _ = run_cli(cache_main, ["info", out], capsys)
  assert code == 0 and "INCOMPLETE: run its prepare again to finish it" in printed
  calls.clear()
  monkeypatch.setattr(prepared_lib, "shard_digest", lambda arrays: calls.append(len(arrays["index"])) or real(arrays))
  done = prepare_images(config)
  assert calls == [4, 2]  # Only the two shards without a digest were written again.
  assert done["fingerprint"] == open_transfer_set(f"prepared:{store}").fingerprint
  for name in prepared_lib.ARRAYS:
    np.testing.assert_array_equal(zarr.open_group(out, mode="r")[name][:], zarr.open_group(store, mode="r")[name][:])


def test_a_cache_built_from_prepared_images_is_streamed_with_the_same_pixels(images, store, tmp_path, capsys):
  teacher = make_teacher(tmp_path / "teacher", model="mlp-tiny", input_shape=(S, S, 3), num_classes=2,
                         normalization={"shift": 0.0, "scale": 255.0})
  cache_path = build_cache(BuildConfig(dataset=f"prepared:{store}", image_size=S, views=2, flip=True, chunk_rows=8,
                                       teachers=(teacher,), out=str(tmp_path / "c.zarr"), eval_split="none",
                                       progress=False))
  code, out, _ = run_cli(cache_main, ["info", cache_path], capsys)
  assert code == 0 and f"views from   prepared images prepared:{store} (prepared from imagefolder:{images}" in out
  code, out, _ = run_cli(cache_main, ["info", store, "--json"], capsys)
  assert code == 0 and json.loads(out)["fingerprint"] == open_transfer_set(f"prepared:{store}").fingerprint
  # The student's loader renders each row from the prepared pixels, read here by a second reader (zarr itself).
  cache, data = open_cache(cache_path), open_transfer_set(f"prepared:{store}")
  group = zarr.open_group(store, mode="r")
  pixels, sizes = group["images"][:], group["sizes"][:]
  rows = [cache.read_chunk(c, ("index", "crop", "flip")) for c in range(cache.spec.chunks_of(ROWS))]
  rows = {name: np.concatenate([r[name] for r in rows]) for name in ("index", "crop", "flip")}
  loader = CacheLoader(cache, data, batch_size=8, seed=0, fields=())
  seen = 0
  for batch in loader.epoch(0):
    real = batch["mask"] > 0  # Rows that pad the last batch are masked out.
    for x, index in zip(batch["x"][real], batch["index"][real]):
      image = pixels[index, :sizes[index, 0], :sizes[index, 1]]
      mine = np.flatnonzero(rows["index"] == index)
      expected = render_crops([image] * len(mine), rows["crop"][mine], rows["flip"][mine], S)
      assert any(np.array_equal(x, e) for e in expected)
      seen += 1
  loader.close()
  assert seen == cache.spec.num_rows
  fit = ["fit", "--cache", cache_path, "--model", "mlp-tiny", "--epochs", "1", "--no-progress", "--workers", "0"]
  assert run_cli(student_main, [*fit, "--out", tmp_path / "s"], capsys)[0] == 0
  code, _, err = run_cli(student_main, [*fit, "--dataset", f"imagefolder:{images}", "--out", tmp_path / "s2"], capsys)
  assert code == 2 and f"rendered from the prepared images 'prepared:{store}'" in err


@pytest.mark.fast
def test_prepared_size_keeps_small_images_and_caps_the_aspect():
  assert prepared_lib.prepared_size(40, 60, 16, 4 / 3) == ((16, 24), (16, 21))
  assert prepared_lib.prepared_size(60, 40, 16, 2.0) == ((24, 16), (24, 16))
  assert prepared_lib.prepared_size(10, 12, 16, 4 / 3) == ((10, 12), (10, 12))  # Never enlarged.
  assert prepared_lib.canvas_of(16, 4 / 3, 3) == (21, 21, 3)


def test_views_of_a_prepared_store_need_image_size_and_warn_above_its_size(store, caplog):
  data = open_transfer_set(f"prepared:{store}")
  with pytest.raises(StillroomError, match=r"prepared for crop views at 8 px; give --image-size"):
    prepared_lib.check_views(data, None)
  caplog.set_level("WARNING", logger="stillroom")
  prepared_lib.check_views(data, S)
  prepared_lib.check_views(data, S // 2)
  assert not caplog.records
  prepared_lib.check_views(data, 2 * S)
  assert [r.getMessage() for r in caplog.records] == [
      f"--image-size 16 on 'prepared:{store}', prepared for 8 px (shorter side 16 px): crops will be upsampled 2x more "
      "than they would be from a store prepared for 16 (`teacher-cache prepare ... --image-size 16`)."]
