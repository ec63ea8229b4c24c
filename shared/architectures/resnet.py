"""Residual networks (He et al. 2016): the CIFAR ResNets (`CifarResNet`) and the ImageNet ones in torchvision's
layout (`ImageNetResNet`), built from one residual block (`ResidualBlock`) and one forward pass (`ResNet`).

Every convolution pads by half its kernel on each side, as torchvision's (and the original Torch code's) do, and the
stem's max-pooling by one with -inf; XLA's 'SAME' padding would pad a strided layer on an even input by one row less
on top than below, shifting the grid it samples. Convolutions carry no bias, as torchvision's: BatchNorm's shift
replaces it (in training BatchNorm subtracts the batch mean, which cancels a bias before it exactly).

`mask` (float [B], 0 for a padding row; None: every row) is what BatchNorm's batch statistics count in training:
the zero rows that pad an epoch's last, short batch change neither the normalisation of the real rows nor the
running averages. In eval mode BatchNorm uses its running averages and the mask changes nothing.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from shared.architectures import batch_norm, conv, row_mask


class ResidualBlock(nnx.Module):
  """Convolutions, each followed by BatchNorm, with a ReLU between them; their output is added to the shortcut and
  passed through a ReLU. The shortcut is the identity where the shape is kept; where it changes, option A's
  (`projection=False`: subsampled by the stride and zero-padded with new channels, no parameters; He et al.'s
  CIFAR networks) or option B's (a strided 1x1 convolution and BatchNorm; torchvision's).

  Args:
    channels_in: the input's channels.
    layers: (channels, kernel, stride) of each convolution.
    projection: option B's shortcut (else option A's).
  """

  def __init__(self, channels_in: int, layers: tuple[tuple[int, int, int], ...], *, projection: bool, dtype,
               rngs: nnx.Rngs):
    self.convs, self.norms = nnx.List(), nnx.List()
    channels = channels_in
    for width, kernel, stride in layers:
      self.convs.append(conv(channels, width, kernel, stride, dtype=dtype, rngs=rngs))
      self.norms.append(batch_norm(width, dtype=dtype, rngs=rngs))
      channels = width
    self.stride = math.prod(stride for _, _, stride in layers)
    reshaped = self.stride != 1 or channels != channels_in
    self.project = projection and reshaped
    if self.project:
      self.shortcut_conv = conv(channels_in, channels, 1, self.stride, dtype=dtype, rngs=rngs)
      self.shortcut_norm = batch_norm(channels, dtype=dtype, rngs=rngs)
    self.pad = 0 if projection else channels - channels_in

  def __call__(self, x, rows=None):
    """`x` [B, H, W, C_in] -> [B, H / stride, W / stride, C]; `rows` from `row_mask` (None: every row)."""
    y = x
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      y = norm(conv(y), mask=rows)
      if i < len(self.convs) - 1:
        y = nnx.relu(y)
    if self.project:
      shortcut = self.shortcut_norm(self.shortcut_conv(x), mask=rows)
    else:
      shortcut = x[:, ::self.stride, ::self.stride, :]
      if self.pad:
        shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (self.pad // 2, self.pad - self.pad // 2)))
    return nnx.relu(y + shortcut)


class BasicBlock(ResidualBlock):
  """Two 3x3 convolutions of `channels`, the first with the stride (ResNet-18/34 and the CIFAR ResNets)."""

  expansion = 1

  def __init__(self, channels_in: int, channels: int, stride: int, *, projection: bool, dtype, rngs: nnx.Rngs):
    super().__init__(channels_in, ((channels, 3, stride), (channels, 3, 1)), projection=projection, dtype=dtype,
                     rngs=rngs)


class Bottleneck(ResidualBlock):
  """1x1 down to `channels`, 3x3 with the stride, 1x1 up to 4 * `channels` (ResNet-50 and deeper). The stride is on
  the 3x3 convolution, as in torchvision ("ResNet v1.5"; the paper strides the first 1x1)."""

  expansion = 4

  def __init__(self, channels_in: int, channels: int, stride: int, *, projection: bool, dtype, rngs: nnx.Rngs):
    super().__init__(channels_in, ((channels, 1, 1), (channels, 3, stride), (4 * channels, 1, 1)),
                     projection=projection, dtype=dtype, rngs=rngs)


class ResNet(nnx.Module):
  """A stem (a convolution, BatchNorm, ReLU, optionally a 3x3/2 max-pooling), stages of residual blocks (the first
  block of each takes the stage's stride), global average pooling, dropout and the head.

  Args:
    input_shape: (H, W, C).
    num_classes: the head's outputs.
    stem: (channels, kernel, stride, max_pool) of the stem.
    stages: (channels, blocks, stride) of each stage; a block's output has channels * `block.expansion`.
    block: `BasicBlock` or `Bottleneck`.
    projection: option B's shortcuts (else option A's; see `ResidualBlock`).
    dropout: the rate on the pooled features.
  """

  def __init__(self, input_shape, num_classes, *, stem: tuple[int, int, int, bool],
               stages: tuple[tuple[int, int, int], ...], block: type[ResidualBlock], projection: bool,
               dropout: float, dtype, rngs: nnx.Rngs):
    width, kernel, stride, self.stem_pool = stem
    self.stem = conv(input_shape[-1], width, kernel, stride, dtype=dtype, rngs=rngs)
    self.stem_norm = batch_norm(width, dtype=dtype, rngs=rngs)
    self.stages = nnx.List()
    channels = width
    for width, blocks, stride in stages:
      stage = nnx.List()
      for i in range(blocks):
        stage.append(block(channels, width, stride if i == 0 else 1, projection=projection, dtype=dtype, rngs=rngs))
        channels = width * block.expansion
      self.stages.append(stage)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(channels, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, mask=None):
    return self.features(x, mask)[0]

  def features(self, x, mask=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [B, num_classes] and the named features: `stage1`, `stage2`, ..., each stage's output (after its last
    block's ReLU), [B, H, W, C]; `pool`, the pooled features before the head, [B, C]. `mask`: float [B], the rows
    BatchNorm's batch statistics count (see the module's docstring)."""
    rows = row_mask(mask)
    x = nnx.relu(self.stem_norm(self.stem(x), mask=rows))
    if self.stem_pool:  # Padded with -inf, so the padding is never the maximum (torchvision's padding=1).
      x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    named = {}
    for stage, blocks in enumerate(self.stages):
      for block in blocks:
        x = block(x, rows)
      named[f"stage{stage + 1}"] = x
    x = jnp.mean(x, axis=(1, 2))
    named["pool"] = x
    return self.head(self.dropout(x)).astype(jnp.float32), named


class CifarResNet(ResNet):
  """The CIFAR ResNet of He et al. 2016 (section 4.2): a 3x3 convolution of 16 channels, then three stages of
  `blocks` basic blocks of 16, 32 and 64 channels (the second and third start with stride 2) with option-A
  shortcuts, global average pooling, dropout and the head: 6 * blocks + 2 layers with weights. Features `stage1` to
  `stage3` and `pool` [B, 64]."""

  def __init__(self, input_shape, num_classes, *, blocks: int, dropout: float, dtype, rngs: nnx.Rngs):
    super().__init__(input_shape, num_classes, stem=(16, 3, 1, False),
                     stages=((16, blocks, 1), (32, blocks, 2), (64, blocks, 2)), block=BasicBlock, projection=False,
                     dropout=dropout, dtype=dtype, rngs=rngs)


class ImageNetResNet(ResNet):
  """An ImageNet ResNet in torchvision's layout: a 7x7/2 convolution of 64 channels, BatchNorm, ReLU and a 3x3/2
  max-pooling, four stages of 64, 128, 256 and 512 channels (times 4 with bottlenecks; the second to fourth start
  with stride 2) with option-B (projection) shortcuts, global average pooling, dropout and the head. Features
  `stage1` to `stage4` and `pool` [B, 512 or 2048].

  Args:
    blocks: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-50.
    bottleneck: `Bottleneck` blocks (else `BasicBlock`).
  """

  def __init__(self, input_shape, num_classes, *, blocks: tuple[int, int, int, int], bottleneck: bool,
               dropout: float, dtype, rngs: nnx.Rngs):
    super().__init__(input_shape, num_classes, stem=(64, 7, 2, True),
                     stages=tuple((64 * 2 ** i, count, 1 if i == 0 else 2) for i, count in enumerate(blocks)),
                     block=Bottleneck if bottleneck else BasicBlock, projection=True, dropout=dropout, dtype=dtype,
                     rngs=rngs)
