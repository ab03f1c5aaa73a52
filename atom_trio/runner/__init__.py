"""The model runner: KV cache, input preparation, forward and sampling for one device."""

from __future__ import annotations

from .model_runner import ModelRunner

__all__ = ["ModelRunner"]
