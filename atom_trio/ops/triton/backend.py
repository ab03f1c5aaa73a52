"""`TritonBackend`: the CUDA/ROCm kernels behind the `KernelBackend` interface.

Nothing here synchronises the device or sizes a tensor from device values:
every launch is decided by host integers (token and sequence counts, the
lengths in ``AttentionMetadata``'s ``*_host`` lists, the split count), so a
decode step of fixed batch size can be captured in a CUDA graph and replayed
with new lengths, block tables and slots written into the same tensors.
"""

from __future__ import annotations

import attrs
import torch

from ..interface import AttentionMetadata, KernelBackend
from . import quant
from .activation import silu_and_mul
from .attention import TritonAttentionPlan, paged_attention
from .cache import store_kv
from .gemv import gemv, rms_norm_gemv
from .grammar import apply_token_bitmask
from .mla import LatentPlan, TritonLatentAttention, store_latent
from .moe import fused_experts
from .norm import rms_norm
from .rotary import rotary_embedding
from .sampling import sample


class TritonBackend(KernelBackend):
    """Triton kernels for one device; ``num_sms`` sizes the split-KV decision."""

    name = "triton"
    supports_cuda_graphs = True
    supports_fp8_kv_cache = True
    sampling_min_rows = 32
    """Below it, the sampling kernels' ~16 launches from Python cost more than the torch sampler's sort.

    Measured on an H100 with a whole sampler call both ways (figures in
    docs/kernels.md and docs/performance.md)."""

    def __init__(self, device: torch.device | str = "cuda") -> None:
        device = torch.device(device)
        if device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        else:  # Triton's interpreter (TRITON_INTERPRET=1) runs on CPU tensors
            self.num_sms = 1
        self._latent = TritonLatentAttention(self.num_sms)
        # Every latent attention layer of a step walks the same plan: made at the first, keyed by the step's plan.
        self._latent_plan_memo: tuple[TritonAttentionPlan, LatentPlan] | None = None

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        # Token-major inside a block: one token's heads are contiguous, so store_kv writes
        # each token with one contiguous store and a decode tile reads whole rows.
        return (num_blocks, block_size, num_kv_heads, head_dim)

    def plan_attention(self, metadata: AttentionMetadata, *, num_splits: int | None = None) -> TritonAttentionPlan:
        """Host integers only; ``num_splits`` forces the KV split count.

        Unforced, the split count grows while the step's programs would leave
        SMs idle and each split keeps at least `MIN_SPLIT_TOKENS` keys of the
        longest context in ``metadata``: a graph captured with the longest
        context it will replay keeps a split count that is right for all of them.
        """
        return TritonAttentionPlan(
            cu_seqlens_q=metadata.cu_seqlens_q,
            context_lens=metadata.context_lens,
            block_tables=metadata.block_tables,
            block_size=metadata.block_size,
            num_seqs=metadata.num_seqs,
            max_query_len=metadata.max_query_len,
            max_context_len=metadata.max_context_len,
            num_splits=num_splits,
            metadata=metadata,
        )

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None) -> None:
        store_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def paged_attention(
        self,
        query,
        key,
        value,
        k_cache,
        v_cache,
        plan: TritonAttentionPlan,
        scale,
        *,
        sinks=None,
        sliding_window=None,
        k_scale=None,
        v_scale=None,
    ):
        # ``key``/``value`` are already in the cache (store_kv ran first); reading them back
        # from there keeps one code path for fresh prefills, chunks and decodes.
        return paged_attention(
            query,
            k_cache,
            v_cache,
            plan,
            scale,
            self.num_sms,
            sinks=sinks,
            sliding_window=sliding_window,
            kv_scales=(k_scale, v_scale),
        )

    # The latent cache keeps the interface's layout, ``[blocks, block_size, latent + rope]``: a token's
    # vector is one contiguous row, which the store writes in one go and a decode tile reads whole.

    def store_latent(self, latent, cache, slot_mapping, *, cache_scale=None) -> None:
        store_latent(latent, cache, slot_mapping, cache_scale)

    def mla_attention(self, query, latent, cache, kv_b, plan: TritonAttentionPlan, scale, *, cache_scale=None):
        latent_plan = self._latent_plan(plan)
        return self._latent.mla_attention(query, latent, cache, kv_b, latent_plan, scale, cache_scale=cache_scale)

    def mla_decode(self, query, cache, plan: TritonAttentionPlan, scale, value_dim, *, cache_scale=None):
        latent_plan = self._latent_plan(plan)
        return self._latent.mla_decode(query, cache, latent_plan, scale, value_dim, cache_scale=cache_scale)

    def _latent_plan(self, plan: TritonAttentionPlan) -> LatentPlan:
        """The step's walk for latent attention.

        A step of decodes only (every CUDA-graph step) needs no host work and no
        device tensor: its decode rows are the plan's own tensors, in order. A
        mixed step is planned as the reference plans it, from the metadata's host
        lengths (a few small copies to the device, once a step).
        """
        memo = self._latent_plan_memo
        if memo is not None and memo[0] is plan:
            return memo[1]
        if plan.max_query_len == 1:
            latent_plan = LatentPlan(
                only_decodes=True,
                decode_token_idx=None,
                decode_context_lens=plan.context_lens,
                decode_block_tables=plan.block_tables,
                decode_max_context=plan.max_context_len,
                prefills=(),
                num_splits=plan.num_splits,
            )
        else:
            if plan.metadata is None:
                raise ValueError("latent attention over a mixed batch needs the plan made from its metadata")
            reference = attrs.asdict(self._latent.plan_attention(plan.metadata), recurse=False)
            latent_plan = LatentPlan(**reference, num_splits=plan.num_splits)
        self._latent_plan_memo = (plan, latent_plan)
        return latent_plan

    def rms_norm(self, x, weight, eps, residual=None):
        return rms_norm(x, weight, eps, residual)

    def rotary_embedding(self, positions, query, key, cos_sin_cache):
        return rotary_embedding(positions, query, key, cos_sin_cache)

    def rotary_store_kv(
        self, positions, query, key, value, cos_sin_cache, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None
    ):
        store = (value, k_cache, v_cache, slot_mapping)
        return rotary_embedding(positions, query, key, cos_sin_cache, store=store, kv_scales=(k_scale, v_scale))

    def silu_and_mul(self, x):
        return silu_and_mul(x)

    quantized_experts = frozenset({"fp8", "w4a16", "mxfp4"})  # dequantized in the MoE kernel's inner loop

    def fused_experts(self, hidden, w13, w2, topk_weights, topk_ids, **options):
        return fused_experts(hidden, w13, w2, topk_weights, topk_ids, **options)

    def traced(self):
        from .opaque import TracedTritonOps  # registers the custom ops: only for a model that is compiled

        return TracedTritonOps(self)

    def sample(self, logits, temperature, top_k, top_p, min_p, seeds):
        return sample(logits, temperature, top_k, top_p, min_p, seeds)

    def apply_token_bitmask(self, logits, bitmask, rows):
        apply_token_bitmask(logits, bitmask, rows)

    def linear(self, x, weight, bias=None, *, silu_and_mul=False):
        if self.uses_gemv(x, weight):
            return gemv(x, weight, bias, silu_and_mul=silu_and_mul, num_sms=self.num_sms)
        return super().linear(x, weight, bias, silu_and_mul=silu_and_mul)

    quantized_weights = frozenset({"fp8", "int8", "w4a16"})

    def fp8_linear(self, x, weight, weight_scale, bias, *, block_size=None, input_scale=None):
        return quant.fp8_linear(
            x, weight, weight_scale, bias, block_size=block_size, input_scale=input_scale, num_sms=self.num_sms
        )

    def int8_linear(self, x, weight, weight_scale, bias, *, input_scale=None):
        return quant.int8_linear(x, weight, weight_scale, bias, input_scale=input_scale, num_sms=self.num_sms)

    def w4a16_linear(self, x, qweight, scales, zeros, bias, *, group_size):
        return quant.w4a16_linear(x, qweight, scales, zeros, bias, group_size=group_size, num_sms=self.num_sms)

    def rms_norm_linear(self, x, residual, norm_weight, eps, weight, bias=None, *, silu_and_mul=False):
        if self.uses_gemv(x, weight):
            return rms_norm_gemv(
                x, residual, norm_weight, eps, weight, bias, silu_and_mul=silu_and_mul, num_sms=self.num_sms
            )
        return super().rms_norm_linear(x, residual, norm_weight, eps, weight, bias, silu_and_mul=silu_and_mul)

    @staticmethod
    def uses_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether `gemv` computes this product: one row and a half-precision weight (cuBLAS does the rest)."""
        return x.numel() == x.shape[-1] > 0 and weight.dtype in (torch.bfloat16, torch.float16) and weight.stride(-1) == 1
