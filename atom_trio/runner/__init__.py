"""The model runner: KV cache, input preparation, forward and sampling for one device."""

from __future__ import annotations

from .model_runner import ModelRunner
from .profiling import RankProfiler

__all__ = ["ModelRunner", "RankProfiler"]
