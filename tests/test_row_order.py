"""The grouped row order of new caches (issue 31): an example's views in adjacent rows, one seeded permutation shared
by every view, against NumPy references; and caches of the older view-major "permuted" order still read their rows."""

import os

import numpy as np
import pytest

from bench.synthetic import direct_cache
from shared.augment import row_permutation
from shared.cache import GROUPED, example_runs, open_cache, row_sources
from shared.data import open_transfer_set
from teacher_cache.verify import verify_cache


@pytest.mark.fast
@pytest.mark.parametrize("count, views", [(37, 4), (10, 1), (5, 16)])
def test_grouped_rows_hold_every_view_of_an_example_together(count, views):
  rows = np.arange(count * views)
  view, position = row_sources(rows[::-1], count, 7, GROUPED, views)  # Any order of rows: each on its own.
  # The reference: a seeded permutation of the examples, each repeated V times, views 0..V-1 cycling.
  assert sorted(row_permutation(7, 0, count).tolist()) == list(range(count))
  np.testing.assert_array_equal(position[::-1], np.repeat(row_permutation(7, 0, count), views))
  np.testing.assert_array_equal(view[::-1], np.tile(np.arange(views, dtype=np.int32), count))
  assert view.dtype == np.int32 and position.dtype == np.int64
  # A chunk of a multiple of V rows holds whole examples: no example in two chunks, each with all its V views.
  chunk_rows = 2 * views
  seen = set()
  for start in range(0, len(rows), chunk_rows):
    view, position = row_sources(rows[start:start + chunk_rows], count, 7, GROUPED, views)
    assert not seen & set(position.tolist())
    seen |= set(position.tolist())
    for p in np.unique(position):
      assert sorted(view[position == p].tolist()) == list(range(views))
  assert seen == set(range(count))


@pytest.mark.fast
def test_example_runs_never_split_an_example():
  position = np.repeat(np.array([5, 2, 9, 4, 1, 7]), [3, 3, 3, 3, 3, 1])
  for size in (1, 2, 3, 4, 7, 100):
    parts = example_runs(position, size)
    assert np.concatenate([np.arange(len(position))[p] for p in parts]).tolist() == list(range(len(position)))
    for k, p in enumerate(parts):
      rows = position[p]
      assert not set(rows.tolist()) & set(np.delete(position, np.arange(len(position))[p]).tolist())
      assert size <= len(rows) < size + 3 or k == len(parts) - 1  # At most the rest of an example's views beyond.
  assert example_runs(position[:0], 4) == []


def test_a_permuted_cache_still_reads_with_its_rows(tmp_path):
  """A cache of the view-major "permuted" order (written before the grouped one): rows `[v·N, (v+1)·N)` hold view v,
  each view in its own seeded order; its spec names the order, it reads those rows and verifies."""
  count, views = 50, 3
  images = np.random.default_rng(0).integers(0, 17, size=(count, 8, 8)).astype(np.uint8)
  np.savez(tmp_path / "d.npz", x=images, y=np.arange(count) % 4)
  dataset = f"npz:{tmp_path / 'd.npz'}"
  path = str(tmp_path / "permuted.zarr")
  direct_cache(path, dataset, members=1, views=views, chunk_rows=32, seed=4, row_order="permuted")
  cache = open_cache(path)
  assert cache.spec.row_order == "permuted"
  indices = open_transfer_set(dataset).indices
  np.testing.assert_array_equal(cache["view"][:], np.repeat(np.arange(views), count))
  np.testing.assert_array_equal(cache["index"][:],
                                np.concatenate([indices[row_permutation(4, v, count)] for v in range(views)]))
  assert not np.array_equal(row_permutation(4, 0, count), row_permutation(4, 1, count))
  # `verify` replays each row's example and view from the seed in the cache's order (its synthetic targets are not
  # an ensemble's, so that check alone fails).
  checks = {check.name: check.ok for check in verify_cache(path)}
  assert checks.pop("rows' index/view/shift/flip/fold replay from the seed") and checks.pop("labels match the dataset")
  assert checks.pop("targets re-derived from member_logits") is False and all(checks.values()), checks


@pytest.mark.fast
def test_only_the_default_chunk_rows_are_rounded_to_whole_examples():
  """The default 4096 rows become a multiple of --views; a --chunk-rows given, even 4096, is checked, not rewritten."""
  from shared.errors import StillroomError  # pylint: disable=import-outside-toplevel
  from teacher_cache.build import DEFAULT_CHUNK_ROWS, BuildConfig, check_settings, resolve_defaults
  assert resolve_defaults(BuildConfig(views=3)).chunk_rows == DEFAULT_CHUNK_ROWS // 3 * 3
  assert resolve_defaults(BuildConfig(views=4)).chunk_rows == DEFAULT_CHUNK_ROWS
  given = resolve_defaults(BuildConfig(views=3, chunk_rows=DEFAULT_CHUNK_ROWS))
  assert given.chunk_rows == DEFAULT_CHUNK_ROWS
  with pytest.raises(StillroomError, match=f"--chunk-rows {DEFAULT_CHUNK_ROWS} is not a multiple of --views 3"):
    check_settings(given)


def test_a_store_built_before_the_grouped_order_is_confirmed_in_its_own_order(tmp_path, data_dir, teachers,
                                                                              monkeypatch):
  """A complete "permuted" store of the old default chunk rows (4096, not a multiple of 3 views) is what the same
  command confirms (nothing to do), not a store of other settings."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from teacher_cache import build  # pylint: disable=import-outside-toplevel
  config = build.BuildConfig(dataset="digits", split="train[:50]", data_dir=data_dir, teachers=(teachers[0],),
                             views=3, eval_split="none", out=str(tmp_path / "c.zarr"), progress=False)
  made = build.make_spec
  old = lambda config, *a, **k: dataclasses.replace(  # noqa: E731
      made(dataclasses.replace(config, chunk_rows=4096), *a, **k), row_order="permuted")
  monkeypatch.setattr(build, "make_spec", old)
  build.build_cache(config)
  monkeypatch.setattr(build, "make_spec", made)
  stamp = os.path.getmtime(tmp_path / "c.zarr" / "zarr.json")
  assert build.build_cache(config) == config.out  # Refused before the grouped order kept the old stores readable.
  stored = open_cache(config.out)
  assert stored.spec.row_order == "permuted" and stored.spec.chunk_rows == 4096
  assert os.path.getmtime(tmp_path / "c.zarr" / "zarr.json") == stamp
