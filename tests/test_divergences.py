"""Reverse KL and the generalised Jensen-Shannon divergence (`student_train.terms.divergences`): values and gradients
against NumPy in float64, padded rows, the β ends, β traced per student, the `--loss` syntax and its errors, and
`fit` and a sweep training with them from a cache."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import digits_cache, numeric_grad, numpy_log_softmax

from shared.errors import StillroomError
from shared.losses import masked_mean, soft_kl
from student_train import train as train_lib
from student_train.config import FitConfig, validate_config
from student_train.run_dir import read_final
from student_train.sweep import run_sweep
from student_train.terms import LOSS_HELP, LOSS_NAMES, Teacher, distillation_loss, loss_settings, parse_loss
from student_train.terms.divergences import generalized_jsd, reverse_kl
from student_train.train import fit

RNG = np.random.default_rng(11)
S = RNG.normal(size=(6, 7)) * 3
Z = RNG.normal(size=(6, 7)) * 3


def np_reverse_kl(s, z, t):
  """T²·KL(q || p) in float64."""
  q, p = numpy_log_softmax(s / t), numpy_log_softmax(z / t)
  return t ** 2 * (np.exp(q) * (q - p)).sum(-1)


def np_jsd(s, z, beta, t):
  """T²·JSD_β as TRL's `generalized_jsd_loss` defines it, in float64: m = β·p + (1 − β)·q,
  β·KL(p || m) + (1 − β)·KL(q || m); KL(p || q) at β = 0 and KL(q || p) at β = 1."""
  q, p = numpy_log_softmax(s / t), numpy_log_softmax(z / t)
  kl = lambda a, b: (np.exp(a) * (a - b)).sum(-1)  # noqa: E731
  if beta == 0:
    return t ** 2 * kl(p, q)
  if beta == 1:
    return t ** 2 * kl(q, p)
  m = np.log(beta * np.exp(p) + (1 - beta) * np.exp(q))
  return t ** 2 * (beta * kl(p, m) + (1 - beta) * kl(q, m))


def _target(t):
  return jnp.asarray(numpy_log_softmax(Z / t), jnp.float32)


@pytest.mark.fast
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_reverse_kl_value_and_gradient(t):
  np.testing.assert_allclose(reverse_kl(jnp.asarray(S, jnp.float32), _target(t), t), np_reverse_kl(S, Z, t),
                             rtol=1e-4, atol=1e-5)
  grad = jax.grad(lambda s: reverse_kl(s, _target(t), t).sum())(jnp.asarray(S, jnp.float32))
  np.testing.assert_allclose(grad, numeric_grad(lambda s: np_reverse_kl(s, Z, t).sum(), S), rtol=1e-3, atol=1e-5)
  # And the closed form: T · q_j (log q_j − log p_j − KL(q || p)).
  q, p = numpy_log_softmax(S / t), numpy_log_softmax(Z / t)
  analytic = t * np.exp(q) * (q - p - (np.exp(q) * (q - p)).sum(-1, keepdims=True))
  np.testing.assert_allclose(grad, analytic, rtol=1e-3, atol=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_jsd_value_and_gradient(beta, t):
  got = generalized_jsd(jnp.asarray(S, jnp.float32), _target(t), beta, t)
  np.testing.assert_allclose(got, np_jsd(S, Z, beta, t), rtol=1e-4, atol=1e-5)
  grad = jax.grad(lambda s: generalized_jsd(s, _target(t), beta, t).sum())(jnp.asarray(S, jnp.float32))
  np.testing.assert_allclose(grad, numeric_grad(lambda s: np_jsd(s, Z, beta, t).sum(), S), rtol=1e-3, atol=1e-5)
  assert np.all(np.asarray(got) >= -1e-6)
  if 0 < beta < 1:  # Bounded by the binary entropy of β (T² scaled).
    assert np.all(np.asarray(got) <= t ** 2 * -(beta * np.log(beta) + (1 - beta) * np.log(1 - beta)) + 1e-5)


@pytest.mark.fast
def test_jsd_ends_are_the_forward_and_reverse_kl_and_the_limits_of_the_scaled_divergence():
  s, t = jnp.asarray(S, jnp.float32), 2.0
  forward, reverse = soft_kl(s, _target(t), t), reverse_kl(s, _target(t), t)
  np.testing.assert_allclose(generalized_jsd(s, _target(t), 0.0, t), forward, rtol=1e-6)
  np.testing.assert_allclose(generalized_jsd(s, _target(t), 1.0, t), reverse, rtol=1e-6)
  # JSD_β / β → KL(p || q) as β → 0 and JSD_β / (1 − β) → KL(q || p) as β → 1 (float64 reference).
  for small in (1e-3, 1e-4):
    np.testing.assert_allclose(np_jsd(S, Z, small, t) / small, np_reverse_kl(Z, S, t), rtol=20 * small)
    np.testing.assert_allclose(np_jsd(S, Z, 1 - small, t) / small, np_reverse_kl(S, Z, t), rtol=20 * small)
  # Zero, with a zero gradient, when the student is the teacher, for every β.
  for beta in (0.0, 0.3, 1.0):
    same = jnp.asarray(numpy_log_softmax(S / t), jnp.float32)
    np.testing.assert_allclose(generalized_jsd(s, same, beta, t), 0.0, atol=1e-5)
    np.testing.assert_allclose(jax.grad(lambda x: generalized_jsd(x, same, beta, t).sum())(s), 0.0, atol=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("loss", ["reverse-kl", "jsd:0.3"])
def test_padded_rows_are_masked(loss):
  """The step's masked mean of the term: padded rows (garbage logits and targets) change neither the value nor the
  real rows' gradients, and get none of their own."""
  t = 2.0
  index, settings = parse_loss(loss)
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
  target = np.asarray(_target(t))
  noisy_s, noisy_target = S.copy(), target.copy()
  noisy_s[4:] = 1e3 * RNG.normal(size=(2, 7))
  noisy_target[4:] = np.asarray(jax.nn.log_softmax(jnp.asarray(50 * RNG.normal(size=(2, 7)), jnp.float32)))

  def masked(s, target):
    teacher = Teacher(log_probs=jnp.asarray(target))
    _, _, soft = distillation_loss(s, jnp.full(6, -1), 0.0, teacher, temperature=t, loss=index,
                                   settings=loss_settings(index, settings))
    return masked_mean(soft, jnp.asarray(mask))

  reference = np_reverse_kl if loss == "reverse-kl" else lambda s, z, t: np_jsd(s, z, 0.3, t)
  expected = reference(S[:4], Z[:4], t).mean()
  value = masked(jnp.asarray(noisy_s, jnp.float32), noisy_target)
  np.testing.assert_allclose(value, expected, rtol=1e-4)
  grad = np.asarray(jax.grad(masked)(jnp.asarray(noisy_s, jnp.float32), noisy_target))
  assert np.isfinite(grad).all() and not grad[4:].any()
  np.testing.assert_allclose(grad[:4], numeric_grad(lambda s: reference(s, Z[:4], t).mean(), S[:4]), rtol=1e-3,
                             atol=1e-5)


def test_students_of_one_step_differ_in_loss_and_beta_with_one_compilation():
  """β is traced per student, like T: a vmapped group of KL, reverse-KL and JSD students at several β computes, for
  each, what it computes alone, in one compilation."""
  t = 2.0
  losses = ["kl", "reverse-kl", "jsd:0.1", "jsd:0.9", "jsd:0"]
  parsed = [parse_loss(loss) for loss in losses]
  indices = jnp.asarray([index for index, _ in parsed], jnp.int32)
  settings = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[loss_settings(i, s) for i, s in parsed])
  s, teacher = jnp.asarray(S, jnp.float32), Teacher(log_probs=_target(t))

  @jax.jit
  def group(indices, settings):
    return jax.vmap(lambda i, st: distillation_loss(s, jnp.full(6, -1), 0.0, teacher, temperature=t, loss=i,
                                                    settings=st)[2])(indices, settings)

  together = group(indices, settings)
  expected = [soft_kl(s, _target(t), t), np_reverse_kl(S, Z, t), np_jsd(S, Z, 0.1, t), np_jsd(S, Z, 0.9, t),
              np_jsd(S, Z, 0.0, t)]
  for got, want, loss in zip(together, expected, losses):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=loss)
  group(indices, jax.tree.map(lambda x: x[::-1], settings))  # Other β: no new compilation.
  assert group._cache_size() == 1


@pytest.mark.fast
def test_loss_syntax_help_and_errors():
  assert {"reverse-kl", "jsd"} <= set(LOSS_NAMES) and "jsd[:β]" in LOSS_HELP and "reverse-kl" in LOSS_HELP
  assert float(parse_loss("jsd")[1].beta) == 0.5 and float(parse_loss("jsd:0.1")[1].beta) == np.float32(0.1)
  assert parse_loss("jsd:1")[1].beta == 1 and parse_loss("reverse-kl")[1] == ()
  for text, message in (("jsd:2", r"--loss jsd takes β in \[0, 1\] as jsd:BETA \(e.g. jsd:0.1\), not '2', got jsd:2"),
                        ("jsd:-0.1", "jsd takes β in"), ("jsd:nan", "jsd takes β in"), ("jsd:x", "jsd takes β in"),
                        ("jsd:", "jsd takes β in"), ("reverse-kl:0.3", "reverse-kl takes no argument"),
                        ("js", "must be one of kl, mse, reverse-kl, jsd\\[:β\\]")):
    with pytest.raises(StillroomError, match=message):
      parse_loss(text)
    with pytest.raises(StillroomError, match=message.split(", got")[0]):
      validate_config(FitConfig(cache="c.zarr", out="run", loss=text))


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, data_dir, teachers):
  return digits_cache(tmp_path_factory, data_dir, teachers[:2], split="train[:400]")


@pytest.fixture(scope="module")
def topk(tmp_path_factory, data_dir, teachers):
  return digits_cache(tmp_path_factory, data_dir, teachers[:2], split="train[:400]", targets="topk:3")


def _lines(run_dir) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


OPTIONS = dict(model="mlp-small", epochs=4, batch_size=64, alpha=0.0, lr=1e-2, progress=False, workers=0)


@pytest.mark.parametrize("loss, temperature", [("reverse-kl", None), ("jsd:0.3", 2.0)])
def test_fit_trains_with_the_divergence(loss, temperature, tmp_path, data_dir, cache_path):
  """From the stored dense targets (at the cache's T) or from targets re-derived from member logits (another T)."""
  out = str(tmp_path / "run")
  final = fit(FitConfig(cache=cache_path, data_dir=data_dir, out=out, loss=loss, temperature=temperature, **OPTIONS),
              log_epochs=False)
  soft = [line["soft"] for line in _lines(out)]
  assert np.isfinite(soft).all() and np.isfinite(final["loss"]) and all(b < a for a, b in zip(soft, soft[1:])), soft
  teaching = json.load(open(os.path.join(out, "config.json")))["resolved"]["teaching"]
  assert teaching["loss"] == loss and teaching["use_stored"] == (temperature is None)


def test_a_sweep_over_losses_is_one_group_of_one_compilation(tmp_path, data_dir, cache_path, monkeypatch):
  steps = []
  original = train_lib.make_train_step
  monkeypatch.setattr(train_lib, "make_train_step", lambda *a, **k: steps.append(original(*a, **k)) or steps[-1])
  base = FitConfig(data_dir=data_dir, **{**OPTIONS, "epochs": 2})
  runs = run_sweep(cache_path, "loss=kl,reverse-kl,jsd:0.1,jsd:0.9", str(tmp_path / "sweep"), base=base)
  assert len(runs) == 4 and len(steps) == 1 and steps[0]._cache_size() == 1
  finals = {json.load(open(os.path.join(run, "config.json")))["resolved"]["config"]["loss"]: read_final(run)
            for run in runs}
  assert all(np.isfinite(line["soft"]) for line in finals.values()) and finals["jsd:0.1"]["students_in_step"] == 4
  # A student of the group computes what it computes alone.
  alone = fit(dataclasses.replace(base, cache=cache_path, out=str(tmp_path / "alone"), loss="jsd:0.9"),
              log_epochs=False)
  # Float rounding only: rel 1e-5, and abs 1e-7 (float32's epsilon on terms of order 1) for "soft", a small
  # difference of such terms (measured 4e-9 apart at 3.9e-4).
  for name in ("loss", "soft", "hard_ce"):
    assert finals["jsd:0.9"][name] == pytest.approx(alone[name], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("loss", ["reverse-kl", "jsd:0.3"])
def test_a_sparse_cache_without_member_logits_is_refused_in_one_line(loss, topk, tmp_path, data_dir):
  with pytest.raises(StillroomError) as error:
    fit(FitConfig(cache=topk, data_dir=data_dir, out=str(tmp_path / "run"), loss=loss, **OPTIONS))
  message = str(error.value)
  assert "\n" not in message and f"cannot serve --loss {loss}" in message, message
  assert "teacher-cache build --member-logits" in message, message
