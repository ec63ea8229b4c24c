"""Sparse cached targets (`--targets topk:K|sample:K`): what the store holds against a dense cache of the same
teachers (a second reader), reproducible draws, verify, info, fit and sweep on them, and the clear errors for what a
sparse cache cannot re-derive."""

import json

import numpy as np
import pytest

import conftest
from shared import storage
from shared.cache import open_cache
from shared.ensemble import combine_log_probs
from shared.errors import StillroomError
from student_train.config import FitConfig
from student_train.run_dir import read_final
from student_train.sweep import report, run_sweep
from student_train.train import fit
from teacher_cache.cli import main as cache_main
from teacher_cache.verify import verify_cache


@pytest.fixture(scope="module")
def dense(tmp_path_factory, data_dir, teachers) -> str:
  return conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2], chunk_rows=512)


@pytest.fixture(scope="module")
def topk(tmp_path_factory, data_dir, teachers) -> str:
  return conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2], chunk_rows=512, targets="topk:3")


@pytest.fixture(scope="module")
def sample(tmp_path_factory, data_dir, teachers) -> str:
  return conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2], chunk_rows=512, targets="sample:3")


@pytest.fixture(scope="module")
def topk_with_logits(tmp_path_factory, data_dir, teachers) -> str:
  return conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2], chunk_rows=512, targets="topk:3",
                               member_logits=True)


def _rows(path: str, names) -> dict[str, np.ndarray]:
  cache = open_cache(path)
  return {name: cache[name][:] for name in names}


def test_topk_stores_the_k_most_probable_classes_and_the_rest(dense, topk):
  expected = _rows(dense, ["targets"])["targets"].astype(np.float32)  # [R, C] log-probabilities at T (float16).
  got = _rows(topk, ["target_ids", "target_log_probs", "target_rest"])
  assert open_cache(topk).spec.array("targets") is None and open_cache(topk).spec.array("member_logits") is None
  order = np.argsort(-expected, axis=1, kind="stable")[:, :3]
  np.testing.assert_array_equal(np.take_along_axis(expected, got["target_ids"].astype(np.int64), 1),
                                np.take_along_axis(expected, order, 1))  # The top 3 (ties in any order).
  np.testing.assert_array_equal(got["target_log_probs"].astype(np.float32),
                                np.take_along_axis(expected, got["target_ids"].astype(np.int64), 1))
  outside = np.ones_like(expected, bool)
  np.put_along_axis(outside, got["target_ids"].astype(np.int64), False, 1)
  rest = np.log(np.where(outside, np.exp(expected.astype(np.float64)), 0).sum(1))
  np.testing.assert_allclose(got["target_rest"], rest, atol=5e-3)  # The dense values are rounded to float16.


def test_sampled_targets_are_reproducible_draws_from_the_ensemble(dense, sample, tmp_path_factory, data_dir,
                                                                  teachers):
  expected = _rows(dense, ["targets"])["targets"].astype(np.float32)
  got = _rows(sample, ["target_ids", "target_counts", "target_log_probs"])
  counts, ids = got["target_counts"].astype(np.int64), got["target_ids"].astype(np.int64)
  assert np.all(counts.sum(1) == 3) and got["target_ids"].dtype == np.int16
  drawn = counts > 0
  np.testing.assert_array_equal(got["target_log_probs"][drawn].astype(np.float32),
                                np.take_along_axis(expected, ids, 1)[drawn])
  # The same draws whatever the batch size and chunk size of the build (a row's draws depend on the seed, its
  # example and its view alone), and the same store again.
  other = conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2], chunk_rows=300, batch_size=100,
                                targets="sample:3")
  for name in ("target_ids", "target_counts", "target_log_probs"):
    np.testing.assert_array_equal(_rows(other, [name])[name], got[name])
  again = conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2], chunk_rows=512, targets="sample:3")
  assert conftest.array_files(again) == conftest.array_files(sample)


def test_sampled_targets_follow_the_ensemble_distribution(dense, tmp_path_factory, data_dir, teachers):
  """At T = 0.1 the random teachers' ensemble is peaked: over all rows, its top class is drawn as often as its
  probability says (within 4 standard deviations), which a uniform draw would miss by far more."""
  peaked = conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2], chunk_rows=512, targets="sample:8",
                                 temperature=0.1)
  logits = _rows(dense, ["member_logits"])["member_logits"]  # The same teachers' logits, as stored.
  p = np.exp(np.asarray(combine_log_probs(logits, 0.1, "arithmetic"), np.float64))
  got = _rows(peaked, ["target_ids", "target_counts"])
  top = p.argmax(1)
  observed = np.sum(np.where(got["target_ids"] == top[:, None], got["target_counts"], 0))
  p_top = p[np.arange(len(p)), top]
  expected, sd = 8 * p_top.sum(), np.sqrt(8 * (p_top * (1 - p_top)).sum())
  assert abs(observed - expected) < 4 * sd, (observed, expected, sd)
  assert expected - 8 * len(p) / p.shape[1] > 8 * sd  # The test's power: uniform draws would fail it.


def test_sparse_caches_are_far_smaller_and_pass_verify_and_info(dense, topk, sample, data_dir, capsys):
  for path in (topk, sample):
    checks = verify_cache(path, data_dir=data_dir)
    assert all(check.ok for check in checks), [c for c in checks if not c.ok]
    assert storage.size(path) < storage.size(dense)
    teacher_bytes = lambda spec: sum(np.dtype(a.dtype).itemsize * np.prod(a.shape) for a in spec.arrays  # noqa: E731
                                     if a.role == "teacher")
    assert teacher_bytes(open_cache(path).spec) < teacher_bytes(open_cache(dense).spec) / 3  # 16 vs 60 B per row.
    code, out, _ = conftest.run_cli(cache_main, ["info", path, "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["spec"]["targets"] == open_cache(path).spec.targets and info["spec"]["member_logits"] is False
    assert info["spec"]["schema_version"] == 6 and info["stats"]["members"][0]["accuracy"] is None
  # The ensemble's accuracy from the stored top-1 is the dense cache's (top-k), and the top-k mass is the dense
  # targets' mass on their 3 most probable classes.
  dense_rows = _rows(dense, ["targets", "labels"])
  probs = np.exp(dense_rows["targets"].astype(np.float64))
  topk_info = json.loads(conftest.run_cli(cache_main, ["info", topk, "--json"], capsys)[1])["stats"]
  # (Up to near-ties: top-k ranks the float32 log-probabilities, the dense targets are rounded to float16.)
  assert topk_info["ensemble"]["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == dense_rows["labels"]),
                                                            abs=2e-3)
  assert topk_info["mean_topk_mass"] == pytest.approx(np.sort(probs, 1)[:, -3:].sum(1).mean(), abs=2e-3)
  assert topk_info["mean_top1_probability"] == pytest.approx(probs.max(1).mean(), abs=1e-3)
  # A dense spec holds no sparse-target fields, as before schema 6 (when that let a stillroom that predates them read
  # it); schema 6 is every store's, sparse or dense, and was a sparse store's schema 3 (`legacy_schema_version`).
  assert "targets" not in open_cache(dense).spec.to_attrs() and open_cache(dense).spec.schema_version == 6
  assert open_cache(path).spec.legacy_schema_version() == 3 and open_cache(dense).spec.legacy_schema_version() == 2


def _tampered(path: str, tmp_path, name: str, edit) -> str:
  """A copy of a store with `edit(values)` applied to array `name`, the checksums and the completion record then
  matching the new values."""
  import shutil  # pylint: disable=import-outside-toplevel
  import zarr  # pylint: disable=import-outside-toplevel
  copy = str(tmp_path / f"{name}.zarr")
  shutil.rmtree(copy, ignore_errors=True)
  shutil.copytree(path, copy)
  array = zarr.open_group(copy, mode="r+")[name]
  values = array[:]
  edit(values)
  array[:] = values
  conftest.reseal(copy)  # The completion record lists the changed chunks: only the checks of the contents see it.
  return copy


@pytest.mark.parametrize("store, name, edit", [
    ("topk", "target_ids", lambda v: v.__setitem__((0, 0), 99)),  # Not a class.
    ("topk", "target_log_probs", lambda v: v.__setitem__((0, slice(None)), v[0, ::-1].copy())),  # Not in order.
    ("topk", "target_rest", lambda v: v.__setitem__(0, v[0] - 0.015)),  # The mass no longer sums to 1.
    ("topk", "target_log_probs", lambda v: v.__setitem__((0, 1), np.nan)),
    ("topk_with_logits", "target_rest", lambda v: v.__setitem__(0, v[0] - 0.002)),  # Not the ensemble's rest.
    ("sample", "target_counts", lambda v: v.__setitem__((0, 0), v[0, 0] + 1)),  # More than K draws.
    ("topk_with_logits", "target_log_probs", lambda v: v.__setitem__((0, 0), v[0, 0] - 0.5)),  # Not the ensemble's.
    ("topk_with_logits", "target_ids", lambda v: v.__setitem__((0, 2), (v[0, :3].max() + 1) % 10 if (
        v[0, :3].max() + 1) % 10 not in v[0, :3] else (v[0, :3].max() + 2) % 10)),  # Not among the top 3.
])
def test_a_damaged_sparse_target_fails_verify(store, name, edit, request, tmp_path, data_dir):
  path = request.getfixturevalue(store)
  assert all(check.ok is not False for check in verify_cache(path, data_dir=data_dir))
  failed = [check for check in verify_cache(_tampered(path, tmp_path, name, edit), data_dir=data_dir) if check.failed]
  failed = [check for check in failed if check.name != "finite values"]  # A NaN fails that check too.
  assert [check.name.split(" targets")[0] for check in failed] == [open_cache(path).spec.targets], failed
  assert failed[0].detail.startswith("first bad rows 0"), failed


@pytest.mark.parametrize("kind", ["topk", "sample"])
def test_fit_and_sweep_train_on_sparse_targets(kind, topk, sample, dense, tmp_path, data_dir):
  path = {"topk": topk, "sample": sample}[kind]
  # The teachers are random networks, so their targets at T=4 are near uniform: 3 draws from one are mostly noise,
  # which the sampled loss fits as faithfully as the signal. Half the weight on labels keeps a signal to learn.
  options = {"model": "mlp-small", "epochs": 2, "batch_size": 128, "progress": False, "data_dir": data_dir,
             "workers": 0, "alpha": 0.5}
  sparse = fit(FitConfig(cache=path, out=str(tmp_path / "run"), **options), log_epochs=False)
  full = fit(FitConfig(cache=dense, out=str(tmp_path / "dense"), **options), log_epochs=False)
  assert np.isfinite(sparse["loss"]) and sparse["eval_accuracy"] > 0.5, json.dumps([sparse, full])
  if kind == "topk":
    assert abs(sparse["eval_accuracy"] - full["eval_accuracy"]) < 0.1, json.dumps([sparse, full])
  runs = run_sweep(path, "alpha=0,0.5", str(tmp_path / "sweep"), base=FitConfig(**options))
  table = report(str(tmp_path / "sweep"))
  assert len(runs) == 2 and "teachers' ensemble" in table and "unfinished" not in table


def test_what_a_sparse_cache_cannot_re_derive_is_a_clear_error(topk, tmp_path, data_dir):
  options = {"model": "mlp-small", "epochs": 1, "progress": False, "data_dir": data_dir}
  for extra, named in (({"temperature": 2.0}, "--temperature 2"), ({"combine": "geometric"}, "--combine geometric"),
                       ({"members": (0,)}, "--members 0"), ({"loss": "mse"}, "--loss mse"),
                       ({"members": (1, 0)}, "--members 1,0")):
    with pytest.raises(StillroomError, match=rf"holds topk:3 targets .* cannot serve {named}: .*--member-logits"):
      fit(FitConfig(cache=topk, out=str(tmp_path / "run"), **options, **extra))
  with pytest.raises(StillroomError, match=r"holds topk:3 targets .* cannot serve --temperature 2:"):
    run_sweep(topk, "temperature=2,4", str(tmp_path / "sweep"), base=FitConfig(**options))


def test_sparse_targets_with_member_logits_re_derive(topk_with_logits, data_dir, dense, tmp_path):
  both = topk_with_logits
  np.testing.assert_array_equal(_rows(both, ["member_logits"])["member_logits"],
                                _rows(dense, ["member_logits"])["member_logits"])
  options = {"model": "mlp-small", "epochs": 1, "batch_size": 128, "progress": False, "data_dir": data_dir,
             "workers": 0}
  from_sparse = fit(FitConfig(cache=both, out=str(tmp_path / "a"), temperature=2.0, **options), log_epochs=False)
  from_dense = fit(FitConfig(cache=dense, out=str(tmp_path / "b"), temperature=2.0, **options), log_epochs=False)
  assert from_sparse["loss"] == from_dense["loss"]  # Re-derived from the same member logits: the same run.
  # A group mixing a student of the stored targets (T=4) and one re-deriving them (T=2) trains each as alone.
  together = run_sweep(both, "temperature=2,4", str(tmp_path / "sweep"), base=FitConfig(**options))
  alone = fit(FitConfig(cache=both, out=str(tmp_path / "c"), **options), log_epochs=False)
  lines = {storage.read_json(f"{run}/config.json")["resolved"]["config"]["temperature"]: read_final(run)
           for run in together}
  for name in ("loss", "soft", "hard_ce"):
    assert lines[2.0][name] == pytest.approx(from_sparse[name], rel=1e-5)
    assert lines[4.0][name] == pytest.approx(alone[name], rel=1e-5)


def test_a_store_of_other_targets_is_refused_in_one_line(dense, data_dir, teachers):
  from teacher_cache.build import BuildConfig, build_cache  # pylint: disable=import-outside-toplevel
  with pytest.raises(StillroomError, match=r"holds a cache built with other settings: .*targets: None \(store\) vs "
                                           r"topk:3 \(command\)"):
    build_cache(BuildConfig(dataset="digits", data_dir=data_dir, teachers=tuple(teachers[:2]), views=2,
                            chunk_rows=512, targets="topk:03", out=dense, progress=False))


def test_bad_targets_settings_are_refused(data_dir, teachers, tmp_path):
  from teacher_cache.build import BuildConfig, build_cache  # pylint: disable=import-outside-toplevel
  for targets, message in (("topk", "give 'dense', 'topk:K' or 'sample:K'"), ("sample:0", "positive integer"),
                           ("topk:11", "K is more than the 10 classes"), ("dense:3", "give 'dense'")):
    with pytest.raises(StillroomError, match=message):
      build_cache(BuildConfig(dataset="digits", data_dir=data_dir, teachers=(teachers[0],), targets=targets,
                              out=str(tmp_path / "c.zarr"), progress=False))
