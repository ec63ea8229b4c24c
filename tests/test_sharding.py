"""FSDP (`teacher-cache build --teacher-sharding fsdp`, `student-train fit --param-sharding fsdp`) on 4 CPU devices:
each weight array split along one of its axes over the devices, a quarter of the bytes on each; the store equal to
the replicated build's within float16 rounding, the run to the replicated run's within float rounding; a resume
bit-identical, or with the other sharding within float rounding; a sharded run read back as a teacher and evaluated
on one device.

One subprocess (4 fake CPU devices) runs every command; the tests read what it wrote, with readers of their own."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import zarr
from conftest import make_teacher, run_cli, tree_digest
from jax.sharding import PartitionSpec as P

from shared.cache import open_cache
from shared.limits import human_bytes
from shared.parallel import DATA_AXIS, fsdp_spec, weight_shardings
from shared.runs import load_run_teacher
from student_train.cli import main as student_main
from teacher_cache.cli import main as cache_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4
EPOCHS = 2

# Runs in the subprocess: `python -c SCRIPT ROOT`, ROOT holding args.json (the build's and fit's arguments). Every
# command goes through its CLI; what `place_teachers` and `place_states` return (what the build and fit place) is
# measured as it comes back.
SCRIPT = textwrap.dedent(f"""
    import json, os, shutil, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={DEVICES}"
    import jax
    import numpy as np
    import student_train.train as train
    import teacher_cache.build as build
    from student_train.cli import main as student_main
    from teacher_cache.cli import main as cache_main

    root = sys.argv[1]
    args = json.load(open(os.path.join(root, "args.json")))
    placed, unmeasured = [], {{}}

    def measured(module, name):
      original = unmeasured[name] = getattr(module, name)
      def measure(*args, **kwargs):
        arrays = original(*args, **kwargs)
        leaves = jax.tree.leaves(arrays[0])
        devices = {{}}
        for leaf in leaves:
          for shard in leaf.addressable_shards:
            devices[str(shard.device)] = devices.get(str(shard.device), 0) + shard.data.nbytes
        placed.append({{"what": name, "sharding": args[2], "devices": len(jax.devices()),
                        "whole": sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves),
                        "first_shards": sum(leaf.addressable_shards[0].data.nbytes for leaf in leaves),
                        "per_device": devices}})
        return arrays
      setattr(module, name, measure)

    measured(build, "place_teachers")
    measured(train, "place_states")

    def run(main, argv):
      try:
        main(argv)
      except SystemExit as e:
        assert not e.code, (argv, e.code)

    for how in ("replicated", "fsdp"):
      run(cache_main, args["build"] + ["--teacher-sharding", how, "--out", os.path.join(root, how + ".zarr")])
    fit = args["fit"]
    for how in ("replicated", "fsdp"):
      run(student_main, fit + ["--param-sharding", how, "--out", os.path.join(root, "run_" + how)])
    # The fsdp run resumed after epoch 1 (its last checkpoint and final.json gone), with each sharding.
    for how in ("fsdp", "replicated"):
      resumed = os.path.join(root, "resumed_" + how)
      shutil.copytree(os.path.join(root, "run_fsdp"), resumed)
      shutil.rmtree(os.path.join(resumed, "checkpoints", "{EPOCHS}"))
      os.remove(os.path.join(resumed, "final.json"))
      run(student_main, fit + ["--param-sharding", how, "--out", resumed])
    json.dump(placed, open(os.path.join(root, "placed.json"), "w"))
    # Weights none of whose arrays divides over the 4 devices: a warning, and replicated.
    from types import SimpleNamespace
    from shared.parallel import data_mesh
    odd = {{"w": np.zeros(10, np.float32), "b": np.zeros((3, 5), np.float32)}}
    for arrays in (unmeasured["place_teachers"]([SimpleNamespace(name="odd", params=odd)], data_mesh(), "fsdp")[0][0],
                   unmeasured["place_states"]({{"w": np.zeros((4, 10), np.float32)}}, data_mesh(True), "fsdp")[0]):
      assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(arrays))
    """) + textwrap.dedent("""
    # A language model (`lm_teachers.tiny_lm`: every weight has an axis divisible by 4 at V = 32) on token batches
    # [B, 2, L] with labels [B, L]: three steps of the trainer's step placed replicated, then fsdp.
    import optax
    from flax import nnx
    sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tests"))
    from lm_teachers import tiny_lm, token_rows
    from shared.data import Normalization
    from shared.data.text import next_token_labels
    from shared.parallel import bytes_per_device
    from student_train.steps import Hypers, group_switches, make_train_step, stack_hypers, stack_states

    mesh = data_mesh(True)
    model = tiny_lm((2, 8), 32, nnx.Rngs(0))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)))
    hypers = stack_hypers([Hypers(member_weights=np.ones(1, np.float32))], [0])
    x = token_rows(8, 8).astype(np.float32)
    batch = {"x": x, "labels": next_token_labels(x), "mask": np.ones(8, np.float32)}
    lm = {}
    for how in ("replicated", "fsdp"):
      states, shardings = unmeasured["place_states"](stack_states([state]), mesh, how, log=False)
      step = make_train_step(graphdef, Normalization(), mesh, group_switches(hypers), state_shardings=shardings)
      losses = []
      for _ in range(3):
        states, metrics = step(states, batch, hypers)
        losses.append(float(metrics["loss"][0]))
      whole, held = bytes_per_device(states)
      lm[how] = {"losses": losses, "held_over_whole": held / whole}
      leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(states)
                if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)]
      np.savez(os.path.join(root, "lm_" + how + ".npz"), *leaves)
    json.dump(lm, open(os.path.join(root, "lm.json"), "w"))
    """)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, data_dir, teachers) -> str:
  """The subprocess's outputs: stores `replicated.zarr` and `fsdp.zarr` of a cnn-small and a resnet8 (BatchNorm
  statistics among its weights) teacher; runs `run_replicated` and `run_fsdp`; `resumed_fsdp` and
  `resumed_replicated`; `placed.json`, what each placement put on the devices; and `lm.json`, `lm_replicated.npz`,
  `lm_fsdp.npz`: a test-size language model's losses and weights after three steps placed each way."""
  root = tmp_path_factory.mktemp("sharded")
  resnet = make_teacher(root / "resnet8", model="resnet8", seed=3)
  build = ["build", "--dataset", "digits", "--split", "train[:192]", "--data-dir", data_dir, "--views", "2",
           "--chunk-rows", "128", "--batch-size", "64", "--eval-split", "none", "--no-progress",
           *[a for t in (teachers[2], resnet) for a in ("--teacher", t)]]
  fit = ["fit", "--model", "mlp-small", "--cache", str(root / "fsdp.zarr"), "--data-dir", data_dir, "--epochs",
         str(EPOCHS), "--batch-size", "64", "--dropout", "0.1", "--no-progress"]
  (root / "args.json").write_text(json.dumps({"build": build, "fit": fit}))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  done = subprocess.run([sys.executable, "-c", SCRIPT, str(root)], env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  (root / "stderr.txt").write_text(done.stderr)
  return str(root)


def _placed(root: str, what: str, sharding: str) -> list[dict]:
  found = [entry for entry in json.load(open(os.path.join(root, "placed.json")))
           if entry["what"] == what and entry["sharding"] == sharding]
  assert found and all(entry["devices"] == DEVICES for entry in found)
  return found


@pytest.mark.fast
def test_the_fsdp_rule_splits_the_longest_axis_that_divides_over_the_devices():
  assert fsdp_spec((64, 256), 4) == P(None, DATA_AXIS)
  assert fsdp_spec((1000, 64), 4) == P(DATA_AXIS)
  assert fsdp_spec((3, 3, 16, 16), 4) == P(None, None, None, DATA_AXIS)  # The last of equal ones.
  assert fsdp_spec((10,), 4) == P() and fsdp_spec((), 4) == P() and fsdp_spec((6, 10), 4) == P()
  assert fsdp_spec((8, 10), 4) == P(DATA_AXIS)  # Not the longest axis: the longest that divides.
  assert fsdp_spec((8, 10), 4, group_axes=1) == P() and fsdp_spec((8, 64), 4, group_axes=1) == P(None, DATA_AXIS)
  mesh = jax.make_mesh((1,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  tree = {"kernel": np.zeros((64, 256), np.float32), "key": jax.random.key(0)}
  assert {k: s.spec for k, s in weight_shardings(tree, mesh, "fsdp").items()} == {"kernel": P(None, DATA_AXIS),
                                                                                  "key": P()}
  assert all(s.spec == P() for s in weight_shardings(tree, mesh, "replicated").values())


def test_an_fsdp_build_places_a_quarter_of_the_teachers_bytes_on_each_device(sharded):
  (replicated,), (fsdp,) = _placed(sharded, "place_teachers", "replicated"), _placed(sharded, "place_teachers", "fsdp")
  assert replicated["whole"] == fsdp["whole"] > 300_000  # The two teachers' weights, resnet8's 75k parameters in.
  assert replicated["first_shards"] == replicated["whole"]
  assert set(fsdp["per_device"].values()) == {fsdp["first_shards"]}  # Every device holds as much.
  # A quarter, but for the few arrays no axis of which divides by 4 (the 10-class heads' biases).
  assert fsdp["whole"] / 4 <= fsdp["first_shards"] < 1.01 * fsdp["whole"] / 4, fsdp
  said = f"--teacher-sharding fsdp: {human_bytes(fsdp['first_shards'])} of the teachers' {human_bytes(fsdp['whole'])}"
  assert said in open(os.path.join(sharded, "stderr.txt")).read()


def test_an_fsdp_build_writes_the_replicated_builds_store(sharded, capsys):
  """Read back through Zarr: every array equal, the stored float16 logits and targets within one float16 rounding
  step (the sharded forward sums in another order); the two specs the same cache, which the build with the other
  option (here, on one device) confirms complete."""
  replicated = zarr.open_group(os.path.join(sharded, "replicated.zarr"), mode="r")
  fsdp = zarr.open_group(os.path.join(sharded, "fsdp.zarr"), mode="r")
  assert sorted(replicated.array_keys()) == sorted(fsdp.array_keys())
  for name in replicated.array_keys():
    a, b = replicated[name][:], fsdp[name][:]
    assert a.dtype == b.dtype and a.shape == b.shape, name
    if a.dtype.kind == "f":
      np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2 ** -10, atol=2 ** -10,
                                 err_msg=name)
    else:
      np.testing.assert_array_equal(a, b, err_msg=name)
  one, other = (open_cache(os.path.join(sharded, f"{how}.zarr")).spec for how in ("replicated", "fsdp"))
  assert one.mismatches(other) == [] and one.build_key() == other.build_key()
  store = os.path.join(sharded, "fsdp.zarr")
  before = tree_digest(store)
  build = json.load(open(os.path.join(sharded, "args.json")))["build"]
  code, _, err = run_cli(cache_main, build + ["--teacher-sharding", "replicated", "--out", store], capsys)
  assert code == 0 and "already complete with these settings" in err and tree_digest(store) == before, err


def _params(run_dir: str):
  return jax.tree.map(np.asarray, load_run_teacher(run_dir).params)


def _metrics(run_dir: str) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_fsdp_fit_trains_the_replicated_run_with_a_quarter_of_the_state_on_each_device(sharded):
  replicated, fsdp = _placed(sharded, "place_states", "replicated")[0], _placed(sharded, "place_states", "fsdp")[0]
  assert replicated["first_shards"] == replicated["whole"] == fsdp["whole"]
  assert set(fsdp["per_device"].values()) == {fsdp["first_shards"]}
  # mlp-small's parameters, AdamW's two moments of them, and the step count: all but its 10-wide head split by 4.
  assert fsdp["whole"] / 4 <= fsdp["first_shards"] < 1.01 * fsdp["whole"] / 4, fsdp
  one, other = (os.path.join(sharded, f"run_{how}") for how in ("replicated", "fsdp"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), _params(one), _params(other))
  lines = list(zip(_metrics(one), _metrics(other), strict=True))
  assert len(lines) == EPOCHS
  for a, b in lines:
    for key in ("loss", "hard_ce", "soft", "train_accuracy", "teacher_agreement", "eval_accuracy", "eval_nll"):
      assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_an_fsdp_run_resumes_bit_identical_or_with_the_other_sharding_within_rounding(sharded):
  uninterrupted = _params(os.path.join(sharded, "run_fsdp"))
  jax.tree.map(np.testing.assert_array_equal, _params(os.path.join(sharded, "resumed_fsdp")), uninterrupted)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               _params(os.path.join(sharded, "resumed_replicated")), uninterrupted)
  stripped = lambda run: [{k: v for k, v in line.items() if "second" not in k and k != "run_dir"}  # noqa: E731
                          for line in _metrics(os.path.join(sharded, run))]
  assert stripped("resumed_fsdp") == stripped("run_fsdp")


def test_weights_that_do_not_divide_over_the_devices_are_replicated_with_a_warning(sharded):
  said = open(os.path.join(sharded, "stderr.txt")).read()
  assert "warning: --teacher-sharding fsdp: no weight array of teacher 'odd' has an axis divisible by the 4 devices; " \
      "it is replicated on each of them." in said
  assert "warning: --param-sharding fsdp: no array of the students' parameters and optimizer state has an axis " \
      "divisible by the 4 devices; they are replicated on each of them." in said


def test_an_fsdp_run_is_a_teacher_evaluated_on_one_device(sharded, data_dir, capsys):
  """Its checkpoint, written from arrays split over 4 devices, read here on one: `eval` reports what its last epoch
  reported."""
  for how in ("replicated", "fsdp"):
    run = os.path.join(sharded, f"run_{how}")
    code, out, err = run_cli(student_main, ["eval", run, "--dataset", "digits", "--split", "test", "--data-dir",
                                            data_dir, "--json"], capsys)
    assert code == 0, err
    result, last = json.loads(out), _metrics(run)[-1]
    assert result["accuracy"] == pytest.approx(last["eval_accuracy"], abs=1e-9)
    assert result["nll"] == pytest.approx(last["eval_nll"], rel=1e-5)


def test_fsdp_splits_a_language_models_weights_over_devices_and_trains_as_replicated(sharded):
  """`--param-sharding fsdp` of a transformer LM on token rows: each weight split over the 4 devices (about a quarter
  of the state on each), three steps equal to the replicated ones within float rounding."""
  lm = json.load(open(os.path.join(sharded, "lm.json")))
  np.testing.assert_allclose(lm["fsdp"]["losses"], lm["replicated"]["losses"], rtol=1e-5)
  assert lm["replicated"]["held_over_whole"] == 1.0 and lm["fsdp"]["held_over_whole"] < 0.3, lm
  replicated, fsdp = (np.load(os.path.join(sharded, f"lm_{how}.npz")) for how in ("replicated", "fsdp"))
  assert len(replicated.files) == len(fsdp.files) > 5
  for name in replicated.files:
    np.testing.assert_allclose(fsdp[name], replicated[name], rtol=1e-4, atol=1e-6)
