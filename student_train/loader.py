"""Batch streams for training: rows of a cache (streamed chunk by chunk) or the examples of a dataset.

Both yield the same batches: `x` (the rendered view, stored dtype), `labels` int32, `mask` float32 (0 for the
padding of an epoch's last batch, so every batch has one shape and the step compiles once), `index`, and from a
cache `targets` or `member_logits`. Every row is seen exactly once per epoch, in an order that depends only on
the seed and the epoch.

The cache loader never holds the cache in memory: each epoch reads whole chunks in a shuffled order (a per-row
read is far slower) and shuffles rows across a window of chunks in memory, in a background thread; the inputs are
decoded and rendered in worker processes (`shared.workers`), so reading and rendering overlap the device's step.
Chunk reads run ahead of use, several at once and on into the next epoch's first chunks, so that the latency of an
object store (tens of milliseconds a request) is hidden behind the step.
In a job of several processes every process draws the same batches (the order is a function of seed and epoch) and
renders only its rows of each (`rows`), which its devices hold.
Batches are close to uniform samples of the rows because the build stores the examples in a seeded permuted order
(`CacheSpec.row_sources`): every chunk is already a uniform sample, even of a dataset sorted by class. A chunk holds
an example's V views in adjacent rows (the grouped order); shuffling the rows of a window of chunks spreads them over
its batches, so that batches hold nearly as many distinct classes as uniform samples of the rows do
(`bench/shuffle_quality.py`).
"""

import collections
import concurrent.futures
import itertools
import math
import threading
from collections.abc import Callable, Iterator

import numpy as np

from shared.augment import DEVICE, Augmentation
from shared.cache import ROWS, Cache
from shared.data import TransferSet
from shared.parallel import pad_rows
from shared.workers import DEFAULT_PREFETCH, BatchRenderer
from student_train.config import DEFAULT_SHUFFLE_WINDOW

READ_AHEAD_BYTES = 256 << 20  # Chunk reads in flight hold at most about this much (and 2 to 8 chunks).


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
  return np.random.default_rng([seed, epoch])


def _concat(a: dict, b: dict) -> dict:
  return {k: np.concatenate([a[k], b[k]]) for k in b} if a else b


def _concat_all(parts) -> dict:
  """The rows of several chunks as one dict; {} for none."""
  window: dict = {}
  for part in parts:
    window = _concat(window, part)
  return window


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
    epochs: the run's epochs, if known: chunk reads never run ahead past the last one.
  """

  def __init__(self, cache: Cache, transfer_set: TransferSet, *, batch_size: int, seed: int,
               fields: tuple[str, ...], examples: np.ndarray | None = None,
               window_chunks: int = DEFAULT_SHUFFLE_WINDOW, workers: int = 0, prefetch: int = DEFAULT_PREFETCH,
               rows: np.ndarray | None = None, epochs: int | None = None):
    cache.require(("index", "labels", *cache.spec.arrays_of(ROWS, "view"), *fields), "streaming its rows")
    self.cache, self.transfer_set = cache, transfer_set
    self.render = BatchRenderer(transfer_set, cache.spec.augmentation, workers=workers, prefetch=prefetch)
    self.batch_size, self.seed, self.fields, self.window_chunks = batch_size, seed, fields, window_chunks
    self.rows = rows
    self._keep = None
    if examples is not None:
      self._keep = np.zeros(transfer_set.base_count, bool)
      self._keep[examples] = True
    self._names = ("index", "labels", *cache.spec.augmentation.param_names, *fields)
    row_bytes = sum(a.row_bytes for a in cache.spec.arrays if a.name in self._names)
    self._ahead_chunks = int(np.clip(READ_AHEAD_BYTES // max(1, row_bytes * cache.spec.chunk_rows), 2, 8))
    self._pool = concurrent.futures.ThreadPoolExecutor(self._ahead_chunks, thread_name_prefix="cache-read")
    self._reads: collections.deque = collections.deque()  # ((epoch, position in its order), future), in order.
    self._lock = threading.Lock()  # `_reads` is used by the renderer's thread and, to close, by the main thread.
    self._last_epoch = None if epochs is None else epochs - 1
    self._closed = False
    self._orders: dict[int, np.ndarray] = {}
    self.num_rows = self._count_rows()

  def _count_rows(self) -> int:
    if self._keep is None:
      return self.cache.spec.num_rows
    indices = self._pool.map(lambda chunk: self.cache.read_chunk(chunk, ("index",))["index"],
                             range(self.cache.spec.num_chunks))
    return sum(int(self._keep[index].sum()) for index in indices)

  def _draws(self, epoch: int) -> tuple[np.ndarray, np.random.Generator]:
    """The epoch's chunk order (a block-level shuffle), the first draw of its generator, and the generator, which
    `epoch` then shuffles rows with."""
    rng = _epoch_rng(self.seed, epoch)
    return rng.permutation(self.cache.spec.num_chunks), rng

  def _order(self, epoch: int) -> np.ndarray:
    """The epoch's chunk order (see `_draws`), kept for this epoch and the previous one."""
    if epoch not in self._orders:
      self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
      self._orders[epoch] = self._draws(epoch)[0]
    return self._orders[epoch]

  def _read(self, chunk: int) -> dict:
    rows = self.cache.read_chunk(chunk, self._names)
    return rows if self._keep is None else _take(rows, self._keep[rows["index"]])

  def _chunks(self, epoch: int) -> Iterator[dict]:
    """The rows of each chunk of the epoch, in its order, read `_ahead_chunks` ahead: the reads of one epoch's
    last chunks overlap those of the next epoch's first, which the next call finds done."""
    self.read_ahead(epoch)
    for _ in range(self.cache.spec.num_chunks):
      with self._lock:
        self._read_ahead(epoch)
        _, read = self._reads.popleft()
      yield read.result()

  def read_ahead(self, epoch: int) -> None:
    """Starts reading the first chunks of `epoch` (the one training starts with), so that they arrive while the
    trainer sets up; `epoch` finds them."""
    with self._lock:
      if not self._reads or self._reads[0][0] != (epoch, 0):  # Reads of another epoch (a resume, an early stop).
        self._cancel_reads()
      self._read_ahead(epoch)

  def _read_ahead(self, epoch: int) -> None:
    """Tops the reads in flight up to `_ahead_chunks`, in order, on into `epoch + 1` but not beyond it or the last
    epoch (call it holding `_lock`; after `close`, it reads nothing)."""
    count = self.cache.spec.num_chunks
    while len(self._reads) < self._ahead_chunks and not self._closed:
      last = self._reads[-1][0] if self._reads else (epoch, -1)
      next_epoch, position = divmod(last[0] * count + last[1] + 1, count)
      if next_epoch > epoch + 1 or (self._last_epoch is not None and next_epoch > max(epoch, self._last_epoch)):
        return
      self._reads.append(((next_epoch, position),
                          self._pool.submit(self._read, int(self._order(next_epoch)[position]))))

  def _cancel_reads(self) -> None:
    while self._reads:
      self._reads.popleft()[1].cancel()

  @property
  def steps_per_epoch(self) -> int:
    return math.ceil(self.num_rows / self.batch_size)

  def _windows(self, epoch: int) -> Iterator[dict]:
    chunks = self._chunks(epoch)
    while window := _concat_all(itertools.islice(chunks, self.window_chunks)):
      window["position"] = self.transfer_set.positions(window["index"])
      yield window

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """The batches of one epoch (rendered ahead, see `shared.workers`), from batch `start_step` on: the batches
    before it are drawn, so the rest are those of the whole epoch, but not rendered."""
    _, rng = self._draws(epoch)  # The chunks come in `_order(epoch)`, read ahead.
    batches = itertools.islice(_batches(self._windows(epoch), self.batch_size, rng), start_step, None)
    return self.render(_part(batches, self.rows))

  def close(self) -> None:
    """Stops the input workers and the chunk reads."""
    self.render.close()
    with self._lock:
      self._closed = True
      self._cancel_reads()
    self._pool.shutdown(wait=True, cancel_futures=True)


class ArrayLoader:
  """Examples of a dataset with hard labels, each epoch one (optionally augmented) view of every example.

  With `augment`, epoch e shows every example in view e + 1 of `augmentation` (a fresh view per epoch, replayable
  from (seed, index, view)); without, view 0: the stored inputs, or their centre crops with crop views. With a
  `sampler`, epoch e shows the examples `sampler(e)` instead (as many as there are, repeats allowed), e.g. a
  specialist's enriched sampling.
  """

  def __init__(self, transfer_set: TransferSet, *, batch_size: int, seed: int, augmentation: Augmentation,
               augment: bool = False, examples: np.ndarray | None = None, workers: int = 0,
               prefetch: int = DEFAULT_PREFETCH, rows: np.ndarray | None = None,
               sampler: Callable[[int], np.ndarray] | None = None):
    self.transfer_set, self.batch_size, self.seed, self.rows = transfer_set, batch_size, seed, rows
    self.sampler = sampler
    self.render = BatchRenderer(transfer_set, augmentation, workers=workers, prefetch=prefetch)
    self.augmentation, self.augment = augmentation, augment
    self.indices = transfer_set.indices if examples is None else np.sort(np.asarray(examples, np.int64))
    self.num_rows = len(self.indices)

  @property
  def steps_per_epoch(self) -> int:
    return math.ceil(self.num_rows / self.batch_size)

  def read_ahead(self, epoch: int) -> None:
    """Nothing to read ahead: the examples are read as they are rendered (see `CacheLoader.read_ahead`)."""

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """The batches of one epoch from batch `start_step` on (see `CacheLoader.epoch`)."""
    rng = _epoch_rng(self.seed, epoch)
    indices = self.indices if self.sampler is None else self.sampler(epoch)
    window = {"index": indices, "position": self.transfer_set.positions(indices),
              "view": np.full(len(indices), epoch + 1 if self.augment else 0, np.int32)}
    batches = itertools.islice(_batches(iter([window]), self.batch_size, rng), start_step, None)
    rendered = self.render(_part(batches, self.rows))
    # What the step does not read: the view parameters, but for the device renderer's boxes and flips.
    drawn = ("view",) if self.augmentation.renderer == DEVICE else ("view", *self.augmentation.param_names)
    return ({k: v for k, v in batch.items() if k not in drawn} for batch in rendered)

  def close(self) -> None:
    """Stops the input workers."""
    self.render.close()
