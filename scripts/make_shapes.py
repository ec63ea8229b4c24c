"""Writes the shapes test set (`shared.shapes`): OUT/train/<class>/*.jpg and OUT/test/<class>/*.jpg.

  python scripts/make_shapes.py OUT [--train-per-class 300] [--test-per-class 60]

then use `--dataset imagefolder:OUT/train` and `--eval-dataset imagefolder:OUT/test`.
"""

import argparse
import dataclasses
import sys

from shared.shapes import ShapesConfig, write_shapes


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out", help="a new (or empty) folder")
  defaults = ShapesConfig()
  for field in dataclasses.fields(ShapesConfig):
    parser.add_argument("--" + field.name.replace("_", "-"), type=int, default=getattr(defaults, field.name),
                        help=f"(default: {getattr(defaults, field.name)})")
  args = parser.parse_args(argv)
  config = ShapesConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ShapesConfig)})
  if not (1 <= config.min_side <= config.max_side and config.train_per_class >= 1 and config.test_per_class >= 0):
    sys.exit("make_shapes: need 1 <= --min-side <= --max-side and --train-per-class >= 1")
  try:
    counts = write_shapes(args.out, config, progress=True)
  except FileExistsError as e:
    sys.exit(f"make_shapes: {e}")
  print(f"wrote {counts['train']} train and {counts['test']} test images to {args.out}")


if __name__ == "__main__":
  main()
