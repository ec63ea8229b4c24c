"""MobileNetV2 (Sandler et al. 2018), in torchvision's layout."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from shared.architectures import batch_norm, conv, row_mask

# The inverted-residual stages: (expansion t, output channels c, blocks n, first block's stride s), the paper's
# table 2 (width multiplier 1).
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# After which of `STAGES` the network has its last output at stride 4, 8, 16 and 32 (the features `stage1`..`stage3`;
# `stage4` is the last 1x1 convolution's output, after all of them).
FEATURE_STAGES = {1: "stage1", 2: "stage2", 4: "stage3"}
LAST_CHANNELS = 1280

# torchvision's initialisation: convolutions He-normal over the fan-out, the head N(0, 0.01), biases zero.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_HEAD_INIT = nnx.initializers.normal(0.01)


class ConvNormReLU6(nnx.Module):
  """A convolution without bias padded by kernel // 2 (`shared.architectures.conv`), BatchNorm, and ReLU6 unless
  `activation` is off (the linear bottleneck)."""

  def __init__(self, channels_in: int, channels: int, *, kernel: int = 1, stride: int = 1, groups: int = 1,
               activation: bool = True, dtype, rngs: nnx.Rngs):
    self.conv = conv(channels_in, channels, kernel, stride, groups=groups, kernel_init=_CONV_INIT, dtype=dtype,
                     rngs=rngs)
    self.norm = batch_norm(channels, dtype=dtype, rngs=rngs)
    self.activation = activation

  def __call__(self, x, rows=None):
    """`rows`: from `row_mask`, the rows BatchNorm's batch statistics count (None: every row)."""
    x = self.norm(self.conv(x), mask=rows)
    return jax.nn.relu6(x) if self.activation else x


class InvertedResidual(nnx.Module):
  """MobileNetV2's block: a 1x1 expansion to `expansion` times the channels (none when 1), a depthwise 3x3
  convolution (one filter per channel, `feature_group_count`) carrying the stride, both with ReLU6, and a linear
  1x1 projection; the input is added back where the shape is kept (stride 1, same channels)."""

  def __init__(self, channels_in: int, channels: int, stride: int, expansion: int, *, dtype, rngs: nnx.Rngs):
    layer = functools.partial(ConvNormReLU6, dtype=dtype, rngs=rngs)
    hidden = channels_in * expansion
    self.expand = layer(channels_in, hidden) if expansion != 1 else None
    self.depthwise = layer(hidden, hidden, kernel=3, stride=stride, groups=hidden)
    self.project = layer(hidden, channels, activation=False)
    self.residual = stride == 1 and channels_in == channels

  def __call__(self, x, rows=None):
    y = x if self.expand is None else self.expand(x, rows)
    y = self.project(self.depthwise(y, rows), rows)
    return x + y if self.residual else y


class MobileNetV2(nnx.Module):
  """MobileNetV2 (Sandler et al. 2018) as torchvision builds it (width multiplier 1): a 3x3 convolution of 32
  channels at stride 2, the 17 inverted residual blocks of `STAGES`, a 1x1 convolution to 1280 channels, global
  average pooling, dropout and the head. 3,504,872 parameters at 1,000 classes (any input size: the head sees the
  pooled features).

  Args:
    input_shape: (H, W, C), any size: each stride-2 layer halves the sides, rounding up (to 1 pixel at least).
    num_classes: the head's outputs.
    dropout: the rate of the dropout before the head (torchvision's recipe uses 0.2).
    dtype: the compute dtype (parameters and BatchNorm statistics stay float32).
    rngs: initialisation and dropout.
  """

  def __init__(self, input_shape, num_classes, *, dropout: float, dtype, rngs: nnx.Rngs):
    channels = 32
    self.stem = ConvNormReLU6(input_shape[-1], channels, kernel=3, stride=2, dtype=dtype, rngs=rngs)
    self.stages = nnx.List()
    for expansion, width, blocks, stride in STAGES:
      self.stages.append(nnx.List([InvertedResidual(channels if block == 0 else width, width,
                                                    stride if block == 0 else 1, expansion, dtype=dtype, rngs=rngs)
                                   for block in range(blocks)]))
      channels = width
    self.last = ConvNormReLU6(channels, LAST_CHANNELS, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(LAST_CHANNELS, num_classes, kernel_init=_HEAD_INIT, dtype=dtype, rngs=rngs)

  def __call__(self, x, mask=None):
    return self.features(x, mask)[0]

  def features(self, x, mask=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [B, num_classes] and the named features, each the last output at its stride (sides rounded up):
    `stage1` [B, H/4, W/4, 24], `stage2` [B, H/8, W/8, 32], `stage3` [B, H/16, W/16, 96] (the outputs of the
    stages of 24, 32 and 96 channels), `stage4` [B, H/32, W/32, 1280] (the last 1x1 convolution's, after its
    ReLU6); `pool`, the pooled features before the head, [B, 1280]. `mask` (float [B], 0 for an epoch's padding
    rows) leaves those rows out of BatchNorm's batch statistics."""
    rows = row_mask(mask)
    x = self.stem(x, rows)
    named = {}
    for stage, blocks in enumerate(self.stages):
      for block in blocks:
        x = block(x, rows)
      if stage in FEATURE_STAGES:
        named[FEATURE_STAGES[stage]] = x
    x = self.last(x, rows)
    named["stage4"] = x
    x = jnp.mean(x, axis=(1, 2))
    named["pool"] = x
    return self.head(self.dropout(x)).astype(jnp.float32), named
