"""The one error type that command-line entry points turn into a clean message and a non-zero exit."""


class StillroomError(Exception):
  """A user-facing error: bad input, a missing file, a mismatched cache. The message says what to do."""


_interrupted = False


def note_interrupt(signum, frame) -> None:  # pylint: disable=unused-argument
  """The command lines' SIGINT handler: records the interrupt, then raises KeyboardInterrupt as Python's does.

  The record lets `raise_if_interrupted` raise it again where Python discarded it: a KeyboardInterrupt raised inside
  a garbage-collection callback or a `__del__` (JAX runs some) is only printed, and the run would go on.
  """
  global _interrupted  # pylint: disable=global-statement
  _interrupted = True
  raise KeyboardInterrupt


def raise_if_interrupted() -> None:
  """Raises KeyboardInterrupt if Ctrl-C was pressed (under `note_interrupt`); the loops call it at every step."""
  if _interrupted:
    raise KeyboardInterrupt
