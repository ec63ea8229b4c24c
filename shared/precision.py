"""Compute precision: the dtypes models may compute in, and what bfloat16 costs a cache's targets.

`--compute-dtype bfloat16` (`student-train fit`, `teacher-cache build`) makes the registry's models compute in
bfloat16; parameters, BatchNorm statistics and optimizer state stay float32, and logits leave the model in float32,
before any softmax, log-sum-exp or loss.

A cache built in bfloat16 records the bound its targets keep against a float32 build's (`target_tolerance`): the
largest total-variation distance of a row's ensemble distribution at T (`target_distance`). It follows from a bound
on the teachers' logits: if bfloat16 moves every member's logits of a row by Δ with `max(Δ) − min(Δ) <= δ`
(`logit_spread`, whatever a softmax ignores being a constant shift), the targets at T move by at most `δ / (4T)`
in total variation, under either ensemble rule (`LOGIT_SPREAD` holds δ, measured; the derivation is at
`target_tolerance`).

NumPy only: the cache spec and the settings import it without JAX.
"""

import numpy as np

COMPUTE_DTYPES = ("float32", "bfloat16")  # What `ModelSpec.dtype` and `--compute-dtype` may be.
DEFAULT_COMPUTE_DTYPE = "float32"

# δ: a bound on the `logit_spread` of a teacher's logits computed in each dtype against float32, on any row. 0 for
# float32: its builds are reproducible. For bfloat16, `bench/precision.py` measured the largest spread over digits'
# 1,437 training rows of registry models trained on them (eval accuracy 91-98%, largest logits 9 to 20), as a build
# stores them, on the 2-core CPU (bench/measured/cpu-2core/precision.json): 0.06 (mlp-small), 0.11 (cnn-small), 0.13
# (resnet8), 0.25 (resnet20) and 0.56 (resnet56). Rounding grows with depth and with the logits' size: a deeper
# network, or one with larger logits, than those may exceed it. tests/test_precision.py holds it in a build.
LOGIT_SPREAD = {"float32": 0.0, "bfloat16": 1.0}


def logit_spread(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """How far apart two sets of logits are as a softmax sees them: `max_c Δ_c − min_c Δ_c` of `Δ = logits −
  reference` per row (a shift of every logit changes no probability).

  Args:
    logits: [..., C] (any float dtype; computed in float64).
    reference: [..., C] the same shape.

  Returns:
    float64 [...], >= 0.
  """
  delta = np.asarray(logits, np.float64) - np.asarray(reference, np.float64)
  return delta.max(axis=-1) - delta.min(axis=-1)


def target_distance(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
  """Total-variation distance of two distributions given as log-probabilities, per row: `½ Σ_c |p_c − q_c|`.

  It is the largest difference of the probability the two give any set of classes; and the L1 distance of the
  gradients of `T²·KL(p || softmax(s / T))` and `T²·KL(q || softmax(s / T))` with respect to the student's logits s
  is `2T` times it: what the targets' change does to a distillation step's soft-term gradient.

  Args:
    log_p: [..., C] log-probabilities (any float dtype; computed in float64).
    log_q: [..., C] the same shape.

  Returns:
    float64 [...] in [0, 1].
  """
  p, q = np.exp(np.asarray(log_p, np.float64)), np.exp(np.asarray(log_q, np.float64))
  return 0.5 * np.abs(p - q).sum(axis=-1)


def target_tolerance(compute_dtype: str, temperature: float) -> float:
  """The largest `target_distance` between the targets at T of a build in `compute_dtype` and a float32 build's
  (same teachers, data, settings and storage dtype), when each member's logits keep `LOGIT_SPREAD` (δ): `δ / (4T)`,
  at most 1.

  Why: along the path from logits z to z + Δ, `dp/dt = p ⊙ (Δ − E_p[Δ]) / T`, whose L1 norm is `E_p|Δ − E_p[Δ]| / T`,
  the mean absolute deviation of a quantity within an interval of length δ over T: at most `δ / (2T)`. So
  `½ ||p − q||_1 <= δ / (4T)` for each member; the arithmetic rule's mixture moves by at most its members' mean, and
  the geometric rule's mean logits keep a spread of at most δ.

  Args:
    compute_dtype: one of `COMPUTE_DTYPES`.
    temperature: T > 0 of the targets.
  """
  return min(1.0, LOGIT_SPREAD[compute_dtype] / (4.0 * temperature))
