"""Your own student, `--model module:function`: it trains, resumes bit for bit, sweeps, teaches, and the ways it
can be wrong are one-line errors."""

import jax
import numpy as np
import pytest

import conftest
from shared.errors import StillroomError
from shared.runs import load_run_teacher
from student_train.config import FitConfig
from student_train.sweep import run_sweep
from student_train.train import fit

MODULE = '''
from flax import nnx
import math


class Net(nnx.Module):
  def __init__(self, input_shape, num_classes, rngs, width):
    self.body = nnx.Linear(math.prod(input_shape), width, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.gelu(self.body(x.reshape(x.shape[0], -1))))


def net(input_shape, num_classes, rngs):
  return Net(input_shape, num_classes, rngs, WIDTH)


def five_classes(input_shape, num_classes, rngs):
  return Net(input_shape, 5, rngs, 8)


def not_a_module(input_shape, num_classes, rngs):
  return "net"
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
  """`mynets` on the import path, with `net` 48 units wide; `write(width)` rewrites it."""
  def write(width: int) -> None:
    (tmp_path / "mynets.py").write_text(MODULE.replace("WIDTH", str(width)))
    import sys  # pylint: disable=import-outside-toplevel
    sys.modules.pop("mynets", None)
  write(48)
  monkeypatch.syspath_prepend(str(tmp_path))
  return write


class Interrupted(Exception):
  pass


def test_your_own_student_trains_resumes_bit_for_bit_and_teaches(module, tmp_path, data_dir):
  options = {"dataset": "digits", "data_dir": data_dir, "model": "mynets:net", "epochs": 3, "progress": False,
             "workers": 0}
  whole = fit(FitConfig(out=str(tmp_path / "whole"), **options), log_epochs=False)
  assert whole["eval_accuracy"] > 0.5  # Chance: 0.1.

  def stop_after_the_first_epoch(plan, line):
    if line["epoch"] == 1:
      raise Interrupted

  with pytest.raises(Interrupted):
    fit(FitConfig(out=str(tmp_path / "resumed"), **options), log_epochs=False, on_epoch=stop_after_the_first_epoch)
  resumed = fit(FitConfig(out=str(tmp_path / "resumed"), **options), log_epochs=False)
  assert {k: v for k, v in resumed.items() if "second" not in k and k != "run_dir"} == \
      {k: v for k, v in whole.items() if "second" not in k and k != "run_dir"}
  teacher = load_run_teacher(str(tmp_path / "resumed"))  # A run of your own model loads as a teacher.
  jax.tree.map(np.testing.assert_array_equal, teacher.params, load_run_teacher(str(tmp_path / "whole")).params)
  assert teacher.record.model.name == "mynets:net" and len(teacher.record.model.structure) == 64
  # The factory changed since: its runs are refused, not loaded with other parameters.
  module(64)
  with pytest.raises(StillroomError, match="now builds parameters of another structure"):
    load_run_teacher(str(tmp_path / "whole"))
  with pytest.raises(StillroomError, match="model.structure"):
    fit(FitConfig(out=str(tmp_path / "whole"), **{**options, "epochs": 3}), log_epochs=False)


def test_your_own_student_sweeps(module, tmp_path, tmp_path_factory, data_dir, teachers):
  cache = conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2])
  runs = run_sweep(cache, '{"model": ["mlp-small", "mynets:net"]}', str(tmp_path / "sweep"),
                   base=FitConfig(epochs=1, progress=False, data_dir=data_dir, workers=0))
  assert len(runs) == 2 and all(load_run_teacher(run).params for run in runs)


@pytest.mark.parametrize("model, message", [
    ("nosuchmodule:net", "model 'nosuchmodule:net': cannot import it"),
    ("mynets:nosuch", "model 'mynets:nosuch': cannot import it"),
    ("mynets:not_a_module", "returned str; it must return an nnx.Module"),
    ("mynets:five_classes", "returns 5 logits per example; the data has 10 classes"),
    ("nonsense", "--model must be one of mlp-tiny, .*, or 'module:function', got nonsense"),
])
def test_a_wrong_student_is_a_one_line_error(module, model, message, tmp_path, data_dir):
  with pytest.raises(StillroomError, match=message):
    fit(FitConfig(dataset="digits", data_dir=data_dir, model=model, epochs=1, out=str(tmp_path / "run"),
                  progress=False))


def test_dropout_is_for_registry_models(module, tmp_path, data_dir):
  with pytest.raises(StillroomError, match="--dropout is for the registry's models"):
    fit(FitConfig(dataset="digits", data_dir=data_dir, model="mynets:net", dropout=0.1, epochs=1,
                  out=str(tmp_path / "run"), progress=False))
