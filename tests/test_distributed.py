"""Jobs of several processes (`jax.distributed` on localhost, CPU collectives): a cache built by 2 processes is the
store 1 process builds, also when the job is killed and run again; a process that dies takes the job down."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import conftest
from shared.cache import open_cache
from shared.errors import StillroomError
from teacher_cache.build import BuildConfig, build_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _build_job(args: list[str], processes: int = 2, heartbeat: int = 10) -> list[subprocess.Popen]:
  """Starts the processes of one `teacher-cache build` job, each with one CPU device."""
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  job = []
  for index in range(processes):
    argv = ["build", *args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
            "--process-id", str(index), "--heartbeat-timeout", str(heartbeat), "--no-progress"]
    code = f"from teacher_cache.cli import main\nmain({argv!r})"
    job.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE))
  return job


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
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and job[0].poll() is None and \
      (not committed.exists() or len(os.listdir(committed)) < 2):
    time.sleep(0.01)
  job[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  code, err = _wait(job[:1], timeout=120)[0]
  job[1].wait()
  assert code != 0, err
  assert time.monotonic() - killed < 60
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
