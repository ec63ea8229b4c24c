"""Natural-image sets at two sizes, run through the CLI: peak memory of `fit` and `build`, and what streaming costs.

    python bench/image_sets.py [--sizes 5000,40000] [--work DIR] [--workers N] [--out bench/results/image_sets.json]

Writes the shapes set (`shared.shapes`: JPEGs of 40-160 px, 10 classes) at each size, then for each size runs the
installed console scripts as a user does (each in a process of its own, with its input workers):
  1. `student-train fit` (mlp-small, 32x32 random-resized crops, one epoch, eval on the test split) and
     `teacher-cache build` (that run as the teacher, 2 views at 32 px): the peak RSS of the main process (ru_maxrss)
     and the peak of the main process and its input workers together (sampled from /proc every 0.1 s). The figure
     of merit is the growth of each from the smallest set to the largest (target: <= 1.2x while the decoded set
     grows 8x).
  2. On the smallest set: a `fit` epoch (no augmentation: every epoch decodes each JPEG and renders its centre crop)
     against the same run on those centre crops pre-rendered into an in-memory npz:, for mlp-small and cnn-small.
     The epoch time is the median of epochs 2.. from metrics.jsonl; the arms alternate, run after run.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import machine, sample_tree_rss, write_json  # noqa: E402
from shared.augment import Augmentation  # noqa: E402
from shared.data import open_transfer_set  # noqa: E402
from shared.shapes import CLASSES, ShapesConfig, write_shapes  # noqa: E402
from student_train.run_dir import read_metrics  # noqa: E402



def _run(command: str, args: list[str]) -> dict:
  """Runs a console script as a user does, from this Python's environment; its peak RSS (ru_maxrss from wait4, which
  for a process and its workers is the main process's) and the sampled peak of it with its workers."""
  script = os.path.join(os.path.dirname(sys.executable), command)
  if not os.path.exists(script):
    raise SystemExit(f"{command} is not installed next to {sys.executable}: `make install` first.")
  started = time.perf_counter()
  process = subprocess.Popen([script, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
  finish = sample_tree_rss(process.pid)
  err = process.stderr.read()
  _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  peaks = finish()
  if process.returncode:
    raise RuntimeError(f"{command} {' '.join(args)} failed ({process.returncode}): {err[-2000:]}")
  return {"seconds": time.perf_counter() - started, "main_mb": usage.ru_maxrss / 1024, **peaks}


def _decoded_gb(root: str) -> float:
  data = open_transfer_set(f"imagefolder:{root}")
  sizes = data.image_sizes(np.arange(len(data)))
  return float((sizes[:, 0] * sizes[:, 1] * 3).sum() / 1e9)


def memory_at(work: str, images: int, workers: int) -> dict:
  root = os.path.join(work, f"shapes{images}")
  if not os.path.isdir(os.path.join(root, "train")):
    write_shapes(root, ShapesConfig(train_per_class=images // len(CLASSES), test_per_class=20), progress=True)
  data = [f"imagefolder:{root}/train"]
  run, cache = os.path.join(work, f"run{images}"), os.path.join(work, f"cache{images}.zarr")
  common = ["--workers", str(workers), "--no-progress", "--overwrite"]
  fit = _run("student-train", ["fit", "--dataset", *data, "--eval-dataset", f"imagefolder:{root}/test",
                               "--image-size", "32", "--augment", "--flip", "--epochs", "1", "--out", run, *common])
  build = _run("teacher-cache", ["build", "--teacher", run, "--dataset", *data, "--eval-dataset",
                                 f"imagefolder:{root}/test", "--image-size", "32", "--views", "2", "--flip",
                                 "--out", cache, *common])
  return {"images": images, "decoded_gb": _decoded_gb(f"{root}/train"), "workers": workers, "fit": fit,
          "build": build}


def _prerendered(root: str, out: str, size: int) -> str:
  """The centre crops (view 0) at size x size of every image, as an npz: the same inputs, in memory."""
  data = open_transfer_set(f"imagefolder:{root}")
  views = Augmentation(image_size=size)
  parts = []
  for start in range(0, len(data), 1024):
    position = np.arange(start, min(start + 1024, len(data)))
    images, labels = data.read(position)
    parts.append((views.render_views(images, data.indices[position], np.zeros(len(position), np.int32))[0], labels))
  np.savez(out, x=np.concatenate([p[0] for p in parts]), y=np.concatenate([p[1] for p in parts]))
  return out


def streamed_vs_prerendered(work: str, images: int, workers: int, models: list[str], epochs: int,
                            repeats: int) -> list[dict]:
  root = os.path.join(work, f"shapes{images}")
  if not os.path.isdir(os.path.join(root, "train")):
    write_shapes(root, ShapesConfig(train_per_class=images // len(CLASSES), test_per_class=20), progress=True)
  npz = _prerendered(f"{root}/train", os.path.join(work, f"prerendered{images}.npz"), 32)
  arms = {"streamed_jpeg": ["--dataset", f"imagefolder:{root}/train", "--image-size", "32"],
          "prerendered_npz": ["--dataset", f"npz:{npz}"]}
  results = []
  for model in models:
    seconds = {arm: [] for arm in arms}
    for repeat in range(repeats):
      for arm, data in arms.items():
        out = os.path.join(work, f"ratio_{model}_{arm}")
        _run("student-train", ["fit", "--model", model, *data, "--eval-split", "none", "--epochs", str(epochs),
                               "--workers", str(workers), "--no-progress", "--overwrite", "--out", out])
        seconds[arm] += [line["seconds"] for line in read_metrics(out)][1:]
    epoch = {arm: statistics.median(values) for arm, values in seconds.items()}
    results.append({"model": model, "images": images, "workers": workers, "epoch_s": epoch,
                    "ratio": epoch["streamed_jpeg"] / epoch["prerendered_npz"]})
  return results


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="5000,40000", help="image counts, comma-separated (multiples of 10)")
  parser.add_argument("--work", default=None, help="where the sets, runs and caches go (default: a temporary dir; "
                                                   "give one to keep the sets between runs)")
  parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
  parser.add_argument("--models", default="mlp-small,cnn-small", help="students of the streamed/pre-rendered ratio")
  parser.add_argument("--epochs", type=int, default=4, help="epochs per ratio run (the first is left out)")
  parser.add_argument("--repeats", type=int, default=2, help="runs per arm of the ratio")
  parser.add_argument("--parts", default="memory,ratio", help="memory (peak RSS at each size) and/or ratio "
                                                               "(streamed / pre-rendered, on the first size)")
  parser.add_argument("--out", default="bench/results/image_sets.json")
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",")]
  result = {"machine": machine(), "memory": []}
  with tempfile.TemporaryDirectory() as tmp:
    work = args.work or tmp
    os.makedirs(work, exist_ok=True)
    for images in sizes if "memory" in args.parts else ():
      point = memory_at(work, images, args.workers)
      result["memory"].append(point)
      print(f"{images} images ({point['decoded_gb']:.2f} GB decoded): " + "; ".join(
          f"{name} peak RSS: main {point[name]['main_mb']:.0f} MB, with its {args.workers} workers "
          f"{point[name]['tree_peak_mb']:.0f} MB (workers {point[name]['workers_peak_mb']:.0f} MB)"
          for name in ("fit", "build")), flush=True)
    if len(result["memory"]) > 1:
      first, last = result["memory"][0], result["memory"][-1]
      result["growth"] = {f"{name}_{what}": last[name][f"{what}_mb"] / first[name][f"{what}_mb"]
                          for name in ("fit", "build") for what in ("main", "tree_peak")}
      print(f"peak RSS growth {sizes[0]} -> {sizes[-1]} images: " + ", ".join(
          f"{name} {value:.3f}x" for name, value in result["growth"].items()), flush=True)
    if "ratio" not in args.parts:
      write_json(args.out, result)
      return
    result["streamed_vs_prerendered"] = streamed_vs_prerendered(work, sizes[0], args.workers,
                                                                args.models.split(","), args.epochs, args.repeats)
    for point in result["streamed_vs_prerendered"]:
      print(f"{point['model']} fit epoch on {point['images']} images, streamed JPEG / pre-rendered npz: "
            f"{point['epoch_s']['streamed_jpeg']:.2f} s / {point['epoch_s']['prerendered_npz']:.2f} s = "
            f"{point['ratio']:.2f}x ({point['workers']} workers)")
  write_json(args.out, result)


if __name__ == "__main__":
  started = time.perf_counter()
  main()
  print(f"took {time.perf_counter() - started:.0f} s")
