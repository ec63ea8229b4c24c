"""Settings as frozen dataclasses: each field holds its default, its help and its choices, in one place.

Command lines derive their options from the fields (`add_options`), so a default or a list of choices is never
written twice, and a config built from parsed arguments (`from_args`) is the same object a library caller builds.
"""

import argparse
import math
import re
import dataclasses
import types
import typing
from collections.abc import Iterable


FLOAT32_MAX = 3.4028234663852886e38
SEED_LIMIT = 2 ** 32  # jax.random.key takes seeds below 2**32 (and >= 0).


def positive_finite(value) -> bool | str:
  """A check (see `student_train.config.CHECKS`): True, or what is wrong. Finite means finite in float32, where the
  value is used."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
      0 < value < FLOAT32_MAX
  return ok or "must be > 0 and finite"


def seed_check(value) -> bool | str:
  return (isinstance(value, int) and 0 <= value < SEED_LIMIT) or f"must be in 0..{SEED_LIMIT - 1}"


WORKERS_HELP = ("processes that decode images and render views, a batch at a time (0: a thread of the main process; "
                "default: 0 for arrays in memory, else one per usable core but one, at most 8); results do not "
                "depend on it, and a resumed run may change it")


def workers_check(value) -> bool | str:
  return value is None or (isinstance(value, int) and value >= 0) or "must be >= 0"


def setting(default, help: str, *, choices: Iterable | None = None, metavar: str | None = None,
            cli: bool = True):  # pylint: disable=redefined-builtin
  """A dataclass field with its command-line help.

  Args:
    default: the one default value.
    help: what the setting does (argparse appends the default).
    choices: the valid values, when they form a list.
    metavar: how `--help` names the value.
    cli: whether command lines offer it.
  """
  metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "metavar": metavar,
              "cli": cli}
  return dataclasses.field(default=default, metadata=metadata)


def value_type(annotation) -> tuple[type, bool]:
  """`(element type, is a tuple of them)` of a field annotation such as `float | None` or `tuple[int, ...] | None`."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
  if typing.get_origin(annotation) is tuple:
    return typing.get_args(annotation)[0], True
  return annotation, False


def _comma_separated(kind: type, flag: str):
  def parse(text: str) -> tuple:
    try:
      return tuple(kind(part) for part in text.split(","))
    except ValueError as e:
      raise argparse.ArgumentTypeError(f"{flag} takes comma-separated {kind.__name__} values, e.g. 0,2; got "
                                       f"{text!r}") from e
  return parse


class _Once(argparse.Action):
  """Stores a comma-separated option's values, refusing the option given twice (the first would be lost)."""

  def __call__(self, parser, namespace, values, option_string=None):
    given = namespace.__dict__.setdefault("_given_once", set())
    if self.dest in given:
      parser.error(f"{option_string} is given twice; give its values comma-separated in one.")
    given.add(self.dest)
    setattr(namespace, self.dest, values)


def flag_of(name: str, prefix: str = "") -> str:
  return "--" + (prefix + name).replace("_", "-")


def add_options(parser, cls, names: Iterable[str] | None = None, *, prefix: str = "", defaults=None,
                required: Iterable[str] = (), helps: dict | None = None) -> None:
  """Adds one option per field of the settings dataclass `cls` (in field order).

  Args:
    parser: an argparse parser or argument group.
    cls: a dataclass whose fields were made with `setting`.
    names: the fields to offer (default: every field with `cli=True`).
    prefix: prepended to the option and destination names (`teacher_` makes `--teacher-epochs`).
    defaults: an instance whose values are the defaults shown (default: the class's own defaults).
    required: fields the command line must give.
    helps: `{field: (help, metavar or None)}` for a command that gives some of the fields another meaning.
  """
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for name in names if names is not None else [n for n, f in fields.items() if f.metadata.get("cli", False)]:
    field = fields[name]
    meta = field.metadata
    if helps and name in helps:
      text, metavar = helps[name]
      meta = {**meta, "help": text, "metavar": metavar or meta.get("metavar")}
    default = getattr(defaults, name) if defaults is not None else field.default
    kind, is_tuple = value_type(hints[name])
    flag = flag_of(name, prefix)
    text = meta.get("help", "")
    if defaults is not None:  # The class's own default, described in the help, is not the one shown.
      text = re.sub(r" ?\(default: [^()]*(\([^()]*\)[^()]*)*\)", "", text)
    options = {"dest": prefix + name, "default": default, "help": text.replace("%", "%%")}
    if name in required:
      options.update(required=True, default=None)
    elif kind is bool and not is_tuple:
      options["help"] += f" (default: {'on' if default else 'off'})"
    elif default is not None:
      options["help"] += " (default: %(default)s)"
    if kind is bool and not is_tuple:
      options["action"] = argparse.BooleanOptionalAction
    elif is_tuple:
      options.update(type=_comma_separated(kind, flag), action=_Once)
    else:
      options["type"] = kind
    if meta.get("choices"):
      options["choices"] = meta["choices"]
    if meta.get("metavar"):
      options["metavar"] = meta["metavar"]
    parser.add_argument(flag, **options)


def from_args(cls, args: argparse.Namespace, *, prefix: str = "", base=None, **overrides):
  """The settings a parsed command line gives: `base` (default: `cls()`) with every parsed field of `cls`."""
  values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}
  return dataclasses.replace(base if base is not None else cls(), **{**values, **overrides})


def differences(recorded: dict, wanted: dict, where: str, prefix: str = "") -> list[str]:
  """`["config.lr: 0.003 (run dir) vs 0.01 (command)", ...]` for the leaves of two nested records that differ.

  Args:
    recorded: what an output records.
    wanted: what the command would record.
    where: how the messages name the output ("run dir", "views").
  """
  lines = []
  for key in sorted(set(recorded) | set(wanted)):
    a, b = recorded.get(key), wanted.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      lines += differences(a, b, where, f"{prefix}{key}.")
    elif a != b:
      lines.append(f"{prefix}{key}: {a} ({where}) vs {b} (command)")
  return lines
