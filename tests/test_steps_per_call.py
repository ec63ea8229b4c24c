"""`fit --steps-per-call N`: N optimizer steps in one jitted call (a scan of the one step over N stacked batches) train
the run that N calls of one step train, within float rounding; an epoch's remainder, a mid-epoch resume at a call
boundary, a divergence inside a call and a group of vmapped students behave as with one step per call.

The bound: a scanned step is not bitwise the step called alone (XLA fuses the loop body differently:
`shared/TECH_NOTES.md`, "lax.scan of N steps", 6 AdamW steps differed by <= 1.1e-7 without a bias before
BatchNorm). `mlp-small` has no BatchNorm, so after an epoch of 29 AdamW steps the parameters agree to `RTOL`/`ATOL`
and every epoch metric to `RTOL`; a call partition that is the same (a resume with the same N) is bitwise.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import digits_cache

from shared.runs import load_run_teacher
from student_train import train as train_lib
from student_train.steps import train_call_fn
from student_train.train import Diverged, FitConfig, fit, fit_group, stack_calls

RTOL, ATOL = 1e-5, 1e-6  # Last-bit differences of float32 grown over 58 steps, far below any training effect.
BATCH = 100  # The cache holds 1,437 examples x 2 views = 2,874 rows: 29 steps per epoch, 29 = 3 x 8 + 5.
METRICS = ("loss", "hard_ce", "soft", "train_accuracy", "teacher_agreement")


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, data_dir, teachers):
  return digits_cache(tmp_path_factory, data_dir, teachers[:2], chunk_rows=256)


def _config(cache_path, data_dir, out, **options) -> FitConfig:
  return FitConfig(**{"model": "mlp-small", "cache": cache_path, "data_dir": data_dir, "epochs": 2,
                      "batch_size": BATCH, "dropout": 0.2, "temperature": 2.0, "data_seed": 0, "eval_split": "none",
                      "progress": False, "workers": 0,
                      "out": str(out), **options})


def _params(run_dir) -> dict:
  return jax.tree.map(np.asarray, load_run_teacher(str(run_dir)).params)


def _metrics(run_dir) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_path, data_dir, compilation_cache):
  """The same 2-epoch run with one step per call and with 8 (the last call of each epoch: 5 steps)."""
  root = tmp_path_factory.mktemp("spc")
  for n in (1, 8):
    fit(_config(cache_path, data_dir, root / f"n{n}", steps_per_call=n), log_epochs=False)
  return root


def test_eight_steps_per_call_train_the_one_step_run(runs):
  one, eight = _params(runs / "n1"), _params(runs / "n8")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL), one, eight)
  lines_one, lines_eight = _metrics(runs / "n1"), _metrics(runs / "n8")
  assert [line["rows"] for line in lines_eight] == [2874, 2874]  # The remainder's 5 steps are trained, once.
  for a, b in zip(lines_one, lines_eight, strict=True):
    for key in METRICS:
      assert b[key] == pytest.approx(a[key], rel=RTOL), key


def test_a_run_interrupted_at_a_call_boundary_resumes_to_the_uninterrupted_run(runs, cache_path, data_dir, tmp_path,
                                                                              monkeypatch, compilation_cache):
  """Interrupted in epoch 2 after its mid-epoch checkpoint at step 16 (calls of 8: after the second call), resumed
  with the same N: the same calls, so bitwise the uninterrupted N = 8 run; resumed instead with N = 3 (16 is off its
  grid: a call of 2 steps first, then calls of 3 from step 18), within the bound."""
  calls = {"n": 0}

  def interrupt_after_epoch_1_call_2() -> None:
    calls["n"] += 1
    if calls["n"] == 4 + 3:  # Epoch 1: 4 calls (8, 8, 8, 5); epoch 2: interrupted before its third.
      raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(train_lib, "raise_if_interrupted", interrupt_after_epoch_1_call_2)
    with pytest.raises(KeyboardInterrupt):
      fit(_config(cache_path, data_dir, tmp_path / "same", steps_per_call=8, checkpoint_every_steps=16),
          log_epochs=False)
  assert len(_metrics(tmp_path / "same")) == 1
  shutil.copytree(tmp_path / "same", tmp_path / "other")  # The same interrupted run, to resume with another N.
  for n_after, out in ((8, tmp_path / "same"), (3, tmp_path / "other")):
    resumed = []
    original = train_lib.stack_calls
    with monkeypatch.context() as patch:
      patch.setattr(train_lib, "stack_calls", lambda *a: resumed.append(a[1:]) or original(*a))
      fit(_config(cache_path, data_dir, out, steps_per_call=n_after,
                  checkpoint_every_steps=None if n_after == 3 else 16), log_epochs=False)
    assert resumed[0] == (n_after, 16)  # From the mid-epoch checkpoint, at its call boundary.
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "same"), _params(runs / "n8"))  # Bitwise.
  assert _metrics(tmp_path / "same")[1]["loss"] == _metrics(runs / "n8")[1]["loss"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL), _params(runs / "n8"),
               _params(tmp_path / "other"))


@pytest.mark.fast
def test_calls_cover_the_epoch_on_a_grid_of_n():
  batches = [{"x": np.full((2, 3), i), "index": np.array([i, i])} for i in range(11)]
  firsts = lambda calls: [(int(c["x"][0, 0, 0]), len(c["x"])) for c in calls]  # noqa: E731
  assert firsts(stack_calls(iter(batches), 4)) == [(0, 4), (4, 4), (8, 3)]
  assert next(stack_calls(iter(batches), 4))["x"].shape == (4, 2, 3)
  # Resumed at batch 6 (saved with another N): up to 8 first, then on the grid.
  assert firsts(stack_calls(iter(batches[6:]), 4, first_step=6)) == [(6, 2), (8, 3)]
  assert firsts(stack_calls(iter(batches[8:]), 4, first_step=8)) == [(8, 3)]


@pytest.mark.fast
def test_accumulate_adds_a_call_as_its_steps_one_by_one():
  rng = np.random.default_rng(0)
  metrics = {"loss": rng.normal(size=(5, 2)).astype(np.float32), "rows": np.full((5, 2), 7.0, np.float32)}
  metrics["loss"][3, 1] = np.nan  # Student 1's batch 10 + 3.
  stepwise = train_lib._empty_sums({k: v[0] for k, v in metrics.items()})
  for i in range(5):
    stepwise = train_lib.accumulate(stepwise, {k: v[i] for k, v in metrics.items()}, 10 + i)
  called = train_lib.accumulate(train_lib._empty_sums(metrics), metrics, 10)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(called), jax.device_get(stepwise))
  assert np.asarray(called["first_nonfinite"]).tolist() == [train_lib._NEVER, 13]


@pytest.mark.fast
def test_a_call_is_a_scan_of_the_step():
  """The scanned body is the step itself, with the call's hypers: N steps of a counter step."""
  step = lambda state, batch, hypers: (state + batch["x"] * hypers, {"seen": state})  # noqa: E731
  state, metrics = jax.jit(train_call_fn(step))(np.float32(0), {"x": np.arange(4, dtype=np.float32)}, np.float32(2))
  assert float(state) == 12.0 and np.asarray(metrics["seen"]).tolist() == [0, 0, 2, 6]


def test_a_divergence_inside_a_call_is_named_by_its_step(tmp_path, data_dir, compilation_cache):
  """lr 1e30 on hard labels: the same first non-finite step with one step per call and with 4 (200 rows, 4 steps:
  one call)."""
  messages = []
  for n in (1, 4):
    config = FitConfig(model="mlp-small", dataset="digits", split="train[:200]", data_dir=data_dir, lr=1e30,
                       batch_size=50, epochs=1, eval_split="none", progress=False, workers=0, steps_per_call=n,
                       out=str(tmp_path / f"n{n}"))
    with pytest.raises(Diverged) as caught:
      fit(config, log_epochs=False)
    messages.append(str(caught.value).split(" diverged ", 1)[1])
  assert messages[0] == messages[1] and "became non-finite at step" in messages[0], messages


def test_a_vmapped_group_takes_several_steps_per_call(runs, tmp_path, cache_path, data_dir, compilation_cache):
  """Two students of one vmapped group (seeds and temperatures 0, 2 and 1, 4), 8 steps per call: the first trains
  the fixture's run of one student and one step per call (a vmapped step is within rounding of a single one too),
  the second its own run."""
  fit_group([_config(cache_path, data_dir, tmp_path / f"s{seed}", seed=seed, temperature=t, steps_per_call=8)
             for seed, t in ((0, 2.0), (1, 4.0))], log_epochs=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL), _params(runs / "n1"),
               _params(tmp_path / "s0"))
  for a, b in zip(_metrics(runs / "n1"), _metrics(tmp_path / "s0"), strict=True):
    assert b["loss"] == pytest.approx(a["loss"], rel=RTOL)
  other = _metrics(tmp_path / "s1")
  assert len(other) == 2 and np.isfinite(other[-1]["loss"]) and other[-1]["loss"] != _metrics(runs / "n1")[-1]["loss"]
