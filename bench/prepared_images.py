"""Prepared images (`teacher-cache prepare`, `prepared:`) against JPEGs and against crops pre-rendered in memory.

    python bench/prepared_images.py [--images 4000] [--work DIR] [--out bench/results/prepared_images.json]

Writes the shapes set (`shared.shapes`) as JPEGs of 256-512 px, prepares it for 32 px views (`prepare_images`,
shorter side M*S = 64 px), then, side by side in one run:
  1. A `fit` epoch (the public function) of mlp-small on 32 px views (no augmentation: each epoch renders every
     image's centre crop, as bench/image_sets.py measures its 8.6x) from three datasets: the JPEGs
     (`imagefolder:`), the prepared store (`prepared:`), and those same centre crops rendered from the prepared
     store into an in-memory `npz:`; and the prepared store again with `--renderer device` (the crops rendered in
     the jitted step from the canvases: on a CPU the "device" is the same cores). Each arm runs `--epochs` epochs
     (the first, with compilation, is left out), the arms alternating, `--repeats` times; the figure is the median
     epoch time of each, and the ratios prepared / npz (target <= 1.3), device-rendered / npz and JPEG / npz.
  2. Host rows/s with a null student (no training: only the loader's reading and rendering, `BatchRenderer`): the
     same batches of random-resized crops with flips (view 1) at 32 px, from the JPEGs and from the prepared store
     rendered on the host, and the host's part of the device renderer (reading the prepared canvases and drawing
     the boxes and flips), with no worker and with one; and, single-threaded, where a prepared batch's time goes
     (reading the canvases, and PIL's crop and resize).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import machine, view_batches, write_json  # noqa: E402
from shared.augment import Augmentation, render_crops  # noqa: E402
from shared.data import open_transfer_set  # noqa: E402
from shared.shapes import CLASSES, ShapesConfig, write_shapes  # noqa: E402
from shared.workers import BatchRenderer, resolve_workers  # noqa: E402
from student_train.config import FitConfig  # noqa: E402
from student_train.run_dir import read_metrics  # noqa: E402
from student_train.train import fit  # noqa: E402
from teacher_cache.prepare import PrepareConfig, prepare_images  # noqa: E402

SIZE = 32


def _prerendered(prepared: str, out: str) -> str:
  """The centre crops (view 0) at SIZE of every prepared image, as an npz: the same inputs, in memory."""
  data = open_transfer_set(prepared)
  views = Augmentation(image_size=SIZE)
  images, labels = data.read_all()
  x, _ = views.render_views(images, data.indices, np.zeros(len(data), np.int32))
  np.savez(out, x=x, y=labels)
  return out


def fit_epochs(work: str, datasets: dict, model: str, epochs: int, repeats: int, batch: int) -> dict:
  """Median epoch seconds (epochs 2..) of `fit` on each dataset, the arms alternating run after run."""
  seconds = {arm: [] for arm in datasets}
  workers = {}
  for repeat in range(repeats):
    for arm, (dataset, image_size, renderer) in datasets.items():
      out = os.path.join(work, f"fit_{arm}")
      config = FitConfig(model=model, dataset=dataset, image_size=image_size, eval_split="none", epochs=epochs,
                         batch_size=batch, out=out, overwrite=True, progress=False, renderer=renderer)
      workers[arm] = resolve_workers(config.workers, open_transfer_set(dataset))
      fit(config, log_epochs=False)
      seconds[arm] += [line["seconds"] for line in read_metrics(out)][1:]
  return {"epoch_s": {arm: statistics.median(values) for arm, values in seconds.items()}, "workers": workers,
          "all_epoch_s": seconds}


def _rows_per_s(data, views: Augmentation, plans: list[dict], workers: int) -> float:
  """Rows/s of `BatchRenderer` over `plans` after its first batch (worker start-up left out)."""
  with BatchRenderer(data, views, workers=workers) as render:
    iterator = iter(render(iter(plans)))
    next(iterator)
    started = time.perf_counter()
    count = sum(len(batch["index"]) for batch in iterator)
  return count / (time.perf_counter() - started)


def host_rows(jpeg: str, prepared: str, batch: int, batches: int, repeats: int, workers: list[int]) -> dict:
  """Host rows/s of a null student: the JPEG, prepared (host) and prepared (device renderer: its host part) paths
  on the same batches of view-1 crops."""
  views = Augmentation(image_size=SIZE, flip=True)
  on_device = Augmentation(image_size=SIZE, flip=True, renderer="device")
  sets = {"jpeg": (open_transfer_set(jpeg), views), "prepared": (open_transfer_set(prepared), views),
          "prepared-device": (open_transfer_set(prepared), on_device)}
  plans = view_batches(sets["jpeg"][0], batch, batches)
  result = {}
  for count in workers:
    rates = {arm: [] for arm in sets}
    for _ in range(repeats):
      for arm, (data, augmentation) in sets.items():
        rates[arm].append(_rows_per_s(data, augmentation, plans, count))
    for arm in sets:
      result[f"{arm} workers={count}"] = statistics.median(rates[arm])
    for arm in ("prepared", "prepared-device"):
      result[f"{arm} / jpeg workers={count}"] = result[f"{arm} workers={count}"] / result[f"jpeg workers={count}"]
  # Where a prepared batch's time goes, in this thread: reading its canvases, then PIL's crop, resize and flip.
  data = sets["prepared"][0]
  read_s, render_s = [], []
  for plan in plans:
    started = time.perf_counter()
    images, _ = data.read(plan["position"])
    middle = time.perf_counter()
    params = views.view_params(plan["index"], plan["view"], data.image_sizes(plan["position"]))
    render_crops(images, params["crop"], params["flip"], SIZE)
    render_s.append(time.perf_counter() - middle)
    read_s.append(middle - started)
  result["prepared_split_ms_per_batch"] = {"read": 1e3 * statistics.median(read_s),
                                           "crop_resize_flip": 1e3 * statistics.median(render_s)}
  return result


def run(work: str, images: int, model: str, epochs: int, repeats: int, batch: int, batches: int,
        workers: list[int], prepare_workers: int | None = None, chunk_images: int = 256) -> dict:
  """Both parts (see the module docstring) on a set of `images` JPEGs written (once) under `work`."""
  root = os.path.join(work, f"shapes{images}_256_512")
  if not os.path.isdir(os.path.join(root, "train")):
    write_shapes(root, ShapesConfig(train_per_class=images // len(CLASSES), test_per_class=0, min_side=256,
                                    max_side=512))
  jpeg = f"imagefolder:{root}/train"
  store = os.path.join(work, f"prepared{images}_{SIZE}.zarr")
  started = time.perf_counter()
  prepared = prepare_images(PrepareConfig(dataset=jpeg, image_size=SIZE, out=store, chunk_images=chunk_images,
                                          workers=prepare_workers, progress=False))
  prepare_s = time.perf_counter() - started
  dataset = f"prepared:{store}"
  npz = f"npz:{_prerendered(dataset, os.path.join(work, f'prerendered{images}.npz'))}"
  epochs_s = fit_epochs(work, {"jpeg": (jpeg, SIZE, None), "prepared": (dataset, SIZE, None),
                               "prepared-device": (dataset, SIZE, "device"), "npz": (npz, None, None)}, model,
                        epochs, repeats, batch)
  epoch = epochs_s["epoch_s"]
  return {"images": images, "model": model, "image_size": SIZE, "prepare": {**prepared, "seconds": prepare_s},
          "fit": {**epochs_s, "prepared_over_npz": epoch["prepared"] / epoch["npz"],
                  "prepared_device_over_npz": epoch["prepared-device"] / epoch["npz"],
                  "jpeg_over_npz": epoch["jpeg"] / epoch["npz"]},
          "host_rows_per_s": host_rows(jpeg, dataset, batch, batches, repeats, workers)}


def report(result: dict) -> None:
  fit_ = result["fit"]
  epoch = fit_["epoch_s"]
  print(f"prepared {result['images']} JPEGs of 256-512 px for {result['image_size']} px views in "
        f"{result['prepare']['seconds']:.1f} s (canvas {result['prepare']['canvas']})")
  print(f"{result['model']} fit epoch: JPEG {epoch['jpeg']:.3f} s, prepared {epoch['prepared']:.3f} s, prepared with "
        f"--renderer device {epoch['prepared-device']:.3f} s, pre-rendered npz {epoch['npz']:.3f} s; prepared / npz "
        f"= {fit_['prepared_over_npz']:.2f}x (target <= 1.3), device-rendered / npz = "
        f"{fit_['prepared_device_over_npz']:.2f}x, JPEG / npz = {fit_['jpeg_over_npz']:.2f}x (workers "
        f"{fit_['workers']})")
  for name, value in result["host_rows_per_s"].items():
    if isinstance(value, dict):
      print(f"host, prepared batch split: " + ", ".join(f"{k} {v:.1f} ms" for k, v in value.items()))
    else:
      print(f"host rows/s, null student, {name}: {value:,.0f}" if "/" not in name else f"host {name}: {value:.1f}x")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=4000, help="images in the set (a multiple of 10)")
  parser.add_argument("--work", default=None, help="where the set, store and runs go (default: a temporary dir)")
  parser.add_argument("--model", default="mlp-small")
  parser.add_argument("--epochs", type=int, default=4, help="epochs per fit (the first is left out)")
  parser.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=12, help="batches per host pass")
  parser.add_argument("--workers", default="0,1", help="worker counts of the host part, comma-separated")
  parser.add_argument("--prepare-workers", type=int, default=None, help="workers of `prepare` (default: its own)")
  parser.add_argument("--out", default="bench/results/prepared_images.json")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    work = args.work or tmp
    os.makedirs(work, exist_ok=True)
    result = {"machine": machine(), **run(work, args.images, args.model, args.epochs, args.repeats, args.batch,
                                          args.batches, [int(w) for w in args.workers.split(",")],
                                          args.prepare_workers)}
  report(result)
  write_json(args.out, result)


if __name__ == "__main__":
  started = time.perf_counter()
  main()
  print(f"took {time.perf_counter() - started:.0f} s")
