"""`student-train sample`: a language model run's continuation of a prompt, greedy or at a temperature.

Each new token recomputes the whole window (no key-value cache): the last L tokens (L the run's sequence length)
as one segment at the row's start, the rest of the row padding, and the next token drawn from the logits of the
window's last position. One compiled forward pass of one row serves every step.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from shared.data.text import TextOptions
from shared.errors import StillroomError
from shared.runs import load_run_teacher
from shared.settings import at_least, check_values, non_negative_finite, seed_check, setting
from student_train.evaluate import run_text

SAMPLE = "sample"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
  """Settings of `student-train sample`."""

  COMMANDS: ClassVar[tuple[str, ...]] = (SAMPLE,)

  run: str = setting("", "the language model run", commands=(), given_by="RUN_DIR")
  prompt: str = setting("", "the text to continue", group="run", metavar="TEXT")
  max_new_tokens: int = setting(200, "tokens to append", group="run", check=at_least(0), metavar="N")
  temperature: float = setting(0.0, "0: greedy, the most probable token; else the softmax of logits / T is sampled",
                               group="run", check=non_negative_finite, metavar="T")
  seed: int = setting(0, "the draws' seed", group="run", check=seed_check)
  epoch: int | None = setting(None, "the checkpoint after this many epochs (default: the newest)", group="run",
                              check=at_least(0), metavar="N")


def continue_tokens(apply_fn, params, prompt: list[int], seq_len: int, max_new_tokens: int, temperature: float = 0.0,
                    seed: int = 0) -> list[int]:
  """The tokens a language model appends to `prompt`, one at a time.

  Args:
    apply_fn: `(params, x float32 [1, 2, L]) -> logits [1, L, V]` (a loaded run's, `shared.runs.Teacher.apply_fn`).
    params: its parameters.
    prompt: the prompt's token ids (a list or int array), at least one.
    seq_len: L, the rows the model takes; the model sees the last L tokens.
    max_new_tokens: how many tokens to append.
    temperature: 0 for greedy (the most probable token, the lowest id among equals), else the logits are divided by
      it and the token drawn from their softmax.
    seed: the draws' seed (`jax.random.key`; token i draws with `fold_in(key, i)`): equal seeds, equal samples.

  Returns:
    The `max_new_tokens` new token ids (the prompt not included).

  Raises:
    StillroomError: an empty prompt, a negative count or temperature.
  """
  prompt = [int(token) for token in prompt]
  if not prompt:
    raise StillroomError("the prompt is empty: give at least one character (token) to continue.")
  if max_new_tokens < 0:
    raise StillroomError(f"--max-new-tokens must be >= 0, got {max_new_tokens}.")
  if not temperature >= 0:
    raise StillroomError(f"--temperature must be >= 0 (0: greedy), got {temperature}.")

  @jax.jit
  def next_token(params, row, last, key):
    logits = apply_fn(params, row)[0, last].astype(jnp.float32)
    if temperature == 0:
      return jnp.argmax(logits)
    return jax.random.categorical(key, logits / temperature)

  tokens, key = list(prompt), jax.random.key(seed)
  for i in range(max_new_tokens):
    window = tokens[-seq_len:]
    row = np.zeros((1, 2, seq_len), np.float32)
    row[0, 0, :len(window)], row[0, 1, :len(window)] = window, 1
    tokens.append(int(next_token(params, row, len(window) - 1, jax.random.fold_in(key, i))))
  return tokens[len(prompt):]


def sample_run(config: SampleConfig) -> str:
  """A language model run's continuation of `config.prompt`, decoded with the tokenizer its data recorded.

  Args:
    config: the run (a language model trained on a `text:` dataset), prompt, tokens to append, temperature (0:
      greedy), seed and checkpoint.

  Returns:
    The continuation's text (the prompt not included).

  Raises:
    StillroomError: a setting out of range, a run that is not a language model of text, an empty prompt.
  """
  check_values(config)
  tokenizer = TextOptions.from_dict(run_text(config.run)).tokenizer()
  run = load_run_teacher(config.run, config.epoch, "--epoch")
  seq_len = run.record.model.input_shape[-1]
  normalization = run.normalization
  apply = run.apply_fn if normalization is None else lambda p, x: run.apply_fn(p, normalization.apply(x))
  new = continue_tokens(apply, run.params, tokenizer.encode(config.prompt), seq_len, config.max_new_tokens,
                        config.temperature, config.seed)
  return tokenizer.decode(new)
