"""Build wall time of mixed views (`--mix mixup:1`, `cutmix:1`) against unmixed ones, from JPEGs and from prepared
images: what the partner's extra read costs.

    python bench/mixed_views.py [--images 200] [--views 8] [--image-size 32] [--model mlp-small] [--workers 0]
                                [--repeats 3] [--warmup 1] [--out bench/results/mixed_views.json]

Writes the shapes set (`shared.shapes`) as JPEGs of 256-512 px (random sides) once with a random-weight `--model`
teacher for S×S×3 inputs (`bench.synthetic.jpeg_build_set`), prepares them at `--image-size` S (`teacher-cache
prepare`), then times `build_cache` (the public build: a fresh store each time, no eval split, random-resized crop views with
flips at S, `--views V`) with `--mix none`, `mixup:1` and `cutmix:1` on both sources, the six arms interleaved
(`measure_interleaved`: after a warm-up of each, the median of the repeats). An unmixed build decodes each image once
(its V views are adjacent rows); a mixed view also reads its partner, an example drawn from the whole set, so a batch
reads up to one more image per mixed row (distinct partners of a batch are read once). From JPEGs that is a decode
each; prepared images store the pixels, so a read is a copy.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import measure_interleaved, write_json  # noqa: E402
from bench.synthetic import add_jpeg_build_options, jpeg_build_set  # noqa: E402
from shared.shapes import CLASSES  # noqa: E402
from teacher_cache.build import BuildConfig, build_cache  # noqa: E402
from teacher_cache.prepare import PrepareConfig, prepare_images  # noqa: E402

MIXES = ("none", "mixup:1", "cutmix:1")


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_jpeg_build_options(parser, images=200, views=8, out="bench/results/mixed_views.json")
  args = parser.parse_args(argv)
  size = args.image_size
  with tempfile.TemporaryDirectory() as tmp:
    jpegs, run, result = jpeg_build_set(tmp, args)
    prepared = os.path.join(tmp, "prepared.zarr")
    prepare_images(PrepareConfig(dataset=jpegs, image_size=size, out=prepared, workers=args.workers, progress=False))
    sources = {"jpeg": jpegs, "prepared": f"prepared:{prepared}"}
    builds = iter(range(10 ** 6))

    def build(dataset: str, mix: str):
      out = os.path.join(tmp, f"c{next(builds)}.zarr")
      build_cache(BuildConfig(dataset=dataset, split="train", teachers=(run,), views=args.views, image_size=size,
                              flip=True, mix=mix, eval_split="none", batch_size=args.batch_size,
                              workers=args.workers, out=out, progress=False))
      shutil.rmtree(out)

    arms = [(source, mix) for source in sources for mix in MIXES]
    timed = measure_interleaved([lambda s=source, m=mix: build(sources[s], m) for source, mix in arms],
                                repeats=args.repeats, warmup=args.warmup)
  rows = args.images // len(CLASSES) * len(CLASSES) * args.views
  result["rows"] = rows
  for (source, mix), seconds in zip(arms, timed):
    result.setdefault(source, {})[mix] = {"build_s": seconds["median"], "all_s": seconds["all"],
                                          "rows_per_s": rows / seconds["median"]}
  print(f"{rows:,} rows ({rows // args.views} images of {args.min_side}-{args.max_side} px x {args.views} views), "
        f"crops at {size} px, {args.model} teacher, --workers {args.workers}; build seconds, median of "
        f"{args.repeats}:")
  for source in sources:
    base = result[source]["none"]["build_s"]
    for mix in MIXES:
      result[source][mix]["over_none"] = result[source][mix]["build_s"] / base
    print(f"{source}: " + ", ".join(f"{mix} {result[source][mix]['build_s']:.2f} s "
                                    f"({result[source][mix]['over_none']:.2f}x)" for mix in MIXES))
  write_json(args.out, result)
  return result


if __name__ == "__main__":
  started = time.perf_counter()
  main()
  print(f"took {time.perf_counter() - started:.0f} s")
