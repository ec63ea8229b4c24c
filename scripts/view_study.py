"""The view study of issue 32: cached crop views against fresh crops, and what closes the gap.

    python scripts/view_study.py SETTING [--work DIR] [--seeds N] [--explore] [--arms "A;B"] [--smoke]

For a setting it trains the teachers (on fresh random-resized crops), builds their caches (plain crop views, mixup
views and CutMix views, from the same teachers) and trains students with PAIRED seeds (student seed s initialises
every arm alike) at EQUAL ROWS AND STEPS: a cached arm of V views trains E epochs over the cache's N·V rows, the
fresh-crop arm V·E epochs over the N examples with a fresh crop of each every epoch (`fit --augment`), at one batch
size that divides N, so every arm takes the same number of steps. Arms:

  fresh crops, hard labels   `fit --augment --image-size S` (alpha 1), no cache
  crop views                 the plain crop cache, soft targets (the setting's T and alpha)
  mixup views / cutmix views the same teachers' caches of `--mix mixup:A` / `--mix cutmix:A`
  function matching          (`--arms` or `--explore`) Beyer et al.'s recipe: many mixed views, alpha 0

Results: WORK/../<setting>[-explore].json and .md (mean ± std over seeds, each arm's paired difference against the
fresh-crop hard-label arm, and whether it exceeds twice the larger standard deviation: the issue's target).

Settings (`SETTINGS`):
  digits10       the embedded `digits` at 10% of its training examples: the transfer set IS train[:144] (teachers,
                 caches and students all see only those 144 images; a mixed view's partner is one of them), crop
                 views at 8x8; `cnn-large` teachers (60 epochs), `cnn-small` students
  digits10-patient  the same with patient teachers: 320 epochs each, as many rows as a student
  digits10-full-teachers  teachers trained on all 1,437 training images (30 epochs), caches and students on the 144
  shapes-cnn     the natural-image shapes set (scripts/make_shapes.py: 3,000 train, 600 test JPEGs), prepared once
                 at 32 px (`teacher-cache prepare`); `cnn-large` teachers, `cnn-small` students
  shapes-resnet  the same images; `resnet20` teachers, `resnet8` students
  shapes-resnet-cnn  shapes-resnet's teachers, shapes-cnn's `cnn-small` students

`--explore`: the settings' study on a validation slice of the training set, never the test split (digits10:
train[144:], the other 90% of the training examples; shapes: the last 20% of each class's training images,
`recipe_search.per_class_split`, the teachers and caches then on the first 80%): the core arms plus the variations
in `explore_arms` (T, alpha, schedule length, crop scale, views per example and both at once, one teacher instead
of the ensemble).

Resumable: teachers, caches and students that finished are reused (`build_cache` and `fit_group` confirm them), so
a rerun with more seeds or arms trains only what is missing. `--smoke`: a few tiny runs (an `mlp-tiny` teacher, 2
views, one epoch) that check that the script works; its figures mean nothing.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shared.cache import eval_accuracies, open_cache  # noqa: E402
from shared.errors import StillroomError  # noqa: E402
from shared.log import logger  # noqa: E402
from stillroom.demo import _StageBar, _mean_std, _train_arms, write_shapes_once  # noqa: E402
from student_train.config import FitConfig  # noqa: E402
from student_train.train import fit_group  # noqa: E402
from teacher_cache.build import BuildConfig, build_cache  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_search import per_class_split  # noqa: E402

_LOG = logger("view_study")
FRESH = "fresh crops, hard labels"


@dataclasses.dataclass(frozen=True)
class Setting:
  """One setting of the study.

  Attributes:
    data: "digits" (the embedded set, its first `examples` training images) or "shapes" (the shapes set, prepared).
    image_size: S of the crop views and of the fresh crops.
    teachers: ensemble size M.
    teacher: the teachers' fit settings (trained on fresh crops of the transfer set).
    build: the caches' settings (views V, T, crop area); `mix` is set per cache.
    student: the students' settings; `epochs` is a cached arm's E at the setting's V (the fresh arm trains V·E).
    mixup, cutmix: A of the mixed caches (λ ~ Beta(A, A)).
    examples: digits: the transfer set's size (the first `examples` of the training split); shapes: the images of
      each class (of 300).
    teacher_examples: digits: the teachers train on the first `teacher_examples` of the training split instead of
      the transfer set (teachers that know more than the transfer set shows; no --explore then: they saw the
      validation slice).
    together: train arms that read one cache in one vmapped step (MLPs; convolutional students are faster alone on
      a CPU).
  """

  data: str
  image_size: int
  teachers: int
  teacher: FitConfig
  build: BuildConfig
  student: FitConfig
  mixup: float = 0.4
  cutmix: float = 1.0
  examples: int | None = None
  teacher_examples: int | None = None
  together: bool = False


_CROP = (0.35, 1.0)  # The shapes preset's crop area (docs/data.md); the study also tries the default (0.08, 1).
SETTINGS = {
    "digits10": Setting(
        data="digits", image_size=8, teachers=3, examples=144,
        teacher=FitConfig(model="cnn-large", epochs=60, batch_size=48, lr=3e-3, dropout=0.2, checkpoint_every=60),
        build=BuildConfig(views=8, temperature=4.0, crop_area=_CROP, progress=False),
        student=FitConfig(model="cnn-small", epochs=40, batch_size=48, lr=3e-3, alpha=0.1, checkpoint_every=1000)),
    # The same with patient teachers: each trains as many rows (320 epochs of fresh crops) as a student.
    "digits10-patient": Setting(
        data="digits", image_size=8, teachers=3, examples=144,
        teacher=FitConfig(model="cnn-large", epochs=320, batch_size=48, lr=3e-3, dropout=0.2, checkpoint_every=320),
        build=BuildConfig(views=8, temperature=4.0, crop_area=_CROP, progress=False),
        student=FitConfig(model="cnn-small", epochs=40, batch_size=48, lr=3e-3, alpha=0.1, checkpoint_every=1000)),
    # Teachers that know more than the students' 144 images: trained on all 1,437 training images (the demo's
    # label-fraction arms), the caches and students still on the 144 alone.
    "digits10-full-teachers": Setting(
        data="digits", image_size=8, teachers=3, examples=144, teacher_examples=1437,
        teacher=FitConfig(model="cnn-large", epochs=30, batch_size=48, lr=3e-3, dropout=0.2, checkpoint_every=30),
        build=BuildConfig(views=8, temperature=4.0, crop_area=_CROP, progress=False),
        student=FitConfig(model="cnn-small", epochs=40, batch_size=48, lr=3e-3, alpha=0.1, checkpoint_every=1000)),
    "shapes-cnn": Setting(
        data="shapes", image_size=32, teachers=2, examples=100,
        teacher=FitConfig(model="cnn-large", epochs=20, batch_size=50, lr=3e-3, dropout=0.2, flip=True,
                          checkpoint_every=100),
        build=BuildConfig(views=8, temperature=4.0, crop_area=_CROP, flip=True, progress=False),
        student=FitConfig(model="cnn-small", epochs=4, batch_size=50, lr=3e-3, alpha=0.1, checkpoint_every=1000)),
    "shapes-resnet": Setting(
        data="shapes", image_size=32, teachers=2, examples=100,
        teacher=FitConfig(model="resnet20", epochs=20, batch_size=50, lr=3e-3, flip=True, checkpoint_every=100),
        build=BuildConfig(views=8, temperature=4.0, crop_area=_CROP, flip=True, progress=False),
        student=FitConfig(model="resnet8", epochs=4, batch_size=50, lr=3e-3, alpha=0.1, checkpoint_every=1000)),
}
# shapes-cnn's students taught by shapes-resnet's teachers (the same runs, trained again under this setting's work
# directory): the teachers' strength on natural images, alone.
SETTINGS["shapes-resnet-cnn"] = dataclasses.replace(
    SETTINGS["shapes-resnet"], student=dataclasses.replace(SETTINGS["shapes-resnet"].student, model="cnn-small"))


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: a cache's settings (None: fresh crops, hard labels) and the student's.

  Attributes:
    cache: BuildConfig fields that differ from the setting's (`views`, `mix`, `crop_area`), or None for the
      fresh-crop hard-label arm.
    fit: FitConfig fields that differ from the setting's student (`alpha`, `temperature`, `members`).
    schedule: the arm's rows as a multiple of the setting's (N·V·E): a longer schedule.
    crop_area: the crop area of the fresh-crop arm (None: the setting's).
  """

  cache: dict | None
  fit: dict = dataclasses.field(default_factory=dict)
  schedule: float = 1.0
  crop_area: tuple[float, float] | None = None


def core_arms(setting: Setting) -> dict[str, Arm]:
  """The measured table's arms."""
  return {FRESH: Arm(None), "crop views": Arm({}), "mixup views": Arm({"mix": f"mixup:{setting.mixup:g}"}),
          "cutmix views": Arm({"mix": f"cutmix:{setting.cutmix:g}"})}


def function_matching(setting: Setting, schedule: float = 1.0) -> Arm:
  """Beyer et al.'s function matching, offline: 4V CutMix views (each example's views in fresh pairings every
  epoch), the student on the soft targets alone (alpha 0) at T=1."""
  return Arm({"views": 4 * setting.build.views, "mix": f"cutmix:{setting.cutmix:g}"},
             {"alpha": 0.0, "temperature": 1.0}, schedule=schedule)


def explore_arms(setting: Setting) -> dict[str, Arm]:
  """The study's variations on the validation slice, beside the core arms."""
  v = setting.build.views
  return {
      "crop views, T=1 (re-derived)": Arm({}, {"temperature": 1.0}),
      "crop views, alpha 0": Arm({}, {"alpha": 0.0}),
      "crop views, alpha 0.5": Arm({}, {"alpha": 0.5}),
      "crop views, alpha 1 (hard labels of the views)": Arm({}, {"alpha": 1.0}),
      "crop views, one teacher": Arm({}, {"members": (0,)}),
      f"crop views, {4 * v} views": Arm({"views": 4 * v}),
      "mixup views, T=1": Arm({"mix": f"mixup:{setting.mixup:g}"}, {"temperature": 1.0}),
      "cutmix views, T=1": Arm({"mix": f"cutmix:{setting.cutmix:g}"}, {"temperature": 1.0}),
      "cutmix views, T=1, alpha 0": Arm({"mix": f"cutmix:{setting.cutmix:g}"}, {"temperature": 1.0, "alpha": 0.0}),
      f"{FRESH}, 3x schedule": Arm(None, schedule=3.0),
      "crop views, 3x schedule": Arm({}, schedule=3.0),
      f"crop views, {4 * v} views, 3x schedule": Arm({"views": 4 * v}, schedule=3.0),
      "cutmix views, 3x schedule": Arm({"mix": f"cutmix:{setting.cutmix:g}"}, schedule=3.0),
      f"{FRESH}, crop area 0.08-1": Arm(None, crop_area=(0.08, 1.0)),
      "crop views, crop area 0.08-1": Arm({"crop_area": (0.08, 1.0)}),
      "function matching": function_matching(setting),
      "function matching, 3x schedule": function_matching(setting, 3.0),
  }


def smoke_setting() -> Setting:
  """Tiny sizes for `--smoke`: checks that the script runs; its figures mean nothing."""
  return Setting(data="digits", image_size=8, teachers=1, examples=20,
                 teacher=FitConfig(model="mlp-tiny", epochs=1, batch_size=10, checkpoint_every=1),
                 build=BuildConfig(views=2, temperature=4.0, crop_area=_CROP, progress=False),
                 student=FitConfig(model="mlp-tiny", epochs=1, batch_size=10, alpha=0.1, checkpoint_every=1),
                 together=True)


def _data(setting: Setting, work: str, explore: bool, data_dir: str | None) -> dict:
  """The transfer set and the evaluation split: {dataset, split, eval_dataset, eval_split, data_dir}."""
  if setting.data == "digits":
    n = setting.examples
    return {"dataset": "digits", "split": f"train[:{n}]", "eval_dataset": "digits", "data_dir": data_dir,
            "eval_split": f"train[{n}:{2 * n if n < 100 else ''}]" if explore else "test"}
  from shared.shapes import ShapesConfig  # pylint: disable=import-outside-toplevel
  from teacher_cache.prepare import PrepareConfig, prepare_images  # pylint: disable=import-outside-toplevel
  root = write_shapes_once(os.path.join(work, "shapes", "data"))
  stores = {}
  for split in ("train", "test"):  # Decoded once: every teacher, build and student epoch reads pixels.
    stores[split] = os.path.join(work, "shapes", f"{split}{setting.image_size}.zarr")
    prepare_images(PrepareConfig(dataset=f"imagefolder:{root}/{split}", image_size=setting.image_size,
                                 out=stores[split], progress=False))
  train = f"prepared:{stores['train']}"
  # The first `examples` images of each class (of the set's 300), the rest the validation slice.
  split, valid = per_class_split(train, 1 - setting.examples / ShapesConfig().train_per_class)
  if explore:
    return {"dataset": train, "split": split, "eval_dataset": train, "eval_split": valid, "data_dir": data_dir}
  return {"dataset": train, "split": split, "eval_dataset": f"prepared:{stores['test']}", "eval_split": "train",
          "data_dir": data_dir}


def _slug(text: str) -> str:
  return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def _digest(*parts) -> str:
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:8]


def run_study(name: str, setting: Setting, work: str, seeds: int, explore: bool, arm_names: list[str] | None,
              results_dir: str, data_dir: str | None = None) -> dict:
  """Trains and builds what is missing, writes RESULTS_DIR/<name>.json and .md; returns the results."""
  started, load = time.perf_counter(), os.getloadavg()
  root = os.path.join(work, name + ("-explore" if explore else ""))
  crops = {"image_size": setting.image_size, "crop_area": setting.build.crop_area, "flip": setting.build.flip,
           "max_shift": setting.build.max_shift}
  stages = {}

  def train_stage(stage: str, groups: list[list[FitConfig]]) -> list[list[dict]]:
    runs = [run for group in groups for run in group]
    bar = _StageBar(stage, len(runs), max(run.epochs for run in runs))
    clock, finals = time.perf_counter(), []
    for group in groups:
      finals.append(fit_group(group, log_epochs=False))
      bar.runs_done(len(group))
    bar.close()
    stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - clock
    return finals

  arms = core_arms(setting)
  if explore or arm_names:
    arms.update(explore_arms(setting))
  if arm_names:
    unknown = sorted(set(arm_names) - set(arms))
    if unknown:
      raise StillroomError(f"unknown arms {unknown}; known: {sorted(arms)}")
    arms = {k: v for k, v in arms.items() if k in arm_names or k == FRESH}

  views = setting.build.views
  for arm_name, arm in arms.items():  # Before any build: every cached arm's rows must be whole epochs of its cache.
    if arm.cache is not None:
      cached_views = arm.cache.get("views", views)
      epochs = arm.schedule * views * setting.student.epochs / cached_views
      if epochs != int(epochs) or epochs < 1:
        raise StillroomError(f"arm {arm_name!r}: {epochs * cached_views:g} rows per example is not a whole number "
                             f"of epochs of {cached_views} views; give the setting's student a multiple of "
                             f"{cached_views // math.gcd(cached_views, views)} epochs.")
  if explore and setting.teacher_examples:
    raise StillroomError(f"setting {name!r}: its teachers train on the validation slice; no --explore.")
  data = _data(setting, work, explore, data_dir)  # After the checks: the shapes set is written and prepared here.
  teacher_data = dict(data, split=f"train[:{setting.teacher_examples}]") if setting.teacher_examples else data
  teacher_base = dataclasses.replace(setting.teacher, augment=True, progress=False, **teacher_data, **crops)
  teachers = [dataclasses.replace(teacher_base, seed=m, out=os.path.join(root, f"teacher{m}"))
              for m in range(setting.teachers)]
  train_stage("teachers", [[run] for run in teachers])

  caches = {}
  clock = time.perf_counter()
  for arm in arms.values():
    if arm.cache is None:
      continue
    build = dataclasses.replace(setting.build, **arm.cache)
    key = _slug(f"v{build.views}_T{build.temperature:g}_{build.mix or 'crop'}_a{build.crop_area[0]:g}")
    if key not in caches:
      caches[key] = os.path.join(root, f"cache_{key}.zarr")
      build_cache(dataclasses.replace(
          build, dataset=data["dataset"], split=data["split"], eval_dataset=data["eval_dataset"],
          eval_split=data["eval_split"], data_dir=data_dir, image_size=setting.image_size,
          teachers=tuple(t.out for t in teachers), out=caches[key]))
  stages["caches"] = time.perf_counter() - clock
  plain = caches.get(_slug(f"v{views}_T{setting.build.temperature:g}_crop_a{setting.build.crop_area[0]:g}"))

  # Students: one `_train_arms` call per batch stream (cache and epochs), so arms that share one can train together.
  examples = len(_indices(data))
  student = dataclasses.replace(setting.student, eval_dataset=data["eval_dataset"], eval_split=data["eval_split"],
                                data_dir=data_dir, progress=False)
  streams: dict[tuple, dict[str, tuple[str | None, dict]]] = {}
  rows = {}
  for arm_name, arm in arms.items():
    budget = arm.schedule * views * setting.student.epochs  # Rows per example.
    if arm.cache is None:
      area = arm.crop_area or setting.build.crop_area
      cache, extra = None, {"alpha": 1.0, "augment": True, "dataset": data["dataset"], "split": data["split"],
                            **crops, "crop_area": area, "epochs": int(round(budget))}
    else:
      build = dataclasses.replace(setting.build, **arm.cache)
      cache = caches[_slug(f"v{build.views}_T{build.temperature:g}_{build.mix or 'crop'}_a{build.crop_area[0]:g}")]
      epochs = budget / build.views
      extra = {**arm.fit, "epochs": int(epochs)}
    rows[arm_name] = int(round(budget)) * examples
    key = (cache, extra["epochs"], arm.crop_area)
    streams.setdefault(key, {})[arm_name] = (cache, extra)
  accuracies: dict[str, list[float]] = {}
  for (cache, epochs, area), stream_arms in streams.items():
    out = os.path.join(root, "students", f"{_slug(os.path.basename(cache or 'fresh'))}_e{epochs}_"
                                         f"{_digest(student, area)}")
    accuracies.update(_train_arms(train_stage, f"students e{epochs} {os.path.basename(cache or 'fresh crops')}",
                                  stream_arms, student, seeds, out, setting.together))

  evaluations = {}
  if plain:
    measured = eval_accuracies(open_cache(plain))
    evaluations = {f"teacher {m}": a for m, a in enumerate(measured["members"])}
    evaluations["ensemble (AM)"] = measured["arithmetic"]
  results = _summarise(name, setting, data, explore, seeds, examples, arms, rows, accuracies, evaluations)
  results["stage_seconds"] = stages
  results["total_seconds"] = time.perf_counter() - started
  results["machine"] = {"cpus": os.cpu_count(), "load_at_start": load, "load_at_end": os.getloadavg()}
  os.makedirs(results_dir, exist_ok=True)
  stem = os.path.join(results_dir, name + ("-explore" if explore else ""))
  with open(stem + ".json", "w") as f:
    json.dump(results, f, indent=2, default=str)
  with open(stem + ".md", "w") as f:
    f.write(format_table(results) + "\n")
  print(format_table(results))
  return results


def _indices(data: dict):
  from shared.data import open_transfer_set  # pylint: disable=import-outside-toplevel
  return open_transfer_set(data["dataset"], data["split"], data["data_dir"]).indices


def _summarise(name, setting, data, explore, seeds, examples, arms, rows, accuracies, evaluations) -> dict:
  fresh = np.array(accuracies[FRESH])
  out = {}
  for arm_name, values in accuracies.items():
    values = np.array(values)
    arm = _mean_std(values)
    arm["rows"] = rows[arm_name]
    arm["steps"] = rows[arm_name] // setting.student.batch_size
    arm["settings"] = dataclasses.asdict(arms[arm_name])
    if arm_name != FRESH:
      arm["paired_difference"] = _mean_std(values - fresh)
      # The issue's target: a gain larger than twice the larger of the two arms' standard deviations (None: 1 seed).
      arm["beats_fresh_by_2_std"] = None if seeds < 2 else \
          bool(values.mean() - fresh.mean() > 2 * max(values.std(ddof=1), fresh.std(ddof=1)))
    out[arm_name] = arm
  return {"setting": name, "explore": explore, "seeds": seeds, "examples": examples, "data": data,
          "config": {"teachers": setting.teachers, "teacher": dataclasses.asdict(setting.teacher),
                     "build": dataclasses.asdict(setting.build), "student": dataclasses.asdict(setting.student),
                     "image_size": setting.image_size, "mixup": setting.mixup, "cutmix": setting.cutmix},
          "teachers": evaluations, "arms": out}


def format_table(results: dict) -> str:
  """The results as a Markdown table: accuracy (mean ± std over seeds), the paired difference against fresh crops."""
  c = results["config"]
  s, b, t = c["student"], c["build"], c["teacher"]
  where = "the validation slice" if results["explore"] else "the test split"
  lines = [f"Setting `{results['setting']}`: {results['examples']} training examples "
           f"(`{results['data']['dataset']}` {results['data']['split'][:40]}), evaluated on {where}; "
           f"{c['teachers']} x `{t['model']}` teachers ({t['epochs']} epochs of fresh crops), crops at "
           f"{c['image_size']} px, area {b['crop_area'][0]:g}-{b['crop_area'][1]:g}; caches of {b['views']} views at "
           f"T={b['temperature']:g}; `{s['model']}` students, alpha {s['alpha']:g}, batch {s['batch_size']}, lr "
           f"{s['lr']:g}, {s['epochs']} epochs of a {b['views']}-view cache ({b['views'] * s['epochs']} of fresh "
           f"crops); {results['seeds']} paired seeds.", "",
           f"| model | rows | accuracy on {where} | paired difference vs fresh crops | > 2 x larger std |",
           "|---|---|---|---|---|"]
  for name, accuracy in results["teachers"].items():
    lines.append(f"| {name} | | {100 * accuracy:.2f}% | | |")
  for name, arm in results["arms"].items():
    diff = "" if "paired_difference" not in arm else \
        f"{100 * arm['paired_difference']['mean']:+.2f} ± {100 * arm['paired_difference']['std']:.2f} pts"
    verdict = {None: "", True: "yes", False: "no"}[arm.get("beats_fresh_by_2_std")]
    lines.append(f"| {name} | {arm['rows']:,} | {100 * arm['mean']:.2f} ± {100 * arm['std']:.2f}% | {diff} | "
                 f"{verdict} |")
  lines += ["", "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results.get("stage_seconds", {}).items()) +
            f"; total {results.get('total_seconds', 0):.0f} s on {results.get('machine', {}).get('cpus')} CPUs, load "
            f"average {results.get('machine', {}).get('load_at_start', [0])[0]:.1f} at the start."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("setting", nargs="?", default="digits10", choices=sorted(SETTINGS),
                      help="which setting (default: digits10)")
  parser.add_argument("--work", default="results/view_study/work", help="teachers, caches and students; reused")
  parser.add_argument("--results", default="results/view_study", help="where <setting>.json and .md go")
  parser.add_argument("--seeds", type=int, default=5, help="paired student seeds per arm (default: 5)")
  parser.add_argument("--explore", action="store_true", help="the study's variations, on a validation slice")
  parser.add_argument("--arms", default=None, help="';'-separated names of the arms to train, of the core and "
                                                    "--explore ones (default: the core arms; the fresh-crop arm "
                                                    "always)")
  parser.add_argument("--data-dir", default=None, help="TFDS data dir (digits is prepared there once)")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error(f"--seeds must be at least 1, got {args.seeds}")
  setting = smoke_setting() if args.smoke else SETTINGS[args.setting]
  name = "smoke" if args.smoke else args.setting
  arm_names = [a.strip() for a in args.arms.split(";")] if args.arms else None
  try:
    run_study(name, setting, args.work, 1 if args.smoke else args.seeds, args.explore, arm_names, args.results,
              args.data_dir)
  except StillroomError as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
  main()
