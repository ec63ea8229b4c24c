"""The end-to-end pipeline as a function, on an npz of flat tabular features (no augmentation)."""

import dataclasses
import json
import os

import numpy as np
import pytest
from sklearn.datasets import load_wine

from stillroom.demo import DemoConfig, format_table, run_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_pipeline_on_a_tabular_npz(tmp_path):
  wine = load_wine()
  order = np.random.default_rng(0).permutation(len(wine.target))  # The file is sorted by class.
  x = wine.data[order]
  x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
  np.savez(tmp_path / "wine.npz", x=x, y=wine.target[order])
  defaults = DemoConfig()
  config = DemoConfig(
      dataset=f"npz:{tmp_path / 'wine.npz'}", train_split="train[:75%]", test_split="train[75%:]",
      work_dir=str(tmp_path / "work"), results_dir=str(tmp_path / "results"), teachers=2, seeds=2, folds=2,
      label_fraction=0.5, fraction_epochs=20, fraction_temperature=2.0,
      teacher=dataclasses.replace(defaults.teacher, model="mlp-small", epochs=15, batch_size=32),
      build=dataclasses.replace(defaults.build, temperature=2.0),
      student=dataclasses.replace(defaults.student, model="mlp-tiny", epochs=15, finetune_epochs=2, batch_size=32,
                                  lr=3e-3))
  results = run_demo(config)
  assert results["views"] == 1 and results["teacher_model"] == "mlp-small"
  assert set(results["students"]) == {"scratch", "distilled (AM)", "distilled (GM)", "distilled (cross-fitted AM)"}
  assert all(len(arm["values"]) == 2 for arm in results["students"].values())
  assert results["teachers"]["ensemble (AM)"] > 0.85  # Wine is easy for an MLP on standardised features.
  # The teachers' accuracies come from the logits the cache stored on the test split; they equal evaluating the
  # teacher runs (which the demo no longer does).
  from student_train.evaluate import EvalConfig, evaluate_runs
  runs = tuple(str(tmp_path / "work" / f"teacher{m}") for m in range(2))
  direct = evaluate_runs(EvalConfig(runs=runs, dataset=config.dataset, split=config.test_split))
  one_example = 1 / direct["count"]  # Cached logits are float16: a near-tie may flip one example.
  assert abs(results["teachers"]["teacher 0"] - direct["members"][0]["accuracy"]) <= one_example + 1e-9
  assert abs(results["teachers"]["ensemble (AM)"] - direct["accuracy"]) <= one_example + 1e-9
  assert all(arm["mean"] > 0.6 for arm in results["students"].values())
  distilled = results["students"]["distilled (AM)"]
  np.testing.assert_allclose(distilled["paired_gain"]["values"],
                             np.array(distilled["values"]) - np.array(results["students"]["scratch"]["values"]))
  fraction = results["label_fraction"]
  assert set(fraction) == {"hard labels", "soft targets", "soft targets (cross-fitted)"}
  for name in ("soft targets", "soft targets (cross-fitted)"):
    gain = np.array(fraction[name]["values"]) - np.array(fraction["hard labels"]["values"])
    np.testing.assert_allclose(fraction[name]["paired_gain"]["values"], gain)
    larger_std = max(np.std(fraction[name]["values"], ddof=1), np.std(fraction["hard labels"]["values"], ddof=1))
    assert fraction[name]["gain_over_2_std"] == bool(gain.mean() > 2 * larger_std)
  for name in ("demo.md", "demo.json", "demo.png"):
    assert os.path.getsize(tmp_path / "results" / name) > 0
  with open(tmp_path / "results" / "demo.json") as f:
    assert json.load(f)["students"]["scratch"]["values"] == results["students"]["scratch"]["values"]
  table = format_table(results)
  assert "| student, distilled (AM) |" in table and "paired gain" in table and "| teachers |" in table
  # Run again: every run is reused (same results, no retraining).
  assert run_demo(config)["students"] == results["students"]


def test_demo_arms_trained_apart_see_the_same_rows_as_together(tmp_path):
  """--no-together trains each arm on its own (one student per step) on the rows a vmapped group shares: the same
  teachers and cache, and students whose accuracies agree with the group's."""
  wine = load_wine()
  order = np.random.default_rng(0).permutation(len(wine.target))
  x = wine.data[order]
  np.savez(tmp_path / "wine.npz", x=((x - x.mean(0)) / x.std(0)).astype(np.float32), y=wine.target[order])
  defaults = DemoConfig()
  base = DemoConfig(
      dataset=f"npz:{tmp_path / 'wine.npz'}", train_split="train[:75%]", test_split="train[75%:]",
      results_dir=str(tmp_path / "results"), teachers=1, seeds=1, folds=1, label_fraction=1.0, geometric_arm=False,
      teacher=dataclasses.replace(defaults.teacher, model="mlp-tiny", epochs=1, batch_size=32),
      student=dataclasses.replace(defaults.student, model="mlp-tiny", epochs=2, finetune_epochs=0, batch_size=32,
                                  checkpoint_every=2))
  results = {}
  for together in (True, False):
    work = tmp_path / f"together_{together}"
    results[together] = run_demo(dataclasses.replace(base, work_dir=str(work), together=together))
    assert set(results[together]["students"]) == {"scratch", "distilled (AM)"}  # No GM arm.
    lines = {}
    for arm in ("scratch", "distilled_AM"):
      with open(next(work.glob(f"students_*/{arm}_seed0")) / "metrics.jsonl") as f:
        lines[arm] = [json.loads(line) for line in f]
      assert {line["students_in_step"] for line in lines[arm]} == {1 if not together else 2}
    assert [line["rows"] for line in lines["scratch"]] == [line["rows"] for line in lines["distilled_AM"]]
  assert results[True]["teachers"] == results[False]["teachers"]
  for arm in ("scratch", "distilled (AM)"):  # One vmapped step or two plain ones: float rounding apart at most.
    assert abs(results[True]["students"][arm]["mean"] - results[False]["students"][arm]["mean"]) <= 1 / 45 + 1e-9



@pytest.fixture(scope="module")
def text_study(tmp_path_factory, compilation_cache):
  """`scripts/text_study.py --smoke` once (it runs the text demo, `run_text_demo`, as its step 2): rows of 16 bytes,
  one lm-tiny teacher, 2 paired seeds, one topk (the full study's two values of K run the same loop)."""
  import importlib.util
  tmp = tmp_path_factory.mktemp("text_study")
  spec = importlib.util.spec_from_file_location("text_study", os.path.join(REPO, "scripts", "text_study.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(["--smoke", "--seeds", "2", "--work", str(tmp / "work"), "--results", str(tmp / "results")])
  with open(tmp / "results" / "study.json") as f:
    return tmp, json.load(f)


def test_text_demo_at_a_tiny_size(text_study):
  """`demo --text` end to end at a tiny size: the stdlib files copied by role, the caches at their sizes, every arm
  over paired seeds at equal tokens, the paired differences, the outputs."""
  from stillroom.demo import STDLIB_TEXT, stdlib_files
  tmp, _ = text_study
  with open(tmp / "results" / "test" / "demo.json") as f:
    results = json.load(f)
  files = {role: stdlib_files(role) for role in STDLIB_TEXT}
  assert results["files"] == files and all(files.values())
  assert not set(files["train"]) & (set(files["test"]) | set(files["valid"]))  # Held-out text is other files.
  assert not any("test/" in path or "tests/" in path for paths in files.values() for path in paths)
  copied = next((tmp / "work").glob("stdlib-*"))
  assert sorted(str(p.relative_to(copied / "test")) for p in (copied / "test").rglob("*.py")) == files["test"]
  students = results["students"]
  assert list(students) == ["hard labels", "dense", "topk:8", "sample:6"]
  # Bytes per token of the targets: dense V float16; topk:K int16 ids + float16 + the rest (float32); sample:6 ids,
  # float16 and uint16 counts: equal to topk:8's.
  assert [students[k]["bytes_per_token"] for k in ("dense", "topk:8", "sample:6")] == [512, 36, 36]
  tokens = {name: arm["tokens_trained"] for name, arm in students.items()}
  assert len({tuple(t) for t in tokens.values()}) == 1 and tokens["dense"][0] > 0  # Equal steps: equal tokens.
  for name, arm in students.items():
    assert len(arm["bits_per_byte"]["values"]) == 2
    if name != "hard labels":
      for metric in ("bits_per_byte", "ece"):
        np.testing.assert_allclose(arm[metric]["paired_difference"]["values"],
                                   np.array(arm[metric]["values"]) - students["hard labels"][metric]["values"])
  with open(next((tmp / "work").glob("text_students_*")) / "hard_labels_seed1" / "metrics.jsonl") as f:
    last = [json.loads(line) for line in f][-1]
  assert students["hard labels"]["bits_per_byte"]["values"][1] == last["eval_bits_per_byte"]
  for name in ("demo.md", "demo.json", "demo.png"):
    assert os.path.getsize(tmp / "results" / "test" / name) > 0
  with open(tmp / "results" / "test" / "demo.md") as f:
    assert "| student, sample:6 | 36 |" in f.read()


def test_text_study_smoke(text_study):
  """The study's validation grid picks the lowest validation bits per byte, its held-out table is the demo's, and
  its bytes per token are read from the stores at both vocabularies."""
  tmp, study = text_study
  runs, chosen = study["validation"]["runs"], study["validation"]["chosen"]
  best = min((n for n in runs if n != "hard labels"), key=lambda n: runs[n]["bits_per_byte"])
  assert best == f"T={chosen['temperature']:g}, alpha={chosen['alpha']:g}"
  assert study["sizes"]["temperature"] == chosen["temperature"] and study["sizes"]["alpha"] == chosen["alpha"]
  with open(tmp / "results" / "test" / "demo.json") as f:
    assert json.load(f)["students"] == study["test"]["students"]
  vocabularies = study["bytes_per_token"]
  assert vocabularies["bytes (V=256)"] == {"dense": 512, "topk:8": 36, "sample:6": 36}
  assert vocabularies["BPE (V=512)"] == {"topk:8": 36}  # int16 ids at V=512 too.
  assert study["bpe"]["text_bytes_per_token"] > 1  # A BPE token stands for more than one byte.
  with open(tmp / "results" / "study.md") as f:
    table = f.read()
  assert "(chosen)" in table and "| student, topk:8 | 36 |" in table and "| BPE (V=512) |" in table
