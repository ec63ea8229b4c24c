"""The layers of the tree, by a scan of every import (none is executed): `shared` imports neither stage,
`teacher_cache` and `student_train` import `shared` and not each other, and `stillroom`, which drives both, stands
above them."""

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each layer and the packages it may import: its own and those below it.
ALLOWED = {
    "shared": {"shared"},
    "teacher_cache": {"shared", "teacher_cache"},
    "student_train": {"shared", "student_train"},
    "stillroom": {"shared", "teacher_cache", "student_train", "stillroom"},
}
# `python -m teacher_cache` / `python -m student_train` run the console entry points, which stand above the stages.
ENTRY_SCRIPTS = {os.path.join("teacher_cache", "__main__.py"), os.path.join("student_train", "__main__.py")}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
  """`(line, module)` of every import in `source` (a module of `package`), wherever it is: at the top, inside a
  function, under `if typing.TYPE_CHECKING`, or `importlib.import_module` / `__import__` of a constant name."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      found.append((node.lineno, package if node.level else node.module or ""))
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and \
        isinstance(node.args[0].value, str) and (
            (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module") or
            (isinstance(node.func, ast.Name) and node.func.id == "__import__")):
      found.append((node.lineno, node.args[0].value))
  return found


def layering_violations(root: str) -> list[str]:
  """Every import under `root` of a project package that its layer may not import, as "path:line imports name"."""
  violations = []
  for layer, allowed in ALLOWED.items():
    for folder, _, names in os.walk(os.path.join(root, layer)):
      for name in sorted(names):
        if not name.endswith(".py"):
          continue
        path = os.path.join(folder, name)
        relative = os.path.relpath(path, root)
        if relative in ENTRY_SCRIPTS:
          continue
        with open(path, encoding="utf-8") as f:
          for line, module in imported_modules(f.read(), layer):
            top = module.split(".")[0]
            if top in ALLOWED and top not in allowed:
              violations.append(f"{relative}:{line} imports {module}")
  return violations


@pytest.mark.fast
def test_each_layer_imports_only_the_layers_below_it():
  assert layering_violations(REPO) == []


@pytest.mark.fast
def test_the_scan_finds_upward_imports_wherever_they_are(tmp_path):
  files = {
      "shared/a.py": "import numpy\n\ndef f():\n  from teacher_cache.build import build_cache\n",
      "shared/b.py": "import typing\nif typing.TYPE_CHECKING:\n  import student_train.plan\n",
      "shared/c.py": "import importlib\nimportlib.import_module('stillroom.demo')\n",
      "student_train/d.py": "from shared import storage\nfrom teacher_cache.info import cache_info\n",
      "teacher_cache/e.py": "from . import build\nimport student_train\n",
      "student_train/__main__.py": "from stillroom.entry_points import student_train\n",
      "stillroom/f.py": "from teacher_cache import cli\nfrom student_train import cli as student_cli\n",
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text(text)
  assert sorted(layering_violations(str(tmp_path))) == [
      "shared/a.py:4 imports teacher_cache.build", "shared/b.py:3 imports student_train.plan",
      "shared/c.py:2 imports stillroom.demo", "student_train/d.py:2 imports teacher_cache.info",
      "teacher_cache/e.py:2 imports student_train"]


def test_the_console_entry_points_import_nothing_of_the_stages():
  """A spawned input worker imports the console script that started its parent (`stillroom.entry_points`): that
  must cost it neither stage nor JAX."""
  loaded = subprocess.run(
      [sys.executable, "-c", "import sys, stillroom.entry_points; print(' '.join(sorted(sys.modules)))"],
      cwd=REPO, capture_output=True, text=True, check=True, timeout=60).stdout.split()
  assert not [m for m in loaded if m.split(".")[0] in ("jax", "flax", *ALLOWED) and m.split(".")[0] != "stillroom"]
