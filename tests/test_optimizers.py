"""Optimizers and schedules by name (`--optimizer`, `--schedule`): each is optax's own, they train and sweep, and
run dirs recorded before these settings existed still resume."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest
from shared import storage
from shared.errors import StillroomError
from student_train.config import OPTIMIZERS, SCHEDULES, FitConfig
from student_train.sweep import run_sweep
from student_train.train import fit, make_optimizer

STEPS_PER_EPOCH, EPOCHS, FINETUNE = 4, 3, 1


def _optax_directly(optimizer: str, schedule: str) -> optax.GradientTransformation:
  """The reference: optax called by hand with the settings of `_config`."""
  first = {"constant": optax.constant_schedule(0.1), "cosine": optax.cosine_decay_schedule(0.1, 12),
           "warmup-cosine": optax.warmup_cosine_decay_schedule(0.0, 0.1, 6, 12)}[schedule]
  lr = optax.join_schedules([first, optax.cosine_decay_schedule(0.01, 4)], [12])
  return {
      "adamw": optax.adamw(lr, weight_decay=0.01),
      "adam": optax.adam(lr),
      "sgd": optax.chain(optax.add_decayed_weights(0.01), optax.sgd(lr)),
      "momentum": optax.chain(optax.add_decayed_weights(0.01), optax.sgd(lr, momentum=0.8)),
      "nesterov": optax.chain(optax.add_decayed_weights(0.01), optax.sgd(lr, momentum=0.8, nesterov=True)),
      "rmsprop": optax.rmsprop(lr, momentum=0.8),
      "lamb": optax.lamb(lr, weight_decay=0.01),
      "lion": optax.lion(lr, weight_decay=0.01),
  }[optimizer]


def _config(optimizer: str, schedule: str) -> FitConfig:
  return FitConfig(optimizer=optimizer, schedule=schedule, lr=0.1, finetune_lr=0.01, weight_decay=0.01, momentum=0.8,
                   epochs=EPOCHS, finetune_epochs=FINETUNE, warmup_epochs=1.5)


@pytest.mark.fast
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_and_schedule_is_optax_called_directly(optimizer, schedule):
  """Every step of a run (into fine-tuning) moves the parameters as optax called by hand does."""
  params = {"w": jnp.arange(6.0).reshape(2, 3) / 6, "b": jnp.ones(3)}
  grad = jax.grad(lambda p: jnp.sum(jnp.sin(p["w"] @ p["b"])) + jnp.sum(p["b"] ** 2))
  trained = []
  for tx in (make_optimizer(_config(optimizer, schedule), STEPS_PER_EPOCH), _optax_directly(optimizer, schedule)):
    p, state = params, tx.init(params)
    for _ in range((EPOCHS + FINETUNE) * STEPS_PER_EPOCH):
      updates, state = tx.update(grad(p), state, p)
      p = optax.apply_updates(p, updates)
    trained.append(p)
  assert not np.allclose(trained[0]["w"], params["w"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *trained)


def test_other_optimizers_train_and_sweep(tmp_path, tmp_path_factory, data_dir, teachers):
  options = {"model": "mlp-small", "batch_size": 128, "progress": False, "data_dir": data_dir, "workers": 0}
  line = fit(FitConfig(dataset="digits", out=str(tmp_path / "run"), optimizer="nesterov", schedule="warmup-cosine",
                       lr=0.05, epochs=3, **options), log_epochs=False)
  assert np.isfinite(line["loss"]) and line["eval_accuracy"] > 0.5
  cache = conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2])
  runs = run_sweep(cache, "optimizer=adamw,lamb;schedule=constant,cosine", str(tmp_path / "sweep"),
                   base=FitConfig(epochs=1, **options))
  records = [storage.read_json(os.path.join(run, "config.json"))["resolved"]["config"] for run in runs]
  assert sorted((r["optimizer"], r["schedule"]) for r in records) == [
      ("adamw", "constant"), ("adamw", "cosine"), ("lamb", "constant"), ("lamb", "cosine")]


def test_a_run_dir_recorded_before_these_settings_resumes(tmp_path, data_dir):
  """A run dir of stillroom <= 0.3 has no optimizer settings in its record: it ran with the defaults, which the same
  command still has, so it is the same run (here: finished); another optimizer is another run."""
  config = FitConfig(dataset="digits", data_dir=data_dir, model="mlp-tiny", epochs=1, out=str(tmp_path / "run"),
                     progress=False, workers=0)
  first = fit(config, log_epochs=False)
  path = tmp_path / "run" / "config.json"
  record = json.loads(path.read_text())
  for name in ("optimizer", "schedule", "warmup_epochs", "momentum"):
    del record["resolved"]["config"][name]
  path.write_text(json.dumps(record))
  assert fit(config, log_epochs=False)["loss"] == first["loss"]
  with pytest.raises(StillroomError, match="config.optimizer: None \\(run dir\\) vs sgd \\(command\\)"):
    fit(dataclasses.replace(config, optimizer="sgd"), log_epochs=False)
