"""The kernel interface: what every backend (torch_ref, cpu, triton, aiter) implements.

Layers call kernels only through a `KernelBackend` they captured when they
were built, so a model is written once and runs on whatever backend the runner
chose at start-up. The batch layout is the same for every backend: all tokens
of a step flattened into one dimension (prefill chunks and decode tokens
mixed), described by `AttentionMetadata`. What the runner and the sampler
need to know of a backend (whether its steps can be captured in CUDA graphs,
its kernels for a compiled model, its sampling kernel) it asks the backend
too, so that no backend is named outside ``ops``. The sampler's grammar mask
(`KernelBackend.apply_token_bitmask`) is a kernel like the others.
"""

from __future__ import annotations

import abc
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from .quant_experts import QuantizedExperts, dequantize_experts
from .quant_ref import dequantize_fp8, dequantize_int8, dequantize_w4a16


@attrs.frozen(kw_only=True)
class AttentionMetadata:
    """How the flat token batch of one step splits into sequences.

    Sequence ``i`` owns query tokens ``[cu_seqlens_q[i], cu_seqlens_q[i+1])``;
    after this step its KV cache holds ``context_lens[i]`` tokens (cached
    context plus this step's tokens), so its queries sit at the last
    ``query_len`` positions of that context and attend causally to everything
    before them. ``block_tables[i]`` lists its physical KV blocks (rows padded
    with 0 past the blocks it owns); ``slot_mapping[t]`` is the flat cache slot
    (``block * block_size + offset``) where token ``t``'s key and value go.

    The ``*_host`` lists repeat the per-sequence lengths on the host, so that
    backends can plan without a device synchronisation.
    """

    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_lens_host: list[int]
    context_lens_host: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_host)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_host, default=0)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_host, default=0)


@attrs.frozen
class ClampedSwiGLU:
    """GPT-OSS's expert activation of ``[..., 2 * inter]`` (gate features, then up features): ``(up + 1) * glu``.

    ``glu = gate * sigmoid(alpha * gate)`` with the gate clamped above at ``limit`` and the up projection
    to ``[-limit, limit]``, in transformers' order of operations (``GptOssExperts._apply_gate``, which
    reads gate and up interleaved; the models load them split, as every backend's ``w13`` holds them).
    """

    alpha: float
    limit: float

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class KernelBackend(abc.ABC):
    """One implementation of every kernel a model needs.

    Tensors are laid out as the layers produce them: activations ``[num_tokens,
    hidden]``, attention inputs ``[num_tokens, num_heads, head_dim]``. The KV
    cache (one tensor per layer for K and one for V) is laid out as the
    backend's attention reads it best; `kv_cache_shape` says how, and only
    the backend indexes into it.
    """

    name: str

    supports_cuda_graphs: bool = False
    """Whether a step can be captured in a CUDA graph and replayed with new lengths, block tables and slots.

    True where every launch follows from host integers (token and sequence
    counts, the metadata's ``*_host`` lengths), never from device values, and
    the step's tensors are read in place: a plan made at capture from
    metadata whose host lengths are the longest the graph will replay then
    serves every replay. (The torch reference sizes its work from device values.)
    """

    supports_fp8_kv_cache: bool = False
    """Whether the KV cache (and the latent cache) may be float8_e4m3fn.

    An FP8 cache holds ``fp8(x / scale)`` (rounded to nearest, saturated at
    +-448) with one per-tensor scale for a layer's keys and one for its values
    (one for a latent cache): float32 ``[1]`` device tensors (the checkpoint's
    ``k_scale``/``v_scale``, else 1.0) that `store_kv`, `rotary_store_kv`,
    `paged_attention` and the latent ops take, and that the attention
    multiplies back. Tensors, not host floats, so that a CUDA graph reads them
    where they live. A cache in the model's dtype ignores them (None means
    1.0). Other backends get a cache in the model's dtype only.
    """

    sampling_min_rows: int | None = None
    """Fewest drawing rows for which the sampler calls `sample` rather than its torch ops; None: no `sample` here."""

    @abc.abstractmethod
    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """The shape of one layer's K (or V) cache holding ``num_blocks`` blocks of ``block_size`` tokens."""

    @abc.abstractmethod
    def plan_attention(self, metadata: AttentionMetadata) -> Any:
        """Precompute, once per step, whatever `paged_attention` reuses in every layer."""

    @abc.abstractmethod
    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        *,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        """Write this step's keys and values ``[num_tokens, num_kv_heads, head_dim]`` to their slots.

        Slot ``s`` is token ``s % block_size`` of block ``s // block_size``.
        ``k_scale``/``v_scale``: an FP8 cache's scales (`supports_fp8_kv_cache`).
        """

    @abc.abstractmethod
    def paged_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: Any,
        scale: float,
        *,
        sinks: torch.Tensor | None = None,
        sliding_window: int | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of every query token over its sequence's context.

        ``key``/``value`` are this step's (already stored in the cache);
        backends may read them directly for sequences with no earlier context.
        Grouped-query attention: query head ``h`` reads KV head
        ``h // (num_heads // num_kv_heads)``. Returns ``[num_tokens, num_heads, head_dim]``.

        ``sinks`` ``[num_heads]`` (GPT-OSS): one more logit per head in the softmax's denominator, with no
        value, so a head can attend to nothing. ``sliding_window`` ``w``: the query at position ``p`` sees
        keys ``(p - w, p]`` only (transformers' sliding-window mask); the cache still holds every position.
        ``k_scale``/``v_scale``: an FP8 cache's scales (`supports_fp8_kv_cache`).
        """

    def latent_cache_shape(self, num_blocks: int, block_size: int, latent_dim: int) -> tuple[int, ...]:
        """The shape of one layer's latent cache (multi-head latent attention): ``latent_dim`` features a token.

        One vector per token, whatever the number of heads: the compressed
        key/value and the shared rotary key side by side.
        """
        return (num_blocks, block_size, latent_dim)

    def store_latent(
        self,
        latent: torch.Tensor,
        cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        *,
        cache_scale: torch.Tensor | None = None,
    ) -> None:
        """Write this step's latent vectors ``[num_tokens, latent_dim]`` to their slots (as `store_kv` does).

        ``cache_scale``: an FP8 latent cache's one scale (`supports_fp8_kv_cache`); this default has none.
        """
        cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, latent)

    def mla_attention(
        self,
        query: torch.Tensor,
        latent: torch.Tensor,
        cache: torch.Tensor,
        kv_b: torch.Tensor,
        plan: Any,
        scale: float,
        *,
        cache_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Multi-head latent attention of every query token over its sequence's latent context.

        ``query`` ``[num_tokens, heads, nope + rope]`` (rotated); ``latent``
        ``[num_tokens, latent + rope]`` this step's vectors, already stored in
        ``cache`` (laid out as `latent_cache_shape` says); ``kv_b`` ``[heads, nope + v, latent]``,
        the up-projection of the latent to each head's key (its first
        ``nope`` rows, ``W_UK``) and value (``W_UV``). Returns ``[num_tokens,
        heads, v]``. Prefill chunks expand their context to per-head keys and
        values; decode tokens attend in the latent space (`mla_decode`).
        ``cache_scale``: an FP8 latent cache's scale, as `store_latent` took it.
        """
        raise NotImplementedError(f"kernel backend {self.name!r} has no multi-head latent attention")

    def mla_decode(
        self,
        query: torch.Tensor,
        cache: torch.Tensor,
        plan: Any,
        scale: float,
        value_dim: int,
        *,
        cache_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode attention in the latent space: one query ``[seqs, heads, latent + rope]`` per decode sequence.

        Every head reads the same cached vectors: scores against all
        ``latent + rope`` features, values the first ``value_dim``
        (the latent). Returns ``[seqs, heads, value_dim]``, still in the
        latent space (the caller projects it through ``W_UV``).
        """
        raise NotImplementedError(f"kernel backend {self.name!r} has no latent decode attention")

    @abc.abstractmethod
    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm over the last dimension; with ``residual``, add it first.

        With a residual, returns ``(normed, x + residual)`` so that the sum
        becomes the next layer's residual without another pass over memory.
        """

    @abc.abstractmethod
    def rotary_embedding(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``query``/``key`` ``[num_tokens, heads, head_dim]`` by their positions.

        The rotate-half (GPT-NeoX, Hugging Face Llama) convention: dimension
        ``i`` pairs with ``i + head_dim/2``. ``cos_sin_cache[pos]`` holds
        ``head_dim/2`` cosines then ``head_dim/2`` sines (float32).
        """

    def rotary_store_kv(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        **kv_scales: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`rotary_embedding` of ``query``/``key``, then `store_kv` of the rotated keys and ``value``.

        Returns the rotated ``(query, key)``. One call, so that a backend can
        do both in one pass over the step's keys. ``kv_scales``: `store_kv`'s
        ``k_scale``/``v_scale``, for an FP8 cache.
        """
        query, key = self.rotary_embedding(positions, query, key, cos_sin_cache)
        self.store_kv(key, value, k_cache, v_cache, slot_mapping, **kv_scales)
        return query, key

    @abc.abstractmethod
    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(x[..., :d]) * x[..., d:]`` for the merged gate/up projection."""

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, silu_and_mul: bool = False
    ) -> torch.Tensor:
        """``x @ weight.T + bias``; with ``silu_and_mul``, `silu_and_mul` of that (the merged gate/up projection).

        A backend may fuse the activation into the matmul's epilogue.
        """
        y = F.linear(x, weight, bias)
        return self.silu_and_mul(y) if silu_and_mul else y

    quantized_experts: frozenset[str] = frozenset()
    """The expert weight layouts (``"fp8"``, ``"w4a16"``, ``"mxfp4"``) `fused_experts` computes on while quantized.

    A `FusedMoE` whose layout is not here dequantizes its experts once at load.
    """

    quantized_weights: frozenset[str] = frozenset()
    """The weight schemes (``"fp8"``, ``"int8"``, ``"w4a16"``) this backend computes on while quantized.

    A layer whose scheme is not here dequantizes its weights once at load and
    calls `linear`; the quantized ops below still work for it (their defaults
    dequantize on every call), so every backend is correct on every scheme.
    """

    def fp8_linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        block_size: tuple[int, int] | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x @ W.T + bias`` for an FP8 weight, ``W = weight.float() * weight_scale``, in ``x``'s dtype.

        ``weight`` float8_e4m3fn ``[out, in]``; ``weight_scale`` float32
        per-tensor ``[1]``, per-channel ``[out, 1]``, or per ``block_size``
        ``(bo, bi)`` block ``[ceil(out / bo), ceil(in / bi)]``. A kernel
        quantizes the activations to FP8: statically with the per-tensor
        ``input_scale`` ``[1]`` when given, else dynamically per token (per
        1 x ``bi`` group with block scales), as `quant_ref.fp8_activations` says.
        This default is weight-only: it dequantizes and calls `linear`.
        """
        return self.linear(x, dequantize_fp8(weight, weight_scale, block_size).to(x.dtype), bias)

    def int8_linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        input_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x @ W.T + bias`` for an INT8 weight ``[out, in]`` with per-channel float32 ``weight_scale`` ``[out, 1]``.

        A kernel quantizes the activations to symmetric INT8 per token, or
        statically with the per-tensor ``input_scale`` ``[1]`` when given
        (`quant_ref.int8_activations`). This default dequantizes and calls `linear`.
        """
        return self.linear(x, dequantize_int8(weight, weight_scale).to(x.dtype), bias)

    def w4a16_linear(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bias: torch.Tensor | None,
        *,
        group_size: int,
    ) -> torch.Tensor:
        """``x @ W.T + bias`` for a packed 4-bit weight, ``W = (q - zero) * scale`` per ``group_size`` input columns.

        ``qweight`` uint8 ``[out, in // 2]`` (column ``2j`` in the low nibble,
        ``2j + 1`` in the high); ``scales`` ``[out, in // group_size]`` in
        ``x``'s dtype; ``zeros`` uint8 of the same shape (0..15), or None for
        symmetric weights (zero point 8). The activations stay in ``x``'s
        dtype. This default dequantizes and calls `linear`.
        """
        return self.linear(x, dequantize_w4a16(qweight, scales, zeros, group_size).to(x.dtype), bias)

    def fused_experts(
        self,
        hidden: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        expert_offset: int = 0,
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
        activation: ClampedSwiGLU | None = None,
        quant: QuantizedExperts | None = None,
    ) -> torch.Tensor:
        """The routed experts' weighted sum for each token: a mixture-of-experts layer's ``[tokens, hidden]`` output.

        ``out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` over the experts
        ``e = topk_ids[t, j]`` held here: ``w13`` ``[experts, 2 * inter, hidden]`` (gate rows, then up rows)
        and ``w2`` ``[experts, hidden, inter]`` hold global experts ``[expert_offset, expert_offset +
        experts)``; a choice outside them adds nothing (another rank of an expert-parallel group holds it).
        Sums in float32 and returns ``hidden``'s dtype. ``w13_bias`` ``[experts, 2 * inter]`` and
        ``w2_bias`` ``[experts, hidden]`` add to the projections; ``activation`` replaces SiLU-and-mul
        (GPT-OSS's `ClampedSwiGLU`). With ``quant``, ``w13`` and ``w2`` are quantized in its layout
        (`atom_trio.ops.quant_experts`) and the experts compute weight-only.

        This default is the reference (quantized weights dequantized on every call): every held expert runs on every token and
        the routing weights (zero where a token did not choose the expert) mask
        the sum. Wasteful, but no shape depends on device values, so it never
        synchronises and traces whole under torch.compile; backends override it
        with kernels that run each expert on its own tokens only.
        """
        if quant is not None:
            w13, w2 = dequantized_experts(w13, w2, quant, hidden.dtype)
        num_tokens = hidden.shape[0]
        num_experts = w13.shape[0]
        local = topk_ids.long() - expert_offset
        held = (local >= 0) & (local < num_experts)
        # Column e: each token's weight for held expert e; the last column gathers the choices held elsewhere.
        routing = torch.zeros(num_tokens, num_experts + 1, dtype=torch.float32, device=hidden.device)
        routing.scatter_add_(1, torch.where(held, local, num_experts), topk_weights.float())
        out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        activate = self.silu_and_mul if activation is None else activation
        for expert in range(num_experts):
            gate_up = F.linear(hidden, w13[expert], None if w13_bias is None else w13_bias[expert])
            y = F.linear(activate(gate_up), w2[expert], None if w2_bias is None else w2_bias[expert])
            out.addcmul_(routing[:, expert : expert + 1], y.float())
        return out.to(hidden.dtype)

    def traced(self) -> KernelBackend:
        """The kernels for the layers of a model that torch.compile traces.

        Attention, the rotary embedding and the KV store stay this backend's:
        they run inside the opaque attention op, outside the graph. The rest is
        plain torch by default, which Inductor fuses with its neighbours; a
        backend whose own kernels beat what Inductor generates returns them
        as custom ops that Dynamo records as opaque calls.
        """
        from .traced import TracedOps  # it builds on torch_ref, which imports this module

        return TracedOps(self)

    def sample(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        min_p: torch.Tensor,
        seeds: torch.Tensor,
    ) -> torch.Tensor:
        """One token per row of float32 ``logits`` ``[rows, vocab]``, int64 on their device: the sampler's steps 4-5.

        Per-row device tensors: ``temperature`` (float32; 0 means greedy, the
        row's first argmax), ``top_k`` (int64; 0 is off), ``top_p`` (float32;
        1 is off), ``min_p`` (float32; 0 is off) and ``seeds`` (int64: equal
        seed and logits draw the same token). Only where `sampling_min_rows`
        is set.
        """
        raise NotImplementedError(f"kernel backend {self.name!r} has no sampling kernel")

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
        """Set to -inf, in place, the logits a grammar forbids: row ``rows[i]`` of ``logits`` by ``bitmask[i]``.

        ``logits`` is ``[num_rows, vocab]`` float32; ``bitmask`` int32
        ``[len(rows), ceil(vocab / 32)]`` in xgrammar's layout (bit ``b`` of
        word ``w`` set allows token ``32 * w + b``); ``rows`` int64, distinct,
        all three on one device. Rows not named are left alone.
        """
        raise NotImplementedError(f"kernel backend {self.name!r} has no token bitmask kernel")

    def rms_norm_linear(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        silu_and_mul: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`linear` of `rms_norm` of ``x + residual``: a pre-norm block's entry. Returns it with ``x + residual``.

        Without a residual the sum is ``x`` itself. One call, so that a
        backend can fold the add and the norm into the matmul's prologue.
        """
        if residual is None:
            normed, summed = self.rms_norm(x, norm_weight, eps), x
        else:
            normed, summed = self.rms_norm(x, norm_weight, eps, residual)
        return self.linear(normed, weight, bias, silu_and_mul=silu_and_mul), summed


def dequantized_experts(
    w13: torch.Tensor, w2: torch.Tensor, quant: QuantizedExperts, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized ``w13`` and ``w2`` as the dense ``dtype`` weights they stand for (`dequantize_experts`)."""
    return (
        dequantize_experts(w13, quant.w13_scale, quant.w13_zeros, quant).to(dtype),
        dequantize_experts(w2, quant.w2_scale, quant.w2_zeros, quant).to(dtype),
    )
