"""The settings several commands share, declared once: each command's config class embeds the ones it takes.

`FitConfig` (`student-train fit`) and `BuildConfig` (`teacher-cache build`, `views`, `import`) inherit all of them,
`EvalConfig` and the demo's `DemoConfig` the dataset ones, so a shared setting has one default, one help text and
one check, and each field lists the commands that offer it (`shared.settings.setting`).
"""

import dataclasses

from shared.augment import DEFAULT_CROP_AREA, DEFAULT_CROP_ASPECT, RENDERERS, mix_check
from shared.data import NO_EVAL
from shared.data.backends import is_text
from shared.data.text import DEFAULT_PACK_SEED, DEFAULT_SEQ_LEN, DEFAULT_TOKENIZER, TextOptions
from shared.precision import COMPUTE_DTYPES, DEFAULT_COMPUTE_DTYPE
from shared.settings import at_least, seed_check, setting, workers_check

DEFAULT_DATASET = "digits"  # The embedded dataset: every command runs without downloads or files.
DEFAULT_SPLIT = "train"
DEFAULT_HEARTBEAT_SECONDS = 60
DEFAULT_JOIN_SECONDS = 300  # JAX's default: processes of a cluster job may start minutes apart.

# The commands, as `setting(commands=...)` names them; `demo.STAGE` are the demo's --STAGE-* options.
FIT, SWEEP, EVAL, EXPORT, DEMO = "fit", "sweep", "eval", "export", "demo"
BUILD, VIEWS, IMPORT = "build", "views", "import"
EXTEND = "extend"  # `teacher-cache extend` (teacher_cache/extend.py).
CONVERT, SUBSET, MERGE = "convert", "subset", "merge"  # Caches derived from caches (`teacher_cache.derive`).
DERIVE = (CONVERT, SUBSET, MERGE)
DEMO_TEACHER, DEMO_BUILD, DEMO_STUDENT = "demo.teacher", "demo.build", "demo.student"
DEMO_STAGES = {"teacher": DEMO_TEACHER, "build": DEMO_BUILD, "student": DEMO_STUDENT}


def resolve_dataset(name: str | None) -> str:
  """The dataset a command reads when none is given."""
  return name or DEFAULT_DATASET


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSettings:
  """Which dataset, and where TFDS keeps it."""

  dataset: str | None = setting(
      None, "'digits' (embedded), 'npz:PATH', 'imagefolder:DIR', 'prepared:STORE' (images decoded once by "
            "`teacher-cache prepare`), 'text:PATH' (.txt/.md/.py/.jsonl text packed into rows of tokens) or a TFDS "
            "dataset prepared in --data-dir "
            f"(default: '{DEFAULT_DATASET}'; `fit --cache`: the dataset the cache records)", group="data",
      commands=(FIT, SWEEP, BUILD, VIEWS, IMPORT, EVAL, DEMO))
  data_dir: str | None = setting(None, "TFDS data dir (default: TFDS's own, ~/tensorflow_datasets)", group="data",
                                 commands=(FIT, SWEEP, BUILD, VIEWS, IMPORT, EVAL, DEMO, EXTEND, *DERIVE),
                                 identity=False,
                                 scope="process")
  # How `text:PATH` becomes packed rows (`shared.data.text`); None: not given (the record's, else the default).
  seq_len: int | None = setting(
      None, f"text: datasets: tokens per packed row, L (default: {DEFAULT_SEQ_LEN}; with --cache or a run: the "
            "recorded one)", metavar="L", group="data", check=at_least(2), added=True,
      commands=(FIT, SWEEP, BUILD, VIEWS, IMPORT, EVAL, DEMO))
  tokenizer: str | None = setting(
      None, f"text: datasets: '{DEFAULT_TOKENIZER}' (UTF-8 bytes, 256 tokens) or the path of a Hugging Face "
            "tokenizer.json (needs `pip install 'stillroom[text]'`); its SHA-256 is part of the data's fingerprint "
            f"(default: '{DEFAULT_TOKENIZER}'; with --cache or a run: the recorded one)", metavar="bytes|PATH",
      group="data", added=True, commands=(FIT, SWEEP, BUILD, VIEWS, IMPORT, EVAL, DEMO))
  pack_seed: int | None = setting(
      None, f"text: datasets: the seed of the documents' order before they are packed into rows (default: "
            f"{DEFAULT_PACK_SEED}; with --cache or a run: the recorded one)", metavar="SEED", group="data",
      check=lambda seed: seed is None or seed_check(seed), added=True,
      commands=(FIT, SWEEP, BUILD, VIEWS, IMPORT, EVAL, DEMO))


def text_options(config, recorded: dict | None = None, dataset: str | None = None) -> TextOptions | None:
  """The text options (`open_transfer_set(..., text=)`) of a config's --seq-len, --tokenizer and --pack-seed, each
  one not given taken from `recorded` (a `DatasetSpec.text` of a cache or run) when there is one, else its default.

  Args:
    config: a config with the dataset settings (`DatasetSettings`).
    recorded: the text record of the data a cache or run was made from, or None.
    dataset: the dataset the options are for, when known: a record is not applied to data that is not `text:`
      (that data is refused as another dataset than the record's, not for options nobody gave).

  Returns:
    None when neither gives any (non-text data, or `text:` data with the defaults); else the options (refused for
    data that is not `text:`).
  """
  if dataset is not None and not is_text(dataset):
    recorded = None
  given = {"seq_len": config.seq_len, "tokenizer_name": config.tokenizer, "pack_seed": config.pack_seed}
  given = {key: value for key, value in given.items() if value is not None}
  if not given and recorded is None:
    return None
  base = TextOptions.from_dict(recorded) if recorded is not None else TextOptions()
  if "tokenizer_name" in given:
    base = dataclasses.replace(base, tokenizer_sha256=None)  # Another file than the recorded one, maybe.
  return dataclasses.replace(base, **given)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSettings(DatasetSettings):
  """The transfer set and the per-epoch evaluation data."""

  split: str | None = setting(None, "TFDS split spec of one split, e.g. 'train' or 'train[:80%]' (default: "
                                    f"'{DEFAULT_SPLIT}'; `fit --cache`: the split the cache records)", group="data",
                              commands=(FIT, SWEEP, BUILD, VIEWS, IMPORT))
  eval_dataset: str | None = setting(None, "the dataset of --eval-split (default: --dataset), e.g. "
                                           "'imagefolder:DIR' of held-out images", group="data",
                                     commands=(FIT, SWEEP, BUILD))
  eval_split: str | None = setting(
      None, f"evaluation split: `fit` evaluates on it each epoch; `build` stores each member's logits on it, so "
            "that students report their agreement with the ensemble without running the teachers; "
            f"'{NO_EVAL}': none (default: 'test' when the dataset has it; with --eval-dataset, 'train' of an npz: or "
            "imagefolder: dataset, 'test' of a TFDS one)", group="data", commands=(FIT, SWEEP, BUILD))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViewSettings:
  """How a view of an example is rendered: a zero-filled shift, or a random-resized crop; flips; mixed views."""

  max_shift: int = setting(1, "shift views: the largest zero-filled shift, in pixels", group="views",
                           commands=(FIT, BUILD, VIEWS, IMPORT, DEMO_BUILD))
  flip: bool = setting(False, "random horizontal flips in views (wrong for digits and text)", group="views",
                       commands=(FIT, BUILD, VIEWS, IMPORT, DEMO_BUILD))
  image_size: int | None = setting(
      None, "crop views rendered at SxS: the centre crop for view 0 and evaluation, random-resized crops for the "
            "others; needed for images of varying size (default: shift views of the stored images)", metavar="S",
      group="views", commands=(FIT, BUILD, VIEWS, IMPORT))
  crop_area: tuple[float, ...] = setting(DEFAULT_CROP_AREA, "crop views: min,max area of a random crop, as fractions "
                                                              "of the image", metavar="MIN,MAX", group="views",
                                         requires="image_size",
                                         commands=(FIT, BUILD, VIEWS, IMPORT, DEMO_BUILD))
  crop_aspect: tuple[float, ...] = setting(DEFAULT_CROP_ASPECT, "crop views: min,max width/height of a random crop",
                                           metavar="MIN,MAX", group="views", requires="image_size",
                                           commands=(FIT, BUILD, VIEWS, IMPORT, DEMO_BUILD))
  renderer: str | None = setting(
      None, "where crop views are rendered: 'host' (PIL in the input workers) or 'device' (the workers read each "
            "image's fixed-size canvas and draw its box and flip; the teachers' forward or the student's step crops, "
            "resizes and flips on the accelerator, within a grey level of the host's pixels); 'device' needs a "
            "dataset of fixed-size canvases (images of one shape in memory, prepared images). A cache records its "
            "renderer (default: host; `fit --cache`: the cache's)", choices=RENDERERS, group="views",
      requires="image_size", added=True, commands=(FIT, BUILD))
  mix: str | None = setting(
      None, "mixed views: 'mixup:A' blends each augmented view (views 1..V-1; view 0 stays clean) with a partner view "
            "(the same view id of an example drawn uniformly from the transfer set, itself included), λ·view + (1 − λ)·"
            "partner with λ ~ Beta(A, A); "
            "'cutmix:A' pastes a box of the partner into the view, λ its area share left. Partners and λ are drawn "
            "from the seed, the teachers label the mixed image, and the student renders the same one; hard-label "
            "terms take λ·CE(y) + (1 − λ)·CE(y_partner). Needs --views 2 or more. A cache records it (default: "
            "none)", metavar="none|mixup:A|cutmix:A", check=mix_check, group="views",
      added=True, commands=(FIT, BUILD, VIEWS, IMPORT),
      helps={FIT: ("the cache's mixed views (`teacher-cache build --mix`), which the student renders as its teachers "
                   "saw them, with the hard-label term on the λ-mixed labels; a check only: another mix than the "
                   "cache's is refused, and so is --mix without --cache (default: the cache's)", None)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputeSettings:
  """What the models compute in (`shared.precision`)."""

  # scope "group": the students of one vmapped group share one graphdef, which fixes its layers' dtype.
  compute_dtype: str = setting(
      DEFAULT_COMPUTE_DTYPE, "the dtype the student computes in (a registry model), recorded in the run: parameters, "
                             "BatchNorm statistics and optimizer state stay float32, and logits are float32 before "
                             "any softmax or loss", choices=COMPUTE_DTYPES,
      group="run", commands=(FIT, SWEEP, BUILD), axis=True, added=True,
      helps={BUILD: ("the dtype the teachers compute in, recorded in the cache with the bound its targets keep "
                     "against a float32 build's (run dirs of registry models only: not a module:function teacher); "
                     "parameters and BatchNorm statistics stay float32, logits are float32 before the ensemble",
                     None)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSettings:
  """Input workers, and how the processes of a job find each other (per process; not part of what is computed)."""

  workers: int | None = setting(
      None, "processes that decode images and render views, a batch at a time (0: a thread of the main process; "
            "default: 0 for arrays in memory, else one per usable core but one, at most 8); results do not depend "
            "on it, and a resumed run may change it", metavar="N", group="job", check=workers_check,
      commands=(FIT, SWEEP, BUILD, VIEWS, EXTEND, DEMO_TEACHER, DEMO_BUILD, DEMO_STUDENT), identity=False,
      scope="process")
  coordinator: str | None = setting(
      None, "HOST:PORT of process 0's coordination service, for a job of several processes (with --num-processes "
            "and --process-id); 'auto': JAX detects the job (TPU pods, GKE, SLURM); under a multi-task `srun` the "
            "default", metavar="HOST:PORT", group="job", commands=(FIT, BUILD, EXTEND), identity=False)
  num_processes: int | None = setting(None, "processes in the job (with --coordinator)", metavar="N", group="job",
                                      commands=(FIT, BUILD, EXTEND), identity=False)
  process_id: int | None = setting(None, "this process's index, 0..N-1 (with --coordinator); process 0 writes what "
                                         "the job shares", metavar="I", group="job", commands=(FIT, BUILD, EXTEND),
                                   identity=False, scope="process")
  heartbeat_timeout: int = setting(DEFAULT_HEARTBEAT_SECONDS, "seconds after which the other processes of a job give "
                                                              "up on one that stopped answering", metavar="SECONDS",
                                   group="job", commands=(FIT, BUILD, EXTEND), identity=False)
  join_timeout: int = setting(DEFAULT_JOIN_SECONDS, "seconds a process of a job waits for the others to join (process "
                                                    "0 for every other process, the others for process 0) before it "
                                                    "gives up", metavar="SECONDS", group="job",
                              commands=(FIT, BUILD, EXTEND), identity=False, check=at_least(1, "second"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputSettings:
  """Where the output goes, whether an existing one may be replaced, and progress bars."""

  out: str = setting("", "the output to write", group="run", commands=(FIT, BUILD, VIEWS, IMPORT, EXTEND, *DERIVE),
                     identity=False,
                     scope="student", helps={FIT: ("run directory to write", "RUN_DIR"),
                                             BUILD: ("the store to write", "CACHE.zarr"),
                                             IMPORT: ("the store to write", "CACHE.zarr"),
                                             **{c: ("the store to write", "NEW.zarr") for c in DERIVE},
                                             VIEWS: ("the directory (or object-store prefix) to write the views to",
                                                     "DIR"),
                                             EXTEND: ("write the extended cache here and leave CACHE as it is "
                                                      "(default: extend CACHE in place; an object store needs it)",
                                                      "NEW.zarr")})
  overwrite: bool = setting(False, "replace an existing output written with other settings", group="run",
                            commands=(FIT, BUILD, VIEWS, IMPORT, EXTEND, *DERIVE), identity=False, scope="student",
                            helps={EXTEND: ("replace an existing --out (or, in place, a staging store an extend with "
                                            "other settings left) written with other settings", None)})
  progress: bool = setting(True, "progress bars (on a terminal; elsewhere one line per stage)", group="run",
                           commands=(FIT, SWEEP, BUILD, VIEWS, IMPORT, EXTEND, *DERIVE), identity=False,
                           scope="process")
