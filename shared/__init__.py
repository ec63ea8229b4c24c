"""stillroom's common package: data, augmentation, models, run dirs, the cache format, ensembles, losses.

The public names are imported on first use: an input worker (`shared.workers`) imports `shared.data` without
paying for JAX and Flax.
"""

import importlib

__version__ = "0.3.0"

_PUBLIC = {
    "shared.augment": ("Augmentation", "apply_view"),
    "shared.cache": ("LAYOUT", "Cache", "CacheSpec", "MemberSpec", "open_cache"),
    "shared.data": ("Normalization", "TransferSet", "open_transfer_set"),
    "shared.ensemble": ("COMBINE_RULES", "combine_log_probs"),
    "shared.errors": ("StillroomError",),
    "shared.models": ("MODELS", "ModelSpec", "build_model", "count_params"),
    "shared.runs": ("Teacher", "load_teacher", "save_run"),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = ["__version__", *_MODULE_OF]


def __getattr__(name: str):
  if name not in _MODULE_OF:
    raise AttributeError(f"module 'shared' has no attribute {name!r}")
  return getattr(importlib.import_module(_MODULE_OF[name]), name)


def __dir__() -> list[str]:
  return sorted(__all__)
