"""`teacher-cache prepare`: decode a natural-image dataset once into a prepared store (`shared.data.prepared`), which
`build` and `fit` then read as `prepared:STORE` without decoding a JPEG again.

The store is written a shard (`--chunk-images` images) at a time, each shard's digest after its arrays, and the
completion record last: a killed prepare leaves a store that readers refuse as incomplete, and the same command
resumes it, writing only the shards without a digest. Images are decoded and resized in input worker processes
(`--workers`), a batch at a time, in order.
"""

import collections
import contextlib
import dataclasses
from typing import ClassVar

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from shared import __version__, storage, workers
from shared.cache.spec import now_iso
from shared.data import local_path, open_transfer_set
from shared.data import prepared as prepared_lib
from shared.errors import StillroomError
from shared.log import logger, progress
from shared.outputs import STORE, OutputLock, check_not_an_input, check_output, clear_for_overwrite, storage_errors
from shared.settings import at_least, positive_finite, setting, workers_check

PREPARE = "prepare"
DEFAULT_SCALE = 2.0
DEFAULT_MAX_ASPECT = 4 / 3
DEFAULT_CHUNK_IMAGES = 256
TASK_IMAGES = 32  # Images per task sent to a worker: a shard is split so that every worker has work.
_LOG = logger(__name__)


def _at_least_one(value) -> bool | str:
  return (positive_finite(value) is True and value >= 1) or "must be >= 1 and finite"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrepareConfig:
  """Settings of `teacher-cache prepare` (the CLI's options, defaults and help come from here)."""

  COMMANDS: ClassVar[tuple[str, ...]] = (PREPARE,)

  dataset: str = setting("", "the natural-image dataset to prepare", commands=(), given_by="DATASET")
  split: str = setting("train", "its split spec, e.g. 'train' or 'train[:80%]'",
                       group="data")
  data_dir: str | None = setting(None, "TFDS data dir (default: TFDS's own, ~/tensorflow_datasets)", group="data",
                                 identity=False, scope="process")
  image_size: int | None = setting(None, "S: the size of the crop views (`--image-size` of build and fit) the images "
                                         "are prepared for", metavar="S", group="views", check=at_least(1))
  scale: float = setting(
      DEFAULT_SCALE, "M: each image is resized so that its shorter side is round(M*S) pixels (a smaller one keeps its "
                     "size). 2 keeps random-resized crops down to 25% of the area at full resolution (a crop's side "
                     "is sqrt(area)*M*S source pixels) and upsamples the smallest default crops (8%) 1.8x, against "
                     "3.5x at M=1; 4 would keep every default crop at full resolution, at 4x the pixels to store and "
                     "read", metavar="M", group="views", check=_at_least_one)
  max_aspect: float = setting(
      DEFAULT_MAX_ASPECT, "the longer side is kept up to this multiple of the shorter one, beyond it centre-cropped "
                          "(recorded per image in source_sizes); it fixes the canvas at floor(max_aspect*M*S) pixels "
                          "square. The default is the widest aspect of a default random-resized crop (--crop-aspect)",
      metavar="A", group="views", check=_at_least_one)
  chunk_images: int = setting(DEFAULT_CHUNK_IMAGES, "images per shard (one file or object; the unit of resuming)",
                              metavar="N", group="run", check=at_least(1))
  out: str = setting("", "the prepared store to write (a local path or an object-store URL)", group="run",
                     identity=False)
  overwrite: bool = setting(False, "replace an existing prepared store", group="run", identity=False)
  progress: bool = setting(True, "progress bars (on a terminal; elsewhere one line per stage)", group="run",
                           identity=False, scope="process")
  workers: int | None = setting(
      None, "processes that decode and resize images, a batch at a time (0: the main process; default: one per "
            "usable core but one, at most 8); the store does not depend on it", metavar="N", group="run",
      check=workers_check, identity=False, scope="process")


def _check(config: PrepareConfig) -> None:
  from shared.settings import declared  # pylint: disable=import-outside-toplevel
  if config.image_size is None:
    raise StillroomError("give --image-size S, the size of the crop views the images are prepared for.")
  for name, field in declared(PrepareConfig).items():
    check = field.metadata["check"]
    verdict = check(getattr(config, name)) if check else True
    if verdict is not True:
      raise StillroomError(f"--{name.replace('_', '-')} {verdict}, got {getattr(config, name)}.")
  if not config.out:
    raise StillroomError("give --out, the prepared store to write.")


def _source(config: PrepareConfig):
  """The dataset to prepare, checked to hold 8-bit images."""
  if config.dataset.startswith(prepared_lib.PREFIX):
    raise StillroomError(f"dataset {config.dataset!r} is already a prepared store; prepare its source instead.")
  data = open_transfer_set(config.dataset, config.split, config.data_dir)
  shape = data.input_shape
  if len(shape) != 3 or shape[2] not in (1, 3) or data.input_dtype != np.uint8:
    raise StillroomError(f"dataset {config.dataset!r} holds {np.dtype(data.input_dtype).name} inputs of shape "
                         f"{tuple(shape)}; `prepare` takes 8-bit images [H, W, C] (C = 1 or 3), such as an "
                         "imagefolder: of JPEGs or a TFDS image dataset.")
  return data


def make_spec(config: PrepareConfig, data) -> prepared_lib.PreparedSpec:
  short_side = int(round(config.scale * config.image_size))
  return prepared_lib.PreparedSpec(
      source=data.describe().to_dict(), source_identity=data.source.identity(), image_size=config.image_size,
      scale=float(config.scale), short_side=short_side, max_aspect=float(config.max_aspect),
      canvas=prepared_lib.canvas_of(short_side, config.max_aspect, data.input_shape[2]),
      chunk_images=config.chunk_images, class_names=data.class_names, num_classes=data.num_classes,
      labeled=data.labeled, software_version=__version__, created_at=now_iso())


def _open_store(config: PrepareConfig, spec: prepared_lib.PreparedSpec):
  """Creates the store, or reopens one made with the same settings from the same data to resume it; None when it is
  already complete."""
  out = config.out
  if config.overwrite:
    clear_for_overwrite(out, STORE)
  if storage.has_entries(out):
    if not prepared_lib.is_prepared(out):
      raise StillroomError(f"--out {out!r} exists and is not a prepared image store; pass --overwrite to replace it "
                           "(only a stillroom store is replaced), or choose another --out.")
    existing, complete = prepared_lib.open_prepared(out)
    mine, theirs = existing.build_key(), spec.build_key()
    differ = [key for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]
    if differ:
      shown = "; ".join(f"{key}: {str(mine.get(key))[:60]} (store) vs {str(theirs.get(key))[:60]} (command)"
                        for key in differ[:5])
      raise StillroomError(f"--out {out!r} holds a prepared store made with other settings or data: {shown}. Pass "
                           "--overwrite to replace it, or choose another --out.")
    if complete is not None:
      _LOG.info(f"{out} is already complete with these settings; nothing to do.")
      return None
    _LOG.info(f"resuming the prepared store {out}")
    return zarr.open_group(storage.zarr_store(out), mode="r+")
  with storage_errors(f"creating the prepared store {out}"):
    group = zarr.create_group(storage.zarr_store(out), overwrite=False,
                              attributes={prepared_lib.SPEC_KEY: spec.to_attrs()})
    count, k = spec.count, spec.chunk_images
    # Every chunk checksummed: a damaged one is an error when read, not other pixels.
    codecs = {"compressors": [ZstdCodec(level=3), Crc32cCodec()], "fill_value": 0}
    group.create_array("images", shape=(count, *spec.canvas), dtype="uint8", chunks=(1, *spec.canvas),
                       shards=(k, *spec.canvas), **prepared_lib.images_codecs())
    for name, shape, dtype in (("sizes", (count, 2), "int32"), ("source_sizes", (count, 2), "int32"),
                               ("labels", (count,), "int64"), ("index", (count,), "int64")):
      group.create_array(name, shape=shape, dtype=dtype, chunks=(k, *shape[1:]), **codecs)
    group.create_array("digests", shape=(spec.num_shards, 32), dtype="uint8", chunks=(1, 32), **codecs)
  return group


def _prepared_batches(data, params: tuple, tasks: list[np.ndarray], count: int):
  """`prepare_rows` of each task in order, in `count` spawned worker processes (`shared.workers`'s start and
  failure handling), or in this process for 0."""
  if count <= 0:
    yield from (prepared_lib.prepare_rows(data, params, task) for task in tasks)
    return
  pool = workers.worker_pool(count, data, params)
  try:
    for _, rows in workers.map_in_order(pool, prepared_lib.prepare_in_worker, tasks, 2 * count):
      yield rows
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def prepare_images(config: PrepareConfig) -> dict:
  """Prepares (or resumes, or confirms) a store of the dataset's images; see the module docstring.

  Returns:
    A summary: `out`, `images`, `canvas`, `cropped` (images centre-cropped to the aspect cap), `source_fingerprint`
    and `fingerprint` (the prepared dataset's, as a cache built from it records it).

  Raises:
    StillroomError: bad settings; a dataset that is not 8-bit images; an --out that is another store, or a prepared
      store of other settings or data (without --overwrite); an image that cannot be decoded (naming it).
  """
  _check(config)
  config = dataclasses.replace(config, out=storage.local(config.out).rstrip("/"))
  source = local_path(config.dataset)
  check_not_an_input(config.out, [source] if source else [], "--out")
  check_output(config.out, STORE, config.overwrite)
  data = _source(config)
  with contextlib.ExitStack() as stack:
    stack.enter_context(OutputLock(config.out, "teacher-cache prepare",
                                   lambda: not config.overwrite and prepared_lib.is_prepared(config.out, True)))
    spec = make_spec(config, data)
    group = _open_store(config, spec)
    if group is not None:
      _write(group, spec, data, config)
  opened = open_transfer_set(prepared_lib.PREFIX + config.out)
  source_sizes = np.asarray(zarr.open_group(storage.zarr_store(config.out, read_only=True), mode="r")
                            ["source_sizes"][:])
  cropped = int((opened.image_sizes(np.arange(len(opened))) != _uncropped(source_sizes, spec)).any(axis=1).sum())
  return {"out": config.out, "images": len(opened), "canvas": list(spec.canvas), "short_side": spec.short_side,
          "cropped": cropped, "source": spec.source["name"], "source_fingerprint": spec.source["fingerprint"],
          "fingerprint": opened.fingerprint}


def _uncropped(source_sizes: np.ndarray, spec: prepared_lib.PreparedSpec) -> np.ndarray:
  """int [N, 2] each image's size after its resize, before any crop to the aspect cap."""
  return np.asarray([prepared_lib.prepared_size(h, w, spec.short_side, spec.max_aspect)[0]
                     for h, w in source_sizes.tolist()], np.int64).reshape(-1, 2)


def _write(group, spec: prepared_lib.PreparedSpec, data, config: PrepareConfig) -> None:
  """Writes every shard without a digest, then the completion record."""
  digests = np.asarray(group["digests"][:])
  todo = [shard for shard in range(spec.num_shards) if not digests[shard].any()]
  arrays = {name: group[name] for name in prepared_lib.ARRAYS}
  params = (spec.short_side, spec.max_aspect, spec.canvas)
  count = workers.resolve_workers(config.workers, data)
  tasks = [(shard, np.arange(start, min(start + TASK_IMAGES, end)))
           for shard in todo for start, end in [spec.shard_bounds(shard)]
           for start in range(start, end, TASK_IMAGES)]
  remaining = collections.Counter(shard for shard, _ in tasks)
  parts: dict = collections.defaultdict(list)
  with progress(total=sum(len(p) for _, p in tasks), desc=f"preparing {config.out}", unit="image",
                enabled=config.progress) as bar:
    for (shard, positions), rows in zip(tasks, _prepared_batches(data, params, [p for _, p in tasks], count)):
      parts[shard].append(rows)
      bar.update(len(positions))
      remaining[shard] -= 1
      if remaining[shard]:
        continue
      done = parts.pop(shard)
      whole = {name: np.concatenate([p[name] for p in done]) for name in prepared_lib.ARRAYS[:-1]}
      start, end = spec.shard_bounds(shard)
      with storage_errors(f"writing shard {shard} of {config.out}"):
        for name in prepared_lib.ARRAYS[:-1]:
          arrays[name][start:end] = whole[name]
        # The digest last: a shard is written once it has one.
        arrays["digests"][shard] = np.frombuffer(prepared_lib.shard_digest(whole), np.uint8)
  digests = np.asarray(group["digests"][:])
  if not digests.any(axis=1).all():
    raise StillroomError(f"{config.out} is not whole after writing every shard: shard "
                         f"{int(np.argmin(digests.any(axis=1)))} has no digest.")
  with storage_errors(f"writing the completion record of {config.out}"):
    group.attrs[prepared_lib.COMPLETE_KEY] = {"content_sha256": prepared_lib.content_digest(spec, digests),
                                              "completed_at": now_iso()}
