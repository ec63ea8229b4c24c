"""Feature-based distillation: cached teacher features against the teacher on the student's own views, the feature
losses against NumPy (values, gradients, padding), and `fit --hint/--attention/--similarity` end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import conftest
from conftest import numeric_grad
from shared.cache import CacheSpec, open_cache
from shared.data import open_transfer_set
from shared.losses import average_pool, pool_factors, similarity_preserving, stored_feature
from shared.models import ModelSpec, build_model, count_params
from shared.runs import load_run_teacher, load_teacher
from student_train import train as train_lib
from student_train.cli import main as train_main
from student_train.config import FitConfig
from student_train.terms.features import Distilled, FeatureTerm, Regressors, feature_losses
from student_train.loader import CacheLoader
from student_train.plan import plan_run
from student_train.steps import _update_with_one_of
from student_train.sweep import run_sweep
from student_train.train import fit
from teacher_cache.cli import main as cache_main
from teacher_cache.info import cache_info

FEATURES = "stage1,stage1:attention,stage2:pooled,dense"


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory) -> str:
  return conftest.make_teacher(tmp_path_factory.mktemp("cnn") / "large", model="cnn-large", seed=3)


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory, data_dir, cnn_teacher) -> str:
  return conftest.digits_cache(tmp_path_factory, data_dir, [cnn_teacher], split="train[:300]", views=3, max_shift=2,
                               chunk_rows=126, features=FEATURES)


# --- NumPy references --------------------------------------------------------------------------------------------

def _np_normalized(x):
  norm = np.sqrt((x ** 2).sum(-1, keepdims=True))
  return x / np.where(norm > 0, norm, 1.0)


def _np_attention(features):  # [B, H, W, C] -> [B, H·W]
  return _np_normalized((features ** 2).sum(-1).reshape(len(features), -1))


def _np_pool(x, fy, fx):
  b, h, w, *rest = x.shape
  return x.reshape(b, h // fy, fy, w // fx, fx, *rest).mean(axis=(2, 4))


def _np_gram(features, mask):
  flat = features.reshape(len(features), -1) * mask[:, None]
  return _np_normalized(flat @ flat.T)


def _np_feature_losses(student, teachers, mask, regressors):
  """The losses of `_terms()` in NumPy, each summed over its terms: hints (a map pooled 2x; a vector, against the
  student's pooled map), attention (two members' maps, or their stored attention maps, averaged, pooled 2x and
  normalised), similarity (two members' Grams averaged). `regressors`: each hint's (kernel, bias)."""
  rows = mask.sum()
  hint = 0.0
  for (kernel, bias), teacher, pooled in zip(regressors, (_np_pool(teachers["map"], 2, 2), teachers["vec"]),
                                             (False, True)):
    s = student["a"].mean(axis=(1, 2)) if pooled else student["a"]
    error = 0.5 * ((s @ kernel + bias - teacher) ** 2).reshape(len(mask), -1).mean(axis=1)
    hint += (error * mask).sum() / rows
  attention = 0.0
  for maps in ([_np_attention(t).reshape(t.shape[:3]) for t in (teachers["map"], teachers["map2"])],
               [teachers["att"], teachers["att2"]]):
    target = _np_normalized(_np_pool((maps[0] + maps[1]) / 2, 2, 2).reshape(len(mask), -1))
    attention += (((_np_attention(student["a"]) - target) ** 2).mean(-1) * mask).sum() / rows
  gram = (_np_gram(teachers["vec"], mask) + _np_gram(teachers["vec2"], mask)) / 2
  similarity = ((_np_gram(student["b"], mask) - gram) ** 2).sum() / rows ** 2
  return {"hint": hint, "attention": attention, "similarity": similarity}


def _terms():
  return (FeatureTerm(loss="hint", student="a", teacher=("map",), kind="map", pool=(2, 2), regressor=(3, 5)),
          FeatureTerm(loss="hint", student="a", teacher=("vec",), kind="pooled", regressor=(3, 6)),
          FeatureTerm(loss="attention", student="a", teacher=("map", "map2"), kind="map", pool=(2, 2)),
          FeatureTerm(loss="attention", student="a", teacher=("att", "att2"), kind="attention", pool=(2, 2)),
          FeatureTerm(loss="similarity", student="b", teacher=("vec", "vec2"), kind="pooled"))


def _inputs(rng, rows):
  student = {"a": rng.normal(size=(rows, 2, 2, 3)), "b": rng.normal(size=(rows, 7))}
  teachers = {"map": rng.normal(size=(rows, 4, 4, 5)), "map2": rng.normal(size=(rows, 4, 4, 5)),
              "vec": rng.normal(size=(rows, 6)), "vec2": rng.normal(size=(rows, 9)),
              "att": _np_attention(rng.normal(size=(rows, 4, 4, 2))).reshape(rows, 4, 4),
              "att2": _np_attention(rng.normal(size=(rows, 4, 4, 7))).reshape(rows, 4, 4)}
  return student, teachers


def _regressors(trainable):
  return [(np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64))
          for layer in trainable.regressors.layers]


def _trainable():
  return Distilled(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), Regressors(_terms(), nnx.Rngs(1)))  # A stand-in student.


def _jax(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


# --- The maths -----------------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_stored_features_and_pooling_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 6, 5))
  np.testing.assert_allclose(stored_feature(jnp.asarray(x, jnp.float32), "attention"),
                             _np_attention(x).reshape(3, 4, 6), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stored_feature(jnp.asarray(x, jnp.float32), "pooled"), x.mean(axis=(1, 2)), rtol=1e-5,
                             atol=1e-6)
  vector = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  assert stored_feature(vector, "pooled") is vector and stored_feature(vector, "map") is vector
  with pytest.raises(ValueError, match="needs a \\[B, H, W, C\\] map"):
    stored_feature(vector, "attention")
  np.testing.assert_allclose(average_pool(jnp.asarray(x, jnp.float32), (2, 3)), _np_pool(x, 2, 3), rtol=1e-5,
                             atol=1e-6)
  assert pool_factors((8, 8), (4, 4)) == (2, 2) and pool_factors((8, 8), (8, 8)) == (1, 1)
  assert pool_factors((6, 6), (4, 4)) is None and pool_factors((4, 4), (8, 8)) is None


@pytest.mark.fast
def test_similarity_of_several_members_is_against_their_mean_gram():
  rng = np.random.default_rng(1)
  s, t1, t2 = rng.normal(size=(6, 4)), rng.normal(size=(6, 3, 2)), rng.normal(size=(6, 5))
  mask = np.array([1, 1, 1, 1, 0, 1.0])
  expected = ((_np_gram(s, mask) - (_np_gram(t1, mask) + _np_gram(t2, mask)) / 2) ** 2).sum() / mask.sum() ** 2
  got = similarity_preserving(*_jax([s, [t1, t2], mask]))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.fast
def test_feature_losses_against_numpy_with_padded_rows_ignored():
  rng = np.random.default_rng(2)
  student, teachers = _inputs(rng, 5)
  mask = np.ones(5)
  trainable = _trainable()
  got = feature_losses(_terms(), _jax(student), _jax(teachers), jnp.asarray(mask, jnp.float32), trainable)
  expected = _np_feature_losses(student, teachers, mask, _regressors(trainable))
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, err_msg=name)
  # Three padded rows of garbage change nothing: they take part in no mean and no similarity.
  junk_student, junk_teachers = _inputs(np.random.default_rng(3), 3)
  padded = lambda a, b: np.concatenate([a, 1e3 * b])  # noqa: E731
  padded_got = feature_losses(
      _terms(), _jax({k: padded(student[k], junk_student[k]) for k in student}),
      _jax({k: padded(teachers[k], junk_teachers[k]) for k in teachers}),
      jnp.asarray(np.concatenate([mask, np.zeros(3)]), jnp.float32), trainable)
  for name in expected:
    np.testing.assert_allclose(padded_got[name], expected[name], rtol=1e-4, err_msg=f"{name}, padded")


@pytest.mark.fast
def test_feature_loss_gradients_against_central_differences():
  rng = np.random.default_rng(4)
  student, teachers = _inputs(rng, 4)
  mask = np.array([1.0, 1.0, 0.0, 1.0])
  trainable = _trainable()
  regressors = _regressors(trainable)
  for name in ("hint", "attention", "similarity"):
    def jax_loss(features):
      return feature_losses(_terms(), features, _jax(teachers), jnp.asarray(mask, jnp.float32), trainable)[name]
    grads = jax.grad(jax_loss)(_jax(student))
    for key in ("a", "b") if name == "similarity" else ("a",):
      numeric = numeric_grad(
          lambda x: _np_feature_losses({**student, key: x}, teachers, mask, regressors)[name], student[key])
      np.testing.assert_allclose(grads[key], numeric, rtol=2e-3, atol=2e-5, err_msg=f"{name} / {key}")
  # The regressors' gradients too: they are trained.
  grads = nnx.grad(lambda t: feature_losses(_terms(), _jax(student), _jax(teachers), jnp.asarray(mask, jnp.float32),
                                            t)["hint"])(trainable)
  for k, (kernel, bias) in enumerate(regressors):
    def with_layer(new_kernel=kernel, new_bias=bias):
      layers = [(new_kernel, new_bias) if j == k else regressors[j] for j in range(len(regressors))]
      return _np_feature_losses(student, teachers, mask, layers)["hint"]
    np.testing.assert_allclose(grads.regressors.layers[k].kernel[...], numeric_grad(with_layer, kernel),
                               rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(grads.regressors.layers[k].bias[...],
                               numeric_grad(lambda b: with_layer(new_bias=b), bias), rtol=2e-3, atol=2e-5)


@pytest.mark.fast
def test_the_hint_stage_updates_with_its_own_optimizer_and_leaves_the_other_untouched():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  stage1, stage2 = (nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param) for lr in (0.1, 0.01))
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  for use_first, used, idle, lr in ((True, stage1, stage2, 0.1), (False, stage2, stage1, 0.01)):
    before = np.asarray(model.kernel[...])
    idle_state = jax.tree.map(np.asarray, nnx.state(idle))
    _update_with_one_of(model, grads, stage1, stage2, jnp.asarray(use_first))
    # Adam's first step moves each parameter by the learning rate against the gradient's sign.
    np.testing.assert_allclose(model.kernel[...], before - lr, rtol=1e-5)
    assert int(used.step[...]) == 1 and int(idle.step[...]) == (1 if not use_first else 0)
    for a, b in zip(jax.tree.leaves(idle_state), jax.tree.leaves(nnx.state(idle))):
      np.testing.assert_array_equal(a, np.asarray(b))


# --- The cache ---------------------------------------------------------------------------------------------------

def test_cached_features_equal_the_teachers_features_on_the_students_views(feature_cache, data_dir, cnn_teacher):
  cache = open_cache(feature_cache)
  spec = cache.spec
  assert spec.schema_version == 6 and spec.legacy_schema_version() == 5
  assert CacheSpec.from_attrs(spec.to_attrs()) == spec
  assert [(f.name, f.kind, f.shape) for f in spec.features] == [  # In one order, however the list was written.
      ("dense", "map", (256,)), ("stage1", "map", (8, 8, 32)), ("stage1", "attention", (8, 8)),
      ("stage2", "pooled", (64,))]
  names = [f.array_name for f in spec.features]
  teacher = load_teacher(cnn_teacher)
  forward = jax.jit(lambda x: teacher.features_fn(teacher.params, teacher.normalization.apply(x))[1])
  # The rows as a student's loader renders them: its x is what the student sees.
  loader = CacheLoader(cache, open_transfer_set("digits", "train[:300]", data_dir), batch_size=100, seed=0,
                       fields=tuple(names))
  try:
    checked = 0
    for batch in loader.epoch(0):
      keep = batch["mask"] > 0
      named = forward(jnp.asarray(batch["x"]))
      for feature in spec.features:
        expected = np.asarray(stored_feature(named[feature.name], feature.kind), np.float32)[keep]
        got = batch[feature.array_name][keep].astype(np.float32)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max(),
                                   err_msg=feature.array_name)
      checked += int(keep.sum())
  finally:
    loader.close()
  assert checked == spec.num_rows == 900
  info = cache_info(feature_cache)
  assert info["bytes_per_row"]["feature.stage1.map.m0"] == 8 * 8 * 32 * 2
  assert info["bytes_per_row"]["feature.stage1.attention.m0"] == 8 * 8 * 2


def test_verify_finds_non_finite_features(tmp_path, feature_cache, data_dir, capsys):
  import shutil
  import zarr
  copy = str(tmp_path / "c.zarr")
  shutil.copytree(feature_cache, copy)
  array = zarr.open_group(copy, mode="r+")["feature.stage1.map.m0"]
  array[5] = np.inf  # Through zarr: the checksums stay valid.
  code, out, _ = conftest.run_cli(cache_main, ["verify", copy, "--data-dir", data_dir], capsys)
  assert code == 1 and "FAIL  finite values" in out and "2048 non-finite values" in out


def test_feature_build_errors_name_the_problem(tmp_path, data_dir, teachers, cnn_teacher, capsys):
  base = ["build", "--data-dir", data_dir, "--split", "train[:50]", "--out", tmp_path / "c.zarr", "--no-progress"]
  cases = [
      (["--teacher", cnn_teacher, "--features", "stage7"], "has features dense, stage1, stage2"),
      (["--teacher", cnn_teacher, "--features", "dense:attention"], "the attention map of a vector [256]"),
      (["--teacher", cnn_teacher, "--features", ""], "'' is not one"),
      (["--teacher", cnn_teacher, "--features", "stage1:big"], "KIND one of map, attention, pooled"),
      (["--teacher", cnn_teacher, "--features", "stage1@1"], "members 0..0"),
      (["--teacher", cnn_teacher, "--features", "stage1,stage1:map"], "names a feature twice"),
      (["--teacher", teachers[0], "--teacher", cnn_teacher, "--features", "stage1"],
       "member 0) has features hidden1."),
  ]
  for args, message in cases:
    code, _, err = conftest.run_cli(cache_main, base + args, capsys)
    assert code != 0 and message in err and "Traceback" not in err, (args, err)
  assert not (tmp_path / "c.zarr").exists()


# --- Training ------------------------------------------------------------------------------------------------------

def _metrics(run_dir) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


FEATURE_RUN = dict(model="cnn-thin-deep", epochs=3, hint_epochs=1, batch_size=128,
                   hint=("stage2=stage1", "stage1=dense"), hint_weight=0.5,
                   attention=("stage1=stage1:attention", "stage2=stage1"), attention_weight=100.0,
                   similarity=("dense=stage2",), similarity_weight=30.0, progress=False, workers=0)


def test_fit_with_every_feature_loss_compiles_once_and_saves_the_student_alone(tmp_path, data_dir, feature_cache,
                                                                             monkeypatch):
  steps = []
  original = train_lib.make_train_step
  monkeypatch.setattr(train_lib, "make_train_step", lambda *a, **k: steps.append(original(*a, **k)) or steps[-1])
  out = str(tmp_path / "run")
  fit(FitConfig(cache=feature_cache, data_dir=data_dir, out=out, finetune_epochs=1, **FEATURE_RUN))
  assert len(steps) == 1 and steps[0]._cache_size() == 1  # The stages and fine-tuning share one compilation.
  lines = _metrics(out)
  assert [line["phase"] for line in lines] == ["hint", "distill", "distill", "fine-tune"]
  # Stage 1 trains on the hint alone (unweighted); then each loss adds with its weight (the epoch means are linear).
  np.testing.assert_allclose(lines[0]["loss"], lines[0]["hint"], rtol=1e-5)
  for line in lines[1:3]:
    logit = line["alpha"] * line["hard_ce"] + (1 - line["alpha"]) * line["soft"]
    np.testing.assert_allclose(line["loss"], logit + 0.5 * line["hint"] + 100 * line["attention"]
                               + 30 * line["similarity"], rtol=1e-4)
  np.testing.assert_allclose(lines[3]["loss"], lines[3]["hard_ce"], rtol=1e-5)  # Fine-tuning: hard labels alone.
  assert all(line[name] > 0 for line in lines for name in ("hint", "attention", "similarity"))
  # The run's model is the student alone: the regressor is not among its parameters.
  run = load_run_teacher(out)
  spec = ModelSpec(name="cnn-thin-deep", input_shape=(8, 8, 1), num_classes=10)
  assert run.num_params == count_params(build_model(spec)) == 9466


def test_a_feature_run_interrupted_and_resumed_ends_as_an_uninterrupted_one(tmp_path, data_dir, feature_cache):
  whole = str(tmp_path / "whole")
  fit(FitConfig(cache=feature_cache, data_dir=data_dir, out=whole, **FEATURE_RUN), log_epochs=False)

  def stop_in_epoch_3(plan, line):
    if line["epoch"] == 3:
      raise KeyboardInterrupt

  parted = str(tmp_path / "parted")
  with pytest.raises(KeyboardInterrupt):
    fit(FitConfig(cache=feature_cache, data_dir=data_dir, out=parted, **FEATURE_RUN), on_epoch=stop_in_epoch_3)
  fit(FitConfig(cache=feature_cache, data_dir=data_dir, out=parted, **FEATURE_RUN), log_epochs=False)
  for a, b in zip(jax.tree.leaves(load_run_teacher(whole).params), jax.tree.leaves(load_run_teacher(parted).params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  drop = ("seconds", "rows_per_second")
  assert [{k: v for k, v in line.items() if k not in drop} for line in _metrics(whole)] == \
      [{k: v for k, v in line.items() if k not in drop} for line in _metrics(parted)]


def test_feature_weights_are_sweep_axes_trained_in_one_step(tmp_path, data_dir, feature_cache):
  out = tmp_path / "sweep"
  run_sweep(feature_cache, "hint_weight=0.1,1;attention_weight=0,10", str(out), seeds=1,
            base=FitConfig(data_dir=data_dir, model="cnn-thin-deep", epochs=1, hint=("stage1=stage1",),
                           attention=("stage2=stage1",), progress=False, workers=0))
  runs = [path for path in out.iterdir() if (path / "metrics.jsonl").exists()]
  assert len(runs) == 4
  for path in runs:
    line, config = _metrics(path)[-1], json.load(open(path / "config.json"))["resolved"]["config"]
    assert line["students_in_step"] == 4
    logit = line["alpha"] * line["hard_ce"] + (1 - line["alpha"]) * line["soft"]
    np.testing.assert_allclose(line["loss"], logit + config["hint_weight"] * line["hint"]
                               + config["attention_weight"] * line["attention"], rtol=1e-4)
  assert {(c["hint_weight"], c["attention_weight"]) for c in
          (json.load(open(path / "config.json"))["resolved"]["config"] for path in runs)} == {
              (0.1, 0), (0.1, 10), (1, 0), (1, 10)}


def test_runs_averaging_other_members_do_not_share_a_step(tmp_path, data_dir, teachers, cnn_teacher,
                                                        tmp_path_factory):
  two = conftest.digits_cache(tmp_path_factory, data_dir, [teachers[2], cnn_teacher], split="train[:100]",
                              features="stage1:attention")
  plans = [plan_run(FitConfig(cache=two, data_dir=data_dir, model="cnn-thin-deep", members=members,
                              attention=("stage1=stage1",), out=str(tmp_path / f"r{k}")))
           for k, members in enumerate(((0,), (1,)))]
  assert [term.teacher for plan in plans for term in plan.feature_terms] == [
      ("feature.stage1.attention.m0",), ("feature.stage1.attention.m1",)]
  assert plans[0].stream_key() != plans[1].stream_key()


def test_feature_option_errors_name_the_problem(tmp_path, data_dir, feature_cache, teachers, cnn_teacher, capsys,
                                                tmp_path_factory):
  two = conftest.digits_cache(tmp_path_factory, data_dir, [teachers[2], cnn_teacher], split="train[:100]",
                              features="stage1")
  base = ["fit", "--data-dir", data_dir, "--out", tmp_path / "run", "--no-progress", "--epochs", "2"]
  with_cache = base + ["--cache", feature_cache, "--model", "cnn-thin-deep"]
  cases = [
      (base + ["--dataset", "digits", "--hint", "stage1=stage1"], "--hint distil(s) cached teacher features"),
      (with_cache + ["--hint-weight", "2"], "--hint-weight weights --hint; give --hint too"),
      (with_cache + ["--hint", "stage1=stage1", "--hint-epochs", "2"], "fewer hint epochs than epochs"),
      (with_cache + ["--hint", "stage1"], "give STUDENT_FEATURE=TEACHER_FEATURE"),
      (with_cache + ["--hint", "stage1=stage1", "--hint", "stage2=stage1"], "--hint is given twice"),
      (with_cache + ["--hint", "stage1=stage1, stage1=stage1"], "--hint stage1=stage1: that pair is given twice"),
      (with_cache + ["--hint", "stage1=stage1", "--hint-weight", "1e39"], "--hint-weight must be >= 0 and finite"),
      (with_cache + ["--hint", "stage9=stage1"], "has features dense, stage1, stage2"),
      (with_cache + ["--attention", "stage1=stage2"], "stores no stage2 of member(s) [0] that the attention loss"),
      (with_cache + ["--hint", "stage1=stage1:attention"], "takes a teacher's map or pooled"),
      (with_cache + ["--attention", "dense=stage1"], "attention compares H×W maps"),
      (with_cache + ["--attention", "stage1=dense"], "attention compares H×W maps"),
      (with_cache + ["--hint", "dense=stage1"], "pair maps with maps"),
      (base + ["--cache", feature_cache, "--model", "mlp-small", "--hint", "hidden1=stage1"], "pair maps with maps"),
      (base + ["--cache", two, "--model", "cnn-small", "--hint", "stage1=stage1"], "name it, e.g. stage1=stage1@0"),
      (base + ["--cache", two, "--model", "cnn-small", "--members", "0", "--hint", "stage1=stage1@1"],
       "member 1 is not among the run's members [0]"),
  ]
  for args, message in cases:
    code, _, err = conftest.run_cli(train_main, args, capsys)
    assert code != 0 and message in err and "Traceback" not in err, (args, err)
  assert not (tmp_path / "run" / "metrics.jsonl").exists()
