"""stillroom beside the peer a JAX/Keras user would otherwise pick: Keras 3's distiller, JAX backend, same student,
same teacher, same data, same batch, on this machine, in one run.

    python bench/keras_peer.py [--examples 2048] [--epochs 3] [--rounds 3] [--steps-per-call 8] [--smoke]
                               [--out bench/results/keras_peer.json]

Keras is not a stillroom dependency: the script makes a separate virtual environment (`bench/results/keras_env`,
reused) that sees this environment's packages (JAX included, through a `.pth` file) and installs Keras into it,
then runs the Keras arms there (`python bench/keras_peer.py --keras-arm ...`, this file again).

Workload: random 32×32×3 uint8 images, 10 classes; the student is `cnn-small` (conv16-pool-conv32-pool, dense 64),
the teacher `cnn-large` (2× conv32-pool, 2× conv64-pool, dense 256) with random weights (speed does not depend on
them), both also written as Keras models of the same layers; batch 256, Adam(W), epochs timed after a first,
compiling one. Arms:
  - stillroom, hard labels: `fit --dataset npz:...` (the same function the CLI calls);
  - stillroom, cached KD: `teacher-cache build` once, then `fit --cache` (its epoch's own seconds, and the build);
  - both stillroom arms again with `fit --steps-per-call N` (`_spc` in the figures' names);
  - Keras, hard labels: `model.fit`;
  - Keras, online KD: the keras.io `Distiller` recipe (a `train_step` that runs the frozen teacher on every batch,
    loss alpha·CE + (1 − alpha)·T²·KL at T = 4).
The arms run in `--rounds` rounds, each arm once per round in turn (a fresh run, its first epoch untimed), so that
a machine whose speed drifts (other jobs) slows them alike. Reported: each arm's median epoch seconds over every
round, the build's seconds, and the student epochs after which the cache has paid for itself (build / (Keras KD
epoch − stillroom KD epoch)).

`--smoke`: 256 examples, one timed epoch, `mlp-tiny` as stillroom's student and teacher, and the Keras arms only where
this Python imports Keras (none is installed then), to check that the benchmark works; its figures mean nothing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERAS_ENV = os.path.join(REPO, "bench", "results", "keras_env")
KERAS = "keras==3.15.1"
T, ALPHA, BATCH = 4.0, 0.1, 256


def _keras_python() -> str:
  """The separate environment's Python, with Keras installed (made once)."""
  python = os.path.join(KERAS_ENV, "bin", "python")
  if not os.path.exists(python):
    subprocess.run([sys.executable, "-m", "venv", KERAS_ENV], check=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "stillroom_env.pth"), "w") as f:
      f.write(ours + "\n")  # JAX, NumPy, ... from this environment; Keras alone is installed there.
    subprocess.run([python, "-m", "pip", "install", "-q", KERAS], check=True)
  return python


def _keras_models(keras):
  def cnn(stages, dense, name):
    layers = [keras.Input((32, 32, 3))]
    for stage in stages:
      for features in stage:
        layers.append(keras.layers.Conv2D(features, 3, padding="same", activation="relu"))
      layers.append(keras.layers.MaxPooling2D(2, padding="same"))
    layers += [keras.layers.Flatten(), keras.layers.Dense(dense, activation="relu"), keras.layers.Dense(10)]
    return keras.Sequential(layers, name=name)
  return cnn(((16,), (32,)), 64, "student"), cnn(((32, 32), (64, 64)), 256, "teacher")


def _keras_arm(arm: str, data: str, epochs: int) -> list[float]:
  """Runs in the Keras environment: one arm's epoch seconds."""
  os.environ["KERAS_BACKEND"] = "jax"
  import keras  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  with np.load(data) as archive:
    x, y = archive["x"].astype("float32") / 255.0, archive["y"]
  student, teacher = _keras_models(keras)
  if arm == "plain":
    model = student
    model.compile(optimizer=keras.optimizers.AdamW(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  else:
    teacher.trainable = False

    class Distiller(keras.Model):  # The keras.io recipe, with the teacher frozen.
      def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher

      def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, allow_empty=False):
        teacher_logits = self.teacher(x, training=False)
        hard = keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True)
        soft = keras.losses.kl_divergence(keras.ops.softmax(teacher_logits / T), keras.ops.softmax(y_pred / T))
        return keras.ops.mean(ALPHA * hard + (1 - ALPHA) * T ** 2 * soft)

      def call(self, x):
        return self.student(x)

    model = Distiller(student, teacher)
    model.compile(optimizer=keras.optimizers.AdamW(3e-3))
  seconds = []
  for _ in range(epochs + 1):  # The first compiles.
    started = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=True, verbose=0)
    seconds.append(time.perf_counter() - started)
  return seconds[1:]


def _keras_here() -> bool:
  """Whether this Python imports Keras."""
  try:
    import keras  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--examples", type=int, default=2048)
  parser.add_argument("--epochs", type=int, default=3, help="timed epochs per arm and round (after a compiling one)")
  parser.add_argument("--rounds", type=int, default=3, help="rounds of all arms, interleaved")
  parser.add_argument("--steps-per-call", type=int, default=8, help="N of the stillroom arms with --steps-per-call")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, Keras only if this Python has it: checks that "
                                                           "it runs")
  parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "keras_peer.json"))
  parser.add_argument("--keras-arm", choices=("plain", "kd"), help=argparse.SUPPRESS)
  parser.add_argument("--data", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.smoke:
    args.examples, args.epochs, args.rounds = 256, 1, 1
  if args.keras_arm:
    print(json.dumps(_keras_arm(args.keras_arm, args.data, args.epochs)))
    return

  sys.path.insert(0, REPO)
  from bench import synthetic  # pylint: disable=import-outside-toplevel
  from bench.harness import machine, write_json  # pylint: disable=import-outside-toplevel
  from student_train.config import FitConfig  # pylint: disable=import-outside-toplevel
  from student_train.train import fit  # pylint: disable=import-outside-toplevel
  from teacher_cache.build import BuildConfig, build_cache  # pylint: disable=import-outside-toplevel

  python = (sys.executable if _keras_here() else None) if args.smoke else _keras_python()
  result = {"machine": machine(), "examples": args.examples, "batch": BATCH, "epochs_timed": args.epochs,
            "rounds": args.rounds, "steps_per_call": args.steps_per_call}
  with tempfile.TemporaryDirectory() as work:
    dataset = synthetic.npz_dataset(os.path.join(work, "images.npz"), args.examples, (32, 32, 3), 10)
    student, teacher = ("mlp-tiny", "mlp-tiny") if args.smoke else ("cnn-small", "cnn-large")
    teacher = synthetic.teachers(os.path.join(work, "teachers"), teacher, (32, 32, 3), 10, 1)[0]

    def epochs_of(**options) -> list[float]:
      seconds = []
      fit(FitConfig(model=student, batch_size=BATCH, epochs=args.epochs + 1, progress=False, eval_split="none",
                    out=os.path.join(work, f"run{len(os.listdir(work))}"), **options), log_epochs=False,
          on_epoch=lambda plan, line: seconds.append(line["seconds"]))
      return seconds[1:]

    started = time.perf_counter()
    cache = os.path.join(work, "cache.zarr")
    build_cache(BuildConfig(dataset=dataset, teachers=(teacher,), temperature=T, eval_split="none", progress=False,
                            out=cache))
    result["build_s"] = time.perf_counter() - started

    def keras_epochs(arm: str) -> list[float]:
      ran = subprocess.run([python, os.path.abspath(__file__), "--keras-arm", arm, "--data", dataset[len("npz:"):],
                            "--epochs", str(args.epochs)], check=True, capture_output=True, text=True,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
      return json.loads(ran.stdout.strip().splitlines()[-1])

    n = args.steps_per_call
    arms = {"stillroom_plain_s": lambda: epochs_of(dataset=dataset),
            "stillroom_plain_spc_s": lambda: epochs_of(dataset=dataset, steps_per_call=n),
            "stillroom_kd_s": lambda: epochs_of(cache=cache, alpha=ALPHA),
            "stillroom_kd_spc_s": lambda: epochs_of(cache=cache, alpha=ALPHA, steps_per_call=n),
            **({"keras_plain_s": lambda: keras_epochs("plain"), "keras_kd_s": lambda: keras_epochs("kd")}
               if python else {})}
    for _ in range(args.rounds):
      for name, run in arms.items():
        result.setdefault(name, []).extend(run())
  medians = {k: statistics.median(v) for k, v in result.items() if k.endswith("_s") and isinstance(v, list)}
  result["median_epoch_s"] = medians
  if not python:
    write_json(args.out, result)
    print(f"no Keras in this Python: the stillroom arms alone, epoch seconds {json.dumps(medians)}")
    return
  result["break_even_epochs"] = result["build_s"] / max(1e-9, medians["keras_kd_s"] - medians["stillroom_kd_s"])
  write_json(args.out, result)
  print(f"epoch seconds (median of {args.epochs} epochs x {args.rounds} rounds, {args.examples} images 32x32x3, "
        f"batch {BATCH}, cnn-small student, cnn-large teacher):")
  for name, label in (("stillroom_plain_s", "stillroom, hard labels"),
                      ("stillroom_plain_spc_s", f"stillroom, hard labels, {n} steps/call"),
                      ("stillroom_kd_s", "stillroom, cached KD"),
                      ("stillroom_kd_spc_s", f"stillroom, cached KD, {n} steps/call"),
                      ("keras_plain_s", "Keras, hard labels"), ("keras_kd_s", "Keras, online KD (frozen teacher)")):
    print(f"  {label:<40} {medians[name]:.2f} s")
  print(f"  stillroom / Keras, hard labels: {medians['stillroom_plain_s'] / medians['keras_plain_s']:.2f} "
        f"(1 step/call), {medians['stillroom_plain_spc_s'] / medians['keras_plain_s']:.2f} ({n} steps/call)")
  print(f"  cache build (once)                       {result['build_s']:.2f} s; pays for itself after "
        f"{result['break_even_epochs']:.1f} student epochs")


if __name__ == "__main__":
  main()
