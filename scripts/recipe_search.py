"""Choose the demo's distillation recipe on `digits` using a validation slice (never the test split).

    python scripts/recipe_search.py [--work results/recipe_search] [--seeds 5] [--jobs 1] [--smoke]

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
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stillroom.demo import DemoConfig, run_demo  # noqa: E402
from student_train.sweep import report, run_sweep  # noqa: E402
from student_train.train import FitConfig  # noqa: E402

TRAIN, VALID = "train[:80%]", "train[80%:]"
FULL_GRID = "temperature=2,4,8;alpha=0,0.1,0.5,1;epochs=10,30,100"
FRACTION_GRID = "temperature=2,4,8;alpha=0,0.1,0.5,1;label_fraction=0.1;epochs=50,250"
SMOKE_GRIDS = {"full": "temperature=2;alpha=0.5;epochs=1",
               "fraction": "temperature=2;alpha=0;label_fraction=0.1;epochs=1"}


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
  parser.add_argument("--work", default="results/recipe_search")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--jobs", type=int, default=1, help="sweep groups trained at once")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
  args = parser.parse_args(argv)
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
