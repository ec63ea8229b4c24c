"""Input-pipeline throughput for natural images: rows/s of decoding JPEGs and rendering crop views, per worker.

    python bench/input_pipeline.py [--images 2000] [--dir DIR] [--workers 1,2] [--out bench/results/input_pipeline.json]

Writes the shapes set (`shared.shapes`, JPEGs of 40-160 px) once, then renders the same batches of 256 random
examples (random-resized crops with flips, view 1) at 32 and 64 px, as the loaders do:
  * `thread`: `shared.workers.BatchRenderer` with no workers (one background thread of this process);
  * `workers=N`: the same with N spawned worker processes (an element is a batch);
  * `grain workers=N`: grain's `MapDataset.source(batches).map(render_rows).to_iter_dataset().mp_prefetch(N)`,
    when grain is installed (it is not a dependency): the loader grain would give, on the same batches.
Each arm is timed from its first batch to its last (worker start-up excluded), median of repeats; rows/s per worker is
the total divided by the workers. Also the single-thread parts: decoding alone, and rendering decoded images alone.
"""

import argparse
import functools
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import machine, measure, view_batches, write_json  # noqa: E402
from shared.augment import Augmentation  # noqa: E402
from shared.data import open_transfer_set  # noqa: E402
from shared.shapes import CLASSES, ShapesConfig, write_shapes  # noqa: E402
from shared.workers import BatchRenderer, render_rows  # noqa: E402


def _steady_rows_per_s(stream, batch: int) -> float:
  """Rows/s of a stream after its first batch: start-up (spawning workers) is left out, in every arm alike."""
  iterator = iter(stream)
  next(iterator)
  started, count = time.perf_counter(), 0
  for _ in iterator:
    count += 1
  return count * batch / (time.perf_counter() - started)


def _grain_stream(data, views: Augmentation, plans: list[dict], workers: int):
  """The same batches through grain (None if it is not installed): each element is a whole batch."""
  try:
    import grain  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags, which a script that is not an absl app never parses.
  dataset = grain.MapDataset.source(plans).map(functools.partial(render_rows, data, views))
  return dataset.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=2000, help="images in the set (a multiple of 10)")
  parser.add_argument("--dir", default=None, help="where the set is (written if absent)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=48, help="batches per pass")
  parser.add_argument("--workers", default=",".join(str(w) for w in sorted({1, os.cpu_count() or 1})),
                      help="worker counts to time, comma-separated (default: 1 and the core count)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="bench/results/input_pipeline.json")
  args = parser.parse_args(argv)
  workers = [int(w) for w in args.workers.split(",")]
  result = {"machine": machine(), "batch": args.batch, "rows_per_pass": args.batch * args.batches}
  with tempfile.TemporaryDirectory() as tmp:
    root = args.dir or os.path.join(tmp, "shapes")
    if not os.path.isdir(os.path.join(root, "train")):
      write_shapes(root, ShapesConfig(train_per_class=args.images // len(CLASSES), test_per_class=0))
    data = open_transfer_set(f"imagefolder:{os.path.join(root, 'train')}")
    plans = view_batches(data, args.batch, args.batches)
    rows = args.batch * args.batches
    decode = measure(lambda: [data.read(p["position"]) for p in plans], repeats=args.repeats)
    result["decode_only_rows_per_s"] = rows / decode["median"]
    decoded = [data.read(p["position"])[0] for p in plans]
    for size in (32, 64):
      views = Augmentation(seed=0, image_size=size, flip=True)
      render = measure(lambda: [views.render_views(x, p["index"], p["view"]) for x, p in zip(decoded, plans)],
                       repeats=args.repeats)
      arms = {"render_only_thread": {"rows_per_s": rows / render["median"], "workers": 0}}
      for count in [0] + workers:
        with BatchRenderer(data, views, workers=count) as renderer:
          total = float(np.median([_steady_rows_per_s(renderer(iter(plans)), args.batch)
                                   for _ in range(args.repeats)]))
        arms["thread" if count == 0 else f"workers={count}"] = {
            "workers": count, "rows_per_s": total, "rows_per_s_per_worker": total / max(count, 1)}
      for count in workers:
        if _grain_stream(data, views, plans, count) is not None:
          total = float(np.median([_steady_rows_per_s(_grain_stream(data, views, plans, count), args.batch)
                                   for _ in range(args.repeats)]))
          arms[f"grain workers={count}"] = {"workers": count, "rows_per_s": total,
                                           "rows_per_s_per_worker": total / count}
      result[f"{size}px"] = arms
  print(f"decode only (1 thread): {result['decode_only_rows_per_s']:,.0f} rows/s")
  for size in (32, 64):
    for name, arm in result[f"{size}px"].items():
      per = f", {arm['rows_per_s_per_worker']:,.0f} per worker" if arm["workers"] else ""
      print(f"{size}px {name}: {arm['rows_per_s']:,.0f} rows/s{per}")
  write_json(args.out, result)


if __name__ == "__main__":
  started = time.perf_counter()
  main()
  print(f"took {time.perf_counter() - started:.0f} s")
