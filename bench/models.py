"""Forward and training rows/s of every registry model at its natural input size, float32 beside bfloat16.

    python bench/models.py [--quick | --smoke] [--models resnet8,resnet20] [--build-ratio] [--out ...]

For each model (default: every image model in the registry when it runs; the language models, `lm-*`, take token
rows and are left out), at its natural input (`natural_input`: the
MLPs on 8x8x1 digits, the small CNNs and CIFAR ResNets on 32x32x3 with 10 classes, the ImageNet-style models on
224x224x3 with 1,000 classes), the two compute dtypes (`ModelSpec.dtype`) are timed side by side, interleaved
(`harness.measure_pair`), on one device-resident batch:
  - forward: the trainer's evaluation forward (`make_predict`: eval mode, log-probabilities), rows/s;
  - training: the trainer's step (`make_train_step`, hard labels, AdamW), set up as `fit` sets up a run
    (`bench.run_all.arm`), rows/s.
Parameters and optimizer state are float32 in both arms; only the compute dtype differs.

`--build-ratio` adds the build's wall time against the ensemble's forward alone (`bench.run_all.build_overhead`:
`build_cache` of 2 random-weight teachers over the same rows, 2 views) for `--build-model` (default `resnet50` at
224 px where the registry has it) at its natural input: the figure to measure on an accelerator, where the host's
work shows. `--smoke` runs tiny sizes with small models to check that the benchmark works; its figures mean
nothing.
"""

import argparse
import os
import sys
import tempfile

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import synthetic  # noqa: E402
from bench.harness import measure_pair, write_json  # noqa: E402
from bench.run_all import LONG, arm, build_overhead  # noqa: E402
from shared.models import COMPUTE_DTYPES, MODELS, TOKENS, build_model, count_params  # noqa: E402
from shared.parallel import batch_sharding, data_mesh, on_devices  # noqa: E402
from student_train.config import FitConfig  # noqa: E402
from student_train.steps import make_predict  # noqa: E402

# The registry models whose natural input is an ImageNet image (torchvision's and big_vision's models).
IMAGENET = ("resnet18", "resnet50", "mobilenet-v2", "vit-ti16", "vit-s16")
# The registry's language models (natural input: token rows), which this benchmark of images leaves out.
LANGUAGE_MODELS = tuple(name for name, (_, _, natural) in MODELS.items() if natural == TOKENS)
# Per mode and input side: the batch, the rows each timed repeat covers (whole steps, at least one), and repeats.
SIZES = {
    "full": {"batch": {8: 256, 32: 128, 224: 16}, "rows": {8: 8192, 32: 1024, 224: 16}, "repeats": 5,
             "build_rows": 4096, "build_batch": 256, "build_repeats": 2},
    "quick": {"batch": {8: 256, 32: 64, 224: 4}, "rows": {8: 2048, 32: 256, 224: 4}, "repeats": 3,
              "build_rows": 512, "build_batch": 64, "build_repeats": 1},
    "smoke": {"batch": {8: 8, 32: 8, 224: 2}, "rows": {8: 8, 32: 8, 224: 2}, "repeats": 1,
              "build_rows": 32, "build_batch": 16, "build_repeats": 1},
}
BUILD_MEMBERS = 2  # As the README's build-overhead figure (`bench/run_all.py`'s build part).


def natural_input(name: str) -> tuple[tuple[int, int, int], int]:
  """The input shape and class count a registry model is made for: `(input_shape, classes)`."""
  if name.startswith("mlp-"):
    return (8, 8, 1), 10  # The digits the MLPs were sized for.
  if name in IMAGENET or name.startswith("vit-"):
    return (224, 224, 3), 1000
  return (32, 32, 3), 10  # CIFAR-sized: the small CNNs and the CIFAR ResNets.


def model_rows(tmp: str, name: str, size: dict, mesh) -> dict:
  """Forward and training rows/s of `name` at its natural input, float32 and bfloat16 timed interleaved."""
  input_shape, classes = natural_input(name)
  side = input_shape[0]
  batch = size["batch"][side]
  steps = max(1, size["rows"][side] // batch)
  dataset = synthetic.npz_dataset(os.path.join(tmp, f"{name}.npz"), batch, input_shape, classes)
  config = FitConfig(model=name, dataset=dataset, batch_size=batch)
  arms = {dtype: arm(config, mesh, dtype=dtype) for dtype in COMPUTE_DTYPES}
  try:
    _, sample = next(on_devices(arms["float32"].loader.epoch(LONG - 1), batch_sharding(mesh)))
  finally:
    for each in arms.values():
      each.close()
  forwards, trains = {}, {}
  for dtype, each in arms.items():
    predict = make_predict(each.graphdef, each.plan.normalization, mesh)
    step = each.step(mesh)
    holder = {"states": each.states}

    def forward(predict=predict, holder=holder):
      for _ in range(steps):
        out = predict(holder["states"], sample["x"])
      jax.block_until_ready(out)

    def train(step=step, holder=holder, hypers=each.hypers):
      for _ in range(steps):
        holder["states"], metrics = step(holder["states"], sample, hypers)
      jax.block_until_ready(metrics)

    forwards[dtype], trains[dtype] = forward, train
  forward_times = measure_pair(*forwards.values(), repeats=size["repeats"])
  train_times = measure_pair(*trains.values(), repeats=size["repeats"])
  rows = steps * batch
  forward_rps = {dtype: rows / t["median"] for dtype, t in zip(forwards, forward_times)}
  train_rps = {dtype: rows / t["median"] for dtype, t in zip(trains, train_times)}
  spec = arms["float32"].plan.model_spec
  return {"input_shape": list(input_shape), "classes": classes,
          "params": count_params(nnx.eval_shape(lambda: build_model(spec))), "batch": batch, "steps_per_repeat": steps,
          "forward_rows_per_s": forward_rps, "train_rows_per_s": train_rps,
          "bfloat16_speedup": {"forward": forward_rps["bfloat16"] / forward_rps["float32"],
                               "train": train_rps["bfloat16"] / train_rps["float32"]}}


def main(argv: list[str] | None = None) -> dict:
  """Times the models asked for; returns the result it writes."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="small batches and few steps (the 224 px models at batch 4)")
  mode.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs; the figures mean nothing")
  parser.add_argument("--models", default=None, help="comma-separated registry names (default: all of them)")
  parser.add_argument("--build-ratio", action="store_true",
                      help="also time build_cache against the ensemble's forward alone (for an accelerator)")
  parser.add_argument("--build-model", default=None,
                      help="the teachers of --build-ratio (default: resnet50 if registered, else cnn-large)")
  parser.add_argument("--out", default="bench/results/models.json")
  args = parser.parse_args(argv)
  names = args.models.split(",") if args.models else [name for name in MODELS if name not in LANGUAGE_MODELS]
  unknown = [name for name in names if name not in MODELS]
  if unknown:
    parser.error(f"--models: not in the registry: {', '.join(unknown)} (registry: {', '.join(MODELS)})")
  if any(name in LANGUAGE_MODELS for name in names):
    parser.error(f"--models: {', '.join(n for n in names if n in LANGUAGE_MODELS)} take token rows of a text: "
                 "dataset, not images; this benchmark times the image models")
  teacher = args.build_model or ("resnet50" if "resnet50" in MODELS else "cnn-large")
  if args.build_ratio and teacher not in MODELS:
    parser.error(f"--build-model {teacher!r} is not in the registry")
  mode = "smoke" if args.smoke else "quick" if args.quick else "full"
  size = SIZES[mode]
  mesh = data_mesh()
  # On a shared machine the load says how much of it the figures had.
  result = {"mode": mode, "backend": jax.default_backend(), "load_average_at_start": os.getloadavg(), "models": {},
            "build": None}
  print(f"{'model':<14} {'input':<12} {'params':>12} {'batch':>5}  forward rows/s f32 / bf16 (x)     "
        "train rows/s f32 / bf16 (x)", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      row = model_rows(tmp, name, size, mesh)
      result["models"][name] = row
      forward, train, speedup = row["forward_rows_per_s"], row["train_rows_per_s"], row["bfloat16_speedup"]
      shape = "x".join(map(str, row["input_shape"]))
      print(f"{name:<14} {shape:<12} {row['params']:>12,} {row['batch']:>5}  "
            f"{forward['float32']:>9,.0f} / {forward['bfloat16']:>9,.0f} ({speedup['forward']:.2f}x)   "
            f"{train['float32']:>9,.0f} / {train['bfloat16']:>9,.0f} ({speedup['train']:.2f}x)", flush=True)
    if args.build_ratio:
      input_shape, classes = natural_input(teacher)
      build = build_overhead(tmp, teacher, input_shape, BUILD_MEMBERS, size["build_rows"], size["build_batch"],
                             size["build_repeats"], classes=classes)
      result["build"] = build
      print(f"build vs forward ({teacher}, {BUILD_MEMBERS} members, {build['rows']} rows at "
            f"{'x'.join(map(str, input_shape))}): build {build['build_s']:.2f} s, forward alone "
            f"{build['forward_only_s']:.2f} s, ratio {build['ratio']:.1f}", flush=True)
  result["load_average_at_end"] = os.getloadavg()
  write_json(args.out, result)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
