"""`teacher-cache import --logprobs FILE`: a token cache (`topk:K`) from an external language model's per-token
top-k log-probabilities on the packed rows of a `text:` transfer set.

Every file is read into ONE canonical form, `Segment`s: row positions `start .. start + n - 1` of cache row `row`,
the tokens the teacher scored there, and per position j the teacher's top-k (ids [n, k], log-probabilities [n, k])
of the token at row position j + 1 (`present` [n]: whether position j has a distribution). One pipeline then
aligns, maps, trims, re-tempers and stores them, whatever the layout was:

  .jsonl   one JSON object per line (layout detected from the first line), each naming its cache row `row` (the ids of
           `teacher-cache views`) and optionally `start` (the row position of its first token, default 0: a teacher
           may score each document piece as its own prompt, one line per piece):
           vLLM: `prompt_logprobs` (or a server response whose `choices[0]` holds it; `prompt_token_ids` beside it
             when present): entry 0 null, entry i a dict keyed by token id strings, `{"logprob", "rank", ...}`,
             the distribution of token i: its top k plus the prompt's own token i (k or k + 1 entries); -9999.0 is
             -inf.
           axolotl v1: `input_ids` [n] and `logprobs` [n or n - 1] of lists of {"token": "token_id:N", "logprob": x}.
           axolotl v2: `input_ids` [n], `logprobs` [n or n - 1][k] floats and `target_token_ids` [same][k] ints.
           (axolotl's list j is the distribution of input_ids[j + 1].)
  .npz / .parquet   `row` [R], `token_ids` [R, L], `topk_ids` [R, L, K], `topk_log_probs` [R, L, K]; position j
           holds the distribution of token j + 1; a position without one has `topk_ids` all -1.

Alignment: the scored tokens must be the packed row's (padding positions are not compared), and every position
that predicts a token (label >= 0, `shared.data.text.next_token_labels`) needs a distribution; the first
mismatch is refused naming the file, row, position and document, as "shifted by one position" when the file's tokens
are the row's moved by one, else "other tokens". vLLM: entry i must hold the row's token i. A distribution shifted
by one that token ids do not show is caught by rates: how often position j's top-k holds token j + 1 (aligned)
against token j (shifted).

Vocabularies: teacher ids at or past the vocabulary (the student's V, or the teacher tokenizer's with
`--teacher-tokenizer`) are a padded vocabulary's padding: trimmed, their mass bounded per position
(`--max-padding-mass`) and the rest renormalised. With `--teacher-tokenizer`, teacher ids map to student ids by
exact token strings; unmapped mass goes to the rest bucket, and a mean mapped share below `--min-mapped-share` is
refused.

Temperature: the file's log-probabilities are at the generation temperature Tg (`--generation-temperature`, vLLM's
raw log-probabilities: 1), which is the cache's temperature. `--retemper T` re-tempers to T: the top k exactly
(p^a, a = Tg / T), the rest R by `REST_RULE` between its bounds [r^a, n^(1-a) r^a] (n tail tokens of mass r: V
less the position's stored tokens, V - K at a full top-k; swapped for a > 1): the tail as if spread evenly over its
n tokens, n^(1-a) r^a, the closest of the rules tried to the true rest on the tests' Zipf-like and peaked
distributions; the bounds' summary recorded.
"""

import dataclasses
import hashlib
import io
import json
import math
import os
import zipfile

import numpy as np

from shared import limits, storage
from shared.cache import GROUPED, MemberSpec, parse_targets, row_sources
from shared.data import label_ids, local_path
from shared.data.text import load_tokenizer
from shared.errors import StillroomError, raise_if_interrupted
from shared.log import logger, progress
from shared.outputs import check_not_an_input
from shared.settings import check_value
from teacher_cache.build import (IGNORE_LIMITS, BuildConfig, check_limits, check_settings, check_token_settings,
                                 make_spec, open_views, positions_of, resolve_defaults, token_chunk_rows)
from teacher_cache.external import IMPORTED, check_views_dir, write_store
from teacher_cache.verify import listed

_LOG = logger(__name__)
VLLM, AXOLOTL_V1, AXOLOTL_V2, ARRAYS = "vllm", "axolotl-v1", "axolotl-v2", "arrays"
VLLM_NEG_INF = -9999.0  # vLLM's JSON spelling of -inf.
# A stored log-probability of "no mass" that every storage dtype holds finitely (verify refuses -inf in the k).
PLACEHOLDER = float(np.finfo(np.float16).min)
LOG_PROB_TOLERANCE = 1e-3  # A top-k's mass may exceed 1 (or a log-probability 0) by this much: float rounding.
# The re-tempered rest: the tail as if spread evenly over its n tokens, n^(1-a) r^a (the upper bound for a < 1, the
# lower for a > 1). Of the tail as one token, spread evenly and the bounds' geometric midpoint, it is the closest to
# the true re-tempered rest on Zipf-like and peaked distributions (tests/test_logprobs.py checks it).
REST_RULE = "even"
# Refused as "shifted" when position j's top-k holds token j more often than this factor times token j + 1 (and
# at least SHIFT_MARGIN more often): an aligned teacher's top-k holds the next token far more often than the current.
SHIFT_FACTOR, SHIFT_MARGIN = 2.0, 0.05
# How many [R, L, K] float64 arrays the pipeline holds at once: an assumed count (the placed ids and log-probabilities,
# probabilities, kept probabilities, their order, ids and the stored arrays), not a measurement.
WORKING_COPIES = 12
_PROGRESS_BYTES = 16 << 20  # Files of more bytes than this show a progress bar over the bytes read.
# The import settings of `BuildConfig` and whether `--logits` refuses them when given (they are --logprobs's).
LOGPROB_SETTINGS = ("generation_temperature", "retemper", "max_padding_mass", "teacher_tokenizer", "min_mapped_share")


@dataclasses.dataclass
class Segment:
  """Row positions `start .. start + n - 1` of cache row `row`, as one file line (or array row) gives them.

  Attributes:
    tokens: int64 [n] the tokens the teacher scored there (-1 where unknown).
    ids: int64 [n, k] top-k token ids of position j's distribution (of token start + j + 1), most probable first.
    log_probs: float64 [n, k] theirs (-inf: no mass).
    present: bool [n] whether position j has a distribution.
    holds: int64 [n, m] or None: vLLM without `prompt_token_ids`: every id entry j's dict names (-1 padding), one
      of which must be the row's token start + j + 1.
  """
  file: str
  where: str  # "line 3" or "row 7 of the arrays".
  row: int
  start: int
  tokens: np.ndarray
  ids: np.ndarray
  log_probs: np.ndarray
  present: np.ndarray
  holds: np.ndarray | None = None


# --- readers -----------------------------------------------------------------------------------------------------


def _error(path: str, where: str, what: str) -> StillroomError:
  return StillroomError(f"--logprobs {path!r} {where}: {what}")


def _topk_from_pairs(pairs: list[tuple[int, float]], k: int) -> tuple[np.ndarray, np.ndarray]:
  """[k] ids and log-probabilities, the most probable first, padded with (-1, -inf)."""
  pairs = sorted(pairs, key=lambda p: -p[1])[:k]
  ids = np.full(k, -1, np.int64)
  lps = np.full(k, -np.inf)
  for i, (token, lp) in enumerate(pairs):
    ids[i], lps[i] = token, lp
  return ids, lps


def _ids(values: list, field: str) -> np.ndarray:
  """int64 [n] of a JSON list of token ids; anything but integers in [0, 2^62) (a float, a string or a bool would be
  cast to some other token without a word) raises ValueError, which `_guarded` refuses naming the file and line."""
  for value in values:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2 ** 62:
      raise ValueError(f"`{field}` holds {value!r}, not a token id (an integer, 0 or more, below 2^62)")
  return np.asarray(values, np.int64)


def _log_prob(value, path: str, where: str) -> float:
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise _error(path, where, f"a log-probability {value!r} is not a number.")
  return -math.inf if value <= VLLM_NEG_INF else float(value)


def _vllm_entries(path: str, where: str, d: dict) -> tuple[list, np.ndarray | None]:
  """The entries (one dict or None per prompt token) and token ids of a vLLM line."""
  body = d
  if "prompt_logprobs" not in d and isinstance(d.get("choices"), list) and d["choices"]:
    body = d["choices"][0]
  entries = body.get("prompt_logprobs")
  tokens = body.get("prompt_token_ids", d.get("prompt_token_ids"))
  if not isinstance(entries, list) or not entries:
    raise _error(path, where, "`prompt_logprobs` is not a non-empty list.")
  if tokens is not None and (not isinstance(tokens, list) or len(tokens) != len(entries)):
    raise _error(path, where, f"`prompt_token_ids` must be a list of {len(entries)} ids, one per prompt_logprobs "
                              "entry.")
  return entries, None if tokens is None else _ids(tokens, "prompt_token_ids")


def _vllm_top_k(entry: dict) -> int:
  """How many of a vLLM entry's tokens are its top k: vLLM ranks the top k 1..k and adds the prompt's own token with
  its true rank (a count of the more probable tokens, plus 1) when outside them, so an entry of m tokens with a rank
  past m holds the top m - 1. Else the top m: its prompt's token inside, or of rank k + 1 (the (k + 1)-th), or tied
  with the k-th (then as probable as it); a rank repeated by ties inside the top k says nothing. Entries without
  integer ranks: m. A file's k is its entries' fewest."""
  ranks = [v.get("rank") if isinstance(v, dict) else None for v in entry.values()]
  if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
    return len(entry)
  return len(entry) - 1 if max(ranks) > len(entry) else len(entry)


def _parse_vllm(path: str, where: str, entries: list, tokens, row: int, start: int, k: int) -> Segment:
  n = len(entries)
  ids, lps = np.full((n, k), -1, np.int64), np.full((n, k), -np.inf)
  present = np.zeros(n, bool)
  width = max((len(e) for e in entries if isinstance(e, dict)), default=0)
  holds = np.full((n, width), -1, np.int64) if tokens is None else None
  for i, entry in enumerate(entries[1:], 1):
    if entry is None:
      continue
    if not isinstance(entry, dict) or not entry:
      raise _error(path, where, f"prompt_logprobs[{i}] is not a dict of token ids.")
    pairs = []
    for key, value in entry.items():
      try:
        token = int(key)
      except ValueError as e:
        raise _error(path, where, f"prompt_logprobs[{i}] has key {key!r}, not a token id.") from e
      if not 0 <= token < 2 ** 62:
        raise _error(path, where, f"prompt_logprobs[{i}] has key {key!r}, not a token id (0 or more, below 2^62).")
      lp = _log_prob(value.get("logprob") if isinstance(value, dict) else value, path, where)
      rank = value.get("rank") if isinstance(value, dict) else None
      pairs.append((rank if isinstance(rank, int) else math.inf, lp, token))
    keys = [p[2] for p in pairs]
    if tokens is not None and int(tokens[i]) not in keys:
      raise _error(path, where, f"prompt_logprobs[{i}] does not hold the prompt's token {int(tokens[i])} "
                                "(vLLM's entry i holds token i): not vLLM's layout?")
    if holds is not None:
      holds[i - 1, :len(keys)] = keys
    # The k most probable by rank (vLLM's, or by log-probability where none): the prompt's own token, when outside
    # the top k, has rank > k and is left out.
    pairs.sort(key=lambda p: (p[0], -p[1]))
    ids[i - 1], lps[i - 1] = _topk_from_pairs([(t, lp) for _, lp, t in pairs[:k]], k)
    present[i - 1] = True
  scored = np.full(n, -1, np.int64) if tokens is None else tokens
  return Segment(path, where, row, start, scored, ids, lps, present, holds)


def _axolotl(path: str, where: str, d: dict, row: int, start: int, version: str) -> Segment:
  tokens = d.get("input_ids")
  if not isinstance(tokens, list) or not tokens:
    raise _error(path, where, "`input_ids` (the scored tokens) is not a non-empty list.")
  n = len(tokens)
  lists = d.get("logprobs")
  if not isinstance(lists, list) or len(lists) not in (n, n - 1):
    raise _error(path, where, f"`logprobs` must be a list of {n - 1} or {n} positions (input_ids has {n}).")
  rows = []
  if version == AXOLOTL_V1:
    for j, items in enumerate(lists):
      pairs = []
      for item in items or ():
        token = item.get("token") if isinstance(item, dict) else None
        if not isinstance(token, str) or not token.startswith("token_id:"):
          raise _error(path, where, f"logprobs[{j}] holds {item!r}, not {{\"token\": \"token_id:N\", \"logprob\": x}}.")
        pairs.append((int(token[len("token_id:"):]), _log_prob(item.get("logprob"), path, where)))
      rows.append(pairs)
  else:
    targets = d.get("target_token_ids")
    if not isinstance(targets, list) or len(targets) != len(lists):
      raise _error(path, where, "`target_token_ids` must have one list per `logprobs` position.")
    for j, (lp, ids) in enumerate(zip(lists, targets)):
      if not isinstance(lp, list) or not isinstance(ids, list) or len(lp) != len(ids):
        raise _error(path, where, f"logprobs[{j}] and target_token_ids[{j}] must be lists of one length.")
      rows.append(list(zip(_ids(ids, f"target_token_ids[{j}]").tolist(),
                           (_log_prob(x, path, where) for x in lp))))
  k = max((len(p) for p in rows), default=0)
  ids, lps = np.full((n, k), -1, np.int64), np.full((n, k), -np.inf)
  present = np.zeros(n, bool)
  for j, pairs in enumerate(rows):
    if pairs:
      ids[j], lps[j] = _topk_from_pairs(pairs, k)
      present[j] = True
  return Segment(path, where, row, start, _ids(tokens, "input_ids"), ids, lps, present)


def _guarded(path: str, where: str, parse, *args):
  """`parse(*args)`, a malformed value (a token id that is not an integer, a list that is not one) refused in one
  line naming the file and line."""
  try:
    return parse(*args)
  except (TypeError, ValueError, AttributeError, OverflowError) as e:
    raise _error(path, where, f"is malformed ({type(e).__name__}: {str(e)[:200]}).") from e


def _line_header(path: str, where: str, d, num_rows: int) -> tuple[int, int]:
  if not isinstance(d, dict):
    raise _error(path, where, "is not a JSON object.")
  row, start = d.get("row"), d.get("start", 0)
  if not isinstance(row, int) or isinstance(row, bool):
    raise _error(path, where, "has no integer `row` (the cache row id of `teacher-cache views`).")
  if not isinstance(start, int) or isinstance(start, bool) or start < 0:
    raise _error(path, where, f"`start` {start!r} is not a row position >= 0.")
  if not 0 <= row < num_rows:
    raise _error(path, where, f"row {row} is not a row of this transfer set (0..{num_rows - 1}); log-probabilities "
                              "of views with other --dataset, --seq-len or --seed?")
  return row, start


def _layout(d: dict) -> str | None:
  if "prompt_logprobs" in d or (isinstance(d.get("choices"), list) and d["choices"]
                                and isinstance(d["choices"][0], dict) and "prompt_logprobs" in d["choices"][0]):
    return VLLM
  if "logprobs" in d and "target_token_ids" in d:
    return AXOLOTL_V2
  if "logprobs" in d and "input_ids" in d:
    return AXOLOTL_V1
  return None


def _lines(path: str, enabled: bool):
  """(line number, text) of a JSONL file, with a progress bar over the bytes read for big files."""
  size = storage.size(path)
  here = not storage.is_url(path)
  opened = open(storage.local(path), "rb") if here else io.BytesIO(storage.read_bytes(path))  # noqa: SIM115
  with opened as f, progress(total=size, unit="B", unit_scale=True, desc=f"reading {os.path.basename(path)}",
                             enabled=enabled and size > _PROGRESS_BYTES, summary=False) as bar:
    for number, line in enumerate(f, 1):
      bar.update(len(line))
      if line.strip():
        yield number, line


def read_jsonl(path: str, num_rows: int, enabled: bool = False) -> tuple[str, list[Segment]]:
  """The segments of a JSONL file of one of the layouts (`_layout`, detected from its first line).

  Returns:
    `(layout, segments)`.

  Raises:
    StillroomError: naming the file and line: not JSON, an unknown layout, a malformed field, a row out of range.
  """
  layout, parsed = None, []
  for number, line in _lines(path, enabled):
    raise_if_interrupted()
    where = f"line {number}"
    try:
      d = json.loads(line)
    except ValueError as e:
      raise _error(path, where, f"is not JSON ({e}).") from e
    row, start = _line_header(path, where, d, num_rows)
    found = _layout(d)
    if layout is None:
      if found is None:
        raise _error(path, where, "is none of the layouts: vLLM (`prompt_logprobs`), axolotl v1 (`input_ids`, "
                                  "`logprobs`) or v2 (also `target_token_ids`); see `teacher-cache import --help`.")
      layout = found
    elif found != layout:
      raise _error(path, where, f"is in the {found} layout, but the first line is {layout}.")
    parsed.append((where, d, row, start))
  if layout is None:
    raise StillroomError(f"--logprobs {path!r} holds no lines.")
  if layout == VLLM:
    raw = [(where, row, start, *_guarded(path, where, _vllm_entries, path, where, d))
           for where, d, row, start in parsed]
    # k or k + 1 entries (the prompt's own token beside the top k): k is the fewest top-k sizes, each read from ranks.
    sizes = [_vllm_top_k(e) for *_, entries, _ in raw for e in entries[1:] if isinstance(e, dict) and e]
    k = min(sizes, default=1)
    if k == 0:
      raise StillroomError(f"--logprobs {path!r}: every vLLM entry holds only the prompt's own token, no top-k "
                           "(requested with prompt_logprobs 0?); request prompt_logprobs k >= 1.")
    wider = sum(size > k for size in sizes)
    if wider:  # Not refused (a file's k is its fewest), but a truncation the user should see.
      _LOG.warning(f"--logprobs {path!r}: {wider:,} of its {len(sizes):,} entries hold a top-{max(sizes)}, others "
                   f"a top-{k}: every entry is cut to its top {k} (the file's fewest).")
    return layout, [_guarded(path, where, _parse_vllm, path, where, entries, tokens, row, start, k)
                    for where, row, start, entries, tokens in raw]
  segments = [_guarded(path, where, _axolotl, path, where, d, row, start, layout) for where, d, row, start in parsed]
  k = max(s.ids.shape[1] for s in segments)
  for s in segments:  # Lines of fewer entries padded with (-1, -inf).
    if s.ids.shape[1] < k:
      pad = k - s.ids.shape[1]
      s.ids = np.pad(s.ids, ((0, 0), (0, pad)), constant_values=-1)
      s.log_probs = np.pad(s.log_probs, ((0, 0), (0, pad)), constant_values=-np.inf)
  return layout, segments


def _read_parquet(path: str) -> dict:
  try:
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise StillroomError(f"--logprobs {path!r}: reading Parquet needs pyarrow (pip install pyarrow).") from e
  try:
    table = pq.read_table(io.BytesIO(storage.read_bytes(path)))
  except Exception as e:  # pylint: disable=broad-except  # pyarrow's errors have no common base worth naming.
    raise StillroomError(f"--logprobs {path!r} cannot be read as Parquet ({type(e).__name__}: {str(e)[:200]}).") from e
  missing = [c for c in ("row", "token_ids", "topk_ids", "topk_log_probs") if c not in table.column_names]
  if missing:
    raise StillroomError(f"--logprobs {path!r} lacks column(s) {', '.join(missing)}; it needs `row`, `token_ids`, "
                         "`topk_ids` and `topk_log_probs`.")
  import pyarrow.compute as pc  # pylint: disable=import-outside-toplevel
  out = {}
  for name, depth in (("row", 0), ("token_ids", 1), ("topk_ids", 2), ("topk_log_probs", 2)):
    column = table.column(name).combine_chunks()
    shape = [len(column)]
    try:
      for _ in range(depth):  # Nested lists flattened level by level, each level of one length.
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
          raise ValueError(f"lists of lengths {sorted(set(lengths.tolist()))[:4]} at depth {len(shape)}")
        shape.append(int(lengths[0]) if len(lengths) else 0)
        column = pc.list_flatten(column)
      values = column.to_numpy(zero_copy_only=False)
      out[name] = values.reshape(shape)  # Its own type: `read_arrays` refuses strings, fractions, nulls.
    except (ValueError, TypeError, NotImplementedError, pa.ArrowException) as e:
      raise StillroomError(f"--logprobs {path!r}: column `{name}` is ragged or not numbers ({e}).") from e
  return out


def _read_npz(path: str) -> dict:
  try:
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as files:
      return {name: files[name] for name in files.files}
  except (OSError, ValueError, TypeError, AttributeError, zipfile.BadZipFile, EOFError) as e:
    raise StillroomError(f"--logprobs {path!r} cannot be read as an .npz file ({type(e).__name__}: "
                         f"{str(e)[:200]}).") from e


def _check_dtype(path: str, name: str, values: np.ndarray) -> None:
  """Refuses an array that is not numbers, and ids (`row`, `token_ids`, `topk_ids`) that are not whole numbers:
  a cast would read "3" or 2.5 as some other row or token without a word."""
  if name == "topk_log_probs":
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
      raise StillroomError(f"--logprobs {path!r}: `{name}` holds {values.dtype} values, not numbers.")
    return
  if np.issubdtype(values.dtype, np.integer) and not values.dtype == np.bool_:
    if values.dtype == np.uint64 and values.size and values.max() > np.iinfo(np.int64).max:
      raise StillroomError(f"--logprobs {path!r}: `{name}` holds ids past int64 ({int(values.max())}).")
    return
  if np.issubdtype(values.dtype, np.floating):
    bad = ~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) > 2.0 ** 53)
    if not bad.any():
      return
    raise StillroomError(f"--logprobs {path!r}: `{name}` holds {values[bad].ravel()[0].item()!r}, not a whole "
                         "number (ids are integers).")
  raise StillroomError(f"--logprobs {path!r}: `{name}` holds {values.dtype} values, not integer ids.")


def read_arrays(path: str, num_rows: int) -> list[Segment]:
  """The segments (one per row) of an `.npz` or `.parquet` file of `row`, `token_ids`, `topk_ids`, `topk_log_probs`.

  Raises:
    StillroomError: unreadable, arrays missing or of shapes that do not fit, rows out of range.
  """
  arrays = _read_parquet(path) if path.endswith(".parquet") else _read_npz(path)
  names = ("row", "token_ids", "topk_ids", "topk_log_probs")
  if any(name not in arrays for name in names):
    raise StillroomError(f"--logprobs {path!r} holds {sorted(arrays)}; it needs {', '.join(names)}.")
  row, tokens, ids, lps = (np.asarray(arrays[n]) for n in names)
  for name, values in zip(names, (row, tokens, ids, lps)):
    _check_dtype(path, name, values)
  if row.ndim != 1 or tokens.ndim != 2 or ids.ndim != 3 or lps.shape != ids.shape or \
      tokens.shape != ids.shape[:2] or len(row) != len(tokens):
    raise StillroomError(f"--logprobs {path!r}: shapes row {row.shape}, token_ids {tokens.shape}, topk_ids "
                         f"{ids.shape}, topk_log_probs {lps.shape}; they must be [R], [R, L], [R, L, K], [R, L, K].")
  if not len(row):
    raise StillroomError(f"--logprobs {path!r} holds no rows (its arrays have length 0).")
  unknown = (row < 0) | (row >= num_rows)
  if unknown.any():
    raise StillroomError(f"--logprobs {path!r}: row ids {listed(row[unknown].tolist())} are not rows of this transfer "
                         f"set (0..{num_rows - 1}); log-probabilities of views with other --dataset, --seq-len or "
                         "--seed?")
  lps = np.where(lps <= VLLM_NEG_INF, -np.inf, lps.astype(np.float64))
  return [Segment(path, f"row {int(r)} of the arrays", int(r), 0, tokens[i].astype(np.int64),
                  ids[i].astype(np.int64), lps[i], (ids[i] >= 0).any(axis=1)) for i, r in enumerate(row)]


def read_file(path: str, num_rows: int, enabled: bool = False) -> tuple[str, list[Segment]]:
  """`(layout, segments)` of a `--logprobs` file, by its extension."""
  if not storage.exists(path):
    raise StillroomError(f"--logprobs {path!r} does not exist.")
  if storage.is_dir(path):
    raise StillroomError(f"--logprobs {path!r} is a directory; give its .jsonl, .npz or .parquet file(s), one "
                         "--logprobs each.")
  if path.endswith(".jsonl"):
    return read_jsonl(path, num_rows, enabled)
  if path.endswith((".npz", ".parquet")):
    return ARRAYS, read_arrays(path, num_rows)
  raise StillroomError(f"--logprobs {path!r}: give a .jsonl, .npz or .parquet file.")


# --- the pipeline --------------------------------------------------------------------------------------------------


def _document(transfer_set, position: int, j: int) -> str:
  """The human name of the document at row position j of the transfer set's example `position`."""
  return transfer_set.document_at(int(transfer_set.indices[position]), int(j))


def teacher_map(path: str, student) -> tuple[np.ndarray, dict]:
  """int64 [Vt] the student id of each teacher id by exact token string (-1: none), and the map's identity."""
  try:
    teacher = load_tokenizer(path, None)
  except StillroomError as e:  # Its message names --tokenizer (the student's option): name the option given.
    raise StillroomError(str(e).replace("--tokenizer", "--teacher-tokenizer", 1)) from e
  student_ids = {s: i for i, s in enumerate(student.token_strings()) if s is not None}
  mapping = np.asarray([student_ids.get(s, -1) if s is not None else -1 for s in teacher.token_strings()], np.int64)
  return mapping, {"tokenizer": os.path.basename(path), "identity": teacher.identity(), "teacher_vocab": len(mapping),
                   "mapped_ids": int((mapping >= 0).sum())}


@dataclasses.dataclass
class Placed:
  """Every row's distributions in row order: ids int64 [R, L, k] (-1 none), log_probs float64 [R, L, k], present
  [R, L] bool, and for each row the segment that gave it (for messages)."""
  ids: np.ndarray
  log_probs: np.ndarray
  present: np.ndarray
  covered: np.ndarray
  source: dict


def _shift_of(file_tokens: np.ndarray, row_tokens: np.ndarray, compared: np.ndarray) -> bool:
  """Whether `file_tokens` equal `row_tokens` moved by one position (either way) where both are compared."""
  for a, b, c in ((file_tokens[1:], row_tokens[:-1], compared[1:] & compared[:-1]),
                  (file_tokens[:-1], row_tokens[1:], compared[1:] & compared[:-1])):
    if c.sum() >= 2 and (a[c] == b[c]).all():
      return True
  return False


def align(segments: list[Segment], x: np.ndarray, labels: np.ndarray, positions_of_rows: np.ndarray, transfer_set,
          mapping: np.ndarray | None, k: int) -> Placed:
  """Checks each segment against the packed rows and places it; refuses the first mismatch.

  Args:
    x: int [R, 2, L] the rows as packed (tokens, segment ids) in cache row order.
    labels: int [R, L] next-token labels.
    positions_of_rows: int [R] each row's position in the transfer set (for document names).
    mapping: teacher id -> student id (or None: the same vocabulary).
    k: the top-k width (segments of other widths are refused).
  """
  num_rows, length = labels.shape
  ids = np.full((num_rows, length, k), -1, np.int64)
  log_probs = np.full((num_rows, length, k), -np.inf)
  present = np.zeros((num_rows, length), bool)
  covered = np.zeros((num_rows, length), bool)
  source = {}
  hint = " (scored with another tokenizer? pass --teacher-tokenizer TOKENIZER.json to map its ids)" \
      if mapping is None else ""
  for s in segments:
    n = len(s.tokens)
    where = f"--logprobs {s.file!r} {s.where} (row {s.row}"
    if s.ids.shape[1] != k:
      raise StillroomError(f"{where}): top-{s.ids.shape[1]} distributions, but the others are top-{k}.")
    stop = s.start + n
    if stop > length:
      raise StillroomError(f"{where}): positions {s.start}..{stop - 1} run past the row's {length} positions.")
    if covered[s.row, s.start:stop].any():
      first = s.start + int(np.argmax(covered[s.row, s.start:stop]))
      raise StillroomError(f"{where}): row {s.row} position {first} is given twice (here and in "
                           f"{source[s.row]}); give each row's positions once.")
    covered[s.row, s.start:stop] = True
    source.setdefault(s.row, f"{s.file!r} {s.where}")
    row_tokens = x[s.row, 0, s.start:stop].astype(np.int64)
    compared = x[s.row, 1, s.start:stop] > 0  # Padding is not compared.
    tokens = s.tokens if mapping is None else np.where(
        (s.tokens >= 0) & (s.tokens < len(mapping)), mapping[np.clip(s.tokens, 0, len(mapping) - 1)], -2)
    tokens = np.where(s.tokens == -1, -1, tokens)  # Unknown stays unknown.
    known = compared & (tokens != -1)
    wrong = known & (tokens != row_tokens)
    if wrong.any():
      j = int(np.argmax(wrong))
      shifted = _shift_of(tokens, row_tokens, known)
      what = "its tokens are the row's shifted by one position" if shifted else f"other tokens{hint}"
      document = _document(transfer_set, positions_of_rows[s.row], s.start + j)
      raise StillroomError(f"{where}, position {s.start + j}, {document}): "
                           f"the teacher scored token {int(s.tokens[j])}, the row holds {int(row_tokens[j])}: {what}.")
    if s.holds is not None:  # vLLM without its token ids: entry j + 1 (here j) must hold the row's token j + 1.
      held = s.holds if mapping is None else np.where(s.holds >= 0, mapping[np.clip(s.holds, 0, len(mapping) - 1)],
                                                      -2)
      nxt = np.append(row_tokens[1:], -1)
      check = s.present & np.append(compared[1:], False)
      missing = check & ~(held == nxt[:, None]).any(axis=1)
      if missing.any():
        j = int(np.argmax(missing))
        shifted = (held[check] == row_tokens[check][:, None]).any(axis=1).all()  # Entry j + 1 holds token j.
        what = "its tokens are the row's shifted by one position" if shifted else f"other tokens{hint}"
        raise StillroomError(f"{where}, position {s.start + j + 1}, "
                             f"{_document(transfer_set, positions_of_rows[s.row], s.start + j + 1)}): vLLM's "
                             f"prompt_logprobs[{j + 1}] does not hold the row's token {int(nxt[j])}: {what}.")
    ids[s.row, s.start:stop] = s.ids
    log_probs[s.row, s.start:stop] = s.log_probs
    present[s.row, s.start:stop] = s.present
  return Placed(ids, log_probs, present, covered, source)


def _check_rows(placed: Placed, labels: np.ndarray, files: list[str], positions_of_rows, transfer_set) -> None:
  """Refuses rows that no file gives, and predicting positions without a distribution."""
  given = placed.covered.any(axis=1)
  if not given.all():
    missing = np.flatnonzero(~given)
    raise StillroomError(f"--logprobs {', '.join(map(repr, files))} give(s) no log-probabilities for {len(missing)} of "
                         f"the {len(given)} rows, row ids {listed(missing.tolist())}; score every row of "
                         "`teacher-cache views`.")
  lacking = (labels >= 0) & ~placed.present
  if lacking.any():
    r, j = (int(v) for v in np.argwhere(lacking)[0])
    raise StillroomError(f"--logprobs {placed.source[r]} (row {r}, position {j}, "
                         f"{_document(transfer_set, positions_of_rows[r], j)}): {int(lacking.sum())} position(s) that "
                         "predict a token have no distribution (the first here); a teacher must score every position "
                         "of a document piece but its last.")


def _check_values(placed: Placed, positions_of_rows, transfer_set) -> None:
  """Refuses negative ids, log-probabilities above 0 or NaN, top-k masses above 1, repeated ids."""
  ids, lps, present = placed.ids, placed.log_probs, placed.present
  used = present[..., None] & (ids >= 0)

  def refuse(bad, what):
    r, j = (int(v) for v in np.argwhere(bad)[0])
    raise StillroomError(f"--logprobs {placed.source[r]} (row {r}, position {j}, "
                         f"{_document(transfer_set, positions_of_rows[r], j)}): {what}.")
  bad = (present[..., None] & (ids < -1)).any(-1)
  if bad.any():
    r, j = (int(v) for v in np.argwhere(bad)[0])
    refuse(bad, f"token id {int(ids[r, j][ids[r, j] < -1][0])} is negative (-1 marks an empty slot)")
  bad = (used & (np.isnan(lps) | (lps > LOG_PROB_TOLERANCE))).any(-1)
  if bad.any():
    r, j = (int(v) for v in np.argwhere(bad)[0])
    value = lps[r, j][used[r, j] & (np.isnan(lps[r, j]) | (lps[r, j] > LOG_PROB_TOLERANCE))][0]
    refuse(bad, f"a log-probability is {float(value)}: NaN or > 0 is no log-probability")
  with np.errstate(divide="ignore"):
    mass = np.where(used, np.exp(lps), 0.0).sum(-1)
  bad = mass > 1 + LOG_PROB_TOLERANCE
  if bad.any():
    r, j = (int(v) for v in np.argwhere(bad)[0])
    refuse(bad, f"the top-k probabilities sum to {mass[r, j]:.6g} > 1: not log-probabilities of one distribution "
                "(logits? log-probabilities at another temperature renormalised over the k?)")
  ordered = np.sort(np.where(used, ids, -1 - np.arange(ids.shape[-1])), axis=-1)
  bad = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
  if bad.any():
    refuse(bad, "a token id appears twice in one top-k")


def _check_shift_rates(placed: Placed, x: np.ndarray, labels: np.ndarray, files: list[str],
                       mapping: np.ndarray | None) -> dict:
  """How often position j's top-k holds token j + 1 (aligned) and token j (shifted), over predicting positions
  where the two differ, in student ids (`mapping`: teacher id -> student id); refuses a clearly higher shifted
  rate."""
  tokens = x[:, 0].astype(np.int64)
  considered = (labels >= 0) & (labels != tokens)
  if not considered.any():
    return {"aligned": None, "shifted": None}
  ids = placed.ids
  if mapping is not None:
    ids = np.where((ids >= 0) & (ids < len(mapping)), mapping[np.clip(ids, 0, len(mapping) - 1)], -1)
  hold_next = (ids == labels[..., None]).any(-1)[considered].mean()
  hold_this = (ids == tokens[..., None]).any(-1)[considered].mean()
  if hold_this > max(SHIFT_FACTOR * hold_next, hold_next + SHIFT_MARGIN):
    raise StillroomError(f"--logprobs {', '.join(map(repr, files))}: the distributions are shifted by one "
                         f"position: position j's top-k holds token j in {100 * hold_this:.1f}% of the predicting "
                         f"positions, the next token j + 1 in only {100 * hold_next:.1f}%; position j must hold the "
                         "distribution of token j + 1 (vLLM's prompt_logprobs[j + 1], axolotl's logprobs[j]).")
  return {"aligned": float(hold_next), "shifted": float(hold_this)}


def _spread_evenly(rest: np.ndarray, a: float, n) -> np.ndarray:
  """n^(1-a) r^a: the re-tempered mass of a tail of mass `rest` r spread evenly over n tokens (n >= 1, or [...])."""
  return np.power(np.maximum(n, 1).astype(np.float64), 1 - a) * np.power(rest, a)


def rest_bounds(rest: np.ndarray, a: float, n) -> tuple[np.ndarray, np.ndarray]:
  """The bounds of the re-tempered tail mass R = Σ_tail p_i^a of a tail of mass `rest` r over n tokens (int, or
  [...] per position): [r^a, n^(1-a) r^a] for a < 1, swapped for a > 1 (r^a: the tail as one token; n^(1-a) r^a:
  spread evenly)."""
  one, even = np.power(rest, a), _spread_evenly(rest, a, n)
  return np.minimum(one, even), np.maximum(one, even)


def retemper(log_probs: np.ndarray, log_rest: np.ndarray, a: float, n) -> tuple:
  """A top-k at Tg re-tempered to T (a = Tg / T): the k exactly, the rest by `REST_RULE` (spread evenly over its n
  tokens) between its bounds.

  Args:
    log_probs: float64 [..., K] at Tg (-inf in an empty slot).
    log_rest: float64 [...] the rest's log mass at Tg.
    a: Tg / T.
    n: the tail's token count, V less the position's stored tokens: int, or int [...] per position.

  Returns:
    `(log_probs [..., K], log_rest [...], rest share bounds low [...], high [...])` at T, renormalised.
  """
  top = np.exp(a * log_probs)
  rest = np.exp(log_rest)
  low, high = rest_bounds(rest, a, n)
  middle = _spread_evenly(rest, a, n)  # REST_RULE.
  top_sum = top.sum(-1)
  total = top_sum + middle
  with np.errstate(divide="ignore", invalid="ignore"):
    out = a * log_probs - np.log(total)[..., None]
    out_rest = np.log(middle) - np.log(total)
    share_low, share_high = low / (top_sum + low), high / (top_sum + high)
  return out, out_rest, share_low, share_high


def _temper_settings(config: BuildConfig) -> tuple[float, float | None]:
  """(Tg, T or None); refuses --temperature other than its default with --logprobs."""
  default = BuildConfig.__dataclass_fields__["temperature"].default
  if config.temperature != default:
    raise StillroomError(f"--temperature {config.temperature:g} with --logprobs: the file's log-probabilities are at "
                         "their generation temperature; give it with --generation-temperature Tg (the cache's "
                         "temperature), and --retemper T to re-temper them to T.")
  for name in LOGPROB_SETTINGS:  # Their declared checks (ranges, NaN): before any file is read.
    problem = check_value(BuildConfig, name, getattr(config, name))
    if problem:
      raise StillroomError(f"--{name.replace('_', '-')} {problem}, got {getattr(config, name)}.")
  if config.member_logits:
    raise StillroomError("--member-logits with --logprobs: a top-k file holds no logits to store; leave it out.")
  return float(config.generation_temperature), config.retemper


def refuse_logprob_settings(config: BuildConfig) -> None:
  """`import --logits` does not take the --logprobs settings: refused when one is given."""
  for name in LOGPROB_SETTINGS:
    if getattr(config, name) != BuildConfig.__dataclass_fields__[name].default:
      raise StillroomError(f"--{name.replace('_', '-')} is a setting of `import --logprobs`, not of --logits.")


def _targets_k(config: BuildConfig, k: int) -> int:
  """The stored K: the files' k by default (`--targets` left at dense), or `topk:K` with K <= k."""
  kind, count = parse_targets(config.targets)
  if kind == "dense":  # The default: the file's k.
    return k
  if kind != "topk" or count > k:
    raise StillroomError(f"--targets {config.targets} with --logprobs: give topk:K with K <= {k} (the files' k), or "
                         f"leave it out (topk:{k}).")
  return count


def _mapped(placed: Placed, p: np.ndarray, keep: np.ndarray, where: np.ndarray, mapping: np.ndarray,
            config: BuildConfig, positions_of_rows, transfer_set) -> tuple[np.ndarray, np.ndarray, dict]:
  """Teacher ids mapped to student ids; refuses a mean mapped share of the kept top-k mass below the threshold.

  Args:
    p: float64 [R, L, k] the top-k probabilities; keep: bool [R, L, k] the slots kept (no padding).
    where: bool [R, L] the positions whose share counts (with a distribution, predicting).
    mapping: int64 [Vt] teacher id -> student id (-1: none).

  Returns:
    `(student ids [R, L, k] (-1 where not kept), the kept and mapped slots [R, L, k], the share's record)`.
  """
  ids = placed.ids
  student = np.where(keep, mapping[np.clip(ids, 0, len(mapping) - 1)], -1)
  mapped = keep & (student >= 0)
  top = (p * keep).sum(-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    share = np.where(top > 0, (p * mapped).sum(-1) / top, 1.0)
  mean, low = (float(share[where].mean()), float(share[where].min())) if where.any() else (1.0, 1.0)
  if mean < config.min_mapped_share:
    r, j = (int(v) for v in np.argwhere(where & (share == low))[0])
    document = _document(transfer_set, positions_of_rows[r], j)
    raise StillroomError(f"--teacher-tokenizer {config.teacher_tokenizer!r}: only {100 * mean:.1f}% of the teacher's "
                         f"top-k mass maps to the student's tokens on average (least {100 * low:.1f}%: --logprobs "
                         f"{placed.source[r]} (row {r}, position {j}, {document})), below --min-mapped-share "
                         f"{config.min_mapped_share:g}: the unmapped mass would be one rest bucket; tokenizers this "
                         "different are not distilled token by token.")
  return student, mapped, {"mapped_share_mean": mean, "mapped_share_min": low, "threshold": config.min_mapped_share}


def distributions(placed: Placed, labels: np.ndarray, vocab: int, limit: int, mapping: np.ndarray | None,
                  config: BuildConfig, k_out: int, temperatures: tuple[float, float | None], positions_of_rows,
                  transfer_set) -> tuple[dict, dict]:
  """The stored top-k of every position: padding trimmed (bounded), ids mapped, truncated to `k_out`, re-tempered
  when asked; placeholders where no distribution is.

  Args:
    vocab: the student's V.
    limit: ids at or past it are a padded vocabulary's padding (the student's V, or the teacher tokenizer's).
    temperatures: (Tg, T or None: not re-tempered), as `_temper_settings` checked them.

  Returns:
    `({"ids" int32 [R, L, k_out], "log_probs" float64 [R, L, k_out], "rest" float64 [R, L]}, record)`.
  """
  ids, lps, present = placed.ids, placed.log_probs, placed.present
  used = present[..., None] & (ids >= 0)
  with np.errstate(divide="ignore"):
    p = np.where(used, np.exp(lps), 0.0)
  padding = used & (ids >= limit)
  pad_mass = (p * padding).sum(-1)
  predicting = labels >= 0
  record = {}
  over = present & (pad_mass > config.max_padding_mass)
  if over.any():
    r, j = (int(v) for v in np.argwhere(over)[0])
    raise StillroomError(f"--logprobs {placed.source[r]} (row {r}, position {j}, "
                         f"{_document(transfer_set, positions_of_rows[r], j)}): the teacher puts "
                         f"{pad_mass[r, j]:.3g} of its mass on ids >= {limit} (a vocabulary padded past the "
                         f"tokenizer's {limit}), more than "
                         f"--max-padding-mass {config.max_padding_mass:g}: another tokenizer's ids "
                         "(--teacher-tokenizer), or a model that is not trained on its padding?")
  if padding.any():
    record["padding"] = {"vocab_size": int(limit), "bound": config.max_padding_mass,
                         "mass_max": float(pad_mass[present].max()), "mass_mean": float(pad_mass[present].mean())}
  keep = used & ~padding
  student = ids
  if mapping is not None:
    student, keep, record["tokenizer_map"] = _mapped(placed, p, keep, present & predicting, mapping, config,
                                                     positions_of_rows, transfer_set)
  # Renormalised without the padding: the kept top-k and the rest, of the real vocabulary.
  scale = np.where(present, 1.0 - pad_mass, 1.0)
  kept_p = np.where(keep, p, 0.0) / np.maximum(scale, 1e-300)[..., None]
  order = np.argsort(-kept_p, axis=-1, kind="stable")
  kept_p = np.take_along_axis(kept_p, order, -1)[..., :k_out]
  kept_ids = np.take_along_axis(np.where(keep, student, -1), order, -1)[..., :k_out]
  valid = kept_p > 0
  top_sum = kept_p.sum(-1)
  over = np.maximum(top_sum, 1.0)  # Rounding past 1 (within LOG_PROB_TOLERANCE): scaled back.
  kept_p, top_sum = kept_p / over[..., None], top_sum / over
  rest = np.maximum(1.0 - top_sum, 0.0)
  with np.errstate(divide="ignore"):
    log_p, log_rest = np.log(kept_p), np.log(rest)
  tg, t = temperatures
  if t is not None and t != tg:
    a = tg / t
    # The tail: every token but the position's stored ones (fewer than k_out where padding or unmapped ids left slots
    # empty).
    log_p, log_rest, low, high = retemper(np.where(valid, log_p, -np.inf), log_rest, a, vocab - valid.sum(-1))
    where = present & predicting
    width = high - low
    record["retemper"] = {"from": tg, "to": t, "a": a, "rule": REST_RULE, "tail_tokens": vocab - k_out,
                          "rest_share_mean": float(np.exp(log_rest)[where].mean()) if where.any() else 0.0,
                          "bounds_width_mean": float(width[where].mean()) if where.any() else 0.0,
                          "bounds_width_max": float(width[where].max()) if where.any() else 0.0}
  # Slots without a token (a top-k short of k_out after trimming, or no distribution): distinct unused ids with no
  # mass (PLACEHOLDER), after the real ones; a position without a distribution holds all its mass in the rest.
  valid &= present[..., None]
  kept_ids = np.where(valid, kept_ids, -1)
  fill = _fill_ids(kept_ids, vocab)
  out_ids = np.where(valid, kept_ids, fill)
  out_lp = np.where(valid, log_p, PLACEHOLDER)
  out_rest = np.where(present, log_rest, 0.0)
  return {"ids": out_ids.astype(np.int32), "log_probs": out_lp, "rest": out_rest}, record


def _fill_ids(ids: np.ndarray, vocab: int) -> np.ndarray:
  """[..., K] ids for the empty slots (id < 0) of each position: the smallest ids not among its own, in order (a
  position without any: 0..K-1). Only positions with some ids and some empty slots are searched, in batches."""
  k = ids.shape[-1]
  flat = ids.reshape(-1, k)
  out = np.broadcast_to(np.arange(k), flat.shape).copy()
  empty = flat < 0
  partial = np.flatnonzero(empty.any(-1) & ~empty.all(-1))
  candidates = np.arange(min(2 * k, vocab))  # At most k - 1 used: k free among them (K <= V).
  for start in range(0, len(partial), 1 << 14):
    rows = partial[start:start + (1 << 14)]
    taken = (flat[rows, None, :] == candidates[:, None]).any(-1)  # [n, candidates]
    free = candidates[np.argsort(taken, axis=-1, kind="stable")[:, :k]]  # Free ones first, smallest first.
    slot = np.maximum(np.cumsum(empty[rows], axis=-1) - 1, 0)  # Each empty slot's rank among the empty ones.
    out[rows] = np.take_along_axis(free, slot, -1)
  return out.reshape(ids.shape)


# --- the command ---------------------------------------------------------------------------------------------------


def _member(placed: Placed, settings: dict, record: dict, rates: dict, files: list[str],
            transfer_set) -> tuple[MemberSpec, dict]:
  """The cache's one member (model `imported`, named after the first file, its digest the SHA-256 of the canonical
  arrays and the import settings) and the spec's `imported` record (settings, `distributions`' record, files, rates).
  """
  digest = hashlib.sha256()
  for array in (placed.ids, placed.log_probs, placed.present):
    digest.update(np.ascontiguousarray(array).tobytes())
  digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
  imported = {**{key: v for key, v in settings.items() if key not in ("teacher_tokenizer", "retemper_to")}, **record,
              "files": [os.path.basename(storage.local(f).rstrip("/")) for f in files], "shift_rates": rates}
  if "teacher_tokenizer" in settings:
    imported["tokenizer_map"] = {**settings["teacher_tokenizer"], **record["tokenizer_map"]}
  name = os.path.splitext(os.path.basename(storage.local(files[0]).rstrip("/")))[0]
  member = MemberSpec(name=name, source=files[0] if len(files) == 1 else ", ".join(files), model=IMPORTED,
                      num_params=0, digest=digest.hexdigest(), trained_epochs=None,
                      normalization=transfer_set.normalization.to_dict())
  return member, imported


def import_logprobs(config: BuildConfig, files: list[str], views_dir: str | None = None) -> str:
  """Builds a `topk:K` token cache from an external language model's top-k log-probabilities (see the module doc),
  or confirms one; returns its path.

  Args:
    config: the settings (those `BuildConfig` declares for `import`).
    files: `.jsonl`, `.npz` or `.parquet` files: shards of one teacher's rows (every cache row once over them).
    views_dir: the views the files are of (`teacher-cache views`), checked against these settings.

  Raises:
    StillroomError: bad settings or files; any misalignment (see the module doc); nothing is written then.
  """
  chunk_rows_given = config.chunk_rows is not None
  config = resolve_defaults(config)
  check_settings(config)
  tg, t = _temper_settings(config)
  if not files:
    raise StillroomError("give at least one --logprobs FILE (.jsonl, .npz or .parquet).")
  config = dataclasses.replace(config, folds=1, teachers=())
  check_not_an_input(config.out, [*files, local_path(config.dataset), config.data_dir, config.teacher_tokenizer],
                     "--out")
  transfer_set, augmentation = open_views(config)
  positions = positions_of(transfer_set.describe())
  if not positions:
    raise StillroomError(f"--logprobs: {transfer_set.name!r} holds no token rows (give a text: dataset); a class-level "
                         "teacher's logits are imported with --logits.")
  check_token_settings(config, positions)
  if views_dir is not None:
    check_views_dir(views_dir, config, transfer_set, augmentation)
  num_rows = len(transfer_set) * config.views
  vocab = int(transfer_set.num_classes)
  _, position = row_sources(np.arange(num_rows), len(transfer_set), config.seed, GROUPED, config.views)
  if not config.ignore_limits:  # The rows and labels, before any file is read.
    limits.check_memory(num_rows * positions * 16, f"holding {num_rows:,} token rows of {positions} positions",
                        "import fewer rows (a smaller text: set)", IGNORE_LIMITS)
  x, labels = transfer_set.read(position)
  x, labels = np.asarray(x), label_ids(labels)
  mapping, map_record = None, None
  if config.teacher_tokenizer is not None:
    mapping, map_record = teacher_map(config.teacher_tokenizer, transfer_set.describe().text_options().tokenizer())
  layouts, segments = set(), []
  for path in files:
    layout, found = read_file(path, num_rows, config.progress)
    layouts.add(layout)
    segments.extend(found)
  k = max(s.ids.shape[1] for s in segments)
  if not config.ignore_limits:  # Every distribution in row order, and the pipeline's copies of them (float64).
    limits.check_memory(num_rows * positions * k * 8 * WORKING_COPIES, f"the top-{k} distributions of {num_rows:,} "
                        f"rows of {positions} positions ({WORKING_COPIES} float64 copies)",
                        "import fewer rows (a smaller text: set)", IGNORE_LIMITS)
  k_out = _targets_k(config, k)
  if k_out > vocab:
    raise StillroomError(f"--logprobs: top-{k_out} of a vocabulary of {vocab}: give --targets topk:K with K <= "
                         f"{vocab}.")
  placed = align(segments, x, labels, position, transfer_set, mapping, k)
  del segments
  _check_rows(placed, labels, files, position, transfer_set)
  _check_values(placed, position, transfer_set)
  rates = _check_shift_rates(placed, x, labels, files, mapping)
  limit = len(mapping) if mapping is not None else vocab
  targets, record = distributions(placed, labels, vocab, limit, mapping, config, k_out, (tg, t), position,
                                  transfer_set)
  settings = {"format": sorted(layouts)[0] if len(layouts) == 1 else sorted(layouts), "k": k,
              "generation_temperature": tg, **({"teacher_tokenizer": map_record} if map_record else {}),
              "max_padding_mass": config.max_padding_mass, "min_mapped_share": config.min_mapped_share,
              "retemper_to": t}
  member, imported = _member(placed, settings, record, rates, files, transfer_set)
  cache_t = t if t is not None else tg
  spec_config = dataclasses.replace(config, temperature=cache_t, targets=f"topk:{k_out}", member_logits=False)
  spec = dataclasses.replace(make_spec(spec_config, transfer_set, None, augmentation, [member], vocab),
                             imported=imported)
  if not chunk_rows_given:  # Chunks sized by bytes, as a build of token rows sizes them.
    rows = token_chunk_rows(spec)
    spec_config = dataclasses.replace(spec_config, chunk_rows=rows)
    spec = dataclasses.replace(spec, chunk_rows=rows, arrays=())
  check_limits(spec_config, spec)
  dtypes = {a.name: np.dtype(a.dtype) for a in spec.arrays}

  def stored_of(start, stop, position, rows):  # pylint: disable=unused-argument  # `write_store`'s.
    rows["labels"] = labels[start:stop]
    stored = {name: targets[key][start:stop].astype(dtypes[name]) for name, key in
              (("target_ids", "ids"), ("target_log_probs", "log_probs"), ("target_rest", "rest"))}
    return None, stored, np.ones((stop - start, 1), bool), np.ones(stop - start, bool)

  if not write_store(spec_config, spec, transfer_set, stored_of):
    return config.out
  _LOG.info(f"imported the top-{k} log-probabilities of {num_rows} token rows ({' '.join(sorted(layouts))}) to "
            f"{config.out}: topk:{k_out} at T={cache_t:g}")
  for line in record_lines(imported):
    _LOG.info(line)
  return config.out


def record_lines(imported: dict) -> list[str]:
  """The import record as `info` and the import log show it, one line each."""
  lines = [f"imported: {imported.get('format')} top-{imported.get('k')} log-probabilities, generation temperature "
           f"{imported.get('generation_temperature'):g}"]
  if "padding" in imported:
    p = imported["padding"]
    lines.append(f"vocabulary trimmed to {p['vocab_size']:,} ids: padding mass max {p['mass_max']:.3g}, mean "
                 f"{p['mass_mean']:.3g} (bound {p['bound']:g})")
  if "tokenizer_map" in imported:
    m = imported["tokenizer_map"]
    lines.append(f"teacher tokenizer {m.get('tokenizer')}: mapped share of the top-k mass mean "
                 f"{m.get('mapped_share_mean', 1):.4f}, min {m.get('mapped_share_min', 1):.4f} (threshold "
                 f"{m.get('threshold', 0):g})")
  if "retemper" in imported:
    r = imported["retemper"]
    lines.append(f"re-tempered from T={r['from']:g} to T={r['to']:g} (a = {r['a']:.4g}): top k exact, rest by the "
                 f"rule {r['rule']!r} (spread evenly over the tokens outside each top-k, {r['tail_tokens']:,} at a "
                 f"full one); rest share mean {r['rest_share_mean']:.4g}, bounds' width mean "
                 f"{r['bounds_width_mean']:.3g}, worst {r['bounds_width_max']:.3g}")
  return lines
