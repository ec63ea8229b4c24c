"""Pieces both command lines share: the `models` subcommand and turning errors into exit codes."""

import argparse
import sys
from collections.abc import Callable

from shared.errors import StillroomError
from shared.models import describe_models


def add_models_command(commands) -> None:
  models = commands.add_parser("models", help="list the model registry with parameter counts")
  models.add_argument("--input-shape", default="8,8,1", help="input shape for the counts (default: %(default)s)")
  models.add_argument("--num-classes", type=int, default=10, help="classes for the counts (default: %(default)s)")


def print_models(args: argparse.Namespace) -> None:
  shape = tuple(int(d) for d in args.input_shape.split(","))
  for row in describe_models(shape, args.num_classes):
    params = "n/a for this shape" if row["params"] is None else f"{row['params']:,} params"
    print(f"{row['name']:<10} {params:<20} {row['about']}")


def run_or_exit(prog: str, command: Callable[[], None]) -> None:
  """Runs a command; a `StillroomError` becomes one line on stderr and exit status 2."""
  try:
    command()
  except StillroomError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(2)
