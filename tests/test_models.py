"""The model registry: names, shapes, helpful errors."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_conv
from flax import nnx

from shared.errors import StillroomError
from shared.models import (MODELS, ModelSpec, build_model, check_input_shape, count_params, describe_models,
                           feature_shapes)


# Models traced here rather than run: eager runs of their many distinct layer shapes, initialisation included,
# compiled for some 20 s of CPU at each input size on the shared 2-core machine; each runs in a test of its own.
TRACED = {"mobilenet-v2"}


EAGER_PARAMS = 2_000_000  # Larger models are traced abstractly: run op by op on 2 CPU cores they take 10-20 s each.


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("input_shape", [(8, 8, 1), (8, 8), (12, 10, 3)])
def test_every_model_maps_images_to_logits(name, input_shape):
  spec = ModelSpec(name=name, input_shape=input_shape, num_classes=7, dropout=0.1)
  if name.startswith("vit-"):  # 16-px patches: these sizes are refused, naming the model and the sizes (32 px below).
    sides = f"{input_shape[0]}x{input_shape[1]}"
    with pytest.raises(StillroomError, match=rf"^model '{name}' cuts images into 16x16 patches: image sides must be "
                                             rf"multiples of 16, got {sides}; .*--image-size"):
      build_model(spec)
    return
  if name.startswith("lm-"):  # Language models take token rows (2, L) alone (tests/test_lm.py).
    with pytest.raises(StillroomError, match=rf"^model '{name}' takes token rows of shape \(2, L\)"):
      build_model(spec)
    return
  abstract = nnx.eval_shape(lambda: build_model(spec))
  if name in TRACED or count_params(abstract) > EAGER_PARAMS:
    model = abstract
    for batch in (3, 2):  # Training mode, then eval mode, as below.
      graphdef, state = nnx.split(model)
      logits = check_input_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, input_shape, name, batch)
      assert logits.shape == (batch, 7) and logits.dtype == jnp.float32
      model.eval()
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


# Parameter counts the literature gives: torchvision's model pages (MobileNetV2), timm's and DeiT's (ViT-Ti/16,
# ViT-S/16), at 224 px and 1,000 classes.
LITERATURE = [("mobilenet-v2", 224, 1000, 3_504_872), ("vit-ti16", 224, 1000, 5_717_416),
              ("vit-s16", 224, 1000, 22_050_664)]


def _numpy(variable) -> np.ndarray:
  return np.asarray(variable[...], np.float64)


def test_vit_is_the_papers_transformer_and_drops_out_in_training_only():
  """DeiT's initialisation; vit-ti16 on 32x32 images (4 patches) against a NumPy ViT from its parameters: the
  patches flattened times the embedding, the class token and position embeddings, 12 pre-LayerNorm blocks
  (multi-head softmax attention, an exact-GELU MLP), the final LayerNorm and the head on the class token; the named
  features are the patch tokens of blocks 4, 8 and 12 on the patch grid, and the class token after the final norm.
  Dropout (before the head) is the only thing training mode changes."""
  from scipy.special import erf

  model = build_model(ModelSpec(name="vit-ti16", input_shape=(32, 32, 3), num_classes=10), seed=1)
  net = model.net
  # DeiT's initialisation: N(0, 0.02²) truncated at two standard deviations (std 0.88 x 0.02 after truncation).
  for kernel in (net.blocks[0].attention.qkv.kernel, net.blocks[11].fc1.kernel, net.position_embedding):
    assert np.abs(_numpy(kernel)).max() <= 0.04 and abs(_numpy(kernel).std() / (0.8796 * 0.02) - 1) < 0.05
  x = np.random.default_rng(0).uniform(0, 1, size=(2, 32, 32, 3)).astype(np.float32)
  model.eval()
  logits, named = model.features(jnp.asarray(x))

  def layer_norm(t, norm):
    return (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6) * _numpy(norm.scale) + \
        _numpy(norm.bias)

  def linear(t, layer):
    return t @ _numpy(layer.kernel) + _numpy(layer.bias)

  patches = x.astype(np.float64).reshape(2, 2, 16, 2, 16, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 16 * 16 * 3)
  embedded = patches @ _numpy(net.patch_embedding.kernel).reshape(-1, 192) + _numpy(net.patch_embedding.bias)
  tokens = np.concatenate([np.broadcast_to(_numpy(net.class_token), (2, 1, 192)), embedded], 1)
  tokens = tokens + _numpy(net.position_embedding)
  assert net.position_embedding.shape == (1, 5, 192)  # Sized for this input: 4 patches and the class token.
  for index, block in enumerate(net.blocks):
    q, k, v = np.moveaxis(linear(layer_norm(tokens, block.norm1), block.attention.qkv).reshape(2, 5, 3, 3, 64), 2, 0)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / 8.0
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    tokens = tokens + linear(np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 5, 192), block.attention.out)
    hidden = linear(layer_norm(tokens, block.norm2), block.fc1)
    tokens = tokens + linear(0.5 * hidden * (1 + erf(hidden / np.sqrt(2))), block.fc2)
    if index + 1 in (4, 8, 12):
      np.testing.assert_allclose(named[f"block{index + 1}"], tokens[:, 1:].reshape(2, 2, 2, 192), rtol=1e-4, atol=1e-4)
  pooled = layer_norm(tokens, net.norm)[:, 0]
  np.testing.assert_allclose(named["pool"], pooled, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, linear(pooled, net.head), rtol=1e-4, atol=1e-5)
  assert sorted(named) == ["block12", "block4", "block8", "pool"] and logits.dtype == jnp.float32

  model.train()
  np.testing.assert_array_equal(model(x), logits)  # No dropout: training mode computes the same.
  net.dropout.rate = 0.5
  assert not np.allclose(model(x), logits)
  model.eval()
  np.testing.assert_array_equal(model(x), logits)


@pytest.mark.fast
def test_vit_sizes_its_position_embeddings_for_the_images_and_takes_grayscale():
  for input_shape, grid in [((32, 48), (2, 3)), ((224, 224, 3), (14, 14)), ((16, 16, 1), (1, 1))]:
    spec = ModelSpec(name="vit-s16", input_shape=input_shape, num_classes=5)
    model = nnx.eval_shape(functools.partial(build_model, spec))
    assert model.net.position_embedding.shape == (1, grid[0] * grid[1] + 1, 384)
    assert feature_shapes(spec, model) == {**{f"block{k}": [*grid, 384] for k in (4, 8, 12)}, "pool": [384]}
    graphdef, state = nnx.split(model)
    logits = check_input_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, input_shape, "vit-s16")
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32


def test_mobilenet_v2_blocks_are_the_papers_and_batchnorm_follows_the_mode(monkeypatch):
  """torchvision's initialisation; inverted residual blocks in eval mode against NumPy (a 1x1 expansion to 6x the
  channels, the depthwise 3x3 padded by one pixel on every side, ReLU6 after both, a linear 1x1 projection,
  BatchNorm with its running averages after each convolution, the input added back where the shape is kept): the
  second stage's first block (stride 2, 16 -> 24 channels) and second (stride 1, residual). The whole network
  normalises with the batch's statistics in training (a row's logits depend on the others; the running averages
  move by 0.1 of the way) and with the running averages in eval mode (they do not). This is the concrete run that
  test_every_model_maps_images_to_logits leaves out (`TRACED`)."""
  from shared.architectures import mobilenet

  # torchvision's initialisation: convolutions He-normal over the fan-out (a 1x1 of 96 -> 24 channels: 2/24), the
  # head N(0, 0.01).
  projection = _numpy(mobilenet.ConvNormReLU6(96, 24, dtype=jnp.float32, rngs=nnx.Rngs(0)).conv.kernel)
  assert projection.shape == (1, 1, 96, 24) and abs(projection.std() / np.sqrt(2 / 24) - 1) < 0.05
  # The network's convolutions start at zero and get their kernels from NumPy here: drawing its 27 kernel shapes
  # with JAX would compile 27 samplers (~10 s on 2 cores).
  monkeypatch.setattr(mobilenet, "_CONV_INIT", nnx.initializers.zeros)
  rng = np.random.default_rng(0)
  model = build_model(ModelSpec(name="mobilenet-v2", input_shape=(12, 10, 3), num_classes=7), seed=0)
  assert abs(_numpy(model.net.head.kernel).std() / 0.01 - 1) < 0.05
  for _, layer in nnx.iter_graph(model):
    if isinstance(layer, nnx.Conv):
      size, _, _, channels = layer.kernel.shape
      layer.kernel[...] = rng.normal(0, np.sqrt(2 / (size * size * channels)), layer.kernel.shape)
    if isinstance(layer, nnx.BatchNorm):  # Running averages and affine parameters away from the identity.
      size = layer.num_features
      layer.mean[...], layer.var[...] = rng.normal(0, 0.5, size), rng.uniform(0.5, 2, size)
      layer.scale[...], layer.bias[...] = rng.uniform(0.5, 1.5, size), rng.normal(0, 0.5, size)

  def norm(y, layer):
    n = layer.norm
    return (y - _numpy(n.mean)) / np.sqrt(_numpy(n.var) + 1e-5) * _numpy(n.scale) + _numpy(n.bias)

  model.eval()
  down, keep = model.net.stages[1]
  x = rng.normal(size=(2, 8, 6, 16))
  for block, stride in [(down, 2), (keep, 1)]:  # [2, 8, 6, 16] -> [2, 4, 3, 24] -> [2, 4, 3, 24]
    hidden = np.clip(norm(numpy_conv(x, _numpy(block.expand.conv.kernel)), block.expand), 0, 6)
    hidden = np.clip(norm(numpy_conv(hidden, _numpy(block.depthwise.conv.kernel), stride, depthwise=True),
                          block.depthwise), 0, 6)
    expected = norm(numpy_conv(hidden, _numpy(block.project.conv.kernel)), block.project) + (x if stride == 1 else 0)
    assert expected.shape == (2, 4, 3, 24)
    np.testing.assert_allclose(block(jnp.asarray(x, jnp.float32)), expected, rtol=1e-4, atol=1e-4)
    x = expected

  features = nnx.jit(lambda model, x: model.features(x))  # One compilation per mode, cheaper than eager layers.
  images = rng.uniform(0, 1, size=(3, 12, 10, 3)).astype(np.float32)
  others = np.concatenate([images[:1], rng.uniform(0, 1, size=(2, 12, 10, 3)).astype(np.float32)])
  stem = model.net.stem
  before = _numpy(stem.norm.mean)
  logits, named = features(model, images)  # Sides halve at each stride 2, rounding up: 12x10 -> 6x5 -> 3x3 ...
  assert {k: v.shape[1:] for k, v in named.items()} == {"stage1": (3, 3, 24), "stage2": (2, 2, 32),
                                                        "stage3": (1, 1, 96), "stage4": (1, 1, 1280), "pool": (1280,)}
  np.testing.assert_allclose(logits[0], features(model, others)[0][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(_numpy(stem.norm.mean), before)
  model.train()
  first = features(model, images)[0]
  batch_mean = numpy_conv(images.astype(np.float64), _numpy(stem.conv.kernel), 2).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(_numpy(stem.norm.mean), 0.9 * before + 0.1 * batch_mean, rtol=1e-4, atol=1e-5)
  assert np.abs(features(model, others)[0][0] - first[0]).max() > 1e-3


@pytest.mark.fast
def test_models_json_counts_at_the_given_image_size_and_lists_natural_sizes(capsys):
  """`models --json --image-size 32`: the counts at 32x32x3 and 10 classes follow from the literature's at 224 px
  and 1,000 classes (990 fewer head rows; a ViT's position embeddings for 4 patches instead of 196); the features
  at that size; each model's natural input shape."""
  import json

  from student_train.cli import main as train_main
  train_main(["models", "--json", "--image-size", "32"])
  rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
  literature = {name: params for name, _, _, params in LITERATURE}
  assert rows["mobilenet-v2"]["params"] == literature["mobilenet-v2"] - 990 * (1280 + 1)
  for name, width in [("vit-ti16", 192), ("vit-s16", 384)]:
    assert rows[name]["params"] == literature[name] - 990 * (width + 1) - (196 - 4) * width
    assert rows[name]["features"] == {"block4": [2, 2, width], "block8": [2, 2, width], "block12": [2, 2, width],
                                      "pool": [width]}
  assert rows["mobilenet-v2"]["features"] == {"stage1": [8, 8, 24], "stage2": [4, 4, 32], "stage3": [2, 2, 96],
                                              "stage4": [1, 1, 1280], "pool": [1280]}
  assert rows["resnet20"]["params"] == 269_722 and rows["mlp-small"]["params"] == 32 * 32 * 3 * 128 + 128 + 1290
  assert {name: row["natural_input_shape"] for name, row in rows.items()} == {
      **{name: [8, 8, 1] for name in MODELS if name.startswith(("mlp-", "cnn-"))},
      "resnet8": [32, 32, 3], "resnet20": [32, 32, 3], "resnet56": [32, 32, 3],
      "resnet18": [224, 224, 3], "resnet50": [224, 224, 3], "mobilenet-v2": [224, 224, 3], "vit-ti16": [224, 224, 3],
      "vit-s16": [224, 224, 3], "lm-tiny": [2, 256], "lm-small": [2, 256]}
  train_main(["models", "--input-shape", "64"])  # Flat vectors: only the MLPs take them.
  assert re.search(r"vit-ti16 +n/a for this shape +ViT-Ti/16 .*\(natural input 224x224x3\)", capsys.readouterr().out)


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it (jit, custom derivatives)."""
  for equation in jaxpr.eqns:
    yield equation
    for value in equation.params.values():
      for inner in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


@pytest.mark.fast
@pytest.mark.parametrize("name", ["mobilenet-v2", "vit-ti16"])
def test_imagenet_architectures_compute_in_bfloat16_with_float32_weights_softmax_and_logits(name):
  """In bfloat16, every convolution and matrix product takes bfloat16 operands, attention's softmax (its exp) runs
  in float32, and the parameters, BatchNorm statistics and logits are float32 (traced, not run)."""
  model = nnx.eval_shape(lambda: build_model(ModelSpec(name=name, input_shape=(32, 32, 3), num_classes=10,
                                                       dtype="bfloat16")))
  model.eval()
  graphdef, state = nnx.split(model)
  weights = jax.tree.leaves(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
  assert {leaf.dtype for leaf in weights} == {jnp.dtype(jnp.float32)}
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, jax.ShapeDtypeStruct((2, 32, 32, 3),
                                                                                             jnp.float32))
  assert [v.aval.dtype for v in jaxpr.jaxpr.outvars] == [jnp.float32]
  products = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name in ("conv_general_dilated", "dot_general")]
  assert len(products) > 20 and all(v.aval.dtype == jnp.bfloat16 for e in products for v in e.invars), \
      {(e.primitive.name, tuple(v.aval.dtype.name for v in e.invars)) for e in products}
  exps = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "exp"]
  assert len(exps) == (12 if name.startswith("vit-") else 0)
  assert all(v.aval.dtype == jnp.float32 for e in exps for v in e.invars)


# Parameter counts (nnx.Param only: BatchNorm's running statistics are not parameters) at the sizes the papers and
# torchvision quote: (name, input shape, classes, parameters).
PARAMETER_COUNTS = [
    ("resnet8", (32, 32, 3), 10, 75_290),  # He et al. 2016's CIFAR ResNets (option A).
    ("resnet20", (32, 32, 3), 10, 269_722),
    ("resnet56", (32, 32, 3), 10, 853_018),
    ("resnet18", (224, 224, 3), 1000, 11_689_512),  # torchvision's resnet18 and resnet50.
    ("resnet50", (224, 224, 3), 1000, 25_557_032),
    *((name, (side, side, 3), classes, params) for name, side, classes, params in LITERATURE),
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

  for name, (_, _, natural) in MODELS.items():
    abstract = nnx.eval_shape(lambda: build_model(ModelSpec(name=name, input_shape=natural, num_classes=3)))
    if jax.tree.leaves(nnx.state(abstract, nnx.BatchStat)):
      net = getattr(abstract, "net", abstract)
      assert takes_row_mask(abstract) and takes_row_mask(net) and takes_row_mask(net.features), name
