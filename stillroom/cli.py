"""The `student-train` command line as its console script runs it: `student_train`'s subcommands and `demo`, the
end-to-end pipeline (`stillroom.demo`), which drives both stages."""

import argparse

from shared.cli import add_models_command, add_verbosity_options, run_or_exit
from stillroom.demo import add_demo_options, demo_config_from_args, run_demo
from student_train import cli as student_cli


def student_train_parser() -> argparse.ArgumentParser:
  """`student-train`'s parser: fit, eval, export, sweep, report, demo and models."""
  parser, commands = student_cli.new_parser()
  demo = commands.add_parser(
      "demo", allow_abbrev=False,
      help="the end-to-end pipeline: teachers, caches, scratch vs distilled students, a results table",
      description="Teachers -> ordinary and cross-fitted caches -> scratch and distilled students over paired "
                  "seeds (and the same with a fraction of the examples) -> results/demo.{md,json,png}. Finished "
                  "runs in --work-dir are reused. --teacher-*, --build-* and --student-* are the `fit` and "
                  "`teacher-cache build` options of each stage. --text: the same for language models on the "
                  "standard library's own .py sources (dense, topk and sample token caches) -> "
                  "results/text/demo.{md,json,png}.")
  add_demo_options(demo)
  add_models_command(commands)
  add_verbosity_options(parser)
  return parser


def student_train_main(argv: list[str] | None = None) -> None:
  """Runs `student-train` with `argv` (default: the process's arguments)."""
  args = student_train_parser().parse_args(argv)

  def command():
    if args.command == "demo":
      run_demo(*demo_config_from_args(args))
    else:
      student_cli.run_command(args)

  run_or_exit("student-train", command, args)
