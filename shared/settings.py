"""Settings as frozen dataclasses: each setting is declared once, with its default, help, check and roles.

A field made with `setting` carries everything the rest of the code asks of it: the commands that offer it, its help
group, whether it is part of a run's identity, whether students trained together may differ in it, whether the
processes of a job may, whether a sweep may vary it. Command lines derive their options from the fields
(`add_options`), and every list of setting names is derived from the declarations (`names_where`), so a default, a
choice or a role is never written twice. A config built from parsed arguments (`from_args`) is the same object a
library caller builds.
"""

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterable


FLOAT32_MAX = 3.4028234663852886e38
SEED_LIMIT = 2 ** 32  # jax.random.key takes seeds below 2**32 (and >= 0).

# The help groups, in the order `--help` shows them.
GROUPS = {
    "data": "data",
    "views": "views: shifts, flips and random-resized crops",
    "teachers": "teachers and targets",
    "distillation": "distillation (with --cache)",
    "features": "feature distillation (with a cache built with --features; see docs/feature-kd.md)",
    "optimisation": "optimisation",
    "specialists": "specialists (Hinton et al. 2015, section 5; see `teacher-cache specialists`)",
    "run": "run and output",
    "job": "a job of several processes (see docs/clusters.md)",
}
# How a setting may differ between the runs that a group, or a job, trains together:
SCOPES = ("group",    # every student of one vmapped group and every process of a job shares it;
          "student",  # the students of one group may differ in it (the step takes it per student, or it is about
                      # each run's own output);
          "process")  # the processes of one job may differ in it (who each is, what it shows, its workers).


def positive_finite(value) -> bool | str:
  """A check: True, or what is wrong. Finite means finite in float32, where the value is used."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
      0 < value < FLOAT32_MAX
  return ok or "must be > 0 and finite"


def non_negative_finite(value) -> bool | str:
  return value == 0 or positive_finite(value) is True or "must be >= 0 and finite"


def seed_check(value) -> bool | str:
  return (isinstance(value, int) and 0 <= value < SEED_LIMIT) or f"must be in 0..{SEED_LIMIT - 1}"


def workers_check(value) -> bool | str:
  return value is None or (isinstance(value, int) and value >= 0) or "must be >= 0"


def at_least(bound, unit: str = "") -> Callable:
  """A check that an integer is >= `bound` (None allowed: the default resolved elsewhere)."""
  return lambda v: v is None or v >= bound or f"must be >= {bound}{' ' + unit if unit else ''}"


def one_of(choices: Iterable[str]) -> Callable:
  choices = tuple(choices)
  return lambda v: v is None or v in choices or f"must be one of {', '.join(choices)}"


def setting(default, help: str, *, choices: Iterable | None = None,  # pylint: disable=redefined-builtin
            metavar: str | None = None, check: Callable | None = None, group: str | None = None,
            commands: Iterable[str] | None = None,
            identity: bool = True, scope: str = "group", axis: bool = False, soft: bool = False,
            weighs: str | None = None, requires: str | None = None, added: bool = False, helps: dict | None = None,
            given_by: str | None = None):
  """A dataclass field with its command-line help and its roles.

  Args:
    default: the one default value.
    help: what the setting does (argparse appends the default).
    choices: the valid values, when they form a list (checked, and listed by `--help`).
    metavar: how `--help` names the value.
    check: value -> True or what is wrong with it ("must be >= 1"); `check_value` runs it.
    group: the `GROUPS` key of its `--help` group.
    commands: the commands that offer it as an option (default: its config class's `COMMANDS`; () for those set
      otherwise: see `given_by`).
    identity: part of a run's identity: a resumed run must give the same value.
    scope: one of `SCOPES`.
    axis: a sweep grid may vary it.
    soft: it sets the soft term, so it needs `--cache`, and a hard-label run (alpha = 1) ignores it.
    weighs: the feature-distillation option whose loss it weights.
    requires: the setting it takes effect with: while that one is None, its value is unused (and not part of a run's
      identity).
    added: added after run dirs recorded their config: a record without it ran with its default.
    helps: `{command: (help, metavar or None)}` for commands that give the setting another meaning.
    given_by: for a setting no command offers as its own option, the argument that sets it (`--teacher`).
  """
  if scope not in SCOPES:
    raise ValueError(f"scope {scope!r}: not one of {SCOPES}")
  if group is not None and group not in GROUPS:
    raise ValueError(f"group {group!r}: not one of {tuple(GROUPS)}")
  choices = tuple(choices) if choices is not None else None
  if check is None and choices is not None:
    check = one_of(choices)
  metadata = {"help": help, "choices": choices, "metavar": metavar, "check": check, "group": group,
              "commands": tuple(commands) if commands is not None else None, "identity": identity, "scope": scope,
              "axis": axis, "soft": soft, "weighs": weighs, "requires": requires, "added": added,
              "helps": helps or {},
              "given_by": given_by}
  return dataclasses.field(default=default, metadata=metadata)


def declared(cls) -> dict[str, dataclasses.Field]:
  """The settings of a config class (or instance), by name, in field order."""
  return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


def commands_of(cls, name: str) -> tuple[str, ...]:
  """The commands that offer setting `name` of `cls`."""
  commands = declared(cls)[name].metadata["commands"]
  return commands if commands is not None else tuple(getattr(cls, "COMMANDS", ()))


def names_where(cls, **roles) -> tuple[str, ...]:
  """The settings of `cls` whose roles have the given values, e.g. `names_where(FitConfig, identity=False)`;
  `command="sweep"` selects those the command offers."""
  command = roles.pop("command", None)
  return tuple(name for name, field in declared(cls).items()
               if all(field.metadata[role] == value for role, value in roles.items())
               and (command is None or command in commands_of(cls, name)))


def value_type(annotation) -> tuple[type, bool]:
  """`(element type, is a tuple of them)` of a field annotation such as `float | None` or `tuple[int, ...] | None`."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
  if typing.get_origin(annotation) is tuple:
    return typing.get_args(annotation)[0], True
  return annotation, False


def check_value(cls, name: str, value) -> str | None:
  """What is wrong with one value of setting `name` of `cls`, or None if it is valid."""
  check = declared(cls)[name].metadata["check"]
  verdict = True if check is None else check(value)
  return None if verdict is True else verdict


def check_values(config, prefix: str = "") -> None:
  """Checks every setting of `config` on its own.

  Raises:
    StillroomError: naming the option (as `prefix` spells it), the value and what it must be.
  """
  from shared.errors import StillroomError  # pylint: disable=import-outside-toplevel
  for name in declared(config):
    problem = check_value(type(config), name, getattr(config, name))
    if problem:
      raise StillroomError(f"{flag_of(name, prefix)} {problem}, got {getattr(config, name)}.")


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


def add_options(parser, cls, command: str, *, prefix: str = "", defaults=None, required: Iterable[str] = (),
                grouped: bool = True) -> None:
  """Adds one option for each setting of `cls` that `command` offers, in `--help` groups.

  Args:
    parser: an argparse parser (or argument group, with `grouped=False`).
    cls: a dataclass whose fields were made with `setting`.
    command: the command being built (see `setting`'s `commands`).
    prefix: prepended to the option and destination names (`teacher_` makes `--teacher-epochs`).
    defaults: an instance whose values are the defaults shown (default: the class's own defaults).
    required: settings the command line must give.
    grouped: put the options in their `GROUPS` (else straight into `parser`).
  """
  names = names_where(cls, command=command)
  fields = declared(cls)
  groups = {}
  for key in GROUPS:
    in_group = [n for n in names if fields[n].metadata["group"] == key]
    if in_group:
      groups[key] = parser.add_argument_group(GROUPS[key]) if grouped else parser
  ungrouped = [n for n in names if fields[n].metadata["group"] is None]
  if ungrouped:
    raise ValueError(f"settings {ungrouped} of {cls.__name__} have no help group")
  hints = typing.get_type_hints(cls)
  for name in names:
    field = fields[name]
    meta = field.metadata
    text, metavar = meta["helps"].get(command, (meta["help"], None))
    metavar = metavar or meta["metavar"]
    default = getattr(defaults, name) if defaults is not None else field.default
    kind, is_tuple = value_type(hints[name])
    flag = flag_of(name, prefix)
    if defaults is not None:  # The class's own default, described in the help, is not the one shown.
      text = re.sub(r" ?\(default: [^()]*(\([^()]*\)[^()]*)*\)", "", text)
    options = {"dest": prefix + name, "default": default, "help": text.replace("%", "%%")}
    if name in required:
      options.update(required=True, default=None)
    elif kind is bool and not is_tuple:
      options["help"] += f" (default: {'on' if default else 'off'})"
    elif is_tuple and default:  # As the option takes it: 0.08,1 rather than (0.08, 1.0).
      options["help"] += f" (default: {','.join(f'{v:.4g}' if isinstance(v, float) else str(v) for v in default)})"
    elif default not in (None, ""):  # An empty default (`extend --out`) is described in the help.
      options["help"] += " (default: %(default)s)"
    if kind is bool and not is_tuple:
      options["action"] = argparse.BooleanOptionalAction
    elif is_tuple:
      options.update(type=_comma_separated(kind, flag), action=_Once)
    else:
      options["type"] = kind
    if meta["choices"]:
      options["choices"] = meta["choices"]
    if metavar:
      options["metavar"] = metavar
    groups[meta["group"]].add_argument(flag, **options)


def from_args(cls, args: argparse.Namespace, *, prefix: str = "", base=None, **overrides):
  """The settings a parsed command line gives: `base` (default: `cls()`) with every parsed field of `cls`."""
  values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}
  return dataclasses.replace(base if base is not None else cls(), **{**values, **overrides})


DIFFERENCES_SHOWN = 5  # An error lists this many differences, then counts the rest: one line, not a whole config.


def differences(recorded: dict, wanted: dict, where: str) -> list[str]:
  """`["config.lr: 0.003 (run dir) vs 0.01 (command)", ...]` for the leaves of two nested records that differ: the
  first `DIFFERENCES_SHOWN`, then "and N more" for the others; a value longer than 60 characters is cut ("...").

  Args:
    recorded: what an output records.
    wanted: what the command would record.
    where: how the messages name the output ("run dir", "views").
  """
  lines = _differences(recorded, wanted, where, "")
  if len(lines) > DIFFERENCES_SHOWN:
    lines = lines[:DIFFERENCES_SHOWN] + [f"and {len(lines) - DIFFERENCES_SHOWN} more"]
  return lines


def _differences(recorded: dict, wanted: dict, where: str, prefix: str) -> list[str]:
  lines = []
  for key in sorted(set(recorded) | set(wanted)):
    a, b = recorded.get(key), wanted.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      lines += _differences(a, b, where, f"{prefix}{key}.")
    elif a != b:
      lines.append(f"{prefix}{key}: {_short(a)} ({where}) vs {_short(b)} (command)")
  return lines


def short_digest(digest: str) -> str:
  """A SHA-256 hex digest as messages show it: its first 12 hex digits and "…"."""
  return digest[:12] + "…"


def with_short_digests(value):
  """`value` (nested lists, tuples and dicts) with every 64-hex digest in it shortened (`short_digest`): how a
  difference of settings shows digests (`differences`, `shared.cache.CacheSpec.mismatches`)."""
  if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
    return short_digest(value)
  if isinstance(value, (list, tuple)):
    return [with_short_digests(v) for v in value]
  if isinstance(value, dict):
    return {k: with_short_digests(v) for k, v in value.items()}
  return value


def _short(value, width: int = 60) -> str:
  """A value as a difference shows it (digests shortened: `with_short_digests`): a whole nested record (the other
  side lacks it) cut at `width`."""
  text = str(with_short_digests(value))
  return text if len(text) <= width else text[:width - 3] + "..."
