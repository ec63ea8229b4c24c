"""Classification metrics from log-probabilities (NumPy; used for evaluation on the host)."""

import numpy as np

ECE_BINS = 15


def classification_metrics(log_probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
  """Accuracy, negative log-likelihood and expected calibration error.

  ECE uses `bins` equal-width confidence bins: `sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)|`.

  Args:
    log_probs: float [N, C] log-probabilities.
    labels: int [N] class ids.
    bins: number of confidence bins.

  Returns:
    {"accuracy", "nll", "ece", "count"}.
  """
  log_probs = np.asarray(log_probs, np.float64)
  labels = np.asarray(labels)
  predictions = log_probs.argmax(axis=-1)
  correct = predictions == labels
  confidence = np.exp(log_probs.max(axis=-1))
  nll = -log_probs[np.arange(len(labels)), labels]
  return {"accuracy": float(correct.mean()), "nll": float(nll.mean()),
          "ece": expected_calibration_error(confidence, correct, bins), "count": int(len(labels))}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
  """ECE over `bins` equal-width confidence bins: `sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)|`.

  Args:
    confidence: float [N] each prediction's top probability.
    correct: bool [N] whether it was right.
    bins: number of confidence bins.
  """
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct)
  which = np.minimum((confidence * bins).astype(int), bins - 1)
  ece = 0.0
  for b in range(bins):
    in_bin = which == b
    if in_bin.any():
      ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
  return float(ece)
