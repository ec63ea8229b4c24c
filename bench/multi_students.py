"""K students in one vmapped step against one student alone, on one cache (same batches, one read).

    python bench/multi_students.py [--model mlp-small] [--rows 16384] [--students 1,4,8] [--image-size S]

Prints, for K = 1, 4, 8, the epoch time of K students trained together in the trainer's step and the ratio to one
student (a run of its own is a group of one); K / ratio is the speed-up over K separate runs. The students
re-derive their targets from the members' logits (as students of other T, rule or members do). Inputs are 8x8x1,
or SxSx3 with `--image-size S` (e.g. `--model resnet8 --image-size 32 --batch 64 --rows 512 --students 1,2`: on a
CPU, a vmapped group of convolutional students can be slower than the same runs one after another).
"""

import argparse
import os
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import synthetic  # noqa: E402
from bench.harness import measure, write_json  # noqa: E402
from bench.run_all import arm  # noqa: E402
from shared.parallel import batch_sharding, data_mesh, on_devices  # noqa: E402
from student_train.config import FitConfig  # noqa: E402


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="mlp-small")
  parser.add_argument("--rows", type=int, default=16384)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--students", default="1,4,8", help="group sizes K to time, comma-separated, 1 first")
  parser.add_argument("--image-size", type=int, default=None, metavar="S", help="SxSx3 inputs instead of 8x8x1")
  parser.add_argument("--out", default="bench/results/multi_students.json")
  args = parser.parse_args(argv)
  counts = [int(k) for k in args.students.split(",")]
  if counts[0] != 1:
    parser.error("--students: the first group size is 1 (the baseline)")
  mesh = data_mesh()
  with tempfile.TemporaryDirectory() as tmp:
    input_shape = (8, 8, 1) if args.image_size is None else (args.image_size, args.image_size, 3)
    dataset = synthetic.npz_dataset(os.path.join(tmp, "x.npz"), args.rows, input_shape, 10)
    cache = os.path.join(tmp, "c.zarr")
    synthetic.direct_cache(cache, dataset, members=3)
    # T=2, not the cache's 4: the students re-derive their targets from the members' logits.
    config = FitConfig(model=args.model, cache=cache, batch_size=args.batch, temperature=2.0)
    result = {"model": args.model, "input_shape": list(input_shape), "rows": args.rows, "batch": args.batch,
              "together": []}
    batches = None
    for count in counts:
      group = arm(config, mesh, students=count)
      try:
        if batches is None:  # The same batches for every K, read once.
          batches = [placed for _, placed in on_devices(group.loader.epoch(0), batch_sharding(mesh))]
        step, holder = group.step(mesh), {"states": group.states}
      finally:
        group.close()

      def together():
        for batch in batches:
          holder["states"], metrics = step(holder["states"], batch, group.hypers)
        jax.block_until_ready(metrics)

      seconds = measure(together, repeats=3)["median"]
      if count == 1:
        result["one_alone_s"] = alone = seconds
        print(f"one {args.model} alone: {alone:.3f} s per epoch of {args.rows} rows")
        continue
      ratio = seconds / alone
      result["together"].append({"students": count, "seconds": seconds, "ratio_to_one_alone": ratio,
                                 "speedup_over_separate_runs": count / ratio})
      print(f"{count} together: {seconds:.3f} s ({ratio:.2f}x one alone; {count / ratio:.2f}x faster than "
            f"{count} separate runs)")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
