"""A model directory's ``config.json`` as a transformers config, read without running any code the checkpoint ships.

atom_trio implements every architecture it serves, so the configuration and modeling code a checkpoint may
name in its ``auto_map`` is never needed and never run, with or without ``--trust-remote-code`` (which
covers tokenizers only). The model itself comes from ``architectures`` (`atom_trio.models.get_model_class`).
"""

from __future__ import annotations

from pathlib import Path

import transformers

from atom_trio.errors import ModelLoadError

# Model types that name, in config.json, an architecture transformers knows by another type: Kimi-K2's
# checkpoints are DeepSeek-V3's (transformers reads Kimi-K2.5's text config as DeepSeek-V3's the same way).
_CONFIG_OF_MODEL_TYPE = {"kimi_k2": "deepseek_v3"}


def read_hf_config(path: Path) -> transformers.PretrainedConfig:
    """The config of the model directory ``path``, by transformers' own config classes."""
    config_dict, _ = transformers.PretrainedConfig.get_config_dict(path)
    model_type = config_dict.get("model_type")
    if model_type in _CONFIG_OF_MODEL_TYPE:
        model_type = _CONFIG_OF_MODEL_TYPE[model_type]
        return transformers.CONFIG_MAPPING[model_type].from_dict({**config_dict, "model_type": model_type})
    own_code = (config_dict.get("auto_map") or {}).get("AutoConfig")
    if own_code and model_type not in transformers.CONFIG_MAPPING:
        raise ModelLoadError(
            f"{path}/config.json has model_type {model_type!r}, which transformers does not know, and names its own "
            f"config code ({own_code}); atom_trio never runs a checkpoint's config or model code "
            "(--trust-remote-code covers tokenizers only)"
        )
    return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
