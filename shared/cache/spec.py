"""The cache spec: everything a cache records about how it was made (`CacheSpec` and its parts), as the group
attributes hold it (`to_attrs` / `from_attrs`), and the schema versions that read it.

Schema history: version 1 (stillroom 0.1) had no checksums, could omit all-zero chunks, stored examples in split
order, and listed no arrays; it is still read, with a warning. Version 3 is version 2 with sparse targets
(`--targets topk:K|sample:K`); dense caches stayed version 2, so that an older stillroom read them. Version 4 holds
a generalist with specialists; version 5 holds teacher features (`--features`), with any targets. Version 6 is any of
2 to 5 whose completion record binds every chunk to its position and the spec to the store
(`shared.cache.record`): every store this stillroom writes. A reader must check those bindings, so a stillroom that
does not know them refuses the store by its version rather than trusting it unchecked; and a store of version 6 whose
record lacks them is damaged, not one completed before they existed. A build whose teachers computed in bfloat16
(`--compute-dtype`) records it, and the bound its targets keep against a float32 build's, in two attributes that a
float32 build omits: a spec without them is float32's, as every store written before them was (the layout is the
same, so the version is too). Version 7 is version 6 with mixed views (`--mix`, recorded in the augmentation): its
rows hold a partner view and λ (`mix_*` arrays) that a student must render, so a stillroom that does not know them
refuses the store by its version instead of training on the unmixed views; a store without mixed views stays
version 6. Version 8 is version 6 with token rows (`positions` L > 0: a language model's packed sequences, each
row's arrays holding a positions axis L after the row axis, its targets predicting each position's next token): a
stillroom that does not know them refuses the store by its version instead of reading [R, L, ...] arrays as rows of
classes; a class-level store omits `positions` from its attributes and build key, and stays version 6 or 7.
"""

import dataclasses
import datetime
import math
import re
import types
import typing

import numpy as np

from shared.augment import NO_MIX, Augmentation
from shared.cache.layout import (CLASS_IDS, EVAL_ROWS, FEATURE_KINDS, FEATURE_NAME, FEATURE_RANKS, LAYOUT, POSITIONS,
                                 ROWS, STORAGE, STORAGE_DTYPES, ArraySpec, class_ids_dtype, layout_of)
from shared.cache.rows import GROUPED, ROW_ORDERS, row_sources
from shared.data import DatasetSpec
from shared.ensemble import COMBINE_RULES
from shared.errors import StillroomError
from shared.json_checks import EXPECTED, described, is_kind
from shared.precision import COMPUTE_DTYPES, DEFAULT_COMPUTE_DTYPE
from shared.settings import positive_finite, seed_check, with_short_digests

# Before version 6 a store recorded the oldest version that held it (`legacy_schema_version`): a stillroom that
# predates what it holds refuses it by its version.
DENSE_SCHEMA_VERSION = 2  # Dense targets.
SPARSE_SCHEMA_VERSION = 3  # Sparse targets.
SPECIALIST_SCHEMA_VERSION = 4  # A generalist with specialists.
FEATURE_SCHEMA_VERSION = 5  # Teacher features.
BINDING_SCHEMA_VERSION = 6  # Any of the above, its completion record binding the chunks and the spec.
SCHEMA_VERSION = BINDING_SCHEMA_VERSION  # What this stillroom writes, but for mixed views...
MIX_SCHEMA_VERSION = 7  # ...version 6 with mixed views (`--mix`)...
TOKEN_SCHEMA_VERSION = 8  # ...or with token rows (`positions` > 0).
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)
SPEC_KEY = "stillroom"  # The group attribute that holds `CacheSpec.to_attrs()`...
COMPLETE_KEY = "stillroom_complete"  # ...and the completion record, written last: without it a store is incomplete.
REBUILD = "the build command with --overwrite rebuilds the store"  # What recovers a damaged spec.
TARGET_KINDS = ("dense", "topk", "sample")  # `--targets dense|topk:K|sample:K`.


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
    raise StillroomError(f"--chunk-rows must be >= 1, got {chunk_rows}.")
  if seed_check(seed) is not True:
    raise StillroomError(f"seed {seed_check(seed)}, got {seed}.")
  if folds < 1:
    raise StillroomError(f"folds must be >= 1, got {folds}.")
  parse_targets(targets)


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


def legacy_schema_version(targets: str, specialists: bool, features: bool) -> int:
  """The version a store of `--targets targets`, with specialists or features or not, recorded before version 6: the
  oldest that held it."""
  return (FEATURE_SCHEMA_VERSION if features else SPECIALIST_SCHEMA_VERSION if specialists else
          SPARSE_SCHEMA_VERSION if parse_targets(targets)[0] != "dense" else DENSE_SCHEMA_VERSION)


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
    row_order: which view of which example each row holds (`shared.cache.rows`): "grouped" (what a build writes:
      an example's views in adjacent rows), "permuted" (older caches, schema 2 on: view-major, each view in its own
      seeded order) or "sequential" (schema 1).
    specialists: the specialists whose combination with the one member (the generalist) the targets are; schema 4 on.
    top_n: with specialists: those whose classes meet the generalist's top-n classes of a row take part in it.
    features: the members' features it stores (schema 5 on).
    compute_dtype: the dtype the teachers computed in (`--compute-dtype`; a `module:function` teacher computes as
      its code does, and is refused with bfloat16).
    target_tolerance: the bound the build claims for its targets against a float32 build's (same teachers, data,
      settings and storage dtype): the largest total-variation distance of a row's ensemble distribution at T,
      which dense targets store, top-k ones truncate and sampled ones draw from (`shared.precision`: δ / 4T from
      the bound δ on the teachers' logits); 0 for a float32 build; None (no bound) for specialists' q.
    arrays: the arrays present; derived from the settings when not given.
    created_at: ISO time of creation.
    schema_version: the layout version (`SCHEMA_VERSION` for every store this stillroom writes, `MIX_SCHEMA_VERSION`
      with mixed views); None: the one this stillroom writes for these settings.
    history: how the cache was grown from others (`teacher-cache extend`, `convert`, `subset`, `merge`): one small
      dict per step, oldest first (`with_history`: "command", "sources" (the spec digests of the caches it was made
      from), "at" (ISO time), and what the step changed); empty for a direct build, and absent from the attributes of a
      store that has none (every store written before it). Not part of `build_key`: a grown cache is the direct
      build of its final settings, whatever its history.
    positions: L, the positions of a token row (a language model's packed sequence of L tokens, `shared.data.text`):
      its arrays hold a positions axis after the rows, and its targets at position j are the teachers' prediction of
      token j + 1 (`labels[r, j]`); 0 for a class-level cache, whose attributes and build key omit it (so every
      store written before it reads and resumes the same). A token cache is schema `TOKEN_SCHEMA_VERSION`, of one
      view, without specialists, features, cross-fitting or mixed views.
    imported: `teacher-cache import --logprobs`'s record (`teacher_cache.logprobs`: the file layout, k, the
      generation temperature, the vocabulary trim, tokenizer map and re-tempering with their figures); None for any
      other cache, and then absent from its attributes (so every store written before it reads the same). Not part
      of `build_key`: the member's digest covers the import's arrays and settings.
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
  row_order: str = GROUPED
  specialists: tuple[SpecialistSpec, ...] = ()
  top_n: int = 0
  features: tuple[FeatureSpec, ...] = ()
  compute_dtype: str = DEFAULT_COMPUTE_DTYPE
  target_tolerance: float | None = 0.0
  arrays: tuple[ArraySpec, ...] = ()
  created_at: str = ""
  schema_version: int | None = None
  history: tuple[dict, ...] = ()
  positions: int = 0
  imported: dict | None = None

  def __post_init__(self):
    validate_settings(temperature=self.temperature, combine=self.combine, dtype=self.dtype, views=self.views,
                      chunk_rows=self.chunk_rows, seed=self.augmentation.seed, folds=self.folds, targets=self.targets)
    mixed = self.augmentation.mix_kind != NO_MIX
    if self.schema_version is None:
      object.__setattr__(self, "schema_version", TOKEN_SCHEMA_VERSION if self.positions else
                         MIX_SCHEMA_VERSION if mixed else SCHEMA_VERSION)
    if type(self.positions) is not int or self.positions < 0 or \
        (self.positions > 0) != (self.schema_version == TOKEN_SCHEMA_VERSION):  # pylint: disable=unidiomatic-typecheck
      raise StillroomError(f"schema version {self.schema_version} with {self.positions!r} positions: a cache of token "
                           f"rows (positions L >= 1) is schema {TOKEN_SCHEMA_VERSION}, and only such a cache is; "
                           f"{REBUILD}.")
    if self.positions and (self.views != 1 or mixed or self.specialists or self.features or self.folds != 1):
      raise StillroomError(f"a cache of token rows ({self.positions} positions) has one view, no mixed views, "
                           f"specialists, features or cross-fitted members; {REBUILD}.")
    if mixed != (self.schema_version == MIX_SCHEMA_VERSION) or mixed and self.views < 2:
      raise StillroomError(f"schema version {self.schema_version} with views mixed {self.augmentation.mix!r} and "
                           f"{self.views} views: a cache of mixed views (2 views or more) is schema "
                           f"{MIX_SCHEMA_VERSION}, and only such a cache is; {REBUILD}.")
    legacy = self.legacy_schema_version()
    if self.schema_version not in (SCHEMA_VERSION, MIX_SCHEMA_VERSION, TOKEN_SCHEMA_VERSION, legacy) and \
        (self.schema_version, legacy) != (1, DENSE_SCHEMA_VERSION):
      raise StillroomError(f"schema version {self.schema_version} with {self.targets} targets, "
                           f"{len(self.specialists)} specialists and {len(self.features)} features: such a cache is "
                           f"schema {SCHEMA_VERSION}, or {legacy} if written before its completion record bound its "
                           f"chunks (sparse targets {SPARSE_SCHEMA_VERSION}, specialists {SPECIALIST_SCHEMA_VERSION}, "
                           f"features {FEATURE_SCHEMA_VERSION}).")
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
    if self.compute_dtype not in COMPUTE_DTYPES or not (
        0.0 <= self.target_tolerance <= 1.0 if self.target_tolerance is not None else
        self.specialists and self.compute_dtype != DEFAULT_COMPUTE_DTYPE):
      raise StillroomError(f"compute dtype {self.compute_dtype!r} with target tolerance {self.target_tolerance!r}: a "
                           f"cache's teachers compute in one of {', '.join(COMPUTE_DTYPES)}, and the tolerance is a "
                           f"total-variation distance in [0, 1] (None: specialists not in float32); {REBUILD}.")
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
      def named(arrays):
        names = [f"{a.name} {tuple(a.shape)} {a.dtype}" for a in arrays]
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") or "none"
      raise StillroomError("its list of arrays does not match its settings (a hand-edited or damaged spec): "
                           f"{named([a for a in self.arrays if a not in derived])} listed, "
                           f"{named([a for a in derived if a not in self.arrays])} expected; {REBUILD}.")

  def legacy_schema_version(self) -> int:
    """The version a store of these settings recorded before version 6 (`legacy_schema_version`)."""
    return legacy_schema_version(self.targets, bool(self.specialists), bool(self.features))

  @property
  def binds(self) -> bool:
    """Whether its completion record must bind every chunk to its position and the spec to the store (version 6 on):
    a record without those fields is damaged, where a store of an earlier version is read without the checks."""
    return self.schema_version >= BINDING_SCHEMA_VERSION

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
      `indices`). In the grouped order row `k·V + v` holds view v of the k-th stored example; in the view-major
      ones row `v·N + k` holds view v of the k-th example in that view's stored order.
    """
    return row_sources(rows, self.num_examples, self.augmentation.seed, self.row_order, self.views)

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
             "chunks(R)": self.chunks_of(ROWS), "chunks(E)": self.chunks_of(EVAL_ROWS), POSITIONS: self.positions}
    dtypes = {STORAGE: self.dtype, CLASS_IDS: class_ids_dtype(self.num_classes, self.positions)}
    arrays = []
    for layout in LAYOUT:
      if layout.row_set == EVAL_ROWS and self.eval_dataset is None:
        continue
      if layout.views is not None and layout.views != self.augmentation.kind:
        continue
      if layout.mix is not None and self.augmentation.mix_kind not in layout.mix:
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
      shape = tuple(sizes[d] if d in sizes else int(d) for d in layout.dims_of(self.positions))
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
        **({"compute_dtype": self.compute_dtype} if self.compute_dtype != DEFAULT_COMPUTE_DTYPE else {}),
        **({"positions": self.positions} if self.positions else {}),  # Class-level caches recorded no such key.
    }

  def mismatches(self, other: "CacheSpec") -> list[str]:
    """Human-readable differences of the build keys, e.g. ["temperature: 4.0 (store) vs 2.0 (command)"]."""
    mine, theirs = self.build_key(), other.build_key()
    # A key that a build key leaves out where it has its default (`build_key`) is shown with that default.
    omitted = {"compute_dtype": DEFAULT_COMPUTE_DTYPE, "positions": 0}
    return [f"{key}: {with_short_digests(mine.get(key, omitted.get(key)))} (store) vs "
            f"{with_short_digests(theirs.get(key, omitted.get(key)))} (command)"
            for key in {**mine, **theirs} if mine.get(key) != theirs.get(key)]

  def to_attrs(self) -> dict:
    # A dense cache's spec omits the sparse-target fields, as versions 2 to 5 did so that a stillroom that predated
    # them read it (version 6 is refused by such a stillroom anyway, by its version).
    dense_defaults = ("targets", "member_logits") if self.target_kind == "dense" else ()
    dense_defaults += () if self.specialists else ("specialists", "top_n")  # Likewise for a cache without them.
    dense_defaults += () if self.features else ("features",)
    dense_defaults += () if self.history else ("history",)  # Likewise a cache that was not grown.
    dense_defaults += () if self.positions else ("positions",)  # Likewise a class-level cache.
    dense_defaults += () if self.imported else ("imported",)  # Likewise a cache not imported from log-probabilities.
    # Likewise a float32 build's compute dtype and tolerance: its spec is what a store written before them holds.
    dense_defaults += ("compute_dtype", "target_tolerance") if self.compute_dtype == DEFAULT_COMPUTE_DTYPE and \
        self.target_tolerance == 0.0 else ()
    return {
        **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in dense_defaults},
        "members": [m.to_dict() for m in self.members],
        **({"specialists": [s.to_dict() for s in self.specialists]} if self.specialists else {}),
        **({"features": [f.to_dict() for f in self.features]} if self.features else {}),
        "dataset": self.dataset.to_dict(),
        "eval_dataset": None if self.eval_dataset is None else self.eval_dataset.to_dict(),
        "augmentation": self.augmentation.to_dict(),
        "arrays": [a.to_dict() for a in self.arrays],
        **({"history": [dict(entry) for entry in self.history]} if self.history else {}),
    }

  def with_history(self, command: str, sources: list[str], at: str | None = None, **what) -> "CacheSpec":
    """This spec with one more `history` entry: `command` (e.g. "extend"), the spec digests of the caches it was
    made from (`shared.cache.record.spec_digest`), the time (`at`, default now) and what it changed (`what`: small
    JSON values, e.g. `added_members=[...]`, `views=[2, 4]`)."""
    entry = {"command": command, "sources": list(sources), "at": at or now_iso(), **what}
    return dataclasses.replace(self, history=(*self.history, entry))

  @classmethod
  def from_attrs(cls, attrs: dict) -> "CacheSpec":
    """Reads a spec written by `to_attrs` (schemas 2 to 6) or by stillroom 0.1 (schema 1).

    Raises:
      StillroomError: not a JSON object, unsupported version, an attribute that is not one of a spec's, or of the
        wrong JSON type (each named, nested ones by their path, e.g. `members[0].num_params`), or a key missing.
    """
    if not isinstance(attrs, dict):
      raise StillroomError(f"the cache spec is damaged or hand-edited: it is {described(attrs)}, not an object; "
                           f"{REBUILD}.")
    version = attrs.get("schema_version")
    if type(version) is not int or version not in READABLE_SCHEMA_VERSIONS:  # pylint: disable=unidiomatic-typecheck
      raise StillroomError(f"cache schema version {version!r} is not supported by this stillroom (reads versions "
                           f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}).")
    d = dict(attrs)
    if version == 1:
      d = _upgrade_v1(d)
    problem = _type_problem(d, cls, "")
    if problem:
      raise StillroomError(f"the cache spec is damaged or hand-edited: {problem}; {REBUILD}.")
    try:
      d["augmentation"] = Augmentation.from_dict(d["augmentation"])
      d["members"] = tuple(MemberSpec(**m) for m in d["members"])
      d["specialists"] = tuple(SpecialistSpec.from_dict(x) for x in d.get("specialists", ()))
      d["features"] = tuple(FeatureSpec.from_dict(x) for x in d.get("features", ()))
      d["dataset"] = DatasetSpec.from_dict(d["dataset"])
      d["eval_dataset"] = None if d.get("eval_dataset") is None else DatasetSpec.from_dict(d["eval_dataset"])
      d["arrays"] = tuple(ArraySpec.from_dict(a) for a in d.get("arrays", ()))
      d["history"] = tuple(dict(entry) for entry in d.get("history", ()))
      return cls(**d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise StillroomError(f"the cache spec is damaged or hand-edited: {type(e).__name__}: {e}; {REBUILD}.") from e


def _upgrade_v1(d: dict) -> dict:
  """A schema-1 spec in schema-2 terms: same arrays (listed from its settings), examples in split order. (Members
  that are not objects, or steps that are not integers, are left for `_type_problem` to name.)"""
  def upgraded(m):
    if not isinstance(m, dict) or not (m.get("checkpoint_step") is None or _type_problem(m["checkpoint_step"], int,
                                                                                         "") is None):
      return m
    # Version 1 recorded orbax's step, which the trainer numbered from 0 at the end of epoch 1.
    return {**{k: v for k, v in m.items() if k != "checkpoint_step"},
            "trained_epochs": None if m.get("checkpoint_step") is None else m["checkpoint_step"] + 1}
  if isinstance(d.get("members"), list):
    d["members"] = [upgraded(m) for m in d["members"]]
  d["row_order"] = "sequential"
  return d


def _type_problem(value, annotation, where: str) -> str | None:
  """What is wrong with the JSON type of `value`, read where `annotation` is expected (a spec dataclass, its field
  types, tuples as lists, nested specs as objects), naming its path in the spec; None when nothing is. Keys a
  dataclass does not have are named; missing ones are left to its constructor."""
  name = f"{where!r}" if where else "the spec"
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if value is None and len(options) < len(typing.get_args(annotation)):
      return None
    problems = [_type_problem(value, option, where) for option in options]
    return None if None in problems else problems[0]
  if typing.get_origin(annotation) is tuple:
    if not isinstance(value, (list, tuple)):  # A tuple: a spec given in memory (`from_attrs(spec.to_attrs())`).
      return f"{name} is {described(value)}; it must be {EXPECTED[list]}"
    args = typing.get_args(annotation)
    items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if len(items) != len(value):
      return f"{name} has {len(value)} entries; it must have {len(items)}"
    return next(filter(None, (_type_problem(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, items)))),
                None)
  if dataclasses.is_dataclass(annotation):
    if not isinstance(value, dict):
      return f"{name} is {described(value)}; it must be {EXPECTED[dict]}"
    hints = typing.get_type_hints(annotation)
    unknown = [key for key in value if key not in hints]
    if unknown:
      return f"{(where + '.' if where else '') + str(unknown[0])!r} is not an attribute of a cache spec"
    return next(filter(None, (_type_problem(v, hints[key], f"{where}.{key}" if where else key)
                              for key, v in value.items())), None)
  if annotation not in (bool, int, float, str, dict) or is_kind(value, annotation):
    return None
  return f"{name} is {described(value)}; it must be {EXPECTED[annotation]}"


def now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
