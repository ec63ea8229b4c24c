"""Command line of `teacher-cache`: parses arguments and calls one library function per subcommand."""

import argparse
import dataclasses
import json
import sys
import textwrap

from shared.cache import LAYOUT
from shared.data import PREPARED_PREFIX
from shared.cli import add_models_command, add_verbosity_options, print_models, run_or_exit
from shared.data.prepared import is_prepared
from shared.errors import StillroomError
from shared.options import BUILD, CONVERT, EXTEND, IMPORT, MERGE, SUBSET, VIEWS
from shared.settings import add_options, from_args
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.derive import convert_cache, merge_caches, subset_cache
from teacher_cache.extend import ExtendConfig, extend_cache
from teacher_cache.external import IMPORTED, import_cache, write_views
from teacher_cache.logprobs import import_logprobs, record_lines, refuse_logprob_settings
from teacher_cache.info import cache_info, history_lines, prepared_info
from teacher_cache.prepare import PREPARE, PrepareConfig, prepare_images
from teacher_cache.specialists import plan_specialists
from teacher_cache.verify import verify_cache

_DESCRIPTION = """\
Run a teacher ensemble once over a transfer set and cache its temperature-scaled outputs in a Zarr v3 store
that student runs stream from (see `student-train fit --cache`).

example:
  student-train fit --model cnn-large --dataset digits --split train --out runs/t0
  teacher-cache build --dataset digits --split train --teacher runs/t0 --teacher runs/t1 \\
      --combine arithmetic --temperature 4 --views 4 --out digits.zarr
  teacher-cache info digits.zarr
  teacher-cache verify digits.zarr --dataset digits --split train

natural images decoded once, then read as prepared pixels by build and fit:
  teacher-cache prepare imagefolder:photos/train --image-size 32 --out photos32.zarr
  teacher-cache build --dataset prepared:photos32.zarr --image-size 32 --teacher RUN --out photos.zarr

mixed views: views 1..7 of every example blended with a partner view (CutMix: a pasted box), λ ~ Beta(1, 1);
the teachers label the mixed images and the student renders the same ones from the rows:
  teacher-cache build --dataset digits --teacher runs/t0 --views 8 --mix cutmix:1 --out digits-cutmix.zarr
  student-train fit --cache digits-cutmix.zarr --model mlp-small --alpha 0 --out runs/s-cutmix

a cache derived from caches, running no teacher:
  teacher-cache convert digits.zarr --targets topk:5 --out digits-top5.zarr
  teacher-cache subset digits.zarr --members t0 --views 2 --out digits-t0.zarr
  teacher-cache merge digits-t01.zarr digits-t23.zarr --out digits-t0123.zarr

a teacher outside JAX labels the rows' inputs, then its logits become a cache:
  teacher-cache views --dataset digits --views 4 --out views
  teacher-cache import --dataset digits --views 4 --logits torch.npz --out torch.zarr
"""


_LOGPROBS_HELP = """\
--logprobs FILE: a language model's top-k log-probabilities of the token rows of a text: dataset (row ids those of
`teacher-cache views`; a teacher scores each document piece on its own: it may not attend across a segment):
  .jsonl, one line per row or per piece, with `row` and `start` (its first row position, default 0):
    vLLM:       {"row": 0, "prompt_token_ids": [..], "prompt_logprobs": [null, {"104": {"logprob": -0.3, "rank": 1}}]}
                (or a server response with choices[0].prompt_logprobs); entry i is token i's distribution, its top
                k plus the prompt's own token; -9999.0 is -inf
    axolotl v1: {"row": 0, "input_ids": [..], "logprobs": [[{"token": "token_id:104", "logprob": -0.3}, ..], ..]}
    axolotl v2: {"row": 0, "input_ids": [..], "logprobs": [[-0.3, ..], ..], "target_token_ids": [[104, ..], ..]}
                (list j is the distribution of input_ids[j + 1])
  .npz / .parquet: row [R], token_ids [R, L], topk_ids [R, L, K] (-1: no distribution), topk_log_probs [R, L, K];
    position j holds the distribution of token j + 1.
The scored tokens must be the rows' (refused otherwise, naming file, row, position and document), every position
that predicts a token needs a distribution; the cache is topk:K (K the files' k, or --targets topk:K) at
--generation-temperature, or re-tempered with --retemper T. See docs/external-teachers.md."""


def teacher_cache_parser() -> argparse.ArgumentParser:
  """The `teacher-cache` command line."""
  parser = argparse.ArgumentParser(prog="teacher-cache", description=_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
  commands = parser.add_subparsers(dest="command", required=True)

  layout = "\n".join(f"  {a.name:<20} {a.shape:<24} {a.dtype:<8} {a.meaning}" for a in LAYOUT)
  build = commands.add_parser(
      "build", allow_abbrev=False, help="build (or resume) a cache",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Build a cache; running the same command again resumes an interrupted build.\n\n"
                  f"Arrays (R rows = examples x views, E eval examples, M members, C classes; 'storage' = --dtype):"
                  f"\n{layout}")
  build.add_argument("--teacher", action="append", required=True, metavar="RUN_DIR|module:function",
                     help="ensemble member: a run dir written by `student-train fit`, or module:function returning "
                          "an nnx.Module or (apply_fn, params); repeat for each member")
  build.add_argument("--specialists", nargs="+", action="append", metavar="PLAN.json RUN_DIR",
                     help="Hinton et al.'s specialists: the plan (`teacher-cache specialists`), then specialist run "
                          "dirs (`student-train fit --specialist`); the one --teacher is the generalist, and the "
                          "targets are their combination q (see --top-n)")
  add_options(build, BuildConfig, BUILD, required=("out",))

  views = commands.add_parser(
      "views", allow_abbrev=False, help="write every row's teacher input to .npz files, for teachers outside JAX",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Write the input of every row of a cache with these view settings, rendered and normalised as a "
                  "teacher receives it:\n  OUT/views_00000.npz ...  x float32 [n, *input_shape], row int64 [n] (the "
                  "row ids)\n  OUT/views.json            the settings (written last: the views are complete)\n"
                  "Run your teacher on each file's x and save one .npz per member with `row` and `logits` [n, C]; "
                  "then `teacher-cache import` with the same view options builds the cache.\n\n"
                  "Token rows (--dataset text:PATH --seq-len L): each file holds x int32 [n, L] the token ids, "
                  "segment_ids int32 [n, L] (1, 2, ... the row's document pieces; 0 padding) and row int64 [n]. A "
                  "language model must score each document piece on its own (a segment is a prompt: never attend "
                  "across a segment boundary); its top-k log-probabilities go to `teacher-cache import --logprobs`.")
  add_options(views, BuildConfig, VIEWS, required=("out",))

  imported = commands.add_parser(
      "import", allow_abbrev=False, help="build a cache from another framework's logits on the rows of `views`",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=textwrap.fill(
          "Build a cache from external teachers' logits on the rows written by `teacher-cache views`, given the same "
          "--dataset, --split, --views, --seed and view options. The cache is like any other: the same spec, "
          "targets, `info` and `verify`; it stores no eval split.", 116) + "\n\n" + _LOGPROBS_HELP)
  given = imported.add_mutually_exclusive_group(required=True)
  given.add_argument("--logits", action="append", metavar="MEMBER.npz",
                     help="one ensemble member's logits: an .npz with `row` (row ids, any order, each row once) "
                          "and `logits` [R, C]; repeat for each member")
  given.add_argument("--logprobs", action="append", metavar="FILE",
                     help="a language model's per-token top-k log-probabilities on the token rows of a text: "
                          "dataset (.jsonl in vLLM's or axolotl's layout, .npz or .parquet; see above); repeat for "
                          "shards of one teacher's rows")
  imported.add_argument("--views-dir", metavar="DIR", help="the views the logits are of (`teacher-cache views`): "
                                                           "refuse settings other than theirs")
  add_options(imported, BuildConfig, IMPORT, required=("out",))

  extend = commands.add_parser(
      "extend", allow_abbrev=False, help="add members or views to a cache, computing only what it lacks",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Extend a cache: --teacher RUN adds a member (only the new teachers run, over the views its rows "
                  "hold,\nreplayed from their stored parameters; the targets are rewritten for the larger ensemble); "
                  "--views N\nadds views V..N-1 of every example (only those rows are computed, by every member's run: "
                  "where\nthe cache records it, or given with --teacher). The result equals a direct `build` of the "
                  "final\nmembers and views, array for array; `info` shows its history. The cache must store its "
                  "members'\nlogits (dense targets, or sparse ones built with --member-logits).\n\n"
                  "The original is never lost: the extended cache is built beside it (CACHE.extending; running the "
                  "same\ncommand again resumes an interrupted extend) and replaces it only once complete: by one "
                  "atomic exchange\nof the two directories where the file system offers it (Linux renameat2), else by "
                  "two renames\n(CACHE -> CACHE.replaced, CACHE.extending -> CACHE), then the old one is deleted; a "
                  "kill\nduring the switch is finished by the next extend of CACHE. --out NEW leaves CACHE as it is "
                  "(the only\nway on an object store). Students of the old and of the extended cache are different "
                  "runs: a\nrun dir of one refuses to resume on the other.",
      epilog="example:\n"
             "  teacher-cache build --dataset digits --teacher runs/t0 --teacher runs/t1 --views 4 --out digits.zarr\n"
             "  teacher-cache extend digits.zarr --teacher runs/t2        # a third member, in place\n"
             "  teacher-cache extend digits.zarr --views 8 --out digits8.zarr   # 4 more views, a new store\n"
             "  teacher-cache info digits.zarr")
  extend.add_argument("cache", metavar="CACHE.zarr", help="a complete cache with stored member logits")
  extend.add_argument("--teacher", action="append", default=[], metavar="RUN_DIR|module:function",
                      help="a new ensemble member (repeat for each); with --views, also an existing member's run "
                           "where the cache's record of it is out of date")
  add_options(extend, ExtendConfig, EXTEND)
  add_options(extend, BuildConfig, EXTEND)

  _add_derive_commands(commands)

  specialists = commands.add_parser(
      "specialists", allow_abbrev=False, help="plan specialists on confusable class subsets of a generalist's cache",
      description="Cluster the classes for Hinton et al.'s specialists: K-means on the columns of the covariance of "
                  "the cached ensemble's class probabilities at T=1 over all rows. The plan lists disjoint class "
                  "subsets, each with its size and the share of the generalist's probability that stays within it "
                  "on examples of its classes; train specialist k with `student-train fit --specialist PLAN.json:k "
                  "--init-from GENERALIST_RUN`.")
  specialists.add_argument("cache", metavar="CACHE.zarr", help="a cache of the generalist, with member logits")
  specialists.add_argument("--clusters", type=int, required=True, metavar="K", help="class subsets (2..C)")
  specialists.add_argument("--out", required=True, metavar="PLAN.json", help="the plan file to write")
  specialists.add_argument("--seed", type=int, default=0, help="K-means' seed (default: %(default)s)")
  specialists.add_argument("--overwrite", action="store_true", help="replace an existing --out")

  info = commands.add_parser("info", allow_abbrev=False, help="spec and teacher statistics of a cache (or what a "
                                                              "prepared image store holds)")
  info.add_argument("cache", metavar="CACHE.zarr", help="a store written by `teacher-cache build` (or `prepare`)")
  info.add_argument("--json", action="store_true", help="print one JSON object")

  verify = commands.add_parser("verify", allow_abbrev=False, help="check a cache; exit 1 if any check fails")
  verify.add_argument("cache", metavar="CACHE.zarr", help="a store written by `teacher-cache build`")
  verify.add_argument("--dataset", help="check against this dataset (default: the one the cache records, if it "
                                        "can be opened here)")
  verify.add_argument("--split", help="its split (default: the one the cache records)")
  verify.add_argument("--data-dir", help="TFDS data dir")
  verify.add_argument("--json", action="store_true", help="print one JSON object")

  prepare = commands.add_parser(
      "prepare", allow_abbrev=False, help="decode a natural-image dataset once into a store of prepared pixels",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Decode every image of DATASET once, resize it so that its shorter side is M*S pixels (PIL\n"
                  "bilinear with antialiasing, the filter of crop views), and store it on a fixed canvas (edge-\n"
                  "replicated beyond the image) in a Zarr v3 store with its size, label and the source's fingerprint.\n"
                  "`build` and `fit` then read it as `--dataset prepared:STORE --image-size S`, decoding nothing; a\n"
                  "cache built from it records it, so a student renders the same pixels the teachers saw. Running\n"
                  "the same command again resumes an interrupted prepare; `info STORE` shows what it holds.\n\n"
                  "example:\n"
                  "  teacher-cache prepare imagefolder:photos/train --image-size 32 --out photos32.zarr\n"
                  "  teacher-cache build --dataset prepared:photos32.zarr --image-size 32 --views 8 --teacher RUN \\\n"
                  "      --out cache.zarr")
  prepare.add_argument("dataset", metavar="DATASET", help="the images: 'imagefolder:DIR', a TFDS image dataset "
                                                          "prepared in --data-dir, or an 'npz:' of uint8 images")
  add_options(prepare, PrepareConfig, PREPARE, required=("out", "image_size"))

  add_models_command(commands)
  add_verbosity_options(parser)
  return parser


_EQUALS = ("The result equals, array for array, the cache a `teacher-cache build` with the resulting settings writes "
           "(its spec's history and creation time aside); `verify` checks it like any other. The transfer set must "
           "be at hand (--data-dir): its fingerprint is checked, no image is read. Running the same command again "
           "resumes an interrupted one; nothing is written when the command is refused.")


def _described(*paragraphs: str, examples: tuple[str, ...]) -> str:
  """A subcommand's description: its paragraphs wrapped for a terminal, then its examples as they are."""
  return "\n\n".join(textwrap.fill(p, 110) for p in paragraphs) + "\n\nexample:\n" + "\n".join(
      f"  {e}" for e in examples)


def _add_derive_commands(commands) -> None:
  """`convert`, `subset` and `merge` (`teacher_cache.derive`)."""
  convert = commands.add_parser(
      "convert", allow_abbrev=False,
      help="a cache with other targets, derived from its member logits (no teacher runs)",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=_described(
          "Write CACHE again with other targets (--targets), derived from the members' logits it stores: a dense "
          "cache, or a sparse one built with --member-logits. A sparse result keeps the member logits only with "
          "--member-logits, as a build does.", _EQUALS,
          examples=("teacher-cache convert digits.zarr --targets topk:5 --out digits-top5.zarr",
                    "teacher-cache convert digits.zarr --targets sample:8 --member-logits --out digits-s8.zarr")))
  convert.add_argument("cache", metavar="CACHE.zarr", help="the source cache")
  add_options(convert, BuildConfig, CONVERT, required=("out", "targets"))

  subset = commands.add_parser(
      "subset", allow_abbrev=False, help="a cache of some of a cache's members and views (no teacher runs)",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=_described(
          "Write a cache of some of CACHE's members (--members, in the order given) and its views 0..N-1 (--views N, "
          "a count: as `build --views N` draws them), its targets derived again from the kept members' logits.",
          _EQUALS, examples=("teacher-cache subset digits.zarr --members t0 t2 --out digits-t02.zarr",
                             "teacher-cache subset digits.zarr --views 2 --out digits-2views.zarr")))
  subset.add_argument("cache", metavar="CACHE.zarr", help="the source cache")
  subset.add_argument("--members", nargs="+", dest="keep_members", metavar="NAME",
                      help="the members to keep, by name (`teacher-cache info` lists them) or index, in the order "
                           "of the new cache (default: every member, in the cache's order)")
  subset.add_argument("--views", type=int, dest="keep_views", metavar="N",
                      help="keep views 0..N-1 of every example (default: every view)")
  add_options(subset, BuildConfig, SUBSET, required=("out",))

  merge = commands.add_parser(
      "merge", allow_abbrev=False, help="one cache of the members of two (no teacher runs)",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=_described(
          "Write one cache of A's members then B's: two caches of the same transfer set, views, view seed and "
          "augmentation, temperature, combine rule, targets, storage and compute dtypes, folds and eval split, whose "
          "members are disjoint. (Caches of the same members cannot be merged: each holds views 0..V-1, so they "
          "share views; `teacher-cache extend --views` adds views to one.) The chunk rows are A's unless "
          "--chunk-rows is given.", _EQUALS,
          examples=("teacher-cache merge digits-t01.zarr digits-t23.zarr --out digits-t0123.zarr",)))
  merge.add_argument("a", metavar="A.zarr", help="the cache whose members come first")
  merge.add_argument("b", metavar="B.zarr", help="the cache whose members follow")
  add_options(merge, BuildConfig, MERGE, required=("out",))


def _format_percent(value) -> str:
  return "-" if value is None else f"{100 * value:.2f}%"


def _print_info(info: dict) -> None:
  spec = info["spec"]
  data = spec["dataset"]
  print(f"cache        {info['path']}  ({info['bytes'] / 1e6:.2f} MB, "
        f"{'complete' if info['complete'] else 'INCOMPLETE'}; schema {spec['schema_version']})")
  print(f"dataset      {data['name']} {data['split']} ({data['canonical_split']}): {data['count']} examples, "
        f"inputs {tuple(data['input_shape'])} {data['input_dtype']}, "
        f"{'labelled' if data['labeled'] else 'unlabelled'}, fingerprint {data['fingerprint'][:16]}…")
  if data["name"].startswith(PREPARED_PREFIX):
    print(f"views from   prepared images {data['name']}" + (
        f" (prepared from {info['prepared_from']['name']} {info['prepared_from']['split']}, fingerprint "
        f"{info['prepared_from']['fingerprint'][:16]}…)" if info.get("prepared_from") else "")
        + ": a student reads the same prepared pixels")
  aug = spec["augmentation"]
  views = (f"crop views at {aug['image_size']}x{aug['image_size']}, area {aug['crop_area']}, aspect "
           f"{[round(v, 3) for v in aug['crop_aspect']]}, rendered on the {aug.get('renderer', 'host')}"
           if aug.get("image_size") else f"max shift {aug['max_shift']}")
  if info.get("positions"):  # Token rows: their one view is the packed rows, which no shift or flip touches.
    views = f"rows of {info['positions']} tokens as packed"
  else:
    views = f"{views}, flip {aug['flip']}"
  print(f"rows         {info['rows']} = {data['count']} examples x {spec['views']} views "
        f"(seed {aug['seed']}, {views}); chunk rows {spec['chunk_rows']}, "
        f"examples in {spec['row_order']} order")
  mix = aug.get("mix", "none")
  if mix != "none":
    kind, alpha = mix.split(":")
    how = "λ·view + (1 − λ)·partner" if kind == "mixup" else "the partner's pixels in a box of area share 1 − λ"
    print(f"mixed views  {mix}: views 1..{spec['views'] - 1} each mixed with a partner view ({how}), λ ~ "
          f"Beta({alpha}, {alpha}); view 0 unmixed")
  stored = spec.get("targets", "dense") + ("" if spec.get("member_logits", True) else ", no member logits")
  rule = f"{spec['combine']} mean" if not spec.get("specialists") else \
      f"q of the generalist and {len(spec['specialists'])} specialists (top-{spec['top_n']})"
  print(f"targets      {rule} at T={spec['temperature']:g}, {spec['num_classes']} classes, "
        f"{stored}, {spec['dtype']}; stillroom {spec['software_version']}, created {spec['created_at']}")
  tolerance = info["target_tolerance"]
  print(f"compute      the teachers in {info['compute_dtype']}" + (
      "" if tolerance == 0 else "; no bound claimed for the specialists' q against a float32 build" if tolerance is None
      else f"; targets within total-variation distance {tolerance:g} of a float32 build's"))
  print("arrays       " + ", ".join(f"{name} {size:,} B" for name, size in info["bytes_per_row"].items())
        + " per row")
  if info.get("bytes_per_token"):  # A cache of token rows: what its targets cost per token.
    per_token = info["bytes_per_token"]
    print(f"per token    {per_token['total']:,.1f} B of teacher arrays per token ({info['positions']} positions a "
          f"row, {info['tokens']:,} tokens): " + ", ".join(f"{name} {size:,.1f} B" for name, size in per_token.items()
                                                              if name != "total"))
  stats = info.get("stats")
  folds = spec.get("folds", 1)
  print("teacher runs" + (f" ({folds} cross-fitted runs per member, member-major)" if folds > 1 else ""))
  for i, run in enumerate(spec["members"]):
    imported = "(log-probs)" if spec.get("imported") else "(logits)"  # `import --logprobs` or `--logits`.
    size = f"{imported:>16}" if run["model"] == IMPORTED else f"{run['num_params']:>9} params"  # None here.
    print(f"  [{i}] {run['name']:<20} {run['model']:<10} {size}  digest {run['digest'][:12]}")
  for i, specialist in enumerate(spec.get("specialists", ())):
    run = specialist["run"]
    print(f"  [s{i}] {run['name']:<19} {run['model']:<10} {run['num_params']:>9} params  digest {run['digest'][:12]}"
          f"  classes {specialist['classes']}, dustbin {specialist['dustbin_correction']:+.3f}")
  for line in history_lines(spec):  # How a grown cache was made (`extend`, ...), oldest first.
    print(f"history      {line}")
  for line in record_lines(spec["imported"]) if spec.get("imported") else ():  # `import --logprobs`'s record.
    print(f"import       {line}")
  for i, member in enumerate(stats["members"] if stats else []):
    print(f"member {i}     {member['name']}: accuracy {_format_percent(member['accuracy'])} "
          f"(view 0: {_format_percent(member['accuracy_view0'])})")
  if stats:
    ensemble = stats["ensemble"]
    drawn = " (of the most probable class drawn)" if ensemble.get("top1") == "the most probable class drawn" else ""
    print(f"ensemble     accuracy{drawn} {_format_percent(ensemble['accuracy'])} "
          f"(view 0: {_format_percent(ensemble['accuracy_view0'])}) on {stats['labelled_rows']} labelled "
          f"{'tokens' if info.get('positions') else 'rows'}")
    number = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    print(f"targets      mean entropy {number(stats['mean_target_entropy_nats'])} nats "
          f"(max {stats['max_entropy_nats']:.3f}), mean top-1 probability {number(stats['mean_top1_probability'])}"
          + (f", mean top-k mass {stats['mean_topk_mass']:.3f}" if stats.get("mean_topk_mass") is not None else ""))
    print(f"agreement    all members {_format_percent(stats['all_members_agree'])}, "
          f"pairwise {_format_percent(stats['mean_pairwise_agreement'])}")
    if "eval" in stats:
      evaluation = stats["eval"]
      print(f"eval split   {evaluation['split']} ({evaluation['count']} examples): members "
            + " / ".join(_format_percent(a) for a in evaluation["members"])
            + f", ensemble AM {_format_percent(evaluation['arithmetic'])}"
            + f", GM {_format_percent(evaluation['geometric'])}")


def _print_prepared(info: dict) -> None:
  spec = info["spec"]
  source = spec["source"]
  print(f"prepared     {info['path']}  ({info['bytes'] / 1e6:.2f} MB, "
        f"{'complete' if info['complete'] else 'INCOMPLETE: run its prepare again to finish it'}; version "
        f"{spec['version']})")
  print(f"source       {source['name']} {source['split']} ({source['canonical_split']}): {source['count']} examples, "
        f"fingerprint {source['fingerprint'][:16]}…")
  print(f"images       for {spec['image_size']} px views: shorter side {spec['short_side']} px (x{spec['scale']:g}), "
        f"aspect up to {spec['max_aspect']:.3g}, canvas {'x'.join(map(str, spec['canvas']))}, "
        f"{spec['chunk_images']} per shard; stillroom {spec['software_version']}, created {spec['created_at']}")
  if info.get("fingerprint"):
    print(f"dataset      prepared:{info['path']} (fingerprint {info['fingerprint'][:16]}…), "
          f"{spec['num_classes'] or 'no'} classes")


def main(argv: list[str] | None = None) -> None:
  args = teacher_cache_parser().parse_args(argv)

  def command():
    if args.command == "views":
      record = write_views(from_args(BuildConfig, args))
      print(f"wrote {record['rows']} rows of views to {args.out}")
    elif args.command == "import":
      config = from_args(BuildConfig, args)
      if args.logprobs:
        import_logprobs(config, args.logprobs, args.views_dir)
      else:
        refuse_logprob_settings(config)
        import_cache(config, args.logits, args.views_dir)
    elif args.command == "build":
      if args.specialists and len(args.specialists) > 1:
        raise StillroomError("give --specialists once: the plan, then every specialist run dir.")
      specialists = args.specialists[0] if args.specialists else []
      build_cache(from_args(BuildConfig, args, teachers=tuple(args.teacher),
                            specialist_plan=specialists[0] if specialists else None,
                            specialist_runs=tuple(specialists[1:])))
    elif args.command == "extend":
      out = extend_cache(args.cache, from_args(BuildConfig, args, teachers=tuple(args.teacher)),
                         from_args(ExtendConfig, args))
      print(f"extended cache: {out}")
    elif args.command == "convert":
      convert_cache(args.cache, from_args(BuildConfig, args))
    elif args.command == "subset":
      subset_cache(args.cache, args.keep_members, args.keep_views, from_args(BuildConfig, args))
    elif args.command == "merge":
      merge_caches(args.a, args.b, from_args(BuildConfig, args))
    elif args.command == "specialists":
      plan = plan_specialists(args.cache, args.clusters, args.out, seed=args.seed, overwrite=args.overwrite)
      for k, (subset, within) in enumerate(zip(plan.subsets, plan.within_mass)):
        print(f"specialist {k}: {len(subset)} class{'es' if len(subset) > 1 else ''} {list(subset)}, "
              f"{100 * within:.1f}% of the generalist's "
              "probability within them on their examples")
      print(f"wrote {args.out}")
    elif args.command == "info" and is_prepared(args.cache):
      info = prepared_info(args.cache)
      print(json.dumps(info, indent=2)) if args.json else _print_prepared(info)
    elif args.command == "info":
      info = cache_info(args.cache)
      print(json.dumps(info, indent=2)) if args.json else _print_info(info)
    elif args.command == "verify":
      checks = verify_cache(args.cache, args.dataset, args.split, args.data_dir)
      failed = any(c.failed for c in checks)
      if args.json:
        print(json.dumps({"ok": not failed, "checks": [dataclasses.asdict(c) for c in checks]}))
      else:
        for check in checks:
          status = "skip" if check.ok is None else "ok  " if check.ok else "FAIL"
          print(f"{status}  {check.name}" + (f"  ({check.detail})" if check.detail else ""))
      if failed:
        sys.exit(1)
    elif args.command == "prepare":
      done = prepare_images(from_args(PrepareConfig, args))
      print(f"prepared {done['images']} images of {done['source']} (fingerprint {done['source_fingerprint'][:16]}…) "
            f"at shorter side {done['short_side']} px on a {done['canvas'][0]}x{done['canvas'][1]} canvas"
            + (f", {done['cropped']} centre-cropped to the aspect cap" if done["cropped"] else "")
            + f": {done['out']} (dataset prepared:{done['out']}, fingerprint {done['fingerprint'][:16]}…)")
    elif args.command == "models":
      print_models(args)

  run_or_exit("teacher-cache", command, args)
