"""Split specs in TFDS slicing syntax (`train`, `train[:80%]`, `train[100:200]`), parsed against the sizes of the
unsliced splits. Every example keeps its position in the unsliced split as its index, so slices, folds and fractions
of one split share indices."""

import types

import numpy as np
import tensorflow_datasets as tfds

from shared.errors import StillroomError

NO_EVAL = "none"  # `--eval-split none`: no evaluation split.


def split_name(split: str) -> str:
  """The one unsliced split a split spec names (`train` of `train[:80%]`), before its size is known.

  Raises:
    StillroomError: it names several.
  """
  named = {part.split("[")[0].strip() for part in split.split("+")}
  if len(named) != 1:
    raise _mixes_splits(split, named)
  return named.pop()


def _mixes_splits(split: str, names) -> StillroomError:
  return StillroomError(f"split {split!r} mixes splits {sorted(names)}; an example's index is its position in one "
                        "split, so use slices of a single split.")


def parse_split(split: str, split_sizes: dict[str, int], dataset: str) -> tuple[str, np.ndarray, str]:
  """Parses a TFDS split spec against the sizes of the unsliced splits.

  Returns:
    `(base_split, indices, canonical_split)`: the one split referred to, int64 positions in it, and the spec
    with absolute bounds.
  """
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(
        {name: types.SimpleNamespace(num_examples=n, shard_lengths=[n]) for name, n in split_sizes.items()})
  except (ValueError, AssertionError) as e:
    raise StillroomError(
        f"bad split {split!r} for dataset {dataset!r}: {str(e).rstrip('.')}. Valid splits: {sorted(split_sizes)}; "
        "slices use the TFDS syntax, e.g. 'train[:80%]' or 'train[100:200]'.") from e
  base_splits = {instruction.splitname for instruction in instructions}
  if len(base_splits) != 1:
    raise _mixes_splits(split, base_splits)
  base = base_splits.pop()
  parts, canonical = [], []
  for instruction in instructions:
    start, stop, _ = slice(instruction.from_, instruction.to).indices(split_sizes[base])
    parts.append(np.arange(start, stop, dtype=np.int64))
    canonical.append(f"{base}[{start}:{stop}]")
  indices = np.concatenate(parts)
  if len(np.unique(indices)) != len(indices):
    raise StillroomError(f"split {split!r} names some examples twice; use non-overlapping slices.")
  if not len(indices):
    raise StillroomError(f"split {split!r} of dataset {dataset!r} is empty.")
  return base, indices, "+".join(canonical)


def canonical_indices(canonical_split: str) -> np.ndarray:
  """int64 [N]: the positions a canonical split (`train[0:1150]`, parts joined by `+`) names, in its order."""
  parts = []
  for part in canonical_split.split("+"):
    start, stop = part[part.index("[") + 1:-1].split(":")
    parts.append(np.arange(int(start), int(stop), dtype=np.int64))
  return np.concatenate(parts)
