"""Synthetic data for the benchmarks: an npz transfer set, generated JPEGs, random-weight teachers, and caches
written directly."""

import argparse
import os

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from shared.augment import Augmentation, fold_of
from shared.cache import (COMPLETE_KEY, SPEC_KEY, CacheSpec, MemberSpec, completion_record, create_arrays, open_cache,
                          writable)
from shared.data import Normalization, open_transfer_set
from shared.models import ModelSpec, build_model
from shared.runs import RunRecord, save_run
from shared.shapes import CLASSES, ShapesConfig, write_shapes


def npz_dataset(path: str, rows: int, input_shape: tuple[int, ...], classes: int, seed: int = 0) -> str:
  """Writes random uint8 images (or float32 vectors) with labels; returns the `npz:` dataset name."""
  rng = np.random.default_rng(seed)
  if len(input_shape) >= 2:
    x = rng.integers(0, 256, size=(rows, *input_shape), dtype=np.uint8)
  else:
    x = rng.normal(size=(rows, *input_shape)).astype(np.float32)
  np.savez(path, x=x, y=rng.integers(0, classes, rows))
  return f"npz:{path}"


def add_jpeg_build_options(parser: argparse.ArgumentParser, *, images: int, views: int, out: str) -> None:
  """The options of a benchmark that times builds of crop views from generated JPEGs (`jpeg_build_set`)."""
  parser.add_argument("--images", type=int, default=images, help="images in the set (a multiple of 10)")
  parser.add_argument("--min-side", type=int, default=256)
  parser.add_argument("--max-side", type=int, default=512)
  parser.add_argument("--views", type=int, default=views)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--model", default="mlp-small")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--workers", type=int, default=0, help="the build's input workers (0: a thread of its process)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1, help="untimed builds of each arm first")
  parser.add_argument("--out", default=out)


def jpeg_build_set(tmp: str, args: argparse.Namespace) -> tuple[str, str, dict]:
  """The shapes set (`shared.shapes`) as `args.images` JPEGs of random sides in --min-side..--max-side under `tmp`,
  and a random-weight `args.model` teacher for S×S×3 inputs (S = --image-size).

  Returns:
    the `imagefolder:` dataset, the teacher's run dir, and the settings as a result records them.
  """
  root = os.path.join(tmp, "shapes")
  write_shapes(root, ShapesConfig(train_per_class=max(1, args.images // len(CLASSES)), test_per_class=0,
                                  min_side=args.min_side, max_side=args.max_side))
  size = args.image_size
  run, = teachers(os.path.join(tmp, "teachers"), args.model, (size, size, 3), len(CLASSES), 1)
  settings = {"images": args.images, "sides": [args.min_side, args.max_side], "views": args.views, "image_size": size,
              "model": args.model, "batch_size": args.batch_size, "workers": args.workers}
  return f"imagefolder:{os.path.join(root, 'train')}", run, settings


def teachers(root: str, model: str, input_shape: tuple[int, ...], classes: int, count: int) -> list[str]:
  """Random-weight teacher run dirs (speed does not depend on the weights)."""
  runs = []
  for seed in range(count):
    spec = ModelSpec(name=model, input_shape=tuple(input_shape), num_classes=classes)
    run = os.path.join(root, f"teacher{seed}")
    scale = 16.0 if input_shape == (8, 8, 1) else 255.0
    save_run(run, RunRecord(model=spec, normalization=Normalization(scale=scale)), build_model(spec, seed=seed))
    runs.append(run)
  return runs


def direct_cache(path: str, dataset: str, *, members: int, views: int = 1, chunk_rows: int = 4096,
                 max_shift: int = 1, compressors=None, seed: int = 0, row_order: str = "permuted") -> CacheSpec:
  """A cache with random peaked log-probabilities, written without running teachers (for I/O-bound measurements).

  The arrays are made and written as the build makes them (`create_arrays`, every chunk written); `compressors`
  adds a compressor before the checksum to measure compression, and `row_order="sequential"` stores examples in
  split order (schema 1's order) to measure what the permuted order buys.

  Returns:
    Its spec; the store is complete, with the completion record a build writes, and passes the same checks.
  """
  transfer_set = open_transfer_set(dataset, "train")
  classes = transfer_set.num_classes
  member = MemberSpec(name="synthetic", source="synthetic", model="external", num_params=0, digest="0",
                      trained_epochs=None, normalization=transfer_set.normalization.to_dict())
  augmentation = Augmentation(seed=seed, max_shift=max_shift if len(transfer_set.input_shape) >= 2 else 0)
  spec = CacheSpec(temperature=4.0, combine="arithmetic", members=(member,) * members,
                   dataset=transfer_set.describe(), num_classes=classes, views=views, augmentation=augmentation,
                   dtype="float16", chunk_rows=chunk_rows, software_version="bench", row_order=row_order)
  group = zarr.open_group(path, mode="w", attributes={SPEC_KEY: spec.to_attrs()})
  if compressors is None:
    create_arrays(group, spec)
  else:
    for array in spec.arrays:
      group.create_array(array.name, shape=array.shape, dtype=array.dtype, chunks=array.chunks, fill_value=0,
                         compressors=[Crc32cCodec()] if array.role == "bookkeeping" else [compressors, Crc32cCodec()])
  arrays = {array.name: writable(group[array.name]) for array in spec.arrays}
  rng = np.random.default_rng(seed)
  for chunk in range(spec.num_chunks):
    start, stop = spec.chunk_bounds(chunk)
    view, position = spec.row_sources(np.arange(start, stop))
    index = transfer_set.indices[position]
    logits = (3 * rng.normal(size=(stop - start, members, classes))).astype(np.float16)
    mean = logits.astype(np.float32).mean(1)  # Geometric-mean-like log-probs: log_softmax of the mean logits.
    peak = mean.max(1, keepdims=True)
    targets = mean - peak - np.log(np.exp(mean - peak).sum(1, keepdims=True))
    shift, flip = augmentation.view_params(index, view).values()
    values = {"targets": targets.astype(np.float16), "member_logits": logits, "index": index, "view": view,
              "labels": transfer_set.labels[position], "shift": shift, "flip": flip, "fold": fold_of(index, 1)}
    for name, value in values.items():
      arrays[name][start:stop] = value
    arrays["chunk_committed"][chunk] = True
  group.attrs[COMPLETE_KEY] = completion_record(open_cache(path, require_complete=False))  # As a build writes it.
  return spec
