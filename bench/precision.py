"""bfloat16 teachers against float32 ones on digits: the figures behind `shared.precision.LOGIT_SPREAD`, the bound a
bfloat16 cache records.

    python bench/precision.py [--work DIR] [--data-dir DIR] [--smoke] [--out bench/results/precision.json]

Each model of `MODELS` is trained on digits' train split on hard labels, in float32 (`fit`, its epochs in
`MODELS`); then an ensemble of all of them is built over the same split four times (`build_cache`): in float32 and in
bfloat16 (`--compute-dtype`), at T = 1 and T = 4. The stores are read back with Zarr. For each member: its largest
logit (float32), the largest and 99th-percentile spread of its bfloat16 logits against its float32 ones
(`shared.precision.logit_spread`), and the largest and mean total-variation distance of its distribution at each T
(`target_distance`); for the ensemble's targets, the same distances against the bound the bfloat16 spec records
(`target_tolerance`). Accuracies, not speed (`bench/models.py` times the dtypes).

`--smoke`: one small model, one epoch, 128 examples, to check that the benchmark works; its figures mean nothing.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import zarr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import write_json  # noqa: E402
from shared.cache import SPEC_KEY  # noqa: E402
from shared.precision import LOGIT_SPREAD, logit_spread, target_distance  # noqa: E402
from student_train.config import FitConfig  # noqa: E402
from student_train.train import fit  # noqa: E402
from teacher_cache.build import BuildConfig, build_cache  # noqa: E402

MODELS = {"mlp-small": 10, "cnn-small": 10, "resnet8": 6, "resnet20": 4, "resnet56": 3}  # Model: epochs trained.
SMOKE_MODELS, SMOKE_SPLIT = {"mlp-tiny": 1}, "train[:128]"
TEMPERATURES = (1.0, 4.0)
DTYPES = ("float32", "bfloat16")


def _log_softmax(z: np.ndarray, temperature: float) -> np.ndarray:
  z = z.astype(np.float64) / temperature
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def measure(work: str, data_dir: str | None, models: dict[str, int], split: str = "train") -> dict:
  """Trains the teachers, builds the four caches and compares them (see the module docstring)."""
  runs, result = [], {"models": {}, "ensemble": {}, "logit_spread_bound": LOGIT_SPREAD["bfloat16"]}
  for model, epochs in models.items():
    out = os.path.join(work, model)
    final = fit(FitConfig(model=model, epochs=epochs, split=split, data_dir=data_dir, out=out, progress=False,
                          workers=0),
                log_epochs=False)
    runs.append(out)
    result["models"][model] = {"epochs": epochs, "eval_accuracy": final["eval_accuracy"]}
  stores = {}
  for dtype in DTYPES:
    for temperature in TEMPERATURES:
      stores[dtype, temperature] = build_cache(BuildConfig(
          dataset="digits", split=split, teachers=tuple(runs), temperature=temperature, compute_dtype=dtype,
          eval_split="none", data_dir=data_dir, out=os.path.join(work, f"{dtype}_T{temperature:g}.zarr"),
          progress=False, workers=0))
  group = {key: zarr.open_group(path, mode="r") for key, path in stores.items()}
  logits = {dtype: group[dtype, TEMPERATURES[0]]["member_logits"][:].astype(np.float64) for dtype in DTYPES}
  spread = logit_spread(logits["bfloat16"], logits["float32"])  # [R, M]
  for member, model in enumerate(models):
    row = result["models"][model]
    row.update(max_abs_logit=float(np.abs(logits["float32"][:, member]).max()),
               max_spread=float(spread[:, member].max()), p99_spread=float(np.quantile(spread[:, member], 0.99)))
    for temperature in TEMPERATURES:
      distance = target_distance(*(_log_softmax(logits[dtype][:, member], temperature) for dtype in DTYPES))
      row[f"T={temperature:g}"] = {"max_distance": float(distance.max()), "mean_distance": float(distance.mean())}
  for temperature in TEMPERATURES:
    distance = target_distance(*(group[dtype, temperature]["targets"][:] for dtype in DTYPES))
    result["ensemble"][f"T={temperature:g}"] = {
        "max_distance": float(distance.max()), "mean_distance": float(distance.mean()),
        "tolerance": group["bfloat16", temperature].attrs[SPEC_KEY]["target_tolerance"]}
  result["within_bounds"] = bool(spread.max() <= LOGIT_SPREAD["bfloat16"] and all(
      point["max_distance"] <= point["tolerance"] for point in result["ensemble"].values()))
  return result


def table(result: dict) -> str:
  lines = ["| model | epochs | eval accuracy | largest logit | largest spread (p99) | largest / mean TV at T=1 | "
           "at T=4 |", "|---|---|---|---|---|---|---|"]
  for model, row in result["models"].items():
    lines.append(f"| {model} | {row['epochs']} | {100 * row['eval_accuracy']:.1f}% | {row['max_abs_logit']:.1f} | "
                 f"{row['max_spread']:.3f} ({row['p99_spread']:.3f}) | "
                 + " | ".join(f"{row[f'T={t:g}']['max_distance']:.4f} / {row[f'T={t:g}']['mean_distance']:.5f}"
                              for t in TEMPERATURES) + " |")
  lines.append("| ensemble targets (bound) | | | | | " + " | ".join(
      f"{p['max_distance']:.4f} / {p['mean_distance']:.5f} ({p['tolerance']:g})" for p in result["ensemble"].values())
               + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--work", help="where the runs and caches go (default: a temporary directory)")
  parser.add_argument("--data-dir", help="TFDS data dir of the digits (default: TFDS's own)")
  parser.add_argument("--smoke", action="store_true", help="one small model, one epoch: checks that it runs")
  parser.add_argument("--out", default="bench/results/precision.json")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as scratch:
    result = measure(args.work or scratch, args.data_dir, *((SMOKE_MODELS, SMOKE_SPLIT) if args.smoke else (MODELS,)))
  write_json(args.out, result)
  print(table(result))
  print(f"within the bounds (logit spread {result['logit_spread_bound']:g}, targets' tolerance): "
        f"{result['within_bounds']}")
  print(json.dumps({"wrote": args.out}))


if __name__ == "__main__":
  main()
