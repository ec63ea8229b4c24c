"""Search for distillation settings on `digits` using a validation slice (never the test split).

    python scripts/recipe_search.py [--out results/recipe_search.jsonl] [--seeds 2]

Teachers (cnn-large, augmented, dropout) train on train[:80%]; caches cover train[:80%] with 1 and 4 views; each
student trains on the cache rows (distilled, or alpha=1 for the scratch baseline on the same rows) and is
evaluated on train[80%:]. One JSON line per student run.
"""

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from student_train.train import FitConfig, fit  # noqa: E402
from teacher_cache.build import BuildConfig, build_cache  # noqa: E402

TRAIN, VALID = "train[:80%]", "train[80%:]"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--work", default="results/recipe_search")
  parser.add_argument("--out", default="results/recipe_search.jsonl")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--teachers", type=int, default=3)
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--models", default="mlp-tiny,mlp-small")
  parser.add_argument("--temperatures", default="1,2,4,8")
  parser.add_argument("--alphas", default="0.1,0.5")
  parser.add_argument("--views", default="1,4")
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--finetune-epochs", type=int, default=5)
  args = parser.parse_args()
  common = {"data_dir": args.data_dir, "progress": False}
  teachers = []
  for seed in range(args.teachers):
    run = os.path.join(args.work, f"teacher{seed}")
    fit(FitConfig(model="cnn-large", dataset="digits", split=TRAIN, eval_split=VALID, augment=True, dropout=0.2,
                  epochs=30, seed=seed, out=run, **common))
    teachers.append(run)
  done = set()
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = {json.loads(line)["name"] for line in f}
  for views in [int(v) for v in args.views.split(",")]:
    cache = os.path.join(args.work, f"views{views}.zarr")
    build_cache(BuildConfig(dataset="digits", split=TRAIN, teachers=tuple(teachers), views=views, temperature=4.0,
                            out=cache, **common))
    settings = [(1.0, None)] + list(itertools.product([float(a) for a in args.alphas.split(",")],
                                                      [float(t) for t in args.temperatures.split(",")]))
    for model, (alpha, temperature), seed in itertools.product(args.models.split(","), settings,
                                                               range(args.seeds)):
      name = f"{model}-v{views}-a{alpha}-T{temperature}-s{seed}"
      if name in done:
        continue
      final = fit(FitConfig(model=model, cache=cache, alpha=alpha, temperature=temperature, eval_split=VALID,
                            epochs=args.epochs, finetune_epochs=args.finetune_epochs, seed=seed,
                            out=os.path.join(args.work, name), **common))
      record = {"name": name, "model": model, "views": views, "alpha": alpha, "temperature": temperature,
                "seed": seed, "valid_accuracy": final["eval_accuracy"], "valid_nll": final["eval_nll"]}
      with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
      print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
