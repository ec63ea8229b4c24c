"""K students in one vmapped step against one student alone, on one cache (same batches, one read).

    python bench/multi_students.py [--model mlp-small] [--rows 16384]

Prints, for K = 1, 4, 8, the epoch time of K students trained together and the ratio to one student trained
alone with the ordinary step; K / ratio is the speed-up over K separate runs.
"""

import argparse
import os
import sys
import tempfile

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import synthetic  # noqa: E402
from bench.harness import measure, write_json  # noqa: E402
from shared.cache import open_cache  # noqa: E402
from shared.data import open_transfer_set  # noqa: E402
from shared.models import ModelSpec, build_model  # noqa: E402
from shared.parallel import batch_sharding, data_mesh, replicated  # noqa: E402
from student_train.loader import CacheLoader  # noqa: E402
from student_train.steps import Teaching, make_multi_train_step, make_train_step, stack_states  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="mlp-small")
  parser.add_argument("--rows", type=int, default=16384)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--out", default="bench/results/multi_students.json")
  args = parser.parse_args()
  mesh = data_mesh()
  with tempfile.TemporaryDirectory() as tmp:
    dataset = synthetic.npz_dataset(os.path.join(tmp, "x.npz"), args.rows, (8, 8, 1), 10)
    synthetic.direct_cache(os.path.join(tmp, "c.zarr"), dataset, members=3)
    transfer_set = open_transfer_set(dataset, "train")
    loader = CacheLoader(open_cache(os.path.join(tmp, "c.zarr")), transfer_set, batch_size=args.batch, seed=0,
                         fields=("member_logits",))
    batches = [jax.device_put({k: v for k, v in b.items() if k != "index"}, batch_sharding(mesh))
               for b in loader.epoch(0)]
    spec = ModelSpec(name=args.model, input_shape=transfer_set.input_shape, num_classes=10)

    def fresh(seed):
      model = build_model(spec, seed=seed)
      return nnx.split((model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)))

    graphdef, state = fresh(0)
    teaching = Teaching(loss="kl", temperature=4.0, combine="arithmetic", members=(0, 1, 2), stored_targets=False)
    single = make_train_step(graphdef, transfer_set.normalization, teaching, jax.random.key(0), mesh)
    holder = {"state": jax.device_put(state, replicated(mesh))}

    def one_alone():
      for batch in batches:
        holder["state"], metrics = single(holder["state"], batch, np.float32(0.5))
      jax.block_until_ready(metrics)

    alone = measure(one_alone, repeats=3)["median"]
    multi = make_multi_train_step(graphdef, transfer_set.normalization, mesh)
    result = {"model": args.model, "rows": args.rows, "batch": args.batch, "one_alone_s": alone, "together": []}
    print(f"one {args.model} alone: {alone:.3f} s per epoch of {args.rows} rows")
    for count in (1, 4, 8):
      states = stack_states([fresh(seed)[1] for seed in range(count)])
      hypers = {"temperature": np.full(count, 4.0, np.float32), "alpha": np.full(count, 0.5, np.float32),
                "geometric": np.zeros(count, bool), "mse": np.zeros(count, bool),
                "member_weights": np.full((count, 3), 1 / 3, np.float32),
                "key": jax.numpy.stack([jax.random.key(seed) for seed in range(count)])}
      group = {"states": jax.device_put(states, replicated(mesh)), "hypers": jax.device_put(hypers, replicated(mesh))}

      def together():
        for batch in batches:
          group["states"], metrics = multi(group["states"], batch, group["hypers"])
        jax.block_until_ready(metrics)

      seconds = measure(together, repeats=3)["median"]
      ratio = seconds / alone
      result["together"].append({"students": count, "seconds": seconds, "ratio_to_one_alone": ratio,
                                 "speedup_over_separate_runs": count / ratio})
      print(f"{count} together: {seconds:.3f} s ({ratio:.2f}x one alone; {count / ratio:.2f}x faster than "
            f"{count} separate runs)")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
