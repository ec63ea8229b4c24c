"""Settings of a training run (`FitConfig`) and their validation: each default, help text and check is here once.

The `fit` and `sweep` command lines, the sweep's grid axes and the demo all take their options, choices and checks
from this module.
"""

import dataclasses
import math

from shared.augment import DEFAULT_CROP_AREA, DEFAULT_CROP_ASPECT
from shared.data import NO_EVAL
from shared.distributed import (COORDINATOR_HELP, DEFAULT_HEARTBEAT_SECONDS, HEARTBEAT_HELP, NUM_PROCESSES_HELP,
                                PROCESS_ID_HELP)
from shared.ensemble import COMBINE_RULES
from shared.errors import StillroomError
from shared.models import MODELS, is_reference
from shared.settings import WORKERS_HELP, flag_of, positive_finite, seed_check, setting, workers_check
from student_train.terms import LOSS_HELP, check_loss

DEFAULT_KD_ALPHA = 0.1  # Hinton et al. 2015 and the Keras example weight the hard term lightly.
DEFAULT_MAX_CLASSES = 1 << 18  # 262,144: the largest LLM vocabularies.
DEFAULT_SHUFFLE_WINDOW = 4  # Chunks are uniform samples already (the build permutes examples): 4 mixes views.


OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "nesterov", "rmsprop", "lamb", "lion")
SCHEDULES = ("constant", "cosine", "warmup-cosine")
# Settings added after run dirs recorded their config: a record without one ran with its default.
ADDED_SETTINGS = ("optimizer", "schedule", "warmup_epochs", "momentum", "specialist", "init_from", "enrich",
                  "specialist_classes", "dustbin_correction", "init_digest", "hint", "hint_weight", "hint_epochs",
                  "attention", "attention_weight", "similarity", "similarity_weight")
_PAIR = "STUDENT_FEATURE=TEACHER_FEATURE[:KIND][@MEMBER],..."


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitConfig:
  """Settings of `student-train fit`. None means "resolved from the data" (see each field's help)."""

  model: str = setting("mlp-small", "registry name (see `student-train models`), or module:function for your own: a "
                                    "factory (input_shape, num_classes, rngs) -> nnx.Module")
  out: str = setting("", "run directory to write", metavar="RUN_DIR")
  dataset: str | None = setting(None, "'digits', 'npz:PATH', 'imagefolder:DIR' or a prepared TFDS name; with "
                                      "--cache, default: the dataset the cache records")
  split: str | None = setting(None, "TFDS split spec, e.g. 'train[:80%]' (default: 'train'; with --cache, the "
                                    "split the cache records)")
  data_dir: str | None = setting(None, "TFDS data dir (default: TFDS's, ~/tensorflow_datasets)")
  cache: str | None = setting(None, "teacher cache made by `teacher-cache build` (distillation)",
                              metavar="CACHE.zarr")
  label_fraction: float = setting(1.0, "train on a seeded fraction of the examples (all their cached views)")
  folds: int = setting(1, "with --holdout-fold k: train without fold k of K (a cross-fitting teacher run for "
                          "`teacher-cache build --folds K`)")
  holdout_fold: int | None = setting(None, "the fold this run does not train on")
  augment: bool = setting(False, "hard-label training: a fresh view of every example each epoch, a zero-filled "
                                 "shift, or a random-resized crop with --image-size (a cache brings its own views)")
  max_shift: int = setting(1, "--augment shift in pixels")
  flip: bool = setting(False, "--augment with horizontal flips")
  image_size: int | None = setting(None, "hard-label training: render every example at SxS, the centre crop (and "
                                         "random-resized crops with --augment); needed for images of varying size "
                                         "(a cache brings its own)", metavar="S")
  crop_area: tuple[float, ...] = setting(DEFAULT_CROP_AREA, "--augment crops: min,max area, as fractions of the "
                                                              "image", metavar="MIN,MAX")
  crop_aspect: tuple[float, ...] = setting(DEFAULT_CROP_ASPECT, "--augment crops: min,max width/height",
                                           metavar="MIN,MAX")
  eval_dataset: str | None = setting(None, "evaluate each epoch on this dataset (default: the training dataset)")
  eval_split: str | None = setting(None, f"evaluation split (default: 'test' when the dataset has one; with "
                                         "--eval-dataset, 'train' of an npz: or imagefolder: dataset; "
                                         f"'{NO_EVAL}': no per-epoch evaluation)")
  loss: str = setting("kl", LOSS_HELP, metavar="NAME[:ARG]")
  alpha: float | None = setting(None, f"weight of the hard-label cross-entropy in [0, 1] (default: {DEFAULT_KD_ALPHA} "
                                      "with a labelled cache, 0 without labels, 1 without a cache)")
  temperature: float | None = setting(None, "T of the soft term (default: the cache's); another T re-derives "
                                            "targets from member_logits")
  combine: str | None = setting(None, "ensemble rule (default: the cache's)", choices=COMBINE_RULES)
  members: tuple[int, ...] | None = setting(None, "ensemble subset, e.g. 0,2 (default: all members)")
  specialist: str | None = setting(
      None, "train specialist k of a plan written by `teacher-cache specialists`, on hard labels: its classes plus "
            "one dustbin class for all the others, each epoch --enrich of the examples drawn from its classes; "
            "needs --init-from", metavar="PLAN.json:k")
  init_from: str | None = setting(
      None, "start from this run's parameters (the same model); with --specialist, the generalist's: the head's "
            "outputs for the specialist's classes are copied, and the dustbin's is the mean of the others' (bias "
            "plus the log of their count)", metavar="RUN_DIR")
  enrich: float = setting(0.5, "--specialist: the share of each epoch's examples drawn (with replacement) from its "
                               "classes, the rest from the others'")
  specialist_classes: tuple[int, ...] | None = setting(None, "resolved: a specialist's classes, in its outputs' "
                                                              "order (the dustbin last)", cli=False)
  dustbin_correction: float | None = setting(None, "resolved: the log-odds added to a specialist's dustbin logit to "
                                                   "undo --enrich", cli=False)
  init_digest: str | None = setting(None, "resolved: the parameter digest of the --init-from run", cli=False)
  hint: tuple[str, ...] | None = setting(
      None, "FitNets hints (Romero et al. 2015): a learned regressor (a 1×1 convolution of the channels) takes the "
            "student's feature to the cached teacher feature's (`teacher-cache build --features`; pooled to the "
            "student's H×W), with a mean squared error; a cache of several members needs @MEMBER", metavar=_PAIR)
  hint_weight: float = setting(1.0, "weight of the hint loss beside the logit loss (after --hint-epochs); 0: the "
                                    "hint only in stage 1, as in FitNets")
  hint_epochs: int = setting(0, "FitNets' stage 1: the first E of --epochs train on the hint loss alone (unweighted), "
                                "with an optimizer of their own", metavar="E")
  attention: tuple[str, ...] | None = setting(
      None, "attention transfer (Zagoruyko & Komodakis 2017): the student feature's normalised H×W attention map "
            "against the teacher's (the members' mean)", metavar=_PAIR)
  attention_weight: float = setting(500.0, "weight of the attention loss, a mean over the H·W positions as in the "
                                           "authors' code, whose β/2 (β = 1000) this default is")
  similarity: tuple[str, ...] | None = setting(
      None, "similarity-preserving KD (Tung & Mori 2019): the batch's normalised Gram matrix of the student's "
            "feature against the teacher's (the members' mean)", metavar=_PAIR)
  similarity_weight: float = setting(3000.0, "weight of the similarity loss (the paper's gamma)")
  epochs: int = setting(20, "epochs")
  finetune_epochs: int = setting(0, "epochs on hard labels after distillation")
  batch_size: int = setting(128, "rows per step, a multiple of the device count")
  optimizer: str = setting("adamw", "the optax optimizer", choices=OPTIMIZERS)
  schedule: str = setting("cosine", "learning-rate schedule over the distillation epochs (fine-tuning: its own "
                                    "cosine decay from --finetune-lr)", choices=SCHEDULES)
  warmup_epochs: float = setting(1.0, "warmup-cosine: epochs of linear warmup from 0 to --lr")
  lr: float = setting(3e-3, "peak learning rate")
  finetune_lr: float | None = setting(None, "fine-tuning learning rate (default: --lr / 10)")
  weight_decay: float = setting(1e-4, "decoupled weight decay (adamw, lamb, lion; sgd, momentum and nesterov "
                                      "add it to the gradient; adam and rmsprop take none)")
  momentum: float = setting(0.9, "momentum of momentum, nesterov and rmsprop")
  dropout: float = setting(0.0, "dropout rate on the output of every hidden dense layer (in CNNs, the dense layer "
                                "after the convolutions; convolutions are not dropped)")
  seed: int = setting(0, "initialisation and dropout seed")
  data_seed: int | None = setting(None, "example order and subset seed (default: --seed)")
  shuffle_window: int = setting(DEFAULT_SHUFFLE_WINDOW, "cache chunks whose rows are shuffled together in memory "
                                                        "(more: batches closer to uniform sampling, more memory)",
                                metavar="CHUNKS")
  max_classes: int = setting(DEFAULT_MAX_CLASSES, "refuse datasets with more classes than this (a label id of "
                                                  "10^9 would make a 10^9-class head); raise it for larger "
                                                  "vocabularies")
  checkpoint_every: int = setting(1, "epochs between checkpoints, the last epoch always included; raise it for "
                                     "runs of many short epochs, where saving dominates", metavar="EPOCHS")
  checkpoint_every_steps: int | None = setting(
      None, "also checkpoint every N steps within an epoch (its position, state and partial metrics): a run killed "
            "mid-epoch resumes from there, computing what an uninterrupted run does", metavar="STEPS")
  workers: int | None = setting(None, WORKERS_HELP, metavar="N")
  coordinator: str | None = setting(None, COORDINATOR_HELP, metavar="HOST:PORT")
  num_processes: int | None = setting(None, NUM_PROCESSES_HELP, metavar="N")
  process_id: int | None = setting(None, PROCESS_ID_HELP, metavar="I")
  heartbeat_timeout: int = setting(DEFAULT_HEARTBEAT_SECONDS, HEARTBEAT_HELP, metavar="SECONDS")
  overwrite: bool = setting(False, "replace a run dir holding another config")
  progress: bool = setting(True, "progress bars")


# Settings that do not change what a run computes; a resumed run may differ in them. (Where the run dir and the
# cache are does not either: the cache is identified by its build key.)
NOT_IDENTITY = ("overwrite", "progress", "data_dir", "checkpoint_every", "checkpoint_every_steps", "workers", "out",
                "cache", "coordinator", "num_processes", "process_id", "heartbeat_timeout",
                # A specialist is identified by its classes and correction (resolved), not by where its plan is.
                "specialist", "init_from")
# How a run's processes find each other: per process, and `fit` only (a sweep or the demo is one process).
JOB = ("coordinator", "num_processes", "process_id", "heartbeat_timeout")
# Settings that students trained together in one vmapped step may differ in (the rest is their shared stream;
# `data_seed` defaults to `seed`, so students of different seeds share a stream only with one --data-seed).
GROUP_VARYING = ("seed", "temperature", "alpha", "loss", "combine", "members", "out", "hint_weight",
                 "attention_weight", "similarity_weight")
FEATURE_OPTIONS = ("hint", "attention", "similarity")  # Each with its `*_weight`.

# One check per setting: a function of the value that returns True or says what is wrong. The sweep's grid axes
# use the same checks.
CHECKS = {
    "model": lambda v: v in MODELS or is_reference(v) or f"must be one of {', '.join(MODELS)}, or 'module:function'",
    "alpha": lambda v: v is None or 0.0 <= v <= 1.0 or "must be in [0, 1]",
    "temperature": lambda v: v is None or positive_finite(v),
    "loss": check_loss,
    "combine": lambda v: v is None or v in COMBINE_RULES or f"must be one of {', '.join(COMBINE_RULES)}",
    "members": lambda v: v is None or (len(v) > 0 and all(isinstance(m, int) and not isinstance(m, bool)
                                                          for m in v)) or "must be a non-empty list of member indices",
    "label_fraction": lambda v: 0.0 < v <= 1.0 or "must be in (0, 1]",
    "epochs": lambda v: v >= 0 or "must be >= 0",
    "finetune_epochs": lambda v: v >= 0 or "must be >= 0",
    "batch_size": lambda v: v >= 1 or "must be >= 1",
    "lr": positive_finite,
    "finetune_lr": lambda v: v is None or positive_finite(v),
    "weight_decay": lambda v: v == 0 or positive_finite(v) is True or "must be >= 0 and finite",
    "optimizer": lambda v: v in OPTIMIZERS or f"must be one of {', '.join(OPTIMIZERS)}",
    "schedule": lambda v: v in SCHEDULES or f"must be one of {', '.join(SCHEDULES)}",
    "warmup_epochs": lambda v: (v >= 0 and math.isfinite(v)) or "must be >= 0 and finite",
    "momentum": lambda v: 0.0 <= v < 1.0 or "must be in [0, 1)",
    "dropout": lambda v: 0.0 <= v < 1.0 or "must be in [0, 1)",
    "shuffle_window": lambda v: v >= 1 or "must be >= 1 chunk",
    "checkpoint_every": lambda v: v >= 1 or "must be >= 1 epoch",
    "checkpoint_every_steps": lambda v: v is None or v >= 1 or "must be >= 1 step",
    "workers": workers_check,
    "folds": lambda v: v >= 1 or "must be >= 1",
    "enrich": lambda v: 0.0 < v < 1.0 or "must be in (0, 1)",
    "seed": seed_check,
    "data_seed": lambda v: v is None or seed_check(v),
    "max_classes": lambda v: v >= 2 or "must be >= 2",
    "hint_weight": lambda v: v == 0 or positive_finite(v) is True or "must be >= 0 and finite",
    "attention_weight": lambda v: v == 0 or positive_finite(v) is True or "must be >= 0 and finite",
    "similarity_weight": lambda v: v == 0 or positive_finite(v) is True or "must be >= 0 and finite",
    "hint_epochs": lambda v: v >= 0 or "must be >= 0",
}


def check_value(name: str, value) -> str | None:
  """What is wrong with one setting's value, or None if it is valid."""
  check = CHECKS.get(name)
  verdict = True if check is None else check(value)
  return None if verdict is True else verdict


def validate_config(config: FitConfig, prefix: str = "") -> None:
  """Checks every setting on its own and the combinations that need no data.

  Args:
    config: the settings.
    prefix: of the option names in errors (the demo's `student_` makes `--student-alpha`).

  Raises:
    StillroomError: naming the option, the value and what it must be.
  """
  for field in dataclasses.fields(config):
    problem = check_value(field.name, getattr(config, field.name))
    if problem:
      raise StillroomError(f"{flag_of(field.name, prefix)} {problem}, got {getattr(config, field.name)}.")
  if (config.folds > 1) != (config.holdout_fold is not None) or (
      config.holdout_fold is not None and not 0 <= config.holdout_fold < config.folds):
    raise StillroomError(f"--folds {config.folds} --holdout-fold {config.holdout_fold}: give both, with the "
                         "held-out fold in 0..K-1 (or neither).")
  if not config.cache:
    soft_only = [flag_of(name) for name in ("alpha", "temperature", "combine", "members")
                 if getattr(config, name) is not None and not (name == "alpha" and config.alpha == 1.0)]
    soft_only += [f"--loss {config.loss}"] if config.loss != "kl" else []
    if soft_only:
      raise StillroomError(f"{', '.join(soft_only)} set{'s' if len(soft_only) == 1 else ''} distillation, which "
                           "needs --cache.")
  elif config.augment or config.flip or config.image_size is not None or \
      (tuple(config.crop_area), tuple(config.crop_aspect)) != (DEFAULT_CROP_AREA, DEFAULT_CROP_ASPECT):
    raise StillroomError("--augment/--flip/--image-size/--crop-* draw views for hard-label training; a cache brings "
                         "its own views.")
  if config.specialist and (config.cache or not config.init_from):
    raise StillroomError("--specialist trains on hard labels (not --cache), from the generalist: give --init-from "
                         "GENERALIST_RUN.")
  if config.enrich != FitConfig.enrich and not config.specialist:
    raise StillroomError("--enrich is the share of a specialist's classes in its epochs; give --specialist too.")
  features = [flag_of(name) for name in FEATURE_OPTIONS if getattr(config, name)]
  if features and not config.cache:
    raise StillroomError(f"{', '.join(features)} distil(s) cached teacher features, which need --cache.")
  for name in FEATURE_OPTIONS:
    if getattr(config, f"{name}_weight") != getattr(FitConfig, f"{name}_weight") and not getattr(config, name):
      raise StillroomError(f"{flag_of(name + '_weight')} weights {flag_of(name)}; give {flag_of(name)} too.")
  if config.hint_epochs and (not config.hint or config.hint_epochs >= config.epochs):
    raise StillroomError(f"--hint-epochs {config.hint_epochs} trains on --hint alone for the first epochs of "
                         f"--epochs {config.epochs}: give --hint, and fewer hint epochs than epochs.")
  if config.flip and not config.augment:
    raise StillroomError("--flip adds flips to --augment's views; give --augment too.")
  if config.image_size is not None and config.max_shift != FitConfig.max_shift:
    raise StillroomError("--max-shift shapes shifted views; crop views (--image-size) take no shift.")
  if config.image_size is not None and not config.augment and \
      (tuple(config.crop_area), tuple(config.crop_aspect)) != (DEFAULT_CROP_AREA, DEFAULT_CROP_ASPECT):
    raise StillroomError("--crop-area/--crop-aspect shape --augment's random crops; give --augment too.")
  if config.epochs + config.finetune_epochs < 1:
    raise StillroomError("--epochs and --finetune-epochs must be >= 0 with at least one epoch in all.")
  if not config.out:
    raise StillroomError("give --out RUN_DIR.")
