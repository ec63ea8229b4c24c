"""Transfer sets: one way to name data everywhere (`--dataset NAME --split SPLIT [--data-dir DIR]`).

Six kinds of name, each read by a backend (`backends.BACKENDS` chooses it by the name's prefix):
  * `digits`: the embedded offline dataset (scikit-learn's 8x8 digits as a TFDS builder), prepared on first use.
  * `npz:PATH`: a NumPy archive with `x` [N, ...] and optional `y` [N] (no `y`: an unlabeled transfer set);
    its one split is `train`.
  * `imagefolder:DIR`: JPEG/PNG files, one sub-folder of DIR per class (the sorted folder names are the class ids,
    as torchvision's `ImageFolder`), or directly in DIR for an unlabeled set; its one split is `train`, whose
    examples are the files in sorted relative-path order. Images may differ in size; they are decoded to RGB.
  * `prepared:STORE`: images decoded once by `teacher-cache prepare` into a Zarr store of uint8 pixels on a fixed
    canvas (`prepared`); its one split is `train`, its labels and class names the source's.
  * `text:PATH`: a `.txt` file, a `.jsonl` file (a string `text` field per line) or a folder of them, tokenized
    (UTF-8 bytes, or a Hugging Face `tokenizer.json`) and packed into rows of L tokens with segment ids (`text`);
    its one split is `train`, of packed rows, int32 [2, L], whose labels are the next tokens, int [L].
  * any other name: a TFDS dataset prepared in the data dir with `file_format="array_record"`.

Splits use TFDS slicing syntax (`train`, `train[:80%]`, `train[100:200]`). Every example keeps its position in the
unsliced split as its index, so slices, folds and fractions of one split share indices.

Sources are lazy: opening a dataset lists it (a TFDS split's size, a folder's file names and sizes) and reads no
example; `TransferSet.read` reads the records of the examples asked for, and checks them there (finite values,
labels in range), naming the example. Only `npz:` archives and TFDS splits of fixed-shape examples smaller than
`tfds.SMALL_SPLIT_BYTES` (such as `digits`) are held in memory, after their first read.

Modules: `source` (the `Source` protocol every backend implements), one per backend (`npz`, `imagefolder`, `tfds`,
`prepared`, `text`),
`backends` (the table of prefixes), `splits` (split specs), `fingerprint` (what stands for the data's bytes) and
`transfer_set` (`TransferSet`, `open_transfer_set`, and what a cache or run records of its data).
"""

from shared.data.backends import BACKENDS, default_eval_split, local_path
from shared.data.fingerprint import FINGERPRINT_SAMPLE, FINGERPRINT_VERSION
from shared.data.imagefolder import IMAGE_EXTENSIONS, ImageFolderSource
from shared.data.imagefolder import PREFIX as IMAGEFOLDER_PREFIX
from shared.data.npz import PREFIX as NPZ_PREFIX
from shared.data.prepared import PREFIX as PREPARED_PREFIX
from shared.data.prepared import PreparedSource
from shared.data.source import ArraySource, Source
from shared.data.splits import NO_EVAL
from shared.data.text import PREFIX as TEXT_PREFIX
from shared.data.text import TextOptions, Tokenizer, next_token_labels
from shared.data.tfds import EMBEDDED_DATASETS, TfdsSource
from shared.data.transfer_set import (DatasetSpec, Normalization, TransferSet, check_eval_set, default_normalization,
                                      label_ids, open_transfer_set)

__all__ = [
    "BACKENDS", "EMBEDDED_DATASETS", "FINGERPRINT_SAMPLE", "FINGERPRINT_VERSION", "IMAGEFOLDER_PREFIX",
    "IMAGE_EXTENSIONS", "NO_EVAL", "NPZ_PREFIX", "PREPARED_PREFIX", "TEXT_PREFIX", "ArraySource", "DatasetSpec",
    "ImageFolderSource", "Normalization", "PreparedSource", "Source", "TextOptions", "TfdsSource", "Tokenizer",
    "TransferSet", "check_eval_set", "default_eval_split", "default_normalization", "label_ids", "local_path",
    "next_token_labels", "open_transfer_set",
]
