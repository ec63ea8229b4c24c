"""Shared fixtures: a prepared `digits` data dir and random-weight teachers saved as run dirs."""

import hashlib
import os

import numpy as np
import pytest

from shared.data import Normalization, open_transfer_set
from shared.models import ModelSpec, build_model
from shared.runs import CrossFit, RunRecord, save_run


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


def tree_digest(path) -> dict[str, str]:
  """SHA-256 of every file under `path`, by relative path: a byte-level snapshot of a store."""
  digests = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        digests[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return digests


def array_files(path) -> dict[str, str]:
  """`tree_digest` of a store's chunk files only (array metadata and group attributes excluded)."""
  return {k: v for k, v in tree_digest(path).items() if not k.endswith("zarr.json")}


def numpy_log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
  from scipy.special import log_softmax
  return log_softmax(z.astype(np.float64), axis=axis)
