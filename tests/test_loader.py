"""Loaders: every row once per epoch, order a function of (seed, epoch) only, views the teacher labelled."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import digits_cache, numpy_log_softmax

from shared.augment import Augmentation
from shared.cache import open_cache
from shared.data import open_transfer_set
from shared.runs import load_teacher
from bench.shuffle_quality import uniform_distinct
from shared.ensemble import member_weights
from student_train.loader import ArrayLoader, CacheLoader
from student_train.steps import Hypers, soft_targets


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, data_dir, teachers):
  return digits_cache(tmp_path_factory, data_dir, teachers, split="train[:500]", views=3, max_shift=2, flip=True,
                      chunk_rows=126, temperature=3.0)


def _loader(cache_path, data_dir, **kwargs):
  cache = open_cache(cache_path)
  transfer_set = open_transfer_set("digits", "train[:500]", data_dir)
  options = {"batch_size": 64, "seed": 0, "fields": ("targets", "member_logits"), **kwargs}
  return CacheLoader(cache, transfer_set, **options), cache


def test_every_row_once_per_epoch_and_order_depends_on_seed_and_epoch(cache_path, data_dir):
  loader, cache = _loader(cache_path, data_dir)
  group = cache.group
  all_rows = np.sort(group["index"][:])
  seen = []
  for epoch in (0, 1):
    batches = list(loader.epoch(epoch))
    assert all(len(b["mask"]) == 64 for b in batches) and len(batches) == loader.steps_per_epoch
    keep = [b["mask"] > 0 for b in batches]
    # Identify rows by (index, targets): with random teachers, each view's targets differ.
    targets = np.concatenate([b["targets"][k] for b, k in zip(batches, keep)])
    index = np.concatenate([b["index"][k] for b, k in zip(batches, keep)])
    assert len(index) == cache.spec.num_rows == 1500
    np.testing.assert_array_equal(np.sort(index), all_rows)
    stored = group["targets"][:]
    order = _match_rows(targets, index, stored, group["index"][:])
    np.testing.assert_array_equal(np.sort(order), np.arange(1500))  # Each row exactly once.
    seen.append(order)
  assert (seen[0] != seen[1]).any()
  again, _ = _loader(cache_path, data_dir)
  batches = list(again.epoch(1))
  targets = np.concatenate([b["targets"][b["mask"] > 0] for b in batches])
  index = np.concatenate([b["index"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(_match_rows(targets, index, group["targets"][:], group["index"][:]), seen[1])
  other_seed, _ = _loader(cache_path, data_dir, seed=1)
  index_other = np.concatenate([b["index"][b["mask"] > 0] for b in other_seed.epoch(1)])
  assert (index_other != index).any()


def _match_rows(targets, index, stored_targets, stored_index):
  """Row numbers of the loader's rows in the store, found by (index, targets) equality."""
  lookup = {}
  for row, (i, t) in enumerate(zip(stored_index, stored_targets)):
    lookup.setdefault((int(i), t.tobytes()), []).append(row)
  return np.array([lookup[(int(i), t.tobytes())].pop() for i, t in zip(index, targets)])


def test_student_sees_the_view_the_teacher_labelled(cache_path, data_dir, teachers):
  loader, cache = _loader(cache_path, data_dir)
  members = [load_teacher(t) for t in teachers]
  batch = next(iter(loader.epoch(0)))
  assert batch["x"].dtype == np.uint8 and (batch["x"] != open_transfer_set(
      "digits", "train[:500]", data_dir).read(batch["index"])[0]).any()  # Augmented views, not raw inputs.
  x = batch["x"].astype(np.float32) / 16.0
  logits = np.stack([np.asarray(m.apply_fn(m.params, x)) for m in members], axis=1)
  np.testing.assert_allclose(batch["member_logits"].astype(np.float32), logits, rtol=2e-3, atol=2e-3)


def _hyper(temperature, geometric, members, use_stored=False):
  return Hypers(temperature=jnp.float32(temperature), geometric=jnp.bool_(geometric), use_stored=use_stored,
                member_weights=jnp.asarray(member_weights(members, 3)))


def test_rederived_targets_equal_stored_targets_when_settings_match(cache_path, data_dir):
  loader, cache = _loader(cache_path, data_dir)
  batch = {k: jnp.asarray(v) for k, v in next(iter(loader.epoch(0))).items()}
  spec = cache.spec
  rederive = {k: v for k, v in batch.items() if k != "targets"}
  derived, _ = soft_targets(rederive, _hyper(spec.temperature, spec.combine == "geometric", (0, 1, 2)))
  np.testing.assert_allclose(derived, batch["targets"].astype(np.float32), rtol=2 ** -10, atol=2 ** -10)
  subset, teacher_logits = soft_targets(batch, _hyper(7.0, True, (0, 2)))
  member_logits = np.asarray(batch["member_logits"], np.float64)[:, [0, 2]]
  np.testing.assert_allclose(subset, numpy_log_softmax(member_logits.mean(1) / 7.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(teacher_logits, member_logits.mean(1), rtol=1e-5, atol=1e-5)
  stored, _ = soft_targets(batch, _hyper(7.0, True, (0, 2), use_stored=True))  # Both present: the stored ones.
  np.testing.assert_array_equal(stored, np.asarray(batch["targets"], np.float32))


def test_label_fraction_keeps_all_views_of_a_subset(cache_path, data_dir):
  examples = np.arange(0, 500, 10)
  loader, _ = _loader(cache_path, data_dir, examples=examples)
  index = np.concatenate([b["index"][b["mask"] > 0] for b in loader.epoch(0)])
  assert loader.num_rows == 150
  np.testing.assert_array_equal(np.sort(index), np.repeat(examples, 3))


def test_array_loader_once_per_epoch_with_fresh_views(data_dir):
  transfer_set = open_transfer_set("digits", "train[:300]", data_dir)
  augmentation = Augmentation(seed=3, max_shift=1)
  loader = ArrayLoader(transfer_set, batch_size=64, seed=3, augmentation=augmentation, augment=True)
  epochs = [list(loader.epoch(e)) for e in (0, 1)]
  for batches in epochs:
    index = np.concatenate([b["index"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(np.sort(index), np.arange(300))
  first = {int(i): x for b in epochs[0] for i, x, m in zip(b["index"], b["x"], b["mask"]) if m}
  second = {int(i): x for b in epochs[1] for i, x, m in zip(b["index"], b["x"], b["mask"]) if m}
  assert sum((first[i] != second[i]).any() for i in range(300)) > 100  # A new view each epoch.
  again = list(ArrayLoader(transfer_set, batch_size=64, seed=3, augmentation=augmentation, augment=True).epoch(1))
  np.testing.assert_array_equal(np.concatenate([b["x"] for b in again]),
                                np.concatenate([b["x"] for b in epochs[1]]))


def test_batches_of_class_sorted_data_are_like_uniform_samples(tmp_path, monkeypatch):
  """100 classes, 65,536 rows sorted by class, batch 256: uniform sampling gives ~92 distinct classes per batch.
  The build stores each view's examples in a seeded permuted order, so streamed batches must reach 95% of that
  (in split order and a 4-chunk window they held ~28), and still hold every row once per epoch."""
  from teacher_cache.build import BuildConfig, build_cache
  rows, classes = 65536, 100
  labels = np.sort(np.random.default_rng(0).integers(0, classes, rows))
  x = np.random.default_rng(1).normal(size=(rows, 4)).astype(np.float32)
  np.savez(tmp_path / "sorted.npz", x=x, y=labels)
  (tmp_path / "linear_teacher.py").write_text(
      "import numpy as np\n"
      "def teacher():\n"
      "  w = np.random.default_rng(0).normal(size=(4, 100)).astype(np.float32)\n"
      "  return (lambda params, x: x @ params), w\n")
  monkeypatch.chdir(tmp_path)
  dataset = f"npz:{tmp_path / 'sorted.npz'}"
  out = str(tmp_path / "sorted.zarr")
  build_cache(BuildConfig(dataset=dataset, teachers=("linear_teacher:teacher",), out=out, batch_size=4096,
                          progress=False))
  loader = CacheLoader(open_cache(out), open_transfer_set(dataset), batch_size=256, seed=0, fields=("targets",))
  batches = list(loader.epoch(0))
  distinct = [len(np.unique(b["labels"][b["mask"] > 0])) for b in batches[:-1]]
  expected = uniform_distinct(np.bincount(labels, minlength=classes), 256)  # Exact, without replacement.
  assert 91 < expected < 93
  assert np.mean(distinct) >= 0.95 * expected, (np.mean(distinct), expected)
  seen = np.concatenate([b["index"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(np.sort(seen), np.arange(rows))  # Every row once.
