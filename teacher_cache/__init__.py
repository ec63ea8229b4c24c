"""Stage 1: run a teacher ensemble once over a transfer set and cache its soft targets in Zarr v3."""

from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.info import cache_info
from teacher_cache.verify import verify_cache

__all__ = ["BuildConfig", "build_cache", "cache_info", "verify_cache"]
