"""The console scripts (and `python -m student_train` / `python -m teacher_cache`): each imports its command line
only when called.

An input worker (`shared.workers`) is a spawned interpreter, which imports the script that started its parent
before it runs: through these functions, that costs it `stillroom` (which imports nothing) and nothing of JAX or
Flax.
"""

import atexit
import os
import sys

INTERRUPTED = (130, 143)  # The exit statuses of Ctrl-C and SIGTERM (`shared.cli.run_or_exit`).


def run_process(main) -> None:
  """Runs a command line as the whole process. After an interrupt, the process ends once the exit handlers have
  run (checkpoint staging dirs, zarr's event loop) but without the interpreter's teardown: XLA may still be
  compiling on its own threads (its compile pool outlives the Python call that was interrupted), and the teardown
  then races them and can segfault (exit 139 instead of 130)."""
  try:
    main()
  except SystemExit as e:
    if e.code in INTERRUPTED and "jax" in sys.modules:
      atexit._run_exitfuncs()  # pylint: disable=protected-access
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(e.code)
    raise


def student_train():
  from stillroom.cli import student_train_main  # pylint: disable=import-outside-toplevel
  run_process(student_train_main)


def teacher_cache():
  from teacher_cache.cli import main  # pylint: disable=import-outside-toplevel
  run_process(main)
