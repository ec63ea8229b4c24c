"""The cache format: the contract between `teacher_cache` (writer) and `student_train` (reader).

A cache is one Zarr v3 group. Each row is one `(example, view)` pair. Rows are view-major (rows `[v·N, (v+1)·N)`
hold view v of every example), and within a view the examples are stored in a seeded permuted order
(`row_sources`), so that any chunk, and any batch drawn from a few chunks, is a uniform sample of the transfer set
even when the dataset is sorted by class. Every array is chunked along rows only, `chunk_rows` rows per chunk; a
chunk is the unit of writing, resuming and reading. Every chunk carries a CRC-32C checksum and is written even
when it is all zeros, so damage and missing chunks can be told apart from data.

The group attributes hold `CacheSpec.to_attrs()` under "stillroom" (including the list of arrays present, each
with its role) and, written last, a completion record under "stillroom_complete". A store without the completion
record is not complete, whatever it holds.

Schema history: version 1 (stillroom 0.1) had no checksums, could omit all-zero chunks, stored examples in split
order, and listed no arrays; it is still read, with a warning. Version 3 is version 2 with sparse targets
(`--targets topk:K|sample:K`); dense caches stay version 2, so that an older stillroom reads them. Version 4 holds
a generalist with specialists; version 5 holds teacher features (`--features`), with any targets.
"""

import asyncio
import dataclasses
import datetime
import math
import re
import sys
import warnings

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync as zarr_sync

from shared import storage
from shared.augment import Augmentation, fold_of, row_permutation
from shared.data import DatasetSpec
from shared.ensemble import COMBINE_RULES
from shared.errors import StillroomError
from shared.settings import positive_finite, seed_check

SCHEMA_VERSION = 2
SPARSE_SCHEMA_VERSION = 3  # Sparse targets: a stillroom that predates them refuses the store by its version.
SPECIALIST_SCHEMA_VERSION = 4  # A generalist with specialists: likewise.
FEATURE_SCHEMA_VERSION = 5  # Teacher features: likewise.
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4, 5)
SPEC_KEY = "stillroom"
COMPLETE_KEY = "stillroom_complete"
STORAGE_DTYPES = ("float16", "float32")
STORAGE = "storage"  # Placeholder dtype in LAYOUT: the spec's `dtype`.
CLASS_IDS = "class ids"  # Placeholder dtype in LAYOUT: int16 when C fits, else int32.
TARGET_KINDS = ("dense", "topk", "sample")  # `--targets dense|topk:K|sample:K`.
ROW_ORDERS = ("permuted", "sequential")  # "sequential": version 1, examples in split order within each view.
# What `--features NAME:KIND` stores of a member's named feature (`shared.models`), per row, in float16.
FEATURE_KINDS = {
    "map": "the feature as the model computes it: [H, W, C] for a map, [D] for a vector",
    "attention": "Zagoruyko & Komodakis's spatial attention map of a [H, W, C] map: sum over channels of the squares, "
                 "L2-normalised over the H·W positions, [H, W]",
    "pooled": "the map averaged over its H·W positions, [C] (a vector feature as it is)",
}
FEATURE_NAME = r"[A-Za-z0-9_-]+"  # A feature name an array name can hold.
FEATURE_DTYPE = "float16"  # Features are stored in float16 whatever `--dtype` the logits take.
FEATURE_RANKS = {"map": (1, 3), "attention": (2,), "pooled": (1,)}  # The shapes each kind stores.

# What an array is for. Readers ask for arrays by name and get an error naming any that are missing.
ROLES = {
    "teacher": "teacher outputs of each row",
    "row": "what each row is: its example, view, label and fold",
    "view": "parameters that replay each row's view from the example",
    "feature": "a teacher member's named intermediate feature of each row (`--features`)",
    "eval": "teacher outputs on the evaluation split (one row per eval example, no views)",
    "bookkeeping": "which chunks a build has committed (for resume)",
}
ROWS, EVAL_ROWS = "rows", "eval"  # The two row sets: the transfer set's rows (R) and the eval split's (E).


@dataclasses.dataclass(frozen=True)
class ArrayLayout:
  """One kind of array a store may hold: its role, its dimensions, dtype and meaning. `LAYOUT` is the catalogue; a
  spec lists the arrays a given store has.

  Attributes:
    name: the array's name in the group.
    role: what it is for (see `ROLES`).
    dims: symbolic shape: "R" rows, "E" eval rows, "M" members, "C" classes, "K" sparse targets per row,
      "S" specialists, "P" the largest specialist's outputs, "F" a feature's shape, "chunks(R)" / "chunks(E)" one
      entry per chunk of those rows, or a number.
    dtype: a NumPy dtype name, `STORAGE` for the spec's storage dtype, or `CLASS_IDS`.
    meaning: one line for the README and `--help`.
    views: the kind of view (`shift` or `crop`, see `shared.augment`) whose stores hold it; None: every store.
    targets: the target kinds (`TARGET_KINDS`) whose stores hold it; None: every store.
    specialists: whether only stores of a generalist with specialists hold it.
    features: a template for the arrays of `--features` (one per feature, kind and member).
  """

  name: str
  role: str
  dims: tuple[str, ...]
  dtype: str
  meaning: str
  views: str | None = None
  targets: tuple[str, ...] | None = None
  specialists: bool = False
  features: bool = False

  @property
  def shape(self) -> str:
    """The symbolic shape as documented, e.g. "[R, M, C]" or "[ceil(R / chunk_rows)]"."""
    names = [d.replace("chunks(", "ceil(").replace(")", " / chunk_rows)") if d.startswith("chunks(") else d
             for d in self.dims]
    return "[" + ", ".join(names) + "]"

  @property
  def row_set(self) -> str:
    """The rows it is indexed by: `ROWS` (the transfer set's) or `EVAL_ROWS`."""
    return EVAL_ROWS if self.dims[0] in ("E", "chunks(E)") else ROWS


LAYOUT = (
    ArrayLayout("targets", "teacher", ("R", "C"), STORAGE,
                "ensemble log-probabilities at T under the spec's combine rule, from the member logits as stored "
                "(with specialists: their combination q with the generalist)", targets=("dense",)),
    ArrayLayout("target_ids", "teacher", ("R", "K"), CLASS_IDS,
                "topk:K: the K classes of largest ensemble probability at T, most probable first; sample:K: the "
                "distinct classes among K draws from it, in increasing order, then padding (id 0, count 0)",
                targets=("topk", "sample")),
    ArrayLayout("target_log_probs", "teacher", ("R", "K"), STORAGE,
                "the ensemble log-probability at T of each of `target_ids`", targets=("topk", "sample")),
    ArrayLayout("target_rest", "teacher", ("R",), "float32",
                "topk:K: log of the ensemble probability at T of every class not in `target_ids` (−inf for K = C)",
                targets=("topk",)),
    ArrayLayout("target_counts", "teacher", ("R", "K"), "uint16",
                "sample:K: how many of the row's K draws gave each of `target_ids` (they sum to K)",
                targets=("sample",)),
    ArrayLayout("member_logits", "teacher", ("R", "M", "C"), STORAGE,
                "each member's raw logits (before dividing by T); in a sparse cache only with --member-logits"),
    ArrayLayout("specialist_logits", "teacher", ("R", "S", "P"), STORAGE,
                "each specialist's raw logits: its classes in its order, padding 0, its dustbin (corrected) last",
                specialists=True),
    ArrayLayout("specialist_active", "teacher", ("R", "S"), "bool",
                "the specialist takes part in the row's q: its classes meet the generalist's top-n", specialists=True),
    ArrayLayout("feature.NAME.KIND.mM", "feature", ("R", "F"), FEATURE_DTYPE,
                "member M's feature NAME of each row as KIND stores it (see `FEATURE_KINDS`), float16", features=True),
    ArrayLayout("index", "row", ("R",), "int64", "example index: position in the unsliced split"),
    ArrayLayout("view", "row", ("R",), "int32", "view id; 0 is the un-augmented input"),
    ArrayLayout("labels", "row", ("R",), "int32", "hard label; -1 for an unlabeled transfer set"),
    ArrayLayout("fold", "row", ("R",), "int32",
                "cross-fitting fold of the row's example (its logits come from runs that did not train on that "
                "fold); -1 when unused"),
    ArrayLayout("shift", "view", ("R", "2"), "int8",
                "shift views: the zero-filled shift (dy, dx) in pixels, applied after `flip`", views="shift"),
    ArrayLayout("crop", "view", ("R", "4"), "int32",
                "crop views: the crop box (top, left, height, width) in source pixels, resized to image_size² "
                "(PIL bilinear, antialiased, uint8) before `flip`", views="crop"),
    ArrayLayout("flip", "view", ("R",), "bool",
                "the view is flipped horizontally (left-right): before the shift, or after the crop's resize"),
    ArrayLayout("eval_member_logits", "eval", ("E", "M", "C"), STORAGE,
                "each member's raw logits on the eval split's un-augmented examples (a cross-fitted member: the "
                "mean of its fold runs)"),
    ArrayLayout("eval_index", "eval", ("E",), "int64", "eval example index: position in the eval split's unsliced split"),
    ArrayLayout("eval_labels", "eval", ("E",), "int32", "eval example label; -1 if unlabeled"),
    ArrayLayout("chunk_committed", "bookkeeping", ("chunks(R)",), "bool", "chunk k of every row array is written"),
    ArrayLayout("eval_chunk_committed", "bookkeeping", ("chunks(E)",), "bool",
                "chunk k of every eval array is written"),
)
_LAYOUT = {layout.name: layout for layout in LAYOUT}
_FEATURE_LAYOUT = next(layout for layout in LAYOUT if layout.features)


def layout_of(name: str) -> ArrayLayout:
  """The catalogue entry of an array name (a feature array's is the `features` template)."""
  return _FEATURE_LAYOUT if name.startswith("feature.") else _LAYOUT[name]


def _log(message: str) -> None:
  print(f"stillroom: {message}", file=sys.stderr, flush=True)


def parse_targets(text: str) -> tuple[str, int | None]:
  """`"dense"` -> ("dense", None); `"topk:K"` / `"sample:K"` -> (kind, K).

  Raises:
    StillroomError: another text, or K not a positive integer (at most 65,535 draws for `sample`).
  """
  kind, _, k = text.partition(":")
  if kind == "dense" and not k:
    return kind, None
  if kind in TARGET_KINDS[1:] and k.isascii() and k.isdigit() and int(k) >= 1:
    if kind == "topk" or int(k) <= np.iinfo(np.uint16).max:  # Counts are uint16.
      return kind, int(k)
  raise StillroomError(f"--targets {text!r}: give 'dense', 'topk:K' or 'sample:K' with K a positive integer "
                       "(sample: at most 65535).")


def row_sources(rows: np.ndarray, num_examples: int, seed: int,
                row_order: str = "permuted") -> tuple[np.ndarray, np.ndarray]:
  """Which view of which example each row holds (see `CacheSpec.row_sources`, which this is).

  Args:
    rows: int [B] row numbers.
    num_examples: N, the transfer set's examples.
    seed: the build's seed.
    row_order: "permuted" (schema 2) or "sequential" (schema 1).

  Returns:
    `(view, position)`: int32 [B] view ids and int64 [B] positions in the transfer set.
  """
  rows = np.asarray(rows, np.int64)
  view, slot = np.divmod(rows, num_examples)
  if row_order == "sequential":
    return view.astype(np.int32), slot
  position = np.empty_like(slot)
  for v in np.unique(view):
    here = view == v
    position[here] = row_permutation(seed, int(v), num_examples)[slot[here]]
  return view.astype(np.int32), position


def replay_rows(spec: "CacheSpec", start: int, stop: int, indices: np.ndarray,
                sizes: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
  """The row arrays of rows `[start, stop)` that follow from the seed alone, as a build writes them.

  Args:
    spec: the cache's spec.
    indices: int64 [N] the transfer set's example indices.
    sizes: int [N, 2] every example's (height, width), for crop views.

  Returns:
    `(position int64 [n] in the transfer set, {"index", "view", "fold", and the view parameters})`.
  """
  view, position = spec.row_sources(np.arange(start, stop))
  index = indices[position]
  params = spec.augmentation.view_params(index, view, None if sizes is None else sizes[position])
  return position, {"index": index, "view": view, "fold": fold_of(index, spec.folds), **params}


def validate_settings(*, temperature: float, combine: str, dtype: str, views: int, chunk_rows: int, seed: int = 0,
                      folds: int = 1, targets: str = "dense") -> None:
  """Checks the scalar build settings (before any data or teacher is loaded).

  Raises:
    StillroomError: naming the bad setting and its valid values.
  """
  problem = positive_finite(temperature)
  if problem is not True:
    raise StillroomError(f"temperature {problem}, got {temperature}.")
  if combine not in COMBINE_RULES:
    raise StillroomError(f"unknown combine rule {combine!r}; valid: {', '.join(COMBINE_RULES)}.")
  if dtype not in STORAGE_DTYPES:
    raise StillroomError(f"unknown dtype {dtype!r}; valid: {', '.join(STORAGE_DTYPES)}.")
  if views < 1:
    raise StillroomError(f"views must be >= 1 (view 0 is the un-augmented input), got {views}.")
  if chunk_rows < 1:
    raise StillroomError(f"chunk_rows must be >= 1, got {chunk_rows}.")
  if seed_check(seed) is not True:
    raise StillroomError(f"seed {seed_check(seed)}, got {seed}.")
  if folds < 1:
    raise StillroomError(f"folds must be >= 1, got {folds}.")
  parse_targets(targets)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArraySpec:
  """One array present in a store: name, role (see `ROLES`), shape, dtype and chunk shape."""

  name: str
  role: str
  shape: tuple[int, ...]
  dtype: str
  chunks: tuple[int, ...]

  @property
  def row_bytes(self) -> int:
    """The bytes of one row (one entry along the first axis)."""
    return math.prod(self.shape[1:]) * np.dtype(self.dtype).itemsize

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "shape": list(self.shape), "chunks": list(self.chunks)}

  @classmethod
  def from_dict(cls, d: dict) -> "ArraySpec":
    return cls(**{**d, "shape": tuple(d["shape"]), "chunks": tuple(d["chunks"])})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemberSpec:
  """One ensemble member's run, identified by the digest of its parameters (paths may move).

  Attributes:
    name: display name (run dir basename or `module:function`).
    source: where it was loaded from.
    model: registry name, or "external".
    num_params: parameter count.
    digest: SHA-256 of the parameters (`shared.runs.param_digest`).
    trained_epochs: epochs the run had trained when its checkpoint was written (None: not a stillroom run).
    normalization: the input normalisation it received.
  """

  name: str
  source: str
  model: str
  num_params: int
  digest: str
  trained_epochs: int | None
  normalization: dict

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SpecialistSpec:
  """One specialist of a cache (Hinton et al. 2015, section 5).

  Attributes:
    run: its run.
    classes: the generalist's class ids of its outputs 0..n-1 (its dustbin is output n).
    dustbin_correction: what was added to its dustbin logit before storing (undoing its enriched sampling).
  """

  run: MemberSpec
  classes: tuple[int, ...]
  dustbin_correction: float

  def to_dict(self) -> dict:
    return {"run": self.run.to_dict(), "classes": list(self.classes), "dustbin_correction": self.dustbin_correction}

  @classmethod
  def from_dict(cls, d: dict) -> "SpecialistSpec":
    return cls(run=MemberSpec(**d["run"]), classes=tuple(int(c) for c in d["classes"]),
               dustbin_correction=float(d["dustbin_correction"]))


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One teacher feature a cache stores (`--features NAME:KIND`): one array of the layout.

  Attributes:
    name: the member's feature name (`shared.models`: e.g. `stage1`, `dense`).
    kind: what is stored of it (see `FEATURE_KINDS`).
    member: the member whose feature it is.
    shape: one row's stored shape, e.g. (8, 8, 32), (8, 8) or (32,).
  """

  name: str
  kind: str
  member: int
  shape: tuple[int, ...]

  @property
  def array_name(self) -> str:
    return f"feature.{self.name}.{self.kind}.m{self.member}"

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "shape": list(self.shape)}

  @classmethod
  def from_dict(cls, d: dict) -> "FeatureSpec":
    return cls(name=str(d["name"]), kind=str(d["kind"]), member=int(d["member"]),
               shape=tuple(int(n) for n in d["shape"]))


def parse_features(text: str) -> list[tuple[str, str, int | None]]:
  """`"stage1,stage2:attention@0"` -> [("stage1", "map", None), ("stage2", "attention", 0)]: each feature's name,
  kind (default "map") and member (None: every member).

  Raises:
    StillroomError: an empty or malformed entry, an unknown kind (listing the valid ones).
  """
  parsed = []
  for entry in text.split(","):
    rest, _, member = entry.partition("@")
    name, _, kind = rest.partition(":")
    kind = kind or "map"
    if not re.fullmatch(FEATURE_NAME, name) or kind not in FEATURE_KINDS or \
        (member and not (member.isascii() and member.isdigit())) or (not member and "@" in entry):
      raise StillroomError(f"--features {text!r}: give NAME[:KIND][@MEMBER],... with KIND one of "
                           f"{', '.join(FEATURE_KINDS)} (default map) and MEMBER a member index (default: every "
                           f"member); {entry!r} is not one.")
    parsed.append((name, kind, int(member) if member else None))
  return parsed


def required_schema_version(targets: str, specialists: bool, features: bool) -> int:
  """The oldest schema that holds a cache of `--targets targets`, with specialists or features or not."""
  return (FEATURE_SCHEMA_VERSION if features else SPECIALIST_SCHEMA_VERSION if specialists else
          SPARSE_SCHEMA_VERSION if parse_targets(targets)[0] != "dense" else SCHEMA_VERSION)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheSpec:
  """Everything a cache records about how it was made. `build_key()` is what defines a build.

  Attributes:
    temperature: T of the stored targets.
    combine: the ensemble rule of the stored targets.
    members: every member's run; with `folds` K > 1, K runs per member, member-major.
    dataset: the transfer set.
    num_classes: C.
    views: views per example (view 0 un-augmented).
    augmentation: how views are drawn; its seed also orders the examples (`row_sources`).
    dtype: storage dtype of logits and targets.
    chunk_rows: rows per chunk.
    software_version: the stillroom that wrote it.
    folds: K > 1 when cross-fitted.
    targets: what is stored of the ensemble distribution: "dense" (every class), "topk:K" or "sample:K".
    member_logits: whether each member's logits are stored (always for dense targets).
    eval_dataset: the eval split whose member logits the store holds, or None.
    row_order: "permuted" (schema 2) or "sequential" (schema 1).
    specialists: the specialists whose combination with the one member (the generalist) the targets are; schema 4.
    top_n: with specialists: those whose classes meet the generalist's top-n classes of a row take part in it.
    features: the members' features it stores (schema 5).
    arrays: the arrays present; derived from the settings when not given.
    created_at: ISO time of creation.
    schema_version: the layout version.
  """

  temperature: float
  combine: str
  members: tuple[MemberSpec, ...]
  dataset: DatasetSpec
  num_classes: int
  views: int
  augmentation: Augmentation
  dtype: str
  chunk_rows: int
  software_version: str
  folds: int = 1
  targets: str = "dense"
  member_logits: bool = True
  eval_dataset: DatasetSpec | None = None
  row_order: str = "permuted"
  specialists: tuple[SpecialistSpec, ...] = ()
  top_n: int = 0
  features: tuple[FeatureSpec, ...] = ()
  arrays: tuple[ArraySpec, ...] = ()
  created_at: str = ""
  schema_version: int = SCHEMA_VERSION

  def __post_init__(self):
    validate_settings(temperature=self.temperature, combine=self.combine, dtype=self.dtype, views=self.views,
                      chunk_rows=self.chunk_rows, seed=self.augmentation.seed, folds=self.folds, targets=self.targets)
    if self.schema_version != self.required_schema_version() and \
        (self.schema_version, self.required_schema_version()) != (1, SCHEMA_VERSION):
      raise StillroomError(f"schema version {self.schema_version} with {self.targets} targets, "
                           f"{len(self.specialists)} specialists and {len(self.features)} features: such a cache is "
                           f"schema {self.required_schema_version()} (sparse targets {SPARSE_SCHEMA_VERSION}, "
                           f"specialists {SPECIALIST_SCHEMA_VERSION}, features {FEATURE_SCHEMA_VERSION}).")
    names = [f.array_name for f in self.features]
    if len(set(names)) != len(names) or self.features and (self.folds > 1 or self.specialists) or not all(
        re.fullmatch(FEATURE_NAME, f.name) and f.kind in FEATURE_KINDS and 0 <= f.member < self.num_members
        and len(f.shape) in FEATURE_RANKS[f.kind] and min(f.shape) >= 1 for f in self.features):
      raise StillroomError("a cache's features are distinct, named in letters, digits, '_' and '-', of known kinds, "
                           "shapes that fit them and of its members, and it has neither cross-fitted members nor "
                           "specialists.")
    if self.specialists:
      classes = [c for s in self.specialists for c in s.classes]
      if self.target_kind != "dense" or len(self.members) != 1 or not 1 <= self.top_n <= self.num_classes \
          or len(set(classes)) != len(classes) or not all(0 <= c < self.num_classes for c in classes):
        raise StillroomError("a cache of specialists has dense targets, one generalist, 1 <= top_n <= C and "
                             "specialists of disjoint class ids in 0..C-1.")
    if self.target_kind == "dense" and not self.member_logits:
      raise StillroomError("a dense cache stores its members' logits (--member-logits is for sparse targets).")
    if self.target_kind == "topk" and self.target_k > self.num_classes:
      raise StillroomError(f"--targets {self.targets}: K is more than the {self.num_classes} classes.")
    if not self.members:
      raise StillroomError("a cache needs at least one teacher.")
    if len(self.members) % self.folds:
      raise StillroomError(f"{len(self.members)} teacher runs do not split into members of {self.folds} fold runs; "
                           "give each member's runs for folds 0..K-1 in order.")
    if self.row_order not in ROW_ORDERS:
      raise StillroomError(f"unknown row order {self.row_order!r}; valid: {', '.join(ROW_ORDERS)}.")
    derived = self._derived_arrays()
    if not self.arrays:
      object.__setattr__(self, "arrays", derived)
    elif self.arrays != derived:
      raise StillroomError("its list of arrays does not match its settings (a hand-edited or damaged spec): "
                           f"{[a.to_dict() for a in self.arrays if a not in derived]} listed, "
                           f"{[a.to_dict() for a in derived if a not in self.arrays]} expected.")

  def required_schema_version(self) -> int:
    """The oldest schema that holds these settings (an older stillroom refuses the store by its version)."""
    return required_schema_version(self.targets, bool(self.specialists), bool(self.features))

  @staticmethod
  def canonical_targets(text: str) -> str:
    """`--targets` as a spec records it: "dense", or "topk:K" / "sample:K" with K in plain digits ("topk:03" is
    "topk:3")."""
    kind, k = parse_targets(text)
    return kind if k is None else f"{kind}:{k}"

  @property
  def target_kind(self) -> str:
    """"dense", "topk" or "sample"."""
    return parse_targets(self.targets)[0]

  @property
  def target_k(self) -> int | None:
    """K of a sparse cache; None for dense."""
    return parse_targets(self.targets)[1]

  @property
  def target_arrays(self) -> tuple[str, ...]:
    """The teacher arrays that hold the ensemble's targets at T: `targets`, or a sparse cache's arrays."""
    return tuple(a.name for a in self.arrays if a.role == "teacher" and layout_of(a.name).targets is not None)

  @property
  def num_members(self) -> int:
    """M, the ensemble's members (each of `folds` runs when cross-fitted)."""
    return len(self.members) // self.folds

  def member_runs(self, member: int) -> tuple[MemberSpec, ...]:
    """The runs that make up one member: one, or its `folds` cross-fitted runs in fold order."""
    return self.members[member * self.folds:(member + 1) * self.folds]

  def member_name(self, member: int) -> str:
    return "+".join(run.name for run in self.member_runs(member))

  @property
  def num_examples(self) -> int:
    return self.dataset.count

  @property
  def num_rows(self) -> int:
    return self.num_examples * self.views

  @property
  def num_eval_rows(self) -> int:
    return 0 if self.eval_dataset is None else self.eval_dataset.count

  @property
  def num_chunks(self) -> int:
    return self.chunks_of(ROWS)

  def chunks_of(self, row_set: str) -> int:
    """Number of chunks of the transfer set's rows (`ROWS`) or of the eval rows (`EVAL_ROWS`)."""
    return math.ceil((self.num_rows if row_set == ROWS else self.num_eval_rows) / self.chunk_rows)

  def chunk_bounds(self, chunk: int, row_set: str = ROWS) -> tuple[int, int]:
    """`[start, stop)` rows of one chunk."""
    start = chunk * self.chunk_rows
    return start, min(start + self.chunk_rows, self.num_rows if row_set == ROWS else self.num_eval_rows)

  @property
  def has_checksums(self) -> bool:
    return self.schema_version >= 2

  def row_sources(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which view of which example each row holds: the one rule every writer and checker uses.

    Args:
      rows: int [B] row numbers.

    Returns:
      `(view, position)`: int32 [B] view ids and int64 [B] positions in the transfer set (index into its
      `indices`); row `v·N + k` holds view v of the k-th example in that view's stored order.
    """
    return row_sources(rows, self.num_examples, self.augmentation.seed, self.row_order)

  @property
  def specialist_width(self) -> int:
    """P: the outputs of the largest specialist (its classes and the dustbin); 0 without specialists."""
    return max((len(s.classes) + 1 for s in self.specialists), default=0)

  @property
  def targets_derivable(self) -> bool:
    """Whether the targets are the members' ensemble (so that students may re-derive them from `member_logits`
    at another T, rule or subset): not with specialists."""
    return self.member_logits and not self.specialists

  def array(self, name: str) -> ArraySpec | None:
    """The spec of one array, or None when the store does not hold it."""
    return next((a for a in self.arrays if a.name == name), None)

  def _derived_arrays(self) -> tuple[ArraySpec, ...]:
    """The arrays a store made with these settings holds: every row array, and the eval arrays with an eval split."""
    sizes = {"R": self.num_rows, "E": self.num_eval_rows, "M": self.num_members, "C": self.num_classes,
             "K": self.target_k, "S": len(self.specialists), "P": self.specialist_width,
             "chunks(R)": self.chunks_of(ROWS), "chunks(E)": self.chunks_of(EVAL_ROWS)}
    dtypes = {STORAGE: self.dtype, CLASS_IDS: "int16" if self.num_classes <= np.iinfo(np.int16).max + 1 else "int32"}
    arrays = []
    for layout in LAYOUT:
      if layout.row_set == EVAL_ROWS and self.eval_dataset is None:
        continue
      if layout.views is not None and layout.views != self.augmentation.kind:
        continue
      if layout.targets is not None and self.target_kind not in layout.targets:
        continue
      if layout.name == "member_logits" and not self.member_logits:
        continue
      if layout.specialists and not self.specialists:
        continue
      if layout.features:
        arrays += [ArraySpec(name=f.array_name, role=layout.role, shape=(self.num_rows, *f.shape), dtype=layout.dtype,
                             chunks=(self.chunk_rows, *f.shape)) for f in self.features]
        continue
      shape = tuple(sizes[d] if d in sizes else int(d) for d in layout.dims)
      dtype = dtypes.get(layout.dtype, layout.dtype)
      chunks = (1,) if layout.role == "bookkeeping" else (self.chunk_rows, *shape[1:])
      arrays.append(ArraySpec(name=layout.name, role=layout.role, shape=shape, dtype=dtype, chunks=chunks))
    return tuple(arrays)

  def feature(self, name: str, kind: str, member: int) -> FeatureSpec | None:
    """The stored feature `name` of `member` as `kind`, or None."""
    return next((f for f in self.features if (f.name, f.kind, f.member) == (name, kind, member)), None)

  def arrays_of(self, row_set: str, role: str | None = None) -> tuple[str, ...]:
    """Names of the arrays present that are indexed by `row_set` (optionally of one role)."""
    return tuple(a.name for a in self.arrays
                 if layout_of(a.name).row_set == row_set and (role is None or a.role == role))

  def build_key(self) -> dict:
    """The settings that define a build: a store made with other values is a different cache."""
    return {
        "dataset_fingerprint": self.dataset.fingerprint,
        "eval_fingerprint": None if self.eval_dataset is None else self.eval_dataset.fingerprint,
        "member_digests": [m.digest for m in self.members],
        "temperature": float(self.temperature),
        "combine": self.combine,
        "views": self.views,
        "augmentation": self.augmentation.to_dict(),
        "dtype": self.dtype,
        "chunk_rows": self.chunk_rows,
        "folds": self.folds,
        "row_order": self.row_order,
        "arrays": [a.name for a in self.arrays],
        "schema_version": self.schema_version,
        # Only where they differ from what every cache before sparse targets was: their run dirs recorded this key.
        **({"targets": self.targets, "member_logits": self.member_logits} if self.targets != "dense" else {}),
        **({"specialists": [[s.run.digest, list(s.classes), s.dustbin_correction] for s in self.specialists],
            "top_n": self.top_n} if self.specialists else {}),
        **({"features": [f.to_dict() for f in self.features]} if self.features else {}),
    }

  def mismatches(self, other: "CacheSpec") -> list[str]:
    """Human-readable differences of the build keys, e.g. ["temperature: 4.0 (store) vs 2.0 (command)"]."""
    mine, theirs = self.build_key(), other.build_key()
    return [f"{key}: {mine.get(key)} (store) vs {theirs.get(key)} (command)" for key in {**mine, **theirs}
            if mine.get(key) != theirs.get(key)]

  def to_attrs(self) -> dict:
    # A dense cache's spec omits the sparse-target fields, so that a stillroom that predates them reads it.
    dense_defaults = ("targets", "member_logits") if self.target_kind == "dense" else ()
    dense_defaults += () if self.specialists else ("specialists", "top_n")  # Likewise for a cache without them.
    dense_defaults += () if self.features else ("features",)
    return {
        **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in dense_defaults},
        "members": [m.to_dict() for m in self.members],
        **({"specialists": [s.to_dict() for s in self.specialists]} if self.specialists else {}),
        **({"features": [f.to_dict() for f in self.features]} if self.features else {}),
        "dataset": self.dataset.to_dict(),
        "eval_dataset": None if self.eval_dataset is None else self.eval_dataset.to_dict(),
        "augmentation": self.augmentation.to_dict(),
        "arrays": [a.to_dict() for a in self.arrays],
    }

  @classmethod
  def from_attrs(cls, attrs: dict) -> "CacheSpec":
    """Reads a spec written by `to_attrs` (schema 2) or by stillroom 0.1 (schema 1).

    Raises:
      StillroomError: unsupported version, or a key missing or of the wrong type (named).
    """
    version = attrs.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
      raise StillroomError(f"cache schema version {version} is not supported by this stillroom (reads versions "
                           f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}).")
    d = dict(attrs)
    if version == 1:
      d = _upgrade_v1(d)
    try:
      d["augmentation"] = Augmentation.from_dict(d["augmentation"])
      d["members"] = tuple(MemberSpec(**m) for m in d["members"])
      d["specialists"] = tuple(SpecialistSpec.from_dict(x) for x in d.get("specialists", ()))
      d["features"] = tuple(FeatureSpec.from_dict(x) for x in d.get("features", ()))
      d["dataset"] = DatasetSpec.from_dict(d["dataset"])
      d["eval_dataset"] = None if d.get("eval_dataset") is None else DatasetSpec.from_dict(d["eval_dataset"])
      d["arrays"] = tuple(ArraySpec.from_dict(a) for a in d.get("arrays", ()))
      return cls(**d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise StillroomError(f"the cache spec is damaged or hand-edited: {type(e).__name__}: {e}") from e


def _upgrade_v1(d: dict) -> dict:
  """A schema-1 spec in schema-2 terms: same arrays (listed from its settings), examples in split order."""
  d["members"] = [{**{k: v for k, v in m.items() if k != "checkpoint_step"},
                   # Version 1 recorded orbax's step, which the trainer numbered from 0 at the end of epoch 1.
                   "trained_epochs": None if m.get("checkpoint_step") is None else m["checkpoint_step"] + 1}
                  for m in d["members"]]
  d["row_order"] = "sequential"
  return d


def now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True, eq=False)
class Cache:
  """An opened cache: its group, spec and completion record (None while incomplete). Array handles are opened once.

  Index it by array name (`cache["targets"]`), and call `require` first for the arrays a reader needs.
  """

  path: str
  group: zarr.Group
  spec: CacheSpec
  completion: dict | None
  _arrays: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def complete(self) -> bool:
    return self.completion is not None

  def __getitem__(self, name: str) -> zarr.Array:
    return self.arrays((name,))[name]

  def arrays(self, names) -> dict[str, zarr.Array]:
    """Handles of the arrays `names`, the ones not opened yet opened together (one round trip to a remote store).

    Raises:
      KeyError: the store has no such array; zarr's errors for unreadable metadata.
    """
    opened = self.try_arrays(names)
    raise_first_failure(opened.values())
    return opened

  def try_arrays(self, names) -> dict:
    """`arrays`, an exception in place of each array that cannot be opened (KeyError: there is none)."""
    missing = [name for name in dict.fromkeys(names) if name not in self._arrays]
    failed = {}
    for name, array in zip(missing, _open_arrays(self.group, missing)):
      if isinstance(array, BaseException):
        failed[name] = array
      else:
        self._arrays[name] = zarr.Array(array)
    return {name: self._arrays.get(name, failed.get(name)) for name in names}

  def require(self, names, purpose: str) -> None:
    """Raises unless the store holds every array in `names`, naming the missing ones and what needs them."""
    missing = [name for name in names if self.spec.array(name) is None]
    if missing:
      raise StillroomError(f"cache {self.path!r} has no {', '.join(repr(m) for m in missing)} array"
                           f"{'s' if len(missing) > 1 else ''}, which {purpose} needs.")

  def chunk_bounds(self, chunk: int, row_set: str = ROWS) -> tuple[int, int]:
    return self.spec.chunk_bounds(chunk, row_set)

  def read_chunk(self, chunk: int, names, row_set: str = ROWS) -> dict[str, np.ndarray]:
    """Whole-chunk reads of several arrays (the fast way to read a Zarr store).

    Raises:
      StillroomError: a chunk fails its checksum or cannot be decoded, naming the array and the chunk.
    """
    start, stop = self.chunk_bounds(chunk, row_set)
    names = tuple(names)
    handles = self.arrays(names)
    # Every array's chunk requested at once: on an object store, one round trip's latency instead of one each.
    read = gather([handles[name].async_array.getitem((slice(start, stop),)) for name in names])
    for name, values in zip(names, read):
      if isinstance(values, Exception):  # zarr: ValueError for bad checksums, others for truncated or garbled chunks.
        raise StillroomError(f"cache {self.path!r}: chunk {chunk} of array {name!r} is damaged "
                             f"({type(values).__name__}: {str(values)[:120]}); `teacher-cache verify` lists all "
                             "damage, and the build command with --overwrite rebuilds the store.") from values
      if isinstance(values, BaseException):
        raise values
    return dict(zip(names, read))


def async_group(group: zarr.Group) -> zarr.AsyncGroup:
  """The group's asynchronous handle, to issue several requests at once (`gather`). (Zarr 3.1 gives arrays a
  public `async_array`, groups none: this is the one place that reads the private attribute.)"""
  return group._async_group  # pylint: disable=protected-access


def gather(coroutines: list) -> list:
  """Runs zarr coroutines together on zarr's event loop; returns their results in order, an exception in place of
  a result that failed. On an object store, requests issued together wait one round trip, not one each."""
  async def together():
    return await asyncio.gather(*coroutines, return_exceptions=True)
  return zarr_sync(together()) if coroutines else []


def raise_first_failure(results) -> None:
  """Raises the first exception among `gather`'s results (once every request has finished), if any."""
  failed = next((result for result in results if isinstance(result, BaseException)), None)
  if failed is not None:
    raise failed


def _open_arrays(group: zarr.Group, names: list[str]) -> list:
  """The group's arrays `names` opened together (`gather`'s results: KeyError for one that is not there)."""
  with warnings.catch_warnings():  # zarr warns about a directory whose metadata is gone; callers report it.
    warnings.simplefilter("ignore")
    return gather([async_group(group).getitem(name) for name in names])


def open_cache(path: str, mode: str = "r", require_complete: bool = True) -> Cache:
  """Opens a cache and validates its spec.

  Args:
    path: the store's directory, or its URL (`shared.storage`).
    mode: zarr open mode ("r" to read, "r+" to resume writing).
    require_complete: raise unless the completion record is present.

  Raises:
    StillroomError: no such store, not a stillroom cache, unsupported schema version, damaged spec, or incomplete.
  """
  if not storage.exists(path):
    raise StillroomError(f"no cache at {path!r}.")
  try:
    group = zarr.open_group(storage.zarr_store(path, read_only=mode == "r"), mode=mode)
  except Exception as e:  # zarr raises several types for "not a group".
    raise StillroomError(f"{path!r} is not a Zarr v3 group: {e}") from e
  attrs = group.attrs.asdict()
  if SPEC_KEY not in attrs:
    raise StillroomError(f"{path!r} is a Zarr group but not a stillroom cache (no '{SPEC_KEY}' attributes).")
  try:
    spec = CacheSpec.from_attrs(attrs[SPEC_KEY])
  except StillroomError as e:
    raise StillroomError(f"cache {path!r}: {e}") from e
  if not spec.has_checksums and mode == "r":
    _log(f"cache {path!r} has schema version {spec.schema_version}: its chunks carry no checksums and all-zero "
         "chunks may be absent, so damage cannot be detected. Rebuild it with this stillroom to get both.")
  cache = Cache(path=path, group=group, spec=spec, completion=attrs.get(COMPLETE_KEY))
  if require_complete:
    if not cache.complete:
      raise StillroomError(
          f"cache {path!r} is not complete (its build was interrupted or failed); run the same "
          f"`teacher-cache {'import' if spec.members[0].model == 'imported' else 'build'}` command again to finish "
          "it.")
    check_integrity(cache)
  return cache


def integrity_problems(cache: Cache) -> list[str]:
  """What makes a store that claims to be complete unusable: its arrays differ from its spec, a chunk is not
  committed, the completion record disagrees with the spec, or (schema 2, which writes every chunk) a chunk is
  missing. Reads metadata and the store's listing, never the chunks themselves (their checksums are checked as
  they are read)."""
  problems = layout_problems(cache.group, cache.spec, opened=cache.try_arrays([a.name for a in cache.spec.arrays]))
  if problems:
    return problems
  spec = cache.spec
  for row_set in (ROWS, EVAL_ROWS):
    if spec.chunks_of(row_set) and spec.array(committed_name(row_set)) is not None:
      try:
        uncommitted = uncommitted_chunks(cache, row_set)
      except StillroomError as e:
        problems.append(str(e))
        continue
      if len(uncommitted):
        problems.append(f"{len(uncommitted)} chunk(s) of {committed_name(row_set)!r} are not committed "
                        f"(first: chunk {int(uncommitted[0])})")
  rows = cache.completion.get("rows") if isinstance(cache.completion, dict) else cache.completion
  if cache.complete and rows != spec.num_rows:
    problems.append(f"the completion record says {rows} rows, the spec {spec.num_rows}")
  if spec.has_checksums:
    for name, missing in missing_chunks(cache).items():
      problems.append(f"array {name!r} is missing chunk(s) {', '.join(map(str, missing[:3]))}"
                      + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
  return problems


def uncommitted_chunks(cache: Cache, row_set: str = ROWS) -> np.ndarray:
  """The chunk numbers of a row set that its bookkeeping array does not mark committed, ascending.

  Raises:
    StillroomError: the bookkeeping array itself is damaged.
  """
  name = committed_name(row_set)
  try:
    committed = cache[name][:]
  except Exception as e:  # A damaged chunk of the bookkeeping array: checksum or decode errors.
    raise StillroomError(f"array {name!r} is damaged ({type(e).__name__}: {str(e)[:120]})") from e
  return np.flatnonzero(~committed)


def check_integrity(cache: Cache) -> None:
  """Raises `StillroomError` naming what is wrong when `integrity_problems` finds anything."""
  problems = integrity_problems(cache)
  if problems:
    raise StillroomError(f"cache {cache.path!r} is damaged: {'; '.join(problems)}. `teacher-cache verify` lists "
                         "every problem; the build command with --overwrite rebuilds the store.")


def layout_problems(group: zarr.Group, spec: CacheSpec, *, missing_ok: bool = False,
                    opened: dict | None = None) -> list[str]:
  """Differences between a store's arrays and the arrays its spec lists (missing, shapes, dtypes, chunks).

  Args:
    group: the store's group.
    spec: its spec.
    missing_ok: do not report missing arrays (a build resuming after a kill creates them).
    opened: the arrays as `Cache.try_arrays` opened them (default: opened here).
  """
  problems = []
  if opened is None:
    names = [array.name for array in spec.arrays]
    opened = dict(zip(names, _open_arrays(group, names)))
  for array in spec.arrays:
    stored = opened[array.name]
    if isinstance(stored, KeyError):
      if not missing_ok:
        problems.append(f"array {array.name!r} is missing")
      continue
    if isinstance(stored, Exception):  # Garbled metadata: zarr raises JSON, value or type errors.
      problems.append(f"the metadata of array {array.name!r} is unreadable ({type(stored).__name__})")
      continue
    if isinstance(stored, BaseException):
      raise stored
    if stored.shape != array.shape or stored.dtype != np.dtype(array.dtype) or stored.chunks != array.chunks:
      problems.append(f"array {array.name!r} has shape {stored.shape}, dtype {stored.dtype}, chunks {stored.chunks}; "
                      f"expected {array.shape}, {array.dtype}, {array.chunks}")
  return problems


def create_arrays(group: zarr.Group, spec: CacheSpec) -> None:
  """Creates the arrays the spec lists that the store lacks (a build may have been killed while creating them).

  Every chunk carries a CRC-32C checksum. Arrays are uncompressed: float16 logits compress about 1.1× (see the
  README's storage figures), which does not pay for the slower writes.

  Raises:
    StillroomError: an existing array differs from the spec.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      present = set(group.array_keys())
  except Exception:  # pylint: disable=broad-except  # Garbled metadata: `layout_problems` names the array.
    present = None
  problems = layout_problems(group, spec, missing_ok=True) if present != set() else []  # A new store: nothing to check.
  if problems:
    raise StillroomError(f"the store {group.store} does not match its spec: {'; '.join(problems)}. Use --overwrite.")
  raise_first_failure(gather([async_group(group).create_array(  # Together: one round trip to an object store.
      array.name, shape=array.shape, dtype=array.dtype, chunks=array.chunks, fill_value=0,
      compressors=[Crc32cCodec()] if spec.has_checksums else None) for array in spec.arrays
      if array.name not in (present or set())]))


def writable(array: zarr.Array) -> zarr.Array:
  """The array's handle that writes every chunk, all-zero ones included (zarr skips those by default, and a missing
  chunk then reads back as zeros, indistinguishable from data)."""
  return array.with_config({"write_empty_chunks": True})


def committed_name(row_set: str) -> str:
  """The bookkeeping array of a row set (`ROWS` or `EVAL_ROWS`)."""
  return next(a.name for a in LAYOUT if a.role == "bookkeeping" and a.row_set == row_set)


def missing_chunks(cache: Cache, names=None) -> dict[str, list[int]]:
  """Chunks that are not in the store (schema 2 writes every chunk, so any missing one is damage), from one listing
  of the whole store rather than one per array.

  Args:
    cache: the opened store.
    names: the arrays to check (default: every array the spec lists).

  Returns:
    `{name: missing chunk numbers along the rows, ascending}` for the arrays with any missing.
  """
  async def listing():
    return {key async for key in cache.group.store.list_prefix("")}

  stored = zarr_sync(listing())
  missing = {}
  names = list(names if names is not None else [a.name for a in cache.spec.arrays])
  for name, array in cache.arrays(names).items():
    trailing = (0,) * (array.ndim - 1)
    count = math.ceil(array.shape[0] / array.chunks[0]) if array.shape[0] else 0
    absent = [k for k in range(count)
              if f"{array.path}/{array.metadata.encode_chunk_key((k, *trailing))}" not in stored]
    if absent:
      missing[name] = absent
  return missing
