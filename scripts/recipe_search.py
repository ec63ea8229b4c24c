"""Choose the demo's distillation recipe on `digits` using a validation slice (never the test split).

    python scripts/recipe_search.py [--work results/recipe_search] [--seeds 5] [--jobs 1] [--smoke]
    python scripts/recipe_search.py --shapes [--work results/recipe_search_shapes] [--seeds 2] [--smoke]

1. The demo pipeline with its current defaults, on train[:80%] -> train[80%:] (`run_demo`): teachers, ordinary
   and cross-fitted caches, scratch vs distilled students and the 10% arms, over paired seeds. Its table is
   WORK/demo.md.
2. Two sweeps over that ordinary cache (`run_sweep`, students evaluated on train[80%:]), reported in
   WORK/full/report.md and WORK/fraction/report.md:
   - full data: T x alpha (alpha = 1 is the scratch student on the same rows) x epochs;
   - 10% of the examples: T x alpha x epochs.
   Students use the demo's batch size and learning rate, without fine-tuning.

About 20 minutes on a 2-core CPU; re-running resumes and reuses every finished run. `--smoke`: two `mlp-tiny`
teachers, one epoch per run, one seed, no cross-fitting, and one point per grid, to check that the script works;
its figures mean nothing.

`--shapes`: the same for `demo --shapes` (resnet20 teachers, a resnet8 student) on the shapes set's training images
(written into WORK/data), the first 80% of each class's images against the other 20% (the split is sorted by
class, so a plain `train[80%:]` would hold two classes): the demo's pipeline with the preset's stage settings
(`shapes_stages`) but `SHAPES_SEARCH_EPOCHS` student epochs (its students: the scratch one and the one distilled at
the preset's T and alpha), then three sweeps over its cache (`SHAPES_GRIDS`; tables in
WORK/{temperature,alpha,epochs}/report.md): other T at the preset's alpha, other alpha at its T, and both arms at the
preset's epochs. Each run trains on its own (on a CPU convolutional students train faster so), on the same seeds and
rows as the demo's. About 30 minutes on the 2-core CPU machine. `--smoke` there: 5 images per class at 8 px,
`mlp-tiny` models, one epoch.
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shared.data import open_transfer_set  # noqa: E402
from shared.shapes import ShapesConfig, write_shapes  # noqa: E402
from stillroom.demo import DemoConfig, run_demo, shapes_stages, write_shapes_once  # noqa: E402
from student_train.sweep import report, run_sweep  # noqa: E402
from student_train.train import FitConfig  # noqa: E402

TRAIN, VALID = "train[:80%]", "train[80%:]"
FULL_GRID = "temperature=2,4,8;alpha=0,0.1,0.5,1;epochs=10,30,100"
FRACTION_GRID = "temperature=2,4,8;alpha=0,0.1,0.5,1;label_fraction=0.1;epochs=50,250"
SMOKE_GRIDS = {"full": "temperature=2;alpha=0.5;epochs=1",
               "fraction": "temperature=2;alpha=0;label_fraction=0.1;epochs=1"}
# The students' epochs of the search's demo and its T and alpha sweeps: the budget first planned, half the preset's;
# the "epochs" sweep then trains both arms at the preset's epochs (see `shapes_search`).
SHAPES_SEARCH_EPOCHS = 2
SHAPES_GRIDS = {"temperature": "temperature=2,8", "alpha": "alpha=0,0.5"}
SHAPES_SMOKE_GRIDS = {"temperature": "temperature=2"}
VALIDATION_SHARE = 0.2  # Of each class's training images.


def per_class_split(dataset: str, share: float) -> tuple[str, str]:
  """`(train, validation)` split specs of one labelled split holding each class's examples contiguously (as
  `imagefolder:` lists them): the first 1 - `share` of each class's run of examples, and the rest."""
  labels = open_transfer_set(dataset, "train").labels
  starts = [0] + [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]] + [len(labels)]
  train, valid = [], []
  for start, stop in zip(starts[:-1], starts[1:]):
    cut = stop - round(share * (stop - start))
    train.append(f"train[{start}:{cut}]")
    valid.append(f"train[{cut}:{stop}]")
  return "+".join(train), "+".join(valid)


def shapes_search(args) -> None:
  """`--shapes`: the natural-image demo's settings on a validation slice of the shapes set's training images."""
  root = os.path.join(args.work, "data")
  if args.smoke:
    if not os.path.isdir(root):
      write_shapes(root, ShapesConfig(train_per_class=5, test_per_class=0, min_side=16, max_side=24))
  else:
    write_shapes_once(root)
  dataset = f"imagefolder:{root}/train"
  train, valid = per_class_split(dataset, VALIDATION_SHARE)
  demo = shapes_stages(DemoConfig(dataset=dataset, train_split=train, test_split=valid, seeds=args.seeds,
                                  image_size=8 if args.smoke else None, work_dir=os.path.join(args.work, "demo"),
                                  results_dir=args.work))
  preset = demo.student
  demo = dataclasses.replace(demo, student=dataclasses.replace(preset, epochs=SHAPES_SEARCH_EPOCHS))
  grids = {**SHAPES_GRIDS, "epochs": f"epochs={preset.epochs};alpha={preset.alpha:g},1"}
  if args.smoke:
    grids = SHAPES_SMOKE_GRIDS
    demo = dataclasses.replace(demo, teachers=1, seeds=1, teacher=dataclasses.replace(
        demo.teacher, model="mlp-tiny", epochs=1), build=dataclasses.replace(demo.build, views=2),
        student=dataclasses.replace(demo.student, model="mlp-tiny", epochs=1, checkpoint_every=1))
  results = run_demo(demo)
  cache = os.path.join(demo.work_dir, f"ensemble_T{demo.build.temperature:g}_v{results['views']}.zarr")
  student = demo.student
  base = FitConfig(model=student.model, epochs=student.epochs, batch_size=student.batch_size, lr=student.lr,
                   alpha=student.alpha, checkpoint_every=student.checkpoint_every, eval_split=valid, progress=False)
  for name, grid in grids.items():
    out = os.path.join(args.work, name)
    run_sweep(cache, grid, out, demo.seeds, base, together=demo.together, jobs=args.jobs)
    print(report(out))


def _smoke(demo: DemoConfig) -> DemoConfig:
  """`--smoke`'s demo: two `mlp-tiny` teachers, 2 views, one epoch per run, one seed, no cross-fitting or fraction
  arms."""
  return dataclasses.replace(demo, teachers=2, seeds=1, folds=1, label_fraction=1.0,
                             teacher=dataclasses.replace(demo.teacher, model="mlp-tiny", epochs=1),
                             build=dataclasses.replace(demo.build, views=2),
                             student=dataclasses.replace(demo.student, model="mlp-tiny", epochs=1, finetune_epochs=0,
                                                         checkpoint_every=1))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--work", default=None, help="default: results/recipe_search (--shapes: "
                                                    "results/recipe_search_shapes)")
  parser.add_argument("--seeds", type=int, default=None, help="paired seeds (default: 5; --shapes: 2)")
  parser.add_argument("--jobs", type=int, default=1, help="sweep groups trained at once")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
  parser.add_argument("--shapes", action="store_true", help="the natural-image demo's settings (`demo --shapes`)")
  args = parser.parse_args(argv)
  args.work = args.work or ("results/recipe_search_shapes" if args.shapes else "results/recipe_search")
  args.seeds = args.seeds or (2 if args.shapes else 5)
  if args.shapes:
    shapes_search(args)
    return
  demo = DemoConfig(train_split=TRAIN, test_split=VALID, data_dir=args.data_dir, seeds=args.seeds,
                    work_dir=os.path.join(args.work, "demo"), results_dir=args.work)
  grids = {"full": FULL_GRID, "fraction": FRACTION_GRID}
  if args.smoke:
    demo, grids = _smoke(demo), SMOKE_GRIDS
  results = run_demo(demo)
  cache = os.path.join(demo.work_dir, f"ensemble_T{demo.build.temperature:g}_v{results['views']}.zarr")
  student = demo.student
  base = FitConfig(model=student.model, batch_size=student.batch_size, lr=student.lr,
                   checkpoint_every=student.checkpoint_every, eval_split=VALID, data_dir=args.data_dir,
                   progress=False)
  for name, grid in grids.items():
    out = os.path.join(args.work, name)
    run_sweep(cache, grid, out, demo.seeds, base, jobs=args.jobs)
    print(report(out))


if __name__ == "__main__":
  main()
