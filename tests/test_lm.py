"""Transformer language models (`shared.architectures.transformer`, `lm-*` in the registry): causal and segment
masking, parameter counts, training on next tokens through the one step, the per-token eval figures against NumPy,
and `sample`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shared.errors import StillroomError
from shared.models import ModelSpec, build_model, check_input_shape, count_params, describe_models, feature_shapes

V, L = 16, 12  # A tiny vocabulary and row.


def lm_test_model(dtype="float32", seed=0, length=L, vocab=V) -> nnx.Module:
  """An lm-test-sized model: a `TransformerLM` of width 16, 2 blocks, 2 heads (the registry's sizes are too slow
  for unit tests)."""
  from shared.architectures.transformer import TransformerLM
  return TransformerLM((2, length), vocab, width=16, depth=2, heads=2, dropout=0.0, dtype=jnp.dtype(dtype),
                       rngs=nnx.Rngs(seed))


def rows(tokens, segments) -> np.ndarray:
  """float32 [B, 2, L] rows from token and segment ids [B, L]."""
  return np.stack([np.asarray(tokens), np.asarray(segments)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def model():
  m = lm_test_model()
  m.eval()
  return m


@pytest.mark.fast
def test_a_position_sees_only_earlier_positions_of_its_own_segment(model):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, (1, L))
  segments = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 0, 0]])
  base = np.asarray(model(rows(tokens, segments)))
  assert base.shape == (1, L, V) and base.dtype == np.float32 and np.isfinite(base).all()
  # A later token changes nothing before it.
  later = tokens.copy()
  later[0, 7] = (later[0, 7] + 1) % V
  changed = np.asarray(model(rows(later, segments)))
  np.testing.assert_array_equal(changed[0, :7], base[0, :7])
  assert not np.allclose(changed[0, 7:9], base[0, 7:9])  # It does reach its own and later positions of segment 2.
  # Another segment's tokens (segment 1, earlier in the row) change nothing in segment 2 or 3.
  other = tokens.copy()
  other[0, :5] = (other[0, :5] + 3) % V
  changed = np.asarray(model(rows(other, segments)))
  np.testing.assert_allclose(changed[0, 5:], base[0, 5:], rtol=0, atol=1e-6)
  # Segment 2 alone at the row's start scores as it does after segment 1 (rotary: only distances count).
  alone = np.asarray(model(rows(np.concatenate([tokens[:, 5:9], tokens[:, :8]], 1),
                                np.concatenate([np.full((1, 4), 2), np.zeros((1, 8), int)], 1))))
  np.testing.assert_allclose(alone[0, :4], base[0, 5:9], rtol=1e-5, atol=1e-5)


@pytest.mark.fast
def test_padding_attends_only_to_itself_and_its_logits_are_finite(model):
  segments = np.zeros((2, L), int)
  segments[1, :3] = 1
  out = np.asarray(model(rows(np.zeros((2, L), int), segments)))
  assert np.isfinite(out).all()
  # A padding position's logits depend on its own token alone: every all-padding position of token 0 is equal.
  np.testing.assert_allclose(out[0], np.broadcast_to(out[0, :1], out[0].shape), rtol=0, atol=1e-6)
  np.testing.assert_allclose(out[1, 3:], out[0, 3:], rtol=0, atol=1e-6)


@pytest.mark.fast
def test_features_are_each_blocks_output_and_bfloat16_gives_float32_logits():
  spec = ModelSpec(name="lm-tiny", input_shape=(2, 8), num_classes=V)
  assert feature_shapes(spec) == {f"block{k}": [8, 128] for k in range(1, 6)}
  model = lm_test_model("bfloat16")
  x = rows(np.arange(L)[None] % V, np.ones((1, L)))
  logits, named = model.features(x)
  assert logits.dtype == jnp.float32 and logits.shape == (1, L, V)
  assert set(named) == {"block1", "block2"} and named["block2"].shape == (1, L, 16)
  reference = lm_test_model("float32")
  np.testing.assert_allclose(np.asarray(logits), np.asarray(reference(x)), atol=0.05)


@pytest.mark.fast
def test_parameter_counts_and_the_registry_refuses_other_inputs():
  params = {row["name"]: row["params"] for row in describe_models((2, 256), 256)}
  for name, width, depth in (("lm-tiny", 128, 5), ("lm-small", 320, 8)):
    assert params[name] == 2 * 256 * width + depth * (12 * width ** 2 + 2 * width) + width
  assert 0.9e6 < params["lm-tiny"] < 1.1e6 and 9e6 < params["lm-small"] < 11e6
  assert count_params(lm_test_model()) == 2 * V * 16 + 2 * (12 * 16 ** 2 + 2 * 16) + 16
  images = {row["name"]: row["params"] for row in describe_models((8, 8, 1), 10)}
  assert images["lm-tiny"] is None and images["cnn-small"] is not None
  with pytest.raises(StillroomError, match=r"^model 'lm-tiny' takes token rows of shape \(2, L\) .*got \(8, 8, 1\)"):
    build_model(ModelSpec(name="lm-tiny", input_shape=(8, 8, 1), num_classes=10))
  graphdef, state = nnx.split(lm_test_model())
  out = check_input_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, (2, L), "lm")
  assert out.shape == (2, L, V)
  with pytest.raises(StillroomError, match=r"must return logits of shape \[batch, positions, vocabulary\]"):
    check_input_shape(lambda s, x: nnx.merge(graphdef, s)(x)[:, 0], state, (2, L), "lm")
