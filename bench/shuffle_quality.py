"""How close streamed batches are to uniform samples, on a dataset sorted by class.

    python bench/shuffle_quality.py [--rows 65536] [--classes 100] [--batch 256]

Writes caches of a class-sorted transfer set with the examples in split order (schema 1's order) and in the
build's seeded permuted order, then streams one epoch through `CacheLoader` at several shuffle windows. Prints the
mean number of distinct classes per batch against the exact expectation for uniform sampling without replacement,
and the loader's rows/s and the window's size in memory.
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
  parser.add_argument("--chunk-rows", type=int, default=4096)
  parser.add_argument("--out", default="bench/results/shuffle_quality.json")
  args = parser.parse_args(argv)
  labels = np.sort(np.random.default_rng(0).integers(0, args.classes, args.rows))
  expected = uniform_distinct(np.bincount(labels, minlength=args.classes), args.batch)
  result = {"rows": args.rows, "classes": args.classes, "batch": args.batch, "chunk_rows": args.chunk_rows,
            "uniform_expectation": expected, "points": []}
  print(f"uniform sampling: {expected:.1f} distinct classes per batch of {args.batch}")
  with tempfile.TemporaryDirectory() as tmp:
    np.savez(os.path.join(tmp, "sorted.npz"), x=np.zeros((args.rows, 4), np.float32), y=labels)
    dataset = f"npz:{os.path.join(tmp, 'sorted.npz')}"
    transfer_set = open_transfer_set(dataset)
    for order in ("sequential", "permuted"):
      path = os.path.join(tmp, f"{order}.zarr")
      direct_cache(path, dataset, members=4, chunk_rows=args.chunk_rows, row_order=order)
      cache = open_cache(path)
      row_bytes = cache.spec.num_classes * 2
      for window in (1, 4, 8, 16):
        loader = CacheLoader(cache, transfer_set, batch_size=args.batch, seed=0, fields=("targets",),
                             window_chunks=window)
        started = time.perf_counter()
        batches = list(loader.epoch(0))
        seconds = time.perf_counter() - started
        distinct = np.mean([len(np.unique(b["labels"][b["mask"] > 0])) for b in batches[:-1]])
        point = {"order": order, "window_chunks": window, "distinct_classes": float(distinct),
                 "fraction_of_uniform": float(distinct / expected), "rows_per_second": args.rows / seconds,
                 "window_mb": window * args.chunk_rows * row_bytes / 1e6}
        result["points"].append(point)
        print(f"{order:>10} order, window {window:>2} chunks ({point['window_mb']:5.1f} MB of targets): "
              f"{distinct:5.1f} distinct classes ({point['fraction_of_uniform']:.2f} of uniform), "
              f"{point['rows_per_second']:,.0f} rows/s")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
