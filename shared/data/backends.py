"""Which backend reads a dataset name: the one whose prefix it starts with, in one table; any other name is a TFDS
dataset (or the embedded `digits`). Each backend is a module with an `open_source(name, split, data_dir)`."""

from shared.data import imagefolder, npz, prepared
from shared.data import tfds as tfds_datasets
from shared.data.source import OpenedSource

# Prefix -> backend. Each of these names a local file or folder (or an object store URL): `PREFIX + PATH`.
BACKENDS = {npz.PREFIX: npz.open_source, imagefolder.PREFIX: imagefolder.open_source,
            prepared.PREFIX: prepared.open_source}


def open_source(name: str, split: str, data_dir: str | None) -> OpenedSource:
  """The source of dataset `name` that `split` reads, by `name`'s backend."""
  backend = next((backend for prefix, backend in BACKENDS.items() if name.startswith(prefix)),
                 tfds_datasets.open_source)
  return backend(name, split, data_dir)


def local_path(name: str) -> str | None:
  """The file or folder a dataset name points to (`npz:PATH`, `imagefolder:DIR`, `prepared:STORE`), or None for
  named datasets."""
  for prefix in BACKENDS:
    if name.startswith(prefix):
      return name[len(prefix):]
  return None


def default_eval_split(eval_dataset: str | None) -> str:
  """The eval split when only `--eval-dataset` is given: `train`, the one split of an `npz:`, `imagefolder:` or
  `prepared:` dataset; `test` for a TFDS dataset."""
  return "train" if eval_dataset and local_path(eval_dataset) else "test"
