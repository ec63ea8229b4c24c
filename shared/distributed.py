"""Multi-process jobs on JAX's multi-controller runtime (`jax.distributed`): one process per host, each with its
own devices, as big_vision and MaxText run.

A job's processes are started alike, each told the coordinator (process 0's host and a port), the process count
and its own index; with `--coordinator auto`, and by default in a multi-task `srun` step, JAX's cluster detection
(`jax.distributed.initialize()`) reads them from the environment instead.
A process that dies is noticed by the others within the heartbeat timeout, and they exit non-zero rather than wait.

With `--coordinator HOST:PORT`, the processes first meet in a handshake of their own on that port (before JAX's
coordination service takes it): process 0 waits for one hello from each other index, the others for process 0's
answer, each for at most `--join-timeout` seconds. A process that does not come, an index given twice, or another
`--num-processes` is so one line in every process that waits, where JAX, left to find it, aborts after its
initialization timeout with a C++ stack dump (its failure callback cannot be caught from Python).
"""

import dataclasses
import json
import os
import signal
import socket
import time

import jax
import numpy as np

from shared.errors import StillroomError
from shared.log import logger
from shared.options import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_JOIN_SECONDS
from shared.settings import flag_of, names_where

MESSAGE_CHARS = 1024  # Of a failing process's error, shared with the others.
AUTO = "auto"
HELLO_BYTES = 4096  # A handshake message (one JSON line) is never longer.
RETRY_SECONDS = 0.5  # Between a process's attempts to reach process 0 while it has not started yet.


def _on_a_cluster() -> bool:
  """Whether this is one task of a multi-task `srun` step (an allocation's own shell has SLURM_NTASKS too, but is
  a single process)."""
  return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS, join_seconds: int = DEFAULT_JOIN_SECONDS) -> None:
  """Joins this process to its job, if it is one of several; a no-op for a single process, or when it has joined.

  Must run before anything uses JAX's devices.

  Raises:
    StillroomError: an incomplete or inconsistent set of flags; with --coordinator HOST:PORT, a job that is not
      complete within `join_seconds` (a process missing), an index given to two processes, or processes started
      with different --num-processes (see `_handshake`).
  """
  if jax.distributed.is_initialized():
    return
  if heartbeat_seconds < 1:
    raise StillroomError(f"--heartbeat-timeout must be >= 1 second, got {heartbeat_seconds}.")
  if join_seconds < 1:
    raise StillroomError(f"--join-timeout must be >= 1 second, got {join_seconds}.")
  join = lambda how, *args, **kwargs: _join(heartbeat_seconds, join_seconds, how, *args, **kwargs)  # noqa: E731
  given = {"--num-processes": num_processes, "--process-id": process_id}
  if coordinator == AUTO:
    if any(v is not None for v in given.values()):
      raise StillroomError(f"--coordinator {AUTO} takes the job from the environment: drop "
                           f"{', '.join(k for k, v in given.items() if v is not None)}.")
    join("JAX's cluster detection (--coordinator auto)")
    return
  if coordinator is None:
    if any(v is not None for v in given.values()):
      raise StillroomError(f"{', '.join(k for k, v in given.items() if v is not None)} needs --coordinator "
                           "HOST:PORT.")
    if _on_a_cluster():
      join(f"SLURM_STEP_NUM_TASKS={os.environ['SLURM_STEP_NUM_TASKS']}: one task of a multi-task srun step (run a "
           "single build outside srun, or with --ntasks 1)")
    return
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise StillroomError(f"--coordinator needs {' and '.join(missing)}.")
  host, _, port = coordinator.rpartition(":")
  if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
    raise StillroomError(f"--coordinator must be HOST:PORT (a port in 1..65535), got {coordinator!r}.")
  if num_processes < 1:
    raise StillroomError(f"--num-processes must be >= 1, got {num_processes}.")
  if not 0 <= process_id < num_processes:
    raise StillroomError(f"--process-id must be in 0..{num_processes - 1} (--num-processes {num_processes}), got "
                         f"{process_id}.")
  if num_processes > 1:
    how = f"process {process_id} of {num_processes}, coordinator {coordinator}"
    _handshake(host, int(port), num_processes, process_id, join_seconds, how)
    join(how, coordinator, num_processes=num_processes, process_id=process_id)


def one_process_only(command: str) -> None:
  """Refuses to run `command`, which runs as one process, as one task of a multi-task `srun` step (each task would
  run it whole, writing the same outputs; its builds would join a job).

  Raises:
    StillroomError: saying how to start it.
  """
  if _on_a_cluster():
    raise StillroomError(f"{command} runs as one process, but this is one of the {os.environ['SLURM_STEP_NUM_TASKS']} "
                         "tasks of an srun step: start it with `srun --ntasks 1`, or outside srun.")


def _handshake(host: str, port: int, num_processes: int, process_id: int, join_seconds: int, how: str) -> None:
  """The processes of a job meet on the coordinator's port before JAX does: process 0 listens there and takes one
  hello (a JSON line: index, process count, host) from each of the other indices, then answers each, "ok" or the
  job's error, and closes the port for JAX's service; every other process connects (again and again until process 0
  listens) and waits for its answer. Each waits at most `join_seconds` in all.

  Raises:
    StillroomError: in process 0, a process missing after `join_seconds` (naming the indices that did not come), an
      index that came twice, a hello of another process count (the same error is every waiting process's answer);
      in another process, that answer, or no answer within `join_seconds`.
  """
  deadline = time.monotonic() + join_seconds
  logger(__name__).info(f"joining a multi-process job ({how}); waiting up to {join_seconds} s for every process")
  if process_id == 0:
    _gather_hellos(port, num_processes, deadline, join_seconds)
  else:
    _say_hello(host, port, {"process_id": process_id, "num_processes": num_processes, "host": socket.gethostname()},
               deadline, join_seconds)


def _gather_hellos(port: int, num_processes: int, deadline: float, join_seconds: int) -> None:
  """Process 0's side of `_handshake`."""
  try:
    server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
        if socket.has_dualstack_ipv6() else socket.create_server(("", port))
  except OSError as e:
    raise StillroomError(f"process 0 cannot listen on port {port} ({os.strerror(e.errno) if e.errno else e}): another "
                         "program holds it (is another process started with --process-id 0?); give --coordinator "
                         "another port.") from e
  seen: dict[int, str] = {}  # Index -> where its hello came from.
  connections: list[socket.socket] = []  # Each waits for the answer.
  problem = None
  with server:
    while problem is None and len(seen) < num_processes - 1:
      left = deadline - time.monotonic()
      if left <= 0:
        missing = [k for k in range(1, num_processes) if k not in seen]
        problem = (f"process(es) {', '.join(map(str, missing))} of {num_processes} did not join within "
                   f"{join_seconds} s: start every --process-id 0..{num_processes - 1} with the same --coordinator "
                   "(or raise --join-timeout)")
        break
      server.settimeout(left)
      try:
        connection, (address, *_) = server.accept()
      except TimeoutError:
        continue
      hello = _receive(connection, min(left, 10.0))
      if not isinstance(hello, dict) or not isinstance(hello.get("process_id"), int):
        connection.close()  # Not one of the job's processes (a port scanner, a stray client): ignored.
        continue
      connections.append(connection)
      k, where = hello["process_id"], f"{hello.get('host')} ({address.removeprefix('::ffff:')})"
      if hello.get("num_processes") != num_processes:
        problem = (f"process {k} on {where} was started with --num-processes {hello.get('num_processes')}, process 0 "
                   f"with {num_processes}: start every process with the same flags")
      elif k in seen:
        problem = (f"--process-id {k} was given to two processes (on {seen[k]} and {where}): give each process of "
                   f"the job its own index in 0..{num_processes - 1}")
      seen[k] = where
  answer = json.dumps({"ok": True} if problem is None else {"error": problem}).encode() + b"\n"
  for connection in connections:
    try:
      connection.sendall(answer)
    except OSError:
      pass  # That process has gone; JAX's join, or its absence, shows it.
    finally:
      connection.close()
  if problem is not None:
    raise StillroomError(f"cannot start the multi-process job: {problem}.")


def _say_hello(host: str, port: int, hello: dict, deadline: float, join_seconds: int) -> None:
  """The side of `_handshake` of a process other than 0."""
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      raise StillroomError(f"cannot join the multi-process job: process 0 at {host}:{port} did not take this process "
                           f"(--process-id {hello['process_id']}) in within {join_seconds} s. Is process 0 running, "
                           "with the same --coordinator, and is this index not taken by another process (each "
                           f"process needs its own --process-id in 0..{hello['num_processes'] - 1})?")
    try:
      with socket.create_connection((host, port), timeout=min(left, 10.0)) as connection:
        connection.sendall(json.dumps(hello).encode() + b"\n")
        answer = _receive(connection, deadline - time.monotonic())
    except OSError:  # Process 0 has not started listening yet (or no longer listens): try again.
      answer = None
    if isinstance(answer, dict) and answer.get("ok"):
      return
    if isinstance(answer, dict) and "error" in answer:
      raise StillroomError(f"cannot start the multi-process job: {answer['error']}.")
    time.sleep(min(RETRY_SECONDS, max(0.0, deadline - time.monotonic())))


def _receive(connection: socket.socket, seconds: float):
  """One JSON line from `connection` within `seconds`, or None (timed out, closed, not JSON)."""
  data = b""
  end = time.monotonic() + max(seconds, 0.0)
  try:
    while b"\n" not in data and len(data) < HELLO_BYTES:
      left = end - time.monotonic()
      if left <= 0:
        return None
      connection.settimeout(left)
      chunk = connection.recv(HELLO_BYTES)
      if not chunk:
        return None
      data += chunk
    return json.loads(data.split(b"\n", 1)[0])
  except (OSError, ValueError):
    return None


def _join(heartbeat_seconds: int, join_seconds: int, how: str, *args, **kwargs) -> None:
  """`jax.distributed.initialize`, with its failures (no job found, no coordinator) as one-line errors. The
  shutdown barrier waits no longer than a heartbeat, so a process that failed does not hold the job for JAX's
  default five minutes."""
  if not args:  # A job JAX detects: no handshake (see `_handshake`) said so.
    logger(__name__).info(f"joining a multi-process job ({how}); waiting up to {join_seconds} s for every process")
  # While JAX waits in C++ for the others, Python's Ctrl-C handler cannot run: let Ctrl-C end the process at once.
  interrupt = signal.signal(signal.SIGINT, signal.SIG_DFL)
  try:
    jax.distributed.initialize(*args, heartbeat_timeout_seconds=heartbeat_seconds, initialization_timeout=join_seconds,
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
