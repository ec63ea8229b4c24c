"""Token-level caches (issue 34, part 3) and per-token distillation (part 4): the spec and layout of token rows,
the targets of every kind per position (checked against NumPy and a peeking teacher that knows the next token),
sampled targets unbiased per token and independent of batching, top-k at K = V equal to dense in value and gradient,
and the students' per-token terms under the [B, L] masks."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
import lm_teachers
from shared.augment import make_augmentation
from shared.cache import EVAL_ROWS, TOKEN_SCHEMA_VERSION, CacheSpec, MemberSpec, open_cache
from shared.data import DatasetSpec, Normalization, open_transfer_set
from shared.data.text import next_token_labels
from shared.errors import StillroomError
from shared.losses import masked_mean, soft_kl, topk_kl
from student_train.steps import example_mask
from student_train.terms import LOSS_NAMES, Teacher, distillation_loss, loss_settings
from student_train.config import FitConfig
from student_train.run_dir import read_final
from student_train.train import fit
from teacher_cache import build as build_module
from teacher_cache.build import BuildConfig, build_cache, put_rows, targets_of_logits
from teacher_cache.info import cache_info
from teacher_cache.verify import verify_cache

V, L = lm_teachers.VOCAB, 12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def next_labels(x: np.ndarray) -> np.ndarray:
  """The reference next-token labels of rows [N, 2, L], by loops: label[j] = token j + 1 in the same document."""
  labels = np.full(x.shape[::2], -1, np.int32)
  for r in range(len(x)):
    for j in range(x.shape[-1] - 1):
      if x[r, 1, j] != 0 and x[r, 1, j + 1] == x[r, 1, j]:
        labels[r, j] = x[r, 0, j + 1]
  return labels


def token_spec(targets: str = "dense", *, members: int = 1, count: int = 8, positions: int = L, combine="arithmetic",
               temperature: float = 1.0, dtype: str = "float32", **changes) -> CacheSpec:
  """A spec of token rows of `positions` positions over a tiny vocabulary (no store: the pure functions' input)."""
  dataset = DatasetSpec(name="text:docs", split="train", canonical_split=f"train[0:{count}]", count=count,
                        fingerprint="0" * 64, input_shape=(2, positions), input_dtype="int32", num_classes=V,
                        labeled=True)
  augmentation = make_augmentation((2, positions), np.dtype(np.int32), dataset.name, seed=3, max_shift=0, flip=False,
                                   image_size=None)
  runs = tuple(MemberSpec(name=f"t{m}", source=f"lm_teachers:t{m}", model="external", num_params=V + 1,
                          digest=f"{m:064x}", trained_epochs=None, normalization=Normalization().to_dict())
               for m in range(members))
  return CacheSpec(temperature=temperature, combine=combine, members=runs, dataset=dataset, num_classes=V, views=1,
                   augmentation=augmentation, dtype=dtype, chunk_rows=4, software_version="test", targets=targets,
                   positions=positions, **changes)


def member_logits(x: np.ndarray) -> np.ndarray:
  """float32 [B, L, 2, V]: the two peeking teachers' logits, members at axis -2."""
  xf = jnp.asarray(x, jnp.float32)
  return np.stack([np.asarray(f(p, xf)) for f, p in (lm_teachers.peeking_teacher(),
                                                     lm_teachers.soft_peeking_teacher())], axis=-2)


_JITTED = {}  # One jitted `targets_of_logits` per spec (its repr: a spec holds dicts), so that calls of equal specs
# and shapes compile once.


def stored(spec: CacheSpec, logits: np.ndarray, index=None) -> tuple:
  index = np.arange(len(logits)) if index is None else index
  function = _JITTED.setdefault(repr(spec), jax.jit(targets_of_logits(spec)))
  out = function(jnp.asarray(logits), jnp.asarray(index, jnp.uint32), jnp.zeros(len(logits), jnp.int32))
  return jax.tree.map(np.asarray, out)


@pytest.mark.fast
def test_a_token_spec_is_schema_8_with_positions_after_the_rows_and_class_level_specs_read_as_before():
  spec = token_spec("topk:4", members=2, member_logits=True)
  assert spec.schema_version == TOKEN_SCHEMA_VERSION == 8
  shapes = {a.name: a.shape for a in spec.arrays}
  assert shapes["target_ids"] == shapes["target_log_probs"] == (8, L, 4)
  assert shapes["target_rest"] == shapes["labels"] == (8, L)
  assert shapes["member_logits"] == (8, L, 2, V) and shapes["index"] == shapes["view"] == (8,)
  assert {a.name: a.chunks for a in spec.arrays}["member_logits"] == (4, L, 2, V)
  again = CacheSpec.from_attrs(spec.to_attrs())
  assert again == spec and again.build_key()["positions"] == L
  assert token_spec("sample:5").array("target_counts").shape == (8, L, 5)
  # A class-level spec records no positions: its attributes and build key are what they were before token rows.
  flat = dataclasses.replace(spec, positions=0, schema_version=None, arrays=(),
                             dataset=dataclasses.replace(spec.dataset, input_shape=(2 * L,)))
  assert "positions" not in flat.to_attrs() and "positions" not in flat.build_key() and flat.schema_version == 6
  assert {a.name: a.shape for a in flat.arrays}["member_logits"] == (8, 2, V)
  assert any("positions: 12 (store) vs 0 (command)" == m for m in spec.mismatches(flat))
  # Class ids: a token cache's uint16 up to V = 65,536 (then int32); a class-level cache's int16 up to C = 32,768,
  # as older stores were written.
  assert spec.array("target_ids").dtype == "uint16" and flat.array("target_ids").dtype == "int16"
  for classes, token_dtype, class_dtype in ((V, "uint16", "int16"), (32_768, "uint16", "int16"),
                                            (32_769, "uint16", "int32"), (65_536, "uint16", "int32"),
                                            (65_537, "int32", "int32")):
    for base, dtype in ((spec, token_dtype), (flat, class_dtype)):
      wide = dataclasses.replace(base, num_classes=classes, arrays=(),
                                 dataset=dataclasses.replace(base.dataset, num_classes=classes))
      assert wide.array("target_ids").dtype == dtype, (classes, base.positions)
  # A 50k BPE vocabulary's topk:64 in float16: 64 · (2 + 2) + 4 bytes of targets per token (`info`'s figure).
  bpe = dataclasses.replace(spec, num_classes=50_257, targets="topk:64", member_logits=False, dtype="float16",
                            arrays=(), dataset=dataclasses.replace(spec.dataset, num_classes=50_257))
  assert sum(bpe.array(name).row_bytes / L for name in bpe.target_arrays) == 64 * (2 + 2) + 4 == 260
  with pytest.raises(StillroomError, match="schema 8"):
    dataclasses.replace(spec, schema_version=6)
  with pytest.raises(StillroomError, match="one view"):
    dataclasses.replace(spec, views=2, arrays=())
  with pytest.raises(StillroomError, match="not supported"):  # What a stillroom that predates version 8 does.
    CacheSpec.from_attrs({**spec.to_attrs(), "schema_version": 9})


@pytest.mark.fast
@pytest.mark.parametrize("targets", ["dense", "topk:3", "sample:6"])
def test_the_target_at_position_j_predicts_token_j_plus_1_and_never_across_documents(targets):
  """The off-by-one test: a teacher that knows the next token gives targets whose mass at position j is on
  label[j] = x[0, j + 1] (same document); where there is no next token in the document, the flat distribution."""
  x = lm_teachers.token_rows(8, L, seed=0)
  labels = next_labels(x)
  assert (labels >= 0).any() and (labels < 0).any()
  spec = token_spec(targets, members=1, temperature=1.0)
  logits = member_logits(x)[:, :, :1]
  stored_logits, out, finite, finite_targets = stored(spec, logits)
  assert stored_logits.shape == (8, L, 1, V) and finite.shape == (8, 1) and finite_targets.shape == (8,)
  assert finite.all() and finite_targets.all()
  if targets == "dense":
    probs = np.exp(out["targets"])
  else:  # The sparse targets as a dense [B, L, V] (sampled: the draws' shares).
    weights = np.exp(out["target_log_probs"]) if targets.startswith("topk") else \
        out["target_counts"] / out["target_counts"].sum(-1, keepdims=True)
    probs = np.zeros((8, L, V))
    np.add.at(probs, (np.arange(8)[:, None, None], np.arange(L)[None, :, None], out["target_ids"]), weights)
  if targets.startswith("topk"):  # The rest bucket per position: NumPy's mass of the V - K tokens not kept there.
    z = logits[:, :, 0].astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    kept = np.zeros((8, L, V), bool)
    np.put_along_axis(kept, out["target_ids"].astype(np.int64), True, axis=-1)
    assert out["target_rest"].shape == (8, L) and kept.sum(-1).min() == 3
    np.testing.assert_allclose(np.exp(out["target_rest"]), np.where(kept, 0.0, p).sum(-1), rtol=1e-5, atol=1e-7)
  top = probs.argmax(-1)
  known = labels >= 0
  np.testing.assert_array_equal(top[known], labels[known])
  # e^8 / (e^8 + 15) = 0.995: the peak, not a neighbour's token (sampled: most of the 6 draws).
  assert (probs[known, labels[known]] > (0.6 if targets.startswith("sample") else 0.9)).all()
  # Where no next token is in the document (its last token, the row's end, padding): no peak, so never the token of
  # the next document.
  p_flat = probs[~known]
  assert (p_flat.max(-1) < 0.9).all()
  if targets == "dense":
    np.testing.assert_allclose(p_flat, 1.0 / V, rtol=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
def test_topk_at_k_equal_v_is_dense_in_value_and_gradient_per_token(combine):
  x = lm_teachers.token_rows(4, L, seed=1)
  logits = member_logits(x)
  dense = stored(token_spec("dense", members=2, combine=combine, temperature=2.0, count=4), logits)[1]
  topk = stored(token_spec(f"topk:{V}", members=2, combine=combine, temperature=2.0, count=4), logits)[1]
  assert np.isneginf(topk["target_rest"]).all()
  # The ensemble over the members at axis -2 of [B, L, M, V], per position, at T = 2: NumPy's AM or GM.
  members = conftest.numpy_log_softmax(logits / 2.0)  # [B, L, 2, V]
  reference = np.log(np.exp(members).mean(-2)) if combine == "arithmetic" else \
      conftest.numpy_log_softmax(members.mean(-2))
  np.testing.assert_allclose(dense["targets"], reference, rtol=1e-5, atol=1e-5)
  student = jnp.asarray(np.random.default_rng(0).normal(size=(4, L, V)), jnp.float32)

  def by_dense(s):
    return soft_kl(s, jnp.asarray(dense["targets"]), 2.0)

  def by_topk(s):
    return topk_kl(s, jnp.asarray(topk["target_ids"]), jnp.asarray(topk["target_log_probs"]),
                   jnp.asarray(topk["target_rest"]), 2.0)
  assert by_dense(student).shape == (4, L)
  np.testing.assert_allclose(by_topk(student), by_dense(student), rtol=1e-5, atol=1e-6)
  # Jitted once each (the position traced): op-by-op, the first gradients compiled every op apart, ~5x slower.
  grad_dense = jax.jit(jax.grad(lambda s, position: by_dense(s)[1, position]))
  grad_topk = jax.jit(jax.grad(lambda s, position: by_topk(s)[1, position]))
  for position in (0, L // 2, L - 1):  # The gradient of one token's term: only that token's logits, the same.
    g_dense, g_topk = grad_dense(student, position), grad_topk(student, position)
    np.testing.assert_allclose(g_topk, g_dense, rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(np.abs(np.asarray(g_dense)).sum(-1)) == 1


@pytest.mark.fast
def test_sampled_targets_are_unbiased_per_token_and_a_rows_draws_do_not_depend_on_its_batch():
  """Over many rows of the same logits, each position's drawn share of each token is its ensemble probability
  (within 4 standard deviations); the draws of a row are the same computed alone or in a batch."""
  rows, k = 400, 8
  rng = np.random.default_rng(2)
  per_position = rng.normal(scale=1.5, size=(1, L, 2, V)).astype(np.float32)
  logits = np.repeat(per_position, rows, axis=0)
  spec = token_spec(f"sample:{k}", members=2, count=rows, temperature=1.0)
  out = stored(spec, logits)[1]
  assert (out["target_counts"].sum(-1) == k).all()
  counts = np.zeros((L, V))
  for position in range(L):
    np.add.at(counts[position], out["target_ids"][:, position].ravel(), out["target_counts"][:, position].ravel())
  p = np.exp(np.asarray(jax.nn.logsumexp(jax.nn.log_softmax(per_position[0], -1), axis=-2) - np.log(2)))
  expected, sd = rows * k * p, np.sqrt(rows * k * p * (1 - p))
  assert (np.abs(counts - expected) < 4 * sd + 1e-9).all(), np.abs(counts - expected).max()
  # Positions draw apart: the same logits at every position of a row would still give other draws per position.
  same = np.repeat(logits[:, :1], L, axis=1)
  drawn = stored(spec, same)[1]["target_ids"]
  assert not all((drawn[:, j] == drawn[:, 0]).all() for j in range(1, L))
  # A row's draws depend on (seed, example, view, position): row 7 alone, under its example index, is row 7.
  alone = stored(spec, logits[7:8], index=np.array([7]))[1]
  for name in ("target_ids", "target_counts"):
    np.testing.assert_array_equal(alone[name][0], out[name][7])
  # (Their log-probabilities, computed in a batch of another size, within float32 rounding.)
  np.testing.assert_allclose(alone["target_log_probs"][0], out["target_log_probs"][7], rtol=1e-6)


@pytest.mark.fast
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_logit_term_distils_per_token_under_the_masks(loss):
  """α·CE + (1 − α)·soft per token, averaged over the predicting positions of real rows only: equal to NumPy's
  mean over those positions of each position's own term (a [B, C] call per position)."""
  x = lm_teachers.token_rows(4, L, seed=4)
  labels = next_labels(x)
  logits = member_logits(x)
  spec = token_spec("dense", members=2, count=4, temperature=2.0)
  _, out, _, _ = stored(spec, logits)
  student = jnp.asarray(np.random.default_rng(5).normal(size=(4, L, V)), jnp.float32)
  teacher = Teacher(log_probs=jnp.asarray(out["targets"]), logits=jnp.asarray(logits.mean(-2)))
  batch = {"labels": jnp.asarray(labels), "mask": jnp.asarray([1, 1, 1, 0], jnp.float32)}
  mask = example_mask(batch)
  index = LOSS_NAMES.index(loss)
  settings = loss_settings()
  total = distillation_loss(student, batch["labels"], 0.3, teacher, temperature=2.0, loss=index,
                            settings=settings)[0]
  assert total.shape == (4, L)
  got = float(masked_mean(total, mask))
  terms = []
  for b in range(3):
    for j in range(L):
      if labels[b, j] >= 0:
        one = Teacher(log_probs=teacher.log_probs[b:b + 1, j], logits=teacher.logits[b:b + 1, j])
        terms.append(float(distillation_loss(student[b:b + 1, j], batch["labels"][b:b + 1, j], 0.3, one,
                                             temperature=2.0, loss=index, settings=settings)[0][0]))
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
  assert float(mask.sum()) == len(terms) < 4 * L


# --- Token caches built from `text:` data by the build itself ---------------------------------------------------

SEQ_LEN, CHUNK_ROWS = 16, 4  # 9 transfer rows: 3 chunks, so that each of 2 processes writes some.
TEACHERS = ("lm_teachers:byte_teacher", "lm_teachers:soft_byte_teacher")
DOCUMENTS = [  # Short documents of several lengths: rows hold pieces of two or three, and boundaries inside rows.
    "the cat sat on the mat.", "a b c d e f g h i j k l m n o p q r s t u v w x y z", "hello, world",
    "stillroom distils per token.", "zz", "packing documents into rows of sixteen tokens each, with segments.",
    "ok"]


def token_build(text_dir: str, out, targets: str = "dense", **changes) -> BuildConfig:
  return BuildConfig(dataset=f"text:{text_dir}", split="train[:75%]", eval_split="train[75%:]", seq_len=SEQ_LEN,
                     teachers=TEACHERS, temperature=1.0, targets=targets, chunk_rows=CHUNK_ROWS, batch_size=4,
                     out=str(out), progress=False, **changes)


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory, text_dir) -> str:
  return build_cache(token_build(text_dir, tmp_path_factory.mktemp("dense") / "c.zarr"))


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory, text_dir) -> str:
  return build_cache(token_build(text_dir, tmp_path_factory.mktemp("sample") / "c.zarr", "sample:8",
                                 member_logits=True))


def _all_rows(path: str, names) -> dict:
  cache = open_cache(path)
  return {name: np.concatenate([cache.read_chunk(c, names)[name] for c in range(cache.spec.num_chunks)])
          for name in names}


def test_a_built_token_cache_predicts_each_next_token_and_passes_verify_and_info(dense_cache, text_dir):
  """The off-by-one test through the build: the stored labels are the data's next tokens (`next_token_labels` of
  the rows read back), and the targets at position j peak on them, never on the next document's first token."""
  cache = open_cache(dense_cache)
  spec = cache.spec
  assert spec.positions == SEQ_LEN and spec.schema_version == TOKEN_SCHEMA_VERSION and spec.num_classes == 256
  rows = _all_rows(dense_cache, ["index", "labels", "targets", "member_logits"])
  assert rows["targets"].shape == (spec.num_rows, SEQ_LEN, 256)
  assert rows["member_logits"].shape == (spec.num_rows, SEQ_LEN, 2, 256)
  data = open_transfer_set(f"text:{text_dir}", "train[:75%]", None, text=spec.dataset.text_options())
  x, _ = data.read(data.positions(rows["index"]))
  labels = next_labels(np.asarray(x))
  np.testing.assert_array_equal(rows["labels"], labels)
  np.testing.assert_array_equal(rows["labels"], next_token_labels(np.asarray(x)))
  known = labels >= 0
  assert known.sum() > 20 and (~known).sum() > spec.num_rows  # Boundaries and row ends, not only the last position.
  top = rows["targets"].astype(np.float32).argmax(-1)
  np.testing.assert_array_equal(top[known], labels[known])
  p_top = np.exp(rows["targets"].astype(np.float32).max(-1))
  assert (p_top[known] > 0.4).all() and (p_top[~known] < 0.1).all()  # No peak where there is no next token.
  eval_rows = _all_rows_eval(dense_cache)
  assert eval_rows["eval_member_logits"].shape == (spec.num_eval_rows, SEQ_LEN, 2, 256)
  assert eval_rows["eval_labels"].shape == (spec.num_eval_rows, SEQ_LEN)
  checks = verify_cache(dense_cache)
  assert all(c.ok for c in checks), [c for c in checks if not c.ok]
  assert any(c.name == "labels match the dataset" and c.ok for c in checks)
  info = cache_info(dense_cache)
  assert info["positions"] == SEQ_LEN and info["tokens"] == spec.num_rows * SEQ_LEN
  assert info["bytes_per_token"]["targets"] == 256 * 2 and info["bytes_per_token"]["member_logits"] == 2 * 256 * 2
  assert info["stats"]["ensemble"]["accuracy"] == 1.0 and info["stats"]["labelled_rows"] == int(known.sum())
  # The eval split's accuracies (`shared.cache.eval_accuracies`) are per predicting position too: NumPy's.
  eval_labels = eval_rows["eval_labels"]
  eval_known = eval_labels >= 0
  member_top1 = eval_rows["eval_member_logits"].astype(np.float32).argmax(-1)  # [E, L, M]
  expected = [float((member_top1[..., m][eval_known] == eval_labels[eval_known]).mean()) for m in range(2)]
  assert info["stats"]["eval"]["members"] == pytest.approx(expected) and expected[0] == 1.0
  assert info["stats"]["eval"]["arithmetic"] == 1.0


def _all_rows_eval(path: str) -> dict:
  cache = open_cache(path)
  names = ["eval_member_logits", "eval_labels"]
  return {name: np.concatenate([cache.read_chunk(c, names, EVAL_ROWS)[name]
                                for c in range(cache.spec.chunks_of(EVAL_ROWS))]) for name in names}


def test_sampled_token_targets_pass_verify_and_a_damaged_chunk_fails_it(sample_cache, tmp_path):
  checks = verify_cache(sample_cache)
  assert all(c.ok for c in checks), [c for c in checks if not c.ok]
  rows = _all_rows(sample_cache, ["target_counts", "labels", "target_ids"])
  assert (rows["target_counts"].sum(-1) == 8).all()
  # Byte ids stored as uint16, read back as drawn: each position's ids distinct, then padding (id 0, count 0).
  assert rows["target_ids"].dtype == np.uint16 and rows["target_ids"].max() < 256
  drawn = rows["target_counts"] > 0
  assert (np.where(drawn, 0, rows["target_ids"]) == 0).all()
  damaged = str(tmp_path / "damaged.zarr")
  shutil.copytree(sample_cache, damaged)
  chunk = os.path.join(damaged, "target_counts", "c", "1", "0", "0")
  with open(chunk, "r+b") as f:
    f.seek(3)
    byte = f.read(1)
    f.seek(3)
    f.write(bytes([byte[0] ^ 0xFF]))
  failed = {c.name: c.detail for c in verify_cache(damaged) if c.failed}
  assert "chunks intact (checksums)" in failed and "1" in failed["chunks intact (checksums)"], failed


def _build_args(text_dir: str, out, *extra) -> list[str]:
  return ["build", "--dataset", f"text:{text_dir}", "--split", "train[:75%]", "--eval-split", "train[75%:]",
          "--seq-len", str(SEQ_LEN), *[arg for t in TEACHERS for arg in ("--teacher", t)], "--temperature", "1",
          "--targets", "sample:8", "--member-logits", "--chunk-rows", str(CHUNK_ROWS), "--batch-size", "4",
          "--out", str(out), "--no-progress", *extra]


def test_a_token_cache_built_by_two_processes_is_the_one_process_store(tmp_path, text_dir, sample_cache):
  """Each process writes its share of the chunks (sampled targets: the draws are per row, whatever the process);
  the one-process store is `sample_cache`, built with the same settings."""
  one = sample_cache
  port = conftest.free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}  # The teachers' module.
  two = str(tmp_path / "two.zarr")
  job = [subprocess.Popen([sys.executable, "-c", "from teacher_cache.cli import main\nmain({!r})".format(
      _build_args(text_dir, two, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                  str(index), "--heartbeat-timeout", "10"))], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
         for index in range(2)]
  ended = [(p.wait(timeout=300), p.stderr.read().decode()[-2000:]) for p in job]
  assert all(code == 0 for code, _ in ended), ended
  assert open_cache(two).complete and open_cache(two).spec.num_chunks >= 3
  assert conftest.array_files(two) == conftest.array_files(one)


def test_an_interrupted_token_build_resumes_to_the_uninterrupted_store(tmp_path, text_dir, sample_cache, monkeypatch):
  """Interrupted after its first chunk is queued, the store is not complete; the same build again ends with the
  store an uninterrupted build wrote, byte for byte."""
  out = tmp_path / "resumed.zarr"
  written = []

  def interrupted(*args, **kwargs):
    if written:
      raise KeyboardInterrupt
    written.append(args[2])
    return put_rows(*args, **kwargs)
  monkeypatch.setattr(build_module, "put_rows", interrupted)
  with pytest.raises(KeyboardInterrupt):
    build_cache(token_build(text_dir, out, "sample:8", member_logits=True))
  monkeypatch.undo()
  with pytest.raises(StillroomError):
    open_cache(str(out))  # Not complete.
  build_cache(token_build(text_dir, out, "sample:8", member_logits=True))
  assert conftest.array_files(str(out)) == conftest.array_files(sample_cache)


def test_a_language_model_student_distils_from_a_token_cache(sample_cache, tmp_path):
  """A test-size LM (`lm_teachers:tiny_lm`) trains a few steps by the sampled KL per token and α·CE (every logit
  term's per-token value under the masks is `test_every_logit_term_distils_per_token_under_the_masks`'s), its losses
  finite."""
  out = str(tmp_path / "run")
  final = fit(FitConfig(model="lm_teachers:tiny_lm", cache=sample_cache, loss="kl", alpha=0.5, epochs=2,
                        batch_size=4, lr=1e-3, out=out, progress=False))
  assert final == read_final(out) and final["phase"] == "distill"
  for name in ("loss", "hard_ce", "soft"):
    assert np.isfinite(final[name]) and final[name] > 0, final


def test_info_of_a_token_cache_speaks_of_tokens_not_shifts(dense_cache, capsys):
  """`teacher-cache info` of token rows: no shift or flip (a text set's one view is its rows as packed), and the
  ensemble's accuracy over labelled tokens (the predicting positions), not rows."""
  from teacher_cache.cli import main as cache_main
  cache_main(["info", dense_cache])
  out = capsys.readouterr().out
  assert f"rows of {SEQ_LEN} tokens as packed)" in out and "max shift" not in out and "flip False" not in out, out
  assert re.search(r"^ensemble .* on \d+ labelled tokens$", out, re.M), out


def _row_bytes(spec) -> int:
  """The bytes per row of the transfer rows' arrays (all but the chunks' commit flags), from their shapes."""
  return sum(int(np.prod(a.shape[1:])) * np.dtype(a.dtype).itemsize for a in spec.arrays
             if a.shape[0] == spec.num_rows and a.name != "chunk_committed")


@pytest.mark.fast
def test_the_default_chunk_of_token_rows_holds_64_mib_at_most_4096_rows_at_least_one():
  # L = 256, V = 256, dense float16 targets and 2 members' logits: 4096 rows would be ~1.6 GB a chunk.
  spec = token_spec("dense", members=2, positions=256, dtype="float16", member_logits=True)
  spec = dataclasses.replace(spec, num_classes=256, arrays=(), dataset=dataclasses.replace(spec.dataset,
                                                                                          num_classes=256))
  # targets, member_logits, labels (int32); index, view, fold, shift, flip.
  per_row = 256 * 256 * 2 + 256 * 2 * 256 * 2 + 256 * 4 + 8 + 4 + 4 + 2 + 1
  assert _row_bytes(spec) == per_row and 4096 * per_row > 1.6e9
  assert build_module.token_chunk_rows(spec) == 64 * 2 ** 20 // per_row == 170
  tiny = token_spec("sample:2", positions=1)  # A few bytes a row: 64 MiB would be millions of rows.
  assert build_module.token_chunk_rows(tiny) == 4096
  huge = token_spec("dense", members=2, positions=4096, dtype="float16", member_logits=True)
  huge = dataclasses.replace(huge, num_classes=2 ** 16, arrays=(), dataset=dataclasses.replace(
      huge.dataset, num_classes=2 ** 16))  # 1.6 GB a row.
  assert _row_bytes(huge) > 64 * 2 ** 20 and build_module.token_chunk_rows(huge) == 1


def test_a_token_build_without_chunk_rows_takes_chunks_of_64_mib_and_one_given_keeps_its_own(text_dir, tmp_path,
                                                                                          monkeypatch):
  """The build resolves the default after opening the data and teachers (planned only: nothing is written)."""
  planned = []

  def stop(config, spec, disk=True):
    planned.append((config, spec))
    raise KeyboardInterrupt
  monkeypatch.setattr(build_module, "check_limits", stop)
  for chunk_rows in (None, 3):
    with pytest.raises(KeyboardInterrupt):
      build_cache(dataclasses.replace(token_build(text_dir, tmp_path / "c.zarr"), chunk_rows=chunk_rows))
  (default_config, default), (given_config, given) = planned
  assert default.chunk_rows == default_config.chunk_rows == min(4096, 64 * 2 ** 20 // _row_bytes(default)) > 1000
  assert {a.name: a.chunks[0] for a in default.arrays}["targets"] == default.chunk_rows
  assert given.chunk_rows == given_config.chunk_rows == 3 and given_config.batch_size == 3
  assert not os.path.exists(tmp_path / "c.zarr")
