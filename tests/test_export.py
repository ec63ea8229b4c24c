"""`student-train export`: the exported parameters, loaded without stillroom, give the run's predictions."""

import json
import os
import re
import shutil

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


def test_a_damaged_or_deleted_newest_checkpoint_is_refused_and_epoch_picks_another(run, tmp_path, data_dir, capsys):
  """With its newest checkpoint damaged, or gone, eval and export refuse the run naming it, rather than use epoch
  1's; with --epoch 1 they use epoch 1's, whose test accuracy is the one the run measured after epoch 1
  (metrics.jsonl)."""
  copy = str(tmp_path / "run")
  shutil.copytree(run, copy)
  with open(os.path.join(copy, "checkpoints", "2", "params", "_METADATA"), "r+b") as f:
    f.write(b"X")
  evaluate = ["eval", copy, "--dataset", "digits", "--data-dir", data_dir, "--split", "test", "--json"]
  export = ["export", copy, "--out", str(tmp_path / "p.npz")]
  another = r"; pass --epoch N to use another checkpoint \(kept: epochs 1\)\."

  def refused(pattern: str) -> None:
    for argv in (evaluate, export):
      code, _, err = conftest.run_cli(train_main, argv, capsys)
      assert code == 2 and re.search(pattern + another, err), err

  refused(r"checkpoint checkpoints/2 is damaged: its file params/_METADATA differs from its digest in "
          r"checkpoints\.json")
  shutil.rmtree(os.path.join(copy, "checkpoints", "2"))
  refused(r"its newest checkpoint, checkpoints/2 \(listed in checkpoints\.json\), is missing")
  measured = json.loads(open(os.path.join(run, "metrics.jsonl")).readline())
  assert measured["epoch"] == 1
  code, printed, err = conftest.run_cli(train_main, evaluate + ["--epoch", "1"], capsys)
  assert code == 0, err
  evaluated = json.loads(printed)
  assert evaluated["members"][0]["epoch"] == 1 and evaluated["accuracy"] == measured["eval_accuracy"]
  assert evaluated["nll"] == pytest.approx(measured["eval_nll"], rel=1e-5)
  code, printed, err = conftest.run_cli(train_main, export + ["--epoch", "1"], capsys)
  assert code == 0 and json.loads(printed)["epoch"] == 1, err
  test = open_transfer_set("digits", "test", data_dir)
  x, labels = test.source.read(test.indices)
  logits = _numpy_mlp(dict(np.load(tmp_path / "p.npz")), np.asarray(x), json.loads(printed)["normalization"]["scale"])
  assert np.mean(logits.argmax(-1) == np.asarray(labels)) == measured["eval_accuracy"]
