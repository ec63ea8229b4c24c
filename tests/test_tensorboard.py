"""A run's metrics as TensorBoard scalars, read back with TensorBoard's own event reader."""

import numpy as np

from student_train import run_dir as files
from student_train.config import FitConfig
from student_train.train import fit


def _scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  EventAccumulator = event_accumulator.EventAccumulator  # noqa: N806
  reader = EventAccumulator(directory)
  reader.Reload()
  return {tag: [(event.step, event.value) for event in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def test_every_epoch_metric_is_a_tensorboard_scalar(tmp_path, data_dir):
  out = str(tmp_path / "run")
  fit(FitConfig(dataset="digits", data_dir=data_dir, model="mlp-tiny", epochs=3, out=out, progress=False, workers=0),
      log_epochs=False)
  lines = files.read_metrics(out)
  scalars = _scalars(f"{out}/{files.TENSORBOARD_DIR}")
  numeric = {name for name, value in lines[0].items() if name != "epoch" and isinstance(value, (int, float))}
  assert set(scalars) == numeric and {"loss", "hard_ce", "eval_accuracy", "eval_nll"} <= numeric
  for name in numeric:
    assert [step for step, _ in scalars[name]] == [1, 2, 3], name
    np.testing.assert_allclose([value for _, value in scalars[name]], [line[name] for line in lines], rtol=1e-6)
  # A run that resumes from an earlier checkpoint drops the later lines (`truncate_metrics`): so do its events.
  files.truncate_metrics(out, 2)
  assert [step for step, _ in _scalars(f"{out}/{files.TENSORBOARD_DIR}")["loss"]] == [1, 2]
