"""Choose the demo's distillation recipe on `digits` using a validation slice (never the test split).

    python scripts/recipe_search.py [--work results/recipe_search] [--seeds 5] [--jobs 1]

1. The demo pipeline with its current defaults, on train[:80%] -> train[80%:] (`run_demo`): teachers, ordinary
   and cross-fitted caches, scratch vs distilled students and the 10% arms, over paired seeds. Its table is
   WORK/demo.md.
2. Two sweeps over that ordinary cache (`run_sweep`, students evaluated on train[80%:]), reported in
   WORK/full/report.md and WORK/fraction/report.md:
   - full data: T x alpha (alpha = 1 is the scratch student on the same rows) x epochs;
   - 10% of the examples: T x alpha x epochs.
   Students use the demo's batch size and learning rate, without fine-tuning.

About 20 minutes on a 2-core CPU; re-running resumes and reuses every finished run.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stillroom.demo import DemoConfig, run_demo  # noqa: E402
from student_train.sweep import report, run_sweep  # noqa: E402
from student_train.train import FitConfig  # noqa: E402

TRAIN, VALID = "train[:80%]", "train[80%:]"
FULL_GRID = "temperature=2,4,8;alpha=0,0.1,0.5,1;epochs=10,30,100"
FRACTION_GRID = "temperature=2,4,8;alpha=0,0.1,0.5,1;label_fraction=0.1;epochs=50,250"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--work", default="results/recipe_search")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--jobs", type=int, default=1, help="sweep groups trained at once")
  parser.add_argument("--data-dir", default=None)
  args = parser.parse_args()
  demo = DemoConfig(train_split=TRAIN, test_split=VALID, data_dir=args.data_dir, seeds=args.seeds,
                    work_dir=os.path.join(args.work, "demo"), results_dir=args.work)
  results = run_demo(demo)
  cache = os.path.join(demo.work_dir, f"ensemble_T{demo.build.temperature:g}_v{results['views']}.zarr")
  student = demo.student
  base = FitConfig(model=student.model, batch_size=student.batch_size, lr=student.lr,
                   checkpoint_every=student.checkpoint_every, eval_split=VALID, data_dir=args.data_dir,
                   progress=False)
  for name, grid in (("full", FULL_GRID), ("fraction", FRACTION_GRID)):
    out = os.path.join(args.work, name)
    run_sweep(cache, grid, out, args.seeds, base, jobs=args.jobs)
    print(report(out))


if __name__ == "__main__":
  main()
