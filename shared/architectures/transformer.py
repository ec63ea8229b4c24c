"""Decoder-only transformer language models over packed token rows (see docs/language-models.md).

A row is float32 [2, L] as a text transfer set stores it: x[0] the token ids, x[1] the segment ids (1, 2, ... per
document piece; 0 for padding). Position j attends to positions k <= j of its own segment; a padding position
attends only to itself, so every softmax has at least one term and nothing is NaN. Rotary position embeddings
(Su et al. 2021) make attention depend only on the distance j - k, so a document piece scores the same wherever in
the row the packing put it.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from shared.errors import StillroomError

# GPT-2's initialisation: N(0, 0.02²) for embeddings and linear maps.
_INIT = nnx.initializers.normal(0.02)
ROTARY_BASE = 10000.0
_MASKED = -1e30  # A masked score: exp underflows to 0 in float32; the diagonal is never masked.


def rotary(x: jax.Array) -> jax.Array:
  """Rotary position embedding of queries or keys [B, L, heads, d] (d even) at positions 0..L-1: each pair of
  channels (i, i + d/2) rotated by the angle position · base^(-2i/d). Computed in float32, returned in x's dtype."""
  length, dim = x.shape[1], x.shape[-1]
  frequencies = ROTARY_BASE ** (-jnp.arange(0, dim // 2, dtype=jnp.float32) * 2 / dim)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * frequencies[None, :]  # [L, d/2]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1).astype(x.dtype)


def attention_mask(segments: jax.Array) -> jax.Array:
  """bool [B, 1, L, L]: whether query position q may attend to key position k: k <= q within q's segment
  (segment ids equal and not 0), or k == q (a padding position, segment 0, attends only to itself)."""
  length = segments.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] != 0)
  return ((same & causal) | jnp.eye(length, dtype=bool))[:, None]


class CausalAttention(nnx.Module):
  """Multi-head self-attention without biases, rotary queries and keys, masked by `attention_mask`; the scores and
  their softmax are computed in float32 whatever the compute dtype."""

  def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
    self.qkv = nnx.Linear(width, 3 * width, use_bias=False, kernel_init=_INIT, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(width, width, use_bias=False, kernel_init=_INIT, dtype=dtype, rngs=rngs)
    self.heads = heads

  def __call__(self, x, mask):
    """[B, L, D] to [B, L, D]; mask bool [B, 1, L, L]."""
    batch, length, width = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(batch, length, 3, self.heads, width // self.heads), 3, axis=2)
    q, k, v = rotary(q[:, :, 0]), rotary(k[:, :, 0]), v[:, :, 0]  # [B, L, heads, D / heads]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1).astype(v.dtype)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width))


class DecoderBlock(nnx.Module):
  """A pre-RMSNorm block: x + attention(norm(x)), then x + MLP(norm(x)), the MLP two linear maps (no biases) with
  exact (erf) GELU between them."""

  def __init__(self, width: int, heads: int, mlp_ratio: int, *, dtype, rngs: nnx.Rngs):
    self.norm1 = nnx.RMSNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.attention = CausalAttention(width, heads, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.RMSNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_ratio * width, use_bias=False, kernel_init=_INIT, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * width, width, use_bias=False, kernel_init=_INIT, dtype=dtype, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attention(self.norm1(x), mask)
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x)), approximate=False))


def is_token_rows(input_shape) -> bool:
  """Whether one example's shape is a packed row of tokens, (2, L) with L >= 1 (token ids and segment ids: a text
  transfer set's examples, `shared.data.text`), whose models return logits per position [L, C]."""
  shape = tuple(input_shape)
  return len(shape) == 2 and shape[0] == 2 and shape[1] >= 1


def token_rows_length(input_shape) -> int:
  """L of token rows (2, L) (`is_token_rows`).

  Raises:
    StillroomError: another input shape.
  """
  shape = tuple(input_shape)
  if not is_token_rows(shape):
    raise StillroomError(f"takes token rows of shape (2, L) (token ids and segment ids, a text: dataset); got "
                         f"{shape}.")
  return shape[1]


class TransformerLM(nnx.Module):
  """A decoder-only language model: token embedding, `depth` pre-RMSNorm blocks with rotary causal attention masked
  by segment, a final RMSNorm, dropout, and an untied head to the vocabulary. Parameters: V·D (embedding) +
  depth·(12·D² + 2·D) + D + D·V (head), for mlp_ratio 4.

  Args:
    input_shape: (2, L): token ids and segment ids of rows of L positions.
    vocab_size: V, the head's outputs (a text transfer set's num_classes).
    width: D.
    depth: the number of blocks.
    heads: attention heads (each of D / heads channels, an even number).
    mlp_ratio: the MLP's hidden width over D.
    dropout: the rate of the dropout on the final hidden states before the head.
    dtype: the compute dtype (parameters stay float32; attention's softmax and the logits are float32).
    rngs: initialisation and dropout.

  Raises:
    StillroomError: an input shape that is not (2, L).
  """

  def __init__(self, input_shape, vocab_size: int, *, width: int, depth: int, heads: int, mlp_ratio: int = 4,
               dropout: float, dtype, rngs: nnx.Rngs):
    token_rows_length(input_shape)
    if width % heads or (width // heads) % 2:
      raise ValueError(f"width {width} must split into {heads} heads of an even size")
    self.embedding = nnx.Embed(vocab_size, width, embedding_init=_INIT, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([DecoderBlock(width, heads, mlp_ratio, dtype=dtype, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.RMSNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(width, vocab_size, use_bias=False, kernel_init=_INIT, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.features(x)[0]

  def features(self, x) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits float32 [B, L, V] (position j's predict token j + 1) of rows x float32 [B, 2, L], and the named
    features: `block1`, ..., `blockN`, each block's output, [B, L, D]."""
    tokens, segments = x[:, 0].astype(jnp.int32), x[:, 1].astype(jnp.int32)  # Exact below 2**24.
    mask = attention_mask(segments)
    h = self.embedding(tokens)
    named = {}
    for index, block in enumerate(self.blocks):
      h = block(h, mask)
      named[f"block{index + 1}"] = h
    return self.head(self.dropout(self.norm(h))).astype(jnp.float32), named
