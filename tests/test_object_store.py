"""Stores and run dirs on object storage, against local servers on 127.0.0.1: moto's S3 server (`s3://`) and
fake-gcs-server (`gs://`). build -> verify -> fit, a killed build and a killed fit resumed to the uninterrupted
result, a run dir as a teacher, a second writer refused, a stale lease taken over, --overwrite, datasets, sweeps."""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import conftest
from shared import outputs, storage
from shared.cache import open_cache
from shared.data import open_transfer_set
from shared.errors import StillroomError
from shared.runs import STAGING_PREFIX, checkpoint_manager, load_teacher
from shared.shapes import CLASSES, ShapesConfig, write_shapes
from student_train.cli import main as train_main
from student_train.config import FitConfig
from student_train.run_dir import read_final, read_metrics
from student_train.sweep import report, run_sweep
from student_train.train import fit
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.cli import main as cache_main
from teacher_cache.external import import_cache, write_views
from teacher_cache.verify import verify_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = conftest.BUCKET


@dataclasses.dataclass(frozen=True)
class Bucket:
  """The test bucket on one store: `url("a/b")` is `s3://stillroom-test/a/b` (or gs://), `key("a/b")` the same
  object's path in `fs`."""

  fs: object
  scheme: str

  def url(self, key: str) -> str:
    return f"{self.scheme}://{BUCKET}/{key}"

  def key(self, key: str) -> str:
    return f"{BUCKET}/{key}"


@pytest.fixture(params=["s3", "gs"])
def bucket(request) -> Bucket:
  """Each test that takes it runs on S3 and on GCS."""
  fs = request.getfixturevalue({"s3": "s3", "gs": "gcs"}[request.param])
  fs.invalidate_cache()
  return Bucket(fs, request.param)


def _objects(fs, url: str) -> dict[str, str]:
  """SHA-256 of every object under a URL but the Zarr metadata (`zarr.json`, which holds timestamps), by key."""
  prefix = url.split("://", 1)[1]
  fs.invalidate_cache()
  return {key[len(prefix) + 1:]: hashlib.sha256(fs.cat_file(key)).hexdigest() for key in fs.find(prefix)
          if not key.endswith("zarr.json")}


def _build(out: str, data_dir: str, teachers: list[str], **options) -> str:
  build_cache(BuildConfig(dataset="digits", data_dir=data_dir, teachers=tuple(teachers[:2]), out=out,
                          progress=False, **{"views": 4, "chunk_rows": 256, "batch_size": 64, **options}))
  return out


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, data_dir, teachers) -> str:
  return _build(str(tmp_path_factory.mktemp("local") / "c.zarr"), data_dir, teachers)


def test_build_verify_fit(bucket, tmp_path, data_dir, teachers, local_store, capsys):
  url = _build(bucket.url("first/c.zarr"), data_dir, teachers)
  assert open_cache(url).complete
  assert _objects(bucket.fs, url) == conftest.array_files(local_store)  # Byte for byte, every chunk of every array.
  checks = verify_cache(url, data_dir=data_dir)
  assert len(checks) >= 8 and all(check.ok for check in checks), [c for c in checks if not c.ok]
  code, out, _ = conftest.run_cli(cache_main, ["info", url, "--json"], capsys)
  assert code == 0 and abs(json.loads(out)["bytes"] - storage.size(local_store)) < 100  # zarr.json timestamps.
  assert not bucket.fs.exists(bucket.key("first/c.zarr.lock"))  # The lease is released.
  options = {"model": "mlp-small", "epochs": 1, "batch_size": 128, "progress": False, "data_dir": data_dir}
  remote = fit(FitConfig(cache=url, out=str(tmp_path / "remote"), **options), log_epochs=False)
  from_disk = fit(FitConfig(cache=local_store, out=str(tmp_path / "run"), **options), log_epochs=False)
  for name in ("loss", "eval_accuracy", "eval_nll"):
    assert remote[name] is not None and remote[name] == from_disk[name]
  with open(tmp_path / "remote" / "config.json") as f:
    assert json.load(f)["paths"]["cache"] == url


def test_a_sweep_from_a_cache_on_s3(s3, tmp_path, data_dir, teachers):
  url = _build(f"s3://{BUCKET}/sweep/c.zarr", data_dir, teachers, views=2)
  base = FitConfig(model="mlp-small", epochs=1, batch_size=256, progress=False, data_dir=data_dir)
  out = f"s3://{BUCKET}/sweep/runs"
  runs = run_sweep(url, "temperature=2,8", out, base=base)
  assert len(runs) == 2 and all(s3.exists(f"{run[5:]}/final.json") for run in runs)
  assert storage.read_json(f"{out}/sweep.json")["cache"] == url
  table = report(out)
  assert storage.read_text(f"{out}/report.md") == table + "\n" and "unfinished" not in table
  assert s3.cat_file(f"{out[5:]}/report_temperature.png").startswith(b"\x89PNG")


def _cli_build(out: str, data_dir: str, teachers: list[str]) -> subprocess.Popen:
  args = ["build", "--dataset", "digits", "--data-dir", data_dir, "--teacher", teachers[0], "--teacher", teachers[1],
          "--views", "4", "--chunk-rows", "256", "--batch-size", "64", "--out", out, "--no-progress", "--workers", "0"]
  code = f"from teacher_cache.cli import main\nmain({args!r})"
  return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_killed_build_resumes_to_the_uninterrupted_store(bucket, data_dir, teachers, local_store):
  url, fs = bucket.url("killed/c.zarr"), bucket.fs
  committed = bucket.key("killed/c.zarr/chunk_committed/c")
  process = _cli_build(url, data_dir, teachers)
  deadline = time.monotonic() + 300
  while process.poll() is None and time.monotonic() < deadline:
    fs.invalidate_cache()
    if fs.exists(committed) and len(fs.ls(committed)) >= 5:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL, "the build finished before it could be killed"
  with pytest.raises(StillroomError, match="not complete"):
    open_cache(url)
  assert fs.exists(bucket.key("killed/c.zarr.lock"))  # The dead build's lease is still there...
  resumed = _cli_build(url, data_dir, teachers)
  _, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err.decode()[-2000:]
  # ...and taken over at once, since its holder ran on this machine and is gone.
  assert f"left by process {process.pid}" in err.decode() and "(no longer running)" in err.decode()
  assert "already committed" in err.decode()
  assert open_cache(url).complete
  assert _objects(fs, url) == conftest.array_files(local_store)


def test_a_second_writer_is_refused_and_a_stale_lease_taken_over(bucket, data_dir, teachers, monkeypatch):
  url, fs, key = bucket.url("locked/c.zarr"), bucket.fs, bucket.key("locked/c.zarr.lock")
  with outputs.OutputLock(url, "teacher-cache build"):
    with pytest.raises(StillroomError, match=f"'{url}' is being written by process {os.getpid()}"):
      _build(url, data_dir, teachers)
    with pytest.raises(StillroomError, match="is being written by"):
      outputs.OutputLock(url, "student-train fit").acquire()
  assert not fs.exists(key)
  # A lease its writer stopped renewing is taken over once it is older than LEASE_SECONDS.
  fs.pipe_file(key, json.dumps({"pid": 1, "host": "gone"}).encode())
  monkeypatch.setattr(outputs, "LEASE_SECONDS", 1.0)
  time.sleep(1.5)
  lease = outputs.OutputLock(url, "teacher-cache build").acquire()
  assert json.loads(fs.cat_file(key))["pid"] == os.getpid()
  lease.release()


def test_overwrite_replaces_only_a_stillroom_store(bucket, data_dir, teachers, local_store):
  url, fs = _build(bucket.url("over/c.zarr"), data_dir, teachers, views=2), bucket.fs
  with pytest.raises(StillroomError, match="holds a cache built with other settings"):
    _build(url, data_dir, teachers)
  _build(url, data_dir, teachers, overwrite=True)
  assert _objects(fs, url) == conftest.array_files(local_store)
  fs.pipe_file(bucket.key("notours/data.bin"), b"precious")
  with pytest.raises(StillroomError, match="is not a stillroom store, so it is left alone"):
    _build(bucket.url("notours"), data_dir, teachers, overwrite=True)
  assert fs.cat_file(bucket.key("notours/data.bin")) == b"precious"


def test_the_lease_is_renewed_and_a_writer_that_lost_it_leaves_it_alone(bucket, monkeypatch):
  url, key, fs = bucket.url("renewed/c.zarr"), bucket.key("renewed/c.zarr.lock"), bucket.fs
  monkeypatch.setattr(outputs, "LEASE_SECONDS", 2.0)  # Renewed every 0.5 s.
  lease = outputs.OutputLock(url, "teacher-cache build").acquire()
  time.sleep(3)  # Older than a lease, had it not been renewed.
  with pytest.raises(StillroomError, match="is being written by process"):
    outputs.OutputLock(url, "student-train fit").acquire()
  fs.pipe_file(key, json.dumps({"pid": 2, "host": "other", "token": "theirs"}).encode())  # Taken over meanwhile.
  time.sleep(1.5)
  assert lease.lost
  lease.release()
  assert json.loads(fs.cat_file(key))["token"] == "theirs"  # Not renewed over, not deleted.
  fs.rm(key)


def test_file_urls_are_local_paths(tmp_path, data_dir, teachers, local_store):
  url = _build(f"file://{tmp_path}/c.zarr", data_dir, teachers)
  assert open_cache(url).complete and open_cache(str(tmp_path / "c.zarr")).complete
  assert conftest.array_files(tmp_path / "c.zarr") == conftest.array_files(local_store)
  assert not os.path.exists("file:")  # No stray folder for the lock.


def _params(run_dir: str) -> dict:
  """A run dir's latest parameters, as NumPy arrays, through the loader teachers use (a second reader of the run)."""
  return jax.tree.map(np.asarray, load_teacher(run_dir).params)


RUN = {"model": "mlp-small", "epochs": 3, "batch_size": 128, "workers": 0, "eval_split": "none",
       "checkpoint_every_steps": 5}  # 12 steps an epoch: checkpoints after steps 5 and 10 of each.


def _cli_fit(out: str, data_dir: str, *extra: str) -> subprocess.Popen:
  args = ["fit", "--dataset", "digits", "--data-dir", data_dir, "--out", out, "--no-progress",
          *(f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()), *extra]
  code = f"from student_train.cli import main\nmain({args!r})"
  return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _untimed(lines: list[dict]) -> list[dict]:
  return [{k: v for k, v in line.items() if "seconds" not in k and "per_s" not in k} for line in lines]


def test_a_run_dir_trains_resumes_after_a_kill_and_teaches(bucket, tmp_path, data_dir, capsys):
  url, key, fs = bucket.url("runs/teacher"), bucket.key("runs/teacher"), bucket.fs
  local = str(tmp_path / "teacher")
  fit(FitConfig(dataset="digits", data_dir=data_dir, out=local, progress=False, **RUN), log_epochs=False)
  process = _cli_fit(url, data_dir)
  deadline = time.monotonic() + 300
  while process.poll() is None and time.monotonic() < deadline:  # Until a checkpoint inside epoch 2 is committed.
    if [step for step in conftest.listed_checkpoints(url, "checkpoints_mid") if step > 12]:
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  assert not fs.exists(f"{key}/final.json")
  resumed = _cli_fit(url, data_dir)
  _, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err.decode()[-2000:]
  assert "of epoch 2 of 3" in err.decode(), err.decode()  # "resuming ... after step S of epoch 2 of 3"
  # The resumed run on the object store is the uninterrupted local run: its metrics lines (but for timings) and
  # parameters.
  assert _untimed(read_metrics(url)) == _untimed(read_metrics(local)) and len(read_metrics(url)) == 3
  assert read_final(url)["epochs"] == 3 and storage.read_json(f"{url}/config.json")["paths"]["out"] == url
  assert sorted(fs.ls(f"{key}/checkpoints")) == [f"{key}/checkpoints/{e}" for e in (2, 3)]  # Two kept.
  assert not fs.exists(f"{key}/checkpoints_mid") or not fs.ls(f"{key}/checkpoints_mid")
  jax.tree.map(np.testing.assert_array_equal, _params(url), _params(local))
  # It teaches: a cache built from it equals one built from the local run; `eval` reads it as the local run.
  remote = _build(str(tmp_path / "teacher_on_object_store.zarr"), data_dir, [url], views=1)
  on_disk = _build(str(tmp_path / "from_disk.zarr"), data_dir, [local], views=1)
  assert conftest.array_files(remote) == conftest.array_files(on_disk)
  evaluated = [conftest.run_cli(train_main, ["eval", run, "--dataset", "digits", "--data-dir", data_dir, "--split",
                                             "test"], capsys) for run in (url, local)]
  assert evaluated[0][0] == 0 and evaluated[0][1].split()[1:] == evaluated[1][1].split()[1:], evaluated
  # --overwrite replaces it, and only it.
  fs.pipe_file(f"{key}-sibling/keep", b"x")
  fit(FitConfig(dataset="digits", data_dir=data_dir, out=url, progress=False, overwrite=True, **RUN),
      log_epochs=False)
  assert _untimed(read_metrics(url)) == _untimed(read_metrics(local)) and fs.exists(f"{key}-sibling/keep")


def test_sigterm_releases_the_lease_and_the_staging_directory(s3, data_dir):
  url, key = f"s3://{BUCKET}/runs/terminated", f"{BUCKET}/runs/terminated"
  process = _cli_fit(url, data_dir)
  deadline = time.monotonic() + 300
  committed = f"{key}/checkpoints/1/commit_success.txt"
  while process.poll() is None and time.monotonic() < deadline and not s3.exists(committed):
    s3.invalidate_cache()
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)  # As a scheduler preempting the job does.
  _, err = process.communicate(timeout=120)
  assert process.returncode == 143 and "interrupted (SIGTERM); run the same command again" in err.decode(), err
  s3.invalidate_cache()
  assert not s3.exists(f"{key}.lock")
  assert not [name for name in os.listdir(tempfile.gettempdir()) if name.startswith(f"{STAGING_PREFIX}{process.pid}-")]


def test_staged_checkpoints_commit_last_and_leave_nothing_behind(bucket, monkeypatch):
  url, key, fs = bucket.url("staged/run"), bucket.key("staged/run/checkpoints"), bucket.fs
  manager = checkpoint_manager(url, max_to_keep=2)

  def save(step: int, value: float) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.full((3, 2), value, np.float32)})))

  def restore(step: int) -> np.ndarray:
    target = {"w": jax.ShapeDtypeStruct((3, 2), np.float32)}
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]["w"]

  save(1, 1.0)
  save(2, 2.0)
  fs.pipe_file(f"{key}/3/state/junk", b"half")  # Saves that a kill interrupted: never listed nor restored...
  fs.pipe_file(f"{key}/0/state/junk", b"half")
  assert manager.all_steps() == [1, 2]
  with pytest.raises(FileNotFoundError):
    restore(3)
  save(3, 3.0)  # ...replaced by the next save of the step, or dropped by a later one; the oldest of 3 is dropped.
  fs.invalidate_cache()
  assert manager.all_steps() == [2, 3] and sorted(k.split("/")[-1] for k in fs.ls(key)) == ["2", "3"]
  assert not fs.exists(f"{key}/3/state/junk") and restore(3).tolist() == [[3.0] * 2] * 3
  save(3, 4.0)  # A committed step saved again.
  assert restore(3).tolist() == [[4.0] * 2] * 3

  def killed(path):
    raise KeyboardInterrupt

  monkeypatch.setattr(storage, "remove_tree", killed)  # A deletion killed after it removed the commit object:
  with pytest.raises(KeyboardInterrupt):
    manager.delete(2)
  monkeypatch.undo()
  assert manager.all_steps() == [3]  # the step is gone from the list.
  staging = manager._staging  # pylint: disable=protected-access
  manager.close()
  assert not os.path.exists(staging)
  # A killed process's staging directory is removed by the next manager made on the machine.
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                        check=True).stdout.strip()
  stale = os.path.join(tempfile.gettempdir(), f"{STAGING_PREFIX}{gone}-test")
  os.makedirs(os.path.join(stale, "3"))
  checkpoint_manager(url).close()
  assert not os.path.exists(stale)


def test_datasets_read_as_their_local_copies(bucket, tmp_path):
  root = str(tmp_path / "shapes")
  write_shapes(root, ShapesConfig(train_per_class=3, test_per_class=1, min_side=20, max_side=40))
  deep = np.zeros((9, 7, 3), np.uint16)  # A 16-bit PNG: refused alike from both.
  Image.fromarray(deep[..., 0]).save(os.path.join(root, "train", max(CLASSES), "zz_deep.png"))
  np.savez(tmp_path / "a.npz", x=np.arange(60, dtype=np.float32).reshape(20, 3), y=np.arange(20) % 4)
  bucket.fs.put(root, bucket.key("data/shapes"), recursive=True)
  bucket.fs.pipe_file(bucket.key(f"data/shapes/train/{CLASSES[0]}/"), b"")  # A "folder" placeholder, as consoles make.
  bucket.fs.put_file(str(tmp_path / "a.npz"), bucket.key("data/a.npz"))
  for local, url in ((f"imagefolder:{root}/train", f"imagefolder:{bucket.url('data/shapes/train')}"),
                     (f"npz:{tmp_path}/a.npz", f"npz:{bucket.url('data/a.npz')}")):
    on_disk, remote = open_transfer_set(local), open_transfer_set(url)
    assert remote.fingerprint == on_disk.fingerprint and len(remote) == len(on_disk) == remote.base_count
    good = np.arange(len(on_disk) - (1 if "imagefolder" in local else 0))
    (x_disk, y_disk), (x_remote, y_remote) = on_disk.source.read(good), remote.source.read(good)
    np.testing.assert_array_equal(y_remote, y_disk)
    assert len(x_remote) == len(good) and all(np.array_equal(a, b) for a, b in zip(x_remote, x_disk))
    assert remote.source.record_bytes(good) == on_disk.source.record_bytes(good)
  with pytest.raises(StillroomError, match=r"zz_deep.png\) is a I;16 image"):
    remote = open_transfer_set(f"imagefolder:{bucket.url('data/shapes/train')}")
    remote.source.read(np.array([len(remote) - 1]))


def test_urls_where_only_local_paths_work_are_refused(s3, tmp_path, data_dir, teachers):
  with pytest.raises(StillroomError, match="unsupported URL scheme"):
    _build("ftp://host/c.zarr", data_dir, teachers)
  with pytest.raises(StillroomError, match=f"--data-dir 's3://{BUCKET}/tfds': TFDS reads"):
    fit(FitConfig(dataset="digits", data_dir=f"s3://{BUCKET}/tfds", out=str(tmp_path / "run")))
  assert not os.path.exists("s3:")


def test_an_unreachable_endpoint_is_one_line(tmp_path):
  env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO}
  ended = subprocess.run([sys.executable, "-c", "from teacher_cache.cli import main\nmain(['verify', "
                          f"'s3://{BUCKET}/c.zarr'])"], env=env, capture_output=True, text=True, timeout=120)
  assert ended.returncode == 2 and "Traceback" not in ended.stderr, ended.stderr
  assert "error: object storage: EndpointConnectionError" in ended.stderr and "AWS_ENDPOINT_URL" in ended.stderr


def test_views_and_import_on_a_bucket(bucket, tmp_path, data_dir):
  """Views written to a bucket equal local ones, and logits files in the bucket import to a store there that equals
  a local import."""
  config = BuildConfig(dataset="digits", data_dir=data_dir, views=2, chunk_rows=2000, progress=False)
  write_views(dataclasses.replace(config, out=bucket.url("views")))
  write_views(dataclasses.replace(config, out=str(tmp_path / "views")))
  assert _objects(bucket.fs, bucket.url("views")) == conftest.array_files(tmp_path / "views")
  logits = np.random.default_rng(0).normal(size=(2874, 10)).astype(np.float32)
  np.savez(tmp_path / "m.npz", row=np.arange(2874), logits=logits)
  bucket.fs.put_file(str(tmp_path / "m.npz"), bucket.key("logits/m.npz"))
  url = import_cache(dataclasses.replace(config, out=bucket.url("imported.zarr")), [bucket.url("logits/m.npz")])
  local = import_cache(dataclasses.replace(config, out=str(tmp_path / "c.zarr")), [str(tmp_path / "m.npz")])
  assert open_cache(url).complete and not [c for c in verify_cache(url, data_dir=data_dir) if c.failed]
  assert _objects(bucket.fs, url) == conftest.array_files(local)


def test_images_prepared_from_and_onto_a_bucket_by_a_worker_are_the_local_store(s3, tmp_path):
  from teacher_cache.prepare import PrepareConfig, prepare_images  # pylint: disable=import-outside-toplevel
  from test_prepared import write_images  # pylint: disable=import-outside-toplevel
  images = write_images(tmp_path / "images", count=6)
  s3.put(images, f"{BUCKET}/prepare/images", recursive=True)
  options = {"image_size": 8, "chunk_images": 4, "progress": False}
  local = prepare_images(PrepareConfig(dataset=f"imagefolder:{images}", out=str(tmp_path / "p.zarr"), workers=0,
                                       **options))
  url = f"s3://{BUCKET}/prepare/p.zarr"
  remote = prepare_images(PrepareConfig(dataset=f"imagefolder:s3://{BUCKET}/prepare/images", out=url, workers=1,
                                        **options))
  assert remote["fingerprint"] == local["fingerprint"] and remote["source_fingerprint"] == local["source_fingerprint"]
  assert not s3.exists(f"{BUCKET}/prepare/p.zarr.lock")  # The lease is released.
  on_disk, on_s3 = open_transfer_set(f"prepared:{tmp_path}/p.zarr"), open_transfer_set(f"prepared:{url}")
  keys = np.arange(len(on_disk))
  for a, b in zip(on_disk.source.read_canvas(keys), on_s3.source.read_canvas(keys)):
    np.testing.assert_array_equal(a, b)
