"""Command line of `student-train`: parses arguments and calls one library function per subcommand.

Options come from the settings dataclasses (`FitConfig`, `EvalConfig`), where each default and help text lives.
`new_parser` and `run_command` are this stage's subcommands; the `student-train` console script adds the pipeline
demo to them (`stillroom.cli`), which drives both stages.
"""

import argparse
import json

from shared import distributed
from shared.cli import add_models_command, add_verbosity_options, print_models, run_or_exit
from shared.settings import add_options, from_args
from shared.options import EVAL, EXPORT, FIT, SWEEP
from student_train.config import FitConfig
from student_train.evaluate import EvalConfig, evaluate_runs
from student_train.export import ExportConfig, export_run
from student_train.sample import SAMPLE, SampleConfig, sample_run
from student_train.sweep import AXES, report, run_sweep
from student_train.train import fit

_DESCRIPTION = """\
Train a classifier: a teacher or scratch baseline on hard labels (--dataset), or a student distilled from a
teacher cache (--cache). Running the same command again resumes an interrupted run.

examples:
  student-train fit --model cnn-large --dataset digits --augment --dropout 0.2 --out runs/teacher0
  student-train fit --model mlp-small --cache digits.zarr --alpha 0.1 --finetune-epochs 5 --out runs/student
  student-train eval runs/teacher0 runs/teacher1 --dataset digits --split test
  student-train export runs/student --out student.npz
  student-train fit --model lm-tiny --dataset text:corpus/ --seq-len 256 --out runs/lm
  student-train eval runs/lm --dataset text:heldout.txt
  student-train sample runs/lm --prompt "def main(" --max-new-tokens 100
  student-train fit --model cnn-large --dataset digits --specialist plan.json:0 --init-from runs/teacher0 \\
      --out runs/specialist0
  student-train fit --model cnn-small --dataset imagefolder:shapes/train --eval-dataset imagefolder:shapes/test \\
      --image-size 32 --augment --flip --out runs/shapes_teacher0
"""


def new_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
  """The `student-train` parser with this stage's subcommands (fit, eval, sample, export, sweep, report), and its
  subparsers, to which a caller adds more (then `shared.cli.add_models_command`, which lists last)."""
  parser = argparse.ArgumentParser(prog="student-train", description=_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
  commands = parser.add_subparsers(dest="command", required=True)
  fit_parser = commands.add_parser("fit", allow_abbrev=False, help="train (or resume) a run",
                                   description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_options(fit_parser, FitConfig, FIT, required=("out",))

  eval_parser = commands.add_parser("eval", allow_abbrev=False,
                                    help="evaluate a run, or several runs as an ensemble")
  eval_parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs written by `student-train fit`")
  add_options(eval_parser, EvalConfig, EVAL)
  eval_parser.add_argument("--json", action="store_true", help="print one JSON object")

  sample = commands.add_parser(
      "sample", allow_abbrev=False, help="continue a prompt with a language model run",
      description="Print a language model run's continuation of --prompt (the continuation alone), token by token: "
                  "greedy (--temperature 0) or drawn at a temperature. The tokenizer and the window (the run's "
                  "sequence length) are the run's.")
  sample.add_argument("run", metavar="RUN_DIR", help="a language model run (student-train fit --model lm-* --dataset "
                                                     "text:PATH)")
  add_options(sample, SampleConfig, SAMPLE, required=("prompt",))

  export = commands.add_parser(
      "export", allow_abbrev=False, help="write a run's parameters to a plain file (.npz or Flax .msgpack)",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Write the parameters of a run's newest checkpoint (or --epoch N's) to a file that loads without "
                  "stillroom:\n"
                  "  .npz      params = dict(np.load('student.npz'))   # {'linears/0/kernel': array, ...}\n"
                  "  .msgpack  params = flax.serialization.msgpack_restore(open('student.msgpack', 'rb').read())\n"
                  "The model and input normalisation are the run's config.json ('model', 'normalization').")
  export.add_argument("run", metavar="RUN_DIR", help="a run dir written by `student-train fit`")
  add_options(export, ExportConfig, EXPORT, required=("out",))
  sweep = commands.add_parser(
      "sweep", allow_abbrev=False,
      help="ablations from one cache: every grid point x seed is a run dir; re-running resumes",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=f"Train one student per grid point and seed from one cache. Axes: {', '.join(AXES)}.\n\n"
                  "grids:\n"
                  "  --grid grid.json      {\"temperature\": [1, 4, 20], \"alpha\": [0, 0.5]}\n"
                  "  --grid grid.yaml      temperature: [1, 4, 20]\n"
                  "  --grid 'temperature=1,4,20;alpha=0,0.5;combine=arithmetic,geometric'\n"
                  "  --grid '{\"members\": [[0], [0, 1], [0, 1, 2]]}'\n\n"
                  "The other options are `fit`'s: values for the runs whose grid point does not set them.\n\n"
                  "then: student-train report SWEEP_DIR")
  sweep.add_argument("--cache", required=True, metavar="CACHE.zarr", help="the cache every run distils from")
  sweep.add_argument("--grid", required=True, help="JSON/YAML file, inline JSON, or axis=v1,v2;axis=...")
  sweep.add_argument("--out", required=True, metavar="SWEEP_DIR",
                     help="one run dir per grid point and seed goes here, with sweep.json")
  sweep.add_argument("--seeds", type=int, default=1, help="seeds per grid point (default: %(default)s)")
  sweep.add_argument("--jobs", type=int, default=1,
                     help="groups of runs trained at once, each in its own process with its own input workers "
                          "(see --workers; default: %(default)s)")
  sweep.add_argument("--separate", dest="together", action="store_false",
                     help="train every run on its own instead of several students per vmapped step")
  add_options(sweep, FitConfig, SWEEP)
  report_parser = commands.add_parser("report", allow_abbrev=False,
                                      help="table (Markdown, CSV) and plots of a sweep")
  report_parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the --out of `student-train sweep`")
  return parser, commands


def run_command(args: argparse.Namespace) -> None:
  """Runs a subcommand of `new_parser` (or `models`) as parsed."""
  if args.command == "fit":
    final = fit(from_args(FitConfig, args))
    if distributed.is_first():  # One copy of the result from a job of several processes.
      print(json.dumps(final))
  elif args.command == "eval":
    result = evaluate_runs(from_args(EvalConfig, args, runs=tuple(args.runs)))
    if args.json:
      print(json.dumps(result))
    elif "perplexity" in result:  # Language models: per predicted token.
      print_language_model_eval(result)
    else:
      for member in result["members"]:
        print(f"{member['run']:<40} accuracy {100 * member['accuracy']:.2f}%  nll {member['nll']:.4f}  "
              f"ece {member['ece']:.4f}")
      if len(result["members"]) > 1:
        print(f"{'ensemble (' + args.combine + ')':<40} accuracy {100 * result['accuracy']:.2f}%  "
              f"nll {result['nll']:.4f}  ece {result['ece']:.4f}")
  elif args.command == "sample":
    print(sample_run(from_args(SampleConfig, args)))
  elif args.command == "export":
    config = from_args(ExportConfig, args)
    print(json.dumps(export_run(config.run, config.out, overwrite=config.overwrite, epoch=config.epoch)))
  elif args.command == "sweep":
    run_sweep(args.cache, args.grid, args.out, args.seeds, from_args(FitConfig, args), together=args.together,
              jobs=args.jobs, verbose=args.verbose)
    print(report(args.out))
  elif args.command == "report":
    print(report(args.sweep_dir))
  elif args.command == "models":
    print_models(args)


def print_language_model_eval(result: dict) -> None:
  """The table of `evaluate_runs` of language models: one line per run (and the ensemble), per predicted token."""
  def line(name: str, m: dict) -> str:
    text = (f"{name:<40} perplexity {m['perplexity']:.3f}  bits/byte {m['bits_per_byte']:.4f}  accuracy "
            f"{100 * m['accuracy']:.2f}%  ece {m['ece']:.4f}")
    if "teacher_agreement" in m:
      text += f"  agreement {100 * m['teacher_agreement']:.2f}%"
    return text + f"  ({m['tokens']:,} tokens)"
  for member in result["members"]:
    print(line(member["run"], member))
  if len(result["members"]) > 1:
    print(line(f"ensemble ({result['combine']})", result))


def main(argv: list[str] | None = None) -> None:
  """This stage's subcommands alone (the `student-train` console script is `stillroom.entry_points.student_train`)."""
  parser, commands = new_parser()
  add_models_command(commands)
  add_verbosity_options(parser)
  args = parser.parse_args(argv)
  run_or_exit("student-train", lambda: run_command(args), args)
