"""Pieces both command lines share: the `models` subcommand and turning errors into exit codes."""

import argparse
import errno
import json
import os
import signal
import sys
from collections.abc import Callable

from shared import errors, log
from shared.errors import StillroomError, note_interrupt
from shared.models import DIGITS, describe_models


def add_models_command(commands) -> None:
  models = commands.add_parser("models", allow_abbrev=False, help="list the model registry with parameter counts")
  models.add_argument("--input-shape",
                      help=f"input shape for the counts (default: {','.join(map(str, DIGITS))}, the digits)")
  models.add_argument("--image-size", type=int, metavar="S",
                      help="square images of S px with 3 channels for the counts: --input-shape S,S,3")
  models.add_argument("--num-classes", type=int, default=10, help="classes for the counts (default: %(default)s)")
  models.add_argument("--json", action="store_true", help="print one JSON list: each model's name, description, "
                                                          "parameter count, named features with their shapes, and "
                                                          "natural input shape")


def parse_input_shape(text: str) -> tuple[int, ...]:
  """`--input-shape`'s value, e.g. "8,8,1": positive integers separated by commas.

  Raises:
    StillroomError: anything else, naming the value.
  """
  try:
    shape = tuple(int(d) for d in text.split(","))
  except ValueError:
    shape = ()
  if not shape or min(shape) < 1:
    raise StillroomError(f"--input-shape must be positive integers separated by commas, e.g. 8,8,1; got {text!r}.")
  return shape


def print_models(args: argparse.Namespace) -> None:
  """Prints the model registry's table (or JSON) for `--input-shape` (or `--image-size`) and `--num-classes`.

  Raises:
    StillroomError: a malformed input shape or image size, both given, or fewer than 2 classes.
  """
  if args.image_size is not None:
    if args.input_shape is not None:
      raise StillroomError(f"--image-size {args.image_size} and --input-shape {args.input_shape} both set the input "
                           "shape: give one.")
    if args.image_size < 1:
      raise StillroomError(f"--image-size must be a positive number of pixels, got {args.image_size}.")
    shape = (args.image_size, args.image_size, 3)
  else:
    shape = DIGITS if args.input_shape is None else parse_input_shape(args.input_shape)
  if args.num_classes < 2:
    raise StillroomError(f"--num-classes must be >= 2 (a classifier), got {args.num_classes}.")
  rows = describe_models(shape, args.num_classes)
  if args.json:
    print(json.dumps(rows, indent=2))
    return
  width = max(len(row["name"]) for row in rows)
  for row in rows:
    params = "n/a for this shape" if row["params"] is None else f"{row['params']:,} params"
    natural = "x".join(map(str, row["natural_input_shape"]))
    print(f"{row['name']:<{width}}  {params:<20} {row['about']} (natural input {natural})")
    if row["features"]:  # What `teacher-cache build --features` and `fit --hint/...` can name.
      print(f"{'':<{width}}  features: " + ", ".join(f"{name} {'x'.join(map(str, shape))}"
                                                  for name, shape in row["features"].items()))


CLOUD_SDKS = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google.auth", "google.api_core", "aiohttp")


def _from_a_cloud_sdk(error: BaseException) -> bool:
  return any(cls.__module__.startswith(CLOUD_SDKS) for cls in type(error).__mro__)


def add_verbosity_options(parser: argparse.ArgumentParser) -> None:
  """Gives every subcommand of `parser` the same -v and -q (`run_or_exit` sets the log level from them)."""
  # pylint: disable-next=protected-access
  subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  for subcommand in subcommands.choices.values():
    group = subcommand.add_argument_group("messages").add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true",
                       help="more detail (sweep and demo: every epoch of every run)")
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")


def run_or_exit(prog: str, command: Callable[[], None], args: argparse.Namespace | None = None) -> None:
  """Runs a command; a `StillroomError`, or a failure of the file system (disk full, read-only output, no
  permission), becomes one line on stderr and exit status 2; Ctrl-C exits with 130 and SIGTERM with 143, without a
  traceback, once the command has released what it holds (a multi-process job's processes end at SIGTERM: see
  `shared.distributed`). Messages are prefixed with `prog`, at the level `args`' -v/-q ask for."""
  log.configure(prog, getattr(args, "verbose", False) - getattr(args, "quiet", False))
  signal.signal(signal.SIGINT, note_interrupt)
  signal.signal(signal.SIGTERM, note_interrupt)
  try:
    command()
  except StillroomError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(2)
  except OSError as e:  # Routine storage failures that no more specific handler caught.
    where = f": {e.filename}" if e.filename else ""
    recover = "; choose an output on a writable file system" if e.errno == errno.EROFS else ""
    print(f"{prog}: error: {e.strerror or e}{where}{recover}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    signum = errors.interrupting_signal or signal.SIGINT
    name = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
    print(f"{prog}: interrupted{name}; run the same command again to resume.", file=sys.stderr, flush=True)
    if "jax" in sys.modules and sys.modules["jax"].process_count() > 1:
      # Not through JAX's shutdown barrier, which would wait for the other processes and then abort with a dump:
      # they notice this one's absence within their heartbeat timeout.
      os._exit(128 + signum)
    sys.exit(128 + signum)
  except Exception as e:  # pylint: disable=broad-except
    if _from_a_cloud_sdk(e):  # No credentials, an unreachable endpoint, access denied: routine, with a remedy.
      print(f"{prog}: error: object storage: {type(e).__name__}: {str(e).splitlines()[0][:240]}; check the cloud "
            "SDK's environment (AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL; "
            "GOOGLE_APPLICATION_CREDENTIALS).", file=sys.stderr)
      sys.exit(2)
    # XLA's CPU client says "Out of memory allocating ..." (an INTERNAL error), NumPy raises a MemoryError.
    if not isinstance(e, MemoryError) and not any(what in str(e) for what in ("RESOURCE_EXHAUSTED", "Out of memory")):
      raise
    # The device (or host) ran out of memory: a routine failure with a known remedy, not a bug.
    print(f"{prog}: error: out of memory ({(str(e).splitlines() or [type(e).__name__])[0][:200]}); lower "
          "--batch-size (or --image-size, --seq-len).", file=sys.stderr)
    sys.exit(2)
