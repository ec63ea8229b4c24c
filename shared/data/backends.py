"""Which backend reads a dataset name: the one whose prefix it starts with, in one table; any other name is a TFDS
dataset (or the embedded `digits`). Each backend is a module with an `open_source(name, split, data_dir)`; the
text backend (`text:`) also takes the text options (`shared.data.text.TextOptions`)."""

from shared.data import imagefolder, npz, prepared, text
from shared.data import tfds as tfds_datasets
from shared.data.source import OpenedSource
from shared.errors import StillroomError

# Prefix -> backend. Each of these names a local file or folder (or an object store URL): `PREFIX + PATH`.
BACKENDS = {npz.PREFIX: npz.open_source, imagefolder.PREFIX: imagefolder.open_source,
            prepared.PREFIX: prepared.open_source, text.PREFIX: text.open_source}


def is_text(name: str | None) -> bool:
  """Whether a dataset name is a text transfer set (`text:PATH`)."""
  return bool(name) and name.startswith(text.PREFIX)


def open_source(name: str, split: str, data_dir: str | None,
                text_options: "text.TextOptions | None" = None) -> OpenedSource:
  """The source of dataset `name` that `split` reads, by `name`'s backend.

  Raises:
    StillroomError: text options for a dataset that is not text.
  """
  if is_text(name):
    return text.open_source(name, split, data_dir, text_options)
  if text_options is not None:
    raise StillroomError(f"dataset {name!r} is not text: --seq-len, --tokenizer and --pack-seed apply to 'text:PATH' "
                         "datasets only; leave them out.")
  backend = next((backend for prefix, backend in BACKENDS.items() if name.startswith(prefix)),
                 tfds_datasets.open_source)
  return backend(name, split, data_dir)


def local_path(name: str) -> str | None:
  """The file or folder a dataset name points to (`npz:PATH`, `imagefolder:DIR`, `prepared:STORE`, `text:PATH`), or
  None for named datasets."""
  for prefix in BACKENDS:
    if name.startswith(prefix):
      return name[len(prefix):]
  return None


def default_eval_split(eval_dataset: str | None) -> str:
  """The eval split when only `--eval-dataset` is given: `train`, the one split of an `npz:`, `imagefolder:`,
  `prepared:` or `text:` dataset; `test` for a TFDS dataset."""
  return "train" if eval_dataset and local_path(eval_dataset) else "test"
