"""Vision Transformers (Dosovitskiy et al. 2021) in the sizes DeiT (Touvron et al. 2021) trains from scratch."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from shared.errors import StillroomError

# DeiT's initialisation: linear maps, the class token and the position embeddings from N(0, 0.02²) truncated at two
# standard deviations, biases zero, LayerNorm scale one; the patch embedding keeps Flax's default (LeCun normal).
_INIT = nnx.initializers.truncated_normal(0.02)


class Attention(nnx.Module):
  """Multi-head self-attention with the queries, keys and values from one linear map (timm's `qkv`) and an output
  projection. The scores and their softmax are computed in float32 whatever the compute dtype."""

  def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
    self.qkv = nnx.Linear(width, 3 * width, kernel_init=_INIT, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(width, width, kernel_init=_INIT, dtype=dtype, rngs=rngs)
    self.heads = heads

  def __call__(self, x):
    """[B, N, D] tokens to [B, N, D]."""
    batch, tokens, width = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, N, heads, D / heads]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, width))


class EncoderBlock(nnx.Module):
  """A pre-LayerNorm transformer block: x + attention(norm(x)), then x + MLP(norm(x)), the MLP two linear maps
  with exact (erf) GELU between them."""

  def __init__(self, width: int, heads: int, mlp_ratio: int, *, dtype, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.attention = Attention(width, heads, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_ratio * width, kernel_init=_INIT, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * width, width, kernel_init=_INIT, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = x + self.attention(self.norm1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x)), approximate=False))


class VisionTransformer(nnx.Module):
  """ViT (Dosovitskiy et al. 2021) as DeiT and timm build it: non-overlapping `patch` x `patch` patches embedded by
  a strided convolution, a class token, learned position embeddings (one per patch of this input size and one for
  the class token), `depth` pre-LayerNorm encoder blocks, a final LayerNorm, and the head on the class token
  (after dropout). LayerNorm's epsilon is 1e-6; layers carry biases.

  Args:
    input_shape: (H, W, C), each side a multiple of `patch`.
    num_classes: the head's outputs.
    patch: the patches' side in pixels.
    width: the token width D.
    depth: the number of encoder blocks.
    heads: attention heads (each of D / heads channels).
    mlp_ratio: the MLP's hidden width over D.
    dropout: the rate of the dropout before the head.
    dtype: the compute dtype (parameters stay float32; attention's softmax runs in float32).
    rngs: initialisation and dropout.

  Raises:
    StillroomError: an image side that is not a multiple of `patch`.
  """

  def __init__(self, input_shape, num_classes, *, patch: int, width: int, depth: int, heads: int, mlp_ratio: int,
               dropout: float, dtype, rngs: nnx.Rngs):
    height, image_width, channels = input_shape
    if height % patch or image_width % patch:
      raise StillroomError(f"cuts images into {patch}x{patch} patches: image sides must be multiples of {patch}, got "
                           f"{height}x{image_width}; render views at such a size, e.g. --image-size {2 * patch} or "
                           f"{14 * patch}.")
    self.grid = (height // patch, image_width // patch)
    self.patch_embedding = nnx.Conv(channels, width, kernel_size=(patch, patch), strides=patch, padding="VALID",
                                    dtype=dtype, rngs=rngs)
    self.class_token = nnx.Param(_INIT(rngs.params(), (1, 1, width)))
    self.position_embedding = nnx.Param(_INIT(rngs.params(), (1, math.prod(self.grid) + 1, width)))
    self.blocks = nnx.List([EncoderBlock(width, heads, mlp_ratio, dtype=dtype, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, kernel_init=_INIT, dtype=dtype, rngs=rngs)
    # The blocks whose outputs are named features: each third of the depth (blocks 4, 8 and 12 of 12).
    self.feature_blocks = tuple(depth * k // 3 for k in (1, 2, 3))

  def __call__(self, x):
    return self.features(x)[0]

  def features(self, x) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [B, num_classes] and the named features: `block4`, `block8`, `block12` (for depth 12; each third of
    the depth), the patch tokens of that block's output laid out on the patch grid, [B, H/patch, W/patch, D]
    (the class token left out, so that a CNN's feature map of the same grid can be compared with them); `pool`,
    the class token after the final LayerNorm (what the head sees, before dropout), [B, D]."""
    x = self.patch_embedding(x)
    batch = x.shape[0]
    x = x.reshape(batch, -1, x.shape[-1])
    class_token = jnp.broadcast_to(self.class_token[...], (batch, 1, x.shape[-1])).astype(x.dtype)
    x = jnp.concatenate([class_token, x], axis=1) + self.position_embedding[...].astype(x.dtype)
    named = {}
    for index, block in enumerate(self.blocks):
      x = block(x)
      if index + 1 in self.feature_blocks:
        named[f"block{index + 1}"] = x[:, 1:].reshape(batch, *self.grid, x.shape[-1])
    x = self.norm(x)[:, 0]
    named["pool"] = x
    return self.head(self.dropout(x)).astype(jnp.float32), named
