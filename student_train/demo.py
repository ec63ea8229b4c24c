"""The end-to-end pipeline: teachers -> caches -> scratch and distilled students over several seeds -> a table.

`run_demo(DemoConfig())` is what `make demo` (`student-train demo`) runs on the embedded `digits` dataset; point
`dataset`/`train_split`/`test_split` at any dataset (an `npz:` of flat features works: no augmentation then).

Every comparison is paired: student seed s initialises and orders the data identically in the scratch and the
distilled run, which train on the same (example, view) rows for the same epochs (fine-tuning included), the
scratch one with hard labels only (alpha = 1).
"""

import dataclasses
import json
import os
import sys
import time

import numpy as np

from shared.data import open_transfer_set
from shared.errors import StillroomError
from student_train.train import FitConfig, evaluate_runs, fit, fit_group
from teacher_cache.build import BuildConfig, build_cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
  """Settings of the demo pipeline. Defaults: the recipe chosen on a validation slice (see the README).

  The recipe is "patient and consistent" distillation (Beyer et al. 2022): many cached views per example, each
  seen by teacher and student alike, and many epochs, which the soft targets can use and hard labels cannot
  (scratch students stop improving, then overfit).
  """

  dataset: str = "digits"
  train_split: str = "train"
  test_split: str = "test"
  data_dir: str | None = None
  work_dir: str = "demo"
  results_dir: str = "results"
  teacher_model: str | None = None
  teachers: int = 3
  teacher_epochs: int = 30
  teacher_dropout: float = 0.2
  teacher_batch_size: int = 128
  views: int | None = None
  max_shift: int = 1
  temperature: float = 4.0
  alpha: float = 0.1
  student_model: str = "mlp-small"
  student_epochs: int = 100
  finetune_epochs: int = 5
  student_batch_size: int = 512
  student_lr: float = 1e-2
  seeds: int = 5
  folds: int = 3
  label_fraction: float = 0.1
  fraction_epochs: int = 250
  fraction_temperature: float = 8.0
  checkpoint_every: int = 25


# What each DemoConfig field means (also `student-train demo --help`).
DEMO_HELP = {
    "dataset": "'digits', 'npz:PATH' or a prepared TFDS name",
    "train_split": "transfer set: teachers train on it, caches cover it",
    "test_split": "split every model is evaluated on",
    "data_dir": "TFDS data dir",
    "work_dir": "runs and caches; a rerun reuses finished runs",
    "results_dir": "where demo.md, demo.json and demo.png go",
    "teacher_model": "default: cnn-large for images, mlp-large for flat vectors",
    "teachers": "ensemble size M",
    "views": "cached views per example; default: 16 for images, 1 for flat vectors",
    "max_shift": "view shift in pixels (zero-filled)",
    "temperature": "T of the caches and of the full-data students",
    "alpha": "hard-label weight of the distilled full-data students",
    "student_epochs": "full-data student epochs before fine-tuning",
    "finetune_epochs": "hard-label epochs after distillation (scratch students get them too)",
    "seeds": "paired student seeds per arm",
    "folds": "cross-fitting folds K (K x M extra teacher runs); 1 skips the cross-fitted arms",
    "label_fraction": "fraction of the examples for the hard vs soft regularizer arms; 1 skips them",
    "fraction_epochs": "epochs of the fraction arms (each epoch holds only the fraction's rows)",
    "fraction_temperature": "T of the soft-only fraction arms (alpha 0, no fine-tuning)",
    "checkpoint_every": "student epochs between checkpoints (epochs are tiny: saving each would dominate)",
}

def _log(message: str) -> None:
  print(f"demo: {message}", file=sys.stderr, flush=True)


def _mean_std(values: list[float]) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
          "values": [float(v) for v in values]}


def run_demo(config: DemoConfig) -> dict:
  """Runs the pipeline (finished runs are reused) and writes the results table; returns the results dict."""
  transfer_set = open_transfer_set(config.dataset, config.train_split, config.data_dir)
  images = len(transfer_set.input_shape) >= 2
  teacher_model = config.teacher_model or ("cnn-large" if images else "mlp-large")
  views = config.views or (16 if images else 1)
  if views > 1 and not images:
    raise StillroomError(f"views > 1 need image inputs; {config.dataset!r} holds flat vectors.")
  work = config.work_dir
  common = {"data_dir": config.data_dir, "progress": False, "eval_dataset": config.dataset,
            "eval_split": config.test_split}
  stages, started = {}, time.perf_counter()

  def stage_done(name: str, since: float) -> float:
    now = time.perf_counter()
    stages[name] = now - since
    _log(f"{name}: {stages[name]:.0f} s")
    return now

  def teacher(out: str, seed: int, **extra) -> str:
    fit(FitConfig(model=teacher_model, dataset=config.dataset, split=config.train_split, augment=images,
                  max_shift=config.max_shift, dropout=config.teacher_dropout, epochs=config.teacher_epochs,
                  seed=seed, batch_size=config.teacher_batch_size, out=out, **common, **extra))
    return out

  clock = time.perf_counter()
  teachers = [teacher(os.path.join(work, f"teacher{m}"), m) for m in range(config.teachers)]
  clock = stage_done("teachers", clock)
  crossfit = []
  if config.folds > 1:
    crossfit = [teacher(os.path.join(work, f"crossfit{m}_fold{k}"), m, folds=config.folds, holdout_fold=k)
                for m in range(config.teachers) for k in range(config.folds)]
    clock = stage_done(f"cross-fitted teachers ({config.teachers} x {config.folds} folds)", clock)

  settings = f"T{config.temperature:g}_v{views}"  # Caches and students of other settings live beside these.

  def cache(name: str, runs: list[str], folds: int = 1) -> str:
    out = os.path.join(work, f"{name}_{settings}.zarr")
    build_cache(BuildConfig(dataset=config.dataset, split=config.train_split, data_dir=config.data_dir,
                            teachers=tuple(runs), temperature=config.temperature, views=views,
                            max_shift=config.max_shift, folds=folds, out=out, progress=False))
    return out

  ordinary = cache("ensemble", teachers)
  crossfit_cache = cache("crossfit", crossfit, config.folds) if crossfit else None
  clock = stage_done("caches", clock)

  student = FitConfig(model=config.student_model, alpha=config.alpha, temperature=config.temperature,
                      epochs=config.student_epochs, finetune_epochs=config.finetune_epochs,
                      batch_size=config.student_batch_size, lr=config.student_lr,
                      checkpoint_every=config.checkpoint_every, **common)
  arms = {"scratch": (ordinary, {"alpha": 1.0}), "distilled (AM)": (ordinary, {}),
          "distilled (GM)": (ordinary, {"combine": "geometric"})}
  if crossfit_cache:
    arms["distilled (cross-fitted AM)"] = (crossfit_cache, {})
  students = _train_arms(arms, student, config.seeds, os.path.join(
      work, f"students_{settings}_a{config.alpha:g}_e{config.student_epochs}+{config.finetune_epochs}"))
  clock = stage_done(f"students ({len(arms)} arms x {config.seeds} seeds)", clock)
  fraction = {}
  if config.label_fraction < 1.0:
    few = dataclasses.replace(student, label_fraction=config.label_fraction, epochs=config.fraction_epochs,
                              finetune_epochs=0, temperature=config.fraction_temperature, alpha=0.0)
    fraction_arms = {"hard labels": (ordinary, {"alpha": 1.0}), "soft targets": (ordinary, {})}
    if crossfit_cache:
      fraction_arms["soft targets (cross-fitted)"] = (crossfit_cache, {})
    fraction = _train_arms(fraction_arms, few, config.seeds, os.path.join(
        work, f"fraction{config.label_fraction:g}_v{views}_T{config.fraction_temperature:g}_e{config.fraction_epochs}"))
    clock = stage_done(f"{config.label_fraction:.0%} of the examples ({len(fraction_arms)} arms x "
                       f"{config.seeds} seeds)", clock)
  evaluations = {f"teacher {m}": evaluate_runs([t], config.dataset, config.test_split, config.data_dir)["accuracy"]
                 for m, t in enumerate(teachers)}
  for combine in ("arithmetic", "geometric"):
    evaluations[f"ensemble ({combine[:1].upper()}M)"] = evaluate_runs(
        teachers, config.dataset, config.test_split, config.data_dir, combine)["accuracy"]
  stage_done("evaluation", clock)
  results = _summarise(config, teacher_model, views, evaluations, students, fraction, stages,
                       time.perf_counter() - started)
  _write_results(config.results_dir, results)
  return results


def _train_arms(arms: dict[str, tuple[str, dict]], base: FitConfig, seeds: int, out: str) -> dict[str, list[float]]:
  """Trains every arm for seeds 0..seeds-1; returns each arm's test accuracies in seed order.

  Arms of one seed that read the same cache share its batch stream (paired: same rows, same order) and train
  together in one vmapped step (`fit_group`).

  Args:
    arms: name -> (cache path, FitConfig fields that differ from `base`).
    base: the settings the arms share.
    seeds: number of paired seeds.
    out: directory of the arms' run dirs.
  """
  accuracies: dict[str, list[float]] = {name: [] for name in arms}
  for seed in range(seeds):
    by_cache: dict[str, list[tuple[str, FitConfig]]] = {}
    for name, (cache_path, extra) in arms.items():
      slug = name.replace(" ", "_").replace("(", "").replace(")", "")
      by_cache.setdefault(cache_path, []).append((name, dataclasses.replace(
          base, cache=cache_path, seed=seed, out=os.path.join(out, f"{slug}_seed{seed}"), **extra)))
    for runs in by_cache.values():
      for (name, _), final in zip(runs, fit_group([run for _, run in runs])):
        accuracies[name].append(final["eval_accuracy"])
  return accuracies


def _summarise(config, teacher_model, views, evaluations, students, fraction, stages, seconds) -> dict:
  ensemble = evaluations["ensemble (AM)"]
  scratch = np.array(students["scratch"])
  arms = {}
  for name, values in students.items():
    values = np.array(values)
    arm = _mean_std(values)
    if name != "scratch":
      gap = ensemble - scratch.mean()
      arm["gap_closed"] = float((values.mean() - scratch.mean()) / gap) if gap > 0 else None
      arm["paired_gain"] = _mean_std(values - scratch)
    arms[name] = arm
  fraction_arms = {name: _mean_std(values) for name, values in fraction.items()}
  for name, arm in fraction_arms.items():
    if name != "hard labels":
      hard = fraction_arms["hard labels"]
      arm["paired_gain"] = _mean_std(np.array(arm["values"]) - np.array(hard["values"]))
      # The regularizer claim: a gain larger than twice the larger of the two arms' standard deviations.
      arm["gain_over_2_std"] = arm["mean"] - hard["mean"] > 2 * max(arm["std"], hard["std"])
  return {"config": dataclasses.asdict(config), "teacher_model": teacher_model, "views": views,
          "teachers": evaluations, "students": arms, "label_fraction": fraction_arms, "stage_seconds": stages,
          "total_seconds": seconds}


def format_table(results: dict) -> str:
  """The results as Markdown tables (accuracy on the test split; students mean ± std over seeds)."""
  config = results["config"]
  lines = [f"Dataset `{config['dataset']}` ({config['train_split']} -> {config['test_split']}); teachers "
           f"{config['teachers']} x `{results['teacher_model']}`, {results['views']} views, "
           f"T={config['temperature']:g}, alpha={config['alpha']:g}; student `{config['student_model']}`, "
           f"{config['student_epochs']} + {config['finetune_epochs']} fine-tune epochs (batch "
           f"{config['student_batch_size']}, lr {config['student_lr']:g}), {config['seeds']} paired seeds.", "",
           f"| model | accuracy on {config['test_split']} | gap closed | paired gain vs scratch |",
           "|---|---|---|---|"]
  for name, accuracy in results["teachers"].items():
    lines.append(f"| {name} | {100 * accuracy:.2f}% | | |")
  for name, arm in results["students"].items():
    gap = "" if "paired_gain" not in arm else (
        "n/a (scratch >= ensemble)" if arm["gap_closed"] is None else f"{100 * arm['gap_closed']:+.0f}%")
    gain = "" if "paired_gain" not in arm else \
        f"{100 * arm['paired_gain']['mean']:+.2f} ± {100 * arm['paired_gain']['std']:.2f} pts"
    lines.append(f"| student, {name} | {100 * arm['mean']:.2f} ± {100 * arm['std']:.2f}% | {gap} | {gain} |")
  if results["label_fraction"]:
    lines += ["", f"With {config['label_fraction']:.0%} of the examples (all their views), "
              f"{config['fraction_epochs']} epochs; soft targets at T={config['fraction_temperature']:g}, alpha=0:",
              "", f"| student | accuracy on {config['test_split']} | paired gain vs hard labels | "
              "gain > 2 × larger std |",
              "|---|---|---|---|"]
    for name, arm in results["label_fraction"].items():
      gain = "" if "paired_gain" not in arm else \
          f"{100 * arm['paired_gain']['mean']:+.2f} ± {100 * arm['paired_gain']['std']:.2f} pts"
      verdict = "" if "gain_over_2_std" not in arm else ("yes" if arm["gain_over_2_std"] else "no")
      lines.append(f"| {name} | {100 * arm['mean']:.2f} ± {100 * arm['std']:.2f}% | {gain} | {verdict} |")
  lines += ["", "| stage | seconds |", "|---|---|"]
  lines += [f"| {name} | {seconds:.0f} |" for name, seconds in results["stage_seconds"].items()]
  lines.append(f"| total | {results['total_seconds']:.0f} |")
  return "\n".join(lines)


def _write_results(results_dir: str, results: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(results_dir, exist_ok=True)
  table = format_table(results)
  with open(os.path.join(results_dir, "demo.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(results_dir, "demo.json"), "w") as f:
    json.dump(results, f, indent=2)
  names = list(results["teachers"]) + [f"student\n{n}" for n in results["students"]] + \
      [f"{results['config']['label_fraction']:.0%}\n{n}" for n in results["label_fraction"]]
  names = [name.replace(" (", "\n(") for name in names]
  means = [100 * v for v in results["teachers"].values()] + \
      [100 * a["mean"] for a in (*results["students"].values(), *results["label_fraction"].values())]
  stds = [0.0] * len(results["teachers"]) + \
      [100 * a["std"] for a in (*results["students"].values(), *results["label_fraction"].values())]
  figure, axis = plt.subplots(figsize=(max(8, 1.1 * len(names)), 4.5))
  colors = ["#7f7f7f"] * len(results["teachers"]) + ["#1f77b4"] * len(results["students"]) + \
      ["#ff7f0e"] * len(results["label_fraction"])
  axis.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
  axis.set_xticks(range(len(names)), names, fontsize=7)
  axis.set_ylabel("test accuracy (%)")
  axis.set_ylim(max(0, min(means) - 5), 100)
  axis.set_title(f"stillroom demo on {results['config']['dataset']} (students: mean ± std over seeds)")
  figure.tight_layout()
  figure.savefig(os.path.join(results_dir, "demo.png"), dpi=120)
  plt.close(figure)
  print(table)
  _log(f"wrote {results_dir}/demo.md, demo.json, demo.png")
