"""Growing a cache (`teacher_cache.grow`, `teacher-cache extend`) against direct builds of the final members and
views: every array and every stored chunk byte equal, the spec equal but for its history and creation time; a kill
during an extend leaves the original as it was."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import array_files, run_cli, tree_digest

from shared.cache import SPEC_KEY, open_cache
from shared.cache.store import SWITCH_SUFFIXES
from student_train.config import FitConfig
from student_train.plan import plan_run
from teacher_cache import extend as extend_module
from teacher_cache import grow
from shared.settings import differences
from teacher_cache.build import BuildConfig
from teacher_cache.cli import main
from teacher_cache.extend import REPLACED_SUFFIX, STAGING_SUFFIX, staging_path
from teacher_cache.grow import grow_cache, source_config
from teacher_cache.info import history_lines
from teacher_cache.verify import verify_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSE = {"targets": "sample:4", "member_logits": True, "features": "hidden1:pooled", "eval_split": "none"}


def assert_same_cache(grown: str, direct: str) -> None:
  """`grown` is `direct` byte for byte in every array (values, chunk files and metadata), and its spec is `direct`'s
  but for its history (which `direct`, a build, does not have) and creation time."""
  a, b = open_cache(grown), open_cache(direct)
  assert [x.name for x in a.spec.arrays] == [x.name for x in b.spec.arrays]
  for array in b.spec.arrays:
    np.testing.assert_array_equal(a[array.name][:], b[array.name][:], err_msg=array.name)
  # Every file, the arrays' metadata too, but the group's (the spec, compared below, and the completion record,
  # which digests the spec).
  assert {k: v for k, v in tree_digest(grown).items() if k != "zarr.json"} == \
      {k: v for k, v in tree_digest(direct).items() if k != "zarr.json"}
  mine, theirs = (dict(c.group.attrs[SPEC_KEY]) for c in (a, b))
  assert mine.pop("history") and "history" not in theirs  # A direct build's attributes are as before history.
  for spec in (mine, theirs):
    spec.pop("created_at")
  assert mine == theirs


# Direct builds (`conftest.SmallCaches`, shared with test_derive): one member and two (2 views, and 4), dense with
# eval logits; sparse with member logits and features, one member and two.
BUILDS = {"one": ((0,), {}), "two": ((0, 1), {}), "two4": ((0, 1), {"views": 4}), "one_sparse": ((0,), SPARSE),
          "two_sparse": ((0, 1), SPARSE)}


class _Built:
  """`built["root"]`: this module's folder for its outputs; `built[name]`: the direct build `BUILDS[name]`, made
  when first asked for; `built.get(members, **options)`: another."""

  def __init__(self, root, caches):
    self.root, self.get = root, caches.get

  def __getitem__(self, name):
    if name == "root":
      return self.root
    members, options = BUILDS[name]
    return self.get(members, **options)


@pytest.fixture(scope="module")
def built(tmp_path_factory, small_caches, compilation_cache):  # pylint: disable=unused-argument
  return _Built(tmp_path_factory.mktemp("grow"), small_caches)


def _copy(built, name, to) -> str:
  path = str(built["root"] / to)
  shutil.rmtree(path, ignore_errors=True)
  shutil.copytree(built[name], path)
  return path


def _extend(cache, data_dir, *extra, capsys=None):
  return run_cli(main, ["extend", cache, "--data-dir", data_dir, "--batch-size", "16", "--no-progress", *extra],
                 capsys)


@pytest.mark.parametrize("rows_by", ["rule", "stored"])
def test_engine_adds_a_member_equal_to_a_direct_build(built, data_dir, teachers, monkeypatch, rows_by):
  """A source's rows found by the grouped order's rule, or (as for an older row order) by its stored index and
  view."""
  direct = built["two"]  # Built before the row order is changed.
  if rows_by == "stored":
    monkeypatch.setattr(grow, "GROUPED", "no row order")
  config = source_config(open_cache(built["one"]).spec, teachers=(teachers[1],), data_dir=data_dir, batch_size=16,
                         out=str(built["root"] / f"engine_{rows_by}.zarr"), progress=False)
  grown = grow_cache(config, [built["one"]], history={"command": "extend", "added_members": ["t1"]})
  assert_same_cache(grown, direct)
  history = open_cache(grown).spec.history
  assert [h["command"] for h in history] == ["extend"] and len(history[0]["sources"]) == 1


def test_extend_adds_a_member_in_place_and_its_students_are_other_runs(built, data_dir, teachers, capsys, tmp_path):
  cache = _copy(built, "one", "inplace.zarr")
  # A student's identity: what its run dir's config.json records and a resume compares (`student_train.run_dir`).
  student = FitConfig(cache=cache, data_dir=data_dir, model="mlp-tiny", epochs=1, out=str(tmp_path / "run"))
  identity = json.loads(json.dumps(plan_run(student).record()))
  assert identity["cache"]["build_key"] == json.loads(json.dumps(open_cache(cache).spec.build_key()))
  code, _, err = _extend(cache, data_dir, "--teacher", teachers[1], capsys=capsys)
  assert code == 0, err
  assert_same_cache(cache, built["two"])
  assert all(check.ok is not False for check in verify_cache(cache, data_dir=data_dir))
  assert not os.path.exists(staging_path(cache)) and not os.path.exists(cache + REPLACED_SUFFIX)
  # The same command again: nothing to do, nothing changed.
  before = tree_digest(cache)
  assert _extend(cache, data_dir, "--teacher", teachers[1], capsys=capsys)[0] == 0
  assert tree_digest(cache) == before
  # A student of the old cache does not resume on the extended one: its identity differs in the cache's members (the
  # differences a resume refuses with).
  changed = differences(identity, json.loads(json.dumps(plan_run(student).record())), "run dir")
  assert any(line.startswith("cache.build_key.member_digests: ") for line in changed), changed


def test_extend_by_views_equals_a_direct_build_and_copies_the_old_rows(built, data_dir, teachers, capsys,
                                                                       monkeypatch):
  """Views 2 -> 4 of both members (their runs where the cache records them): only the new views' rows are
  rendered and computed."""
  direct = built["two4"]  # Built before rows are counted.
  rendered = []
  original = extend_module.grow_cache.__globals__["build"]._computed_chunks

  def counting(cache, row_set, chunks, *args, select=None, **kwargs):
    rendered.append((row_set, None if select is None else sum(len(select(c)) for c in chunks)))
    return original(cache, row_set, chunks, *args, select=select, **kwargs)
  monkeypatch.setattr(extend_module.grow_cache.__globals__["build"], "_computed_chunks", counting)
  out = str(built["root"] / "two4_grown.zarr")
  code, _, err = _extend(built["two"], data_dir, "--views", "4", "--out", out, capsys=capsys)
  assert code == 0, err
  assert_same_cache(out, direct)
  assert rendered == [("rows", 120 * 2)]  # The new views only; the eval logits are copied.
  assert open_cache(out).spec.history[-1]["views"] == [2, 4]


def test_extend_by_views_in_place_then_the_same_command_confirms(built, data_dir, capsys):
  """`extend CACHE --views N` run again once CACHE holds N views (a rerun after it completed, or after a kill in
  its switch-over) says there is nothing to do, as a rerun of `--teacher` does, rather than refusing N."""
  cache = _copy(built, "two", "views_inplace.zarr")
  code, _, err = _extend(cache, data_dir, "--views", "4", capsys=capsys)
  assert code == 0, err
  assert_same_cache(cache, built["two4"])
  before = tree_digest(cache)
  code, _, err = _extend(cache, data_dir, "--views", "4", capsys=capsys)
  assert code == 0 and "nothing to do" in err, err
  assert tree_digest(cache) == before


def test_extend_by_a_member_and_views_at_once(built, data_dir, teachers, capsys):
  out = str(built["root"] / "both.zarr")
  code, _, err = _extend(built["one"], data_dir, "--teacher", teachers[1], "--views", "4", "--out", out,
                         capsys=capsys)
  assert code == 0, err
  assert_same_cache(out, built["two4"])


def test_extend_sparse_with_features_equals_a_direct_build(built, data_dir, teachers, capsys):
  out = str(built["root"] / "sparse_grown.zarr")
  code, _, err = _extend(built["one_sparse"], data_dir, "--teacher", teachers[1], "--out", out, capsys=capsys)
  assert code == 0, err
  assert_same_cache(out, built["two_sparse"])
  assert [f.array_name for f in open_cache(out).spec.features] == ["feature.hidden1.pooled.m0",
                                                                    "feature.hidden1.pooled.m1"]
  code, info, _ = run_cli(main, ["info", out], capsys)  # `info` shows how it was grown: the member by its name.
  spec = open_cache(out).spec
  assert spec.history[0]["added_members"] == [spec.members[1].digest]
  assert code == 0 and f"extend (added_members ['{spec.member_name(1)}']) from " in info, info


def _committed(store) -> int:
  folder = os.path.join(store, "chunk_committed", "c")
  return len([f for f in os.listdir(folder) if f.isdigit()]) if os.path.isdir(folder) else 0


def test_sigkill_during_extend_leaves_the_original_and_a_rerun_completes_it(built, data_dir, teachers, capsys):
  cache = _copy(built, "one", "killed.zarr")
  before = tree_digest(cache)
  args = ["extend", cache, "--teacher", teachers[1], "--data-dir", data_dir, "--batch-size", "16", "--no-progress"]
  # Killed once two chunks of the grown store are committed (of 8), in the middle of the extend.
  code = textwrap.dedent(f"""
      import os, signal, time
      import teacher_cache.build as build
      put_rows, calls = build.put_rows, []
      def put_then_die(*a, **k):
        put_rows(*a, **k)
        calls.append(1)
        if len(calls) == 3:
          folder = os.path.join({staging_path(cache)!r}, "chunk_committed", "c")
          while not os.path.isdir(folder) or len([f for f in os.listdir(folder) if f.isdigit()]) < 2:
            time.sleep(0.01)
          os.kill(os.getpid(), signal.SIGKILL)
      build.put_rows = put_then_die
      from teacher_cache.cli import main
      main({args!r})
      """)
  process = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                              "PYTHONPATH": REPO}, capture_output=True, timeout=300)
  assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
  assert tree_digest(cache) == before
  assert all(check.ok is not False for check in verify_cache(cache, data_dir=data_dir))
  assert 2 <= _committed(staging_path(cache)) < 8
  code, _, err = run_cli(main, args, capsys)
  assert code == 0, err
  assert_same_cache(cache, built["two"])
  assert not os.path.exists(staging_path(cache)) and not os.path.exists(cache + REPLACED_SUFFIX)


class _Killed(BaseException):
  """A kill at a chosen point, in process: what it leaves is what a SIGKILL there leaves."""


@pytest.mark.parametrize("exchange", [True, False], ids=["exchanged", "two-renames"])
def test_a_kill_during_the_switch_is_finished_by_the_next_extend(built, data_dir, teachers, capsys, monkeypatch,
                                                                 exchange):
  cache = _copy(built, "one", f"switch_{exchange}.zarr")
  if exchange:  # Killed after the exchange, before the old cache is deleted.
    monkeypatch.setattr(extend_module.storage, "remove_tree", lambda path: (_ for _ in ()).throw(_Killed()))
    monkeypatch.setattr(extend_module.os, "rename", lambda a, b: (_ for _ in ()).throw(_Killed()))
  else:  # No exchange: killed between the two renames, with no cache at CACHE.
    monkeypatch.setattr(extend_module, "_exchange", lambda a, b: False)
    renames = []

    def rename(a, b):
      renames.append(a)
      if len(renames) == 2:
        raise _Killed()
      os.replace(a, b)
    monkeypatch.setattr(extend_module.os, "rename", rename)
  with pytest.raises(_Killed):
    extend_module.extend_cache(cache, BuildConfig(teachers=(teachers[1],), data_dir=data_dir, batch_size=16,
                                                  progress=False), extend_module.ExtendConfig())
  monkeypatch.undo()
  if exchange:
    assert_same_cache(cache, built["two"])
  else:
    assert not os.path.exists(cache) and os.path.exists(cache + REPLACED_SUFFIX)
    code, _, err = run_cli(main, ["info", cache], capsys)  # What is left says how to finish the switch.
    assert code == 2 and f"no cache at {cache!r}, but {staging_path(cache)!r} and {cache + REPLACED_SUFFIX!r} are " \
        "there" in err and "run that `teacher-cache extend` again to finish the switch." in err, err
  code, _, err = _extend(cache, data_dir, "--teacher", teachers[1], capsys=capsys)
  assert code == 0, err
  assert_same_cache(cache, built["two"])
  assert sorted(os.listdir(built["root"])) == sorted(set(os.listdir(built["root"])) - {
      os.path.basename(staging_path(cache)), os.path.basename(cache + REPLACED_SUFFIX)})


def test_a_job_of_two_processes_extends_in_place(built, data_dir, teachers):
  from test_distributed import _job, _wait  # pylint: disable=import-outside-toplevel
  cache = _copy(built, "one", "job.zarr")
  ended = _wait(_job("teacher_cache", ["extend", cache, "--teacher", teachers[1], "--data-dir", data_dir,
                                       "--batch-size", "16"], processes=2, heartbeat=10))
  assert all(code == 0 for code, _ in ended), ended
  assert_same_cache(cache, built["two"])
  # Each process wrote its own share of the chunks (one writer per chunk): together, every row once.
  written = [[int(n) for n in re.findall(r"^(?:\S+: )?(\d+) rows in [\d.]+ s$", err, re.M)] for _, err in ended]
  rows = {name: open_cache(cache)[name].shape[0] for name in ("index", "eval_index")}
  assert all(len(w) == 1 and 0 < w[0] < sum(rows.values()) for w in written), ended
  assert sum(w[0] for w in written) == sum(rows.values()), (written, rows)


def test_extend_onto_an_object_store(built, data_dir, teachers, s3, capsys):
  from conftest import BUCKET  # pylint: disable=import-outside-toplevel
  url = f"s3://{BUCKET}/grow/two.zarr"
  code, _, err = _extend(built["one"], data_dir, "--teacher", teachers[1], "--out", url, capsys=capsys)
  assert code == 0, err
  prefix = url.split("://", 1)[1]
  s3.invalidate_cache()
  objects = {key[len(prefix) + 1:]: s3.cat_file(key) for key in s3.find(prefix) if not key.endswith("zarr.json")}
  import hashlib  # pylint: disable=import-outside-toplevel
  assert {k: hashlib.sha256(v).hexdigest() for k, v in objects.items()} == array_files(built["two"])



def test_a_new_member_without_the_cache_s_features_is_refused(built, data_dir, teachers, capsys):
  before = tree_digest(built["one_sparse"])
  out = str(built["root"] / "refused.zarr")
  code, _, err = _extend(built["one_sparse"], data_dir, "--teacher", teachers[2], "--out", out, capsys=capsys)
  errors = [line for line in err.splitlines() if ": error: " in line]
  assert code == 2 and len(errors) == 1 and "stores features 'hidden1:pooled' of every member, which a new member " \
      "must have too" in errors[0], err
  assert tree_digest(built["one_sparse"]) == before and not os.path.exists(out)


def test_more_views_take_the_default_chunk_rows_where_the_cache_s_do_not_hold_whole_examples(built, data_dir,
                                                                                             capsys):
  out = str(built["root"] / "three_views.zarr")
  code, _, err = _extend(built["one"], data_dir, "--views", "3", "--out", out, capsys=capsys)
  assert code == 0, err
  assert open_cache(out).spec.chunk_rows == 4095  # 32 is not a multiple of 3: the default 4096 rounded down.
  direct = built.get((0,), views=3, chunk_rows=4095)
  assert_same_cache(out, direct)  # The eval logits too, read across the cache's chunks of other rows.


def test_a_cache_of_mixed_views_takes_a_member_and_more_views(built, data_dir, teachers, capsys):
  """Mixed views: a member is added as a direct build adds it, and more views too (a row's partner, λ and box do not
  depend on the view count), so the rows kept and the rows added are a direct build's with the final views."""
  one = built.get((0,), mix="cutmix:1", eval_split="none")
  two = built.get((0, 1), mix="cutmix:1", eval_split="none")
  out = str(built["root"] / "mix_grown.zarr")
  code, _, err = _extend(one, data_dir, "--teacher", teachers[1], "--out", out, capsys=capsys)
  assert code == 0, err
  assert_same_cache(out, two)
  four = built.get((0,), mix="cutmix:1", eval_split="none", views=4)
  out = str(built["root"] / "mix_four_grown.zarr")
  code, _, err = _extend(one, data_dir, "--views", "4", "--out", out, capsys=capsys)
  assert code == 0, err
  assert_same_cache(out, four)


def test_a_member_with_rows_no_source_holds_is_refused_before_anything_is_written(built, data_dir):
  """More views than the source holds and no run for its member: refused from the specs, before the store is made."""
  out = built["root"] / "unrun.zarr"
  config = source_config(open_cache(built["one"]).spec, views=4, data_dir=data_dir, out=str(out), progress=False)
  with pytest.raises(grow.StillroomError, match=r"member 0 \('.*'\) has rows that no source holds; give its run with "
                                           r"--teacher"):
    grow_cache(config, [built["one"]])
  assert not os.path.exists(out) and not os.path.exists(f"{out}.lock")


def test_the_engine_holds_the_cells_of_one_chunk_at_a_time(built, data_dir, monkeypatch):
  """Each chunk's cells are worked out as it is written, not every row's before the first write: a grow copying
  from a source holds one chunk's plan at a time (the memory of a cache of any size)."""
  source = built["two"]  # Built (when first asked for) before the patches below.
  planned, held = grow._cells, {"now": 0, "most": 0}

  def counting(sources, spec, rows, *args):
    held["now"] += len(rows)
    held["most"] = max(held["most"], held["now"])
    return planned(sources, spec, rows, *args)
  put_rows = grow.build.put_rows

  def written(writer, cache, chunk, arrays, *args):
    held["now"] -= len(arrays["index"])
    return put_rows(writer, cache, chunk, arrays, *args)
  monkeypatch.setattr(grow, "_cells", counting)
  monkeypatch.setattr(grow.build, "put_rows", written)
  spec = open_cache(source).spec
  config = source_config(spec, data_dir=data_dir, out=str(built["root"] / "held.zarr"), progress=False)
  grow_cache(config, [source], members=[spec.members[1].digest], history={"command": "subset"})
  assert held == {"now": 0, "most": spec.chunk_rows} and spec.num_rows > spec.chunk_rows


def test_extend_loads_each_teacher_once(built, data_dir, teachers, capsys, monkeypatch):
  """The runs extend reads to check its command line are the ones the engine computes with: no second read."""
  one, two = built["one"], built["two"]  # Built (when first asked for) before the patches below.
  loads = []
  for module in (extend_module, grow):
    monkeypatch.setattr(module, "load_teacher", lambda run, *a, _load=module.load_teacher, **k: (
        loads.append(run), _load(run, *a, **k))[1])
  out = str(built["root"] / "loaded_once.zarr")
  code, _, err = _extend(one, data_dir, "--teacher", teachers[1], "--out", out, capsys=capsys)
  assert code == 0, err
  assert loads == [teachers[1]]
  assert_same_cache(out, two)


@pytest.mark.fast
def test_info_history_names_the_members_and_leaves_out_what_did_not_change():
  new, old, source = "ab" * 32, "cd" * 32, "ef" * 32
  spec = {"members": [{"name": "t0", "digest": old}, {"name": "t1", "digest": new}],
          "history": [{"command": "extend", "sources": [source], "at": "T", "added_members": [new], "views": [2, 2]},
                      {"command": "subset", "sources": [source], "at": "U", "members": ["t1"], "views": [4, 2],
                       "gone": ["12" * 32]}]}
  assert history_lines(spec) == [
      "T: extend (added_members ['t1']) from efefefefefef…",
      "U: subset (members ['t1'], views [4, 2], gone ['121212121212…']) from efefefefefef…"]


@pytest.mark.fast
def test_a_missing_cache_s_error_knows_what_extend_leaves_beside_it():
  """`open_cache`'s error for a missing CACHE names the stores an extend's switch-over leaves (`teacher_cache.extend`
  writes them; shared code does not import it)."""
  assert SWITCH_SUFFIXES == (STAGING_SUFFIX, REPLACED_SUFFIX)


@pytest.mark.fast
def test_a_settings_difference_shows_digests_by_their_first_12_hex_digits():
  """Run dirs' (`shared.settings.differences`), as caches' (`CacheSpec.mismatches`, pinned in test_derive)."""
  assert differences({"d": ["a" * 64]}, {"d": ["a" * 64, "b" * 64]}, "run dir") == [
      "d: ['aaaaaaaaaaaa…'] (run dir) vs ['aaaaaaaaaaaa…', 'bbbbbbbbbbbb…'] (command)"]
