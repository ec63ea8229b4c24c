"""Tiny `module:function` language-model teachers for the token-cache tests (`tests/test_token_cache.py`), and a
test-size language-model student (`tiny_lm`) for the tests that run `student-train fit/eval/sample` of an LM.

A peeking teacher is allowed to see the next token: at position j it puts a large logit on x[0, j + 1] when that
token is in the same document (x[1, j + 1] == x[1, j] != 0), and a flat distribution elsewhere. A cache whose
targets at position j do not peak on label[j] = token j + 1, or that peak across a document boundary, has an
off-by-one between positions and targets.
"""

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 16  # A tiny vocabulary: every test's tokens are in 0..VOCAB-1.


def peeking_logits(params, x):
  """[B, 2, L] float32 token rows -> [B, L, V] logits predicting each position's next token.

  Args:
    params: {"scale": [] the peak's logit, "bias": [V] added everywhere} (V the vocabulary).
    x: token ids x[:, 0] and segment ids x[:, 1], as float32 (the model casts).
  """
  tokens, segments = x[:, 0].astype(jnp.int32), x[:, 1].astype(jnp.int32)
  nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  same = jnp.concatenate([(segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] != 0),
                          jnp.zeros_like(segments[:, :1], bool)], axis=1)
  peak = jax.nn.one_hot(nxt, params["bias"].shape[-1]) * same[..., None]
  return params["scale"] * peak + params["bias"]


def peeking_teacher():
  """A sharp peeking teacher: `(apply_fn, params)`."""
  return peeking_logits, {"scale": jnp.float32(8.0), "bias": jnp.zeros(VOCAB, jnp.float32)}


def soft_peeking_teacher(vocab: int = VOCAB):
  """A softer peeking teacher of other parameters (a second ensemble member)."""
  bias = np.random.default_rng(1).normal(size=vocab).astype(np.float32)
  return peeking_logits, {"scale": jnp.float32(3.0), "bias": jnp.asarray(bias)}


def byte_teacher():
  """A sharp peeking teacher over the byte tokenizer's 256 tokens (`text:` data's default)."""
  return peeking_logits, {"scale": jnp.float32(8.0), "bias": jnp.zeros(256, jnp.float32)}


def soft_byte_teacher():
  """A softer peeking teacher over bytes, of other parameters."""
  return soft_peeking_teacher(256)


def token_rows(count: int, length: int, seed: int = 0) -> np.ndarray:
  """int32 [count, 2, length] packed rows of random documents: tokens in 1..VOCAB-1, segment ids 1, 2, ... per
  document piece, and padding (token 0, segment 0) at the end of some rows."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((count, 2, length), np.int32)
  for r in range(count):
    used = length - int(rng.integers(0, length // 3 + 1))  # Some rows end in padding.
    start, segment = 0, 1
    while start < used:
      size = min(int(rng.integers(1, length // 2 + 2)), used - start)
      rows[r, 0, start:start + size] = rng.integers(1, VOCAB, size)
      rows[r, 1, start:start + size] = segment
      start, segment = start + size, segment + 1
  return rows


def tiny_lm(input_shape, num_classes, rngs):
  """A `module:function` model factory: a test-size `TransformerLM` (width 16, 1 block, 2 heads, no dropout), the
  registry's `lm-*` architecture at a size a unit test trains in seconds."""
  from shared.architectures.transformer import TransformerLM
  return TransformerLM(input_shape, num_classes, width=16, depth=1, heads=2, dropout=0.0, dtype=jnp.float32,
                       rngs=rngs)
