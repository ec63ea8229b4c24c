"""Feature-based distillation from the cache on digits, measured: a thin, deep student (`cnn-thin-deep`) from
scratch, by logits KD, and by logits KD plus each of FitNets hints, attention transfer and similarity-preserving KD.

    python bench/features.py [--seeds 5] [--work DIR] [--data-dir DIR] [--smoke]
        [--out bench/results/features.json]

Each seed trains its own teacher (`cnn-large`, `TEACHER_EPOCHS` epochs with --augment) and builds one cache of it
(`VIEWS` views, T=4, the features every method needs: `stage1` as a map and as an attention map, `stage2` as a map
and as an attention map). Every student is `cnn-thin-deep` on that cache (the same rows and views), alpha 0.1;
"scratch" is alpha 1 on the same cache (hard labels, no teacher). Two regimes of as many steps (`REGIMES`): every
example for `STUDENT_EPOCHS` epochs, and a seeded 10% of the examples for ten times the epochs. Everything runs
through the functions the CLIs call (`fit`, `build_cache`).

1. Validation (settings chosen here, never on the test split), per regime: teachers and caches on train[:80%],
   students scored on train[80%:], seeds 0 and 1; a grid of each method's weight (and for hints, a stage 1 of none
   or a quarter of the epochs).
2. Test, with the chosen settings, seeds 0..N-1 on the train split, scored on the test split, paired by seed.
Reported besides accuracy: the cache bytes per row each method reads, and its epoch time against KD's (the mean
of each run's epochs after the first, which compiles). `--smoke`: `cnn-small` models, one regime, one seed of
validation (on the test split), one point of each grid and two epochs per student, to check that the benchmark works;
its figures mean nothing.
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
from student_train.run_dir import is_finished, read_metrics  # noqa: E402
from student_train.train import fit  # noqa: E402
from teacher_cache.build import BuildConfig, build_cache  # noqa: E402

TEACHER, STUDENT = "cnn-large", "cnn-thin-deep"
TEACHER_EPOCHS, STUDENT_EPOCHS, VIEWS = 20, 20, 4
FEATURES = "stage1,stage1:attention,stage2,stage2:attention"
TRAIN, VALID = "train[:80%]", "train[80%:]"
# Each method's pairs (student feature = teacher feature) and its validation grid.
METHODS = {
    "hint": {"hint": ("stage1=stage1",)},
    "attention": {"attention": ("stage1=stage1", "stage2=stage2")},
    "similarity": {"similarity": ("stage2=stage2",)},
}
# Two regimes of the same number of steps: every example, and a seeded 10% of them (all their views) for ten times
# the epochs, where the demo's logits KD gains most.
REGIMES = {"10% of examples": {"label_fraction": 0.1, "epochs": 10 * STUDENT_EPOCHS, "checkpoint_every": 50},
           "all examples": {"label_fraction": 1.0, "epochs": STUDENT_EPOCHS}}
GRIDS = {
    "hint": [{"hint_weight": w, "hint_share": e} for w, e in itertools.product((0.1, 1.0, 10.0), (0, 0.25))],
    "attention": [{"attention_weight": w} for w in (100.0, 1000.0, 10000.0)],
    "similarity": [{"similarity_weight": w} for w in (300.0, 3000.0, 30000.0)],
}
VALIDATION_SEEDS = (0, 1)
DATA_DIR = None  # TFDS data dir of the digits (--data-dir); None: TFDS's own.


def _smoke() -> None:
  """`--smoke`'s sizes: small models, one regime, one seed of validation, one point of each grid, two epochs per
  student (the first compiles; a hint stage of one). Validation trains on the train split and scores on the test
  split: meaningless, but then each test run is a validation run's twin, which compiles nothing new."""
  global TEACHER, STUDENT, TEACHER_EPOCHS, STUDENT_EPOCHS, VIEWS, REGIMES, GRIDS, VALIDATION_SEEDS  # noqa: PLW0603
  global TRAIN, VALID  # noqa: PLW0603
  TRAIN, VALID = "train", "test"
  TEACHER, STUDENT, TEACHER_EPOCHS, STUDENT_EPOCHS, VIEWS, VALIDATION_SEEDS = "cnn-small", "cnn-small", 1, 2, 2, (0,)
  REGIMES = {"all examples": {"label_fraction": 1.0, "epochs": STUDENT_EPOCHS}}
  GRIDS = {"hint": [{"hint_weight": 1.0, "hint_share": 0.5}], "attention": [{"attention_weight": 1000.0}],
           "similarity": [{"similarity_weight": 3000.0}]}


def _student(out: str, cache: str, seed: int, regime: str, **settings) -> dict:
  """A student's final eval accuracy and its mean epoch seconds after the first. `hint_share`: the share of the
  epochs that are FitNets' stage 1 (`--hint-epochs`)."""
  settings = {**REGIMES[regime], **settings}
  share = settings.pop("hint_share", 0)
  final = fit(FitConfig(model=STUDENT, out=out, cache=cache, seed=seed, progress=False, workers=0, data_dir=DATA_DIR,
                        hint_epochs=round(share * settings["epochs"]), **settings), log_epochs=False)
  seconds = [line["seconds"] for line in read_metrics(out)[1:]]
  return {"accuracy": final["eval_accuracy"], "epoch_seconds": statistics.mean(seconds)}


def _teacher_cache(work: str, split: str, seed: int, eval_split: str) -> str:
  tag = {TRAIN: "part", "train": "full"}[split]  # Not the split spec: a run dir's name with '%' breaks orbax.
  teacher = os.path.join(work, f"{tag}-teacher{seed}")
  if not is_finished(teacher):
    fit(FitConfig(model=TEACHER, out=teacher, dataset="digits", split=split, epochs=TEACHER_EPOCHS, augment=True,
                  seed=seed, eval_split="none", progress=False, workers=0, data_dir=DATA_DIR), log_epochs=False)
  return build_cache(BuildConfig(dataset="digits", split=split, data_dir=DATA_DIR, teachers=(teacher,), views=VIEWS,
                                 seed=seed, features=FEATURES, eval_split=eval_split,
                                 out=os.path.join(work, f"{tag}{seed}.zarr"), progress=False, workers=0))


def _bytes_per_row(cache: str) -> dict:
  """The cache bytes per row that each method's student reads (teacher arrays only)."""
  spec = open_cache(cache).spec
  size = lambda name: spec.array(name).row_bytes  # noqa: E731
  logits = size("targets")
  pairs = {"hint": ["feature.stage1.map.m0"], "attention": ["feature.stage1.attention.m0",
                                                            "feature.stage2.attention.m0"],
           "similarity": ["feature.stage2.map.m0"]}
  return {"KD": logits, **{f"KD + {m}": logits + sum(size(a) for a in arrays) for m, arrays in pairs.items()}}


def validate(work: str, regime: str) -> dict:
  """Each method's validation accuracy (mean of the validation seeds) at each point of its grid, and KD's."""
  scores, tag = {}, REGIMES[regime]["label_fraction"]
  for seed in VALIDATION_SEEDS:
    cache = _teacher_cache(work, TRAIN, seed, VALID)
    scores.setdefault("KD", []).append(_student(os.path.join(work, f"valid{seed}-{tag}-kd"), cache, seed,
                                                regime)["accuracy"])
    for method, grid in GRIDS.items():
      for i, point in enumerate(grid):
        result = _student(os.path.join(work, f"valid{seed}-{tag}-{method}{i}"), cache, seed, regime,
                          **METHODS[method], **point)
        scores.setdefault(json.dumps({"method": method, **point}), []).append(result["accuracy"])
  return {setting: statistics.mean(values) for setting, values in scores.items()}


def test(work: str, seeds: int, regime: str, chosen: dict) -> list[dict]:
  rows, tag = [], REGIMES[regime]["label_fraction"]
  for seed in range(seeds):
    cache = _teacher_cache(work, "train", seed, "test")
    runs = {"scratch": _student(os.path.join(work, f"test{seed}-{tag}-scratch"), cache, seed, regime, alpha=1.0),
            "KD": _student(os.path.join(work, f"test{seed}-{tag}-kd"), cache, seed, regime)}
    for method, point in chosen.items():
      runs[f"KD + {method}"] = _student(os.path.join(work, f"test{seed}-{tag}-{method}"), cache, seed, regime,
                                        **METHODS[method], **point)
    teacher = open_cache(cache)
    labels = teacher["eval_labels"][:]
    rows.append({"seed": seed, "teacher": float(np.mean(np.argmax(teacher["eval_member_logits"][:, 0], -1) == labels)),
                 **{name: run["accuracy"] for name, run in runs.items()},
                 "epoch_seconds": {name: run["epoch_seconds"] for name, run in runs.items()}})
    print(regime, json.dumps(rows[-1]), flush=True)
  return rows


def main(argv: list[str] | None = None) -> None:
  global DATA_DIR  # noqa: PLW0603
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--work", help="working directory (default: a temporary one)")
  parser.add_argument("--data-dir", help="TFDS data dir of the digits (default: TFDS's own)")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
  parser.add_argument("--out", default="bench/results/features.json")
  args = parser.parse_args(argv)
  DATA_DIR = args.data_dir
  if args.smoke:
    _smoke()
  work = args.work or tempfile.mkdtemp(prefix="stillroom-features-")
  results = {}
  for regime in REGIMES:
    scores = validate(work, regime)
    print(f"{regime}: validation accuracy, mean of {len(VALIDATION_SEEDS)} seeds:", json.dumps(scores, indent=2),
          flush=True)
    chosen = {}
    for method in GRIDS:
      best = max((s for s in scores if s != "KD" and json.loads(s)["method"] == method), key=scores.get)
      chosen[method] = {k: v for k, v in json.loads(best).items() if k != "method"}
    results[regime] = {"validation": scores, "chosen": chosen, "test": test(work, args.seeds, regime, chosen)}
  bytes_per_row = _bytes_per_row(os.path.join(work, "full0.zarr"))
  write_json(args.out, {"regimes": results, "bytes_per_row": bytes_per_row,
                        "settings": {"teacher": TEACHER, "student": STUDENT, "teacher_epochs": TEACHER_EPOCHS,
                                     "regimes": REGIMES, "views": VIEWS, "features": FEATURES, "methods": METHODS}})
  for regime, result in results.items():
    rows, chosen = result["test"], result["chosen"]
    names = ["scratch", "KD", *[f"KD + {m}" for m in chosen]]
    teacher = [100 * row["teacher"] for row in rows]
    print(f"\n{regime}: test split, {args.seeds} paired seeds, teacher {paired_summary(teacher)}%; chosen on "
          f"validation: {json.dumps(chosen)}")
    print("| student (cnn-thin-deep) | test accuracy % | paired difference, pts | cache bytes per row | "
          "epoch time vs KD |")
    print("|---|---|---|---|---|")
    for name in names:
      accuracy = [100 * row[name] for row in rows]
      base = None if name == "scratch" else [100 * row["scratch" if name == "KD" else "KD"] for row in rows]
      ratio = [row["epoch_seconds"][name] / row["epoch_seconds"]["KD"] for row in rows]
      print(f"| {name} | {paired_summary(accuracy, base)}{' | ' if base is None else ''} | "
            f"{bytes_per_row.get(name, '-')} | {statistics.mean(ratio):.2f}x |")


if __name__ == "__main__":
  main()
