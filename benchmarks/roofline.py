"""The bytes a model step must move through device memory, and the floor time they set at a measured bandwidth.

A memory-bound step (decode) can be no faster than moving, once each, the bytes it cannot avoid:

- **weights used**: every linear (the LM head included), every norm's weight, any biases, attention sinks
  (GPT-OSS: a logit per head and layer), and one row of the embedding table per token (the lookup gathers rows;
  it does not read the table). With tied embeddings the LM head reads the whole table, which then covers the
  lookup's rows;
- **routed experts** (mixture-of-experts models): in each sparse layer, the gate, up and down weights of the
  distinct experts the step's tokens are routed to, never all of them (a decode step of one token reads its
  ``top_k``; a large batch reads nearly all). Either the count a real router gave, or the expected count for
  uniform random routing (`expected_distinct_experts`). The router and any shared experts are weights used;
- **KV cache**: the keys and values of every position each sequence attends to, in every layer: those already
  cached are read, the step's new ones written. A sliding-window layer (``layer_types``' ``sliding_attention``,
  GPT-OSS) attends to the last ``sliding_window`` positions of its queries only; a full layer to the whole
  context. With multi-head latent attention (DeepSeek) that is one latent vector and rotary key a position and
  layer, which decode reads as they are;
- **logits**: one row of the vocabulary per sampled sequence, written in float32 (what the runner returns).

Bytes are counted as stored (`Storage`): a ``quantization_config`` of ``fp8`` with ``weight_block_size``
(DeepSeek-V3, Qwen3-FP8) holds every decoder matrix but the router in one byte an element and a float32 scale a
block; ``mxfp4`` (GPT-OSS) the experts in 4.25 bits a weight (two e2m1 codes a byte, one e8m0 scale byte a
group of 32). Another quantization method is refused rather than counted as dense.

Left out, as negligible next to these (kilobytes per token against gigabytes): activations between kernels,
the rotary table's rows, the routing ids and weights, and the step's metadata (token ids, positions, block
tables).

Every floor and roofline the benchmarks and docs quote comes from `step_bytes`; the decode-attention rows of
`benchmark_kernels` use `kv_cache_bytes` for their share of it. `prefill_flops` counts the matmul work of a
prefill from the same shapes, for TFLOP/s figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

LOGITS_BYTES = 4  # float32, as the runner hands logits to the sampler
FLOAT32_BYTES = 4
MXFP4_GROUP = 32  # inputs sharing one e8m0 scale


@attrs.frozen
class StepBytes:
    """What one step moves, by kind, in bytes."""

    weights: int
    """Every weight the step reads but the routed experts."""
    kv_cache: int
    logits: int
    experts: int = 0
    """The routed experts' weights the step's tokens select (0 for a dense model)."""

    @property
    def total(self) -> int:
        return self.weights + self.experts + self.kv_cache + self.logits

    def floor_ms(self, bandwidth: float) -> float:
        """Milliseconds to move `total` at ``bandwidth`` bytes per second."""
        return self.total / bandwidth * 1e3


@attrs.frozen
class MoeShape:
    """How a mixture-of-experts model's layers hold their experts (`moe_shape` reads it from a config)."""

    num_experts: int
    """Routed experts per sparse layer."""
    top_k: int
    expert_intermediate: int
    sparse_layers: frozenset[int]
    """Layers with experts; the others have a dense MLP of ``intermediate_size``."""
    shared_intermediate: int = 0
    """The always-on shared experts' intermediate size, all of them together (0: none)."""
    router_float32: bool = False
    """The router's weight (and bias) stay float32 whatever the model's dtype (GLM-4-MoE)."""
    router_bias: bool = False
    """A bias per expert next to the router's weight (GLM-4-MoE's score correction, GPT-OSS's router bias)."""
    expert_bias: bool = False
    """Each expert's gate, up and down projections have biases (GPT-OSS)."""

    def expert_params(self, hidden: int) -> int:
        """One routed expert's gate, up and down weights, in elements."""
        return 3 * hidden * self.expert_intermediate

    def expert_shapes(self, hidden: int) -> list[tuple[int, int]]:
        """One routed expert's gate, up and down matrices, ``(out, in)``."""
        inter = self.expert_intermediate
        return [(inter, hidden), (inter, hidden), (hidden, inter)]

    def expert_bias_params(self, hidden: int) -> int:
        return 2 * self.expert_intermediate + hidden if self.expert_bias else 0


def moe_shape(config: Mapping[str, Any]) -> MoeShape | None:
    """The experts of a Qwen3-MoE, Mixtral, GLM-4-MoE, DeepSeek-V2/V3 or GPT-OSS ``config.json``; ``None`` for a
    dense model.

    Which layers are sparse follows each family's rule, as its model file builds it.
    """
    architecture = (config.get("architectures") or [""])[0]
    layers = range(config["num_hidden_layers"])
    if architecture == "Qwen3MoeForCausalLM":
        dense = set(config.get("mlp_only_layers") or ())
        step = config.get("decoder_sparse_step", 1)
        return MoeShape(
            num_experts=config["num_experts"],
            top_k=config["num_experts_per_tok"],
            expert_intermediate=config["moe_intermediate_size"],
            sparse_layers=frozenset(
                i for i in layers if i not in dense and config["num_experts"] > 0 and (i + 1) % step == 0
            ),
        )
    if architecture in ("MixtralForCausalLM", "GptOssForCausalLM"):
        biased = architecture == "GptOssForCausalLM"  # its router and experts have biases
        return MoeShape(
            num_experts=config["num_local_experts"],
            top_k=config["num_experts_per_tok"],
            expert_intermediate=config["intermediate_size"],
            sparse_layers=frozenset(layers),
            router_bias=biased,
            expert_bias=biased,
        )
    if architecture in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM") and config.get("n_routed_experts"):
        freq = config.get("moe_layer_freq", 1)
        return MoeShape(
            num_experts=config["n_routed_experts"],
            top_k=config["num_experts_per_tok"],
            expert_intermediate=config["moe_intermediate_size"],
            sparse_layers=frozenset(i for i in layers if i >= config.get("first_k_dense_replace", 0) and i % freq == 0),
            shared_intermediate=config["moe_intermediate_size"] * (config.get("n_shared_experts") or 0),
            router_float32=True,
            router_bias=architecture == "DeepseekV3ForCausalLM",  # V3's noaux_tc routing is GLM-4-MoE's
        )
    if architecture == "Glm4MoeForCausalLM":
        return MoeShape(
            num_experts=config["n_routed_experts"],
            top_k=config["num_experts_per_tok"],
            expert_intermediate=config["moe_intermediate_size"],
            sparse_layers=frozenset(i for i in layers if i >= config.get("first_k_dense_replace", 0)),
            shared_intermediate=config["moe_intermediate_size"] * config.get("n_shared_experts", 0),
            router_float32=True,
            router_bias=True,
        )
    return None


@attrs.frozen
class Storage:
    """How many bytes the weights take as a checkpoint's ``quantization_config`` stores them (`storage`)."""

    dtype_bytes: int = 2
    """An unquantized element: the model's dtype."""
    decoder: str = "dense"
    """The decoder layers' matrices but the router: ``"dense"`` or ``"fp8"`` (with ``block``)."""
    experts: str = "dense"
    """The routed experts' matrices: ``"dense"``, ``"fp8"`` (with ``block``) or ``"mxfp4"``."""
    block: tuple[int, int] = (128, 128)
    """FP8's block of ``(rows, columns)`` sharing a float32 scale."""

    def matrix_bytes(self, shapes: Sequence[tuple[int, int]], kind: str = "dense") -> int:
        """Bytes of matrices of ``shapes`` ``(out, in)`` stored as ``kind``."""
        if kind == "fp8":
            rows, cols = self.block
            return sum(o * i + -(-o // rows) * -(-i // cols) * FLOAT32_BYTES for o, i in shapes)
        if kind == "mxfp4":  # two codes a byte, a scale byte a group of 32 inputs
            return sum(o * i // 2 + o * -(-i // MXFP4_GROUP) for o, i in shapes)
        return sum(o * i for o, i in shapes) * self.dtype_bytes


def storage(config: Mapping[str, Any], dtype_bytes: int = 2) -> Storage:
    """How ``config``'s ``quantization_config`` stores the weights (none: every element in ``dtype_bytes``)."""
    quant = config.get("quantization_config")
    if not quant:
        return Storage(dtype_bytes=dtype_bytes)
    method = quant.get("quant_method")
    if method == "mxfp4":  # GPT-OSS: the experts only (modules_to_not_convert lists everything else)
        return Storage(dtype_bytes=dtype_bytes, experts="mxfp4")
    if method == "fp8" and quant.get("weight_block_size"):
        block = tuple(quant["weight_block_size"])
        return Storage(dtype_bytes=dtype_bytes, decoder="fp8", experts="fp8", block=block)
    raise ValueError(f"the roofline does not count quantization_config {quant}; add its storage to `storage`")


def expected_distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """How many distinct experts ``tokens`` tokens touch, on average, each routed to ``top_k`` of ``num_experts``.

    For uniform random routing (each token's experts a random ``top_k``-subset, tokens independent) an expert
    is missed by one token with probability ``1 - top_k / num_experts``, so by all of them with that to the
    power ``tokens``: ``num_experts * (1 - (1 - top_k / num_experts) ** tokens)``, exactly.
    """
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def head_dim(config: Mapping[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _is_latent_attention(config: Mapping[str, Any]) -> bool:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): keys and values from one compressed vector."""
    return config.get("kv_lora_rank") is not None


def _attention_shapes(config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """One layer's attention projections as the checkpoint holds them, ``(out, in)``.

    Latent attention: the queries (``q_proj``, or ``q_a_proj`` then ``q_b_proj``), ``kv_a_proj_with_mqa`` (the
    latent and the rotary key), ``kv_b_proj`` (each head's key and value from the latent) and ``o_proj``.
    """
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if _is_latent_attention(config):
        nope, rope, v, latent = (config[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"))
        q_rank = config.get("q_lora_rank")
        queries = [(heads * (nope + rope), hidden)] if q_rank is None else [(q_rank, hidden), (heads * (nope + rope), q_rank)]
        return [*queries, (latent + rope, hidden), (heads * (nope + v), latent), (hidden, heads * v)]
    dim = head_dim(config)
    q_size, kv_size = config["num_attention_heads"] * dim, config["num_key_value_heads"] * dim
    return [(q_size, hidden), (kv_size, hidden), (kv_size, hidden), (hidden, q_size)]


def _attention_matrices(config: Mapping[str, Any]) -> int:
    """One layer's attention projections, their matrices only, in elements."""
    return sum(o * i for o, i in _attention_shapes(config))


def _attention_extras(config: Mapping[str, Any]) -> int:
    """One layer's attention but its matrices, in elements: their biases, the per-head q/k norms, the sinks
    (latent attention: its two RMSNorms, and biases on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj``)."""
    hidden = config["hidden_size"]
    params = 0
    if _is_latent_attention(config):
        q_rank, latent = config.get("q_lora_rank") or 0, config["kv_lora_rank"]
        params += q_rank + latent
        if config.get("attention_bias"):
            params += q_rank + latent + config["qk_rope_head_dim"] + hidden
        return params
    dim = head_dim(config)
    q_size, kv_size = config["num_attention_heads"] * dim, config["num_key_value_heads"] * dim
    if config.get("attention_bias"):
        o_bias = (config.get("architectures") or [""])[0] != "Glm4MoeForCausalLM"  # GLM biases q, k, v only
        params += q_size + 2 * kv_size + (hidden if o_bias else 0)
    if _has_qk_norm(config):
        params += 2 * dim
    if _has_sinks(config):
        params += config["num_attention_heads"]
    return params


def _has_sinks(config: Mapping[str, Any]) -> bool:
    return (config.get("architectures") or [""])[0] == "GptOssForCausalLM"


def _mlp_shapes(config: Mapping[str, Any], intermediate: int) -> list[tuple[int, int]]:
    """A gated MLP (gate, up, down) of ``intermediate``, ``(out, in)``."""
    hidden = config["hidden_size"]
    return [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]


def _mlp_bias(config: Mapping[str, Any], intermediate: int) -> int:
    return 2 * intermediate + config["hidden_size"] if config.get("mlp_bias") else 0


def _has_qk_norm(config: Mapping[str, Any]) -> bool:
    """Qwen3 normalises each query and key head (by architecture, or model type for configs read from GGUF);
    GLM-4-MoE when ``use_qk_norm``."""
    return (
        any(a.startswith("Qwen3") for a in config.get("architectures") or ())
        or config.get("model_type") == "qwen3"
        or bool(config.get("use_qk_norm"))
    )


def weight_bytes(config: Mapping[str, Any], *, tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of weights a step of ``tokens`` tokens reads, the routed experts aside (`expert_bytes`).

    That is all of them but the embedding rows it does not look up, as stored (`storage`). ``config`` is a
    Hugging Face ``config.json`` of an architecture atom_trio runs (Llama, Qwen3, Qwen3-MoE, Mixtral, GLM-4-MoE,
    DeepSeek-V2/V3, GPT-OSS).
    """
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    moe = moe_shape(config)
    stored = storage(config, dtype_bytes)
    params = float32_params = matrix_bytes = 0
    for layer in range(config["num_hidden_layers"]):
        params += _attention_extras(config) + 2 * hidden  # and the input and post-attention RMSNorms
        matrix_bytes += stored.matrix_bytes(_attention_shapes(config), stored.decoder)
        if moe is None or layer not in moe.sparse_layers:
            matrix_bytes += stored.matrix_bytes(_mlp_shapes(config, config["intermediate_size"]), stored.decoder)
            params += _mlp_bias(config, config["intermediate_size"])
            continue
        router = moe.num_experts * hidden + (moe.num_experts if moe.router_bias else 0)
        if moe.router_float32:
            float32_params += router
        else:
            params += router
        if moe.shared_intermediate:
            matrix_bytes += stored.matrix_bytes(_mlp_shapes(config, moe.shared_intermediate), stored.decoder)
            params += _mlp_bias(config, moe.shared_intermediate)
    lm_head = vocab * hidden
    embedding_rows = 0 if config.get("tie_word_embeddings") else min(tokens, vocab) * hidden
    return (params + hidden + lm_head + embedding_rows) * dtype_bytes + matrix_bytes + float32_params * FLOAT32_BYTES


def expert_bytes(
    config: Mapping[str, Any],
    *,
    tokens: int,
    distinct_experts: Sequence[float] | None = None,
    dtype_bytes: int = 2,
) -> int:
    """Bytes of routed experts a step of ``tokens`` tokens reads: the distinct experts of each sparse layer, as
    stored (`storage`), with their biases if they have them.

    ``distinct_experts``: how many each sparse layer's router chose (in layer order; a mean over steps may be
    fractional), as measured; by default the expected count for uniform random routing. 0 for a dense model.
    """
    moe = moe_shape(config)
    if moe is None:
        return 0
    if distinct_experts is None:
        distinct_experts = [expected_distinct_experts(moe.num_experts, moe.top_k, tokens)] * len(moe.sparse_layers)
    if len(distinct_experts) != len(moe.sparse_layers):
        raise ValueError(f"{len(distinct_experts)} expert counts for {len(moe.sparse_layers)} sparse layers")
    if any(not 0 <= n <= moe.num_experts for n in distinct_experts):
        raise ValueError(f"each sparse layer has {moe.num_experts} experts; got counts {list(distinct_experts)}")
    hidden, stored = config["hidden_size"], storage(config, dtype_bytes)
    per_expert = (
        stored.matrix_bytes(moe.expert_shapes(hidden), stored.experts) + moe.expert_bias_params(hidden) * dtype_bytes
    )
    return round(sum(distinct_experts) * per_expert)


def kv_cache_bytes(
    config: Mapping[str, Any], positions: int, *, dtype_bytes: int = 2, layers: int | None = None
) -> int:
    """Bytes of keys and values at ``positions`` positions over ``layers`` layers (default: all of them)."""
    layers = config["num_hidden_layers"] if layers is None else layers
    if _is_latent_attention(config):
        return layers * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * positions * dtype_bytes
    return 2 * layers * config["num_key_value_heads"] * head_dim(config) * positions * dtype_bytes


def sliding_layers(config: Mapping[str, Any]) -> int:
    """How many layers attend within a window of ``sliding_window`` positions (``layer_types``' ``sliding_attention``)."""
    if not config.get("sliding_window"):
        return 0
    return sum(kind == "sliding_attention" for kind in config.get("layer_types") or ())


def attended_positions(config: Mapping[str, Any], context_lens: Sequence[int], query_lens: Sequence[int]) -> int:
    """Positions whose keys and values a step touches, summed over layers and sequences.

    A full layer: each sequence's whole context. A sliding layer: the union of its queries' windows, the
    ``sliding_window`` positions up to each query (itself included, as transformers masks), so a chunk of
    ``q`` queries touches ``sliding_window + q - 1`` positions, at most its context.
    """
    sliding = sliding_layers(config)
    full = config["num_hidden_layers"] - sliding
    window = config.get("sliding_window") or 0
    return sum(full * c + sliding * min(c, window + q - 1) for c, q in zip(context_lens, query_lens))


def step_bytes(
    config: Mapping[str, Any],
    context_lens: Sequence[int],
    *,
    query_lens: Sequence[int] | None = None,
    distinct_experts: Sequence[float] | None = None,
    dtype_bytes: int = 2,
    logits_bytes: int = LOGITS_BYTES,
) -> StepBytes:
    """What a step moves when sequence ``i`` has ``context_lens[i]`` positions, ``query_lens[i]`` of them new.

    ``query_lens`` defaults to one new token per sequence (a decode step); every sequence samples once.
    ``distinct_experts``: see `expert_bytes`.
    """
    query_lens = [1] * len(context_lens) if query_lens is None else query_lens
    if len(query_lens) != len(context_lens) or any(not 0 < q <= c for q, c in zip(query_lens, context_lens)):
        raise ValueError("each sequence needs 0 < query_len <= context_len")
    tokens = sum(query_lens)
    return StepBytes(
        weights=weight_bytes(config, tokens=tokens, dtype_bytes=dtype_bytes),
        experts=expert_bytes(config, tokens=tokens, distinct_experts=distinct_experts, dtype_bytes=dtype_bytes),
        kv_cache=kv_cache_bytes(
            config, attended_positions(config, context_lens, query_lens), dtype_bytes=dtype_bytes, layers=1
        ),
        logits=len(context_lens) * config["vocab_size"] * logits_bytes,
    )


def active_params_per_token(config: Mapping[str, Any]) -> int:
    """The matrix elements one token multiplies through the decoder layers (the LM head aside).

    Each layer's attention projections, and its dense MLP, or its router, shared experts and the
    ``top_k`` routed experts the token goes to. Biases and norms are left out (no matmul).
    """
    hidden = config["hidden_size"]
    moe = moe_shape(config)
    params = 0
    for layer in range(config["num_hidden_layers"]):
        params += _attention_matrices(config)
        if moe is None or layer not in moe.sparse_layers:
            params += 3 * hidden * config["intermediate_size"]
        else:
            params += moe.num_experts * hidden + 3 * hidden * moe.shared_intermediate
            params += moe.top_k * moe.expert_params(hidden)
    return params


def prefill_flops(config: Mapping[str, Any], tokens: int) -> float:
    """Matmul FLOPs of one causal prefill of ``tokens``: the active parameters, attention, one row of LM head.

    Attention counts QK^T and PV over the causal half (``tokens * (tokens + 1) / 2`` pairs per head), a
    sliding-window layer's over the window of each query (``min(t, sliding_window)`` pairs for query ``t``);
    latent attention's prefill expands the latent to keys of ``nope + rope`` and values of ``v_head_dim`` features.
    """
    if _is_latent_attention(config):
        qk_dim, v_dim = config["qk_nope_head_dim"] + config["qk_rope_head_dim"], config["v_head_dim"]
    else:
        qk_dim = v_dim = head_dim(config)
    sliding = sliding_layers(config)
    window = min(tokens, config.get("sliding_window") or tokens)
    pairs = (config["num_hidden_layers"] - sliding) * tokens * (tokens + 1) / 2
    pairs += sliding * (window * (window + 1) / 2 + (tokens - window) * window)
    return (
        2 * active_params_per_token(config) * tokens
        + 2 * config["num_attention_heads"] * (qk_dim + v_dim) * pairs
        + 2 * config["hidden_size"] * config["vocab_size"]
    )


def main() -> None:
    """Print the decode floor of a model's shapes at a bandwidth, batch and context given on the command line."""
    import argparse

    from atom_trio.testing import REAL_CONFIGS

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--bandwidth-gb-s", type=float, required=True, help="measured copy bandwidth, GB/s")
    parser.add_argument("--config", choices=sorted(REAL_CONFIGS), default="llama-3.1-8b", help="the model's shapes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024, help="positions each sequence attends to")
    args = parser.parse_args()
    parts = step_bytes(REAL_CONFIGS[args.config], [args.context] * args.batch)
    experts = f"routed experts {parts.experts / 1e9:.4f} GB (uniform routing), " if parts.experts else ""
    print(f"weights {parts.weights / 1e9:.4f} GB, {experts}KV cache {parts.kv_cache / 1e9:.4f} GB, "
          f"logits {parts.logits / 1e9:.4f} GB: floor {parts.floor_ms(args.bandwidth_gb_s * 1e9):.3f} ms")


if __name__ == "__main__":
    main()
