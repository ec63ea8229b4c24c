"""`teacher-cache convert`, `subset` and `merge`: caches derived from stored caches, running no teacher.

Each command first works out the build settings of the cache it makes and its members (`convert_plan`,
`subset_plan`, `merge_plan`: every refusal of the command is raised there, before anything is written), and then
writes it through the grow engine (`teacher_cache.grow.grow_cache`) with no teacher: the engine copies each member's
logits (features, eval-split logits, row arrays) from the sources and writes the targets as a build writes them,
from the member logits as stored, so that the result equals the direct `teacher-cache build` of those settings array
for array (the spec's `history` and `created_at` aside). The transfer set must be at hand (`--data-dir`), as for
`verify`: the engine checks its fingerprint; it reads no image.

- **convert** `CACHE --targets dense|topk:K|sample:K`: the same cache with other targets, derived from the stored
  member logits (a sparse source needs them: built with `--member-logits`). A sparse result keeps the member logits
  only with `--member-logits`, as a build does; a dense one always keeps them.
- **subset** `CACHE --members NAME... --views N`: some of the members (in the order given: the direct build's
  `--teacher` order) and the views 0..N-1 (a count, as `build --views N` draws them: views are a pure function of
  (seed, example index, view), and a cache holds views 0..V-1, so a list of arbitrary views is no build's). Mixed
  views (`--mix`) too: a row's partner, λ and box do not depend on V (`shared.augment.mix_params`), but at least 2
  views are kept (view 0 is never mixed).
- **merge** `A B`: A's members then B's, over the same transfer set and views, with the same temperature, combine
  rule, targets, view settings, storage and compute dtypes, folds and eval split. The members must be disjoint
  (by parameter digest). Merging "the same members over disjoint views" is refused: every cache holds views
  0..V-1, so two caches of the same members always share views 0..min(V_A, V_B)-1; `teacher-cache extend --views`
  grows one cache's views instead.

The result is what this stillroom's build writes (its row order and schema), with the chunk rows given
(`--chunk-rows`) or else the source's (A's for merge), or a build's default for the views kept
(`default_chunk_rows`) when the source's would split an example's views. The sources are checked as the engine's
(`teacher_cache.grow.check_source`): member logits stored, no cross-fitted members, no specialists.
"""

import dataclasses

from shared import storage
from shared.augment import NO_MIX
from shared.cache import Cache, CacheSpec, parse_targets
from shared.settings import short_digest as _short
from shared.errors import StillroomError
from shared.log import logger
from shared.options import CONVERT, MERGE, SUBSET
from shared.outputs import is_store
from shared.settings import names_where
from teacher_cache.build import BuildConfig, kept_chunk_rows
from teacher_cache.grow import grow_cache, open_source, source_config

_LOG = logger(__name__)


def _grown_config(source: CacheSpec, config: BuildConfig, command: str, features=None, **changes) -> BuildConfig:
  """The build settings of the result: `source`'s (`source_config`), the settings `command` offers (as `config` has
  them, `changes` taking precedence), the features (`(member, FeatureSpec)` in the result's numbering; None: the
  source's) and the chunk rows (`teacher_cache.build.kept_chunk_rows`). `grow_cache` checks them as a build does."""
  if features is not None:
    changes["features"] = ",".join(f"{f.name}:{f.kind}@{m}" for m, f in features) or None
  views = changes.get("views", source.views)
  own = {name: getattr(config, name) for name in names_where(BuildConfig, command=command) if name != "chunk_rows"}
  return source_config(source, **{**own, **changes},
                       chunk_rows=kept_chunk_rows(config.chunk_rows, source.chunk_rows, views))


def convert_plan(source: CacheSpec, config: BuildConfig, path: str = "CACHE") -> tuple[BuildConfig, None, dict]:
  """What `convert` writes: `source` with `config.targets`, the member logits kept when dense or
  `config.member_logits`.

  Returns:
    `(build settings, members None (the source's), history entry)` for `grow_cache`.

  Raises:
    StillroomError: targets that are not dense, topk:K or sample:K (K <= C for topk); the targets and member logits
      the source already stores.
  """
  targets = CacheSpec.canonical_targets(config.targets)
  member_logits = targets == "dense" or config.member_logits
  if (targets, member_logits) == (source.targets, source.member_logits):
    raise StillroomError(f"{path!r} already stores {targets} targets" + ("" if targets == "dense" else (
        " with" if member_logits else " without") + " member logits") + ": nothing to convert.")
  kind, k = parse_targets(targets)
  if kind == "topk" and k > source.num_classes:
    raise StillroomError(f"--targets {targets}: K is more than the {source.num_classes} classes.")
  grown = _grown_config(source, config, CONVERT, targets=targets, member_logits=member_logits and targets != "dense")
  return grown, None, {"command": CONVERT, "targets": [source.targets, targets],
                       "member_logits": [source.member_logits, member_logits]}


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


def subset_plan(source: CacheSpec, members, views: int | None, config: BuildConfig,
                path: str = "CACHE") -> tuple[BuildConfig, list[str], dict]:
  """What `subset` writes: the members named (in that order; None: all, in the cache's order) over views
  0..`views`-1 (None: all).

  Returns:
    `(build settings, the members' parameter digests in order, history entry)` for `grow_cache`.

  Raises:
    StillroomError: a member not in the cache (listing its members) or named twice; views out of 1..V, or 1 view of
      mixed ones; a subset that keeps everything in its order.
  """
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
  if views < 2 and source.augmentation.mix_kind != NO_MIX:
    raise StillroomError(f"--views {views}: the views of {path!r} are mixed ({source.augmentation.mix}) and view 0 is "
                         f"never mixed, so a mixed cache keeps 2 views or more: give a count in 2..{source.views}.")
  if keep == list(range(source.num_members)) and views == source.views:
    raise StillroomError(f"--members and --views keep every member and view of {path!r} in its order: nothing to "
                         "subset (give fewer members or fewer views).")
  features = [(keep.index(f.member), f) for f in source.features if f.member in keep]
  grown = _grown_config(source, config, SUBSET, features=features, views=views)
  names = [source.member_name(m) for m in keep]
  return grown, [source.members[m].digest for m in keep], {"command": SUBSET, "members": names,
                                                             "views": [source.views, views]}


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


def merge_plan(a: CacheSpec, b: CacheSpec, config: BuildConfig,
               paths: tuple[str, str] = ("A", "B")) -> tuple[BuildConfig, None, dict]:
  """What `merge` writes: A's members then B's over the settings both share, with the features and eval logits of
  both.

  Returns:
    `(build settings, members None (A's then B's), history entry)` for `grow_cache`.

  Raises:
    StillroomError: any setting the two do not share (each named, with both values); a member in both.
  """
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
  features = [(f.member, f) for f in a.features] + [(f.member + a.num_members, f) for f in b.features]
  grown = _grown_config(a, config, MERGE, features=features)
  return grown, None, {"command": MERGE, "members": [[r.name for r in a.members], [r.name for r in b.members]]}


def _prepare(sources: list[str], config: BuildConfig) -> list[Cache]:
  """The opened sources (`teacher_cache.grow.open_source`), once an `--out` is given and is not a directory of
  something else. (The grow engine checks the rest of `--out` as a build does: none of the sources, not a file.)"""
  if not config.out:
    raise StillroomError("give --out NEW.zarr.")
  # Here, before the engine reads the transfer set, and with the one way out: `build.open_store` would say the same
  # later, suggesting --overwrite, which `shared.outputs.check_output` refuses for a directory stillroom did not make.
  if not config.overwrite and storage.has_entries(config.out) and not is_store(config.out):
    raise StillroomError(f"--out {config.out!r} exists and is not a stillroom cache; choose another --out.")
  return [open_source(path) for path in sources]


def _write(plan: tuple, sources: list[Cache]) -> str:
  """Writes the planned cache through the grow engine, running no teacher."""
  grown, members, history = plan
  # A rerun on the complete output: the engine confirms it ("already complete ... nothing to do") and writes nothing.
  done = not grown.overwrite and is_store(grown.out, complete=True)
  out = grow_cache(dataclasses.replace(grown, teachers=()), sources, members=members, history=history)
  if not done:
    _LOG.info(f"{history['command']}: wrote {out} from {', '.join(s.path for s in sources)} (no teacher run)")
  return out


def convert_cache(cache: str, config: BuildConfig) -> str:
  """`teacher-cache convert`: writes `config.out`, the cache `cache` with `config.targets` (`convert_plan`).

  Args:
    cache: the source cache.
    config: the settings `BuildConfig` declares for `convert`: targets, member_logits, chunk_rows, out, overwrite,
      data_dir, progress, ignore_limits.

  Returns:
    `config.out`.

  Raises:
    StillroomError: every refusal of `convert_plan` and of a source (`teacher_cache.grow.check_source`); an `--out`
      that is the source, a file, a directory of something else, or a store of other settings (without
      `--overwrite`).
  """
  (source,) = _prepare([cache], config)
  return _write(convert_plan(source.spec, config, cache), [source])


def subset_cache(cache: str, members, views: int | None, config: BuildConfig) -> str:
  """`teacher-cache subset`: writes `config.out`, the members `members` (names or indices; None: all) of `cache`
  over its views 0..`views`-1 (None: all) (`subset_plan`).

  Returns:
    `config.out`.

  Raises:
    StillroomError: as `convert_cache`, with the refusals of `subset_plan`.
  """
  (source,) = _prepare([cache], config)
  return _write(subset_plan(source.spec, members, views, config, cache), [source])


def merge_caches(a: str, b: str, config: BuildConfig) -> str:
  """`teacher-cache merge`: writes `config.out`, the members of `a` then of `b` (`merge_plan`).

  Returns:
    `config.out`.

  Raises:
    StillroomError: as `convert_cache`, with the refusals of `merge_plan`.
  """
  first, second = _prepare([a, b], config)
  return _write(merge_plan(first.spec, second.spec, config, (a, b)), [first, second])
