"""`teacher-cache convert`, `subset` and `merge`: caches derived from stored caches, running no teacher.

Each command first computes the spec of the cache it makes: the spec a direct `teacher-cache build` with the
resulting settings writes (`convert_spec`, `subset_spec`, `merge_spec`; every refusal is raised there, before
anything is written). The cache is then written through the grow engine (`teacher_cache.grow`), which copies each
member's logits (and features and eval-split logits) from the sources and writes the targets and the row arrays as
a build writes them, so that the result equals the direct build array for array (the spec's `history` and
`created_at` aside).

- **convert** `CACHE --targets dense|topk:K|sample:K`: the same cache with other targets, derived from the stored
  member logits (a sparse source needs them: built with `--member-logits`). A sparse result keeps the member logits
  only with `--member-logits`, as a build does; a dense one always keeps them.
- **subset** `CACHE --members NAME... --views N`: some of the members (in the order given: the direct build's
  `--teacher` order) and the views 0..N-1 (a count, as `build --views N` draws them: views are a pure function of
  (seed, example index, view), and a cache holds views 0..V-1, so a list of arbitrary views is no build's).
- **merge** `A B`: A's members then B's, over the same transfer set and views, with the same temperature, combine
  rule, targets, view settings, storage and compute dtypes, folds and eval split. The members must be disjoint
  (by parameter digest). Merging "the same members over disjoint views" is refused: every cache holds views
  0..V-1, so two caches of the same members always share views 0..min(V_A, V_B)-1; `teacher-cache extend --views`
  grows one cache's views instead.

The result is in the grouped row order, of this stillroom's schema, with the chunk rows given (`--chunk-rows`) or
else the source's (A's for merge), rounded down to whole examples where the views changed (the default of a build,
`default_chunk_rows`, when the source's are not a multiple of the result's views). Caches of specialists are
refused: their targets are q of the specialists, which no member logits give.
"""

import dataclasses

from shared import __version__, storage
from shared.cache import FEATURE_KINDS, GROUPED, SCHEMA_VERSION, CacheSpec, FeatureSpec, now_iso, open_cache
from shared.errors import StillroomError
from shared.options import CONVERT, MERGE, SUBSET
from shared.outputs import STORE, check_not_an_input, check_output, is_store
from teacher_cache.build import BuildConfig, check_settings, default_chunk_rows


def _short(digest: str) -> str:
  return digest[:12] + "…"


def check_source(spec: CacheSpec, path: str, command: str) -> None:
  """Refuses a source cache whose targets cannot be derived again from what it stores.

  Raises:
    StillroomError: a cache of specialists; a sparse cache without member logits.
  """
  if spec.specialists:
    raise StillroomError(f"{path!r} is a cache of a generalist and {len(spec.specialists)} specialists: its targets "
                         f"are their combination q, which `{command}` cannot derive from member logits; build the "
                         "cache you want directly.")
  if not spec.member_logits:
    raise StillroomError(f"{path!r} stores {spec.targets} targets without its members' logits, from which `{command}` "
                         "derives targets: build it again with --member-logits.")


def _feature_order(feature: FeatureSpec) -> tuple:
  """A build's order of features (`teacher_cache.build._feature_specs`): by member, name, then kind."""
  return feature.member, feature.name, list(FEATURE_KINDS).index(feature.kind)


def _chunk_rows(given: int | None, source: int, views: int) -> int:
  """The result's chunk rows: those given, else the source's when they hold whole examples of `views` views (or
  fewer rows than a view count), else a build's default for `views`."""
  if given is not None:
    return given
  return source if source % views == 0 or source < views else default_chunk_rows(views)


def _derived(source: CacheSpec, config: BuildConfig, **changes) -> CacheSpec:
  """The spec of a cache made now from `source` with `changes`: a build's row order, schema and software, chunk rows
  as `_chunk_rows` gives, the arrays listed again. Checks the chunk rows against the views as a build does."""
  views = changes.get("views", source.views)
  chunk_rows = _chunk_rows(config.chunk_rows, source.chunk_rows, views)
  check_settings(dataclasses.replace(config, views=views, chunk_rows=chunk_rows, targets=changes.get(
      "targets", source.targets), temperature=source.temperature, combine=source.combine, dtype=source.dtype,
                                     seed=source.augmentation.seed, folds=source.folds))
  return dataclasses.replace(source, **{"row_order": GROUPED, "schema_version": SCHEMA_VERSION,
                                        "software_version": __version__, "created_at": now_iso(), "arrays": (),
                                        "chunk_rows": chunk_rows, **changes})


def convert_spec(source: CacheSpec, config: BuildConfig, path: str = "CACHE") -> CacheSpec:
  """The spec of `convert`: `source` with `config.targets`, and member logits kept when dense or
  `config.member_logits`.

  Raises:
    StillroomError: a source `check_source` refuses; targets that are not dense, topk:K (K <= C) or sample:K; the
      targets and member logits the source already stores.
  """
  check_source(source, path, CONVERT)
  targets = CacheSpec.canonical_targets(config.targets)
  member_logits = targets == "dense" or config.member_logits
  if (targets, member_logits) == (source.targets, source.member_logits):
    raise StillroomError(f"{path!r} already stores {targets} targets" + ("" if targets == "dense" else (
        " with" if member_logits else " without") + " member logits") + ": nothing to convert.")
  return _derived(source, config, targets=targets, member_logits=member_logits)


def _member_index(source: CacheSpec, text: str, path: str) -> int:
  """The member `text` names: a member's name (`CacheSpec.member_name`), or its index."""
  names = [source.member_name(m) for m in range(source.num_members)]
  found = [m for m, name in enumerate(names) if name == text]
  if len(found) > 1:
    raise StillroomError(f"--members {text!r}: members {', '.join(map(str, found))} of {path!r} are all named "
                         f"{text!r}; give the member's index instead (0..{len(names) - 1}).")
  if found:
    return found[0]
  if text.isascii() and text.isdigit() and int(text) < len(names):
    return int(text)
  raise StillroomError(f"--members {text!r}: {path!r} has no such member; its members are "
                       f"{', '.join(repr(n) for n in names)} (or their indices 0..{len(names) - 1}).")


def subset_spec(source: CacheSpec, members, views: int | None, config: BuildConfig, path: str = "CACHE") -> CacheSpec:
  """The spec of `subset`: the members named (in that order; None: all, in the cache's order) over views
  0..`views`-1 (None: all).

  Raises:
    StillroomError: a source `check_source` refuses; a member not in the cache (listing its members) or named twice;
      views out of 1..V; a subset that keeps everything in its order.
  """
  check_source(source, path, SUBSET)
  keep = list(range(source.num_members)) if members is None else [_member_index(source, m, path) for m in members]
  if not keep:
    raise StillroomError("--members: give at least one member.")
  twice = sorted({source.member_name(m) for m in keep if keep.count(m) > 1})
  if twice:
    raise StillroomError(f"--members names {', '.join(map(repr, twice))} more than once; a member given twice only "
                         "weighs it double.")
  views = source.views if views is None else views
  if not 1 <= views <= source.views:
    raise StillroomError(f"--views {views}: {path!r} holds views 0..{source.views - 1}; give a count in "
                         f"1..{source.views} (the views 0..N-1 are kept; `teacher-cache extend --views` adds views).")
  if keep == list(range(source.num_members)) and views == source.views:
    raise StillroomError(f"--members and --views keep every member and view of {path!r} in its order: nothing to "
                         "subset (give fewer members or fewer views).")
  features = tuple(sorted((dataclasses.replace(f, member=keep.index(f.member)) for f in source.features
                           if f.member in keep), key=_feature_order))
  runs = tuple(run for m in keep for run in source.member_runs(m))
  return _derived(source, config, members=runs, views=views, features=features)


def _described(spec: CacheSpec):
  """The settings two merged caches must share, each as `(name, value compared, how it is shown)`."""
  data = spec.dataset
  evaluation = spec.eval_dataset
  augmentation = {k: v for k, v in spec.augmentation.to_dict().items() if k != "seed"}
  return [
      ("transfer set", data.fingerprint, f"{data.name} {data.split} (fingerprint {_short(data.fingerprint)})"),
      ("eval split", None if evaluation is None else evaluation.fingerprint,
       "none" if evaluation is None else f"{evaluation.name} {evaluation.split} "
                                         f"(fingerprint {_short(evaluation.fingerprint)})"),
      ("temperature", spec.temperature, f"{spec.temperature:g}"),
      ("combine", spec.combine, spec.combine),
      ("views", spec.views, str(spec.views)),
      ("view seed", spec.augmentation.seed, str(spec.augmentation.seed)),
      ("augmentation", augmentation, str(augmentation)),
      ("targets", (spec.targets, spec.member_logits), spec.targets + (
          "" if spec.target_kind == "dense" else " with member logits" if spec.member_logits else "")),
      ("dtype", spec.dtype, spec.dtype),
      ("compute dtype", spec.compute_dtype, spec.compute_dtype),
      ("folds", spec.folds, str(spec.folds)),
      ("classes", spec.num_classes, str(spec.num_classes)),
  ]


def merge_spec(a: CacheSpec, b: CacheSpec, config: BuildConfig, paths: tuple[str, str] = ("A", "B")) -> CacheSpec:
  """The spec of `merge`: A's members then B's over the settings both share, features and eval logits of both.

  Raises:
    StillroomError: a source `check_source` refuses; any setting the two do not share (each named, with both
      values); a member in both.
  """
  for spec, path in zip((a, b), paths):
    check_source(spec, path, MERGE)
  differ = [f"{name}: {shown_a} ({paths[0]}) vs {shown_b} ({paths[1]})"
            for (name, value_a, shown_a), (_, value_b, shown_b) in zip(_described(a), _described(b))
            if value_a != value_b]
  if differ:
    views_only = all(d.startswith("views:") for d in differ)
    raise StillroomError(f"cannot merge {paths[0]!r} and {paths[1]!r}: {'; '.join(differ)}. " + (
        "Merge joins the members of two caches of the same views: `teacher-cache subset --views` one, or "
        "`teacher-cache extend --views` the other, first." if views_only else
        "Merge joins caches of the same data, views and settings."))
  digests = {run.digest: run.name for run in a.members}
  both = [f"{run.name!r} (digest {_short(run.digest)})" for run in b.members if run.digest in digests]
  if both:
    raise StillroomError(f"cannot merge {paths[0]!r} and {paths[1]!r}: both hold member{'s' if len(both) > 1 else ''} "
                         f"{', '.join(both)}. Merge joins disjoint members over the same views (caches of the same "
                         "members never hold disjoint views: each holds views 0..V-1); `teacher-cache subset "
                         "--members` drops a member from one first.")
  shifted = tuple(dataclasses.replace(f, member=f.member + a.num_members) for f in b.features)
  return _derived(a, config, members=a.members + b.members,
                  features=tuple(sorted(a.features + shifted, key=_feature_order)))


def _prepare(sources: list[str], config: BuildConfig, command: str):
  """The opened sources, once `--out` is known to be none of them and not a file (nor, with `--overwrite`, anything
  but a store)."""
  if not config.out:
    raise StillroomError("give --out NEW.zarr.")
  check_not_an_input(config.out, sources, "--out")
  check_output(config.out, STORE, config.overwrite)
  if not config.overwrite and storage.has_entries(config.out) and not is_store(config.out):
    raise StillroomError(f"--out {config.out!r} exists and is not a stillroom cache; choose another --out.")
  return [open_cache(path) for path in sources]


def _write(spec: CacheSpec, sources: list, config: BuildConfig, command: str) -> str:
  raise NotImplementedError("the grow engine is not merged yet")


def convert_cache(cache: str, config: BuildConfig) -> str:
  """`teacher-cache convert`: writes `config.out`, the cache `cache` with `config.targets` (`convert_spec`).

  Args:
    cache: the source cache.
    config: the settings `BuildConfig` declares for `convert`: targets, member_logits, chunk_rows, out, overwrite,
      batch_size, progress, ignore_limits.

  Returns:
    `config.out`.

  Raises:
    StillroomError: every refusal of `convert_spec`; an `--out` that is a source, a file, or a store of another spec.
  """
  (source,) = _prepare([cache], config, CONVERT)
  return _write(convert_spec(source.spec, config, cache), [source], config, CONVERT)


def subset_cache(cache: str, members, views: int | None, config: BuildConfig) -> str:
  """`teacher-cache subset`: writes `config.out`, the members `members` (names or indices; None: all) of `cache`
  over its views 0..`views`-1 (None: all) (`subset_spec`).

  Returns:
    `config.out`.

  Raises:
    StillroomError: every refusal of `subset_spec`; an `--out` that is a source, a file, or a store of another spec.
  """
  (source,) = _prepare([cache], config, SUBSET)
  return _write(subset_spec(source.spec, members, views, config, cache), [source], config, SUBSET)


def merge_caches(a: str, b: str, config: BuildConfig) -> str:
  """`teacher-cache merge`: writes `config.out`, the members of `a` then of `b` (`merge_spec`).

  Returns:
    `config.out`.

  Raises:
    StillroomError: every refusal of `merge_spec`; an `--out` that is a source, a file, or a store of another spec.
  """
  first, second = _prepare([a, b], config, MERGE)
  return _write(merge_spec(first.spec, second.spec, config, (a, b)), [first, second], config, MERGE)
