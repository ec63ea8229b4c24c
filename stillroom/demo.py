"""The end-to-end pipeline: teachers -> caches -> scratch and distilled students over several seeds -> a table.

`run_demo(DemoConfig())` is what `make demo` (`student-train demo`) runs on the embedded `digits` dataset; point
`dataset`/`train_split`/`test_split` at any dataset (an `npz:` of flat features works: no augmentation then).

Every comparison is paired: student seed s initialises and orders the data identically in the scratch and the
distilled run, which train on the same (example, view) rows for the same epochs (fine-tuning included), the
scratch one with hard labels only (alpha = 1).
"""

import argparse
import dataclasses
import json
import os
import time
import typing
from typing import ClassVar

import numpy as np

from shared import distributed
from shared.cache import eval_accuracies, open_cache
from shared.data import open_transfer_set
from shared.errors import StillroomError
from shared.cache import validate_settings
from shared.log import logger, progress
from shared.options import DEMO, DEMO_STAGES, DatasetSettings, resolve_dataset, text_options
from shared.settings import add_options, at_least, check_values, from_args, positive_finite, setting, workers_check
from student_train.config import FitConfig, validate_config
from student_train.train import fit_group
from teacher_cache.build import BuildConfig, build_cache, default_chunk_rows

AUTO = "auto"  # Teacher model and views chosen from the data: see `DemoConfig`.


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig(DatasetSettings):
  """Settings of the demo pipeline. Defaults: the recipe chosen on a validation slice (docs/soft-targets.md).

  The recipe is "patient and consistent" distillation (Beyer et al. 2022): many cached views per example, each
  seen by teacher and student alike, and many epochs, which the soft targets can use and hard labels cannot
  (scratch students stop improving, then overfit).

  `teacher`, `build` and `student` are the settings of each stage's `fit` or `build`; the demo fills in the data,
  the run dirs and the caches. A teacher model or a view count of "auto" / 0 is chosen from the data: `cnn-large`
  and 16 views for images, `mlp-large` and 1 view for flat vectors.
  """

  COMMANDS: ClassVar[tuple[str, ...]] = (DEMO,)

  train_split: str = setting("train", "transfer set: teachers train on it, caches cover it", group="data")
  test_split: str = setting("test", "split every model is evaluated on (the caches store the teachers' logits on it)",
                            group="data")
  eval_dataset: str | None = setting(None, "the dataset of --test-split (default: --dataset), e.g. "
                                           "'imagefolder:DIR' of held-out images", group="data")
  image_size: int | None = setting(None, "natural images: teachers train on random-resized crops at SxS and the "
                                         "caches hold crop views (see `teacher-cache build --image-size`)",
                                   metavar="S", group="views")
  shapes: bool = setting(False, "the natural-image demo: write the shapes image set (scripts/make_shapes.py) into "
                                "--work-dir/shapes/data, and compare a resnet8 student distilled from resnet20 "
                                "teachers with the same student from scratch, at equal steps; results in "
                                "--results-dir/shapes (a preset that sets the stage settings, the teacher count and "
                                "the arms: image size 32, 2 resnet20 teachers on random-resized crops, 4 crop views, "
                                "resnet8 students each trained on its own, no GM, cross-fitting or fraction arms)",
                         group="data")
  text: bool = setting(False, "the text demo: the standard library's own .py sources (the packages of "
                              "`stillroom.demo.STDLIB_TEXT`, copied into --work-dir/stdlib-<python version>) as "
                              "byte tokens in rows of 128; the first 768 rows of the training files (98k tokens) are "
                              "the transfer set, the first 192 rows of other files (24k tokens) the held-out text; one "
                              "`lm-small` teacher (3 epochs), dense, topk:8 and sample:6 caches at T=1 (topk:8 and "
                              "sample:6 store 36 B/token each), `lm-tiny` students from each (alpha 0.5) and from hard "
                              "labels, 2 epochs each (equal steps), 3 paired seeds; results in --results-dir/text (a "
                              "preset: it sets the data, the stage settings, the teacher count, the seeds and the "
                              "arms; sizes in `stillroom.demo.TextDemo`)", group="data")
  work_dir: str = setting("demo", "runs and caches; a rerun reuses finished runs", group="run")
  results_dir: str = setting("results", "where demo.md, demo.json and demo.png go", group="run")
  teachers: int = setting(3, "ensemble size M", group="teachers", check=at_least(1))
  seeds: int = setting(5, "paired student seeds per arm", group="run", check=at_least(1))
  together: bool = setting(True, "train a seed's arms that read one cache in one vmapped step; --no-together: each "
                                 "run on its own, on the same rows in the same order (on a CPU, convolutional "
                                 "students train faster on their own)", group="run")
  folds: int = setting(3, "cross-fitting folds K (K x M extra teacher runs); 1 skips the cross-fitted arms",
                       group="teachers", check=at_least(1))
  geometric_arm: bool = setting(True, "also a student distilled from the teachers' geometric mean (the GM arm)",
                                group="distillation")
  label_fraction: float = setting(0.1, "fraction of the examples for the hard vs soft regularizer arms; 1 skips "
                                       "them", group="distillation",
                                  check=lambda v: 0 < v <= 1 or "must be in (0, 1]")
  fraction_epochs: int = setting(250, "epochs of the fraction arms (each epoch holds only the fraction's rows)",
                                 group="distillation", check=at_least(1))
  fraction_temperature: float = setting(8.0, "T of the soft-only fraction arms (alpha 0, no fine-tuning)",
                                        group="distillation", check=positive_finite)
  teacher: FitConfig = setting(FitConfig(model=AUTO, epochs=30, dropout=0.2, batch_size=128), "teacher runs",
                               commands=(), given_by="--teacher-")  # The fields declared for `demo.teacher`.
  build: BuildConfig = setting(BuildConfig(temperature=4.0, views=0, max_shift=1, progress=False), "the caches",
                               commands=(), given_by="--build-")
  student: FitConfig = setting(
      # Tiny epochs: checkpointing every epoch would dominate the run time.
      FitConfig(model="mlp-small", alpha=0.1, epochs=100, finetune_epochs=5, batch_size=512, lr=1e-2,
                checkpoint_every=25),
      "full-data students (scratch ones use alpha=1; T is the cache's)", commands=(), given_by="--student-")


# The stage settings `student-train demo` offers, as --teacher-*, --build-* and --student-* options: the fields
# of each stage's config declared for its command (`shared.options.DEMO_STAGES`).
STAGES = {stage: typing.get_type_hints(DemoConfig)[stage] for stage in DEMO_STAGES}


def add_demo_options(parser: argparse.ArgumentParser) -> None:
  """The demo's own settings, then each stage's, with the demo's defaults."""
  add_options(parser, DemoConfig, DEMO)
  defaults = DemoConfig()
  notes = {"teacher": f"--teacher-model {AUTO}: cnn-large for images, mlp-large for flat vectors",
           "build": "--build-views 0: 16 views for images, 1 for flat vectors",
           "student": "scratch students use alpha 1; T is the cache's"}
  for stage, cls in STAGES.items():
    add_options(parser.add_argument_group(f"{stage} settings", notes[stage]), cls, DEMO_STAGES[stage],
                prefix=f"{stage}_", defaults=getattr(defaults, stage), grouped=False)


def demo_config_from_args(args: argparse.Namespace) -> tuple["DemoConfig", bool]:
  """The `DemoConfig` of a parsed `student-train demo` command line, and whether it asked for -v."""
  defaults = DemoConfig()
  stages = {stage: from_args(cls, args, prefix=f"{stage}_", base=getattr(defaults, stage))
            for stage, cls in STAGES.items()}
  return from_args(DemoConfig, args, **stages), args.verbose


_LOG = logger(__name__)


def _mean_std(values: list[float]) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
          "values": [float(v) for v in values]}


class _StageBar:
  """One progress bar per stage: run-epochs done, runs finished, rows/s and the ETA."""

  def __init__(self, name: str, runs: int, epochs_per_run: int):
    self.runs, self.epochs_per_run, self.finished, self.rows, self.epochs = runs, epochs_per_run, 0, 0, 0
    self.tokens = 0
    self.started = time.perf_counter()
    self.bar = progress(total=runs * epochs_per_run, desc=name, unit="epoch", dynamic_ncols=True)

  def on_epoch(self, plan, line: dict) -> None:
    self.rows += line.get("rows", 0)
    self.tokens += line.get("tokens", 0)  # A language model's line counts its tokens instead.
    self._advance(1)

  def runs_done(self, count: int) -> None:
    """Marks runs finished (reused ones included), so the bar also counts the epochs they did not need now."""
    self.finished += count
    self._advance(self.finished * self.epochs_per_run - self.epochs)

  def _advance(self, epochs: int) -> None:
    self.epochs += epochs
    self.bar.update(epochs)
    self._postfix()

  def _postfix(self) -> None:
    count, unit = (self.tokens, "tokens") if self.tokens else (self.rows, "rows")
    self.bar.set_postfix_str(f"runs {self.finished}/{self.runs}, "
                             f"{count / max(time.perf_counter() - self.started, 1e-9):,.0f} {unit}/s")

  def close(self) -> float:
    self.bar.close()
    return time.perf_counter() - self.started


class _Stages:
  """Trains the stages of a pipeline, each's groups of runs under one progress bar, and keeps each's seconds."""

  def __init__(self, verbose: bool = False):
    self.verbose, self.seconds = verbose, {}

  def train(self, name: str, groups: list[list[FitConfig]]) -> list[list[dict]]:
    """Trains groups of runs (each group together, in one vmapped step); returns each run's final metrics line."""
    runs = [run for group in groups for run in group]
    bar = _StageBar(name, len(runs), runs[0].epochs + runs[0].finetune_epochs)
    finals = []
    for group in groups:
      finals.append(fit_group(group, log_epochs=self.verbose, on_epoch=bar.on_epoch))
      bar.runs_done(len(group))
    self.seconds[name] = self.seconds.get(name, 0.0) + bar.close()
    return finals


def validate_demo(config: DemoConfig) -> None:
  """Checks every setting of every stage before the first one runs (a bad student setting must not surface after
  minutes of teacher training).

  Raises:
    StillroomError: naming the option as `student-train demo` spells it.
  """
  check_values(config)  # The demo's own settings; the stages' are checked as `fit` and `build` check them.
  placeholder = {"out": "placeholder"}
  validate_config(dataclasses.replace(config.teacher, model="mlp-small" if config.teacher.model == AUTO
                                      else config.teacher.model, dataset=config.dataset, **placeholder), "teacher_")
  validate_config(dataclasses.replace(config.student, cache="placeholder", **placeholder), "student_")
  build = config.build
  try:
    views = build.views or 1
    validate_settings(temperature=build.temperature, combine=build.combine, dtype=build.dtype, views=views,
                      chunk_rows=build.chunk_rows or default_chunk_rows(views), seed=build.seed)
  except StillroomError as e:
    raise StillroomError(f"build settings: {e}") from e
  if workers_check(build.workers) is not True:
    raise StillroomError(f"--build-workers {workers_check(build.workers)}, got {build.workers}.")


def run_demo(config: DemoConfig, verbose: bool = False, text_sizes: "TextDemo | None" = None) -> dict:
  """Runs the pipeline (finished runs are reused) and writes the results table; returns the results dict.

  Args:
    config: the settings.
    verbose: log every run's every epoch (always in each run's metrics.jsonl); otherwise one bar per stage.
    text_sizes: with `config.text`, the text demo's sizes and settings (default: `TextDemo()`).
  """
  distributed.one_process_only("student-train demo")
  if config.text:
    return run_text_demo(config, text_sizes or TextDemo(), verbose)
  config = dataclasses.replace(config, dataset=resolve_dataset(config.dataset))
  if config.shapes:
    config = _shapes_preset(config)
  validate_demo(config)
  transfer_set = open_transfer_set(config.dataset, config.train_split, config.data_dir, text=text_options(config))
  tested = open_transfer_set(config.eval_dataset or config.dataset, config.test_split, config.data_dir,
                             text=text_options(config))
  if not tested.labeled:  # The demo's results are accuracies.
    raise StillroomError(f"{tested.name!r} {config.test_split!r} is unlabeled; the demo compares accuracies on it, "
                         "which need labels: give a labeled --test-split (or --eval-dataset).")
  images = len(transfer_set.input_shape) >= 2
  crops = {"image_size": config.image_size, "crop_area": config.build.crop_area,
           "crop_aspect": config.build.crop_aspect}
  teacher_model = config.teacher.model if config.teacher.model != AUTO else ("cnn-large" if images else "mlp-large")
  views = config.build.views or (16 if images else 1)
  if views > 1 and not images:
    raise StillroomError(f"views > 1 need image inputs; {config.dataset!r} holds flat vectors.")
  work = config.work_dir
  data = {"data_dir": config.data_dir, "progress": False, "eval_dataset": config.eval_dataset or config.dataset,
          "eval_split": config.test_split}
  teacher_base = dataclasses.replace(config.teacher, model=teacher_model, dataset=config.dataset,
                                     split=config.train_split, augment=images, max_shift=config.build.max_shift,
                                     flip=config.build.flip, **crops, **data)
  trainer, started = _Stages(verbose), time.perf_counter()
  train_stage, stages = trainer.train, trainer.seconds

  teachers = [dataclasses.replace(teacher_base, seed=m, out=os.path.join(work, f"teacher{m}"))
              for m in range(config.teachers)]
  train_stage("teachers", [[run] for run in teachers])
  crossfit = []
  if config.folds > 1:
    crossfit = [dataclasses.replace(teacher_base, seed=m, folds=config.folds, holdout_fold=k,
                                    out=os.path.join(work, f"crossfit{m}_fold{k}"))
                for m in range(config.teachers) for k in range(config.folds)]
    train_stage(f"cross-fitted teachers ({config.teachers} x {config.folds} folds)", [[run] for run in crossfit])

  settings = f"T{config.build.temperature:g}_v{views}"  # Caches and students of other settings live beside these.

  def cache(name: str, runs: list[FitConfig], folds: int = 1) -> str:
    out = os.path.join(work, f"{name}_{settings}.zarr")
    build_cache(dataclasses.replace(config.build, dataset=config.dataset, split=config.train_split,
                                    data_dir=config.data_dir, eval_dataset=config.eval_dataset,
                                    eval_split=config.test_split, image_size=config.image_size,
                                    teachers=tuple(run.out for run in runs), views=views, folds=folds, out=out))
    return out

  clock = time.perf_counter()
  ordinary = cache("ensemble", teachers)
  crossfit_cache = cache("crossfit", crossfit, config.folds) if crossfit else None
  stages["caches"] = time.perf_counter() - clock
  _LOG.info(f"caches: {stages['caches']:.0f} s")

  student = dataclasses.replace(config.student, **data)
  arms = {"scratch": (ordinary, {"alpha": 1.0}), "distilled (AM)": (ordinary, {})}
  if config.geometric_arm:
    arms["distilled (GM)"] = (ordinary, {"combine": "geometric"})
  if crossfit_cache:
    arms["distilled (cross-fitted AM)"] = (crossfit_cache, {})
  students = _train_arms(train_stage, f"students ({len(arms)} arms x {config.seeds} seeds)", arms, student,
                         config.seeds, os.path.join(work, f"students_{settings}_a{student.alpha:g}_e"
                                                          f"{student.epochs}+{student.finetune_epochs}"),
                         config.together)
  fraction = {}
  if config.label_fraction < 1.0:
    few = dataclasses.replace(student, label_fraction=config.label_fraction, epochs=config.fraction_epochs,
                              finetune_epochs=0, temperature=config.fraction_temperature, alpha=0.0)
    fraction_arms = {"hard labels": (ordinary, {"alpha": 1.0}), "soft targets": (ordinary, {})}
    if crossfit_cache:
      fraction_arms["soft targets (cross-fitted)"] = (crossfit_cache, {})
    fraction = _train_arms(
        train_stage, f"{config.label_fraction:.0%} of the examples ({len(fraction_arms)} arms x {config.seeds} "
        "seeds)", fraction_arms, few, config.seeds,
        os.path.join(work, f"fraction{config.label_fraction:g}_v{views}_T{config.fraction_temperature:g}_e"
                           f"{config.fraction_epochs}"), config.together)
  # The teachers' accuracies from the logits the cache stored on the test split: no teacher runs again.
  accuracies = eval_accuracies(open_cache(ordinary))
  evaluations = {f"teacher {m}": accuracy for m, accuracy in enumerate(accuracies["members"])}
  evaluations.update({"ensemble (AM)": accuracies["arithmetic"], "ensemble (GM)": accuracies["geometric"]})
  results = _summarise(config, teacher_model, views, evaluations, students, fraction, stages,
                       time.perf_counter() - started)
  _write_results(config.results_dir, results)
  return results


def _shapes_preset(config: DemoConfig) -> DemoConfig:
  """The natural-image demo (`--shapes`): the shapes set written into the work dir (once), crop views at 32x32."""
  work, results = os.path.join(config.work_dir, "shapes"), os.path.join(config.results_dir, "shapes")
  root = write_shapes_once(os.path.join(work, "data"))
  _LOG.info("--shapes sets the stage settings, the teacher count and the arms (other --teacher-*/--build-*/"
            f"--student-* options but --*-workers, and --teachers, --together, --geometric-arm are replaced): "
            f"{SHAPES_SUMMARY}")
  return shapes_stages(dataclasses.replace(
      config, work_dir=work, results_dir=results, dataset=f"imagefolder:{root}/train", train_split="train",
      eval_dataset=f"imagefolder:{root}/test", test_split="train"))


def write_shapes_once(root: str) -> str:
  """Writes the shapes set (`shared.shapes`, default settings) into `root` unless it is there; returns `root`.

  Raises:
    StillroomError: `root` is there but incomplete, or an interrupted write left `root.partial`.
  """
  from shared.shapes import write_shapes  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(os.path.join(root, "test")):
    if os.path.exists(root):
      raise StillroomError(f"{root!r} exists but is not a complete shapes set; delete it to have it written again.")
    counts = write_shapes(root + ".partial") if not os.path.exists(root + ".partial") else None
    if counts is None:
      raise StillroomError(f"{root}.partial is left by an interrupted write; delete it and run again.")
    os.rename(root + ".partial", root)
  return root


SHAPES_SUMMARY = ("2 resnet20 teachers, 8 epochs on random-resized crops at 32x32; 4 crop views at T=4; resnet8 "
                  "students, 4 epochs of the views (alpha 0.1), scratch and AM arms, each run on its own")


def shapes_stages(config: DemoConfig) -> DemoConfig:
  """The stage settings of `--shapes` on the data `config` names: chosen on a validation slice of the shapes set's
  training images (`scripts/recipe_search.py --shapes`; docs/data.md)."""
  crop = {"crop_area": (0.35, 1.0)}
  return dataclasses.replace(
      config, image_size=config.image_size or 32, teachers=2, folds=1, label_fraction=1.0, geometric_arm=False,
      together=False,
      teacher=dataclasses.replace(config.teacher, model="resnet20", epochs=8, dropout=0.0, batch_size=64),
      build=dataclasses.replace(config.build, views=4, flip=True, temperature=4.0, **crop),
      student=dataclasses.replace(config.student, model="resnet8", epochs=4, finetune_epochs=0, batch_size=64,
                                  lr=3e-3, alpha=0.1, checkpoint_every=1))


def _train_arms(train_stage, stage: str, arms: dict[str, tuple[str, dict]], base: FitConfig, seeds: int,
                out: str, together: bool = True, key: str | None = "eval_accuracy") -> dict[str, list]:
  """Trains every arm for seeds 0..seeds-1; returns each arm's test accuracies (its final lines' `key`, or with
  `key` None the final lines) in seed order.

  Arms of one seed that read the same cache share its batch stream (paired: same rows, same order) and, with
  `together`, train together in one vmapped step; otherwise each trains on its own, on the same stream.

  Args:
    train_stage: trains groups of runs under one progress bar.
    stage: the stage's name.
    arms: name -> (cache path, FitConfig fields that differ from `base`).
    base: the settings the arms share.
    seeds: number of paired seeds.
    out: directory of the arms' run dirs.
    together: train the arms of one seed and cache in one group.
  """
  groups, names = [], []
  for seed in range(seeds):
    by_cache: dict[str, list[tuple[str, FitConfig]]] = {}
    for name, (cache_path, extra) in arms.items():
      slug = _slug(name)
      by_cache.setdefault(cache_path, []).append((name, dataclasses.replace(
          base, cache=cache_path, seed=seed, out=os.path.join(out, f"{slug}_seed{seed}"), **extra)))
    for runs in by_cache.values():
      for group in ([runs] if together else [[run] for run in runs]):
        groups.append([run for _, run in group])
        names.append([name for name, _ in group])
  accuracies: dict[str, list[float]] = {name: [] for name in arms}
  for group_names, finals in zip(names, train_stage(stage, groups)):
    for name, final in zip(group_names, finals):
      accuracies[name].append(final if key is None else final[key])
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


def _stage_rows(results: dict) -> list[str]:
  """The demo table's last part: each stage's seconds and the total."""
  return ["", "| stage | seconds |", "|---|---|",
          *(f"| {name} | {seconds:.0f} |" for name, seconds in results["stage_seconds"].items()),
          f"| total | {results['total_seconds']:.0f} |"]


def _write_table(results_dir: str, table: str, results: dict) -> None:
  """Writes a demo's `demo.md` (its table) and `demo.json` (its results), before its figure is drawn."""
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, "demo.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(results_dir, "demo.json"), "w") as f:
    json.dump(results, f, indent=2)


def _write_figure(results_dir: str, table: str, figure) -> None:
  """Writes a demo's `demo.png` (its figure, then closed) and prints its table."""
  import matplotlib.pyplot as plt

  figure.tight_layout()
  figure.savefig(os.path.join(results_dir, "demo.png"), dpi=120)
  plt.close(figure)
  print(table)
  _LOG.info(f"wrote {results_dir}/demo.md, demo.json, demo.png")


def format_table(results: dict) -> str:
  """The results as Markdown tables (accuracy on the test split; students mean ± std over seeds)."""
  config = results["config"]
  student = config["student"]
  tested = config["test_split"] if not config.get("eval_dataset") else \
      f"`{config['eval_dataset']}` {config['test_split']}"
  where = config["test_split"] if not config.get("eval_dataset") else "the eval dataset"
  lines = [f"Dataset `{config['dataset']}` ({config['train_split']} -> {tested}); teachers "
           f"{config['teachers']} x `{results['teacher_model']}`, {results['views']} views, "
           f"T={config['build']['temperature']:g}, alpha={student['alpha']:g}; student `{student['model']}`, "
           f"{student['epochs']} + {student['finetune_epochs']} fine-tune epochs (batch "
           f"{student['batch_size']}, lr {student['lr']:g}), {config['seeds']} paired seeds.", "",
           f"| model | accuracy on {where} | gap closed | paired gain vs scratch |",
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
              "", f"| student | accuracy on {where} | paired gain vs hard labels | "
              "gain > 2 × larger std |",
              "|---|---|---|---|"]
    for name, arm in results["label_fraction"].items():
      gain = "" if "paired_gain" not in arm else \
          f"{100 * arm['paired_gain']['mean']:+.2f} ± {100 * arm['paired_gain']['std']:.2f} pts"
      verdict = "" if "gain_over_2_std" not in arm else ("yes" if arm["gain_over_2_std"] else "no")
      lines.append(f"| {name} | {100 * arm['mean']:.2f} ± {100 * arm['std']:.2f}% | {gain} | {verdict} |")
  return "\n".join(lines + _stage_rows(results))


def _write_results(results_dir: str, results: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  table = format_table(results)
  _write_table(results_dir, table, results)
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
  _write_figure(results_dir, table, figure)


# --- The text demo (`--text`) ---

# The standard library's packages the text demo reads, by role: every `.py` file under each (none of them under a
# test/ folder, all UTF-8), copied from `sysconfig.get_paths()["stdlib"]` keeping their relative paths. The test
# and validation files are other files than the training ones: a document never crosses from one to the other.
STDLIB_TEXT = {"train": ("email", "html", "http", "json", "logging", "urllib", "wsgiref"),
               "valid": ("collections", "dbm", "sqlite3", "tomllib"),
               "test": ("concurrent/futures", "xml/dom", "zoneinfo")}


@dataclasses.dataclass(frozen=True)
class TextDemo:
  """Sizes and settings of the text demo (`student-train demo --text`).

  Defaults: byte tokens in rows of 128; the first 768 packed rows of the training files (98,304 tokens) are the
  transfer set, the first 192 rows of the test files (24,576 tokens) the held-out text; one `lm-small` teacher, 3
  epochs; `lm-tiny` students, 2 epochs, batch 16 (96 steps), 3 paired seeds. The results table gives each stage's
  seconds (at T=2, on 2 CPU cores shared with other jobs, load average 6-12: 50 minutes in all, the teacher 23 at
  ~220 tokens/s, the caches 7, the students 19). Caches at T=1, students alpha 0.5: what `scripts/text_study.py`
  chose on the validation files. `topk:8` and `sample:6` store 36 bytes per token each (ids uint16 and
  log-probabilities float16; topk's rest float32, sample's counts uint16), dense 512.

  Attributes:
    seq_len: L of the packed rows.
    train_rows, test_rows: the first rows of the training and the test files' packing (None: all).
    teacher_epochs, student_epochs: epochs over the transfer set.
    batch_size: rows per step of teachers and students.
    teacher_lr, student_lr: peak learning rates (cosine schedule).
    temperature, alpha: the caches' T and the distilled students' weight of the hard-label term.
    topk, sample: K of each `topk:K` cache and of the `sample:K` cache.
    teachers, seeds: the ensemble size M and the paired student seeds (they replace --teachers and --seeds).
    teacher_model, student_model: registry names.
    held_out: which files are the held-out text: "test" (the demo) or "valid" (choosing settings).
  """

  seq_len: int = 128
  train_rows: int | None = 768
  test_rows: int | None = 192
  teacher_epochs: int = 3
  student_epochs: int = 2
  batch_size: int = 16
  teacher_lr: float = 1e-3
  student_lr: float = 3e-3
  temperature: float = 1.0
  alpha: float = 0.5
  topk: tuple[int, ...] = (8,)
  sample: int = 6
  teachers: int = 1
  seeds: int = 3
  teacher_model: str = "lm-small"
  student_model: str = "lm-tiny"
  held_out: str = "test"


def stdlib_files(role: str) -> list[str]:
  """The text demo's files of a role of `STDLIB_TEXT`, relative to the standard library's folder, sorted."""
  import sysconfig  # pylint: disable=import-outside-toplevel
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for package in STDLIB_TEXT[role]:
    for folder, dirs, files in os.walk(os.path.join(root, package)):
      dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "__pycache__"))
      found += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
  return sorted(found)


def write_stdlib_once(root: str) -> str:
  """Copies the text demo's standard-library files into root/{train,valid,test} unless they are there; returns
  `root`. (The `text:` source fingerprints their content, so another Python's files make other runs.)

  Raises:
    StillroomError: `root` is there but incomplete.
  """
  import shutil  # pylint: disable=import-outside-toplevel
  import sysconfig  # pylint: disable=import-outside-toplevel
  if os.path.isdir(os.path.join(root, "test")):
    return root
  if os.path.exists(root):
    raise StillroomError(f"{root!r} exists but is not a complete copy of the demo's stdlib files; delete it to have "
                         "it written again.")
  partial = root + ".partial"
  shutil.rmtree(partial, ignore_errors=True)  # A copy, never the only one: the stdlib is where it was.
  stdlib = sysconfig.get_paths()["stdlib"]
  for role in ("train", "valid", "test"):  # "test" last: its folder marks a complete copy.
    for path in stdlib_files(role):
      os.makedirs(os.path.dirname(os.path.join(partial, role, path)), exist_ok=True)
      shutil.copyfile(os.path.join(stdlib, path), os.path.join(partial, role, path))
  os.rename(partial, root)
  return root


def _tag(sizes: TextDemo) -> str:
  """The transfer set's part of the text demo's run and cache names (no brackets: orbax refuses them)."""
  return f"L{sizes.seq_len}_r{sizes.train_rows or 'all'}"


def _rows(rows: int | None) -> str:
  return "train" if rows is None else f"train[:{rows}]"


def text_data(config: DemoConfig, sizes: TextDemo) -> dict:
  """The text demo's data: {"root", "dataset", "split", "eval_dataset", "eval_split"} (the copied stdlib files)."""
  import platform  # pylint: disable=import-outside-toplevel
  root = write_stdlib_once(os.path.join(config.work_dir, f"stdlib-{platform.python_version()}"))
  return {"root": root, "dataset": f"text:{root}/train", "split": _rows(sizes.train_rows),
          "eval_dataset": f"text:{root}/{sizes.held_out}", "eval_split": _rows(sizes.test_rows)}


def text_teachers(config: DemoConfig, sizes: TextDemo, data: dict, stages: _Stages) -> tuple[list[str], list[dict]]:
  """Trains (or reuses) the text demo's teachers; returns their run dirs and final lines."""
  base = dataclasses.replace(
      config.teacher, model=sizes.teacher_model, dataset=data["dataset"], split=data["split"],
      eval_dataset=data["eval_dataset"], eval_split=data["eval_split"], seq_len=sizes.seq_len,
      data_dir=config.data_dir, epochs=sizes.teacher_epochs, batch_size=sizes.batch_size, lr=sizes.teacher_lr,
      dropout=0.0, augment=False, checkpoint_every=sizes.teacher_epochs, progress=False)
  runs = [dataclasses.replace(base, seed=m, out=os.path.join(config.work_dir, f"text_{_tag(sizes)}_teacher{m}"))
          for m in range(config.teachers)]
  finals = stages.train(f"teachers ({config.teachers} x {sizes.teacher_model})", [[run] for run in runs])
  return [run.out for run in runs], [group[0] for group in finals]


def text_cache(config: DemoConfig, sizes: TextDemo, data: dict, teachers: list[str], targets: str,
               temperature: float, **extra) -> str:
  """Builds (or reuses) a token cache of the teachers on the transfer set (with their logits on the held-out text);
  returns its path."""
  name = f"{targets.replace(':', '')}_T{temperature:g}" + "".join(f"_{k}" for k in sorted(extra))
  out = os.path.join(config.work_dir, f"text_{_tag(sizes)}_{sizes.held_out}{sizes.test_rows or ''}_"
                                      f"{len(teachers)}t_{name}.zarr")
  build_cache(dataclasses.replace(config.build, dataset=data["dataset"], split=data["split"], data_dir=config.data_dir,
                                  eval_dataset=data["eval_dataset"], eval_split=data["eval_split"],
                                  teachers=tuple(teachers), targets=targets, temperature=temperature, views=1,
                                  seq_len=sizes.seq_len, out=out, **extra))
  return out


def text_students(config: DemoConfig, sizes: TextDemo, data: dict, stages: _Stages, arms: dict, seeds: int,
                  name: str) -> dict[str, list[dict]]:
  """Trains (or reuses) the `lm-tiny` students of `arms` (name -> (cache, FitConfig fields)) over paired seeds;
  returns each arm's final lines in seed order. Arms reading one cache share its batch stream (and one vmapped step);
  every cache holds the same rows, so every arm of a seed starts alike and sees the same rows in the same order."""
  base = dataclasses.replace(
      config.student, model=sizes.student_model, epochs=sizes.student_epochs, finetune_epochs=0,
      batch_size=sizes.batch_size, lr=sizes.student_lr, alpha=sizes.alpha, data_dir=config.data_dir,
      eval_dataset=data["eval_dataset"], eval_split=data["eval_split"], checkpoint_every=sizes.student_epochs,
      progress=False)
  return _train_arms(stages.train, f"students ({len(arms)} arms x {seeds} seeds)", arms, base, seeds,
                     os.path.join(config.work_dir, name), True, key=None)


# What the text demo's table reports of each model's held-out line (`eval_*` of its final epoch).
TEXT_METRICS = {"bits_per_byte": "bits/byte", "perplexity": "perplexity", "ece": "ECE",
                "teacher_agreement": "teacher agreement"}


def summarise_text_arms(finals: dict[str, list[dict]], baseline: str) -> dict:
  """Each arm's held-out metrics (mean ± std over seeds) and their paired differences against `baseline`'s."""
  arms = {}
  for name, lines in finals.items():
    arm = {}
    for metric in TEXT_METRICS:
      values = np.array([line.get(f"eval_{metric}", np.nan) for line in lines], dtype=float)
      arm[metric] = _mean_std(list(values))
      if name != baseline:
        base = np.array([line.get(f"eval_{metric}", np.nan) for line in finals[baseline]], dtype=float)
        arm[metric]["paired_difference"] = _mean_std(list(values - base))
    arms[name] = arm
  return arms


def target_bytes(cache_path: str) -> float:
  """A token cache's bytes per token of its targets (`teacher-cache info`'s bytes_per_token total, less the member
  logits a dense cache also keeps)."""
  from teacher_cache.info import bytes_per_token  # pylint: disable=import-outside-toplevel
  per_token = bytes_per_token(open_cache(cache_path).spec)
  return per_token["total"] - per_token.get("member_logits", 0.0)


def trained_tokens(run_dir: str) -> int:
  """The tokens a run trained on, summed over its metrics.jsonl's epoch lines (equal steps: the arms' must agree)."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return sum(line.get("tokens", 0) for line in map(json.loads, f) if "epoch" in line)


def run_text_demo(config: DemoConfig, sizes: TextDemo, verbose: bool = False, out_dir: str | None = None) -> dict:
  """The text demo: teachers on the stdlib's training files, dense / topk / sample caches, students from each and
  from hard labels over paired seeds, evaluated on the held-out files; writes demo.{md,json,png} into `out_dir`
  (default: RESULTS_DIR/text).

  Returns:
    {"config", "sizes", "files": the files of each role, "teachers": their held-out lines, "caches": each kind's
    bytes per token, "students": `summarise_text_arms`, "stage_seconds", "total_seconds"}.
  """
  check_values(config)
  config = dataclasses.replace(config, teachers=sizes.teachers, seeds=sizes.seeds)
  started, stages = time.perf_counter(), _Stages(verbose)
  data = text_data(config, sizes)
  teachers, teacher_lines = text_teachers(config, sizes, data, stages)
  clock = time.perf_counter()
  kinds = ["dense", *(f"topk:{k}" for k in sizes.topk), f"sample:{sizes.sample}"]
  caches = {kind: text_cache(config, sizes, data, teachers, kind, sizes.temperature) for kind in kinds}
  stages.seconds["caches"] = time.perf_counter() - clock
  arms = {"hard labels": (caches["dense"], {"alpha": 1.0})}
  arms.update({kind: (path, {}) for kind, path in caches.items()})
  name = (f"text_students_{_tag(sizes)}_{sizes.held_out}{sizes.test_rows or ''}_T{sizes.temperature:g}_"
          f"a{sizes.alpha:g}_e{sizes.student_epochs}")
  finals = text_students(config, sizes, data, stages, arms, config.seeds, name)
  students = summarise_text_arms(finals, "hard labels")
  for arm, (cache_path, _) in arms.items():
    students[arm]["tokens_trained"] = [trained_tokens(os.path.join(config.work_dir, name, f"{_slug(arm)}_seed{s}"))
                                       for s in range(config.seeds)]
    students[arm]["bytes_per_token"] = None if arm == "hard labels" else target_bytes(cache_path)
  results = {"config": dataclasses.asdict(config), "sizes": dataclasses.asdict(sizes),
             "files": {role: stdlib_files(role) for role in STDLIB_TEXT},
             "teachers": {f"teacher {m} ({sizes.teacher_model})": {k: line.get(f"eval_{k}") for k in TEXT_METRICS}
                          for m, line in enumerate(teacher_lines)},
             "students": students, "stage_seconds": stages.seconds, "total_seconds": time.perf_counter() - started}
  _write_text_results(out_dir or os.path.join(config.results_dir, "text"), results)
  return results


def _slug(name: str) -> str:
  """An arm's run-dir name, as `_train_arms` makes it."""
  return name.replace(" ", "_").replace("(", "").replace(")", "")


def format_text_table(results: dict) -> str:
  """The text demo's results as a Markdown table (held-out metrics; students mean ± std over seeds, and their paired
  differences against the hard-label students)."""
  sizes, config = results["sizes"], results["config"]
  lines = [f"Held-out text: the first {sizes['test_rows'] or 'all'} rows of {sizes['seq_len']} byte tokens of the "
           f"{sizes['held_out']} files ({', '.join(STDLIB_TEXT[sizes['held_out']])}); transfer set the first "
           f"{sizes['train_rows'] or 'all'} rows of the training files ({', '.join(STDLIB_TEXT['train'])}). "
           f"{config['teachers']} x `{sizes['teacher_model']}` teachers ({sizes['teacher_epochs']} epochs); caches at "
           f"T={sizes['temperature']:g}; `{sizes['student_model']}` students, {sizes['student_epochs']} epochs, batch "
           f"{sizes['batch_size']}, lr {sizes['student_lr']:g}, alpha {sizes['alpha']:g} (hard labels: 1), "
           f"{config['seeds']} paired seeds. Differences: student minus the hard-label student of the same seed.", "",
           "| model | target bytes/token | " + " | ".join(TEXT_METRICS.values()) + " | Δ bits/byte | Δ ECE |",
           "|---|---|" + "---|" * len(TEXT_METRICS) + "---|---|"]
  for name, line in results["teachers"].items():
    values = " | ".join("" if line.get(k) is None else f"{line[k]:.4f}" for k in TEXT_METRICS)
    lines.append(f"| {name} | | {values} | | |")
  for name, arm in results["students"].items():
    values = " | ".join(f"{arm[k]['mean']:.4f} ± {arm[k]['std']:.4f}" for k in TEXT_METRICS)
    diffs = " | ".join("" if "paired_difference" not in arm[k] else
                       f"{arm[k]['paired_difference']['mean']:+.4f} ± {arm[k]['paired_difference']['std']:.4f}"
                       for k in ("bits_per_byte", "ece"))
    size = "" if arm.get("bytes_per_token") is None else f"{arm['bytes_per_token']:g}"
    lines.append(f"| student, {name} | {size} | {values} | {diffs} |")
  return "\n".join(lines + _stage_rows(results))


def _write_text_results(results_dir: str, results: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  table = format_text_table(results)
  _write_table(results_dir, table, results)
  names = list(results["students"])
  figure, axes = plt.subplots(1, 2, figsize=(10, 4))
  for axis, metric in zip(axes, ("bits_per_byte", "ece")):
    means = [results["students"][n][metric]["mean"] for n in names]
    stds = [results["students"][n][metric]["std"] for n in names]
    axis.bar(range(len(names)), means, yerr=stds, color=["#7f7f7f"] + ["#1f77b4"] * (len(names) - 1), capsize=3)
    for name, line in results["teachers"].items():
      if line.get(metric) is not None:
        axis.axhline(line[metric], color="#d62728", linestyle="--", linewidth=1, label=name)
    if metric == "bits_per_byte":  # Differences of a few hundredths: a bar from 0 would hide them.
      axis.set_ylim(bottom=max(0.0, min(means) - 2 * max(stds) - 0.2))
    axis.set_xticks(range(len(names)), names, fontsize=8)
    axis.set_ylabel(f"held-out {TEXT_METRICS[metric]}")
    axis.legend(fontsize=7)
  figure.suptitle("stillroom text demo: lm-tiny students on the stdlib's held-out files (mean ± std over seeds)")
  _write_figure(results_dir, table, figure)
