"""Command line of `student-train`: parses arguments and calls one library function per subcommand."""

import argparse
import dataclasses
import json

from shared.ensemble import COMBINE_RULES
from shared.losses import LOSSES
from shared.cli import add_models_command, print_models, run_or_exit
from student_train.demo import DEMO_HELP, DemoConfig, run_demo
from student_train.sweep import report, run_sweep
from student_train.train import DEFAULT_KD_ALPHA, FitConfig, evaluate_runs, fit

_DEFAULTS = FitConfig()

_DESCRIPTION = """\
Train a classifier: a teacher or scratch baseline on hard labels (--dataset), or a student distilled from a
teacher cache (--cache). Running the same command again resumes an interrupted run.

examples:
  student-train fit --model cnn-large --dataset digits --augment --dropout 0.2 --out runs/teacher0
  student-train fit --model mlp-small --cache digits.zarr --alpha 0.1 --finetune-epochs 5 --out runs/student
  student-train eval runs/teacher0 runs/teacher1 --dataset digits --split test
"""


def _members(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(part) for part in text.split(","))
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"--members takes comma-separated member indices, e.g. 0,2; got {text!r}") from e


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="student-train", description=_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  d = _DEFAULTS
  fit_parser = commands.add_parser("fit", help="train (or resume) a run", description=_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  fit_parser.add_argument("--model", default=d.model, help="registry name, see `student-train models` "
                                                           "(default: %(default)s)")
  fit_parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
  data = fit_parser.add_argument_group("data (give --dataset, or --cache to distill)")
  data.add_argument("--dataset", help="'digits', 'npz:PATH' or a prepared TFDS name; with --cache, default: the "
                                      "dataset the cache records")
  data.add_argument("--split", default=d.split, help="TFDS split spec (default: %(default)s)")
  data.add_argument("--data-dir", help="TFDS data dir (default: TFDS's, ~/tensorflow_datasets)")
  data.add_argument("--cache", metavar="CACHE.zarr", help="teacher cache made by `teacher-cache build`")
  data.add_argument("--label-fraction", type=float, default=d.label_fraction,
                    help="train on a seeded fraction of the examples (all their cached views) (default: "
                         "%(default)s)")
  data.add_argument("--folds", type=int, default=d.folds,
                    help="with --holdout-fold k: train without fold k of K (a cross-fitting teacher run for "
                         "`teacher-cache build --folds K`) (default: %(default)s)")
  data.add_argument("--holdout-fold", type=int, help="the fold this run does not train on")
  data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment,
                    help="hard-label training: a fresh zero-filled shifted view of every example each epoch "
                         "(a cache brings its own views)")
  data.add_argument("--max-shift", type=int, default=d.max_shift, help="--augment shift in pixels (default: "
                                                                       "%(default)s)")
  data.add_argument("--flip", action=argparse.BooleanOptionalAction, default=d.flip,
                    help="--augment with horizontal flips (default: off)")
  data.add_argument("--eval-dataset", help="evaluate each epoch on this dataset (default: the training dataset)")
  data.add_argument("--eval-split", help="evaluation split (default: 'test' when the dataset has one)")
  kd = fit_parser.add_argument_group("distillation (with --cache)")
  kd.add_argument("--loss", choices=LOSSES, default=d.loss,
                  help="soft term: T²·KL(p_T || softmax(s/T)), or 0.5·||zero-meaned logits diff||² (default: "
                       "%(default)s)")
  kd.add_argument("--alpha", type=float, default=None,
                  help=f"weight of the hard-label cross-entropy in [0, 1] (default: {DEFAULT_KD_ALPHA} with a "
                       "labelled cache, 0 without labels, 1 without a cache)")
  kd.add_argument("--temperature", type=float, help="T of the soft term (default: the cache's); another T "
                                                    "re-derives targets from member_logits")
  kd.add_argument("--combine", choices=COMBINE_RULES, help="ensemble rule (default: the cache's)")
  kd.add_argument("--members", type=_members, help="ensemble subset, e.g. 0,2 (default: all members)")
  kd.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs,
                  help="epochs on hard labels after distillation (default: %(default)s)")
  opt = fit_parser.add_argument_group("optimisation")
  opt.add_argument("--epochs", type=int, default=d.epochs, help="epochs (default: %(default)s)")
  opt.add_argument("--batch-size", type=int, default=d.batch_size, help="a multiple of the device count "
                                                                        "(default: %(default)s)")
  opt.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate, cosine decay "
                                                          "(default: %(default)s)")
  opt.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate (default: --lr / 10)")
  opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
  opt.add_argument("--dropout", type=float, default=d.dropout, help="dropout rate (default: %(default)s)")
  opt.add_argument("--seed", type=int, default=d.seed, help="initialisation and dropout seed (default: "
                                                            "%(default)s)")
  opt.add_argument("--data-seed", type=int, help="example order and subset seed (default: --seed)")
  fit_parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="EPOCHS",
                          help="epochs between checkpoints, the last epoch always included; raise it for runs of "
                               "many short epochs, where saving dominates (default: %(default)s)")
  fit_parser.add_argument("--overwrite", action="store_true", help="replace a run dir holding another config")
  fit_parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

  eval_parser = commands.add_parser("eval", help="evaluate a run, or several runs as an ensemble")
  eval_parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
  eval_parser.add_argument("--dataset", required=True)
  eval_parser.add_argument("--split", default="test", help="(default: %(default)s)")
  eval_parser.add_argument("--data-dir")
  eval_parser.add_argument("--combine", choices=COMBINE_RULES, default="arithmetic",
                           help="ensemble rule for several runs (default: %(default)s)")
  eval_parser.add_argument("--json", action="store_true", help="print one JSON object")

  sweep = commands.add_parser(
      "sweep", help="ablations from one cache: every grid point x seed is a run dir; re-running resumes",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Train one student per grid point and seed from one cache. Axes: temperature, alpha, loss, "
                  "combine, members, model, label_fraction, epochs.\n\ngrids:\n"
                  "  --grid grid.json      {\"temperature\": [1, 4, 20], \"alpha\": [0, 0.5]}\n"
                  "  --grid grid.yaml      temperature: [1, 4, 20]\n"
                  "  --grid 'temperature=1,4,20;alpha=0,0.5;combine=arithmetic,geometric'\n"
                  "  --grid '{\"members\": [[0], [0, 1], [0, 1, 2]]}'\n\n"
                  "then: student-train report SWEEP_DIR")
  sweep.add_argument("--cache", required=True, metavar="CACHE.zarr")
  sweep.add_argument("--grid", required=True, help="JSON/YAML file, inline JSON, or axis=v1,v2;axis=...")
  sweep.add_argument("--out", required=True, metavar="SWEEP_DIR")
  sweep.add_argument("--seeds", type=int, default=1, help="seeds per grid point (default: %(default)s)")
  sweep.add_argument("--data-dir", help="TFDS data dir of the cache's dataset")
  for name in ("model", "epochs", "finetune_epochs", "batch_size", "lr", "alpha", "temperature", "checkpoint_every"):
    default = getattr(d, name)
    sweep.add_argument("--" + name.replace("_", "-"), type=type(default) if default is not None else float,
                       default=default, help=f"value for runs whose grid does not set it (default: {default})")
  sweep.add_argument("--jobs", type=int, default=1,
                     help="groups of runs trained at once, each in its own process (default: %(default)s)")
  sweep.add_argument("--separate", dest="together", action="store_false",
                     help="train every run on its own instead of several students per vmapped step")
  sweep.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
  report_parser = commands.add_parser("report", help="table (Markdown, CSV) and plots of a sweep")
  report_parser.add_argument("sweep_dir", metavar="SWEEP_DIR")
  demo = commands.add_parser(
      "demo", help="the end-to-end pipeline: teachers, caches, scratch vs distilled students, a results table",
      description="Teachers -> ordinary and cross-fitted caches -> scratch and distilled students over paired "
                  "seeds (and the same with a fraction of the examples) -> results/demo.{md,json,png}. Finished "
                  "runs in --work-dir are reused.")
  for field in dataclasses.fields(DemoConfig):
    type_name = getattr(field.type, "__name__", str(field.type)).split(" ")[0]  # "int | None" -> "int"
    kind = {"int": int, "float": float}.get(type_name, str)
    demo.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default,
                      help=DEMO_HELP.get(field.name, "") + " (default: %(default)s)")
  add_models_command(commands)
  return parser


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)

  def command():
    if args.command == "fit":
      fields = {f.name for f in dataclasses.fields(FitConfig)}
      final = fit(FitConfig(**{k: v for k, v in vars(args).items() if k in fields}))
      print(json.dumps(final))
    elif args.command == "eval":
      result = evaluate_runs(args.runs, args.dataset, args.split, args.data_dir, args.combine)
      if args.json:
        print(json.dumps(result))
      else:
        for member in result["members"]:
          print(f"{member['run']:<40} accuracy {100 * member['accuracy']:.2f}%  nll {member['nll']:.4f}  "
                f"ece {member['ece']:.4f}")
        if len(result["members"]) > 1:
          print(f"{'ensemble (' + args.combine + ')':<40} accuracy {100 * result['accuracy']:.2f}%  "
                f"nll {result['nll']:.4f}  ece {result['ece']:.4f}")
    elif args.command == "sweep":
      base = FitConfig(**{k: getattr(args, k) for k in ("model", "epochs", "finetune_epochs", "batch_size", "lr",
                                                         "alpha", "temperature", "checkpoint_every", "data_dir",
                                                         "progress")})
      run_sweep(args.cache, args.grid, args.out, args.seeds, base, together=args.together, jobs=args.jobs)
      print(report(args.out))
    elif args.command == "report":
      print(report(args.sweep_dir))
    elif args.command == "demo":
      run_demo(DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}))
    elif args.command == "models":
      print_models(args)

  run_or_exit("student-train", command)
