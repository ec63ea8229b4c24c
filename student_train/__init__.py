"""Stage 2: a jit-compiled Flax NNX trainer that streams cached soft targets (and trains teachers and baselines)."""

from student_train.config import FitConfig
from student_train.evaluate import evaluate_runs
from student_train.loader import ArrayLoader, CacheLoader
from student_train.train import fit, fit_group

__all__ = ["ArrayLoader", "CacheLoader", "FitConfig", "evaluate_runs", "fit", "fit_group"]
