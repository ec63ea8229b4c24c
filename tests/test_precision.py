"""Mixed precision (`--compute-dtype bfloat16`): the bounds of `shared.precision` against NumPy, a bfloat16 training
step's loss against the float32 step's, the state a bfloat16 step leaves (float32), a bfloat16 build's targets
against a float32 build's within the bound its spec records (read back with Zarr, not stillroom's reader), and what
a bfloat16 run records and evaluates at."""

import json
import os

import jax
import numpy as np
import optax
import pytest
import zarr
from conftest import make_teacher, numpy_log_softmax, run_cli
from flax import nnx

from shared.cache import SPEC_KEY, open_cache
from shared.data import open_transfer_set
from shared.ensemble import combine_log_probs
from shared.models import WEIGHTS, ModelSpec, build_model
from shared.parallel import data_mesh
from shared.precision import COMPUTE_DTYPES, LOGIT_SPREAD, logit_spread, target_distance, target_tolerance
from student_train.steps import Hypers, group_switches, make_train_step, stack_hypers
from student_train.terms import LOSS_NAMES
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.info import cache_info

BF16 = "bfloat16"


@pytest.mark.fast
def test_the_target_bound_holds_for_members_and_both_ensemble_rules():
  """`target_distance` is half the L1 distance of the probabilities (NumPy), and logits moved by a spread δ move the
  targets at T by at most δ / 4T in total variation: each member's, and either rule's ensemble of them; the bound is
  nearly reached."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(500, 3, 10)) * rng.uniform(0.1, 15.0, size=(500, 1, 1))  # [B, M, C], peaked and flat rows
  delta = rng.uniform(-1.0, 1.0, size=z.shape) * rng.uniform(0.0, 2.0, size=(500, 3, 1))
  for temperature in (0.5, 1.0, 4.0):
    p, q = numpy_log_softmax(z / temperature), numpy_log_softmax((z + delta) / temperature)
    tv = target_distance(p, q)
    np.testing.assert_allclose(tv, 0.5 * np.abs(np.exp(p) - np.exp(q)).sum(-1), rtol=1e-12)
    spread = logit_spread(z + delta, z)
    np.testing.assert_allclose(spread, np.ptp(delta, axis=-1), rtol=1e-12)
    assert (tv <= spread / (4 * temperature) + 1e-12).all()
    for rule in ("arithmetic", "geometric"):
      ensemble = [np.asarray(combine_log_probs(a.astype(np.float32), temperature, rule), np.float64)
                  for a in (z, z + delta)]
      assert (target_distance(*ensemble) <= spread.max(-1) / (4 * temperature) + 1e-5).all()
  # A small move of a two-class row at p = ½ nearly reaches it: δ = 0.1 at T = 1 gives tanh(0.05) / 2.
  worst = target_distance(numpy_log_softmax(np.array([0.0, 0.0])), numpy_log_softmax(np.array([0.05, -0.05])))
  assert 0.99 * 0.1 / 4 < worst <= 0.1 / 4
  assert target_tolerance("float32", 1.0) == 0.0 and target_tolerance(BF16, 2.0) == LOGIT_SPREAD[BF16] / 8


@pytest.mark.fast
def test_the_dtype_is_one_setting_of_fit_sweep_and_build_shared_by_a_group():
  """Declared once: `fit`, `sweep` (an axis) and `build` offer it, a resumed run must give the same (identity), and
  the students of one vmapped group share it (scope "group": one graphdef), so a sweep trains each value apart."""
  from shared.options import ComputeSettings  # pylint: disable=import-outside-toplevel
  from shared.settings import commands_of, declared  # pylint: disable=import-outside-toplevel
  from student_train.config import FitConfig  # pylint: disable=import-outside-toplevel
  from student_train.sweep import AXES  # pylint: disable=import-outside-toplevel
  field = declared(ComputeSettings)["compute_dtype"]
  assert field is declared(FitConfig)["compute_dtype"] is declared(BuildConfig)["compute_dtype"]
  assert set(commands_of(FitConfig, "compute_dtype")) == {"fit", "sweep", "build"} and "compute_dtype" in AXES
  assert (field.metadata["scope"], field.metadata["identity"], field.metadata["added"]) == ("group", True, True)
  assert field.metadata["choices"] == COMPUTE_DTYPES and field.default == "float32"


def _digits_batch(data_dir, rows=64):
  transfer_set = open_transfer_set("digits", f"train[:{rows}]", data_dir)
  x, labels = transfer_set.read_all()
  member_logits = np.random.default_rng(1).normal(scale=4.0, size=(rows, 2, 10)).astype(np.float32)
  batch = {"x": np.asarray(x, np.float32), "labels": labels.astype(np.int32), "mask": np.ones(rows, np.float32),
           "member_logits": member_logits}
  return transfer_set.normalization, batch


@pytest.mark.parametrize("model", ["mlp-small", "resnet8"])
def test_a_bfloat16_step_keeps_its_loss_within_the_bound_and_its_state_float32(model, data_dir):
  """One training step from the same initial state on the same batch (hard labels and T²·KL at T = 4 on re-derived
  targets, alpha ½) in float32 and in bfloat16. Per example, |Δ loss| <= (alpha + (1 − alpha)·T) times the spread of
  the student's logits (cross-entropy and T²·KL are that Lipschitz in them), and that spread is within
  `LOGIT_SPREAD`; every floating leaf of the state after the bfloat16 step (parameters, BatchNorm statistics,
  optimizer moments) is float32."""
  normalization, batch = _digits_batch(data_dir)
  alpha, temperature = 0.5, 4.0
  hypers = stack_hypers([Hypers(member_weights=np.full(2, 0.5, np.float32), alpha=np.float32(alpha),
                                temperature=np.float32(temperature), loss=np.int32(LOSS_NAMES.index("kl")))], [0])
  initial, losses, logits, states = None, {}, {}, {}
  for dtype in COMPUTE_DTYPES:
    network = build_model(ModelSpec(name=model, input_shape=(8, 8, 1), num_classes=10, dtype=dtype), seed=0)
    if initial is None:
      initial = nnx.state(network, WEIGHTS)
    nnx.update(network, initial)
    optimizer = nnx.Optimizer(network, optax.adamw(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((network, optimizer))
    # The logits the step computes (train mode: BatchNorm's batch statistics), from a copy of the state.
    logits[dtype] = np.asarray(jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)[0](x))(
        state, normalization.apply(batch["x"])))
    assert logits[dtype].dtype == np.float32
    step = make_train_step(graphdef, normalization, data_mesh(), group_switches(hypers))
    states[dtype], metrics = step(jax.tree.map(lambda leaf: leaf[None], state), batch, hypers)
    losses[dtype] = float(metrics["loss"][0])
  spread = logit_spread(logits[BF16], logits["float32"]).max()
  difference = abs(losses[BF16] - losses["float32"])
  assert 0 < spread <= LOGIT_SPREAD[BF16]
  assert 0 < difference <= (alpha + (1 - alpha) * temperature) * spread, (losses, spread)
  print(f"{model}: loss {losses['float32']:.6f} (float32) vs {losses[BF16]:.6f} (bfloat16), logit spread {spread:.4f}")
  floating = [leaf for leaf in jax.tree.leaves(states[BF16]) if jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)]
  assert floating and {str(leaf.dtype) for leaf in floating} == {"float32"}
  assert jax.tree.map(lambda leaf: leaf.dtype, states[BF16]) == jax.tree.map(lambda leaf: leaf.dtype,
                                                                             states["float32"])


def _scaled_head(network):
  """Logits the size of a trained network's (random heads give small ones, which bfloat16 barely rounds)."""
  head = network.net.head if hasattr(network, "net") else network.head
  head.kernel[...] = head.kernel[...] * 30.0


def test_a_bfloat16_build_keeps_the_bound_its_spec_records(tmp_path, data_dir):
  """The same ensemble (mlp-small, cnn-small, resnet8 with trained-size logits) built in float32 and in bfloat16 at
  T = 1: read back with Zarr, each member's stored logits are within `LOGIT_SPREAD` of the float32 build's, and each
  row's targets within the `target_tolerance` the bfloat16 spec records; the float32 spec reads as before (neither
  field written), `info` reports both, and resuming the bfloat16 store in float32 is refused (test_faults)."""
  runs = [make_teacher(tmp_path / name, model=name, seed=k, transform=_scaled_head)
          for k, name in enumerate(["mlp-small", "cnn-small", "resnet8"])]
  stores = {}
  for dtype in COMPUTE_DTYPES:
    stores[dtype] = str(tmp_path / f"{dtype}.zarr")
    build_cache(BuildConfig(dataset="digits", split="train[:256]", data_dir=data_dir, teachers=tuple(runs),
                            out=stores[dtype], temperature=1.0, chunk_rows=128, eval_split="none", progress=False,
                            compute_dtype=dtype))
  groups = {dtype: zarr.open_group(path, mode="r") for dtype, path in stores.items()}
  specs = {dtype: group.attrs[SPEC_KEY] for dtype, group in groups.items()}
  assert "compute_dtype" not in specs["float32"] and "target_tolerance" not in specs["float32"]
  assert specs[BF16]["compute_dtype"] == BF16 and specs[BF16]["target_tolerance"] == LOGIT_SPREAD[BF16] / 4
  logits = {dtype: group["member_logits"][:].astype(np.float64) for dtype, group in groups.items()}
  targets = {dtype: group["targets"][:] for dtype, group in groups.items()}
  np.testing.assert_array_equal(groups[BF16]["index"][:], groups["float32"]["index"][:])
  spread = logit_spread(logits[BF16], logits["float32"])  # [R, M]
  distance = target_distance(targets[BF16], targets["float32"])  # [R]
  assert 0 < spread.max() <= LOGIT_SPREAD[BF16]
  assert 0 < distance.max() <= specs[BF16]["target_tolerance"]
  for member in range(3):  # Each member's distribution at T too.
    member_distance = target_distance(numpy_log_softmax(logits[BF16][:, member]),
                                      numpy_log_softmax(logits["float32"][:, member]))
    assert member_distance.max() <= spread[:, member].max() / 4 + 1e-9
  print(f"bfloat16 vs float32 build at T=1: largest logit spread per member {spread.max(0).round(4).tolist()}, "
        f"largest target distance {distance.max():.4f}, mean {distance.mean():.5f}")
  info = {dtype: cache_info(path) for dtype, path in stores.items()}
  assert (info[BF16]["compute_dtype"], info[BF16]["target_tolerance"]) == (BF16, 0.25)
  assert (info["float32"]["compute_dtype"], info["float32"]["target_tolerance"]) == ("float32", 0.0)
  assert open_cache(stores[BF16]).spec.compute_dtype == BF16


def test_a_bfloat16_run_records_its_dtype_and_evaluates_in_it(tmp_path, data_dir, capsys):
  """A bfloat16 fit records its dtype in its model spec and resolved config, and `eval` runs it in that dtype: the
  accuracy and NLL of its final epoch, exactly."""
  from student_train.cli import main  # pylint: disable=import-outside-toplevel
  out = tmp_path / "run"
  code, _, err = run_cli(main, ["fit", "--dataset", "digits", "--split", "train[:256]", "--data-dir", data_dir,
                                "--model", "mlp-small", "--epochs", "1", "--compute-dtype", BF16, "--no-progress",
                                "--out", out], capsys)
  assert code == 0, err
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["model"]["dtype"] == BF16 and config["resolved"]["config"]["compute_dtype"] == BF16
  final = json.load(open(os.path.join(out, "final.json")))
  code, stdout, err = run_cli(main, ["eval", out, "--dataset", "digits", "--data-dir", data_dir, "--json"], capsys)
  assert code == 0, err
  evaluated = json.loads(stdout)
  assert (evaluated["accuracy"], evaluated["nll"]) == (final["eval_accuracy"], final["eval_nll"])
