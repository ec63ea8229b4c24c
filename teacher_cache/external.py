"""Teachers outside JAX: `teacher-cache views` writes the exact input of every row of a cache, and `teacher-cache
import` builds a cache from another framework's logits on those rows.

The rows are a cache's: the examples in the build's seeded order, the V views of each in adjacent rows (row
`k·V + v` holds view v of the k-th example: the grouped order of `shared.cache.row_sources`), rendered as the build
renders them and normalised as a teacher receives them (`x' = (x - shift) / scale`, the dataset's default
normalisation). A row id is therefore all that ties a logit to
its input, and it is only meaningful with the settings that made the views: `import` must get the same
`--dataset --split --views --seed` (and view options) as `views`.

  DIR/views.json         the dataset (with its fingerprint), views, augmentation, normalisation, row order, chunk
                         rows, rows
  DIR/views_00000.npz    `x` float32 [n, *input_shape] and `row` int64 [n]: the rows of chunk 0, and so on

With mixed views (`--mix`) the written inputs are the mixed images (each augmented view blended with its partner
view, as a build renders them), and `views.json`'s augmentation records the mix.

Token rows (`text:` data, `--seq-len L`) are written as the token ids a language model reads, one view per row
(`views.json` adds `"layout": "tokens"`, `seq_len` and `vocab_size`):

  DIR/views_00000.npz    `x` int32 [n, L] the token ids, `segment_ids` int32 [n, L] (1, 2, ... the document
                         pieces of the row in order; 0 padding) and `row` int64 [n]

A teacher must score each document piece on its own, never attending across a segment boundary: a row's position j
predicts token j + 1 only within its piece (`shared.data.text.next_token_labels`).

An imported cache is a normal cache (the same spec, arrays, targets and verification as `build`'s), whose members
are the logits files: model "imported", digest the SHA-256 of the logits in row order. It stores no eval split.
"""

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import zipfile

import jax
import numpy as np

from shared import limits, storage
from shared.augment import mix_params
from shared.cache import GROUPED, PERMUTED, ROWS, ChunkWriter, MemberSpec, example_runs, replay_rows, row_sources
from shared.data import label_ids, local_path
from shared.errors import StillroomError, raise_if_interrupted
from shared.log import logger, progress
from shared.outputs import STORE, OutputLock, check_not_an_input, check_output
from shared.parallel import cap_batch, pad_rows
from shared.settings import differences
from shared.workers import BatchRenderer, resolve_workers
from teacher_cache.build import (IGNORE_LIMITS, BuildConfig, check_limits, check_settings, chunks_to_write,
                                 declare_complete, make_spec, open_store, open_views, positions_of, put_rows,
                                 resolve_defaults, rows_in_token_chunk, targets_of_logits)
from teacher_cache.verify import listed

_LOG = logger(__name__)
VIEWS_FILE = "views.json"
IMPORTED = "imported"  # The model of an imported member.
# How many copies of a views file's rows `views` holds at once: an assumed count, not a measurement (the rendered
# batches, their concatenation, the .npz buffer and its bytes).
VIEW_FILE_COPIES = 4
TOKENS = "tokens"  # views.json's `layout` of token rows.


def chunk_file(chunk: int) -> str:
  """The file of chunk `chunk`'s rows, e.g. `views_00000.npz`."""
  return f"views_{chunk:05d}.npz"


def write_views(config: BuildConfig) -> dict:
  """Writes every row's teacher input into `config.out` (a directory or an object-store prefix).

  Args:
    config: the settings, a build's (those `BuildConfig` declares for `views`).

  Returns:
    The contents of `views.json`.

  Raises:
    StillroomError: bad settings or data; an `--out` that holds anything but views, or views of other settings
      (without `--overwrite`).
  """
  chunk_rows_given = config.chunk_rows is not None
  config = resolve_defaults(config)
  check_settings(config, "DIR")
  check_not_an_input(config.out, [local_path(config.dataset), config.data_dir], "--out")
  transfer_set, augmentation = open_views(config)
  positions = positions_of(transfer_set.describe())
  if positions and not chunk_rows_given:
    config = dataclasses.replace(config, chunk_rows=token_views_chunk_rows(positions))
  workers = resolve_workers(config.workers, transfer_set)
  count = len(transfer_set)
  record = {**_views_record(config, transfer_set, augmentation), "chunk_rows": config.chunk_rows}
  rows = record["rows"]
  normalization = transfer_set.normalization
  chunks = -(-rows // config.chunk_rows)
  if not config.ignore_limits:
    # x float32 (token rows: x and segment_ids int32, L each) and the row id.
    row_bytes = 8 * positions + 8 if positions else 4 * math.prod(record["input_shape"]) + 8
    chunk_rows = min(config.chunk_rows, rows)
    limits.check_limits(
        config.out, unit=f"one views file of {chunk_rows:,} rows", unit_bytes=chunk_rows * row_bytes,
        copies=VIEW_FILE_COPIES, held="rendered and written", advice="give a smaller --chunk-rows",
        what=f"the views of {rows:,} rows ({count:,} examples x {config.views:,} views)", total=rows * row_bytes,
        override=IGNORE_LIMITS)
  with OutputLock(config.out, "teacher-cache views"):
    if not _prepare(config.out, record, config.overwrite, [chunk_file(c) for c in range(chunks)]):
      _LOG.info(f"{config.out} already holds these views; nothing to do.")
      return record
    if positions:
      _write_token_views(config, transfer_set, rows)
      storage.write_text(storage.join(config.out, VIEWS_FILE), json.dumps(record, indent=2))  # Last: complete.
      return record
    with BatchRenderer(transfer_set, augmentation, workers=workers) as render, \
        progress(total=rows, unit="row", unit_scale=True, enabled=config.progress, desc="teacher-cache views") as bar:
      for chunk in range(chunks):
        start, stop = chunk * config.chunk_rows, min(rows, (chunk + 1) * config.chunk_rows)
        view, position = row_sources(np.arange(start, stop), count, config.seed, GROUPED, config.views)
        index = transfer_set.indices[position]
        # Mixed views: the rows' partners and λ, as a build draws them; the written inputs are the mixed images.
        mix = mix_params(augmentation, index, view, transfer_set.indices, config.views, transfer_set.input_shape)
        parts = example_runs(position, config.batch_size)  # Whole examples: each image is decoded once.
        batches = ({"position": position[p], "index": index[p], "view": view[p],
                    **{name: values[p] for name, values in mix.items()}} for p in parts)
        x = np.concatenate([normalization.apply(batch["x"]) for batch in render(batches)])
        buffer = io.BytesIO()
        np.savez(buffer, x=x.astype(np.float32), row=np.arange(start, stop, dtype=np.int64))
        storage.write_bytes(storage.join(config.out, chunk_file(chunk)), buffer.getvalue())
        bar.update(stop - start)
    storage.write_text(storage.join(config.out, VIEWS_FILE), json.dumps(record, indent=2))  # Last: complete.
  return record


def token_views_chunk_rows(seq_len: int) -> int:
  """The default rows per views file of token rows of L = `seq_len` positions: as many as `TOKEN_CHUNK_MIB` (64 MiB)
  holds of `x` and `segment_ids` (8·L bytes a row), at most `DEFAULT_CHUNK_ROWS`, at least 1: 4096 rows at L <=
  2048, 1024 rows at L = 8192."""
  return rows_in_token_chunk(8 * seq_len)


def _write_token_views(config: BuildConfig, transfer_set, rows: int) -> None:
  """Writes the views files of token rows: row r is the transfer set's example at the seeded row order (one view)."""
  with progress(total=rows, unit="row", unit_scale=True, enabled=config.progress, desc="teacher-cache views") as bar:
    for chunk in range(-(-rows // config.chunk_rows)):
      raise_if_interrupted()
      start, stop = chunk * config.chunk_rows, min(rows, (chunk + 1) * config.chunk_rows)
      _, position = row_sources(np.arange(start, stop), len(transfer_set), config.seed, GROUPED, 1)
      x, _ = transfer_set.read(position)  # int32 [n, 2, L]: token ids and segment ids.
      buffer = io.BytesIO()
      np.savez(buffer, x=x[:, 0].astype(np.int32), segment_ids=x[:, 1].astype(np.int32),
               row=np.arange(start, stop, dtype=np.int64))
      storage.write_bytes(storage.join(config.out, chunk_file(chunk)), buffer.getvalue())
      bar.update(stop - start)


def refuse_token_rows(transfer_set, command: str) -> None:
  """`teacher-cache import --logits` takes class logits: it refuses a transfer set of token rows
  (`teacher_cache.build.positions_of`) in one line, pointing to `import --logprobs`.

  Raises:
    StillroomError: naming the command, the data and what to do instead.
  """
  positions = positions_of(transfer_set.describe())
  if positions:
    raise StillroomError(f"teacher-cache {command} --logits: {transfer_set.name!r} holds token rows ({positions} "
                         "positions), and --logits takes one row of class logits per row; import a language model's "
                         "per-token log-probabilities on the rows of `teacher-cache views` with `teacher-cache "
                         "import --logprobs FILE` (vLLM or axolotl JSONL, or .npz/.parquet arrays).")


def _views_record(config: BuildConfig, transfer_set, augmentation) -> dict:
  """What defines the rows of views (`views.json` but its chunk rows): the dataset, views, augmentation,
  normalisation, the row order, the row count and input shape."""
  # The row order: views written before the grouped order lack it, and are refused by `import --views-dir` and
  # rewritten by `views` (with --overwrite).
  record = {"dataset": transfer_set.describe().to_dict(), "views": config.views,
            "augmentation": augmentation.to_dict(), "normalization": transfer_set.normalization.to_dict(),
            "row_order": GROUPED, "rows": len(transfer_set) * config.views,
            "input_shape": list(augmentation.output_shape(transfer_set.input_shape))}
  positions = positions_of(transfer_set.describe())
  if positions:  # Token rows: the files hold token and segment ids, not the rendered [2, L] input.
    record.update(layout=TOKENS, seq_len=positions, vocab_size=int(transfer_set.num_classes))
  return record


_CHUNK_NAME = re.compile(r"views_\d{5}\.npz(\.tmp)?")  # A chunk, or one a kill left half-written beside its name.


def _prepare(out: str, record: dict, overwrite: bool, chunks: list[str]) -> bool:
  """Creates `out`, or empties one that holds views (unfinished ones, or of other settings with `--overwrite`), so
  that a write that does not finish never leaves a `views.json` beside chunks of other settings. Call it holding the
  output's lock.

  Returns:
    Whether the views must be written: False when `out` already holds them whole (`chunks`, the chunk files).

  Raises:
    StillroomError: `out` is a file, holds other files than views, or views of other settings without `overwrite`.
  """
  if storage.is_file(out):
    raise StillroomError(f"--out {out!r} is a file; give a directory for the views.")
  if storage.has_entries(out):
    entries = [name for name, _, _ in storage.scan(out)]
    if not all(name == VIEWS_FILE or _CHUNK_NAME.fullmatch(name) for name in entries):
      raise StillroomError(f"--out {out!r} holds other files than views; choose another --out.")
    try:
      existing = storage.read_json(storage.join(out, VIEWS_FILE))
    except (OSError, ValueError):
      existing = None  # An unfinished write: its chunks are replaced.
    if existing == record and set(entries) == {VIEWS_FILE, *chunks}:
      return False
    if existing is not None and existing != record and not overwrite:
      changed = "; ".join(differences(existing, record, "views"))
      raise StillroomError(f"--out {out!r} holds views of other settings: {changed}. Pass --overwrite or choose "
                           "another --out.")
    for name in sorted(entries, key=lambda name: name != VIEWS_FILE):  # The record first: no longer complete.
      storage.remove_file(storage.join(out, name))
  storage.make_dirs(out)
  return True


def read_views(directory: str) -> dict:
  """`views.json` of a directory written by `write_views`.

  Raises:
    StillroomError: there is none (not views, or a write that did not finish).
  """
  try:
    return storage.read_json(storage.join(directory, VIEWS_FILE))
  except (OSError, ValueError) as e:
    raise StillroomError(f"{directory!r} has no readable {VIEWS_FILE}: not views written by `teacher-cache views`, "
                         "or a write that did not finish (run it again).") from e


def read_logits(path: str, num_rows: int, dtype: str) -> np.ndarray:
  """One member's logits file, in row order.

  Args:
    path: an `.npz` file (or object) with `row` int [R] (row ids, any order) and `logits` [R, C].
    num_rows: the rows of the views the logits are of; every row id `0..num_rows - 1` must appear exactly once.
    dtype: the storage dtype, whose range the logits must fit.

  Returns:
    float32 [num_rows, C].

  Raises:
    StillroomError: the file cannot be read or lacks an array; shapes that do not fit; row ids missing, repeated or
      unknown; non-finite logits; each naming the file and the first offending row ids.
  """
  try:
    loaded = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
      raise ValueError(f"it holds one array ({loaded.dtype} {loaded.shape}), not named `row` and `logits` arrays")
    with loaded as files:
      names = files.files
      arrays = {name: files[name] for name in names if name in ("row", "logits")}
  except (OSError, ValueError, TypeError, AttributeError, MemoryError, zipfile.BadZipFile, EOFError) as e:
    reason = "pickled or not .npy data" if "pickled" in str(e) else f"{type(e).__name__}: {str(e)[:200]}"
    raise StillroomError(f"--logits {path!r} cannot be read as an .npz file of `row` and `logits` ({reason}).") from e
  if any(not isinstance(array, np.ndarray) for array in arrays.values()):
    raise StillroomError(f"--logits {path!r}: its `row` or `logits` member is not .npy data.")
  if set(arrays) != {"row", "logits"}:
    raise StillroomError(f"--logits {path!r} holds {sorted(names)}; it needs `row` (int row ids [R]) and `logits` "
                         "[R, C].")
  row, logits = arrays["row"], arrays["logits"]
  if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
    raise StillroomError(f"--logits {path!r}: `row` must be a 1-D integer array, got {row.dtype} {row.shape}.")
  if logits.ndim != 2 or len(logits) != len(row) or logits.shape[1] < 2 or not (
      np.issubdtype(logits.dtype, np.floating) or np.issubdtype(logits.dtype, np.integer)):
    raise StillroomError(f"--logits {path!r}: `logits` must be numbers of shape [R, C] with R = len(row) = "
                         f"{len(row)} and C >= 2 classes, got {logits.dtype} {logits.shape}.")
  row = row.astype(np.int64)
  unknown = (row < 0) | (row >= num_rows)
  if unknown.any():
    raise StillroomError(f"--logits {path!r}: {int(unknown.sum())} row id(s) are not rows of these views (0.."
                         f"{num_rows - 1}): {listed(row[unknown].tolist())}; logits of views with other --dataset, "
                         "--split or --views?")
  seen = np.bincount(row, minlength=num_rows)
  if (seen > 1).any():
    repeated = np.flatnonzero(seen > 1)
    raise StillroomError(f"--logits {path!r}: {len(repeated)} row id(s) appear more than once: "
                         f"{listed(repeated.tolist())}; give each row's logits once.")
  if (seen == 0).any():
    missing = np.flatnonzero(seen == 0)
    raise StillroomError(f"--logits {path!r} has no logits for {len(missing)} of the {num_rows} rows, row ids "
                         f"{listed(missing.tolist())}; label every views_*.npz file.")
  ordered = np.empty(logits.shape, np.float32)
  with np.errstate(over="ignore", invalid="ignore"):  # Beyond float32: reported below as not finite.
    ordered[row] = logits
  del logits
  finite = np.isfinite(ordered).all(axis=1)
  if not finite.all():
    raise StillroomError(f"--logits {path!r}: the logits of {int((~finite).sum())} row(s) are not finite: row ids "
                         f"{listed(np.flatnonzero(~finite).tolist())}.")
  too_large = np.abs(ordered).max(axis=1) > np.finfo(dtype).max
  if too_large.any():
    raise StillroomError(f"--logits {path!r}: the logits of {int(too_large.sum())} row(s) exceed {dtype}'s range "
                         f"(±{float(np.finfo(dtype).max):g}): row ids {listed(np.flatnonzero(too_large).tolist())}; "
                         "pass --dtype float32.")
  return ordered


def check_views_dir(views_dir: str, config: BuildConfig, transfer_set, augmentation) -> str:
  """Checks that `views_dir` holds views of these settings; returns their row order.

  Raises:
    StillroomError: no views there, or views of other settings (listing the differences).
  """
  recorded = {k: v for k, v in read_views(views_dir).items() if k != "chunk_rows"}
  # Views written before the grouped order record none: their rows are view-major ("permuted"), and the cache
  # keeps that order, so that each row id names the row the teacher labelled.
  row_order = recorded.setdefault("row_order", PERMUTED)
  changed = differences(recorded, {**_views_record(config, transfer_set, augmentation), "row_order": row_order},
                        "views")
  if changed:
    raise StillroomError(f"--views-dir {views_dir!r} holds views of other settings than these: "
                         f"{'; '.join(changed)}. Give import the settings the views were written with.")
  return row_order


def _member_name(path: str) -> str:
  """A member's display name: its file's name without `.npz`."""
  name = os.path.basename(storage.local(path).rstrip("/"))
  return name[:-len(".npz")] if name.endswith(".npz") else name


def import_cache(config: BuildConfig, logits_files: list[str], views_dir: str | None = None) -> str:
  """Builds a cache (or resumes, or confirms one) from external teachers' logits on the rows of `teacher-cache
  views` with the same view settings; returns its path. Every member's logits are held in memory (R·C·4 bytes each).

  Args:
    config: the build settings (those `BuildConfig` declares for `import`); `teachers` and the eval split are not
      used.
    logits_files: one `.npz` file per member (see `read_logits`), in member order.
    views_dir: the views the logits are of, whose settings must be `config`'s (a row id means nothing under others).

  Raises:
    StillroomError: bad settings, data or logits files; an existing store with other settings.
  """
  config = resolve_defaults(config)
  check_settings(config)
  if not logits_files:
    raise StillroomError("give at least one --logits FILE.npz (one per member).")
  config = dataclasses.replace(config, folds=1, teachers=())
  check_not_an_input(config.out, [*logits_files, local_path(config.dataset), config.data_dir], "--out")
  transfer_set, augmentation = open_views(config)
  refuse_token_rows(transfer_set, "import")
  row_order = GROUPED if views_dir is None else check_views_dir(views_dir, config, transfer_set, augmentation)
  num_rows = len(transfer_set) * config.views
  logits, members, digests, names = None, [], {}, {}
  for m, path in enumerate(logits_files):
    values = read_logits(path, num_rows, config.dtype)
    if logits is None:
      if transfer_set.num_classes is not None and transfer_set.num_classes > values.shape[1]:
        raise StillroomError(f"--logits {path!r} holds {values.shape[1]} classes, but dataset {transfer_set.name!r} "
                             f"has {transfer_set.num_classes}.")
      if not config.ignore_limits:  # The array below is filled member by member: refused before it is.
        limits.check_memory(num_rows * len(logits_files) * values.shape[1] * 4,
                            f"holding the logits of {len(logits_files)} member(s) on {num_rows:,} rows of "
                            f"{values.shape[1]:,} classes (float32)", "import on a machine with more memory",
                            IGNORE_LIMITS)
      logits = np.empty((num_rows, len(logits_files), values.shape[1]), np.float32)  # Every member's, in row order.
    elif values.shape[1] != logits.shape[2]:
      raise StillroomError(f"--logits {path!r} has {values.shape[1]} classes, but {logits_files[0]!r} has "
                           f"{logits.shape[2]}.")
    digest = hashlib.sha256(values.tobytes()).hexdigest()
    if digest in digests:
      raise StillroomError(f"--logits {digests[digest]!r} and {path!r} hold the same logits; a member given twice "
                           "only weighs it double.")
    name = _member_name(path)
    if name in names:
      raise StillroomError(f"--logits {names[name]!r} and {path!r} would both be member {name!r}; rename one file.")
    digests[digest], names[name] = path, path
    logits[:, m] = values
    del values
    members.append(MemberSpec(name=name, source=path, model=IMPORTED, num_params=0, digest=digest,
                              trained_epochs=None, normalization=transfer_set.normalization.to_dict()))
  num_classes = logits.shape[2]
  spec = dataclasses.replace(make_spec(config, transfer_set, None, augmentation, members, num_classes),
                             row_order=row_order)
  check_limits(config, spec)  # The logits are held already: what is left must hold the chunks.
  # Every example's (height, width), read once from the file headers (or records), for drawing crop boxes.
  sizes = transfer_set.image_sizes(np.arange(len(transfer_set))) if spec.augmentation.kind == "crop" else None
  if not write_store(config, spec, transfer_set, _stored_of_logits(spec, transfer_set, logits, config), sizes):
    return config.out
  _LOG.info(f"imported {num_rows} rows ({len(transfer_set)} examples x {config.views} views, {len(members)} members, "
            f"{num_classes} classes) to {config.out}")
  # A row id means nothing under other view settings: accuracy near chance says the logits are of other rows.
  view, position = spec.row_sources(np.arange(num_rows))
  labels = transfer_set.labels[position]
  labelled = labels >= 0
  if labelled.any():
    for m, member in enumerate(members):
      right = np.argmax(logits[:, m], axis=1) == labels
      first = right[labelled & (view == 0)].mean()
      _LOG.info(f"member {member.name!r}: accuracy {100 * right[labelled].mean():.2f}% on the {int(labelled.sum())} "
                f"labelled rows (view 0: {100 * first:.2f}%)")
      if first < 2 / num_classes:
        _LOG.warning(f"member {member.name!r} is near chance on view 0: are these logits of other rows (views "
                     "written with another --dataset, --split, --views or --seed, or before the grouped row order, "
                     "whose rows were view-major)? --views-dir checks the settings and the row order.")
  return config.out


def write_store(config: BuildConfig, spec, transfer_set, stored_of, sizes: np.ndarray | None = None) -> bool:
  """Writes the store of an import at `config.out` under its lock (or resumes one, or finds it complete): every
  uncommitted chunk's row arrays replayed from the seed (`replay_rows`, with the examples' `sizes` for crop views),
  what `stored_of` gives for them, then the completion record.

  Args:
    stored_of: `(start, stop, position, rows) -> put_rows's (logits, targets, finite, finite_targets)` for the
      chunk of rows [start, stop) (their positions in the transfer set and row arrays, to which it adds `labels`).

  Returns:
    Whether anything was written: False when `config.out` holds the complete store already (`open_store`).

  Raises:
    StillroomError: an `--out` that is not a store of these settings (without `--overwrite`), or non-finite outputs.
  """
  check_output(config.out, STORE, config.overwrite)
  with OutputLock(config.out, "teacher-cache import"):
    cache = open_store(config, spec, {"dataset": transfer_set, "eval_dataset": None})
    if cache is None:
      return False
    todo = chunks_to_write(cache, ROWS)
    remaining = sum(stop - start for start, stop in map(cache.chunk_bounds, todo))
    if remaining < spec.num_rows:
      _LOG.info(f"resuming {cache.path}: {spec.num_rows - remaining} of {spec.num_rows} rows already committed")
    writer = ChunkWriter(cache)
    bar = progress(total=spec.num_rows, initial=spec.num_rows - remaining, unit="row", unit_scale=True,
                   enabled=config.progress, summary=False, desc="teacher-cache import")
    try:
      for chunk in todo:
        raise_if_interrupted()
        start, stop = cache.chunk_bounds(chunk)
        position, rows = replay_rows(spec, start, stop, transfer_set.indices, sizes)
        put_rows(writer, cache, chunk, rows, *stored_of(start, stop, position, rows))
        bar.update(stop - start)
    finally:
      bar.close()
      writer.close()
    declare_complete(cache)
  return True


def _stored_of_logits(spec, transfer_set, logits: np.ndarray, config: BuildConfig):
  """`write_store`'s `stored_of` for `logits` float32 [R, M, C] (in row order): the stored arrays computed in batches
  by `targets_of_logits`, as a build computes them."""
  forward = jax.jit(targets_of_logits(spec))
  labels = label_ids(transfer_set.labels)
  batch_size = cap_batch(config.batch_size, spec.chunk_rows, 1)  # A batch never spans chunks.

  def stored_of(start, stop, position, rows):
    rows["labels"] = labels[position]
    index, view = rows["index"], rows["view"]
    outputs = []
    for offset in range(0, stop - start, batch_size):
      part = slice(offset, offset + batch_size)
      outputs.append(forward(*(pad_rows(a, batch_size) for a in (
          logits[start:stop][part], index[part].astype(np.uint32), view[part]))))
    return jax.tree.map(lambda *parts: np.concatenate([np.asarray(p) for p in parts])[:stop - start], *outputs)

  return stored_of
