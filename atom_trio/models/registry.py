"""Hugging Face ``architectures`` names (or, failing those, ``model_type``) -> model classes."""

from __future__ import annotations

from torch import nn

from atom_trio.errors import ModelLoadError

from .deepseek_mtp import DeepseekMTP
from .deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from .eagle import EagleLlamaForCausalLM
from .eagle3 import Eagle3LlamaForCausalLM
from .glm4_moe import Glm4MoeForCausalLM
from .gpt_oss import GptOssForCausalLM
from .llama import LlamaForCausalLM
from .mixtral import MixtralForCausalLM
from .qwen3 import Qwen3ForCausalLM
from .qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Glm4MoeForCausalLM": Glm4MoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    # Draft heads: the drafter names them in the draft checkpoint's config (which names another class).
    "EagleLlamaForCausalLM": EagleLlamaForCausalLM,
    "Eagle3LlamaForCausalLM": Eagle3LlamaForCausalLM,
    "DeepseekMTP": DeepseekMTP,
}

# Configs built from GGUF metadata may name only the model type.
_BY_MODEL_TYPE: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM}


def get_model_class(hf_config) -> type[nn.Module]:
    """The class for the first of the config's ``architectures`` we implement, else for its ``model_type``."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    model_type = getattr(hf_config, "model_type", None)
    if not architectures and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ModelLoadError(
        f"model architecture {architectures or model_type or '(none given)'} is not supported; "
        f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )
