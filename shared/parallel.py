"""Data parallelism: one mesh axis, "data", over this process's devices (a cache build) or every device of the job
(training). Batches are split along it; weights are replicated on every device of it, or (FSDP, ZeRO-3 style) each
split along one of its own axes over the same devices, which XLA all-gathers inside the jitted computation."""

import collections
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from shared.errors import StillroomError

DATA_AXIS = "data"
REPLICATED, FSDP = "replicated", "fsdp"
SHARDINGS = (REPLICATED, FSDP)  # How weights lie on the mesh: whole on every device, or split over them.


def data_mesh(job_wide: bool = False) -> jax.sharding.Mesh:
  """A 1-D mesh, batches split along it and parameters replicated: over this process's devices, or with `job_wide`
  over every device of a multi-process job (the same for a single process).

  (Without `devices`, `jax.make_mesh` takes the job's first devices, which in a multi-process job are another
  process's.)
  """
  devices = jax.devices() if job_wide else jax.local_devices()
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """A batch must split evenly over the devices."""
  devices = mesh.devices.size
  if batch_size < 1 or batch_size % devices:
    whose = "of the job" if devices > jax.local_device_count() else "of this process"
    raise StillroomError(f"batch size {batch_size} must be a positive multiple of the {devices} devices {whose}.")


def cap_batch(batch_size: int, rows: int, devices: int) -> int:
  """The batch size, cut to the rows there are (rounded up to a multiple of the devices): a larger batch would
  only be padding, and memory."""
  return min(batch_size, -(-rows // devices) * devices)


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """Zero rows appended up to `rows`, so a last, short batch keeps the compiled shape."""
  missing = rows - len(array)
  return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)]) if missing > 0 else array


def process_rows(mesh: jax.sharding.Mesh, batch_size: int) -> np.ndarray | None:
  """The rows of every batch of `batch_size` that this process's devices hold, in increasing order (the order in
  which `jax.make_array_from_process_local_data` places a process's rows, also where a mesh interleaves processes):
  what it reads and renders of each batch in a multi-process job. None when it holds them all (a single process)."""
  if jax.process_count() == 1:
    return None
  held = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  return np.unique(np.concatenate([np.arange(batch_size)[index[0]] for index in held.values()]))


def _is_key(leaf) -> bool:
  return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def fsdp_spec(shape: tuple[int, ...], devices: int, group_axes: int = 0) -> PartitionSpec:
  """The FSDP rule for one weight array: its longest axis whose length is a multiple of `devices` (the last of
  equal ones) is split over `DATA_AXIS`; an array without one is replicated.

  Args:
    shape: the array's shape.
    devices: the mesh's device count.
    group_axes: leading axes never split: the K axis of students stacked for one vmapped step.

  Returns:
    e.g. `P(None, "data")` for a kernel [64, 256] on 4 devices, `P()` for a bias [10].
  """
  fits = [axis for axis in range(group_axes, len(shape)) if shape[axis] and shape[axis] % devices == 0]
  if not fits:
    return PartitionSpec()
  axis = max(fits, key=lambda a: (shape[a], a))
  return PartitionSpec(*([None] * axis), DATA_AXIS)


def weight_shardings(tree, mesh: jax.sharding.Mesh, sharding: str, group_axes: int = 0):
  """A `NamedSharding` for each array of `tree` (a pytree of arrays or `jax.ShapeDtypeStruct`s, same structure):
  replicated, or with `sharding` FSDP each by `fsdp_spec` (PRNG keys and scalars stay replicated)."""
  if sharding not in SHARDINGS:
    raise ValueError(f"sharding {sharding!r}: not one of {SHARDINGS}")
  devices = mesh.devices.size

  def of(leaf):
    if sharding == REPLICATED or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), devices, group_axes))
  return jax.tree.map(of, tree)


def put_sharded(tree, shardings):
  """`tree`'s arrays placed with `shardings` (a tree of `NamedSharding`s of the same structure, or one for every
  array), from host arrays or arrays on any devices.

  On a mesh over every process's devices, every process must call it, in the same order, with the same values (JAX
  checks that they are equal, a collective), and each places its own devices' parts from its host copy of an array
  of its own devices (JAX would send a committed one from its device to every process's instead). An array already
  on the mesh's devices is moved there. `device_put` takes no typed PRNG key arrays onto devices of other
  processes, so those go as their key data."""
  def put(leaf, sharding):
    if _is_key(leaf):
      return jax.random.wrap_key_data(put(jax.random.key_data(leaf), sharding), impl=jax.random.key_impl(leaf))
    if not sharding.is_fully_addressable and isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
      leaf = np.asarray(leaf)
    return jax.device_put(leaf, sharding)
  if isinstance(shardings, NamedSharding):
    return jax.tree.map(lambda leaf: put(leaf, shardings), tree)
  return jax.tree.map(put, tree, shardings)


def put_replicated(tree, mesh: jax.sharding.Mesh):
  """`tree`'s arrays on every device of the mesh (`put_sharded`)."""
  return put_sharded(tree, replicated(mesh))


def bytes_per_device(tree) -> tuple[int, int]:
  """`(bytes of tree's arrays, bytes the most loaded device of this process holds of them)`: what sharding saves."""
  whole, held = 0, collections.Counter()
  for leaf in jax.tree.leaves(tree):
    whole += leaf.nbytes
    for shard in leaf.addressable_shards:
      held[shard.device] += shard.data.nbytes
  return whole, max(held.values(), default=0)


def needs_step_sync(mesh: jax.sharding.Mesh) -> bool:
  """Whether each step must wait for the previous one: only for several CPU devices, where queued collectives
  can deadlock (XLA's CPU all-reduce across fake host devices; "Termination timeout for all reduce"). Real
  accelerators keep asynchronous dispatch, so the host prepares the next batch while a step runs."""
  devices = mesh.devices.flat
  return mesh.devices.size > 1 and next(iter(devices)).platform == "cpu"


def on_devices(batches: Iterator[dict], sharding: NamedSharding, ahead: int = 1) -> Iterator[tuple[dict, dict]]:
  """Places each batch on the devices `ahead` batches before it is used: the next batch's host-to-device copy is
  issued before the current step is dispatched, so it overlaps that step instead of following it.

  Args:
    batches: this process's rows of each batch (`process_rows`), which it places on its own devices; the global
      batch is every process's rows (`jax.make_array_from_process_local_data`).

  Yields:
    `(batch, placed)`: the host batch (for what the host reads of it) and its arrays on the devices, without
    `index` (the host's bookkeeping).
  """
  queued: collections.deque = collections.deque()
  for batch in batches:
    queued.append((batch, jax.make_array_from_process_local_data(
        sharding, {k: v for k, v in batch.items() if k != "index"})))
    if len(queued) > ahead:
      yield queued.popleft()
  while queued:
    yield queued.popleft()
