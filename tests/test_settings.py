"""The settings declarations against the command lines: every declared setting is offered by the commands it names
(or set by the argument it names), and no error message names an option its program lacks."""

import argparse
import ast
import dataclasses
import os
import re
import types

import pytest

from shared.options import DEMO_STAGES
from shared.settings import commands_of, declared, flag_of, names_where
from student_train.config import FitConfig
from stillroom.demo import DemoConfig
from student_train.evaluate import EvalConfig
from student_train.export import ExportConfig
from teacher_cache.build import BuildConfig
from teacher_cache.extend import ExtendConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = (FitConfig, BuildConfig, EvalConfig, ExportConfig, DemoConfig, ExtendConfig)
STAGE_PREFIX = {command: stage + "_" for stage, command in DEMO_STAGES.items()}
pytestmark = pytest.mark.fast  # Pure unit tests: `make test-fast` runs them (see pyproject.toml).


def _parsers() -> dict[str, argparse.ArgumentParser]:
  """Each program's top-level parser."""
  from stillroom.cli import student_train_parser as student_parser  # pylint: disable=import-outside-toplevel
  from teacher_cache.cli import teacher_cache_parser as teacher_parser  # pylint: disable=import-outside-toplevel
  return {"student-train": student_parser(), "teacher-cache": teacher_parser()}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
  # pylint: disable-next=protected-access
  action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> set[str]:
  return {s for action in parser._actions for s in action.option_strings}  # pylint: disable=protected-access


def _arguments(parser: argparse.ArgumentParser) -> set[str]:
  """Options and the metavars of positional arguments."""
  positionals = [a for a in parser._actions if not a.option_strings]  # pylint: disable=protected-access
  return _options(parser) | {a.metavar or a.dest for a in positionals}


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
_OTHER_TOOLS = ("srun",)  # Strings that name another tool's options.
_ANY = None
# The program and subcommands whose options a module's messages may name: a package's main command, but for the
# modules that serve others (`shared` serves every command).
PACKAGES = {"student_train": ("student-train", ("fit",)), "teacher_cache": ("teacher-cache", ("build",)),
            "stillroom": ("student-train", ("demo",)), "shared": (_ANY, _ANY)}
MODULES = {"student_train/sweep.py": ("sweep", "fit"), "student_train/evaluate.py": ("eval", "fit"),
           "student_train/export.py": ("export",), "student_train/sample.py": ("sample",), "student_train/cli.py": _ANY,
           "student_train/__main__.py": _ANY,
           "teacher_cache/external.py": ("views", "import", "build"), "teacher_cache/logprobs.py": ("import", "build"),
           "teacher_cache/verify.py": ("verify",),
           "teacher_cache/info.py": ("info",), "teacher_cache/specialists.py": ("specialists", "build"),
           "teacher_cache/extend.py": ("extend", "build"),
           "teacher_cache/derive.py": ("convert", "subset", "merge", "build"),
           "student_train/config.py": ("fit", "sweep", "demo"),
           "teacher_cache/cli.py": _ANY, "teacher_cache/__main__.py": _ANY, "stillroom/cli.py": _ANY}


def _strings(path: str):
  """(line, text) of every string constant in a module, f-strings' literal parts joined."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
  for node in ast.walk(tree):
    if isinstance(node, ast.JoinedStr):
      yield node.lineno, "".join(v.value for v in node.values if isinstance(v, ast.Constant))
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
      yield node.lineno, node.value


def _offered(parsers: dict, program, commands) -> set[str]:
  """The options of these subcommands (`_ANY`: of every subcommand) of a program (`_ANY`: of both)."""
  return {option for name, parser in parsers.items() if program in (_ANY, name)
          for command, sub in _subcommands(parser).items() if commands is _ANY or command in commands
          for option in _options(sub)}


def misnamed_options(package_dirs, parsers: dict) -> list[str]:
  """Options named in the strings of these packages that the commands the module serves (or the program the same
  string names) do not offer."""
  problems = []
  for package in package_dirs:
    top = os.path.basename(package)
    program, commands = PACKAGES[top]
    for folder, _, files in sorted(os.walk(package)):
      for module in sorted(f for f in files if f.endswith(".py")):
        where = os.path.relpath(os.path.join(folder, module), os.path.dirname(package))
        offered = _offered(parsers, program, MODULES.get(where, commands))
        for line, text in _strings(os.path.join(folder, module)):
          if any(tool in text for tool in _OTHER_TOOLS):
            continue
          named = set().union(*(_offered(parsers, p, _ANY) for p in parsers if p in text))
          for flag, family in _FLAG.findall(text):
            if not any(o == flag or (family and o.startswith(flag + "-")) for o in offered | named):
              problems.append(f"{where}:{line} names {flag}, which its command{'s' if commands else ''} lack")
  return problems


PACKAGE_DIRS = [os.path.join(REPO, name) for name in PACKAGES]


def test_no_message_names_an_option_its_command_lacks():
  assert misnamed_options(PACKAGE_DIRS, _parsers()) == []


def test_a_message_naming_a_missing_option_is_caught(tmp_path):
  package = tmp_path / "student_train" / "terms"
  package.mkdir(parents=True)
  (package / "logits.py").write_text('raise ValueError(f"too many classes; raise --max-clases {n}.")\n')
  assert misnamed_options([str(tmp_path / "student_train")], _parsers()) == [
      "student_train/terms/logits.py:1 names --max-clases, which its commands lack"]


def test_a_setting_narrowed_in_its_declaration_is_caught(monkeypatch):
  """`fit` loses --checkpoint-every-steps (declared for `sweep` only) while its messages still name it."""
  field = declared(FitConfig)["checkpoint_every_steps"]
  monkeypatch.setattr(field, "metadata", types.MappingProxyType({**field.metadata, "commands": ("sweep",)}))
  problems = misnamed_options(PACKAGE_DIRS, _parsers())
  assert problems and all("names --checkpoint-every-steps" in p for p in problems), problems


@pytest.mark.parametrize("cls", CONFIGS)
def test_roles_are_consistent(cls):
  for name in names_where(cls, axis=True):  # A sweep varies what it offers.
    assert "sweep" in commands_of(cls, name), name
  weights = [(name, field.metadata["weighs"]) for name, field in declared(cls).items() if field.metadata["weighs"]]
  for name, weighs in weights:
    assert weighs in declared(cls) and not declared(cls)[weighs].metadata["weighs"], name
  for name, field in declared(cls).items():
    requires = field.metadata["requires"]
    assert requires is None or requires in declared(cls), name
