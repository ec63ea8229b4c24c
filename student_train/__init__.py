"""Stage 2: a jit-compiled Flax NNX trainer that streams cached soft targets (and trains teachers and baselines)."""

from student_train.loader import ArrayLoader, CacheLoader
from student_train.train import FitConfig, evaluate_runs, fit

__all__ = ["ArrayLoader", "CacheLoader", "FitConfig", "evaluate_runs", "fit"]
