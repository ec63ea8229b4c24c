"""Sparse cached targets (`--targets topk:K|sample:K`): what the store holds against a dense cache of the same
teachers (a second reader), reproducible draws, verify, info, fit and sweep on them, and the clear errors for what a
sparse cache cannot re-derive."""

import json

import numpy as np
import pytest

import conftest
from shared import storage
from shared.cache import open_cache
from shared.errors import StillroomError
from student_train.config import FitConfig
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
  # Over all rows, classes are drawn in proportion to the teachers' probabilities: the most probable class of each
  # row is drawn at least once far more often than a uniform draw would.
  top = np.argmax(expected, 1)
  hit = np.mean([t in row[d] for t, row, d in zip(top, ids, drawn)])
  mean_top_p = np.mean(np.exp(expected.max(1)))
  assert hit > 1 - (1 - mean_top_p) ** 3 - 0.05
  again = conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2], chunk_rows=512, targets="sample:3")
  assert conftest.array_files(again) == conftest.array_files(sample)


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


def test_a_damaged_sparse_target_fails_verify(topk, tmp_path, data_dir):
  import shutil  # pylint: disable=import-outside-toplevel
  import zarr  # pylint: disable=import-outside-toplevel
  copy = str(tmp_path / "c.zarr")
  shutil.copytree(topk, copy)
  ids = zarr.open_group(copy, mode="r+")["target_ids"]
  ids[0, 0] = 99  # Not a class.
  failed = [check for check in verify_cache(copy, data_dir=data_dir) if check.failed]
  assert [check.name for check in failed] == ["topk:3 targets well-formed"]
  assert failed[0].detail.startswith("first bad rows 0")


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
  for extra, named in (({"temperature": 2.0}, "T=2"), ({"combine": "geometric"}, "geometric"),
                       ({"members": (0,)}, r"members \[0\]"), ({"loss": "mse"}, "--loss mse")):
    with pytest.raises(StillroomError, match=rf"holds topk:3 targets .* cannot give .*{named}.*--member-logits"):
      fit(FitConfig(cache=topk, out=str(tmp_path / "run"), **options, **extra))
  with pytest.raises(StillroomError, match=r"holds topk:3 targets .* cannot give T=2"):
    run_sweep(topk, "temperature=2,4", str(tmp_path / "sweep"), base=FitConfig(**options))


def test_sparse_targets_with_member_logits_re_derive(tmp_path_factory, data_dir, teachers, dense, tmp_path):
  both = conftest.digits_cache(tmp_path_factory, data_dir, teachers[:2], chunk_rows=512, targets="topk:3",
                               member_logits=True)
  np.testing.assert_array_equal(_rows(both, ["member_logits"])["member_logits"],
                                _rows(dense, ["member_logits"])["member_logits"])
  options = {"model": "mlp-small", "epochs": 1, "batch_size": 128, "progress": False, "data_dir": data_dir,
             "temperature": 2.0}
  from_sparse = fit(FitConfig(cache=both, out=str(tmp_path / "a"), **options), log_epochs=False)
  from_dense = fit(FitConfig(cache=dense, out=str(tmp_path / "b"), **options), log_epochs=False)
  assert from_sparse["loss"] == from_dense["loss"]  # Re-derived from the same member logits: the same run.


def test_bad_targets_settings_are_refused(data_dir, teachers, tmp_path):
  from teacher_cache.build import BuildConfig, build_cache  # pylint: disable=import-outside-toplevel
  for targets, message in (("topk", "give 'dense', 'topk:K' or 'sample:K'"), ("sample:0", "positive integer"),
                           ("topk:11", "K is more than the 10 classes"), ("dense:3", "give 'dense'")):
    with pytest.raises(StillroomError, match=message):
      build_cache(BuildConfig(dataset="digits", data_dir=data_dir, teachers=(teachers[0],), targets=targets,
                              out=str(tmp_path / "c.zarr"), progress=False))
