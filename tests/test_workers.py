"""Input worker processes (`shared.workers`): same batches and stores with any worker count, spawned workers, bounded
read-ahead, errors from a worker, and no worker outliving a killed parent."""

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import conftest
from shared.augment import Augmentation
from shared.data import open_transfer_set
from shared.errors import StillroomError
from shared.shapes import ShapesConfig, write_shapes
from shared.workers import BatchRenderer, render_rows, resolve_workers
from student_train.loader import ArrayLoader, CacheLoader
from teacher_cache.build import BuildConfig, build_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp("shapes") / "s")
  write_shapes(root, ShapesConfig(train_per_class=10, test_per_class=2, min_side=20, max_side=48))
  return root


def _epoch(loader, epoch: int) -> list[dict]:
  try:
    return list(loader.epoch(epoch))
  finally:
    loader.close()


def _assert_same_batches(first: list[dict], second: list[dict]) -> None:
  assert len(first) == len(second) and len(first) > 1
  for a, b in zip(first, second):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_and_stores_are_the_same_with_any_worker_count(shapes, tmp_path):
  data = open_transfer_set(f"imagefolder:{shapes}/train")
  views = Augmentation(seed=3, image_size=16, flip=True)
  hard = [_epoch(ArrayLoader(data, batch_size=24, seed=1, augmentation=views, augment=True, workers=workers), 1)
          for workers in (0, 2)]
  _assert_same_batches(*hard)
  # The reference: each batch rendered directly from its rows' view ids, in this process.
  for batch in hard[0]:
    rows = batch["mask"] > 0
    position = data.positions(batch["index"][rows])
    expected = render_rows(data, views, {"position": position, "index": batch["index"][rows],
                                         "view": np.full(rows.sum(), 2, np.int32)})
    np.testing.assert_array_equal(batch["x"][rows], expected["x"])
  teacher = conftest.make_teacher(tmp_path / "t", model="cnn-small", input_shape=(16, 16, 3),
                                  normalization={"shift": 0.0, "scale": 255.0})
  stores = []
  for workers in (0, 2):
    out = str(tmp_path / f"c{workers}.zarr")
    with _counted_decodes() as decoded, _submitted_rows() as submitted:
      build_cache(BuildConfig(dataset=f"imagefolder:{shapes}/train", eval_dataset=f"imagefolder:{shapes}/test",
                              teachers=(teacher,), image_size=16, views=4, flip=True, chunk_rows=32, batch_size=12,
                              out=out, progress=False, workers=workers))
    test = open_transfer_set(f"imagefolder:{shapes}/test")
    if workers == 0:  # Every image decoded once: each of the 4 views of a training image, and its one eval row.
      assert decoded == {(root, key): 1 for root, count in ((f"{shapes}/train", len(data)),
                                                            (f"{shapes}/test", len(test)))
                         for key in range(count)}
    else:  # Decoded in the workers: each gets every row of an image in one part, whose image it reads once.
      assert not decoded
      train = [part["position"] for part in submitted if (part["view"] > 0).any()]
      assert sorted(np.concatenate([np.unique(p) for p in train]).tolist()) == list(range(len(data)))
      assert all(np.array_equal(np.bincount(p, minlength=len(data))[np.unique(p)], np.full(len(np.unique(p)), 4))
                 for p in train)
    stores.append(conftest.array_files(out))
  assert stores[0] == stores[1]
  from shared.cache import open_cache  # pylint: disable=import-outside-toplevel
  cached = [_epoch(CacheLoader(open_cache(str(tmp_path / "c0.zarr")), data, batch_size=24, seed=0,
                               fields=("targets",), workers=workers), 0) for workers in (0, 2)]
  _assert_same_batches(*cached)


@contextlib.contextmanager
def _counted_decodes():
  """Counts the images `imagefolder:` decodes in this process: {(root, key): decodes}."""
  from shared.data.imagefolder import ImageFolderSource  # pylint: disable=import-outside-toplevel
  counts: collections.Counter = collections.Counter()
  decode = ImageFolderSource._decode  # pylint: disable=protected-access

  def counted(self, key):
    counts[(self.root, key)] += 1
    return decode(self, key)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(ImageFolderSource, "_decode", counted)
    yield counts


@contextlib.contextmanager
def _submitted_rows():
  """The row parts sent to input worker processes."""
  import shared.workers  # pylint: disable=import-outside-toplevel
  parts, submit = [], shared.workers._submit  # pylint: disable=protected-access

  def recorded(pool, fn, *args):
    parts.extend(args)
    return submit(pool, fn, *args)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(shared.workers, "_submit", recorded)
    yield parts


def test_workers_default_to_none_for_arrays_in_memory(shapes, data_dir):
  assert resolve_workers(None, open_transfer_set("digits", "train", data_dir)) == 0
  assert resolve_workers(None, open_transfer_set(f"imagefolder:{shapes}/train")) >= 1
  assert resolve_workers(3, open_transfer_set("digits", "train", data_dir)) == 3


def _inherited_marker() -> bool:
  return hasattr(sys.modules["shared.workers"], "_TEST_MARKER")


def test_workers_are_spawned_not_forked(shapes):
  """A forked worker would inherit this process's modules as they are now, marker included; a spawned one
  imports them afresh."""
  import shared.workers  # pylint: disable=import-outside-toplevel
  data = open_transfer_set(f"imagefolder:{shapes}/train")
  shared.workers._TEST_MARKER = True  # pylint: disable=protected-access
  try:
    with BatchRenderer(data, Augmentation(image_size=8), workers=1) as renderer:
      assert renderer._pool.submit(_inherited_marker).result() is False  # pylint: disable=protected-access
  finally:
    del shared.workers._TEST_MARKER  # pylint: disable=protected-access


def test_read_ahead_is_bounded(shapes):
  data = open_transfer_set(f"imagefolder:{shapes}/train")
  produced = []

  def plans():
    for k in range(40):
      produced.append(k)
      yield {"position": np.array([k % len(data)]), "index": data.indices[[k % len(data)]],
             "view": np.zeros(1, np.int32)}
  for workers in (0, 1):
    produced.clear()
    with BatchRenderer(data, Augmentation(image_size=8), workers=workers, prefetch=3) as renderer:
      stream = renderer(plans())
      next(stream)
      time.sleep(1.0)
      # One consumed, one in each worker, `prefetch` rendered, one waiting to be handed over, one being produced.
      assert len(produced) <= 1 + workers + 3 + 2, (workers, len(produced))
      assert len(list(stream)) == 39


def test_a_worker_error_names_the_example_and_stops_the_stream(shapes, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  broken = tmp_path / "broken"
  shutil.copytree(f"{shapes}/train", broken)
  data = open_transfer_set(f"imagefolder:{broken}")
  with open(broken / "circle" / "00003.jpg", "wb") as f:
    f.write(b"not a jpeg")
  loader = ArrayLoader(data, batch_size=16, seed=0, augmentation=Augmentation(image_size=8), workers=2)
  with pytest.raises(StillroomError, match=r"cannot decode example index \d+ \(.*circle/00003.jpg\)"):
    _epoch(loader, 0)


def test_fit_with_workers_logs_the_same_metrics_as_without(shapes, tmp_path, capsys):
  from student_train.cli import main  # pylint: disable=import-outside-toplevel
  lines = []
  for workers in (0, 2):
    out = tmp_path / f"run{workers}"
    code, _, err = conftest.run_cli(main, [
        "fit", "--dataset", f"imagefolder:{shapes}/train", "--eval-dataset", f"imagefolder:{shapes}/test",
        "--image-size", "16", "--augment", "--epochs", "2", "--batch-size", "32", "--workers", str(workers),
        "--no-progress", "--out", str(out)], capsys)
    assert code == 0, err
    lines.append([{k: v for k, v in line.items() if k not in ("seconds", "rows_per_second")}
                  for line in map(json.loads, open(out / "metrics.jsonl"))])
  assert lines[0] == lines[1]


def test_no_worker_outlives_a_killed_parent(shapes, tmp_path):
  script = textwrap.dedent(f"""
      import sys, time
      import numpy as np
      sys.path.insert(0, {REPO!r})
      from shared.augment import Augmentation
      from shared.data import open_transfer_set
      from shared.workers import BatchRenderer
      data = open_transfer_set("imagefolder:{shapes}/train")
      renderer = BatchRenderer(data, Augmentation(image_size=8), workers=2)
      plans = ({{"position": np.array([0]), "index": data.indices[[0]], "view": np.zeros(1, np.int32)}}
               for _ in range(4))
      list(renderer(plans))
      print(" ".join(str(p) for p in renderer._pool._processes), flush=True)
      time.sleep(600)
  """)
  parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
  timer = threading.Timer(120, parent.kill)
  timer.start()
  try:
    workers = [int(p) for p in parent.stdout.readline().split()]
  finally:
    timer.cancel()
  assert len(workers) == 2
  os.kill(parent.pid, signal.SIGKILL)
  parent.wait()
  deadline = time.monotonic() + 15
  while time.monotonic() < deadline and any(_alive(p) for p in workers):
    time.sleep(0.2)
  assert not any(_alive(p) for p in workers)


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split()[2] != "Z"  # A zombie has exited (its parent is gone; init reaps it).
  except FileNotFoundError:
    return False


def _rows(data, count: int):
  for k in range(count):
    yield {"position": np.array([k % len(data)]), "index": data.indices[[k % len(data)]], "view": np.zeros(1, np.int32)}


def test_a_stream_stopped_early_or_failing_leaves_the_workers_usable(shapes):
  data = open_transfer_set(f"imagefolder:{shapes}/train")
  with BatchRenderer(data, Augmentation(image_size=8), workers=2) as renderer:
    stream = renderer(_rows(data, 30))
    next(stream)
    stream.close()  # A consumer that stops early (an exception in the training loop, a finished resume).

    def failing():
      yield from _rows(data, 3)
      raise ValueError("the producer failed")
    with pytest.raises(ValueError, match="the producer failed"):
      list(renderer(failing()))
    assert len(list(renderer(_rows(data, 5)))) == 5


def test_a_worker_that_dies_is_a_one_line_error(shapes):
  data = open_transfer_set(f"imagefolder:{shapes}/train")
  with BatchRenderer(data, Augmentation(image_size=8), workers=2) as renderer:
    assert len(list(renderer(_rows(data, 4)))) == 4
    os.kill(next(iter(renderer._pool._processes)), signal.SIGKILL)  # pylint: disable=protected-access
    with pytest.raises(StillroomError, match="an input worker process died"):
      list(renderer(_rows(data, 50)))


def test_negative_worker_counts_are_refused(shapes, tmp_path, capsys):
  from student_train.cli import main as fit_main  # pylint: disable=import-outside-toplevel
  from teacher_cache.cli import main as cache_main  # pylint: disable=import-outside-toplevel
  data = ["--dataset", f"imagefolder:{shapes}/train", "--image-size", "8"]
  code, _, err = conftest.run_cli(fit_main, ["fit", *data, "--workers", "-1", "--out", str(tmp_path / "r")], capsys)
  assert code != 0 and "--workers" in err and "must be >= 0" in err and "Traceback" not in err
  teacher = conftest.make_teacher(tmp_path / "t", input_shape=(8, 8, 3))
  code, _, err = conftest.run_cli(cache_main, ["build", *data, "--teacher", teacher, "--workers", "-5", "--out",
                                               str(tmp_path / "c.zarr")], capsys)
  assert code != 0 and "--workers must be >= 0" in err and "Traceback" not in err
  assert not os.path.exists(tmp_path / "c.zarr") and not os.path.exists(tmp_path / "r")


def _maps(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/maps") as f:
      return f.read()
  except OSError:
    return ""


def test_workers_of_the_console_scripts_do_not_load_jax(shapes, tmp_path):
  """A spawned worker imports the script that started its parent: through the console scripts, that must not
  cost it JAX. Sampled from /proc while a run decodes: a sample that shows PIL's decoder loaded was taken after the
  worker's imports."""
  script = os.path.join(os.path.dirname(sys.executable), "student-train")
  if not os.path.exists(script):
    pytest.skip("the student-train console script is not installed next to this Python")
  run = subprocess.Popen([script, "fit", "--dataset", f"imagefolder:{shapes}/train", "--image-size", "16",
                          "--augment", "--epochs", "30", "--batch-size", "8", "--eval-split", "none", "--workers",
                          "1", "--no-progress", "--out", str(tmp_path / "run")], stderr=subprocess.PIPE)
  decoding, with_jax = set(), set()
  deadline = time.monotonic() + 120
  try:
    while run.poll() is None and time.monotonic() < deadline and not decoding:
      children = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
      for child in map(int, children):
        maps = _maps(child)
        if "_imaging" in maps:
          decoding.add(child)
          if "jaxlib" in maps or "xla_extension" in maps:
            with_jax.add(child)
      time.sleep(0.05)
  finally:
    run.kill()
    run.wait()
  assert decoding, "no worker was seen decoding"
  assert not with_jax


def test_an_interrupt_python_discarded_stops_fit_and_build_at_their_next_step(shapes, tmp_path, capsys):
  """Ctrl-C raised inside a garbage-collection callback is only printed by Python; the recorded interrupt stops the
  loops at their next batch, as a run interrupted anywhere else stops (exit 130)."""
  import shared.errors  # pylint: disable=import-outside-toplevel
  from student_train.cli import main as fit_main  # pylint: disable=import-outside-toplevel
  from teacher_cache.cli import main as cache_main  # pylint: disable=import-outside-toplevel
  data = ["--dataset", f"imagefolder:{shapes}/train", "--image-size", "8", "--workers", "1"]
  teacher = conftest.make_teacher(tmp_path / "t", input_shape=(8, 8, 3))
  with pytest.raises(KeyboardInterrupt):
    shared.errors.note_interrupt(signal.SIGINT, None)
  try:
    for main, args in ((fit_main, ["fit", *data, "--no-progress", "--out", str(tmp_path / "r")]),
                       (cache_main, ["build", *data, "--teacher", teacher, "--no-progress", "--out",
                                     str(tmp_path / "c.zarr")])):
      code, _, err = conftest.run_cli(main, args, capsys)
      assert code == 130 and "interrupted; run the same command again to resume" in err, err
  finally:
    shared.errors._interrupted = False  # pylint: disable=protected-access
    signal.signal(signal.SIGINT, signal.default_int_handler)
