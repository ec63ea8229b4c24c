"""How a value read from a JSON file is named in an error, and whether it is of the kind expected: the one vocabulary
of the checks of run-dir files (`shared.runs`) and of the cache spec (`shared.cache.spec`)."""

import json

# What an error says a value must be, by the Python type a JSON reader gives it (None: null).
EXPECTED = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
            bool: "true or false", None: "null"}


def described(value) -> str:
  """How `value` is named in an error: "null", "true", "a number (4.0)", 'a string ("4")', "an array", "an object"
  (a string or a number with its JSON text, cut to 40 characters)."""
  if value is None or isinstance(value, bool):
    return json.dumps(value)
  if isinstance(value, (int, float)):
    return f"a number ({json.dumps(value)[:40]})"
  if isinstance(value, str):
    return f"a string ({json.dumps(value[:40])})"
  return EXPECTED.get(type(value), type(value).__name__)


def is_kind(value, kind) -> bool:
  """Whether `value` is of `kind`, a key of `EXPECTED`: an integer is not a bool, and a number may be an integer."""
  if kind is None:
    return value is None
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  return isinstance(value, kind)
