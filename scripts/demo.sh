#!/usr/bin/env bash
# The main job on the embedded `digits` dataset: two teachers -> one cache -> a distilled student, with
# inspection and evaluation of each stage. Re-running it resumes or skips finished stages.
set -euo pipefail
OUT=${OUT:-demo}
DATA_DIR=${DATA_DIR:-$OUT/tfds}
mkdir -p "$OUT"
SECONDS=0

echo "== 1. teachers: two cnn-large on hard labels (augmented, dropout), different seeds"
for seed in 0 1; do
  student-train fit --model cnn-large --dataset digits --data-dir "$DATA_DIR" --augment --dropout 0.2 \
      --epochs 30 --seed "$seed" --no-progress --out "$OUT/teacher$seed" > /dev/null
done
student-train eval "$OUT/teacher0" "$OUT/teacher1" --dataset digits --split test --data-dir "$DATA_DIR"

echo "== 2. cache: 4 views per example, arithmetic mean at T=4"
teacher-cache build --dataset digits --split train --data-dir "$DATA_DIR" \
    --teacher "$OUT/teacher0" --teacher "$OUT/teacher1" --combine arithmetic --temperature 4 --views 4 \
    --out "$OUT/digits.zarr"
teacher-cache info "$OUT/digits.zarr"
teacher-cache verify "$OUT/digits.zarr" --dataset digits --split train --data-dir "$DATA_DIR"

echo "== 3. students: mlp-small distilled from the cache, and from scratch on the same rows (alpha = 1)"
student-train fit --model mlp-small --cache "$OUT/digits.zarr" --data-dir "$DATA_DIR" --alpha 0.1 \
    --epochs 30 --finetune-epochs 5 --no-progress --out "$OUT/student_distilled" > /dev/null
student-train fit --model mlp-small --cache "$OUT/digits.zarr" --data-dir "$DATA_DIR" --alpha 1 \
    --epochs 30 --finetune-epochs 5 --no-progress --out "$OUT/student_scratch" > /dev/null
student-train eval "$OUT/student_distilled" --dataset digits --split test --data-dir "$DATA_DIR"
student-train eval "$OUT/student_scratch" --dataset digits --split test --data-dir "$DATA_DIR"
echo "== done in ${SECONDS}s; outputs in $OUT/"
