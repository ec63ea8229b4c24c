"""Object-store latency: `fit` and `build_cache` on a store that answers every request 50 ms late, against the same
store without the delay, side by side in one run.

    python bench/object_store_latency.py [--quick | --smoke] [--latency-ms 50]
        [--out bench/results/object_store_latency.json]

The slow store is Zarr's `LatencyStore` (`zarr.testing.store`) around the local store: every get and set of a key
(a chunk, a metadata document) waits `--latency-ms` first, as a request to S3 or GCS does; requests issued together
wait together. stillroom opens it through the one place it opens stores (`shared.storage.zarr_store`), patched
here. Workloads, those of `run_all.py` on 32x32x3 inputs: the build benchmark's (2 `cnn-large` teachers, 2 views of
8,192 examples, batch 256, default chunks; `--quick`: 2,048 examples), and the streaming benchmark's `cnn-large`
student distilling one epoch of `fit` from a cache of 2 views of 2,048 examples (batch 128; `--quick`: 1,024), as
configured by default (checkpoints, workers). Reported: each arm's median and the speed ratio plain / slow, for
`fit` both its wall time and the epoch's own seconds (its metrics line). `--smoke`: a tiny run with `mlp-tiny`
models, to check that the benchmark works; its figures mean nothing.
"""

import argparse
import contextlib
import itertools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import synthetic  # noqa: E402
from bench.harness import machine, measure_pair, write_json  # noqa: E402
from shared import storage  # noqa: E402
from student_train.config import FitConfig  # noqa: E402
from student_train.train import fit  # noqa: E402
from teacher_cache.build import BuildConfig, build_cache  # noqa: E402

SLOW = "slow"  # Stores under a directory of this name are opened through the LatencyStore.


@contextlib.contextmanager
def _slow_stores(latency_s: float):
  """Within it, every store under a `slow/` directory answers `latency_s` late."""
  from zarr.storage import LocalStore  # pylint: disable=import-outside-toplevel
  from zarr.testing.store import LatencyStore  # pylint: disable=import-outside-toplevel
  plain = storage.zarr_store

  def zarr_store(path: str, read_only: bool = False):
    if f"{os.sep}{SLOW}{os.sep}" not in path:
      return plain(path, read_only)
    return LatencyStore(LocalStore(path, read_only=read_only), get_latency=latency_s, set_latency=latency_s)

  storage.zarr_store = zarr_store
  try:
    yield
  finally:
    storage.zarr_store = plain


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="fewer rows and repeats")
  mode.add_argument("--smoke", action="store_true", help="tiny sizes and models: checks that it runs")
  parser.add_argument("--latency-ms", type=float, default=50.0)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "object_store_latency.json"))
  args = parser.parse_args(argv)
  build_examples, fit_examples, repeats = (64, 64, 1) if args.smoke else (2048, 1024, 2) if args.quick else \
      (8192, 2048, 3)
  model = "mlp-tiny" if args.smoke else "cnn-large"
  with _slow_stores(args.latency_ms / 1000), tempfile.TemporaryDirectory() as tmp:
    for kind in ("plain", SLOW):
      os.makedirs(os.path.join(tmp, kind))
    runs = synthetic.teachers(os.path.join(tmp, "teachers"), model, (32, 32, 3), 10, 2)
    counter = itertools.count()
    build = {"teachers": tuple(runs), "views": 2, "batch_size": 256, "progress": False}
    images = synthetic.npz_dataset(os.path.join(tmp, "build.npz"), build_examples, (32, 32, 3), 10)

    def build_into(kind: str):
      return lambda: build_cache(BuildConfig(dataset=images, out=os.path.join(tmp, kind, f"b{next(counter)}.zarr"),
                                             **build))

    plain_build, slow_build = measure_pair(build_into("plain"), build_into(SLOW), repeats=repeats)
    cache = os.path.join(tmp, "plain", "cache.zarr")
    build_cache(BuildConfig(dataset=synthetic.npz_dataset(os.path.join(tmp, "fit.npz"), fit_examples, (32, 32, 3), 10),
                            out=cache, **build))
    os.symlink(cache, os.path.join(tmp, SLOW, "cache.zarr"))  # The same store, opened through the delay.
    epochs = {}

    def fit_from(kind: str):
      def run():
        out = os.path.join(tmp, "runs", f"{kind}{next(counter)}")
        line = fit(FitConfig(model=model, cache=os.path.join(tmp, kind, "cache.zarr"), out=out, epochs=1,
                             batch_size=128, progress=False), log_epochs=False)
        epochs.setdefault(kind, []).append(line["seconds"])
      return run

    plain_fit, slow_fit = measure_pair(fit_from("plain"), fit_from(SLOW), repeats=repeats)
  epoch = {kind: sorted(times)[len(times) // 2] for kind, times in epochs.items()}
  result = {
      "machine": machine(), "latency_ms": args.latency_ms,
      "build": {"rows": build_examples * 2, "plain_s": plain_build["median"], "slow_s": slow_build["median"],
                "speed_ratio": plain_build["median"] / slow_build["median"]},
      "fit": {"rows": fit_examples * 2, "plain_s": plain_fit["median"], "slow_s": slow_fit["median"],
              "speed_ratio": plain_fit["median"] / slow_fit["median"],
              "epoch_plain_s": epoch["plain"], "epoch_slow_s": epoch[SLOW],
              "epoch_speed_ratio": epoch["plain"] / epoch[SLOW]},
  }
  write_json(args.out, result)
  print(f"build: plain {plain_build['median']:.2f} s, {args.latency_ms:.0f} ms latency {slow_build['median']:.2f} s, "
        f"speed ratio {result['build']['speed_ratio']:.3f}")
  print(f"fit (1 epoch, wall): plain {plain_fit['median']:.2f} s, slow {slow_fit['median']:.2f} s, speed ratio "
        f"{result['fit']['speed_ratio']:.3f}; the epoch alone: {epoch['plain']:.2f} s vs {epoch[SLOW]:.2f} s, "
        f"{result['fit']['epoch_speed_ratio']:.3f}")


if __name__ == "__main__":
  main()
