"""The console scripts: each imports its command line only when called.

An input worker (`shared.workers`) is a spawned interpreter, which imports the script that started its parent
before it runs: through these functions, that costs it `shared` (whose public names load lazily) and nothing of
JAX or Flax.
"""


def student_train():
  from student_train.cli import main  # pylint: disable=import-outside-toplevel
  return main()


def teacher_cache():
  from teacher_cache.cli import main  # pylint: disable=import-outside-toplevel
  return main()
