"""The registry's larger architectures (`shared.models.MODELS` names them), in Flax NNX.

Each is a module `Net(input_shape (H, W, C), num_classes, *, ..., dropout, dtype, rngs)` with `__call__(x, mask=None)
-> logits` and `features(x, mask=None) -> (logits, {name: feature})`, logits in float32 whatever the compute dtype;
BatchNorm layers use `BATCHNORM_MOMENTUM` and count only the rows `mask` (float [B], 0 for an epoch's padding rows)
keeps in their batch statistics (see `resnet.py`). The language models (`transformer.py`) take packed token rows
(2, L) instead and return logits per position, [B, L, V].
"""

import jax
from flax import nnx

# BatchNorm's running averages keep 0.9 of the old value per step (PyTorch's momentum 0.1, what the CIFAR and
# ImageNet recipes use; Flax's default, 0.99, lags far behind the weights in runs of a few thousand steps).
BATCHNORM_MOMENTUM = 0.9


def row_mask(mask: jax.Array | None) -> jax.Array | None:
  """bool [B, 1, 1, 1]: the rows BatchNorm counts, broadcastable to an image batch [B, H, W, C] (None: all)."""
  return None if mask is None else (mask > 0).reshape(-1, 1, 1, 1)


def conv(channels_in: int, channels: int, kernel: int, stride: int = 1, *, groups: int = 1,
         kernel_init: nnx.Initializer = nnx.nn.linear.default_kernel_init, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """A `kernel` x `kernel` convolution without bias, padded by kernel // 2 on every side, as torchvision's.

  BatchNorm follows every one: its shift replaces the bias. XLA's 'SAME' padding would pad a strided layer on an
  even input by one row less on top than below, shifting the grid it samples. `groups`: `feature_group_count`
  (the channels for a depthwise convolution). Maps [B, H, W, channels_in] to [B, ceil(H / stride),
  ceil(W / stride), channels] for odd kernels.
  """
  return nnx.Conv(channels_in, channels, kernel_size=(kernel, kernel), strides=stride,
                  padding=((kernel // 2, kernel // 2),) * 2, feature_group_count=groups, use_bias=False,
                  kernel_init=kernel_init, dtype=dtype, rngs=rngs)


def batch_norm(channels: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm over `channels` with `BATCHNORM_MOMENTUM`, computing in `dtype` (its statistics stay float32)."""
  return nnx.BatchNorm(channels, momentum=BATCHNORM_MOMENTUM, dtype=dtype, rngs=rngs)
