"""A teacher from outside JAX: a scikit-learn logistic regression labels the rows of `teacher-cache views`.

  teacher-cache views --dataset digits --views 2 --seed 1 --out views
  python scripts/sklearn_teacher.py views sklearn.npz
  teacher-cache import --dataset digits --views 2 --seed 1 --logits sklearn.npz --temperature 2 --out sklearn.zarr

The worked example of docs/external-teachers.md (`tests/test_external.py` runs it). The teacher is trained on
the digits train split's inputs, normalised as the views are (the dataset's default normalisation), and writes its
logits (the decision function) on every row with the row ids, the file `teacher-cache import` reads.
"""

import argparse
import glob
import os

import numpy as np
from sklearn.linear_model import LogisticRegression

from shared.data import open_transfer_set
from teacher_cache.external import read_views


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("views", help="the directory `teacher-cache views` wrote")
  parser.add_argument("out", help="the logits file to write (.npz with `row` and `logits`)")
  parser.add_argument("--data-dir", help="TFDS data dir of the digits")
  args = parser.parse_args(argv)

  train = open_transfer_set("digits", "train", args.data_dir)
  inputs, labels = train.read_all()
  teacher = LogisticRegression(max_iter=300).fit(train.normalization.apply(inputs).reshape(len(inputs), -1), labels)

  read_views(args.views)  # Refuses views whose writing did not finish.
  rows, logits = [], []
  for path in sorted(glob.glob(os.path.join(args.views, "views_*.npz"))):
    with np.load(path) as chunk:  # x: float32 [n, 8, 8, 1], normalised; row: int64 [n]
      rows.append(chunk["row"])
      logits.append(teacher.decision_function(chunk["x"].reshape(len(chunk["row"]), -1)))
  np.savez(args.out, row=np.concatenate(rows), logits=np.concatenate(logits))
  print(f"wrote the logits of {sum(map(len, rows))} rows to {args.out}")


if __name__ == "__main__":
  main()
