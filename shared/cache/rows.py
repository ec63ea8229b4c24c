"""The row order: which view of which example each row of a cache holds, and the row arrays that follow from it.

A cache stores its examples in a seeded permuted order, so that any chunk is a uniform sample of the transfer set
even when the dataset is sorted by class. Three orders have been written (`CacheSpec.row_order`, recorded in the
spec; every one still reads):

- "grouped" (what a build writes): one permutation of the examples, shared by every view, and the V
  views of an example in adjacent rows: row r holds view `r mod V` of the `(r div V)`-th example of that order.
  A chunk of a multiple of V rows (the build's `--chunk-rows` is one, unless V is more) holds whole examples, so the
  build decodes each image once and renders all its views from it.
- "permuted" (older caches, from schema 2 on): view-major, rows `[v·N, (v+1)·N)` hold view v of every example, each
  view in its own seeded order, so the V views of an example lay in V unrelated chunks.
- "sequential" (schema 1): view-major, examples in split order within each view.
"""

import typing

import numpy as np

from shared.augment import fold_of, mix_params, row_permutation

if typing.TYPE_CHECKING:
  from shared.cache.spec import CacheSpec

GROUPED, PERMUTED = "grouped", "permuted"
ROW_ORDERS = (GROUPED, PERMUTED, "sequential")  # The first is what a build writes.


def row_sources(rows: np.ndarray, num_examples: int, seed: int, row_order: str = "permuted",
                views: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Which view of which example each row holds (see `CacheSpec.row_sources`, which this is).

  Args:
    rows: int [B] row numbers.
    num_examples: N, the transfer set's examples.
    seed: the build's seed.
    row_order: "grouped", "permuted" or "sequential" (the module's docstring describes each).
    views: V, the views per example (only the grouped order needs it: the view-major ones follow from N).

  Returns:
    `(view, position)`: int32 [B] view ids and int64 [B] positions in the transfer set.
  """
  rows = np.asarray(rows, np.int64)
  if row_order == GROUPED:
    slot, view = np.divmod(rows, views)
    return view.astype(np.int32), row_permutation(seed, 0, num_examples)[slot]
  view, slot = np.divmod(rows, num_examples)
  if row_order == "sequential":
    return view.astype(np.int32), slot
  position = np.empty_like(slot)
  for v in np.unique(view):
    here = view == v
    position[here] = row_permutation(seed, int(v), num_examples)[slot[here]]
  return view.astype(np.int32), position


def example_runs(position: np.ndarray, size: int) -> list[slice]:
  """Cuts a run of rows into consecutive parts of about `size` rows that never split the rows of one example: each
  part ends where the next row is of another example than the part's last (a row order that stores an example's
  views in adjacent rows thus keeps them in one part).

  Args:
    position: int [R] each row's example.
    size: the rows a part aims at (>= 1): a part holds the fewest whole examples' rows that reach it, or the rest.

  Returns:
    slices covering `0..R` in order.
  """
  parts, start, count = [], 0, len(position)
  while start < count:
    stop = min(start + size, count)
    while stop < count and position[stop] == position[stop - 1]:
      stop += 1
    parts.append(slice(start, stop))
    start = stop
  return parts


def replay_rows(spec: "CacheSpec", start: int, stop: int, indices: np.ndarray,
                sizes: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
  """The row arrays of rows `[start, stop)` that follow from the seed alone, as a build writes them.

  Args:
    spec: the cache's spec.
    indices: int64 [N] the transfer set's example indices.
    sizes: int [N, 2] every example's (height, width), for crop views.

  Returns:
    `(position int64 [n] in the transfer set, {"index", "view", "fold", and the view parameters, mixed views' too})`.
  """
  view, position = spec.row_sources(np.arange(start, stop))
  index = indices[position]
  params = spec.augmentation.view_params(index, view, None if sizes is None else sizes[position])
  return position, {"index": index, "view": view, "fold": fold_of(index, spec.folds), **params,
                    **mixed_rows(spec, index, view, indices)}


def mixed_rows(spec: "CacheSpec", index: np.ndarray, view: np.ndarray, indices: np.ndarray) -> dict:
  """The rows' partner views and λ as a build of `spec` draws them (`shared.augment.mix_params`, over the transfer
  set's example `indices`); {} without mixed views."""
  return mix_params(spec.augmentation, index, view, indices, spec.views, tuple(spec.dataset.input_shape))
