"""TFDS datasets prepared in a data dir with `file_format="array_record"`, read by batched random access without
TensorFlow, and `digits`, the embedded offline dataset (scikit-learn's 8x8 digits as a TFDS builder, prepared on
first use). Any dataset name without a prefix is one of these.

Processes that find `digits` unprepared in the same data dir prepare it one at a time: the first holds an `flock` on
`DATA_DIR/digits/VERSION.lock` while it prepares (TFDS writes into a temporary folder and renames it into place,
which only one can do), and the others, waiting on that lock, then find it prepared and read it.
"""

import contextlib
import fcntl
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from shared import digits as digits_lib
from shared.data.source import READ_BATCH, ArraySource, OpenedSource, little_endian
from shared.data.splits import split_name
from shared.log import logger
from shared.errors import StillroomError

EMBEDDED_DATASETS = ("digits",)
SMALL_SPLIT_BYTES = 64 << 20  # A fixed-shape TFDS split this small is kept in memory after its first read.


def open_source(name: str, split: str, data_dir: str | None) -> OpenedSource:
  """The split that `split` names of the TFDS dataset `name` prepared in `data_dir` (TFDS's default when None), and
  the dataset's class count."""
  source_of, num_classes = _open_builder(name, data_dir)
  source = source_of(split_name(split))
  return OpenedSource(source, {source.split: len(source)}, num_classes)


class TfdsSource:
  """A TFDS split prepared as array_record, read by batched random access (no TensorFlow).

  A split of fixed-shape examples under `SMALL_SPLIT_BYTES` is read whole on first use and kept in memory.
  """

  def __init__(self, builder, split: str, data_source, keys: tuple[str, str], labeled: bool):
    self.builder, self.split, self._source = builder, split, data_source
    self.image_key, self.label_key = keys
    self.labeled = labeled
    feature = builder.info.features[self.image_key]
    self.shape = tuple(feature.shape)
    self.dtype = np.dtype(feature.np_dtype)
    self._count = len(data_source)
    try:
      self._files = [str(path) for path in builder.info.splits[split].filepaths]
    except (KeyError, ValueError):  # Mock data, or a split without a file template: identified without files.
      self._files = []
    self._memory: ArraySource | None = None
    self._label_source = None
    label = builder.info.features[self.label_key] if labeled else None
    self.class_names = tuple(label.names) if getattr(label, "names", None) else None
    self.inputs_checked = False  # Checked as they are read.

  def __len__(self) -> int:
    return self._count

  @property
  def fixed_shape(self) -> bool:
    return None not in self.shape

  def _records(self, keys, source=None) -> list[dict]:
    """Records of `keys` from `source` (default: the decoding data source), in one batched read."""
    source = self._source if source is None else source
    keys = [int(k) for k in keys]
    try:
      return source.__getitems__(keys)  # One batched read of the array_record files.
    except TypeError:  # tfds.testing.mock_data's sources only read one record at a time.
      return [source[key] for key in keys]

  def _from_records(self, records: list[dict]):
    inputs = [np.asarray(r[self.image_key]) for r in records]
    labels = np.asarray([r.get(self.label_key, -1) for r in records], np.int64)
    return (np.stack(inputs) if self.fixed_shape else inputs), labels

  @property
  def decoded_bytes(self) -> int | None:
    """The split's size decoded (fixed shapes only)."""
    return len(self) * int(np.prod(self.shape)) * self.dtype.itemsize if self.fixed_shape else None

  @property
  def kept_in_memory(self) -> bool:
    return self.fixed_shape and self.decoded_bytes <= SMALL_SPLIT_BYTES

  def _in_memory(self) -> ArraySource | None:
    if self._memory is None and self.kept_in_memory:
      parts = [self._from_records(self._records(range(start, min(start + READ_BATCH, len(self)))))
               for start in range(0, len(self), READ_BATCH)]
      self._memory = ArraySource(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                 self.labeled)
    return self._memory

  def read(self, keys: np.ndarray):
    memory = self._in_memory()
    return memory.read(keys) if memory is not None else self._from_records(self._records(keys))

  def labels(self, keys: np.ndarray) -> np.ndarray:
    """Labels without decoding the images (a second data source that skips their decoding)."""
    memory = self._in_memory()
    if memory is not None:
      return memory.labels(keys)
    if not self.labeled:
      return np.full(len(keys), -1, np.int64)
    if self._label_source is None:
      self._label_source = self.builder.as_data_source(
          split=self.split, decoders={self.image_key: tfds.decode.SkipDecoding()})
    labels = [np.asarray([r[self.label_key] for r in self._records(keys[start:start + READ_BATCH],
                                                                   self._label_source)], np.int64)
              for start in range(0, len(keys), READ_BATCH)]
    return np.concatenate(labels) if labels else np.zeros(0, np.int64)

  def image_sizes(self, keys: np.ndarray) -> np.ndarray:
    if self.fixed_shape:
      return np.tile(np.asarray(self.shape[:2], np.int64), (len(keys), 1))
    return np.array([np.shape(r[self.image_key])[:2] for r in self._records(keys)], np.int64).reshape(-1, 2)

  def identity(self) -> dict:
    """Name, version and config, every split's size, and the split's files with their sizes."""
    files = [[os.path.basename(path), os.path.getsize(path) if os.path.exists(path) else None]
             for path in sorted(self._files)]
    return {"kind": "tfds", "dataset": self.builder.info.full_name,
            "splits": {name: int(split.num_examples) for name, split in sorted(self.builder.info.splits.items())},
            "files": files}

  def record_bytes(self, keys: np.ndarray) -> list[bytes]:
    out = []
    for record in self._records(keys):
      image = np.asarray(record[self.image_key])
      out.append(json.dumps(list(image.shape)).encode() + little_endian(image)
                 + np.int64(record.get(self.label_key, -1)).astype("<i8").tobytes())
    return out


def _offline_preparation_hint(name: str, data_dir: str | None) -> str:
  target = data_dir or "~/tensorflow_datasets"
  return (
      f"Prepare it on a machine with network access: python -c \"import tensorflow_datasets as tfds; "
      f"tfds.builder('{name}', data_dir='DIR', file_format='array_record').download_and_prepare()\", then copy DIR "
      f"to this machine and pass --data-dir DIR (looked in {target}).")


@contextlib.contextmanager
def _preparing(path: str):
  """Holds an exclusive `flock` on `path.lock` (waiting for another process that holds it), where `path` is local;
  on an object store, nothing (two first preparations there may still race)."""
  if "://" in path:
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logger(__name__).info(f"waiting for another process that is preparing {path}")
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # Drops the lock; the file stays, so no waiter ever locks a file that was replaced.


def _prepared_digits(data_dir: str | None):
  """The `digits` builder, prepared in `data_dir` (by this process, or by another one while this one waited)."""
  builder = digits_lib.Digits(data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  try:
    with _preparing(os.fspath(builder.data_dir)):
      builder = digits_lib.Digits(data_dir=data_dir, file_format="array_record")  # Reads what another one prepared.
      if not builder.is_prepared():
        logger(__name__).info(f"preparing the embedded digits dataset in {builder.data_dir}")
        tfds.disable_progress_bar()
        builder.download_and_prepare()
  except OSError as e:  # A read-only or full data dir, no permission: it is written once, here.
    where = f" ({e.filename})" if e.filename else ""
    raise StillroomError(f"cannot prepare the embedded digits dataset in {builder.data_dir}: "
                         f"{e.strerror or e}{where}; pass a --data-dir you can write (digits is prepared there once, "
                         "then only read).") from e
  return builder


def _open_builder(name: str, data_dir: str | None):
  """Opens a TFDS builder; returns (split -> TfdsSource, num_classes)."""
  try:
    if name == "digits":
      builder = _prepared_digits(data_dir)
    else:
      builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise StillroomError(
        f"unknown dataset {name!r}. Use 'digits' (embedded, offline), 'npz:PATH' (a NumPy archive with x and "
        f"optional y), 'imagefolder:DIR' (a folder of class folders of images), or the name of a TFDS dataset "
        f"prepared in --data-dir.") from e
  features = builder.info.features
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  if image_key not in features:
    raise StillroomError(f"dataset {name!r} has no {image_key!r} feature (it has {sorted(features)}); stillroom "
                         "reads its supervised keys, or 'image' and 'label'.")
  num_classes = getattr(features[label_key], "num_classes", None) if label_key in features else None

  def source_of(split_name: str) -> TfdsSource:
    try:
      data_source = builder.as_data_source(split=split_name)
    except Exception as e:  # tfds raises several types here for "not prepared" or "wrong file format".
      known = list(builder.info.splits.keys())
      if known and split_name not in known:
        raise StillroomError(f"dataset {name!r} has no split {split_name!r}; valid splits: {known}.") from e
      raise StillroomError(
          f"dataset {name!r} (split {split_name!r}) is not prepared for random access in "
          f"{data_dir or 'the default data dir'}, and nothing can be downloaded here. "
          + _offline_preparation_hint(name, data_dir)) from e
    return TfdsSource(builder, split_name, data_source, (image_key, label_key), labeled=label_key in features)

  return source_of, num_classes
