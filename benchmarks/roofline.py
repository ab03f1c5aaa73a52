"""The bytes a model step must move through device memory, and the floor time they set at a measured bandwidth.

A memory-bound step (decode) can be no faster than moving, once each, the bytes it cannot avoid:

- **weights used**: every linear (the LM head included), every norm's weight, any biases, and one row of the
  embedding table per token (the lookup gathers rows; it does not read the table). With tied embeddings the LM
  head reads the whole table, which then covers the lookup's rows;
- **KV cache**: the keys and values of every position each sequence attends to, in every layer: those already
  cached are read, the step's new ones written;
- **logits**: one row of the vocabulary per sampled sequence, written in float32 (what the runner returns).

Left out, as negligible next to these (kilobytes per token against gigabytes): activations between kernels,
the rotary table's rows, and the step's metadata (token ids, positions, block tables).

Every floor and roofline the benchmarks and docs quote comes from `step_bytes`; the decode-attention rows of
`benchmark_kernels` use `kv_cache_bytes` for their share of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

LOGITS_BYTES = 4  # float32, as the runner hands logits to the sampler


@attrs.frozen
class StepBytes:
    """What one step moves, by kind, in bytes."""

    weights: int
    kv_cache: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.logits

    def floor_ms(self, bandwidth: float) -> float:
        """Milliseconds to move `total` at ``bandwidth`` bytes per second."""
        return self.total / bandwidth * 1e3


def head_dim(config: Mapping[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def weight_bytes(config: Mapping[str, Any], *, tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of weights a step of ``tokens`` tokens reads: all but the embedding rows it does not look up.

    ``config`` is a Hugging Face ``config.json`` of a Llama or Qwen3 model (the architectures atom_trio runs).
    """
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], head_dim(config)
    intermediate = config["intermediate_size"]
    q_size, kv_size = heads * dim, kv_heads * dim
    per_layer = (
        hidden * (q_size + 2 * kv_size)  # qkv_proj
        + q_size * hidden  # o_proj
        + hidden * 2 * intermediate  # gate_up_proj
        + intermediate * hidden  # down_proj
        + 2 * hidden  # input and post-attention RMSNorm
    )
    if config.get("attention_bias"):
        per_layer += q_size + 2 * kv_size + hidden
    if config.get("mlp_bias"):
        per_layer += 2 * intermediate + hidden
    if _has_qk_norm(config):
        per_layer += 2 * dim  # the per-head q and k RMSNorms
    lm_head = vocab * hidden
    embedding_rows = 0 if config.get("tie_word_embeddings") else min(tokens, vocab) * hidden
    return (config["num_hidden_layers"] * per_layer + hidden + lm_head + embedding_rows) * dtype_bytes


def _has_qk_norm(config: Mapping[str, Any]) -> bool:
    """Qwen3 normalises each query and key head (by architecture, or model type for configs read from GGUF)."""
    return any(a.startswith("Qwen3") for a in config.get("architectures") or ()) or config.get("model_type") == "qwen3"


def kv_cache_bytes(
    config: Mapping[str, Any], positions: int, *, dtype_bytes: int = 2, layers: int | None = None
) -> int:
    """Bytes of keys and values at ``positions`` positions over ``layers`` layers (default: all of them)."""
    layers = config["num_hidden_layers"] if layers is None else layers
    return 2 * layers * config["num_key_value_heads"] * head_dim(config) * positions * dtype_bytes


def step_bytes(
    config: Mapping[str, Any],
    context_lens: Sequence[int],
    *,
    query_lens: Sequence[int] | None = None,
    dtype_bytes: int = 2,
    logits_bytes: int = LOGITS_BYTES,
) -> StepBytes:
    """What a step moves when sequence ``i`` attends to ``context_lens[i]`` positions, ``query_lens[i]`` of them new.

    ``query_lens`` defaults to one new token per sequence (a decode step); every sequence samples once.
    """
    query_lens = [1] * len(context_lens) if query_lens is None else query_lens
    if len(query_lens) != len(context_lens) or any(not 0 < q <= c for q, c in zip(query_lens, context_lens)):
        raise ValueError("each sequence needs 0 < query_len <= context_len")
    return StepBytes(
        weights=weight_bytes(config, tokens=sum(query_lens), dtype_bytes=dtype_bytes),
        kv_cache=kv_cache_bytes(config, sum(context_lens), dtype_bytes=dtype_bytes),
        logits=len(context_lens) * config["vocab_size"] * logits_bytes,
    )


def main() -> None:
    """Print the decode floor of Llama-3.1-8B shapes at a bandwidth, batch and context given on the command line."""
    import argparse

    from atom_trio.testing import LLAMA_3_1_8B

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--bandwidth-gb-s", type=float, required=True, help="measured copy bandwidth, GB/s")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024, help="positions each sequence attends to")
    args = parser.parse_args()
    parts = step_bytes(LLAMA_3_1_8B, [args.context] * args.batch)
    print(f"weights {parts.weights / 1e9:.4f} GB, KV cache {parts.kv_cache / 1e9:.4f} GB, "
          f"logits {parts.logits / 1e9:.4f} GB: floor {parts.floor_ms(args.bandwidth_gb_s * 1e9):.3f} ms")


if __name__ == "__main__":
    main()
