"""`student-train sweep` and `student-train report`: ablations from one cache.

A grid maps `fit` option names to lists of values; every combination × seed is an ordinary run dir under the
sweep dir, so each can be inspected or resumed on its own. Re-running a sweep skips finished runs and resumes
interrupted ones (the same mechanism as `fit`). The whole grid is validated before any training starts.

Grid forms: a JSON or YAML file, inline JSON (`'{"temperature": [1, 4], "alpha": [0, 0.5]}'`), or the short
form `temperature=1,4,20;alpha=0,0.5` (scalar axes; give `members` in JSON: `[[0], [0, 1]]`).
"""

import concurrent.futures
import csv
import dataclasses
import itertools
import json
import multiprocessing
import os
import sys

import numpy as np
import yaml

from shared.cache import open_cache
from shared.errors import StillroomError
from shared.models import MODELS
from student_train.train import (FINAL_FILE, GROUP_VARYING, FitConfig, check_config, evaluate_runs, fit,
                                 fit_group)

# Axis name -> (type of one value, check of one value or None).
AXES = {
    "temperature": (float, lambda v: v > 0 or "must be > 0"),
    "alpha": (float, lambda v: 0 <= v <= 1 or "must be in [0, 1]"),
    "loss": (str, lambda v: v in ("kl", "mse") or "must be 'kl' or 'mse'"),
    "combine": (str, lambda v: v in ("arithmetic", "geometric") or "must be 'arithmetic' or 'geometric'"),
    "members": (list, lambda v: (bool(v) and all(isinstance(m, int) for m in v)) or "must be a non-empty list of "
                                                                                   "member indices"),
    "model": (str, lambda v: v in MODELS or f"must be one of {', '.join(MODELS)}"),
    "label_fraction": (float, lambda v: 0 < v <= 1 or "must be in (0, 1]"),
    "epochs": (int, lambda v: v >= 1 or "must be >= 1"),
}
MANIFEST = "sweep.json"


def _log(message: str) -> None:
  print(f"student-train sweep: {message}", file=sys.stderr, flush=True)


def parse_grid(spec: str) -> dict[str, list]:
  """Reads a grid from a file path, inline JSON, or the short `axis=v1,v2;axis=...` form; validates it.

  Raises:
    StillroomError: unreadable grid, unknown axis, empty axis, or a value of the wrong type or range (named).
  """
  if os.path.isfile(spec):
    with open(spec) as f:
      text = f.read()
    try:
      grid = yaml.safe_load(text) if spec.endswith((".yaml", ".yml")) else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
      raise StillroomError(f"cannot parse grid file {spec!r}: {e}") from e
  elif spec.lstrip().startswith("{"):
    try:
      grid = json.loads(spec)
    except json.JSONDecodeError as e:
      raise StillroomError(f"cannot parse the inline JSON grid: {e}") from e
  else:
    grid = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
      name, _, values = part.partition("=")
      if not values:
        raise StillroomError(f"grid entry {part!r}: expected axis=value,value,... (or a JSON/YAML file)")
      grid[name.strip()] = [yaml.safe_load(v) for v in values.split(",")]
  if not isinstance(grid, dict) or not grid:
    raise StillroomError("a grid maps axis names to lists of values, e.g. {\"temperature\": [1, 4]}.")
  for name, values in grid.items():
    if name not in AXES:
      raise StillroomError(f"unknown grid axis {name!r}; valid axes: {', '.join(AXES)}.")
    if not isinstance(values, list) or not values:
      raise StillroomError(f"grid axis {name!r} needs a non-empty list of values, got {values!r}.")
    kind, check = AXES[name]
    for value in values:
      ok_type = isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool))
      if not ok_type or isinstance(value, bool):
        raise StillroomError(f"grid axis {name!r}: value {value!r} is not a {kind.__name__}.")
      verdict = check(value)
      if verdict is not True:
        raise StillroomError(f"grid axis {name!r}: value {value!r} {verdict}.")
  return grid


def _point_name(point: dict, seed: int) -> str:
  parts = []
  for name, value in point.items():
    text = "-".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
        else str(value)
    parts.append(f"{name}={text}")
  return ",".join(parts + [f"seed={seed}"]) or f"seed={seed}"


def _config(point: dict, seed: int, base: FitConfig, out: str) -> FitConfig:
  values = {**point, "members": tuple(point["members"]) if "members" in point else base.members}
  return dataclasses.replace(base, **values, seed=seed, out=out)


def plan_sweep(cache: str, grid: dict, seeds: int, out: str, base: FitConfig) -> list[tuple[str, dict, FitConfig]]:
  """Every (name, point, config) of the sweep, each checked as `fit` would check it, before any training."""
  points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  runs = []
  for point, seed in itertools.product(points, range(seeds)):
    name = _point_name(point, seed)
    config = _config(point, seed, dataclasses.replace(base, cache=cache), os.path.join(out, name))
    try:
      check_config(config)
    except StillroomError as e:
      raise StillroomError(f"grid point {_point_name(point, seed).rsplit(',seed=', 1)[0] or '(base)'}: {e}") from e
    runs.append((name, point, config))
  return runs


def _train(configs: list[FitConfig]) -> None:
  """One group of runs (a worker's unit of work): together in one vmapped step, or a single run."""
  if len(configs) > 1:
    fit_group(configs)
  elif not os.path.exists(os.path.join(configs[0].out, FINAL_FILE)):
    fit(configs[0])


def run_sweep(cache: str, grid_spec: str, out: str, seeds: int = 1, base: FitConfig | None = None,
              together: bool = True, jobs: int = 1) -> list[str]:
  """Runs (or resumes) every grid point × seed; returns the run dirs.

  With `together`, runs that share a student architecture and batch stream (everything but seed-free per-student
  settings: T, alpha, loss, rule, members) train in one vmapped step, reading the cache once for all of them.
  With `jobs > 1`, that many groups train at once, each in its own process.
  """
  if jobs < 1:
    raise StillroomError(f"--jobs must be >= 1, got {jobs}.")
  if seeds < 1:
    raise StillroomError(f"--seeds must be >= 1, got {seeds}.")
  grid = parse_grid(grid_spec)
  base = base or FitConfig()
  runs = plan_sweep(cache, grid, seeds, out, base)
  os.makedirs(out, exist_ok=True)
  manifest = {"cache": os.path.abspath(cache), "grid": grid, "seeds": seeds, "data_dir": base.data_dir,
              "base": {"alpha": base.alpha},
              "runs": [{"name": name, "point": point, "seed": config.seed} for name, point, config in runs]}
  manifest_path = os.path.join(out, MANIFEST)
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      previous = json.load(f)
    known = {r["name"]: r for r in previous["runs"]}
    manifest["runs"] = list(known.values()) + [r for r in manifest["runs"] if r["name"] not in known]
  with open(manifest_path + ".tmp", "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(manifest_path + ".tmp", manifest_path)
  groups: dict[tuple, list[tuple[str, FitConfig]]] = {}
  for name, _, config in runs:
    key = tuple((k, v) for k, v in sorted(dataclasses.asdict(config).items()) if k not in GROUP_VARYING)
    groups.setdefault((key, config.seed) if together else (name,), []).append((name, config))
  done = 0
  for members in groups.values():
    for name, config in members:
      done += 1
      finished = os.path.exists(os.path.join(config.out, FINAL_FILE))
      _log(f"[{done}/{len(runs)}] {name}" + (" (finished)" if finished else ""))
  work = [[config for _, config in members] for members in groups.values()]
  if jobs == 1:
    for configs in work:
      _train(configs)
  else:
    # Spawned, not forked: a forked JAX runtime is not safe to use.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
      for future in concurrent.futures.as_completed([pool.submit(_train, configs) for configs in work]):
        future.result()
  return [config.out for _, _, config in runs]


def base_alpha(manifest: dict) -> float | None:
  return manifest.get("base", {}).get("alpha")


def _ensemble_accuracy(cache_path: str, eval_config: dict | None, data_dir: str | None) -> float | None:
  """Test accuracy of the cached teachers' ensemble, if their run dirs still load."""
  if not eval_config:
    return None
  spec = open_cache(cache_path).spec
  if spec.folds > 1:
    return None
  try:
    return evaluate_runs([m.source for m in spec.members], eval_config["dataset"], eval_config["split"],
                         data_dir, combine=spec.combine)["accuracy"]
  except StillroomError:
    return None


# Settings a hard-label run (alpha = 1) ignores.
_SOFT_ONLY_AXES = ("alpha", "temperature", "combine", "members", "loss")


def _hard_label_key(point: dict) -> str:
  """The point's settings that matter to a hard-label run: points sharing it share a scratch baseline."""
  return json.dumps({k: v for k, v in point.items() if k not in _SOFT_ONLY_AXES}, sort_keys=True)


def report(sweep_dir: str) -> str:
  """Writes report.md, report.csv and one PNG per swept axis into the sweep dir; returns the Markdown table."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  path = os.path.join(sweep_dir, MANIFEST)
  if not os.path.exists(path):
    raise StillroomError(f"{sweep_dir!r} is not a sweep dir (no {MANIFEST}).")
  with open(path) as f:
    manifest = json.load(f)
  rows: dict[str, dict] = {}
  eval_config = None
  for run in manifest["runs"]:
    key = json.dumps(run["point"], sort_keys=True)
    row = rows.setdefault(key, {"point": run["point"], "accuracies": [], "missing": 0})
    final_path = os.path.join(sweep_dir, run["name"], FINAL_FILE)
    if os.path.exists(final_path):
      with open(final_path) as f:
        row["accuracies"].append(json.load(f).get("eval_accuracy", np.nan))
      if eval_config is None:
        with open(os.path.join(sweep_dir, run["name"], "config.json")) as f:
          eval_config = json.load(f)["resolved"]["eval"]
    else:
      row["missing"] += 1
  # Points with alpha = 1 train on hard labels only: the scratch baseline of every point that shares their other
  # settings (epochs, model, label fraction; T, rule, members and loss do not change a hard-label run).
  is_scratch = lambda point: point.get("alpha", base_alpha(manifest)) == 1.0  # noqa: E731
  scratch_runs: dict[str, list[float]] = {}
  for row in rows.values():
    if is_scratch(row["point"]):
      scratch_runs.setdefault(_hard_label_key(row["point"]), []).extend(row["accuracies"])
  baselines = {key: float(np.mean(values)) for key, values in scratch_runs.items() if values}
  ensemble = _ensemble_accuracy(manifest["cache"], eval_config, manifest.get("data_dir"))
  axes = list(manifest["grid"])
  header = axes + ["seeds", "accuracy mean", "accuracy std", "gain vs scratch", "gap closed"]
  table_rows = []
  for row in rows.values():
    values = np.array(row["accuracies"], float)
    mean = float(values.mean()) if len(values) else np.nan
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    scratch_mean = baselines.get(_hard_label_key(row["point"]))
    gain = mean - scratch_mean if scratch_mean is not None else None
    gap = gain / (ensemble - scratch_mean) if gain is not None and ensemble and ensemble > scratch_mean else None
    table_rows.append([*(row["point"][a] for a in axes), f"{len(values)}" + (f" (+{row['missing']} unfinished)"
                                                                            if row["missing"] else ""),
                       mean, std, gain, gap])
  with open(os.path.join(sweep_dir, "report.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(table_rows)
  fmt = lambda v: "" if v is None else f"{100 * v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
  lines = [f"Sweep of {manifest['cache']} ({len(manifest['runs'])} runs); accuracy on the eval split in %"
           + (f"; teachers' ensemble {100 * ensemble:.2f}%" if ensemble else "") + ".", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in table_rows:
    cells = [str(v) for v in row[:len(axes)]] + [row[len(axes)], fmt(row[-4]), fmt(row[-3]),
                                                  "" if row[-2] is None else f"{round(100 * row[-2], 2) + 0.0:+.2f}",
                                                  "" if row[-1] is None else f"{round(100 * row[-1]) + 0:+d}%"]
    lines.append("| " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  with open(os.path.join(sweep_dir, "report.md"), "w") as f:
    f.write(table + "\n")
  alpha_index = axes.index("alpha") if "alpha" in axes else None
  for index, axis in enumerate(axes):
    # Along other axes than alpha, scratch points (alpha = 1) would only flatten the curve: leave them out.
    plotted = [r for r in table_rows if alpha_index is None or axis == "alpha" or r[alpha_index] != 1.0] or table_rows
    labels = sorted({json.dumps(r[index]) for r in plotted}, key=lambda t: (len(t), t))
    means = [np.nanmean([r[len(axes) + 1] for r in plotted if json.dumps(r[index]) == label]) for label in labels]
    figure, plot = plt.subplots(figsize=(5, 3.5))
    plot.set_title("mean over the other axes" + (" (alpha < 1)" if axis != "alpha" and alpha_index is not None
                                                 else ""), fontsize=9)
    plot.plot(range(len(labels)), [100 * m for m in means], marker="o")
    plot.set_xticks(range(len(labels)), labels)
    plot.set_xlabel(axis)
    plot.set_ylabel("eval accuracy (%)")
    if len(baselines) == 1:
      plot.axhline(100 * next(iter(baselines.values())), color="gray", linestyle="--", label="scratch (alpha=1)")
      plot.legend()
    elif baselines and axis not in _SOFT_ONLY_AXES:  # Scratch changes along this axis: plot its curve too.
      scratch_rows = [(json.dumps(r[index]), r[len(axes) + 1]) for r, row in zip(table_rows, rows.values())
                      if is_scratch(row["point"])]
      scratch_means = [np.nanmean([m for label_, m in scratch_rows if label_ == label] or [np.nan])
                       for label in labels]
      plot.plot(range(len(labels)), [100 * m for m in scratch_means], color="gray", linestyle="--", marker="o",
                label="scratch (alpha=1)")
      plot.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(sweep_dir, f"report_{axis}.png"), dpi=110)
    plt.close(figure)
  return table
