"""Opening a large `imagefolder:` transfer set, fingerprint included: the target is < 10 s for 40,000 images.

    python bench/open_imagefolder.py [--images 40000] [--dir DIR] [--no-cold]
        [--out bench/results/open_imagefolder.json]

Writes the shapes set (`shared.shapes`, 40-160 px JPEGs) into DIR once (a temporary folder by default; writing
40,000 images takes about a minute on 2 cores), then times, as `teacher-cache build` and `student-train fit` do
it, `open_transfer_set` (listing: sorted paths and file sizes) and the fingerprint (identity + 256 sampled files),
each the median of 5 fresh opens. For scale, it also times decoding 1,000 of the images, the per-image cost that a
loader pays and that opening no longer does for every image. Those figures have the files in the page cache; as root
it also times one cold open after dropping the page cache (`/proc/sys/vm/drop_caches`). A network file system
lists more slowly than a local disk.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import measure, write_json  # noqa: E402
from shared.data import open_transfer_set  # noqa: E402
from shared.shapes import CLASSES, ShapesConfig, write_shapes  # noqa: E402


def cold_open(name: str) -> float | None:
  """Seconds to open and fingerprint right after dropping the page cache; None when that is not allowed."""
  try:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
      f.write("3\n")
  except OSError:
    return None
  started = time.perf_counter()
  _ = open_transfer_set(name).fingerprint
  return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=40_000, help="images in the set (a multiple of 10)")
  parser.add_argument("--dir", default=None, help="where the set is (written if absent)")
  parser.add_argument("--no-cold", dest="cold", action="store_false",
                      help="skip the cold open (which, as root, drops the whole machine's page cache)")
  parser.add_argument("--out", default="bench/results/open_imagefolder.json")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    root = args.dir or os.path.join(tmp, "shapes")
    if not os.path.isdir(os.path.join(root, "train")):
      started = time.perf_counter()
      write_shapes(root, ShapesConfig(train_per_class=args.images // len(CLASSES), test_per_class=0), progress=True)
      print(f"wrote {args.images} images in {time.perf_counter() - started:.0f} s")
    name = f"imagefolder:{os.path.join(root, 'train')}"
    opened = measure(lambda: open_transfer_set(name), repeats=5)
    full = measure(lambda: open_transfer_set(name).fingerprint, repeats=5)
    cold = cold_open(name) if args.cold else None
    data = open_transfer_set(name)
    decode = measure(lambda: data.read(range(0, len(data), max(1, len(data) // 1000))), repeats=3)
    per_image = decode["median"] / len(range(0, len(data), max(1, len(data) // 1000)))
  result = {"images": len(data), "open_seconds": opened["median"], "open_and_fingerprint_seconds": full["median"],
            "cold_open_and_fingerprint_seconds": cold, "target_seconds": 10.0,
            "meets_target": max(full["median"], cold or 0.0) < 10.0,
            "decode_ms_per_image": 1000 * per_image,
            "decoding_every_image_would_take_seconds": per_image * len(data)}
  for key, value in result.items():
    print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
