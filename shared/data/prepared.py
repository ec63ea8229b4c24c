"""`prepared:STORE`: natural images decoded once (`teacher-cache prepare`) into a Zarr v3 store of uint8 pixels on a
fixed canvas, read as a dataset by `build` and `fit` without decoding a JPEG again.

A prepared store holds, for N examples of a source dataset (its split as given):
  images        uint8 [N, Hc, Wc, C]  each image resized (PIL bilinear with antialiasing, the filter of crop views)
                                      so that its shorter side is `short_side` = round(M*S) pixels (never enlarged:
                                      a smaller image keeps its size), its longer side centre-cropped to at most
                                      `max_aspect` times that; image b fills images[b, :h, :w] and the rest of its
                                      canvas repeats its edge pixels (a bilinear kernel at the edge sees the edge,
                                      not black). One image per chunk, `chunk_images` per shard (one file or object).
  sizes         int32 [N, 2]          (h, w) of each prepared image
  source_sizes  int32 [N, 2]          (height, width) of each decoded source image (the crop, if any, follows)
  labels        int64 [N]             the source's labels (-1 where unlabelled)
  index         int64 [N]             each example's index in the source's unsliced split
  digests       uint8 [shards, 32]    SHA-256 of each shard's arrays, written after them: a shard without one is
                                      not written (a resumed prepare writes it again)
and the group attributes `stillroom_prepared` (`PreparedSpec`) and, written last, `stillroom_prepared_complete`
(the SHA-256 of the spec and every shard's digest: the store's content fingerprint). A store without that record is
incomplete and is refused as a dataset.

As a dataset (`prepared:STORE`, a local path or a URL) its one split is `train`, its examples the N prepared images
in order, its labels and class names the source's; its fingerprint hashes the content fingerprint, and the spec
records the source's own (`teacher-cache prepare`'s output names both).
"""

import dataclasses
import hashlib
import json
import os

import numpy as np

from shared import storage
from shared.data.source import OpenedSource, little_endian
from shared.errors import StillroomError
from shared.log import logger

PREFIX = "prepared:"
SPEC_KEY = "stillroom_prepared"  # The group attribute that holds `PreparedSpec.to_attrs()`...
COMPLETE_KEY = "stillroom_prepared_complete"  # ...and the completion record, written last.
VERSION = 1
READABLE_VERSIONS = (1,)
ARRAYS = ("images", "sizes", "source_sizes", "labels", "index", "digests")
SMALL_STORE_BYTES = 64 << 20  # A store this small is read whole on first use and kept in memory (as TFDS splits).
MAKE = "teacher-cache prepare DATASET --image-size S --out {path}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedSpec:
  """How a prepared store was made, as its `stillroom_prepared` attribute records it.

  Attributes:
    version: the layout's version (`VERSION`).
    source: the source dataset as a cache records one (`shared.data.DatasetSpec.to_dict()`: name, split, count,
      fingerprint, ...).
    source_identity: the source's identity (`Source.identity()`), which its fingerprint hashes.
    image_size: S, the view size it was prepared for.
    scale: M: the shorter side is round(M * S) pixels.
    short_side: round(M * S).
    max_aspect: the longest side kept, as a multiple of the shorter one (beyond it: a centre crop).
    canvas: (Hc, Wc, C), every image's canvas.
    chunk_images: images per shard.
    class_names: the source's class names, or None.
    num_classes: the source's class count, or None (unlabelled).
    labeled: whether the source has labels.
    software_version: the stillroom that wrote it.
    created_at: when it was started (ISO 8601, UTC).
  """

  version: int = VERSION
  source: dict
  source_identity: dict
  image_size: int
  scale: float
  short_side: int
  max_aspect: float
  canvas: tuple[int, int, int]
  chunk_images: int
  class_names: tuple[str, ...] | None
  num_classes: int | None
  labeled: bool
  software_version: str
  created_at: str

  @property
  def count(self) -> int:
    return int(self.source["count"])

  @property
  def num_shards(self) -> int:
    return -(-self.count // self.chunk_images)

  def shard_bounds(self, shard: int) -> tuple[int, int]:
    return shard * self.chunk_images, min(self.count, (shard + 1) * self.chunk_images)

  def build_key(self) -> dict:
    """What a resumed prepare must match: everything but when and by which stillroom it was started."""
    return {k: v for k, v in self.to_attrs().items() if k not in ("software_version", "created_at")}

  def to_attrs(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(canvas=list(self.canvas), class_names=None if self.class_names is None else list(self.class_names))
    return json.loads(json.dumps(d))  # As the attributes hold it (tuples as lists).

  @classmethod
  def from_attrs(cls, attrs) -> "PreparedSpec":
    """Reads a spec written by `to_attrs`.

    Raises:
      StillroomError: not an object, another version, or a key missing or unknown.
    """
    if not isinstance(attrs, dict):
      raise StillroomError(f"the prepared-store spec is damaged: it is a {type(attrs).__name__}, not an object")
    if attrs.get("version") not in READABLE_VERSIONS:
      raise StillroomError(f"prepared-store version {attrs.get('version')!r} is not supported by this stillroom "
                           f"(reads {', '.join(map(str, READABLE_VERSIONS))})")
    try:
      d = dict(attrs)
      d["canvas"] = tuple(int(v) for v in d["canvas"])
      d["class_names"] = None if d.get("class_names") is None else tuple(d["class_names"])
      return cls(**d)
    except (KeyError, TypeError, ValueError) as e:
      raise StillroomError(f"the prepared-store spec is damaged: {type(e).__name__}: {e}") from e


def prepared_size(height: int, width: int, short_side: int, max_aspect: float) -> tuple[tuple[int, int],
                                                                                          tuple[int, int]]:
  """The size an image of `height` x `width` is resized to, and the centre crop of that to keep.

  The shorter side becomes `short_side` (an image whose shorter side is smaller keeps its size: enlarging adds no
  information), the longer side in proportion (rounded); a longer side beyond `floor(max_aspect * shorter)` is
  centre-cropped to it.

  Returns:
    ((resized height, resized width), (kept height, kept width)).
  """
  shorter = min(height, width)
  side = min(short_side, shorter)
  if height <= width:
    resized = (side, max(side, int(round(width * side / height))))
  else:
    resized = (max(side, int(round(height * side / width))), side)
  cap = int(np.floor(max_aspect * side + 1e-9))
  return resized, (min(resized[0], cap), min(resized[1], cap))


def canvas_of(short_side: int, max_aspect: float, channels: int) -> tuple[int, int, int]:
  """The canvas every prepared image fits: the longest side allowed, on both axes (either may be the longer)."""
  longest = int(np.floor(max_aspect * short_side + 1e-9))
  return (longest, longest, channels)


def prepare_image(image: np.ndarray, short_side: int, max_aspect: float, canvas: tuple[int, int, int]):
  """One decoded image on its canvas: resized (PIL bilinear with antialiasing, as `shared.augment.render_crops`),
  centre-cropped to the aspect cap, and edge-padded to the canvas.

  Args:
    image: uint8 [H, W, C] (or [H, W]).

  Returns:
    (uint8 [Hc, Wc, C] the canvas, (h, w) the prepared image's size within it).
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise StillroomError(f"prepared images are uint8; this image is {image.dtype}.")
  if image.ndim == 2:
    image = image[..., None]
  (rh, rw), (h, w) = prepared_size(image.shape[0], image.shape[1], short_side, max_aspect)
  single = image.shape[2] == 1
  pil = Image.fromarray(image[..., 0] if single else image)
  if (rh, rw) != image.shape[:2]:
    pil = pil.resize((rw, rh), Image.Resampling.BILINEAR)
  resized = np.asarray(pil)
  if single:
    resized = resized[..., None]
  top, left = (rh - h) // 2, (rw - w) // 2
  kept = resized[top:top + h, left:left + w]
  return np.pad(kept, [(0, canvas[0] - h), (0, canvas[1] - w), (0, 0)], mode="edge"), (h, w)


def images_codecs() -> dict:
  """How `images` is stored: shards of `chunk_images` images, one image per inner chunk, uncompressed (a read is one
  range of the shard's file) with its CRC-32C; each shard's index at its end, checksummed too."""
  from zarr.codecs import Crc32cCodec  # pylint: disable=import-outside-toplevel
  return {"compressors": [Crc32cCodec()], "fill_value": 0}


IMAGES_CODECS = [{"name": "sharding_indexed", "configuration": {
    "codecs": [{"name": "bytes"}, {"name": "crc32c"}],
    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
    "index_location": "end"}}]  # What the reader expects of images/zarr.json (besides the chunk shape).


def shard_key(shard: int) -> tuple[str, ...]:
  """The path of a shard's file under `images/`, by Zarr v3's default chunk key encoding."""
  return ("c", str(shard), "0", "0", "0")


def _crc_ok(data: bytes) -> bool:
  """Whether the last 4 bytes are the CRC-32C of the rest, as Zarr's crc32c codec stores it."""
  import google_crc32c  # pylint: disable=import-outside-toplevel
  return google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


def prepare_rows(data, params: tuple, positions: np.ndarray) -> dict:
  """Decodes examples `positions` of `data` and puts each on its canvas (`shared.data.prepared.prepare_image`).

  Returns:
    `images` uint8 [B, Hc, Wc, C], `sizes` and `source_sizes` int32 [B, 2], `labels` and `index` int64 [B].
  """
  short_side, max_aspect, canvas = params
  inputs, labels = data.read(positions)
  out = [prepare_image(x, short_side, max_aspect, canvas) for x in inputs]
  return {"images": np.stack([o[0] for o in out]).reshape(len(out), *canvas),
          "sizes": np.asarray([o[1] for o in out], np.int32).reshape(-1, 2),
          "source_sizes": np.asarray([np.shape(x)[:2] for x in inputs], np.int32).reshape(-1, 2),
          "labels": np.asarray(labels, np.int64), "index": data.indices[positions].astype(np.int64)}


def prepare_in_worker(positions: np.ndarray) -> dict:
  """`prepare_rows` in an input worker (`shared.workers`' start: the transfer set and the parameters, once). Here,
  not in `teacher_cache`, so that a worker imports the data modules only, not JAX."""
  from shared import workers  # pylint: disable=import-outside-toplevel  # It imports shared.data.
  return prepare_rows(*workers._worker_inputs, positions)  # pylint: disable=protected-access


def shard_digest(arrays: dict) -> bytes:
  """SHA-256 of one shard's arrays (every array but `digests`, in `ARRAYS` order, little-endian)."""
  digest = hashlib.sha256()
  for name in ARRAYS[:-1]:
    digest.update(name.encode() + little_endian(np.ascontiguousarray(arrays[name])))
  return digest.digest()


def content_digest(spec: PreparedSpec, digests: np.ndarray) -> str:
  """The store's content fingerprint: SHA-256 of its spec (without when and by whom, and without the source's name,
  a path: a store made from a copy of the data elsewhere is the same store) and every shard's digest."""
  key = spec.build_key()
  key["source"] = {k: v for k, v in key["source"].items() if k != "name"}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
  digest.update(np.ascontiguousarray(digests, np.uint8).tobytes())
  return digest.hexdigest()


def read_attributes(path: str) -> dict | None:
  """The group attributes of the store at `path`, or None where there is no readable zarr.json."""
  try:
    metadata = storage.read_json(storage.join(path, "zarr.json"))
  except (OSError, ValueError):
    return None
  attributes = metadata.get("attributes") if isinstance(metadata, dict) else None
  return attributes if isinstance(attributes, dict) else {}


def is_prepared(path: str, complete: bool = False) -> bool:
  """Whether `path` is a prepared store (and, with `complete`, one whose completion record is written)."""
  attributes = read_attributes(path) or {}
  return SPEC_KEY in attributes and (not complete or COMPLETE_KEY in attributes)


class PreparedSource:
  """A prepared store read as a dataset: each example's pixels are its [h, w] region of the canvas.

  Also offers the canvas itself (`canvas_shape`, `read_canvas`), for a renderer that works on fixed shapes.
  """

  dtype = np.dtype(np.uint8)
  inputs_checked = True  # uint8: nothing to check.

  def __init__(self, name: str, path: str, spec: PreparedSpec, complete: dict, sizes: np.ndarray,
               labels: np.ndarray):
    self.name, self.path, self.spec, self.complete = name, path, spec, complete
    self._sizes, self._labels = sizes, labels
    self.labeled = spec.labeled
    self.shape = (None, None, spec.canvas[2])
    self._fs = None  # An object store's file system, once used.
    self._indexes: dict[int, np.ndarray] = {}  # Shard -> its index, once read.
    self._memory: np.ndarray | None = None

  def __getstate__(self) -> dict:
    # An input worker gets the store's path and small arrays, and reads the shards itself.
    return {**self.__dict__, "_fs": None, "_indexes": {}, "_memory": None}

  @property
  def class_names(self) -> tuple[str, ...] | None:
    return self.spec.class_names

  @property
  def canvas_shape(self) -> tuple[int, int, int]:
    """(Hc, Wc, C): every image's canvas."""
    return self.spec.canvas

  @property
  def kept_in_memory(self) -> bool:
    return len(self) * int(np.prod(self.spec.canvas)) <= SMALL_STORE_BYTES

  def __len__(self) -> int:
    return self.spec.count

  def _damaged(self, what: str) -> StillroomError:
    return StillroomError(f"dataset {self.name!r}: the prepared store is damaged: {what}; run `teacher-cache prepare` "
                          "again with --overwrite to rebuild it.")

  def read_canvas(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The canvases of examples `keys` and their images' sizes.

    Returns:
      (uint8 [B, Hc, Wc, C], int32 [B, 2] (h, w)): image b is canvas[b, :h, :w]; beyond it, its edge repeated.
    """
    keys = np.asarray(keys, np.int64)
    if self._memory is None and self.kept_in_memory and len(keys):
      self._memory = self._read(np.arange(len(self)))
    if self._memory is not None:
      return self._memory[keys], self._sizes[keys]
    unique, inverse = np.unique(keys, return_inverse=True)
    return self._read(unique)[inverse.reshape(-1)], self._sizes[keys]

  def _shard(self, shard: int) -> str:
    return storage.join(self.path, "images", *shard_key(shard))

  def _ranges(self, shard: int, starts: list[int], ends: list[int], from_end: bool = False) -> list[bytes]:
    """Byte ranges [start, end) of one shard's file (`from_end`: counted back from its end), in one request to an
    object store."""
    path = self._shard(shard)
    try:
      if storage.is_url(path):
        if self._fs is None:
          self._fs = storage.filesystem(path)[0]
        key = self._fs._strip_protocol(path)  # pylint: disable=protected-access  # As url_to_fs does.
        size = self._fs.size(key) if from_end else 0
        return self._fs.cat_ranges([key] * len(starts), [size + v for v in starts], [size + v for v in ends])
      with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size if from_end else 0
        return [os.pread(f.fileno(), end - start, size + start) for start, end in zip(starts, ends)]
    except FileNotFoundError as e:
      raise self._damaged(f"its shard {path} is missing") from e
    except OSError as e:
      raise StillroomError(f"dataset {self.name!r}: cannot read {path}: {e.strerror or e}") from e

  def _index(self, shard: int) -> np.ndarray:
    """uint64 [chunk_images, 2]: each image's (offset, bytes) in its shard's file, from the index at its end."""
    if shard not in self._indexes:
      size = 16 * self.spec.chunk_images + 4
      data = self._ranges(shard, [-size], [0], from_end=True)[0]
      if len(data) != size or not _crc_ok(data):
        raise self._damaged(f"the index of shard {shard} fails its checksum")
      self._indexes[shard] = np.frombuffer(data[:-4], "<u8").reshape(-1, 2)
    return self._indexes[shard]

  def _read(self, keys: np.ndarray) -> np.ndarray:
    """Canvases of sorted `keys`, read straight from the shards' files: one read per image, its CRC-32C checked
    (zarr's per-chunk machinery costs a millisecond or more an image; this, a few microseconds)."""
    out = np.empty((len(keys), *self.spec.canvas), np.uint8)
    image_bytes = int(np.prod(self.spec.canvas))
    shards = keys // self.spec.chunk_images
    for shard in np.unique(shards).tolist():
      where = np.flatnonzero(shards == shard)
      slots = self._index(shard)[keys[where] - shard * self.spec.chunk_images]
      if (slots[:, 1] != image_bytes + 4).any():
        raise self._damaged(f"example {int(keys[where][np.argmax(slots[:, 1] != image_bytes + 4)])} is missing "
                            f"from shard {shard}")
      starts = slots[:, 0].astype(np.int64).tolist()
      for position, key, data in zip(where.tolist(), keys[where].tolist(),
                                     self._ranges(shard, starts, [s + image_bytes + 4 for s in starts])):
        if len(data) != image_bytes + 4 or not _crc_ok(data):
          raise self._damaged(f"example {key} fails its checksum (shard {shard})")
        out[position] = np.frombuffer(data, np.uint8, image_bytes).reshape(self.spec.canvas)
    return out

  def read(self, keys: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    canvas, sizes = self.read_canvas(keys)
    return [c[:h, :w] for c, (h, w) in zip(canvas, sizes.tolist())], self._labels[np.asarray(keys, np.int64)]

  def labels(self, keys: np.ndarray) -> np.ndarray:
    return self._labels[np.asarray(keys, np.int64)]

  def image_sizes(self, keys: np.ndarray) -> np.ndarray:
    return self._sizes[np.asarray(keys, np.int64)].astype(np.int64)

  def identity(self) -> dict:
    """The content fingerprint (every pixel, size and label, by the shards' digests) and what it was prepared from."""
    return {"kind": "prepared", "content_sha256": self.complete["content_sha256"],
            "source_fingerprint": self.spec.source["fingerprint"], "image_size": self.spec.image_size,
            "short_side": self.spec.short_side}

  def record_bytes(self, keys: np.ndarray) -> list[bytes]:
    images, labels = self.read(keys)
    return [json.dumps(list(x.shape)).encode() + x.tobytes() + np.int64(y).astype("<i8").tobytes()
            for x, y in zip(images, labels)]


def open_prepared(path: str, name: str | None = None) -> tuple[PreparedSpec, dict | None]:
  """The spec and completion record (None: incomplete) of the prepared store at `path`.

  Raises:
    StillroomError: no store there, not a prepared store (a teacher cache is named as one), or a damaged spec.
  """
  name = name or PREFIX + path
  attributes = read_attributes(path)
  if attributes is None:
    if storage.exists(path):
      raise StillroomError(f"dataset {name!r}: {path!r} is not a prepared image store (no readable zarr.json); make "
                           f"one with `{MAKE.format(path=path)}`.")
    raise StillroomError(f"dataset {name!r}: no prepared image store at {path!r}; make one with "
                         f"`{MAKE.format(path=path)}`.")
  if SPEC_KEY not in attributes:
    what = "a teacher cache (give it as --cache)" if "stillroom" in attributes else "another Zarr store"
    raise StillroomError(f"dataset {name!r}: {path!r} is {what}, not a prepared image store; make one with "
                         f"`{MAKE.format(path=path)}`.")
  try:
    spec = PreparedSpec.from_attrs(attributes[SPEC_KEY])
  except StillroomError as e:
    raise StillroomError(f"dataset {name!r}: {e}; run `teacher-cache prepare` again with --overwrite.") from e
  complete = attributes.get(COMPLETE_KEY)
  return spec, complete if isinstance(complete, dict) else None


def open_source(name: str, split: str, data_dir: str | None) -> OpenedSource:  # pylint: disable=unused-argument
  """The prepared store `name` (`prepared:STORE`, a local path or a URL), checked complete and whole: its one split,
  `train`, and the source's class count."""
  import zarr  # pylint: disable=import-outside-toplevel
  path = storage.local(name[len(PREFIX):].rstrip("/"))
  spec, complete = open_prepared(path, name)
  if complete is None:
    raise StillroomError(f"dataset {name!r}: the prepared store is incomplete (its `teacher-cache prepare` was "
                         "interrupted, or is running): run the same command again to finish it.")
  try:
    group = zarr.open_group(storage.zarr_store(path, read_only=True), mode="r")
    digests = np.asarray(group["digests"][:])
    sizes = np.asarray(group["sizes"][:]).astype(np.int32)
    labels = np.asarray(group["labels"][:]).astype(np.int64)
  except Exception as e:  # pylint: disable=broad-except  # A missing, truncated or garbled array.
    raise StillroomError(f"dataset {name!r}: the prepared store is damaged ({type(e).__name__}: {e}); run "
                         "`teacher-cache prepare` again with --overwrite to rebuild it.") from e
  try:
    layout = storage.read_json(storage.join(path, "images", "zarr.json"))
    codecs = layout["codecs"]
    inner = codecs[0]["configuration"].pop("chunk_shape")
    expected = (layout["shape"], layout["data_type"], inner, layout["chunk_key_encoding"]) == (
        [spec.count, *spec.canvas], "uint8", [1, *spec.canvas],
        {"name": "default", "configuration": {"separator": "/"}})
  except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
    expected = codecs = None
  if not expected or codecs != IMAGES_CODECS:
    raise StillroomError(f"dataset {name!r}: the prepared store is damaged (its images array is not laid out as "
                         "`teacher-cache prepare` writes it); run `teacher-cache prepare` again with --overwrite to "
                         "rebuild it.")
  if complete.get("content_sha256") != content_digest(spec, digests) or sizes.shape != (spec.count, 2) or \
      labels.shape != (spec.count,):
    raise StillroomError(f"dataset {name!r}: the prepared store is damaged (its arrays do not match its completion "
                         "record); run `teacher-cache prepare` again with --overwrite to rebuild it.")
  source = PreparedSource(name, path, spec, complete, sizes, labels)
  return OpenedSource(source, {"train": len(source)}, spec.num_classes)


def check_views(transfer_set, image_size: int | None) -> None:
  """Views of a prepared store: crop views (`--image-size`) are needed; a size above the one it was prepared for
  upsamples its crops more than it was prepared for, which is allowed, with a warning.

  Raises:
    StillroomError: no --image-size.
  """
  source = transfer_set.source
  if not isinstance(source, PreparedSource):
    return
  spec = source.spec
  if image_size is None:
    raise StillroomError(f"dataset {transfer_set.name!r} holds images prepared for crop views at {spec.image_size} "
                         f"px; give --image-size (e.g. --image-size {spec.image_size}).")
  if image_size > spec.image_size:
    logger(__name__).warning(
        f"--image-size {image_size} on {transfer_set.name!r}, prepared for {spec.image_size} px (shorter side "
        f"{spec.short_side} px): crops will be upsampled {image_size / spec.image_size:.2g}x more than they would be "
        f"from a store prepared for {image_size} (`teacher-cache prepare ... --image-size {image_size}`).")


def mismatch_hint(given: str, recorded: str) -> str:
  """What to add to a refusal of data that is not a cache's when one of the two is a prepared store."""
  if given.startswith(PREFIX) == recorded.startswith(PREFIX):
    return ""
  if recorded.startswith(PREFIX):
    return (f" The cache's views were rendered from the prepared images {recorded!r}: give that dataset (or no "
            "--dataset), so that the student sees the pixels the teachers saw.")
  return (f" The cache's views were rendered from {recorded!r}, not from prepared images: give that dataset, or build "
          f"a cache from {given!r}.")
