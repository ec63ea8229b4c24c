"""Multi-process jobs on JAX's multi-controller runtime (`jax.distributed`): one process per host, each with its
own devices, as big_vision and MaxText run.

A job's processes are started alike, each told the coordinator (process 0's host and a port), the process count
and its own index; with `--coordinator auto`, and by default in a multi-task `srun` step, JAX's cluster detection
(`jax.distributed.initialize()`) reads them from the environment instead.
A process that dies is noticed by the others within the heartbeat timeout, and they exit non-zero rather than wait.
"""

import dataclasses
import json
import os
import signal

import jax
import numpy as np

from shared.errors import StillroomError
from shared.log import logger
from shared.options import DEFAULT_HEARTBEAT_SECONDS
from shared.settings import flag_of, names_where

MESSAGE_CHARS = 1024  # Of a failing process's error, shared with the others.
JOIN_SECONDS = 300  # JAX's default: processes of a cluster job may start minutes apart.
AUTO = "auto"


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
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise StillroomError(f"--coordinator must be HOST:PORT (a port in 1..65535), got {coordinator!r}.")
  if num_processes < 1:
    raise StillroomError(f"--num-processes must be >= 1, got {num_processes}.")
  if not 0 <= process_id < num_processes:
    raise StillroomError(f"--process-id must be in 0..{num_processes - 1} (--num-processes {num_processes}), got "
                         f"{process_id}.")
  if num_processes > 1:
    _join(heartbeat_seconds, f"process {process_id} of {num_processes}, coordinator {coordinator}", coordinator,
          num_processes=num_processes, process_id=process_id)


def one_process_only(command: str) -> None:
  """Refuses to run `command`, which runs as one process, as one task of a multi-task `srun` step (each task would
  run it whole, writing the same outputs; its builds would join a job).

  Raises:
    StillroomError: saying how to start it.
  """
  if _on_a_cluster():
    raise StillroomError(f"{command} runs as one process, but this is one of the {os.environ['SLURM_STEP_NUM_TASKS']} "
                         "tasks of an srun step: start it with `srun --ntasks 1`, or outside srun.")


def _join(heartbeat_seconds: int, how: str, *args, **kwargs) -> None:
  """`jax.distributed.initialize`, with its failures (no job found, no coordinator) as one-line errors. The
  shutdown barrier waits no longer than a heartbeat, so a process that failed does not hold the job for JAX's
  default five minutes."""
  logger(__name__).info(f"joining a multi-process job ({how}); waiting up to {JOIN_SECONDS} s for every process")
  # While JAX waits in C++ for the others, Python's Ctrl-C handler cannot run: let Ctrl-C end the process at once.
  interrupt = signal.signal(signal.SIGINT, signal.SIG_DFL)
  try:
    jax.distributed.initialize(*args, heartbeat_timeout_seconds=heartbeat_seconds, initialization_timeout=JOIN_SECONDS,
                               shutdown_timeout_seconds=heartbeat_seconds, **kwargs)
  except (ValueError, RuntimeError) as e:
    raise StillroomError(f"cannot join the multi-process job ({how}): {str(e).splitlines()[0][:300]}; outside a "
                         "cluster, give --coordinator HOST:PORT --num-processes N --process-id I") from e
  finally:
    signal.signal(signal.SIGINT, interrupt)
  # JAX's preemption notifier takes SIGTERM for its preemption sync, which stillroom does not use: the process
  # would ignore `scancel` and `kill`. SIGTERM ends it at once (a single process instead unwinds, releasing its
  # lock, but a Python handler cannot run while JAX waits in a collective); the others notice within their
  # heartbeat timeout, and the same command resumes.
  signal.signal(signal.SIGTERM, signal.SIG_DFL)


def is_first() -> bool:
  """Whether this is process 0, the one that writes what the job shares."""
  return jax.process_index() == 0


def _peer_gone(e: Exception) -> StillroomError:
  return StillroomError(f"another process of the job stopped while this one waited for it (killed?): "
                        f"{str(e).splitlines()[0][:200]}")


def _gather(value) -> list:
  """Every process's JSON-able `value`, in process order (a collective: every process must call it, in the same
  order)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = json.dumps(value, sort_keys=True).encode()
  try:
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64))).reshape(-1)
    buffer = np.zeros(int(sizes.max()), np.uint8)
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(len(sizes), -1)
  except Exception as e:  # pylint: disable=broad-except  # The collective's own errors: a peer has gone.
    raise _peer_gone(e) from e
  return [json.loads(bytes(row[:size])) for row, size in zip(gathered, sizes)]


def from_process_0(value):
  """Process 0's JSON-able `value`, in every process: a decision every process must take alike (what to resume,
  what has finished), made from what process 0 sees, since another host may see a shared file system late."""
  return value if jax.process_count() == 1 else _gather(value if is_first() else None)[0]


def check_same_settings(config) -> None:
  """Refuses a job whose processes were started with different settings (all but those of scope "process": who each
  is, what it shows, how many input workers it runs, where its host keeps the TFDS data): they would
  compute different things, or call collectives at different times.

  Raises:
    StillroomError: in every process, naming the first process that differs from process 0 and its flags.
  """
  if jax.process_count() == 1:
    return
  per_process = names_where(config, scope="process")
  settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in per_process}
  every = _gather(settings)
  for k, other in enumerate(every[1:], start=1):
    differing = [name for name in sorted(other) if other[name] != every[0].get(name)]
    if differing:
      raise StillroomError(f"process {k} of the job was started with other settings than process 0: "
                           + "; ".join(f"{flag_of(name)} {other[name]} vs {every[0].get(name)}" for name in differing)
                           + ". Start every process of the job with the same flags.")


def agree(failure: BaseException | None) -> None:
  """A barrier that shares failures: every process of the job waits here, then raises if any of them failed before
  it (its own error, or a `StillroomError` naming the first process that failed and its message), so that a job
  stops together with the reason instead of waiting for a process that has left.

  Every process must call it the same number of times, in the same order (it is a collective).
  """
  if jax.process_count() == 1:
    if failure is not None:
      raise failure
    return
  try:
    messages = _gather(None if failure is None else str(failure)[:MESSAGE_CHARS])
  except StillroomError as gone:  # A peer has gone: this process's own failure, if any, is the one to report.
    if failure is not None:
      raise failure from gone
    raise
  if failure is not None:
    raise failure
  failed = next((k for k, message in enumerate(messages) if message is not None), None)
  if failed is not None:
    raise StillroomError(f"process {failed} of the job failed: {messages[failed]}")


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


def first_then_others(step, others=None):
  """Runs `step()` in process 0 and, once it has finished, `others()` (default: `step()`) in the other processes,
  a failure anywhere raising everywhere: for a step that makes what the others then read or check (a store, a run
  dir, a dataset prepared in a shared data dir). Returns this process's result."""
  made = job_step(lambda: step() if is_first() else None)
  return job_step(lambda: made if is_first() else (others or step)())


def my_share(items: list[int]) -> list[int]:
  """The items this process takes of a list every process holds: every `process_count()`-th, from its index."""
  return [item for item in items if item % jax.process_count() == jax.process_index()]
