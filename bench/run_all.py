"""Runs the performance benchmarks and writes bench/results/summary.json.

    python bench/run_all.py [--quick] [--only streaming,online,...]

Each figure is a ratio of two arms measured side by side in this run (warm-up, then the median of repeats):
  1. streaming_overhead: epoch time distilling from a cache on disk / epoch time on hard labels from memory
     (same student, batch, rows and augmentation), for cnn-large on 32x32x3 inputs and (the small-student ratio)
     mlp-small on 8x8, 5 epochs of 65,536 rows per arm.
  2. online_speedup_fraction_of_ideal: (online KD epoch / cached KD epoch) / ideal, where online KD runs the
     M-member ensemble every step and ideal = (student step + ensemble forward) / student step.
  3. build_overhead: wall time of `build_cache` / the ensemble's forward passes alone over the same rows.
  4. rss_growth: peak RSS of `student-train fit` on the largest cache / on the smallest.
  5. storage: bytes per row against R·(M+1)·C·2 + row metadata, without and with a zstd compressor.
  6. scaling: cache build and epoch time for N, 4N, 16N rows.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import machine, measure, measure_pair, write_json  # noqa: E402
from bench import synthetic  # noqa: E402
from shared.augment import Augmentation  # noqa: E402
from shared.cache import open_cache  # noqa: E402
from shared.data import open_transfer_set  # noqa: E402
from shared.ensemble import combine_log_probs, member_weights  # noqa: E402
from shared.models import ModelSpec, build_model  # noqa: E402
from shared.parallel import batch_sharding, data_mesh, on_devices, replicated  # noqa: E402
from shared.runs import load_teacher  # noqa: E402
from student_train.loader import ArrayLoader, CacheLoader  # noqa: E402
from student_train.steps import Hypers, make_train_step, stack_hypers, stack_states, train_step_fn  # noqa: E402
from teacher_cache.build import BuildConfig, _make_forwards, build_cache  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("streaming", "online", "build", "rss", "storage", "scaling")


def _student(model: str, transfer_set, mesh, students: int = 1):
  """`students` freshly initialised students stacked for the trainer's step (one: a run of its own)."""
  spec = ModelSpec(name=model, input_shape=transfer_set.input_shape, num_classes=transfer_set.num_classes)
  states = []
  for seed in range(students):
    student = build_model(spec, seed=seed)
    graphdef, state = nnx.split((student, nnx.Optimizer(student, optax.adamw(1e-3), wrt=nnx.Param)))
    states.append(state)
  return graphdef, jax.device_put(stack_states(states), replicated(mesh))


def student_hypers(mesh, students: int = 1, members: int = 1, use_stored: bool = True) -> Hypers:
  """The step's per-student settings: alpha 0.5, T=4, AM of all members, stored or re-derived targets, KL."""
  one = Hypers(alpha=np.float32(0.5), temperature=np.float32(4.0),
               member_weights=member_weights(range(members), members), use_stored=np.bool_(use_stored))
  return jax.device_put(stack_hypers([one] * students, list(range(students))), replicated(mesh))


def _epoch_runner(step, state, batches, mesh, hypers, extra=()):
  """A function that runs one epoch of `batches()` through `step` and waits for the result."""
  sharding = batch_sharding(mesh)
  holder = {"state": state}

  def run():
    state = holder["state"]
    for _, batch in on_devices(batches(), sharding):  # As the trainer places them.
      state, metrics = step(state, *extra, batch, hypers)
    jax.block_until_ready(metrics)
    holder["state"] = state

  return run


def streaming_overhead(tmp: str, model: str, input_shape, rows: int, batch: int, repeats: int) -> dict:
  """Benchmark 1. Both arms render zero-filled shifted views on the host for every batch: the hard arm a fresh
  view of each of `rows` examples, the cache arm the stored rows of `rows / 2` examples x 2 views."""
  mesh = data_mesh()
  examples = synthetic.npz_dataset(os.path.join(tmp, f"{model}_hard.npz"), rows, input_shape, 10)
  half = synthetic.npz_dataset(os.path.join(tmp, f"{model}_half.npz"), rows // 2, input_shape, 10)
  cache_path = os.path.join(tmp, f"{model}.zarr")
  synthetic.direct_cache(cache_path, half, members=4, views=2, max_shift=1)
  hard_set, half_set = open_transfer_set(examples, "train"), open_transfer_set(half, "train")
  hard = ArrayLoader(hard_set, batch_size=batch, seed=0, augmentation=Augmentation(max_shift=1), augment=True)
  cached = CacheLoader(open_cache(cache_path), half_set, batch_size=batch, seed=0, fields=("targets",))
  graphdef, state = _student(model, hard_set, mesh)
  hard_step = make_train_step(graphdef, hard_set.normalization, mesh)
  hard_run = _epoch_runner(hard_step, state, lambda: hard.epoch(0), mesh, student_hypers(mesh))
  graphdef, state = _student(model, half_set, mesh)
  kd_step = make_train_step(graphdef, half_set.normalization, mesh)
  cached_run = _epoch_runner(kd_step, state, lambda: cached.epoch(0), mesh, student_hypers(mesh, members=4))
  hard_time, cached_time = measure_pair(hard_run, cached_run, repeats=repeats)
  return {"model": model, "input_shape": list(input_shape), "rows": rows, "batch": batch,
          "hard_from_memory_s": hard_time["median"], "distill_from_cache_s": cached_time["median"],
          "ratio": cached_time["median"] / hard_time["median"]}


def online_vs_cached(tmp: str, student: str, teacher_model: str, input_shape, members: int, rows: int, batch: int,
                     repeats: int) -> dict:
  """Benchmark 2. Online KD runs the ensemble inside the jitted step; cached KD reads its targets."""
  mesh = data_mesh()
  dataset = synthetic.npz_dataset(os.path.join(tmp, f"online_{student}.npz"), rows, input_shape, 10)
  transfer_set = open_transfer_set(dataset, "train")
  runs = synthetic.teachers(os.path.join(tmp, f"online_teachers_{student}"), teacher_model, input_shape, 10, members)
  teachers = [load_teacher(run) for run in runs]
  cache_path = os.path.join(tmp, f"online_{student}.zarr")
  build_cache(BuildConfig(dataset=dataset, teachers=tuple(runs), out=cache_path, progress=False))
  normalization = transfer_set.normalization
  teacher_params = jax.device_put([t.params for t in teachers], replicated(mesh))
  hypers = student_hypers(mesh, members=members)

  def ensemble_log_probs(params, x):
    logits = jnp.stack([t.apply_fn(p, normalization.apply(x)) for t, p in zip(teachers, params)], axis=1)
    return combine_log_probs(logits, 4.0, "arithmetic")

  graphdef, state = _student(student, transfer_set, mesh)
  inner = train_step_fn(graphdef, normalization)  # The trainer's step; online KD adds the ensemble inside it.

  def online_step(state, params, batch, hypers):
    return inner(state, {**batch, "targets": ensemble_log_probs(params, batch["x"])}, hypers)

  online = jax.jit(online_step, donate_argnums=0)
  cached_step = jax.jit(inner, donate_argnums=0)
  loader = CacheLoader(open_cache(cache_path), transfer_set, batch_size=batch, seed=0, fields=("targets",))
  plain = ArrayLoader(transfer_set, batch_size=batch, seed=0, augmentation=Augmentation(max_shift=0))
  online_run = _epoch_runner(online, state, lambda: plain.epoch(0), mesh, hypers, extra=(teacher_params,))
  graphdef, state = _student(student, transfer_set, mesh)
  cached_run = _epoch_runner(cached_step, state, lambda: loader.epoch(0), mesh, hypers)
  online_time, cached_time = measure_pair(online_run, cached_run, repeats=repeats)
  # The ideal, from the two parts timed alone on one device-resident batch.
  _, sample = next(on_devices(loader.epoch(0), batch_sharding(mesh)))
  forward = jax.jit(ensemble_log_probs)
  forward_time = measure(lambda: forward(teacher_params, sample["x"]).block_until_ready(), repeats=repeats * 5)
  graphdef, state = _student(student, transfer_set, mesh)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = cached_step(holder["state"], sample, hypers)
    jax.block_until_ready(metrics)

  step_time = measure(one_step, repeats=repeats * 5)
  ideal = (step_time["median"] + forward_time["median"]) / step_time["median"]
  achieved = online_time["median"] / cached_time["median"]
  return {"student": student, "teacher": teacher_model, "members": members, "rows": rows, "batch": batch,
          "online_epoch_s": online_time["median"], "cached_epoch_s": cached_time["median"],
          "student_step_s": step_time["median"], "ensemble_forward_s": forward_time["median"],
          "ideal_speedup": ideal, "achieved_speedup": achieved, "fraction_of_ideal": achieved / ideal}


def build_overhead(tmp: str, teacher_model: str, input_shape, members: int, rows: int, batch: int,
                   repeats: int) -> dict:
  """Benchmark 3. The build's wall time against its jitted ensemble forward alone over the same batches."""
  mesh = data_mesh()
  dataset = synthetic.npz_dataset(os.path.join(tmp, "build.npz"), rows, input_shape, 10)
  transfer_set = open_transfer_set(dataset, "train")
  runs = synthetic.teachers(os.path.join(tmp, "build_teachers"), teacher_model, input_shape, 10, members)
  counter = iter(range(1000))

  def build():
    build_cache(BuildConfig(dataset=dataset, teachers=tuple(runs), batch_size=batch, views=2,
                            out=os.path.join(tmp, f"build{next(counter)}.zarr"), progress=False))  # No eval split.

  build_time = measure(build, repeats=repeats)
  spec = open_cache(os.path.join(tmp, "build0.zarr")).spec
  teachers = [load_teacher(run) for run in runs]
  forward, _ = _make_forwards(teachers, spec, mesh)
  params = jax.device_put([t.params for t in teachers], replicated(mesh))
  sharding = batch_sharding(mesh)
  inputs = np.concatenate([transfer_set.read_all()[0]] * spec.views)
  batches = [jax.device_put(inputs[i:i + batch], sharding) for i in range(0, len(inputs) - batch + 1, batch)]
  folds = jax.device_put(np.zeros(batch, np.int32), sharding)

  def forward_only():
    jax.block_until_ready([forward(params, x, folds) for x in batches])

  forward_time = measure(forward_only, repeats=repeats)
  return {"teacher": teacher_model, "members": members, "rows": len(inputs), "batch": batch,
          "build_s": build_time["median"], "forward_only_s": forward_time["median"],
          "ratio": build_time["median"] / forward_time["median"]}


def peak_rss(tmp: str, sizes_mb: list[int], classes: int, members: int) -> dict:
  """Benchmark 4. `student-train fit` (one epoch, small MLP) on caches of growing size, each in its own process."""
  points = []
  bytes_per_row = 2 * classes * (members + 1)
  for size in sizes_mb:
    rows = max(1024, size * (1 << 20) // bytes_per_row)
    dataset = synthetic.npz_dataset(os.path.join(tmp, f"rss{size}.npz"), rows, (8,), classes)
    cache = os.path.join(tmp, f"rss{size}.zarr")
    synthetic.direct_cache(cache, dataset, members=members)
    code = ("import resource, sys\nfrom student_train.cli import main\n"
            "try:\n  main(sys.argv[1:])\nfinally:\n"
            "  print('RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    result = subprocess.run(
        [sys.executable, "-c", code, "fit", "--model", "mlp-tiny", "--cache", cache, "--epochs", "1",
         "--batch-size", "256", "--no-progress", "--out", os.path.join(tmp, f"rss_run{size}")],
        capture_output=True, text=True, env={
            **os.environ, "PYTHONPATH": os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
            # On a GPU this process already holds most of the memory JAX preallocates.
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    if result.returncode:
      raise RuntimeError(f"student-train fit failed ({result.returncode}): {result.stderr[-2000:]}")
    rss_kb = int(result.stderr.split("RSS_KB")[-1].split()[0])
    store = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(cache) for f in fs)
    points.append({"cache_mb": store / 1e6, "rows": rows, "peak_rss_mb": rss_kb / 1024})
  return {"points": points, "growth": points[-1]["peak_rss_mb"] / points[0]["peak_rss_mb"],
          "cache_size_ratio": points[-1]["cache_mb"] / points[0]["cache_mb"]}


def storage(tmp: str, rows: int, classes: int, members: int) -> dict:
  """Benchmark 5. Bytes per row on disk against the formula, without and with zstd, and write times."""
  import zarr.codecs
  dataset = synthetic.npz_dataset(os.path.join(tmp, "storage.npz"), rows, (8,), classes)
  formula = (members + 1) * classes * 2
  metadata = 8 + 4 + 4 + 2 + 1 + 4  # index, view, labels, shift, flip, fold
  result = {"rows": rows, "classes": classes, "members": members, "formula_logits_bytes_per_row": formula,
            "metadata_bytes_per_row": metadata}
  for name, compressors in (("none", None), ("zstd", zarr.codecs.ZstdCodec(level=3))):
    path = os.path.join(tmp, f"storage_{name}.zarr")
    started = time.perf_counter()
    synthetic.direct_cache(path, dataset, members=members, compressors=compressors)
    seconds = time.perf_counter() - started
    store = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    result[name] = {"bytes_per_row": store / rows, "write_s": seconds}
  result["zstd_ratio"] = result["none"]["bytes_per_row"] / result["zstd"]["bytes_per_row"]
  return result


def scaling(tmp: str, base_rows: int, repeats: int) -> dict:
  """Benchmark 6. Cache build (2 random mlp-small teachers) and one distillation epoch for N, 4N, 16N rows."""
  mesh = data_mesh()
  runs = synthetic.teachers(os.path.join(tmp, "scaling_teachers"), "mlp-small", (8, 8, 1), 10, 2)
  points = []
  for factor in (1, 4, 16):
    rows = base_rows * factor
    dataset = synthetic.npz_dataset(os.path.join(tmp, f"scaling{factor}.npz"), rows, (8, 8, 1), 10)
    cache = os.path.join(tmp, f"scaling{factor}.zarr")
    started = time.perf_counter()
    build_cache(BuildConfig(dataset=dataset, teachers=tuple(runs), out=cache, progress=False))
    build_s = time.perf_counter() - started
    transfer_set = open_transfer_set(dataset, "train")
    loader = CacheLoader(open_cache(cache), transfer_set, batch_size=256, seed=0, fields=("targets",))
    graphdef, state = _student("mlp-small", transfer_set, mesh)
    step = make_train_step(graphdef, transfer_set.normalization, mesh)
    epoch = measure(_epoch_runner(step, state, lambda: loader.epoch(0), mesh, student_hypers(mesh, members=2)),
                    repeats=repeats)
    points.append({"rows": rows, "build_s": build_s, "epoch_s": epoch["median"]})
  return {"points": points, "build_per_row_ratio_16N_vs_N": (points[2]["build_s"] / 16) / points[0]["build_s"],
          "epoch_per_row_ratio_16N_vs_N": (points[2]["epoch_s"] / 16) / points[0]["epoch_s"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="smaller sizes; under 5 minutes on 2 CPU cores")
  parser.add_argument("--only", default=",".join(PARTS), help=f"benchmarks to run, comma-separated from {PARTS}")
  parser.add_argument("--out", default="bench/results/summary.json")
  args = parser.parse_args()
  quick = args.quick
  parts = args.only.split(",")
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"--only: unknown {unknown}; choose from {PARTS}")
  repeats = 3
  summary = {"quick": quick, "machine": machine()}
  with tempfile.TemporaryDirectory() as tmp:
    def report(name, value):
      summary[name] = value
      print(f"{name}: {value}", flush=True)

    if "streaming" in parts:
      # The small student: >= 5 epochs of 65,536 rows per arm in every mode, a ~2 ms step where host work shows.
      small = streaming_overhead(tmp, "mlp-small", (8, 8, 1), 65536, 256, 5)
      large = streaming_overhead(tmp, "cnn-large", (32, 32, 3), 1024 if quick else 4096, 128, repeats)
      report("streaming", {"mlp-small": small, "cnn-large": large})
      report("streaming_overhead", large["ratio"])
      report("streaming_overhead_small_student", small["ratio"])
    if "online" in parts:
      # The target is held on cnn-large (student and teachers); a 2 ms mlp-small step shows the per-step host cost.
      online = online_vs_cached(tmp, "cnn-large", "cnn-large", (32, 32, 3), 2, 1024 if quick else 4096, 128, repeats)
      online_small = online_vs_cached(tmp, "mlp-small", "cnn-large", (32, 32, 3), 2, 4096 if quick else 16384, 128,
                                      repeats)
      report("online", {"cnn-large": online, "mlp-small": online_small})
      report("online_speedup_fraction_of_ideal", online["fraction_of_ideal"])
    if "build" in parts:
      build = build_overhead(tmp, "cnn-large", (32, 32, 3), 2, 4096 if quick else 16384, 256, 2)
      report("build", build)
      report("build_overhead", build["ratio"])
    if "rss" in parts:
      rss = peak_rss(tmp, [64, 256, 1024] if quick else [64, 512, 4096], classes=1000, members=4)
      report("rss", rss)
      report("rss_growth", rss["growth"])
    if "storage" in parts:
      report("storage", storage(tmp, 20000 if quick else 100000, 1000, 4))
    if "scaling" in parts:
      report("scaling", scaling(tmp, 8192 if quick else 32768, repeats))
  write_json(args.out, summary)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
