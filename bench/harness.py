"""A tiny timing harness shared by the benchmarks: warm-up, several repeats, the median."""

import json
import os
import platform
import statistics
import time
from collections.abc import Callable


def measure(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> dict:
  """Runs `fn` `warmup` times untimed, then `repeats` times; returns seconds {"median", "min", "all"}."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return {"median": statistics.median(times), "min": min(times), "all": times}


def measure_pair(first: Callable[[], object], second: Callable[[], object], *, repeats: int = 5,
                 warmup: int = 1) -> tuple[dict, dict]:
  """Times two arms interleaved (first, second, first, ...), so drift in the machine's speed hits both alike."""
  for _ in range(warmup):
    first()
    second()
  times: tuple[list, list] = ([], [])
  for _ in range(repeats):
    for fn, record in ((first, times[0]), (second, times[1])):
      started = time.perf_counter()
      fn()
      record.append(time.perf_counter() - started)
  return tuple({"median": statistics.median(t), "min": min(t), "all": t} for t in times)


def machine() -> dict:
  """What the figures were measured on."""
  import jax
  return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}


def write_json(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump({**result, "machine": machine()}, f, indent=2)
