"""`teacher-cache extend`: more members or more views for a cache, computing only what it lacks.

`--teacher RUN...` adds members: only the new teachers run, over the views the cache's rows hold (replayed from
their stored parameters), and the targets are rewritten for the larger ensemble. `--views N` adds views V..N-1 of
every example: only those rows are computed, by every member's run (found at the path the cache records, or given
with `--teacher`). Both at once add members and views. The result is the cache a direct `build` of the final members
and views writes, array for array (`teacher_cache.grow`); its spec's `history` says how it was grown.

Never losing the original: the grown cache is built beside it, as a store of its own (`CACHE.extending`; a kill
leaves it incomplete, and running the same command again resumes it as a build resumes), and only once it is
complete does it take the cache's place: by one atomic exchange of the two directories where the system offers it
(Linux's `renameat2`), so that CACHE is at every moment the old complete cache or the new one, then the old one is
moved to `CACHE.replaced` and deleted. Where the exchange is not offered, by two renames (CACHE -> `CACHE.replaced`,
`CACHE.extending` -> CACHE): a kill between them leaves no CACHE for a moment. Any later `extend` of CACHE (the same
command, or another) first finishes a switch a kill interrupted (`finish_switch`); the same command run again after
a completed extend says so and does nothing. With `--out NEW` the grown cache is written to NEW and CACHE is left as
it is: the only way on an object store, where a rename is a copy.

An extend holds CACHE's lock (`CACHE.lock`, `shared.outputs.OutputLock`) from before it reads CACHE until after the
switch, with `--out` too: another extend of the same CACHE meanwhile is refused in one line, rather than reading a
cache about to be switched and deleted under it. A reader of CACHE that takes no lock (a student training from it)
during the switch may fail to find a chunk it reads: extend a cache no run is reading, or use `--out`.
"""

import contextlib
import ctypes
import dataclasses
import os
from typing import ClassVar

from shared import distributed, storage
from shared.cache import open_cache
from shared.errors import StillroomError
from shared.log import logger
from shared.options import EXTEND
from shared.outputs import OutputLock, is_store
from shared.runs import Teacher, load_teacher
from shared.settings import at_least, names_where, setting
from teacher_cache.build import BuildConfig, kept_chunk_rows
from teacher_cache.grow import grow_cache, open_source, source_config, source_digest

STAGING_SUFFIX = ".extending"  # The grown cache, built beside CACHE until it is complete...
REPLACED_SUFFIX = ".replaced"  # ...and CACHE, renamed out of the way for a moment, then deleted.

_LOG = logger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtendConfig:
  """Settings of `teacher-cache extend` of its own (the rest are `BuildConfig`'s that it offers)."""

  COMMANDS: ClassVar[tuple[str, ...]] = (EXTEND,)

  views: int | None = setting(None, "views per example of the grown cache, more than the cache's V: views V..N-1 of "
                                    "every example are added, computed by every member's run (default: the cache's)",
                              metavar="N", group="views", check=at_least(2, "view"))


def staging_path(cache: str) -> str:
  """Where an in-place extend of `cache` builds the grown cache."""
  return cache.rstrip("/") + STAGING_SUFFIX


def finish_switch(cache: str) -> bool:
  """Finishes a switch-over that a kill interrupted (see the module's docstring); True if there was one. Call it
  holding the cache's lock.

  The states a kill may leave, and what each becomes: the old cache at `CACHE.replaced` (being deleted) -> deleted;
  no CACHE, the old at `CACHE.replaced` and the complete grown store at `CACHE.extending` (between the two renames
  where the exchange is not available) -> the grown one renamed to CACHE, the old deleted; the grown CACHE and the
  old one at `CACHE.extending` (just exchanged) -> the old deleted.
  """
  cache = cache.rstrip("/")
  staged, replaced = staging_path(cache), cache + REPLACED_SUFFIX
  if os.path.exists(replaced):
    if not os.path.exists(cache):
      if is_store(staged, complete=True):
        os.rename(staged, cache)
        _LOG.info(f"finished the switch of {cache} to its extended store that an interrupted extend had begun")
      else:  # Not a state an extend leaves (it renames only a complete store): the original goes back.
        os.rename(replaced, cache)
        _LOG.info(f"restored {cache}, which an interrupted extend had moved to {replaced}")
        return True
    storage.remove_tree(replaced)
    return True
  if os.path.exists(cache) and is_store(staged, complete=True) and _replaced_by(staged, cache):
    os.rename(staged, replaced)
    storage.remove_tree(replaced)
    _LOG.info(f"deleted the cache {cache} was extended from, which an interrupted extend had left at {staged}")
    return True
  return False


def _replaced_by(old: str, cache: str) -> bool:
  """Whether the store `old` is the one `cache` was extended from (the last entry of its history names it)."""
  try:
    history = open_cache(cache, require_complete=False).spec.history
    return bool(history) and history[-1].get("command") == EXTEND and \
        source_digest(open_cache(old, require_complete=False)) in history[-1].get("sources", ())
  except StillroomError:
    return False


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where the system or file system does
  not offer it, which then changes nothing."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  at_cwd, rename_exchange = -100, 2
  return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def _switch(cache: str) -> None:
  """Puts the complete store `staging_path(cache)` in the place of `cache`, and deletes the old one: by one atomic
  exchange where the file system offers it (CACHE is always a complete cache), else by two renames (for a moment
  there is no CACHE: `finish_switch` completes it)."""
  cache = cache.rstrip("/")
  staged, replaced = staging_path(cache), cache + REPLACED_SUFFIX
  if _exchange(staged, cache):
    os.rename(staged, replaced)  # The old cache, out of the staging store's way...
  else:
    os.rename(cache, replaced)
    os.rename(staged, cache)
  storage.remove_tree(replaced)  # ...then deleted (a kill midway leaves it to `finish_switch`).


def extend_cache(cache: str, config: BuildConfig, extend: ExtendConfig) -> str:
  """Extends `cache` by the members `config.teachers` and/or to `extend.views` views; returns the grown cache's path.

  Args:
    cache: a complete cache whose members' logits are stored (dense, or sparse with --member-logits).
    config: from it: `teachers` (new members, or with more views also the runs of existing members), `out` (""
      in place), `data_dir`, `chunk_rows` (None: the cache's when it is a multiple of the new views, else the build's
      default for them), `batch_size`, `workers`, the job's, `overwrite` (of `out`, or of a stale staging store),
      `progress`, `ignore_limits`, `teacher_sharding`. Its other settings are the cache's.
    extend: the views wanted.

  Raises:
    StillroomError: one line, nothing written: a teacher already a member (without more views), of another class
      count or input; views not more than the cache's; a cache without member logits; data that is not the cache's;
      in place on an object store; a member's run (for new views) missing or not the one the cache records.
  """
  in_place = not config.out
  if in_place and storage.is_url(storage.local(cache)):
    raise StillroomError(f"{cache!r} is on an object store, where a store is not renamed but copied: give --out NEW "
                         "to write the extended cache there (the original stays as it is).")
  distributed.initialize(config.coordinator, config.num_processes, config.process_id, config.heartbeat_timeout,
                         config.join_timeout)
  with contextlib.ExitStack() as lock:

    def lock_and_recover():
      # Process 0 holds CACHE's lock from before any process reads CACHE to after the switch: another extend of it
      # (in place, or --out reading it) is refused in one line rather than finding its source switched under it. A
      # cache on an object store is never switched (in place is refused there): reading it needs no lock.
      if not storage.is_url(storage.local(cache)):
        lock.enter_context(OutputLock(cache, "teacher-cache extend", None if in_place else lambda: True))
      if in_place:
        finish_switch(cache)
    distributed.first_then_others(lock_and_recover, lambda: None)
    return _extend_locked(cache, config, extend, in_place)


def _extend_locked(cache: str, config: BuildConfig, extend: ExtendConfig, in_place: bool) -> str:
  """`extend_cache` once process 0 holds CACHE's lock (and finished an interrupted switch)."""
  source = open_source(cache)
  spec = source.spec
  views = spec.views if extend.views is None else extend.views
  # Each run is loaded once, here, and handed to the engine (a large teacher's weights are read once).
  teachers = [load_teacher(run, spec.compute_dtype, host=True) for run in config.teachers]
  # The same `--views N` run again after it completed (the cache holds N views now) confirms, as it does for members.
  rerun = in_place and extend.views == spec.views and _done_before(spec, {t.digest for t in teachers}, extend.views)
  if views <= spec.views and extend.views is not None and not rerun:
    raise StillroomError(f"--views {extend.views}: {cache!r} already holds {spec.views} views per example; give more "
                         f"than {spec.views} (views {spec.views}..N-1 are added).")
  members = {m.digest: m for m in spec.members}
  if in_place and _done_before(spec, {t.digest for t in teachers}, extend.views):
    _LOG.info(f"{cache} was already extended by this command (its history says so); nothing to do.")
    return cache
  for teacher in teachers:
    if teacher.digest in members and views == spec.views:
      raise StillroomError(f"teacher {teacher.source!r} is already member {list(members).index(teacher.digest)} "
                           f"({members[teacher.digest].name!r}) of {cache!r}: give a new member, or more --views.")
  given = {}
  for teacher in teachers:  # As a build refuses it: two runs of one member would silently be one.
    if teacher.digest in given:
      raise StillroomError(f"teachers {given[teacher.digest]!r} and {teacher.source!r} have the same parameters; "
                           "an ensemble member given twice only weighs it double.")
    given[teacher.digest] = teacher.source
  added = [t for t in teachers if t.digest not in members]
  if not added and views == spec.views:
    raise StillroomError("give --teacher RUN (a new member) and/or --views N (more views per example).")
  runs = {t.digest: t for t in teachers}
  if views > spec.views:  # Every member computes the new views: its run as given, or where the cache recorded it.
    for member in spec.members:
      if member.digest not in runs:
        runs[member.digest] = _recorded_run(member, spec.compute_dtype, cache)
  chunk_rows = kept_chunk_rows(config.chunk_rows, spec.chunk_rows, views)
  features = _features(spec)
  grown = source_config(spec, **{
      **{name: getattr(config, name) for name in names_where(BuildConfig, command=EXTEND)},
      "teachers": tuple(t.source for t in runs.values()), "views": views, "chunk_rows": chunk_rows,
      "features": features, "out": config.out or staging_path(cache)})
  history = {"command": EXTEND, "added_members": [t.digest for t in added], "views": [spec.views, views]}
  # A rerun on a complete --out: the engine confirms it ("already complete ... nothing to do") and writes nothing.
  done = not in_place and not grown.overwrite and is_store(grown.out, complete=True)
  try:
    grow_cache(grown, [source], history=history, teachers=list(runs.values()))
  except StillroomError as e:
    if features and "@" not in features and "--features" in str(e):  # A new member without the features.
      raise StillroomError(f"{cache!r} stores features {features!r} of every member, which a new member must have "
                           f"too: {e}") from e
    stale = f"--out {staging_path(cache)!r} holds a cache built with other settings: "
    if in_place and str(e).startswith(stale):  # The user gave no --out: say what the staging store is.
      differences = str(e)[len(stale):].split(". Pass --overwrite")[0]
      raise StillroomError(f"{staging_path(cache)!r} holds an unfinished extend of {cache!r} with other settings "
                           f"({differences}): run that extend again to finish it, or pass --overwrite to discard it "
                           "and run this one.") from e
    raise
  if in_place and distributed.is_first():
    _switch(cache)
    _LOG.info(f"extended {cache} in place: " + _what(spec.views, views, added))
    return cache
  if distributed.is_first() and not done:
    _LOG.info(f"wrote {config.out}: {cache} " + _what(spec.views, views, added))
  return config.out or cache


def _done_before(spec, given: set[str], views: int | None) -> bool:
  """Whether the last step of the cache's history is this extend: the same members added (given, and now members)
  and the same views."""
  last = spec.history[-1] if spec.history else {}
  if last.get("command") != EXTEND or (not given and views is None):
    return False
  added, (before, after) = set(last.get("added_members", ())), last.get("views", (None, None))
  return added <= given <= {m.digest for m in spec.members} and after == spec.views and \
      (views == after if views is not None else before == after)


def _what(old_views: int, views: int, added) -> str:
  parts = [f"{len(added)} member{'s' if len(added) != 1 else ''} added ({', '.join(t.name for t in added)})"] \
      if added else []
  parts += [f"views {old_views} -> {views}"] if views > old_views else []
  return ", ".join(parts)


def _recorded_run(member, compute_dtype: str, cache: str) -> Teacher:
  """The run of an existing member, loaded from where the cache recorded it, checked to hold its parameters.

  Raises:
    StillroomError: not there, or other parameters.
  """
  try:
    run = load_teacher(member.source, compute_dtype, host=True)
  except StillroomError as e:
    raise StillroomError(f"more views need every member's run, and member {member.name!r}'s at {member.source!r} "
                         f"(as {cache!r} records it) cannot be loaded ({e}); give it with --teacher.") from e
  if run.digest != member.digest:
    raise StillroomError(f"{member.source!r} no longer holds the parameters of member {member.name!r} of {cache!r} "
                         "(its digest differs); give that member's run with --teacher.")
  return run


def _features(spec) -> str | None:
  """The grown cache's `--features`: the cache's, member by member; and when every member stores the same ones, the
  new members those too (a direct build given them without @MEMBER), else none."""
  if not spec.features:
    return None
  by_member = [sorted((f.name, f.kind) for f in spec.features if f.member == m) for m in range(spec.num_members)]
  if all(kinds == by_member[0] for kinds in by_member):
    return ",".join(f"{name}:{kind}" for name, kind in by_member[0])
  return ",".join(f"{f.name}:{f.kind}@{f.member}" for f in spec.features)
