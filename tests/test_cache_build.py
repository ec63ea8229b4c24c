"""teacher-cache build/info/verify against independent references: SciPy maths, a per-pixel view renderer,
tensorstore as a second reader, uninterrupted builds, and a build on another device count."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import zarr
import conftest
from conftest import array_files, make_teacher, numpy_log_softmax, reseal, tree_digest
from scipy.special import logsumexp
from test_augment import reference_view

from shared.augment import row_permutation
from shared.cache import COMPLETE_KEY, SPEC_KEY, open_cache
from shared.data import open_transfer_set
from shared.errors import StillroomError
from shared.runs import load_teacher
from teacher_cache.cli import main
from teacher_cache.info import cache_info
from teacher_cache.verify import verify_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_args(out, teachers, data_dir, *extra, split="train[:300]"):
  return ["build", "--dataset", "digits", "--split", split, "--data-dir", data_dir,
          *[arg for t in teachers for arg in ("--teacher", t)], "--out", str(out), "--no-progress", *extra]


def run_cli(args, capsys):
  return conftest.run_cli(main, args, capsys)


def reference_member_logits(teacher_dirs, data_dir, split, index, view, augmentation):
  """Member logits computed without the cache code: sklearn-split pixels, the per-pixel view renderer, each
  teacher's apply function on 1/16-scaled inputs, in float32."""
  images = open_transfer_set("digits", "train", data_dir).read_all()[0]
  shift, flip = augmentation.view_params(index, view).values()
  views = np.stack([reference_view(images[i], *shift[r], flip[r]) for r, i in enumerate(index)])
  inputs = views.astype(np.float32) / 16.0
  members = [load_teacher(t) for t in teacher_dirs]
  return np.stack([np.asarray(m.apply_fn(m.params, inputs)) for m in members], axis=1)


@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_targets_match_scipy_reference(tmp_path, data_dir, teachers, capsys, combine, temperature):
  out = tmp_path / "c.zarr"
  code, _, err = run_cli(build_args(out, teachers, data_dir, "--views", "3", "--chunk-rows", "255", "--combine",
                                    combine, "--temperature", temperature, "--batch-size", "64"), capsys)
  assert code == 0, err
  group = zarr.open_group(str(out), mode="r")
  cache = open_cache(str(out))
  assert cache.spec.num_rows == 900 and group["targets"].shape == (900, 10)
  index, view = group["index"][:], group["view"][:]
  # The grouped order: an example's 3 views in adjacent rows, views 0, 1, 2; the examples once each, in one seeded
  # (not the split's) order shared by every view.
  assert cache.spec.row_order == "grouped"
  np.testing.assert_array_equal(view, np.tile(np.arange(3), 300))
  blocks = index.reshape(300, 3)
  assert (blocks == blocks[:, :1]).all()
  assert np.array_equal(np.sort(blocks[:, 0]), np.arange(300)) and not np.array_equal(blocks[:, 0], np.arange(300))
  stored_logits = group["member_logits"][:]
  z = reference_member_logits(teachers, data_dir, "train[:300]", index, view, cache.spec.augmentation)
  np.testing.assert_allclose(stored_logits.astype(np.float32), z, rtol=2e-3, atol=2e-3)

  def reference(logits):
    scaled = logits.astype(np.float64) / temperature
    if combine == "arithmetic":
      return logsumexp(numpy_log_softmax(scaled), axis=1) - np.log(logits.shape[1])
    return numpy_log_softmax(scaled.mean(axis=1))

  targets = group["targets"][:].astype(np.float64)
  assert targets.dtype == np.float64 and group["targets"].dtype == np.float16
  # Exactly the combination of the stored logits, up to one float16 rounding of the result...
  np.testing.assert_allclose(targets, reference(stored_logits), rtol=2 ** -10, atol=2 ** -10)
  # ...and of the float32 logits, up to float16 rounding of logits and result.
  np.testing.assert_allclose(targets, reference(z), rtol=2 ** -9, atol=2 ** -9 * max(1, 20 / temperature))
  np.testing.assert_allclose(np.exp(targets).sum(axis=1), 1.0, atol=1e-2)
  labels = open_transfer_set("digits", "train[:300]", data_dir).labels
  np.testing.assert_array_equal(group["labels"][:], labels[index])
  assert (group["fold"][:] == -1).all() and group["chunk_committed"][:].all()


def test_tensorstore_reads_the_same_values(tmp_path, data_dir, teachers, capsys):
  import tensorstore as ts
  out = tmp_path / "c.zarr"
  assert run_cli(build_args(out, teachers[:2], data_dir, "--views", "2", "--chunk-rows", "128"), capsys)[0] == 0
  group = zarr.open_group(str(out), mode="r")
  for name in ("targets", "member_logits", "index", "view", "labels", "shift", "flip", "fold"):
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / name)}}).result()
    np.testing.assert_array_equal(store.read().result(), group[name][:], err_msg=name)
  attrs = json.loads((out / "zarr.json").read_text())["attributes"]
  assert attrs[SPEC_KEY]["temperature"] == 4.0 and attrs[COMPLETE_KEY]["rows"] == 600


def _committed_chunks(out) -> int:
  folder = os.path.join(out, "chunk_committed", "c")
  return len([f for f in os.listdir(folder) if f.isdigit()]) if os.path.isdir(folder) else 0


def _cli_process(args, extra_code=""):
  code = f"import os, sys, signal\n{extra_code}\nfrom teacher_cache.cli import main\nmain({[str(a) for a in args]!r})"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _spec_without_timestamps(out) -> dict:
  attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
  spec = dict(attrs[SPEC_KEY])
  spec.pop("created_at")
  completion = dict(attrs[COMPLETE_KEY])
  completion.pop("finished_at")
  completion.pop("spec_sha256")  # The digest of the spec, `created_at` included.
  return {"spec": spec, "completion": completion}


def test_sigkill_at_random_points_then_resume_equals_uninterrupted_build(tmp_path, data_dir, teachers):
  args = build_args(tmp_path / "killed.zarr", teachers, data_dir, "--views", "8", "--chunk-rows", "64",
                    "--batch-size", "32", split="train")
  num_chunks = 1437 * 8 // 64 + 1
  rng = random.Random(os.environ.get("STILLROOM_TEST_SEED", 0))
  kill_points = sorted(rng.sample(range(1, num_chunks - 1), 3))
  for target in kill_points:
    process = _cli_process(args)
    while _committed_chunks(tmp_path / "killed.zarr") < target and process.poll() is None:
      time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    with pytest.raises(StillroomError, match="not complete"):
      open_cache(str(tmp_path / "killed.zarr"))
  # Once more, killed after the last chunk is committed and before the completion record is written.
  last_gap = _cli_process(args, extra_code=textwrap.dedent("""
      import teacher_cache.build as build
      write_chunks = build._write_chunks
      def write_chunks_then_die(*a, **k):
        write_chunks(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
      build._write_chunks = write_chunks_then_die
      """))
  last_gap.wait()
  assert last_gap.returncode == -signal.SIGKILL
  assert _committed_chunks(tmp_path / "killed.zarr") == num_chunks
  with pytest.raises(StillroomError, match="not complete"):
    open_cache(str(tmp_path / "killed.zarr"))
  # A kill in the middle of a chunk write leaves zarr's temporary file behind; the resume removes it.
  (tmp_path / "killed.zarr" / "targets" / "c" / "7.0.0123abcd.partial").write_bytes(b"half a chunk")
  finish = _cli_process(args)
  assert finish.wait() == 0, finish.stderr.read().decode()

  reference_args = build_args(tmp_path / "clean.zarr", teachers, data_dir, "--views", "8", "--chunk-rows", "64",
                              "--batch-size", "32", split="train")
  clean = _cli_process(reference_args)
  assert clean.wait() == 0, clean.stderr.read().decode()
  killed_files, clean_files = array_files(tmp_path / "killed.zarr"), array_files(tmp_path / "clean.zarr")
  assert len(clean_files) > num_chunks and killed_files == clean_files  # Byte for byte, every chunk of every array.
  assert open_cache(str(tmp_path / "clean.zarr")).spec.row_order == "grouped"  # An example's 8 views in one chunk.
  assert _spec_without_timestamps(tmp_path / "killed.zarr") == _spec_without_timestamps(tmp_path / "clean.zarr")


def _build_on_devices(out, teachers, data_dir, devices, batch_size):
  args = build_args(out, teachers, data_dir, "--views", "2", "--chunk-rows", "256", "--batch-size", batch_size)
  flag = f"--xla_force_host_platform_device_count={devices}"
  process = _cli_process(args, extra_code=f"os.environ['XLA_FLAGS'] = {flag!r}")
  assert process.wait() == 0, process.stderr.read().decode()
  assert open_cache(str(out)).complete


def test_one_device_and_four_devices_build_the_same_store(tmp_path, data_dir, teachers):
  _build_on_devices(tmp_path / "one.zarr", teachers, data_dir, 1, 16)
  _build_on_devices(tmp_path / "four.zarr", teachers, data_dir, 4, 64)  # Same per-device batch: 16 rows.
  assert array_files(tmp_path / "one.zarr") == array_files(tmp_path / "four.zarr")
  _build_on_devices(tmp_path / "one64.zarr", teachers, data_dir, 1, 64)  # Other per-device shape.
  one, four = zarr.open_group(str(tmp_path / "one64.zarr")), zarr.open_group(str(tmp_path / "four.zarr"))
  for name in ("targets", "member_logits"):
    np.testing.assert_allclose(one[name][:].astype(np.float32), four[name][:].astype(np.float32),
                               rtol=2 ** -10, atol=2 ** -10, err_msg=name)
  for name in ("index", "view", "labels", "shift", "flip", "fold"):
    np.testing.assert_array_equal(one[name][:], four[name][:])


@pytest.fixture
def existing_store(tmp_path, data_dir, teachers, capsys):
  out = tmp_path / "existing.zarr"
  assert run_cli(build_args(out, teachers[:2], data_dir), capsys)[0] == 0
  return out


def test_bad_input_fails_cleanly_and_leaves_the_store_untouched(tmp_path, data_dir, teachers, existing_store,
                                                                   capsys):
  good = teachers[:2]
  garbage = tmp_path / "garbage"
  garbage.mkdir()
  (garbage / "config.json").write_text("{not json")
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  (untrained / "config.json").write_text(json.dumps(
      {"model": {"name": "mlp-small", "input_shape": [8, 8, 1], "num_classes": 10, "dropout": 0.0},
       "normalization": {"shift": 0.0, "scale": 16.0}}))
  unknown_model = make_teacher(tmp_path / "unknown_model", seed=3)
  config = json.loads((tmp_path / "unknown_model" / "config.json").read_text())
  config["model"]["name"] = "resnet-9000"
  (tmp_path / "unknown_model" / "config.json").write_text(json.dumps(config))
  five_classes = make_teacher(tmp_path / "five", num_classes=5)
  cases = [
      (build_args(existing_store, good, data_dir, "--temperature", "0"), "temperature must be > 0"),
      (build_args(existing_store, good, data_dir, "--temperature", "-1"), "temperature must be > 0"),
      (["build", "--dataset", "nope", "--teacher", good[0], "--out", existing_store], "unknown dataset 'nope'"),
      (build_args(existing_store, [unknown_model], data_dir), "unknown model 'resnet-9000'; available models"),
      (build_args(existing_store, [str(tmp_path / "missing")], data_dir), "missing' does not exist"),
      (build_args(existing_store, [str(garbage)], data_dir), "cannot read .*config.json"),
      (build_args(existing_store, [str(untrained)], data_dir), "has no checkpoints/"),
      (build_args(existing_store, [good[0], five_classes], data_dir), "different class counts"),
      (build_args(existing_store, good, data_dir, "--temperature", "2"),
       r"other settings: temperature: 4.0 \(store\) vs 2.0 \(command\)\. Pass --overwrite"),
      (build_args(existing_store, good, data_dir, "--views", "2", "--dtype", "float32"), "views: 1 .*dtype: float16"),
      (build_args(existing_store, good[:1], data_dir), "member_digests"),
      (build_args(existing_store, good, data_dir, split="train[:200]"), "dataset_fingerprint"),
  ]
  before = tree_digest(existing_store)
  for args, message in cases:
    code, _, err = run_cli(args, capsys)
    assert code == 2, (args, err)
    assert "teacher-cache: error:" in err and __import__("re").search(message, err, flags=__import__("re").S), err
    assert tree_digest(existing_store) == before, args
  # The same command again is a no-op on a complete store.
  code, _, err = run_cli(build_args(existing_store, good, data_dir), capsys)
  assert code == 0 and "already complete" in err and tree_digest(existing_store) == before
  # --overwrite replaces it.
  code, _, err = run_cli(build_args(existing_store, good, data_dir, "--temperature", "2", "--overwrite"), capsys)
  assert code == 0 and open_cache(str(existing_store)).spec.temperature == 2.0


def test_non_finite_teacher_output_names_member_and_example(tmp_path, data_dir, teachers, capsys):
  def poison(model):  # Huge weights from one input pixel: only examples with that pixel lit overflow float16.
    kernel = model.hidden[0].kernel
    kernel[...] = kernel[...].at[20].set(1e30)

  nan_teacher = make_teacher(tmp_path / "nan_teacher", seed=5, transform=poison)
  data = open_transfer_set("digits", "train[:300]", data_dir)
  lit = data.read_all()[0].reshape(300, -1)[:, 20] > 0
  stored_order = row_permutation(0, 0, 300)  # View 0's examples, in the order the build writes them.
  first_bad = int(stored_order[np.argmax(lit[stored_order])])
  out = tmp_path / "nan.zarr"
  code, _, err = run_cli(build_args(out, [teachers[0], nan_teacher], data_dir, "--eval-split", "none"), capsys)
  assert code == 2
  assert f"teacher 'nan_teacher' (member 1) produced non-finite logits for example index {first_bad} (view 0)" in err
  with pytest.raises(StillroomError, match="not complete"):
    open_cache(str(out))
  # The eval split's logits are computed first: the first test example with that pixel lit is named.
  test = open_transfer_set("digits", "test", data_dir)
  first_bad_test = int(np.argmax(test.read_all()[0].reshape(len(test), -1)[:, 20] > 0))
  code, _, err = run_cli(build_args(tmp_path / "nan_eval.zarr", [teachers[0], nan_teacher], data_dir), capsys)
  assert code == 2 and (f"teacher 'nan_teacher' (member 1) produced non-finite logits for example index "
                        f"{first_bad_test} (eval split)") in err

  def nan_bias(model):  # NaN everywhere: the first stored example fails.
    model.head.bias[...] = model.head.bias[...].at[3].set(np.nan)

  nan_everywhere = make_teacher(tmp_path / "nan_bias", seed=6, transform=nan_bias)
  code, _, err = run_cli(build_args(tmp_path / "nan2.zarr", [nan_everywhere], data_dir, "--eval-split", "none"),
                         capsys)
  assert code == 2 and (f"teacher 'nan_bias' (member 0) produced non-finite logits for example index "
                        f"{int(stored_order[0])} (view 0)") in err


def test_unlabelled_npz_and_flat_vectors(tmp_path, capsys):
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "u.npz", x=rng.normal(size=(100, 6)).astype(np.float32))
  teacher = make_teacher(tmp_path / "flat", input_shape=(6,), num_classes=3, normalization={"shift": 0, "scale": 1})
  base = ["build", "--dataset", f"npz:{tmp_path / 'u.npz'}", "--teacher", teacher, "--no-progress"]
  code, _, err = run_cli(base + ["--views", "2", "--out", tmp_path / "v.zarr"], capsys)
  assert code == 2 and "needs image inputs" in err and not (tmp_path / "v.zarr").exists()
  assert run_cli(base + ["--split", "train[50%:]", "--out", tmp_path / "u.zarr"], capsys)[0] == 0
  group = zarr.open_group(str(tmp_path / "u.zarr"), mode="r")
  assert (group["labels"][:] == -1).all() and sorted(group["index"][:]) == list(range(50, 100))
  info = cache_info(str(tmp_path / "u.zarr"))
  assert info["stats"]["ensemble"]["accuracy"] is None and info["stats"]["labelled_rows"] == 0


def test_external_teachers_module_function(tmp_path, data_dir, capsys, monkeypatch):
  (tmp_path / "my_teachers.py").write_text(textwrap.dedent("""
      import jax.numpy as jnp
      import numpy as np
      from shared.models import ModelSpec, build_model

      def nnx_teacher():
        return build_model(ModelSpec(name="mlp-small", input_shape=(8, 8, 1), num_classes=10), seed=11)

      def linear_teacher():
        w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
        return (lambda params, x: x.reshape(len(x), -1) @ params["w"]), {"w": jnp.asarray(w)}

      def not_a_teacher():
        return 42
      """))
  monkeypatch.chdir(tmp_path)
  out = tmp_path / "ext.zarr"
  args = build_args(out, ["my_teachers:nnx_teacher", "my_teachers:linear_teacher"], data_dir)
  code, _, err = run_cli(args, capsys)
  assert code == 0, err
  group = zarr.open_group(str(out), mode="r")
  x = open_transfer_set("digits", "train[:300]", data_dir).read_all()[0].astype(np.float32) / 16.0
  x = x[group["index"][:]]  # The rows' examples, in the order the cache stores them.
  w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
  np.testing.assert_allclose(group["member_logits"][:, 1].astype(np.float32), x.reshape(300, -1) @ w,
                             rtol=2e-3, atol=2e-2)
  members = open_cache(str(out)).spec.members
  assert [m.model for m in members] == ["external", "external"] and members[0].name == "my_teachers:nnx_teacher"
  code, _, err = run_cli(build_args(tmp_path / "x.zarr", ["my_teachers:not_a_teacher"], data_dir), capsys)
  assert code == 2 and "returned int; it must return an nnx.Module or (apply_fn, params)" in err


def test_info_statistics_match_numpy(tmp_path, data_dir, teachers, capsys):
  out = tmp_path / "c.zarr"
  assert run_cli(build_args(out, teachers, data_dir, "--views", "2", "--chunk-rows", "100"), capsys)[0] == 0
  group = zarr.open_group(str(out), mode="r")
  labels, view = group["labels"][:], group["view"][:]
  member_top1 = group["member_logits"][:].argmax(-1)
  log_probs = group["targets"][:].astype(np.float32)
  stats = cache_info(str(out))["stats"]
  for m in range(3):
    assert stats["members"][m]["accuracy"] == pytest.approx((member_top1[:, m] == labels).mean())
    view0 = view == 0
    assert stats["members"][m]["accuracy_view0"] == pytest.approx((member_top1[view0, m] == labels[view0]).mean())
  assert stats["ensemble"]["accuracy"] == pytest.approx((log_probs.argmax(-1) == labels).mean())
  entropy = -(np.exp(log_probs) * log_probs).sum(-1).mean()
  assert stats["mean_target_entropy_nats"] == pytest.approx(entropy, rel=1e-5)
  assert stats["all_members_agree"] == pytest.approx((member_top1 == member_top1[:, :1]).all(1).mean())
  pairs = [(member_top1[:, a] == member_top1[:, b]).mean() for a in range(3) for b in range(3) if a != b]
  assert stats["mean_pairwise_agreement"] == pytest.approx(np.mean(pairs))
  code, text, _ = run_cli(["info", out], capsys)
  assert code == 0 and "ensemble     accuracy" in text and "fingerprint" in text
  code, text, _ = run_cli(["info", out, "--json"], capsys)
  assert json.loads(text)["stats"]["ensemble"]["accuracy"] == pytest.approx(stats["ensemble"]["accuracy"])


def test_verify_catches_corruption_incompleteness_and_wrong_data(tmp_path, data_dir, teachers, capsys):
  out = tmp_path / "c.zarr"
  assert run_cli(build_args(out, teachers[:2], data_dir, "--views", "2", "--chunk-rows", "128"), capsys)[0] == 0
  code, text, _ = run_cli(["verify", out, "--dataset", "digits", "--split", "train[:300]", "--data-dir", data_dir],
                          capsys)
  assert code == 0 and "FAIL" not in text and "labels match the dataset" in text
  assert all(c.ok for c in verify_cache(str(out), data_dir=data_dir))
  code, text, _ = run_cli(["verify", out, "--dataset", "digits", "--split", "train[:299]", "--data-dir", data_dir],
                          capsys)
  assert code == 1 and "FAIL  dataset fingerprint" in text
  group = zarr.open_group(str(out), mode="r+")
  group["targets"][130, 3] = group["targets"][130, 3] + 0.5
  reseal(out)  # As a writer's bug would leave it: the completion record lists the changed chunk.
  failed = {c.name: c for c in verify_cache(str(out), data_dir=data_dir) if not c.ok}
  assert list(failed) == ["targets re-derived from member_logits"]
  assert "first bad rows 130" in failed["targets re-derived from member_logits"].detail
  group["shift"][5] = [9, 9]
  assert "rows' index/view/shift/flip/fold replay from the seed" in {
      c.name for c in verify_cache(str(out), data_dir=data_dir) if not c.ok}
  del group.attrs[COMPLETE_KEY]
  code, text, _ = run_cli(["verify", out, "--data-dir", data_dir], capsys)
  assert code == 1 and "FAIL  complete" in text


@pytest.mark.fast
def test_models_subcommand_lists_the_registry(capsys):
  code, text, _ = run_cli(["models"], capsys)
  assert code == 0 and "mlp-small      9,610 params" in text and "cnn-large" in text
  assert "features: dense 256, stage1 8x8x32, stage2 4x4x64" in text
  assert jax.local_device_count() >= 1


@pytest.mark.fast
def test_docs_document_every_array_of_the_layout():
  from shared.cache import LAYOUT
  with open(os.path.join(REPO, "docs", "cache-format.md")) as f:
    section = f.read().split("\n## Arrays\n")[1].split("\n#")[0]
  rows = [line for line in section.splitlines() if line.startswith("| `")]
  documented = {line.split("`")[1]: (line.split("|")[2].strip(), line.split("|")[3].strip()) for line in rows}
  assert documented == {a.name: (a.role, a.shape) for a in LAYOUT}


def test_cross_fitted_rows_take_logits_from_the_run_that_held_out_their_fold(tmp_path, data_dir, capsys):
  from shared.augment import fold_of
  runs = [make_teacher(tmp_path / f"m{m}f{k}", seed=10 * m + k,
                       cross_fit=(2, k))
          for m in range(2) for k in range(2)]
  out = tmp_path / "cf.zarr"
  code, _, err = run_cli(build_args(out, runs, data_dir, "--folds", "2", "--views", "2"), capsys)
  assert code == 0, err
  group = zarr.open_group(str(out), mode="r")
  index, view = group["index"][:], group["view"][:]
  fold = fold_of(index, 2)
  np.testing.assert_array_equal(group["fold"][:], fold)
  assert 0.3 < fold.mean() < 0.7 and group["member_logits"].shape == (600, 2, 10)
  cache = open_cache(str(out))
  per_run = reference_member_logits(runs, data_dir, "train[:300]", index, view, cache.spec.augmentation)  # [R, 4, C]
  expected = per_run.reshape(600, 2, 2, 10)[np.arange(600), :, fold]  # member m, run of the row's fold
  np.testing.assert_allclose(group["member_logits"][:].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
  assert all(c.ok for c in verify_cache(str(out), data_dir=data_dir))
  assert cache_info(str(out))["stats"]["members"][1]["name"] == "m1f0+m1f1"
  # On the eval split, which no run trained on, each member's logits are the mean of its fold runs'.
  test = open_transfer_set("digits", "test", data_dir)
  x = test.read_all()[0].astype(np.float32) / 16.0
  per_run = np.stack([np.asarray(t.apply_fn(t.params, x)) for t in map(load_teacher, runs)], 1)  # [E, 4, C]
  np.testing.assert_allclose(group["eval_member_logits"][:].astype(np.float32),
                             per_run.reshape(len(test), 2, 2, 10).mean(2), rtol=2e-3, atol=2e-3)
  code, _, err = run_cli(build_args(tmp_path / "bad.zarr", [runs[1], runs[0], *runs[2:]], data_dir, "--folds", "2"),
                         capsys)
  assert code == 2 and ("m0f1' is run 0 of member 0, so it must be trained with `student-train fit --folds 2 "
                        "--holdout-fold 0`") in err
  code, _, err = run_cli(build_args(tmp_path / "bad.zarr", runs[:3], data_dir, "--folds", "2"), capsys)
  assert code == 2 and "needs 2 runs per member" in err
