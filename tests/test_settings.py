"""The settings declarations against the command lines: every declared setting is offered by the commands it names
(or set by the argument it names), and no error message names an option its program lacks."""

import argparse
import ast
import dataclasses
import os
import re

import pytest

from shared.options import DEMO_STAGES
from shared.settings import commands_of, declared, flag_of, names_where
from student_train.config import FitConfig
from stillroom.demo import DemoConfig
from student_train.evaluate import EvalConfig
from teacher_cache.build import BuildConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = (FitConfig, BuildConfig, EvalConfig, DemoConfig)
STAGE_PREFIX = {command: stage + "_" for stage, command in DEMO_STAGES.items()}
pytestmark = pytest.mark.fast  # Pure unit tests: `make test-fast` runs them (see pyproject.toml).


def _parsers() -> dict[str, argparse.ArgumentParser]:
  """Each program's top-level parser."""
  from stillroom.cli import student_train_parser as student_parser  # pylint: disable=import-outside-toplevel
  from teacher_cache.cli import _parser as teacher_parser  # pylint: disable=import-outside-toplevel
  return {"student-train": student_parser(), "teacher-cache": teacher_parser()}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
  action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # pylint: disable=protected-access
  return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> set[str]:
  return {s for action in parser._actions for s in action.option_strings}  # pylint: disable=protected-access


def _arguments(parser: argparse.ArgumentParser) -> set[str]:
  """Options and the metavars of positional arguments."""
  return _options(parser) | {a.metavar or a.dest for a in parser._actions if not a.option_strings}  # pylint: disable=protected-access


def _command_parser(parsers: dict, command: str) -> tuple[argparse.ArgumentParser, str]:
  """The subcommand parser that offers the settings of `command` (`demo.teacher`: `demo`), and their prefix."""
  name = command.split(".")[0]
  for parser in parsers.values():
    if name in _subcommands(parser):
      return _subcommands(parser)[name], STAGE_PREFIX.get(command, "")
  raise AssertionError(f"no program has a {name!r} subcommand")


def unoffered(configs, parsers: dict) -> list[str]:
  """What the declarations promise and the command lines lack."""
  problems = []
  for cls in configs:
    for name, field in declared(cls).items():
      commands = commands_of(cls, name)
      given_by = field.metadata["given_by"]
      if not commands and not given_by:
        problems.append(f"{cls.__name__}.{name}: no command offers it and nothing sets it (given_by)")
      if given_by and not any(argument.startswith(given_by) for parser in parsers.values()
                              for sub in _subcommands(parser).values() for argument in _arguments(sub)):
        problems.append(f"{cls.__name__}.{name}: given by {given_by}, which no command takes")
      for command in commands:
        parser, prefix = _command_parser(parsers, command)
        if flag_of(name, prefix) not in _options(parser):
          problems.append(f"{cls.__name__}.{name}: `{parser.prog}` lacks {flag_of(name, prefix)}")
  return problems


def test_every_declared_setting_is_offered_where_declared():
  assert unoffered(CONFIGS, _parsers()) == []


def test_a_setting_dropped_from_a_command_is_caught():
  parsers = _parsers()
  fit = _subcommands(parsers["student-train"])["fit"]
  action = fit._option_string_actions.pop("--max-classes")  # pylint: disable=protected-access
  fit._actions.remove(action)  # pylint: disable=protected-access
  assert unoffered(CONFIGS, parsers) == ["FitConfig.max_classes: `student-train fit` lacks --max-classes"]


def test_a_setting_no_command_offers_is_caught():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Broken(FitConfig):
    forgotten: int = dataclasses.field(default=0, metadata={**declared(FitConfig)["seed"].metadata, "commands": ()})
  assert unoffered((Broken,), _parsers()) == ["Broken.forgotten: no command offers it and nothing sets it (given_by)"]


# An option, or a family of them (`--eval-*`, `--teacher-`).
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)(-\*?)?")
_PROGRAM = {"student_train": "student-train", "teacher_cache": "teacher-cache"}
_OTHER_TOOLS = ("srun",)  # Strings that name another tool's options.


def _strings(path: str):
  """(line, text) of every string constant in a module, f-strings' literal parts included."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
  for node in ast.walk(tree):
    if isinstance(node, ast.JoinedStr):
      yield node.lineno, "".join(v.value for v in node.values if isinstance(v, ast.Constant))
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
      yield node.lineno, node.value


def misnamed_options(package_dirs, parsers: dict) -> list[str]:
  """Options named in the strings of these packages that the program they belong to (or the program the same string
  names) does not offer."""
  offered = {program: set().union(*(_options(sub) for sub in _subcommands(parser).values()))
             for program, parser in parsers.items()}
  problems = []
  for package in package_dirs:
    own = _PROGRAM.get(os.path.basename(package))
    for module in sorted(os.listdir(package)):
      if not module.endswith(".py"):
        continue
      for line, text in _strings(os.path.join(package, module)):
        if any(tool in text for tool in _OTHER_TOOLS):
          continue
        programs = [p for p in offered if p in text] + ([own] if own else list(offered))
        for flag, family in _FLAG.findall(text):
          if not any(o == flag or (family and o.startswith(flag + "-")) for p in programs for o in offered[p]):
            problems.append(f"{os.path.basename(package)}/{module}:{line} names {flag}, which "
                            f"{' or '.join(sorted(set(programs)))} lacks")
  return problems


def test_no_message_names_an_option_its_program_lacks():
  packages = [os.path.join(REPO, name) for name in ("shared", "student_train", "teacher_cache")]
  assert misnamed_options(packages, _parsers()) == []


def test_a_message_naming_a_missing_option_is_caught(tmp_path):
  package = tmp_path / "student_train"
  package.mkdir()
  (package / "plan.py").write_text('raise ValueError(f"too many classes; raise --max-clases {n}.")\n')
  assert misnamed_options([str(package)], _parsers()) == [
      "student_train/plan.py:1 names --max-clases, which student-train lacks"]


@pytest.mark.parametrize("cls", CONFIGS)
def test_roles_are_consistent(cls):
  for name in names_where(cls, scope="student") + names_where(cls, scope="process"):
    assert name in declared(cls)
  for name in names_where(cls, axis=True):  # A sweep varies what it offers.
    assert "sweep" in commands_of(cls, name), name
  for name in names_where(cls, weighs=None):
    weighs = declared(cls)[name].metadata["weighs"]
    assert weighs is None or weighs in declared(cls)
