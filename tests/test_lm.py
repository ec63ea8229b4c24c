"""Transformer language models (`shared.architectures.transformer`, `lm-*` in the registry): causal and segment
masking, parameter counts, training on next tokens through the one step, the per-token eval figures against NumPy,
and `sample`."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shared.data.text import next_token_labels
from shared.errors import StillroomError
from shared.models import ModelSpec, build_model, check_input_shape, count_params, feature_shapes

V, L = 16, 12  # A tiny vocabulary and row.


def lm_test_model(dtype="float32", seed=0, length=L, vocab=V, depth=2) -> nnx.Module:
  """An lm-test-sized model: a `TransformerLM` of width 16, 2 blocks, 2 heads (the registry's sizes are too slow
  for unit tests)."""
  from shared.architectures.transformer import TransformerLM
  return TransformerLM((2, length), vocab, width=16, depth=depth, heads=2, dropout=0.0, dtype=jnp.dtype(dtype),
                       rngs=nnx.Rngs(seed))


def rows(tokens, segments) -> np.ndarray:
  """float32 [B, 2, L] rows from token and segment ids [B, L]."""
  return np.stack([np.asarray(tokens), np.asarray(segments)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def model():
  """The test model's forward pass, jitted (eager, op by op, it is several times slower)."""
  graphdef, state = nnx.split(lm_test_model())
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return lambda x: forward(state, x)


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
  segments, tokens = np.zeros((2, L), int), np.zeros((2, L), int)
  segments[1, :3], tokens[1, :3] = 1, (5, 7, 9)  # Real tokens before the padding: a mask letting padding see them
  out = np.asarray(model(rows(tokens, segments)))  # (causal alone) fails the second check.
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
  params = {name: count_params(nnx.eval_shape(lambda n=name: build_model(ModelSpec(name=n, input_shape=(2, 256),
                                                                                    num_classes=256))))
            for name in ("lm-tiny", "lm-small")}
  for name, width, depth in (("lm-tiny", 128, 5), ("lm-small", 320, 8)):
    assert params[name] == 2 * 256 * width + depth * (12 * width ** 2 + 2 * width) + width
  assert 0.9e6 < params["lm-tiny"] < 1.1e6 and 9e6 < params["lm-small"] < 11e6
  assert count_params(lm_test_model()) == 2 * V * 16 + 2 * (12 * 16 ** 2 + 2 * 16) + 16
  with pytest.raises(StillroomError, match=r"^model 'lm-tiny' takes token rows of shape \(2, L\) .*got \(8, 8, 1\)"):
    build_model(ModelSpec(name="lm-tiny", input_shape=(8, 8, 1), num_classes=10))
  graphdef, state = nnx.split(lm_test_model())
  out = check_input_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, (2, L), "lm")
  assert out.shape == (2, L, V)
  with pytest.raises(StillroomError, match=r"must return logits of shape \[batch, positions, vocabulary\]"):
    check_input_shape(lambda s, x: nnx.merge(graphdef, s)(x)[:, 0], state, (2, L), "lm")


def pattern_rows(count: int, length: int = L, period: int = 3, seed: int = 0) -> np.ndarray:
  """Rows of a repeating pattern 0, 1, .., period-1 (two documents a row, random phases and split; some padding)."""
  rng = np.random.default_rng(seed)
  x = np.zeros((count, 2, length), np.float32)
  for r in range(count):
    split, end = rng.integers(2, length - 3), length - rng.integers(0, 3)
    x[r, 0, :end] = (np.arange(end) + rng.integers(0, period)) % period
    x[r, 1, :split], x[r, 1, split:end] = 1, 2
  return x


@pytest.mark.fast
def test_eval_figures_equal_numpys():
  from student_train.evaluate import concatenate_positions, language_model_metrics, predicted_positions

  rng = np.random.default_rng(1)
  log_probs = np.asarray(jax.nn.log_softmax(rng.normal(size=(5, L, V)) * 2, -1))
  x = pattern_rows(5, seed=9)
  labels = next_token_labels(x)
  teacher = rng.integers(0, V, (5, L))
  byte_lengths = rng.integers(1, 4, V)
  parts = concatenate_positions([predicted_positions(log_probs[:2], labels[:2], teacher[:2]),
                                 predicted_positions(log_probs[2:], labels[2:], teacher[2:])])
  got = language_model_metrics(parts, byte_lengths)
  # The reference: loops over positions.
  nll, correct, confidence, agree, nbytes = [], [], [], [], 0
  for r in range(5):
    for j in range(L):
      if labels[r, j] < 0:
        continue
      p = np.exp(log_probs[r, j].astype(np.float64))
      nll.append(-math.log(p[labels[r, j]]))
      correct.append(p.argmax() == labels[r, j])
      confidence.append(p.max())
      agree.append(p.argmax() == teacher[r, j])
      nbytes += byte_lengths[labels[r, j]]
  nll, correct, confidence = np.array(nll), np.array(correct), np.array(confidence)
  ece = 0.0
  for b in range(15):
    inside = (np.floor(confidence * 15).clip(0, 14) == b)
    if inside.any():
      ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
  assert got["tokens"] == len(nll) == (labels >= 0).sum()
  np.testing.assert_allclose(got["perplexity"], np.exp(nll.mean()), rtol=1e-12)
  np.testing.assert_allclose(got["bits_per_byte"], nll.sum() / math.log(2) / nbytes, rtol=1e-12)
  np.testing.assert_allclose(got["accuracy"], correct.mean(), rtol=1e-12)
  np.testing.assert_allclose(got["teacher_agreement"], np.mean(agree), rtol=1e-12)
  np.testing.assert_allclose(got["ece"], ece, rtol=1e-9)


@pytest.mark.fast
def test_sample_refuses_an_empty_prompt_and_a_negative_temperature():
  from student_train.sample import continue_tokens
  with pytest.raises(StillroomError, match="the prompt is empty"):
    continue_tokens(None, None, [], L, 3)
  with pytest.raises(StillroomError, match="--temperature must be >= 0"):
    continue_tokens(None, None, [1], L, 3, temperature=-1.0)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  """A run of a test-size LM (`lm_teachers:tiny_lm`, the registry's `TransformerLM` of width 16 and one block: the
  `lm-*` models themselves are only built, by the parameter-count and features tests) trained by `student-train fit`
  on "abc" repeated (rows of 16 bytes), with a held-out text whose
  documents (a .jsonl) are of several lengths and scripts, so that rows mix segments, padding and multi-byte
  characters."""
  from student_train.cli import main as student_main
  root = tmp_path_factory.mktemp("lm")
  (root / "abc.txt").write_text("abc" * 400)
  (root / "held.jsonl").write_text("\n".join(
      '{"text": "%s"}' % text for text in ("abcabcab", "cabcabcabcabca", "bcé", "abc" * 9, "a", "ça abc")) + "\n")
  run = root / "run"
  student_main(["fit", "--model", "lm_teachers:tiny_lm", "--dataset", f"text:{root / 'abc.txt'}", "--seq-len", "16",
                "--epochs", "6", "--batch-size", "16", "--lr", "3e-2", "--eval-dataset", f"text:{root / 'held.jsonl'}",
                "--eval-split", "train", "--out", str(run), "--no-progress"])
  return root


def test_fit_eval_and_sample_of_an_lm_run(lm_run, capsys):
  import json
  import re

  from conftest import run_cli
  from shared.data import open_transfer_set
  from shared.data.text import TextOptions
  from shared.runs import load_run_teacher
  from student_train.cli import main as student_main

  run, held = str(lm_run / "run"), f"text:{lm_run / 'held.jsonl'}"
  lines = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
  assert "tokens" in lines[-1] and "rows" not in lines[-1] and lines[-1]["train_accuracy"] > 0.9
  assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]  # It learns the repeating text.
  # The step counts tokens: the predicting positions of the real rows (the epoch's last batch is padded with rows
  # that count none).
  train = open_transfer_set(f"text:{lm_run / 'abc.txt'}", text=TextOptions(seq_len=16))
  assert len(train) % 16 and all(line["tokens"] == (train.read(np.arange(len(train)))[1] >= 0).sum() for line in lines)
  code, out, err = run_cli(student_main, ["eval", run, run, "--dataset", held, "--teacher", run, "--json"], capsys)
  assert code == 0, err
  got = json.loads(out)
  assert len(got["members"]) == 2  # An ensemble of a run with itself: the run's figures.
  for name in ("perplexity", "bits_per_byte", "accuracy", "ece", "tokens", "teacher_agreement"):
    assert got[name] == pytest.approx(got["members"][0][name], rel=1e-5)
  # The reference: the run's logits over the held-out rows (packed as the run recorded), reduced by NumPy loops.
  rows = open_transfer_set(held, text=TextOptions(seq_len=16))
  x, labels = rows.read(np.arange(len(rows)))
  teacher = load_run_teacher(run)
  log_probs = np.asarray(jax.nn.log_softmax(teacher.apply_fn(teacher.params, x.astype(np.float32)), -1), np.float64)
  keep = labels >= 0
  target = labels[keep]
  nll = -log_probs[keep][np.arange(keep.sum()), target]
  utf8 = np.array([len(bytes([t])) for t in target])  # Bytes: one per token.
  # Each document piece of n tokens predicts n - 1 (pieces split at row ends lose one each).
  assert got["tokens"] == keep.sum() > 40
  np.testing.assert_allclose(got["perplexity"], np.exp(nll.mean()), rtol=1e-5)
  np.testing.assert_allclose(got["bits_per_byte"], nll.sum() / math.log(2) / utf8.sum(), rtol=1e-5)
  np.testing.assert_allclose(got["accuracy"], (log_probs[keep].argmax(-1) == target).mean())
  assert got["teacher_agreement"] == 1.0 and got["split"] == "train"
  assert lines[-1]["eval_perplexity"] == pytest.approx(got["perplexity"], rel=1e-5)
  # Rows of 8 (--seq-len overrides the run's 16): more row ends, fewer predicted tokens; the table.
  code, out, _ = run_cli(student_main, ["eval", run, "--dataset", held, "--seq-len", "8"], capsys)
  assert code == 0 and "perplexity" in out and "bits/byte" in out
  assert int(re.search(r"\(([\d,]+) tokens\)", out).group(1)) < got["tokens"]
  # Greedy: deterministic, and the pattern continued; at a temperature, the seed decides.
  code, out, _ = run_cli(student_main, ["sample", run, "--prompt", "abcab", "--max-new-tokens", "24"], capsys)
  assert code == 0 and out == "cab" * 8 + "\n"
  draws = [run_cli(student_main, ["sample", run, "--prompt", "ab", "--max-new-tokens", "30", "--temperature", "3",
                                  "--seed", seed], capsys)[1] for seed in ("1", "1", "2")]
  assert draws[0] == draws[1] != draws[2]


@pytest.mark.fast
def test_dropout_drops_only_the_final_hidden_states_in_training():
  from shared.architectures.transformer import TransformerLM
  model = TransformerLM((2, L), V, width=16, depth=1, heads=2, dropout=0.5, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = rows(np.arange(L)[None] % V, np.ones((1, L)))
  trained = [model.features(x) for _ in range(2)]
  model.eval()
  evaluated = [model.features(x) for _ in range(2)]
  np.testing.assert_array_equal(evaluated[0][0], evaluated[1][0])  # Eval mode: deterministic.
  assert not np.allclose(trained[0][0], trained[1][0])  # Training: each call drops other units.
  for _, named in trained:  # The blocks (attention, MLP) are never dropped.
    np.testing.assert_array_equal(named["block1"], evaluated[0][1]["block1"])


@pytest.mark.fast
def test_runs_whose_tokenizer_json_lies_elsewhere_are_compared_by_content_not_path(tmp_path, monkeypatch):
  """Two runs trained with the same tokenizer.json at two paths (and `--tokenizer` a third copy) tokenize alike: eval
  goes on to the data (here absent); a file of other content is refused."""
  import shutil
  from shared.data.text import TextOptions
  from student_train import evaluate
  tokenizers = pytest.importorskip("tokenizers")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
  paths = [str(tmp_path / f"{name}.json") for name in ("first", "second", "third")]
  tokenizer.save(paths[0])
  for path in paths[1:]:
    shutil.copy(paths[0], path)
  records = {f"run{k}": TextOptions(seq_len=8, tokenizer_name=path).to_dict() for k, path in enumerate(paths[:2])}
  assert records["run0"]["tokenizer"] != records["run1"]["tokenizer"]  # Their paths differ.
  monkeypatch.setattr(evaluate, "run_text", lambda run_dir: records[run_dir])
  config = evaluate.EvalConfig(runs=("run0",), dataset=f"text:{tmp_path / 'absent'}", tokenizer=paths[2])
  for runs in (("run0",), ("run0", "run1")):
    with pytest.raises(StillroomError, match="no such file or directory"):  # Past the tokenizers' checks.
      evaluate.evaluate_language_models(dataclasses.replace(config, runs=runs))
  other = str(tmp_path / "other.json")
  tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "c": 1, "[UNK]": 2}, unk_token="[UNK]")).save(other)
  with pytest.raises(StillroomError, match="leave --tokenizer out"):
    evaluate.evaluate_language_models(dataclasses.replace(config, tokenizer=other))
