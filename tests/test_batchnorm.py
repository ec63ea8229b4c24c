"""BatchNorm done right: batch statistics of a batch's real rows in training (over the global batch on a mesh),
running averages in evaluation and in teachers, per-student statistics in a vmapped group, and weights (parameters
and running statistics) carried by checkpoints, --init-from, specialists and export. The references are a NumPy
ResNet written from the paper's description, separately trained runs, and a one-device run."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import numpy_conv, numpy_log_softmax
from flax import nnx

from shared.architectures import BATCHNORM_MOMENTUM
from shared.data import Normalization
from shared.models import WEIGHTS, ModelSpec, build_model
from shared.parallel import data_mesh, put_replicated
from shared.runs import RunRecord, load_run_teacher, save_run
from student_train.steps import Hypers, make_predict, make_train_step, stack_hypers, stack_states, unstack_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPSILON = 1e-5  # nnx.BatchNorm's default.
RESNET8 = ModelSpec(name="resnet8", input_shape=(8, 8, 1), num_classes=10)


# --- A NumPy ResNet, float64 -------------------------------------------------------------------------------------

def _max_pool(x: np.ndarray) -> np.ndarray:
  """3x3, stride 2, padded by 1 with -inf."""
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  height, width = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  return np.max([x[:, i:i + 2 * height:2, j:j + 2 * width:2] for i in range(3) for j in range(3)], axis=0)


class NumpyResNet:
  """A ResNet's forward pass from its weights (a pure dict of `WEIGHTS`). In training (`rows` given: the rows that
  count) each BatchNorm normalises with the mean and biased variance of those rows over (B, H, W) and `updated`
  collects the running averages a step leaves (momentum `BATCHNORM_MOMENTUM`); in eval it uses the stored ones.

  Args:
    weights: the model's weights (`net` inside: an image model).
    strides: each stage's stride; a block takes it on its first 3x3 convolution.
    stem: (stride, max-pool) of the stem.
  """

  def __init__(self, weights: dict, strides=(1, 2, 2), stem=(1, False)):
    self.weights = jax.tree.map(lambda a: np.asarray(a, np.float64), weights["net"])
    self.strides, self.stem = strides, stem
    self.updated = {}

  def norm(self, x, layer: dict, rows, path: str):
    if rows is None:
      mean, var = layer["mean"], layer["var"]
    else:
      counted = x[rows]
      mean, var = counted.mean(axis=(0, 1, 2)), counted.var(axis=(0, 1, 2))
      self.updated[path] = {
          "mean": BATCHNORM_MOMENTUM * layer["mean"] + (1 - BATCHNORM_MOMENTUM) * mean,
          "var": BATCHNORM_MOMENTUM * layer["var"] + (1 - BATCHNORM_MOMENTUM) * var}
    return (x - mean) / np.sqrt(var + EPSILON) * layer["scale"] + layer["bias"]

  def __call__(self, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """`x` [B, H, W, C] -> logits [B, classes]; `rows` bool [B] in training, None in eval."""
    w = self.weights
    x = np.maximum(self.norm(numpy_conv(x, w["stem"]["kernel"], self.stem[0]), w["stem_norm"], rows, "stem_norm"), 0)
    if self.stem[1]:
      x = _max_pool(x)
    for s, stage in sorted(w["stages"].items()):
      for b, block in sorted(stage.items()):
        stride = self.strides[s] if b == 0 else 1
        convs = [block["convs"][c]["kernel"] for c in sorted(block["convs"])]
        strided = next(c for c, kernel in enumerate(convs) if kernel.shape[0] == 3)  # Its first 3x3.
        y = x
        for c, kernel in enumerate(convs):
          y = self.norm(numpy_conv(y, kernel, stride if c == strided else 1), block["norms"][c], rows,
                        f"stages/{s}/{b}/norms/{c}")
          if c < len(convs) - 1:
            y = np.maximum(y, 0)
        if "shortcut_conv" in block:  # Option B: a strided 1x1 convolution and BatchNorm.
          shortcut = self.norm(numpy_conv(x, block["shortcut_conv"]["kernel"], stride), block["shortcut_norm"], rows,
                               f"stages/{s}/{b}/shortcut_norm")
        else:  # Option A: subsampled, new channels zero (half before the old ones, half after).
          shortcut = x[:, ::stride, ::stride]
          extra = y.shape[-1] - shortcut.shape[-1]
          shortcut = np.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        x = np.maximum(y + shortcut, 0)
    return x.mean(axis=(1, 2)) @ w["head"]["kernel"] + w["head"]["bias"]


def _stats(weights: dict) -> dict:
  """{path: {"mean", "var"}} of every BatchNorm layer in a model's pure-dict weights (paths under `net`)."""
  found: dict = {}
  for name, value in _flat(weights["net"]).items():
    layer, _, kind = name.rpartition("/")
    if kind in ("mean", "var"):
      found.setdefault(layer, {})[kind] = value.astype(np.float64)
  return found


def _random_model(make, seed: int = 0) -> nnx.Module:
  """The module `make()` builds, with weights drawn in NumPy (JAX's initialisers, compiled shape by shape, cost
  seconds per model on 2 cores): kernels ~ N(0, 1 / fan-in), BatchNorm's scales, shifts and running statistics far
  from their initial 1, 0, 0 and 1, so that a forward pass that used the batch's statistics, or the initial ones,
  would show."""
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(nnx.eval_shape(make))

  def draw(path, leaf):
    name = next(key.key for key in reversed(path) if isinstance(key, jax.tree_util.DictKey))  # The variable's.
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    shape = leaf.shape
    value = {"kernel": lambda: rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape),
             "scale": lambda: rng.uniform(0.5, 1.5, shape), "var": lambda: rng.uniform(0.3, 3.0, shape),
             "mean": lambda: rng.normal(0, 0.5, shape)}.get(name, lambda: rng.normal(0, 0.2, shape))()
    return np.asarray(value, leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def _weights(model: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(model, WEIGHTS))


def _load(model: nnx.Module, weights: dict) -> nnx.Module:
  """`model` with `weights` (pure dicts, as `_weights` gives them) in place."""
  state = nnx.state(model, WEIGHTS)
  nnx.replace_by_pure_dict(state, weights)
  nnx.update(model, state)
  return model


def _flat(weights: dict) -> dict[str, np.ndarray]:
  """{"net/stem_norm/mean": array, ...}: nested weights by their paths, as `student-train export` names them."""
  return {"/".join(str(getattr(key, "key", key)) for key in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(weights)[0]}


@pytest.mark.parametrize("bottleneck", [False, True])
def test_the_imagenet_layout_against_numpy(bottleneck):
  """`ResNet` as resnet18/resnet50 build it (a 7x7/2 stem padded by 3, a 3x3/2 max-pooling padded with -inf,
  projection shortcuts, the stride on the first 3x3 convolution), narrowed to stay cheap, in eval mode on 16x16
  inputs (where XLA's 'SAME' padding would pad the strided layers asymmetrically): the NumPy forward pass."""
  from shared.architectures.resnet import BasicBlock, Bottleneck, ResNet

  net = _random_model(lambda: ResNet((16, 16, 3), 5, stem=(8, 7, 2, True), stages=((8, 2, 1), (16, 1, 2)),
                                     block=Bottleneck if bottleneck else BasicBlock, projection=True, dropout=0.0,
                                     dtype=jnp.float32, rngs=nnx.Rngs(0)))
  net.eval()
  # Projections where the shape changes: the second stage's first block, and with bottlenecks (8 -> 32) the first's.
  assert net.stages[1][0].project and net.stages[0][0].project == bottleneck and not net.stages[0][1].project
  x = np.random.default_rng(1).normal(size=(2, 16, 16, 3))
  graphdef, state = nnx.split(net)
  logits = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(logits, NumpyResNet({"net": _weights(net)}, strides=(1, 2), stem=(2, True))(x),
                             rtol=1e-4, atol=1e-4)


# --- The trainer's step and eval ---------------------------------------------------------------------------------

NORMALIZATION = Normalization(shift=0.0, scale=16.0)
LR = 0.1


def _optimizer(model: nnx.Module) -> nnx.Optimizer:
  return nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)


@functools.cache
def _compiled(students: int):
  """`(graphdef, step, predict)` for `students` resnet8 students on 8x8x1 (SGD), on this process's devices: built
  once for the module's tests, which then share their compilations."""
  model = _random_model(lambda: build_model(RESNET8))
  graphdef, _ = nnx.split((model, _optimizer(model)))
  mesh = data_mesh()
  return graphdef, make_train_step(graphdef, NORMALIZATION, mesh), make_predict(graphdef, NORMALIZATION, mesh)


def _students(seeds) -> tuple:
  """The stacked states and hypers of fresh resnet8 students, placed as the trainer places them (replicated)."""
  states = []
  for seed in seeds:
    model = _random_model(lambda: build_model(RESNET8), seed)
    states.append(nnx.split((model, _optimizer(model)))[1])
  hypers = stack_hypers([Hypers(member_weights=np.ones(1, np.float32))] * len(seeds), list(seeds))
  mesh = data_mesh()
  return put_replicated(stack_states(states), mesh), put_replicated(hypers, mesh)


def _batch(rows: int, padded_to: int | None = None, seed: int = 0) -> dict:
  """`rows` digit-like rows (values 0..16), zero rows after them up to `padded_to` marked by mask 0, as the loader
  pads an epoch's last batch."""
  rng = np.random.default_rng(seed)
  size = padded_to or rows
  x = np.zeros((size, 8, 8, 1), np.float32)
  x[:rows] = rng.integers(0, 17, (rows, 8, 8, 1))
  labels = np.zeros(size, np.int32)
  labels[:rows] = rng.integers(0, 10, rows)
  return {"x": x, "labels": labels, "mask": (np.arange(size) < rows).astype(np.float32)}


def _train(seeds, batches) -> list[dict]:
  """Each student's weights after the steps on `batches`, trained together as one vmapped group."""
  graphdef, step, _ = _compiled(len(seeds))
  stacked, hypers = _students(seeds)
  for batch in batches:
    stacked, metrics = step(stacked, batch, hypers)
    jax.block_until_ready(metrics)  # Several CPU devices need it (`needs_step_sync`).
  return [_weights(nnx.merge(graphdef, unstack_state(stacked, k))[0]) for k in range(len(seeds))]


PADDED = [_batch(11, 16, seed=0), _batch(16, seed=1), _batch(5, 16, seed=2)]  # Shared by the tests below.


def test_a_step_normalises_with_the_real_rows_statistics_and_eval_with_the_running_averages():
  """One step of the trainer on 11 rows padded to 16: every BatchNorm's running averages move 0.1 of the way to the
  mean and biased variance of the 11 real rows (NumPy, float64, at the weights before the step); then `make_predict`
  (eval) computes the NumPy forward pass with those running averages, not the batch's."""
  graphdef, step, predict = _compiled(1)
  stacked, hypers = _students([0])
  before = _weights(nnx.merge(graphdef, unstack_state(stacked, 0))[0])
  batch = PADDED[0]
  stacked, metrics = step(stacked, batch, hypers)
  assert float(metrics["rows"][0]) == 11
  reference = NumpyResNet(before)
  x = NORMALIZATION.apply(batch["x"]).astype(np.float64)
  reference(x, rows=batch["mask"] > 0)
  after = _weights(nnx.merge(graphdef, unstack_state(stacked, 0))[0])
  got = _stats(after)
  assert set(got) == set(reference.updated) and len(got) == 7  # The stem's and two per block.
  for path, expected in reference.updated.items():
    for name in ("mean", "var"):
      np.testing.assert_allclose(got[path][name], expected[name], rtol=1e-4, atol=1e-5, err_msg=f"{path}/{name}")
  assert not np.allclose(got["stem_norm"]["var"], 1.0)  # They moved.
  predicted = np.asarray(predict(stacked, batch["x"]))[0]
  np.testing.assert_allclose(predicted, numpy_log_softmax(NumpyResNet(after)(x)), rtol=1e-4, atol=1e-4)
  # The batch's own statistics would give other outputs: eval does not use them.
  assert np.abs(predicted - numpy_log_softmax(NumpyResNet(after)(x, rows=np.ones(16, bool)))).max() > 1e-2


def test_padding_rows_change_neither_the_statistics_nor_the_update():
  """The same 11 rows alone and padded to 16 with zero rows (mask 0), then a full batch: the parameters and running
  averages agree to float rounding. Counted, the zero rows would have moved the statistics elsewhere."""
  alone = _train([0], [_batch(11, seed=0), PADDED[1]])[0]
  padded = _train([0], PADDED[:2])[0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), alone, padded)
  counted = NumpyResNet(_weights(_random_model(lambda: build_model(RESNET8), 0)))
  counted(NORMALIZATION.apply(PADDED[0]["x"]).astype(np.float64), rows=np.ones(16, bool))
  once = _train([0], PADDED[:1])[0]
  assert np.abs(counted.updated["stem_norm"]["mean"] - _stats(once)["stem_norm"]["mean"]).max() > 1e-3


def test_mobilenet_v2_leaves_padding_rows_out_of_its_statistics(monkeypatch):
  """MobileNetV2 on 32x32x3 in training: 8 real rows padded with 4 zero rows (mask 0) leave every BatchNorm's
  running averages where the 8 real rows alone (no mask) leave them. (Fewer rows, or smaller images whose last stages
  see 1x1 maps, let float32 rounding grow through the 52 normalisations of so few values.)"""
  from shared.architectures import mobilenet

  # Convolutions start at zero (JAX would compile a sampler per kernel shape, ~10 s on 2 cores) and get NumPy kernels.
  monkeypatch.setattr(mobilenet, "_CONV_INIT", nnx.initializers.zeros)
  model = build_model(ModelSpec(name="mobilenet-v2", input_shape=(32, 32, 3), num_classes=5), seed=0)
  rng = np.random.default_rng(0)
  weights = _weights(model)
  for path, leaf in jax.tree_util.tree_flatten_with_path(weights)[0]:
    if str(getattr(path[-1], "key", path[-1])) == "kernel" and leaf.ndim == 4:  # The convolutions.
      size, _, _, channels = leaf.shape
      parent = functools.reduce(lambda tree, key: tree[getattr(key, "key", key)], path[:-1], weights)
      parent["kernel"] = rng.normal(0, np.sqrt(2 / (size * size * channels)), leaf.shape).astype(np.float32)
  real = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
  padded = np.concatenate([real, np.zeros((4, 32, 32, 3), np.float32)])
  forward = nnx.jit(lambda model, x, mask: model(x, mask))
  model.train()

  def statistics(x, mask):
    forward(_load(model, weights), x, mask)
    return {path: value for path, value in _flat(_weights(model)).items() if path.endswith(("/mean", "/var"))}

  alone = statistics(real, None)
  masked = statistics(padded, (np.arange(12) < 8).astype(np.float32))
  assert len(alone) == 2 * 52 and set(masked) == set(alone)  # 52 BatchNorm layers, a mean and a variance each.
  for path in alone:
    np.testing.assert_allclose(masked[path], alone[path], rtol=1e-4, atol=1e-5, err_msg=path)


def test_students_of_a_group_keep_their_own_statistics():
  """Two students trained together in one vmapped step (batches with padding rows) end with the weights, running
  statistics included, that each reaches trained alone, and predict with their own: the two students' statistics
  differ."""
  together = _train([0, 1], PADDED)
  alone = [_train([seed], PADDED)[0] for seed in (0, 1)]
  for a, b in zip(together, alone):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  assert np.abs(_stats(together[0])["stem_norm"]["mean"] - _stats(together[1])["stem_norm"]["mean"]).max() > 1e-3
  x = NORMALIZATION.apply(PADDED[0]["x"]).astype(np.float64)
  graphdef, _, predict = _compiled(2)
  states = [nnx.split((model, _optimizer(model)))[1] for model in
            (_load(_random_model(lambda: build_model(RESNET8)), weights) for weights in together)]
  predicted = np.asarray(predict(put_replicated(stack_states(states), data_mesh()), PADDED[0]["x"]))
  for k, weights in enumerate(together):
    np.testing.assert_allclose(predicted[k], numpy_log_softmax(NumpyResNet(weights)(x)), rtol=1e-4, atol=1e-4)


FOUR_DEVICES = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, {tests!r})
import jax, numpy as np
import test_batchnorm as t
assert len(jax.devices()) == 4
np.savez({out!r}, **t._flat(t._train([0], t.PADDED)[0]))
"""


def test_on_four_devices_the_statistics_are_the_global_batchs(tmp_path):
  """The batch split over 4 CPU devices (4 rows each; the last batch's padding fills whole devices): the weights
  after the steps, running statistics included, equal one device's to float tolerance."""
  out = str(tmp_path / "four.npz")
  code = FOUR_DEVICES.format(tests=os.path.dirname(os.path.abspath(__file__)), out=out)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  four, one = dict(np.load(out)), _flat(_train([0], PADDED)[0])
  assert set(four) == set(one) and any(name.endswith("/var") for name in one)
  for name, value in one.items():
    np.testing.assert_allclose(four[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


# --- Teachers, eval, --init-from, specialists, export -------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_teacher(tmp_path_factory) -> str:
  """A resnet8 teacher run on digits whose running statistics (and BatchNorm scales and shifts) are far from their
  initial values (see `_random_model`)."""
  run_dir = str(tmp_path_factory.mktemp("bn") / "teacher")
  save_run(run_dir, RunRecord(model=RESNET8, normalization=NORMALIZATION), _random_model(lambda: build_model(RESNET8)))
  return run_dir


def test_teachers_the_build_and_eval_use_the_running_averages(tmp_path, data_dir, resnet_teacher, capsys):
  """The logits `teacher-cache build` stores for the eval split, and `student-train eval`'s metrics, are those of
  the NumPy forward pass with the teacher's running statistics."""
  from conftest import run_cli
  from shared.data import open_transfer_set
  from shared.metrics import classification_metrics
  from student_train.cli import main as train_main
  from teacher_cache.build import BuildConfig, build_cache
  import zarr

  test = open_transfer_set("digits", "test", data_dir)
  images, labels = test.read_all()
  x = images.astype(np.float32) / 16.0
  reference = NumpyResNet(_weights_of_run(resnet_teacher))(x.astype(np.float64))
  out = str(tmp_path / "c.zarr")
  build_cache(BuildConfig(dataset="digits", split="train[:32]", data_dir=data_dir, teachers=(resnet_teacher,),
                          out=out, progress=False))
  stored = zarr.open_group(out, mode="r")["eval_member_logits"][:, 0].astype(np.float64)
  np.testing.assert_allclose(stored, reference, rtol=2e-3, atol=2e-3)  # Stored as float16.
  code, text, err = run_cli(train_main, ["eval", resnet_teacher, "--dataset", "digits", "--split", "test",
                                         "--data-dir", data_dir, "--json"], capsys)
  assert code == 0, err
  expected = classification_metrics(numpy_log_softmax(reference), labels)
  for key in ("accuracy", "nll"):
    assert json.loads(text)[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6)


def test_init_from_and_specialists_start_from_the_running_statistics(tmp_path, data_dir, resnet_teacher):
  """--init-from starts a run with the other run's running statistics as well as its parameters; a specialist's
  start copies them too (only its head is remapped)."""
  import types

  from shared.specialists import initial_params
  from student_train import train as train_lib
  from student_train.config import FitConfig
  from student_train.plan import plan_run

  source = _weights_of_run(resnet_teacher)
  plan = plan_run(FitConfig(model="resnet8", dataset="digits", data_dir=data_dir, init_from=resnet_teacher,
                            out=str(tmp_path / "run"), progress=False))
  graphdef, (state,) = train_lib._initial_states([plan], types.SimpleNamespace(steps_per_epoch=1), data_mesh())
  started = _weights(nnx.merge(graphdef, state)[0])
  jax.tree.map(np.testing.assert_array_equal, started, source)
  subset = (7, 2, 5)
  specialist = _weights(nnx.eval_shape(lambda: build_model(dataclasses.replace(RESNET8, num_classes=len(subset) + 1))))
  got = initial_params(specialist, source, subset)
  assert _stats(got) and all(np.array_equal(got_layer[name], _stats(source)[path][name])
                             for path, got_layer in _stats(got).items() for name in ("mean", "var"))
  np.testing.assert_array_equal(got["net"]["head"]["kernel"][:, :3], source["net"]["head"]["kernel"][:, list(subset)])


def _weights_of_run(run_dir: str) -> dict:
  params = load_run_teacher(run_dir).params
  return jax.tree.map(np.asarray, nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)


def test_export_holds_the_running_statistics(tmp_path, resnet_teacher):
  """`student-train export` writes the running statistics beside the parameters (`.../mean`, `.../var`): every
  weight of the run, which the NumPy forward pass above needs and takes (teachers' test), under its path."""
  from student_train.export import export_run

  out = str(tmp_path / "w.npz")
  result = export_run(resnet_teacher, out)
  exported = dict(np.load(out))
  weights = _flat(_weights_of_run(resnet_teacher))
  assert "net/stem_norm/mean" in exported and "net/stages/0/0/norms/1/var" in exported
  assert set(exported) == set(weights)
  for name, value in weights.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  # resnet8 on one input channel: 75,002 parameters and 480 running statistics.
  assert result["parameters"] == sum(value.size for value in weights.values()) == 75_002 + 480


USER_MODULE = """
from flax import nnx


class Net(nnx.Module):
  def __init__(self, input_shape, num_classes, rngs):
    self.conv = nnx.Conv(input_shape[-1], 4, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, num_classes, rngs=rngs)

  def __call__(self, x MASK):
    return self.head(nnx.relu(self.norm(self.conv(x) NORM_MASK)).mean((1, 2)))


def net(input_shape, num_classes, rngs):
  return Net(input_shape, num_classes, rngs)
"""


@pytest.mark.parametrize("takes_mask", [False, True])
def test_your_own_batchnorm_model_gets_the_mask_if_it_takes_one(tmp_path, data_dir, monkeypatch, caplog, takes_mask):
  """Your own model is passed the row mask when its `__call__` takes `mask`; one with BatchNorm that does not is
  warned about when an epoch's rows leave its last batch short (100 rows in batches of 32: 28 padding rows)."""
  from shared.models import takes_row_mask
  from student_train.config import FitConfig
  from student_train.plan import plan_run

  module = USER_MODULE.replace(" MASK", ", mask=None" if takes_mask else "").replace(
      " NORM_MASK", ", mask=None if mask is None else (mask > 0)[:, None, None, None]" if takes_mask else "")
  (tmp_path / "bnnets.py").write_text(module)
  monkeypatch.syspath_prepend(str(tmp_path))
  sys.modules.pop("bnnets", None)
  import bnnets  # pylint: disable=import-outside-toplevel

  model = bnnets.net((8, 8, 1), 10, nnx.Rngs(0))
  assert takes_row_mask(model) == takes_mask
  with caplog.at_level("WARNING"):
    for batch_size in (32, 50):  # 50 divides the 100 rows: nothing padded, nothing to warn about.
      plan_run(FitConfig(model="bnnets:net", dataset="digits", split="train[:100]", data_dir=data_dir,
                         batch_size=batch_size, out=str(tmp_path / f"run{batch_size}")))
  warned = [r.message for r in caplog.records if "takes no `mask`" in r.message]
  assert warned == ([] if takes_mask else [warned[0]]) and (takes_mask or "the 28 zero rows" in warned[0])

  # The trainer's step on 11 rows padded to 16: the model that takes the mask ends with the running statistics of
  # the 11 real rows alone (an unpadded step); the one that does not counts the zero rows too.
  def stepped(batch):
    model = bnnets.net((8, 8, 1), 10, nnx.Rngs(0))
    graphdef, state = nnx.split((model, _optimizer(model)))
    mesh = data_mesh()
    step = make_train_step(graphdef, NORMALIZATION, mesh)
    hypers = put_replicated(stack_hypers([Hypers(member_weights=np.ones(1, np.float32))], [0]), mesh)
    stacked, metrics = step(put_replicated(stack_states([state]), mesh), batch, hypers)
    jax.block_until_ready(metrics)
    weights = _flat(_weights(nnx.merge(graphdef, unstack_state(stacked, 0))[0]))
    return {path: value for path, value in weights.items() if path.endswith(("/mean", "/var"))}

  real = {key: value[:11] for key, value in PADDED[0].items()}
  padded, alone = stepped(PADDED[0]), stepped(real)
  assert set(padded) == set(alone) == {"norm/mean", "norm/var"}
  for path in alone:
    close = np.allclose(padded[path], alone[path], rtol=1e-5, atol=1e-7)
    assert close == takes_mask, path


# --- Resume -------------------------------------------------------------------------------------------------------

def test_a_resnet_stopped_and_resumed_ends_bit_identical(tmp_path, data_dir, compilation_cache, monkeypatch, caplog):
  """resnet8 (its running statistics are part of the state) with dropout on 100 digits in batches of 32 (the last
  one padded), 2 epochs, stopped by Ctrl-C twice: in epoch 2 after its first step (it resumes from the epoch-1
  checkpoint), then after the third with a checkpoint every 2 steps (it resumes mid-epoch). It ends with the weights,
  running statistics included, and the metrics of an uninterrupted run, bit for bit. (The runs share one compiled
  step through JAX's compilation cache.)"""
  import contextlib
  import itertools

  from student_train import train as train_lib
  from student_train.config import FitConfig

  common = dict(model="resnet8", dataset="digits", split="train[:100]", data_dir=data_dir, epochs=2, batch_size=32,
                dropout=0.1, eval_split="none", checkpoint_every_steps=2, progress=False, workers=0)
  clean, stopped = str(tmp_path / "clean"), str(tmp_path / "stopped")
  train_lib.fit(FitConfig(out=clean, **common), log_epochs=False)
  check = train_lib.raise_if_interrupted
  # The first attempt's steps: 1-4 in epoch 1, 5-8 in epoch 2; the second resumes at epoch 2's first step.
  for stop_at_step, resumed_at in ((6, None), (4, "after epoch 1 of 2"), (None, "after step 2 of epoch 2 of 2")):
    steps = itertools.count(1)

    def stop(steps=steps, stop_at_step=stop_at_step):
      if next(steps) == stop_at_step:
        raise KeyboardInterrupt
      check()

    monkeypatch.setattr(train_lib, "raise_if_interrupted", stop)
    caplog.clear()
    with caplog.at_level("INFO"), pytest.raises(KeyboardInterrupt) if stop_at_step else contextlib.nullcontext():
      train_lib.fit(FitConfig(out=stopped, **common), log_epochs=False)
    assert resumed_at is None or resumed_at in caplog.text
  ours, theirs = _weights_of_run(stopped), _weights_of_run(clean)
  assert len(_stats(ours)) == 7  # The running statistics are among the weights compared.
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)  # Bitwise.
  lines = [[json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))] for run in (stopped, clean)]
  drop = ("seconds", "rows_per_second")
  assert [{k: v for k, v in line.items() if k not in drop} for line in lines[0]] == \
      [{k: v for k, v in line.items() if k not in drop} for line in lines[1]]
