"""Multi-process jobs on JAX's multi-controller runtime (`jax.distributed`): one process per host, each with its
own devices, as big_vision and MaxText run.

A job's processes are started alike, each told the coordinator (process 0's host and a port), the process count
and its own index; with `--coordinator auto`, and by default in a multi-task `srun` step, JAX's cluster detection
(`jax.distributed.initialize()`) reads them from the environment instead.
A process that dies is noticed by the others within the heartbeat timeout, and they exit non-zero rather than wait.
"""

import os
import sys

import jax
import numpy as np

from shared.errors import StillroomError

DEFAULT_HEARTBEAT_SECONDS = 60
MESSAGE_BYTES = 1024  # Of a failing process's error, shared with the others.
JOIN_SECONDS = 300  # JAX's default: processes of a cluster job may start minutes apart.
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
  if heartbeat_seconds < 1:
    raise StillroomError(f"--heartbeat-timeout must be >= 1 second, got {heartbeat_seconds}.")
  given = {"--num-processes": num_processes, "--process-id": process_id}
  if coordinator == AUTO:
    if any(v is not None for v in given.values()):
      raise StillroomError(f"--coordinator {AUTO} takes the job from the environment: drop "
                           f"{', '.join(k for k, v in given.items() if v is not None)}.")
    _join(heartbeat_seconds, "JAX's cluster detection (--coordinator auto)")
    return
  if coordinator is None:
    if any(v is not None for v in given.values()):
      raise StillroomError(f"{', '.join(k for k, v in given.items() if v is not None)} needs --coordinator "
                           "HOST:PORT.")
    if _on_a_cluster():
      _join(heartbeat_seconds, f"SLURM_STEP_NUM_TASKS={os.environ['SLURM_STEP_NUM_TASKS']}: one task of a multi-task "
                               "srun step (run a single build outside srun, or with --ntasks 1)")
    return
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise StillroomError(f"--coordinator needs {' and '.join(missing)}.")
  if ":" not in coordinator:
    raise StillroomError(f"--coordinator must be HOST:PORT, got {coordinator!r}.")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise StillroomError(f"--process-id must be in 0..{num_processes - 1} (--num-processes {num_processes}), got "
                         f"{process_id}.")
  if num_processes > 1:
    _join(heartbeat_seconds, f"process {process_id} of {num_processes}, coordinator {coordinator}", coordinator,
          num_processes=num_processes, process_id=process_id)


def _join(heartbeat_seconds: int, how: str, *args, **kwargs) -> None:
  """`jax.distributed.initialize`, with its failures (no job found, no coordinator) as one-line errors. The
  shutdown barrier waits no longer than a heartbeat, so a process that failed does not hold the job for JAX's
  default five minutes."""
  print(f"stillroom: joining a multi-process job ({how}); waiting up to {JOIN_SECONDS} s for every process",
        file=sys.stderr, flush=True)
  try:
    jax.distributed.initialize(*args, heartbeat_timeout_seconds=heartbeat_seconds, initialization_timeout=JOIN_SECONDS,
                               shutdown_timeout_seconds=heartbeat_seconds, **kwargs)
  except (ValueError, RuntimeError) as e:
    raise StillroomError(f"cannot join the multi-process job ({how}): {str(e).splitlines()[0][:300]}; outside a "
                         "cluster, give --coordinator HOST:PORT --num-processes N --process-id I") from e


def is_first() -> bool:
  """Whether this is process 0, the one that writes what the job shares."""
  return jax.process_index() == 0


def agree(failure: BaseException | None) -> None:
  """A barrier that shares failures: every process of the job waits here, then raises if any of them failed before
  it (its own error, or a `StillroomError` naming the first process that failed and its message), so that a job
  stops together with the reason instead of waiting for a process that has left.

  Every process must call it the same number of times, in the same order (it is one collective).
  """
  if jax.process_count() == 1:
    if failure is not None:
      raise failure
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  text = b"" if failure is None else str(failure).encode()[:MESSAGE_BYTES]
  message = np.zeros(MESSAGE_BYTES, np.uint8)
  message[:len(text)] = np.frombuffer(text, np.uint8)
  try:
    failed, messages = multihost_utils.process_allgather((np.array([failure is not None], np.int32), message))
  except Exception as e:  # pylint: disable=broad-except  # The collective's own errors: a peer has gone.
    if failure is not None:
      raise failure from e
    raise StillroomError(f"another process of the job stopped while this one waited for it (killed?): "
                         f"{str(e).splitlines()[0][:200]}") from e
  if failure is not None:
    raise failure
  first_failed = np.flatnonzero(np.asarray(failed).reshape(-1))
  if first_failed.size:
    k = int(first_failed[0])
    raise StillroomError(f"process {k} of the job failed: "
                         f"{bytes(np.asarray(messages)[k]).rstrip(bytes(1)).decode(errors='replace')}")


def job_step(step):
  """Runs `step()` in every process of the job, then waits for all of them: a step that failed in any process
  raises in every process (see `agree`). Returns this process's result."""
  try:
    result = step()
  except Exception as e:  # pylint: disable=broad-except
    agree(e)
    raise
  agree(None)
  return result


def my_share(items: list[int]) -> list[int]:
  """The items this process takes of a list every process holds: every `process_count()`-th, from its index."""
  return [item for item in items if item % jax.process_count() == jax.process_index()]
