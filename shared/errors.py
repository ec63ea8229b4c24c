"""The one error type that command-line entry points turn into a clean message and a non-zero exit."""


class StillroomError(Exception):
  """A user-facing error: bad input, a missing file, a mismatched cache. The message says what to do."""


_interrupted = False
interrupting_signal: int | None = None  # The signal that `note_interrupt` last took.


def note_interrupt(signum, frame) -> None:  # pylint: disable=unused-argument
  """The command lines' SIGINT and SIGTERM handler: records the interrupt, then raises KeyboardInterrupt as Python
  does for SIGINT, so that a preempted job (SIGTERM) releases its lock and staging files as Ctrl-C does.

  The record lets `raise_if_interrupted` raise it again where Python discarded it: a KeyboardInterrupt raised inside
  a garbage-collection callback or a `__del__` (JAX runs some) is only printed, and the run would go on.
  """
  global _interrupted, interrupting_signal  # pylint: disable=global-statement
  _interrupted, interrupting_signal = True, signum
  raise KeyboardInterrupt


def raise_if_interrupted() -> None:
  """Raises KeyboardInterrupt if Ctrl-C was pressed (under `note_interrupt`); the loops call it at every step."""
  if _interrupted:
    raise KeyboardInterrupt
