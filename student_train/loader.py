"""Batch streams for training: rows of a cache (streamed chunk by chunk) or the examples of a dataset.

Both yield the same batches: `x` (the rendered view, stored dtype), `labels` int32, `mask` float32 (0 for the
padding of an epoch's last batch, so every batch has one shape and the step compiles once), `index`, and from a
cache `targets` or `member_logits`. Every row is seen exactly once per epoch, in an order that depends only on
the seed and the epoch.

The cache loader never holds the cache in memory: each epoch reads whole chunks in a shuffled order (a per-row
read is far slower) and shuffles rows across a window of chunks in memory, in a background thread; the inputs are
decoded and rendered in worker processes (`shared.workers`), so reading and rendering overlap the device's step.
In a job of several processes every process draws the same batches (the order is a function of seed and epoch) and
renders only its rows of each (`rows`), which its devices hold.
Batches are close to uniform samples of the rows because the build stores each view's examples in a seeded permuted
order (`CacheSpec.row_sources`): every chunk is already a uniform sample, even of a dataset sorted by class.
"""

import itertools
import math
from collections.abc import Iterator

import numpy as np

from shared.augment import Augmentation
from shared.cache import ROWS, Cache
from shared.data import TransferSet
from shared.parallel import pad_rows
from shared.workers import DEFAULT_PREFETCH, BatchRenderer
from student_train.config import DEFAULT_SHUFFLE_WINDOW


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
  return np.random.default_rng([seed, epoch])


def _concat(a: dict, b: dict) -> dict:
  return {k: np.concatenate([a[k], b[k]]) for k in b} if a else b


def _take(rows: dict, part) -> dict:
  return {k: v[part] for k, v in rows.items()}


def _part(batches: Iterator[dict], rows: np.ndarray | None) -> Iterator[dict]:
  """This process's `rows` of every batch (all of them for None)."""
  return batches if rows is None else (_take(batch, rows) for batch in batches)


def _batches(windows: Iterator[dict], batch_size: int, rng: np.random.Generator) -> Iterator[dict]:
  """Shuffles each window of rows, cuts full batches, carries the remainder into the next window; the last,
  partial batch is padded and marked by `mask`."""
  carry: dict = {}
  for window in windows:
    size = len(next(iter(window.values())))
    rows = _concat(carry, _take(window, rng.permutation(size)))
    total = len(next(iter(rows.values())))
    full = total // batch_size * batch_size
    for start in range(0, full, batch_size):
      yield {**_take(rows, slice(start, start + batch_size)), "mask": np.ones(batch_size, np.float32)}
    carry = _take(rows, slice(full, total))
  remaining = len(next(iter(carry.values()))) if carry else 0
  if remaining:
    padded = {k: pad_rows(v, batch_size) for k, v in carry.items()}
    yield {**padded, "mask": (np.arange(batch_size) < remaining).astype(np.float32)}


class CacheLoader:
  """Streams (example, view) rows of a cache joined with their rendered inputs.

  Args:
    cache: an opened, complete cache.
    transfer_set: the dataset recorded in the cache (fingerprint already checked).
    batch_size: rows per batch.
    seed: data seed; the epoch's order is a function of (seed, epoch) only.
    fields: teacher arrays to read per row ("targets" and/or "member_logits"; none for hard labels).
    examples: if given, only rows of these example indices (a label fraction).
    window_chunks: chunks shuffled together in memory.
    workers: processes that read and render inputs (0: a thread of this process); see `shared.workers`.
    prefetch: batches rendered ahead of the step.
    rows: the rows of each batch this process renders and yields (`shared.parallel.process_rows`; None: all).
  """

  def __init__(self, cache: Cache, transfer_set: TransferSet, *, batch_size: int, seed: int,
               fields: tuple[str, ...], examples: np.ndarray | None = None,
               window_chunks: int = DEFAULT_SHUFFLE_WINDOW, workers: int = 0, prefetch: int = DEFAULT_PREFETCH,
               rows: np.ndarray | None = None):
    cache.require(("index", "labels", *cache.spec.arrays_of(ROWS, "view"), *fields), "streaming its rows")
    self.cache, self.transfer_set = cache, transfer_set
    self.render = BatchRenderer(transfer_set, cache.spec.augmentation, workers=workers, prefetch=prefetch)
    self.batch_size, self.seed, self.fields, self.window_chunks = batch_size, seed, fields, window_chunks
    self.rows = rows
    self._keep = None
    if examples is not None:
      self._keep = np.zeros(transfer_set.base_count, bool)
      self._keep[examples] = True
    self.num_rows = self._count_rows()

  def _count_rows(self) -> int:
    if self._keep is None:
      return self.cache.spec.num_rows
    return sum(int(self._keep[self.cache.read_chunk(chunk, ("index",))["index"]].sum())
               for chunk in range(self.cache.spec.num_chunks))

  @property
  def steps_per_epoch(self) -> int:
    return math.ceil(self.num_rows / self.batch_size)

  def _windows(self, order: np.ndarray) -> Iterator[dict]:
    names = ("index", "labels", *self.cache.spec.augmentation.param_names, *self.fields)
    for start in range(0, len(order), self.window_chunks):
      window = {}
      for chunk in order[start:start + self.window_chunks]:
        rows = self.cache.read_chunk(int(chunk), names)
        if self._keep is not None:
          rows = _take(rows, self._keep[rows["index"]])
        window = _concat(window, rows)
      window["position"] = self.transfer_set.positions(window["index"])
      yield window

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """The batches of one epoch (rendered ahead, see `shared.workers`), from batch `start_step` on: the batches
    before it are drawn, so the rest are those of the whole epoch, but not rendered."""
    rng = _epoch_rng(self.seed, epoch)
    order = rng.permutation(self.cache.spec.num_chunks)  # Block-level shuffle.
    batches = itertools.islice(_batches(self._windows(order), self.batch_size, rng), start_step, None)
    return self.render(_part(batches, self.rows))

  def close(self) -> None:
    """Stops the input workers."""
    self.render.close()


class ArrayLoader:
  """Examples of a dataset with hard labels, each epoch one (optionally augmented) view of every example.

  With `augment`, epoch e shows every example in view e + 1 of `augmentation` (a fresh view per epoch, replayable
  from (seed, index, view)); without, view 0: the stored inputs, or their centre crops with crop views.
  """

  def __init__(self, transfer_set: TransferSet, *, batch_size: int, seed: int, augmentation: Augmentation,
               augment: bool = False, examples: np.ndarray | None = None, workers: int = 0,
               prefetch: int = DEFAULT_PREFETCH, rows: np.ndarray | None = None):
    self.transfer_set, self.batch_size, self.seed, self.rows = transfer_set, batch_size, seed, rows
    self.render = BatchRenderer(transfer_set, augmentation, workers=workers, prefetch=prefetch)
    self.augmentation, self.augment = augmentation, augment
    self.indices = transfer_set.indices if examples is None else np.sort(np.asarray(examples, np.int64))
    self.num_rows = len(self.indices)

  @property
  def steps_per_epoch(self) -> int:
    return math.ceil(self.num_rows / self.batch_size)

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """The batches of one epoch from batch `start_step` on (see `CacheLoader.epoch`)."""
    rng = _epoch_rng(self.seed, epoch)
    count = len(self.indices)
    window = {"index": self.indices, "position": self.transfer_set.positions(self.indices),
              "view": np.full(count, epoch + 1 if self.augment else 0, np.int32)}
    batches = itertools.islice(_batches(iter([window]), self.batch_size, rng), start_step, None)
    rendered = self.render(_part(batches, self.rows))
    drawn = ("view", *self.augmentation.param_names)  # What the step does not read.
    return ({k: v for k, v in batch.items() if k not in drawn} for batch in rendered)

  def close(self) -> None:
    """Stops the input workers."""
    self.render.close()
