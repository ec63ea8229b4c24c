"""`teacher-cache convert`, `subset` and `merge` (`teacher_cache.derive`) against direct builds of the resulting
settings: every array and every stored chunk byte equal, the spec equal but for its history and creation time, and
`teacher-cache verify` passing on a result (the engine writes every result the same way: one verified suffices). The
sources and the direct builds are the session's (`conftest.SmallCaches`), shared with `test_grow`."""

import dataclasses
import logging
import os
import shutil

import pytest
import zarr
from conftest import run_cli, tree_digest
from test_grow import assert_same_cache

from shared.cache import COMPLETE_KEY, open_cache
from teacher_cache import build
from teacher_cache.build import BuildConfig
from teacher_cache.cli import main as cache_main
from teacher_cache.derive import convert_cache, merge_caches, merge_plan, subset_cache, subset_plan
from teacher_cache.verify import verify_cache

class Builds:
  """The session's direct builds (`conftest.SmallCaches`), and this module's outputs."""

  def __init__(self, root, caches):
    self.root, self.caches, self.data_dir = root, caches, caches.data_dir

  def get(self, members, **options) -> str:
    return self.caches.get(members, **options)

  def dense(self):  # t0 and t1, dense: the source of most derivations.
    return self.get((0, 1))

  def config(self, name, **options) -> BuildConfig:
    return BuildConfig(out=str(self.root / f"{name}.zarr"), data_dir=self.data_dir, progress=False, **options)


@pytest.fixture(scope="module")
def builds(tmp_path_factory, small_caches, compilation_cache):  # pylint: disable=unused-argument
  return Builds(tmp_path_factory.mktemp("derive"), small_caches)


def _verified(path, data_dir) -> str:
  checks = verify_cache(path, None, None, data_dir)
  assert not [c for c in checks if c.failed], [c for c in checks if c.failed]
  return path


def test_convert_dense_to_topk_equals_a_direct_build(builds, monkeypatch):
  source, direct = builds.dense(), builds.get((0, 1), targets="topk:3")
  # No teacher runs and no view is rendered: every cell is copied.
  monkeypatch.setattr(build, "_computed_chunks", lambda *args, **kwargs: pytest.fail("a derive rendered rows"))
  converted = convert_cache(source, builds.config("to_top3", targets="topk:3"))
  assert_same_cache(_verified(converted, builds.data_dir), direct)
  history = open_cache(converted).spec.history
  assert [h["command"] for h in history] == ["convert"] and history[0]["targets"] == ["dense", "topk:3"]


def test_convert_dense_to_sample_and_back_equal_direct_builds(builds, capsys):
  direct = builds.get((0, 1), targets="sample:4", member_logits=True)
  # Through the command line: its options are the library's.
  out = builds.root / "to_sample4.zarr"
  code, _, err = run_cli(cache_main, ["convert", builds.dense(), "--targets", "sample:4", "--member-logits",
                                      "--data-dir", builds.data_dir, "--no-progress",
                                      "--out", out], capsys)
  assert code == 0, err
  assert_same_cache(str(out), direct)
  back = convert_cache(direct, builds.config("to_dense", targets="dense"))
  assert_same_cache(back, builds.dense())


def test_subset_of_members_and_of_views_equal_direct_builds(builds):
  one = subset_cache(builds.dense(), ["t1"], None, builds.config("t1_only"))
  assert_same_cache(one, builds.get((1,)))
  fewer = subset_cache(builds.dense(), None, 1, builds.config("view0"))
  assert_same_cache(fewer, builds.get((0, 1), views=1))
  assert open_cache(fewer).spec.history[0] == {**open_cache(fewer).spec.history[0], "command": "subset",
                                               "members": ["t0", "t1"], "views": [2, 1]}


def test_subset_of_views_of_mixed_views_equals_a_direct_build(builds):
  """A mixed row's partner, λ and box do not depend on the view count: views 0..1 of a 4-view CutMix cache are the
  2-view build's."""
  mixed = builds.get((0,), views=4, mix="cutmix:1", eval_split="none")
  fewer = subset_cache(mixed, None, 2, builds.config("cutmix4_to_2"))
  assert_same_cache(fewer, builds.get((0,), mix="cutmix:1", eval_split="none"))


def test_merge_of_disjoint_members_equals_a_direct_build(builds, caplog):
  merged = merge_caches(builds.get((0,)), builds.get((1,)), builds.config("merged"))
  assert_same_cache(merged, builds.dense())
  # Run again, the command confirms the complete store and writes nothing (nor says it wrote it).
  before = tree_digest(merged)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert merge_caches(builds.get((0,)), builds.get((1,)), builds.config("merged")) == merged
  assert "already complete with these settings; nothing to do" in caplog.text and "wrote" not in caplog.text, \
      caplog.text
  assert tree_digest(merged) == before


def test_subset_reordering_members_with_features_and_sparse_targets_equals_a_direct_build(builds):
  """The kept members' features renumbered in the new order; sparse targets with member logits derived again."""
  sparse = {"targets": "topk:3", "member_logits": True}
  source = builds.get((0, 2), features="hidden1@0,stage2:pooled@1", **sparse)
  reordered = subset_cache(source, ["c2", "t0"], None, builds.config("reordered"))
  assert_same_cache(reordered,
                    builds.get((2, 0), features="stage2:pooled@0,hidden1@1", **sparse))


def test_an_interrupted_convert_is_finished_by_running_it_again(builds):
  """A store left as a kill leaves it (no completion record, a chunk uncommitted and its files gone) is resumed."""
  config = builds.config("resumed", targets="topk:3")
  out = convert_cache(builds.dense(), config)
  group = zarr.open_group(out, mode="r+")
  del group.attrs[COMPLETE_KEY]
  group["chunk_committed"][2] = False
  for name in ("target_ids", "target_log_probs", "target_rest", "index"):  # A 2-D array's chunk is a folder.
    chunk = os.path.join(out, name, "c", "2")
    shutil.rmtree(chunk) if os.path.isdir(chunk) else os.remove(chunk)
  with pytest.raises(Exception, match="not complete"):
    open_cache(out)
  assert convert_cache(builds.dense(), config) == out
  assert_same_cache(out, builds.get((0, 1), targets="topk:3"))


def test_the_chunk_rows_of_a_derived_cache(builds):
  """The source's (A's for merge) unless given, or a build's default for the views kept when those do not divide
  them."""
  spec = open_cache(builds.dense()).spec
  four = dataclasses.replace(spec, views=4, chunk_rows=4096, arrays=())
  assert subset_plan(four, None, 3, builds.config("x"))[0].chunk_rows == 4095  # 4096 // 3 * 3.
  assert subset_plan(four, None, 2, builds.config("x"))[0].chunk_rows == 4096
  assert subset_plan(four, None, 3, builds.config("x", chunk_rows=300))[0].chunk_rows == 300
  a, b = (open_cache(builds.get((m,))).spec for m in (0, 1))
  # A settings difference shows digests by their first 12 hex digits (`CacheSpec.mismatches`).
  assert [m for m in a.mismatches(b) if m.startswith("member_digests")] == [
      f"member_digests: ['{a.members[0].digest[:12]}…'] (store) vs ['{b.members[0].digest[:12]}…'] (command)"]
  grown, members, history = merge_plan(a, dataclasses.replace(b, chunk_rows=64, arrays=()), builds.config("x"))
  assert (grown.chunk_rows, members, history["command"]) == (32, None, "merge")


def test_merge_with_features_and_sparse_targets_equals_a_direct_build(builds):
  """B's features renumbered after A's members; eval logits and sparse targets with member logits."""
  sparse = {"targets": "topk:3", "member_logits": True}
  a = builds.get((0,), features="hidden1", **sparse)
  b = builds.get((2,), features="stage2:pooled", **sparse)
  merged = merge_caches(a, b, builds.config("merged_features"))
  assert_same_cache(merged,
                    builds.get((0, 2), features="hidden1@0,stage2:pooled@1", **sparse))
