"""Mixed views (`--mix mixup:A|cutmix:A`): partners and λ as pure functions of the seed, λ's distribution, the
teachers' logits on exactly the mixed images a student renders (host and device renderers, crops and shifts, input
workers, `views`/`import`), and the λ-mixed hard-label term."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from shared.augment import (MIX_BOX, MIX_LAMBDA, MIX_PARTNER, MIX_VIEW, Augmentation, beta_draws, canonical_mix,
                            mix_images, mix_params, parse_mix)
from shared.cache import MIX_SCHEMA_VERSION, SCHEMA_VERSION, CacheSpec, open_cache
from shared.data import open_transfer_set
from shared.errors import StillroomError
from shared.losses import mixed_cross_entropy
from shared.render import inputs_of, render_on_device
from shared.runs import load_teacher
from student_train.loader import CacheLoader
from student_train.terms import Teacher, distillation_loss, loss_settings
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.external import VIEWS_FILE, chunk_file, import_cache, write_views
from teacher_cache.verify import verify_cache

S = 8  # Crop views' side.
SHAPE = (13, 11, 3)  # The npz images (shift views keep it).


# --- Pure functions: the draws, their distribution, the mixing and the hard-label term ---

def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
  """The two-sample Kolmogorov–Smirnov statistic sup |F_a − F_b| (ties handled: both ECDFs at every pooled value)."""
  pooled = np.concatenate([a, b])
  fa = np.searchsorted(np.sort(a), pooled, side="right") / len(a)
  fb = np.searchsorted(np.sort(b), pooled, side="right") / len(b)
  return float(np.abs(fa - fb).max())


def _ks_critical(n: int, m: int, level: float = 1e-3) -> float:
  """The asymptotic critical value of the two-sample KS statistic at `level`: c(α)·sqrt((n + m) / (n·m))."""
  return np.sqrt(-0.5 * np.log(level / 2)) * np.sqrt((n + m) / (n * m))


@pytest.mark.fast
@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_lambda_follows_beta_a_a_and_the_test_rejects_a_wrong_a(alpha):
  """λ of 20,000 rows against a NumPy Beta(A, A) sample of the same size (both rounded to float32 as stored): the
  two-sample KS test at level 0.001 accepts it, and at the same sample size rejects Beta(2A, 2A), Beta(A/2, A/2) and,
  for A other than 1, Uniform(0, 1) (its power), so the acceptance is not for want of data."""
  count = 20_000
  index = np.arange(count) // 7
  view = 1 + np.arange(count) % 7
  augmentation = Augmentation(seed=11, mix=canonical_mix(f"mixup:{alpha}"))
  drawn = mix_params(augmentation, index, view, np.arange(count // 7 + 1), 8, (8, 8))[MIX_LAMBDA]
  rng = np.random.default_rng(0)
  critical = _ks_critical(count, count)
  assert _ks_statistic(drawn, rng.beta(alpha, alpha, count).astype(np.float32)) < critical
  assert _ks_statistic(drawn, rng.beta(2 * alpha, 2 * alpha, count).astype(np.float32)) > critical
  assert _ks_statistic(drawn, rng.beta(alpha / 2, alpha / 2, count).astype(np.float32)) > critical
  if alpha != 1.0:
    assert _ks_statistic(drawn, rng.uniform(size=count).astype(np.float32)) > critical
  # The Gamma ratio itself, in float64: its mean and variance are Beta(A, A)'s (1/2 and 1 / (4 (2A + 1))).
  exact = beta_draws(11, 80, index, view, alpha)
  assert abs(exact.mean() - 0.5) < 4 * np.sqrt(0.25 / count)
  assert abs(exact.var() / (0.25 / (2 * alpha + 1)) - 1) < 0.05


@pytest.mark.fast
@pytest.mark.parametrize("mix", ["mixup:0.4", "cutmix:1.0"])
def test_partners_and_lambda_are_pure_functions_of_seed_index_and_view(mix):
  """The same rows drawn in one batch, in pieces or shuffled give the same partners, views, λ and boxes; view 0 is
  never mixed; partners are examples of the population, each about equally often, at the row's own view id; the
  draws do not depend on the view count V (a cache of more views holds the same rows); another seed draws others."""
  augmentation = Augmentation(seed=3, mix=mix, image_size=S)
  population = np.arange(5, 5 + 3 * 1000, 3)  # 1,000 examples (split positions 5, 8, ...), 4 views each.
  index = np.repeat(population, 4)
  view = np.tile(np.arange(4), 1000)
  whole = mix_params(augmentation, index, view, population, 4, SHAPE)
  order = np.random.default_rng(1).permutation(len(index))
  shuffled = mix_params(augmentation, index[order], view[order], population, 4, SHAPE)
  pieces = [mix_params(augmentation, index[k:k + 77], view[k:k + 77], population, 4, SHAPE)
            for k in range(0, len(index), 77)]
  for name, values in whole.items():
    np.testing.assert_array_equal(shuffled[name], values[order])
    np.testing.assert_array_equal(np.concatenate([p[name] for p in pieces]), values)
  clean = view == 0
  assert (whole[MIX_PARTNER][clean] == -1).all() and (whole[MIX_VIEW][clean] == -1).all()
  assert (whole[MIX_LAMBDA][clean] == 1).all()
  partners, views = whole[MIX_PARTNER][~clean], whole[MIX_VIEW][~clean]
  assert np.isin(partners, population).all()
  # Chi-square test at level 0.001 of uniform partners (in 5 equal groups of examples).
  counts = np.bincount(np.searchsorted(population, partners) // 200, minlength=5)
  assert ((counts - len(partners) / 5) ** 2 / (len(partners) / 5)).sum() < 18.47  # 4 degrees of freedom.
  np.testing.assert_array_equal(views, view[~clean])  # The partner's view is the row's own view id.
  for v in (1, 2, 3):  # ...and the partners of each view id are uniform too (1,000 rows a view: 4 d.o.f. again).
    counts = np.bincount(np.searchsorted(population, whole[MIX_PARTNER][view == v]) // 200, minlength=5)
    assert ((counts - 1000 / 5) ** 2 / (1000 / 5)).sum() < 18.47
  more = mix_params(augmentation, index, view, population, 8, SHAPE)  # Any V: the same rows, the same draws.
  for name, values in whole.items():
    np.testing.assert_array_equal(more[name], values)
  other = mix_params(Augmentation(seed=4, mix=mix, image_size=S), index, view, population, 4, SHAPE)
  assert (other[MIX_LAMBDA][~clean] != whole[MIX_LAMBDA][~clean]).mean() > 0.5
  if mix.startswith("cutmix"):  # λ is the exact share of the view outside the box, and the box fits the view.
    top, left, height, width = whole[MIX_BOX].T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= S).all() and (left + width <= S).all()
    np.testing.assert_array_equal(whole[MIX_LAMBDA], (1 - height * width / S ** 2).astype(np.float32))
    assert (whole[MIX_BOX][clean] == 0).all()


@pytest.mark.fast
def test_mixing_is_the_formula_and_the_same_on_the_host_and_the_device():
  rng = np.random.default_rng(0)
  a, b = (rng.integers(0, 256, (6, S, S, 3), dtype=np.uint8) for _ in range(2))
  lam = rng.uniform(size=6).astype(np.float32)
  lam[0] = 1.0
  mixed = mix_images(a, b, lam)
  expected = lam[:, None, None, None] * a.astype(np.float32) + (1 - lam[:, None, None, None]) * b.astype(np.float32)
  np.testing.assert_allclose(mixed, expected, rtol=1e-6)
  assert mixed.dtype == np.float32 and (mixed[0] == a[0]).all()  # λ = 1 is the view itself, exactly.
  np.testing.assert_allclose(np.asarray(jax.jit(lambda *v: mix_images(*v, xp=jnp))(a, b, lam)), mixed, rtol=1e-6)
  box = np.array([[0, 0, 0, 0], [1, 2, 3, 4], [0, 0, S, S], [5, 6, 3, 2], [2, 2, 1, 1], [7, 0, 1, S]], np.int32)
  pasted = a.copy()
  for k, (top, left, height, width) in enumerate(box):
    pasted[k, top:top + height, left:left + width] = b[k, top:top + height, left:left + width]
  np.testing.assert_array_equal(mix_images(a, b, lam, box), pasted)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda *v: mix_images(*v, xp=jnp))(a, b, lam, box)), pasted)


@pytest.mark.fast
def test_the_hard_label_term_of_a_mixed_view_is_the_lambda_mix_of_two_cross_entropies():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  labels, partners = np.array([0, 1, 2, 3, 1]), np.array([3, 3, 0, -1, 1])
  lam = np.array([0.3, 0.9, 0.5, 1.0, 0.0], np.float32)
  log_p = conftest.numpy_log_softmax(logits)
  ce = lambda y: -log_p[np.arange(5), np.maximum(y, 0)]  # noqa: E731
  expected = lam * ce(labels) + (1 - lam) * ce(partners)
  np.testing.assert_allclose(mixed_cross_entropy(logits, labels, np.maximum(partners, 0), lam), expected, rtol=1e-5)
  total, hard, soft = distillation_loss(logits, labels, 1.0, Teacher(), temperature=1.0, loss=0,
                                        settings=loss_settings(), mix=(partners, lam))
  np.testing.assert_allclose(hard, expected, rtol=1e-5)
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  assert not np.asarray(soft).any()


@pytest.mark.fast
def test_the_mix_setting_reads_writes_and_versions():
  assert parse_mix("none") == ("none", None) and parse_mix("cutmix:1") == ("cutmix", 1.0)
  assert canonical_mix("mixup:.20") == "mixup:0.2" and canonical_mix("cutmix:1") == "cutmix:1.0"
  for bad in ("mixup", "mixup:0", "mixup:-1", "cutmix:nan", "cutmix:inf", "mix:1", "none:1", ""):
    with pytest.raises(StillroomError, match="give 'none', 'mixup:A' or 'cutmix:A'"):
      parse_mix(bad)
  # Older caches' augmentations (no "mix") read as unmixed; unmixed ones are written as they were.
  assert Augmentation.from_dict({"seed": 0, "max_shift": 1, "flip": False}).mix == "none"
  assert "mix" not in Augmentation().to_dict()
  assert Augmentation.from_dict(Augmentation(mix="mixup:0.2").to_dict()).mix == "mixup:0.2"


# --- Builds: the teachers' logits on the student's mixed batch ---

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  """An npz of 24 uint8 images, a crop teacher (8x8 views) and a shift teacher (13x11 views), and the builds of
  mixed caches: {(mix, views kind, renderer): store}."""
  root = tmp_path_factory.mktemp("mix")
  rng = np.random.default_rng(3)
  np.savez(root / "images.npz", x=rng.integers(0, 256, (24, *SHAPE), dtype=np.uint8), y=rng.integers(0, 10, 24))
  dataset = f"npz:{root / 'images.npz'}"
  scale = {"shift": 0.0, "scale": 255.0}
  teachers = {"crop": conftest.make_teacher(root / "tc", input_shape=(S, S, 3), normalization=scale),
              "shift": conftest.make_teacher(root / "ts", input_shape=SHAPE, normalization=scale, seed=1)}
  stores = {}
  for mix, kind, renderer in (("mixup:0.4", "crop", "host"), ("cutmix:1.0", "crop", "host"),
                              ("mixup:0.4", "shift", "host"), ("cutmix:1.0", "shift", "host"),
                              ("mixup:0.4", "crop", "device"), ("cutmix:1.0", "crop", "device")):
    out = str(root / f"{mix}-{kind}-{renderer}.zarr")
    views = {"image_size": S, "renderer": renderer} if kind == "crop" else {"max_shift": 2}
    build_cache(BuildConfig(dataset=dataset, teachers=(teachers[kind],), views=3, flip=True, mix=mix, chunk_rows=30,
                            batch_size=16, out=out, progress=False, dtype="float32", eval_split="none", **views))
    stores[mix, kind, renderer] = out
  return dataset, teachers, stores, root


def _logits(teacher: str, x) -> np.ndarray:
  member = load_teacher(teacher)
  return np.asarray(member.apply_fn(member.params, np.asarray(x).astype(np.float32) / 255))


def _independent_views(spec, data, rows: dict) -> np.ndarray:
  """The mixed views of stored rows, rendered here: each row's view and its partner's drawn and rendered as plain
  views (host: `Augmentation.render`; device: `render_on_device`), mixed by the formula (mixup) or by pasting."""
  plain = Augmentation(**{**spec.augmentation.__dict__, "mix": "none"})
  position = data.positions(rows["index"])

  def render(positions, index, view):
    images = data.read(positions)[0]
    sizes = np.array([image.shape[:2] for image in images]).reshape(-1, 2) if plain.kind == "crop" else None
    params = plain.view_params(index, view, sizes)
    if plain.renderer == "device":
      return np.asarray(render_on_device(images, params["crop"], params["flip"], S))
    return plain.render(images, params)

  own = render(position, rows["index"], rows["view"])
  mixed_rows = rows["view"] > 0
  partner = np.where(mixed_rows, rows[MIX_PARTNER], rows["index"])
  partner_view = np.where(mixed_rows, rows[MIX_VIEW], rows["view"])
  theirs = render(data.positions(partner), partner, partner_view)
  if MIX_BOX not in rows:
    lam = rows[MIX_LAMBDA].reshape((-1,) + (1,) * (own.ndim - 1))
    return lam * own.astype(np.float32) + (1 - lam) * theirs.astype(np.float32)
  out = own.copy()
  for k, (top, left, height, width) in enumerate(rows[MIX_BOX]):
    out[k, top:top + height, left:left + width] = theirs[k, top:top + height, left:left + width]
  return out


@pytest.mark.parametrize("key", [("mixup:0.4", "crop", "host"), ("cutmix:1.0", "crop", "host"),
                                 ("mixup:0.4", "shift", "host"), ("cutmix:1.0", "shift", "host"),
                                 ("mixup:0.4", "crop", "device"), ("cutmix:1.0", "crop", "device")])
def test_the_cached_logits_are_the_teachers_on_the_mixed_batch_the_student_renders(mixed, key):
  dataset, teachers, stores, _ = mixed
  mix, kind, renderer = key
  cache, data = open_cache(stores[key]), open_transfer_set(dataset)
  spec = cache.spec
  assert spec.schema_version == MIX_SCHEMA_VERSION and spec.augmentation.mix == mix
  assert {MIX_PARTNER, MIX_VIEW, MIX_LAMBDA} <= {a.name for a in spec.arrays}
  assert (spec.array(MIX_BOX) is not None) == mix.startswith("cutmix")
  # The stored rows, re-rendered here from their stored partners and λ.
  names = ["index", "view", "member_logits", *spec.augmentation.param_names]
  rows = {k: np.concatenate([cache.read_chunk(c, names)[k] for c in range(spec.num_chunks)]) for k in names}
  assert (rows[MIX_LAMBDA][rows["view"] > 0] < 1).any()  # Some rows are mixed...
  assert (rows[MIX_VIEW][rows["view"] == 0] == -1).all()  # ...never view 0.
  np.testing.assert_allclose(rows["member_logits"][:, 0], _logits(teachers[kind], _independent_views(spec, data, rows)),
                             rtol=1e-5, atol=1e-5)
  # The student's loader renders the same mixed images (in an input worker for one of them): the teacher's logits on
  # its batch are the cached ones.
  workers = 1 if key == ("cutmix:1.0", "shift", "host") else 0
  loader = CacheLoader(cache, data, batch_size=16, seed=0, fields=("member_logits",), workers=workers)
  for batch in loader.epoch(0):
    x = inputs_of(batch, S)
    real = batch["mask"] > 0
    np.testing.assert_allclose(_logits(teachers[kind], x)[real], batch["member_logits"][real, 0], rtol=1e-5, atol=1e-5)
    assert batch[MIX_LAMBDA].dtype == np.float32 and batch["mix_labels"].shape == batch["labels"].shape
    assert np.asarray(x).dtype == (np.float32 if mix.startswith("mixup") else np.uint8)
  loader.close()
  assert all(check.ok for check in verify_cache(stores[key])), [c for c in verify_cache(stores[key]) if not c.ok]


def test_a_mixed_build_is_the_same_with_other_batch_chunk_and_worker_counts(mixed, tmp_path):
  """Partners, λ, boxes and the teachers' logits do not depend on --batch-size, --chunk-rows or --workers (0 or 1)."""
  dataset, teachers, stores, _ = mixed
  out = str(tmp_path / "again.zarr")
  build_cache(BuildConfig(dataset=dataset, teachers=(teachers["crop"],), views=3, flip=True, mix="cutmix:1.0",
                          image_size=S, chunk_rows=12, batch_size=5, workers=1, out=out, progress=False,
                          dtype="float32", eval_split="none"))
  first, again = open_cache(stores["cutmix:1.0", "crop", "host"]), open_cache(out)
  names = ["index", "view", "labels", "crop", "flip", MIX_PARTNER, MIX_VIEW, MIX_LAMBDA, MIX_BOX, "member_logits"]

  def read(cache):
    return {k: np.concatenate([cache.read_chunk(c, names)[k] for c in range(cache.spec.num_chunks)]) for k in names}
  ours, theirs = read(first), read(again)
  for name in names[:-1]:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  np.testing.assert_allclose(ours["member_logits"], theirs["member_logits"], rtol=1e-5, atol=1e-5)


def test_info_shows_the_mix_and_verify_replays_the_partners(mixed, tmp_path, capsys):
  import shutil  # pylint: disable=import-outside-toplevel
  import zarr  # pylint: disable=import-outside-toplevel
  from teacher_cache.cli import main as cache_main  # pylint: disable=import-outside-toplevel
  _, _, stores, _ = mixed
  code, printed, err = conftest.run_cli(cache_main, ["info", stores["cutmix:1.0", "crop", "host"]], capsys)
  assert code == 0 and "schema 7" in printed, err
  assert "mixed views  cutmix:1.0: views 1..2 each mixed with a partner view" in printed
  assert "Beta(1.0, 1.0); view 0 unmixed" in printed
  # A row's λ that is not its draw's: the replay of the rows finds it (its checksum and record are valid).
  copy = str(tmp_path / "c.zarr")
  shutil.copytree(stores["mixup:0.4", "shift", "host"], copy)
  lam = zarr.open_group(copy, mode="r+")[MIX_LAMBDA]
  lam[4] = 0.5 if lam[4] != 0.5 else 0.25
  conftest.reseal(copy)
  failed = [check for check in verify_cache(copy) if not check.ok]
  assert len(failed) == 1 and "mix_partner/mix_view/mix_lambda" in failed[0].name, failed
  assert "replay from the seed" in failed[0].name and "4" in failed[0].detail, failed


def test_views_for_external_teachers_are_the_mixed_images_and_record_the_mix(mixed, tmp_path):
  dataset, teachers, stores, _ = mixed
  out = str(tmp_path / "views")
  record = write_views(BuildConfig(dataset=dataset, views=3, flip=True, mix="cutmix:1.0", image_size=S, chunk_rows=30,
                                   batch_size=16, out=out, progress=False))
  assert record["augmentation"]["mix"] == "cutmix:1.0"
  assert json.load(open(os.path.join(out, VIEWS_FILE)))["augmentation"]["mix"] == "cutmix:1.0"
  cache = open_cache(stores["cutmix:1.0", "crop", "host"])
  member = load_teacher(teachers["crop"])
  rows, logits = [], []
  for chunk in range(cache.spec.num_chunks):
    views = np.load(os.path.join(out, chunk_file(chunk)))
    stored = cache.read_chunk(chunk, ("member_logits",))["member_logits"][:, 0]
    rows.append(views["row"])
    logits.append(np.asarray(member.apply_fn(member.params, views["x"])))
    np.testing.assert_allclose(logits[-1], stored, rtol=1e-5, atol=1e-5)
  # Their logits imported (with the same --mix, checked against views.json) make the build's rows.
  np.savez(tmp_path / "logits.npz", row=np.concatenate(rows), logits=np.concatenate(logits))
  imported = import_cache(BuildConfig(dataset=dataset, views=3, flip=True, mix="cutmix:1.0", image_size=S,
                                      chunk_rows=30, dtype="float32", out=str(tmp_path / "i.zarr"), progress=False),
                          [str(tmp_path / "logits.npz")], out)
  names = ("index", "view", "crop", "flip", MIX_PARTNER, MIX_VIEW, MIX_LAMBDA, MIX_BOX)
  for chunk in range(cache.spec.num_chunks):
    ours, theirs = open_cache(imported).read_chunk(chunk, names), cache.read_chunk(chunk, names)
    for name in names:
      np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  with pytest.raises(StillroomError, match="mix"):  # Views of another mix are not these rows.
    import_cache(BuildConfig(dataset=dataset, views=3, flip=True, mix="mixup:1.0", image_size=S, chunk_rows=30,
                             out=str(tmp_path / "j.zarr"), progress=False), [str(tmp_path / "logits.npz")], out)


def test_fit_trains_on_a_mixed_cache_with_the_mixed_hard_labels(mixed, capsys):
  from student_train.cli import main as student_main  # pylint: disable=import-outside-toplevel
  dataset, _, stores, root = mixed
  """The device renderer's step mixes the rows' and partners' canvases, and the hard term reads λ and the partners'
  labels."""
  store = stores["cutmix:1.0", "crop", "device"]
  code, _, err = conftest.run_cli(student_main, [
      "fit", "--cache", store, "--model", "mlp-tiny", "--alpha", "0.5", "--mix", "cutmix:1", "--epochs", "1",
      "--batch-size", "16", "--eval-split", "none", "--no-progress", "--out", root / "run"], capsys)
  assert code == 0, err[-2000:]
  metrics = [json.loads(line) for line in open(root / "run" / "metrics.jsonl")]
  assert metrics and all(np.isfinite(m["hard_ce"]) for m in metrics if "hard_ce" in m)


@pytest.mark.fast
def test_a_spec_of_mixed_views_is_schema_7_and_only_it_is():
  """An older stillroom (reading versions up to 6) refuses a mixed cache by its version; a mixed spec that claims 6,
  or an unmixed one that claims 7, is damaged."""
  from shared.cache import READABLE_SCHEMA_VERSIONS  # pylint: disable=import-outside-toplevel
  assert MIX_SCHEMA_VERSION not in range(1, SCHEMA_VERSION + 1) and MIX_SCHEMA_VERSION in READABLE_SCHEMA_VERSIONS
  attrs = json.loads(json.dumps(_spec(Augmentation(mix="mixup:0.2")).to_attrs()))
  assert attrs["schema_version"] == MIX_SCHEMA_VERSION and attrs["augmentation"]["mix"] == "mixup:0.2"
  assert CacheSpec.from_attrs(attrs).augmentation.mix == "mixup:0.2"
  with pytest.raises(StillroomError, match="a cache of mixed views .* is schema 7, and only such a cache is"):
    CacheSpec.from_attrs({**attrs, "schema_version": SCHEMA_VERSION})
  plain = json.loads(json.dumps(_spec(Augmentation()).to_attrs()))
  assert plain["schema_version"] == SCHEMA_VERSION and "mix" not in plain["augmentation"]
  with pytest.raises(StillroomError, match="is schema 7, and only such a cache is"):
    CacheSpec.from_attrs({**plain, "schema_version": MIX_SCHEMA_VERSION})


def _spec(augmentation: Augmentation) -> CacheSpec:
  from shared.cache import MemberSpec  # pylint: disable=import-outside-toplevel
  from shared.data import DatasetSpec  # pylint: disable=import-outside-toplevel
  member = MemberSpec(name="t", source="t", model="mlp-small", num_params=1, digest="0" * 64, trained_epochs=1,
                      normalization={"shift": 0.0, "scale": 1.0})
  dataset = DatasetSpec(name="digits", split="train", canonical_split="train[0:10]", count=10, fingerprint="0" * 64,
                        input_shape=(8, 8, 1), input_dtype="float32", num_classes=10, labeled=True)
  return CacheSpec(temperature=4.0, combine="arithmetic", members=(member,), dataset=dataset, num_classes=10, views=3,
                   augmentation=augmentation, dtype="float16", chunk_rows=6, software_version="test")


def test_a_label_fraction_of_a_mixed_cache_is_refused(mixed, capsys):
  """Partners come from the whole transfer set: a fraction of the examples would still see the others' pixels and,
  in the hard term, labels. Refused in one line, before anything is written."""
  from student_train.cli import main as student_main  # pylint: disable=import-outside-toplevel
  _, _, stores, root = mixed
  code, _, err = conftest.run_cli(student_main, [
      "fit", "--cache", stores["mixup:0.4", "shift", "host"], "--model", "mlp-tiny", "--label-fraction", "0.5",
      "--no-progress", "--out", root / "fraction"], capsys)
  errors = [line for line in err.splitlines() if ": error: " in line]
  assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
  assert "--label-fraction 0.5: cache" in errors[0] and "mixes every example's views with partners" in errors[0]
  assert not os.path.exists(root / "fraction")
