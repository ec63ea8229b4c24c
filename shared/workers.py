"""Rendering inputs in worker processes: reading (decoding) examples and drawing their views, a batch at a time.

Both stages turn rows (an example's position, its index, and its view: an id to draw, or the parameters a cache
stored) into the batch the model sees. For decoded images (JPEG/PNG folders, TFDS image splits) that is the
expensive part of a step, so `BatchRenderer` runs it in spawned worker processes, `prefetch` batches ahead of the
consumer, in order: the batches are the same with any number of workers.

An element sent to a worker is a whole batch (per-row work in a pool costs more than a small step), and only what
rendering needs crosses the process boundary: the rows' teacher arrays stay in the parent. Workers are spawned,
never forked: a fork of a process running JAX's threads can deadlock. Each worker receives the transfer set once,
when it starts.
"""

import collections
import concurrent.futures
import functools
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np

from shared.augment import (CANVAS, CUTMIX, DEVICE, MIX_BOX, MIX_CANVAS, MIX_CROP, MIX_FLIP, MIX_LABELS, MIX_LAMBDA,
                            MIX_PARTNER, MIX_VIEW, MIXUP, Augmentation, mix_images)
from shared.data import TransferSet, label_ids
from shared.errors import StillroomError
from shared.log import logger
from shared.settings import workers_check

MAX_AUTO_WORKERS = 8  # 8 fed a small student fastest on a 16-vCPU host; 15 starved the main process (docs/data.md).
DEFAULT_PREFETCH = 4
ORPHAN_POLL_SECONDS = 1.0


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity, which a cluster's scheduler may restrict)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 2


def resolve_workers(workers: int | None, transfer_set: TransferSet) -> int:
  """The worker count to use: `workers` as given, or for None none when the examples are arrays in memory (rendering
  them is cheaper than sending them to a process) and otherwise one per usable core but one, from 1 to
  `MAX_AUTO_WORKERS` (the parent's core runs the step).

  Raises:
    StillroomError: a count `workers_check` refuses.
  """
  verdict = workers_check(workers)
  if verdict is not True:
    raise StillroomError(f"--workers {verdict}, got {workers}.")
  if workers is None:
    return 0 if transfer_set.in_memory else max(1, min(MAX_AUTO_WORKERS, usable_cores() - 1))
  if workers and transfer_set.in_memory:
    _warn_once(f"--workers {workers} on {transfer_set.name!r}, whose examples are arrays in memory: each worker gets a "
               "copy of them (--workers 0 renders them in the main process).")
  if workers >= usable_cores():
    _warn_once(f"--workers {workers} leaves none of the {usable_cores()} usable cores to the main process, which runs "
               "the steps: expect it to be slower than with fewer.")
  return workers


@functools.cache
def _warn_once(message: str) -> None:
  logger(__name__).warning(message)


def render_rows(transfer_set: TransferSet, augmentation: Augmentation, rows: dict) -> dict:
  """Reads and renders one batch of rows, reading (decoding) each example once however many of its views it holds.

  Args:
    rows: `position` int64 [B] (in `transfer_set`), `index` int64 [B] (example indices), and either `view` int32 [B]
      (view ids: their parameters are drawn) or the stored parameters `augmentation.param_names` of each row. With
      mixed views (`augmentation.mix`), also the rows' `augmentation.mix_names` (drawn by `mix_params` beside
      `view`, or stored); without them the rows are not mixed (view 0, evaluation).

  Returns:
    `x` [B, *augmentation.output_shape]; with `view`, also `labels` int32 [B] (-1 where unlabeled) and the drawn
    parameters. With the device renderer (`augmentation.renderer`), instead of `x` the rows' canvases `canvas`
    uint8 [B, Hc, Wc(, C)] and always their `crop` boxes and `flip`s, which `shared.render` renders on the device.
    Mixed rows: `x` is the mixed view (`mix_images`: float32 for mixup), and the batch holds `mix_lambda` float32
    [B] and the partner's label `mix_labels` int32 [B] (-1 where not mixed); with `view`, also the other mix
    parameters, as given; with the device renderer, the partners' canvases, boxes and flips too (`shared.render`).

  Raises:
    StillroomError: an example cannot be read, or is not the image the stored parameters were drawn for.
  """
  if augmentation.renderer == DEVICE:
    return _canvas_rows(transfer_set, augmentation, rows)
  inputs, labels = read_once(transfer_set.read, rows["position"])
  if "view" in rows:
    x, params = augmentation.render_views(inputs, rows["index"], rows["view"])
    return _mixed(transfer_set, augmentation, rows, {"x": x, "labels": label_ids(labels), **params})
  params = {name: rows[name] for name in augmentation.param_names if name not in augmentation.mix_names}
  if augmentation.kind == "crop":
    _check_boxes(params["crop"], np.array([image.shape[:2] for image in inputs]).reshape(-1, 2), rows["index"])
  return _mixed(transfer_set, augmentation, rows, {"x": augmentation.render(inputs, params)})


def _partners(augmentation: Augmentation, rows: dict) -> tuple[dict, np.ndarray]:
  """The rows' mix parameters, and which rows are mixed (bool [B]: those of a partner view 1..)."""
  mix = {name: np.asarray(rows[name]) for name in augmentation.mix_names}
  return mix, mix[MIX_VIEW] > 0


def _mix_out(rows: dict, mix: dict, partner_labels: np.ndarray, device: bool = False) -> dict:
  """What a mixed batch carries besides its inputs: λ and the partner's label for the hard-label terms, CutMix's box
  where the device mixes (`device`), and the drawn parameters (`view` rows: a build stores them)."""
  kept = (MIX_LAMBDA, MIX_BOX) if device else (MIX_LAMBDA,)
  return {**(mix if "view" in rows else {k: v for k, v in mix.items() if k in kept}), MIX_LABELS: partner_labels}


def _mixed(transfer_set: TransferSet, augmentation: Augmentation, rows: dict, out: dict) -> dict:
  """`out` (host-rendered rows) with each mixed row's view mixed with its partner view: the partner read (one more
  decode of each distinct partner), its view drawn and rendered as any row's, both mixed by `mix_images`."""
  if augmentation.mix_kind not in (MIXUP, CUTMIX) or MIX_PARTNER not in rows:
    return out
  mix, mixed = _partners(augmentation, rows)
  x = out["x"].astype(np.float32) if augmentation.mix_kind == MIXUP else out["x"].copy()
  partner_labels = np.full(len(mixed), -1, np.int32)
  which = np.flatnonzero(mixed)
  if len(which):
    partner, partner_view = mix[MIX_PARTNER][which], mix[MIX_VIEW][which]
    inputs, labels = read_once(transfer_set.read, transfer_set.positions(partner))
    partner_x, _ = augmentation.render_views(inputs, partner, partner_view)
    x[which] = mix_images(x[which], partner_x, mix[MIX_LAMBDA][which],
                          mix[MIX_BOX][which] if augmentation.mix_kind == CUTMIX else None)
    partner_labels[which] = label_ids(labels)
  return {**out, "x": x, **_mix_out(rows, mix, partner_labels)}


def _canvas_rows(transfer_set: TransferSet, augmentation: Augmentation, rows: dict) -> dict:
  """`render_rows` for the device renderer: the rows' canvases, boxes and flips (drawn, or as stored)."""
  canvas, sizes = read_once(transfer_set.read_canvas, rows["position"])
  if "view" in rows:
    params = augmentation.view_params(rows["index"], rows["view"], sizes)
    out = {CANVAS: canvas, "labels": label_ids(transfer_set.labels[np.asarray(rows["position"], np.int64)]),
           **params}
  else:
    params = {name: rows[name] for name in augmentation.param_names if name not in augmentation.mix_names}
    _check_boxes(params["crop"], sizes, rows["index"])
    out = {CANVAS: canvas, **params}
  if augmentation.mix_kind not in (MIXUP, CUTMIX) or MIX_PARTNER not in rows:
    return out
  # Every row carries a partner canvas, box and flip, so that the batch has one shape: an unmixed row its own (with
  # λ 1 and an empty box, mixing gives its view exactly).
  mix, mixed = _partners(augmentation, rows)
  partner_canvas, partner_crop, partner_flip = np.array(canvas), np.array(out["crop"]), np.array(out["flip"])
  partner_labels = np.full(len(mixed), -1, np.int32)
  which = np.flatnonzero(mixed)
  if len(which):
    partner, partner_view = mix[MIX_PARTNER][which], mix[MIX_VIEW][which]
    positions = transfer_set.positions(partner)
    canvases, partner_sizes = read_once(transfer_set.read_canvas, positions)
    drawn = augmentation.view_params(partner, partner_view, partner_sizes)
    partner_canvas[which], partner_crop[which], partner_flip[which] = canvases, drawn["crop"], drawn["flip"]
    partner_labels[which] = label_ids(transfer_set.labels[np.asarray(positions, np.int64)])
  return {**out, MIX_CANVAS: partner_canvas, MIX_CROP: partner_crop, MIX_FLIP: partner_flip,
          **_mix_out(rows, mix, partner_labels, device=True)}


def read_once(read, positions: np.ndarray):
  """`read(positions)` (`TransferSet.read` or `TransferSet.read_canvas`), reading each distinct position once (in
  order of first appearance): rows that are views of one example share its decoded image (or canvas).

  Args:
    read: `positions int64 [n] -> (inputs, labels)`, the inputs an array [n, ...] or a list of n arrays.
    positions: int [B] positions in the transfer set, repeats allowed.

  Returns:
    `(inputs, labels)` (or `(canvases, sizes)`) of every row, [B, ...] each, as `read` returns them.
  """
  positions = np.asarray(positions, np.int64)
  distinct, first, inverse = np.unique(positions, return_index=True, return_inverse=True)
  if len(distinct) == len(positions):
    return read(positions)
  order = np.argsort(first)  # The distinct positions in order of first appearance.
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  inputs, labels = read(positions[first[order]])
  which = rank[inverse.reshape(-1)]
  inputs = inputs[which] if isinstance(inputs, np.ndarray) else [inputs[k] for k in which]
  return inputs, np.asarray(labels)[which]


def _check_boxes(boxes: np.ndarray, sizes: np.ndarray, index: np.ndarray) -> None:
  """A stored crop box must lie inside its image (`sizes` int [B, 2], each (height, width)): one that does not
  means the image changed since the cache was built, in a way the fingerprint's sample did not see.

  Raises:
    StillroomError: naming the example.
  """
  outside = (boxes[:, 0] + boxes[:, 2] > sizes[:, 0]) | (boxes[:, 1] + boxes[:, 3] > sizes[:, 1])
  if outside.any():
    k = int(np.argmax(outside))
    raise StillroomError(f"example index {int(index[k])} is {sizes[k, 0]}x{sizes[k, 1]} pixels, but its cached crop "
                         f"box {boxes[k].tolist()} does not fit in it: the image changed after the cache was built. "
                         "Rebuild the cache (or restore the data).")


_worker_inputs: tuple | None = None  # What `worker_pool` gave this worker (for rendering: set, augmentation).


def _start_worker(*inputs_and_parent) -> None:
  global _worker_inputs  # pylint: disable=global-statement
  *inputs, parent = inputs_and_parent
  _worker_inputs = tuple(inputs)
  # Ctrl-C reaches the whole process group: the parent stops the workers, which should not each print a traceback.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  # A worker holds both ends of its task queue, so it would wait forever for work from a parent that was killed.
  threading.Thread(target=_exit_when_orphaned, args=(parent,), name="orphan-watch", daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(ORPHAN_POLL_SECONDS)
  os._exit(1)


def _ready() -> None:
  """A task that only makes the pool start a worker."""


def _render_in_worker(rows: dict) -> dict:
  return render_rows(*_worker_inputs, rows)


class BatchRenderer:
  """Renders streams of row batches (one stream per epoch), up to `prefetch` batches ahead of the consumer, in order.

  A stream's batches are produced (e.g. chunks read and shuffled) in a background thread; with `workers` > 0 they
  are rendered in that many spawned processes, started here and kept for every stream until `close`, otherwise in
  that thread.

  Args:
    transfer_set: the examples rows refer to.
    augmentation: the views.
    workers: worker processes (0: render in a thread of this process).
    prefetch: batches rendered ahead of the one consumed, besides one being rendered by each worker. Memory holds
      at most `workers + prefetch` batches in the pool, one handed over and one being drawn (and the trainer places
      one more on the devices ahead of its step).
  """

  def __init__(self, transfer_set: TransferSet, augmentation: Augmentation, *, workers: int,
               prefetch: int = DEFAULT_PREFETCH):
    self.transfer_set, self.augmentation = transfer_set, augmentation
    self.workers, self.prefetch = workers, max(1, prefetch)
    self._pool: concurrent.futures.ProcessPoolExecutor | None = None
    if workers > 0:
      # Started now, so that the workers' start (a fraction of a second: spawned interpreters import numpy, PIL, TFDS)
      # overlaps the model's initialisation and compilation instead of delaying the first batch.
      self._pool = worker_pool(workers, transfer_set, augmentation)
      for _ in range(workers):
        _submit(self._pool, _ready)

  def __enter__(self) -> "BatchRenderer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Stops the worker processes (a stream still running fails)."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def __call__(self, batches: Iterator[dict]) -> Iterator[dict]:
    """Renders `batches` (dicts of row arrays with at least the fields `render_rows` reads).

    Yields:
      Each batch without `position` and stored view parameters, with `render_rows`'s output.
    """
    if self.workers <= 0:
      rendered = (self._joined(rows, render_rows(self.transfer_set, self.augmentation, rows)) for rows in batches)
      return _in_thread(rendered, self.prefetch)
    return _in_thread(self._in_processes(batches), 1)

  def _joined(self, rows: dict, rendered: dict) -> dict:
    # Stored view parameters are used up by rendering; drawn ones come back in `rendered`.
    drop = ("position", *self.augmentation.param_names)
    return {**{k: v for k, v in rows.items() if k not in drop}, **rendered}

  def _in_processes(self, batches: Iterator[dict]) -> Iterator[dict]:
    if self._pool is None:
      raise StillroomError("the input workers were stopped (BatchRenderer.close) before this epoch")
    keys = ("position", "index", "view", *self.augmentation.param_names)  # The rest stays in this process.
    # One batch in each worker, `prefetch` done.
    for rows, rendered in map_in_order(self._pool, _render_in_worker, batches, self.workers + self.prefetch,
                                       lambda rows: {k: v for k, v in rows.items() if k in keys}):
      yield self._joined(rows, rendered)


def worker_pool(count: int, *inputs) -> concurrent.futures.ProcessPoolExecutor:
  """`count` spawned worker processes, each given `inputs` once, when it starts (the module global
  `_worker_inputs`, which the function a worker runs reads), and each exiting when this process dies."""
  return concurrent.futures.ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_start_worker, initargs=(*inputs, os.getpid()))


def map_in_order(pool: concurrent.futures.ProcessPoolExecutor, fn, items: Iterator, ahead: int,
                 task=lambda item: item) -> Iterator[tuple]:
  """`(item, fn(task(item)))` for each of `items`, in order, computed in `pool` with at most `ahead` tasks in flight;
  those still in flight are cancelled when the consumer stops.

  Raises:
    StillroomError: a worker died (`WORKER_DIED`).
  """
  pending: collections.deque = collections.deque()
  try:
    for item in items:
      pending.append((item, _submit(pool, fn, task(item))))
      if len(pending) >= ahead:
        item, future = pending.popleft()
        yield item, _result(future)
    while pending:
      item, future = pending.popleft()
      yield item, _result(future)
  finally:
    for _, future in pending:
      future.cancel()


WORKER_DIED = ("an input worker process died (killed, or out of memory?): rerun with fewer --workers, or --workers 0 "
               "to render in the main process. (A script that calls stillroom must do so under "
               "`if __name__ == \"__main__\":`, since each spawned worker imports the script.)")


def _submit(pool: concurrent.futures.ProcessPoolExecutor, fn, *args) -> concurrent.futures.Future:
  try:
    return pool.submit(fn, *args)
  except concurrent.futures.process.BrokenProcessPool as e:
    raise StillroomError(WORKER_DIED) from e


def _result(future: concurrent.futures.Future) -> dict:
  try:
    return future.result()
  except concurrent.futures.process.BrokenProcessPool as e:
    raise StillroomError(WORKER_DIED) from e


def _in_thread(iterator: Iterator, size: int) -> Iterator:
  """Runs `iterator` in a background thread, `size` items ahead; re-raises its errors here."""
  items: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def produce():
    try:
      for item in iterator:
        if stop.is_set():
          break
        items.put(item)
      else:
        items.put(done)
    except BaseException as e:  # pylint: disable=broad-except
      items.put(e)
    finally:
      if stop.is_set() and hasattr(iterator, "close"):
        iterator.close()  # Shuts the worker pool down, from the thread that runs the generator.

  thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
  thread.start()
  try:
    while (item := items.get()) is not done:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    while thread.is_alive():  # Unblock a producer waiting on a full queue.
      try:
        items.get_nowait()
      except queue.Empty:
        thread.join(0.01)
