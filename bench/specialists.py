"""Hinton et al.'s specialists (2015, section 5) on digits, measured: a weak generalist alone against the generalist
with its specialists, and a student distilled from each.

    python bench/specialists.py [--seeds 5] [--work DIR] [--data-dir DIR] [--smoke]
        [--out bench/results/specialists.json]

A setting that leaves the specialists room: the generalist is `mlp-tiny` (one hidden layer of 32) trained for
`GENERALIST_EPOCHS` epochs on hard labels. Each specialist is `mlp-tiny` started from the generalist
(`--init-from`) and trained `SPECIALIST_EPOCHS` epochs on its classes plus a dustbin, half of each epoch from its
classes (`--enrich 0.5`). Everything runs through the functions the CLIs call (`fit`, `build_cache`,
`plan_specialists`).

1. Validation (settings chosen here, never on the test split): train on train[:80%], score on train[80%:], seeds
   0 and 1; the grid is K (clusters) x top-n, scored by the accuracy of q at T=1 (the argmax of the combination).
   Then, with the chosen K and top-n, the T of each distilled student's cache (1, 2 or 4), by the validation
   accuracy of students trained on train[:80%] (seeds 0 and 1).
2. Test, with those settings, seeds 0..N-1 (each seed its own generalist, specialists and students): the
   generalist's test accuracy against q's (both at T=1, from a cache of the test split), and students (`mlp-tiny`,
   `STUDENT_EPOCHS` epochs, alpha 0.1) distilled from a cache of the generalist and from a cache of q (train
   split, each at its chosen T), besides a scratch student. Differences are paired by seed.

`--smoke`: one seed of validation (on the test split), one point of each grid and one epoch per run, to check that the
benchmark works; its figures mean nothing.
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import paired_summary, write_json  # noqa: E402
from shared.cache import open_cache  # noqa: E402
from student_train.config import FitConfig  # noqa: E402
from student_train.train import fit  # noqa: E402
from teacher_cache.build import BuildConfig, build_cache  # noqa: E402
from teacher_cache.specialists import plan_specialists  # noqa: E402

MODEL = "mlp-tiny"
GENERALIST_EPOCHS, SPECIALIST_EPOCHS, STUDENT_EPOCHS = 8, 4, 20
CLUSTERS, TOP_N, STUDENT_TEMPERATURES = (2, 3, 4), (1, 2, 3), (1.0, 2.0, 4.0)
TRAIN, VALID = "train[:80%]", "train[80%:]"
VALIDATION_SEEDS = (0, 1)
DATA_DIR = None  # TFDS data dir of the digits (--data-dir); None: TFDS's own.


def _smoke() -> None:
  """`--smoke`'s sizes: one seed of validation, one point of each grid, one epoch per run. Validation trains on the
  train split and scores on the test split: meaningless, but then the test stage reuses the validation stage's
  generalist and specialists, and its students compile nothing new."""
  global GENERALIST_EPOCHS, SPECIALIST_EPOCHS, STUDENT_EPOCHS, CLUSTERS, TOP_N, STUDENT_TEMPERATURES  # noqa: PLW0603
  global VALIDATION_SEEDS, TRAIN, VALID  # noqa: PLW0603
  TRAIN, VALID = "train", "test"
  GENERALIST_EPOCHS, SPECIALIST_EPOCHS, STUDENT_EPOCHS = 1, 1, 1
  CLUSTERS, TOP_N, STUDENT_TEMPERATURES, VALIDATION_SEEDS = (2,), (2,), (2.0,), (0,)


def _fit(out: str, **settings) -> dict:
  return fit(FitConfig(model=MODEL, out=out, progress=False, workers=0, data_dir=DATA_DIR, **settings),
             log_epochs=False)


def _cache(out: str, split: str, generalist: str, temperature: float, plan: str | None = None,
           specialists: tuple[str, ...] = (), top_n: int = 2) -> str:
  return build_cache(BuildConfig(dataset="digits", split=split, teachers=(generalist,), specialist_plan=plan,
                                 specialist_runs=specialists, top_n=top_n, temperature=temperature,
                                 eval_split="none", data_dir=DATA_DIR, out=out, progress=False))


def _accuracies(path: str) -> tuple[float, float]:
  """(the generalist's, the targets') accuracy on the cache's labelled rows."""
  cache = open_cache(path)
  labels = cache["labels"][:]
  return (float(np.mean(np.argmax(cache["member_logits"][:, 0], axis=1) == labels)),
          float(np.mean(np.argmax(cache["targets"][:], axis=1) == labels)))


def _team(work: str, split: str, seed: int, clusters: int) -> tuple[str, str, tuple[str, ...]]:
  """The generalist of a seed (trained once per split and seed), the plan of `clusters` specialists and the
  specialists."""
  tag = {TRAIN: "part", "train": "full"}[split]  # Not the split spec: a run dir's name with '%' breaks orbax.
  generalist = os.path.join(work, f"{tag}-gen{seed}")
  _fit(generalist, dataset="digits", split=split, epochs=GENERALIST_EPOCHS, seed=seed, eval_split="none")
  cache = _cache(os.path.join(work, f"{tag}-gen{seed}.zarr"), split, generalist, 1.0)
  plan = os.path.join(work, f"{tag}-plan{seed}-k{clusters}.json")
  subsets = plan_specialists(cache, clusters, plan, seed=seed, overwrite=True).subsets
  specialists = []
  for k in range(len(subsets)):
    out = os.path.join(work, f"{tag}-spec{seed}-k{clusters}-{k}")
    _fit(out, dataset="digits", split=split, epochs=SPECIALIST_EPOCHS, seed=seed, specialist=f"{plan}:{k}",
         init_from=generalist, eval_split="none")
    specialists.append(out)
  return generalist, plan, tuple(specialists)


def validate(work: str) -> dict:
  """q's validation accuracy for each K x top-n (mean of the validation seeds), and the generalist's."""
  scores = {}
  for seed, clusters in itertools.product(VALIDATION_SEEDS, CLUSTERS):
    generalist, plan, specialists = _team(work, TRAIN, seed, clusters)
    for top_n in TOP_N:
      path = _cache(os.path.join(work, f"valid{seed}-k{clusters}-n{top_n}.zarr"), VALID, generalist, 1.0, plan,
                    specialists, top_n)
      alone, combined = _accuracies(path)
      scores.setdefault(f"K={clusters}, top-{top_n}", []).append(combined)
      scores.setdefault("generalist alone", []).append(alone)
  return {setting: statistics.mean(values) for setting, values in scores.items()}


def _student_caches(work: str, tag: str, split: str, generalist: str, plan: str, specialists: tuple[str, ...],
                    top_n: int, temperatures: dict) -> dict:
  """The caches the two distilled students learn from: the generalist's and q, each at its T."""
  return {"from the generalist": _cache(os.path.join(work, f"{tag}-kd-gen.zarr"), split, generalist,
                                        temperatures["from the generalist"]),
          "from q": _cache(os.path.join(work, f"{tag}-kd-q.zarr"), split, generalist, temperatures["from q"], plan,
                           specialists, top_n)}


def validate_temperature(work: str, clusters: int, top_n: int) -> dict:
  """Each distilled student's validation accuracy at each T of its cache (mean of the validation seeds)."""
  scores = {}
  for seed, temperature in itertools.product(VALIDATION_SEEDS, STUDENT_TEMPERATURES):
    generalist, plan, specialists = _team(work, TRAIN, seed, clusters)
    caches = _student_caches(work, f"valid{seed}-t{temperature:g}", TRAIN, generalist, plan, specialists, top_n,
                             {"from the generalist": temperature, "from q": temperature})
    for name, cache in caches.items():
      final = _fit(os.path.join(work, f"valid{seed}-t{temperature:g}-student-{name.split()[-1]}"), cache=cache,
                   epochs=STUDENT_EPOCHS, seed=seed, eval_split=VALID)
      scores.setdefault(name, {}).setdefault(temperature, []).append(final["eval_accuracy"])
  return {name: {t: statistics.mean(v) for t, v in by_t.items()} for name, by_t in scores.items()}


def test(work: str, seeds: int, clusters: int, top_n: int, temperatures: dict) -> list[dict]:
  rows = []
  for seed in range(seeds):
    generalist, plan, specialists = _team(work, "train", seed, clusters)
    alone, combined = _accuracies(_cache(os.path.join(work, f"test{seed}.zarr"), "test", generalist, 1.0, plan,
                                         specialists, top_n))
    students = {}
    caches = _student_caches(work, f"test{seed}", "train", generalist, plan, specialists, top_n, temperatures)
    for name, cache in caches.items():
      final = _fit(os.path.join(work, f"student{seed}-{name.split()[-1]}"), cache=cache, epochs=STUDENT_EPOCHS,
                   seed=seed)
      students[name] = final["eval_accuracy"]
    students["scratch"] = _fit(os.path.join(work, f"scratch{seed}"), dataset="digits", epochs=STUDENT_EPOCHS,
                               seed=seed)["eval_accuracy"]
    rows.append({"seed": seed, "generalist": alone, "generalist + specialists": combined, **students})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _summary(rows: list[dict], key: str, base: str | None = None) -> str:
  return paired_summary([100 * row[key] for row in rows], None if base is None else [100 * row[base] for row in rows],
                        "%", " pts")


def main(argv: list[str] | None = None) -> None:
  global DATA_DIR  # noqa: PLW0603
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--work", help="working directory (default: a temporary one)")
  parser.add_argument("--data-dir", help="TFDS data dir of the digits (default: TFDS's own)")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
  parser.add_argument("--out", default="bench/results/specialists.json")
  args = parser.parse_args(argv)
  DATA_DIR = args.data_dir
  if args.smoke:
    _smoke()
  work = args.work or tempfile.mkdtemp(prefix="stillroom-specialists-")
  scores = validate(work)
  print(f"validation accuracy of q (T=1), mean of {len(VALIDATION_SEEDS)} seeds:", json.dumps(scores, indent=2),
        flush=True)
  best = max((s for s in scores if s != "generalist alone"), key=scores.get)
  clusters, top_n = int(best.split(",")[0][2:]), int(best.split("top-")[1])
  by_temperature = validate_temperature(work, clusters, top_n)
  print("validation accuracy of each distilled student by the T of its cache:", json.dumps(by_temperature), flush=True)
  temperatures = {name: max(by_t, key=by_t.get) for name, by_t in by_temperature.items()}
  rows = test(work, args.seeds, clusters, top_n, temperatures)
  print(f"\ntest split, {args.seeds} paired seeds, K={clusters}, top-{top_n}, student T {temperatures}:")
  print("| | test accuracy | paired difference |\n|---|---|---|")
  print(f"| generalist alone | {_summary(rows, 'generalist')} | |")
  print(f"| generalist + specialists (q) | {_summary(rows, 'generalist + specialists', 'generalist')} |")
  print(f"| student, scratch | {_summary(rows, 'scratch')} | |")
  print(f"| student from the generalist | {_summary(rows, 'from the generalist', 'scratch')} |")
  print(f"| student from q | {_summary(rows, 'from q', 'from the generalist')} |")
  write_json(args.out, {"validation": scores, "validation_student_temperature": by_temperature,
                        "chosen": {"clusters": clusters, "top_n": top_n, "student_temperature": temperatures},
                        "test": rows,
                        "settings": {"model": MODEL, "generalist_epochs": GENERALIST_EPOCHS,
                                     "specialist_epochs": SPECIALIST_EPOCHS, "student_epochs": STUDENT_EPOCHS}})


if __name__ == "__main__":
  main()
