"""Data parallelism over every local device: one mesh axis, "data"."""

import collections
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from shared.errors import StillroomError

DATA_AXIS = "data"


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over this process's devices; batches split along it, parameters replicated. (Without `devices`,
  `jax.make_mesh` takes the job's first devices, which in a multi-process job are another process's.)"""
  return jax.make_mesh((jax.local_device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.local_devices())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """A batch must split evenly over the devices."""
  devices = mesh.devices.size
  if batch_size < 1 or batch_size % devices:
    raise StillroomError(f"batch size {batch_size} must be a positive multiple of the {devices} local devices.")


def cap_batch(batch_size: int, rows: int, devices: int) -> int:
  """The batch size, cut to the rows there are (rounded up to a multiple of the devices): a larger batch would
  only be padding, and memory."""
  return min(batch_size, -(-rows // devices) * devices)


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """Zero rows appended up to `rows`, so a last, short batch keeps the compiled shape."""
  missing = rows - len(array)
  return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)]) if missing > 0 else array


def needs_step_sync(mesh: jax.sharding.Mesh) -> bool:
  """Whether each step must wait for the previous one: only for several CPU devices, where queued collectives
  can deadlock (XLA's CPU all-reduce across fake host devices; "Termination timeout for all reduce"). Real
  accelerators keep asynchronous dispatch, so the host prepares the next batch while a step runs."""
  devices = mesh.devices.flat
  return mesh.devices.size > 1 and next(iter(devices)).platform == "cpu"


def on_devices(batches: Iterator[dict], sharding: NamedSharding, ahead: int = 1) -> Iterator[tuple[dict, dict]]:
  """Places each batch on the devices `ahead` batches before it is used: the next batch's host-to-device copy is
  issued before the current step is dispatched, so it overlaps that step instead of following it.

  Yields:
    `(batch, placed)`: the host batch (for what the host reads of it, such as its row count) and its arrays on the
    devices, without `index` (the host's bookkeeping).
  """
  queued: collections.deque = collections.deque()
  for batch in batches:
    queued.append((batch, jax.device_put({k: v for k, v in batch.items() if k != "index"}, sharding)))
    if len(queued) > ahead:
      yield queued.popleft()
  while queued:
    yield queued.popleft()
