"""The model registry: names, shapes, helpful errors."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from shared.errors import StillroomError
from shared.models import MODELS, ModelSpec, build_model, count_params, describe_models


EAGER_PARAMS = 2_000_000  # Larger models are traced abstractly: run op by op on 2 CPU cores they take 10-20 s each.


def _traced_logits_shape(model: nnx.Module, batch: int, input_shape) -> tuple[int, ...]:
  """The shape of an abstract model's (`nnx.eval_shape`) logits, traced without computing them."""
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
  return jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x).shape


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("input_shape", [(8, 8, 1), (8, 8), (12, 10, 3)])
def test_every_model_maps_images_to_logits(name, input_shape):
  spec = ModelSpec(name=name, input_shape=input_shape, num_classes=7, dropout=0.1)
  abstract = nnx.eval_shape(lambda: build_model(spec))
  if count_params(abstract) > EAGER_PARAMS:
    assert _traced_logits_shape(abstract, 3, input_shape) == (3, 7)
    abstract.eval()
    assert _traced_logits_shape(abstract, 2, input_shape) == (2, 7)
    return
  model = build_model(spec)
  assert model(jnp.ones((3, *input_shape))).shape == (3, 7)
  model.eval()
  assert model(jnp.ones((2, *input_shape))).shape == (2, 7)


@pytest.mark.fast
def test_registry_errors_name_the_choices():
  with pytest.raises(StillroomError, match="unknown model 'resnet'; available models: mlp-tiny, mlp-small, mlp-large"):
    build_model(ModelSpec(name="resnet", input_shape=(4,), num_classes=3))
  with pytest.raises(StillroomError, match="needs image inputs"):
    build_model(ModelSpec(name="cnn-small", input_shape=(64,), num_classes=3))


def test_parameter_counts():
  rows = {row["name"]: row["params"] for row in describe_models((8, 8, 1), 10)}
  assert rows["mlp-small"] == 64 * 128 + 128 + 128 * 10 + 10
  assert rows["mlp-large"] == 64 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
  assert count_params(build_model(ModelSpec(name="cnn-large", input_shape=(8, 8, 1), num_classes=10))) == \
      rows["cnn-large"]
  assert describe_models((64,), 10)[3]["params"] is None  # CNNs cannot take flat vectors.


@pytest.mark.parametrize("name, dense", [("mlp-tiny", 32), ("mlp-small", 128), ("cnn-small", 64), ("cnn-large", 256)])
def test_dropout_drops_each_hidden_unit_once_at_its_rate(name, dense):
  """What reaches the head: in training, each unit of the (one) hidden dense layer is zeroed with probability
  `rate` and survivors are scaled by 1/(1 - rate), against the same activations in eval mode. Applying dropout
  twice would zero 1 - (1 - rate)² of them and scale by 1/(1 - rate)². (Models with one hidden dense layer, so
  that nothing before it is dropped.)"""
  import numpy as np

  rate = 0.2
  model = build_model(ModelSpec(name=name, input_shape=(8, 8, 1), num_classes=dense, dropout=rate), seed=0)
  head = model.net.head if hasattr(model, "net") else model.head
  head.kernel[...] = jnp.eye(dense)  # The head passes its input through: logits are the dropped activations.
  head.bias[...] = jnp.zeros(dense)
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, size=(256, 8, 8, 1)), jnp.float32)
  model.eval()
  clean = np.asarray(model(x))
  model.train()
  dropped = np.asarray(model(x))
  active = clean > 1e-6
  zeroed = (dropped == 0) & active
  assert abs(zeroed.sum() / active.sum() - rate) < 0.02, zeroed.sum() / active.sum()
  kept = active & ~zeroed
  np.testing.assert_allclose(dropped[kept], clean[kept] / (1 - rate), rtol=1e-4)


def test_named_features_are_the_layers_outputs_and_leave_the_logits_alone():
  """MLP: each hidden layer's ReLU output, recomputed in NumPy from the parameters; CNN: each stage's output before
  pooling (post-ReLU, the first stage recomputed with a plain convolution) and the dense layer's; the logits are
  the model's own."""
  import numpy as np

  x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, size=(4, 8, 8, 1)), jnp.float32)
  mlp = build_model(ModelSpec(name="mlp-large", input_shape=(8, 8, 1), num_classes=10), seed=2)
  mlp.eval()
  logits, named = mlp.features(x)
  assert list(named) == ["hidden1", "hidden2"]
  h = np.asarray(x).reshape(4, -1)
  for layer, name in zip(mlp.hidden, named):
    h = np.maximum(h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]), 0)
    np.testing.assert_allclose(named[name], h, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(logits, mlp(x))
  cnn = build_model(ModelSpec(name="cnn-small", input_shape=(8, 8, 1), num_classes=10), seed=3)
  cnn.eval()
  logits, named = cnn.features(x)
  assert {k: v.shape for k, v in named.items()} == {"stage1": (4, 8, 8, 16), "stage2": (4, 4, 4, 32),
                                                    "dense": (4, 64)}
  conv = cnn.net.convs[0]
  stage1 = jax.lax.conv_general_dilated(x, conv.kernel[...], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]
  np.testing.assert_allclose(named["stage1"], np.maximum(stage1, 0), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(logits, cnn(x))
  assert all(float(v.min()) >= 0 for v in named.values())


@pytest.mark.fast
def test_models_json_lists_features_in_both_commands(capsys):
  import json

  from student_train.cli import main as train_main
  from teacher_cache.cli import main as cache_main
  for main in (train_main, cache_main):
    main(["models", "--json"])
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["cnn-large"]["features"]["stage1"] == [8, 8, 32]  # 4 KB per row in float16, as issue 19 says.
    assert rows["cnn-thin-deep"]["features"] == {"dense": [32], "stage1": [8, 8, 8], "stage2": [4, 4, 16]}
    assert rows["mlp-small"]["params"] == 9610 and rows["mlp-small"]["features"] == {"hidden1": [128]}


# Parameter counts (nnx.Param only: BatchNorm's running statistics are not parameters) at the sizes the papers and
# torchvision quote: (name, input shape, classes, parameters).
PARAMETER_COUNTS = [
    ("resnet8", (32, 32, 3), 10, 75_290),  # He et al. 2016's CIFAR ResNets (option A).
    ("resnet20", (32, 32, 3), 10, 269_722),
    ("resnet56", (32, 32, 3), 10, 853_018),
    ("resnet18", (224, 224, 3), 1000, 11_689_512),  # torchvision's resnet18 and resnet50.
    ("resnet50", (224, 224, 3), 1000, 25_557_032),
]


@pytest.mark.fast
@pytest.mark.parametrize("name, input_shape, num_classes, params", PARAMETER_COUNTS)
def test_architectures_have_their_published_parameter_counts(name, input_shape, num_classes, params):
  spec = ModelSpec(name=name, input_shape=input_shape, num_classes=num_classes)
  assert count_params(nnx.eval_shape(lambda: build_model(spec))) == params


@pytest.mark.fast
def test_every_batchnorm_model_takes_the_row_mask():
  """The trainer passes the batch's row mask to a model whose `__call__` and `features` take `mask`, and BatchNorm
  leaves the masked rows (an epoch's padding) out of its statistics (tests/test_batchnorm.py): every registry model
  with BatchNorm must take it, its own network too (inside the wrapper that adds a channel axis)."""
  from shared.models import takes_row_mask

  for name in MODELS:
    abstract = nnx.eval_shape(lambda: build_model(ModelSpec(name=name, input_shape=(8, 8, 1), num_classes=3)))
    if jax.tree.leaves(nnx.state(abstract, nnx.BatchStat)):
      net = getattr(abstract, "net", abstract)
      assert takes_row_mask(abstract) and takes_row_mask(net) and takes_row_mask(net.features), name
