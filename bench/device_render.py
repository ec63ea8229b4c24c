"""Crop views rendered on the host against on the device: rows/s of the input pipeline with a null student.

    python bench/device_render.py [--images 2048] [--side 96] [--size 32] [--workers 0] [--out FILE]

One fixed canvas for both arms: an `npz:` set of uint8 images of one shape (`--side` px, RGB), held in memory, which
are their own canvases (`Source.read_canvas`; prepared images offer the same). The same batches of `--batch` random
examples (random-resized crops with flips, view 1, at `--size` px) go through `shared.workers.BatchRenderer` and onto
the devices as the trainer places them (`shared.parallel.on_devices`), and nothing trains on them (a null student):
  * `host`: `--renderer host`: PIL renders each view in the input workers; uint8 views move to the device;
  * `device_host_side`: `--renderer device`, the host's part alone: the workers read canvases and draw boxes and
    flips, which move to the device (what the host must keep up with beside a step that renders them);
  * `device`: the same, then `shared.render.render_on_device` renders them (jitted, compiled before the timing),
    waited for: the whole pipeline, renderer included.
Each arm is timed from its first batch to its last (start-up and compilation excluded); the arms are interleaved,
median of repeats. On a CPU the "device" is the same cores as the host: `device` then measures the renderer's cost on
them, not an accelerator's; `device_host_side` is the figure that carries over.
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import machine, view_batches, write_json  # noqa: E402
from shared.augment import Augmentation  # noqa: E402
from shared.data import open_transfer_set  # noqa: E402
from shared.parallel import batch_sharding, data_mesh, on_devices  # noqa: E402
from shared.render import inputs_of  # noqa: E402
from shared.workers import BatchRenderer  # noqa: E402

ARMS = ("host", "device_host_side", "device")


def _images(count: int, side: int, seed: int = 0) -> np.ndarray:
  """uint8 [count, side, side, 3] smooth random images (a natural image's cost to PIL, not noise's)."""
  rng = np.random.default_rng(seed)
  steps = rng.integers(-6, 7, (count, side, side, 3)).cumsum(axis=1).cumsum(axis=2) // side
  return np.clip(128 + steps, 0, 255).astype(np.uint8)


def _rows_per_s(renderer, plans: list[dict], batch: int, size: int | None, sharding) -> float:
  """Rows/s of the batches placed on the devices (and with `size`, rendered there), after the first batch."""
  placed = (p for _, p in on_devices(renderer(iter(plans)), sharding))
  last = jax.block_until_ready(inputs_of(next(placed), size) if size else next(placed))
  started, count = time.perf_counter(), 0
  for item in placed:
    last = inputs_of(item, size) if size else item
    count += 1
  jax.block_until_ready(last)
  return count * batch / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=2048, help="images in the set")
  parser.add_argument("--side", type=int, default=96, help="the images' (and canvases') side in pixels")
  parser.add_argument("--size", type=int, default=32, help="the views' side S")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=32, help="batches per pass")
  parser.add_argument("--workers", default="0", help="input worker counts to time, comma-separated (0: a thread)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="bench/results/device_render.json")
  args = parser.parse_args(argv)
  result = {"machine": machine(), "images": args.images, "side": args.side, "size": args.size, "batch": args.batch,
            "rows_per_pass": args.batch * args.batches, "canvas": "npz: uint8 images of one shape in memory",
            "load_average_at_start": list(os.getloadavg())}  # The machine may be shared: say how busy it was.
  sharding = batch_sharding(data_mesh())
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "images.npz")
    np.savez(path, x=_images(args.images, args.side), y=np.arange(args.images) % 10)
    data = open_transfer_set(f"npz:{path}")
    plans = view_batches(data, args.batch, args.batches)
    views = {renderer: Augmentation(seed=0, image_size=args.size, flip=True, renderer=renderer)
             for renderer in ("host", "device")}
    for workers in (int(w) for w in args.workers.split(",")):
      with BatchRenderer(data, views["host"], workers=workers) as host, \
          BatchRenderer(data, views["device"], workers=workers) as device:
        arms = {"host": lambda: _rows_per_s(host, plans, args.batch, None, sharding),
                "device_host_side": lambda: _rows_per_s(device, plans, args.batch, None, sharding),
                "device": lambda: _rows_per_s(device, plans, args.batch, args.size, sharding)}
        for arm in arms.values():  # Warm-up: workers started, the renderer compiled.
          arm()
        times = {name: [] for name in ARMS}
        for _ in range(args.repeats):  # Interleaved, so that drift in the machine's load hits every arm alike.
          for name in ARMS:
            times[name].append(arms[name]())
      figures = {name: float(np.median(values)) for name, values in times.items()}
      result[f"workers={workers}"] = {
          **{f"{name}_rows_per_s": value for name, value in figures.items()},
          "device_host_side_over_host": figures["device_host_side"] / figures["host"],
          "device_over_host": figures["device"] / figures["host"]}
  for key, arm in result.items():
    if key.startswith("workers="):
      print(f"{key}: host {arm['host_rows_per_s']:,.0f} rows/s, device (host side) "
            f"{arm['device_host_side_rows_per_s']:,.0f} rows/s ({arm['device_host_side_over_host']:.2f}x), device "
            f"(rendered) {arm['device_rows_per_s']:,.0f} rows/s ({arm['device_over_host']:.2f}x)")
  write_json(args.out, result)


if __name__ == "__main__":
  started = time.perf_counter()
  main()
  print(f"took {time.perf_counter() - started:.0f} s")
