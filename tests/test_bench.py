"""Every benchmark (`bench/*.py`) and script (`scripts/*.py`) runs to its end at a smoke size, through its public entry
(`main(argv)`, as `python FILE ARGS` calls it), so that a change to the library cannot break one unseen.

The checks are of structure and finiteness (what each wrote and printed), never of timings or accuracies. The runs
share a persistent compilation cache (this module's own), so that the many identical small steps compile once.
"""

import glob
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Smoke(NamedTuple):
  """A smoke run: its arguments (`{tmp}` and `{data_dir}` filled in), and a check of its JSON result (the file
  `{tmp}/out.json`, None for a script that writes none) and of what it printed."""

  argv: list[str]
  check: Callable[[dict | None, str, str], None]


def _finite(value, where: str = "result") -> None:
  """Every number in a JSON document is finite."""
  if isinstance(value, dict):
    for key, item in value.items():
      _finite(item, f"{where}.{key}")
  elif isinstance(value, list):
    for i, item in enumerate(value):
      _finite(item, f"{where}[{i}]")
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    assert math.isfinite(value), f"{where} = {value}"


def _positive(result: dict, *paths: str) -> None:
  """Each dotted path of `result` holds a number > 0."""
  for path in paths:
    value = result
    for key in path.split("."):
      value = value[int(key)] if isinstance(value, list) else value[key]
    assert isinstance(value, (int, float)) and value > 0, f"{path} = {value!r}"


def _run_all(result, printed, tmp):
  for part in ("streaming", "online", "build", "rss", "storage", "scaling"):
    assert part in result, part
  _positive(result, "streaming_overhead", "online_speedup_fraction_of_ideal", "build_overhead", "rss_growth",
            "build.forward_only_s", "online.mlp-small.ensemble_forward_s", "streaming.mlp-small.distill_from_cache_s",
            "storage.zstd_ratio", "scaling.epoch_per_row_ratio_16N_vs_N")
  assert [p["rows"] for p in result["scaling"]["points"]] == [128, 512, 2048]
  _positive(result, "streaming.mlp-small.steps_per_call.8.distill_from_cache_s",
            "streaming.mlp-small.steps_per_call.8.ratio")
  assert "build_overhead:" in printed and "wrote " in printed


def _cache_reads(result, printed, tmp):
  _positive(result, "per_row_rows_per_second", "chunk_loader_rows_per_second", "speedup")
  assert "chunk-wise loader:" in printed


def _build_memory(result, printed, tmp):
  _positive(result, "small.peak_rss_bytes", "large.peak_rss_bytes", "large.chunk_bytes")
  assert result["chunks"] == 4 and result["large"]["chunk_bytes"] > result["small"]["chunk_bytes"]
  assert "held at once:" in printed


def _multi_students(result, printed, tmp):
  _positive(result, "one_alone_s", "together.0.seconds", "together.0.speedup_over_separate_runs")
  assert [point["students"] for point in result["together"]] == [2]
  assert "2 together:" in printed


def _object_store_latency(result, printed, tmp):
  _positive(result, "build.speed_ratio", "fit.speed_ratio", "fit.epoch_speed_ratio")
  assert "fit (1 epoch, wall):" in printed


def _shuffle_quality(result, printed, tmp):
  assert len(result["points"]) == 12  # 3 orders x 4 windows.
  assert all(0 < point["fraction_of_uniform"] <= 1.2 for point in result["points"])
  _positive(result, "uniform_expectation", "uniform_expectation_grouped", "grouped_fraction_at_default_window")
  assert "permuted order, window 16 chunks" in printed and "grouped order, window 16 chunks" in printed
  assert "grouped order (16 views) at the default window" in printed


def _build_views(result, printed, tmp):
  assert result["rows_one_view"] == 10 and result["rows_many_views"] == 40
  _positive(result, "ratio", "decode_ms_per_image", "render_ms_per_crop", "build_s.views_1", "build_s.views_4")
  assert "build, 4 views (40 rows)" in printed and "ratio " in printed


def _mixed_views(result, printed, tmp):
  assert result["rows"] == 30 and set(result) >= {"jpeg", "prepared"}
  _positive(result, *(f"{source}.{mix}.{key}" for source in ("jpeg", "prepared")
                      for mix in ("none", "mixup:1", "cutmix:1") for key in ("build_s", "over_none")))
  assert "jpeg: none " in printed and "prepared: none " in printed


def _open_imagefolder(result, printed, tmp):
  assert result["images"] == 20 and result["cold_open_and_fingerprint_seconds"] is None  # --no-cold.
  _positive(result, "open_seconds", "open_and_fingerprint_seconds", "decode_ms_per_image")
  assert "open_and_fingerprint_seconds:" in printed


def _input_pipeline(result, printed, tmp):
  _positive(result, "decode_only_rows_per_s")
  for size in ("32px", "64px"):
    _positive(result, f"{size}.thread.rows_per_s", f"{size}.workers=1.rows_per_s",
              f"{size}.render_only_thread.rows_per_s")
  assert "64px workers=1:" in printed


def _device_render(result, printed, tmp):
  _positive(result, "workers=0.host_rows_per_s", "workers=0.device_host_side_rows_per_s",
            "workers=0.device_rows_per_s", "workers=0.device_over_host")
  assert "workers=0: host" in printed


def _image_sets(result, printed, tmp):
  assert len(result["memory"]) == 1
  _positive(result, "memory.0.fit.main_mb", "memory.0.build.tree_peak_mb", "streamed_vs_prerendered.0.ratio")
  assert "streamed JPEG / pre-rendered npz" in printed


def _prepared_images(result, printed, tmp):
  assert result["images"] == 20 and result["prepare"]["images"] == 20 and result["prepare"]["canvas"] == [85, 85, 3]
  _positive(result, "fit.epoch_s.jpeg", "fit.epoch_s.prepared", "fit.epoch_s.prepared-device", "fit.epoch_s.npz",
            "fit.prepared_over_npz", "fit.prepared_device_over_npz", "host_rows_per_s.jpeg workers=0",
            "host_rows_per_s.prepared workers=0", "host_rows_per_s.prepared-device workers=0",
            "host_rows_per_s.prepared_split_ms_per_batch.crop_resize_flip")
  assert "prepared / npz = " in printed


def _sparse_targets(result, printed, tmp):
  for task, k in (("digits", 3), ("synthetic_1000", 16)):
    assert result[task]["k"] == k
    for kind in ("dense", "topk", "sample"):
      _positive(result, f"{task}.build_seconds.{kind}", f"{task}.bytes_per_row.{kind}.layout")
      assert set(result[task]["students"][kind]) == {"heldout_kl", "agreement", "accuracy", "ece"}
  assert "| topk:16 |" in printed


def _lm_step(result, printed, tmp):
  assert result["model"] == "lm_teachers:tiny_lm" and set(result["seconds_per_step"]) == {"hard", "dense", "topk:4", "sample:4"}
  _positive(result, "over_hard.dense", "over_hard.topk:4", "over_hard.sample:4", "bytes_per_token.topk:4")
  assert "| topk:4 |" in printed


def _specialists(result, printed, tmp):
  assert result["chosen"]["clusters"] == 2 and len(result["test"]) == 1
  assert {"generalist", "generalist + specialists", "scratch", "from the generalist", "from q"} <= set(
      result["test"][0])
  assert "| student from q |" in printed


def _features(result, printed, tmp):
  (regime,) = result["regimes"].values()
  assert set(regime["chosen"]) == {"hint", "attention", "similarity"}
  row = regime["test"][0]
  assert {"scratch", "KD", "KD + hint", "KD + attention", "KD + similarity"} <= set(row["epoch_seconds"])
  _positive(result, "bytes_per_row.KD", "bytes_per_row.KD + hint")
  assert "| KD + similarity |" in printed


def _precision(result, printed, tmp):
  assert list(result["models"]) == ["mlp-tiny"] and set(result["ensemble"]) == {"T=1", "T=4"}
  _positive(result, "models.mlp-tiny.max_abs_logit", "ensemble.T=1.tolerance", "logit_spread_bound")
  assert isinstance(result["within_bounds"], bool) and "| ensemble targets (bound) |" in printed


def _keras_peer(result, printed, tmp):
  _positive(result, "build_s", "median_epoch_s.stillroom_plain_s", "median_epoch_s.stillroom_kd_s")
  if "keras_kd_s" in result:  # This Python has Keras.
    _positive(result, "break_even_epochs")


def _models(result, printed, tmp):
  row = result["models"]["mlp-tiny"]
  assert row["input_shape"] == [8, 8, 1] and row["params"] == 64 * 32 + 32 + 32 * 10 + 10
  for dtype in ("float32", "bfloat16"):
    _positive(result, f"models.mlp-tiny.forward_rows_per_s.{dtype}", f"models.mlp-tiny.train_rows_per_s.{dtype}")
  _positive(result, "build.build_s", "build.forward_only_s", "build.ratio")
  assert "build vs forward (mlp-tiny" in printed and "wrote " in printed


def _make_shapes(result, printed, tmp):
  train = glob.glob(os.path.join(tmp, "shapes", "train", "*", "*.jpg"))
  assert len(train) == 10 and len(glob.glob(os.path.join(tmp, "shapes", "test", "*", "*.jpg"))) == 0
  assert "wrote 10 train and 0 test images" in printed


def _recipe_search(result, printed, tmp):
  assert os.path.getsize(os.path.join(tmp, "work", "demo.md")) > 0
  for sweep in ("full", "fraction"):  # Each sweep's table, written and printed.
    with open(os.path.join(tmp, "work", sweep, "report.md")) as f:
      table = f.read().strip()
    assert "\n|---|" in table and table in printed, sweep


def _grow(result, printed, tmp):
  assert result["rows"] == 64 and result["members"] == 2
  _positive(result, "seconds.build", "seconds.extend", "seconds.rewrite", "seconds.build_sparse", "seconds.convert",
            "seconds.build_one", "extend_over_build", "extend_target_s", "rewrite_over_build", "extend_over_parts",
            "convert_over_build", "fastest.extend_over_build", "fastest.target", "fastest.convert_over_build")
  assert "extend by one teacher (2 -> 3 members)" in printed and "convert dense -> topk:5" in printed


def _view_study(result, printed, tmp):
  with open(os.path.join(tmp, "results", "smoke.json")) as f:
    study = json.load(f)
  _finite(study)
  arms = study["arms"]
  assert list(arms) == ["fresh crops, hard labels", "crop views", "mixup views", "cutmix views"]
  for name, arm in arms.items():  # Equal rows and steps, read back from each run's own metrics (every epoch's rows).
    runs = glob.glob(os.path.join(tmp, "work", "smoke", "students", "*", f"{name.replace(' ', '_')}_seed0"))
    assert len(runs) == 1, name
    with open(os.path.join(runs[0], "metrics.jsonl")) as f:
      lines = [json.loads(line) for line in f]
    assert sum(line["rows"] for line in lines) == arm["rows"] == study["examples"] * 2, name  # N examples x 2 views.
    assert len(arm["values"]) == 1 and arm["values"][0] == lines[-1]["eval_accuracy"], name
    if name != "fresh crops, hard labels":  # Paired against the fresh-crop arm of the same seed.
      fresh = arms["fresh crops, hard labels"]["values"][0]
      assert arm["paired_difference"]["values"] == [arm["values"][0] - fresh]
  with open(os.path.join(tmp, "results", "smoke.md")) as f:
    table = f.read().strip()
  assert "\n|---|" in table and table in printed


OUT = ["--out", "{tmp}/out.json"]
SMOKE = {
    "bench/run_all.py": Smoke(["--smoke", *OUT], _run_all),
    "bench/cache_reads.py": Smoke(["--rows", "2048", "--classes", "10", "--members", "2", "--chunk-rows", "512",
                                   *OUT], _cache_reads),
    "bench/build_memory.py": Smoke(["--rows", "2048", "--chunk-rows", "512", "--small-chunk-rows", "64", "--classes",
                                    "10", *OUT], _build_memory),
    "bench/multi_students.py": Smoke(["--model", "mlp-tiny", "--rows", "256", "--batch", "64", "--students", "1,2",
                                      *OUT], _multi_students),
    "bench/object_store_latency.py": Smoke(["--smoke", "--latency-ms", "5", *OUT], _object_store_latency),
    "bench/shuffle_quality.py": Smoke(["--rows", "2048", "--classes", "10", "--batch", "64", "--chunk-rows", "128",
                                       *OUT], _shuffle_quality),
    "bench/open_imagefolder.py": Smoke(["--images", "20", "--no-cold", *OUT], _open_imagefolder),
    "bench/build_views.py": Smoke(["--images", "10", "--min-side", "24", "--max-side", "40", "--views", "4",
                                   "--image-size", "8", "--model", "mlp-tiny", "--repeats", "1", "--warmup", "0",
                                   *OUT], _build_views),
    "bench/mixed_views.py": Smoke(["--images", "10", "--min-side", "24", "--max-side", "40", "--views", "3",
                                   "--image-size", "8", "--model", "mlp-tiny", "--repeats", "1", "--warmup", "0",
                                   *OUT], _mixed_views),
    "bench/input_pipeline.py": Smoke(["--images", "20", "--batch", "8", "--batches", "3", "--workers", "1",
                                      "--repeats", "1", *OUT], _input_pipeline),
    "bench/device_render.py": Smoke(["--images", "16", "--side", "24", "--size", "8", "--batch", "8", "--batches",
                                     "3", "--repeats", "1", *OUT], _device_render),
    "bench/image_sets.py": Smoke(["--sizes", "10", "--workers", "1", "--models", "mlp-tiny", "--epochs", "2",
                                  "--repeats", "1", "--work", "{tmp}/work", *OUT], _image_sets),
    "bench/prepared_images.py": Smoke(["--images", "20", "--model", "mlp-tiny", "--epochs", "2", "--repeats", "1",
                                       "--batch", "8", "--batches", "3", "--workers", "0", "--prepare-workers", "0",
                                       "--work", "{tmp}/work",
                                       *OUT], _prepared_images),
    "bench/sparse_targets.py": Smoke(["--smoke", "--seeds", "1", "--data-dir", "{data_dir}", *OUT], _sparse_targets),
    # A test-size transformer (`tests/lm_teachers.py`) rather than lm-tiny: the same step, compiled in a fraction of
    # the time.
    "bench/lm_step.py": Smoke(["--smoke", "--model", "lm_teachers:tiny_lm", *OUT], _lm_step),
    "bench/specialists.py": Smoke(["--smoke", "--seeds", "1", "--data-dir", "{data_dir}", "--work", "{tmp}/work",
                                   *OUT], _specialists),
    "bench/features.py": Smoke(["--smoke", "--seeds", "1", "--data-dir", "{data_dir}", "--work", "{tmp}/work", *OUT],
                               _features),
    "bench/keras_peer.py": Smoke(["--smoke", *OUT], _keras_peer),
    "bench/grow.py": Smoke(["--smoke", *OUT], _grow),
    "bench/precision.py": Smoke(["--smoke", "--data-dir", "{data_dir}", "--work", "{tmp}/work", *OUT], _precision),
    "bench/models.py": Smoke(["--smoke", "--models", "mlp-tiny", "--build-ratio", "--build-model", "mlp-tiny", *OUT],
                             _models),
    "scripts/make_shapes.py": Smoke(["{tmp}/shapes", "--train-per-class", "1", "--test-per-class", "0"],
                                    _make_shapes),
    "scripts/recipe_search.py": Smoke(["--smoke", "--work", "{tmp}/work", "--data-dir", "{data_dir}"],
                                      _recipe_search),
    "scripts/view_study.py": Smoke(["--smoke", "--work", "{tmp}/work", "--results", "{tmp}/results", "--data-dir",
                                    "{data_dir}"], _view_study),
}
# Run by other tests: the worked example of docs/external-teachers.md, and the docs' staleness test.
ELSEWHERE = {
    "scripts/sklearn_teacher.py": "tests/test_external.py::test_views_then_sklearn_then_import_then_verify_and_fit",
    "scripts/make_docs.py": "tests/test_docs.py::test_generated_pages_are_current",
    "scripts/text_study.py": "tests/test_demo.py::test_text_study_smoke",
    "scripts/ngram_teacher.py": "tests/test_ngram_teacher.py::test_the_worked_example_end_to_end_at_a_tiny_size"}
LIBRARIES = {"bench/__init__.py", "bench/harness.py", "bench/synthetic.py"}  # Of the benchmarks; every run uses them.
CONSOLE_SCRIPTS = ("student-train", "teacher-cache")  # What image_sets.py runs, installed next to this Python.


def test_every_benchmark_and_script_has_a_smoke_run():
  found = {os.path.relpath(path, REPO) for pattern in ("bench/*.py", "scripts/*.py")
           for path in glob.glob(os.path.join(REPO, pattern))}
  assert found - set(SMOKE) - set(ELSEWHERE) - LIBRARIES == set(), "give each new benchmark or script a smoke run"
  assert set(SMOKE) | set(ELSEWHERE) | LIBRARIES <= found, "a smoke run of a file that is gone"


def _load(path: str):
  """A fresh module of the file (the smoke settings some set stay in it)."""
  spec = importlib.util.spec_from_file_location(f"smoke_{os.path.basename(path)[:-3]}", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", sorted(SMOKE))
def test_smoke_run(path, tmp_path, data_dir, compilation_cache, capsys, monkeypatch):
  if path == "bench/image_sets.py":
    missing = [c for c in CONSOLE_SCRIPTS if not os.path.exists(os.path.join(os.path.dirname(sys.executable), c))]
    if missing:
      pytest.skip(f"it runs the installed console scripts, and {missing} are not installed next to "
                  f"{sys.executable} (`make install`)")
  smoke = SMOKE[path]
  monkeypatch.chdir(tmp_path)  # Anything written to a relative path lands here.
  module = _load(path)
  module.main([arg.format(tmp=tmp_path, data_dir=data_dir) for arg in smoke.argv])
  printed = capsys.readouterr().out
  result = None
  if "--out" in smoke.argv:
    with open(tmp_path / "out.json") as f:
      result = json.load(f)
    _finite(result)
    assert result["machine"]["cpus"] >= 1
  smoke.check(result, printed, str(tmp_path))


def test_recipe_search_shapes_smoke(tmp_path, compilation_cache, capsys, monkeypatch):
  """`scripts/recipe_search.py --shapes` (the natural-image demo's search) runs to its end at its smoke size, on a
  validation split of each class's last images."""
  monkeypatch.chdir(tmp_path)
  _load("scripts/recipe_search.py").main(["--shapes", "--smoke", "--work", str(tmp_path / "work")])
  printed = capsys.readouterr().out
  with open(tmp_path / "work" / "demo.json") as f:
    config = json.load(f)["config"]
  per_class = 5  # The smoke set's images per class, listed class by class: the last one of each is held out.
  assert config["test_split"] == "+".join(f"train[{c * per_class + 4}:{c * per_class + 5}]" for c in range(10))
  assert config["train_split"] == "+".join(f"train[{c * per_class}:{c * per_class + 4}]" for c in range(10))
  with open(tmp_path / "work" / "temperature" / "report.md") as f:
    table = f.read().strip()
  assert "\n|---|" in table and table in printed
