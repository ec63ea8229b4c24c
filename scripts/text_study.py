"""The text study of issue 34 (acceptance 2): token-level caches of the stdlib's own sources, measured.

    python scripts/text_study.py [--work DIR] [--results DIR] [--seeds N] [--smoke]

On the text demo's data (`stillroom.demo.STDLIB_TEXT`: the standard library's .py files, byte tokens) and with the
demo's functions (one implementation: `text_teachers`, `text_cache`, `text_students`, `run_text_demo`):

1. **Settings on a validation slice.** The demo's `lm-small` teacher; one dense cache at T=1 whose held-out logits
   are those of the *validation* files (`STDLIB_TEXT["valid"]`, distinct from the test files); `lm-tiny` students at
   each (T, alpha) of `GRID` (another T re-derived from the cached member logits) and from hard labels, seed 0, all
   reading the one cache in one vmapped step. The (T, alpha) of the lowest validation bits per byte is chosen.
2. **Held-out text.** `run_text_demo` at the chosen (T, alpha) with `topk:K` at the two values of `TOPK` and
   `sample:K` at the K whose bytes per token equal the smaller topk's (`EQUAL_BYTES`; checked against the stores):
   students from hard labels, dense, each topk and sample, over `--seeds` paired seeds (same initialisation and
   order of rows per seed; equal steps), on the test files.
3. **Bytes per token** of each cache kind at the byte vocabulary (the caches of step 2) and at a 32,000-token
   byte-level BPE vocabulary: a `tokenizers` BPE trained here on every UTF-8 `.py` file of the standard library
   outside its test folders and site-packages, and caches of a few rows built with a tiny `lm-tiny` teacher just to
   read their sizes (`teacher_cache.info.bytes_per_token`; the issue's target: `topk:64` <= 300 B/token).

Results: RESULTS/study.json and study.md (and RESULTS/test/demo.{md,json,png}, step 2's own table). Resumable: runs
and caches that finished are reused from WORK (the demo's work dir by default, so the demo's teacher is reused).
`--smoke`: tiny sizes that check that the script runs; its figures mean nothing.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shared.errors import StillroomError  # noqa: E402
from shared.log import logger  # noqa: E402
from stillroom.demo import (STDLIB_TEXT, DemoConfig, TextDemo, _Stages, run_text_demo,  # noqa: E402
                            stdlib_files, target_bytes, text_cache, text_data, text_students, text_teachers)
from student_train.config import FitConfig  # noqa: E402

_LOG = logger("text_study")
GRID = {"temperature": (1.0, 2.0, 4.0), "alpha": (0.0, 0.5)}  # Chosen on the validation files.
TOPK = (8, 32)  # The two values of K of topk:K.
# sample:K of the bytes of topk:8: topk stores 4K + 4 B/token (int16 ids, float16 log-probs, float32 rest), sample
# 6K (int16 ids, float16 log-probs, uint16 counts): 36 = 6 x 6.
EQUAL_BYTES = 6
BPE_VOCAB = 32_000
BPE_KINDS = ("dense", "topk:8", "topk:32", "topk:64", "sample:6")
# --smoke: fewer of each (its figures mean nothing); the BPE then learns 512 tokens from the demo's training files.
SMOKE = {"grid": {"temperature": (1.0, 2.0), "alpha": (0.5,)}, "topk": (8,), "bpe_kinds": ("topk:8",), "vocab": 512}


def smoke_sizes() -> TextDemo:
  """Tiny sizes for `--smoke`: checks that the script runs; its figures mean nothing."""
  return TextDemo(seq_len=16, train_rows=16, test_rows=4, teacher_epochs=1, student_epochs=1, batch_size=8,
                  teacher_model="lm-tiny", seeds=2)


def stdlib_sources() -> list[str]:
  """Every `.py` file of the standard library outside test folders, site-packages and caches that is UTF-8 (the
  BPE's training text), absolute paths, sorted."""
  import sysconfig  # pylint: disable=import-outside-toplevel
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "site-packages", "__pycache__", "idle_test")
                     and not d.startswith("."))
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        try:
          with open(path, encoding="utf-8") as f:
            f.read()
        except (UnicodeDecodeError, OSError):
          continue
        found.append(path)
  return sorted(found)


def train_bpe(out: str, vocab_size: int, files: list[str]) -> dict:
  """Trains a byte-level BPE tokenizer.json on `files` into `out` (once); returns its identity."""
  if not os.path.exists(out):
    from tokenizers import (Tokenizer, decoders, models, pre_tokenizers,  # pylint: disable=import-outside-toplevel
                            trainers)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train(files, trainer)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tokenizer.save(out + ".partial")
    os.replace(out + ".partial", out)
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  return {"path": out, "vocab_size": Tokenizer.from_file(out).get_vocab_size(), "files": len(files)}


def choose_settings(config: DemoConfig, sizes: TextDemo, teachers: list[str], stages: _Stages, grid: dict) -> dict:
  """Step 1: the validation grid. Returns {"runs": {name: validation line}, "chosen": {"temperature", "alpha"}}."""
  valid = dataclasses.replace(sizes, held_out="valid")
  data = text_data(config, valid)
  cache = text_cache(config, valid, data, teachers, "dense", 1.0)
  arms = {"hard labels": (cache, {"alpha": 1.0})}
  for t in grid["temperature"]:
    for a in grid["alpha"]:
      arms[f"T={t:g}, alpha={a:g}"] = (cache, {"temperature": t, "alpha": a})
  name = f"text_study_valid_L{valid.seq_len}_r{valid.train_rows or 'all'}_e{valid.student_epochs}"
  finals = text_students(config, valid, data, stages, arms, 1, name)
  runs = {name: {k: lines[0].get(f"eval_{k}") for k in ("bits_per_byte", "perplexity", "ece", "teacher_agreement")}
          for name, lines in finals.items()}
  best = min((name for name in arms if name != "hard labels"), key=lambda name: runs[name]["bits_per_byte"])
  return {"runs": runs, "settings": {name: extra for name, (_, extra) in arms.items()},
          "chosen": {"temperature": arms[best][1]["temperature"], "alpha": arms[best][1]["alpha"]},
          "valid_rows": valid.test_rows, "cache": cache}


def bpe_bytes(config: DemoConfig, sizes: TextDemo, stages: _Stages, vocab_size: int, rows: int, kinds: tuple[str, ...],
              files: list[str]) -> dict:
  """Step 3 at the BPE vocabulary: bytes per token of each of `kinds`' caches of `rows` rows, from a tiny teacher,
  the tokenizer trained on `files`."""
  from shared.data.text import TextOptions  # pylint: disable=import-outside-toplevel
  from teacher_cache.build import build_cache  # pylint: disable=import-outside-toplevel
  tokenizer = train_bpe(os.path.join(config.work_dir, f"bpe{vocab_size}", "tokenizer.json"), vocab_size, files)
  data = text_data(config, sizes)
  data = dict(data, split=f"train[:{rows}]")
  options = TextOptions(seq_len=sizes.seq_len, tokenizer_name=tokenizer["path"])
  teacher = FitConfig(model="lm-tiny", dataset=data["dataset"], split=data["split"], seq_len=sizes.seq_len,
                      tokenizer=tokenizer["path"], data_dir=config.data_dir, epochs=1, batch_size=min(rows, 8),
                      checkpoint_every=1, progress=False,
                      out=os.path.join(config.work_dir, f"bpe{vocab_size}_L{sizes.seq_len}_r{rows}_teacher"))
  stages.train(f"a tiny teacher at the BPE vocabulary ({tokenizer['vocab_size']:,} tokens)", [[teacher]])
  bpe_sizes = dataclasses.replace(sizes, train_rows=rows)
  caches = {}
  for kind in kinds:
    out = os.path.join(config.work_dir, f"bpe{vocab_size}_L{sizes.seq_len}_r{rows}_{kind.replace(':', '')}.zarr")
    build_cache(dataclasses.replace(config.build, dataset=data["dataset"], split=data["split"],
                                    data_dir=config.data_dir, teachers=(teacher.out,), targets=kind, temperature=1.0,
                                    views=1, seq_len=bpe_sizes.seq_len, tokenizer=tokenizer["path"],
                                    chunk_rows=rows, out=out))  # One chunk: 32k-wide rows are large.
    caches[kind] = target_bytes(out)
  return {"tokenizer": tokenizer, "rows": rows, "bytes_per_token": caches,
          "text_bytes_per_token": _text_bytes_per_token(os.path.join(data["root"], "train"), options.tokenizer())}


def _text_bytes_per_token(folder: str, tokenizer) -> float:
  """The UTF-8 bytes a token of the files under `folder` stands for under `tokenizer` (each file one document)."""
  texts = []
  for path in sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".py")):
    with open(path, encoding="utf-8") as f:
      texts.append(f.read())
  return sum(len(t.encode("utf-8")) for t in texts) / sum(len(ids) for ids in tokenizer.encode_many(texts))


def run_study(work: str, results_dir: str, seeds: int, smoke: bool = False, part: str = "all") -> dict:
  """Runs the steps (reusing what finished) and writes RESULTS_DIR/study.json and study.md; `part` "validation" or
  "bpe" runs step 1 or step 3 alone and writes RESULTS_DIR/<part>.json (a later full run reuses their work)."""
  started, load = time.perf_counter(), os.getloadavg()
  sizes = dataclasses.replace(smoke_sizes() if smoke else TextDemo(), seeds=seeds)
  config = DemoConfig(text=True, work_dir=work, results_dir=results_dir, teachers=sizes.teachers, seeds=seeds)
  stages = _Stages()
  machine = lambda: {"cpus": os.cpu_count(), "load_at_start": list(load), "load_at_end": list(os.getloadavg())}
  os.makedirs(results_dir, exist_ok=True)

  def bpe_step() -> dict:
    if smoke:
      root = text_data(config, sizes)["root"]
      return bpe_bytes(config, sizes, stages, SMOKE["vocab"], 2, SMOKE["bpe_kinds"],
                       [os.path.join(root, "train", path) for path in stdlib_files("train")])
    return bpe_bytes(config, sizes, stages, BPE_VOCAB, 4, BPE_KINDS, stdlib_sources())

  if part == "bpe":
    bpe = bpe_step()
    _dump(os.path.join(results_dir, "bpe.json"), {"bpe": bpe, "stage_seconds": stages.seconds, "machine": machine()})
    return bpe
  teachers, _ = text_teachers(config, sizes, text_data(config, sizes), stages)
  validation = choose_settings(config, sizes, teachers, stages, SMOKE["grid"] if smoke else GRID)
  if part == "validation":
    _dump(os.path.join(results_dir, "validation.json"), {"validation": validation, "stage_seconds": stages.seconds,
                                                         "machine": machine()})
    return validation
  chosen = dataclasses.replace(sizes, topk=SMOKE["topk"] if smoke else TOPK, sample=EQUAL_BYTES,
                               **validation["chosen"])
  test = run_text_demo(config, chosen, out_dir=os.path.join(results_dir, "test"))
  sample, smaller = test["students"][f"sample:{EQUAL_BYTES}"], test["students"][f"topk:{min(chosen.topk)}"]
  if sample["bytes_per_token"] != smaller["bytes_per_token"]:
    raise StillroomError(f"sample:{EQUAL_BYTES} stores {sample['bytes_per_token']} B/token, topk:{min(chosen.topk)} "
                         f"{smaller['bytes_per_token']}: not equal bytes; fix EQUAL_BYTES.")
  bpe = bpe_step()
  results = {"smoke": smoke, "seeds": seeds, "sizes": dataclasses.asdict(chosen), "validation": validation,
             "test": {k: test[k] for k in ("teachers", "students", "stage_seconds", "total_seconds")},
             "files": test["files"],
             "bytes_per_token": {"bytes (V=256)": {kind: test["students"][kind]["bytes_per_token"]
                                                   for kind in test["students"] if kind != "hard labels"},
                                 f"BPE (V={bpe['tokenizer']['vocab_size']:,})": bpe["bytes_per_token"]},
             "bpe": bpe, "stage_seconds": stages.seconds, "total_seconds": time.perf_counter() - started,
             "machine": machine()}
  _dump(os.path.join(results_dir, "study.json"), results)
  with open(os.path.join(results_dir, "study.md"), "w") as f:
    f.write(format_table(results) + "\n")
  print(format_table(results))
  return results


def _dump(path: str, results: dict) -> None:
  with open(path, "w") as f:
    json.dump(results, f, indent=2)


def _pm(stat: dict, scale: float = 1.0, digits: int = 4) -> str:
  return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def format_table(results: dict) -> str:
  """The study as Markdown: the validation grid, the held-out table, the bytes per token."""
  s, v = results["sizes"], results["validation"]
  lines = [f"## Settings chosen on the validation files ({', '.join(STDLIB_TEXT['valid'])}; first {v['valid_rows']} "
           f"rows of {s['seq_len']} byte tokens), seed 0, one dense cache at T=1 (other T re-derived from its member "
           "logits)",
           "", "| student | bits/byte | ECE | teacher agreement |", "|---|---|---|---|"]
  for name, line in v["runs"].items():
    mark = " (chosen)" if name == f"T={v['chosen']['temperature']:g}, alpha={v['chosen']['alpha']:g}" else ""
    lines.append(f"| {name}{mark} | {line['bits_per_byte']:.4f} | {line['ece']:.4f} | "
                 f"{line['teacher_agreement']:.4f} |")
  t = results["test"]
  lines += ["", f"## Held-out test files, {results['seeds']} paired seeds, T={s['temperature']:g}, "
            f"alpha={s['alpha']:g}",
            "", f"Mean ± std over seeds; Δ: the student minus the hard-label student of the same seed. "
            f"`{s['student_model']}` students, {s['student_epochs']} epochs of {s['train_rows']} rows x {s['seq_len']} "
            f"byte tokens, batch {s['batch_size']}, every arm the same steps.", "",
            "| model | target bytes/token | bits/byte | Δ bits/byte | perplexity | ECE | Δ ECE | teacher agreement |",
            "|---|---|---|---|---|---|---|---|"]
  for name, line in t["teachers"].items():
    lines.append(f"| {name} | | {line['bits_per_byte']:.4f} | | {line['perplexity']:.3f} | {line['ece']:.4f} | | |")
  for name, arm in t["students"].items():
    delta = {k: "" if "paired_difference" not in arm[k] else _pm(arm[k]["paired_difference"])
             for k in ("bits_per_byte", "ece")}
    size = "" if arm["bytes_per_token"] is None else f"{arm['bytes_per_token']:g}"
    lines.append(f"| student, {name} | {size} | {_pm(arm['bits_per_byte'])} | {delta['bits_per_byte']} | "
                 f"{_pm(arm['perplexity'], digits=3)} | {_pm(arm['ece'])} | {delta['ece']} | "
                 f"{_pm(arm['teacher_agreement'])} |")
  bpe = results["bpe"]
  kinds = sorted({k for sizes in results["bytes_per_token"].values() for k in sizes}, key=_kind_order)
  lines += ["", f"## Bytes per token of each cache's targets (`teacher-cache info`; a BPE token stands for "
            f"{bpe['text_bytes_per_token']:.2f} bytes of the training files)", "",
            "| vocabulary | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
  for vocabulary, sizes in results["bytes_per_token"].items():
    lines.append(f"| {vocabulary} | " + " | ".join("" if k not in sizes else f"{sizes[k]:,.0f}" for k in kinds) + " |")
  load = results["machine"]
  lines += ["", "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["stage_seconds"].items()) +
            f"; total {results['total_seconds']:.0f} s on {load['cpus']} CPUs, load average "
            f"{load['load_at_start'][0]:.1f} at the start, {load['load_at_end'][0]:.1f} at the end."]
  return "\n".join(lines)


def _kind_order(kind: str) -> tuple:
  name, _, k = kind.partition(":")
  return ({"dense": 0, "topk": 1, "sample": 2}[name], int(k or 0))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--work", default="demo", help="teachers, caches and students; reused (default: the demo's "
                                                     "work dir, whose teacher the study shares)")
  parser.add_argument("--results", default="results/text_study", help="where study.json and study.md go")
  parser.add_argument("--seeds", type=int, default=3, help="paired student seeds per arm (default: 3)")
  parser.add_argument("--part", default="all", choices=("all", "validation", "bpe"),
                      help="step 1 or step 3 alone (into RESULTS/<part>.json); a later full run reuses their work")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error(f"--seeds must be at least 1, got {args.seeds}")
  try:
    run_study(args.work, args.results, args.seeds, args.smoke, args.part)
  except StillroomError as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
  main()
