"""Rotary position embedding with Hugging Face's frequencies (scaled variants included)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class RotaryEmbedding(nn.Module):
    """The cosines and sines that rotate query and key heads by position, rotate-half style.

    Computed once for every position, in float32, so a step only gathers its
    rows; `Attention` applies them (with the backend's ``rotary_store_kv``).
    """

    def __init__(self, inv_freq: torch.Tensor, max_position: int, *, attention_scaling: float = 1.0) -> None:
        super().__init__()
        # The leading features of each head that turn; less than the head with a partial rotary factor.
        self.rotary_dim = 2 * inv_freq.numel()
        # The positions follow the default device (the model's); scaled variants
        # compute ``inv_freq`` on the CPU, so bring it along.
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float().to(positions.device))
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_scaling
        self.register_buffer("cos_sin_cache", cache, persistent=False)


def get_rope(hf_config, head_dim: int, max_position: int) -> RotaryEmbedding:
    """The rotary embedding ``hf_config`` asks for (``rope_parameters``, or the older ``rope_theta``/``rope_scaling``).

    Scaled variants (llama3, linear, yarn, longrope) take their frequencies from
    transformers' own ``ROPE_INIT_FUNCTIONS``, so they match the reference
    implementation by construction. Dynamic NTK rescales with the sequence
    length at run time, which a precomputed cache cannot express.

    ``partial_rotary_factor`` (GLM-4-MoE: 0.5) turns only the first
    ``head_dim * factor`` features of each head, rotate-half within them, as
    transformers does; `Attention` passes the rest through.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        # The same arithmetic as transformers' default, so cos/sin are bit-identical.
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        scaling = 1.0
    elif rope_type == "dynamic" or rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not supported")
    else:
        # transformers makes some of its tensors on the default device: the meta device, when building there
        with torch.device("cpu"):
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    if inv_freq.numel() * 2 != rotary_dim:
        raise ValueError(
            f"rotary embedding of {inv_freq.numel()} frequencies does not fit {rotary_dim} of the head's {head_dim} "
            "features"
        )
    return RotaryEmbedding(inv_freq, max_position, attention_scaling=scaling)
