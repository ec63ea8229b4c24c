"""The one error type that command-line entry points turn into a clean message and a non-zero exit."""


class StillroomError(Exception):
  """A user-facing error: bad input, a missing file, a mismatched cache. The message says what to do."""
