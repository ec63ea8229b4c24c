"""Stores on object storage (`s3://`), against moto's S3 server on 127.0.0.1: build -> verify -> fit, a killed
build resumed to the uninterrupted store, a second writer refused, a stale lease taken over, --overwrite."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import conftest
from shared import outputs
from shared.cache import open_cache
from shared.errors import StillroomError
from student_train.config import FitConfig
from student_train.train import fit
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.verify import verify_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "stillroom-test"


@pytest.fixture(scope="module")
def s3():
  """A moto S3 server on 127.0.0.1 with one bucket; the AWS SDK finds it through its standard environment
  (`AWS_ENDPOINT_URL`, dummy credentials), as every process started from here does."""
  from moto.server import ThreadedMotoServer  # pylint: disable=import-outside-toplevel
  server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
         "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import s3fs  # pylint: disable=import-outside-toplevel
  s3fs.S3FileSystem.clear_instance_cache()  # One made before the endpoint was set would talk to AWS.
  fs = s3fs.S3FileSystem()
  fs.mkdir(BUCKET)
  yield fs
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  server.stop()


def _objects(fs, url: str) -> dict[str, str]:
  """SHA-256 of every object under a URL but the Zarr metadata (`zarr.json`, which holds timestamps), by key."""
  prefix = url.removeprefix("s3://")
  fs.invalidate_cache()
  return {key[len(prefix) + 1:]: hashlib.sha256(fs.cat_file(key)).hexdigest() for key in fs.find(prefix)
          if not key.endswith("zarr.json")}


def _build(out: str, data_dir: str, teachers: list[str], **options) -> str:
  build_cache(BuildConfig(dataset="digits", data_dir=data_dir, teachers=(teachers[0], teachers[1]), out=out,
                          progress=False, **{"views": 4, "chunk_rows": 256, "batch_size": 64, **options}))
  return out


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, data_dir, teachers) -> str:
  return _build(str(tmp_path_factory.mktemp("local") / "c.zarr"), data_dir, teachers)


def test_build_verify_fit_on_s3(s3, tmp_path, data_dir, teachers, local_store):
  url = _build(f"s3://{BUCKET}/first/c.zarr", data_dir, teachers)
  assert open_cache(url).complete
  assert _objects(s3, url) == conftest.array_files(local_store)  # Byte for byte, every chunk of every array.
  checks = verify_cache(url, data_dir=data_dir)
  assert all(check.ok for check in checks), [c for c in checks if not c.ok]
  assert not s3.exists(f"{BUCKET}/first/c.zarr.lock")  # The lease is released.
  options = {"model": "mlp-small", "epochs": 1, "batch_size": 128, "progress": False, "data_dir": data_dir}
  from_s3 = fit(FitConfig(cache=url, out=str(tmp_path / "s3run"), **options), log_epochs=False)
  from_disk = fit(FitConfig(cache=local_store, out=str(tmp_path / "run"), **options), log_epochs=False)
  for name in ("loss", "eval_accuracy", "eval_nll"):
    assert from_s3[name] == from_disk[name]
  with open(tmp_path / "s3run" / "config.json") as f:
    assert json.load(f)["paths"]["cache"] == url


def _cli_build(out: str, data_dir: str, teachers: list[str]) -> subprocess.Popen:
  args = ["build", "--dataset", "digits", "--data-dir", data_dir, "--teacher", teachers[0], "--teacher", teachers[1],
          "--views", "4", "--chunk-rows", "256", "--batch-size", "64", "--out", out, "--no-progress", "--workers", "0"]
  code = f"from teacher_cache.cli import main\nmain({args!r})"
  return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_killed_build_on_s3_resumes_to_the_uninterrupted_store(s3, data_dir, teachers, local_store):
  url = f"s3://{BUCKET}/killed/c.zarr"
  committed = f"{BUCKET}/killed/c.zarr/chunk_committed/c"
  process = _cli_build(url, data_dir, teachers)
  deadline = time.monotonic() + 300
  while process.poll() is None and time.monotonic() < deadline:
    s3.invalidate_cache()
    if s3.exists(committed) and len(s3.ls(committed)) >= 5:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL, "the build finished before it could be killed"
  with pytest.raises(StillroomError, match="not complete"):
    open_cache(url)
  # The dead build's lease is still there: a rerun within its lifetime is refused, naming the holder.
  with pytest.raises(StillroomError, match="is being written by process"):
    _build(url, data_dir, teachers)
  s3.rm(f"{BUCKET}/killed/c.zarr.lock")  # As if its lease had run out.
  resumed = _cli_build(url, data_dir, teachers)
  _, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err.decode()[-2000:]
  assert "already committed" in err.decode()
  assert open_cache(url).complete
  assert _objects(s3, url) == conftest.array_files(local_store)


def test_a_second_writer_is_refused_and_a_stale_lease_taken_over(s3, data_dir, teachers, monkeypatch):
  url = f"s3://{BUCKET}/locked/c.zarr"
  with outputs.OutputLock(url, "teacher-cache build"):
    with pytest.raises(StillroomError, match=f"'{url}' is being written by process {os.getpid()}"):
      _build(url, data_dir, teachers)
    with pytest.raises(StillroomError, match="is being written by"):
      outputs.OutputLock(url, "student-train fit").acquire()
  assert not s3.exists(f"{BUCKET}/locked/c.zarr.lock")
  # A lease its writer stopped renewing is taken over once it is older than LEASE_SECONDS.
  s3.pipe_file(f"{BUCKET}/locked/c.zarr.lock", json.dumps({"pid": 1, "host": "gone"}).encode())
  monkeypatch.setattr(outputs, "LEASE_SECONDS", 1.0)
  time.sleep(1.5)
  lease = outputs.OutputLock(url, "teacher-cache build").acquire()
  assert json.loads(s3.cat_file(f"{BUCKET}/locked/c.zarr.lock"))["pid"] == os.getpid()
  lease.release()


def test_overwrite_on_s3_replaces_only_a_stillroom_store(s3, data_dir, teachers, local_store):
  url = _build(f"s3://{BUCKET}/over/c.zarr", data_dir, teachers, views=2)
  with pytest.raises(StillroomError, match="holds a cache built with other settings"):
    _build(url, data_dir, teachers)
  _build(url, data_dir, teachers, overwrite=True)
  assert _objects(s3, url) == conftest.array_files(local_store)
  s3.pipe_file(f"{BUCKET}/notours/data.bin", b"precious")
  with pytest.raises(StillroomError, match="is not a stillroom store, so it is left alone"):
    _build(f"s3://{BUCKET}/notours", data_dir, teachers, overwrite=True)
  assert s3.cat_file(f"{BUCKET}/notours/data.bin") == b"precious"


def test_urls_of_other_schemes_are_refused(data_dir, teachers):
  with pytest.raises(StillroomError, match="unsupported URL scheme"):
    _build("ftp://host/c.zarr", data_dir, teachers)
