"""The cache format: the contract between `teacher_cache` (writer) and `student_train` (reader).

A cache is one Zarr v3 group. Each row is one `(example, view)` pair; rows are view-major
(`row = view * N + position`, position in the transfer set), so rows `[0, N)` are the un-augmented examples.
Every array is chunked along rows only, `chunk_rows` rows per chunk; a chunk is the unit of writing, resuming
and reading. The group attributes hold `CacheSpec.to_attrs()` under "stillroom" and, written last, a completion
record under "stillroom_complete". A store without the completion record is not complete, whatever it holds.
"""

import dataclasses
import datetime
import math
import os

import numpy as np
import zarr

from shared.augment import Augmentation
from shared.ensemble import COMBINE_RULES
from shared.errors import StillroomError

SCHEMA_VERSION = 1
SPEC_KEY = "stillroom"
COMPLETE_KEY = "stillroom_complete"
STORAGE_DTYPES = ("float16", "float32")
STORAGE = "storage"  # Placeholder dtype in LAYOUT: the spec's `dtype`.


@dataclasses.dataclass(frozen=True)
class ArrayLayout:
  """One array of the store: its shape (R rows, M members, C classes), dtype and meaning."""

  name: str
  shape: str
  dtype: str
  meaning: str


LAYOUT = (
    ArrayLayout("targets", "[R, C]", STORAGE,
                "ensemble log-probabilities at T under the spec's combine rule, from `member_logits` as stored"),
    ArrayLayout("member_logits", "[R, M, C]", STORAGE, "each member's raw logits (before dividing by T)"),
    ArrayLayout("index", "[R]", "int64", "example index: position in the unsliced split"),
    ArrayLayout("view", "[R]", "int32", "view id; 0 is the un-augmented input"),
    ArrayLayout("labels", "[R]", "int32", "hard label; -1 for an unlabeled transfer set"),
    ArrayLayout("shift", "[R, 2]", "int8", "the view's zero-filled shift (dy, dx) in pixels, applied after `flip`"),
    ArrayLayout("flip", "[R]", "bool", "the view is flipped horizontally (left-right) before the shift"),
    ArrayLayout("fold", "[R]", "int32",
                "cross-fitting fold of the row's example (its logits come from runs that did not train on that "
                "fold); -1 when unused"),
    ArrayLayout("chunk_committed", "[ceil(R / chunk_rows)]", "bool",
                "bookkeeping for resume: chunk k of every array above is written"),
)


def validate_settings(*, temperature: float, combine: str, dtype: str, views: int, chunk_rows: int) -> None:
  """Checks the scalar build settings (before any data or teacher is loaded).

  Raises:
    StillroomError: naming the bad setting and its valid values.
  """
  if not temperature > 0:
    raise StillroomError(f"temperature must be > 0, got {temperature}.")
  if combine not in COMBINE_RULES:
    raise StillroomError(f"unknown combine rule {combine!r}; valid: {', '.join(COMBINE_RULES)}.")
  if dtype not in STORAGE_DTYPES:
    raise StillroomError(f"unknown dtype {dtype!r}; valid: {', '.join(STORAGE_DTYPES)}.")
  if views < 1:
    raise StillroomError(f"views must be >= 1 (view 0 is the un-augmented input), got {views}.")
  if chunk_rows < 1:
    raise StillroomError(f"chunk_rows must be >= 1, got {chunk_rows}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemberSpec:
  """One ensemble member, identified by the digest of its parameters (paths may move)."""

  name: str
  source: str
  model: str
  num_params: int
  digest: str
  checkpoint_step: int | None
  normalization: dict

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheSpec:
  """Everything a cache records about how it was made. `build_key()` is what defines a build."""

  temperature: float
  combine: str
  members: tuple[MemberSpec, ...]
  dataset: dict  # TransferSet.describe(): name, split, canonical_split, count, fingerprint, shapes, labeled.
  num_classes: int
  views: int
  augmentation: Augmentation
  dtype: str
  chunk_rows: int
  software_version: str
  folds: int = 1  # > 1: cross-fitted; `members` holds folds runs per member, member-major.
  created_at: str = ""
  schema_version: int = SCHEMA_VERSION

  def __post_init__(self):
    validate_settings(temperature=self.temperature, combine=self.combine, dtype=self.dtype, views=self.views,
                      chunk_rows=self.chunk_rows)
    if not self.members:
      raise StillroomError("a cache needs at least one teacher.")
    if self.folds < 1 or len(self.members) % self.folds:
      raise StillroomError(f"{len(self.members)} teacher runs do not split into members of {self.folds} fold runs; "
                           "give each member's runs for folds 0..K-1 in order.")

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
    return int(self.dataset["count"])

  @property
  def num_rows(self) -> int:
    return self.num_examples * self.views

  @property
  def num_chunks(self) -> int:
    return math.ceil(self.num_rows / self.chunk_rows)

  def build_key(self) -> dict:
    """The settings that define a build: a store made with other values is a different cache."""
    return {
        "dataset_fingerprint": self.dataset["fingerprint"],
        "member_digests": [m.digest for m in self.members],
        "temperature": float(self.temperature),
        "combine": self.combine,
        "views": self.views,
        "augmentation": self.augmentation.to_dict(),
        "dtype": self.dtype,
        "chunk_rows": self.chunk_rows,
        "folds": self.folds,
        "schema_version": self.schema_version,
    }

  def mismatches(self, other: "CacheSpec") -> list[str]:
    """Human-readable differences of the build keys, e.g. ["temperature: 4.0 (store) vs 2.0 (command)"]."""
    mine, theirs = self.build_key(), other.build_key()
    return [f"{key}: {mine[key]} (store) vs {theirs[key]} (command)" for key in mine if mine[key] != theirs[key]]

  def array_shapes(self) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...]]]:
    """`{name: (shape, dtype, chunk_shape)}` for every array in `LAYOUT`."""
    rows, members, classes = self.num_rows, self.num_members, self.num_classes
    shapes = {
        "targets": (rows, classes), "member_logits": (rows, members, classes), "index": (rows,), "view": (rows,),
        "labels": (rows,), "shift": (rows, 2), "flip": (rows,), "fold": (rows,), "chunk_committed": (self.num_chunks,),
    }
    result = {}
    for layout in LAYOUT:
      shape = shapes[layout.name]
      dtype = self.dtype if layout.dtype == STORAGE else layout.dtype
      chunks = (1,) if layout.name == "chunk_committed" else (self.chunk_rows, *shape[1:])
      result[layout.name] = (shape, dtype, chunks)
    return result

  def to_attrs(self) -> dict:
    d = dataclasses.asdict(self)
    d["augmentation"] = self.augmentation.to_dict()
    d["members"] = [m.to_dict() for m in self.members]
    return d

  @classmethod
  def from_attrs(cls, attrs: dict) -> "CacheSpec":
    version = attrs.get("schema_version")
    if version != SCHEMA_VERSION:
      raise StillroomError(
          f"cache schema version {version} is not supported by this stillroom (reads version {SCHEMA_VERSION}).")
    d = dict(attrs)
    d["augmentation"] = Augmentation.from_dict(d["augmentation"])
    d["members"] = tuple(MemberSpec(**m) for m in d["members"])
    return cls(**d)


def now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True, eq=False)
class Cache:
  """An opened cache: its group, spec and completion record (None while incomplete)."""

  path: str
  group: zarr.Group
  spec: CacheSpec
  completion: dict | None

  @property
  def complete(self) -> bool:
    return self.completion is not None

  def __getitem__(self, name: str) -> zarr.Array:
    return self.group[name]

  def chunk_bounds(self, chunk: int) -> tuple[int, int]:
    start = chunk * self.spec.chunk_rows
    return start, min(start + self.spec.chunk_rows, self.spec.num_rows)


def open_cache(path: str, mode: str = "r", require_complete: bool = True) -> Cache:
  """Opens a cache and validates its spec.

  Args:
    path: the store's directory.
    mode: zarr open mode ("r" to read, "r+" to resume writing).
    require_complete: raise unless the completion record is present.

  Raises:
    StillroomError: no such store, not a stillroom cache, unsupported schema version, or incomplete.
  """
  if not os.path.exists(path):
    raise StillroomError(f"no cache at {path!r}.")
  try:
    group = zarr.open_group(path, mode=mode)
  except Exception as e:  # zarr raises several types for "not a group".
    raise StillroomError(f"{path!r} is not a Zarr v3 group: {e}") from e
  attrs = group.attrs.asdict()
  if SPEC_KEY not in attrs:
    raise StillroomError(f"{path!r} is a Zarr group but not a stillroom cache (no '{SPEC_KEY}' attributes).")
  spec = CacheSpec.from_attrs(attrs[SPEC_KEY])
  cache = Cache(path=path, group=group, spec=spec, completion=attrs.get(COMPLETE_KEY))
  if require_complete and not cache.complete:
    raise StillroomError(
        f"cache {path!r} is not complete (its build was interrupted or failed); run the same "
        "`teacher-cache build` command again to finish it.")
  return cache


def layout_problems(group: zarr.Group, spec: CacheSpec, *, missing_ok: bool = False) -> list[str]:
  """Differences between a store's arrays and the spec's layout (missing arrays, shapes, dtypes, chunks).

  Args:
    group: the store's group.
    spec: its spec.
    missing_ok: do not report missing arrays (a build resuming after a kill creates them).
  """
  problems = []
  for name, (shape, dtype, chunks) in spec.array_shapes().items():
    if name not in group:
      if not missing_ok:
        problems.append(f"array {name!r} is missing")
      continue
    array = group[name]
    if array.shape != shape or array.dtype != np.dtype(dtype) or array.chunks != chunks:
      problems.append(f"array {name!r} has shape {array.shape}, dtype {array.dtype}, chunks {array.chunks}; "
                      f"expected {shape}, {dtype}, {chunks}")
  return problems
