"""The model configurations that tests and benchmarks share, and the helpers that turn them into model directories.

Each configuration is the contents of a Hugging Face ``config.json``:

- Real models' shapes (``LLAMA_3_1_8B``, ``QWEN3_0_6B``, and the mixture-of-experts ``QWEN3_30B_A3B``,
  ``MIXTRAL_8X7B``, ``GLM_4_5_AIR``, ``DEEPSEEK_V2_LITE``, ``GPT_OSS_20B``, ``GPT_OSS_120B``: ``configs/*.json``,
  the GPT-OSS ones as published, MXFP4 ``quantization_config`` included), for dummy-weight runs at their true sizes: real
  weights can't travel to the GPU machine, and ``--load-format dummy`` with one of these gives the same
  shapes, bytes and FLOPs. The GPU tests and the recorded benchmark figures depend on these
  exact values.
- Tiny models (``TINY_CONFIGS``, and the mixture-of-experts ones in ``TINY_MOE_CONFIGS``), written with random
  weights by transformers itself and the default model's tokenizer, so every path a user's model takes
  (config.json, safetensors, tokenizer files) runs on the CPU in seconds, with transformers' own
  implementation as the reference.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path
from typing import Any


def _real_config(name: str) -> dict[str, Any]:
    return json.loads((Path(__file__).with_name("configs") / f"{name}.json").read_text())


LLAMA_3_1_8B = _real_config("llama-3.1-8b")
QWEN3_0_6B = _real_config("qwen3-0.6b")
QWEN3_30B_A3B = _real_config("qwen3-30b-a3b")
MIXTRAL_8X7B = _real_config("mixtral-8x7b")
GLM_4_5_AIR = _real_config("glm-4.5-air")
DEEPSEEK_V2_LITE = _real_config("deepseek-v2-lite")
GPT_OSS_20B = _real_config("gpt-oss-20b")
GPT_OSS_120B = _real_config("gpt-oss-120b")
REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": LLAMA_3_1_8B,
    "qwen3-0.6b": QWEN3_0_6B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "mixtral-8x7b": MIXTRAL_8X7B,
    "glm-4.5-air": GLM_4_5_AIR,
    "deepseek-v2-lite": DEEPSEEK_V2_LITE,
    "gpt-oss-20b": GPT_OSS_20B,
    "gpt-oss-120b": GPT_OSS_120B,
}
"""The real models' shapes by name (their file in ``configs/``): what a benchmark's ``--config`` picks."""


def add_model_shapes_arguments(parser: argparse.ArgumentParser, default: str = "llama-3.1-8b") -> None:
    """A benchmark's ``--config`` and ``--unquantized``, which `model_shapes` reads."""
    parser.add_argument(
        "--config", default=default, help=f"the model's shapes: one of {', '.join(REAL_CONFIGS)}, or a config.json path"
    )
    parser.add_argument(
        "--unquantized", action="store_true", help="drop the config's quantization_config: dense dummy weights"
    )


def model_shapes(config: str, *, unquantized: bool = False) -> dict[str, Any]:
    """A benchmark's ``--config``: the name of one of `REAL_CONFIGS`, or the path of a ``config.json`` (tiny shapes
    for a smoke run on the CPU, a variant of a real model). ``unquantized``: without its ``quantization_config``,
    the same shapes with dense weights (the baseline of a quantized model)."""
    if config in REAL_CONFIGS:
        shapes = REAL_CONFIGS[config]
    elif Path(config).is_file():
        shapes = json.loads(Path(config).read_text())
    else:
        raise ValueError(f"--config {config!r} is neither one of {sorted(REAL_CONFIGS)} nor a config.json file")
    return {key: value for key, value in shapes.items() if not (unquantized and key == "quantization_config")}


_TINY_LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _TINY_LLAMA,
    # Llama-3.1's rope scaling over an original context of 256 positions, which the tests run far past;
    # one KV head for all four query heads, and tied embeddings.
    "llama3": dict(
        _TINY_LLAMA,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters=dict(LLAMA_3_1_8B["rope_parameters"], original_max_position_embeddings=256),
    ),
    # The llama's sizes with Qwen3's q/k norms, and a head size that is not hidden_size / heads.
    "qwen3": dict(
        _TINY_LLAMA,
        architectures=["Qwen3ForCausalLM"],
        head_dim=32,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}
"""Tiny random-weight models by name; vocabulary and special tokens come from the tokenizer they are saved with."""

_TINY_MOE = dict(_TINY_LLAMA, num_hidden_layers=3, num_experts_per_tok=2, moe_intermediate_size=32)
TINY_MOE_CONFIGS: dict[str, dict[str, Any]] = {
    # Sparse layers 0 and 2, a dense one between (mlp_only_layers); softmax top-2 of 8, renormalized.
    "qwen3_moe": dict(
        _TINY_MOE,
        architectures=["Qwen3MoeForCausalLM"],
        head_dim=32,
        rms_norm_eps=1e-6,
        num_experts=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    ),
    # Every layer sparse, top-2 of 8 experts of intermediate_size.
    "mixtral": dict(_TINY_LLAMA, architectures=["MixtralForCausalLM"], num_local_experts=8, num_experts_per_tok=2),
    # One dense layer first, then sigmoid routing over 4 groups of 2 experts (the best 2 groups compete),
    # a shared expert, a routed scaling factor; q/k/v biases, q/k norms, rotary on half of each head.
    "glm4_moe": dict(
        _TINY_MOE,
        architectures=["Glm4MoeForCausalLM"],
        head_dim=32,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        attention_bias=True,
        use_qk_norm=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
    ),
}
"""Tiny mixture-of-experts models (see `write_tiny_model_dir` for their routers); kept apart from ``TINY_CONFIGS``,
whose dense architectures other tests and the byte-count checks iterate over."""

_TINY_MLA = dict(
    _TINY_MOE,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=24,
    n_routed_experts=8,
    n_shared_experts=1,
    first_k_dense_replace=1,
    rms_norm_eps=1e-6,
)
TINY_MLA_CONFIGS: dict[str, dict[str, Any]] = {
    # Queries straight from q_proj; greedy softmax top-2 of 8, scaled; a dense first layer.
    "deepseek_v2": dict(
        _TINY_MLA,
        architectures=["DeepseekV2ForCausalLM"],
        q_lora_rank=None,
        topk_method="greedy",
        routed_scaling_factor=1.5,
    ),
    # Low-rank queries; group-limited greedy: the best 2 of 4 groups (rated by their best expert) compete.
    "deepseek_v2_lora": dict(
        _TINY_MLA,
        architectures=["DeepseekV2ForCausalLM"],
        q_lora_rank=24,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.0,
    ),
    # Low-rank queries; YaRN over an original context of 64 positions with DeepSeek's mscale / mscale_all_dim;
    # noaux_tc routing (sigmoid, biased choice, 2 of 4 groups), renormalized and scaled; a dense first layer.
    "deepseek_v3": dict(
        _TINY_MLA,
        architectures=["DeepseekV3ForCausalLM"],
        q_lora_rank=24,
        n_group=4,
        topk_group=2,
        max_position_embeddings=256,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=4.0,
            original_max_position_embeddings=64,
            mscale=1.0,
            mscale_all_dim=0.8,
            beta_fast=32,
            beta_slow=1,
        ),
    ),
}
"""Tiny multi-head latent attention models (DeepSeek-V2/V3); their routers are sharpened as ``TINY_MOE_CONFIGS``'."""

TINY_GPT_OSS_MXFP4 = dict(
    GPT_OSS_20B,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=4,
    layer_types=["sliding_attention", "full_attention"] * 2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=8,
    sliding_window=8,
    max_position_embeddings=4096,
    vocab_size=49152,  # the default model's tokenizer's, which serving runs use
    eos_token_id=2,
    pad_token_id=1,
)
"""gpt-oss-20b's config (MXFP4 experts, YaRN, sinks, biases) at tiny sizes: 8 experts of 32, top-4, a window of 8, for
dummy-weight smoke runs of the benchmarks on the CPU (`write_model_dir`)."""

ROUTER_GAIN = 10.0
"""Tiny MoE models' router weights are scaled by this, so that a token's chosen experts win by margins far above
float32 rounding and the choice is the same whatever the order of the arithmetic (see `write_tiny_model_dir`)."""


def transformers_config(hf_config: dict[str, Any], **overrides: Any):
    """``hf_config`` with ``overrides`` as the transformers config class of its architecture."""
    import transformers

    values = copy.deepcopy({**hf_config, **overrides})  # a config class may rewrite rope_parameters in place
    return getattr(transformers, values["architectures"][0]).config_class(**values)


def sharpen_routers(model):
    """``model`` (transformers', random weights) with decisive expert choices; returned for chaining.

    Its routers' weights are multiplied by `ROUTER_GAIN` (at transformers' initial scale the top-k margins
    are small enough for rounding to swap experts between two correct implementations), and GLM-4-MoE's
    ``e_score_correction_bias`` (zeros at initialisation) is drawn, so that it takes part in the choice.
    A dense model is returned unchanged.
    """
    import torch

    with torch.no_grad():
        for param_name, tensor in model.state_dict(keep_vars=True).items():
            if param_name.endswith("mlp.gate.weight"):
                tensor.mul_(ROUTER_GAIN)
            elif param_name.endswith("e_score_correction_bias"):
                tensor.normal_(0.0, 0.1)
    return model


def write_tiny_model_dir(name: str, root: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """``root/name``: the tiny model ``name``, random weights drawn from ``seed``, ``tokenizer_dir``'s tokenizer.

    A mixture-of-experts model's routers are sharpened (`sharpen_routers`).
    """
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers_config(
        {**TINY_CONFIGS, **TINY_MOE_CONFIGS, **TINY_MLA_CONFIGS}[name],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = sharpen_routers(getattr(transformers, config.architectures[0])(config).eval())
    out = root / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    generation_config = tokenizer_dir / "generation_config.json"
    if generation_config.exists() and not (out / generation_config.name).exists():
        shutil.copy(generation_config, out / generation_config.name)
    return out


def transformers_greedy(model, prompt: list[int], max_tokens: int, repetition_penalty: float = 1.0) -> list[int]:
    """Transformers' greedy ``generate`` of ``prompt`` alone: the reference our greedy tokens must equal.

    It stops at the model's EOS, so it may return fewer than ``max_tokens`` tokens.
    """
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            repetition_penalty=repetition_penalty,
        )
    return out[0, len(prompt) :].tolist()


def write_model_dir(path: Path, hf_config: dict[str, Any], tokenizer_from: Path | None = None) -> Path:
    """A model directory of ``hf_config`` without weights (for ``--load-format dummy``).

    With ``tokenizer_from`` (a directory with a byte-level BPE ``tokenizer.json`` and its
    ``tokenizer_config.json``), its tokenizer goes in too, the vocabulary padded with placeholder tokens up to
    the model's ``vocab_size``: random weights generate ids over the whole model vocabulary, and an id the
    tokenizer does not know decodes to no text, which would hide most tokens from text-chunk timings.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=1))
    if tokenizer_from is None:
        return path
    shutil.copy(tokenizer_from / "tokenizer_config.json", path / "tokenizer_config.json")
    tokenizer = json.loads((tokenizer_from / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    # ASCII placeholders after the byte-level space marker: each decodes to " tok<id>"
    for token_id in range(max(vocab.values()) + 1, hf_config["vocab_size"]):
        vocab[f"\u0120tok{token_id}"] = token_id
    (path / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    return path
