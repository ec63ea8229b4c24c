"""`npz:PATH`: a NumPy archive with `x` [N, ...] and optional `y` [N] (no `y`: an unlabeled transfer set), held in
memory and checked once when opened; its one split is `train`."""

import io

import numpy as np

from shared import storage
from shared.data.source import ArraySource, OpenedSource, check_inputs
from shared.errors import StillroomError

PREFIX = "npz:"


def open_source(name: str, split: str, data_dir: str | None) -> OpenedSource:  # pylint: disable=unused-argument
  """The archive `name` (`npz:PATH`, a local path or a URL) in memory: its one split, `train`, and its class count."""
  source, num_classes = _load(name)
  return OpenedSource(source, {"train": len(source)}, num_classes)


def _load(name: str) -> tuple[ArraySource, int | None]:
  path = name[len(PREFIX):]
  if not storage.is_file(path):
    raise StillroomError(f"dataset {name!r}: no such file {path!r}.")
  try:  # A local archive is read from its file (its arrays loaded one by one); an object, fetched whole.
    with np.load(io.BytesIO(storage.read_bytes(path)) if storage.is_url(storage.local(path)) else storage.local(path),
                 allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
  except Exception as e:  # A corrupt or non-NumPy file: say which one.
    raise StillroomError(f"dataset {name!r}: cannot read {path!r} as a NumPy .npz archive ({e}).") from e
  if "x" not in arrays:
    raise StillroomError(f"dataset {name!r}: the archive has no 'x' array (it has {sorted(arrays)}).")
  x = arrays["x"]
  if x.ndim < 2 or not len(x):
    raise StillroomError(f"dataset {name!r}: 'x' must have shape (N, ...) with N > 0, got {x.shape}.")
  check_inputs(name, "train", np.arange(len(x)), x)  # Held in memory: checked once, here.
  if "y" not in arrays:
    return ArraySource(x, np.full(len(x), -1, np.int64), labeled=False), None
  y = arrays["y"]
  if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
    raise StillroomError(
        f"dataset {name!r}: 'y' must be integer class ids of shape ({len(x)},), got {y.dtype} {y.shape}.")
  if np.any(y < 0):
    raise StillroomError(f"dataset {name!r}: 'y' has a negative label at example {int(np.argmax(y < 0))}.")
  return ArraySource(x, y.astype(np.int64), labeled=True), int(y.max()) + 1
