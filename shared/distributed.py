"""Multi-process jobs on JAX's multi-controller runtime (`jax.distributed`): one process per host, each with its
own devices, as big_vision and MaxText run.

A job's processes are started alike, each told the coordinator (process 0's host and a port), the process count
and its own index; with `--coordinator auto`, and by default in a multi-task `srun` step, JAX's cluster detection
(`jax.distributed.initialize()`) reads them from the environment instead.
A process that dies is noticed by the others within the heartbeat timeout, and they exit non-zero rather than wait.
"""

import os

import jax

from shared.errors import StillroomError

DEFAULT_HEARTBEAT_SECONDS = 60
AUTO = "auto"
COORDINATOR_HELP = ("HOST:PORT of process 0's coordination service, for a job of several processes (with "
                    "--num-processes and --process-id); 'auto': JAX detects the job (TPU pods, GKE, SLURM); under "
                    "a multi-task `srun` the default")
NUM_PROCESSES_HELP = "processes in the job (with --coordinator)"
PROCESS_ID_HELP = "this process's index, 0..N-1 (with --coordinator); process 0 writes what the job shares"
HEARTBEAT_HELP = "seconds after which the other processes of a job give up on one that stopped answering"


def _on_a_cluster() -> bool:
  """Whether this is one task of a multi-task `srun` step (an allocation's own shell has SLURM_NTASKS too, but is
  a single process)."""
  return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS) -> None:
  """Joins this process to its job, if it is one of several; a no-op for a single process, or when it has joined.

  Must run before anything uses JAX's devices.

  Raises:
    StillroomError: an incomplete or inconsistent set of flags.
  """
  if jax.distributed.is_initialized():
    return
  given = {"--num-processes": num_processes, "--process-id": process_id}
  if coordinator == AUTO:
    if any(v is not None for v in given.values()):
      raise StillroomError(f"--coordinator {AUTO} takes the job from the environment: drop "
                           f"{', '.join(k for k, v in given.items() if v is not None)}.")
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_seconds)
    return
  if coordinator is None:
    if any(v is not None for v in given.values()):
      raise StillroomError(f"{', '.join(k for k, v in given.items() if v is not None)} needs --coordinator "
                           "HOST:PORT.")
    if _on_a_cluster():
      jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_seconds)
    return
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise StillroomError(f"--coordinator needs {' and '.join(missing)}.")
  if ":" not in coordinator:
    raise StillroomError(f"--coordinator must be HOST:PORT, got {coordinator!r}.")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise StillroomError(f"--process-id must be in 0..{num_processes - 1} (--num-processes {num_processes}), got "
                         f"{process_id}.")
  if heartbeat_seconds < 1:
    raise StillroomError(f"--heartbeat-timeout must be >= 1 second, got {heartbeat_seconds}.")
  if num_processes > 1:
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=heartbeat_seconds)


def is_first() -> bool:
  """Whether this is process 0, the one that writes what the job shares."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process of the job has reached the barrier `name` (nothing to wait for alone)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def my_share(items: list[int]) -> list[int]:
  """The items this process takes of a list every process holds: every `process_count()`-th, from its index."""
  return [item for item in items if item % jax.process_count() == jax.process_index()]
