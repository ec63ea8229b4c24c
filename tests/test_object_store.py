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
from shared import outputs, storage
from shared.cache import open_cache
from shared.errors import StillroomError
from student_train.config import FitConfig
from student_train.sweep import run_sweep
from student_train.train import fit
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.cli import main as cache_main
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


def test_build_verify_fit_on_s3(s3, tmp_path, data_dir, teachers, local_store, capsys):
  url = _build(f"s3://{BUCKET}/first/c.zarr", data_dir, teachers)
  assert open_cache(url).complete
  assert _objects(s3, url) == conftest.array_files(local_store)  # Byte for byte, every chunk of every array.
  checks = verify_cache(url, data_dir=data_dir)
  assert len(checks) >= 8 and all(check.ok for check in checks), [c for c in checks if not c.ok]
  code, out, _ = conftest.run_cli(cache_main, ["info", url, "--json"], capsys)
  assert code == 0 and abs(json.loads(out)["bytes"] - storage.size(local_store)) < 100  # zarr.json timestamps.
  assert not s3.exists(f"{BUCKET}/first/c.zarr.lock")  # The lease is released.
  options = {"model": "mlp-small", "epochs": 1, "batch_size": 128, "progress": False, "data_dir": data_dir}
  from_s3 = fit(FitConfig(cache=url, out=str(tmp_path / "s3run"), **options), log_epochs=False)
  from_disk = fit(FitConfig(cache=local_store, out=str(tmp_path / "run"), **options), log_epochs=False)
  for name in ("loss", "eval_accuracy", "eval_nll"):
    assert from_s3[name] is not None and from_s3[name] == from_disk[name]
  with open(tmp_path / "s3run" / "config.json") as f:
    assert json.load(f)["paths"]["cache"] == url


def test_a_sweep_from_a_cache_on_s3(s3, tmp_path, data_dir, teachers):
  url = _build(f"s3://{BUCKET}/sweep/c.zarr", data_dir, teachers, views=2)
  base = FitConfig(model="mlp-small", epochs=1, batch_size=256, progress=False, data_dir=data_dir)
  runs = run_sweep(url, "temperature=2,8", str(tmp_path / "sweep"), base=base)
  assert len(runs) == 2 and all(os.path.exists(os.path.join(run, "final.json")) for run in runs)
  with open(tmp_path / "sweep" / "sweep.json") as f:
    assert json.load(f)["cache"] == url


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


def test_the_lease_is_renewed_and_a_writer_that_lost_it_leaves_it_alone(s3, monkeypatch):
  url, key = f"s3://{BUCKET}/renewed/c.zarr", f"{BUCKET}/renewed/c.zarr.lock"
  monkeypatch.setattr(outputs, "LEASE_SECONDS", 2.0)  # Renewed every 0.5 s.
  lease = outputs.OutputLock(url, "teacher-cache build").acquire()
  time.sleep(3)  # Older than a lease, had it not been renewed.
  with pytest.raises(StillroomError, match="is being written by process"):
    outputs.OutputLock(url, "student-train fit").acquire()
  s3.pipe_file(key, json.dumps({"pid": 2, "host": "other", "token": "theirs"}).encode())  # Taken over meanwhile.
  time.sleep(1.5)
  assert lease.lost
  lease.release()
  assert json.loads(s3.cat_file(key))["token"] == "theirs"  # Not renewed over, not deleted.
  s3.rm(key)


def test_file_urls_are_local_paths(tmp_path, data_dir, teachers, local_store):
  url = _build(f"file://{tmp_path}/c.zarr", data_dir, teachers)
  assert open_cache(url).complete and open_cache(str(tmp_path / "c.zarr")).complete
  assert conftest.array_files(tmp_path / "c.zarr") == conftest.array_files(local_store)
  assert not os.path.exists("file:")  # No stray folder for the lock.


def test_urls_where_only_local_paths_work_yet_are_refused(s3, tmp_path, data_dir, teachers):
  with pytest.raises(StillroomError, match="unsupported URL scheme"):
    _build("ftp://host/c.zarr", data_dir, teachers)
  with pytest.raises(StillroomError, match=f"--teacher 's3://{BUCKET}/t0': only caches live on object storage"):
    _build(str(tmp_path / "c.zarr"), data_dir, [f"s3://{BUCKET}/t0", teachers[1]])
  with pytest.raises(StillroomError, match=f"--out 's3://{BUCKET}/run': only caches"):
    fit(FitConfig(dataset="digits", data_dir=data_dir, out=f"s3://{BUCKET}/run"))
  with pytest.raises(StillroomError, match=f"--data-dir 's3://{BUCKET}/tfds': only caches"):
    fit(FitConfig(dataset="digits", data_dir=f"s3://{BUCKET}/tfds", out=str(tmp_path / "run")))
  assert not os.path.exists("s3:")


def test_an_unreachable_endpoint_is_one_line(tmp_path):
  env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO}
  ended = subprocess.run([sys.executable, "-c", "from teacher_cache.cli import main\nmain(['verify', "
                          f"'s3://{BUCKET}/c.zarr'])"], env=env, capture_output=True, text=True, timeout=120)
  assert ended.returncode == 2 and "Traceback" not in ended.stderr, ended.stderr
  assert "error: object storage: EndpointConnectionError" in ended.stderr and "AWS_ENDPOINT_URL" in ended.stderr
