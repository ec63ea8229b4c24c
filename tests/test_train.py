"""student-train fit/eval: one compilation, device-count invariance, SIGKILL-and-resume, errors, the loop, steps
per call."""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import conftest
from conftest import digits_cache, make_teacher, numpy_log_softmax, tree_digest

from shared.cache import COMPLETE_KEY
from shared.data import open_transfer_set
from shared.metrics import classification_metrics
from shared.runs import load_run_teacher
from student_train import train as train_lib
from student_train.cli import main
from student_train.steps import train_call_fn
from student_train.train import Diverged, FitConfig, fit, fit_group, stack_calls
from teacher_cache.build import BuildConfig, build_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, data_dir, teachers):
  return digits_cache(tmp_path_factory, data_dir, teachers[:2], chunk_rows=256)


def run_cli(args, capsys):
  return conftest.run_cli(main, args, capsys)


def _params(run_dir) -> dict:
  teacher = load_run_teacher(str(run_dir))
  return jax.tree.map(np.asarray, teacher.params)


def _metrics(run_dir) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_step_compiles_once_across_epochs_and_phases(tmp_path, data_dir, cache_path, monkeypatch):
  steps = []
  original = train_lib.make_train_step
  monkeypatch.setattr(train_lib, "make_train_step", lambda *a, **k: steps.append(original(*a, **k)) or steps[-1])
  final = fit(FitConfig(model="mlp-small", cache=cache_path, data_dir=data_dir, epochs=2, finetune_epochs=1,
                        batch_size=100, out=str(tmp_path / "run"), progress=False))
  assert len(steps) == 1 and steps[0]._cache_size() == 1  # Padded last batches, traced alpha: one compilation.
  lines = _metrics(tmp_path / "run")
  assert [l["phase"] for l in lines] == ["distill", "distill", "fine-tune"] and [l["alpha"] for l in lines] == [0.1, 0.1, 1.0]
  assert all(l["rows"] == 2874 for l in lines) and final["epoch"] == 3
  assert {"eval_accuracy", "eval_nll", "eval_ece", "teacher_agreement", "eval_teacher_agreement", "seconds",
          "rows_per_second"} <= set(lines[0])
  config = json.load(open(tmp_path / "run" / "config.json"))
  assert config["resolved"]["teaching"]["use_stored"] and config["normalization"]["scale"] == 16.0


def _fit_process(args, devices=1):
  code = (f"import os\nos.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count={devices}'\n"
          f"from student_train.cli import main\nmain({[str(a) for a in args]!r})")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_one_and_four_devices_give_the_same_metrics(tmp_path, data_dir, cache_path):
  common = ["fit", "--model", "mlp-small", "--cache", cache_path, "--data-dir", data_dir, "--epochs", "2",
            "--batch-size", "64", "--dropout", "0.1", "--temperature", "2", "--no-progress"]
  for devices in (1, 4):
    process = _fit_process(common + ["--out", tmp_path / f"d{devices}"], devices)
    assert process.wait() == 0, process.stderr.read().decode()[-2000:]
  one, four = _metrics(tmp_path / "d1"), _metrics(tmp_path / "d4")
  for a, b in zip(one, four):
    for key in ("loss", "hard_ce", "soft", "train_accuracy", "teacher_agreement", "eval_accuracy", "eval_nll"):
      assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_sigkill_and_resume_ends_with_the_uninterrupted_parameters(tmp_path, data_dir, cache_path):
  args = ["fit", "--model", "mlp-small", "--cache", cache_path, "--data-dir", data_dir, "--epochs", "6",
          "--finetune-epochs", "2", "--dropout", "0.2", "--batch-size", "64", "--no-progress"]
  killed = tmp_path / "killed"
  sparse = ["--checkpoint-every", "3"]  # Kills land between checkpoints: resuming recomputes epochs exactly.
  for kill_after_lines in (2, 5):
    process = _fit_process(args + sparse + ["--out", killed])
    metrics = killed / "metrics.jsonl"
    while process.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < kill_after_lines):
      time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "final.json").exists()
  resumed = _fit_process(args + sparse + ["--out", killed])
  assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
  assert "resuming" in resumed.stderr.read().decode()
  assert sorted(os.listdir(killed / "checkpoints")) == ["6", "8"]  # After epochs 6 and 8 (the last): every 3rd, 2 kept.
  assert conftest.listed_checkpoints(killed) == [6, 8]  # Their digests, and only theirs.
  clean = _fit_process(args + ["--out", tmp_path / "clean"])
  assert clean.wait() == 0
  killed_params, clean_params = _params(killed), _params(tmp_path / "clean")
  jax.tree.map(np.testing.assert_array_equal, killed_params, clean_params)  # Bitwise.
  assert [l["epoch"] for l in _metrics(killed)] == list(range(1, 9))
  assert [l["loss"] for l in _metrics(killed)] == [l["loss"] for l in _metrics(tmp_path / "clean")]


@pytest.mark.parametrize("kill_in_epoch, every_epochs, workers", [(1, 1, 0), (2, 2, 0), (1, 1, 2)])
def test_a_run_killed_mid_epoch_resumes_bit_identical(tmp_path, data_dir, cache_path, kill_in_epoch, every_epochs,
                                                      workers):
  """Killed in epoch 1 right after its first mid-epoch checkpoint; or in epoch 2 with epoch checkpoints every 2
  epochs, so that the mid-epoch checkpoint is ahead of the newest epoch checkpoint (none); or in epoch 1 of a run
  whose inputs are rendered by 2 worker processes. The uninterrupted run renders in the main process."""
  args = ["fit", "--model", "mlp-small", "--cache", cache_path, "--data-dir", data_dir, "--epochs", "3",
          "--dropout", "0.2", "--batch-size", "32", "--no-progress", "--checkpoint-every", str(every_epochs)]
  interrupted = args + ["--workers", str(workers)]
  steps_per_epoch = -(-2874 // 32)  # The cache holds 1,437 examples x 2 views.
  killed, mid = tmp_path / "killed", tmp_path / "killed" / "checkpoints_mid"

  def ready() -> bool:  # A mid-epoch checkpoint inside the epoch to kill in, committed (listed with its digests).
    return any(step > (kill_in_epoch - 1) * steps_per_epoch for step in conftest.listed_checkpoints(killed, mid.name))

  process = _fit_process(interrupted + ["--checkpoint-every-steps", "7", "--out", killed])
  while process.poll() is None and not ready():
    time.sleep(0.002)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  resumed = _fit_process(interrupted + ["--checkpoint-every-steps", "7", "--out", killed])
  assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
  err = resumed.stderr.read().decode()
  assert re.search(rf"resuming .* after step \d+ of epoch {kill_in_epoch} of 3", err), err[-2000:]
  assert not any(name.isdigit() for name in os.listdir(mid))  # Superseded by the last epoch's checkpoint.
  clean = _fit_process(args + ["--out", tmp_path / "clean"])
  assert clean.wait() == 0
  jax.tree.map(np.testing.assert_array_equal, _params(killed), _params(tmp_path / "clean"))  # Bitwise.
  for ours, theirs in zip(_metrics(killed), _metrics(tmp_path / "clean"), strict=True):
    assert {k: v for k, v in ours.items() if "second" not in k} == \
        {k: v for k, v in theirs.items() if "second" not in k}  # The interrupted epoch's metrics too.


def test_bad_input_gets_a_clear_error(tmp_path, data_dir, cache_path, teachers, capsys):
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "flat.npz", x=rng.normal(size=(40, 6)).astype(np.float32))
  flat_teacher = make_teacher(tmp_path / "flat_teacher", input_shape=(6,), num_classes=3,
                              normalization={"shift": 0, "scale": 1})
  unlabelled = str(tmp_path / "u.zarr")
  build_cache(BuildConfig(dataset=f"npz:{tmp_path / 'flat.npz'}", teachers=(flat_teacher,), out=unlabelled,
                          progress=False))
  incomplete = str(tmp_path / "incomplete.zarr")
  build_cache(BuildConfig(dataset="digits", split="train[:100]", data_dir=data_dir, teachers=(teachers[0],),
                          out=incomplete, progress=False))
  import zarr
  del zarr.open_group(incomplete, mode="r+").attrs[COMPLETE_KEY]
  base = ["fit", "--data-dir", data_dir, "--no-progress", "--epochs", "1"]
  out = tmp_path / "run"
  cases = [
      (["--cache", cache_path, "--alpha", "1.5", "--out", out], "--alpha must be in \\[0, 1\\], got 1.5"),
      (["--cache", cache_path, "--alpha", "-0.1", "--out", out], "--alpha must be in \\[0, 1\\]"),
      (["--cache", unlabelled, "--alpha", "0.5", "--out", out], "cache .* is unlabeled; use --alpha 0"),
      (["--cache", cache_path, "--dataset", "digits", "--split", "train[:1000]", "--out", out],
       "is not the data the cache .* was built from"),
      (["--cache", incomplete, "--out", out], "is not complete"),
      (["--model", "resnet", "--dataset", "digits", "--out", out], "--model must be one of mlp-tiny, mlp-small"),
      (["--model", "cnn-small", "--dataset", f"npz:{tmp_path / 'flat.npz'}", "--cache", unlabelled, "--alpha", "0",
        "--out", out], "needs image inputs"),
      (["--cache", cache_path, "--members", "0,5", "--out", out], "--members \\[0, 5\\]: give distinct indices"),
      (["--dataset", "digits", "--out", out, "--temperature", "0"], "--temperature must be > 0"),
      (["--dataset", "digits", "--out", out, "--checkpoint-every", "0"], "--checkpoint-every must be >= 1 epoch"),
  ]
  for args, message in cases:
    code, _, err = run_cli(base + args, capsys)
    assert code == 2, (args, err)
    assert __import__("re").search(message, err), (message, err)
  assert not out.exists()
  # A run dir holding another config is left alone unless --overwrite.
  assert run_cli(base + ["--dataset", "digits", "--split", "train[:200]", "--out", out], capsys)[0] == 0
  before = tree_digest(out)
  code, _, err = run_cli(base + ["--dataset", "digits", "--split", "train[:200]", "--lr", "0.01", "--out", out], capsys)
  assert code == 2 and "holds a run with another config" in err and "config.lr: 0.003 (run dir) vs 0.01 (command)" in err and tree_digest(out) == before
  code, _, err = run_cli(base + ["--dataset", "digits", "--split", "train[:200]", "--out", out], capsys)
  assert code == 0 and "already finished" in err and tree_digest(out) == before
  code, _, _ = run_cli(base + ["--dataset", "digits", "--split", "train[:200]", "--lr", "0.01", "--overwrite",
                               "--out", out], capsys)
  assert code == 0 and json.load(open(out / "config.json"))["resolved"]["config"]["lr"] == 0.01


def test_rederived_mse_and_subset_paths_train(tmp_path, data_dir, cache_path):
  for name, options in {"mse": {"loss": "mse"}, "subset": {"members": (1,), "temperature": 2.0,
                                                           "combine": "geometric"}}.items():
    final = fit(FitConfig(model="mlp-small", cache=cache_path, data_dir=data_dir, epochs=1, batch_size=128,
                          out=str(tmp_path / name), progress=False, **options))
    teaching = json.load(open(tmp_path / name / "config.json"))["resolved"]["teaching"]
    assert not teaching["use_stored"] and np.isfinite(final["loss"])


def test_eval_single_run_and_ensemble_against_numpy(tmp_path, data_dir, teachers, capsys):
  code, text, _ = run_cli(["eval", teachers[0], teachers[1], "--dataset", "digits", "--split", "test",
                           "--data-dir", data_dir, "--combine", "geometric", "--json"], capsys)
  assert code == 0
  result = json.loads(text)
  test = open_transfer_set("digits", "test", data_dir)
  logits = []
  for t in teachers[:2]:
    teacher = load_run_teacher(t)
    logits.append(np.asarray(teacher.apply_fn(teacher.params, test.read_all()[0].astype(np.float32) / 16)))
  reference = numpy_log_softmax(np.stack(logits, 1).mean(1))
  expected = classification_metrics(reference, test.labels)
  for key in ("accuracy", "nll", "ece"):
    assert result[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6)
  assert result["members"][0]["accuracy"] == pytest.approx((logits[0].argmax(1) == test.labels).mean())


@pytest.mark.fast
def test_classification_metrics_against_hand_computed_values():
  log_probs = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]))
  labels = np.array([0, 1, 1, 1])
  metrics = classification_metrics(log_probs, labels, bins=10)
  assert metrics["accuracy"] == 0.75
  assert metrics["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.4) + np.log(0.7) + np.log(0.8)) / 4)
  # Bins: 0.9 -> [0.9,1) acc 1; 0.6 -> [0.6,0.7) acc 0; 0.7 -> [0.7,0.8) acc 1; 0.8 -> [0.8,0.9) acc 1.
  assert metrics["ece"] == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4)


def test_teacher_cache_student_loop_on_digits(tmp_path, data_dir, capsys):
  """A cnn-large teacher reaches >= 97% on digits; its cache trains a student; all from the CLIs."""
  teacher = tmp_path / "teacher"
  code, _, err = run_cli(["fit", "--model", "cnn-large", "--dataset", "digits", "--data-dir", data_dir, "--epochs",
                          "30", "--augment", "--dropout", "0.2", "--no-progress", "--out", teacher], capsys)
  assert code == 0, err
  assert _metrics(teacher)[-1]["eval_accuracy"] >= 0.97
  from teacher_cache.cli import main as cache_main
  cache_main(["build", "--dataset", "digits", "--data-dir", data_dir, "--teacher", str(teacher), "--views", "2",
              "--out", str(tmp_path / "c.zarr"), "--no-progress"])
  code, _, err = run_cli(["fit", "--model", "mlp-small", "--cache", tmp_path / "c.zarr", "--data-dir", data_dir,
                          "--epochs", "30", "--no-progress", "--out", tmp_path / "student"], capsys)
  assert code == 0, err
  last = _metrics(tmp_path / "student")[-1]
  assert last["eval_accuracy"] > 0.93 and last["teacher_agreement"] > 0.85
  # Agreement with the teacher on the test split, against the teacher's own predictions.
  test = open_transfer_set("digits", "test", data_dir)
  teacher_run, student_run = load_run_teacher(str(teacher)), load_run_teacher(str(tmp_path / "student"))
  x = test.read_all()[0].astype(np.float32) / 16
  agreement = np.mean(np.asarray(teacher_run.apply_fn(teacher_run.params, x)).argmax(1)
                      == np.asarray(student_run.apply_fn(student_run.params, x)).argmax(1))
  assert last["eval_teacher_agreement"] == pytest.approx(agreement) and agreement > 0.9


def test_holdout_fold_trains_without_that_fold(tmp_path, data_dir):
  from shared.augment import fold_of
  fit(FitConfig(model="mlp-tiny", dataset="digits", split="train[:400]", data_dir=data_dir, folds=3,
                holdout_fold=1, epochs=1, out=str(tmp_path / "f1"), progress=False))
  config = json.load(open(tmp_path / "f1" / "config.json"))["resolved"]
  assert config["examples"] == int((fold_of(np.arange(400), 3) != 1).sum())
  assert _metrics(tmp_path / "f1")[0]["rows"] == config["examples"]
  with pytest.raises(train_lib.StillroomError, match="give both"):
    fit(FitConfig(model="mlp-tiny", dataset="digits", data_dir=data_dir, folds=3, out=str(tmp_path / "x")))


def test_agreement_comes_from_the_cache_even_after_the_teachers_are_deleted(tmp_path, data_dir):
  """Teachers run once: the build stores their logits on the eval split, and a student reports its agreement with
  the ensemble from them, also once the teachers' run dirs are gone."""
  import shutil
  from shared.cache import EVAL_ROWS
  runs = [make_teacher(tmp_path / f"t{seed}", seed=seed) for seed in (0, 1)]
  test = open_transfer_set("digits", "test", data_dir)
  x = test.read_all()[0].astype(np.float32) / 16
  logits = np.stack([np.asarray(load_run_teacher(r).apply_fn(load_run_teacher(r).params, x)) for r in runs], 1)
  cache = digits_cache_at(tmp_path / "c.zarr", data_dir, runs)
  from shared.cache import open_cache
  stored = open_cache(cache)
  np.testing.assert_allclose(stored["eval_member_logits"][:].astype(np.float32), logits, rtol=2e-3, atol=2e-3)
  assert stored.spec.eval_dataset.fingerprint == test.fingerprint and stored.spec.chunks_of(EVAL_ROWS) == 1
  for run in runs:
    shutil.rmtree(run)
  final = fit(FitConfig(model="mlp-tiny", cache=cache, data_dir=data_dir, epochs=1, temperature=2.0,
                        combine="geometric", out=str(tmp_path / "student"), progress=False))
  student = load_run_teacher(str(tmp_path / "student"))
  student_top1 = np.asarray(student.apply_fn(student.params, x)).argmax(1)
  teacher_top1 = numpy_log_softmax(stored["eval_member_logits"][:].astype(np.float64).mean(1) / 2.0).argmax(1)
  assert final["eval_teacher_agreement"] == pytest.approx(np.mean(student_top1 == teacher_top1))


def digits_cache_at(out, data_dir, runs, **options) -> str:
  build_cache(BuildConfig(dataset="digits", split="train[:200]", data_dir=data_dir, teachers=tuple(runs),
                          out=str(out), progress=False, **options))
  return str(out)


@pytest.mark.fast
def test_steps_wait_for_each_other_only_on_several_cpu_devices():
  """Several fake CPU devices can deadlock on queued collectives, so the loop waits on each step there; on
  accelerators it must not, or the host could not run ahead of the devices."""
  import types
  from shared.parallel import needs_step_sync

  def mesh(platform, count):
    return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)] * count))

  assert needs_step_sync(mesh("cpu", 4))
  assert not needs_step_sync(mesh("cpu", 1))
  assert not needs_step_sync(mesh("gpu", 8)) and not needs_step_sync(mesh("tpu", 4))


def test_a_run_dir_orbax_could_not_read_back_is_refused(tmp_path, data_dir):
  """orbax 0.12 writes checkpoints under a path holding '[...]' but cannot read them back: refused before training,
  and a run dir there (made by an older stillroom) is a one-line error when loaded."""
  from shared.errors import StillroomError
  with pytest.raises(StillroomError, match=r"cannot read checkpoints back from a path holding '\[\.\.\.\]'"):
    fit(FitConfig(dataset="digits", data_dir=data_dir, epochs=1, out=str(tmp_path / "train[:80%]"), progress=False))
  assert not (tmp_path / "train[:80%]").exists()
  with pytest.raises(StillroomError, match="run dir .*choose a name without brackets"):
    load_run_teacher(str(tmp_path / "x[1]"))


@pytest.mark.parametrize("status", [130, 143, 2])
def test_an_interrupted_process_runs_its_exit_handlers_and_keeps_its_status(tmp_path, status):
  """After Ctrl-C or SIGTERM the console scripts end without the interpreter's teardown (which races XLA's compile
  threads and could segfault), but only after the exit handlers, and with the interrupt's status; other exits are
  ordinary."""
  marker = tmp_path / "exit-handlers-ran"
  script = (f"import atexit, jax\nfrom stillroom.entry_points import run_process\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
            f"def main():\n  raise SystemExit({status})\nrun_process(main)\n")
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                        capture_output=True, timeout=120)
  assert done.returncode == status and marker.exists(), done.stderr.decode()


# --- --steps-per-call ---
# `fit --steps-per-call N`: N optimizer steps in one jitted call (a scan of the one step over N stacked batches) train
# the run that N calls of one step train, within float rounding; an epoch's remainder, a mid-epoch resume at a call
# boundary, a divergence inside a call and a group of vmapped students behave as with one step per call.
#
# The bound: a scanned step is not bitwise the step called alone (XLA fuses the loop body differently:
# `shared/TECH_NOTES.md`, "lax.scan of N steps", 6 AdamW steps differed by <= 1.1e-7 without a bias before
# BatchNorm). `mlp-small` has no BatchNorm, so after an epoch of 29 AdamW steps the parameters agree to `RTOL`/`ATOL`
# and every epoch metric to `RTOL`; a call partition that is the same (a resume with the same N) is bitwise.
RTOL, ATOL = 1e-5, 1e-6  # Last-bit differences of float32 grown over 29 steps, far below any training effect.
BATCH = 100  # The cache holds 1,437 examples x 2 views = 2,874 rows: 29 steps per epoch, 29 = 3 x 8 + 5.
METRICS = ("loss", "hard_ce", "soft", "train_accuracy", "teacher_agreement")


def _config(cache_path, data_dir, out, **options) -> FitConfig:
  return FitConfig(**{"model": "mlp-small", "cache": cache_path, "data_dir": data_dir, "epochs": 1,
                      "batch_size": BATCH, "dropout": 0.2, "temperature": 2.0, "data_seed": 0, "eval_split": "none",
                      "progress": False, "workers": 0,
                      "out": str(out), **options})


STUDENTS = ((0, 2.0), (1, 4.0))  # (seed, T) of the two students of a vmapped group.


def _group(cache_path, data_dir, root, **options) -> list[FitConfig]:
  return [_config(cache_path, data_dir, root / f"s{seed}", seed=seed, temperature=t, **options) for seed, t in STUDENTS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_path, data_dir, compilation_cache):
  """An epoch of student (0, 2.0) alone with one step per call (`n1`), and of both students as one vmapped group
  with 8 (`n8/s0`, `n8/s1`; the last call of each epoch: 5 steps)."""
  root = tmp_path_factory.mktemp("spc")
  fit(_config(cache_path, data_dir, root / "n1"), log_epochs=False)
  fit_group(_group(cache_path, data_dir, root / "n8", steps_per_call=8), log_epochs=False)
  return root


def test_eight_steps_per_call_train_the_one_step_run(runs):
  """Student (0, 2.0) of the group of 8 steps per call trains what it trains alone with one (a vmapped group of two
  is within rounding of a group of one too); the other student trains a run of its own."""
  one, eight = _params(runs / "n1"), _params(runs / "n8" / "s0")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL), one, eight)
  lines_one, lines_eight = _metrics(runs / "n1"), _metrics(runs / "n8" / "s0")
  assert [line["rows"] for line in lines_eight] == [2874]  # The remainder's 5 steps are trained, once.
  for a, b in zip(lines_one, lines_eight, strict=True):
    for key in METRICS:
      assert b[key] == pytest.approx(a[key], rel=RTOL), key
  other = _metrics(runs / "n8" / "s1")
  assert np.isfinite(other[-1]["loss"]) and other[-1]["loss"] != lines_one[-1]["loss"]


def test_a_run_interrupted_at_a_call_boundary_resumes_to_the_uninterrupted_run(runs, cache_path, data_dir, tmp_path,
                                                                              monkeypatch, compilation_cache):
  """The group of 8 steps per call interrupted after its mid-epoch checkpoint at step 16 (after its second call),
  resumed with the same N: the same calls, so bitwise the uninterrupted group; resumed instead with one step per
  call, within the bound. (A resume off the new N's grid: `test_calls_cover_the_epoch_on_a_grid_of_n`.)"""
  calls = {"n": 0}

  def interrupt_after_call_2() -> None:
    calls["n"] += 1
    if calls["n"] == 3:  # The epoch's calls: 8, 8, 8, 5 steps; interrupted before the third.
      raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(train_lib, "raise_if_interrupted", interrupt_after_call_2)
    with pytest.raises(KeyboardInterrupt):
      fit_group(_group(cache_path, data_dir, tmp_path / "same", steps_per_call=8, checkpoint_every_steps=16),
                log_epochs=False)
  assert not os.path.exists(tmp_path / "same" / "s0" / "metrics.jsonl") or not _metrics(tmp_path / "same" / "s0")
  shutil.copytree(tmp_path / "same", tmp_path / "other")  # The same interrupted run, to resume with another N.
  for n_after, out in ((8, tmp_path / "same"), (1, tmp_path / "other")):
    resumed = []
    original = train_lib.stack_calls
    with monkeypatch.context() as patch:
      patch.setattr(train_lib, "stack_calls", lambda *a: resumed.append(a[1:]) or original(*a))
      fit_group(_group(cache_path, data_dir, out, steps_per_call=n_after,
                       checkpoint_every_steps=16), log_epochs=False)
    assert resumed[:1] == ([(8, 16)] if n_after == 8 else [])  # From the mid-epoch checkpoint, at its call boundary.
    assert _metrics(out / "s0")[0]["rows"] == 2874
  for student in ("s0", "s1"):
    jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "same" / student),
                 _params(runs / "n8" / student))  # Bitwise.
    assert _metrics(tmp_path / "same" / student) == [{**line, "seconds": line2["seconds"],
                                                      "rows_per_second": line2["rows_per_second"]}
                                                     for line, line2 in zip(_metrics(runs / "n8" / student),
                                                                            _metrics(tmp_path / "same" / student))]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL), _params(runs / "n8" / student),
                 _params(tmp_path / "other" / student))


@pytest.mark.fast
def test_calls_cover_the_epoch_on_a_grid_of_n():
  batches = [{"x": np.full((2, 3), i), "index": np.array([i, i])} for i in range(11)]
  firsts = lambda calls: [(int(c["x"][0, 0, 0]), len(c["x"])) for c in calls]  # noqa: E731
  assert firsts(stack_calls(iter(batches), 4)) == [(0, 4), (4, 4), (8, 3)]
  assert next(stack_calls(iter(batches), 4))["x"].shape == (4, 2, 3)
  # Resumed at batch 6 (saved with another N): up to 8 first, then on the grid.
  assert firsts(stack_calls(iter(batches[6:]), 4, first_step=6)) == [(6, 2), (8, 3)]
  assert firsts(stack_calls(iter(batches[8:]), 4, first_step=8)) == [(8, 3)]


@pytest.mark.fast
def test_accumulate_adds_a_call_as_its_steps_one_by_one():
  rng = np.random.default_rng(0)
  metrics = {"loss": rng.normal(size=(5, 2)).astype(np.float32), "rows": np.full((5, 2), 7.0, np.float32)}
  metrics["loss"][3, 1] = np.nan  # Student 1's batch 10 + 3.
  stepwise = train_lib._empty_sums({k: v[0] for k, v in metrics.items()})
  for i in range(5):
    stepwise = train_lib.accumulate(stepwise, {k: v[i] for k, v in metrics.items()}, 10 + i)
  called = train_lib.accumulate(train_lib._empty_sums(metrics), metrics, 10)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(called), jax.device_get(stepwise))
  assert np.asarray(called["first_nonfinite"]).tolist() == [train_lib._NEVER, 13]


@pytest.mark.fast
def test_a_call_is_a_scan_of_the_step():
  """The scanned body is the step itself, with the call's hypers: N steps of a counter step."""
  step = lambda state, batch, hypers: (state + batch["x"] * hypers, {"seen": state})  # noqa: E731
  state, metrics = jax.jit(train_call_fn(step))(np.float32(0), {"x": np.arange(4, dtype=np.float32)}, np.float32(2))
  assert float(state) == 12.0 and np.asarray(metrics["seen"]).tolist() == [0, 0, 2, 6]


def test_a_divergence_inside_a_call_is_named_by_its_step(tmp_path, data_dir, compilation_cache):
  """lr 1e30 on hard labels: the same first non-finite step with one step per call and with 4 (200 rows, 4 steps:
  one call)."""
  messages = []
  for n in (1, 4):
    config = FitConfig(model="mlp-small", dataset="digits", split="train[:200]", data_dir=data_dir, lr=1e30,
                       batch_size=50, epochs=1, eval_split="none", progress=False, workers=0, steps_per_call=n,
                       out=str(tmp_path / f"n{n}"))
    with pytest.raises(Diverged) as caught:
      fit(config, log_epochs=False)
    messages.append(str(caught.value).split(" diverged ", 1)[1])
  assert messages[0] == messages[1] and "became non-finite at step" in messages[0], messages
