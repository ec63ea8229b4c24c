"""Growing a cache from others: the engine of `teacher-cache extend` (and of `convert`, `subset` and `merge`).

`grow_cache` builds the cache a direct `teacher-cache build` of its settings would, but takes each member's stored
logits (its features, its eval-split logits) from source caches wherever a source holds that (example index, view,
member), and runs teachers only for the rows with a cell no source holds. It goes through the build's own steps
(`make_spec`, `open_store`, `put_rows`, `targets_of_logits`, `declare_complete`, the teachers' forward of
`_make_forwards` and the renderer of `_computed_chunks`), so that the targets, the row arrays and the view
parameters are written as the build writes them (the targets from the member logits as stored), and so that a job of
several processes, resuming after a kill, progress and object stores work as they do for a build. A chunk whose rows
all come from sources renders no image. Which member's cells the sources lack (so which runs are needed) follows from
the specs alone, and is refused before anything is written when a run is missing; each chunk's cells are then worked
out as the chunk is written (a computed chunk's a few chunks ahead, as its rows are rendered), so that the engine holds
a few chunks' rows, whatever the cache's size.

A source must store its members' logits (a dense cache always does; a sparse one only if built with
`--member-logits`), hold the same data (fingerprint), views (seed and parameters: every view id means the same
view), storage dtype and compute dtype as the cache grown, and have neither cross-fitted members nor specialists.
"""

import collections
import contextlib
import dataclasses
import functools
import itertools
import time
from collections.abc import Sequence

import jax
import numpy as np

from shared import distributed
from shared.cache import (EVAL_ROWS, GROUPED, ROWS, SPEC_DIGEST, SPEC_KEY, Cache, CacheSpec, ChunkWriter,
                          FeatureSpec, MemberSpec, open_cache, parse_features, spec_digest)
from shared.augment import NO_MIX
from shared.data import NO_EVAL
from shared.errors import StillroomError
from shared.log import logger, progress
from shared.outputs import STORE, OutputLock, check_not_an_input, check_output, is_store
from shared.parallel import cap_batch, check_batch_size, data_mesh, pad_rows
from shared.runs import Teacher, load_teacher
from teacher_cache import build
from teacher_cache.build import BuildConfig

_LOG = logger(__name__)


def source_config(spec: CacheSpec, **changes) -> BuildConfig:
  """The `BuildConfig` of the build that made `spec` (its data, eval split, views, targets, storage and chunk rows;
  its features spelt member by member as `NAME:KIND@M`), with `changes` (e.g. `out`, `teachers`, `views`,
  `data_dir`, which a spec does not record). Its `teachers` are empty: a grown cache's members come from its
  sources unless given."""
  augmentation, eval_data = spec.augmentation, spec.eval_dataset
  crop = augmentation.image_size is not None
  settings = dict(
      dataset=spec.dataset.name, split=spec.dataset.split,
      eval_dataset=None if eval_data is None or eval_data.name == spec.dataset.name else eval_data.name,
      eval_split=NO_EVAL if eval_data is None else eval_data.split,
      views=spec.views, seed=augmentation.seed, max_shift=BuildConfig.max_shift if crop else augmentation.max_shift,
      flip=augmentation.flip, image_size=augmentation.image_size,
      crop_area=tuple(augmentation.crop_area), crop_aspect=tuple(augmentation.crop_aspect),
      renderer=augmentation.renderer if crop else None,
      mix=None if augmentation.mix_kind == NO_MIX else augmentation.mix, temperature=spec.temperature,
      combine=spec.combine,
      targets=spec.targets, member_logits=spec.member_logits and spec.target_kind != "dense", dtype=spec.dtype,
      chunk_rows=spec.chunk_rows, compute_dtype=spec.compute_dtype, folds=spec.folds,
      features=",".join(f"{f.name}:{f.kind}@{f.member}" for f in spec.features) or None)
  return BuildConfig(**{**settings, **changes})


def open_source(path: str) -> Cache:
  """A complete cache to grow from, checked as a source (`check_source`).

  Raises:
    StillroomError: not a complete, whole cache; one `check_source` refuses.
  """
  cache = open_cache(path)
  check_source(cache)
  return cache


def check_source(cache: Cache) -> None:
  """Refuses a cache whose members' logits cannot be taken: one without stored member logits, or with cross-fitted
  members or specialists (whose stored logits are not one run's each), or of token rows.

  Raises:
    StillroomError: one line naming the cache and what to do.
  """
  spec = cache.spec
  if spec.positions:  # Its cells are (example, position, member): not yet taken apart by the engine.
    raise StillroomError(f"cache {cache.path!r} holds token rows ({spec.positions} positions): extend, convert, "
                         "subset and merge take class-level caches; build the cache you want directly "
                         "(`teacher-cache build`).")
  if not spec.member_logits:
    raise StillroomError(f"cache {cache.path!r} stores {spec.targets} targets without its members' logits, so no "
                         "member can be taken from it: rebuild it with --member-logits (or with dense targets).")
  if spec.folds > 1 or spec.specialists:
    raise StillroomError(f"cache {cache.path!r} has " + ("cross-fitted members" if spec.folds > 1 else "specialists")
                         + ", whose stored logits are not one run's each: it cannot be grown; build the cache you "
                         "want directly.")


def source_digest(cache: Cache) -> str:
  """The spec digest a `history` entry names a source by: its completion record's (`SPEC_DIGEST`)."""
  return (cache.completion or {}).get(SPEC_DIGEST) or spec_digest(cache.group.attrs[SPEC_KEY])


@dataclasses.dataclass
class _Source:
  """One source cache, as the grown one reads it: its rows by (example index, view), which member of it each member
  of the grown cache is (or -1), and whether its eval logits are the grown cache's.

  A source in the grouped row order of the same examples and seed holds view v of the k-th example of their shared
  permutation in row k·V + v (`shared.cache.rows`): its rows follow from that rule. Another (an older row order) is
  looked up by the (index, view) its `index` and `view` arrays store."""

  cache: Cache
  keys: np.ndarray | None  # int64 [R_s]: the (index, view) key of each of its rows, sorted (None: by the rule)...
  rows: np.ndarray | None  # ...and the row holding each.
  members: list[int]  # [M]: for each member of the grown cache, the member of this source that is it, or -1.
  features: dict  # {grown feature array name: this source's array name} for the members it holds.
  has_eval: bool
  _chunks: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)

  def read_rows(self, rows: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Arrays `names` at source rows `rows` (int [n], any order), read a whole checked chunk at a time (the last
    few kept: consecutive rows of the grown cache lie in consecutive chunks of a source)."""
    chunk_rows = self.cache.spec.chunk_rows
    out = {}
    chunks = rows // chunk_rows
    for chunk in np.unique(chunks):
      values = self._chunk(int(chunk), names)
      where = chunks == chunk
      for name in names:
        if name not in out:
          out[name] = np.empty((len(rows), *values[name].shape[1:]), values[name].dtype)
        out[name][where] = values[name][rows[where] - chunk * chunk_rows]
    return out

  def _chunk(self, chunk: int, names: list[str]) -> dict:
    key = (chunk, tuple(names))
    if key not in self._chunks:
      self._chunks[key] = self.cache.read_chunk(chunk, names)
      while len(self._chunks) > 4:
        self._chunks.popitem(last=False)
    return self._chunks[key]


def _row_keys(index: np.ndarray, view: np.ndarray) -> np.ndarray:
  return (np.asarray(index, np.int64) << 32) | np.asarray(view, np.int64)


def _open_sources(caches: list[Cache], spec: CacheSpec) -> list[_Source]:
  """The sources (opened by `open_source`) as `spec` (the grown cache's) reads them.

  Raises:
    StillroomError: a source of other data, views, storage or compute dtype, or class count.
  """
  sources = []
  for cache in caches:
    theirs = cache.spec
    differences = [f"{what}: {mine} (here) vs {other} (that cache)" for what, mine, other in (
        ("dataset fingerprint", spec.dataset.fingerprint, theirs.dataset.fingerprint),
        ("views", spec.augmentation.to_dict(), theirs.augmentation.to_dict()),
        ("dtype", spec.dtype, theirs.dtype), ("compute dtype", spec.compute_dtype, theirs.compute_dtype),
        ("classes", spec.num_classes, theirs.num_classes)) if mine != other]
    if differences:
      changed = " (the data changed since that cache was built, or --data-dir holds other data)" \
          if spec.dataset.fingerprint != theirs.dataset.fingerprint else ""
      raise StillroomError(f"cache {cache.path!r} cannot be grown into the cache asked for: {'; '.join(differences)}"
                           f"{changed}.")
    digests = [m.digest for m in theirs.members]
    members = [digests.index(m.digest) if m.digest in digests else -1 for m in spec.members]
    features = {}
    for feature in spec.features:
      theirs_f = None if members[feature.member] < 0 else theirs.feature(feature.name, feature.kind,
                                                                         members[feature.member])
      if theirs_f is not None:
        features[feature.array_name] = theirs_f.array_name
    keys = order = None
    if theirs.row_order != GROUPED or theirs.num_examples != spec.num_examples:
      stored = [cache.read_chunk(k, ["index", "view"]) for k in range(theirs.num_chunks)]
      keys = _row_keys(np.concatenate([c["index"] for c in stored]), np.concatenate([c["view"] for c in stored]))
      order = np.argsort(keys, kind="stable")
      keys = keys[order]
    has_eval = spec.eval_dataset is not None and theirs.eval_dataset is not None and \
        theirs.eval_dataset.fingerprint == spec.eval_dataset.fingerprint
    sources.append(_Source(cache=cache, keys=keys, rows=order, members=members, features=features,
                           has_eval=has_eval))
  return sources


def _member_features(spec: CacheSpec, member: int) -> list[FeatureSpec]:
  return [f for f in spec.features if f.member == member]


def _holds(source: _Source, spec: CacheSpec, member: int) -> bool:
  """Whether `source` holds member `member` of the grown cache with every feature the grown cache stores of it."""
  return source.members[member] >= 0 and all(f.array_name in source.features for f in _member_features(spec, member))


def _held_views(sources: list[_Source], spec: CacheSpec) -> list[int]:
  """For each member of the grown cache, the views 0..n-1 of every example whose cells the sources hold: a source
  holds views 0..V_s-1 of every example of its transfer set (the grown cache's: same fingerprint), so n is the most
  views of a source holding the member (`_holds`), 0 if none; rows of view n or more are computed."""
  return [min(spec.views, max((s.cache.spec.views for s in sources if _holds(s, spec, m)), default=0))
          for m in range(spec.num_members)]


def _eval_sources(sources: list[_Source], spec: CacheSpec) -> list[int]:
  """For each member, the first source holding its eval-split logits, or -1 (none; [] without an eval split)."""
  if spec.eval_dataset is None:
    return []
  return [next((s for s, source in enumerate(sources) if source.has_eval and source.members[m] >= 0), -1)
          for m in range(spec.num_members)]


def _cells(sources: list[_Source], spec: CacheSpec, rows: np.ndarray, index: np.ndarray, view: np.ndarray):
  """Which source holds each (row, member) cell of the grown cache's `rows` (which hold views `view` of examples
  `index`): `(source int [n, M] (-1: none), source row int64 [n, M])`. A source holds a cell if it stores that
  (index, view) and that member with every feature the grown cache stores of it; the first source listed that holds
  it gives it."""
  count = len(index)
  found = np.full((count, spec.num_members), -1)
  at = np.zeros((count, spec.num_members), np.int64)
  keys = _row_keys(index, view)
  for s, source in enumerate(sources):
    if source.keys is None:  # The grouped order of the same examples (`_Source`): the k-th example's view v.
      views = source.cache.spec.views
      held, rows_there = view < views, rows // spec.views * views + view
    else:
      position = np.minimum(np.searchsorted(source.keys, keys), len(source.keys) - 1)
      held, rows_there = source.keys[position] == keys, source.rows[position]
    for m in range(spec.num_members):
      if not _holds(source, spec, m):
        continue
      take = held & (found[:, m] < 0)
      found[take, m], at[take, m] = s, rows_there[take]
  return found, at


def _resolve_features(text: str | None, members: list[MemberSpec], teachers: dict[int, Teacher],
                      sources: list[Cache], input_shape) -> tuple[FeatureSpec, ...]:
  """The features `text` asks for (`--features` of the grown cache, members numbered in its order): a member run
  here is traced as the build does (`build._feature_specs`); one taken from a source has the shape the source
  stores.

  Raises:
    StillroomError: as `build._feature_specs`; a member neither run nor stored with that feature by a source.
  """
  if text is None:
    return ()
  found = []
  for name, kind, member in parse_features(text):
    for m in [member] if member is not None else range(len(members)):
      if m >= len(members):
        raise StillroomError(f"--features {name}@{m}: the ensemble has members 0..{len(members) - 1}.")
      stored = [f for cache in sources for j, theirs in enumerate(cache.spec.members)
                if theirs.digest == members[m].digest
                for f in [cache.spec.feature(name, kind, j)] if f is not None]
      if m in teachers:
        by_position = [teachers.get(k) for k in range(len(members))]
        found += [dataclasses.replace(f, member=m) for f in build._feature_specs(  # pylint: disable=protected-access
            f"{name}:{kind}@{m}", by_position, input_shape)]
      elif stored:
        found.append(dataclasses.replace(stored[0], member=m))
      else:
        raise StillroomError(f"--features {name}:{kind}: member {m} ({members[m].name!r}) is not run here and no "
                             "source stores that feature of it; give its run with --teacher.")
  if len({f.array_name for f in found}) != len(found):
    raise StillroomError(f"--features {text!r} names a feature twice.")
  return tuple(sorted(found, key=lambda f: (f.member, f.name, list(build.FEATURE_KINDS).index(f.kind))))


def _plan(config: BuildConfig, source_paths, member_digests, history: dict | None,
          loaded: Sequence[Teacher] | None = None):
  """`build._plan` for a grown cache: `(config, mesh, transfer set, eval set, {member position: teacher run here},
  sources (`_Source`), spec)`. `loaded`: the runs of `config.teachers` already loaded (None: loaded here).

  Raises:
    StillroomError: as `grow_cache`; among them a member with cells (rows, or eval rows) that no source holds and no
      run of `config.teachers` computes: decided here from the specs, before anything is written.
  """
  mesh = data_mesh()
  check_batch_size(config.batch_size, mesh)
  batch_size = cap_batch(config.batch_size, config.chunk_rows, mesh.devices.size)
  if batch_size < config.batch_size:
    config = dataclasses.replace(config, batch_size=batch_size)
  caches = [path if isinstance(path, Cache) else open_cache(path) for path in source_paths]
  for cache in caches:  # One given opened too (`open_source` checks it the same way).
    check_source(cache)
  transfer_set, augmentation = build.open_views(config)
  eval_set = build._eval_set(config)  # pylint: disable=protected-access
  teachers = list(loaded) if loaded is not None else [load_teacher(reference, config.compute_dtype, host=True)
                                                        for reference in config.teachers]
  input_shape = augmentation.output_shape(transfer_set.input_shape)
  run_specs, num_classes = build._member_specs(  # pylint: disable=protected-access
      teachers, transfer_set, input_shape, config.batch_size) if teachers else ([], None)
  # The members: each source's in order, then the teachers that are none of them (or as `member_digests` orders).
  stored = {}
  for cache in caches:
    for member in cache.spec.members:
      stored.setdefault(member.digest, member)
    if num_classes is not None and cache.spec.num_classes != num_classes:
      raise StillroomError(f"the teachers output {num_classes} logits, but cache {cache.path!r} holds "
                           f"{cache.spec.num_classes} classes: a member of another class count cannot join it.")
    num_classes = cache.spec.num_classes if num_classes is None else num_classes
  known = {**stored, **{s.digest: s for s in run_specs if s.digest not in stored}}
  order = list(member_digests) if member_digests is not None else list(known)
  unknown = [d for d in order if d not in known]
  if unknown or not order:
    raise StillroomError(f"members {unknown} are neither in a source nor given with --teacher." if unknown else
                         "a cache needs at least one member.")
  members = [known[d] for d in order]
  run_at = {order.index(s.digest): teacher for s, teacher in zip(run_specs, teachers) if s.digest in order}
  if eval_set is not None:
    build.check_eval_set(eval_set, transfer_set, augmentation, num_classes)
  features = _resolve_features(config.features, members, run_at, caches, input_shape)
  spec = build.make_spec(config, transfer_set, eval_set, augmentation, members, num_classes, (), features)
  spec = dataclasses.replace(spec, history=tuple(h for cache in caches[:1] for h in cache.spec.history))
  if history is not None:
    spec = spec.with_history(sources=[source_digest(cache) for cache in caches], **history)
  sources = _open_sources(caches, spec)
  # A member with cells that no source holds needs its run: the rows of views past those its sources hold, and the
  # eval rows where no source with the same eval split holds it.
  held, eval_from = _held_views(sources, spec), _eval_sources(sources, spec)
  missing = [m for m in range(spec.num_members) if held[m] < spec.views or eval_from and eval_from[m] < 0]
  unrun = [m for m in missing if m not in run_at]
  if unrun:
    raise StillroomError(f"member {unrun[0]} ({spec.member_name(unrun[0])!r}) has rows that no source holds; give "
                         "its run with --teacher to compute them.")
  return config, mesh, transfer_set, eval_set, run_at, sources, spec


def grow_cache(config: BuildConfig, sources, *, members=None, history: dict | None = None,
               teachers: Sequence[Teacher] | None = None) -> str:
  """Builds (or resumes, or confirms) at `config.out` the cache a direct build of `config` with the final members
  would write, copying each (row, member) cell that a source holds and running teachers only for the rest.

  Args:
    config: the grown cache's build settings (`source_config` gives a source's), its `out`, and in `teachers` the
      runs of the members to compute where no source holds their cells (new members, or old members over new
      views; their features as `config.features` asks); a member taken from sources only needs no run.
    sources: paths (or opened `Cache`s) of complete caches holding member logits; the first holding a cell gives it.
    members: the final members' parameter digests in order (None: each source's members in order, then the teachers
      that are none of them).
    history: the `CacheSpec.history` entry to add (`command` and what it changed; the sources' digests and the
      time are added): the grown cache's history is the first source's and this.
    teachers: the runs of `config.teachers`, in that order, already loaded (with `host=True` and
      `config.compute_dtype`) by a caller that read them to check its command line; None: loaded here.

  Returns:
    `config.out`.

  Raises:
    StillroomError: bad settings; a source without member logits or of other data, views, dtypes or classes; a
      member whose missing cells no teacher computes; as `build_cache`.
  """
  config = build.resolve_defaults(config)
  build.check_settings(config)
  if config.folds > 1:
    raise StillroomError("a grown cache has no cross-fitted members (--folds): build it directly.")
  distributed.initialize(config.coordinator, config.num_processes, config.process_id, config.heartbeat_timeout,
                         config.join_timeout)
  distributed.check_same_settings(config)
  first = distributed.is_first()
  source_paths = [s.path if isinstance(s, Cache) else s for s in sources]
  with contextlib.ExitStack() as lock:

    def plan(is_process_0: bool):
      check_not_an_input(config.out, [*source_paths, *build._input_paths(config)], "--out")  # pylint: disable=W0212
      if is_process_0:
        check_output(config.out, STORE, config.overwrite)
        lock.enter_context(OutputLock(config.out, f"teacher-cache {(history or {}).get('command', 'grow')}",
                                      lambda: not config.overwrite and is_store(config.out, complete=True)))
      planned = _plan(config, sources, members, history, teachers)
      build.check_limits(planned[0], planned[-1], disk=is_process_0)
      return planned

    config, mesh, transfer_set, eval_set, run_at, grown_from, spec = distributed.first_then_others(
        lambda: plan(True), lambda: plan(False))
    data = {"dataset": transfer_set, "eval_dataset": eval_set}
    cache = distributed.first_then_others(
        lambda: build.open_store(config, spec, data),
        lambda: build._same_settings(  # pylint: disable=protected-access
            open_cache(config.out, mode="r+", require_complete=False), spec, data, config.out,
            "settings other than this process's", "Start every process of the job with the same flags and data."))
    if cache is None or cache.complete:
      return config.out
    distributed.job_step(lambda: _write_grown_chunks(cache, transfer_set, eval_set, run_at, grown_from, mesh, config))
    if not first:
      return config.out
    build.declare_complete(cache)
  return config.out


def _compute_spec(spec: CacheSpec, run_at: dict[int, Teacher]) -> CacheSpec:
  """The spec of an ensemble of the members run here alone (in member order), with their features: what the
  build's forward (`build._make_forwards`) computes for them. Its targets are dense, the cheapest to compile: only
  its member logits and features are used (the grown cache's targets are computed from every member's)."""
  positions = sorted(run_at)
  features = tuple(dataclasses.replace(f, member=positions.index(f.member)) for f in spec.features
                   if f.member in run_at)
  return dataclasses.replace(spec, members=tuple(spec.members[m] for m in positions), features=features, arrays=(),
                             history=(), targets="dense", member_logits=True)


def _write_grown_chunks(cache: Cache, transfer_set, eval_set, run_at: dict[int, Teacher], sources: list[_Source],
                        mesh, config: BuildConfig) -> None:
  """`build._write_chunks` for a grown cache: each chunk's cells from the sources, the others computed."""
  spec = cache.spec
  positions = sorted(run_at)
  row_sets = [EVAL_ROWS, ROWS] if eval_set is not None else [ROWS]
  cache.arrays([array.name for array in spec.arrays])
  todo = {row_set: distributed.my_share(build.chunks_to_write(cache, row_set)) for row_set in row_sets}
  mine = {row_set: distributed.my_share(list(range(spec.chunks_of(row_set)))) for row_set in row_sets}

  def rows_of(chunks: dict) -> int:
    return sum(cache.chunk_bounds(c, s)[1] - cache.chunk_bounds(c, s)[0] for s in row_sets for c in chunks[s])
  total, remaining = rows_of(mine), rows_of(todo)
  if remaining < total:
    _LOG.info(f"resuming {cache.path}: {total - remaining} of {total} rows already committed")

  # Each chunk's cells are worked out when it is written (or, when it is computed, when its rows are rendered, a few
  # chunks ahead): the rows held are a few chunks', whatever the cache's size. `_plan` checked that every cell no
  # source holds has its member's run here.
  held_views, eval_from = _held_views(sources, spec), _eval_sources(sources, spec)
  first_computed = min((held_views[m] for m in positions), default=spec.views)  # The first view computed here.
  # {chunk: its plan} of the computed chunks planned (by `select`, in the renderer's thread) and not yet written.
  plans = {}

  def plan(chunk: int):
    """`(index, view, source int [n, M] (-1: none), source row int64 [n, M])` of the chunk's rows (`_cells`)."""
    start, stop = cache.chunk_bounds(chunk)
    view, position = spec.row_sources(np.arange(start, stop))
    index = transfer_set.indices[position]
    return (index, view, *_cells(sources, spec, np.arange(start, stop), index, view))

  def to_compute(found: np.ndarray) -> np.ndarray:
    """The rows (from the chunk's first) with a cell of a member run here that no source holds."""
    return np.flatnonzero((found[:, positions] < 0).any(axis=1))

  def select(chunk: int) -> np.ndarray:
    plans[chunk] = plan(chunk)
    return to_compute(plans[chunk][2])

  def computed(chunk: int) -> bool:  # From the specs alone (`_held_views`), as `to_compute` finds it row by row.
    start, stop = cache.chunk_bounds(chunk)
    return bool((spec.row_sources(np.arange(start, stop))[0] >= first_computed).any())
  if positions:
    teachers = [run_at[m] for m in positions]
    params, shardings = build.place_teachers(teachers, mesh, config.teacher_sharding)
    rows_forward, eval_forward = build._make_forwards(  # pylint: disable=protected-access
        teachers, _compute_spec(spec, run_at), mesh, shardings)
  stored_and_targets = jax.jit(build.targets_of_logits(spec))
  writer = ChunkWriter(cache)
  bar = progress(total=total, initial=total - remaining, unit="row", unit_scale=True, enabled=config.progress,
                 summary=False, desc=f"growing {config.out}")
  started = time.perf_counter()
  row_names = [a for a in spec.arrays_of(ROWS) if spec.array(a).role in ("row", "view")]
  try:
    if eval_set is not None and todo[EVAL_ROWS]:
      # The eval chunks as the teachers compute them (when a member's eval logits are in no source), else as listed.
      eval_chunks = ((chunk, None, None) for chunk in todo[EVAL_ROWS])
      if any(s < 0 for s in eval_from):
        eval_chunks = build._computed_chunks(  # pylint: disable=protected-access
            cache, EVAL_ROWS, todo[EVAL_ROWS], eval_set, config, lambda x, *_: eval_forward(params, x), mesh)
      for chunk, rows, outputs in eval_chunks:
        start, stop = cache.chunk_bounds(chunk, EVAL_ROWS)
        logits = np.zeros((stop - start, spec.num_members, spec.num_classes), spec.dtype)
        if outputs is not None:
          logits[:, positions] = outputs[0]
        for s in sorted({s for s in eval_from if s >= 0}):
          read = _eval_rows(sources[s].cache, start, stop)
          for m in [m for m, source in enumerate(eval_from) if source == s]:
            logits[:, m] = read["eval_member_logits"][:, sources[s].members[m]]
          rows = rows or {"index": read["eval_index"], "labels": read["eval_labels"]}
        writer.put(EVAL_ROWS, chunk, start, stop, {"eval_member_logits": logits, "eval_index": rows["index"],
                                                   "eval_labels": rows["labels"]})
        bar.update(stop - start)
    chunks = [chunk for chunk in todo[ROWS] if computed(chunk)]
    outputs_of = build._computed_chunks(  # pylint: disable=protected-access
        cache, ROWS, chunks, transfer_set, config, functools.partial(rows_forward, params), mesh,
        select=select) if chunks else iter(())
    computing = set(chunks)
    copied = [chunk for chunk in todo[ROWS] if chunk not in computing]
    # The chunks needing no teacher first (no image is read for them), then those that do, as they are computed.
    for chunk, rows, outputs in itertools.chain(((chunk, None, None) for chunk in copied), outputs_of):
      index, view, found, at = plans.pop(chunk) if outputs is not None else plan(chunk)
      count = len(index)
      if outputs is None and (found < 0).any():
        raise AssertionError(f"chunk {chunk}: cells no source holds, in a chunk planned as copied")
      logits = np.zeros((count, spec.num_members, spec.num_classes), np.float32)
      features = {f.array_name: np.zeros((count, *f.shape), build.FEATURE_DTYPE) for f in spec.features}
      arrays = {}
      if outputs is not None:
        selected = to_compute(found)
        stored, targets, _, _ = outputs
        for k, m in enumerate(positions):
          logits[selected, m] = stored[:, k]
        for f in spec.features:
          if f.member in run_at:
            features[f.array_name][selected] = targets[dataclasses.replace(f, member=positions.index(f.member))
                                                       .array_name]
        arrays = {name: np.zeros(count, rows[name].dtype) if rows[name].ndim == 1 else
                  np.zeros((count, *rows[name].shape[1:]), rows[name].dtype) for name in row_names}
        for name in row_names:
          arrays[name][selected] = rows[name]
      for s, source in enumerate(sources):
        held = found == s
        wanted = np.flatnonzero(held.any(axis=1))
        if not len(wanted):
          continue
        # A source row holds every member the source has: the row of any member held is the row of all of them.
        read = source.read_rows(at[wanted, np.argmax(held[wanted], axis=1)],
                                ["member_logits", *source.features.values(), *row_names])
        position = np.full(count, -1)
        position[wanted] = np.arange(len(wanted))
        for m in range(spec.num_members):
          cells = np.flatnonzero(held[:, m])
          if not len(cells):
            continue
          logits[cells, m] = read["member_logits"][position[cells], source.members[m]]
          for f in _member_features(spec, m):
            features[f.array_name][cells] = read[source.features[f.array_name]][position[cells]]
        if not arrays:
          arrays = {name: np.zeros((count, *read[name].shape[1:]), read[name].dtype) for name in row_names}
        sourced = wanted if outputs is None else np.setdiff1d(wanted, selected)
        for name in row_names:
          arrays[name][sourced] = read[name][position[sourced]]
      # Padded to whole chunks: one compilation for every chunk, the last one too.
      stored, targets, finite, finite_targets = jax.tree.map(lambda a: np.asarray(a)[:count], stored_and_targets(
          *(pad_rows(a, spec.chunk_rows) for a in (logits, index.astype(np.uint32), view))))
      build.put_rows(writer, cache, chunk, arrays, stored, {**targets, **features}, finite, finite_targets)
      bar.update(count)
  finally:
    bar.close()
    writer.close()
  if remaining:
    _LOG.info(f"{remaining} rows in {time.perf_counter() - started:.1f} s")


def _eval_rows(cache: Cache, start: int, stop: int) -> dict:
  """Eval rows `[start, stop)` of a source (its member logits, index and labels), from the chunks that hold them."""
  names = ["eval_member_logits", "eval_index", "eval_labels"]
  spec = cache.spec
  parts = [cache.read_chunk(k, names, EVAL_ROWS) for k in range(start // spec.chunk_rows,
                                                                (stop - 1) // spec.chunk_rows + 1)]
  offset = start // spec.chunk_rows * spec.chunk_rows
  return {name: np.concatenate([p[name] for p in parts])[start - offset:stop - offset] for name in names}

