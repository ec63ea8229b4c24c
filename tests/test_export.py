"""`student-train export`: the exported parameters, loaded without stillroom, give the run's predictions."""

import json

import numpy as np
import pytest
from flax import serialization

import conftest
from shared.data import open_transfer_set
from shared.errors import StillroomError
from shared.runs import load_run_teacher
from student_train.cli import main as train_main
from student_train.config import FitConfig
from student_train.evaluate import run_logits
from student_train.train import fit


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> str:
  out = str(tmp_path_factory.mktemp("export") / "run")
  fit(FitConfig(dataset="digits", data_dir=data_dir, model="mlp-small", epochs=2, out=out, progress=False,
                workers=0), log_epochs=False)
  return out


def _numpy_mlp(params: dict, x: np.ndarray, scale: float) -> np.ndarray:
  """`mlp-small` in NumPy: flatten, normalise, one ReLU layer of 128, a linear head."""
  h = x.reshape(len(x), -1).astype(np.float32) / scale
  h = np.maximum(h @ params["hidden/0/kernel"] + params["hidden/0/bias"], 0)
  return h @ params["head/kernel"] + params["head/bias"]


def _flat(tree: dict, prefix: str = "") -> dict:
  """{"a/0/kernel": array} of a nested dict."""
  flat = {}
  for key, value in tree.items():
    flat.update(_flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value})
  return flat


@pytest.mark.parametrize("extension", ["npz", "msgpack"])
def test_exported_parameters_give_the_run_s_predictions(run, extension, tmp_path, data_dir, capsys):
  out = str(tmp_path / f"student.{extension}")
  code, printed, err = conftest.run_cli(train_main, ["export", run, "--out", out], capsys)
  assert code == 0, err
  summary = json.loads(printed)
  assert summary["model"]["name"] == "mlp-small" and summary["parameters"] == 9610 and summary["epochs"] == 2
  if extension == "npz":  # The documented loading lines, nothing of stillroom.
    params = dict(np.load(out))
  else:
    with open(out, "rb") as f:
      params = _flat(serialization.msgpack_restore(f.read()))
  test = open_transfer_set("digits", "test", data_dir)
  expected = run_logits(load_run_teacher(run), test, 512, run)
  x, _ = test.source.read(test.indices)
  np.testing.assert_allclose(_numpy_mlp(params, np.asarray(x), summary["normalization"]["scale"]), expected,
                             rtol=1e-4, atol=1e-4)


def test_export_refuses_an_unknown_format_and_an_existing_file(run, tmp_path, capsys):
  code, _, err = conftest.run_cli(train_main, ["export", run, "--out", str(tmp_path / "student.pt")], capsys)
  assert code == 2 and "its extension picks the format; use one of .npz, .msgpack" in err
  (tmp_path / "student.npz").write_bytes(b"mine")
  with pytest.raises(StillroomError, match="exists; pass --overwrite"):
    from student_train.export import export_run  # pylint: disable=import-outside-toplevel
    export_run(run, str(tmp_path / "student.npz"))
  assert (tmp_path / "student.npz").read_bytes() == b"mine"
