"""Cached-KD step time against hard-label step time for a language-model student (issue 34, acceptance 3).

    python bench/lm_step.py [--smoke] [--model lm-tiny] [--batch 16] [--seq-len 256] [--out ...]

One `lm-tiny` student (the registry's, at its natural token rows, byte vocabulary V = 256) is trained by the
trainer's own step (`student_train.steps.make_train_step`, AdamW) on one device-resident batch of packed token rows,
in arms timed side by side, interleaved (`harness.measure_interleaved`):
  - hard: next-token cross-entropy alone (alpha 1, no teacher arrays in the batch): a scratch baseline's step;
  - dense / topk:K / sample:K: the same step distilling per token (alpha 0.5, T 2, the KL term) from the arrays a
    token cache stores for the batch, as the loader hands them over (in the storage dtype, float16), made by the
    build's own `teacher_cache.build.targets_of_logits` from a random teacher's logits.
It prints each KD arm's step time over the hard arm's (the medians' ratio, and the fastest repeats', which a loaded
machine disturbs least): the overhead of distilling from a cache rather than from
labels (acceptance 3: at most 1.05 for `lm-tiny` on the CPU). The teacher's forward is not timed: a cache has
computed it once, offline. `--smoke` runs a tiny size to check that the benchmark works; its figures mean nothing.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import measure_interleaved, write_json  # noqa: E402
from shared.augment import make_augmentation  # noqa: E402
from shared.cache import CacheSpec, MemberSpec  # noqa: E402
from shared.data import DatasetSpec, Normalization  # noqa: E402
from shared.data.text import next_token_labels  # noqa: E402
from shared.models import ModelSpec, build_model, count_params  # noqa: E402
from shared.parallel import batch_sharding, data_mesh, put_replicated  # noqa: E402
from student_train.steps import Hypers, group_switches, make_train_step, stack_hypers, stack_states  # noqa: E402
from student_train.terms import LOSS_NAMES  # noqa: E402
from teacher_cache.build import targets_of_logits  # noqa: E402

VOCAB = 256  # The byte tokenizer's vocabulary.
SIZES = {"full": {"batch": 16, "seq_len": 256, "steps": 8, "repeats": 5, "k": 64, "draws": 50},
         "smoke": {"batch": 2, "seq_len": 16, "steps": 1, "repeats": 1, "k": 4, "draws": 4}}
TEMPERATURE, ALPHA = 2.0, 0.5


def token_rows(batch: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Packed rows of random byte documents: x int32 [B, 2, L] (tokens, segment ids 1, 2, ...) and the next-token
  labels int32 [B, L] (-1 at each document's last token)."""
  rng = np.random.default_rng(seed)
  x = np.zeros((batch, 2, length), np.int32)
  for r in range(batch):
    start, segment = 0, 1
    while start < length:
      size = min(int(rng.integers(length // 8 + 1, length // 2 + 2)), length - start)
      x[r, 0, start:start + size] = rng.integers(32, 127, size)
      x[r, 1, start:start + size] = segment
      start, segment = start + size, segment + 1
  return x, next_token_labels(x)


def stored_arrays(targets: str, logits: np.ndarray, length: int, batch: int) -> dict:
  """What a token cache of `targets` stores for the batch (`targets_of_logits`, float16 storage), named as the
  loader hands them to the step."""
  dataset = DatasetSpec(name="text:bench", split="train", canonical_split=f"train[0:{batch}]", count=batch,
                        fingerprint="0" * 64, input_shape=(2, length), input_dtype="int32", num_classes=VOCAB,
                        labeled=True)
  member = MemberSpec(name="teacher", source="random", model="lm-tiny", num_params=0, digest="0" * 64,
                      trained_epochs=None, normalization=Normalization().to_dict())
  spec = CacheSpec(temperature=TEMPERATURE, combine="arithmetic", members=(member,), dataset=dataset,
                   num_classes=VOCAB, views=1, dtype="float16", chunk_rows=batch, software_version="bench",
                   augmentation=make_augmentation((2, length), np.dtype(np.int32), dataset.name, seed=0, max_shift=0,
                                                  flip=False, image_size=None),
                   targets=targets, member_logits=targets == "dense", positions=length)
  _, out, _, _ = jax.jit(targets_of_logits(spec))(jnp.asarray(logits), jnp.arange(batch, dtype=jnp.uint32),
                                                   jnp.zeros(batch, jnp.int32))
  return {name: np.asarray(values) for name, values in out.items()}


def step_times(model: str, size: dict) -> dict:
  """Each arm's median seconds per step and its ratio to the hard-label arm's."""
  batch, length, steps = size["batch"], size["seq_len"], size["steps"]
  mesh = data_mesh()
  spec = ModelSpec(name=model, input_shape=(2, length), num_classes=VOCAB)
  student = build_model(spec, seed=0)
  x, labels = token_rows(batch, length)
  teacher = build_model(spec, seed=1)  # A random teacher: the targets' values do not change the step's work.
  logits = np.asarray(teacher(jnp.asarray(x, jnp.float32)), np.float32)[:, :, None, :]  # [B, L, 1, V]
  base = {"x": x.astype(np.float32), "labels": labels, "mask": np.ones(batch, np.float32)}
  arms = {"hard": ({}, 1.0), "dense": (stored_arrays("dense", logits, length, batch), ALPHA),
          f"topk:{size['k']}": (stored_arrays(f"topk:{size['k']}", logits, length, batch), ALPHA),
          f"sample:{size['draws']}": (stored_arrays(f"sample:{size['draws']}", logits, length, batch), ALPHA)}
  runs, sharding = {}, batch_sharding(mesh)
  student_graphdef, student_state = nnx.split(student)
  for name, (teacher_arrays, alpha) in arms.items():
    model_copy = nnx.merge(student_graphdef, student_state)  # Each arm's own copy of the one initialisation.
    optimizer = nnx.Optimizer(model_copy, optax.adamw(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model_copy, optimizer))
    hypers = stack_hypers([Hypers(member_weights=np.ones(1, np.float32), alpha=np.float32(alpha),
                                  temperature=np.float32(TEMPERATURE), use_stored=np.bool_(bool(teacher_arrays)),
                                  loss=np.int32(LOSS_NAMES.index("kl")))], [0])
    step = make_train_step(graphdef, Normalization(), mesh, group_switches(hypers))
    data = jax.device_put({**base, **teacher_arrays}, sharding)
    holder = {"states": put_replicated(stack_states([state]), mesh)}
    hypers = put_replicated(hypers, mesh)

    def run(step=step, holder=holder, data=data, hypers=hypers):
      for _ in range(steps):
        holder["states"], metrics = step(holder["states"], data, hypers)
      jax.block_until_ready(metrics)
    runs[name] = run
  times = measure_interleaved(tuple(runs.values()), repeats=size["repeats"])
  per_step = {name: t["median"] / steps for name, t in zip(runs, times)}
  fastest = {name: t["min"] / steps for name, t in zip(runs, times)}  # Least disturbed by a loaded machine.
  return {"model": model, "params": count_params(student), "batch": batch, "seq_len": length, "vocab": VOCAB,
          "steps_per_repeat": steps, "repeats": size["repeats"], "seconds_per_step": per_step,
          "over_hard": {name: seconds / per_step["hard"] for name, seconds in per_step.items() if name != "hard"},
          "fastest_seconds_per_step": fastest,
          "fastest_over_hard": {name: seconds / fastest["hard"] for name, seconds in fastest.items() if name != "hard"},
          "repeat_seconds": {name: t["all"] for name, t in zip(runs, times)},
          "bytes_per_token": {name: sum(a.nbytes for a in arrays.values()) / (batch * length)
                              for name, (arrays, _) in arms.items() if arrays}}


def main(argv: list[str] | None = None) -> dict:
  """Times the arms; prints and writes the result."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true", help="a tiny size: checks that it runs; the figures mean nothing")
  parser.add_argument("--model", default="lm-tiny", help="the student: a registry language model, or "
                      "`module:function` for your own")
  for name in ("batch", "seq_len", "steps", "repeats", "k", "draws"):
    parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                        help=f"default {SIZES['full'][name]} ({SIZES['smoke'][name]} with --smoke)")
  parser.add_argument("--out", default="bench/results/lm_step.json")
  args = parser.parse_args(argv)
  size = {name: getattr(args, name) if getattr(args, name) is not None else value
          for name, value in SIZES["smoke" if args.smoke else "full"].items()}
  load_at_start = os.getloadavg()  # A shared machine's load moves the figures: recorded beside them.
  result = {**step_times(args.model, size), "load_average": {"start": load_at_start, "end": os.getloadavg()}}
  print(f"{result['model']} ({result['params']:,} parameters), batch {result['batch']} x {result['seq_len']} tokens, "
        f"V {VOCAB}, {jax.devices()[0].platform}")
  print("| arm | ms per step (median) | / hard labels | ms per step (fastest) | / hard labels | cached bytes per "
        "token the step reads |")
  print("|---|---|---|---|---|---|")
  for name, seconds in result["seconds_per_step"].items():
    ratio = "1" if name == "hard" else f"{result['over_hard'][name]:.3f}"
    fastest = result["fastest_seconds_per_step"][name]
    fastest_ratio = "1" if name == "hard" else f"{result['fastest_over_hard'][name]:.3f}"
    stored = result["bytes_per_token"].get(name)
    print(f"| {name} | {1000 * seconds:.1f} | {ratio} | {1000 * fastest:.1f} | {fastest_ratio} | "
          f"{'' if stored is None else f'{stored:,.0f}'} |")
  write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
