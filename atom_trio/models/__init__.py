"""Model architectures, chosen by the config's ``architectures`` through `get_model_class`."""

from __future__ import annotations

from .deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from .eagle import EagleLlamaForCausalLM
from .glm4_moe import Glm4MoeForCausalLM
from .gpt_oss import GptOssForCausalLM
from .llama import LlamaForCausalLM
from .mixtral import MixtralForCausalLM
from .qwen3 import Qwen3ForCausalLM
from .qwen3_moe import Qwen3MoeForCausalLM
from .registry import MODEL_REGISTRY, get_model_class

__all__ = [
    "MODEL_REGISTRY",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "EagleLlamaForCausalLM",
    "Glm4MoeForCausalLM",
    "GptOssForCausalLM",
    "LlamaForCausalLM",
    "MixtralForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "get_model_class",
]

