"""One training path: K students in one vmapped step equal K runs of their own, and a group killed between two
students' checkpoints resumes to exactly what an uninterrupted group computes."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import digits_cache, numpy_log_softmax
from scipy.special import logsumexp

from shared.ensemble import ensemble_log_probs, member_weights
from shared.runs import load_run_teacher
from student_train.config import FitConfig
from student_train.train import fit, fit_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENTS = [  # seed, T, alpha, combine, loss, members; the first uses the cache's stored targets (T=4, AM, all).
    (0, None, 0.1, None, "kl", None),
    (1, 2.0, 0.5, "geometric", "kl", (1,)),
    (2, 1.0, 0.0, "arithmetic", "mse", (0, 2)),
    (3, 8.0, 1.0, "geometric", "kl", (0, 2)),
]


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, data_dir, teachers):
  return digits_cache(tmp_path_factory, data_dir, teachers, split="train[:640]")


def _configs(cache_path, data_dir, root, **common) -> list[FitConfig]:
  return [FitConfig(model="mlp-small", cache=cache_path, data_dir=data_dir, seed=seed, data_seed=0, temperature=t,
                    alpha=alpha, combine=combine, loss=loss, members=members, dropout=0.1, batch_size=64,
                    progress=False, out=os.path.join(root, f"s{seed}"), **common)
          for seed, t, alpha, combine, loss, members in STUDENTS]


@pytest.mark.fast
@pytest.mark.parametrize("geometric", [False, True])
def test_weighted_ensemble_equals_the_subset_ensemble(geometric):
  z = np.random.default_rng(0).normal(size=(5, 3, 7)).astype(np.float32) * 3
  for members in [(0, 1, 2), (1,), (0, 2)]:
    for flag in (geometric, jax.numpy.bool_(geometric)):  # A static rule, and a traced one as in the step.
      got = ensemble_log_probs(z, 2.5, geometric=flag, weights=member_weights(members, 3))
      scaled = z[:, list(members)].astype(np.float64) / 2.5
      expected = numpy_log_softmax(scaled.mean(1)) if geometric else \
          logsumexp(numpy_log_softmax(scaled), axis=1) - np.log(len(members))
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_grouped_and_separate_runs_agree(tmp_path, cache_path, data_dir):
  """20 steps (1,280 rows, batch 64) of 4 students with stored and re-derived targets, AM and GM, KL and MSE,
  member subsets and dropout: the group's parameters equal separate runs' to rtol 1e-5 / atol 1e-6."""
  together = fit_group(_configs(cache_path, data_dir, str(tmp_path / "together"), epochs=1), log_epochs=False)
  separate = [fit(config, log_epochs=False) for config in _configs(cache_path, data_dir, str(tmp_path / "separate"),
                                                                   epochs=1)]
  for a, b in zip(together, separate):
    assert a["students_in_step"] == 4 and b["students_in_step"] == 1 and a["rows"] == 1280
    params_a = load_run_teacher(a["run_dir"]).params
    params_b = load_run_teacher(b["run_dir"]).params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6),
                 params_a, params_b)
  config = json.load(open(tmp_path / "together" / "s0" / "config.json"))["resolved"]
  assert config["teaching"]["use_stored"]  # The first student read the stored targets, in the group too.


def _group_process(cache_path, data_dir, root, kill_at=None):
  """Runs the 4-student group (6 epochs, a checkpoint every 2) in a subprocess; with `kill_at=(student, epoch)`,
  SIGKILLs it just before that student saves that epoch, after the students before it have saved it."""
  configs = [json.dumps({k: v for k, v in c.__dict__.items()}) for c in
             _configs(cache_path, data_dir, root, epochs=5, finetune_epochs=1, checkpoint_every=2)]
  code = f"""
import json, os, signal
from student_train import run_dir
from student_train.config import FitConfig
from student_train.train import fit_group
kill_at = {kill_at!r}
save = run_dir.Checkpoints.save
def save_or_die(self, graphdef, state, epoch):
  if kill_at and self.out.endswith(f"s{{kill_at[0]}}") and epoch == kill_at[1]:
    os.kill(os.getpid(), signal.SIGKILL)
  save(self, graphdef, state, epoch)
run_dir.Checkpoints.save = save_or_die
configs = [FitConfig(**{{**d, "members": None if d["members"] is None else tuple(d["members"])}})
           for d in map(json.loads, {configs!r})]
fit_group(configs, log_epochs=False)
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_group_killed_between_students_checkpoints_resumes_bit_identical(tmp_path, cache_path, data_dir):
  killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
  died = _group_process(cache_path, data_dir, killed, kill_at=(2, 4))
  assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
  saved = {s: sorted(os.listdir(os.path.join(killed, f"s{s}", "checkpoints"))) for s in range(4)}
  assert saved == {0: ["2", "4"], 1: ["2", "4"], 2: ["2"], 3: ["2"]}  # Killed between students 1 and 2.
  resumed = _group_process(cache_path, data_dir, killed)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "after epoch 2 of 6" in resumed.stderr  # Rolled back to the newest epoch all four saved.
  assert _group_process(cache_path, data_dir, clean).returncode == 0
  for s in range(4):
    a, b = (load_run_teacher(os.path.join(root, f"s{s}")).params for root in (killed, clean))
    jax.tree.map(np.testing.assert_array_equal, a, b)  # Bitwise.
    lines = [[json.loads(line) for line in open(os.path.join(root, f"s{s}", "metrics.jsonl"))]
             for root in (killed, clean)]
    assert [line["epoch"] for line in lines[0]] == list(range(1, 7))
    assert [line["loss"] for line in lines[0]] == [line["loss"] for line in lines[1]]
    assert sorted(os.listdir(os.path.join(killed, f"s{s}", "checkpoints"))) == ["4", "6"]


@pytest.mark.fast
def test_resume_groups_roll_back_a_kill_but_never_a_run_far_ahead():
  from student_train.run_dir import resume_groups
  # Killed between students' saves of epoch 4 (every 2 epochs, 2 kept): the ones ahead roll back to 2.
  assert resume_groups([{2, 4}, {2, 4}, {2}, {2}]) == [(2, [0, 1, 2, 3])]
  assert resume_groups([{2}, set()]) == [(0, [0, 1])]  # Killed during the first saves.
  assert resume_groups([{6, 8}, {6, 8}]) == [(8, [0, 1])]  # Nothing to roll back.
  # A run added to a sweep whose runs have trained for a while: they are not thrown back to epoch 0.
  assert resume_groups([{40, 50}, {40, 50}, set()]) == [(0, [2]), (50, [0, 1])]
