"""Model architectures, chosen by the config's ``architectures`` through `get_model_class`."""

from __future__ import annotations

from .llama import LlamaForCausalLM
from .qwen3 import Qwen3ForCausalLM
from .registry import MODEL_REGISTRY, get_model_class

__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "Qwen3ForCausalLM", "get_model_class"]

