"""Synthetic data for the benchmarks: an npz transfer set, random-weight teachers, and caches written directly."""

import os

import numpy as np
import zarr

from shared.augment import Augmentation, fold_of
from shared.cache import COMPLETE_KEY, SPEC_KEY, CacheSpec, MemberSpec
from shared.data import open_transfer_set
from shared.models import ModelSpec, build_model
from shared.runs import save_run


def npz_dataset(path: str, rows: int, input_shape: tuple[int, ...], classes: int, seed: int = 0) -> str:
  """Writes random uint8 images (or float32 vectors) with labels; returns the `npz:` dataset name."""
  rng = np.random.default_rng(seed)
  if len(input_shape) >= 2:
    x = rng.integers(0, 256, size=(rows, *input_shape), dtype=np.uint8)
  else:
    x = rng.normal(size=(rows, *input_shape)).astype(np.float32)
  np.savez(path, x=x, y=rng.integers(0, classes, rows))
  return f"npz:{path}"


def teachers(root: str, model: str, input_shape: tuple[int, ...], classes: int, count: int) -> list[str]:
  """Random-weight teacher run dirs (speed does not depend on the weights)."""
  runs = []
  for seed in range(count):
    spec = ModelSpec(name=model, input_shape=tuple(input_shape), num_classes=classes)
    run = os.path.join(root, f"teacher{seed}")
    scale = 16.0 if input_shape == (8, 8, 1) else 255.0
    save_run(run, {"model": spec.to_dict(), "normalization": {"shift": 0.0, "scale": scale}},
             build_model(spec, seed=seed))
    runs.append(run)
  return runs


def direct_cache(path: str, dataset: str, *, members: int, views: int = 1, chunk_rows: int = 4096,
                 max_shift: int = 1, compressors=None, seed: int = 0) -> CacheSpec:
  """A cache with random peaked log-probabilities, written without running teachers (for I/O-bound measurements).

  Returns:
    Its spec; the store is complete and passes the same layout checks as a built one.
  """
  transfer_set = open_transfer_set(dataset, "train")
  classes = transfer_set.num_classes
  member = MemberSpec(name="synthetic", source="synthetic", model="external", num_params=0, digest="0",
                      checkpoint_step=None, normalization=transfer_set.normalization.to_dict())
  augmentation = Augmentation(seed=seed, max_shift=max_shift if len(transfer_set.input_shape) >= 2 else 0)
  spec = CacheSpec(temperature=4.0, combine="arithmetic", members=(member,) * members,
                   dataset=transfer_set.describe(), num_classes=classes, views=views, augmentation=augmentation,
                   dtype="float16", chunk_rows=chunk_rows, software_version="bench")
  group = zarr.open_group(path, mode="w", attributes={SPEC_KEY: spec.to_attrs()})
  arrays = {name: group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
                                     compressors=None if name == "chunk_committed" else compressors)
            for name, (shape, dtype, chunks) in spec.array_shapes().items()}
  rng = np.random.default_rng(seed)
  count = len(transfer_set)
  for chunk in range(spec.num_chunks):
    start, stop = chunk * chunk_rows, min((chunk + 1) * chunk_rows, spec.num_rows)
    rows = np.arange(start, stop)
    view, index = rows // count, transfer_set.indices[rows % count]
    logits = (3 * rng.normal(size=(len(rows), members, classes))).astype(np.float16)
    mean = logits.astype(np.float32).mean(1)  # Geometric-mean-like log-probs: log_softmax of the mean logits.
    peak = mean.max(1, keepdims=True)
    targets = mean - peak - np.log(np.exp(mean - peak).sum(1, keepdims=True))
    shift, flip = augmentation.view_params(index, view)
    values = {"targets": targets.astype(np.float16), "member_logits": logits, "index": index, "view": view,
              "labels": transfer_set.labels[rows % count], "shift": shift, "flip": flip,
              "fold": fold_of(index, 1)}
    for name, value in values.items():
      arrays[name][start:stop] = value
  arrays["chunk_committed"][:] = True
  group.attrs[COMPLETE_KEY] = {"rows": spec.num_rows}
  return spec
