"""Runs the performance benchmarks and writes bench/results/summary.json.

    python bench/run_all.py [--quick | --smoke] [--only streaming,online,...]

Each figure is a ratio of two arms measured side by side in this run (warm-up, then the median of repeats):
  1. streaming_overhead: epoch time distilling from a cache on disk / epoch time on hard labels from memory
     (same student, batch, rows and augmentation), for cnn-large on 32x32x3 inputs and (the small-student ratio)
     mlp-small on 8x8, 5 epochs of 65,536 rows per arm; the small student's arms also with `--steps-per-call 8`
     (the cache epoch against the hard-label epoch of 8 steps per call, and of 1).
  2. online_speedup_fraction_of_ideal: (online KD epoch / cached KD epoch) / ideal, where online KD runs the
     M-member ensemble every step and ideal = (student step + ensemble forward) / student step.
  3. build_overhead: wall time of `build_cache` / the ensemble's forward passes alone over the same rows.
  4. rss_growth: peak RSS of `student-train fit` on the largest cache / on the smallest.
  5. storage: bytes per row against R·(M+1)·C·2 + row metadata, without and with a zstd compressor.
  6. scaling: cache build and epoch time for N, 4N, 16N rows.
  7. prepared: `fit` epoch of mlp-small from prepared images / from the same crops pre-rendered in memory, and host
     rows/s of the JPEG and prepared paths with a null student (`bench/prepared_images.py`; not in --smoke, which
     that file's own smoke run covers).

Everything is measured through the library's public functions: every student arm is set up as `fit` sets up its
run before its loop (`plan_run`, `make_loader`, `make_optimizer`, `RunPlan.hypers`, `make_train_step`; see `Arm`),
and the ensemble's forward is the members' `apply_fn`s and `combine_log_probs` (`ensemble_forward`). `--smoke` runs
every part at a tiny size with small models, to check that the benchmark works; its figures mean nothing.
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import cli_peak_rss, machine, measure, measure_interleaved, measure_pair, write_json  # noqa: E402
from bench import synthetic  # noqa: E402
from shared.data import Normalization, open_transfer_set  # noqa: E402
from shared.ensemble import combine_log_probs  # noqa: E402
from shared.models import build_model  # noqa: E402
from shared.parallel import batch_sharding, data_mesh, on_devices, put_replicated  # noqa: E402
from shared.runs import load_teacher  # noqa: E402
from student_train.config import FitConfig  # noqa: E402
from student_train.plan import RunPlan, plan_run  # noqa: E402
from student_train.steps import (group_switches, make_train_step, stack_hypers, stack_states,  # noqa: E402
                                 stacked_batch_sharding, train_step_fn)
from student_train.train import make_loader, make_optimizer, stack_calls  # noqa: E402
from teacher_cache.build import BuildConfig, build_cache  # noqa: E402

PARTS = ("streaming", "online", "build", "rss", "storage", "scaling", "prepared")
# The sizes of each mode. The small student's streaming arms keep >= 5 epochs of 65,536 rows per arm in the full and
# quick modes: a ~2 ms step, where the host's work per batch shows. The smoke mode leaves the small student's arms out
# (the functions of the large one's, at other sizes: compilations that would only make the test suite slower), and
# runs the large one's with 8 steps per call too (the small one's in the other modes).
SIZES = {
    "full": {"repeats": 3, "small_model": "mlp-small", "small_rows": 65536, "small_batch": 256, "small_repeats": 5,
             "large_model": "cnn-large", "large_rows": 4096, "large_batch": 128, "online_rows": 4096,
             "online_small_rows": 16384, "build_rows": 16384, "build_batch": 256, "build_repeats": 2,
             "rss_mb": [64, 512, 4096], "classes": 1000, "storage_rows": 100000, "scaling_model": "mlp-small",
             "scaling_rows": 32768, "prepared_images": 4000},
    "quick": {"repeats": 3, "small_model": "mlp-small", "small_rows": 65536, "small_batch": 256, "small_repeats": 5,
              "large_model": "cnn-large", "large_rows": 1024, "large_batch": 128, "online_rows": 1024,
              "online_small_rows": 4096, "build_rows": 4096, "build_batch": 256, "build_repeats": 2,
              "rss_mb": [64, 256, 1024], "classes": 1000, "storage_rows": 20000, "scaling_model": "mlp-small",
              "scaling_rows": 8192, "prepared_images": 1000},
    "smoke": {"repeats": 1, "small_model": None, "large_model": "mlp-small", "large_steps_per_call": (1, 8),
              "large_rows": 256, "large_batch": 64, "online_rows": 256, "build_rows": 256, "build_batch": 64,
              "build_repeats": 1, "rss_mb": [1],
              "classes": 100, "storage_rows": 512, "scaling_model": "mlp-tiny", "scaling_rows": 128,
              "prepared_images": None},
}
LONG = 1000  # The epochs an arm's config names: the optimizer's schedule and the loader's read-ahead span them.


@dataclasses.dataclass
class Arm:
  """K students of one config set up as `fit` sets them up before its loop (seeds 0..K-1, trained together).

  Attributes:
    plan: the config resolved against its data and cache (`plan_run`).
    loader: its batch stream (`make_loader`); `close` stops it.
    graphdef: the students' graph (model and optimizer).
    states: their stacked states, replicated on the mesh.
    hypers: their stacked step settings (`RunPlan.hypers`), replicated.
    switches: the settings the students agree on, static in the step (`group_switches`).
  """

  plan: RunPlan
  loader: object
  graphdef: object
  states: object
  hypers: object
  switches: dict

  def step(self, mesh, steps_per_call: int = 1):
    """The jitted step that `fit` trains these students with (`--steps-per-call`: its call of several steps)."""
    return make_train_step(self.graphdef, self.plan.normalization, mesh, self.switches, self.plan.feature_terms,
                           stacked=steps_per_call > 1)

  def close(self) -> None:
    self.loader.close()


def arm(config: FitConfig, mesh, students: int = 1, dtype: str | None = None) -> Arm:
  """`students` runs of `config` (its epochs: `LONG`, its eval split: none) set up as `fit` sets them up; nothing is
  written to its run dir. `dtype` (a `ModelSpec.dtype`) replaces the model's compute dtype."""
  plan = plan_run(dataclasses.replace(config, epochs=LONG, eval_split="none", progress=False,
                                      out=config.out or "unwritten"))
  if dtype is not None:
    plan = dataclasses.replace(plan, model_spec=dataclasses.replace(plan.model_spec, dtype=dtype))
  loader = make_loader(plan, plan.fields())
  states = []
  for seed in range(students):
    model = build_model(plan.model_spec, seed=seed)
    optimizer = nnx.Optimizer(model, make_optimizer(plan.config, loader.steps_per_epoch), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    states.append(state)
  num_members = plan.cache.spec.num_members if plan.cache is not None else 1
  hypers = stack_hypers([plan.hypers(num_members)] * students, list(range(students)))
  return Arm(plan=plan, loader=loader, graphdef=graphdef, states=put_replicated(stack_states(states), mesh),
             hypers=put_replicated(hypers, mesh), switches=group_switches(hypers))


def ensemble_forward(runs: list[str], normalization: Normalization, temperature: float = 4.0,
                     combine: str = "arithmetic"):
  """The teachers' forward passes and the ensemble rule, from public pieces (`load_teacher`, `combine_log_probs`):
  what a build computes per batch before it stores the results.

  Args:
    runs: the teachers' run dirs.
    normalization: the inputs' normalisation for a teacher that records none.
    temperature, combine: the ensemble's T and rule.

  Returns:
    `(forward, params)`: `forward(params, x [B, ...]) -> (member logits float32 [B, M, C], log-probs [B, C])`, to
    jit, and the members' parameters.
  """
  teachers = [load_teacher(run) for run in runs]

  def forward(params, x):
    logits = jnp.stack([t.apply_fn(p, (t.normalization or normalization).apply(x))
                        for t, p in zip(teachers, params)], axis=1).astype(jnp.float32)
    return logits, combine_log_probs(logits, temperature, combine)

  return forward, [t.params for t in teachers]


def _epoch_runner(step, state, loader, mesh, hypers, extra=(), steps_per_call: int = 1):
  """A function that runs the next epoch of `loader` through `step` and waits for the result (each call the next
  epoch, as `fit` runs them, so that reads of the next epoch overlap this one's end); with `steps_per_call` > 1,
  `step` is a call of several steps (`Arm.step`) and takes the batches as `fit` stacks them (`stack_calls`)."""
  sharding = batch_sharding(mesh) if steps_per_call == 1 else stacked_batch_sharding(mesh)
  holder = {"state": state, "epoch": 0}

  def run():
    state = holder["state"]
    batches = loader.epoch(holder["epoch"])
    batches = batches if steps_per_call == 1 else stack_calls(batches, steps_per_call)
    for _, batch in on_devices(batches, sharding):  # As the trainer places them.
      state, metrics = step(state, *extra, batch, hypers)
    jax.block_until_ready(metrics)
    holder["state"], holder["epoch"] = state, holder["epoch"] + 1

  return run


def streaming_overhead(tmp: str, model: str, input_shape, rows: int, batch: int, repeats: int,
                       steps_per_call: tuple[int, ...] = (1,)) -> dict:
  """Benchmark 1. Both arms render zero-filled shifted views on the host for every batch: the hard arm a fresh
  view of each of `rows` examples, the cache arm the stored rows of `rows / 2` examples x 2 views. Each number of
  `steps_per_call` (`fit --steps-per-call`) is a pair of arms, all timed interleaved; the first is the top-level
  figures, every one a row of "steps_per_call", with the cache arm's epoch against each hard arm's."""
  mesh = data_mesh()
  examples = synthetic.npz_dataset(os.path.join(tmp, f"{model}_hard.npz"), rows, input_shape, 10)
  half = synthetic.npz_dataset(os.path.join(tmp, f"{model}_half.npz"), rows // 2, input_shape, 10)
  cache_path = os.path.join(tmp, f"{model}.zarr")
  synthetic.direct_cache(cache_path, half, members=4, views=2, max_shift=1)
  arms, runs = [], []
  try:
    for n in steps_per_call:
      for config in (FitConfig(model=model, dataset=examples, augment=True, max_shift=1, batch_size=batch,
                               steps_per_call=n),
                     FitConfig(model=model, cache=cache_path, batch_size=batch, steps_per_call=n)):
        arms.append(arm(config, mesh))
        runs.append(_epoch_runner(arms[-1].step(mesh, n), arms[-1].states, arms[-1].loader, mesh, arms[-1].hypers,
                                  steps_per_call=n))
    times = [t["median"] for t in measure_interleaved(runs, repeats=repeats)]
  finally:
    for each in arms:
      each.close()
  hard, cached = times[0::2], times[1::2]
  rows_of = {str(n): {"hard_from_memory_s": h, "distill_from_cache_s": c, "ratio": c / h,
                      "ratio_to_one_step_hard": c / hard[0]} for n, h, c in zip(steps_per_call, hard, cached)}
  return {"model": model, "input_shape": list(input_shape), "rows": rows, "batch": batch,
          "hard_from_memory_s": hard[0], "distill_from_cache_s": cached[0], "ratio": cached[0] / hard[0],
          "steps_per_call": rows_of}


def online_vs_cached(tmp: str, student: str, teacher_model: str, input_shape, members: int, rows: int, batch: int,
                     repeats: int) -> dict:
  """Benchmark 2. Online KD runs the ensemble inside the trainer's step; cached KD reads its targets."""
  mesh = data_mesh()
  dataset = synthetic.npz_dataset(os.path.join(tmp, f"online_{student}.npz"), rows, input_shape, 10)
  runs = synthetic.teachers(os.path.join(tmp, f"online_teachers_{student}"), teacher_model, input_shape, 10, members)
  cache_path = os.path.join(tmp, f"online_{student}.zarr")
  build_cache(BuildConfig(dataset=dataset, teachers=tuple(runs), out=cache_path, progress=False))
  forward, params = ensemble_forward(runs, open_transfer_set(dataset, "train").normalization)
  teacher_params = put_replicated(params, mesh)
  config = FitConfig(model=student, cache=cache_path, batch_size=batch)
  online, cached = arm(config, mesh), arm(config, mesh)
  plain = arm(FitConfig(model=student, dataset=dataset, batch_size=batch), mesh)  # The un-augmented examples.
  try:
    # The trainer's step; online KD adds the ensemble inside it, in place of the cache's stored targets.
    inner = train_step_fn(online.graphdef, online.plan.normalization, online.switches)

    def online_step(state, params, batch, hypers):
      return inner(state, {**batch, "targets": forward(params, batch["x"])[1]}, hypers)

    online_run = _epoch_runner(jax.jit(online_step, donate_argnums=0), online.states, plain.loader, mesh,
                               online.hypers, extra=(teacher_params,))
    cached_step = cached.step(mesh)
    cached_run = _epoch_runner(cached_step, cached.states, cached.loader, mesh, cached.hypers)
    online_time, cached_time = measure_pair(online_run, cached_run, repeats=repeats)
    # The ideal, from the two parts timed alone on one device-resident batch.
    _, sample = next(on_devices(cached.loader.epoch(LONG - 1), batch_sharding(mesh)))
  finally:
    for each in (online, cached, plain):
      each.close()
  jitted = jax.jit(forward)
  forward_time = measure(lambda: jax.block_until_ready(jitted(teacher_params, sample["x"])), repeats=repeats * 5)
  alone = arm(config, mesh)
  alone.close()
  holder = {"state": alone.states}

  def one_step():
    holder["state"], metrics = cached_step(holder["state"], sample, alone.hypers)
    jax.block_until_ready(metrics)

  step_time = measure(one_step, repeats=repeats * 5)
  ideal = (step_time["median"] + forward_time["median"]) / step_time["median"]
  achieved = online_time["median"] / cached_time["median"]
  return {"student": student, "teacher": teacher_model, "members": members, "rows": rows, "batch": batch,
          "online_epoch_s": online_time["median"], "cached_epoch_s": cached_time["median"],
          "student_step_s": step_time["median"], "ensemble_forward_s": forward_time["median"],
          "ideal_speedup": ideal, "achieved_speedup": achieved, "fraction_of_ideal": achieved / ideal}


def build_overhead(tmp: str, teacher_model: str, input_shape, members: int, rows: int, batch: int,
                   repeats: int, classes: int = 10) -> dict:
  """Benchmark 3. The build's wall time against the ensemble's forward passes alone (`ensemble_forward`, jitted)
  over as many rows in batches of the same size (random-weight teachers of `classes` classes)."""
  views = 2
  mesh = data_mesh()
  dataset = synthetic.npz_dataset(os.path.join(tmp, "build.npz"), rows, input_shape, classes)
  transfer_set = open_transfer_set(dataset, "train")
  runs = synthetic.teachers(os.path.join(tmp, "build_teachers"), teacher_model, input_shape, classes, members)
  counter = iter(range(1000))

  def build():
    build_cache(BuildConfig(dataset=dataset, teachers=tuple(runs), batch_size=batch, views=views,
                            out=os.path.join(tmp, f"build{next(counter)}.zarr"), progress=False))  # No eval split.

  build_time = measure(build, repeats=repeats)
  forward, params = ensemble_forward(runs, transfer_set.normalization)
  forward, params = jax.jit(forward), put_replicated(params, mesh)
  sharding = batch_sharding(mesh)
  inputs = np.concatenate([transfer_set.read_all()[0]] * views)
  batches = [jax.device_put(inputs[i:i + batch], sharding) for i in range(0, len(inputs) - batch + 1, batch)]

  def forward_only():
    jax.block_until_ready([forward(params, x) for x in batches])

  forward_time = measure(forward_only, repeats=repeats)
  return {"teacher": teacher_model, "input_shape": list(input_shape), "classes": classes, "members": members,
          "rows": len(inputs), "batch": batch, "build_s": build_time["median"], "forward_only_s": forward_time["median"],
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
    rss_kb = cli_peak_rss("student_train.cli", [
        "fit", "--model", "mlp-tiny", "--cache", cache, "--epochs", "1", "--batch-size", "256", "--no-progress",
        "--out", os.path.join(tmp, f"rss_run{size}")]) / 1024
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


def scaling(tmp: str, base_rows: int, repeats: int, model: str = "mlp-small") -> dict:
  """Benchmark 6. Cache build (2 random `model` teachers) and one distillation epoch of a `model` student for N, 4N,
  16N rows."""
  mesh = data_mesh()
  runs = synthetic.teachers(os.path.join(tmp, "scaling_teachers"), model, (8, 8, 1), 10, 2)
  points = []
  for factor in (1, 4, 16):
    rows = base_rows * factor
    dataset = synthetic.npz_dataset(os.path.join(tmp, f"scaling{factor}.npz"), rows, (8, 8, 1), 10)
    cache = os.path.join(tmp, f"scaling{factor}.zarr")
    started = time.perf_counter()
    build_cache(BuildConfig(dataset=dataset, teachers=tuple(runs), out=cache, progress=False))
    build_s = time.perf_counter() - started
    student = arm(FitConfig(model=model, cache=cache, batch_size=256), mesh)
    try:
      epoch = measure(_epoch_runner(student.step(mesh), student.states, student.loader, mesh, student.hypers),
                      repeats=repeats)
    finally:
      student.close()
    points.append({"rows": rows, "build_s": build_s, "epoch_s": epoch["median"]})
  return {"points": points, "build_per_row_ratio_16N_vs_N": (points[2]["build_s"] / 16) / points[0]["build_s"],
          "epoch_per_row_ratio_16N_vs_N": (points[2]["epoch_s"] / 16) / points[0]["epoch_s"]}


def main(argv: list[str] | None = None) -> dict:
  """Runs the parts asked for; returns the summary it writes."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="smaller sizes; under 5 minutes on 2 CPU cores")
  mode.add_argument("--smoke", action="store_true", help="tiny sizes and small models: checks that every part runs "
                                                         "(seconds); the figures mean nothing")
  parser.add_argument("--only", default=",".join(PARTS), help=f"benchmarks to run, comma-separated from {PARTS}")
  parser.add_argument("--out", default="bench/results/summary.json")
  args = parser.parse_args(argv)
  parts = args.only.split(",")
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"--only: unknown {unknown}; choose from {PARTS}")
  mode = "smoke" if args.smoke else "quick" if args.quick else "full"
  size, repeats = SIZES[mode], SIZES[mode]["repeats"]
  large = size["large_model"]
  summary = {"quick": args.quick, "mode": mode, "machine": machine()}
  with tempfile.TemporaryDirectory() as tmp:
    def report(name, value):
      summary[name] = value
      print(f"{name}: {value}", flush=True)

    if "streaming" in parts:
      small = size["small_model"] and streaming_overhead(tmp, size["small_model"], (8, 8, 1), size["small_rows"],
                                                         size["small_batch"], size["small_repeats"], (1, 8))
      big = streaming_overhead(tmp, large, (32, 32, 3), size["large_rows"], size["large_batch"], repeats,
                               size.get("large_steps_per_call", (1,)))
      report("streaming", {**({size["small_model"]: small} if small else {}), large: big})
      report("streaming_overhead", big["ratio"])
      if small:
        report("streaming_overhead_small_student", small["ratio"])
    if "online" in parts:
      # The target is held on cnn-large (student and teachers); a 2 ms mlp-small step shows the per-step host cost.
      online = online_vs_cached(tmp, large, large, (32, 32, 3), 2, size["online_rows"], 128, repeats)
      online_small = size["small_model"] and online_vs_cached(tmp, size["small_model"], large, (32, 32, 3), 2,
                                                              size["online_small_rows"], 128, repeats)
      report("online", {large: online, **({size["small_model"]: online_small} if online_small else {})})
      report("online_speedup_fraction_of_ideal", online["fraction_of_ideal"])
    if "build" in parts:
      build = build_overhead(tmp, large, (32, 32, 3), 2, size["build_rows"], size["build_batch"],
                             size["build_repeats"])
      report("build", build)
      report("build_overhead", build["ratio"])
    if "rss" in parts:
      rss = peak_rss(tmp, size["rss_mb"], classes=size["classes"], members=4)
      report("rss", rss)
      report("rss_growth", rss["growth"])
    if "storage" in parts:
      report("storage", storage(tmp, size["storage_rows"], size["classes"], 4))
    if "scaling" in parts:
      report("scaling", scaling(tmp, size["scaling_rows"], repeats, size["scaling_model"]))
    if "prepared" in parts and size["prepared_images"]:
      from bench import prepared_images  # pylint: disable=import-outside-toplevel
      prepared = prepared_images.run(os.path.join(tmp, "prepared"), size["prepared_images"], "mlp-small", 4, 2, 256,
                                     12, [0, 1])
      report("prepared_images", prepared)
      report("prepared_fit_over_prerendered", prepared["fit"]["prepared_over_npz"])
  write_json(args.out, summary)
  print(f"wrote {args.out}")
  return summary


if __name__ == "__main__":
  main()
