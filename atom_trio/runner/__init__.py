"""The model runner: KV cache, input preparation, forward and sampling for one device."""

from __future__ import annotations

from .drafter import Drafter, NgramDrafter
from .model_runner import ModelRunner
from .profiling import RankProfiler

__all__ = ["Drafter", "ModelRunner", "NgramDrafter", "RankProfiler"]
