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
import io
import itertools
import json
import multiprocessing
import os
import typing

import numpy as np
import yaml

from shared import distributed, storage
from shared.cache import eval_accuracies, open_cache
from shared.errors import StillroomError
from shared import log
from shared.log import logger
from shared.outputs import check_not_an_input, writing
from shared.settings import check_value, names_where, value_type
from student_train.config import FitConfig
from student_train.plan import Opened, RunPlan, plan_run
from shared.runs import CONFIG_FILE, read_run_file
from student_train.run_dir import is_finished, read_final
from student_train.train import DIVERGED_ADVICE, Diverged, fit_group

# The fit settings a grid may vary (declared `axis`); each takes the setting's type and check from `FitConfig`.
AXES = names_where(FitConfig, axis=True)
MANIFEST = "sweep.json"


_LOG = logger(__name__)


def _check_axis_value(name: str, value) -> None:
  kind, is_tuple = value_type(typing.get_type_hints(FitConfig)[name])
  if is_tuple:
    ok_type = isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    value = tuple(value) if ok_type else value
    kind_name = f"list of {kind.__name__} (in a JSON grid: {{\"{name}\": [[0], [0, 1]]}})"
  else:
    ok_type = isinstance(value, kind) or (kind is float and isinstance(value, int))
    ok_type = ok_type and not isinstance(value, bool)
    kind_name = kind.__name__
  if not ok_type:
    raise StillroomError(f"grid axis {name!r}: value {value!r} is not a {kind_name}.")
  problem = check_value(FitConfig, name, value)
  if problem:
    raise StillroomError(f"grid axis {name!r}: value {value!r} {problem}.")


def _no_repeated_axes(pairs: list[tuple]) -> dict:
  names = [name for name, _ in pairs]
  repeated = next((name for name in names if names.count(name) > 1), None)
  if repeated is not None:
    raise StillroomError(f"grid axis {repeated!r} is given twice; list its values once.")
  return dict(pairs)


def _short_value(axis: str, text: str):
  """One value of the `axis=v1,v2` form: a number (1, 0.5, 1e-3), else a word (arithmetic, mlp-small)."""
  text = text.strip()
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  if text.startswith(("[", "{")):
    raise StillroomError(f"grid axis {axis!r}: list values such as member subsets need a JSON grid, e.g. "
                         f"'{{\"{axis}\": [[0], [0, 1]]}}'.")
  return text


def parse_grid(spec: str) -> dict[str, list]:
  """Reads a grid from a file path, inline JSON, or the short `axis=v1,v2;axis=...` form; validates it.

  Raises:
    StillroomError: unreadable grid, unknown axis, empty axis, repeated value, or a value of the wrong type or range
      (named).
  """
  if os.path.isfile(spec):
    with open(spec) as f:
      text = f.read()
    try:
      grid = yaml.safe_load(text) if spec.endswith((".yaml", ".yml")) else json.loads(
          text, object_pairs_hook=_no_repeated_axes)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
      raise StillroomError(f"cannot parse grid file {spec!r}: {str(e).splitlines()[0]}") from e
  elif spec.endswith((".json", ".yaml", ".yml")):
    raise StillroomError(f"no grid file {spec!r}.")
  elif spec.lstrip().startswith("{"):
    try:
      grid = json.loads(spec, object_pairs_hook=_no_repeated_axes)
    except json.JSONDecodeError as e:
      raise StillroomError(f"cannot parse the inline JSON grid: {e}") from e
  else:
    grid = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
      name, _, values = part.partition("=")
      name = name.strip()
      if not values:
        raise StillroomError(f"grid entry {part!r}: expected axis=value,value,... (or a JSON/YAML file)")
      if name in grid:
        raise StillroomError(f"grid axis {name!r} is given twice; list its values once: {name}=a,b,c.")
      grid[name] = [_short_value(name, v) for v in values.split(",")]
  if not isinstance(grid, dict) or not grid:
    raise StillroomError("a grid maps axis names to lists of values, e.g. {\"temperature\": [1, 4]}.")
  for name, values in grid.items():
    if name not in AXES:
      raise StillroomError(f"unknown grid axis {name!r}; valid axes: {', '.join(AXES)}.")
    if not isinstance(values, list) or not values:
      raise StillroomError(f"grid axis {name!r} needs a non-empty list of values, got {values!r}.")
    for value in values:
      _check_axis_value(name, value)
    seen = [json.dumps(float(v) if isinstance(v, (int, float)) else v) for v in values]  # 1 and 1.0 are one value.
    repeated = next((v for v, text in zip(values, seen) if seen.count(text) > 1), None)
    if repeated is not None:
      raise StillroomError(f"grid axis {name!r} lists {repeated!r} twice; each point would train into one run dir.")
  return grid


def _point_name(point: dict, seed: int) -> str:
  parts = []
  for name, value in point.items():
    exact = isinstance(value, float) and float(f"{value:g}") == value
    text = "-".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if exact else str(value)
    parts.append(f"{name}={text}")
  return ",".join(parts + [f"seed={seed}"]) or f"seed={seed}"


def _config(point: dict, seed: int, base: FitConfig, out: str) -> FitConfig:
  values = {**point, "members": tuple(point["members"]) if "members" in point else base.members}
  return dataclasses.replace(base, **values, seed=seed, out=out)


def plan_sweep(cache: str, grid: dict, seeds: int, out: str, base: FitConfig) -> list[tuple[str, dict, RunPlan]]:
  """Every (name, point, plan) of the sweep, each checked as `fit` would check it, before any training."""
  points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  runs, opened = [], Opened()
  for point, seed in itertools.product(points, range(seeds)):
    name = _point_name(point, seed)
    config = _config(point, seed, dataclasses.replace(base, cache=cache), storage.join(out, name))
    try:
      plan = plan_run(config, opened)
    except StillroomError as e:
      raise StillroomError(f"grid point {name.rsplit(',seed=', 1)[0] or '(base)'}: {e}") from e
    if any(name == other for other, _, _ in runs):
      raise StillroomError(f"two grid points would train into one run dir, {name!r}; give values that differ.")
    runs.append((name, point, plan))
  return runs


def _train(configs: list[FitConfig], verbose: bool, messages: tuple[str, int] | None = None) -> str | None:
  """One group of runs sharing a batch stream (a worker's unit of work), trained together; returns what diverged
  (the other groups go on). `messages`: in a spawned worker, the parent's program name and verbosity."""
  if messages is not None:
    log.configure(*messages)
  try:
    fit_group(configs, log_epochs=verbose)
  except Diverged as e:
    return str(e).removesuffix(DIVERGED_ADVICE)
  return None


def run_sweep(cache: str, grid_spec: str, out: str, seeds: int = 1, base: FitConfig | None = None,
              together: bool = True, jobs: int = 1, verbose: bool = False) -> list[str]:
  """Runs (or resumes) every grid point × seed; returns the run dirs.

  With `together`, runs that share a batch stream (all but the per-student settings: seed, T, alpha, loss, rule,
  members) train in one vmapped step, reading the cache once for all of them. With `jobs > 1`, that many groups
  train at once, each in its own process. `verbose` logs every run's every epoch.
  """
  distributed.one_process_only("student-train sweep")
  if jobs < 1:
    raise StillroomError(f"--jobs must be >= 1, got {jobs}.")
  if seeds < 1:
    raise StillroomError(f"--seeds must be >= 1, got {seeds}.")
  grid = parse_grid(grid_spec)
  base = base or FitConfig()
  check_not_an_input(out, [cache, base.data_dir], "--out")
  if storage.is_file(out) or (storage.has_entries(out) and not storage.exists(storage.join(out, MANIFEST))):
    raise StillroomError(f"--out {out!r} exists and is not a sweep dir (no {MANIFEST}); choose another --out.")
  runs = plan_sweep(cache, grid, seeds, out, base)
  manifest = {"cache": storage.absolute(cache), "grid": grid, "seeds": seeds, "data_dir": base.data_dir,
              "base": {"alpha": base.alpha},
              "runs": [{"name": name, "point": point, "seed": plan.config.seed} for name, point, plan in runs]}
  manifest_path = storage.join(out, MANIFEST)
  if storage.exists(manifest_path):
    previous = storage.read_json(manifest_path)
    known = {r["name"]: r for r in previous["runs"]}
    manifest["runs"] = list(known.values()) + [r for r in manifest["runs"] if r["name"] not in known]
  with writing(out):
    storage.make_dirs(out)
    storage.write_text(manifest_path, json.dumps(manifest, indent=2))
  groups: dict[str, list[tuple[str, FitConfig]]] = {}
  for name, _, plan in runs:
    key = json.dumps(plan.stream_key(), sort_keys=True, default=str) if together else name
    groups.setdefault(key, []).append((name, plan.config))
  done = 0
  for members in groups.values():
    for name, config in members:
      done += 1
      _LOG.info(f"[{done}/{len(runs)}] {name}" + (" (finished)" if is_finished(config.out) else ""))
  work = [[config for _, config in members] for members in groups.values()]
  if jobs == 1:
    diverged = [_train(configs, verbose) for configs in work]
  else:
    # Spawned, not forked: a forked JAX runtime is not safe to use.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
      futures = [pool.submit(_train, configs, verbose, log.settings()) for configs in work]
      diverged = [future.result() for future in concurrent.futures.as_completed(futures)]
  if any(diverged):
    raise Diverged("; ".join(d for d in diverged if d) + DIVERGED_ADVICE)
  return [plan.config.out for _, _, plan in runs]


def base_alpha(manifest: dict) -> float | None:
  return manifest.get("base", {}).get("alpha")


def _ensemble_accuracy(cache_path: str, eval_config: dict | None) -> float | None:
  """Eval accuracy of the cached teachers' ensemble (its rule, T=1), from the eval logits the cache stores, when
  they are of the split the students were evaluated on."""
  cache = open_cache(cache_path)
  spec = cache.spec
  if not eval_config or spec.eval_dataset is None or spec.eval_dataset.fingerprint != eval_config["fingerprint"]:
    return None
  return eval_accuracies(cache)[spec.combine]


# Settings a hard-label run (alpha = 1) ignores.
_SOFT_ONLY_AXES = names_where(FitConfig, soft=True)


def _hard_label_key(point: dict) -> str:
  """The point's settings that matter to a hard-label run: points sharing it share a scratch baseline."""
  return json.dumps({k: v for k, v in point.items() if k not in _SOFT_ONLY_AXES}, sort_keys=True)


def report(sweep_dir: str) -> str:
  """Writes report.md, report.csv and one PNG per swept axis into the sweep dir; returns the Markdown table."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  try:
    manifest = storage.read_json(storage.join(sweep_dir, MANIFEST))
  except FileNotFoundError as e:
    raise StillroomError(f"{sweep_dir!r} is not a sweep dir (no {MANIFEST}).") from e
  rows: dict[str, dict] = {}
  eval_config = None
  for run in manifest["runs"]:
    key = json.dumps(run["point"], sort_keys=True)
    row = rows.setdefault(key, {"point": run["point"], "accuracies": [], "missing": 0})
    run_dir = storage.join(sweep_dir, run["name"])
    if is_finished(run_dir):  # No eval_accuracy without labelled eval data: NaN, left out of means, shown empty.
      row["accuracies"].append(read_final(run_dir).get("eval_accuracy", np.nan))
      if eval_config is None:
        eval_config = read_run_file(run_dir, CONFIG_FILE, f"delete {run_dir} and run the same sweep command, which "
                                    "trains that run again").get("resolved", {}).get("eval")
    else:
      row["missing"] += 1
  # Points with alpha = 1 train on hard labels only: the scratch baseline of every point that shares their other
  # settings (epochs, model, label fraction; T, rule, members and loss do not change a hard-label run).
  is_scratch = lambda point: point.get("alpha", base_alpha(manifest)) == 1.0  # noqa: E731
  scratch_runs: dict[str, list[float]] = {}
  for row in rows.values():
    if is_scratch(row["point"]):
      scratch_runs.setdefault(_hard_label_key(row["point"]), []).extend(a for a in row["accuracies"] if a == a)
  baselines = {key: float(np.mean(values)) for key, values in scratch_runs.items() if values}
  ensemble = _ensemble_accuracy(manifest["cache"], eval_config)
  axes = list(manifest["grid"])
  header = axes + ["seeds", "accuracy mean", "accuracy std", "gain vs scratch", "gap closed"]
  table_rows = []
  for row in rows.values():
    values = np.array(row["accuracies"], float)
    measured = values[~np.isnan(values)]
    mean = float(measured.mean()) if len(measured) else None
    std = float(measured.std(ddof=1)) if len(measured) > 1 else 0.0 if len(measured) else None
    scratch_mean = baselines.get(_hard_label_key(row["point"]))
    gain = mean - scratch_mean if scratch_mean is not None and mean is not None else None
    gap = gain / (ensemble - scratch_mean) if gain is not None and ensemble and ensemble > scratch_mean else None
    table_rows.append([*(row["point"][a] for a in axes), f"{len(values)}" + (f" (+{row['missing']} unfinished)"
                                                                            if row["missing"] else ""),
                       mean, std, gain, gap])
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(header)
  writer.writerows(table_rows)
  storage.write_text(storage.join(sweep_dir, "report.csv"), text.getvalue())
  fmt = lambda v: "" if v is None else f"{100 * v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
  measured = any(r[len(axes) + 1] is not None for r in table_rows)
  lines = [f"Sweep of {manifest['cache']} ({len(manifest['runs'])} runs); accuracy on the eval split in %"
           + (f"; teachers' ensemble {100 * ensemble:.2f}%" if ensemble else "")
           + ("" if measured or not eval_config else "; the eval data is unlabeled, so no run has an accuracy")
           + ".", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in table_rows:
    cells = [str(v) for v in row[:len(axes)]] + [row[len(axes)], fmt(row[-4]), fmt(row[-3]),
                                                  "" if row[-2] is None else f"{round(100 * row[-2], 2) + 0.0:+.2f}",
                                                  "" if row[-1] is None else f"{round(100 * row[-1]) + 0:+d}%"]
    lines.append("| " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  storage.write_text(storage.join(sweep_dir, "report.md"), table + "\n")
  alpha_index = axes.index("alpha") if "alpha" in axes else None
  mean_of = lambda values: float(np.mean(values)) if values else np.nan  # noqa: E731
  for index, axis in enumerate(axes if measured else ()):  # Nothing to plot without accuracies.
    # Along other axes than alpha, scratch points (alpha = 1) would only flatten the curve: leave them out.
    plotted = [r for r in table_rows if alpha_index is None or axis == "alpha" or r[alpha_index] != 1.0] or table_rows
    labels = sorted({json.dumps(r[index]) for r in plotted}, key=lambda t: (len(t), t))
    means = [mean_of([r[len(axes) + 1] for r in plotted
                      if json.dumps(r[index]) == label and r[len(axes) + 1] is not None]) for label in labels]
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
      scratch_means = [mean_of([m for label_, m in scratch_rows if label_ == label and m is not None])
                       for label in labels]
      plot.plot(range(len(labels)), [100 * m for m in scratch_means], color="gray", linestyle="--", marker="o",
                label="scratch (alpha=1)")
      plot.legend()
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    storage.write_bytes(storage.join(sweep_dir, f"report_{axis}.png"), image.getvalue())
    plt.close(figure)
  return table
