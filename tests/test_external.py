"""Teachers outside JAX: `teacher-cache views` gives every row's teacher input as a build with the same settings
renders and normalises it, and `teacher-cache import` of a build's own logits writes that build (a second reader);
the scikit-learn example of docs/external-teachers.md end to end; the errors for logits of other rows."""

import dataclasses
import importlib.util
import json
import os
import re

import jax
import numpy as np
import pytest

import conftest
from shared.cache import GROUPED, PERMUTED, open_cache, row_sources
from shared.data import open_transfer_set
from shared.errors import StillroomError
from shared.runs import load_teacher
from shared.shapes import ShapesConfig, write_shapes
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.cli import main as cache_main
from student_train.config import FitConfig
from student_train.train import fit
from teacher_cache import external
from teacher_cache.external import chunk_file, import_cache, read_views, write_views
from teacher_cache.verify import verify_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_views_are_the_rows_of_a_cache_with_the_same_settings(tmp_path, tmp_path_factory, data_dir, teachers,
                                                               capsys):
  out = str(tmp_path / "views")
  code, printed, err = conftest.run_cli(cache_main, ["views", "--dataset", "digits", "--data-dir", data_dir,
                                                     "--views", "2", "--seed", "3", "--chunk-rows", "1000",
                                                     "--batch-size", "64", "--out", out, "--no-progress"], capsys)
  assert code == 0, err
  record = read_views(out)
  assert record["rows"] == 2 * 1437 and "wrote 2874 rows" in printed
  cache = open_cache(conftest.digits_cache(tmp_path_factory, data_dir, teachers[:1], views=2, seed=3,
                                           chunk_rows=1000))
  data = open_transfer_set("digits", "train", data_dir)
  augmentation, normalization = cache.spec.augmentation, data.normalization
  assert record["dataset"]["fingerprint"] == cache.spec.dataset.fingerprint
  for chunk in range(3):
    with np.load(f"{out}/{chunk_file(chunk)}") as files:
      x, row = files["x"], files["row"]
    start, stop = cache.chunk_bounds(chunk)
    np.testing.assert_array_equal(row, np.arange(start, stop))
    # The reference: the cache's own rows, rendered from the view parameters it stored (not drawn again).
    index, params = cache["index"][start:stop], {name: cache[name][start:stop] for name in augmentation.param_names}
    inputs, _ = data.read(data.positions(index))
    np.testing.assert_array_equal(x, normalization.apply(augmentation.render(inputs, params)))
    assert x.dtype == np.float32


def test_views_refuse_another_folder_and_other_settings(tmp_path, data_dir):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("mine")
  config = BuildConfig(dataset="digits", data_dir=data_dir, views=1, out=str(tmp_path / "mine"), progress=False)
  with pytest.raises(StillroomError, match="holds other files"):
    write_views(config)
  config = BuildConfig(dataset="digits", data_dir=data_dir, views=1, out=str(tmp_path / "v"), progress=False)
  write_views(config)
  with pytest.raises(StillroomError, match=r"holds views of other settings: rows: 1437 \(views\) vs 2874 "
                                           r"\(command\); views: 1 \(views\) vs 2"):
    write_views(BuildConfig(**{**config.__dict__, "views": 2}))
  assert json.loads((tmp_path / "v" / "views.json").read_text())["views"] == 1


def _write_logits(path, row: np.ndarray, logits: np.ndarray) -> str:
  np.savez(path, row=row, logits=logits)
  return str(path)


@pytest.mark.parametrize("targets", ["dense", "topk:3", "sample:4"])
def test_an_import_of_a_builds_own_logits_is_that_build(targets, tmp_path, tmp_path_factory, data_dir, teachers):
  """The second reader is a build: given the logits its members stored (in a shuffled row order), `import` writes the
  same rows, targets and stored logits (bit for bit at the same --batch-size: XLA may round a float32 top-k rest
  differently in batches of another shape), and records the same spec but for the members."""
  options = {"views": 2, "seed": 3, "chunk_rows": 1000, "targets": targets, "member_logits": True}
  built = open_cache(conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2], eval_split="none", **options))
  stored = built["member_logits"][:].astype(np.float32)  # Exact: float16 -> float32 -> float16 is the identity.
  order = np.random.default_rng(0).permutation(len(stored))
  files = [_write_logits(tmp_path / f"m{m}.npz", order, stored[order, m]) for m in range(2)]
  out = import_cache(BuildConfig(dataset="digits", data_dir=data_dir, out=str(tmp_path / "imported.zarr"),
                                 batch_size=256, progress=False, **options), files)
  imported = open_cache(out)
  assert imported.complete and not [c for c in verify_cache(out) if c.failed]
  assert [m.name for m in imported.spec.members] == ["m0", "m1"]
  assert {m.model for m in imported.spec.members} == {"imported"}
  assert imported.spec.build_key() | {"member_digests": None} == built.spec.build_key() | {"member_digests": None}
  assert [a.name for a in imported.spec.arrays] == [a.name for a in built.spec.arrays]
  for array in built.spec.arrays:
    np.testing.assert_array_equal(imported[array.name][:], built[array.name][:], err_msg=array.name)


def test_views_then_sklearn_then_import_then_verify_and_fit(tmp_path, data_dir, capsys):
  """The worked example of docs/external-teachers.md: a scikit-learn teacher (scripts/sklearn_teacher.py) labels the
  views, and students distil from its cache."""
  views = str(tmp_path / "views")
  common = ["--dataset", "digits", "--data-dir", data_dir, "--views", "2", "--seed", "1", "--no-progress"]
  assert conftest.run_cli(cache_main, ["views", *common, "--chunk-rows", "1024", "--out", views], capsys)[0] == 0
  member = str(tmp_path / "sklearn.npz")
  script = importlib.util.spec_from_file_location("sklearn_teacher", os.path.join(REPO, "scripts/sklearn_teacher.py"))
  module = importlib.util.module_from_spec(script)
  script.loader.exec_module(module)
  module.main([views, member, "--data-dir", data_dir])
  with np.load(member) as files:
    rows, logits = files["row"], files["logits"]
  cache = str(tmp_path / "sklearn.zarr")
  code, _, err = conftest.run_cli(cache_main, ["import", *common, "--views-dir", views, "--logits", member,
                                               "--temperature", "2", "--out", cache], capsys)
  assert code == 0, err
  accuracy, view0 = map(float, re.search(r"member 'sklearn': accuracy ([\d.]+)% on the 2874 labelled rows \(view 0: "
                                          r"([\d.]+)%\)", err).groups())
  assert view0 > 95  # On its own training inputs; their shifted views are harder for a linear model.
  code, printed, _ = conftest.run_cli(cache_main, ["verify", cache, "--dataset", "digits", "--data-dir", data_dir],
                                      capsys)
  assert code == 0 and "FAIL" not in printed
  # Its targets are its own probabilities at T = 2, row by row, from its logits as stored (float16).
  stored = open_cache(cache)
  in_row_order = logits[np.argsort(rows)].astype(np.float16)
  np.testing.assert_array_equal(stored["member_logits"][:, 0], in_row_order)
  expected = conftest.numpy_log_softmax(in_row_order.astype(np.float64) / 2)
  np.testing.assert_allclose(stored["targets"][:].astype(np.float64), expected, rtol=2e-3, atol=2e-3)
  right = np.argmax(expected, axis=1) == stored["labels"][:]
  assert accuracy == pytest.approx(100 * right.mean(), abs=0.005)
  assert view0 == pytest.approx(100 * right[stored["view"][:] == 0].mean(), abs=0.005)
  final = fit(FitConfig(cache=cache, data_dir=data_dir, epochs=2, out=str(tmp_path / "student"), progress=False,
                        workers=0), log_epochs=False)
  assert final["eval_accuracy"] > 0.5  # Chance: 0.1.
  # The same logits under another seed are of other rows: refused against the views, a warning without them.
  other = ["--dataset", "digits", "--data-dir", data_dir, "--views", "2", "--seed", "2", "--no-progress",
           "--logits", member, "--out", str(tmp_path / "other.zarr")]
  code, _, err = conftest.run_cli(cache_main, ["import", *other, "--views-dir", views], capsys)
  assert code != 0 and "augmentation.seed: 1 (views) vs 2 (command)" in err
  code, _, err = conftest.run_cli(cache_main, ["import", *other], capsys)
  assert code == 0 and "warning: member 'sklearn' is near chance on view 0" in err
  # Views written before the grouped row order (a views.json without one) numbered their rows view-major, each view
  # in its own permutation: import keeps that order, so that each row id still names the row the teacher labelled.
  record = json.loads(open(os.path.join(views, "views.json")).read())
  del record["row_order"]
  with open(os.path.join(views, "views.json"), "w") as f:
    json.dump(record, f)
  count = len(rows) // 2
  grouped_view, grouped_position = row_sources(rows, count, 1, GROUPED, 2)
  old_view, old_position = row_sources(np.arange(2 * count), count, 1, PERMUTED, 2)
  old_id = {(int(v), int(p)): r for r, (v, p) in enumerate(zip(old_view, old_position))}
  old_member = str(tmp_path / "old.npz")
  np.savez(old_member, row=np.array([old_id[(int(v), int(p))] for v, p in zip(grouped_view, grouped_position)]),
           logits=logits)
  code, _, err = conftest.run_cli(cache_main, ["import", *common, "--views-dir", views, "--logits", old_member,
                                               "--temperature", "2", "--out", str(tmp_path / "old.zarr")], capsys)
  assert code == 0, err
  old, new = open_cache(str(tmp_path / "old.zarr")), open_cache(cache)
  assert old.spec.row_order == PERMUTED and new.spec.row_order == GROUPED
  by_row = [{(int(i), int(v)): k for k, (i, v) in enumerate(zip(c["index"][:], c["view"][:]))} for c in (old, new)]
  order = [by_row[0][key] for key in by_row[1]]
  np.testing.assert_array_equal(old["member_logits"][:][order], new["member_logits"][:][list(by_row[1].values())])


@pytest.mark.parametrize("edit, message", [
    (lambda row, logits: (row[1:], logits[1:]), r"has no logits for 1 of the 1437 rows, row ids \d+;"),
    (lambda row, logits: (np.r_[row, row[:2]], np.r_[logits, logits[:2]]),
     r"2 row id\(s\) appear more than once: \d+, \d+;"),
    (lambda row, logits: (np.where(row == 7, 1437, row), logits),
     r"1 row id\(s\) are not rows of these views \(0\.\.1436\): 1437;"),
    (lambda row, logits: (row, np.where(row[:, None] == 5, np.nan, logits)), r"not finite: row ids 5\.$"),
    (lambda row, logits: (row, logits[:, :4]), r"bad.npz' has 4 classes, but '.*ok.npz' has 10"),
    (lambda row, logits: (row.astype(float), logits), "`row` must be a 1-D integer array"),
])
def test_import_refuses_logits_of_other_rows(edit, message, tmp_path, data_dir):
  row = np.random.default_rng(1).permutation(1437)
  files = [_write_logits(tmp_path / "ok.npz", row, np.random.default_rng(2).normal(size=(1437, 10)))]
  files.append(_write_logits(tmp_path / "bad.npz", *edit(row, np.random.default_rng(3).normal(size=(1437, 10)))))
  config = BuildConfig(dataset="digits", data_dir=data_dir, out=str(tmp_path / "c.zarr"), progress=False)
  with pytest.raises(StillroomError, match=message):
    import_cache(config, files)
  assert not os.path.exists(tmp_path / "c.zarr")  # Checked before anything is written.


def test_import_refuses_unreadable_and_repeated_files(tmp_path, data_dir):
  config = BuildConfig(dataset="digits", data_dir=data_dir, out=str(tmp_path / "c.zarr"), progress=False)
  good = _write_logits(tmp_path / "good.npz", np.arange(1437), np.random.default_rng(0).normal(size=(1437, 10)))
  (tmp_path / "text.npz").write_text("not an npz")
  np.savez(tmp_path / "keys.npz", rows=np.arange(1437), logits=np.zeros((1437, 10)))
  few = _write_logits(tmp_path / "few.npz", np.arange(1437), np.zeros((1437, 4)))
  np.save(tmp_path / "plain.npy", np.zeros((1437, 10)))
  for files, message in [([str(tmp_path / "text.npz")], "cannot be read as an .npz file"),
                         ([str(tmp_path / "plain.npy")], r"holds one array \(float64 \(1437, 10\)\)"),
                         ([str(tmp_path / "absent.npz")], "cannot be read as an .npz file"),
                         ([str(tmp_path / "keys.npz")], r"holds \['logits', 'rows'\]; it needs `row`"),
                         ([few], r"few.npz' holds 4 classes, but dataset 'digits' has 10"),
                         ([good, good], "hold the same logits")]:
    with pytest.raises(StillroomError, match=message):
      import_cache(config, files)


class Interrupted(Exception):
  pass


def test_an_interrupted_import_resumes_to_the_uninterrupted_store(tmp_path, data_dir, monkeypatch, capsys):
  files = [_write_logits(tmp_path / f"m{m}.npz", np.random.default_rng(m).permutation(1437),
                         np.random.default_rng(10 + m).normal(size=(1437, 10))) for m in range(2)]
  options = {"dataset": "digits", "data_dir": data_dir, "chunk_rows": 500, "progress": False}
  whole = import_cache(BuildConfig(out=str(tmp_path / "whole.zarr"), **options), files)
  put_rows, calls = external.put_rows, []

  def stop_at_the_second_chunk(*args):
    calls.append(args[2])
    if len(calls) == 2:
      raise Interrupted
    put_rows(*args)

  monkeypatch.setattr(external, "put_rows", stop_at_the_second_chunk)
  config = BuildConfig(out=str(tmp_path / "resumed.zarr"), **options)
  with pytest.raises(Interrupted):
    import_cache(config, files)
  assert not open_cache(config.out, require_complete=False).complete
  with pytest.raises(StillroomError, match="run the same `teacher-cache import` command again"):
    open_cache(config.out)
  monkeypatch.setattr(external, "put_rows", put_rows)
  capsys.readouterr()
  import_cache(config, files)
  assert "resuming" in capsys.readouterr().err and calls == [0, 1]
  assert conftest.array_files(config.out) == conftest.array_files(whole)


def test_views_again_with_other_settings_replace_every_file(tmp_path, data_dir):
  config = BuildConfig(dataset="digits", data_dir=data_dir, views=2, chunk_rows=1000, out=str(tmp_path / "v"),
                       progress=False)
  write_views(config)
  assert len(os.listdir(tmp_path / "v")) == 4  # 3 chunks and views.json.
  write_views(BuildConfig(**{**config.__dict__, "views": 1, "overwrite": True}))
  assert sorted(os.listdir(tmp_path / "v")) == ["views.json", chunk_file(0), chunk_file(1)]
  assert read_views(str(tmp_path / "v"))["rows"] == 1437


def test_crop_views_import_to_the_build_of_the_same_teacher(tmp_path, tmp_path_factory):
  """Images of varying size with crop views (--image-size): the views are the teacher's inputs, and importing the
  teacher's own logits on them gives the build's store (crop boxes drawn from the images' sizes)."""
  root = str(tmp_path_factory.mktemp("shapes") / "s")
  write_shapes(root, ShapesConfig(train_per_class=4, test_per_class=1, min_side=20, max_side=40))
  teacher = conftest.make_teacher(tmp_path / "t", input_shape=(12, 12, 3), normalization={"shift": 0.0, "scale": 255.0})
  options = {"dataset": f"imagefolder:{root}/train", "image_size": 12, "views": 3, "flip": True, "chunk_rows": 15,
             "progress": False, "eval_split": "none"}
  built = open_cache(build_cache(BuildConfig(teachers=(teacher,), out=str(tmp_path / "built.zarr"), **options)))
  views = str(tmp_path / "views")
  write_views(BuildConfig(out=views, **options))
  run = load_teacher(teacher)
  rows, logits = [], []
  for chunk in range(built.spec.num_chunks):
    with np.load(os.path.join(views, chunk_file(chunk))) as files:
      start, stop = built.chunk_bounds(chunk)
      np.testing.assert_array_equal(files["row"], np.arange(start, stop))
      rows.append(files["row"])
      # The views are normalised by the dataset's default (pixels / 255), which is this teacher's own.
      logits.append(np.asarray(jax.jit(run.apply_fn)(run.params, files["x"])))
  np.testing.assert_allclose(np.concatenate(logits), built["member_logits"][:, 0].astype(np.float32), atol=2e-2)
  files = [_write_logits(tmp_path / "t.npz", np.concatenate(rows), built["member_logits"][:, 0].astype(np.float32))]
  imported = open_cache(import_cache(BuildConfig(out=str(tmp_path / "imported.zarr"), **options), files))
  for array in built.spec.arrays:
    np.testing.assert_array_equal(imported[array.name][:], built[array.name][:], err_msg=array.name)


def test_views_are_checked_before_out_is_touched_and_a_killed_write_reruns(tmp_path, data_dir):
  config = BuildConfig(dataset="digits", data_dir=data_dir, chunk_rows=1000, out=str(tmp_path / "v"), progress=False)
  write_views(config)
  before = sorted(os.listdir(tmp_path / "v"))
  for bad, message in [({"workers": -2}, "--workers"), ({"seed": -1}, "seed"), ({"batch_size": 0}, "--batch-size")]:
    with pytest.raises(StillroomError, match=message):
      write_views(BuildConfig(**{**config.__dict__, **bad}))
    assert sorted(os.listdir(tmp_path / "v")) == before  # Nothing deleted.
  # A kill while a chunk was being written leaves it beside its name, and no views.json.
  os.remove(tmp_path / "v" / "views.json")
  os.rename(tmp_path / "v" / chunk_file(1), tmp_path / "v" / (chunk_file(1) + ".tmp"))
  with pytest.raises(StillroomError, match="has no readable views.json"):
    read_views(str(tmp_path / "v"))
  write_views(config)
  assert sorted(os.listdir(tmp_path / "v")) == before
  stamps = {name: os.stat(tmp_path / "v" / name).st_mtime_ns for name in before}
  write_views(config)  # Whole already: nothing is rewritten.
  assert {name: os.stat(tmp_path / "v" / name).st_mtime_ns for name in before} == stamps
  # A file of the user's that merely looks like ours is not deleted.
  (tmp_path / "v" / "views_mine.npz").write_bytes(b"mine")
  with pytest.raises(StillroomError, match="holds other files than views"):
    write_views(BuildConfig(**{**config.__dict__, "views": 2, "overwrite": True}))
  assert (tmp_path / "v" / "views_mine.npz").read_bytes() == b"mine"


def test_import_refuses_logits_beyond_the_storage_range_and_clashing_names(tmp_path, data_dir):
  config = BuildConfig(dataset="digits", data_dir=data_dir, out=str(tmp_path / "c.zarr"), progress=False)
  large = np.random.default_rng(0).normal(size=(1437, 10))
  large[7] *= 1e6
  order = np.random.default_rng(1).permutation(1437)
  big = _write_logits(tmp_path / "big.npz", order, large[order])
  with pytest.raises(StillroomError, match=r"exceed float16's range .* row ids 7; pass --dtype float32"):
    import_cache(config, [big])
  assert not os.path.exists(config.out)
  assert open_cache(import_cache(dataclasses.replace(config, dtype="float32"), [big])).complete
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  same = [_write_logits(tmp_path / d / "logits.npz", np.arange(1437), np.random.default_rng(k).normal(size=(1437, 10)))
          for k, d in enumerate("ab")]
  with pytest.raises(StillroomError, match="would both be member 'logits'; rename one file"):
    import_cache(dataclasses.replace(config, out=str(tmp_path / "d.zarr")), same)
  one = _write_logits(tmp_path / "one.npz", np.arange(1437), np.zeros((1437, 1)))
  with pytest.raises(StillroomError, match="C >= 2 classes"):
    import_cache(dataclasses.replace(config, out=str(tmp_path / "d.zarr")), [one])
