"""`CpuBackend`: the torch reference, with fused C++ kernels where they apply on the CPU.

Decode attention, the KV store, add + RMSNorm, rotary and SiLU-and-mul each
take one call into the compiled library (`kernels`) instead of the
reference's torch ops. Every op keeps the reference's torch code as its
fallback: for other devices and dtypes, for layouts a kernel does not take,
where no compiler builds the library, and under torch.compile (a graph can't
hold a ctypes call). Mixture-of-experts layers run each expert on its own
tokens only (`moe`), where the reference runs every expert on every token.
A grammar's token mask is applied by xgrammar's C++ kernel (the grammar
engine the engine compiles with, so it is installed wherever masks exist).
The library is built, or loaded from the cache, at the
first op that can use it (a runner's warm-up, at start-up), not here:
backends are made in places that never run a kernel.
"""

from __future__ import annotations

import torch

from ..interface import dequantized_experts
from ..torch_ref import TorchAttentionPlan, TorchRefBackend
from .kernels import SUPPORTED_DTYPES, CpuKernels, load_cpu_kernels
from .moe import sorted_fused_experts


class CpuBackend(TorchRefBackend):
    """The torch reference with the CPU's fused kernels; `TorchRefBackend` is what they are tested against."""

    name = "cpu"
    quantized_weights = frozenset()  # no faster CPU kernel than dequantizing once at load
    quantized_experts = frozenset()  # likewise

    # An FP8 cache (its dtype is not the query's) takes the reference's torch ops, which quantize and dequantize.

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping, **kv_scales) -> None:
        kernels = self._attention_kernels(key, k_cache, v_cache)
        if kernels is None or not kernels.store_kv(key, value, k_cache, v_cache, slot_mapping):
            super().store_kv(key, value, k_cache, v_cache, slot_mapping, **kv_scales)

    def _decode_attention(
        self, q, k_cache, v_cache, plan: TorchAttentionPlan, scale: float, sinks=None, sliding_window=None, **kv_scales
    ) -> torch.Tensor:
        # The C++ kernel knows neither sinks nor windows (GPT-OSS): those layers take the reference's torch ops.
        plain = sinks is None and sliding_window is None
        kernels = self._attention_kernels(q, k_cache, v_cache) if plain else None
        if kernels is None:
            return super()._decode_attention(q, k_cache, v_cache, plan, scale, sinks, sliding_window, **kv_scales)
        tables, context_lens = plan.decode_block_tables, plan.decode_context_lens
        return kernels.decode_attention(q, k_cache, v_cache, tables, context_lens, scale)

    def rms_norm(self, x, weight, eps, residual=None):
        kernels = self._kernels(x)
        if kernels is not None and (done := kernels.rms_norm(x, weight, eps, residual)) is not None:
            return done
        return super().rms_norm(x, weight, eps, residual)

    def rotary_embedding(self, positions, query, key, cos_sin_cache):
        kernels = self._kernels(query)
        if kernels is not None and (done := kernels.rotary_embedding(positions, query, key, cos_sin_cache)) is not None:
            return done
        return super().rotary_embedding(positions, query, key, cos_sin_cache)

    def silu_and_mul(self, x):
        kernels = self._kernels(x)
        if kernels is not None and (done := kernels.silu_and_mul(x)) is not None:
            return done
        return super().silu_and_mul(x)

    def fused_experts(
        self, hidden, w13, w2, topk_weights, topk_ids, *, expert_offset=0, activation=None, quant=None, **biases
    ):
        # Sorting by expert sizes each expert's matmul from the ids: a host read that no graph can hold.
        if hidden.device.type != "cpu" or torch.compiler.is_compiling():
            options = dict(expert_offset=expert_offset, activation=activation, quant=quant)
            return super().fused_experts(hidden, w13, w2, topk_weights, topk_ids, **options, **biases)
        if quant is not None:  # layers dequantize theirs at load (quantized_experts is empty); a direct call's, here
            w13, w2 = dequantized_experts(w13, w2, quant, hidden.dtype)
        activate = self.silu_and_mul if activation is None else activation
        return sorted_fused_experts(hidden, w13, w2, topk_weights, topk_ids, expert_offset, activate, **biases)

    def apply_token_bitmask(self, logits, bitmask, rows):
        """xgrammar's C++ kernel, one row at a time (it takes a row's mask from the row's own index).

        Only for whole mask words: on a vocabulary that ends inside a word the
        kernel also writes the positions of that word's other bits, past the
        row (xgrammar 0.2.9). Vocabularies are multiples of 32 almost always;
        the others take the reference.
        """
        if logits.device.type != "cpu" or logits.dtype not in SUPPORTED_DTYPES or logits.shape[1] % 32:
            return super().apply_token_bitmask(logits, bitmask, rows)
        from xgrammar.kernels.apply_token_bitmask_inplace_cpu import apply_token_bitmask_inplace_cpu

        vocab = logits.shape[1]
        if bitmask.shape[1] * 32 < vocab:
            raise ValueError(f"a bitmask of {bitmask.shape[1]} words does not cover a vocabulary of {vocab}")
        for i, row in enumerate(rows.tolist()):
            apply_token_bitmask_inplace_cpu(logits[row], bitmask[i], vocab)

    def _attention_kernels(self, q, k_cache, v_cache) -> CpuKernels | None:
        """The kernels when they apply to a query (or key) and caches of one dtype, contiguous, else None."""
        if not (k_cache.dtype == q.dtype == v_cache.dtype and k_cache.is_contiguous() and v_cache.is_contiguous()):
            return None
        return self._kernels(q)

    @staticmethod
    def _kernels(x) -> CpuKernels | None:
        """The kernels for ``x`` on the CPU in their dtypes, untraced (and where they build), else None."""
        if not (x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES and not torch.compiler.is_compiling()):
            return None
        return load_cpu_kernels()
