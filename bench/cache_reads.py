"""Per-row random reads vs the chunk-wise loader, on one cache (figures printed and written to JSON).

    python bench/cache_reads.py [--rows 65536] [--classes 100] [--members 4]

Builds a synthetic cache of float16 logits with the stillroom layout, then times (a) reading a batch of 256
random rows one `array[i]` at a time, as a naive per-row loader would, and (b) one epoch of `CacheLoader`
(whole chunks, block shuffle, in-memory shuffle, prefetch), both in rows per second.
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import zarr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import measure, write_json  # noqa: E402
from shared.augment import Augmentation  # noqa: E402
from shared.cache import SPEC_KEY, COMPLETE_KEY, CacheSpec, MemberSpec, open_cache  # noqa: E402
from shared.data import Normalization, TransferSet  # noqa: E402
from student_train.loader import CacheLoader  # noqa: E402


def synthetic_cache(path: str, rows: int, classes: int, members: int, chunk_rows: int) -> TransferSet:
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, 255, size=(rows, 8, 8, 1), dtype=np.uint8)
  transfer_set = TransferSet(name="synthetic", split="train", base_split="train", base_count=rows,
                             indices=np.arange(rows), inputs=inputs, labels=rng.integers(0, classes, rows),
                             num_classes=classes, normalization=Normalization(scale=255.0),
                             canonical_split=f"train[0:{rows}]")
  member = MemberSpec(name="m", source="synthetic", model="external", num_params=0, digest="0", checkpoint_step=None,
                      normalization={"shift": 0.0, "scale": 255.0})
  spec = CacheSpec(temperature=4.0, combine="arithmetic", members=(member,) * members,
                   dataset=transfer_set.describe(), num_classes=classes, views=1, augmentation=Augmentation(),
                   dtype="float16", chunk_rows=chunk_rows, software_version="bench")
  group = zarr.open_group(path, mode="w", attributes={SPEC_KEY: spec.to_attrs()})
  values = {"targets": rng.normal(size=(rows, classes)).astype(np.float16),
            "member_logits": rng.normal(size=(rows, members, classes)).astype(np.float16),
            "index": np.arange(rows), "view": np.zeros(rows, np.int32),
            "labels": transfer_set.labels.astype(np.int32), "shift": np.zeros((rows, 2), np.int8),
            "flip": np.zeros(rows, bool), "fold": np.full(rows, -1, np.int32),
            "chunk_committed": np.ones(spec.num_chunks, bool)}
  for name, (shape, dtype, chunks) in spec.array_shapes().items():
    group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=None)[...] = values[name]
  group.attrs[COMPLETE_KEY] = {"rows": rows}
  return transfer_set


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=65536)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--members", type=int, default=4)
  parser.add_argument("--chunk-rows", type=int, default=4096)
  parser.add_argument("--out", default="bench/results/cache_reads.json")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "c.zarr")
    transfer_set = synthetic_cache(path, args.rows, args.classes, args.members, args.chunk_rows)
    cache = open_cache(path)
    rng = np.random.default_rng(1)

    def per_row_batch():
      for i in rng.integers(0, args.rows, 256):
        cache["member_logits"][int(i)]
        cache["labels"][int(i)]

    loader = CacheLoader(cache, transfer_set, batch_size=256, seed=0, fields=("member_logits",))

    def loader_epoch():
      for _ in loader.epoch(0):
        pass

    per_row = measure(per_row_batch, repeats=3)
    chunked = measure(loader_epoch, repeats=3)
  result = {"rows": args.rows, "classes": args.classes, "members": args.members, "chunk_rows": args.chunk_rows,
            "per_row_rows_per_second": 256 / per_row["median"],
            "chunk_loader_rows_per_second": args.rows / chunked["median"]}
  result["speedup"] = result["chunk_loader_rows_per_second"] / result["per_row_rows_per_second"]
  print(f"per-row random reads: {result['per_row_rows_per_second']:,.0f} rows/s")
  print(f"chunk-wise loader:    {result['chunk_loader_rows_per_second']:,.0f} rows/s "
        f"({result['speedup']:.0f}x; includes view rendering and shuffling)")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
