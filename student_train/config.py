"""Settings of a training run (`FitConfig`) and their validation: each setting is declared here once, with its
default, help, check and roles (`shared.settings.setting`); the shared data, view, job and output settings come
from `shared.options`.

The `fit` and `sweep` command lines, the sweep's grid axes, the demo's stage options, a run's identity and what
students of one vmapped group may differ in are all derived from these declarations.
"""

import dataclasses
import math
from typing import ClassVar

from shared.ensemble import COMBINE_RULES
from shared.errors import StillroomError
from shared.models import MODELS, is_reference
from shared.options import (DEMO_STUDENT, DEMO_TEACHER, FIT, SWEEP, ComputeSettings, DataSettings, JobSettings,
                            OutputSettings, ViewSettings)
from shared.parallel import REPLICATED, SHARDINGS
from shared.settings import (at_least, check_values, declared, flag_of, names_where, non_negative_finite,
                             positive_finite, seed_check, setting)
from student_train.terms import LOSS_HELP, check_loss

DEFAULT_KD_ALPHA = 0.1  # Hinton et al. 2015 and the Keras example weight the hard term lightly.
DEFAULT_MAX_CLASSES = 1 << 18  # 262,144: the largest LLM vocabularies.
# Chunks are uniform samples already (the build permutes examples): 4 spreads an example's adjacent views over
# batches (`bench/shuffle_quality.py`).
DEFAULT_SHUFFLE_WINDOW = 4


OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "nesterov", "rmsprop", "lamb", "lion")
SCHEDULES = ("constant", "cosine", "warmup-cosine")
_PAIR = "STUDENT_FEATURE=TEACHER_FEATURE[:KIND][@MEMBER],..."


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitConfig(DataSettings, ViewSettings, ComputeSettings, JobSettings, OutputSettings):
  """Settings of `student-train fit` (and of each run of a sweep). None means "resolved from the data" (see each
  field's help). The data, views, compute, job and output settings are the shared ones of `shared.options`."""

  COMMANDS: ClassVar[tuple[str, ...]] = (FIT, SWEEP)  # Who offers a field that names no commands.

  model: str = setting("mlp-small", "registry name (see `student-train models`), or module:function for your own: a "
                                    "factory (input_shape, num_classes, rngs) -> nnx.Module", group="run",
                       check=lambda v: v in MODELS or is_reference(v) or f"must be one of {', '.join(MODELS)}, or "
                                                                         "'module:function'",
                       commands=(FIT, SWEEP, DEMO_TEACHER, DEMO_STUDENT), axis=True)
  cache: str | None = setting(None, "teacher cache made by `teacher-cache build` (distillation)", metavar="CACHE.zarr",
                              group="data", commands=(FIT,), identity=False)
  label_fraction: float = setting(1.0, "train on a seeded fraction of the examples (all their cached views)",
                                  group="data", check=lambda v: 0.0 < v <= 1.0 or "must be in (0, 1]", axis=True)
  folds: int = setting(1, "with --holdout-fold k: train without fold k of K (a cross-fitting teacher run for "
                          "`teacher-cache build --folds K`)", group="data", check=at_least(1), commands=(FIT,))
  holdout_fold: int | None = setting(None, "the fold this run does not train on", group="data", commands=(FIT,))
  augment: bool = setting(False, "hard-label training: a fresh view of every example each epoch, a zero-filled "
                                 "shift, or a random-resized crop with --image-size (a cache brings its own views)",
                          group="views", commands=(FIT,))
  shuffle_window: int = setting(DEFAULT_SHUFFLE_WINDOW, "cache chunks whose rows are shuffled together in memory "
                                                        "(more: batches closer to uniform sampling, more memory)",
                                metavar="CHUNKS", group="data", check=at_least(1, "chunk"),
                                commands=(FIT, SWEEP, DEMO_STUDENT))
  loss: str = setting("kl", LOSS_HELP, metavar="NAME[:ARG]", check=check_loss, group="distillation", scope="student",
                      axis=True, soft=True)
  alpha: float | None = setting(None, f"weight of the hard-label cross-entropy in [0, 1] (default: {DEFAULT_KD_ALPHA} "
                                      "with a labelled cache, 0 without labels, 1 without a cache)",
                                group="distillation",
                                check=lambda v: v is None or 0.0 <= v <= 1.0 or "must be in [0, 1]",
                                commands=(FIT, SWEEP, DEMO_STUDENT), scope="student", axis=True, soft=True)
  temperature: float | None = setting(None, "T of the soft term (default: the cache's); another T re-derives "
                                            "targets from member_logits", group="distillation",
                                      check=lambda v: v is None or positive_finite(v), scope="student", axis=True,
                                      soft=True)
  combine: str | None = setting(None, "ensemble rule (default: the cache's)", choices=COMBINE_RULES,
                                group="distillation", scope="student", axis=True, soft=True)
  members: tuple[int, ...] | None = setting(
      None, "ensemble subset, e.g. 0,2 (default: all members)", group="distillation", scope="student", axis=True,
      soft=True, check=lambda v: v is None or (len(v) > 0 and all(isinstance(m, int) and not isinstance(m, bool)
                                                                  for m in v)) or "must be a non-empty list of member "
                                                                                  "indices")
  finetune_epochs: int = setting(0, "epochs on hard labels after distillation", group="distillation",
                                 check=at_least(0), commands=(FIT, SWEEP, DEMO_STUDENT))
  hint: tuple[str, ...] | None = setting(
      None, "FitNets hints (Romero et al. 2015): a learned regressor (a 1×1 convolution of the channels) takes the "
            "student's feature to the cached teacher feature's (`teacher-cache build --features`; pooled to the "
            "student's H×W), with a mean squared error; a cache of several members needs @MEMBER", metavar=_PAIR,
      group="features", added=True)
  hint_weight: float = setting(1.0, "weight of the hint loss beside the logit loss (after --hint-epochs); 0: the "
                                    "hint only in stage 1, as in FitNets", group="features", check=non_negative_finite,
                               scope="student", axis=True, weighs="hint", added=True)
  hint_epochs: int = setting(0, "FitNets' stage 1: the first E of --epochs train on the hint loss alone (unweighted), "
                                "with an optimizer of their own", metavar="E", group="features", check=at_least(0),
                             axis=True, added=True)
  attention: tuple[str, ...] | None = setting(
      None, "attention transfer (Zagoruyko & Komodakis 2017): the student feature's normalised H×W attention map "
            "against the teacher's (the members' mean)", metavar=_PAIR, group="features", added=True)
  attention_weight: float = setting(500.0, "weight of the attention loss, a mean over the H·W positions as in the "
                                           "authors' code, whose β/2 (β = 1000) this default is", group="features",
                                    check=non_negative_finite, scope="student", axis=True, weighs="attention",
                                    added=True)
  similarity: tuple[str, ...] | None = setting(
      None, "similarity-preserving KD (Tung & Mori 2019): the batch's normalised Gram matrix of the student's "
            "feature against the teacher's (the members' mean)", metavar=_PAIR, group="features", added=True)
  similarity_weight: float = setting(3000.0, "weight of the similarity loss (the paper's gamma)", group="features",
                                     check=non_negative_finite, scope="student", axis=True, weighs="similarity",
                                     added=True)
  epochs: int = setting(20, "epochs", group="optimisation", check=at_least(0), axis=True,
                        commands=(FIT, SWEEP, DEMO_TEACHER, DEMO_STUDENT))
  batch_size: int = setting(128, "rows per step, a multiple of the device count", group="optimisation",
                            check=at_least(1), commands=(FIT, SWEEP, DEMO_TEACHER, DEMO_STUDENT))
  optimizer: str = setting("adamw", "the optax optimizer", choices=OPTIMIZERS, group="optimisation", axis=True,
                           added=True)
  schedule: str = setting("cosine", "learning-rate schedule over the distillation epochs (fine-tuning: its own "
                                    "cosine decay from --finetune-lr)", choices=SCHEDULES, group="optimisation",
                          axis=True, added=True)
  warmup_epochs: float = setting(1.0, "warmup-cosine: epochs of linear warmup from 0 to --lr", group="optimisation",
                                 check=lambda v: (v >= 0 and math.isfinite(v)) or "must be >= 0 and finite",
                                 axis=True, added=True)
  lr: float = setting(3e-3, "peak learning rate", group="optimisation", check=positive_finite, axis=True,
                      commands=(FIT, SWEEP, DEMO_TEACHER, DEMO_STUDENT))
  finetune_lr: float | None = setting(None, "fine-tuning learning rate (default: --lr / 10)", group="optimisation",
                                      check=lambda v: v is None or positive_finite(v))
  weight_decay: float = setting(1e-4, "decoupled weight decay (adamw, lamb, lion; sgd, momentum and nesterov "
                                      "add it to the gradient; adam and rmsprop take none)", group="optimisation",
                                check=non_negative_finite, axis=True)
  momentum: float = setting(0.9, "momentum of momentum, nesterov and rmsprop", group="optimisation",
                            check=lambda v: 0.0 <= v < 1.0 or "must be in [0, 1)", axis=True, added=True)
  dropout: float = setting(0.0, "dropout rate on the output of every hidden dense layer of an MLP or CNN (in CNNs, "
                                "the dense layer after the convolutions), and on the pooled features before the head "
                                "of a ResNet, MobileNet or ViT; convolutions are not dropped", group="optimisation",
                           check=lambda v: 0.0 <= v < 1.0 or "must be in [0, 1)", commands=(FIT, SWEEP, DEMO_TEACHER))
  seed: int = setting(0, "initialisation and dropout seed", group="optimisation", check=seed_check, commands=(FIT,),
                      scope="student")
  data_seed: int | None = setting(None, "example order and subset seed (default: --seed)", group="optimisation",
                                  check=lambda v: v is None or seed_check(v))
  specialist: str | None = setting(
      None, "train specialist k of a plan written by `teacher-cache specialists`, on hard labels: its classes plus "
            "one dustbin class for all the others, each epoch --enrich of the examples drawn from its classes; "
            "needs --init-from", metavar="PLAN.json:k", group="specialists", commands=(FIT,), identity=False,
      added=True)  # A specialist is identified by its classes and correction (resolved), not by where its plan is.
  init_from: str | None = setting(
      None, "start from this run's parameters (the same model); with --specialist, the generalist's: the head's "
            "outputs for the specialist's classes are copied, and the dustbin's is the mean of the others' (bias "
            "plus the log of their count)", metavar="RUN_DIR", group="specialists", commands=(FIT,), identity=False,
      added=True)  # Identified by the digest of its parameters (resolved).
  enrich: float = setting(0.5, "--specialist: the share of each epoch's examples drawn (with replacement) from its "
                               "classes, the rest from the others'", group="specialists",
                          check=lambda v: 0.0 < v < 1.0 or "must be in (0, 1)", commands=(FIT,), added=True)
  max_classes: int = setting(DEFAULT_MAX_CLASSES, "refuse datasets with more classes than this (a label id of "
                                                  "10^9 would make a 10^9-class head); raise it for larger "
                                                  "vocabularies", group="data", check=at_least(2))
  checkpoint_every: int = setting(1, "epochs between checkpoints, the last epoch always included; raise it for "
                                     "runs of many short epochs, where saving dominates", metavar="EPOCHS",
                                  group="run", check=at_least(1, "epoch"), commands=(FIT, SWEEP, DEMO_STUDENT),
                                  identity=False)
  checkpoint_every_steps: int | None = setting(
      None, "also checkpoint every N steps within an epoch (its position, state and partial metrics): a run killed "
            "mid-epoch resumes from there, computing what an uninterrupted run does", metavar="STEPS", group="run",
      check=at_least(1, "step"), identity=False)
  steps_per_call: int = setting(
      1, "optimizer steps per jitted call: a scan of the step over N batches stacked on the host, so that the host's "
         "work per call (placing batches, dispatch, metrics) is spread over N steps; the same run within float "
         "rounding (per-step metrics, dropout and divergence steps unchanged), with mid-epoch checkpoints and resumes "
         "at call boundaries (--checkpoint-every-steps a multiple of N); a resumed run may change it", metavar="N",
      group="run", check=at_least(1, "step"), identity=False)
  param_sharding: str = setting(
      REPLICATED, "how the students' parameters and optimizer state lie on the job's devices: 'replicated' (whole on "
                  "every device) or 'fsdp' (each array split along its longest axis that divides evenly over the "
                  "devices, gathered inside each step: a student need not fit on one device); the batch is split "
                  "over the same devices either way, the run is the same within float rounding, and a resumed run "
                  "may change it", choices=SHARDINGS, group="run", identity=False)


# The feature-distillation options (`--hint`, ...), each with the setting that weights it (`--hint-weight`, ...); not
# to be confused with `shared.models.WEIGHTS`, a model's weights.
WEIGHT_OPTIONS = {field.metadata["weighs"]: name for name, field in declared(FitConfig).items()
                  if field.metadata["weighs"]}
FEATURE_OPTIONS = tuple(WEIGHT_OPTIONS)


def default_of(name: str):
  return declared(FitConfig)[name].default


def _default_crops(config) -> bool:
  return (tuple(config.crop_area), tuple(config.crop_aspect)) == (default_of("crop_area"), default_of("crop_aspect"))


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def validate_config(config: FitConfig, prefix: str = "") -> None:
  """Checks every setting on its own and the combinations that need no data.

  Args:
    config: the settings.
    prefix: of the option names in errors (the demo's `student_` makes `--student-alpha`).

  Raises:
    StillroomError: naming the option, the value and what it must be.
  """
  check_values(config, prefix)
  if (config.folds > 1) != (config.holdout_fold is not None) or (
      config.holdout_fold is not None and not 0 <= config.holdout_fold < config.folds):
    raise StillroomError(f"--folds {config.folds} --holdout-fold {config.holdout_fold}: give both, with the "
                         "held-out fold in 0..K-1 (or neither).")
  if not config.cache:
    soft_only = [flag_of(name) + ("" if default_of(name) is None else f" {getattr(config, name)}")
                 for name in names_where(FitConfig, soft=True)
                 if getattr(config, name) != default_of(name) and not (name == "alpha" and config.alpha == 1.0)]
    if soft_only:
      raise StillroomError(f"{', '.join(soft_only)} set{'s' if len(soft_only) == 1 else ''} distillation, which "
                           "needs --cache.")
  elif config.augment or config.flip or config.image_size is not None or not _default_crops(config):
    raise StillroomError("--augment/--flip/--image-size/--crop-* draw views for hard-label training; a cache brings "
                         "its own views.")
  if config.specialist and (config.cache or not config.init_from):
    raise StillroomError("--specialist trains on hard labels (not --cache), from the generalist: give --init-from "
                         "GENERALIST_RUN.")
  if config.enrich != default_of("enrich") and not config.specialist:
    raise StillroomError("--enrich is the share of a specialist's classes in its epochs; give --specialist too.")
  features = [flag_of(name) for name in FEATURE_OPTIONS if getattr(config, name)]
  if features and not config.cache:
    raise StillroomError(f"{', '.join(features)} distil(s) cached teacher features, which need --cache.")
  for name, weight in WEIGHT_OPTIONS.items():
    if getattr(config, weight) != default_of(weight) and not getattr(config, name):
      raise StillroomError(f"{flag_of(weight)} weights {flag_of(name)}; give {flag_of(name)} too.")
  if config.hint_epochs and (not config.hint or config.hint_epochs >= config.epochs):
    raise StillroomError(f"--hint-epochs {config.hint_epochs} trains on --hint alone for the first epochs of "
                         f"--epochs {config.epochs}: give --hint, and fewer hint epochs than epochs.")
  if config.flip and not config.augment:
    raise StillroomError("--flip adds flips to --augment's views; give --augment too.")
  if config.image_size is not None and config.max_shift != default_of("max_shift"):
    raise StillroomError("--max-shift shapes shifted views; crop views (--image-size) take no shift.")
  if config.image_size is not None and not config.augment and not _default_crops(config):
    raise StillroomError("--crop-area/--crop-aspect shape --augment's random crops; give --augment too.")
  if config.epochs + config.finetune_epochs < 1:
    raise StillroomError("--epochs and --finetune-epochs must be >= 0 with at least one epoch in all.")
  every, per_call = config.checkpoint_every_steps, config.steps_per_call
  if every and every % per_call:
    raise StillroomError(f"--checkpoint-every-steps {every} must be a multiple of --steps-per-call {per_call}: "
                         f"checkpoints land between calls (give, e.g., --checkpoint-every-steps "
                         f"{_round_up(every, per_call)}).")
  if not config.out:
    raise StillroomError("give --out RUN_DIR.")
