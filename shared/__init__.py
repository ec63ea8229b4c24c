"""stillroom's common package: data, augmentation, models, run dirs, the cache format, ensembles, losses."""

__version__ = "0.3.0"

from shared.augment import Augmentation, apply_view
from shared.cache import LAYOUT, Cache, CacheSpec, MemberSpec, open_cache
from shared.data import Normalization, TransferSet, open_transfer_set
from shared.ensemble import COMBINE_RULES, combine_log_probs
from shared.errors import StillroomError
from shared.models import MODELS, ModelSpec, build_model, count_params
from shared.runs import Teacher, load_teacher, save_run

__all__ = ["__version__", "Augmentation", "apply_view", "LAYOUT", "Cache", "CacheSpec", "MemberSpec", "open_cache", "Normalization", "TransferSet", "open_transfer_set", "COMBINE_RULES", "combine_log_probs", "StillroomError", "MODELS", "ModelSpec", "build_model", "count_params", "Teacher", "load_teacher", "save_run"]
