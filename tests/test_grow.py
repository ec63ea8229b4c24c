"""Growing a cache (`teacher_cache.grow`, `teacher-cache extend`) against direct builds of the final members and
views: every array and every stored chunk byte equal, the spec equal but for its history and creation time."""

import numpy as np
import pytest
from conftest import array_files

from shared.cache import SPEC_KEY, open_cache
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.grow import grow_cache, source_config

SPLIT = "train[:120]"  # 120 examples: a few chunks of 32 rows with 2 or 4 views.


def _build(out, teachers, data_dir, **options) -> str:
  build_cache(BuildConfig(dataset="digits", split=SPLIT, data_dir=data_dir, teachers=tuple(teachers), out=str(out),
                          progress=False, **{"views": 2, "chunk_rows": 32, "batch_size": 16, **options}))
  return str(out)


def assert_same_cache(grown: str, direct: str) -> None:
  """`grown` is `direct` byte for byte in every array (values and chunk files), and its spec is `direct`'s but for
  its history and creation time."""
  a, b = open_cache(grown), open_cache(direct)
  assert [x.name for x in a.spec.arrays] == [x.name for x in b.spec.arrays]
  for array in b.spec.arrays:
    np.testing.assert_array_equal(a[array.name][:], b[array.name][:], err_msg=array.name)
  assert array_files(grown) == array_files(direct)
  mine, theirs = (dict(c.group.attrs[SPEC_KEY]) for c in (a, b))
  for spec in (mine, theirs):
    spec.pop("history", None)
    spec.pop("created_at")
  assert mine == theirs


@pytest.fixture(scope="module")
def grown_root(tmp_path_factory):
  return tmp_path_factory.mktemp("grow")


def test_engine_adds_a_member_equal_to_a_direct_build(grown_root, data_dir, teachers):
  source = _build(grown_root / "one.zarr", teachers[:1], data_dir)
  direct = _build(grown_root / "two.zarr", teachers[:2], data_dir)
  config = source_config(open_cache(source).spec, teachers=(teachers[1],), data_dir=data_dir, batch_size=16,
                         out=str(grown_root / "grown.zarr"), progress=False)
  grown = grow_cache(config, [source], history={"command": "extend", "added_members": ["t1"]})
  assert_same_cache(grown, direct)
  history = open_cache(grown).spec.history
  assert [h["command"] for h in history] == ["extend"] and len(history[0]["sources"]) == 1


def test_extend_adds_a_member_in_place(grown_root, data_dir, teachers, capsys):
  import shutil
  from conftest import run_cli
  from teacher_cache.cli import main
  cache = str(grown_root / "inplace.zarr")
  shutil.copytree(grown_root / "one.zarr", cache)
  code, out, err = run_cli(main, ["extend", cache, "--teacher", teachers[1], "--data-dir", data_dir, "--batch-size",
                                  "16", "--no-progress"], capsys)
  assert code == 0, err
  assert_same_cache(cache, str(grown_root / "two.zarr"))
