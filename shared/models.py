"""A small registry of Flax NNX classifiers, chosen by name, or your own as `module:function`; the input shape
comes from the dataset.

Your own model is a factory `function(input_shape, num_classes, rngs) -> nnx.Module` in an importable module
(the current directory is importable, as with `python -m`). A run records the reference and a digest of the
parameters' structure (`ModelSpec.structure`), so that a factory changed since is refused rather than loaded.

Every model maps float32 inputs [B, *input_shape] to float32 logits [B, num_classes], computing in
`ModelSpec.dtype` (parameters stay float32); the language models (`lm-*`, `shared.architectures.transformer`) map
packed token rows [B, 2, L] (token ids and segment ids, `is_token_rows`) to logits per position [B, L, V], V the
vocabulary (`num_classes`), position j's predicting token j + 1. Dropout is the only stochastic layer, applied once
to each hidden output that feeds a dense layer: in MLPs and CNNs the output of every hidden dense layer (after its
ReLU), in the residual, inverted-residual and vision transformer models the pooled features before the head, in the
language models the final normalised hidden states before the head (every position's); convolutions, attention and
the inputs are never dropped. BatchNorm normalises with the batch's statistics in training and with its running averages
after `model.eval()`, which also makes a model deterministic (how teachers run). A model's weights are its
parameters and BatchNorm's running statistics (`WEIGHTS`): what checkpoints hold and teachers run with. A model
refuses an input shape it cannot take (flat vectors for image models; image sides that are not multiples of a
ViT's patch size; anything but token rows for a language model) with an error that names it.

The registry's models with BatchNorm take the batch's row mask, `__call__(x, mask=None)` and `features(x,
mask=None)` (float [B], 0 for the zero rows that pad an epoch's last, short batch), and their batch statistics leave
the masked rows out; the trainer passes the mask to any model whose method takes `mask` (`takes_row_mask`), your
own included.
"""

import dataclasses
import hashlib
import importlib
import inspect
import math
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from shared.architectures.mobilenet import MobileNetV2
from shared.architectures.resnet import CifarResNet, ImageNetResNet
from shared.architectures.transformer import TransformerLM, is_token_rows
from shared.architectures.vit import VisionTransformer
from shared.errors import StillroomError
from shared.precision import COMPUTE_DTYPES  # What `ModelSpec.dtype` may be.
# A model's weights: its trained parameters and BatchNorm's running statistics. Checkpoints hold them and a
# teacher's apply_fn takes them; optimizers and parameter counts see `nnx.Param` alone.
WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
  """Everything needed to rebuild a model's structure (its parameters live in a checkpoint).

  Attributes:
    name: a registry name (see `MODELS`), or `module:function` for your own factory.
    input_shape: one example's shape, e.g. (8, 8, 1) or (64,).
    num_classes: number of output logits.
    dropout: probability of dropping each output unit of a hidden dense layer (after its ReLU) in training, or of
      the hidden state before the head (see above); survivors are scaled by 1 / (1 - dropout). Convolutions and
      inputs are not dropped. (Your own model does its own dropout: 0 here.)
    structure: for your own model, SHA-256 of its parameters' paths, shapes and dtypes (None for registry models).
    dtype: the compute dtype, one of `COMPUTE_DTYPES` (parameters and logits stay float32); not part of the
      structure: one run's weights load at either.
  """

  name: str
  input_shape: tuple[int, ...]
  num_classes: int
  dropout: float = 0.0
  structure: str | None = None
  dtype: str = "float32"

  def to_dict(self) -> dict:
    """As config.json records it: without `structure` for a registry model and without the default dtype, so that
    records written before either existed read the same."""
    d = {**dataclasses.asdict(self), "input_shape": list(self.input_shape)}
    return {k: v for k, v in d.items()
            if not (k == "structure" and v is None) and not (k == "dtype" and v == "float32")}

  @classmethod
  def from_dict(cls, d: dict) -> "ModelSpec":
    return cls(**{**d, "input_shape": tuple(d["input_shape"])})


class MLP(nnx.Module):
  """Flatten, then hidden dense layers (ReLU, then dropout) and the head."""

  def __init__(self, input_shape, num_classes, *, hidden, dropout, dtype=jnp.float32, rngs: nnx.Rngs):
    sizes = [math.prod(input_shape), *hidden]
    self.hidden = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(sizes[-1], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.features(x)[0]

  def features(self, x) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [B, num_classes] and the named features: `hidden1`, ... each hidden layer's output after its ReLU
    (before dropout), [B, units]."""
    x = x.reshape(x.shape[0], -1)
    named = {}
    for i, layer in enumerate(self.hidden):
      x = nnx.relu(layer(x))
      named[f"hidden{i + 1}"] = x
      x = self.dropout(x)
    return self.head(x).astype(jnp.float32), named


class CNN(nnx.Module):
  """Stages of 3x3 convolutions (ReLU) each followed by 2x2 max-pooling, then a dense layer (ReLU, dropout) and the
  head."""

  def __init__(self, input_shape, num_classes, *, stages, dense, dropout, dtype=jnp.float32, rngs: nnx.Rngs):
    height, width, channels = input_shape
    self.convs = nnx.List()
    for stage in stages:
      for features in stage:
        self.convs.append(nnx.Conv(channels, features, kernel_size=(3, 3), dtype=dtype, rngs=rngs))
        channels = features
      height, width = -(-height // 2), -(-width // 2)  # 'SAME' pooling rounds up.
    self.stage_sizes = tuple(len(stage) for stage in stages)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.dense = nnx.Linear(height * width * channels, dense, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(dense, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.features(x)[0]

  def features(self, x) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [B, num_classes] and the named features: `stage1`, ... each stage's output after its last ReLU and
    before its pooling, [B, H, W, C]; `dense`, the dense layer's output after its ReLU (before dropout), [B, units]."""
    named = {}
    layer = 0
    for stage, size in enumerate(self.stage_sizes):
      for _ in range(size):
        x = nnx.relu(self.convs[layer](x))
        layer += 1
      named[f"stage{stage + 1}"] = x
      x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")
    x = nnx.relu(self.dense(x.reshape(x.shape[0], -1)))
    named["dense"] = x
    return self.head(self.dropout(x)).astype(jnp.float32), named


def image_shape(spec: ModelSpec) -> tuple[int, int, int]:
  """The (H, W, C) a convolutional model takes: grayscale images stored as (H, W) get a channel axis.

  Raises:
    StillroomError: the input is not an image, naming the model.
  """
  shape = tuple(spec.input_shape)
  if len(shape) == 2:
    shape = (*shape, 1)
  if len(shape) != 3:
    raise StillroomError(
        f"model {spec.name!r} needs image inputs of shape (H, W) or (H, W, C); got {tuple(spec.input_shape)}. "
        "Use an mlp-* model for flat feature vectors.")
  return shape


def _mlp(hidden):
  return lambda spec, rngs: MLP(spec.input_shape, spec.num_classes, hidden=hidden, dropout=spec.dropout,
                                dtype=jnp.dtype(spec.dtype), rngs=rngs)


def _image_model(net_class, **settings):
  """A factory of an image model `net_class(input_shape, num_classes, **settings, dropout, dtype, rngs)`; a
  `StillroomError` of the class (an input shape it cannot take) names the model."""
  def make(spec, rngs):
    shape = image_shape(spec)
    try:
      net = net_class(shape, spec.num_classes, **settings, dropout=spec.dropout, dtype=jnp.dtype(spec.dtype), rngs=rngs)
    except StillroomError as e:
      raise StillroomError(f"model {spec.name!r} {e}") from e
    return _ImageInput(net, channels_last=len(spec.input_shape) == 3)
  return make


def _language_model(**settings):
  """A factory of a `TransformerLM` with `settings` (width, depth, heads); its vocabulary is the spec's
  `num_classes`. A `StillroomError` (an input that is not token rows) names the model."""
  def make(spec, rngs):
    try:
      return TransformerLM(spec.input_shape, spec.num_classes, **settings, dropout=spec.dropout,
                           dtype=jnp.dtype(spec.dtype), rngs=rngs)
    except StillroomError as e:
      raise StillroomError(f"model {spec.name!r} {e}") from e
  return make


def _cnn(stages, dense):
  return _image_model(CNN, stages=stages, dense=dense)


class _ImageInput(nnx.Module):
  """Adds the channel axis to (H, W) inputs so image models accept grayscale images stored without one."""

  def __init__(self, net: nnx.Module, channels_last: bool):
    self.net = net
    self.channels_last = channels_last

  def __call__(self, x, mask=None):
    return self.net(x if self.channels_last else x[..., None], **row_mask_of(self.net, mask))

  def features(self, x, mask=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    return self.net.features(x if self.channels_last else x[..., None], **row_mask_of(self.net.features, mask))


# Natural input shapes: the images each family was made for (`describe_models` lists them, so that a benchmark can
# run every model at its own).
DIGITS, CIFAR, IMAGENET = (8, 8, 1), (32, 32, 3), (224, 224, 3)
TOKENS = (2, 256)  # Packed rows of 256 tokens (token ids and segment ids), the language models' natural input.

# name: (factory(spec, rngs) -> model, description, natural input shape).
MODELS = {
    "mlp-tiny": (_mlp((32,)), "MLP, one hidden layer of 32", DIGITS),
    "mlp-small": (_mlp((128,)), "MLP, one hidden layer of 128", DIGITS),
    "mlp-large": (_mlp((1200, 1200)), "MLP, two hidden layers of 1200 (Hinton et al. 2015's teacher)", DIGITS),
    "cnn-small": (_cnn(((16,), (32,)), 64), "CNN, conv16-pool-conv32-pool, dense 64", DIGITS),
    "cnn-large": (_cnn(((32, 32), (64, 64)), 256), "CNN, 2x conv32-pool, 2x conv64-pool, dense 256", DIGITS),
    "cnn-thin-deep": (_cnn(((8, 8, 8), (16, 16, 16)), 32),
                      "CNN, thin and deep as FitNets' students: 3x conv8-pool, 3x conv16-pool, dense 32", DIGITS),
    **{f"resnet{6 * blocks + 2}": (_image_model(CifarResNet, blocks=blocks),
                                   f"CIFAR ResNet-{6 * blocks + 2} (He et al. 2016): 3 stages of {blocks} basic blocks "
                                   "of 16/32/64 channels, BatchNorm, option-A shortcuts", CIFAR)
       for blocks in (1, 3, 9)},
    "resnet18": (_image_model(ImageNetResNet, blocks=(2, 2, 2, 2), bottleneck=False),
                 "ImageNet ResNet-18 (torchvision's layout): 7x7/2 stem and max-pool, 4 stages of 2 basic blocks of "
                 "64..512 channels, BatchNorm, projection shortcuts", IMAGENET),
    "resnet50": (_image_model(ImageNetResNet, blocks=(3, 4, 6, 3), bottleneck=True),
                 "ImageNet ResNet-50 (torchvision's layout, v1.5): 7x7/2 stem and max-pool, 3/4/6/3 bottleneck blocks "
                 "of 64..512 (x4) channels, BatchNorm, projection shortcuts", IMAGENET),
    "mobilenet-v2": (_image_model(MobileNetV2),
                     "MobileNetV2 (Sandler et al. 2018), torchvision's layout: 17 inverted residual blocks (expansion "
                     "6, ReLU6, depthwise 3x3), BatchNorm, 1x1 conv to 1280", IMAGENET),
    **{f"vit-{size.lower()}16": (
        _image_model(VisionTransformer, patch=16, width=width, depth=12, heads=heads, mlp_ratio=4),
        f"ViT-{size}/16 (Dosovitskiy et al. 2021, DeiT's sizes): 16-px patches, 12 pre-LayerNorm blocks of width "
        f"{width}, {heads} heads, MLP 4x, class token; image sides multiples of 16", IMAGENET)
       for size, width, heads in (("Ti", 192, 3), ("S", 384, 6))},
    "lm-tiny": (_language_model(width=128, depth=5, heads=4),
                "decoder-only transformer LM: 5 pre-RMSNorm blocks of width 128, 4 heads, rotary positions, causal "
                "and segment masking, GELU MLP 4x; 1.05 M parameters at 256 tokens (bytes)", TOKENS),
    "lm-small": (_language_model(width=320, depth=8, heads=5),
                 "decoder-only transformer LM: 8 pre-RMSNorm blocks of width 320, 5 heads, rotary positions, causal "
                 "and segment masking, GELU MLP 4x; 10.0 M parameters at 256 tokens (bytes)", TOKENS),
}


def is_reference(name: str) -> bool:
  """Whether a model or teacher name is `module:function` rather than a registry name."""
  module, _, function = name.partition(":")
  return bool(module) and bool(function) and ":" not in function and "/" not in module


def import_function(reference: str, what: str):
  """The function `module:function` names (the current directory is importable, as with `python -m`).

  Raises:
    StillroomError: naming `what` and why it cannot be imported.
  """
  module_name, _, function_name = reference.partition(":")
  if not is_reference(reference):
    raise StillroomError(f"{what} {reference!r}: expected 'module:function'.")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    function = getattr(importlib.import_module(module_name), function_name)
  except Exception as e:  # pylint: disable=broad-except  # ImportError, AttributeError, or the module's own error.
    raise StillroomError(f"{what} {reference!r}: cannot import it ({type(e).__name__}: {e}).") from e
  if not callable(function):
    raise StillroomError(f"{what} {reference!r} is a {type(function).__name__}, not a function.")
  return function


def takes_row_mask(method) -> bool:
  """Whether a model's `__call__` or `features` (a bound method or the module itself) takes the batch's row mask as
  `mask=` (every registry model with BatchNorm does): the trainer passes it only to one that does, so that BatchNorm's
  batch statistics leave out an epoch's padding rows; a model that takes none sees them as rows."""
  try:
    parameters = inspect.signature(method).parameters
  except (TypeError, ValueError):  # A callable without a signature Python can read.
    return False
  return "mask" in parameters


def row_mask_of(method, mask) -> dict:
  """The keyword arguments that give `method` (see `takes_row_mask`) the row mask: `{"mask": mask}`, or none."""
  return {"mask": mask} if mask is not None and takes_row_mask(method) else {}


def structure_digest(model: nnx.Module) -> str:
  """SHA-256 of the model's parameter paths, shapes and dtypes: identifies its structure, not its values."""
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  text = "\n".join(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{leaf.dtype}" for path, leaf in leaves)
  return hashlib.sha256(text.encode()).hexdigest()


def build_model(spec: ModelSpec, seed: int = 0) -> nnx.Module:
  """Builds a freshly initialised model: a registry model, or your own factory's (`module:function`).

  Args:
    spec: the model's name, input shape, class count and dropout (and for your own, its recorded structure).
    seed: initialisation seed (dropout draws from the same `nnx.Rngs`).

  Raises:
    StillroomError: unknown name (listing the valid ones); your own factory that cannot be imported, does not
      return an `nnx.Module`, or returns one of another structure than recorded.
  """
  if not 0.0 <= spec.dropout < 1.0:
    raise StillroomError(f"dropout must be in [0, 1), got {spec.dropout}.")
  if spec.num_classes < 2:
    raise StillroomError(f"a classifier needs at least 2 classes, got {spec.num_classes}.")
  if spec.dtype not in COMPUTE_DTYPES:
    raise StillroomError(f"compute dtype {spec.dtype!r}: not one of {', '.join(COMPUTE_DTYPES)}.")
  if spec.name in MODELS:
    make, _, _ = MODELS[spec.name]
    return make(spec, nnx.Rngs(seed))
  if not is_reference(spec.name):
    raise StillroomError(f"unknown model {spec.name!r}; available models: {', '.join(MODELS)}, or "
                         "'module:function' for your own (see docs/caches-and-runs.md).")
  if spec.dropout:
    raise StillroomError(f"--dropout is for the registry's models; your own model {spec.name!r} does its own.")
  if spec.dtype != "float32":
    raise StillroomError(f"--compute-dtype {spec.dtype} is for the registry's models; your own model {spec.name!r} "
                         "sets its own compute dtype (build its layers with dtype=jnp.bfloat16): give --compute-dtype "
                         "float32.")
  factory = import_function(spec.name, "model")
  try:
    model = factory(tuple(spec.input_shape), spec.num_classes, nnx.Rngs(seed))
  except Exception as e:  # pylint: disable=broad-except  # The factory's own failure, named.
    raise StillroomError(f"model {spec.name!r}({tuple(spec.input_shape)}, {spec.num_classes}, rngs) failed: "
                         f"{type(e).__name__}: {e}") from e
  if not isinstance(model, nnx.Module):
    raise StillroomError(f"model {spec.name!r} returned {type(model).__name__}; it must return an nnx.Module.")
  if spec.structure is not None and structure_digest(model) != spec.structure:
    raise StillroomError(f"model {spec.name!r} now builds parameters of another structure than the run recorded "
                         "(the factory changed): restore it, or train a new run.")
  return model


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def describe_models(input_shape: tuple[int, ...] = DIGITS, num_classes: int = 10) -> list[dict]:
  """Each registered model at one input shape and class count, built abstractly (`nnx.eval_shape`: no parameters
  are allocated or initialised, whatever the size).

  Returns:
    One dict per model, in registry order: `name`, `about` (its description), `params` (its parameter count, None
    when it cannot take `input_shape`), `features` (`feature_shapes`, None likewise) and `natural_input_shape`
    (the [H, W, C] it was made for: 8x8x1 digits, 32x32x3 CIFAR, 224x224x3 ImageNet; [2, 256] token rows for the
    language models).
  """
  rows = []
  for name, (_, about, natural) in MODELS.items():
    spec = ModelSpec(name=name, input_shape=input_shape, num_classes=num_classes)
    try:
      model = nnx.eval_shape(lambda: build_model(spec))
    except StillroomError:
      model = None  # This model cannot take that input shape.
    rows.append({"name": name, "about": about, "params": None if model is None else count_params(model),
                 "features": None if model is None else feature_shapes(spec, model),
                 "natural_input_shape": list(natural)})
  return rows


def feature_shapes(spec: ModelSpec, model: nnx.Module | None = None) -> dict[str, list[int]]:
  """The named features of a model (its `features` method; none for your own model without one): `{name: the
  shape of one example's feature}`, e.g. `{"stage1": [8, 8, 32], "dense": [256]}`. `model`: the spec's model
  already built (abstractly, `nnx.eval_shape`), else it is built here."""
  if model is None:
    model = nnx.eval_shape(lambda: build_model(spec))
  if not hasattr(model, "features"):
    return {}
  graphdef, state = nnx.split(model)
  named = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x)[1], state,
                            jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32))
  return {name: list(value.shape[1:]) for name, value in named.items()}


def check_input_shape(model_fn, params, input_shape: tuple[int, ...], what: str,
                      batch_size: int = 2) -> jax.ShapeDtypeStruct:
  """Traces one forward pass abstractly at the batch size it will run at; a shape the model cannot take, or an
  output that is not one row of logits per input (a function that ignores the batch axis), is a clear error.

  Args:
    model_fn: `(params, x) -> logits`.
    params: the parameters (or their shapes).
    input_shape: one example's shape.
    what: how to name the model in the error (e.g. "teacher runs/t0 (mlp-small)").
    batch_size: the batch it will run at (more than 1, so that broadcast outputs show).

  Returns:
    The logits' abstract value, [batch_size, C]; for token rows (`is_token_rows`: input [2, L]) logits per position,
    [batch_size, L, C].
  """
  try:
    out = jax.eval_shape(model_fn, params, jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32))
  except Exception as e:  # Shape errors surface as several exception types from inside the model.
    raise StillroomError(f"{what} cannot take inputs of shape {tuple(input_shape)}: {str(e).splitlines()[0]}") from e
  expected = (batch_size, input_shape[-1]) if is_token_rows(input_shape) else (batch_size,)
  if not hasattr(out, "shape") or len(out.shape) != len(expected) + 1 or tuple(out.shape[:-1]) != expected:
    got = getattr(out, "shape", type(out).__name__)
    wanted = "[batch, positions, vocabulary] for token rows" if len(expected) == 2 else "[batch, classes]"
    advice = " (token rows need a language model: lm-tiny, lm-small)" if len(expected) == 2 else ""
    raise StillroomError(f"{what} must return logits of shape {wanted}; for a batch of {batch_size} of inputs "
                         f"{tuple(input_shape)} it returned {got}{advice}.")
  return out
