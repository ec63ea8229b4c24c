"""Command line of `teacher-cache`: parses arguments and calls one library function per subcommand."""

import argparse
import dataclasses
import json
import sys

from shared.cache import LAYOUT
from shared.ensemble import COMBINE_RULES
from shared.cli import add_models_command, print_models, run_or_exit
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.inspect import cache_info, verify_cache

_DEFAULTS = BuildConfig()

_DESCRIPTION = """\
Run a teacher ensemble once over a transfer set and cache its temperature-scaled outputs in a Zarr v3 store
that student runs stream from (see `student-train fit --cache`).

example:
  student-train fit --model cnn-large --dataset digits --split train --out runs/t0
  teacher-cache build --dataset digits --split train --teacher runs/t0 --teacher runs/t1 \\
      --combine arithmetic --temperature 4 --views 4 --out digits.zarr
  teacher-cache info digits.zarr
  teacher-cache verify digits.zarr --dataset digits --split train
"""


def _add_data_args(parser: argparse.ArgumentParser, required: bool) -> None:
  parser.add_argument("--dataset", required=required, default=None if not required else _DEFAULTS.dataset,
                      help="'digits' (embedded, offline), 'npz:PATH' (arrays x and optional y), or a TFDS name "
                           "prepared in --data-dir with file_format='array_record'")
  parser.add_argument("--split", default=None if not required else _DEFAULTS.split,
                      help="TFDS split spec of one split, e.g. 'train', 'train[:80%%]' (default: %(default)s)")
  parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's, ~/tensorflow_datasets)")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="teacher-cache", description=_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)

  layout = "\n".join(f"  {a.name:<16} {a.shape:<24} {a.dtype:<8} {a.meaning}" for a in LAYOUT)
  build = commands.add_parser(
      "build", help="build (or resume) a cache", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Build a cache; running the same command again resumes an interrupted build.\n\n"
                  f"Arrays (R rows = examples x views, M members, C classes; 'storage' = --dtype):\n{layout}")
  _add_data_args(build, required=True)
  build.add_argument("--teacher", action="append", required=True, metavar="RUN_DIR|module:function",
                     help="ensemble member: a run dir written by `student-train fit`, or module:function returning "
                          "an nnx.Module or (apply_fn, params); repeat for each member")
  build.add_argument("--combine", choices=COMBINE_RULES, default=_DEFAULTS.combine,
                     help="ensemble rule: arithmetic mean of member distributions or normalised geometric mean "
                          "(default: %(default)s)")
  build.add_argument("--temperature", type=float, default=_DEFAULTS.temperature,
                     help="softmax temperature T > 0 of the stored targets (default: %(default)s)")
  build.add_argument("--views", type=int, default=_DEFAULTS.views,
                     help="views per example, view 0 un-augmented; 1 = no augmentation (default: %(default)s)")
  build.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="augmentation seed (default: %(default)s)")
  build.add_argument("--max-shift", type=int, default=_DEFAULTS.max_shift,
                     help="largest zero-filled shift of a view, in pixels (default: %(default)s)")
  build.add_argument("--flip", action=argparse.BooleanOptionalAction, default=_DEFAULTS.flip,
                     help="random horizontal flips in views (default: off; wrong for digits and text)")
  build.add_argument("--folds", type=int, default=_DEFAULTS.folds,
                     help="cross-fitted targets: each member is K runs given in fold order, run k trained with "
                          "`student-train fit --folds K --holdout-fold k`; a row takes each member's logits from "
                          "the run that did not see its fold (default: %(default)s, no cross-fitting)")
  build.add_argument("--out", required=True, metavar="CACHE.zarr", help="the store to write")
  build.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size,
                     help="rows per forward pass, a multiple of the device count (default: %(default)s)")
  build.add_argument("--chunk-rows", type=int, default=_DEFAULTS.chunk_rows,
                     help="rows per Zarr chunk: the unit of writing, resuming and reading (default: %(default)s)")
  build.add_argument("--dtype", choices=("float16", "float32"), default=_DEFAULTS.dtype,
                     help="storage dtype of logits and targets (default: %(default)s)")
  build.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out built with other settings")
  build.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

  info = commands.add_parser("info", help="spec and teacher statistics of a cache")
  info.add_argument("cache", metavar="CACHE.zarr")
  info.add_argument("--json", action="store_true", help="print one JSON object")

  verify = commands.add_parser("verify", help="check a cache; exit 1 if any check fails")
  verify.add_argument("cache", metavar="CACHE.zarr")
  _add_data_args(verify, required=False)
  verify.add_argument("--json", action="store_true", help="print one JSON object")

  add_models_command(commands)
  return parser


def _format_percent(value) -> str:
  return "-" if value is None else f"{100 * value:.2f}%"


def _print_info(info: dict) -> None:
  spec = info["spec"]
  data = spec["dataset"]
  print(f"cache        {info['path']}  ({info['bytes'] / 1e6:.2f} MB, "
        f"{'complete' if info['complete'] else 'INCOMPLETE'})")
  print(f"dataset      {data['name']} {data['split']} ({data['canonical_split']}): {data['count']} examples, "
        f"inputs {tuple(data['input_shape'])} {data['input_dtype']}, "
        f"{'labelled' if data['labeled'] else 'unlabelled'}, fingerprint {data['fingerprint'][:16]}…")
  aug = spec["augmentation"]
  print(f"rows         {info['rows']} = {data['count']} examples x {spec['views']} views "
        f"(seed {aug['seed']}, max shift {aug['max_shift']}, flip {aug['flip']}); chunk rows {spec['chunk_rows']}")
  print(f"targets      {spec['combine']} mean at T={spec['temperature']:g}, {spec['num_classes']} classes, "
        f"{spec['dtype']}; stillroom {spec['software_version']}, created {spec['created_at']}")
  stats = info.get("stats")
  folds = spec.get("folds", 1)
  print("teacher runs" + (f" ({folds} cross-fitted runs per member, member-major)" if folds > 1 else ""))
  for i, run in enumerate(spec["members"]):
    print(f"  [{i}] {run['name']:<20} {run['model']:<10} {run['num_params']:>9} params  digest {run['digest'][:12]}")
  for i, member in enumerate(stats["members"] if stats else []):
    print(f"member {i}     {member['name']}: accuracy {_format_percent(member['accuracy'])} "
          f"(view 0: {_format_percent(member['accuracy_view0'])})")
  if stats:
    ensemble = stats["ensemble"]
    print(f"ensemble     accuracy {_format_percent(ensemble['accuracy'])} "
          f"(view 0: {_format_percent(ensemble['accuracy_view0'])}) on {stats['labelled_rows']} labelled rows")
    print(f"targets      mean entropy {stats['mean_target_entropy_nats']:.3f} nats "
          f"(max {stats['max_entropy_nats']:.3f}), mean top-1 probability {stats['mean_top1_probability']:.3f}")
    print(f"agreement    all members {_format_percent(stats['all_members_agree'])}, "
          f"pairwise {_format_percent(stats['mean_pairwise_agreement'])}")


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)

  def command():
    if args.command == "build":
      fields = {f.name for f in dataclasses.fields(BuildConfig)}
      options = {k: v for k, v in vars(args).items() if k in fields}
      build_cache(BuildConfig(**{**options, "teachers": tuple(args.teacher)}))
    elif args.command == "info":
      info = cache_info(args.cache)
      print(json.dumps(info, indent=2)) if args.json else _print_info(info)
    elif args.command == "verify":
      checks = verify_cache(args.cache, args.dataset, args.split, args.data_dir)
      if args.json:
        print(json.dumps({"ok": all(c.ok for c in checks), "checks": [dataclasses.asdict(c) for c in checks]}))
      else:
        for check in checks:
          print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name}" + (f"  ({check.detail})" if check.detail else ""))
      if not all(c.ok for c in checks):
        sys.exit(1)
    elif args.command == "models":
      print_models(args)

  run_or_exit("teacher-cache", command)
