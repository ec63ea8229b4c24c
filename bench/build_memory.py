"""How many chunks' worth of memory a cache build holds at once: the figure behind `teacher_cache.build.WORKING_CHUNKS`.

    python bench/build_memory.py [--rows 131072] [--chunk-rows 16384] [--classes 1000]

Builds the same cache twice, each in its own process (`teacher-cache build`, two random `mlp-tiny` teachers of
`--classes` outputs on flat vectors, about 6 kB of stored arrays per row at 1,000 classes): once in chunks of
`--small-chunk-rows`, once in chunks of `--chunk-rows`. Everything else the two processes hold is the same (JAX, the
teachers, the transfer set), so the difference of their peak RSS, divided by the difference of one chunk's bytes
(`teacher_cache.build.chunk_bytes`), is how many chunks a build holds at once.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import cli_peak_rss, write_json  # noqa: E402
from bench.synthetic import npz_dataset, teachers  # noqa: E402
from shared.cache import open_cache  # noqa: E402
from teacher_cache.build import WORKING_CHUNKS, chunk_bytes  # noqa: E402

def build_peak(store: str, dataset: str, runs: list[str], chunk_rows: int) -> dict:
  """Peak RSS of one build in its own process, and its chunk's bytes."""
  peak = cli_peak_rss("teacher_cache.cli", [
      "build", "--dataset", dataset, "--chunk-rows", chunk_rows, "--batch-size", 1024,
      *[a for run in runs for a in ("--teacher", run)], "--out", store, "--no-progress"])
  return {"chunk_rows": chunk_rows, "chunk_bytes": chunk_bytes(open_cache(store).spec), "peak_rss_bytes": peak}


def build_memory(rows: int, chunk_rows: int, small_chunk_rows: int, classes: int, members: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    dataset = npz_dataset(os.path.join(tmp, "x.npz"), rows, (8,), classes)
    runs = teachers(tmp, "mlp-tiny", (8,), classes, members)
    small, large = (build_peak(os.path.join(tmp, f"c{n}.zarr"), dataset, runs, n)
                    for n in (small_chunk_rows, chunk_rows))
  return {"rows": rows, "classes": classes, "members": members, "chunks": -(-rows // chunk_rows), "small": small,
          "large": large, "working_chunks_assumed": WORKING_CHUNKS,
          "working_chunks_measured": (large["peak_rss_bytes"] - small["peak_rss_bytes"])
          / (large["chunk_bytes"] - small["chunk_bytes"])}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=131072)
  parser.add_argument("--chunk-rows", type=int, default=16384)
  parser.add_argument("--small-chunk-rows", type=int, default=256)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--members", type=int, default=2)
  parser.add_argument("--out", default="bench/results/build_memory.json")
  args = parser.parse_args(argv)
  result = build_memory(args.rows, args.chunk_rows, args.small_chunk_rows, args.classes, args.members)
  for arm in ("small", "large"):
    print(f"chunks of {result[arm]['chunk_rows']:,} rows ({result[arm]['chunk_bytes'] / 1e6:.1f} MB): peak RSS "
          f"{result[arm]['peak_rss_bytes'] / 1e6:.0f} MB")
  print(f"held at once: {result['working_chunks_measured']:.2f} chunks (the limits check assumes "
        f"{result['working_chunks_assumed']})")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
