"""Growing a cache against building it: `extend` by one teacher, and `convert`, against direct builds.

    python bench/grow.py [--rows 2000] [--members 3] [--model cnn-large] [--image-size 32] [--targets topk:5]
                         [--chunk-rows 512] [--batch-size 256] [--repeats 3] [--warmup 1] [--smoke]
                         [--out bench/results/grow.json]

Writes a random npz transfer set of S×S×3 images and M + 1 random-weight `--model` teachers (`bench.synthetic`),
builds once a cache of the first M members and one of the last alone, then times, interleaved (each arm once per
round, a fresh store each time; the median of the repeats after a warm-up), through the public functions:

- build: `build_cache` of all M + 1 members (dense targets);
- extend: `extend_cache` of the M-member cache by the last teacher (`--out` a new store): the new teacher runs over
  every row, the M members' logits are copied, the targets rewritten for M + 1 members;
- rewrite: `merge_caches` of the M-member cache and the one-member cache: the same store as the extend's, written
  without running any teacher (the extend's copying and rewriting alone);
- build one: `build_cache` of the new member alone: its teacher over every row, as the extend runs it (with the
  same fixed costs: loading it, compiling its forward, rendering every row's view);
- build sparse: `build_cache` of all M + 1 members with `--targets`;
- convert: `convert_cache` of the (M + 1)-member dense cache to `--targets` (no teacher runs).

The extend's target is the build's time over M + 1 (the one teacher's share of the forward passes) plus the
rewrite's; the figures printed give both sides, and the extend beside what it is made of (the new member's build
alone, plus the rewrite), whose fixed costs a share of the full build does not hold. On a machine shared with other
jobs the rounds vary: the ratios of each arm's fastest round are printed beside those of the medians. Timings are
wall times on whatever machine runs it: compare the ratios, which come from one run.
"""

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import machine, measure_interleaved, write_json  # noqa: E402
from bench.synthetic import npz_dataset, teachers  # noqa: E402
from teacher_cache.build import BuildConfig, build_cache  # noqa: E402
from teacher_cache.derive import convert_cache, merge_caches  # noqa: E402
from teacher_cache.extend import ExtendConfig, extend_cache  # noqa: E402

CLASSES = 10


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=2000, help="examples of the transfer set (one view each)")
  parser.add_argument("--members", type=int, default=3, help="M, the members of the cache extended by one")
  parser.add_argument("--model", default="cnn-large", help="every teacher's registry model")
  parser.add_argument("--image-size", type=int, default=32, help="S: the images are S×S×3")
  parser.add_argument("--targets", default="topk:5", help="what convert (and the sparse build) store")
  parser.add_argument("--chunk-rows", type=int, default=512)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every arm first")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (64 rows, mlp-tiny at 8 px, 2 members, one "
                                                           "round): only checks that every arm runs")
  parser.add_argument("--out", default="bench/results/grow.json")
  args = parser.parse_args(argv)
  if args.smoke:
    args.rows, args.members, args.model, args.image_size, args.chunk_rows = 64, 2, "mlp-tiny", 8, 32
    args.repeats, args.warmup = 1, 0
  members = args.members
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    dataset = npz_dataset(os.path.join(tmp, "data.npz"), args.rows, (args.image_size, args.image_size, 3), CLASSES)
    runs = teachers(os.path.join(tmp, "teachers"), args.model, (args.image_size, args.image_size, 3), CLASSES,
                    members + 1)
    names = (os.path.join(tmp, f"out{k}.zarr") for k in itertools.count())
    settings = {"dataset": dataset, "eval_split": "none", "chunk_rows": args.chunk_rows,
                "batch_size": args.batch_size, "progress": False}

    def build(out, runs_of, **options) -> str:
      return build_cache(BuildConfig(teachers=tuple(runs_of), out=out, **settings, **options))

    old = build(os.path.join(tmp, "old.zarr"), runs[:members])  # The cache extended, and merge's A...
    new = build(os.path.join(tmp, "new.zarr"), runs[members:])  # ...and its B: the new member alone.
    full = build(os.path.join(tmp, "full.zarr"), runs)  # What convert converts.

    def timed(write):
      """An arm: `write(out)` into a fresh store, removed afterwards."""
      def arm():
        out = next(names)
        write(out)
        shutil.rmtree(out)
      return arm

    own = {"chunk_rows": args.chunk_rows, "batch_size": args.batch_size, "progress": False}
    arms = {
        "build": timed(lambda out: build(out, runs)),
        "extend": timed(lambda out: extend_cache(old, BuildConfig(teachers=(runs[members],), out=out, **own),
                                                 ExtendConfig())),
        "rewrite": timed(lambda out: merge_caches(old, new, BuildConfig(out=out, **own))),
        "build_one": timed(lambda out: build(out, runs[members:])),
        "build_sparse": timed(lambda out: build(out, runs, targets=args.targets)),
        "convert": timed(lambda out: convert_cache(full, BuildConfig(out=out, targets=args.targets, **own))),
    }
    times = dict(zip(arms, measure_interleaved(list(arms.values()), repeats=args.repeats, warmup=args.warmup)))
  seconds = {name: t["median"] for name, t in times.items()}
  target = seconds["build"] / (members + 1) + seconds["rewrite"]
  result = {
      "rows": args.rows, "members": members, "model": args.model, "image_size": args.image_size,
      "targets": args.targets, "chunk_rows": args.chunk_rows, "batch_size": args.batch_size,
      "seconds": seconds, "all_seconds": {name: t["all"] for name, t in times.items()},
      "extend_over_build": seconds["extend"] / seconds["build"],
      "extend_target_s": target, "extend_over_target": seconds["extend"] / target,
      "rewrite_over_build": seconds["rewrite"] / seconds["build"],
      "extend_over_parts": seconds["extend"] / (seconds["build_one"] + seconds["rewrite"]),
      "convert_over_build": seconds["convert"] / seconds["build_sparse"],
      # The fastest round of each arm: the one least slowed by other jobs on a shared machine.
      "fastest": {"extend_over_build": times["extend"]["min"] / times["build"]["min"],
                  "target": 1 / (members + 1) + times["rewrite"]["min"] / times["build"]["min"],
                  "convert_over_build": times["convert"]["min"] / times["build_sparse"]["min"]},
      "load_average_at_start": load_before, "load_average_at_end": os.getloadavg(), "machine": machine()}
  print(f"{args.rows} rows of {args.image_size}x{args.image_size}x3, {args.model} teachers, medians of "
        f"{args.repeats} interleaved rounds:")
  print(f"extend by one teacher ({members} -> {members + 1} members): {seconds['extend']:.2f} s; full build of "
        f"{members + 1} members: {seconds['build']:.2f} s; ratio {result['extend_over_build']:.3f} "
        f"(target <= 1/{members + 1} + rewrite/build = {target / seconds['build']:.3f}: {target:.2f} s)")
  print(f"rewrite only (merge of the {members}-member cache and the new member's, no teacher): "
        f"{seconds['rewrite']:.2f} s, {result['rewrite_over_build']:.3f} of the build")
  print(f"the new member's build alone: {seconds['build_one']:.2f} s; extend / (that + rewrite) = "
        f"{result['extend_over_parts']:.3f}")
  print(f"convert dense -> {args.targets}: {seconds['convert']:.2f} s; build with {args.targets}: "
        f"{seconds['build_sparse']:.2f} s; ratio {result['convert_over_build']:.3f}")
  fastest = result["fastest"]
  print(f"fastest rounds: extend / build {fastest['extend_over_build']:.3f} (target {fastest['target']:.3f}), "
        f"convert / build {fastest['convert_over_build']:.3f}")
  print(f"load average {load_before[0]:.2f} at the start, {result['load_average_at_end'][0]:.2f} at the end")
  write_json(args.out, result)
  return result


if __name__ == "__main__":
  started = time.perf_counter()
  main()
  print(f"took {time.perf_counter() - started:.0f} s")
