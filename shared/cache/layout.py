"""The catalogue of arrays a cache may hold (`LAYOUT`) and the arrays one store holds (`ArraySpec`).

Every array is chunked along rows only; its first dimension is one of two row sets: the transfer set's rows
(`ROWS`) or the eval split's (`EVAL_ROWS`). `shared.cache.spec.CacheSpec` lists a store's arrays from its settings.
"""

import dataclasses
import math

import numpy as np

STORAGE_DTYPES = ("float16", "float32")  # The dtypes a spec may store logits and targets in (`--dtype`).
STORAGE = "storage"  # Placeholder dtype in LAYOUT: the spec's `dtype`.
CLASS_IDS = "class ids"  # Placeholder dtype in LAYOUT: `class_ids_dtype`.


def class_ids_dtype(num_classes: int, positions: int = 0) -> str:
  """The dtype of stored class ids (`target_ids`): a class-level cache's int16 when C <= 32,768, else int32 (the rule
  older stores were written by); a token cache's (positions > 0) uint16 when its vocabulary V <= 65,536, else int32,
  so that a 32k-50k BPE vocabulary's ids take 2 bytes (`topk:64`: 64 · (2 + 2) + 4 = 260 bytes per token in
  float16). Ids are never negative (sampled padding is id 0), and every reader indexes with them as integers."""
  if positions:
    return "uint16" if num_classes <= np.iinfo(np.uint16).max + 1 else "int32"
  return "int16" if num_classes <= np.iinfo(np.int16).max + 1 else "int32"

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
POSITIONS = "L"  # The positions axis of a token-level cache's arrays, right after the rows; absent from class-level.


@dataclasses.dataclass(frozen=True)
class ArrayLayout:
  """One kind of array a store may hold: its role, its dimensions, dtype and meaning. `LAYOUT` is the catalogue; a
  spec lists the arrays a given store has.

  Attributes:
    name: the array's name in the group.
    role: what it is for (see `ROLES`).
    dims: symbolic shape: "R" rows, "E" eval rows, "L" positions of a token row (a language model's packed
      sequence; a class-level cache, `positions` 0, has no such axis: `dims_of`), "M" members, "C" classes, "K"
      sparse targets per row (per position),
      "S" specialists, "P" the largest specialist's outputs, "F" a feature's shape, "chunks(R)" / "chunks(E)" one
      entry per chunk of those rows, or a number.
    dtype: a NumPy dtype name, `STORAGE` for the spec's storage dtype, or `CLASS_IDS`.
    meaning: one line for docs/cache-format.md and `--help`.
    views: the kind of view (`shift` or `crop`, see `shared.augment`) whose stores hold it; None: every store.
    targets: the target kinds (`TARGET_KINDS`) whose stores hold it; None: every store.
    specialists: whether only stores of a generalist with specialists hold it.
    features: a template for the arrays of `--features` (one per feature, kind and member).
    mix: the kinds of mixed views (`--mix`: "mixup", "cutmix") whose stores hold it; None: every store.
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
  mix: tuple[str, ...] | None = None

  @property
  def shape(self) -> str:
    """The symbolic shape as documented, e.g. "[R, M, C]" or "[ceil(R / chunk_rows)]"."""
    names = [d.replace("chunks(", "ceil(").replace(")", " / chunk_rows)") if d.startswith("chunks(") else d
             for d in self.dims]
    return "[" + ", ".join(names) + "]"

  def dims_of(self, positions: int) -> tuple[str, ...]:
    """Its dimensions in a store of `positions` L per row: without "L" for a class-level cache (0)."""
    return self.dims if positions else tuple(d for d in self.dims if d != POSITIONS)

  @property
  def row_set(self) -> str:
    """The rows it is indexed by: `ROWS` (the transfer set's) or `EVAL_ROWS`."""
    return EVAL_ROWS if self.dims[0] in ("E", "chunks(E)") else ROWS


LAYOUT = (
    ArrayLayout("targets", "teacher", ("R", "L", "C"), STORAGE,
                "ensemble log-probabilities at T under the spec's combine rule, from the member logits as stored "
                "(with specialists: their combination q with the generalist)", targets=("dense",)),
    ArrayLayout("target_ids", "teacher", ("R", "L", "K"), CLASS_IDS,
                "topk:K: the K classes of largest ensemble probability at T, most probable first; sample:K: the "
                "distinct classes among K draws from it, in increasing order, then padding (id 0, count 0)",
                targets=("topk", "sample")),
    ArrayLayout("target_log_probs", "teacher", ("R", "L", "K"), STORAGE,
                "the ensemble log-probability at T of each of `target_ids`", targets=("topk", "sample")),
    ArrayLayout("target_rest", "teacher", ("R", "L"), "float32",
                "topk:K: log of the ensemble probability at T of every class not in `target_ids` (−inf for K = C)",
                targets=("topk",)),
    ArrayLayout("target_counts", "teacher", ("R", "L", "K"), "uint16",
                "sample:K: how many of the row's K draws gave each of `target_ids` (they sum to K)",
                targets=("sample",)),
    ArrayLayout("member_logits", "teacher", ("R", "L", "M", "C"), STORAGE,
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
    ArrayLayout("labels", "row", ("R", "L"), "int32",
                "hard label (token rows: the next token of each position, -1 where none); -1 for an unlabeled "
                "transfer set"),
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
    ArrayLayout("mix_partner", "view", ("R",), "int64",
                "mixed views: the example index of the row's partner view (uniform over the transfer set); -1 for "
                "view 0, never mixed", mix=("mixup", "cutmix")),
    ArrayLayout("mix_view", "view", ("R",), "int32",
                "mixed views: the partner's view id (the row's own view id: no draw depends on V), drawn and "
                "rendered as any row's; -1 for view 0", mix=("mixup", "cutmix")),
    ArrayLayout("mix_lambda", "view", ("R",), "float32",
                "mixed views: λ, the share of the row's own view (mixup: λ·view + (1 − λ)·partner in float32, λ ~ "
                "Beta(A, A); CutMix: the exact area share outside `mix_box`); 1 for view 0", mix=("mixup", "cutmix")),
    ArrayLayout("mix_box", "view", ("R", "4"), "int32",
                "CutMix: the box (top, left, height, width) in the rendered view's pixels where the partner's pixels "
                "replace the view's; zeros for view 0", mix=("cutmix",)),
    ArrayLayout("eval_member_logits", "eval", ("E", "L", "M", "C"), STORAGE,
                "each member's raw logits on the eval split's un-augmented examples (a cross-fitted member: the "
                "mean of its fold runs)"),
    ArrayLayout("eval_index", "eval", ("E",), "int64",
                "eval example index: position in the eval split's unsliced split"),
    ArrayLayout("eval_labels", "eval", ("E", "L"), "int32",
                "eval example label (token rows: per position, as `labels`); -1 if unlabeled"),
    ArrayLayout("chunk_committed", "bookkeeping", ("chunks(R)",), "bool", "chunk k of every row array is written"),
    ArrayLayout("eval_chunk_committed", "bookkeeping", ("chunks(E)",), "bool",
                "chunk k of every eval array is written"),
)
_LAYOUT = {layout.name: layout for layout in LAYOUT}
_FEATURE_LAYOUT = next(layout for layout in LAYOUT if layout.features)


def layout_of(name: str) -> ArrayLayout:
  """The catalogue entry of an array name (a feature array's is the `features` template)."""
  return _FEATURE_LAYOUT if name.startswith("feature.") else _LAYOUT[name]


def committed_name(row_set: str) -> str:
  """The bookkeeping array of a row set (`ROWS` or `EVAL_ROWS`)."""
  return next(a.name for a in LAYOUT if a.role == "bookkeeping" and a.row_set == row_set)


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

  @property
  def chunk_bytes(self) -> int:
    """The bytes of one chunk's values, as stored: every chunk, an edge chunk too, holds the whole chunk shape."""
    return math.prod(self.chunks) * np.dtype(self.dtype).itemsize

  def stored_bytes(self, block: int = 1) -> int:
    """The bytes its chunks take once every one is written: each the chunk shape's values and a 4-byte checksum,
    in whole `block`s (a file system's allocation unit)."""
    chunks = math.ceil(self.shape[0] / self.chunks[0]) if self.shape[0] else 0
    return chunks * -(-(self.chunk_bytes + 4) // block) * block

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "shape": list(self.shape), "chunks": list(self.chunks)}

  @classmethod
  def from_dict(cls, d: dict) -> "ArraySpec":
    return cls(**{**d, "shape": tuple(d["shape"]), "chunks": tuple(d["chunks"])})
