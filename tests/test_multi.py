"""K students in one vmapped step equal K separate runs."""

import jax
import numpy as np
import optax
import pytest
from conftest import digits_cache, numpy_log_softmax
from flax import nnx
from scipy.special import logsumexp

from shared.cache import open_cache
from shared.data import open_transfer_set
from shared.models import ModelSpec, build_model
from shared.parallel import batch_sharding, data_mesh, replicated
from student_train.loader import CacheLoader
from student_train.steps import (Teaching, make_multi_train_step, make_train_step, stack_states, unstack_state,
                                 weighted_soft_targets)

STUDENTS = [  # seed, T, alpha, combine, loss, members
    (0, 4.0, 0.1, "arithmetic", "kl", (0, 1, 2)),
    (1, 2.0, 0.5, "geometric", "kl", (1,)),
    (2, 1.0, 0.0, "arithmetic", "mse", (0, 2)),
    (3, 8.0, 1.0, "geometric", "kl", (0, 2)),
]


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, data_dir, teachers):
  return digits_cache(tmp_path_factory, data_dir, teachers, split="train[:640]")


def _weights(members, count=3):
  weights = np.zeros(count, np.float32)
  weights[list(members)] = 1.0 / len(members)
  return weights


@pytest.mark.parametrize("geometric", [False, True])
def test_weighted_targets_equal_the_subset_ensemble(geometric):
  z = np.random.default_rng(0).normal(size=(5, 3, 7)).astype(np.float32) * 3
  for members in [(0, 1, 2), (1,), (0, 2)]:
    got = weighted_soft_targets(z, 2.5, _weights(members), geometric)
    scaled = z[:, list(members)].astype(np.float64) / 2.5
    expected = numpy_log_softmax(scaled.mean(1)) if geometric else \
        logsumexp(numpy_log_softmax(scaled), axis=1) - np.log(len(members))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_vmapped_students_match_separate_runs(cache_path, data_dir):
  mesh = data_mesh()
  cache = open_cache(cache_path)
  transfer_set = open_transfer_set("digits", "train[:640]", data_dir)
  loader = CacheLoader(cache, transfer_set, batch_size=64, seed=0, fields=("member_logits",))
  batches = [jax.device_put({k: v for k, v in b.items() if k != "index"}, batch_sharding(mesh))
             for b in loader.epoch(0)]  # 20 steps.
  assert len(batches) == 20
  spec = ModelSpec(name="mlp-small", input_shape=(8, 8, 1), num_classes=10, dropout=0.1)
  tx = optax.adamw(1e-3, weight_decay=1e-4)

  def fresh(seed):
    model = build_model(spec, seed=seed)
    return nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

  separate = []
  for seed, temperature, alpha, combine, loss, members in STUDENTS:
    graphdef, state = fresh(seed)
    teaching = Teaching(loss=loss, temperature=temperature, combine=combine, members=members, stored_targets=False)
    step = make_train_step(graphdef, transfer_set.normalization, teaching, jax.random.key(seed), mesh)
    for batch in batches:
      state, _ = step(state, batch, np.float32(alpha))
    separate.append(state)

  graphdef, _ = fresh(0)
  states = stack_states([fresh(seed)[1] for seed, *_ in STUDENTS])
  hypers = {"temperature": np.array([s[1] for s in STUDENTS], np.float32),
            "alpha": np.array([s[2] for s in STUDENTS], np.float32),
            "geometric": np.array([s[3] == "geometric" for s in STUDENTS]),
            "mse": np.array([s[4] == "mse" for s in STUDENTS]),
            "member_weights": np.stack([_weights(s[5]) for s in STUDENTS]),
            }
  hypers["key"] = jax.numpy.stack([jax.random.key(s[0]) for s in STUDENTS])
  states, hypers = jax.device_put((states, hypers), replicated(mesh))
  multi = make_multi_train_step(graphdef, transfer_set.normalization, mesh)
  for batch in batches:
    states, metrics = multi(states, batch, hypers)
  assert metrics["loss"].shape == (len(STUDENTS),) and multi._cache_size() == 1
  for k, expected in enumerate(separate):
    got = unstack_state(states, k)
    params = lambda s: nnx.to_pure_dict(nnx.filter_state(s, nnx.Param))  # noqa: E731
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                 params(got), params(expected))
