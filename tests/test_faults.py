"""The fault catalogue: damaged stores, full and read-only disks, concurrent writers, unsafe --overwrite, bad data,
bad settings and bad teachers. Each is refused with the right exit code and one line that names the problem, and
no existing store or run dir changes. The CLIs run in-process (`main(argv)`), so the module stays fast."""

import errno
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import zarr
from conftest import digits_cache, free_port, make_teacher, run_cli, tree_digest, write_documents

from shared.cache import COMPLETE_KEY, SPEC_KEY, open_cache
from shared.errors import StillroomError
from shared.runs import load_run_teacher
from student_train.cli import main as student_main
from teacher_cache.cli import main as cache_main

FAULTS = {}


def fault(name):
  """Registers a fault: a function of (env, tmp_path, monkeypatch) returning
  (main, argv, expected exit code, pattern of the one error line, paths that must not change)."""
  def register(function):
    FAULTS[name] = function
    return function
  return register


class Env:
  """What the faults act on: a complete store, a finished run dir, teachers, datasets."""


class Absent(str):
  """A path the refused command must not have created (its --out, refused before anything was written)."""


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir, teachers):
  e = Env()
  e.data_dir, e.teachers = data_dir, teachers[:2]
  e.store = digits_cache(tmp_path_factory, data_dir, e.teachers, split="train[:200]", chunk_rows=64)
  root = tmp_path_factory.mktemp("faults")
  e.run = str(root / "run")
  assert run_cli(student_main, ["fit", "--dataset", "digits", "--split", "train[:200]", "--data-dir", data_dir,
                                "--model", "mlp-tiny", "--epochs", "1", "--no-progress", "--out", e.run],
                 _NoCapture())[0] == 0
  e.notes = root / "notes"
  e.notes.mkdir()
  (e.notes / "thesis.txt").write_text("months of work")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  y = rng.integers(0, 3, 40)
  for name, arrays in {
      "ok": {"x": x, "y": y},
      "nan": {"x": np.where(np.arange(40)[:, None] == 7, np.nan, x).astype(np.float32), "y": y},
      "inf": {"x": np.where(np.arange(40)[:, None] == 9, np.inf, x).astype(np.float32), "y": y},
      "strings": {"x": np.array([[str(v) for v in row] for row in x]), "y": y},
      "complex": {"x": x + 1j * x, "y": y},
      "huge_label": {"x": x, "y": np.where(np.arange(40) == 3, 10 ** 9, y)},
  }.items():
    np.savez(root / f"{name}.npz", **arrays)
    setattr(e, f"npz_{name}", f"npz:{root / f'{name}.npz'}")
  e.flat_teacher = make_teacher(root / "flat_teacher", input_shape=(6,), num_classes=3,
                                normalization={"shift": 0.0, "scale": 1.0})
  (root / "bad_teachers.py").write_text(textwrap.dedent("""
      import jax.numpy as jnp
      import numpy as np
      W = jnp.asarray(np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32))

      def ignores_batch():  # Averages over the batch: one row of logits for any batch.
        return (lambda params, x: jnp.mean(x.reshape(len(x), -1), axis=0, keepdims=True) @ params), W

      def one_dimensional():
        return (lambda params, x: (x.reshape(len(x), -1) @ params).sum(-1)), W
      """))
  e.root = root
  return e


class _NoCapture:
  def readouterr(self):
    return type("Captured", (), {"out": "", "err": ""})()


def _build(env, out, *extra, split="train[:200]", teachers=None):
  return ["build", "--dataset", "digits", "--split", split, "--data-dir", env.data_dir, "--chunk-rows", "64",
          "--views", "2", *[a for t in (teachers or env.teachers) for a in ("--teacher", t)], "--out", str(out),
          "--no-progress", *extra]


def _fit(env, *extra):
  return ["fit", "--data-dir", env.data_dir, "--model", "mlp-tiny", "--epochs", "1", "--no-progress", *extra]


def _copy_store(env, tmp_path) -> str:
  copy = str(tmp_path / "c.zarr")
  shutil.copytree(env.store, copy)
  return copy


def _chunk(store, array, chunk):
  ndim = len(json.load(open(os.path.join(store, array, "zarr.json")))["shape"])
  return os.path.join(store, array, "c", str(chunk), *["0"] * (ndim - 1))


def _flip_byte(path, offset=40):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0xFF]))


def _edit_spec(store, edit):
  path = os.path.join(store, "zarr.json")
  meta = json.load(open(path))
  edit(meta["attributes"])
  json.dump(meta, open(path, "w"))


# --- Store damage ----------------------------------------------------------------------------------------------

@fault("fit on a store with a deleted chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  os.remove(_chunk(store, "targets", 2))
  return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2, r"array 'targets' is missing chunk",
          [store])


@fault("info on a store with a deleted chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  os.remove(_chunk(store, "member_logits", 1))
  return cache_main, ["info", store], 2, r"array 'member_logits' is missing chunk\(s\) 1", [store]


@fault("verify on a store with a deleted chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  os.remove(_chunk(store, "flip", 3))
  return (cache_main, ["verify", store, "--data-dir", env.data_dir], 1, r"FAIL  every chunk present.*flip: chunks 3",
          [store])


@fault("fit on a store with a byte-flipped targets chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _flip_byte(_chunk(store, "targets", 1))
  return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2,
          r"chunk 1 of array 'targets' is damaged \(ValueError: Stored and computed checksum", [store])


@fault("fit re-deriving targets from a byte-flipped member_logits chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _flip_byte(_chunk(store, "member_logits", 3))
  return (student_main, _fit(env, "--cache", store, "--temperature", "2", "--out", tmp_path / "r"), 2,
          r"chunk 3 of array 'member_logits' is damaged", [store])


@fault("info on a store with a byte-flipped chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _flip_byte(_chunk(store, "targets", 0))
  return cache_main, ["info", store], 2, r"chunk 0 of array 'targets' is damaged", [store]


@fault("verify on a store with a byte-flipped index chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _flip_byte(_chunk(store, "index", 2))
  return (cache_main, ["verify", store, "--data-dir", env.data_dir], 1,
          r"FAIL  chunks intact \(checksums\).*index chunk 2", [store])


@fault("fit on a store with a truncated chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  path = _chunk(store, "labels", 2)
  open(path, "r+b").truncate(50)
  return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2,
          r"chunk 2 of array 'labels' is damaged", [store])


@fault("verify on a store with a truncated chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  open(_chunk(store, "member_logits", 0), "r+b").truncate(10)
  return (cache_main, ["verify", store, "--data-dir", env.data_dir], 1, r"FAIL  chunks intact.*member_logits chunk 0",
          [store])


@fault("fit on a spec with a deleted key")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs[SPEC_KEY].pop("temperature"))
  return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2,
          r"spec is damaged or hand-edited: TypeError: .*temperature", [store])


@fault("fit on a spec with a key of the wrong type")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs[SPEC_KEY].update(views="two"))
  return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2, r"spec is damaged or hand-edited",
          [store])


@fault("fit on a spec whose class count was edited")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs[SPEC_KEY].update(num_classes=5))
  return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2,
          r"list of arrays does not match its settings", [store])


@fault("verify on a spec whose example count was edited")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs[SPEC_KEY]["dataset"].update(count=140))
  return cache_main, ["verify", store], 1, r"FAIL  spec .*list of arrays does not match", [store]


@fault("the build again on a complete store whose array metadata is gone")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  os.remove(os.path.join(store, "fold", "zarr.json"))
  return cache_main, _build(env, store), 2, r"damaged: array 'fold' is missing.*--overwrite", [store]


@fault("fit on a store whose array metadata is gone")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  os.remove(os.path.join(store, "targets", "zarr.json"))
  return student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2, r"array 'targets' is missing", [store]


@fault("fit on a store with an uncommitted chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  zarr.open_group(store, mode="r+")["chunk_committed"][2] = False
  return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2,
          r"chunk\(s\) of 'chunk_committed' are not committed \(first: chunk 2\)", [store])


@fault("fit on a store whose completion record was edited")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs[COMPLETE_KEY].update(rows=5))
  return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2,
          r"completion record says 5 rows, the spec 400", [store])


@fault("verify on a store whose completion record was edited")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs[COMPLETE_KEY].update(rows=401))
  return (cache_main, ["verify", store, "--data-dir", env.data_dir], 1,
          r"FAIL  complete .*completion record says 401 rows, the spec 400", [store])


@fault("verify on a store whose completion record is not an object")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs.update({COMPLETE_KEY: "yes"}))
  return (cache_main, ["verify", store, "--data-dir", env.data_dir], 1,
          r'FAIL  complete .*the completion record is "yes", not an object', [store])


@fault("fit on a store whose completion record is not an object")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs.update({COMPLETE_KEY: "yes"}))
  return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2,
          r'the completion record is "yes", not an object', [store])


@fault("fit on an incomplete store")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs.pop(COMPLETE_KEY))
  return student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2, r"is not complete", [store]


@fault("fit on a store with a damaged bookkeeping chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _flip_byte(_chunk(store, "chunk_committed", 1), offset=0)
  return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2,
          r"array 'chunk_committed' is damaged \(ValueError", [store, Absent(tmp_path / "r")])


@fault("verify on a store with a damaged bookkeeping chunk")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _flip_byte(_chunk(store, "chunk_committed", 2), offset=0)
  return (cache_main, ["verify", store, "--data-dir", env.data_dir], 1,
          r"FAIL  all chunks committed .*'chunk_committed' is damaged", [store])


@fault("info on a store with garbled array metadata")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  with open(os.path.join(store, "labels", "zarr.json"), "r+") as f:
    f.truncate(20)
  return cache_main, ["info", store], 2, r"the metadata of array 'labels' is unreadable", [store]


@fault("verify on a store with garbled array metadata")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  with open(os.path.join(store, "view", "zarr.json"), "r+") as f:
    f.truncate(20)
  return cache_main, ["verify", store], 1, r"FAIL  layout .*the metadata of array 'view' is unreadable", [store]


@fault("fit into a run dir with a garbled config.json")
def _(env, tmp_path, mp):
  run = tmp_path / "run"
  shutil.copytree(env.run, run)
  (run / "config.json").write_text("{not json")
  return (student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out", run), 2,
          r"cannot read config\.json", [run])


@fault("the build resumed into a read-only store")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs.pop(COMPLETE_KEY))
  zarr.open_group(store, mode="r+")["chunk_committed"][3] = False

  def read_only(self, key, value, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", os.path.join(str(self.root), key))

  mp.setattr(zarr.storage.LocalStore, "set", read_only)
  return cache_main, _build(env, store), 2, r"writing the cache failed: .*Read-only file system", [store]


@fault("fit into a read-only run dir")
def _(env, tmp_path, mp):
  import builtins
  run = str(tmp_path / "run")
  real_open = builtins.open

  def read_only(path, mode="r", *args, **kwargs):
    if str(path).startswith(run + os.sep) and any(flag in mode for flag in "wa+"):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real_open(path, mode, *args, **kwargs)

  mp.setattr(builtins, "open", read_only)
  return (student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out", run), 2,
          r"Read-only file system: .*run/config\.json", [])


# --- Full and read-only disks (patched writers) ------------------------------------------------------------------

def _no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


async def _no_space_async(*args, **kwargs):
  _no_space()


@fault("disk full while creating the arrays")
def _(env, tmp_path, mp):
  mp.setattr(zarr.AsyncGroup, "create_array", _no_space_async)
  return (cache_main, _build(env, tmp_path / "new.zarr"), 2, r"creating the store .* failed: No space left on device",
          [env.store])


@fault("disk full while writing chunks")
def _(env, tmp_path, mp):
  mp.setattr(zarr.AsyncArray, "setitem", _no_space_async)
  return (cache_main, _build(env, tmp_path / "new.zarr"), 2, r"writing the cache failed: .*No space left on device",
          [env.store])


@fault("disk full while writing the completion record")
def _(env, tmp_path, mp):
  import teacher_cache.build as build
  original = build.ChunkWriter.close

  def close_then_fill(self):
    original(self)
    mp.setattr(zarr.core.attributes.Attributes, "__setitem__", _no_space)

  mp.setattr(build.ChunkWriter, "close", close_then_fill)
  return (cache_main, _build(env, tmp_path / "new.zarr"), 2,
          r"writing the completion record of .* failed: No space left on device", [env.store])


@fault("disk full while checkpointing")
def _(env, tmp_path, mp):
  import orbax.checkpoint as ocp

  def full(*args, **kwargs):  # What orbax raises when tensorstore cannot write.
    raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device [os_error_code='28']")

  mp.setattr(ocp.CheckpointManager, "save", full)
  return (student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out", tmp_path / "r"), 2,
          r"saving the checkpoint of .* after epoch 1 failed: No space left on device", [env.run])


@fault("read-only output")
def _(env, tmp_path, mp):
  real_open = os.open

  def read_only(path, *args, **kwargs):
    if str(path).startswith(str(tmp_path)):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real_open(path, *args, **kwargs)

  mp.setattr(os, "open", read_only)
  return cache_main, _build(env, tmp_path / "new.zarr"), 2, r"Read-only file system: .*new\.zarr\.lock", [env.store]


@fault("build --out an existing file")
def _(env, tmp_path, mp):
  (tmp_path / "file").write_text("x")
  return cache_main, _build(env, tmp_path / "file"), 2, r"--out .*file' is a file", [tmp_path / "file"]


@fault("fit --out an existing file")
def _(env, tmp_path, mp):
  (tmp_path / "file").write_text("x")
  return (student_main, _fit(env, "--dataset", "digits", "--out", tmp_path / "file"), 2, r"--out .*file' is a file",
          [tmp_path / "file"])


# --- Concurrent writers ------------------------------------------------------------------------------------------

def _held_lock(out, tmp_path) -> subprocess.Popen:
  """Another live process holding the lock of `out`, as a build would (through `OutputLock`)."""
  code = ("import sys, time; from shared.outputs import OutputLock; OutputLock(sys.argv[1], 'teacher-cache build')"
          ".acquire(); print('held', flush=True); time.sleep(120)")
  holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
  assert holder.stdout.readline().strip() == "held"
  return holder


@fault("a second build into a store being built")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  env.holder = _held_lock(store, tmp_path)
  return (cache_main, _build(env, store), 2,
          rf"is being written by process {env.holder.pid} on .* \(teacher-cache build\) since 20\d\d-", [store])


@fault("build --overwrite of a store being built")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  env.holder = _held_lock(store, tmp_path)
  return cache_main, _build(env, store, "--temperature", "2", "--overwrite"), 2, r"is being written by process", [store]


@fault("a second fit into a run dir being trained")
def _(env, tmp_path, mp):
  run = tmp_path / "run"
  shutil.copytree(env.run, run)
  env.holder = _held_lock(run, tmp_path)
  return (student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out", run), 2,
          r"is being written by process", [run])


# --- Unsafe --overwrite ------------------------------------------------------------------------------------------

@fault("build --overwrite into a folder of notes")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, env.notes, "--overwrite"), 2, r"--overwrite: .*notes' is not a stillroom store",
          [env.notes])


@fault("build --overwrite into its own teacher's run dir")
def _(env, tmp_path, mp):
  teacher = tmp_path / "teacher"
  shutil.copytree(env.teachers[0], teacher)
  return (cache_main, _build(env, teacher, "--overwrite", teachers=[str(teacher)]), 2,
          r"is \(or holds, or lies inside\) this command's input", [teacher])


@fault("fit --overwrite into the cache it reads")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  return (student_main, _fit(env, "--cache", store, "--out", store, "--overwrite"), 2,
          r"this command's input", [store])


@fault("fit --overwrite into a folder of notes")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--out", env.notes, "--overwrite"), 2,
          r"not a stillroom run dir, so it is left alone", [env.notes])


@fault("fit --overwrite into a store")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  return (student_main, _fit(env, "--dataset", "digits", "--out", store, "--overwrite"), 2,
          r"is not a stillroom run dir", [store])


@fault("fit into a folder that is not a run dir, without --overwrite")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--out", env.notes), 2, r"exists and is not a run dir",
          [env.notes])


# --- Bad data ---------------------------------------------------------------------------------------------------

@fault("NaN in a dataset's inputs")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", env.npz_nan, "--out", tmp_path / "r"), 2,
          r"example index 7 has a non-finite input value", [Absent(tmp_path / "r")])


@fault("Inf in a dataset's inputs (build)")
def _(env, tmp_path, mp):
  return (cache_main, ["build", "--dataset", env.npz_inf, "--teacher", env.flat_teacher, "--out", tmp_path / "c.zarr"],
          2, r"example index 9 has a non-finite input value", [Absent(tmp_path / "c.zarr")])


@fault("string inputs")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", env.npz_strings, "--out", tmp_path / "r"), 2,
          r"inputs have dtype <U\d+; they must be real numbers", [Absent(tmp_path / "r")])


@fault("complex inputs")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", env.npz_complex, "--out", tmp_path / "r"), 2,
          r"inputs have dtype complex64; they must be real numbers", [Absent(tmp_path / "r")])


@fault("a label id of 10^9")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", env.npz_huge_label, "--out", tmp_path / "r"), 2,
          r"has 1,000,000,001 classes \(its largest label is 1,000,000,000\), more than --max-classes",
          [Absent(tmp_path / "r")])


@fault("eval of a run on labels outside its classes")
def _(env, tmp_path, mp):
  return (student_main, ["eval", env.flat_teacher, "--dataset", env.npz_huge_label, "--split", "train"], 2,
          r"example index 3 has label 1000000000, but run .* has 3 classes", [env.run])


@fault("a cache of another dataset")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--cache", env.store, "--split", "train[:100]", "--out", tmp_path / "r"), 2,
          r"is not the data the cache .* was built from", [env.store, Absent(tmp_path / "r")])


# --- Bad settings -----------------------------------------------------------------------------------------------

@fault("build --temperature inf")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", "--temperature", "inf"), 2,
          r"temperature must be > 0 and finite", [Absent(tmp_path / "c.zarr")])


@fault("build --temperature nan")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", "--temperature", "nan"), 2,
          r"temperature must be > 0 and finite", [Absent(tmp_path / "c.zarr")])


@fault("build --temperature too small for the logits")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", "--temperature", "1e-30"), 2,
          r"targets at T=1e-30 are not finite .* T is too small", [env.store])


@fault("fit --temperature inf")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--cache", env.store, "--temperature", "inf", "--out", tmp_path / "r"), 2,
          r"--temperature must be > 0 and finite, got inf", [env.store, Absent(tmp_path / "r")])


@fault("fit --lr nan")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--lr", "nan", "--out", tmp_path / "r"), 2,
          r"--lr must be > 0", [Absent(tmp_path / "r")])


@fault("fit --lr beyond float32")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--lr", "1e300", "--out", tmp_path / "r"), 2,
          r"--lr must be > 0", [Absent(tmp_path / "r")])


@fault("a run that diverges")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--lr", "1e30", "--batch-size",
                             "50", "--out", tmp_path / "r"), 2,
          r"diverged in epoch 1: its loss became non-finite at step \d of 4 .*pass --overwrite", [env.run])


@fault("--max-shift -2")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--augment", "--max-shift", "-2", "--out", tmp_path / "r"), 2,
          r"--max-shift must be in 0\.\.7 for 8x8 images, got -2", [Absent(tmp_path / "r")])


@fault("--max-shift 1000")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", "--max-shift", "1000"), 2, r"--max-shift must be in 0\.\.7",
          [Absent(tmp_path / "c.zarr")])


@fault("fit --seed -1")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--seed", "-1", "--out", tmp_path / "r"), 2,
          r"--seed must be in 0\.\.", [Absent(tmp_path / "r")])


@fault("fit --members 0,0")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--cache", env.store, "--members", "0,0", "--out", tmp_path / "r"), 2,
          r"--members \[0, 0\]: give distinct indices", [env.store, Absent(tmp_path / "r")])


@fault("fit --shuffle-window 0")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--cache", env.store, "--shuffle-window", "0", "--out", tmp_path / "r"), 2,
          r"--shuffle-window must be >= 1 chunk", [env.store, Absent(tmp_path / "r")])


@fault("distillation settings without a cache")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--temperature", "2", "--out", tmp_path / "r"), 2,
          r"--temperature sets distillation, which needs --cache", [Absent(tmp_path / "r")])


@fault("a sweep axis that repeats a value")
def _(env, tmp_path, mp):
  return (student_main, ["sweep", "--cache", env.store, "--grid", "temperature=1,2,1.0", "--out", tmp_path / "s",
                         "--data-dir", env.data_dir], 2, r"grid axis 'temperature' lists 1 twice",
          [env.store, Absent(tmp_path / "s")])


@fault("a sweep axis given twice")
def _(env, tmp_path, mp):
  return (student_main, ["sweep", "--cache", env.store, "--grid", "alpha=0.1;alpha=0.5", "--out", tmp_path / "s"], 2,
          r"grid axis 'alpha' is given twice", [env.store, Absent(tmp_path / "s")])


@fault("a run dir of another config")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--lr", "0.01", "--out", env.run),
          2, r"holds a run with another config: .*config\.lr: 0\.003 \(run dir\) vs 0\.01 \(command\)\. "
          r"Pass --overwrite",
          [env.run])


# --- Bad teachers -----------------------------------------------------------------------------------------------

@fault("a teacher that ignores the batch axis")
def _(env, tmp_path, mp):
  mp.chdir(env.root)
  return (cache_main, _build(env, tmp_path / "c.zarr", teachers=["bad_teachers:ignores_batch"]), 2,
          r"must return logits of shape \[batch, classes\]; for a batch of 64 of inputs \(8, 8, 1\) "
          r"it returned \(1, 10\)",
          [Absent(tmp_path / "c.zarr")])


@fault("a teacher that returns one number per example")
def _(env, tmp_path, mp):
  mp.chdir(env.root)
  return (cache_main, _build(env, tmp_path / "c.zarr", teachers=["bad_teachers:one_dimensional"]), 2,
          r"must return logits of shape \[batch, classes\]; for a batch of 64 of inputs \(8, 8, 1\) "
          r"it returned \(64,\)",
          [Absent(tmp_path / "c.zarr")])


@fault("a teacher that is a file")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", teachers=[str(env.notes / "thesis.txt")]), 2,
          r"thesis\.txt' is a file, not a run dir", [env.notes, Absent(tmp_path / "c.zarr")])


@fault("the same teacher twice")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", teachers=[env.teachers[0], env.teachers[0]]), 2,
          r"have the same parameters; an ensemble member given twice", [Absent(tmp_path / "c.zarr")])


@fault("a teacher for other inputs")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", teachers=[env.flat_teacher]), 2,
          r"teacher 'flat_teacher' \(mlp-small\) takes inputs of shape \(6,\), but 'digits' holds inputs of shape "
          r"\(8, 8, 1\)", [Absent(tmp_path / "c.zarr")])


# --- metrics, overwrite, read-only, processes ---------------------------------------------------------------------

def _unlabeled_npz(tmp_path, rows=20) -> str:
  """Flat inputs like `env.npz_ok`'s (6 features), without labels."""
  path = tmp_path / "unlabeled.npz"
  np.savez(path, x=np.random.default_rng(1).normal(size=(rows, 6)).astype(np.float32))
  return f"npz:{path}"


@fault("eval --batch-size 0")
def _(env, tmp_path, mp):
  return (student_main, ["eval", env.run, "--data-dir", env.data_dir, "--batch-size", "0"], 2,
          r"--batch-size must be >= 1, got 0", [env.run])


@fault("models --input-shape a,b")
def _(env, tmp_path, mp):
  return (student_main, ["models", "--input-shape", "a,b"], 2,
          r"--input-shape must be positive integers separated by commas, e\.g\. 8,8,1; got 'a,b'", [])


@fault("models --input-shape 8,0")
def _(env, tmp_path, mp):
  return cache_main, ["models", "--input-shape", "8,0"], 2, r"--input-shape must be positive integers", []


@fault("models --num-classes 1")
def _(env, tmp_path, mp):
  return student_main, ["models", "--num-classes", "1"], 2, r"--num-classes must be >= 2 \(a classifier\), got 1", []


@fault("a teacher factory that raises")
def _(env, tmp_path, mp):
  (tmp_path / "raising_teacher.py").write_text("def make():\n  raise RuntimeError('no weights here')\n")
  mp.chdir(tmp_path)
  return (cache_main, _build(env, tmp_path / "c.zarr", teachers=["raising_teacher:make"]), 2,
          r"teacher 'raising_teacher:make'\(\) failed: RuntimeError: no weights here; fix the function",
          [Absent(tmp_path / "c.zarr")])


@fault("a demo evaluated on an unlabeled split")
def _(env, tmp_path, mp):
  from stillroom.cli import student_train_main  # The command line with `demo`.
  return (student_train_main, ["demo", "--dataset", env.npz_ok, "--train-split", "train", "--eval-dataset",
                         _unlabeled_npz(tmp_path), "--test-split", "train", "--work-dir", tmp_path / "work",
                         "--results-dir", tmp_path / "results"], 2,
          r"unlabeled\.npz' 'train' is unlabeled; the demo compares accuracies on it",
          [Absent(tmp_path / "work"), Absent(tmp_path / "results")])


@fault("a job whose process 1 never joins")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", env.npz_ok, "--coordinator", f"127.0.0.1:{free_port()}",
                             "--num-processes", "2", "--process-id", "0", "--join-timeout", "1", "--out",
                             tmp_path / "r"), 2,
          r"cannot start the multi-process job: process\(es\) 1 of 2 did not join within 1 s", [Absent(tmp_path / "r")])


@fault("a job whose process 0 never comes")
def _(env, tmp_path, mp):
  return (cache_main, ["build", "--dataset", env.npz_ok, "--teacher", env.flat_teacher, "--coordinator",
                       f"127.0.0.1:{free_port()}", "--num-processes", "3", "--process-id", "2", "--join-timeout",
                       "1", "--out", tmp_path / "c.zarr"], 2,
          r"process 0 at 127\.0\.0\.1:\d+ did not take this process \(--process-id 2\) in within 1 s",
          [Absent(tmp_path / "c.zarr")])


@fault("fit --join-timeout 0")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", env.npz_ok, "--coordinator", "127.0.0.1:1", "--num-processes", "2",
                             "--process-id", "1", "--join-timeout", "0", "--out", tmp_path / "r"), 2,
          r"--join-timeout must be >= 1 second, got 0", [Absent(tmp_path / "r")])


def test_an_unlabeled_eval_set_reports_no_metrics_that_need_labels(env, tmp_path, capsys):
  """Accuracy, nll and ece are absent (not 0) from every metrics line, final.json and the log line; what needs no
  labels stays: the agreement with the teachers where the cache holds their logits on the eval set. A sweep's report
  shows empty cells, not 0 or nan."""
  unlabeled = _unlabeled_npz(tmp_path)
  code, _, err = run_cli(student_main, ["fit", "--dataset", env.npz_ok, "--eval-dataset", unlabeled, "--model",
                                        "mlp-tiny", "--epochs", "2", "--no-progress", "--out", tmp_path / "r"], capsys)
  assert code == 0, err
  assert "unlabeled.npz 'train' is unlabeled: no eval metrics are reported (accuracy, nll and ece need labels)" in err
  assert "eval accuracy" not in err and "nll" not in err.split("need labels")[1]
  lines = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
  final = json.load(open(tmp_path / "r" / "final.json"))
  assert len(lines) == 2 and not [key for line in lines + [final] for key in line if key.startswith("eval_")]
  store = str(tmp_path / "c.zarr")
  assert run_cli(cache_main, ["build", "--dataset", env.npz_ok, "--teacher", env.flat_teacher, "--eval-dataset",
                              unlabeled, "--out", store, "--no-progress"], capsys)[0] == 0
  code, _, err = run_cli(student_main, ["sweep", "--cache", store, "--grid", "temperature=1,2", "--model", "mlp-tiny",
                                        "--epochs", "1", "--no-progress", "--out", tmp_path / "s"], capsys)
  assert code == 0, err
  assert "eval accuracy, nll and ece (which need labels) are not reported; eval_teacher_agreement is" in err
  for run in ("temperature=1,seed=0", "temperature=2,seed=0"):
    final = json.load(open(tmp_path / "s" / run / "final.json"))
    assert {key for key in final if key.startswith("eval_")} == {"eval_count", "eval_teacher_agreement"}
    assert final["eval_count"] == 20 and 0 <= final["eval_teacher_agreement"] <= 1
  report = (tmp_path / "s" / "report.md").read_text()
  assert "the eval data is unlabeled, so no run has an accuracy" in report and "nan" not in report
  assert "| 1 | 1 |  |  |  |  |" in report
  assert (tmp_path / "s" / "report.csv").read_text().splitlines()[1:] == ["1,1,,,,", "2,1,,,,"]


def test_overwrite_keeps_what_stillroom_did_not_write(env, tmp_path, capsys):
  """`fit --overwrite` and `build --overwrite` delete the run's or store's own files, keep a user's, name them, and
  then write the new run or store beside them."""
  run = tmp_path / "run"
  shutil.copytree(env.run, run)
  (run / "notes.txt").write_text("my notes")
  (run / "plots").mkdir()
  (run / "plots" / "curve.png").write_bytes(b"png")
  code, _, err = run_cli(student_main, _fit(env, "--dataset", "digits", "--split", "train[:100]", "--overwrite",
                                            "--out", run), capsys)
  assert code == 0, err
  assert (f"--overwrite: removing the run dir {run}, keeping what stillroom did not write there: notes.txt, plots/"
          in err)
  assert (run / "notes.txt").read_text() == "my notes" and (run / "plots" / "curve.png").read_bytes() == b"png"
  assert json.load(open(run / "config.json"))["resolved"]["dataset"]["split"] == "train[:100]"
  assert [json.loads(line)["rows"] for line in open(run / "metrics.jsonl")] == [100]  # The new run's only.
  assert sorted(os.listdir(run / "checkpoints")) == ["1"]
  store = _copy_store(env, tmp_path)
  (tmp_path / "c.zarr" / "README").write_text("what this cache is for")
  (tmp_path / "c.zarr" / "zarr.json.tmp").write_text("left by a kill")  # stillroom's own temporary file...
  (tmp_path / "c.zarr" / "zarr.json.tmp.orig").write_text("a user's copy")  # ...and a user's look-alike.
  code, _, err = run_cli(cache_main, _build(env, store, "--temperature", "2", "--overwrite"), capsys)
  assert code == 0, err
  assert "keeping what stillroom did not write there: README, zarr.json.tmp.orig" in err
  assert (tmp_path / "c.zarr" / "README").read_text() == "what this cache is for"
  assert not (tmp_path / "c.zarr" / "zarr.json.tmp").exists()
  assert (tmp_path / "c.zarr" / "zarr.json.tmp.orig").read_text() == "a user's copy"
  code, out, _ = run_cli(cache_main, ["verify", store, "--data-dir", env.data_dir], capsys)
  assert code == 0 and "FAIL" not in out
  code, _, err = run_cli(cache_main, ["info", store], capsys)
  assert code == 0, err


def test_clearing_a_run_dir_removes_all_that_fit_writes(env, tmp_path):
  """`RUN_DIR_ENTRIES` names every file and folder a run dir holds (a finished run's and `run_dir`'s names)."""
  from shared.outputs import RUN_DIR, RUN_DIR_ENTRIES, clear_for_overwrite
  from shared.runs import CHECKPOINT_DIR, CONFIG_FILE, DIGESTS_SUFFIX
  from student_train import run_dir
  assert {CONFIG_FILE, CHECKPOINT_DIR, CHECKPOINT_DIR + DIGESTS_SUFFIX, run_dir.MID_EPOCH_DIR,
          run_dir.MID_EPOCH_DIR + DIGESTS_SUFFIX, run_dir.METRICS_FILE, run_dir.TENSORBOARD_DIR, run_dir.FINAL_FILE,
          run_dir.DIVERGED_FILE} == set(RUN_DIR_ENTRIES)
  run = tmp_path / "run"
  shutil.copytree(env.run, run)
  (run / "metrics.jsonl.tmp").write_text("left by a kill")
  (run / "mine").write_text("x")
  clear_for_overwrite(str(run), RUN_DIR)
  assert os.listdir(run) == ["mine"]
  os.remove(run / "mine")
  shutil.copytree(env.run, run, dirs_exist_ok=True)
  clear_for_overwrite(str(run), RUN_DIR)
  assert not os.path.exists(run)  # Nothing kept: the directory goes too.


def test_a_finished_run_and_a_complete_store_on_a_read_only_mount_are_reopened(env, tmp_path, monkeypatch, capsys):
  """Neither needs writing, so neither needs the writer's lock file, which cannot be created there; one that
  does need writing is still refused with the file system's error."""
  run, unfinished, store = tmp_path / "run", tmp_path / "unfinished", _copy_store(env, tmp_path)
  shutil.copytree(env.run, run)
  shutil.copytree(env.run, unfinished)
  os.remove(unfinished / "final.json")
  real_open = os.open

  def read_only(path, *args, **kwargs):
    if str(path).startswith(str(tmp_path)):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(os, "open", read_only)
  before = tree_digest(tmp_path)
  code, out, err = run_cli(student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out", run),
                           capsys)
  assert code == 0, err
  assert "cannot be written here (Read-only file system); it is finished, so it is only read" in err
  assert json.loads(out)["epochs"] == 1
  code, _, err = run_cli(cache_main, _build(env, store), capsys)
  assert code == 0 and "is already complete with these settings; nothing to do" in err, err
  code, _, err = run_cli(student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out",
                                            unfinished), capsys)  # Would resume: needs writing.
  assert code == 2 and re.search(r"error: '.*unfinished' cannot be written \(Read-only file system: "
                                 r".*unfinished\.lock\); choose an --out on a writable file system\.$", err, re.M), err
  assert tree_digest(tmp_path) == before


@pytest.fixture
def read_only_mount(tmp_path):
  """A folder and a read-only view of it: a read-only bind mount where the machine lets tests mount (as root, whom
  permissions do not stop), else the folder itself with write permission taken away; skipped where neither bites."""
  source, view = tmp_path / "source", tmp_path / "view"
  source.mkdir()
  view.mkdir()
  if os.geteuid() == 0:
    mounted = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True).returncode == 0
    if not mounted:
      pytest.skip("root writes through permissions, and cannot mount here; the patched test above covers it")
    yield source, view, lambda: subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
    subprocess.run(["umount", str(view)], check=False)
    return

  def take_write_permission():
    for folder, _, names in os.walk(view):
      for name in names:
        os.chmod(os.path.join(folder, name), 0o444)
      os.chmod(folder, 0o555)

  os.rmdir(view)
  os.symlink(source, view)
  yield source, view, take_write_permission
  for folder, _, _ in os.walk(source):
    os.chmod(folder, 0o755)


def test_a_real_read_only_run_dir_and_store_are_reopened(env, read_only_mount, capsys):
  """The same as the patched test above on a real read-only mount (or folder without write permission)."""
  source, view, make_read_only = read_only_mount
  shutil.copytree(env.run, source / "run")
  shutil.copytree(env.store, source / "c.zarr")
  make_read_only()
  with pytest.raises(OSError):
    open(view / "probe", "w")
  code, _, err = run_cli(student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out",
                                            view / "run"), capsys)
  assert code == 0 and "it is finished, so it is only read" in err, err
  code, _, err = run_cli(cache_main, _build(env, view / "c.zarr"), capsys)
  assert code == 0 and "is already complete with these settings; nothing to do" in err, err
  code, out, err = run_cli(student_main, ["eval", view / "run", "--data-dir", env.data_dir], capsys)
  assert code == 0 and "accuracy" in out, err


def test_two_first_time_preparations_of_a_dataset_both_succeed(tmp_path):
  """Two processes open `digits` in an empty data dir at once: one prepares it, the other waits, then reads it."""
  code = ("import sys; from shared.data import open_transfer_set; "
          "print(len(open_transfer_set('digits', 'train', sys.argv[1])))")
  environment = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__)), "JAX_PLATFORMS": "cpu"}
  both = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "data")], env=environment,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  ended = [process.communicate(timeout=120) for process in both]
  assert [process.returncode for process in both] == [0, 0], [err[-2000:] for _, err in ended]
  assert [out.split()[-1] for out, _ in ended] == ["1437", "1437"]
  assert not [name for name in os.listdir(tmp_path / "data" / "digits") if "incomplete" in name]


def test_a_handshake_refuses_an_index_given_twice_and_another_process_count():
  """Every waiting process of the job gets the one-line reason (in threads: the handshake is plain Python). The
  others may start before process 0 listens, and a stray client on the port is ignored."""
  import threading
  from shared import distributed

  def job(*processes, stray=False):
    port, errors = free_port(), {}

    def one(k, index, count):
      try:
        distributed._handshake("127.0.0.1", port, count, index, 5, f"process {index}")
        errors[k] = None
      except StillroomError as e:
        errors[k] = str(e)

    threads = [threading.Thread(target=one, args=(k, *p)) for k, p in enumerate(processes)]
    if stray:  # Process 0, then a client that is none of the job's processes, then the others.
      threads[0].start()
      for _ in range(100):
        try:
          with __import__("socket").create_connection(("127.0.0.1", port), timeout=5) as connection:
            connection.sendall(b"GET / HTTP/1.0\r\n\r\n")
          break
        except ConnectionRefusedError:
          __import__("time").sleep(0.05)
      for thread in threads[1:]:
        thread.start()
    else:  # The others first: they try again until process 0 listens.
      for thread in threads[1:]:
        thread.start()
      __import__("time").sleep(1.0)
      threads[0].start()
    for thread in threads:
      thread.join(timeout=20)
    return [errors.get(k) for k in range(len(processes))]

  errors = job((0, 3), (1, 3), (1, 3))
  assert all(e and re.search(r"--process-id 1 was given to two processes \(on .* and .*\): give each process of "
                             r"the job its own index in 0\.\.2", e) for e in errors), errors
  errors = job((0, 2), (1, 3))
  assert all(e and "process 1 on" in e and "was started with --num-processes 3, process 0 with 2" in e
             for e in errors), errors
  assert job((0, 3), (2, 3), (1, 3), stray=True) == [None, None, None]


def test_overwrite_deletes_what_marks_the_output_finished_first_and_what_makes_it_ours_last(env, tmp_path,
                                                                                            monkeypatch):
  """A kill while clearing leaves no finished run or complete store, and still a run dir or store (zarr.json,
  config.json) that --overwrite clears again."""
  from shared import outputs, storage
  removed = []
  real_file, real_tree = storage.remove_file, storage.remove_tree
  monkeypatch.setattr(storage, "remove_file", lambda path: (removed.append(os.path.basename(path)), real_file(path)))
  monkeypatch.setattr(storage, "remove_tree", lambda path: (removed.append(os.path.basename(path)), real_tree(path)))
  run = tmp_path / "run"
  shutil.copytree(env.run, run)
  outputs.clear_for_overwrite(str(run), outputs.RUN_DIR)
  assert removed[0] == "final.json" and removed[-2:] == ["config.json", "run"], removed
  removed.clear()
  outputs.clear_for_overwrite(_copy_store(env, tmp_path), outputs.STORE)
  assert removed[-2:] == ["zarr.json", "c.zarr"] and "targets" in removed, removed
  # Killed at the first array: the completion record went first, so the store no longer claims to be complete.
  store = _copy_store(env, tmp_path)

  def killed(path):
    raise KeyboardInterrupt

  monkeypatch.setattr(storage, "remove_tree", killed)
  with pytest.raises(KeyboardInterrupt):
    outputs.clear_for_overwrite(store, outputs.STORE)
  assert outputs.is_store(store) and not outputs.is_store(store, complete=True)
  assert len(os.listdir(store)) == len(os.listdir(env.store))  # Every array still there: killed before the first.
  with pytest.raises(StillroomError, match="is not complete"):
    open_cache(store)


def test_an_object_store_lease_is_skipped_only_for_a_finished_output(monkeypatch):
  """With read-only credentials (PermissionError on the lease's create) a finished output is read without the
  lease; an unfinished one is refused with the store's error."""
  from shared import outputs

  def denied(self, **conditions):
    raise PermissionError("Access Denied")

  monkeypatch.setattr(outputs.ObjectLease, "_put", denied)
  lease = outputs.OutputLock("s3://bucket/runs/r", "student-train fit", lambda: True).acquire()
  lease.release()
  with pytest.raises(PermissionError):
    outputs.OutputLock("s3://bucket/runs/r", "student-train fit", lambda: False).acquire()


def _read_only_under(mp, root) -> None:
  """Makes `os.open` refuse to create or write anything under `root`, as a read-only mount does."""
  real_open = os.open

  def read_only(path, flags, *args, **kwargs):
    if str(path).startswith(str(root)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real_open(path, flags, *args, **kwargs)

  mp.setattr(os, "open", read_only)


ON_A_WRITABLE_FILE_SYSTEM = r"cannot be written \(Read-only file system: .*\.lock\); choose an --out on a writable " \
    r"file system\.$"


@fault("fit --overwrite of a finished run on a read-only mount")
def _(env, tmp_path, mp):
  run = tmp_path / "ro" / "run"
  shutil.copytree(env.run, run)
  _read_only_under(mp, tmp_path / "ro")
  return (student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--overwrite", "--out", run), 2,
          r"'.*run' " + ON_A_WRITABLE_FILE_SYSTEM, [run])


@fault("fit of a new run on a read-only mount")
def _(env, tmp_path, mp):
  (tmp_path / "ro").mkdir()
  _read_only_under(mp, tmp_path / "ro")
  return (student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out", tmp_path / "ro" / "new"),
          2, r"'.*new' " + ON_A_WRITABLE_FILE_SYSTEM, [Absent(tmp_path / "ro" / "new")])


@fault("a sweep into a read-only mount")
def _(env, tmp_path, mp):
  (tmp_path / "ro").mkdir()
  real_makedirs = os.makedirs

  def read_only(path, *args, **kwargs):
    if str(path).startswith(str(tmp_path / "ro")):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real_makedirs(path, *args, **kwargs)

  mp.setattr(os, "makedirs", read_only)
  _read_only_under(mp, tmp_path / "ro")
  return (student_main, ["sweep", "--cache", env.store, "--grid", "temperature=1", "--model", "mlp-tiny", "--epochs",
                         "1", "--no-progress", "--out", tmp_path / "ro" / "s"], 2,
          r"'.*s' cannot be written \(Read-only file system: .*\); choose an --out on a writable file system\.$",
          [Absent(tmp_path / "ro" / "s")])


@fault("fit --coordinator with a port of superscript digits")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", env.npz_ok, "--coordinator", "127.0.0.1:\u00b2", "--num-processes", "2",
                             "--process-id", "1", "--out", tmp_path / "r"), 2,
          r"--coordinator must be HOST:PORT \(a port in 1\.\.65535\), got '127\.0\.0\.1:\u00b2'",
          [Absent(tmp_path / "r")])


@fault("export --overwrite to a directory")
def _(env, tmp_path, mp):
  (tmp_path / "d.npz").mkdir()
  (tmp_path / "d.npz" / "mine.txt").write_text("x")
  return (student_main, ["export", env.run, "--out", tmp_path / "d.npz", "--overwrite"], 2,
          r"--out '.*d\.npz' is a directory; give the path of the file to write, e\.g\. '.*d\.npz/student\.npz'\.$",
          [env.run, tmp_path / "d.npz", Absent(tmp_path / "d.npz.tmp")])


@fault("fit into a run dir whose config.json is {}")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  (tmp_path / "run" / "config.json").write_text("{}")
  return (student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out", run), 2,
          r"holds a run with another config: config: None \(run dir\) vs \{'max_shift'[^;]{1,60}\.\.\. \(command\); "
          r"dataset: [^;]*; eval: [^;]*; model: [^;]*; normalization: [^;]*\. Pass --overwrite to replace it, or "
          r"choose another --out\.$", [run])


def test_overwrite_keeps_files_whose_names_only_contain_a_temporary_suffix(env, tmp_path):
  """Only a run dir's own names, and exactly those names plus .tmp or .partial, are stillroom's: a user's
  `config.json.tmp.orig` is kept; stillroom's folders go whole, with what a user put in them."""
  from shared.outputs import RUN_DIR, clear_for_overwrite
  run = tmp_path / "run"
  shutil.copytree(env.run, run)
  (run / "checkpoints.partial_backup").mkdir()
  for name in ("config.json.tmp.orig", "metrics.jsonl.tmpsave", "final.json.partial", "checkpoints/NOTES"):
    (run / name).write_text("mine")
  clear_for_overwrite(str(run), RUN_DIR)
  assert sorted(os.listdir(run)) == ["checkpoints.partial_backup", "config.json.tmp.orig", "metrics.jsonl.tmpsave"]


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
  """`storage.write_bytes` removes its `.tmp` when the rename fails (a directory where the file goes)."""
  from shared import storage
  (tmp_path / "d").mkdir()
  with pytest.raises(IsADirectoryError):
    storage.write_bytes(str(tmp_path / "d"), b"data")
  assert os.listdir(tmp_path) == ["d"]


def test_differences_show_five_and_count_the_rest():
  """An error lists the first 5 differences, each value cut at 60 characters, then "and N more"."""
  from shared.settings import differences
  assert differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 3}, "c": 2}, "run dir") == ["a.b: 1 (run dir) vs 3 (command)"]
  found = differences({}, {f"k{i}": i for i in range(7)} | {"long": {"x": "y" * 100}}, "run dir")
  assert found[:2] == ["k0: None (run dir) vs 0 (command)", "k1: None (run dir) vs 1 (command)"]
  assert len(found) == 6 and found[-1] == "and 3 more"
  (long,) = differences({}, {"long": {"x": "y" * 100}}, "run dir")
  assert long == "long: None (run dir) vs {'x': '" + "y" * 50 + "... (command)"


def test_the_advice_for_eval_logits_names_the_eval_dataset_of_another_dataset(monkeypatch):
  """A cache without teacher logits for the eval split: the advice names --eval-split, and --eval-dataset too for
  another dataset's split (an npz set)."""
  from types import SimpleNamespace
  from student_train import train
  said = []
  monkeypatch.setattr(train, "_LOG", SimpleNamespace(info=said.append))
  for eval_name, options in [("digits", "--eval-split test"), ("npz:/e.npz", "--eval-dataset npz:/e.npz --eval-split "
                                                                             "test")]:
    said.clear()
    train._say_what_eval_reports(SimpleNamespace(
        eval_set=SimpleNamespace(name=eval_name, split="test", labeled=True), cache=object(),
        transfer_set=SimpleNamespace(name="digits")), agreement=False)
    assert said == [f"the cache stores no teacher logits for {eval_name} 'test' (build it with {options}): "
                    "eval_teacher_agreement is not reported."]


# --- checkpoints and run records ---------------------------------------------------------------------------------

CHECKPOINT = os.path.join("checkpoints", "1")  # env.run's one checkpoint, after its one epoch.
RETRAIN_TEACHER = r"retrain the run \(`student-train fit` with --overwrite\)\.$"
RETRAIN = r"pass --overwrite to retrain the run, or choose another --out\.$"
REWRITE_FINAL = r"delete it and run the command that trained the run again \(`student-train fit` or `sweep`\), which " \
    r"rewrites it\.$"


def _run_copy(env, tmp_path, unfinished=False) -> str:
  """A copy of env.run to damage; `unfinished`: without final.json, so that the same fit command resumes it (from
  its checkpoint of epoch 1, which it restores)."""
  run = str(tmp_path / "run")
  shutil.copytree(env.run, run)
  if unfinished:
    os.remove(os.path.join(run, "final.json"))
  return run


def _in_checkpoint(run, pattern) -> str:
  """The first file (by name) of the run's checkpoint whose path in it matches `pattern` (a glob)."""
  return sorted(glob.glob(os.path.join(run, CHECKPOINT, pattern)))[0]


def _flip_byte_in(path) -> None:
  """Flips a byte of any file (the smallest in a checkpoint has 12 bytes)."""
  _flip_byte(path, offset=min(40, os.path.getsize(path) // 2))


def _as_written_before_digests(run) -> None:
  """Makes a run dir as stillroom 0.3 wrote them: no digests list, and no marker in config.json saying it has one."""
  os.remove(os.path.join(run, "checkpoints.json"))
  config = json.load(open(os.path.join(run, "config.json")))
  del config["checkpoint_digests"]
  json.dump(config, open(os.path.join(run, "config.json"), "w"))


def _resume(env, run):
  return _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out", run)


def _eval(env, run, *extra):
  return ["eval", run, "--data-dir", env.data_dir, *extra]


def _export(tmp_path, run, *extra):
  return ["export", run, "--out", tmp_path / "p.npz", *extra]


def _damaged(name) -> str:
  return rf"checkpoint checkpoints/1 is damaged: its file {re.escape(name)} differs from its digest in " \
         r"checkpoints\.json"


@fault("eval of a run with a flipped byte in its parameters")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  name = os.path.relpath(_in_checkpoint(run, "params/ocdbt.process_0/d/*"), os.path.join(run, CHECKPOINT))
  _flip_byte_in(os.path.join(run, CHECKPOINT, name))
  return student_main, _eval(env, run), 2, _damaged(name) + "; " + RETRAIN_TEACHER, [run]


@fault("resume of a run with a flipped byte in its optimizer state")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  name = os.path.relpath(_in_checkpoint(run, "state/ocdbt.process_0/d/*"), os.path.join(run, CHECKPOINT))
  _flip_byte_in(os.path.join(run, CHECKPOINT, name))
  return student_main, _resume(env, run), 2, _damaged(name) + "; " + RETRAIN, [run]


@fault("export of a run with a flipped byte in its optimizer state")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)  # Not restored by export, and checked all the same.
  name = os.path.relpath(_in_checkpoint(run, "state/ocdbt.process_0/d/*"), os.path.join(run, CHECKPOINT))
  _flip_byte_in(os.path.join(run, CHECKPOINT, name))
  return student_main, _export(tmp_path, run), 2, _damaged(name) + "; " + RETRAIN_TEACHER, [run,
                                                                                           Absent(tmp_path / "p.npz")]


@fault("resume of a run with a flipped byte in its checkpoint's metadata")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  _flip_byte_in(os.path.join(run, CHECKPOINT, "state", "_METADATA"))
  return student_main, _resume(env, run), 2, _damaged("state/_METADATA") + "; " + RETRAIN, [run]


@fault("build --teacher of a run with a flipped byte in its checkpoint")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  _flip_byte_in(os.path.join(run, CHECKPOINT, "params", "manifest.ocdbt"))
  return (cache_main, _build(env, tmp_path / "c.zarr", teachers=[run]), 2,
          _damaged("params/manifest.ocdbt") + "; " + RETRAIN_TEACHER, [run, Absent(tmp_path / "c.zarr")])


@fault("fit --init-from a run with a flipped byte in its checkpoint")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  _flip_byte_in(os.path.join(run, CHECKPOINT, "_CHECKPOINT_METADATA"))
  return (student_main, _fit(env, "--dataset", "digits", "--init-from", run, "--out", tmp_path / "r"), 2,
          _damaged("_CHECKPOINT_METADATA") + "; " + RETRAIN_TEACHER, [run, Absent(tmp_path / "r")])


@fault("resume of a run with a truncated optimizer-state file")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  path = max(glob.glob(os.path.join(run, CHECKPOINT, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
  size = os.path.getsize(path)
  open(path, "r+b").truncate(size // 2)
  return (student_main, _resume(env, run), 2,
          _damaged(os.path.relpath(path, os.path.join(run, CHECKPOINT))) + rf" \({size // 2} bytes, {size} recorded\)",
          [run])


@fault("resume of a run without digests with a truncated optimizer-state file")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  _as_written_before_digests(run)  # orbax's own error, in one line.
  path = max(glob.glob(os.path.join(run, CHECKPOINT, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
  open(path, "r+b").truncate(os.path.getsize(path) // 2)
  return (student_main, _resume(env, run), 2,
          r"cannot read checkpoint checkpoints/1 \(Encountered error while reading array index: .*\); " + RETRAIN,
          [run])


@fault("eval of a run with a file deleted from its checkpoint")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  os.remove(os.path.join(run, CHECKPOINT, "params", "_sharding"))
  return (student_main, _eval(env, run), 2,
          r"checkpoint checkpoints/1 is damaged: its file params/_sharding is missing; " + RETRAIN_TEACHER, [run])


@fault("export of a run with a file added to its checkpoint")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  shutil.copy(_in_checkpoint(run, "params/ocdbt.process_0/d/*"), os.path.join(run, CHECKPOINT, "params", "extra"))
  return (student_main, _export(tmp_path, run), 2,
          r"checkpoint checkpoints/1 is damaged: it holds a file checkpoints\.json does not list, params/extra",
          [run, Absent(tmp_path / "p.npz")])


@fault("eval of a run whose newest checkpoint was deleted")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  shutil.rmtree(os.path.join(run, CHECKPOINT))
  return (student_main, _eval(env, run), 2, r"its newest checkpoint, checkpoints/1 \(listed in checkpoints\.json\), "
          r"is missing; " + RETRAIN_TEACHER, [run])


@fault("resume of a run whose newest checkpoint was deleted")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  shutil.rmtree(os.path.join(run, CHECKPOINT))
  return (student_main, _resume(env, run), 2, r"its newest checkpoint, checkpoints/1 \(listed in checkpoints\.json\), "
          r"is missing; " + RETRAIN, [run])


@fault("export of a run without digests whose newest checkpoint was deleted")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  _as_written_before_digests(run)  # final.json still names the epochs trained.
  shutil.rmtree(os.path.join(run, CHECKPOINT))
  return (student_main, _export(tmp_path, run), 2,
          r"its newest checkpoint, checkpoints/1 \(final\.json records 1 epochs trained\), is missing",
          [run, Absent(tmp_path / "p.npz")])


@fault("eval --epoch of an epoch the run does not keep")
def _(env, tmp_path, mp):
  return (student_main, _eval(env, env.run, "--epoch", "3"), 2,
          r"run dir '.*' keeps no checkpoint after epoch 3; it keeps epochs 1\.$", [env.run])


@fault("export --epoch -1")
def _(env, tmp_path, mp):
  return student_main, _export(tmp_path, env.run, "--epoch", "-1"), 2, r"--epoch must be >= 0, got -1", [env.run]


@fault("eval of a run with a garbled checkpoints.json")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  with open(os.path.join(run, "checkpoints.json"), "r+") as f:
    f.truncate(100)
  return (student_main, _eval(env, run), 2, r"cannot read checkpoints\.json \(not JSON: .*\); " + RETRAIN_TEACHER,
          [run])


@fault("resume with a garbled metrics.jsonl")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  with open(os.path.join(run, "metrics.jsonl"), "w") as f:
    f.write("{not json\n")
  return student_main, _resume(env, run), 2, r"cannot read metrics\.jsonl \(line 1 is not JSON: .*\); " + RETRAIN, [run]


@fault("resume with a truncated metrics.jsonl")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  with open(os.path.join(run, "metrics.jsonl"), "r+") as f:
    f.truncate(30)
  return student_main, _resume(env, run), 2, r"cannot read metrics\.jsonl \(line 1 is not JSON", [run]


@fault("resume with a metrics line without its epoch")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  with open(os.path.join(run, "metrics.jsonl"), "w") as f:
    f.write('{"loss": 1.0}\n')
  return (student_main, _resume(env, run), 2, r"cannot read metrics\.jsonl \(line 1: no 'epoch' entry\); " + RETRAIN,
          [run])


@fault("resume with a metrics line whose epoch is text")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  with open(os.path.join(run, "metrics.jsonl"), "w") as f:
    f.write('{"epoch": "1"}\n')
  return (student_main, _resume(env, run), 2,
          r"cannot read metrics\.jsonl \(line 1: its 'epoch' is a string \(\"1\"\), not an integer\)", [run])


@fault("resume with metrics.jsonl deleted")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  os.remove(os.path.join(run, "metrics.jsonl"))
  return (student_main, _resume(env, run), 2,
          r"metrics\.jsonl holds 0 of the 1 epochs its checkpoint has trained \(one line per epoch\); " + RETRAIN,
          [run])


@fault("fit on a run with a garbled final.json")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  with open(os.path.join(run, "final.json"), "r+") as f:
    f.truncate(50)
  return (student_main, _resume(env, run), 2,
          r"cannot read final\.json \(not JSON: .*\); " + REWRITE_FINAL, [run])


@fault("fit on a run with a final.json that is not an object")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  with open(os.path.join(run, "final.json"), "w") as f:
    f.write("[1, 2]")
  return (student_main, _resume(env, run), 2,
          r"cannot read final\.json \(it holds an array, not an object\); " + REWRITE_FINAL, [run])


@fault("fit on a run with a garbled diverged.json")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  with open(os.path.join(run, "diverged.json"), "w") as f:
    f.write('{"message": ')
  return (student_main, _resume(env, run), 2,
          r"cannot read diverged\.json \(not JSON: .*\); the run stopped on non-finite values: delete it and run the "
          r"same command to train on from its last finite checkpoint, or pass --overwrite", [run])


@fault("eval of a run with a garbled config.json")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  with open(os.path.join(run, "config.json"), "w") as f:
    f.write('{"model": ')
  return student_main, _eval(env, run), 2, r"cannot read config\.json \(not JSON: .*\); " + RETRAIN_TEACHER, [run]


@fault("eval of a run with a flipped byte in its parameters and its checkpoints.json deleted")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)  # Its config.json says it keeps digests: the deleted list turns no check off.
  _flip_byte_in(_in_checkpoint(run, "params/ocdbt.process_0/d/*"))
  os.remove(os.path.join(run, "checkpoints.json"))
  return (student_main, _eval(env, run), 2, r"run dir '.*' has no checkpoints\.json, which lists the checkpoints in "
          r"checkpoints/ and the digests of their files \(config\.json records that this run dir keeps them\), so "
          r"they cannot be checked; " + RETRAIN_TEACHER, [run])


@fault("resume of a run whose checkpoints.json was deleted")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  os.remove(os.path.join(run, "checkpoints.json"))
  return student_main, _resume(env, run), 2, r"has no checkpoints\.json, which lists .*; " + RETRAIN, [run]


@fault("export of a run whose checkpoints.json lists its checkpoint without digests")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  json.dump({"checkpoints": {"1": {"files": None}}}, open(os.path.join(run, "checkpoints.json"), "w"))
  return (student_main, _export(tmp_path, run), 2, r"checkpoints\.json lists checkpoint checkpoints/1 without the "
          r"digests of its files, which this run dir records; " + RETRAIN_TEACHER, [run, Absent(tmp_path / "p.npz")])


@fault("eval of a run with a hidden file added to its checkpoint")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  shutil.copy(_in_checkpoint(run, "params/ocdbt.process_0/d/*"), os.path.join(run, CHECKPOINT, "params", ".extra"))
  return (student_main, _eval(env, run), 2,
          r"checkpoint checkpoints/1 is damaged: it holds a file checkpoints\.json does not list, params/\.extra",
          [run])


@fault("eval --epoch 1 of a run that keeps no checkpoint")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  shutil.rmtree(os.path.join(run, CHECKPOINT))
  json.dump({"checkpoints": {}}, open(os.path.join(run, "checkpoints.json"), "w"))
  return (student_main, _eval(env, run, "--epoch", "1"), 2,
          r"keeps no checkpoint after epoch 1; it keeps none: train it first \(`student-train fit`\)\.$", [run])


@fault("resume with metrics.jsonl a folder")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  os.remove(os.path.join(run, "metrics.jsonl"))
  os.mkdir(os.path.join(run, "metrics.jsonl"))
  return (student_main, _resume(env, run), 2, r"cannot read metrics\.jsonl \(Is a directory\); make it readable \(its "
          r"permissions, the storage\), or " + RETRAIN, [run])


@fault("fit --overwrite into a folder whose only file is a garbled config.json")
def _(env, tmp_path, mp):
  folder = tmp_path / "mine"
  folder.mkdir()
  (folder / "config.json").write_text("{not json")  # Not a damaged run dir: nothing only the trainer writes is there.
  return (student_main, _fit(env, "--dataset", "digits", "--out", folder, "--overwrite"), 2,
          r"is not a stillroom run dir, so it is left alone", [folder])


@fault("fit on a read-only data dir where digits is not prepared")
def _(env, tmp_path, mp):
  data = tmp_path / "data"
  real_open = os.open

  def read_only(path, *args, **kwargs):
    if str(path).startswith(str(data)):
      raise OSError(errno.EROFS, "Read-only file system", str(path))
    return real_open(path, *args, **kwargs)

  mp.setattr(os, "open", read_only)
  return (student_main, ["fit", "--dataset", "digits", "--data-dir", data, "--model", "mlp-tiny", "--epochs", "1",
                         "--no-progress", "--out", tmp_path / "r"], 2,
          r"cannot prepare the embedded digits dataset in .*: Read-only file system \(.*\.lock\); pass a --data-dir "
          r"you can write \(digits is prepared there once, then only read\)\.$", [Absent(tmp_path / "r")])


@fault("resume of a run whose checkpoints.json was emptied")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  shutil.copytree(os.path.join(run, CHECKPOINT), os.path.join(run, "checkpoints", "2"))  # Two kept, as after 2 epochs.
  json.dump({"checkpoints": {}}, open(os.path.join(run, "checkpoints.json"), "w"))
  return (student_main, _resume(env, run), 2, r"checkpoints\.json does not list checkpoints/1, checkpoints/2, which no "
          r"kill leaves .*nothing is deleted; restore checkpoints\.json listing every checkpoint kept, or " + RETRAIN,
          [run])


@fault("resume of a run whose checkpoints.json lists a newer checkpoint but not an older one")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  shutil.copytree(os.path.join(run, CHECKPOINT), os.path.join(run, "checkpoints", "2"))
  listed = json.load(open(os.path.join(run, "checkpoints.json")))
  listed["checkpoints"] = {"2": listed["checkpoints"]["1"]}
  json.dump(listed, open(os.path.join(run, "checkpoints.json"), "w"))
  return student_main, _resume(env, run), 2, r"checkpoints\.json does not list checkpoints/1, which no kill", [run]


@fault("eval of a run whose checkpoints.json has a step of superscript digits")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  listed = json.load(open(os.path.join(run, "checkpoints.json")))
  listed["checkpoints"]["\u00b2"] = listed["checkpoints"]["1"]
  json.dump(listed, open(os.path.join(run, "checkpoints.json"), "w"))
  return (student_main, _eval(env, run), 2,
          r"cannot read checkpoints\.json \(checkpoint '\u00b2': is not a step number\); " + RETRAIN_TEACHER, [run])


@fault("fit on a run whose final.json has a metric of text")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path)
  json.dump({"epoch": 1, "eval_accuracy": "x"}, open(os.path.join(run, "final.json"), "w"))
  return (student_main, _resume(env, run), 2,
          r"cannot read final\.json \(its 'eval_accuracy' is \"x\", not a number\); " + REWRITE_FINAL, [run])


@fault("report of a sweep whose run's final.json has a metric of text")
def _(env, tmp_path, mp):
  sweep = tmp_path / "s"
  shutil.copytree(env.run, sweep / "t=1")
  json.dump({"epoch": 1, "eval_accuracy": "x"}, open(sweep / "t=1" / "final.json", "w"))
  json.dump({"cache": env.store, "grid": {"temperature": [1]}, "seeds": 1,
             "runs": [{"name": "t=1", "point": {"temperature": 1}, "seed": 0}]}, open(sweep / "sweep.json", "w"))
  return (student_main, ["report", sweep], 2, r"cannot read final\.json \(its 'eval_accuracy' is \"x\", not a "
          r"number\)", [sweep])


@fault("resume with a metrics line whose phase is a number")
def _(env, tmp_path, mp):
  run = _run_copy(env, tmp_path, unfinished=True)
  line = json.loads(open(os.path.join(run, "metrics.jsonl")).readline())
  with open(os.path.join(run, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({**line, "phase": 3}) + "\n")
  return (student_main, _resume(env, run), 2,
          r"cannot read metrics\.jsonl \(line 1: its 'phase' is 3, not a string\); " + RETRAIN, [run])


# --- chunk positions, spec record, limits -------------------------------------------------------------------------

# Every array of the fixture store but the bookkeeping ones and `flip`, whose chunk files are all the same bytes (no
# digits view is flipped), so that swapping two of them changes nothing (`test_the_swaps_cover_every_array`).
SWAPPED_ARRAYS = ("targets", "member_logits", "index", "view", "labels", "fold", "shift", "eval_member_logits",
                  "eval_index", "eval_labels")


def _swap_chunks(store, array) -> tuple[int, int]:
  """Swaps chunk 1 of `array` with the next chunk whose file differs from it; returns the two chunk numbers."""
  first = _chunk(store, array, 1)
  other = next(k for k in range(2, 100) if open(_chunk(store, array, k), "rb").read() != open(first, "rb").read())
  second = _chunk(store, array, other)
  os.rename(first, first + ".swap")
  os.rename(second, first)
  os.rename(first + ".swap", second)
  return 1, other


def _swap_fault(array, command):
  def make(env, tmp_path, mp):
    store = _copy_store(env, tmp_path)
    a, b = _swap_chunks(store, array)
    if command == "fit":
      return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2,
              rf"damaged: array '{array}': chunk {a} holds chunk {b}'s data, chunk {b} holds chunk {a}'s data: not "
              r"the chunks its completion record lists for those positions", [store, Absent(tmp_path / "r")])
    return (cache_main, ["verify", store, "--data-dir", env.data_dir], 1,
            rf"FAIL  chunks where the completion record puts them  \(array '{array}': chunk {a} holds chunk {b}'s",
            [store])
  return make


for _array in SWAPPED_ARRAYS:
  for _command in ("fit", "verify"):
    fault(f"{_command} on a store with two chunks of {_array} swapped")(_swap_fault(_array, _command))


def _edited_spec_fault(edit, command):
  def make(env, tmp_path, mp):
    store = _copy_store(env, tmp_path)
    _edit_spec(store, lambda attrs: edit(attrs[SPEC_KEY]))
    changed = r"its spec was changed after the build completed \(a hand-edited temperature, combine rule"
    if command == "fit":
      return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2, changed,
              [store, Absent(tmp_path / "r")])
    return cache_main, ["verify", store, "--data-dir", env.data_dir], 1, "FAIL  spec as the completion record covers " \
        "it  \\(" + changed, [store]
  return make


_SPEC_EDITS = {"temperature": lambda spec: spec.update(temperature=2.0),
               "combine rule": lambda spec: spec.update(combine="geometric"),
               "member list": lambda spec: spec.update(members=spec["members"][::-1])}
for _what, _edit in _SPEC_EDITS.items():
  for _command in ("fit", "verify"):
    fault(f"{_command} on a complete store whose {_what} was edited")(_edited_spec_fault(_edit, _command))


def _unbound_fault(command):
  """A store of schema 6 whose completion record lost its digest and chunk table, two chunks of `targets` swapped and
  the temperature edited: what a store completed before the record held them looks like, but its schema says the
  record binds, so the loss is damage, not a reason to skip the checks."""
  def make(env, tmp_path, mp):
    store = _copy_store(env, tmp_path)
    _swap_chunks(store, "targets")
    _edit_spec(store, lambda attrs: (attrs[COMPLETE_KEY].pop("spec_sha256"), attrs[COMPLETE_KEY].pop("chunk_crc32c"),
                                     attrs[SPEC_KEY].update(temperature=2.0)))
    lost = (r"its completion record holds no {}, which every store of schema 6 records \(the record was edited or "
            r"damaged")
    if command == "fit":
      return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2,
              lost.format("digest of the spec") + r"\)\. Undo the edit, or rebuild", [store, Absent(tmp_path / "r")])
    return (cache_main, ["verify", store, "--data-dir", env.data_dir], 1,
            r"(?s)FAIL  spec as the completion record covers it  \(" + lost.format("digest of the spec") + ".*"
            r"FAIL  chunks where the completion record puts them  \(" + lost.format("chunk table"), [store])
  return make


for _command in ("fit", "verify"):
  fault(f"{_command} on a store of schema 6 whose completion record lost its digest and chunk table, with two chunks "
        "swapped and the temperature edited")(_unbound_fault(_command))


@fault("the build again, with the edited temperature, on a complete store whose temperature was edited")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs[SPEC_KEY].update(temperature=2.0))
  return (cache_main, _build(env, store, "--temperature", "2"), 2,
          r"is not a usable stillroom cache \(.*its spec was changed after the build completed", [store])


@fault("info on a complete store whose combine rule was edited")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs[SPEC_KEY].update(combine="geometric"))
  return cache_main, ["info", store], 2, r"its spec was changed after the build completed", [store]


_WRONG_TYPES = {  # A spec attribute of the wrong JSON type, and how the error names it.
    "a temperature that is a string": (lambda spec: spec.update(temperature="4"),
                                       r"'temperature' is a string \(\"4\"\); it must be a number"),
    "members that are not a list": (lambda spec: spec.update(members={"t0": 1}),
                                    r"'members' is an object; it must be an array"),
    "chunk rows that are not an integer": (lambda spec: spec.update(chunk_rows=64.0),
                                           r"'chunk_rows' is a number \(64\.0\); it must be an integer"),
    "an example count that is a string": (lambda spec: spec["dataset"].update(count="200"),
                                          r"'dataset\.count' is a string \(\"200\"\); it must be an integer"),
    "a flip that is a string": (lambda spec: spec["augmentation"].update(flip="no"),
                                r"'augmentation\.flip' is a string \(\"no\"\); it must be true or false"),
    "a member's parameter count that is a list": (lambda spec: spec["members"][1].update(num_params=[1]),
                                                  r"'members\[1\]\.num_params' is an array; it must be an integer"),
    "an attribute a spec does not have": (lambda spec: spec.update(num_rows={}),
                                          r"'num_rows' is not an attribute of a cache spec"),
    "a schema version that is true": (lambda spec: spec.update(schema_version=True),
                                      r"cache schema version True is not supported"),
}


def _wrong_type_fault(edit, pattern):
  def make(env, tmp_path, mp):
    store = _copy_store(env, tmp_path)
    _edit_spec(store, lambda attrs: edit(attrs[SPEC_KEY]))
    return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2, pattern,
            [store, Absent(tmp_path / "r")])
  return make


for _what, (_edit, _pattern) in _WRONG_TYPES.items():
  fault(f"fit on a spec with {_what}")(_wrong_type_fault(_edit, _pattern))


@fault("verify on a spec that is not an object")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs.update({SPEC_KEY: [1]}))
  return (cache_main, ["verify", store], 1, r"FAIL  spec .*the cache spec is damaged or hand-edited: it is an array",
          [store])


@fault("build --views 10000000 of 200 examples (the store would not fit on the disk)")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", "--views", "10000000"), 2,
          r"the store of 2,000,000,000 rows \(200 examples x 10,000,000 views\) would take [\d.]+ [TP]B, more than the "
          r"[\d.]+ [kMGT]?B free on the file system of .*c\.zarr; .* or pass --ignore-limits to start anyway",
          [Absent(tmp_path / "c.zarr")])


@fault("build --chunk-rows 1000000000 of 400 rows (a chunk would not fit in memory)")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", "--chunk-rows", "1000000000"), 2,
          r"one chunk of 1,000,000,000 rows \(83\.0 GB, .*\) needs about 498 GB of memory, more than the "
          r"[\d.]+ [kMGT]?B available; give a smaller --chunk-rows \(the store has 400 rows\), or pass --ignore-limits",
          [Absent(tmp_path / "c.zarr")])


@fault("views --views 10000000 of 200 examples (the views would not fit on the disk)")
def _(env, tmp_path, mp):
  return (cache_main, ["views", "--dataset", "digits", "--split", "train[:200]", "--data-dir", env.data_dir, "--views",
                       "10000000", "--out", tmp_path / "v", "--no-progress"], 2,
          r"the views of 2,000,000,000 rows \(200 examples x 10,000,000 views\) would take 528 GB, more than",
          [Absent(tmp_path / "v")])


@pytest.mark.fast
def test_json_values_are_named_in_one_vocabulary():
  """The run-dir reader and the cache spec name a value read from JSON, and test its kind, the same way."""
  from shared.json_checks import EXPECTED, described, is_kind
  assert [described(v) for v in (None, True, 4.0, 7, "x" * 50, [1], {"a": 1})] == [
      "null", "true", "a number (4.0)", "a number (7)", f'a string ("{"x" * 40}")', "an array", "an object"]
  assert is_kind(3, float) and not is_kind(True, int) and not is_kind(3.0, int) and is_kind(None, None)
  assert not is_kind(0, None) and is_kind(False, bool) and EXPECTED[list] == "an array"


# --- fsdp: --teacher-sharding (build), --param-sharding (fit) ----------------------------------------------------
# A teacher or student none of whose arrays divides over the devices is a warning, not a refusal (tests/test_sharding).

@fault("build --teacher-sharding zero3")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", "--teacher-sharding", "zero3"), 2,
          r"argument --teacher-sharding: invalid choice: 'zero3' \(choose from '?replicated'?, '?fsdp'?\)",
          [Absent(tmp_path / "c.zarr")])


@fault("fit --param-sharding zero3")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--param-sharding", "zero3", "--out", tmp_path / "r"), 2,
          r"argument --param-sharding: invalid choice: 'zero3' \(choose from '?replicated'?, '?fsdp'?\)",
          [Absent(tmp_path / "r")])


@fault("fit --teacher-sharding fsdp (the build's option)")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--teacher-sharding", "fsdp", "--out", tmp_path / "r"), 2,
          r"unrecognized arguments: --teacher-sharding fsdp", [Absent(tmp_path / "r")])


# --- mixed precision (--compute-dtype) ----------------------------------------------------------------------------

@fault("fit --compute-dtype float16")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--compute-dtype", "float16", "--out", tmp_path / "r"), 2,
          r"argument --compute-dtype: invalid choice: 'float16' \(choose from '?float32'?, '?bfloat16'?\)",
          [Absent(tmp_path / "r")])


@fault("fit --compute-dtype bfloat16 of your own student model")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--split", "train[:200]", "--model", "my_models:tiny", "--compute-dtype",
                             "bfloat16", "--out", tmp_path / "r"), 2,
          r"--compute-dtype bfloat16 is for the registry's models; your own model 'my_models:tiny' sets its own "
          r"compute dtype .*: give --compute-dtype float32", [Absent(tmp_path / "r")])


@fault("build --compute-dtype bfloat16 of your own teacher function")
def _(env, tmp_path, mp):
  mp.chdir(env.root)
  return (cache_main, _build(env, tmp_path / "c.zarr", "--compute-dtype", "bfloat16",
                             teachers=[env.teachers[0], "bad_teachers:ignores_batch"]), 2,
          r"teacher 'bad_teachers:ignores_batch' is your own function, which computes as its code does: stillroom "
          r"cannot make it compute in bfloat16; build with --compute-dtype float32", [Absent(tmp_path / "c.zarr")])


@fault("the build again in bfloat16 on a complete float32 store")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  return (cache_main, _build(env, store, "--compute-dtype", "bfloat16"), 2,
          r"holds a cache built with other settings: compute_dtype: float32 \(store\) vs bfloat16 \(command\)\. "
          r"Pass --overwrite", [store])


@fault("fit in bfloat16 on a float32 run dir")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--compute-dtype", "bfloat16",
                             "--out", env.run), 2,
          r"holds a run with another config: config\.compute_dtype: float32 \(run dir\) vs bfloat16 \(command\); "
          r"model\.dtype: .* vs bfloat16 \(command\)\. Pass --overwrite", [env.run])


@fault("info on a spec whose compute dtype was edited to float16")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  _edit_spec(store, lambda attrs: attrs[SPEC_KEY].update(compute_dtype="float16"))
  return (cache_main, ["info", store], 2, r"compute dtype 'float16' .* one of float32, bfloat16", [store])


# --- nets: the registry's ImageNet architectures and `models` at an image size ---
@fault("models --image-size with --input-shape")
def _(env, tmp_path, mp):
  return (cache_main, ["models", "--image-size", "32", "--input-shape", "8,8,1"], 2,
          r"--image-size 32 and --input-shape 8,8,1 both set the input shape: give one\.", [])


@fault("models --image-size 0")
def _(env, tmp_path, mp):
  return (student_main, ["models", "--image-size", "0"], 2, r"--image-size must be a positive number of pixels, got 0",
          [])


@fault("a ViT on 8x8 digits")
def _(env, tmp_path, mp):
  return (student_main, [*_fit(env, "--out", tmp_path / "r"), "--model", "vit-ti16"], 2,
          r"model 'vit-ti16' cuts images into 16x16 patches: image sides must be multiples of 16, got 8x8; render "
          r"views at such a size, e\.g\. --image-size 32 or 224\.", [Absent(tmp_path / "r")])


# --- device: crop views rendered on the device (--renderer device) ---
def _image_npz(tmp_path) -> str:
  """npz: of 16 uint8 10x10 grey images (their own canvases), views at 8x8 for the digits teachers."""
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "images.npz", x=rng.integers(0, 256, (16, 10, 10, 1), dtype=np.uint8), y=rng.integers(0, 10, 16))
  return f"npz:{tmp_path / 'images.npz'}"


def _image_build(env, dataset, out, *extra):
  return ["build", "--dataset", dataset, "--image-size", "8", "--eval-split", "none", "--chunk-rows", "64",
          *[a for t in env.teachers for a in ("--teacher", t)], "--out", str(out), "--no-progress", *extra]


@fault("build --renderer device on shift views")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", "--renderer", "device"), 2,
          r"--renderer device renders crop views: give --image-size S", [Absent(tmp_path / "c.zarr")])


@fault("build --renderer device on a dataset without canvases")
def _(env, tmp_path, mp):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for name in ("a", "b"):
    os.makedirs(tmp_path / "images" / name)
    Image.new("RGB", (12, 9), name == "a" and "red" or "blue").save(tmp_path / "images" / name / "0.png")
  return (cache_main, _image_build(env, f"imagefolder:{tmp_path / 'images'}", tmp_path / "c.zarr", "--renderer",
                                   "device"), 2,
          r"--renderer device renders crops from fixed-size canvases, which 'imagefolder:.*' does not offer .* use "
          r"--renderer host\.", [Absent(tmp_path / "c.zarr")])


@fault("build --renderer device resuming a store of host-rendered views")
def _(env, tmp_path, mp):
  dataset, store = _image_npz(tmp_path), tmp_path / "c.zarr"
  assert run_cli(cache_main, _image_build(env, dataset, store), _NoCapture())[0] == 0
  return (cache_main, _image_build(env, dataset, store, "--renderer", "device"), 2,
          r"holds a cache built with other settings: augmentation: .* \(store\) vs .*'renderer': 'device'.* "
          r"\(command\)\. Pass --overwrite", [store])


@fault("fit --cache with a --renderer other than the cache's")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--cache", env.store, "--renderer", "device", "--out", tmp_path / "r"), 2,
          r"--renderer device: cache '.*' was rendered by the host renderer, .* drop --renderer \(or rebuild the "
          r"cache with --renderer device\)\.", [Absent(tmp_path / "r")])


# --- views: one decode per image per build (the grouped row order) ---
@fault("build --chunk-rows not a multiple of --views")
def _(env, tmp_path, mp):
  out = tmp_path / "c.zarr"
  return (cache_main, _build(env, out, "--views", "3"), 2,
          r"--chunk-rows 64 is not a multiple of --views 3, so a chunk would split an example's views \(each image "
          r"is decoded once per chunk it is in\); give 63 or 66, or none \(the default is a multiple of --views\)\.$",
          [Absent(out)])


# --- prepared images (teacher-cache prepare, prepared:) ----------------------------------------------------------


def _prepared(tmp_path, name="p.zarr") -> str:
  """A prepared store of 6 generated images (S = 8), made here."""
  from teacher_cache.prepare import PrepareConfig, prepare_images  # pylint: disable=import-outside-toplevel
  from test_prepared import write_images  # pylint: disable=import-outside-toplevel
  images = write_images(tmp_path / "images", count=6)
  out = str(tmp_path / name)
  prepare_images(PrepareConfig(dataset=f"imagefolder:{images}", image_size=8, out=out, chunk_images=4, workers=0,
                               progress=False))
  return out


@fault("prepare of flat vectors")
def _(env, tmp_path, mp):
  return (cache_main, ["prepare", env.npz_ok, "--image-size", "8", "--out", tmp_path / "p.zarr", "--no-progress"], 2,
          r"dataset 'npz:.*ok\.npz' holds float32 inputs of shape \(6,\); `prepare` takes 8-bit images",
          [Absent(tmp_path / "p.zarr")])


@fault("prepare of a prepared store")
def _(env, tmp_path, mp):
  store = _prepared(tmp_path)
  return (cache_main, ["prepare", f"prepared:{store}", "--image-size", "8", "--out", tmp_path / "q.zarr"], 2,
          r"is already a prepared store; prepare its source instead", [store, Absent(tmp_path / "q.zarr")])


@fault("prepare --out a teacher cache")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  return (cache_main, ["prepare", f"imagefolder:{os.path.dirname(_prepared(tmp_path))}/images", "--image-size", "8",
                       "--out", store, "--no-progress"], 2,
          r"--out '.*c\.zarr' exists and is not a prepared image store; pass --overwrite", [store])


@fault("prepare at another --scale over a prepared store")
def _(env, tmp_path, mp):
  store = _prepared(tmp_path)
  return (cache_main, ["prepare", f"imagefolder:{tmp_path}/images", "--image-size", "8", "--scale", "3", "--out",
                       store, "--no-progress"], 2,
          r"holds a prepared store made with other settings or data: .*scale: 2\.0 \(store\) vs 3\.0 \(command\)",
          [store])


@fault("fit on a missing prepared store")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", f"prepared:{tmp_path}/none.zarr", "--image-size", "8", "--out",
                             tmp_path / "r"), 2,
          r"no prepared image store at '.*none\.zarr'; make one with `teacher-cache prepare", [Absent(tmp_path / "r")])


@fault("fit on a teacher cache as a prepared store")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", f"prepared:{env.store}", "--image-size", "8", "--out",
                             tmp_path / "r"), 2,
          r"is a teacher cache \(give it as --cache\), not a prepared image store",
          [env.store, Absent(tmp_path / "r")])


@fault("fit on an incomplete prepared store")
def _(env, tmp_path, mp):
  store = _prepared(tmp_path)
  _edit_spec(store, lambda attributes: attributes.pop("stillroom_prepared_complete"))
  return (student_main, _fit(env, "--dataset", f"prepared:{store}", "--image-size", "8", "--out", tmp_path / "r"), 2,
          r"the prepared store is incomplete .*run the same command again to finish it",
          [store, Absent(tmp_path / "r")])


@fault("fit on a prepared store with a byte-flipped shard")
def _(env, tmp_path, mp):
  store = _prepared(tmp_path)
  _flip_byte(os.path.join(store, "images", "c", "0", "0", "0", "0"), offset=20)
  return (student_main, _fit(env, "--dataset", f"prepared:{store}", "--image-size", "8", "--workers", "0", "--out",
                             tmp_path / "r"), 2,
          r"the prepared store is damaged: example 0 fails its checksum \(shard 0\); run `teacher-cache prepare` again "
          r"with --overwrite", [store])


@fault("fit on a prepared store with a deleted shard")
def _(env, tmp_path, mp):
  store = _prepared(tmp_path)
  os.remove(os.path.join(store, "images", "c", "1", "0", "0", "0"))
  return (student_main, _fit(env, "--dataset", f"prepared:{store}", "--image-size", "8", "--workers", "0", "--out",
                             tmp_path / "r"), 2,
          r"the prepared store is damaged: its shard .*images/c/1/0/0/0 is missing",
          [store])


@fault("fit on a prepared store with a deleted digest")
def _(env, tmp_path, mp):
  store = _prepared(tmp_path)
  os.remove(os.path.join(store, "digests", "c", "1", "0"))
  return (student_main, _fit(env, "--dataset", f"prepared:{store}", "--image-size", "8", "--out", tmp_path / "r"), 2,
          r"the prepared store is damaged \(its arrays do not match its completion record\)", [store])


@fault("fit on a prepared store without --image-size")
def _(env, tmp_path, mp):
  store = _prepared(tmp_path)
  return (student_main, _fit(env, "--dataset", f"prepared:{store}", "--out", tmp_path / "r"), 2,
          r"holds images prepared for crop views at 8 px; give --image-size \(e\.g\. --image-size 8\)",
          [store, Absent(tmp_path / "r")])


@fault("fit --cache of digits on prepared images")
def _(env, tmp_path, mp):
  store = _prepared(tmp_path)
  return (student_main, _fit(env, "--cache", env.store, "--dataset", f"prepared:{store}", "--out", tmp_path / "r"), 2,
          r"is not the data the cache .* was built from \(digits .*\)\. The cache's views were rendered from 'digits', "
          r"not from prepared images", [store, env.store, Absent(tmp_path / "r")])


# --- spc: several optimizer steps per jitted call (`fit --steps-per-call`) ---
@fault("fit --steps-per-call 0")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--steps-per-call", "0", "--out", tmp_path / "r"), 2,
          r"--steps-per-call must be >= 1 step, got 0", [Absent(tmp_path / "r")])


@fault("fit --checkpoint-every-steps off the calls of --steps-per-call")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--steps-per-call", "4", "--checkpoint-every-steps", "10",
                             "--out", tmp_path / "r"), 2,
          r"--checkpoint-every-steps 10 must be a multiple of --steps-per-call 4: checkpoints land between calls "
          r"\(give, e\.g\., --checkpoint-every-steps 12\)\.", [Absent(tmp_path / "r")])


# --- mix: mixed views (`build --mix mixup:A|cutmix:A`) ---
@fault("build --mix of a text that is not a mix")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", "--mix", "mixup"), 2,
          r"--mix .*'none', 'mixup:A' or 'cutmix:A',? .*A > 0", [Absent(tmp_path / "c.zarr")])


@fault("build --mix with A <= 0")
def _(env, tmp_path, mp):
  return (cache_main, _build(env, tmp_path / "c.zarr", "--mix", "cutmix:0"), 2,
          r"--mix .*'none', 'mixup:A' or 'cutmix:A',? .*A > 0", [Absent(tmp_path / "c.zarr")])


@fault("build --mix with one view")
def _(env, tmp_path, mp):
  argv = _build(env, tmp_path / "c.zarr", "--mix", "mixup:0.2")
  argv[argv.index("--views") + 1] = "1"
  return (cache_main, argv, 2, r"--mix mixup:0\.2 mixes views 1\.\. with partner views 1\.\. .*give --views 2 or more",
          [Absent(tmp_path / "c.zarr")])


@fault("fit --mix other than the cache's")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--cache", env.store, "--mix", "cutmix:1", "--out", tmp_path / "r"), 2,
          r"--mix cutmix:1: cache .* holds views mixed 'none', .*drop --mix \(or rebuild the cache with "
          r"--mix cutmix:1\)",
          [env.store, Absent(tmp_path / "r")])


@fault("fit --mix without a cache")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", "digits", "--mix", "mixup:0.2", "--out", tmp_path / "r"), 2,
          r"--mix mixup:0\.2 mixes a cache's views .*hard-label training without --cache does not mix",
          [Absent(tmp_path / "r")])


# --- grow: teacher-cache extend (teacher_cache/extend.py, teacher_cache/grow.py) ---
def _extend(env, store, *extra):
  return ["extend", store, "--data-dir", env.data_dir, "--no-progress", *extra]


@fault("extend by a teacher already a member")
def _(env, tmp_path, mp):
  return (cache_main, _extend(env, env.store, "--teacher", env.teachers[1]), 2,
          r"teacher '.*t1' is already member 1 \('t1'\) of .*: give a new member, or more --views\.",
          [env.store, Absent(env.store + ".extending")])


@fault("extend --views not more than the cache's")
def _(env, tmp_path, mp):
  return (cache_main, _extend(env, env.store, "--views", "2"), 2,
          r"--views 2: .* already holds 2 views per example; give more than 2",
          [env.store, Absent(env.store + ".extending")])


@fault("extend by a teacher of other classes")
def _(env, tmp_path, mp):
  five = make_teacher(tmp_path / "five", num_classes=5)
  return (cache_main, _extend(env, env.store, "--teacher", five), 2,
          r"has 10 classes but the teachers output 5 logits|output 5 logits, but cache .* holds 10 classes",
          [env.store, Absent(env.store + ".extending")])


@fault("extend a sparse cache without member logits")
def _(env, tmp_path, mp):
  store = tmp_path / "sparse.zarr"
  assert run_cli(cache_main, _build(env, store, "--targets", "topk:3", "--eval-split", "none", split="train[:64]",
                                    teachers=env.teachers[:1]), _NoCapture())[0] == 0
  return (cache_main, _extend(env, str(store), "--teacher", env.teachers[1], "--out", tmp_path / "new.zarr"), 2,
          r"stores topk:3 targets without its members' logits, so no member can be taken from it: rebuild it with "
          r"--member-logits", [store, Absent(tmp_path / "new.zarr")])


@fault("extend a cache of other data (another fingerprint)")
def _(env, tmp_path, mp):
  data = tmp_path / "data.npz"
  shutil.copy(env.npz_ok[len("npz:"):], data)
  store = tmp_path / "flat.zarr"
  assert run_cli(cache_main, ["build", "--dataset", f"npz:{data}", "--teacher", env.flat_teacher, "--out", store,
                              "--no-progress"], _NoCapture())[0] == 0
  arrays = dict(np.load(data))
  np.savez(data, x=arrays["x"] + 1, y=arrays["y"])  # Changed after the build.
  other = make_teacher(tmp_path / "flat2", input_shape=(6,), num_classes=3, seed=1,
                       normalization={"shift": 0.0, "scale": 1.0})
  return (cache_main, _extend(env, str(store), "--teacher", other), 2,
          r"cannot be grown into the cache asked for: dataset fingerprint: .* \(here\) vs .* \(that cache\) \(the "
          r"data changed since that cache was built",
          [store, Absent(str(store) + ".extending")])


@fault("extend in place on an object store")
def _(env, tmp_path, mp):
  return (cache_main, _extend(env, "s3://bucket/cache.zarr", "--teacher", env.teachers[0]), 2,
          r"'s3://bucket/cache\.zarr' is on an object store, where a store is not renamed but copied: give --out NEW",
          [])


# --- derive: teacher-cache convert, subset and merge ---------------------------------------------------------------
def _variant(env, tmp_path, name="v.zarr", **changes) -> str:
  """A copy of the fixture store whose spec says `changes` (a dotted key sets a nested one, e.g. augmentation.seed),
  sealed again: a complete store whose settings differ, for the refusals that read only the spec."""
  from conftest import reseal  # pylint: disable=import-outside-toplevel
  copy = str(tmp_path / name)
  shutil.copytree(env.store, copy)
  group = zarr.open_group(copy, mode="r+")
  spec = group.attrs[SPEC_KEY]
  for key, value in changes.items():
    *path, last = key.split(".")
    where = spec
    for part in path:
      where = where[part]
    where[last] = value
  group.attrs[SPEC_KEY] = spec
  reseal(copy)
  return copy


def _sparse_without_logits(env, tmp_path) -> str:
  out = tmp_path / "sparse.zarr"
  assert run_cli(cache_main, _build(env, out, "--targets", "topk:3", split="train[:40]"), _NoCapture())[0] == 0
  return str(out)


@fault("convert a sparse cache without member logits")
def _(env, tmp_path, mp):
  store = _sparse_without_logits(env, tmp_path)
  return (cache_main, ["convert", store, "--targets", "dense", "--out", tmp_path / "n.zarr"], 2,
          r"stores topk:3 targets without its members' logits, so no member can be taken from it: rebuild it with "
          r"--member-logits", [store, Absent(tmp_path / "n.zarr")])


@fault("convert to the targets the cache stores")
def _(env, tmp_path, mp):
  return (cache_main, ["convert", env.store, "--targets", "dense", "--out", tmp_path / "n.zarr"], 2,
          r"already stores dense targets: nothing to convert", [env.store, Absent(tmp_path / "n.zarr")])


@fault("convert --targets topk:K beyond the classes")
def _(env, tmp_path, mp):
  return (cache_main, ["convert", env.store, "--targets", "topk:11", "--out", tmp_path / "n.zarr"], 2,
          r"--targets topk:11: K is more than the 10 classes", [env.store, Absent(tmp_path / "n.zarr")])


@fault("convert --out a non-store directory")
def _(env, tmp_path, mp):
  return (cache_main, ["convert", env.store, "--targets", "topk:3", "--out", env.notes], 2,
          r"--out '.*notes' exists and is not a stillroom cache", [env.store, env.notes])


@fault("convert --out the source")
def _(env, tmp_path, mp):
  return (cache_main, ["convert", env.store, "--targets", "topk:3", "--out", env.store], 2,
          r"--out .* is \(or holds, or lies inside\) this command's input", [env.store])


@fault("convert --out a cache of other settings")
def _(env, tmp_path, mp):
  other = _copy_store(env, tmp_path)
  return (cache_main, ["convert", env.store, "--targets", "topk:3", "--data-dir", env.data_dir, "--out", other], 2,
          r"--out '.*c\.zarr' holds a cache built with other settings: .*targets: None \(store\) vs topk:3 \(command\)"
          r".*Pass --overwrite to replace it, or choose another --out\.", [env.store, other])


@fault("subset --members a name not in the cache")
def _(env, tmp_path, mp):
  return (cache_main, ["subset", env.store, "--members", "t9", "--out", tmp_path / "n.zarr"], 2,
          r"--members 't9': .* has no such member; its members are 't0', 't1' \(or their indices 0\.\.1\)",
          [env.store, Absent(tmp_path / "n.zarr")])


@fault("subset --members a member twice")
def _(env, tmp_path, mp):
  return (cache_main, ["subset", env.store, "--members", "t0", "0", "--out", tmp_path / "n.zarr"], 2,
          r"--members names 't0' more than once", [env.store, Absent(tmp_path / "n.zarr")])


@fault("subset --views beyond the cache's views")
def _(env, tmp_path, mp):
  return (cache_main, ["subset", env.store, "--views", "3", "--out", tmp_path / "n.zarr"], 2,
          r"--views 3: .* holds views 0\.\.1; give a count in 1\.\.2", [env.store, Absent(tmp_path / "n.zarr")])


@fault("subset --views 1 of mixed views")
def _(env, tmp_path, mp):
  store = tmp_path / "mixed.zarr"
  assert run_cli(cache_main, _build(env, store, "--views", "4", "--mix", "cutmix:1", "--eval-split", "none",
                                    split="train[:40]"), _NoCapture())[0] == 0
  return (cache_main, ["subset", store, "--views", "1", "--out", tmp_path / "n.zarr"], 2,
          r"--views 1: the views of .* are mixed \(cutmix:1\.0\) and view 0 is never mixed, so a mixed cache keeps 2 "
          r"views or more: give a count in 2\.\.4\.", [store, Absent(tmp_path / "n.zarr")])


@fault("subset keeping everything")
def _(env, tmp_path, mp):
  return (cache_main, ["subset", env.store, "--members", "t0", "t1", "--out", tmp_path / "n.zarr"], 2,
          r"keep every member and view of .* nothing to subset", [env.store, Absent(tmp_path / "n.zarr")])


@fault("merge a cache with itself (overlapping members)")
def _(env, tmp_path, mp):
  return (cache_main, ["merge", env.store, env.store, "--out", tmp_path / "n.zarr"], 2,
          r"both hold members 't0' \(digest [0-9a-f]{12}…\), 't1' .*Merge joins disjoint members over the same views",
          [env.store, Absent(tmp_path / "n.zarr")])


@fault("merge caches of other temperatures, combine rules, view seeds, augmentations and compute dtypes")
def _(env, tmp_path, mp):
  other = _variant(env, tmp_path, temperature=2.0, combine="geometric", **{
      "augmentation.seed": 7, "augmentation.max_shift": 2, "compute_dtype": "bfloat16", "target_tolerance": 0.1})
  return (cache_main, ["merge", env.store, other, "--out", tmp_path / "n.zarr"], 2,
          r"cannot merge .*: temperature: 4 \(.*\) vs 2 \(.*\); combine: arithmetic .* vs geometric .*; view seed: "
          r"0 .* vs 7 .*; augmentation: .*'max_shift': 1.* vs .*'max_shift': 2.*; compute dtype: float32 .* vs "
          r"bfloat16 .*\. Merge joins caches of the same data, views and settings\.",
          [env.store, other, Absent(tmp_path / "n.zarr")])


@fault("merge caches of other data, views and dtype")
def _(env, tmp_path, mp):
  other = tmp_path / "other.zarr"
  assert run_cli(cache_main, _build(env, other, "--dtype", "float32", "--views", "1", split="train[:100]"),
                 _NoCapture())[0] == 0
  return (cache_main, ["merge", env.store, other, "--out", tmp_path / "n.zarr"], 2,
          r"cannot merge .*: transfer set: digits train\[:200\] \(fingerprint [0-9a-f]{12}…\) \(.*\) vs digits "
          r"train\[:100\] .*; views: 2 .* vs 1 .*; dtype: float16 .* vs float32 ",
          [env.store, other, Absent(tmp_path / "n.zarr")])


@fault("convert a cache of cross-fitted members")
def _(env, tmp_path, mp):
  runs = [make_teacher(tmp_path / f"f{k}", seed=k, cross_fit=(2, k)) for k in range(2)]
  store = tmp_path / "folds.zarr"  # One member of 2 fold runs: its stored logits are not one run's.
  assert run_cli(cache_main, _build(env, store, "--folds", "2", "--eval-split", "none", split="train[:40]",
                                    teachers=runs), _NoCapture())[0] == 0
  return (cache_main, ["convert", store, "--targets", "topk:3", "--out", tmp_path / "n.zarr"], 2,
          r"cache .* has cross-fitted members, whose stored logits are not one run's each: it cannot be grown; build "
          r"the cache you want directly\.", [store, Absent(tmp_path / "n.zarr")])


def _untouched_in_place(store) -> list:
  """A store extended in place, unchanged, and no staging store, lock or replaced store beside it."""
  return [store, Absent(store + ".extending"), Absent(store + ".replaced")]


@fault("extend with neither --teacher nor --views")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  return (cache_main, _extend(env, store), 2, r"give --teacher RUN \(a new member\) and/or --views N",
          _untouched_in_place(store))


@fault("extend --views of a cache whose member's run is gone")
def _(env, tmp_path, mp):
  recorded = zarr.open_group(env.store, mode="r").attrs[SPEC_KEY]["members"]
  store = _variant(env, tmp_path, members=[{**m, "source": str(tmp_path / "gone")} for m in recorded])
  return (cache_main, _extend(env, store, "--views", "3", "--out", tmp_path / "n.zarr"), 2,
          r"more views need every member's run, and member 't0''s at '.*gone' \(as .* records it\) cannot be loaded "
          r".*give it with --teacher\.", [store, Absent(tmp_path / "n.zarr")])


@fault("extend --teacher of another input shape")
def _(env, tmp_path, mp):
  return (cache_main, _extend(env, env.store, "--teacher", env.flat_teacher, "--out", tmp_path / "n.zarr"), 2,
          r"teacher 'flat_teacher' .* takes inputs of shape \(6,\)", [env.store, Absent(tmp_path / "n.zarr")])


# --- attack: the new commands of issue 33 used as a new user would ---
@fault("convert of a prepared image store")
def _(env, tmp_path, mp):
  prepared = _prepared(tmp_path)
  return (cache_main, ["convert", prepared, "--targets", "topk:2", "--out", tmp_path / "n.zarr"], 2,
          r"'.*p\.zarr' is a prepared image store \(`teacher-cache prepare`\), not a cache: build a cache of its "
          r"images with `teacher-cache build --dataset prepared:.*p\.zarr \.\.\.`\.$",
          [prepared, Absent(tmp_path / "n.zarr")])


@fault("extend by the same teacher twice")
def _(env, tmp_path, mp):
  return (cache_main, _extend(env, env.store, "--views", "3", "--teacher", env.teachers[0], "--teacher",
                              env.teachers[0], "--out", tmp_path / "n.zarr"), 2,
          r"teachers '.*' and '.*' have the same parameters; an ensemble member given twice only weighs it double\.",
          [env.store, Absent(tmp_path / "n.zarr"), Absent(env.store + ".extending")])


@fault("fit on the incomplete output of an interrupted convert")
def _(env, tmp_path, mp):
  store = _variant(env, tmp_path, history=[{"command": "convert", "targets": ["dense", "topk:2"]}])
  _edit_spec(store, lambda attrs: attrs.pop(COMPLETE_KEY))
  return (student_main, _fit(env, "--cache", store, "--out", tmp_path / "r"), 2,
          r"is not complete \(its build was interrupted or failed\); run the same `teacher-cache convert` command "
          r"again to finish it\.", [store, Absent(tmp_path / "r")])


@fault("extend in place beside the unfinished staging store of another extend")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  stale = store + ".extending"  # What an extend of other settings (here: its views) left.
  shutil.copytree(env.store, stale)
  return (cache_main, _extend(env, store, "--views", "3"), 2,
          r"'.*c\.zarr\.extending' holds an unfinished extend of '.*c\.zarr' with other settings \(.*views: 2 "
          r"\(store\) vs 3 \(command\).*\): run that extend again to finish it, or pass --overwrite to discard it",
          [store, stale, Absent(store + ".replaced")])


# --- engine: the grow engine's memory, extend's lock and teacher loading (teacher_cache/grow.py, extend.py) ---
@fault("extend of a cache another extend holds (as in its switch-over)")
def _(env, tmp_path, mp):
  store = _copy_store(env, tmp_path)
  env.holder = _held_lock(store, tmp_path)  # The lock an extend holds on CACHE from before it reads CACHE.
  return (cache_main, _extend(env, store, "--views", "3"), 2,
          rf"'.*c\.zarr' is being written by process {env.holder.pid} on .*; wait for it to finish\.$",
          [store, Absent(store + ".extending"), Absent(store + ".replaced")])


# --- polish: derive/info/store review findings (issue 33) ---
def _killed_between_renames(env, tmp_path) -> str:
  """What a kill between the two renames of extend's fallback switch-over leaves: no CACHE, the old cache at
  CACHE.replaced and the complete grown one at CACHE.extending."""
  cache = str(tmp_path / "c.zarr")
  shutil.copytree(env.store, cache + ".replaced")
  shutil.copytree(env.store, cache + ".extending")
  return cache


_SWITCH_LEFT = (r"no cache at '.*c\.zarr', but '.*c\.zarr\.extending' and '.*c\.zarr\.replaced' are there: an extend "
                r"of it was interrupted while switching to the extended store; run that `teacher-cache extend` again "
                r"to finish the switch\.$")


@fault("info of a cache whose extend was killed between the two renames of its switch-over")
def _(env, tmp_path, mp):
  cache = _killed_between_renames(env, tmp_path)
  return cache_main, ["info", cache], 2, _SWITCH_LEFT, [cache + ".extending", cache + ".replaced", Absent(cache)]


@fault("fit --cache of a cache whose extend was killed between the two renames of its switch-over")
def _(env, tmp_path, mp):
  cache = _killed_between_renames(env, tmp_path)
  return (student_main, _fit(env, "--cache", cache, "--out", tmp_path / "r"), 2, _SWITCH_LEFT,
          [cache + ".extending", cache + ".replaced", Absent(cache), Absent(tmp_path / "r")])


@fault("convert --chunk-rows 0")
def _(env, tmp_path, mp):
  return (cache_main, ["convert", env.store, "--targets", "topk:3", "--chunk-rows", "0", "--out", tmp_path / "n.zarr"],
          2,
          r"--chunk-rows must be >= 1, got 0\.$", [env.store, Absent(tmp_path / "n.zarr")])


@fault("subset --chunk-rows not a multiple of the views kept")
def _(env, tmp_path, mp):
  return (cache_main, ["subset", env.store, "--members", "t1", "--chunk-rows", "33", "--data-dir", env.data_dir,
                       "--out", tmp_path / "n.zarr"], 2,
          r"--chunk-rows 33 is not a multiple of --views 2, .* give 32 or 34, or none \(the default is a multiple of "
          r"--views\)\.$", [env.store, Absent(tmp_path / "n.zarr")])


# --- lm: language models (issue 34: shared/architectures/transformer.py, eval and sample of LM runs) ---
@fault("fit --model lm-tiny on images")
def _(env, tmp_path, mp):
  return (student_main, ["fit", "--model", "lm-tiny", "--dataset", "digits", "--data-dir", env.data_dir, "--out",
                         tmp_path / "r"], 2,
          r"model 'lm-tiny' takes token rows of shape \(2, L\) \(token ids and segment ids, a text: dataset\); got "
          r"\(8, 8, 1\)\.$", [Absent(tmp_path / "r")])


@fault("fit of an image model on text")
def _(env, tmp_path, mp):
  (tmp_path / "t.txt").write_text("abc" * 50)
  return (student_main, ["fit", "--model", "cnn-small", "--dataset", f"text:{tmp_path / 't.txt'}", "--seq-len", "16",
                         "--out", tmp_path / "r"], 2,
          r"model 'cnn-small' must return logits of shape \[batch, positions, vocabulary\] for token rows; .* "
          r"\(token rows need a language model: lm-tiny, lm-small\)\.$", [Absent(tmp_path / "r")])


@fault("sample of a classifier run")
def _(env, tmp_path, mp):
  return (student_main, ["sample", env.run, "--prompt", "abc"], 2,
          r"run '.*run' is a mlp-tiny on inputs \(8, 8, 1\), not a language model of a text: dataset", [env.run])


@fault("eval --teacher of classifier runs")
def _(env, tmp_path, mp):
  return (student_main, ["eval", env.run, "--dataset", "digits", "--data-dir", env.data_dir, "--teacher", env.run],
          2, r"--teacher .*: compares language models' next tokens; run '.*run' is a classifier", [env.run])


@fault("eval of a language model on images")
def _(env, tmp_path, mp):
  run = tmp_path / "lm"
  shutil.copytree(env.run, run)  # A classifier run's files, its record made a language model's.
  config = json.loads((run / "config.json").read_text())
  config["model"]["input_shape"] = config["resolved"]["model"]["input_shape"] = [2, 16]
  config["resolved"]["dataset"]["text"] = {"seq_len": 16, "tokenizer": {"kind": "bytes", "vocab_size": 256},
                                           "pack_seed": 0}
  (run / "config.json").write_text(json.dumps(config))
  return (student_main, ["eval", run, "--dataset", "digits", "--data-dir", env.data_dir], 2,
          r"run '.*lm' is a language model: evaluate it on text \(--dataset text:PATH\), not 'digits'\.$", [run])


# --- token caches (teacher_cache build/import/extend of text: rows) ---


def _text_dir(tmp_path) -> str:
  return write_documents(tmp_path / "docs", ["the cat sat on the mat.", "hello, world", "packing documents into rows."])


def _token_build(tmp_path, *extra) -> list:
  return ["build", "--dataset", f"text:{_text_dir(tmp_path)}", "--seq-len", "8", "--teacher",
          "lm_teachers:byte_teacher", "--eval-split", "none", "--chunk-rows", "4", "--batch-size", "4",
          "--no-progress", "--out", tmp_path / "c.zarr", *extra]


@fault("build of token rows with --folds")
def _(env, tmp_path, mp):
  return (cache_main, _token_build(tmp_path, "--folds", "2", "--teacher", "lm_teachers:soft_byte_teacher"), 2,
          r"--folds: 'text:.*' holds token rows \(8 positions, a language model's next tokens\): cross-fitting is "
          r"class-level\.$", [Absent(tmp_path / "c.zarr")])


@fault("build of token rows with --features")
def _(env, tmp_path, mp):
  return (cache_main, _token_build(tmp_path, "--features", "block0"), 2,
          r"--features: 'text:.*' holds token rows \(8 positions, .*\): teacher features of token rows are not "
          r"stored\.$", [Absent(tmp_path / "c.zarr")])


@fault("import of token rows")
def _(env, tmp_path, mp):
  return (cache_main, ["import", "--dataset", f"text:{_text_dir(tmp_path)}", "--seq-len", "8", "--logits",
                       tmp_path / "none.npz", "--no-progress", "--out", tmp_path / "c.zarr"], 2,
          r"teacher-cache import --logits: 'text:.*' holds token rows \(8 positions\), and --logits takes one row of "
          r"class logits per row; .* with `teacher-cache import --logprobs FILE` .*\.$", [Absent(tmp_path / "c.zarr")])


@fault("extend of a token cache")
def _(env, tmp_path, mp):
  cache = str(tmp_path / "c.zarr")
  assert cache_main([str(a) for a in _token_build(tmp_path)]) in (0, None)
  return (cache_main, ["extend", cache, "--teacher", "lm_teachers:soft_byte_teacher", "--no-progress"], 2,
          r"cache '.*c\.zarr' holds token rows \(8 positions\): extend, convert, subset and merge take class-level "
          r"caches; build the cache you want directly \(`teacher-cache build`\)\.$", [cache])


# --- text: text transfer sets (shared/data/text.py) ------------------------------------------------------------
def _text_file(tmp_path, name: str, content: bytes) -> str:
  path = tmp_path / name
  path.write_bytes(content)
  return f"text:{path}"


@fault("text: a .jsonl line without a string text field")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "docs.jsonl", b'{"text": "one"}\n{"title": "two"}\n')
  return (student_main, _fit(env, "--dataset", data, "--out", tmp_path / "r"), 2,
          r"docs\.jsonl line 2: no string 'text' field", [Absent(tmp_path / "r")])


@fault("text: a .jsonl line that is not JSON")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "docs.jsonl", b'{"text": "one"}\n{"text": "two"\n')
  return (student_main, _fit(env, "--dataset", data, "--out", tmp_path / "r"), 2,
          r"docs\.jsonl line 2: not JSON", [Absent(tmp_path / "r")])


@fault("text: a file that is not UTF-8")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "latin.txt", "first line\ncafé\n".encode("latin-1"))
  return (cache_main, ["build", "--dataset", data, "--teacher", env.flat_teacher, "--out", tmp_path / "c.zarr"], 2,
          r"latin\.txt line 2: not UTF-8", [Absent(tmp_path / "c.zarr")])


@fault("text: a folder with no text")
def _(env, tmp_path, mp):
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "empty.txt").write_text("")
  return (student_main, _fit(env, "--dataset", f"text:{tmp_path / 'corpus'}", "--out", tmp_path / "r"), 2,
          r"no text in .*corpus", [Absent(tmp_path / "r")])


@fault("text: --seq-len for data that is not text")
def _(env, tmp_path, mp):
  return (student_main, _fit(env, "--dataset", env.npz_ok, "--seq-len", "64", "--out", tmp_path / "r"), 2,
          r"is not text: --seq-len, --tokenizer and --pack-seed apply to 'text:PATH' datasets only",
          [Absent(tmp_path / "r")])


@fault("text: --seq-len 1")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "a.txt", b"some text")
  return (student_main, _fit(env, "--dataset", data, "--seq-len", "1", "--out", tmp_path / "r"), 2,
          r"--seq-len must be >= 2", [Absent(tmp_path / "r")])


@fault("text: a --tokenizer file that is not there")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "a.txt", b"some text")
  return (student_main, _fit(env, "--dataset", data, "--tokenizer", tmp_path / "absent.json", "--out",
                             tmp_path / "r"), 2, r"--tokenizer .*absent\.json: cannot read it",
          [Absent(tmp_path / "r")])


@fault("text: build --views 2 of text")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "a.txt", b"some text")
  return (cache_main, ["build", "--dataset", data, "--teacher", env.flat_teacher, "--views", "2", "--out",
                       tmp_path / "c.zarr"], 2, r"--views 2: dataset .* is text, whose one view is its packed rows",
          [Absent(tmp_path / "c.zarr")])


@fault("text: fit --augment on text")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "a.txt", b"some text")
  return (student_main, _fit(env, "--dataset", data, "--augment", "--out", tmp_path / "r"), 2,
          r"--augment: dataset .* is text", [Absent(tmp_path / "r")])


# --- review ---------------------------------------------------------------------------------------------------


@fault("build of token rows with --specialists")
def _(env, tmp_path, mp):
  return (cache_main, _token_build(tmp_path, "--specialists", tmp_path / "plan.json"), 2,
          r"--specialists: 'text:.*' holds token rows \(8 positions, .*\): specialists are class-level .*\.$",
          [Absent(tmp_path / "c.zarr")])


@fault("views of token rows with --views 2")
def _(env, tmp_path, mp):
  return (cache_main, ["views", "--dataset", f"text:{_text_dir(tmp_path)}", "--seq-len", "8", "--views", "2",
                       "--no-progress", "--out", tmp_path / "v"], 2,
          r"--views 2: dataset 'text:.*' is text, whose one view is its packed rows \(no views, crops, flips or "
          r"mixing\); leave it out\.$", [Absent(tmp_path / "v")])


# --- attack: language models ---
@fault("text: --seq-len above 2**24")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "a.txt", b"some text")
  return (student_main, _fit(env, "--dataset", data, "--seq-len", str(2**24 + 1), "--out", tmp_path / "r"), 2,
          r"--seq-len 16777217: must be at most 16777216 \(2\*\*24: .*\); give a smaller --seq-len\.$",
          [Absent(tmp_path / "r")])


@fault("sample of a run whose tokenizer.json was damaged")
def _(env, tmp_path, mp):
  run = tmp_path / "lm"
  shutil.copytree(env.run, run)  # A classifier run's files, its record made a language model's of a tokenizer file.
  (tmp_path / "tokenizer.json").write_text("{broken")
  config = json.loads((run / "config.json").read_text())
  config["model"]["input_shape"] = config["resolved"]["model"]["input_shape"] = [2, 16]
  config["resolved"]["dataset"]["text"] = {"seq_len": 16, "pack_seed": 0, "tokenizer": {
      "kind": "tokenizers", "path": str(tmp_path / "tokenizer.json"), "sha256": "ab" * 32, "vocab_size": 300}}
  (run / "config.json").write_text(json.dumps(config))
  return (student_main, ["sample", run, "--prompt", "abc"], 2,
          r"--tokenizer .*tokenizer\.json: the file changed since it was recorded \(SHA-256 [0-9a-f]{12}, recorded "
          r"abababababab\); restore it", [run])


@fault("fit --cache of token rows at another --seq-len")
def _(env, tmp_path, mp):
  cache = str(tmp_path / "c.zarr")
  assert cache_main([str(a) for a in _token_build(tmp_path)]) in (0, None)
  return (student_main, ["fit", "--cache", cache, "--model", "lm-tiny", "--seq-len", "16", "--pack-seed", "3",
                         "--epochs", "1", "--no-progress", "--out", tmp_path / "r"], 2,
          r"is not the data the cache .* was built from \(.*\)\. It was packed with other text options: --seq-len 16 "
          r"\(the cache's: 8\), --pack-seed 3 \(the cache's: 0\); leave them out \(the cache's are used\)\.$",
          [cache, Absent(tmp_path / "r")])


@fault("fit of a language model with an image --eval-dataset")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "a.txt", b"some text")
  return (student_main, _fit(env, "--model", "lm-tiny", "--dataset", data, "--seq-len", "8", "--eval-dataset", "digits",
                             "--out", tmp_path / "r"), 2,
          r"--eval-dataset 'digits': the transfer set 'text:.*a\.txt' is text \(rows of tokens\); evaluate on held-out "
          r"data of its kind \(--eval-dataset text:PATH --eval-split train\), or give --eval-split none\.$",
          [Absent(tmp_path / "r")])


@fault("eval of a classifier run on text")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "a.txt", b"some text")
  return (student_main, ["eval", env.run, "--dataset", data, "--split", "train"], 2,
          r"run '.*run' is a classifier, not a language model: evaluate it on its own kind of data, not the text "
          r"'text:.*a\.txt'\.$", [env.run])


@fault("text: a .jsonl text field with a lone surrogate")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "docs.jsonl", b'{"text": "fine"}\n{"text": "a\\ud800b"}\n')
  return (student_main, _fit(env, "--model", "lm-tiny", "--dataset", data, "--seq-len", "4", "--out", tmp_path / "r"),
          2, r"docs\.jsonl line 2: the 'text' field is not valid Unicode \(surrogates not allowed at character 1\)\.$",
          [Absent(tmp_path / "r")])


@fault("text: no document longer than one token")
def _(env, tmp_path, mp):
  data = _text_file(tmp_path, "docs.jsonl", b'{"text": "a"}\n{"text": "b"}\n')
  return (student_main, _fit(env, "--model", "lm-tiny", "--dataset", data, "--seq-len", "4", "--out", tmp_path / "r"),
          2, r"no position of its rows of 4 tokens has a next token of its document .*; give longer documents\.$",
          [Absent(tmp_path / "r")])


@pytest.mark.fast
def test_running_out_of_host_memory_is_one_line(capsys):
  """XLA's CPU client reports no RESOURCE_EXHAUSTED but "Out of memory allocating ..." (an INTERNAL error), NumPy a
  MemoryError: both are the routine out-of-memory failure (a huge --seq-len), not a traceback."""
  def xla_cpu():
    raise RuntimeError("INTERNAL: Error dispatching computation: Out of memory allocating 2566784195392 bytes.\nmore")

  def numpy_host():
    raise MemoryError("Unable to allocate 745. GiB for an array with shape (99999999999,) and data type int64")
  from shared.cli import run_or_exit
  for failing in (xla_cpu, numpy_host):
    with pytest.raises(SystemExit) as e:
      run_or_exit("student-train", failing)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error: out of memory (" in err and "--seq-len" in err, err


def test_an_lm_run_whose_tokenizer_file_moved_is_evaluated_with_it_elsewhere(tmp_path, capsys):
  """The data's fingerprint leaves out where the tokenizer file lies; so does `eval --tokenizer` of a run: the file
  moved (same SHA-256) evaluates as before, and `sample`, which takes no --tokenizer, says where to restore it."""
  tokenizers = pytest.importorskip("tokenizers")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  tokenizer.train_from_iterator(["the cat sat on the mat. " * 8], tokenizers.trainers.BpeTrainer(
      vocab_size=270, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 20)
  run = str(tmp_path / "run")
  code, _, err = run_cli(student_main, [
      "fit", "--model", "lm-tiny", "--dataset", f"text:{tmp_path / 'a.txt'}", "--tokenizer",
      tmp_path / "tokenizer.json", "--seq-len", "16", "--epochs", "1", "--batch-size", "8", "--eval-split", "none",
      "--no-progress", "--out", run],
      capsys)
  assert code in (0, None), err
  evaluate = ["eval", run, "--dataset", f"text:{tmp_path / 'a.txt'}", "--json"]
  code, before, err = run_cli(student_main, evaluate, capsys)
  assert code in (0, None), err
  os.rename(tmp_path / "tokenizer.json", tmp_path / "moved.json")
  from shared.data.text import load_tokenizer  # pylint: disable=import-outside-toplevel
  load_tokenizer.cache_clear()  # Each command is a process of its own: the file is read again.
  code, _, err = run_cli(student_main, evaluate, capsys)
  assert code == 2 and err.count("\n") == 1 and "tokenizer.json: cannot read it" in err, err
  code, after, err = run_cli(student_main, [*evaluate, "--tokenizer", tmp_path / "moved.json"], capsys)
  assert code in (0, None), err
  assert json.loads(after)["perplexity"] == json.loads(before)["perplexity"]
  code, _, err = run_cli(student_main, ["sample", run, "--prompt", "the"], capsys)
  assert code == 2 and err.count("\n") == 1 and re.search(r"recorded with SHA-256 [0-9a-f]{12}: restore it there", err)


# --- text demo (issue 34 part 5) ---
@fault("demo --text: a work dir holding an incomplete copy of the stdlib files")
def _(env, tmp_path, mp):
  import platform  # pylint: disable=import-outside-toplevel
  from stillroom.cli import student_train_main  # The command line with `demo`.
  copy = tmp_path / "work" / f"stdlib-{platform.python_version()}"
  (copy / "train").mkdir(parents=True)  # No test/ folder: a copy interrupted before its end.
  return (student_train_main, ["demo", "--text", "--work-dir", tmp_path / "work", "--results-dir",
                               tmp_path / "results"], 2,
          r"stdlib-.* exists but is not a complete copy of the demo's stdlib files; delete it",
          [copy, Absent(tmp_path / "results")])


# --- import --logprobs (issue 35, parts 1 and 2) ---
def _logprob_rows(tmp_path) -> tuple[str, np.ndarray]:
  """The text dir of `_text_dir` and its cache rows x int32 [R, 2, 8] (seq len 8, seed 0), in cache row order."""
  from shared.cache import GROUPED, row_sources  # pylint: disable=import-outside-toplevel
  from teacher_cache.build import BuildConfig, open_views, resolve_defaults  # pylint: disable=import-outside-toplevel
  folder = _text_dir(tmp_path)
  data, _ = open_views(resolve_defaults(BuildConfig(dataset=f"text:{folder}", seq_len=8)))
  _, position = row_sources(np.arange(len(data)), len(data), 0, GROUPED, 1)
  return folder, np.asarray(data.read(position)[0])


def _logprob_npz(tmp_path, x, name="t.npz", shift=0, pad_mass=None) -> str:
  """Top-2 arrays of a distribution peaked on each next token; tokens rolled by `shift`; `pad_mass` on id 300."""
  nxt = np.concatenate([x[:, 0, 1:], x[:, 0, :1]], axis=1)
  ids = np.stack([nxt, np.where(nxt == 1, 2, 1)], axis=-1)
  lps = np.log(np.broadcast_to([0.9, 0.05], ids.shape)).copy()
  if pad_mass is not None:
    ids[..., 1], lps[..., 1] = 300, np.log(pad_mass)
  path = str(tmp_path / name)
  np.savez(path, row=np.arange(len(x)), token_ids=np.roll(x[:, 0], shift, axis=1), topk_ids=ids, topk_log_probs=lps)
  return path


def _logprob_import(tmp_path, folder, *extra) -> list:
  return ["import", "--dataset", f"text:{folder}", "--seq-len", "8", "--no-progress", "--out", tmp_path / "c.zarr",
          *extra]


@fault("import --logprobs: tokens shifted by one position")
def _(env, tmp_path, mp):
  folder, x = _logprob_rows(tmp_path)
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", _logprob_npz(tmp_path, x, shift=1)), 2,
          r"--logprobs '.*t\.npz' row \d+ of the arrays \(row \d+, position \d+, .*doc\d\.txt, its token \d+\): the "
          r"teacher scored token \d+, the row holds \d+: its tokens are the row's shifted by one position\.$",
          [Absent(tmp_path / "c.zarr")])


@fault("import --logprobs: mass on a padded vocabulary's ids above the bound")
def _(env, tmp_path, mp):
  folder, x = _logprob_rows(tmp_path)
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", _logprob_npz(tmp_path, x, pad_mass=0.05)), 2,
          r"the teacher puts 0\.05 of its mass on ids >= 256 .* more than --max-padding-mass 0\.001",
          [Absent(tmp_path / "c.zarr")])


@fault("import --logprobs: another tokenizer's ids without --teacher-tokenizer")
def _(env, tmp_path, mp):
  folder, x = _logprob_rows(tmp_path)
  other = x.copy()
  other[:, 0] = np.where(x[:, 1] > 0, x[:, 0] + 3, 0)  # A vocabulary with 3 special tokens before the bytes.
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", _logprob_npz(tmp_path, other)), 2,
          r"--logprobs '.*t\.npz' row \d+ of the arrays \(row \d+, position \d+, .*doc\d\.txt, its token \d+\): the "
          r"teacher scored token \d+, the row holds \d+: other tokens \(scored with another tokenizer\? pass "
          r"--teacher-tokenizer TOKENIZER\.json to map its ids\)\.$", [Absent(tmp_path / "c.zarr")])


@fault("import --logprobs with --temperature")
def _(env, tmp_path, mp):
  folder, x = _logprob_rows(tmp_path)
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", _logprob_npz(tmp_path, x), "--temperature",
                                      "2"), 2,
          r"--temperature 2 with --logprobs: .*--generation-temperature Tg.*--retemper T",
          [Absent(tmp_path / "c.zarr")])


@fault("import --logits with a --logprobs setting")
def _(env, tmp_path, mp):
  return (cache_main, ["import", "--dataset", "digits", "--logits", tmp_path / "l.npz", "--retemper", "2",
                       "--out", tmp_path / "c.zarr"], 2, r"--retemper is a setting of `import --logprobs`",
          [Absent(tmp_path / "c.zarr")])


@fault("import with both --logits and --logprobs")
def _(env, tmp_path, mp):
  return (cache_main, ["import", "--dataset", "digits", "--logits", tmp_path / "l.npz", "--logprobs",
                       tmp_path / "t.jsonl", "--out", tmp_path / "c.zarr"], 2,
          r"argument --logprobs: not allowed with argument --logits", [Absent(tmp_path / "c.zarr")])


@fault("import --logprobs of class-level data")
def _(env, tmp_path, mp):
  (tmp_path / "t.jsonl").write_text('{"row": 0, "input_ids": [1, 2], "logprobs": [[]]}\n')
  return (cache_main, ["import", "--dataset", "digits", "--logprobs", tmp_path / "t.jsonl", "--out",
                       tmp_path / "c.zarr"], 2, r"--logprobs: 'digits' holds no token rows .*imported with --logits",
          [Absent(tmp_path / "c.zarr")])


@fault("import --logprobs of a file in no layout")
def _(env, tmp_path, mp):
  folder, _ = _logprob_rows(tmp_path)
  (tmp_path / "t.jsonl").write_text('{"row": 0, "tokens": [1, 2]}\n')
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", tmp_path / "t.jsonl"), 2,
          r"--logprobs '.*t\.jsonl' line 1: is none of the layouts: vLLM", [Absent(tmp_path / "c.zarr")])


# --- issue 35 attack ---
def _bad_npz(tmp_path, x, **over) -> str:
  """`_logprob_npz`'s arrays with some replaced (`over`: name -> array)."""
  with np.load(_logprob_npz(tmp_path, x, name="good.npz")) as good:
    arrays = {name: good[name] for name in good.files}
  arrays.update(over)
  np.savez(tmp_path / "t.npz", **arrays)
  return str(tmp_path / "t.npz")


# Import settings refused before any file is read: (the fault's name, the options, the error's pattern).
_LOGPROB_SETTING_FAULTS = (
    ("--retemper nan", ["--retemper", "nan"], r"--retemper must be > 0 and finite, got nan\.$"),
    ("--max-padding-mass outside [0, 1)", ["--max-padding-mass", "2"],
     r"--max-padding-mass must be in \[0, 1\), got 2\.0\.$"),
    ("--min-mapped-share outside [0, 1]", ["--min-mapped-share", "-1"],
     r"--min-mapped-share must be in \[0, 1\], got -1\.0\.$"),
    ("--member-logits", ["--member-logits"], r"--member-logits with --logprobs: a top-k file holds no logits"),
)


def _logprob_setting_fault(options: list, pattern: str):
  def case(env, tmp_path, mp):  # pylint: disable=unused-argument
    return (cache_main, ["import", "--dataset", "text:x", "--seq-len", "8", "--logprobs", tmp_path / "t.jsonl",
                         *options, "--out", tmp_path / "c.zarr"], 2, pattern, [Absent(tmp_path / "c.zarr")])
  return case


for _what, _options, _pattern in _LOGPROB_SETTING_FAULTS:
  fault(f"import --logprobs {_what}")(_logprob_setting_fault(_options, _pattern))


@fault("import --logprobs of arrays whose row ids are strings")
def _(env, tmp_path, mp):
  folder, x = _logprob_rows(tmp_path)
  path = _bad_npz(tmp_path, x, row=np.arange(len(x)).astype(str))
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", path), 2,
          r"--logprobs '.*t\.npz': `row` holds <U\d+ values, not integer ids\.$", [Absent(tmp_path / "c.zarr")])


@fault("import --logprobs of arrays whose token ids are fractions")
def _(env, tmp_path, mp):
  folder, x = _logprob_rows(tmp_path)
  path = _bad_npz(tmp_path, x, token_ids=x[:, 0] + 0.5)
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", path), 2,
          r"`token_ids` holds \d+\.5, not a whole number", [Absent(tmp_path / "c.zarr")])


@fault("import --logprobs of arrays of no rows")
def _(env, tmp_path, mp):
  folder, x = _logprob_rows(tmp_path)
  path = _bad_npz(tmp_path, x, row=np.zeros(0, np.int64), token_ids=np.zeros((0, 8), np.int64),
                  topk_ids=np.zeros((0, 8, 2), np.int64), topk_log_probs=np.zeros((0, 8, 2)))
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", path), 2,
          r"--logprobs '.*t\.npz' holds no rows", [Absent(tmp_path / "c.zarr")])


@fault("import --logprobs of axolotl lines with a fractional token id")
def _(env, tmp_path, mp):
  folder, _ = _logprob_rows(tmp_path)
  (tmp_path / "t.jsonl").write_text('{"row": 0, "input_ids": [1, 2], "logprobs": [[-0.1]], '
                                    '"target_token_ids": [[2.7]]}\n')
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", tmp_path / "t.jsonl"), 2,
          r"line 1: is malformed \(ValueError: `target_token_ids\[0\]` holds 2\.7, not a token id",
          [Absent(tmp_path / "c.zarr")])


@fault("import --logprobs of a vLLM line with a token id past int64")
def _(env, tmp_path, mp):
  folder, _ = _logprob_rows(tmp_path)
  (tmp_path / "t.jsonl").write_text('{"row": 0, "prompt_logprobs": [null, {"' + "9" * 30 + '": {"logprob": -0.1}}]}\n')
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", tmp_path / "t.jsonl"), 2,
          r"line 1: prompt_logprobs\[1\] has key '9+', not a token id", [Absent(tmp_path / "c.zarr")])


@fault("import --logprobs of a directory")
def _(env, tmp_path, mp):
  folder, _ = _logprob_rows(tmp_path)
  (tmp_path / "d.jsonl").mkdir()
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", tmp_path / "d.jsonl"), 2,
          r"--logprobs '.*d\.jsonl' is a directory", [Absent(tmp_path / "c.zarr")])


@fault("import --logprobs --teacher-tokenizer of a file that is not one")
def _(env, tmp_path, mp):
  folder, x = _logprob_rows(tmp_path)
  (tmp_path / "tok.json").write_text("garbage")
  return (cache_main, _logprob_import(tmp_path, folder, "--logprobs", _logprob_npz(tmp_path, x),
                                      "--teacher-tokenizer", tmp_path / "tok.json"), 2,
          r"error: --teacher-tokenizer .*tok\.json: not a Hugging Face tokenizer\.json", [Absent(tmp_path / "c.zarr")])


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_is_refused_cleanly(name, env, tmp_path, monkeypatch, capsys):
  _refused_cleanly(FAULTS[name](env, tmp_path, monkeypatch), env, monkeypatch, capsys)


def _refused_cleanly(fault_case, env, monkeypatch, capsys) -> None:
  """Runs a fault's command: its exit code, one error line matching its pattern, no traceback, nothing changed."""
  main, argv, code, pattern, protected = fault_case
  absent = [p for p in protected if isinstance(p, Absent)]
  assert not any(os.path.exists(p) for p in absent)
  protected = [p for p in protected if not isinstance(p, Absent)]
  before = {str(p): tree_digest(p) if os.path.isdir(p) else open(p, "rb").read() for p in protected}
  try:
    got, out, err = run_cli(main, argv, capsys)
  finally:
    monkeypatch.undo()
    if getattr(env, "holder", None) is not None:
      env.holder.kill()
      env.holder = None
  assert got == code, (got, err[-2000:])
  assert "Traceback" not in err
  if code == 2:
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and re.search(pattern, errors[0]), err[-2000:]
  else:
    assert re.search(pattern, out), out
  for path, snapshot in before.items():
    assert (tree_digest(path) if os.path.isdir(path) else open(path, "rb").read()) == snapshot, path
  for path in absent:
    assert not os.path.exists(path) and not os.path.exists(path + ".lock"), path


@pytest.mark.fast
def test_the_catalogue_holds_at_least_40_faults():
  assert len(FAULTS) >= 40


def test_the_swaps_cover_every_array(env):
  """Each array of the fixture store but the bookkeeping ones has a swap fault, unless all its chunk files are the
  same bytes (a swap then changes nothing)."""
  spec = zarr.open_group(env.store, mode="r").attrs[SPEC_KEY]
  arrays = {a["name"]: -(-a["shape"][0] // a["chunks"][0]) for a in spec["arrays"] if a["role"] != "bookkeeping"}
  alike = [name for name, count in arrays.items()
           if len({open(_chunk(env.store, name, k), "rb").read() for k in range(count)}) == 1]
  assert alike == ["flip"] and sorted(SWAPPED_ARRAYS) == sorted(set(arrays) - set(alike))


@pytest.mark.fast
def test_available_memory_is_the_least_of_the_system_and_the_cgroup(monkeypatch):
  """MemAvailable, and within a cgroup v2 limit the limit less the group's anonymous memory (its file cache can be
  reclaimed); sizes in decimal units with three significant digits."""
  import shared.limits as limits
  files = {("/proc/meminfo", "MemAvailable"): 8_000_000_000, ("/sys/fs/cgroup/memory.max", None): 4_000_000_000,
           ("/sys/fs/cgroup/memory.stat", "anon"): 1_500_000_000}
  monkeypatch.setattr(limits, "_read_number", lambda path, key=None: files.get((path, key)))
  assert limits.available_memory() == 2_500_000_000
  files[("/sys/fs/cgroup/memory.max", None)] = None  # "max": no limit.
  assert limits.available_memory() == 8_000_000_000
  assert [limits.human_bytes(n) for n in (999, 1000, 83e9, 498e9, 1.66e12)] == [
      "999 B", "1.00 kB", "83.0 GB", "498 GB", "1.66 TB"]


def test_ignore_limits_lets_a_build_past_the_checks(env, tmp_path, monkeypatch, capsys):
  """On a disk with 1 kB free, or with 1 kB of memory available, the build is refused before it writes anything,
  with both sizes and the option named; with --ignore-limits it starts (and here, where there is room, finishes)."""
  import shared.limits as limits
  out = tmp_path / "c.zarr"
  args = _build(env, out, "--views", "1", split="train[:50]")
  refusals = {
      "free_space": r"error: the store of 50 rows \(50 examples x 1 views\) would take [\d.]+ kB, more than the "
                    r"1.00 kB free on the file system of .*c\.zarr; .*, or pass --ignore-limits to start anyway\.$",
      "available_memory": r"error: one chunk of 64 rows \(.*\) needs about [\d.]+ kB of memory, more than the 1.00 "
                          r"kB available; give a smaller --chunk-rows \(the store has 50 rows\), or pass "
                          r"--ignore-limits"}
  for patched, message in refusals.items():
    with monkeypatch.context() as patch:
      patch.setattr(limits, patched, lambda *_: 1000)
      code, _, err = run_cli(cache_main, args, capsys)
      assert code == 2 and re.search(message, err.strip().splitlines()[-1]) and not os.path.exists(out), err
  for patched in refusals:
    monkeypatch.setattr(limits, patched, lambda *_: 1000)
  code, _, err = run_cli(cache_main, args + ["--ignore-limits"], capsys)
  assert code == 0 and COMPLETE_KEY in zarr.open_group(str(out), mode="r").attrs, err


def test_a_stale_lock_of_a_dead_process_is_taken_over(env, tmp_path, capsys):
  run = tmp_path / "run"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(str(run) + ".lock", "w") as f:
    json.dump({"host": __import__("socket").gethostname(), "pid": dead.pid, "command": "student-train fit",
               "since": "2026-11-25T10:00:00+00:00"}, f)
  code, _, err = run_cli(student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out", run), capsys)
  assert code == 0 and f"taking over the lock on {run} left by process {dead.pid}" in err
  assert not os.path.exists(str(run) + ".lock")  # Released when the run finished.


def test_a_diverged_run_keeps_its_last_finite_checkpoint(env, tmp_path, capsys):
  """The divergence check runs before the epoch is saved: the run dir keeps the last finite epoch's checkpoint, and
  its metrics stop there."""
  import student_train.train as train
  args = _fit(env, "--dataset", "digits", "--split", "train[:200]", "--epochs", "3", "--out", tmp_path / "r")
  real = train.make_train_step

  def poisoned_in_epoch_3(*args, **kwargs):
    step = real(*args, **kwargs)
    calls = {"n": 0}

    def maybe_nan(states, batch, hypers):
      calls["n"] += 1
      if calls["n"] > 2 * 2:  # 2 steps per epoch at batch 128 over 200 rows: epoch 3 gets NaN inputs.
        batch = {**batch, "x": batch["x"] * np.nan}
      return step(states, batch, hypers)

    return maybe_nan

  mp = pytest.MonkeyPatch()
  mp.setattr(train, "make_train_step", poisoned_in_epoch_3)
  try:
    code, _, err = run_cli(student_main, args, capsys)
  finally:
    mp.undo()
  assert code == 2 and "diverged in epoch 3" in err and "it keeps its checkpoint of epoch 2" in err
  assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["1", "2"]
  assert [json.loads(line)["epoch"] for line in open(tmp_path / "r" / "metrics.jsonl")] == [1, 2]
  assert not os.path.exists(tmp_path / "r" / "final.json")


def test_verify_skips_what_it_cannot_check_and_says_so(tmp_path, capsys):
  """Without --dataset, verify checks against the dataset the spec names; when that is not available here it
  says "skip", and exits 0 if nothing failed."""
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "d.npz", x=rng.normal(size=(30, 6)).astype(np.float32), y=rng.integers(0, 3, 30))
  teacher = make_teacher(tmp_path / "t", input_shape=(6,), num_classes=3, normalization={"shift": 0.0, "scale": 1.0})
  store = str(tmp_path / "c.zarr")
  assert run_cli(cache_main, ["build", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--teacher", teacher,
                              "--eval-split", "train[:10]", "--out", store, "--no-progress"], capsys)[0] == 0
  os.remove(tmp_path / "d.npz")
  code, out, _ = run_cli(cache_main, ["verify", store], capsys)
  assert code == 0, out
  assert re.search(r"skip  dataset fingerprint  \(not checked: dataset .* no such file", out)
  assert "skip  labels match the dataset" in out and "skip  eval split fingerprint" in out
  code, _, err = run_cli(cache_main, ["verify", store, "--split", "train"], capsys)  # Asked for: an error.
  assert code == 2 and "no such file" in err


def test_a_state_that_goes_non_finite_with_a_finite_loss_is_caught(env, tmp_path, capsys):
  import student_train.train as train
  real = train.make_train_step

  def nan_state_at_the_last_step(*args, **kwargs):
    step = real(*args, **kwargs)
    calls = {"n": 0}

    def poisoned(states, batch, hypers):
      calls["n"] += 1
      states, metrics = step(states, batch, hypers)
      if calls["n"] == 2:  # The last of the epoch's 2 steps: the loss was finite, the state is not.
        states = __import__("jax").tree.map(lambda x: x * np.nan if x.dtype == np.float32 else x, states)
      return states, metrics

    return poisoned

  mp = pytest.MonkeyPatch()
  mp.setattr(train, "make_train_step", nan_state_at_the_last_step)
  try:
    code, _, err = run_cli(student_main, _fit(env, "--dataset", "digits", "--split", "train[:200]", "--out",
                                              tmp_path / "r"), capsys)
  finally:
    mp.undo()
  assert code == 2 and re.search(r"its state \(parameters or optimizer moments\) became non-finite at step 2 of 2", err)
  assert os.path.exists(tmp_path / "r" / "diverged.json") and not os.listdir(tmp_path / "r" / "checkpoints")


@pytest.fixture
def tiny_disk(tmp_path):
  """A 600 KB file system (tmpfs), where the machine lets tests mount one; skipped elsewhere."""
  mount_point = tmp_path / "tiny"
  mount_point.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount_point)], capture_output=True)
  if done.returncode != 0:
    pytest.skip("cannot mount a small file system here; the patched-writer faults above cover the same errors")
  yield mount_point
  subprocess.run(["umount", str(mount_point)], check=False)


def test_a_real_full_disk_gives_one_line_and_no_complete_store(env, tiny_disk, capsys):
  """The real thing, not a patched writer: orbax's and zarr's own errors on ENOSPC."""
  # Past the free-space check, which would refuse it before writing anything.
  code, _, err = run_cli(cache_main, _build(env, tiny_disk / "c.zarr", "--views", "16", "--ignore-limits",
                                            split="train"), capsys)
  assert code == 2 and "Traceback" not in err
  assert [line for line in err.splitlines() if ": error: " in line] == [
      "teacher-cache: error: writing the cache failed: [Errno 28] No space left on device"]
  assert SPEC_KEY in zarr.open_group(str(tiny_disk / "c.zarr"), mode="r").attrs
  assert COMPLETE_KEY not in zarr.open_group(str(tiny_disk / "c.zarr"), mode="r").attrs
  shutil.rmtree(tiny_disk / "c.zarr")
  code, _, err = run_cli(student_main, ["fit", "--dataset", "digits", "--split", "train[:300]", "--data-dir",
                                        env.data_dir, "--model", "mlp-large", "--epochs", "1", "--no-progress",
                                        "--out", tiny_disk / "run"], capsys)
  errors = [line for line in err.splitlines() if ": error: " in line]
  assert code == 2 and "Traceback" not in err and len(err.splitlines()) <= 3, err[-3000:]
  assert len(errors) == 1 and "saving the checkpoint of" in errors[0] and "No space left on device" in errors[0]


# Checkpoints and run records (beside the catalogue's faults of this kind).

CHECKPOINT_FILE_KINDS = (  # The files of an orbax 0.12 checkpoint of the trainer, content-addressed names as '*'.
    "_CHECKPOINT_METADATA", "commit_success.txt", "meta/metadata", "meta/commit_success.txt",
    *(f"{item}/{kind}" for item in ("state", "params") for kind in (
        "_METADATA", "_sharding", "array_metadatas/process_0", "commit_success.txt", "manifest.ocdbt", "d/*",
        "ocdbt.process_0/manifest.ocdbt", "ocdbt.process_0/d/*")))


def _files_by_kind(checkpoint: str) -> dict[str, str]:
  """{kind: the first file of that kind} of a checkpoint dir, by path in it (hex content names as '*')."""
  kinds = {}
  for root, _, names in sorted(os.walk(checkpoint)):
    for name in sorted(names):
      path = os.path.relpath(os.path.join(root, name), checkpoint)
      kinds.setdefault(re.sub(r"[0-9a-f]{32}", "*", path), path)
  return kinds


@pytest.mark.parametrize("kind", CHECKPOINT_FILE_KINDS)
def test_a_flipped_byte_in_any_checkpoint_file_is_refused_by_every_reader(kind, env, tmp_path, monkeypatch, capsys):
  """A resumed fit, eval, export and build --teacher, each on the same damaged copy of a run: every file is checked,
  also those of the items a reader does not restore (the optimizer state, for eval)."""
  files = _files_by_kind(os.path.join(env.run, CHECKPOINT))
  assert sorted(files) == sorted(CHECKPOINT_FILE_KINDS)  # Every kind a real checkpoint holds is tried.
  run = _run_copy(env, tmp_path, unfinished=True)
  _flip_byte_in(os.path.join(run, CHECKPOINT, files[kind]))
  damaged = _damaged(files[kind])
  cases = [(student_main, _resume(env, run), 2, damaged + "; " + RETRAIN, [run]),
           (student_main, _eval(env, run), 2, damaged + "; " + RETRAIN_TEACHER, [run]),
           (student_main, _export(tmp_path, run), 2, damaged + "; " + RETRAIN_TEACHER,
            [run, Absent(tmp_path / "p.npz")]),
           (cache_main, _build(env, tmp_path / "c.zarr", teachers=[run]), 2, damaged + "; " + RETRAIN_TEACHER,
            [run, Absent(tmp_path / "c.zarr")])]
  for case in cases:
    _refused_cleanly(case, env, monkeypatch, capsys)


class _Killed(BaseException):
  """A kill at a chosen point (in process: the run dir is left as a SIGKILL there leaves it)."""


def test_saves_killed_before_they_are_listed_resume_as_if_they_never_happened(env, tmp_path, monkeypatch, capsys):
  """Killed after orbax has written a checkpoint and before its folder's digests list it: first the mid-epoch one
  after step 2 of epoch 2 (of 4), so that the run resumes from epoch 1; then epoch 2's, so that it resumes from
  that mid-epoch checkpoint (which the epoch's save would have superseded). Each resume discards the unlisted one,
  and the run ends with the parameters and metrics of an uninterrupted run."""
  from shared.runs import CheckpointFolder  # pylint: disable=import-outside-toplevel
  from student_train.train import FitConfig, fit  # pylint: disable=import-outside-toplevel
  options = {"dataset": "digits", "split": "train[:200]", "data_dir": env.data_dir, "model": "mlp-tiny", "epochs": 2,
             "batch_size": 50, "checkpoint_every_steps": 2, "dropout": 0.1, "eval_split": "none", "progress": False}
  killed = tmp_path / "killed"
  command = ["fit", "--out", killed, "--no-progress",
             *[f"--{k.replace('_', '-')}={v}" for k, v in options.items() if k != "progress"]]
  real = CheckpointFolder._digests  # pylint: disable=protected-access
  for folder, step, resumed in [("checkpoints_mid", 6, None), ("checkpoints", 2, "after epoch 1 of 2")]:

    def killed_before_listing(self, saved, folder=folder, step=step):
      if (self.subdir, saved) == (folder, step):
        raise _Killed
      return real(self, saved)

    monkeypatch.setattr(CheckpointFolder, "_digests", killed_before_listing)
    with pytest.raises(_Killed):
      run_cli(student_main, command, capsys)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert ("resuming" not in err) if resumed is None else re.search(f"resuming .* {resumed}\n", err), err
    assert str(step) in os.listdir(killed / folder)  # Written, not listed.
    assert str(step) not in json.load(open(killed / f"{folder}.json"))["checkpoints"]
  code, _, err = run_cli(student_main, command, capsys)
  assert code == 0, err
  assert "discarding checkpoints/2, whose save was interrupted" in err, err
  assert re.search("resuming .* after step 2 of epoch 2 of 2", err), err
  clean = fit(FitConfig(out=str(tmp_path / "clean"), **options), log_epochs=False)
  untimed = lambda lines: [{k: v for k, v in line.items() if "second" not in k} for line in lines]  # noqa: E731
  metrics = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("killed", "clean")]
  assert untimed(metrics[0]) == untimed(metrics[1]) and clean["epoch"] == 2
  params = [load_run_teacher(str(tmp_path / run)).params for run in ("killed", "clean")]
  jax.tree.map(np.testing.assert_array_equal, *params)  # Bitwise.
  assert sorted(json.load(open(killed / "checkpoints.json"))["checkpoints"]) == ["1", "2"]
  assert json.load(open(killed / "checkpoints_mid.json"))["checkpoints"] == {}


def test_the_digests_list_exactly_the_checkpoints_kept(tmp_path, monkeypatch):
  """A folder's digests list each save once orbax has finished it, and drop the steps orbax deleted (max_to_keep); a
  save interrupted before it is listed is not committed; a deleted step is unlisted; a folder of an earlier
  stillroom (no list) has its checkpoints listed without digests by its first save."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from shared.runs import CheckpointFolder  # pylint: disable=import-outside-toplevel
  run = str(tmp_path / "run")
  folder = CheckpointFolder(run, "checkpoints_mid", max_to_keep=2)

  def save(step: int) -> None:
    folder.save(step, ocp.args.Composite(state=ocp.args.StandardSave({"w": np.full(3, step, np.float32)})))

  def listed() -> dict:
    return json.load(open(os.path.join(run, "checkpoints_mid.json")))["checkpoints"]

  assert listed() == {}  # Made with the folder: from then on, what it lists is committed.
  save(1)
  os.remove(os.path.join(run, "checkpoints_mid.json"))  # As an earlier stillroom left it.
  save(2)
  second = os.path.join(run, "checkpoints_mid", "2")
  assert listed()["1"] == {"files": None} and listed()["2"]["files"] == {
      path: {"sha256": digest, "bytes": size} for path, digest in tree_digest(second).items()
      for size in [os.path.getsize(os.path.join(second, path))]}
  save(3)
  assert sorted(listed()) == ["2", "3"] and folder.on_disk() == [2, 3]  # orbax deleted 1.
  monkeypatch.setattr(CheckpointFolder, "_digests", lambda self, step: (_ for _ in ()).throw(_Killed()))
  with pytest.raises(_Killed):
    save(4)
  monkeypatch.undo()
  # Killed after orbax saved 4 and deleted 2: 2 is listed but absent, 4 present but not listed.
  assert folder.on_disk() == [3, 4] and sorted(listed()) == ["2", "3"]
  assert folder.committed() == [3] and folder.uncommitted() == [4] and folder.newest() == 3
  folder.delete([3, 4])
  assert sorted(listed()) == ["2"] and folder.on_disk() == []
  save(5)
  assert sorted(listed()) == ["5"]
  folder.close()


def test_a_run_dir_without_digests_stays_readable_and_resumable(env, tmp_path, capsys):
  """As stillroom 0.3 wrote run dirs: eval reads it unchecked (saying so), with the numbers of the same run with
  digests; resumed, it finishes."""
  run = _run_copy(env, tmp_path, unfinished=True)
  _as_written_before_digests(run)
  results = [run_cli(student_main, _eval(env, path, "--json"), capsys) for path in (env.run, run)]
  assert [code for code, _, _ in results] == [0, 0], results
  assert "checkpoints/ carry no digests (written by an earlier stillroom); they are read unchecked" in results[1][2]
  ours, theirs = (json.loads(out) for _, out, _ in results)
  assert ours["accuracy"] == theirs["accuracy"] and ours["nll"] == theirs["nll"] and ours["members"][0]["epoch"] == 1
  code, _, err = run_cli(student_main, _resume(env, run), capsys)
  assert code == 0 and "resuming" in err, err
  assert json.load(open(os.path.join(run, "final.json")))["epochs"] == 1


def test_a_garbled_final_json_deleted_is_rewritten_by_the_same_command(env, tmp_path, capsys):
  """What the refusal of a garbled final.json advises works: deleted, the same command writes it again."""
  run = _run_copy(env, tmp_path)
  with open(os.path.join(run, "final.json"), "w") as f:
    f.write("{garbled")
  assert run_cli(student_main, _resume(env, run), capsys)[0] == 2
  os.remove(os.path.join(run, "final.json"))
  code, _, err = run_cli(student_main, _resume(env, run), capsys)
  assert code == 0, err
  rewritten, original = (json.load(open(os.path.join(path, "final.json"))) for path in (run, env.run))
  assert {**rewritten, "run_dir": None} == {**original, "run_dir": None}


def test_a_garbled_config_json_is_cleared_by_overwrite_as_advised(env, tmp_path, capsys):
  """The refusal of a run dir with a garbled config.json advises --overwrite, and --overwrite clears it: the run
  dir's other files show it is stillroom's."""
  run = _run_copy(env, tmp_path)
  (tmp_path / "run" / "config.json").write_text("{not json")
  code, _, err = run_cli(student_main, _resume(env, run), capsys)
  assert code == 2 and "cannot read config.json" in err and "pass --overwrite to replace the run" in err, err
  code, _, err = run_cli(student_main, _resume(env, run) + ["--overwrite"], capsys)
  assert code == 0, err
  assert json.load(open(os.path.join(run, "config.json")))["model"]["name"] == "mlp-tiny"
  assert run_cli(student_main, _eval(env, run), capsys)[0] == 0


def _untimed(lines: list[dict]) -> list[dict]:
  return [{k: v for k, v in line.items() if "second" not in k} for line in lines]


def test_a_damaged_newest_epoch_checkpoint_deleted_as_advised_resumes_from_the_one_before(env, tmp_path, capsys):
  """Resume refuses a damaged newest epoch checkpoint (the epochs it trained are the user's to give up), naming
  the folder to delete to resume from the checkpoint before it; deleted, the same command resumes from there and
  ends with the parameters and metrics the run had (bitwise)."""
  run = tmp_path / "run"
  command = _fit(env, "--dataset", "digits", "--split", "train[:200]", "--epochs", "2", "--out", run)
  assert run_cli(student_main, command, capsys)[0] == 0
  params, metrics = load_run_teacher(str(run)).params, [json.loads(line) for line in open(run / "metrics.jsonl")]
  os.remove(run / "final.json")
  _flip_byte_in(sorted(glob.glob(str(run / "checkpoints" / "2" / "state" / "ocdbt.process_0" / "d" / "*")))[0])
  advice = rf"delete {re.escape(str(run / 'checkpoints' / '2'))} and run the same command to resume from epoch 1, or "
  _refused_cleanly((student_main, command, 2, r"checkpoint checkpoints/2 is damaged: .*; " + advice + RETRAIN, [run]),
                   env, pytest.MonkeyPatch(), capsys)
  shutil.rmtree(run / "checkpoints" / "2")
  code, _, err = run_cli(student_main, command, capsys)
  assert code == 0, err
  assert ("warning: " + f"{run}: its newest checkpoint, checkpoints/2 (listed in checkpoints.json), is missing; "
          "resuming from the checkpoint before it") in err
  assert re.search(r"resuming .* after epoch 1 of 2\n", err), err
  jax.tree.map(np.testing.assert_array_equal, load_run_teacher(str(run)).params, params)
  assert _untimed([json.loads(line) for line in open(run / "metrics.jsonl")]) == _untimed(metrics)
  assert sorted(json.load(open(run / "checkpoints.json"))["checkpoints"]) == ["1", "2"]


def test_damaged_mid_epoch_checkpoints_are_discarded_and_the_run_ends_as_an_uninterrupted_one(env, tmp_path,
                                                                                             monkeypatch, capsys):
  """Killed in epoch 2 of 2 after its mid-epoch checkpoints at steps 6 and 7 of the run were committed: one with a
  byte of its position ("meta") flipped, the other of its state. Resume discards each with one warning and resumes
  from epoch 1's checkpoint, ending with the parameters and metrics of an uninterrupted run."""
  from shared.runs import CheckpointFolder  # pylint: disable=import-outside-toplevel
  from student_train.train import FitConfig, fit  # pylint: disable=import-outside-toplevel
  options = {"dataset": "digits", "split": "train[:200]", "data_dir": env.data_dir, "model": "mlp-tiny", "epochs": 2,
             "batch_size": 50, "checkpoint_every_steps": 1, "dropout": 0.1, "eval_split": "none", "progress": False}
  killed = tmp_path / "killed"
  command = ["fit", "--out", killed, "--no-progress",
             *[f"--{k.replace('_', '-')}={v}" for k, v in options.items() if k != "progress"]]
  real = CheckpointFolder.save

  def killed_after_step_7(self, step, *args, **kwargs):
    real(self, step, *args, **kwargs)
    if (self.subdir, step) == ("checkpoints_mid", 7):
      raise _Killed

  monkeypatch.setattr(CheckpointFolder, "save", killed_after_step_7)
  with pytest.raises(_Killed):
    run_cli(student_main, command, capsys)
  monkeypatch.undo()
  assert sorted(json.load(open(killed / "checkpoints_mid.json"))["checkpoints"]) == ["6", "7"]
  _flip_byte_in(os.path.join(killed, "checkpoints_mid", "7", "meta", "metadata"))
  _flip_byte_in(sorted(glob.glob(str(killed / "checkpoints_mid" / "6" / "state" / "ocdbt.process_0" / "d" / "*")))[0])
  code, _, err = run_cli(student_main, command, capsys)
  assert code == 0, err
  warnings = [line for line in err.splitlines() if "warning: " in line]
  assert len(warnings) == 2 and all("which is damaged" in line for line in warnings), err
  assert re.search(r"discarding checkpoints_mid/7, which is damaged \(its file meta/metadata differs from its digest "
                   r"in checkpoints_mid\.json\); resuming from the checkpoint before it", warnings[0]), warnings
  assert re.search(r"discarding checkpoints_mid/6, which is damaged \(its file state/.* differs", warnings[1]), warnings
  assert re.search(r"resuming .* after epoch 1 of 2\n", err), err
  clean = fit(FitConfig(out=str(tmp_path / "clean"), **options), log_epochs=False)
  metrics = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("killed", "clean")]
  assert _untimed(metrics[0]) == _untimed(metrics[1]) and clean["epoch"] == 2
  params = [load_run_teacher(str(tmp_path / run)).params for run in ("killed", "clean")]
  jax.tree.map(np.testing.assert_array_equal, *params)  # Bitwise.


@pytest.mark.fast
def test_run_files_are_read_by_name_and_an_unknown_one_is_a_programming_error(tmp_path):
  """`read_run_file` knows each run-dir file's check, the digests lists' too; another name is refused before it is
  read (it would otherwise pass unchecked)."""
  from shared.runs import CHECKPOINT_FOLDERS, read_run_file  # pylint: disable=import-outside-toplevel
  for folder in CHECKPOINT_FOLDERS:
    (tmp_path / f"{folder}.json").write_text('{"checkpoints": {"1": {"files": {"a": {"sha256": "x", "bytes": 1}}}}}')
    with pytest.raises(StillroomError, match=rf"cannot read {folder}\.json \(checkpoint '1': file 'a' has no valid"):
      read_run_file(str(tmp_path), f"{folder}.json", "recover")
  (tmp_path / "notes.json").write_text("{}")
  with pytest.raises(ValueError, match="'notes.json' is not a run-dir file"):
    read_run_file(str(tmp_path), "notes.json", "recover")


def test_discard_after_deletes_what_process_0_decided(tmp_path, monkeypatch):
  """In a job, process 0 rewrites the digests list while the others delete with it: each process deletes the steps
  process 0 read, whatever its own reads show. Here as process 1, resuming at epoch 3, which reads a list that no
  longer holds epoch 3 (on its own it would take epoch 3 for an interrupted save and delete it)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from student_train import run_dir  # pylint: disable=import-outside-toplevel
  checkpoints = run_dir.Checkpoints(str(tmp_path / "run"))
  for epoch in (2, 3):
    checkpoints.folder.save(epoch, ocp.args.Composite(state=ocp.args.StandardSave({"w": np.full(3, epoch)})))
  deleted, read = [], []
  monkeypatch.setattr(checkpoints.folder.manager, "delete", deleted.append)
  monkeypatch.setattr("shared.runs.is_first", lambda: False)
  monkeypatch.setattr(run_dir, "from_process_0", lambda value: read.append(value) or ([], [], [], 3))
  json.dump({"checkpoints": {"2": {"files": None}}}, open(tmp_path / "run" / "checkpoints.json", "w"))
  checkpoints.discard_after(3)
  assert read == [([3], [], [], 2)]  # What this process read: not what it acts on.
  assert deleted == [] and checkpoints.folder.on_disk() == [2, 3]
  checkpoints.close()
