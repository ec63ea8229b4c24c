"""Residual networks (He et al. 2016)."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from shared.architectures import BATCHNORM_MOMENTUM


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with BatchNorm and a residual connection (He et al. 2016). The shortcut is the identity,
  or where the shape changes option A's: subsampled by the stride and zero-padded with new channels (no
  parameters). Convolutions carry no bias: BatchNorm's shift replaces it (a bias before BatchNorm only adds noise
  that an adaptive optimizer amplifies)."""

  def __init__(self, channels_in: int, channels: int, stride: int, *, dtype, rngs: nnx.Rngs):
    conv = functools.partial(nnx.Conv, kernel_size=(3, 3), use_bias=False, dtype=dtype, rngs=rngs)
    norm = functools.partial(nnx.BatchNorm, momentum=BATCHNORM_MOMENTUM, dtype=dtype, rngs=rngs)
    self.conv1, self.norm1 = conv(channels_in, channels, strides=stride), norm(channels)
    self.conv2, self.norm2 = conv(channels, channels), norm(channels)
    self.stride, self.pad = stride, channels - channels_in

  def __call__(self, x):
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    shortcut = x[:, ::self.stride, ::self.stride, :]
    if self.pad:
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (self.pad // 2, self.pad - self.pad // 2)))
    return nnx.relu(y + shortcut)


class CifarResNet(nnx.Module):
  """The CIFAR ResNet of He et al. 2016 (section 4.2): a 3x3 convolution of 16 channels, then three stages of
  `blocks` basic blocks of 16, 32 and 64 channels (the second and third start with stride 2), global average
  pooling, dropout and the head: 6 * blocks + 2 layers with weights."""

  def __init__(self, input_shape, num_classes, *, blocks: int, dropout: float, dtype, rngs: nnx.Rngs):
    channels = input_shape[-1]
    self.stem = nnx.Conv(channels, 16, kernel_size=(3, 3), use_bias=False, dtype=dtype, rngs=rngs)
    self.stem_norm = nnx.BatchNorm(16, momentum=BATCHNORM_MOMENTUM, dtype=dtype, rngs=rngs)
    self.stages = nnx.List()
    channels = 16
    for stage, width in enumerate((16, 32, 64)):
      self.stages.append(nnx.List([BasicBlock(channels if block == 0 else width, width,
                                              2 if stage > 0 and block == 0 else 1, dtype=dtype, rngs=rngs)
                                   for block in range(blocks)]))
      channels = width
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(channels, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.features(x)[0]

  def features(self, x) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [B, num_classes] and the named features: `stage1`, `stage2`, `stage3`, each stage's output (after
    its last block's ReLU), [B, H, W, C]; `pool`, the pooled features before the head, [B, 64]."""
    x = nnx.relu(self.stem_norm(self.stem(x)))
    named = {}
    for stage, blocks in enumerate(self.stages):
      for block in blocks:
        x = block(x)
      named[f"stage{stage + 1}"] = x
    x = jnp.mean(x, axis=(1, 2))
    named["pool"] = x
    return self.head(self.dropout(x)).astype(jnp.float32), named
