"""Qwen3 (dense): Llama's layout plus an RMSNorm on each query and key head."""

from __future__ import annotations

from .llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
