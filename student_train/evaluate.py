"""Evaluation: students' predictions on an eval split, their agreement with the cached teachers, and `eval`.

Teachers run once, in the cache build: agreement with the ensemble on the eval split comes from the member logits
the cache stores for that split (`teacher-cache build --eval-split`), never from reloading the teachers.
"""

import dataclasses
import math
from typing import ClassVar
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from shared.augment import Augmentation
from shared.cache import EVAL_ROWS
from shared.data import Normalization, TransferSet, open_transfer_set
from shared.data.backends import is_text
from shared.data.text import tokenizer_key
from shared.ensemble import COMBINE_RULES, combine_log_probs, ensemble_log_probs, member_weights
from shared.errors import StillroomError
from shared.metrics import classification_metrics, expected_calibration_error
from shared.models import check_input_shape, is_token_rows
from shared.parallel import batch_sharding, process_rows
from shared.render import inputs_of
from shared.log import progress
from shared.runs import RunRecord, Teacher, load_run_teacher, read_config
from shared.options import EVAL, DatasetSettings, resolve_dataset, text_options
from shared.settings import at_least, check_values, setting
from shared.workers import BatchRenderer, resolve_workers
from student_train.plan import RunPlan


def view_zero_batches(render: BatchRenderer, batch_size: int, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
  """The inputs [B, ...] of the renderer's transfer set as evaluation sees them, `batch_size` examples at a time in
  split order: view 0 (the stored input, or its centre crop), rendered ahead by its input workers.

  Args:
    rows: only these rows of every batch, the last batch padded to `batch_size` with copies of the last example
      (this process's part of each global batch, `shared.parallel.process_rows`); None: every example, unpadded.
  """
  data = render.transfer_set

  def batches():
    for start in range(0, len(data), batch_size):
      position = np.arange(start, min(start + batch_size, len(data))) if rows is None else \
          np.minimum(start + rows, len(data) - 1)
      yield {"position": position, "index": data.indices[position], "view": np.zeros(len(position), np.int32)}
  # Device-rendered views (`--renderer device`) are rendered here, and fetched, as the host's would have been.
  size = render.augmentation.image_size
  return (np.asarray(inputs_of(batch, size)) for batch in render(batches()))


def predict_log_probs(predict, states, render: BatchRenderer, batch_size: int, mesh, reduce=None):
  """Log-probabilities [K, N, C] of K stacked students over view 0 of the renderer's transfer set, in batches of
  `batch_size` (the last one padded), each process rendering its part of each batch.

  Args:
    reduce: `(log_probs [K, b, ...] of a batch, its first example's position) -> anything`, applied to each batch as
      it comes (so that only what it returns is kept), or None.

  Returns:
    The log-probabilities [K, N, ...], or with `reduce` the list of what it returned for each batch.
  """
  count, sharding = len(render.transfer_set), batch_sharding(mesh)
  rows = process_rows(mesh, batch_size)
  outputs = []
  for start, x in zip(range(0, count, batch_size), view_zero_batches(
      render, batch_size, np.arange(batch_size) if rows is None else rows)):
    log_probs = np.asarray(predict(states, jax.make_array_from_process_local_data(sharding, x)))[:, :count - start]
    outputs.append(log_probs if reduce is None else reduce(log_probs, start))
  return np.concatenate(outputs, axis=1) if reduce is None else outputs


def cached_teacher_top1(plan: RunPlan) -> np.ndarray | None:
  """The top-1 class [E] of the student's ensemble (its T, rule and members) on its eval set, from the eval logits
  the cache stores; None when the cache holds none for this eval set."""
  if plan.cache is None or plan.eval_set is None:
    return None
  spec = plan.cache.spec
  if spec.eval_dataset is None or not plan.eval_set.matches(spec.eval_dataset):
    return None
  teaching = plan.teaching
  weights = member_weights(teaching.members, spec.num_members)
  top1 = []
  for chunk in range(spec.chunks_of(EVAL_ROWS)):
    logits = plan.cache.read_chunk(chunk, ("eval_member_logits",), EVAL_ROWS)["eval_member_logits"]
    top1.append(np.asarray(ensemble_log_probs(logits, teaching.temperature, geometric=teaching.combine == "geometric",
                                              weights=weights)).argmax(-1))
  return np.concatenate(top1)


def predicted_positions(log_probs: np.ndarray, labels: np.ndarray, teacher_top1: np.ndarray | None = None) -> dict:
  """What the per-token metrics need of a language model's log-probabilities, at the positions that predict a next
  token (label >= 0), in row-major order.

  Args:
    log_probs: float [..., L, V] log-probabilities (normalised over V).
    labels: int [..., L] the next token of each position, -1 where none (`shared.data.text.next_token_labels`).
    teacher_top1: int [..., L] the teacher's top-1 next token per position, or None.

  Returns:
    1-D arrays over the predicting positions: "nll" (float64, -log p(label)), "correct" (bool, top-1 == label),
    "confidence" (float64, the top probability), "target" (the label ids, for bytes per token), and with a teacher
    "agrees" (bool, top-1 == the teacher's).
  """
  keep = np.asarray(labels) >= 0
  kept = np.asarray(log_probs)[keep].astype(np.float64)  # [T, V]
  target = np.asarray(labels)[keep].astype(np.int64)
  predicted = kept.argmax(-1)
  parts = {"nll": -kept[np.arange(len(target)), target], "correct": predicted == target,
           "confidence": np.exp(kept.max(-1)), "target": target}
  if teacher_top1 is not None:
    parts["agrees"] = predicted == np.asarray(teacher_top1)[keep]
  return parts


def concatenate_positions(parts: list[dict]) -> dict:
  """`predicted_positions` of several batches as one."""
  return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def language_model_metrics(parts: dict, byte_lengths: np.ndarray | None = None) -> dict:
  """Per-token metrics of a language model from `predicted_positions`.

  Args:
    parts: `predicted_positions` (over every batch: `concatenate_positions`).
    byte_lengths: int [V] the UTF-8 bytes each token id stands for (`Tokenizer.byte_lengths`), or None.

  Returns:
    {"perplexity": exp(mean nll), "nll": mean nll per predicted token (nats), "accuracy": top-1 next token, "ece":
    expected calibration error over the tokens (`shared.metrics`), "tokens": the predicted tokens counted}, with
    `byte_lengths` "bits_per_byte" (sum of nll / ln 2 / the bytes of the predicted tokens), with a teacher
    "teacher_agreement" (top-1 agreement per token).
  """
  nll = parts["nll"]
  if not len(nll):
    raise StillroomError("no position predicts a next token (every document is one token long, or padding).")
  line = {"perplexity": float(np.exp(nll.mean())), "nll": float(nll.mean()), "accuracy": float(parts["correct"].mean()),
          "ece": expected_calibration_error(parts["confidence"], parts["correct"]), "tokens": int(len(nll))}
  if byte_lengths is not None:
    line["bits_per_byte"] = float(nll.sum() / math.log(2) / np.asarray(byte_lengths)[parts["target"]].sum())
  if "agrees" in parts:
    line["teacher_agreement"] = float(parts["agrees"].mean())
  return line


def plan_byte_lengths(plan: RunPlan) -> np.ndarray | None:
  """int [V] the UTF-8 bytes of each token id of a run's eval set, `text:` data (bits per byte), or None (other
  data)."""
  options = plan.eval_set.text_options()
  return None if options is None else options.tokenizer().byte_lengths


def eval_line(log_probs: np.ndarray, plan: RunPlan, teacher_top1: np.ndarray | None) -> dict:
  """The `eval_*` entries of an epoch's metrics line for one student's log-probabilities [N, C]: accuracy, nll and
  ece only on a labeled eval set (absent, not 0, on an unlabeled one), the count, and the agreement with the
  teachers' ensemble where the cache stores its logits on the eval set. (A language model's eval set, labels
  [N, L], is reduced per predicted token by `eval_lines` instead.)"""
  if plan.eval_set.labeled:
    line = {f"eval_{k}": v for k, v in classification_metrics(log_probs, plan.eval_set.labels).items()}
  else:
    line = {"eval_count": int(len(log_probs))}
  if teacher_top1 is not None:
    line["eval_teacher_agreement"] = float(np.mean(log_probs.argmax(axis=-1) == teacher_top1))
  return line


def eval_lines(predict, states, render: BatchRenderer, batch_size: int, mesh, group: list[RunPlan],
               teacher_top1: list) -> list[dict]:
  """The `eval_*` entries (`eval_line`) of each of K stacked students over their eval set (`predict_log_probs`). A
  language model's eval set is reduced batch by batch to its predicting positions (`predicted_positions`), so that
  no [K, N, L, V] array is held.

  Args:
    group: the students' plans (they share the eval set).
    teacher_top1: per student, the cached teachers' top-1 on the eval set, or None (`cached_teacher_top1`).
  """
  eval_set = group[0].eval_set
  if not (eval_set.labeled and np.ndim(eval_set.labels) == 2):  # Not token rows (labels [N, L]).
    log_probs = predict_log_probs(predict, states, render, batch_size, mesh)
    return [eval_line(log_probs[k], plan, teacher_top1[k]) for k, plan in enumerate(group)]
  labels = eval_set.labels

  def reduce(log_probs, start):
    rows = slice(start, start + log_probs.shape[1])
    return [predicted_positions(log_probs[k], labels[rows], None if top1 is None else top1[rows])
            for k, top1 in enumerate(teacher_top1)]
  batches = predict_log_probs(predict, states, render, batch_size, mesh, reduce=reduce)
  byte_lengths = plan_byte_lengths(group[0])
  return [{f"eval_{name}": value for name, value in language_model_metrics(
      concatenate_positions([batch[k] for batch in batches]), byte_lengths).items()} for k in range(len(group))]


def _eval_views(run: Teacher) -> Augmentation:
  """View 0 as the run was trained on it: the stored inputs, or the centre crop at the side its record gives (a run
  trained with --image-size, or from a cache of crop views)."""
  image_size = None if run.record is None else run.record.image_size
  return Augmentation(max_shift=0, image_size=image_size)


def run_logits(run: Teacher, transfer_set: TransferSet, batch_size: int, what: str) -> np.ndarray:
  """A run's logits [N, C] over a transfer set's view 0."""
  normalization: Normalization = run.normalization or transfer_set.normalization
  views = _eval_views(run)
  if views.kind == "shift" and not transfer_set.fixed_shape:
    raise StillroomError(f"{what} saw images as stored, but {transfer_set.name!r} holds images of varying size; "
                         "evaluate it on the data it was trained on.")
  check_input_shape(run.apply_fn, run.params, views.output_shape(transfer_set.input_shape), what)
  apply = jax.jit(lambda params, x: run.apply_fn(params, normalization.apply(x)).astype(jnp.float32))
  with BatchRenderer(transfer_set, views, workers=resolve_workers(None, transfer_set)) as render:
    return np.concatenate([np.asarray(apply(run.params, x)) for x in view_zero_batches(render, batch_size)])


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(DatasetSettings):
  """Settings of `student-train eval` (and the dataset ones of `shared.options`)."""

  COMMANDS: ClassVar[tuple[str, ...]] = (EVAL,)

  runs: tuple[str, ...] = setting((), "run dirs to evaluate", commands=(), given_by="RUN_DIR")
  split: str | None = setting(None, "the split to evaluate on (default: 'test'; 'train', the one split, of a text: "
                                    "dataset)", group="data")
  combine: str = setting("arithmetic", "ensemble rule for several runs (at T=1)", choices=COMBINE_RULES, group="run")
  batch_size: int = setting(256, "examples per forward pass", group="run", check=at_least(1))
  epoch: int | None = setting(None, "evaluate each run's checkpoint after this many epochs (default: the newest)",
                              group="run", check=at_least(0), metavar="N")
  teacher: str | None = setting(None, "language models: a teacher run (its newest checkpoint) whose top-1 next token "
                                      "each run's is compared with, per token (teacher_agreement)",
                                group="run", metavar="RUN_DIR")


def evaluate_runs(config: EvalConfig) -> dict:
  """Evaluates one run, or several as an ensemble (combined at T=1).

  Returns:
    {"accuracy", "nll", "ece", "count", "runs", "combine", "dataset", "split", "members": per-run metrics, each with
    "run" and "epoch" (the checkpoint's epochs trained)}.
  """
  check_values(config)
  try:
    language_model = is_token_rows(read_run_record(config.runs[0]).model.input_shape)
  except StillroomError:
    language_model = False  # Loading the run below says what is wrong with it, as it always has.
  if language_model:
    return evaluate_language_models(config)
  if config.teacher is not None:
    raise StillroomError(f"--teacher {config.teacher}: compares language models' next tokens; run "
                         f"{config.runs[0]!r} is a classifier (its agreement with a cache's teachers is in its "
                         "metrics.jsonl).")
  config = dataclasses.replace(config, split=config.split or "test")
  dataset = resolve_dataset(config.dataset)
  if is_text(dataset):
    raise StillroomError(f"run {config.runs[0]!r} is a classifier, not a language model: evaluate it on its own kind "
                         f"of data, not the text {dataset!r}.")
  transfer_set = open_transfer_set(dataset, config.split, config.data_dir, text=text_options(config))
  if not transfer_set.labeled:
    raise StillroomError(f"{dataset!r} {config.split!r} is unlabeled; evaluation needs labels.")
  member_logits, members = [], []
  for run_dir in config.runs:
    run = load_run_teacher(run_dir, config.epoch, "--epoch")
    if run.record.specialist is not None:  # Its outputs are not the data's classes.
      raise StillroomError(f"run {run_dir!r} is a specialist (classes {list(run.record.specialist.classes)} and a "
                           "dustbin): its own eval accuracy on relabelled data is in its metrics.jsonl; combined "
                           "with its generalist, in a cache built with --specialists (`teacher-cache info`).")
    logits = run_logits(run, transfer_set, config.batch_size, f"run {run_dir!r}")
    outside = transfer_set.labels >= logits.shape[-1]
    if outside.any():
      raise StillroomError(f"{dataset!r} {config.split!r} example index "
                           f"{int(transfer_set.indices[np.argmax(outside)])} has label "
                           f"{int(transfer_set.labels[np.argmax(outside)])}, but run {run_dir!r} has "
                           f"{logits.shape[-1]} classes.")
    if member_logits and logits.shape != member_logits[0].shape:
      raise StillroomError(f"run {run_dir!r} has {logits.shape[-1]} classes, run {config.runs[0]!r} "
                           f"{member_logits[0].shape[-1]}: an ensemble needs the same classes.")
    member_logits.append(logits)
    members.append({"run": run_dir, "epoch": run.trained_epochs, **classification_metrics(
        np.asarray(jax.nn.log_softmax(logits, axis=-1)), transfer_set.labels)})
  log_probs = np.asarray(combine_log_probs(np.stack(member_logits, axis=1), 1.0, config.combine))  # [N, C]
  return {**classification_metrics(log_probs, transfer_set.labels), "runs": list(config.runs),
          "combine": config.combine, "dataset": dataset, "split": config.split, "members": members}


def read_run_record(run_dir: str) -> RunRecord:
  """A run dir's `RunRecord` (its model), from its config.json."""
  return RunRecord.from_json(read_config(run_dir), repr(run_dir))


def run_text(run_dir: str) -> dict:
  """The text options a language model run's data recorded (`DatasetSpec.text` in its config.json).

  Raises:
    StillroomError: a run that is not a language model of `text:` data.
  """
  config = read_config(run_dir)
  record = RunRecord.from_json(config, repr(run_dir))
  text = ((config.get("resolved") or {}).get("dataset") or {}).get("text")
  if not is_token_rows(record.model.input_shape) or text is None:
    raise StillroomError(f"run {run_dir!r} is a {record.model.name} on inputs {tuple(record.model.input_shape)}, not a "
                         "language model of a text: dataset; evaluate language models and classifiers apart.")
  return text


def evaluate_language_models(config: EvalConfig) -> dict:
  """`evaluate_runs` of language models: per predicted token of a `text:` dataset, re-packed with the runs' recorded
  tokenizer, sequence length and pack seed (`--seq-len`/`--pack-seed` may change the last two; the tokenizer is the
  runs'), one run or several as an ensemble (combined at T=1), streamed in batches of rows.

  Returns:
    `language_model_metrics` of the ensemble (perplexity, nll, bits_per_byte, accuracy, ece, tokens, with
    `--teacher` teacher_agreement), and "runs", "combine", "dataset", "split", "teacher", "members" (each run's
    metrics with "run" and "epoch").

  Raises:
    StillroomError: a run that is not a language model of text, runs of other tokenizers, a --tokenizer other than
      theirs, a token id outside a run's vocabulary.
  """
  recorded = run_text(config.runs[0])
  for run_dir in (*config.runs[1:], *([config.teacher] if config.teacher else [])):
    other = run_text(run_dir)
    if tokenizer_key(other["tokenizer"]) != tokenizer_key(recorded["tokenizer"]):
      raise StillroomError(f"run {run_dir!r} tokenized its text with {other['tokenizer']}, run {config.runs[0]!r} "
                           f"with {recorded['tokenizer']}: their next tokens cannot be compared.")
  dataset = resolve_dataset(config.dataset)
  if not is_text(dataset):
    raise StillroomError(f"run {config.runs[0]!r} is a language model: evaluate it on text (--dataset text:PATH), "
                         f"not {dataset!r}.")
  options = text_options(config, recorded, dataset)
  tokenizer = options.tokenizer()
  if tokenizer_key(tokenizer.identity()) != tokenizer_key(recorded["tokenizer"]):
    raise StillroomError(f"--tokenizer {config.tokenizer}: run {config.runs[0]!r} was trained on tokens of "
                         f"{recorded['tokenizer']}; leave --tokenizer out (the run's is used).")
  split = config.split or "train"
  transfer_set = open_transfer_set(dataset, split, config.data_dir, text=options)
  runs = [load_run_teacher(run_dir, config.epoch, "--epoch") for run_dir in config.runs]
  teacher = None if config.teacher is None else load_run_teacher(config.teacher, None, None)
  for run_dir, run in zip((*config.runs, config.teacher), (*runs, teacher)):
    if run is not None and run.record.model.num_classes != tokenizer.vocab_size:
      raise StillroomError(f"run {run_dir!r} predicts {run.record.model.num_classes} tokens; the tokenizer has "
                           f"{tokenizer.vocab_size}.")

  def log_probs_of(run: Teacher):
    normalization = run.normalization or transfer_set.normalization
    return jax.jit(lambda params, x: jax.nn.log_softmax(
        run.apply_fn(params, normalization.apply(x)).astype(jnp.float32), axis=-1))

  forwards = [log_probs_of(run) for run in runs]
  teacher_forward = None if teacher is None else log_probs_of(teacher)
  members, ensemble = [[] for _ in runs], []
  batch_rows = config.batch_size
  bar = progress(total=len(transfer_set), unit="row", desc="eval", leave=False)
  with bar:
    for start in range(0, len(transfer_set), batch_rows):
      x, labels = transfer_set.read(np.arange(start, min(start + batch_rows, len(transfer_set))))
      x = np.asarray(x, np.float32)
      top1 = None if teacher is None else np.asarray(teacher_forward(teacher.params, x)).argmax(-1)
      each = [forward(run.params, x) for forward, run in zip(forwards, runs)]  # [B, L, V] each
      for k, log_probs in enumerate(each):
        members[k].append(predicted_positions(np.asarray(log_probs), labels, top1))
      if len(runs) > 1:
        combined = combine_log_probs(jnp.stack(each, axis=-2), 1.0, config.combine)  # Members at axis -2.
        ensemble.append(predicted_positions(np.asarray(combined), labels, top1))
      bar.update(len(labels))
  byte_lengths = tokenizer.byte_lengths
  member_lines = [{"run": run_dir, "epoch": run.trained_epochs,
                   **language_model_metrics(concatenate_positions(parts), byte_lengths)}
                  for run_dir, run, parts in zip(config.runs, runs, members)]
  whole = language_model_metrics(concatenate_positions(ensemble), byte_lengths) if ensemble else \
      {k: v for k, v in member_lines[0].items() if k not in ("run", "epoch")}
  return {**whole, "runs": list(config.runs), "combine": config.combine, "dataset": dataset, "split": split,
          "teacher": config.teacher, "members": member_lines}
