"""Messages through `logging`, and progress bars only where a person watches.

Every module logs to a child of the `stillroom` logger (`logger(__name__)`). Its one handler writes each record as
one line to whatever `sys.stderr` is at the time (so a test's capture, or a redirected batch log, gets it), through
`tqdm.write` so that a progress bar on the terminal is redrawn below the line rather than broken by it. The command
lines set the program name and the level once (`configure`: `-v` adds per-epoch detail, `-q` leaves warnings and
errors only); a library caller gets INFO messages prefixed `stillroom:` and may reconfigure the logger as usual.

`progress(...)` is a tqdm bar when stderr is a terminal; otherwise (CI, a batch job's log file) it draws nothing and
logs one line when the stage ends, instead of hundreds of kilobytes of carriage-return redraws.
"""

import logging
import sys
import time

from tqdm import tqdm

ROOT = "stillroom"
VERBOSE, NORMAL, QUIET = logging.DEBUG, logging.INFO, logging.WARNING


class _Stderr(logging.Handler):
  """One line per record on the current `sys.stderr`, below any progress bar."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      tqdm.write(self.format(record), file=sys.stderr)
      sys.stderr.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


_HANDLER = _Stderr()
_ROOT = logging.getLogger(ROOT)
_ROOT.addHandler(_HANDLER)
_ROOT.propagate = False  # Its lines are the programs' own output, not the host application's to format again.


class _Formatter(logging.Formatter):
  """`program: message`, and `program: warning: message` for warnings."""

  def __init__(self, program: str):
    super().__init__()
    self.program = program

  def format(self, record: logging.LogRecord) -> str:
    label = "warning: " if record.levelno == logging.WARNING else ""
    return f"{self.program}: {label}{record.getMessage()}"


_SETTINGS = [ROOT, 0]


def configure(program: str = ROOT, verbosity: int = 0) -> None:
  """Sets the prefix of every line (`student-train: ...`) and the level: verbosity > 0 shows DEBUG records (every
  epoch of every run), < 0 only warnings and errors."""
  _SETTINGS[:] = [program, verbosity]
  _HANDLER.setFormatter(_Formatter(program))
  _ROOT.setLevel(VERBOSE if verbosity > 0 else QUIET if verbosity < 0 else NORMAL)


def settings() -> tuple[str, int]:
  """`(program, verbosity)` as last configured: what a spawned worker passes to `configure` to log alike."""
  return tuple(_SETTINGS)


configure()


def logger(name: str) -> logging.Logger:
  """The logger of module `name` (`shared.cache` logs to `stillroom.shared.cache`)."""
  return logging.getLogger(f"{ROOT}.{name}")


def on_terminal() -> bool:
  """Whether stderr is a terminal a person watches (progress bars redraw there; elsewhere they pile up)."""
  isatty = getattr(sys.stderr, "isatty", None)
  return bool(isatty and isatty())


class progress(tqdm):  # pylint: disable=invalid-name
  """A tqdm progress bar (same arguments) drawn only on a terminal, with `enabled` (a command's --progress) and
  outside -q. Elsewhere it draws nothing, and when closed logs one line: what it counted and how long it took."""

  def __init__(self, *args, enabled: bool = True, summary: bool = True, **kwargs):
    """`enabled`: the command's --progress; `summary`: log the line off a terminal (off where the stage logs its
    own)."""
    shown = enabled and on_terminal() and _ROOT.isEnabledFor(NORMAL)
    kwargs.setdefault("file", sys.stderr)
    super().__init__(*args, disable=not shown, **kwargs)
    self._summary = enabled and summary and not shown
    self._started = time.perf_counter()
    self._done = 0  # A disabled tqdm counts nothing, nor keeps its description and unit.
    self._what = (kwargs.get("desc") or "done", kwargs.get("unit", "it"))

  def update(self, n=1):
    self._done += n
    return super().update(n)

  def __del__(self):
    self._summary = False  # Never closed: its stage failed, and the line would follow the error.
    super().__del__()

  def close(self) -> None:
    if getattr(self, "_summary", False):
      self._summary = False
      done, (desc, unit) = self._done, self._what
      seconds = time.perf_counter() - self._started
      rate = done / seconds if seconds > 0 else 0
      logger("progress").info(f"{desc}: {done:,} {unit}s in {seconds:.1f} s"
                              + (f" ({rate:,.0f} {unit}s/s)" if rate >= 10 else f" ({rate:.2g} {unit}s/s)" if done
                                 else ""))
    super().close()
