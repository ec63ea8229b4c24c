"""Hinton et al.'s specialists: the clustering, dustbin labels and correction, the combination solver against
SciPy's optimiser on the same objective, the head surgery, and the three commands end to end on digits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

import conftest
from shared.cache import open_cache
from shared.data import open_transfer_set
from shared.errors import StillroomError
from shared.runs import load_run_teacher
from shared.specialists import (SpecialistPlan, class_matrix, class_matrix_mask, cluster_classes, combine_specialists,
                                dustbin_correction, dustbin_labels, initial_params)
from student_train.cli import main as train_main
from student_train.export import export_run
from student_train.plan import enriched_sampler
from teacher_cache.cli import main as cache_main
from teacher_cache.verify import verify_cache


@pytest.mark.fast
def test_the_clustering_recovers_planted_subsets():
  planted = [[0, 3, 7, 9], [1, 2, 4], [5, 6, 8, 10, 11]]
  rng = np.random.default_rng(0)
  # Predictions whose classes co-vary within each planted subset: a row spreads its mass over one subset.
  rows = np.zeros((3000, 12))
  for row in rows:
    subset = planted[rng.integers(3)]
    row[subset] = rng.dirichlet(np.ones(len(subset)))
  rows = 0.9 * rows + 0.1 * rng.dirichlet(np.ones(12), size=len(rows))
  assert cluster_classes(np.cov(rows, rowvar=False), 3, seed=0) == planted


@pytest.mark.fast
def test_dustbin_labels_and_the_correction_undo_enriched_sampling():
  np.testing.assert_array_equal(dustbin_labels(np.array([0, 1, 2, 3, 4, -1]), (3, 1), 5), [2, 1, 2, 0, 2, -1])
  # Bayes with scaled priors: a specialist trained on enriched data outputs p'(c|x) ∝ w_c p(c|x), with w the
  # enrichment of each class's prior; its dustbin is the mass outside its classes.
  rng = np.random.default_rng(1)
  prior = rng.dirichlet(np.ones(5))
  subset, natural, enriched = [1, 3], prior[[1, 3]].sum(), 0.5
  weights = np.where(np.isin(np.arange(5), subset), enriched / natural, (1 - enriched) / (1 - natural))
  for _ in range(5):
    posterior = softmax(rng.normal(size=5) + np.log(prior))
    trained = posterior * weights / (posterior * weights).sum()
    logits = np.log(np.r_[trained[subset], trained[[0, 2, 4]].sum()])
    logits[-1] += dustbin_correction(natural, enriched)
    np.testing.assert_allclose(softmax(logits), np.r_[posterior[subset], posterior[[0, 2, 4]].sum()], rtol=1e-12)


def _objective(z, p_g, p_m, subsets, active):
  """KL(p_g ‖ q) + Σ_{m active} KL(p_m ‖ q_m) up to constants, q = softmax(z), written out directly."""
  log_q = log_softmax(z)
  value = -(p_g * log_q).sum()
  for m, subset in enumerate(subsets):
    if active[m]:
      outside = max(1 - np.exp(log_q[subset]).sum(), 1e-300)
      value -= (p_m[m][:len(subset)] * log_q[subset]).sum() + p_m[m][-1] * np.log(outside)
  return value


@pytest.mark.fast
def test_the_combination_matches_scipys_optimiser_on_the_same_objective():
  subsets = [[0, 3, 5], [1, 7], [2, 4, 6, 8]]
  classes = class_matrix(subsets, 5)
  solve = jax.jit(combine_specialists)
  rng = np.random.default_rng(2)
  for trial in range(8):
    p_g = softmax(3 * rng.normal(size=10))
    p_m = [softmax(3 * rng.normal(size=len(s) + 1)) for s in subsets]
    log_p_m = np.full((3, 5), -np.inf)
    for m, (s, p) in enumerate(zip(subsets, p_m)):
      log_p_m[m, :len(s)], log_p_m[m, -1] = np.log(p[:-1]), np.log(p[-1])
    active = np.array([trial % 2 == 0, True, trial % 3 != 0])
    got = np.exp(np.asarray(solve(jnp.log(p_g), jnp.asarray(log_p_m, jnp.float32), classes, active), np.float64))
    reference = softmax(minimize(_objective, np.log(p_g), args=(p_g, p_m, subsets, active), method="BFGS",
                                 options={"gtol": 1e-10}).x)
    np.testing.assert_allclose(got, reference, atol=1e-5)
  # No specialist active: q is the generalist's distribution.
  got = np.exp(np.asarray(solve(jnp.log(p_g), jnp.asarray(log_p_m, jnp.float32), classes, np.zeros(3, bool))))
  np.testing.assert_allclose(got, p_g, rtol=1e-5)


def _plain_em(a, b, outside, steps):
  """The EM of `combine_specialists` without acceleration, in float64: the reference when run long enough."""
  q = a / a.sum()
  for _ in range(steps):
    q = (a + q * ((b / (outside @ q)) @ outside)) / (a.sum() + b.sum())
  return q


@pytest.mark.fast
def test_the_combination_converges_where_plain_em_crawls():
  """A generalist split between classes of two of five specialists, all active, each putting almost all its mass on
  its dustbin: plain EM is still far off after 100 steps; the accelerated solver matches plain EM run 200,000 steps
  (float64), in q and in log q (what the cache stores)."""
  subsets = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
  classes = class_matrix(subsets, 3)
  outside = 1.0 - np.asarray(class_matrix_mask(classes, 10), np.float64)
  p_g = np.full(10, 1e-6)
  p_g[[0, 2]] = 0.5
  p_g /= p_g.sum()
  active = np.ones(5, bool)
  p_m = np.tile([5e-4, 5e-4, 0.999], (5, 1))
  a = p_g + ((1.0 - outside) * p_m[:, :1]).sum(0)
  b = p_m[:, -1]
  reference = _plain_em(a, b, outside, 200_000)
  assert np.abs(np.log(_plain_em(a, b, outside, 100)) - np.log(reference)).max() > 1e-2
  got = np.asarray(jax.jit(combine_specialists)(jnp.log(p_g), jnp.asarray(np.log(p_m), jnp.float32), classes,
                                                active), np.float64)
  np.testing.assert_allclose(np.exp(got), reference, atol=1e-5)
  np.testing.assert_allclose(got, np.log(reference), atol=1e-4)


@pytest.mark.fast
def test_a_specialists_head_starts_from_the_generalists():
  rng = np.random.default_rng(3)
  generalist = {"hidden": {"kernel": rng.normal(size=(4, 6))},
                "head": {"kernel": rng.normal(size=(6, 5)), "bias": rng.normal(size=5)}}
  target = {"hidden": {"kernel": np.zeros((4, 6), np.float32)},
            "head": {"kernel": np.zeros((6, 3), np.float32), "bias": np.zeros(3, np.float32)}}
  got = initial_params(target, generalist, (4, 1))
  np.testing.assert_allclose(got["hidden"]["kernel"], generalist["hidden"]["kernel"], rtol=1e-6)
  head = generalist["head"]
  np.testing.assert_allclose(got["head"]["kernel"], np.c_[head["kernel"][:, [4, 1]],
                                                          head["kernel"][:, [0, 2, 3]].mean(1)], rtol=1e-6)
  np.testing.assert_allclose(got["head"]["bias"], np.r_[head["bias"][[4, 1]],
                                                        head["bias"][[0, 2, 3]].mean() + np.log(3)], rtol=1e-6)
  with pytest.raises(StillroomError, match="parameter head/kernel has shape"):
    initial_params({**target, "head": {"kernel": np.zeros((6, 4)), "bias": np.zeros(4)}}, generalist, (4, 1))


@pytest.mark.fast
def test_enriched_sampling_draws_the_share_asked_for():
  pool = np.arange(100, 200)
  inside = np.arange(100) < 10
  sample = enriched_sampler(pool, inside, 50, seed=4)
  first = sample(0)
  assert len(first) == 100 and np.isin(first[:50], pool[inside]).all() and not np.isin(first[50:], pool[inside]).any()
  np.testing.assert_array_equal(first, sample(0))  # Replayable (a resumed run draws the same).
  assert not np.array_equal(first, sample(1))


@pytest.fixture(scope="module")
def generalist_setup(tmp_path_factory, data_dir):
  """A weak generalist (mlp-tiny, 2 epochs) on digits, its cache, a plan of 3 specialists and two of them trained."""
  root = tmp_path_factory.mktemp("specialists")
  common = ["--dataset", "digits", "--data-dir", data_dir, "--no-progress", "--workers", "0"]
  train_main(["fit", "--model", "mlp-tiny", "--epochs", "2", "--out", str(root / "gen"), *common])
  cache_main(["build", "--teacher", str(root / "gen"), "--dataset", "digits", "--data-dir", data_dir, "--eval-split",
              "none", "--out", str(root / "gen.zarr"), "--no-progress"])
  return root, common


def test_plan_train_build_verify_and_distil_on_digits(generalist_setup, data_dir, capsys):
  root, common = generalist_setup
  plan_path = str(root / "plan.json")
  code, printed, err = conftest.run_cli(cache_main, ["specialists", root / "gen.zarr", "--clusters", "3", "--out",
                                                     plan_path], capsys)
  assert code == 0, err
  plan = SpecialistPlan.read(plan_path)
  assert sorted(c for s in plan.subsets for c in s) == list(range(10)) and len(plan.subsets) == 3
  assert printed.count("specialist ") == 3 and all(0 < m <= 1 for m in plan.within_mass)
  k = max(range(3), key=lambda i: len(plan.subsets[i]))  # The largest subset, and one other.
  other = (k + 1) % 3
  for i in (k, other):
    code, _, err = conftest.run_cli(train_main, ["fit", "--model", "mlp-tiny", "--epochs", "1", "--specialist",
                                                 f"{plan_path}:{i}", "--init-from", root / "gen",
                                                 "--out", root / f"s{i}", *common], capsys)
    assert code == 0, err
    record = json.loads((root / f"s{i}" / "config.json").read_text())
    assert record["specialist"]["classes"] == list(plan.subsets[i])
    assert record["model"]["num_classes"] == len(plan.subsets[i]) + 1
  def record_of(i):
    return json.loads((root / f"s{i}" / "config.json").read_text())

  # Its own eval accuracy: on the test split relabelled to its classes and dustbin, from its uncorrected logits.
  run, test = load_run_teacher(str(root / f"s{k}")), open_transfer_set("digits", "test", data_dir)
  inputs, labels = test.read_all()
  logits = np.asarray(run.apply_fn(run.params, test.normalization.apply(inputs.astype(np.float32))))
  exported = export_run(str(root / f"s{k}"), str(root / "s.npz"))
  assert exported["specialist"] == record_of(k)["specialist"]
  final = json.loads((root / f"s{k}" / "final.json").read_text())
  assert final["eval_accuracy"] == pytest.approx(np.mean(np.argmax(logits, 1) == dustbin_labels(
      labels, plan.subsets[k], 10)), abs=1e-9)
  out = str(root / "q.zarr")
  code, _, err = conftest.run_cli(cache_main, ["build", "--teacher", root / "gen", "--specialists", plan_path,
                                               root / f"s{k}", root / f"s{other}", "--top-n", "2", "--dataset",
                                               "digits", "--data-dir", data_dir, "--out", out, "--no-progress"], capsys)
  assert code == 0, err
  assert not [c for c in verify_cache(out, data_dir=data_dir) if c.failed]
  cache = open_cache(out)
  assert [s.classes for s in cache.spec.specialists] == [plan.subsets[i] for i in sorted((k, other))]
  # Independent reference: the active mask from the generalist's top 2 in NumPy, q by SciPy's optimiser.
  generalist = cache["member_logits"][:, 0].astype(np.float64)
  top = np.argsort(-generalist, axis=1, kind="stable")[:, :2]
  for m, specialist in enumerate(cache.spec.specialists):
    np.testing.assert_array_equal(cache["specialist_active"][:, m],
                                  np.isin(top, specialist.classes).any(axis=1))
  specialist_logits = cache["specialist_logits"][:].astype(np.float64)
  for row in range(0, len(generalist), 97):
    p_g = softmax(generalist[row] / 4)
    subsets = [list(s.classes) for s in cache.spec.specialists]
    p_m = [softmax(np.r_[specialist_logits[row, m, :len(s)], specialist_logits[row, m, -1]] / 4)
           for m, s in enumerate(subsets)]
    reference = softmax(minimize(_objective, np.log(p_g), args=(p_g, p_m, subsets, cache["specialist_active"][row]),
                                 method="BFGS", options={"gtol": 1e-10}).x)
    np.testing.assert_allclose(np.exp(cache["targets"][row].astype(np.float64)), reference, atol=2e-3)
  code, printed, _ = conftest.run_cli(cache_main, ["info", out], capsys)
  assert "q of the generalist and 2 specialists (top-2)" in printed and "[s1]" in printed
  code, _, err = conftest.run_cli(train_main, ["fit", "--cache", out, "--epochs", "1", "--out", root / "student",
                                               "--data-dir", data_dir, "--no-progress", "--workers", "0"], capsys)
  assert code == 0, err
  code, _, err = conftest.run_cli(train_main, ["fit", "--cache", out, "--temperature", "2", "--epochs", "1", "--out",
                                               root / "student2", "--data-dir", data_dir, "--no-progress"], capsys)
  assert code != 0 and "combination of a generalist with 2 specialists" in err


def test_wrong_specialist_inputs_are_one_line_errors(generalist_setup, data_dir, capsys):
  root, common = generalist_setup
  plan_path = str(root / "plan2.json")
  assert conftest.run_cli(cache_main, ["specialists", root / "gen.zarr", "--clusters", "2", "--out", plan_path],
                          capsys)[0] == 0
  code, _, err = conftest.run_cli(cache_main, ["specialists", root / "gen.zarr", "--clusters", "2", "--out",
                                               plan_path], capsys)
  assert code != 0 and "exists; pass --overwrite" in err
  code, _, err = conftest.run_cli(cache_main, ["specialists", root / "gen.zarr", "--clusters", "11", "--out",
                                               root / "p.json"], capsys)
  assert code != 0 and "--clusters must be in 2..10" in err
  for args, message in [
      (["--specialist", f"{plan_path}:5", "--init-from", root / "gen"], "the plan has specialists 0..1"),
      (["--specialist", f"{plan_path}"], "needs|give --init-from"),
      (["--specialist", f"{plan_path}:0", "--init-from", root / "gen", "--model", "mlp-small"],
       "is a mlp-tiny run"),
      (["--enrich", "0.3"], "give --specialist too"),
      (["--specialist", f"{plan_path}:0", "--init-from", root / "gen", "--enrich", "1e-9"],
       "leaves at least one example of each side"),
      (["--specialist", f"{plan_path}:²", "--init-from", root / "gen"], "--specialist takes PLAN.json:k"),
  ]:
    code, _, err = conftest.run_cli(train_main, ["fit", "--model", "mlp-tiny", "--epochs", "1", *args, "--out",
                                                 root / "bad", *common], capsys)
    last = err.strip().splitlines()[-1]  # Any warning before it is a line of its own.
    assert code != 0 and "Traceback" not in err and last.startswith("student-train: error:"), err
    assert any(m in last for m in message.split("|")), err
  code, _, err = conftest.run_cli(cache_main, ["build", "--teacher", root / "gen", "--specialists", plan_path,
                                               root / "gen", "--dataset", "digits", "--data-dir", data_dir,
                                               "--out", root / "bad.zarr", "--no-progress"], capsys)
  assert code != 0 and "is not a specialist run" in err
  code, _, err = conftest.run_cli(cache_main, ["build", "--teacher", root / "gen", "--specialists", plan_path,
                                               "--specialists", plan_path, "--dataset", "digits", "--data-dir",
                                               data_dir, "--out", root / "bad.zarr", "--no-progress"], capsys)
  assert code != 0 and "give --specialists once" in err
  code, _, err = conftest.run_cli(cache_main, ["specialists", root / "gen.zarr", "--clusters", "2", "--seed", "-1",
                                               "--out", root / "p.json"], capsys)
  assert code != 0 and "--seed must be in 0..4294967295" in err


def test_a_specialist_is_not_an_ordinary_run(generalist_setup, data_dir, capsys):
  """Its outputs are its classes and a dustbin: refused as an ensemble member, by `eval` and as --init-from."""
  root, common = generalist_setup
  plan_path = str(root / "plan4.json")
  assert conftest.run_cli(cache_main, ["specialists", root / "gen.zarr", "--clusters", "2", "--out", plan_path],
                          capsys)[0] == 0
  assert conftest.run_cli(train_main, ["fit", "--model", "mlp-tiny", "--epochs", "1", "--specialist",
                                       f"{plan_path}:0", "--init-from", root / "gen", "--out", root / "sp",
                                       *common], capsys)[0] == 0
  for main, args, message in [
      (cache_main, ["build", "--teacher", root / "gen", "--teacher", root / "sp", "--dataset", "digits",
                    "--data-dir", data_dir, "--out", root / "two.zarr", "--no-progress"], "is a specialist run"),
      (train_main, ["eval", root / "sp", "--dataset", "digits", "--data-dir", data_dir], "is a specialist"),
      (train_main, ["fit", "--model", "mlp-tiny", "--epochs", "1", "--specialist", f"{plan_path}:1", "--init-from",
                    root / "sp", "--out", root / "sp2", *common], "is a specialist run; start from the generalist"),
      (cache_main, ["specialists", root / "gen.zarr", "--clusters", "2", "--out", root / "gen.zarr" / "zarr.json",
                    "--overwrite"], "is (or holds, or lies inside) this command's input"),
      (cache_main, ["build", "--teacher", root / "gen", "--specialists", plan_path, root / "sp", "--top-n", "0",
                    "--dataset", "digits", "--data-dir", data_dir, "--out", root / "q0.zarr", "--no-progress"],
       "--top-n must be in 1..10"),
  ]:
    code, _, err = conftest.run_cli(main, args, capsys)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
  # Specialists of another generalist (its record names the generalist's parameters) are refused.
  assert conftest.run_cli(train_main, ["fit", "--model", "mlp-tiny", "--epochs", "1", "--seed", "7", "--out",
                                       root / "gen7", *common], capsys)[0] == 0
  code, _, err = conftest.run_cli(cache_main, ["build", "--teacher", root / "gen7", "--specialists", plan_path,
                                               root / "sp", "--dataset", "digits", "--data-dir", data_dir, "--out",
                                               root / "mixed.zarr", "--no-progress"], capsys)
  assert code != 0 and "was started from another generalist" in err
  (root / "notes.json").write_text("{}")
  code, _, err = conftest.run_cli(cache_main, ["specialists", root / "gen.zarr", "--clusters", "2", "--out",
                                               root / "notes.json", "--overwrite"], capsys)
  assert code != 0 and "is not a specialist plan, so it is left alone" in err
  assert (root / "notes.json").read_text() == "{}"
