"""Per-row random reads vs the chunk-wise loader, on one cache.

    python bench/cache_reads.py [--rows 65536] [--classes 100] [--members 4]

Times (a) batches of 256 random rows read one `array[i]` at a time, as a naive per-row loader would, and (b) one
epoch of `CacheLoader` (whole chunks, block shuffle, in-memory shuffle, view rendering, prefetch), in rows/s.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import measure, write_json  # noqa: E402
from bench.synthetic import direct_cache, npz_dataset  # noqa: E402
from shared.cache import open_cache  # noqa: E402
from shared.data import open_transfer_set  # noqa: E402
from student_train.loader import CacheLoader  # noqa: E402


def cache_reads(rows: int, classes: int, members: int, chunk_rows: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    dataset = npz_dataset(os.path.join(tmp, "x.npz"), rows, (8, 8, 1), classes)
    direct_cache(os.path.join(tmp, "c.zarr"), dataset, members=members, chunk_rows=chunk_rows)
    cache = open_cache(os.path.join(tmp, "c.zarr"))
    rng = np.random.default_rng(1)

    def per_row_batch():
      for i in rng.integers(0, rows, 256):
        cache["member_logits"][int(i)]
        cache["labels"][int(i)]

    loader = CacheLoader(cache, open_transfer_set(dataset, "train"), batch_size=256, seed=0,
                         fields=("member_logits",))

    def loader_epoch():
      for _ in loader.epoch(0):
        pass

    per_row = measure(per_row_batch, repeats=3)
    chunked = measure(loader_epoch, repeats=3)
  result = {"rows": rows, "classes": classes, "members": members, "chunk_rows": chunk_rows,
            "per_row_rows_per_second": 256 / per_row["median"],
            "chunk_loader_rows_per_second": rows / chunked["median"]}
  result["speedup"] = result["chunk_loader_rows_per_second"] / result["per_row_rows_per_second"]
  return result


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=65536)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--members", type=int, default=4)
  parser.add_argument("--chunk-rows", type=int, default=4096)
  parser.add_argument("--out", default="bench/results/cache_reads.json")
  args = parser.parse_args(argv)
  result = cache_reads(args.rows, args.classes, args.members, args.chunk_rows)
  print(f"per-row random reads: {result['per_row_rows_per_second']:,.0f} rows/s")
  print(f"chunk-wise loader:    {result['chunk_loader_rows_per_second']:,.0f} rows/s "
        f"({result['speedup']:.0f}x; includes view rendering and shuffling)")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
