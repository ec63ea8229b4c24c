"""The registry's larger architectures (`shared.models.MODELS` names them), in Flax NNX.

Each is a module `Net(input_shape (H, W, C), num_classes, *, ..., dropout, dtype, rngs)` with `__call__(x, mask=None)
-> logits` and `features(x, mask=None) -> (logits, {name: feature})`, logits in float32 whatever the compute dtype;
BatchNorm layers use `BATCHNORM_MOMENTUM` and count only the rows `mask` (float [B], 0 for an epoch's padding rows)
keeps in their batch statistics (see `resnet.py`).
"""

import jax

# BatchNorm's running averages keep 0.9 of the old value per step (PyTorch's momentum 0.1, what the CIFAR and
# ImageNet recipes use; Flax's default, 0.99, lags far behind the weights in runs of a few thousand steps).
BATCHNORM_MOMENTUM = 0.9


def row_mask(mask: jax.Array | None) -> jax.Array | None:
  """bool [B, 1, 1, 1]: the rows BatchNorm counts, broadcastable to an image batch [B, H, W, C] (None: all)."""
  return None if mask is None else (mask > 0).reshape(-1, 1, 1, 1)
