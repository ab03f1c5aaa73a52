"""The bytes behind every floor and roofline: a small config counted by hand, and the models' own parameters."""

from __future__ import annotations

import pytest

from atom_trio.testing import LLAMA_3_1_8B, TINY_CONFIGS, transformers_config
from benchmarks.roofline import StepBytes, kv_cache_bytes, step_bytes, weight_bytes

# hidden 8, MLP 16, 2 layers, 2 query heads and 1 KV head of 4, a vocabulary of 10.
SMALL = dict(
    architectures=["LlamaForCausalLM"],
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    vocab_size=10,
    tie_word_embeddings=False,
)


def test_a_small_step_counted_by_hand() -> None:
    # Two sequences: one decodes (5 positions, 1 new), one runs a 2-token chunk (7 positions).
    parts = step_bytes(SMALL, [5, 7], query_lens=[1, 2])
    # A layer: qkv 8*(8+4+4)=128, o 8*8=64, gate_up 8*32=256, down 16*8=128, two norms 2*8=16 -> 592 weights.
    # Two layers 1184, final norm 8, LM head 10*8=80, embedding rows of the 3 tokens 3*8=24: 1296, 2 bytes each.
    assert parts.weights == 1296 * 2 == 2592
    # K and V, 2 layers, 1 head of 4, 5+7=12 positions, 2 bytes: 2*2*4*12*2.
    assert parts.kv_cache == 384
    # Two sampled rows of 10 float32 logits.
    assert parts.logits == 2 * 10 * 4 == 80
    assert parts.total == 3056
    assert parts.floor_ms(3056e3) == pytest.approx(1.0)  # 3056 bytes at 3056 kB/s: one millisecond


def test_tied_embeddings_and_qk_norms_by_hand() -> None:
    qwen3 = dict(SMALL, architectures=["Qwen3ForCausalLM"], tie_word_embeddings=True)
    # Each layer gains the q and k norms (2*4); the tied LM head reads the whole table, the lookup no more.
    assert weight_bytes(qwen3, tokens=3) == (2 * (592 + 8) + 8 + 80) * 2
    assert weight_bytes(dict(SMALL, attention_bias=True, mlp_bias=True), tokens=1) == (
        2 * (592 + (8 + 4 + 4 + 8) + (32 + 8)) + 8 + 80 + 8
    ) * 2


def test_llama_3_1_8b_decode_reads_15_gb_of_its_16() -> None:
    """The floor the docs quote: every weight but the embedding table, of which a decode step reads one row."""
    one_row = step_bytes(LLAMA_3_1_8B, [1024])
    assert one_row.weights == 15_009_857_536
    assert one_row.kv_cache == 1024 * 32 * 2 * 8 * 128 * 2
    whole_table = one_row.weights + (LLAMA_3_1_8B["vocab_size"] - 1) * LLAMA_3_1_8B["hidden_size"] * 2
    assert whole_table == 16_060_522_496  # every parameter: the 16.06 GB the floor once counted
    assert one_row.weights / 3011e9 * 1e3 == pytest.approx(4.985, abs=5e-4)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_weights_agree_with_the_models_parameters(arch: str) -> None:
    """The count follows the model as built: its parameters, less the embedding rows a step does not look up."""
    import torch

    from atom_trio.models import get_model_class

    config = dict(TINY_CONFIGS[arch], vocab_size=300)
    hf_config = transformers_config(config)
    model = get_model_class(hf_config)(hf_config)
    parameters = sum(p.numel() for p in model.parameters())  # a tied LM head is counted once
    tokens = 7
    unread = 0 if config["tie_word_embeddings"] else (300 - tokens) * config["hidden_size"]
    element = torch.tensor([], dtype=torch.bfloat16).element_size()
    assert weight_bytes(config, tokens=tokens, dtype_bytes=element) == (parameters - unread) * element


def test_kv_bytes_per_layer_and_bad_lengths() -> None:
    assert kv_cache_bytes(SMALL, 12, layers=1) * 2 == kv_cache_bytes(SMALL, 12)
    assert StepBytes(weights=1, kv_cache=2, logits=3).total == 6
    with pytest.raises(ValueError, match="query_len"):
        step_bytes(SMALL, [4], query_lens=[5])
