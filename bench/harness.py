"""A tiny harness shared by the benchmarks: warm-up, several repeats, the median; and the batches of rows that the
input benchmarks render."""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np


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
  return measure_interleaved((first, second), repeats=repeats, warmup=warmup)


def measure_interleaved(arms, *, repeats: int = 5, warmup: int = 1) -> tuple[dict, ...]:
  """Times several arms interleaved (each once per round, in turn), so drift in the machine's speed hits all alike;
  returns each arm's seconds {"median", "min", "all"}."""
  for _ in range(warmup):
    for fn in arms:
      fn()
  times: tuple[list, ...] = tuple([] for _ in arms)
  for _ in range(repeats):
    for fn, record in zip(arms, times):
      started = time.perf_counter()
      fn()
      record.append(time.perf_counter() - started)
  return tuple({"median": statistics.median(t), "min": min(t), "all": t} for t in times)


def machine() -> dict:
  """What the figures were measured on."""
  import jax
  return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}


def paired_summary(values: list[float], base: list[float] | None = None, unit: str = "", diff_unit: str = "") -> str:
  """"mean ± std" of per-seed values, and with `base` (the same seeds' values of another arm) " | mean ± std" of
  the paired differences (std nan for one seed)."""
  std = lambda v: statistics.stdev(v) if len(v) > 1 else float("nan")  # noqa: E731
  text = f"{statistics.mean(values):.2f} ± {std(values):.2f}{unit}"
  if base is not None:
    gains = [a - b for a, b in zip(values, base)]
    text += f" | {statistics.mean(gains):+.2f} ± {std(gains):.2f}{diff_unit}"
  return text


def view_batches(data, batch: int, count: int, seed: int = 0) -> list[dict]:
  """`count` batches of `batch` rows of `data` (a `TransferSet`), each drawn without replacement and sorted, every row
  its example's view 1: the rows a loader hands `shared.workers.BatchRenderer` (`position`, `index`, `view`)."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    position = np.sort(rng.choice(len(data), batch, replace=False))
    batches.append({"position": position, "index": data.indices[position], "view": np.ones(batch, np.int32)})
  return batches


def write_json(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump({**result, "machine": machine()}, f, indent=2)


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PEAK_RSS = ("import importlib, resource, sys\nmain = importlib.import_module(sys.argv[1]).main\ntry:\n"
             "  main(sys.argv[2:])\nfinally:\n"
             "  print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


def cli_peak_rss(cli_module: str, argv: list[str]) -> int:
  """Runs a stillroom command line (`cli_module`'s `main(argv)`, e.g. "teacher_cache.cli") in a process of its own,
  from this checkout, and returns its peak RSS in bytes (`ru_maxrss`).

  Raises:
    RuntimeError: the command failed, with the end of its stderr.
  """
  result = subprocess.run(
      [sys.executable, "-c", _PEAK_RSS, cli_module, *map(str, argv)], capture_output=True, text=True, env={
          **os.environ, "PYTHONPATH": os.pathsep.join([_REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
          # On a GPU the benchmark's own process already holds most of the memory JAX preallocates.
          "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
  if result.returncode:
    raise RuntimeError(f"{cli_module} {argv[0]} failed ({result.returncode}): {result.stderr[-2000:]}")
  return int(result.stderr.split("PEAK_RSS_KB")[-1].split()[0]) * 1024


def _rss_kb(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
  except OSError:
    return 0


def _descendants(pid: int) -> list[int]:
  children: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          parent = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, ValueError, IndexError):
        continue
      children.setdefault(parent, []).append(int(entry))
  found, todo = [], [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.append(child)
      todo.append(child)
  return found


def sample_tree_rss(root: int, interval: float = 0.1) -> Callable[[], dict]:
  """Samples the resident memory of process `root` and its descendants (input workers) in a background thread,
  from /proc (Linux). `ru_maxrss` cannot give the workers' figure: a spawned child inherits its parent's high-water
  mark through fork+exec.

  Returns:
    A function that stops sampling and returns {"tree_peak_mb": peak of the sum, "workers_peak_mb": peak of the
    descendants' sum}.
  """
  import threading  # pylint: disable=import-outside-toplevel
  peaks = {"tree": 0, "workers": 0}
  stop = threading.Event()

  def sample():
    while not stop.wait(interval):
      workers = sum(_rss_kb(pid) for pid in _descendants(root))
      peaks["tree"] = max(peaks["tree"], _rss_kb(root) + workers)
      peaks["workers"] = max(peaks["workers"], workers)

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()

  def finish() -> dict:
    stop.set()
    thread.join()
    return {"tree_peak_mb": peaks["tree"] / 1024, "workers_peak_mb": peaks["workers"] / 1024}
  return finish
