"""Sparse cached targets (`--targets topk:K|sample:K`) against dense ones, side by side in one run: bytes per row,
build time, and the students each teaches at equal steps.

    python bench/sparse_targets.py [--quick | --smoke] [--seeds 3] [--data-dir DIR]
        [--out bench/results/sparse_targets.json]

Two tasks, each cached three ways from the same teachers (dense float16, `topk:K`, `sample:K`):

- `digits` (C = 10, K = 3): two `mlp-large` teachers trained here on the hard labels; caches of 4 views at T = 4;
  `mlp-small` students trained on the soft targets alone (alpha 0), evaluated on the test split.
- A 1,000-class task with learnable structure (C = 1,000, M = 4, K = 16): inputs x ~ N(0, I_64); the four teachers
  are one random `mlp-large` network plus independent perturbations (30% of another initialisation), their inputs
  scaled ×8 so that their distributions are peaked (a ReLU network with zero biases is positively homogeneous);
  labels are the ensemble's top-1. Caches at T = 2 of 16,384 inputs with 4,096 held-out ones as the eval split;
  `mlp-small` students on the soft targets alone (alpha 0).

Per task and kind of targets, over `--seeds` seeds, each the caches' build seed (views, and the draws of `sample`)
and the student's (mean ± std): held-out KL(ensemble at T = 1 || student),
top-1 agreement with the ensemble, accuracy (digits: the true labels; the synthetic task: the ensemble's top-1, so
equal to the agreement), and expected calibration error (15 bins) against those labels. Bytes per row: the row
arrays' objects in the store over its rows (checksums and metadata included; not the eval split's arrays, which do
not grow with the transfer set), and their bytes per row by the layout. Build seconds: the median of interleaved
builds. `--smoke`: tiny sets, one epoch per run and one build per kind, to check that the benchmark works; its figures
mean nothing.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import machine, write_json  # noqa: E402
from shared import storage  # noqa: E402
from shared.cache import ROWS, open_cache  # noqa: E402
from shared.data import Normalization, open_transfer_set  # noqa: E402
from shared.ensemble import combine_log_probs  # noqa: E402
from shared.metrics import classification_metrics  # noqa: E402
from shared.models import ModelSpec, build_model  # noqa: E402
from shared.runs import RunRecord, load_run_teacher, save_run  # noqa: E402
from student_train.config import FitConfig  # noqa: E402
from student_train.evaluate import run_logits  # noqa: E402
from student_train.train import fit  # noqa: E402
from teacher_cache.build import BuildConfig, build_cache  # noqa: E402

KINDS = ("dense", "topk", "sample")


def _log(message: str) -> None:
  print(f"bench: {message}", file=sys.stderr, flush=True)


def _synthetic_teachers(root: str, members: int, dim: int, classes: int, model: str = "mlp-large") -> list[str]:
  """One random `model` network and `members` perturbations of it, as teacher run dirs."""
  spec = ModelSpec(name=model, input_shape=(dim,), num_classes=classes)
  base = nnx.state(build_model(spec, seed=0), nnx.Param)
  runs = []
  for member in range(members):
    model = build_model(spec, seed=0)
    noise = nnx.state(build_model(spec, seed=member + 1), nnx.Param)
    nnx.update(model, jax.tree.map(lambda a, b: a + 0.3 * b, base, noise))
    run = os.path.join(root, f"member{member}")
    save_run(run, RunRecord(model=spec, normalization=Normalization(scale=0.125)), model)
    runs.append(run)
  return runs


def _synthetic_data(root: str, runs: list[str], dim: int, train: int, held_out: int) -> tuple[str, str]:
  """`npz:` transfer and held-out sets of N(0, I) inputs labelled with the teachers' ensemble top-1 (at T = 1)."""
  names = []
  teachers = [load_run_teacher(run) for run in runs]
  for name, count, seed in (("train", train, 1), ("held_out", held_out, 2)):
    x = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    logits = np.stack([np.asarray(jax.jit(t.apply_fn)(t.params, t.normalization.apply(x))) for t in teachers], 1)
    labels = np.asarray(combine_log_probs(logits, 1.0, "arithmetic")).argmax(-1)
    path = os.path.join(root, f"{name}.npz")
    np.savez(path, x=x, y=labels)
    names.append(f"npz:{path}")
  return names[0], names[1]


def _bytes_per_row(path: str) -> dict:
  """Bytes per row of the row arrays (what grows with the transfer set): on disk, and by the layout."""
  spec = open_cache(path).spec
  arrays = [a for a in spec.arrays if a.name in spec.arrays_of(ROWS) and a.role != "bookkeeping"]
  return {"store": sum(storage.size(storage.join(path, a.name)) for a in arrays) / spec.num_rows,
          "layout": sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape[1:])) for a in arrays)}


def _builds(work: str, build: dict, k: int, repeats: int) -> tuple[dict, dict]:
  """Each kind of cache built `repeats` times, interleaved; returns (the last store of each kind, build seconds)."""
  stores, seconds = {}, {kind: [] for kind in KINDS}
  for repeat in range(repeats):
    for kind in KINDS:
      out = os.path.join(work, f"{kind}_seed{build.get('seed', 0)}_{repeat}.zarr")
      started = time.perf_counter()
      build_cache(BuildConfig(out=out, targets="dense" if kind == "dense" else f"{kind}:{k}", progress=False,
                              **build))
      seconds[kind].append(time.perf_counter() - started)
      stores[kind] = out
  return stores, {kind: statistics.median(times) for kind, times in seconds.items()}


def _student(cache: str, out: str, seed: int, epochs: int, batch_size: int, data_dir: str | None) -> dict:
  """Trains one student on a cache's soft targets alone; returns its held-out figures against the ensemble."""
  fit(FitConfig(cache=cache, out=out, model="mlp-small", epochs=epochs, batch_size=batch_size, alpha=0.0, seed=seed,
                data_dir=data_dir, progress=False), log_epochs=False)
  spec = open_cache(cache).spec
  eval_set = open_transfer_set(spec.eval_dataset.name, spec.eval_dataset.split, data_dir)
  ensemble = np.asarray(combine_log_probs(open_cache(cache)["eval_member_logits"][:], 1.0, spec.combine),
                        np.float64)
  student = np.asarray(jax.nn.log_softmax(run_logits(load_run_teacher(out), eval_set, 512, out)), np.float64)
  kl = float(np.mean(np.sum(np.exp(ensemble) * (ensemble - student), axis=-1)))
  metrics = classification_metrics(student, eval_set.labels)
  return {"heldout_kl": kl, "agreement": float(np.mean(student.argmax(-1) == ensemble.argmax(-1))),
          "accuracy": metrics["accuracy"], "ece": metrics["ece"]}


def _task(name: str, work: str, build: dict, k: int, seeds: int, epochs: int, batch_size: int, repeats: int,
          data_dir: str | None) -> dict:
  _log(f"{name}: building dense, topk:{k} and sample:{k} caches ({repeats}x, interleaved)")
  stores, seconds = _builds(work, build, k, repeats)
  result = {"k": k, "build_seconds": seconds, "bytes_per_row": {kind: _bytes_per_row(stores[kind]) for kind in KINDS},
            "students": {}}
  # Each seed is a build seed (the views, and the draws of `sample`) and the student's seed: the spread includes the
  # sampled estimator's own variance.
  per_seed = [stores] + [_builds(work, {**build, "seed": seed}, k, 1)[0] for seed in range(1, seeds)]
  for kind in KINDS:
    runs = []
    for seed in range(seeds):
      _log(f"{name}: {kind} student, seed {seed}")
      runs.append(_student(per_seed[seed][kind], os.path.join(work, f"{kind}_student{seed}"), seed, epochs,
                           batch_size, data_dir))
    result["students"][kind] = {metric: {"mean": float(np.mean([r[metric] for r in runs])),
                                         "std": float(np.std([r[metric] for r in runs], ddof=1)) if seeds > 1 else 0.0,
                                         "all": [r[metric] for r in runs]} for metric in runs[0]}
  return result


def _print(name: str, result: dict) -> None:
  dense = result["bytes_per_row"]["dense"]
  print(f"\n{name} (K = {result['k']}):")
  print("| targets | store B/row | layout B/row | smaller than dense | build s | held-out KL | agreement | accuracy | "
        "ECE |")
  print("|---|---|---|---|---|---|---|---|---|")
  for kind in KINDS:
    size, students = result["bytes_per_row"][kind], result["students"][kind]
    cell = lambda m, scale=100, digits=2: (f"{scale * students[m]['mean']:.{digits}f} ± "  # noqa: E731
                                          f"{scale * students[m]['std']:.{digits}f}")
    label = kind if kind == "dense" else f"{kind}:{result['k']}"
    print(f"| {label} | {size['store']:,.0f} | {size['layout']:,} | "
          f"{dense['layout'] / size['layout']:.0f}× | {result['build_seconds'][kind]:.2f} | "
          f"{cell('heldout_kl', 1, 4)} | {cell('agreement')}% | {cell('accuracy')}% | {cell('ece')}% |")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="smaller sets, fewer epochs")
  mode.add_argument("--smoke", action="store_true", help="tiny sets, one epoch per run: checks that it runs")
  parser.add_argument("--seeds", type=int, default=3, help="student seeds per kind of targets")
  parser.add_argument("--data-dir", help="TFDS data dir of the digits (default: one in the temporary work dir)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sparse_targets.json"))
  args = parser.parse_args(argv)
  # Per mode: synthetic train and held-out rows, synthetic student epochs, digits teacher and student epochs, builds.
  train, held_out, epochs, teacher_epochs, digits_epochs, repeats = (
      (256, 64, 1, 1, 1, 1) if args.smoke else (4096, 1024, 4, 10, 10, 2) if args.quick else
      (16384, 4096, 15, 30, 40, 2))
  teacher_model = "mlp-tiny" if args.smoke else "mlp-large"
  result = {"machine": machine(), "seeds": args.seeds}
  with tempfile.TemporaryDirectory() as work:
    data_dir = args.data_dir or os.path.join(work, "tfds")
    _log(f"digits: training two {teacher_model} teachers")
    teachers = []
    for seed in range(2):
      run = os.path.join(work, f"digits_teacher{seed}")
      fit(FitConfig(dataset="digits", data_dir=data_dir, model=teacher_model, epochs=teacher_epochs,
                    batch_size=128, seed=seed, out=run, progress=False), log_epochs=False)
      teachers.append(run)
    result["digits"] = _task(
        "digits", os.path.join(work, "digits"), {"dataset": "digits", "data_dir": data_dir,
                                                 "teachers": tuple(teachers), "views": 4, "temperature": 4.0},
        k=3, seeds=args.seeds, epochs=digits_epochs, batch_size=256, repeats=repeats, data_dir=data_dir)
    runs = _synthetic_teachers(os.path.join(work, "synthetic"), 4, 64, 1000, teacher_model)
    dataset, eval_dataset = _synthetic_data(work, runs, 64, train, held_out)
    result["synthetic_1000"] = _task(
        "synthetic 1,000 classes", os.path.join(work, "synthetic_caches"),
        {"dataset": dataset, "eval_dataset": eval_dataset, "teachers": tuple(runs), "temperature": 2.0,
         "batch_size": 512}, k=16, seeds=args.seeds, epochs=epochs, batch_size=256, repeats=repeats, data_dir=None)
  write_json(args.out, result)
  for name, key in (("digits", "digits"), ("synthetic, 1,000 classes, 4 members", "synthetic_1000")):
    _print(name, result[key])


if __name__ == "__main__":
  main()
