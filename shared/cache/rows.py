"""The row order: which view of which example each row of a cache holds, and the row arrays that follow from it.

Rows are view-major (rows `[v·N, (v+1)·N)` hold view v of every example), and within a view the examples are stored
in a seeded permuted order, so that any chunk is a uniform sample of the transfer set even when the dataset is
sorted by class. Schema 1 stored them in split order ("sequential").
"""

import typing

import numpy as np

from shared.augment import fold_of, row_permutation

if typing.TYPE_CHECKING:
  from shared.cache.spec import CacheSpec

ROW_ORDERS = ("permuted", "sequential")  # "sequential": version 1, examples in split order within each view.


def row_sources(rows: np.ndarray, num_examples: int, seed: int,
                row_order: str = "permuted") -> tuple[np.ndarray, np.ndarray]:
  """Which view of which example each row holds (see `CacheSpec.row_sources`, which this is).

  Args:
    rows: int [B] row numbers.
    num_examples: N, the transfer set's examples.
    seed: the build's seed.
    row_order: "permuted" (schema 2) or "sequential" (schema 1).

  Returns:
    `(view, position)`: int32 [B] view ids and int64 [B] positions in the transfer set.
  """
  rows = np.asarray(rows, np.int64)
  view, slot = np.divmod(rows, num_examples)
  if row_order == "sequential":
    return view.astype(np.int32), slot
  position = np.empty_like(slot)
  for v in np.unique(view):
    here = view == v
    position[here] = row_permutation(seed, int(v), num_examples)[slot[here]]
  return view.astype(np.int32), position


def replay_rows(spec: "CacheSpec", start: int, stop: int, indices: np.ndarray,
                sizes: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
  """The row arrays of rows `[start, stop)` that follow from the seed alone, as a build writes them.

  Args:
    spec: the cache's spec.
    indices: int64 [N] the transfer set's example indices.
    sizes: int [N, 2] every example's (height, width), for crop views.

  Returns:
    `(position int64 [n] in the transfer set, {"index", "view", "fold", and the view parameters})`.
  """
  view, position = spec.row_sources(np.arange(start, stop))
  index = indices[position]
  params = spec.augmentation.view_params(index, view, None if sizes is None else sizes[position])
  return position, {"index": index, "view": view, "fold": fold_of(index, spec.folds), **params}
