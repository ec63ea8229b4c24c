"""How close streamed batches are to uniform samples, on a dataset sorted by class.

    python bench/shuffle_quality.py [--rows 65536] [--classes 100] [--batch 256] [--views 16]

Writes caches of a class-sorted transfer set with the examples in split order (schema 1's order), in the
view-major seeded permuted order (older caches), both of one view, and in the grouped order a build writes
now (one seeded order, an example's `--views` V views in adjacent rows) of `--rows` / V examples: the same rows.
Then streams one epoch of each through `CacheLoader` at several shuffle windows. Prints the mean number of distinct
classes per batch against the exact expectation for uniform sampling of the cache's rows without replacement (with V
views each example's class counts V times), and the loader's rows/s and the window's size in memory.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from scipy.special import gammaln

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import write_json  # noqa: E402
from bench.synthetic import direct_cache  # noqa: E402
from shared.cache import open_cache  # noqa: E402
from shared.data import open_transfer_set  # noqa: E402
from student_train.config import DEFAULT_SHUFFLE_WINDOW  # noqa: E402
from student_train.loader import CacheLoader  # noqa: E402


def uniform_distinct(class_counts: np.ndarray, batch: int) -> float:
  """Expected distinct classes in `batch` rows drawn uniformly without replacement."""
  total = class_counts.sum()
  log_choose = lambda n, k: gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)  # noqa: E731
  return float(np.sum(1 - np.exp(log_choose(total - class_counts, batch) - log_choose(total, batch))))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=65536)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--chunk-rows", type=int, default=4096, help="a multiple of --views")
  parser.add_argument("--views", type=int, default=16, help="views per example of the grouped order's cache")
  parser.add_argument("--out", default="bench/results/shuffle_quality.json")
  args = parser.parse_args(argv)
  result = {"rows": args.rows, "classes": args.classes, "batch": args.batch, "chunk_rows": args.chunk_rows,
            "views": args.views, "default_window": DEFAULT_SHUFFLE_WINDOW, "points": []}
  with tempfile.TemporaryDirectory() as tmp:
    for order, views in (("sequential", 1), ("permuted", 1), ("grouped", args.views)):
      labels = np.sort(np.random.default_rng(0).integers(0, args.classes, args.rows // views))
      expected = uniform_distinct(views * np.bincount(labels, minlength=args.classes), args.batch)
      # One view: the expectation of the split and the permuted orders (the same examples); V views: the grouped's.
      result["uniform_expectation" if views == 1 else "uniform_expectation_grouped"] = expected
      print(f"{order} order, {len(labels)} examples x {views} views: uniform sampling of its rows gives "
            f"{expected:.1f} distinct classes per batch of {args.batch}")
      np.savez(os.path.join(tmp, f"{order}.npz"), x=np.zeros((len(labels), 4), np.float32), y=labels)
      dataset = f"npz:{os.path.join(tmp, f'{order}.npz')}"
      transfer_set = open_transfer_set(dataset)
      path = os.path.join(tmp, f"{order}.zarr")
      direct_cache(path, dataset, members=4, views=views, chunk_rows=args.chunk_rows, row_order=order)
      cache = open_cache(path)
      row_bytes = cache.spec.num_classes * 2
      for window in (1, 4, 8, 16):
        loader = CacheLoader(cache, transfer_set, batch_size=args.batch, seed=0, fields=("targets",),
                             window_chunks=window)
        started = time.perf_counter()
        batches = list(loader.epoch(0))
        seconds = time.perf_counter() - started
        distinct = np.mean([len(np.unique(b["labels"][b["mask"] > 0])) for b in batches[:-1]])
        point = {"order": order, "views": views, "window_chunks": window, "distinct_classes": float(distinct),
                 "fraction_of_uniform": float(distinct / expected), "rows_per_second": cache.spec.num_rows / seconds,
                 "window_mb": window * args.chunk_rows * row_bytes / 1e6}
        result["points"].append(point)
        print(f"{order:>10} order, window {window:>2} chunks ({point['window_mb']:5.1f} MB of targets): "
              f"{distinct:5.1f} distinct classes ({point['fraction_of_uniform']:.2f} of uniform), "
              f"{point['rows_per_second']:,.0f} rows/s")
  grouped = next(p for p in result["points"]
                 if p["order"] == "grouped" and p["window_chunks"] == DEFAULT_SHUFFLE_WINDOW)
  result["grouped_fraction_at_default_window"] = grouped["fraction_of_uniform"]
  print(f"grouped order ({args.views} views) at the default window of {DEFAULT_SHUFFLE_WINDOW} chunks: "
        f"{grouped['fraction_of_uniform']:.3f} of uniform (target >= 0.95)")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
