"""Input-pipeline throughput for natural images: rows/s of reading, decoding and rendering crop views.

    python bench/input_pipeline.py [--images 2000] [--dir DIR] [--out bench/results/input_pipeline.json]

Writes the shapes set (`shared.shapes`, JPEGs of 40-160 px) once, then times what a loader does per batch of 256
random examples: `TransferSet.read` (JPEG decode) and `Augmentation.render_views` (random-resized crop, PIL
bilinear resize, flip) at 32 and 64 px, in this one process, as the loaders run it today (one background thread).
The figures are the baseline for worker processes (issue 13): rows/s here is what one worker would give.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import measure, write_json  # noqa: E402
from shared.augment import Augmentation  # noqa: E402
from shared.data import open_transfer_set  # noqa: E402
from shared.shapes import CLASSES, ShapesConfig, write_shapes  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=2000, help="images in the set (a multiple of 10)")
  parser.add_argument("--dir", default=None, help="where the set is (written if absent)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--out", default="bench/results/input_pipeline.json")
  args = parser.parse_args()
  result = {"batch": args.batch}
  with tempfile.TemporaryDirectory() as tmp:
    root = args.dir or os.path.join(tmp, "shapes")
    if not os.path.isdir(os.path.join(root, "train")):
      write_shapes(root, ShapesConfig(train_per_class=args.images // len(CLASSES), test_per_class=0))
    data = open_transfer_set(f"imagefolder:{os.path.join(root, 'train')}")
    rng = np.random.default_rng(0)
    batches = [np.sort(rng.choice(len(data), args.batch, replace=False)) for _ in range(8)]
    decode = measure(lambda: [data.read(b) for b in batches], repeats=3)
    result["decode_rows_per_s"] = len(batches) * args.batch / decode["median"]
    for size in (32, 64):
      views = Augmentation(seed=0, image_size=size, flip=True)
      decoded = [data.read(b) for b in batches]
      render = measure(lambda: [views.render_views(x, data.indices[b], np.ones(len(b), int))
                                for (x, _), b in zip(decoded, batches)], repeats=3)
      both = measure(lambda: [views.render_views(data.read(b)[0], data.indices[b], np.ones(len(b), int))
                              for b in batches], repeats=3)
      result[f"render_{size}px_rows_per_s"] = len(batches) * args.batch / render["median"]
      result[f"read_and_render_{size}px_rows_per_s"] = len(batches) * args.batch / both["median"]
  for key, value in result.items():
    print(f"{key}: {value:,.0f}")
  write_json(args.out, result)


if __name__ == "__main__":
  started = time.perf_counter()
  main()
  print(f"took {time.perf_counter() - started:.0f} s")
