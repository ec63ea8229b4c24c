"""`imagefolder:DIR`: JPEG/PNG files, one sub-folder of DIR per class (the sorted folder names are the class ids, as
torchvision's `ImageFolder`), or directly in DIR for an unlabeled set; its one split is `train`, whose examples are
the files in sorted relative-path order. Images may differ in size; they are decoded to RGB when read."""

import contextlib
import hashlib
import io

import numpy as np

from shared import storage
from shared.data.source import OpenedSource
from shared.errors import StillroomError
from shared.log import logger

PREFIX = "imagefolder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# PIL modes an imagefolder: refuses rather than clip to 8 bits.
UNSUPPORTED_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer", "F": "float"}


def open_source(name: str, split: str, data_dir: str | None) -> OpenedSource:  # pylint: disable=unused-argument
  """The folder `name` (`imagefolder:DIR`, a local path or a URL), listed: its one split, `train`, and its class count
  (None: unlabeled)."""
  source, num_classes = _list(name)
  return OpenedSource(source, {"train": len(source)}, num_classes)


def _png_bit_depth(file) -> int:
  """The bit depth in a PNG's IHDR chunk (byte 24 of the file), read from an open binary file."""
  file.seek(0)
  header = file.read(25)
  return header[24] if len(header) == 25 else 8


class ImageFolderSource:
  """`imagefolder:DIR`: image files listed once in sorted order, decoded to RGB uint8 [H, W, 3] when read."""

  def __init__(self, name: str, root: str, files: list[str], sizes: list[int], labels: np.ndarray,
               classes: list[str]):
    self.name, self.root, self.files, self.sizes = name, root, files, sizes
    self._labels, self.classes = labels, classes
    self.labeled = bool(classes)
    self.shape, self.dtype = (None, None, 3), np.dtype(np.uint8)
    self.kept_in_memory = self.inputs_checked = False  # Decoded when read.

  @property
  def class_names(self) -> tuple[str, ...] | None:
    return tuple(self.classes) or None

  def __len__(self) -> int:
    return len(self.files)

  def _open(self, key: int, use):
    """`use(image)` of example `key`'s opened PIL image; a file that cannot be read is an error naming it."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    path = storage.join(self.root, self.files[key])
    try:
      # Local files are opened lazily (reading sizes reads headers only); an object is fetched whole.
      with contextlib.ExitStack() as stack:
        file = stack.enter_context(open(path, "rb") if not storage.is_url(path) else io.BytesIO(
            storage.read_bytes(path)))
        image = stack.enter_context(Image.open(file))
        deep = None
        if image.mode in UNSUPPORTED_MODES:
          deep = f"a {image.mode} image ({UNSUPPORTED_MODES[image.mode]})"
        elif image.format == "PNG" and _png_bit_depth(file) == 16:  # PIL opens these as 8-bit RGB(A).
          deep = f"a 16-bit {image.mode} image"
        if deep:
          raise StillroomError(f"dataset {self.name!r}: example index {key} ({path}) is {deep}; imagefolder: reads "
                               "8-bit images.")
        return use(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      raise StillroomError(f"dataset {self.name!r}: cannot decode example index {key} ({path}): {e}") from e

  def _decode(self, key: int) -> np.ndarray:
    # As torchvision's ImageFolder loader: PIL's convert("RGB") (grey and palette expanded, alpha dropped).
    return self._open(key, lambda image: np.asarray(image.convert("RGB")))

  def read(self, keys: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    return [self._decode(int(k)) for k in keys], self._labels[keys]

  def labels(self, keys: np.ndarray) -> np.ndarray:
    return self._labels[keys]

  def image_sizes(self, keys: np.ndarray) -> np.ndarray:
    """(height, width) of each image, from the file headers (no decoding)."""
    sizes = [self._open(int(key), lambda image: (image.height, image.width)) for key in keys]
    return np.asarray(sizes, np.int64).reshape(-1, 2)

  def identity(self) -> dict:
    """The sorted relative paths and their sizes (no modification times: a copy elsewhere keeps them)."""
    digest = hashlib.sha256()
    for path, size in zip(self.files, self.sizes):
      digest.update(f"{path}\0{size}\n".encode())
    return {"kind": "imagefolder", "classes": self.classes, "files": len(self.files), "sha256": digest.hexdigest()}

  def record_bytes(self, keys: np.ndarray) -> list[bytes]:
    paths = [storage.join(self.root, self.files[int(key)]) for key in keys]
    try:
      contents = storage.read_many(paths)  # On an object store, the requests together.
    except OSError as e:
      failed = keys[paths.index(e.filename)] if e.filename in paths else keys[0]
      raise StillroomError(f"dataset {self.name!r}: cannot read example index {int(failed)} ({e.filename}): "
                           f"{e.strerror or e}") from e
    return [data + np.int64(self._labels[key]).astype("<i8").tobytes() for key, data in zip(keys, contents)]


def _list(name: str) -> tuple[ImageFolderSource, int | None]:
  """Lists `imagefolder:DIR`: class sub-folders (sorted names are the class ids) of image files, or image files
  directly in DIR (unlabeled). Files are in sorted relative-path order."""
  root = name[len(PREFIX):]
  if not storage.is_dir(root):
    raise StillroomError(f"dataset {name!r}: no such directory {root!r}.")
  entries = storage.scan(root)
  classes = [entry for entry, folder, _ in entries if folder]
  loose = [entry for entry, folder, _ in entries if not folder and entry.lower().endswith(IMAGE_EXTENSIONS)]
  others = [entry for entry, folder, _ in entries if not folder and not entry.lower().endswith(IMAGE_EXTENSIONS)]
  if classes and loose:
    raise StillroomError(f"dataset {name!r}: {root!r} holds both class folders ({', '.join(classes[:3])}, ...) and "
                         f"image files ({loose[0]}, ...); put every image in its class folder, or use a folder of "
                         "images only for an unlabeled set.")
  files, sizes, labels, empty = [], [], [], []
  skipped = others if classes else []

  def walk(folder: str, relative: str, label: int) -> int:
    found = 0
    for entry, is_folder, size in storage.scan(folder):
      path = f"{relative}/{entry}" if relative else entry
      if is_folder:
        if label >= 0:  # Class folders may nest their images; an unlabeled set is flat.
          found += walk(storage.join(folder, entry), path, label)
      elif entry.lower().endswith(IMAGE_EXTENSIONS):
        files.append(path)
        sizes.append(size)
        labels.append(label)
        found += 1
      else:
        skipped.append(path)
    return found

  if classes:
    for label, folder in enumerate(classes):
      if not walk(storage.join(root, folder), folder, label):
        empty.append(folder)
  else:
    walk(root, "", -1)
  if not files:
    raise StillroomError(f"dataset {name!r}: no {'/'.join(IMAGE_EXTENSIONS)} files in {root!r}.")
  if skipped:
    logger(__name__).warning(f"dataset {name!r}: ignored {len(skipped)} file(s) that are not "
                             f"{'/'.join(IMAGE_EXTENSIONS)} images (e.g. {skipped[0]})")
  if empty:
    logger(__name__).warning(f"dataset {name!r}: class folder(s) {', '.join(empty[:5])} hold no images (their class "
                             "ids stay reserved)")
  source = ImageFolderSource(name, root, files, sizes, np.asarray(labels, np.int64), classes)
  return source, (len(classes) or None)
