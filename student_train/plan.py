"""A run's plan: its config resolved against its data and cache, and what that makes the step compute.

`plan_run` opens the dataset and cache a config names, checks that they fit together, fills in every setting
left to the data (alpha, T, rule, members, data seed), and decides the one rule for soft targets: a student whose
loss, T, rule and members are the cache's reads the stored `targets`; any other re-derives them from
`member_logits` in the step.
"""

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from shared import storage
from shared.augment import NO_MIX, Augmentation, canonical_mix, fold_of, make_augmentation
from shared.cache import Cache, CacheSpec, open_cache
from shared.data import (FINGERPRINT_VERSION, NO_EVAL, Normalization, TransferSet, check_eval_set,
                         default_eval_split, local_path, open_transfer_set)
from shared.data.prepared import check_views as check_prepared_views
from shared.data.prepared import mismatch_hint
from shared.data.backends import is_text
from shared.data.text import TextOptions
from shared.data.text import check_views as check_text_views
from shared.data.text import mismatch_hint as text_mismatch_hint
from shared.ensemble import member_weights
from shared.errors import StillroomError
from shared.log import logger
from shared.parallel import cap_batch
from shared.models import (MODELS, WEIGHTS, ModelSpec, build_model, check_input_shape, feature_shapes, is_token_rows,
                           structure_digest, takes_row_mask)
from shared.runs import load_run_teacher
from shared.specialists import (SpecialistPlan, dustbin_correction, dustbin_labels, initial_params,
                                parse_specialist)
from shared.options import DEFAULT_SPLIT, resolve_dataset, text_options
from shared.runs import SpecialistRecord
from shared.settings import declared, names_where
from student_train.config import DEFAULT_KD_ALPHA, FEATURE_OPTIONS, WEIGHT_OPTIONS, FitConfig, validate_config
from student_train.steps import Hypers
from student_train.terms import FEATURE_LOSSES, LOGIT_TERMS, TERMS, canonical_loss, loss_settings, parse_loss
from student_train.terms.features import FeatureTerm, plan_feature_terms


@dataclasses.dataclass(frozen=True, kw_only=True)
class Resolved:
  """The values a run resolves that are part of its identity, as its config.json records them (None: a run dir
  written before they existed ran without them)."""

  specialist_classes: tuple[int, ...] | None = None  # A specialist's classes, in its outputs' order.
  dustbin_correction: float | None = None  # The log-odds added to its dustbin logit to undo --enrich.
  init_digest: str | None = None  # The parameter digest of the --init-from run.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Teaching:
  """Where a distilled student's soft targets come from.

  Attributes:
    loss: its logit term, as `--loss` gives it (`student_train.terms`: "kl", "mse", ...).
    temperature: T of the soft term.
    combine: ensemble rule.
    members: the members of the cache it learns from.
    use_stored: the cache's stored targets are exactly these (same T, rule and all members), of a kind its logit
      term learns from.
  """

  loss: str
  temperature: float
  combine: str
  members: tuple[int, ...]
  use_stored: bool

  def fields(self, spec: CacheSpec) -> tuple[str, ...]:
    """The arrays of a cache with `spec` that this student's logit term reads."""
    return self.term.arrays(spec, self.use_stored)

  @property
  def term(self):
    """Its registered logit term."""
    return LOGIT_TERMS[parse_loss(self.loss)[0]]


@dataclasses.dataclass(frozen=True, eq=False)
class RunPlan:
  """Everything a run needs, resolved from its config, its data and its cache.

  Attributes:
    config: the config with every None that the data decides resolved.
    transfer_set: the training data.
    cache: the teacher cache (distillation), or None (hard labels).
    teaching: the soft-target settings, or None (hard labels).
    model_spec: the student's structure.
    normalization: its input normalisation.
    examples: the example indices it trains on (folds, label fraction), or None for all.
    eval_set: the per-epoch evaluation data, or None.
    augmentation: how its inputs are rendered: the cache's views, or the config's (view 0 for evaluation).
    initial_params: the parameters to start from (`--init-from`, as pure dicts), or None for a fresh initialisation.
    sampler: epoch -> the example indices of that epoch (a specialist's enriched sampling), or None for every
      example once.
    feature_terms: its feature losses (`--hint/--attention/--similarity`), resolved.
    specialist: a specialist's classes, in its outputs' order (the dustbin last), and the log-odds added to its
      dustbin logit to undo --enrich; None for other runs.
    init_digest: the parameter digest of the --init-from run (part of the run's identity: a resume checks it).
  """

  config: FitConfig
  transfer_set: TransferSet
  cache: Cache | None
  teaching: Teaching | None
  model_spec: ModelSpec
  normalization: Normalization
  examples: np.ndarray | None
  eval_set: TransferSet | None
  augmentation: Augmentation
  initial_params: dict | None = None
  sampler: Callable[[int], np.ndarray] | None = None
  feature_terms: tuple[FeatureTerm, ...] = ()
  specialist: SpecialistRecord | None = None
  init_digest: str | None = None

  @property
  def tokens(self) -> bool:
    """Whether the run trains on token rows (a language model): its losses and metrics average over predicting
    positions, which its epoch lines count as `tokens`."""
    return is_token_rows(self.model_spec.input_shape)

  def record(self) -> dict:
    """The resolved config written to config.json (and compared on resume)."""
    # Not part of the identity: what does not change the run, and what its setting leaves unused (as 0.2 wrote it).
    left_out = set(names_where(FitConfig, identity=False)) | {
        name for name, field in declared(FitConfig).items()
        if field.metadata["requires"] and getattr(self.config, field.metadata["requires"]) is None}
    return {
        "config": {**{k: v for k, v in dataclasses.asdict(self.config).items() if k not in left_out},
                   **self.resolved_values()},
        "model": self.model_spec.to_dict(),
        "normalization": self.normalization.to_dict(),
        "dataset": self.transfer_set.describe().to_dict(),
        "cache": None if self.cache is None else {"build_key": self.cache.spec.build_key()},
        "teaching": None if self.teaching is None else dataclasses.asdict(self.teaching),
        "eval": None if self.eval_set is None else {"dataset": self.eval_set.name, "split": self.eval_set.split,
                                                     "fingerprint": self.eval_set.fingerprint,
                                                     "fingerprint_version": FINGERPRINT_VERSION},
        "examples": None if self.examples is None else len(self.examples),
    }

  def resolved_values(self) -> dict:
    """What the run resolved from other runs and the data that is part of its identity, recorded beside its config
    (as settings were, so that older run dirs still resume)."""
    specialist = self.specialist
    return dataclasses.asdict(Resolved(
        specialist_classes=None if specialist is None else specialist.classes,
        dustbin_correction=None if specialist is None else specialist.dustbin_correction,
        init_digest=self.init_digest))

  def input_paths(self) -> list[str]:
    """The files and directories the run reads: its cache, npz datasets, the data dir."""
    paths = [self.cache.path] if self.cache is not None else []
    paths += [self.config.init_from] if self.config.init_from else []
    paths += [parse_specialist(self.config.specialist)[0]] if self.config.specialist else []
    paths += [local_path(data.name) for data in (self.transfer_set, self.eval_set) if data is not None]
    return [path for path in paths + [self.config.data_dir] if path]

  def stream_key(self) -> dict:
    """The settings that decide the batches a run sees: runs with equal keys can train together."""
    # Per student (they train together), per process (they do not change the batches), and the job's own.
    per_run = (names_where(FitConfig, scope="student") + names_where(FitConfig, scope="process")
               + names_where(FitConfig, group="job"))
    shared = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in per_run}
    # The feature terms too: a run's attention or similarity averages its own members' features.
    return {**shared, "cache": None if self.cache is None else storage.absolute(self.cache.path),
            "feature_terms": [dataclasses.asdict(term) for term in self.feature_terms]}

  def hypers(self, num_members: int) -> Hypers:
    """This student's settings for the step (see `student_train.steps.make_train_step`), the distillation alpha
    included; the PRNG key is added from the seed by `stack_hypers`."""
    teaching, config = self.teaching, self.config
    loss, settings = parse_loss(config.loss)
    return Hypers(
        alpha=np.float32(config.alpha),
        temperature=np.float32(teaching.temperature if teaching else 1.0),
        geometric=np.bool_(teaching is not None and teaching.combine == "geometric"),
        use_stored=np.bool_(teaching is not None and teaching.use_stored),
        loss=np.int32(loss),
        loss_settings=loss_settings(loss, settings),
        member_weights=member_weights(teaching.members if teaching else range(num_members), num_members),
        feature_weights=tuple(np.float32(getattr(config, WEIGHT_OPTIONS[family.name])) for family in FEATURE_LOSSES))

  def fields(self) -> tuple[str, ...]:
    """The cache arrays its steps read: its soft targets' and its teacher features'."""
    if self.teaching is None:
      return ()
    return self.teaching.fields(self.cache.spec) + tuple(
        a for term in self.feature_terms for a in TERMS[term.loss].arrays(term))


ENRICH_STREAM = 0x5BEC  # Folded into a specialist's epoch seeds, apart from the batch order's.


_LOG = logger(__name__)


def _plan_teaching(config: FitConfig, cache: Cache) -> tuple[Teaching, dict]:
  """Resolves the soft-target settings against a cache; returns them and the resolved config values."""
  spec = cache.spec
  members = tuple(range(spec.num_members)) if config.members is None else tuple(config.members)
  bad = [m for m in members if not 0 <= m < spec.num_members]
  if bad or len(set(members)) != len(members):
    raise StillroomError(f"--members {list(members)}: give distinct indices in 0..{spec.num_members - 1} "
                         f"(the cache has {spec.num_members} members).")
  labeled = spec.dataset.labeled
  alpha = config.alpha if config.alpha is not None else (DEFAULT_KD_ALPHA if labeled else 0.0)
  if alpha > 0 and not labeled:
    raise StillroomError(f"--alpha {alpha} weights hard labels, but the cache {config.cache!r} is unlabeled; "
                         "use --alpha 0.")
  if config.finetune_epochs and not labeled:
    raise StillroomError("--finetune-epochs trains on hard labels, but the cache is unlabeled.")
  temperature = spec.temperature if config.temperature is None else float(config.temperature)
  combine = config.combine or spec.combine
  term = LOGIT_TERMS[parse_loss(config.loss)[0]]
  use_stored = (term.reads_stored(spec) and temperature == spec.temperature and combine == spec.combine
                and members == tuple(range(spec.num_members)))
  teaching = Teaching(loss=config.loss, temperature=temperature, combine=combine, members=members,
                      use_stored=use_stored)
  if not use_stored:
    other_loss = "" if term.reads_stored(spec) else f"--loss {config.loss}"  # Its term learns no stored targets.
    reason = other_loss or (f"T={temperature:g}, {combine} mean of members {list(members)} (the cache stores T="
                            f"{spec.temperature:g}, {spec.combine} mean of all {spec.num_members})")
    if not spec.targets_derivable:
      asked = [f"--temperature {temperature:g}" if temperature != spec.temperature else "",
               f"--combine {combine}" if combine != spec.combine else "",
               f"--members {','.join(map(str, members))}" if members != tuple(range(spec.num_members)) else "",
               other_loss]
      asked = ", ".join(a for a in asked if a)
      readers = "/".join(t.name for t in LOGIT_TERMS if t.reads_stored(spec))  # The terms its targets serve.
      if spec.specialists:
        raise StillroomError(f"cache {config.cache!r} holds the combination of a generalist with "
                             f"{len(spec.specialists)} specialists at T={spec.temperature:g} (for the {readers} loss), "
                             f"which its member logits do not re-derive, so it cannot serve {asked}: drop those flags, "
                             "or build another cache at that T.")
      raise StillroomError(f"cache {config.cache!r} holds {spec.targets} targets (T={spec.temperature:g}, "
                           f"{spec.combine} mean of all {spec.num_members} members, for the {readers} loss) and no "
                           f"member logits, so it cannot serve {asked}: drop those flags, or rebuild it with "
                           "`teacher-cache build --member-logits` (students whose settings differ from the cache's "
                           "then learn dense targets re-derived from them).")
    cache.require(teaching.fields(spec), reason)
  return teaching, {"alpha": alpha, "temperature": temperature, "combine": combine, "members": members}


class Opened:
  """Caches and transfer sets opened once for the runs of a group or a sweep (opening checks a store's integrity
  and fingerprints a dataset: work not to repeat per run)."""

  def __init__(self):
    self._items: dict = {}

  def cache(self, path: str) -> Cache:
    key = ("cache", storage.absolute(path))
    if key not in self._items:
      self._items[key] = open_cache(path)
    return self._items[key]

  def transfer_set(self, name: str, split: str, data_dir: str | None, text: TextOptions | None = None) -> TransferSet:
    key = ("data", name, split, data_dir, text)
    if key not in self._items:
      self._items[key] = open_transfer_set(name, split, data_dir, text=text)
    return self._items[key]


def plan_run(config: FitConfig, opened: Opened | None = None) -> RunPlan:
  """Resolves a config against its data and cache, checking everything `fit` needs before it trains.

  Args:
    config: the run's settings.
    opened: caches and datasets already opened for other runs of the same group or sweep.

  Raises:
    StillroomError: bad settings, data, cache or model (named).
  """
  opened = opened or Opened()
  validate_config(config)
  config = dataclasses.replace(config, loss=canonical_loss(config.loss))  # One identity per loss, however spelt.
  cache = teaching = subset = None
  resolved: dict = {"data_seed": config.seed if config.data_seed is None else config.data_seed}
  if config.cache:
    cache = opened.cache(config.cache)
    recorded = cache.spec.dataset
    dataset = config.dataset or recorded.name
    split = config.split or (recorded.split if not config.dataset else DEFAULT_SPLIT)
    try:
      transfer_set = opened.transfer_set(dataset, split, config.data_dir, text_options(config, recorded.text, dataset))
    except StillroomError as e:
      if config.dataset:
        raise
      raise StillroomError(f"{e} (the dataset the cache {config.cache!r} records; if it has moved, give --dataset "
                           "and --split, and --data-dir for TFDS data)") from e
    if not transfer_set.matches(recorded):
      raise StillroomError(
          f"dataset {dataset!r} split {split!r} (fingerprint {transfer_set.fingerprint[:16]}…) is not the data the "
          f"cache {config.cache!r} was built from ({recorded.name} {recorded.split}, fingerprint "
          f"{recorded.fingerprint[:16]}…)." + mismatch_hint(dataset, recorded.name)
          + text_mismatch_hint(transfer_set.text, recorded.text))
    if config.folds > 1:
      raise StillroomError("--folds/--holdout-fold select teacher training data; a cache brings its own rows.")
    teaching, values = _plan_teaching(config, cache)
    resolved.update(dataset=dataset, split=split, **values)
    num_classes = cache.spec.num_classes
  else:
    if config.alpha not in (None, 1.0):
      raise StillroomError(f"--alpha {config.alpha} mixes in soft targets, which need --cache.")
    dataset, split = resolve_dataset(config.dataset), config.split or DEFAULT_SPLIT
    transfer_set = opened.transfer_set(dataset, split, config.data_dir, text_options(config))
    check_text_views(config, transfer_set)
    if not transfer_set.labeled:
      raise StillroomError(f"{dataset!r} {split!r} is unlabeled; hard-label training needs labels.")
    num_classes = transfer_set.num_classes
    resolved.update(alpha=1.0, dataset=dataset, split=split)
    if config.specialist:
      subset = _specialist_classes(config.specialist, transfer_set)
      transfer_set = transfer_set.relabeled(dustbin_labels(np.arange(num_classes), subset, num_classes),
                                            len(subset) + 1)
      num_classes = len(subset) + 1
  if num_classes > config.max_classes:
    raise StillroomError(f"{transfer_set.name!r} {transfer_set.split!r} has {num_classes:,} classes (its largest label "
                         f"is {num_classes - 1:,}), more than --max-classes {config.max_classes:,}; a head that "
                         "size is almost surely a bad label. Raise --max-classes if it is not.")
  if config.augment and len(transfer_set.input_shape) < 2:
    raise StillroomError(f"--augment needs image inputs; {transfer_set.name!r} holds flat vectors.")
  if cache is not None:
    augmentation = cache.spec.augmentation
    if config.renderer is not None and config.renderer != augmentation.renderer:
      raise StillroomError(f"--renderer {config.renderer}: cache {config.cache!r} was rendered by the "
                           f"{augmentation.renderer} renderer, which its students use to see the pixels its teachers "
                           f"saw; drop --renderer (or rebuild the cache with --renderer {config.renderer}).")
    if config.mix is not None and canonical_mix(config.mix) != augmentation.mix:
      raise StillroomError(f"--mix {config.mix}: cache {config.cache!r} holds views mixed {augmentation.mix!r}, which "
                           "its students render as its teachers saw them; drop --mix (or rebuild the cache with "
                           f"--mix {config.mix}).")
    if augmentation.mix != NO_MIX and config.label_fraction < 1.0:
      raise StillroomError(f"--label-fraction {config.label_fraction}: cache {config.cache!r} mixes every example's "
                           "views with partners from the whole transfer set, whose pixels and labels a fraction would "
                           "let in; train on all its rows, or build a cache of the fraction's split.")
  else:
    if config.mix not in (None, NO_MIX):
      raise StillroomError(f"--mix {config.mix} mixes a cache's views (`teacher-cache build --mix`); hard-label "
                           "training without --cache does not mix.")
    check_prepared_views(transfer_set, config.image_size)
    augmentation = make_augmentation(
        transfer_set.input_shape, transfer_set.input_dtype, transfer_set.name, seed=resolved["data_seed"],
        max_shift=config.max_shift if config.augment else 0, flip=config.flip, image_size=config.image_size,
        crop_area=config.crop_area, crop_aspect=config.crop_aspect, renderer=config.renderer,
        canvas_shape=transfer_set.canvas_shape)
  config = dataclasses.replace(config, **resolved, finetune_lr=config.finetune_lr or config.lr / 10)
  input_shape = augmentation.output_shape(transfer_set.input_shape)
  model_spec = ModelSpec(name=config.model, input_shape=input_shape, num_classes=num_classes, dropout=config.dropout,
                         dtype=config.compute_dtype)
  abstract = nnx.eval_shape(lambda: build_model(model_spec))
  if config.model not in MODELS:  # Your own: recorded with its structure, which a resume or a teacher load checks.
    model_spec = dataclasses.replace(model_spec, structure=structure_digest(abstract))
  graphdef, params = nnx.split(abstract)
  logits = check_input_shape(lambda p, x: nnx.merge(graphdef, p)(x), params, input_shape, f"model {config.model!r}")
  if logits.shape[-1] != num_classes:
    raise StillroomError(f"model {config.model!r} returns {logits.shape[-1]} logits per example; the data has "
                         f"{num_classes} classes.")
  terms = ()
  if any(getattr(config, name) for name in FEATURE_OPTIONS):
    terms = plan_feature_terms({name: getattr(config, name) for name in FEATURE_OPTIONS if getattr(config, name)},
                               cache.spec, teaching.members, feature_shapes(model_spec), config.model)
  examples = None
  if config.folds > 1:
    examples = transfer_set.indices[fold_of(transfer_set.indices, config.folds) != config.holdout_fold]
  if config.label_fraction < 1.0:
    pool = transfer_set.indices if examples is None else examples
    keep = max(1, round(config.label_fraction * len(pool)))
    examples = np.sort(np.random.default_rng(config.data_seed).choice(pool, keep, replace=False))
  sampler = None
  if subset is not None:
    pool = transfer_set.indices if examples is None else examples
    inside = transfer_set.labels[transfer_set.positions(pool)] < len(subset)
    if inside.all() or not inside.any():
      raise StillroomError(f"--specialist {config.specialist}: {'all' if inside.all() else 'none'} of the training "
                           "examples are of its classes, so there is nothing to enrich.")
    count = round(config.enrich * len(pool))
    if not 1 <= count <= len(pool) - 1:
      raise StillroomError(f"--enrich {config.enrich} of {len(pool)} examples draws {count} of the specialist's "
                           "classes: give a share that leaves at least one example of each side.")
    natural = float(inside.mean())
    if config.enrich < natural:
      _LOG.warning(f"--enrich {config.enrich} is below the {natural:.3f} natural share of the specialist's classes: "
                   "they are sampled less often than in the data, not more.")
    sampler = enriched_sampler(pool, inside, count, config.data_seed)
    # The correction for the share drawn (count of N), which `--enrich` gives up to rounding.
    correction = dustbin_correction(natural, count / len(pool))
  initial = init_digest = None
  if config.init_from:
    initial, init_digest = _initial_params(config, model_spec, nnx.to_pure_dict(nnx.state(abstract, WEIGHTS)),
                                           subset)
  specialist = None if subset is None else SpecialistRecord(tuple(subset), correction, init_digest)
  rows = (len(transfer_set) if examples is None else len(examples)) * (cache.spec.views if cache else 1)
  batch_size = cap_batch(config.batch_size, rows, jax.device_count())  # Training uses every device of the job.
  if batch_size < config.batch_size:
    _LOG.info(f"--batch-size {config.batch_size} is more than the {rows:,} rows of an epoch: batches of {batch_size}")
    config = dataclasses.replace(config, batch_size=batch_size)
  if rows % config.batch_size:
    _check_row_mask(abstract.features if terms else abstract, abstract, config.model, -rows % config.batch_size)
  eval_set = _eval_set(config, transfer_set, cache, opened)
  if eval_set is not None and transfer_set.label_map is not None:  # A specialist's classes and dustbin there too.
    eval_set = eval_set.relabeled(transfer_set.label_map, num_classes)
  if eval_set is not None:
    check_eval_set(eval_set, transfer_set, augmentation, num_classes)
  return RunPlan(config=config, transfer_set=transfer_set, cache=cache, teaching=teaching, model_spec=model_spec,
                 normalization=transfer_set.normalization, examples=examples, eval_set=eval_set,
                 augmentation=augmentation, initial_params=initial, sampler=sampler, feature_terms=terms,
                 specialist=specialist, init_digest=init_digest)


def _check_row_mask(forward, model: nnx.Module, name: str, padding: int) -> None:
  """Warns when a model with BatchNorm (your own) takes no row mask (`shared.models.takes_row_mask`): the zero rows
  that pad each epoch's last batch then count in that batch's statistics and running averages."""
  if jax.tree.leaves(nnx.state(model, nnx.BatchStat)) and not takes_row_mask(forward):
    _LOG.warning(f"model {name!r} has BatchNorm, but its {getattr(forward, '__name__', '__call__')} takes no `mask`: "
                 f"the {padding} zero rows that pad each epoch's last batch count in its batch statistics. Give it "
                 "`mask=None` (float [B], 0 for a padding row) and pass each BatchNorm the rows to count as its "
                 "`mask`, broadcastable to its input (`(mask > 0)[:, None, None, None]` for images), or choose a "
                 "--batch-size that divides the epoch's rows.")


def _specialist_classes(specialist: str, transfer_set: TransferSet) -> tuple[int, ...]:
  """The classes of `--specialist PLAN.json:k`.

  Raises:
    StillroomError: an unreadable plan, no specialist k, or a plan for another class count.
  """
  path, k = parse_specialist(specialist)
  plan = SpecialistPlan.read(path)
  if k >= len(plan.subsets):
    raise StillroomError(f"--specialist {specialist}: the plan has specialists 0..{len(plan.subsets) - 1}.")
  if plan.num_classes != transfer_set.num_classes:
    raise StillroomError(f"--specialist {specialist}: the plan is for {plan.num_classes} classes; "
                         f"{transfer_set.name!r} has {transfer_set.num_classes}.")
  return plan.subsets[k]


def _initial_params(config: FitConfig, model_spec: ModelSpec, target: dict, subset) -> tuple[dict, str]:
  """The parameters `--init-from` starts the run from (see `shared.specialists.initial_params`), and the digest of
  that run's parameters.

  Raises:
    StillroomError: the run cannot be loaded, or is of another model or input shape.
  """
  run = load_run_teacher(config.init_from)
  what = f"--init-from {config.init_from!r}"
  if run.record.specialist is not None:
    raise StillroomError(f"{what} is a specialist run; start from the generalist (or another ordinary run).")
  recorded = run.record.model
  if subset is not None and recorded.num_classes <= max(subset):
    raise StillroomError(f"{what} outputs {recorded.num_classes} classes; the specialist's classes {list(subset)} "
                         "are the plan's generalist's.")
  if (recorded.name, tuple(recorded.input_shape)) != (model_spec.name, tuple(model_spec.input_shape)):
    raise StillroomError(f"{what} is a {recorded.name} run on inputs {tuple(recorded.input_shape)}; this run trains "
                         f"a {model_spec.name} on {tuple(model_spec.input_shape)}.")
  return initial_params(target, nnx.to_pure_dict(run.params), subset, what), run.digest


def enriched_sampler(pool: np.ndarray, inside: np.ndarray, count: int, seed: int) -> Callable[[int], np.ndarray]:
  """A specialist's epochs: as many examples as `pool`, `count` of them drawn uniformly with replacement from the
  examples of its classes (`inside`), the rest from the others, seeded by (seed, epoch).

  Args:
    pool: int64 [N] the example indices it trains on.
    inside: bool [N] which of them are of the specialist's classes.
    count: how many of each epoch's N examples are of its classes (`--enrich` · N, rounded).
    seed: the run's data seed.
  """
  ours, others = pool[inside], pool[~inside]

  def sample(epoch: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch, ENRICH_STREAM])
    return np.concatenate([rng.choice(ours, count), rng.choice(others, len(pool) - count)])

  return sample


def _eval_set(config: FitConfig, transfer_set: TransferSet, cache: Cache | None, opened: Opened) -> TransferSet | None:
  """The per-epoch evaluation data: as asked; else the eval split the cache stores teacher logits on; else the
  dataset's `test` split when it has one."""
  if config.eval_split == NO_EVAL:
    return None
  recorded = None if cache is None else cache.spec.eval_dataset
  if recorded is not None and not config.eval_dataset and not config.eval_split:
    same = recorded.name == cache.spec.dataset.name  # A --dataset given for a moved dataset stands for both.
    return opened.transfer_set(transfer_set.name if same else recorded.name, recorded.split, config.data_dir,
                               transfer_set.text_options())
  if config.eval_dataset and is_text(resolve_dataset(config.eval_dataset)) != is_text(transfer_set.name):
    text = is_text(transfer_set.name)
    raise StillroomError(f"--eval-dataset {config.eval_dataset!r}: the transfer set {transfer_set.name!r} is "
                         f"{'text (rows of tokens)' if text else 'not text'}; evaluate on held-out data of its kind"
                         f"{' (--eval-dataset text:PATH --eval-split train)' if text else ''}, or give --eval-split "
                         "none.")
  if config.eval_dataset or config.eval_split:
    return opened.transfer_set(config.eval_dataset or transfer_set.name,
                               config.eval_split or default_eval_split(config.eval_dataset), config.data_dir,
                               transfer_set.text_options())
  try:
    return opened.transfer_set(transfer_set.name, "test", config.data_dir, transfer_set.text_options())
  except StillroomError:
    return None  # No test split: no per-epoch evaluation unless asked for.
