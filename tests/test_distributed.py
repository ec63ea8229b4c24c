"""Jobs of several processes (`jax.distributed` on localhost, CPU collectives): a cache built by 2 processes is the
store 1 process builds, also when the job is killed and run again; a run trained by 2 processes is the run 1 process
trains (within float tolerance), also when one process is killed and the job run again; a process that dies takes
the job down."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import conftest
from shared import storage
from shared.cache import open_cache
from shared.errors import StillroomError
from shared.runs import load_run_teacher
from student_train import run_dir as files
from student_train.config import FitConfig
from student_train.train import fit
from teacher_cache.build import BuildConfig, build_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_job(args: list[str], processes: int = 2, heartbeat: int = 10) -> list[subprocess.Popen]:
  """Starts the processes of one `teacher-cache build` job, each with one CPU device."""
  return _job("teacher_cache", ["build", *args], processes, heartbeat)


def _fit_job(args: list[str], processes: int = 2, heartbeat: int = 10,
             per_process: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
  """Starts the processes of one `student-train fit` job, each with one CPU device."""
  return _job("student_train", ["fit", *args], processes, heartbeat, per_process)


def _job(package: str, args: list[str], processes: int, heartbeat: int,
         per_process: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
  """Starts `python -c "from PACKAGE.cli import main; main(ARGS + job flags)"` once per process, on localhost with
  one CPU device each; `per_process` adds arguments to some processes."""
  port = conftest.free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  job = []
  for index in range(processes):
    argv = [*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
            "--process-id", str(index), "--heartbeat-timeout", str(heartbeat), "--no-progress",
            *(per_process or {}).get(index, [])]
    code = f"from {package}.cli import main\nmain({argv!r})"
    job.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE))
  return job


def _kill_the_second_process_once(job: list[subprocess.Popen], ready, how=signal.SIGKILL) -> None:
  """Sends `how` to process 1 once `ready()` holds; asserts that it ends, and that process 0 then exits non-zero
  within 60 s (its heartbeat timeout is 5 s)."""
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and all(p.poll() is None for p in job) and not ready():
    time.sleep(0.01)
  job[1].send_signal(how)
  killed = time.monotonic()
  code, err = _wait(job[:1], timeout=120)[0]
  assert job[1].wait(timeout=10) == -how
  assert code != 0, err
  assert time.monotonic() - killed < 60


def _wait(job: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
  ended = []
  for process in job:
    try:
      _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for other in job:
        other.kill()
      raise
    ended.append((process.returncode, err.decode()[-3000:]))
  return ended


@pytest.fixture(scope="module")
def build_args(data_dir, teachers) -> list[str]:
  """Digits, 2 members, 4 views: 5,748 rows in 23 chunks of 256 (and 360 eval rows in 2 chunks), batch 64."""
  return ["--dataset", "digits", "--data-dir", data_dir, "--teacher", teachers[0], "--teacher", teachers[2],
          "--views", "4", "--chunk-rows", "256", "--batch-size", "64"]


@pytest.fixture(scope="module")
def one_process_store(tmp_path_factory, data_dir, teachers) -> str:
  out = str(tmp_path_factory.mktemp("one") / "c.zarr")
  build_cache(BuildConfig(dataset="digits", data_dir=data_dir, teachers=(teachers[0], teachers[2]), views=4,
                          chunk_rows=256, batch_size=64, out=out, progress=False))
  return out


def test_a_cache_built_by_two_processes_is_the_one_process_store(tmp_path, build_args, one_process_store):
  out = str(tmp_path / "c.zarr")
  ended = _wait(_build_job(build_args + ["--out", out]))
  assert all(code == 0 for code, _ in ended), ended
  assert open_cache(out).complete
  assert conftest.array_files(out) == conftest.array_files(one_process_store)


def test_a_killed_job_run_again_ends_with_the_uninterrupted_store(tmp_path, build_args, one_process_store):
  out = tmp_path / "c.zarr"
  job = _build_job(build_args + ["--out", str(out)])
  committed = out / "chunk_committed" / "c"
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and all(p.poll() is None for p in job) and \
      (not committed.exists() or len(os.listdir(committed)) < 4):
    time.sleep(0.01)
  for process in job:
    process.send_signal(signal.SIGKILL)
  _wait(job)
  assert not open_cache(str(out), require_complete=False).complete, "the job finished before it could be killed"
  ended = _wait(_build_job(build_args + ["--out", str(out)]))
  assert all(code == 0 for code, _ in ended), ended
  assert "already committed" in ended[0][1]
  assert conftest.array_files(out) == conftest.array_files(one_process_store)


def test_a_process_that_dies_takes_the_job_down(tmp_path, build_args):
  out = tmp_path / "c.zarr"
  job = _build_job(build_args + ["--views", "16", "--out", str(out)], heartbeat=5)
  committed = out / "chunk_committed" / "c"
  _kill_the_second_process_once(job, lambda: committed.exists() and len(os.listdir(committed)) >= 2)
  assert not open_cache(str(out), require_complete=False).complete


def test_a_process_that_fails_fails_the_job_with_its_reason(tmp_path, build_args, data_dir, teachers):
  out = str(tmp_path / "c.zarr")
  build_cache(BuildConfig(dataset="digits", data_dir=data_dir, teachers=(teachers[0],), views=2, out=out,
                          progress=False))
  started = time.monotonic()
  ended = _wait(_build_job(build_args + ["--out", out]), timeout=120)
  assert time.monotonic() - started < 60
  assert [code for code, _ in ended] == [2, 2], ended
  assert "holds a cache built with other settings" in ended[0][1]
  assert "process 0 of the job failed: --out" in ended[1][1] and "other settings" in ended[1][1]
  assert "Traceback" not in ended[0][1] + ended[1][1]


def test_inconsistent_process_flags_are_refused(tmp_path, teachers):
  base = {"dataset": "digits", "teachers": (teachers[0],), "out": str(tmp_path / "c.zarr"), "progress": False}
  for flags, message in (({"num_processes": 2}, "needs --coordinator"),
                         ({"coordinator": "127.0.0.1:1234", "num_processes": 2}, "needs --process-id"),
                         ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
                         ({"coordinator": "127.0.0.1:1", "num_processes": 2, "process_id": 2}, "must be in 0..1"),
                         ({"coordinator": "auto", "num_processes": 2}, "drop --num-processes")):
    with pytest.raises(StillroomError, match=message):
      build_cache(BuildConfig(**base, **flags))
  assert not os.path.exists(tmp_path / "c.zarr")


# Training: distillation from the 1-process store (5,748 rows, 2 members), global batch 64 (32 rows per process),
# 3 epochs with eval on digits' test split.
FIT = {"model": "mlp-small", "batch_size": 64, "epochs": 3, "lr": 3e-3, "dropout": 0.1}


def _fit_args(cache: str, out) -> list[str]:
  return ["--cache", cache, "--out", str(out), *(f"--{k.replace('_', '-')}={v}" for k, v in FIT.items())]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, one_process_store) -> str:
  out = str(tmp_path_factory.mktemp("fit") / "run")
  fit(FitConfig(cache=one_process_store, out=out, progress=False, **FIT), log_epochs=False)
  return out


def _assert_same_run(run: str, reference: str) -> None:
  """Equal up to float rounding: the global batch is the same, but its gradient is summed over 2 devices instead of
  1, in another order."""
  lines, expected = files.read_metrics(run), files.read_metrics(reference)
  assert [line["epoch"] for line in lines] == [1, 2, 3]  # One writer: process 0.
  for line, want in zip(lines, expected):
    for name in ("loss", "hard_ce", "soft", "eval_nll"):  # Measured: within 1e-7.
      assert line[name] == pytest.approx(want[name], rel=1e-6, abs=1e-7), (line["epoch"], name)
    for name in ("train_accuracy", "eval_accuracy"):  # A near-tie may flip one example.
      assert line[name] == pytest.approx(want[name], abs=2 / 360), (line["epoch"], name)
    assert line["rows"] == want["rows"] == 5748
  params, wanted = load_run_teacher(run).params, load_run_teacher(reference).params
  for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(wanted)):
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(want), rtol=0, atol=2e-6)  # Measured: 7e-7 at most.
  assert files.read_final(run)["epochs"] == 3


def test_a_run_trained_by_two_processes_is_the_one_process_run(tmp_path, one_process_store, one_process_run):
  ended = _wait(_fit_job(_fit_args(one_process_store, tmp_path / "run")))
  assert all(code == 0 for code, _ in ended), ended
  _assert_same_run(str(tmp_path / "run"), one_process_run)


@pytest.mark.parametrize("where", ["epoch", "mid-epoch", "epoch on S3"])
def test_a_killed_process_takes_the_fit_down_and_the_job_resumes(tmp_path, one_process_store, one_process_run,
                                                                  where, request):
  """SIGKILLed after the first epoch's checkpoint, or SIGTERMed (as `scancel` does; JAX's preemption notifier would
  swallow it) after a checkpoint inside the second epoch (90 steps each); and a run dir on S3, whose checkpoints
  process 0 uploads and each process restores on its own."""
  if where == "epoch on S3":
    request.getfixturevalue("s3")
    out = f"s3://{conftest.BUCKET}/distributed/run"
    saved = lambda: 1 in conftest.listed_checkpoints(out)  # noqa: E731
  else:
    out = tmp_path / "run"
    saved = lambda: (1 in conftest.listed_checkpoints(out) if where == "epoch" else  # noqa: E731
                     120 in conftest.listed_checkpoints(out, "checkpoints_mid"))
  args = _fit_args(one_process_store, out) + (["--checkpoint-every-steps", "30"] if where == "mid-epoch" else [])
  job = _fit_job(args, heartbeat=5)
  _kill_the_second_process_once(job, saved, signal.SIGKILL if where != "mid-epoch" else signal.SIGTERM)
  assert not storage.exists(f"{out}/{files.FINAL_FILE}")
  ended = _wait(_fit_job(args))
  assert all(code == 0 for code, _ in ended), ended
  assert ("of epoch 2 of 3" if where == "mid-epoch" else "after epoch 1 of 3") in ended[0][1], ended[0][1]
  _assert_same_run(str(out), one_process_run)


def test_processes_started_with_other_settings_fail_together(tmp_path, one_process_store):
  started = time.monotonic()
  ended = _wait(_fit_job(_fit_args(one_process_store, tmp_path / "run"), per_process={1: ["--lr", "0.01"]}),
                timeout=120)
  assert time.monotonic() - started < 60
  assert [code for code, _ in ended] == [2, 2], ended
  for _, err in ended:  # The same line from every process, naming the flags.
    assert "process 1 of the job was started with other settings than process 0: --lr 0.01 vs 0.003" in err, err
  assert "Start every process of the job with the same flags" in ended[1][1]
  assert not os.path.exists(tmp_path / "run")  # Refused before process 0 made the run dir.
  assert "Traceback" not in ended[0][1] + ended[1][1]


INTERLEAVED = """
import sys
import jax, numpy as np
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jax.experimental import multihost_utils
from shared.parallel import batch_sharding, process_rows
first, second = ([d for d in jax.devices() if d.process_index == p] for p in (0, 1))
by_process = [first[0], second[0], first[1], second[1]]
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=by_process)
rows = process_rows(mesh, 8)
batch = jax.make_array_from_process_local_data(batch_sharding(mesh), 10 * rows)
print("rows", rows.tolist(), "batch", np.asarray(multihost_utils.process_allgather(batch, tiled=True)).tolist())
"""


def test_process_rows_follow_a_mesh_that_interleaves_processes(tmp_path):
  """On a mesh that alternates the processes' devices (as a TPU pod's topology order may), each process's rows of a
  batch are not one block; placed as `process_rows` says, the global batch is still the one every process drew."""
  port, script = conftest.free_port(), tmp_path / "interleaved.py"
  script.write_text(INTERLEAVED)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  job = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) for i in range(2)]
  outputs = [p.communicate(timeout=120) for p in job]
  assert [p.returncode for p in job] == [0, 0], [err.decode()[-2000:] for _, err in outputs]
  want = "batch [0, 10, 20, 30, 40, 50, 60, 70]"
  assert outputs[0][0].decode().splitlines()[-1] == f"rows [0, 1, 4, 5] {want}"  # After Gloo's own lines.
  assert outputs[1][0].decode().splitlines()[-1] == f"rows [2, 3, 6, 7] {want}"
