"""student-train sweep/report: grid parsing and validation, kill-and-resume without redoing finished runs."""

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import digits_cache, make_teacher

from shared.errors import StillroomError
from student_train.sweep import parse_grid, report, run_sweep
from student_train.train import FitConfig
from teacher_cache.build import BuildConfig, build_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, data_dir, teachers):
  return digits_cache(tmp_path_factory, data_dir, teachers, split="train[:400]")


@pytest.mark.fast
def test_grid_forms_agree(tmp_path):
  expected = {"temperature": [1, 4.5], "alpha": [0, 0.5], "members": [[0], [0, 1]]}
  (tmp_path / "g.json").write_text(json.dumps(expected))
  (tmp_path / "g.yaml").write_text("temperature: [1, 4.5]\nalpha: [0, 0.5]\nmembers: [[0], [0, 1]]\n")
  assert parse_grid(str(tmp_path / "g.json")) == expected
  assert parse_grid(str(tmp_path / "g.yaml")) == expected
  assert parse_grid(json.dumps(expected)) == expected
  assert parse_grid("temperature=1,4.5;alpha=0,0.5;combine=arithmetic,geometric") == {
      "temperature": [1, 4.5], "alpha": [0, 0.5], "combine": ["arithmetic", "geometric"]}


@pytest.mark.fast
@pytest.mark.parametrize("grid, message", [
    ('{"temprature": [1]}', "unknown grid axis 'temprature'; valid axes: .*temperature"),
    ('{"alpha": []}', "grid axis 'alpha' needs a non-empty list"),
    ('{"alpha": "0.5"}', "needs a non-empty list"),
    ('{"temperature": ["hot"]}', "grid axis 'temperature': value 'hot' is not a float"),
    ('{"epochs": [2.5]}', "value 2.5 is not a int"),
    ('{"alpha": [0.5, 1.5]}', "value 1.5 must be in \\[0, 1\\]"),
    ('{"model": ["resnet"]}', "value 'resnet' must be one of mlp-tiny"),
    ('{"members": [[]]}', "must be a non-empty list of member indices"),
    ("temperature", "expected axis=value"),
    ("temperature=1,4,1", "grid axis 'temperature' lists 1 twice"),
    ('{"members": [[0, 1], [0, 1]]}', "grid axis 'members' lists \\[0, 1\\] twice"),
])
def test_bad_grids_name_the_offending_entry(grid, message):
  with pytest.raises(StillroomError, match=message):
    parse_grid(grid)


def test_points_are_checked_before_any_training(tmp_path, cache_path, data_dir):
  out = tmp_path / "sweep"
  with pytest.raises(StillroomError, match="grid point members=0-5: --members \\[0, 5\\]"):
    run_sweep(cache_path, '{"members": [[0], [0, 5]]}', str(out), base=FitConfig(data_dir=data_dir, epochs=1))
  assert not out.exists()
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "u.npz", x=rng.normal(size=(30, 6)).astype(np.float32))
  teacher = make_teacher(tmp_path / "flat", input_shape=(6,), num_classes=3, normalization={"shift": 0, "scale": 1})
  unlabelled = str(tmp_path / "u.zarr")
  build_cache(BuildConfig(dataset=f"npz:{tmp_path / 'u.npz'}", teachers=(teacher,), out=unlabelled, progress=False))
  with pytest.raises(StillroomError, match="grid point alpha=0.5: --alpha 0.5 weights hard labels, but the cache"):
    run_sweep(unlabelled, "alpha=0,0.5", str(out), base=FitConfig(epochs=1))
  assert not out.exists()


def _finished(out) -> dict[str, float]:
  return {path: os.path.getmtime(path) for path in glob.glob(os.path.join(out, "*", "final.json"))}


def test_sweep_killed_midway_resumes_without_redoing_finished_runs(tmp_path, cache_path, data_dir):
  out = str(tmp_path / "sweep")
  args = ["sweep", "--cache", cache_path, "--data-dir", data_dir, "--out", out, "--seeds", "2", "--epochs", "1",
          "--model", "mlp-tiny", "--no-progress",
          "--grid", "temperature=1,2,4;alpha=0.1,0.5;combine=arithmetic,geometric"]
  code = f"from student_train.cli import main\nmain({args!r})"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  while process.poll() is None and len(_finished(out)) < 6:
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL, "the sweep finished before it could be killed"
  before = _finished(out)
  assert 6 <= len(before) < 24
  finish = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert finish.returncode == 0, finish.stderr[-2000:]
  after = _finished(out)
  assert len(after) == 24
  assert all(after[path] == mtime for path, mtime in before.items())  # Finished runs were not redone.
  assert finish.stderr.count("(finished)") >= len(before)
  table = report(out)
  point_rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
  assert len(point_rows) == 12 and all("| 2 |" in line for line in point_rows)
  for name in ("report.md", "report.csv", "report_temperature.png", "report_alpha.png", "report_combine.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0


def test_students_trained_together_match_separate_runs(tmp_path, cache_path, data_dir):
  from shared.runs import load_run_teacher
  import jax
  grid = '{"temperature": [1, 4], "alpha": [0.2, 1.0], "combine": ["arithmetic", "geometric"], "members": [[0, 1, 2], [1]]}'
  base = FitConfig(data_dir=data_dir, epochs=2, finetune_epochs=1, model="mlp-tiny", dropout=0.1, progress=False)
  together = run_sweep(cache_path, grid, str(tmp_path / "together"), base=base)
  separate = run_sweep(cache_path, grid, str(tmp_path / "separate"), base=base, together=False)
  assert len(together) == 16
  for a, b in zip(together, separate):
    with open(os.path.join(a, "metrics.jsonl")) as f:
      lines = [json.loads(line) for line in f]
    assert all(line["students_in_step"] == 16 for line in lines)
    with open(os.path.join(a, "final.json")) as f, open(os.path.join(b, "final.json")) as g:
      final_a, final_b = json.load(f), json.load(g)
    assert abs(final_a["eval_accuracy"] - final_b["eval_accuracy"]) <= 1 / final_a["eval_count"] + 1e-9
    # One step and one rule for stored targets, alone or together: the same numbers up to float rounding (a vmapped
    # matmul sums in another order; 3 epochs amplify it: measured at most 2.4e-6 apart, on weights of order 0.1).
    params_a, params_b = load_run_teacher(a).params, load_run_teacher(b).params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=5e-6),
                 params_a, params_b)


def test_jobs_run_groups_in_parallel_processes_with_the_same_results(tmp_path, cache_path, data_dir):
  base = FitConfig(data_dir=data_dir, epochs=1, model="mlp-tiny", progress=False)
  serial = run_sweep(cache_path, "temperature=1,4", str(tmp_path / "serial"), seeds=2, base=base)
  parallel = run_sweep(cache_path, "temperature=1,4", str(tmp_path / "parallel"), seeds=2, base=base, jobs=2)
  for a, b in zip(serial, parallel):
    with open(os.path.join(a, "final.json")) as f, open(os.path.join(b, "final.json")) as g:
      assert json.load(f)["loss"] == json.load(g)["loss"]
  with pytest.raises(StillroomError, match="--jobs must be >= 1"):
    run_sweep(cache_path, "temperature=1", str(tmp_path / "x"), base=base, jobs=0)


def test_report_gain_is_against_the_scratch_run_of_the_same_schedule(tmp_path, cache_path, data_dir):
  out = tmp_path / "sweep"
  base = FitConfig(data_dir=data_dir, model="mlp-tiny", progress=False)
  run_sweep(cache_path, "alpha=0.5,1;epochs=1,3", str(out), base=base)
  report(str(out))
  with open(out / "report.csv") as f:
    rows = {(float(r["alpha"]), int(r["epochs"])): r for r in csv.DictReader(f)}
  accuracy = lambda alpha, epochs: json.load(open(out / f"alpha={alpha},epochs={epochs},seed=0" / "final.json"))[
      "eval_accuracy"]  # noqa: E731
  for epochs in (1, 3):
    expected = accuracy(0.5, epochs) - accuracy(1, epochs)  # The hard-label run with the same number of epochs.
    assert float(rows[(0.5, epochs)]["gain vs scratch"]) == pytest.approx(expected)
    assert float(rows[(1.0, epochs)]["gain vs scratch"]) == 0.0
  assert accuracy(1, 1) != accuracy(1, 3)  # Otherwise pooling the scratch runs would pass too.
  assert os.path.getsize(out / "report_epochs.png") > 0
