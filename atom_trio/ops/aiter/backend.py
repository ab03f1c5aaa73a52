"""`AiterBackend`: AMD's AITER kernels behind the `KernelBackend` interface, our Triton kernels for the rest.

On ROCm the compiled ops ATOM calls serve where they exist (`calls.ROCM_CALLS`);
AITER's Triton kernels serve the other ops it has (`calls.TRITON_CALLS`), on
ROCm and, through the loader and its NVIDIA compatibility module, on NVIDIA.
Every op AITER lacks, or a case its kernel does not take (an FP8 KV cache,
KV blocks narrower than a GPU's 16-wide dot, partial rotary, FP8 blocks other
than 128 x 128, a GEMM tile that does not fit the GPU), runs on
`TritonBackend`, which this class extends; each such fallback is logged once.

The KV cache keeps `TritonBackend`'s layout, ``[blocks, block_size,
kv_heads, head_dim]``, which is exactly what AITER's ``unified_attention``
(vLLM's kernel) reads, so the KV store, latent attention and every fallback
share it. ATOM's ROCm decode kernel (``pa_fwd_asm``) wants a shuffled 5-D
layout instead; it is not used here.

Under torch.compile the traced layers' norms, activations and GEMMs are
`TritonBackend.traced`'s custom ops; attention, the rotary embedding and the
KV store run on this backend in every mode.
"""

from __future__ import annotations

import logging

import torch
from triton.runtime.errors import OutOfResources

from ..interface import KernelBackend
from ..quant_ref import FP8_DTYPE
from ..triton import TritonBackend
from ..triton.attention import TritonAttentionPlan
from ..triton.quant import quantize_activations
from .calls import ROTATE_NEOX, calls_for
from .loader import on_rocm

logger = logging.getLogger(__name__)

_FP8_BLOCK = (128, 128)
_MIN_DOT = 16
_HALF = (torch.bfloat16, torch.float16)

FALLBACK_OPS = (
    "store_kv",
    "silu_and_mul",
    "fused_experts",
    "mla_attention",
    "mla_decode",
    "int8_linear",
    "w4a16_linear",
    "sample",
    "apply_token_bitmask",
)
"""The ops that run on `TritonBackend`'s kernels unless the call table has an AITER function for them here."""


class AiterBackend(TritonBackend):
    """AITER's kernels where the call table has one for this platform (`calls.calls_for`); ours otherwise."""

    name = "aiter"

    def __init__(self, device: torch.device | str = "cuda") -> None:
        super().__init__(device)
        self._rocm = on_rocm()
        self._calls = {op: call.bind() for op, call in calls_for(self._rocm).items()}
        self._fp8_gemm = "fp8_block_linear" in self._calls and _ocp_fp8(self._rocm)
        self._logged: set[str] = set()
        self._too_big: set[tuple] = set()
        for op, bound in self._calls.items():
            logger.info("kernel backend aiter: %s runs %s", op, bound.call.qualified_name)
        for op in FALLBACK_OPS:
            if op not in self._calls:
                self._fall_back(op, "no AITER kernel for it is wired on this platform")

    @property
    def fallbacks(self) -> frozenset[str]:
        """The ops (and op shapes) that have run on our Triton kernels instead of AITER's, as logged."""
        return frozenset(self._logged)

    def _fall_back(self, op: str, why: str) -> None:
        if op not in self._logged:
            self._logged.add(op)
            logger.info("kernel backend aiter: %s runs on the triton backend: %s", op, why)

    def rms_norm(self, x, weight, eps, residual=None):
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        if rows.shape[0] == 0:
            return super().rms_norm(x, weight, eps, residual)
        if residual is None:
            return self._calls["rms_norm"](input=rows, weight=weight, epsilon=eps).view(x.shape)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        summed = torch.empty_like(out)
        self._calls["add_rms_norm"](
            out=out.view(rows.shape),
            input=rows,
            residual_in=residual.reshape(rows.shape).contiguous(),
            residual_out=summed.view(rows.shape),
            weight=weight,
            epsilon=eps,
        )
        return out, summed

    def silu_and_mul(self, x):
        if "silu_and_mul" not in self._calls:
            return super().silu_and_mul(x)
        out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
        self._calls["silu_and_mul"](out=out, input=x.contiguous())
        return out

    def rotary_embedding(self, positions, query, key, cos_sin_cache):
        head_dim = query.shape[-1]
        if cos_sin_cache.shape[-1] != head_dim:
            self._fall_back("rotary_embedding (partial rotary)", "AITER's kernel is called for a full-width rotation")
            return super().rotary_embedding(positions, query, key, cos_sin_cache)
        if query.shape[0] == 0:
            return super().rotary_embedding(positions, query, key, cos_sin_cache)
        half = head_dim // 2
        return self._calls["rotary_embedding"](
            x=query,
            y=key,
            cos=cos_sin_cache[:, :half],
            sin=cos_sin_cache[:, half:],
            positions=positions,
            rotate_style=ROTATE_NEOX,
            reuse_freqs_front_part=True,
            nope_first=False,
        )

    # The interface's composition, not our fused rotary-and-store: AITER's rotation, then our KV store.
    rotary_store_kv = KernelBackend.rotary_store_kv

    def paged_attention(self, query, key, value, k_cache, v_cache, plan: TritonAttentionPlan, scale, **options):
        """``options``: the interface's ``sinks``, ``sliding_window``, and an FP8 cache's ``k_scale``/``v_scale``."""
        if k_cache.dtype != query.dtype:
            self._fall_back("paged_attention (FP8 KV cache)", "the call table passes no KV scales")
            return super().paged_attention(query, key, value, k_cache, v_cache, plan, scale, **options)
        if plan.block_size % _MIN_DOT:
            # Its decode tiles are one KV block wide, and a GPU's tl.dot takes no dimension under 16.
            self._fall_back("paged_attention (block_size not a multiple of 16)", "AITER's tiles are KV blocks")
            return super().paged_attention(query, key, value, k_cache, v_cache, plan, scale, **options)
        sliding_window = options.get("sliding_window")
        out = torch.empty_like(query)
        if query.shape[0] == 0:
            return out
        self._calls["paged_attention"](
            q=query,
            k=k_cache,
            v=v_cache,
            out=out,
            cu_seqlens_q=plan.cu_seqlens_q,
            max_seqlen_q=plan.max_query_len,
            seqused_k=plan.context_lens,
            max_seqlen_k=plan.max_context_len,
            softmax_scale=scale,
            causal=True,
            # AITER (as flash-attn) counts the keys before the query: ``w - 1`` of them, the query's own key the w-th.
            window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, 0),
            block_table=plan.block_tables,
            softcap=0,
            q_descale=None,
            k_descale=None,
            v_descale=None,
            alibi_slopes=None,
            output_scale=None,
            qq_bias=None,
            sinks=options.get("sinks"),
        )
        return out

    def linear(self, x, weight, bias=None, *, silu_and_mul=False):
        rows = x.reshape(-1, x.shape[-1])
        shape = ("linear", rows.shape[0], *weight.shape)
        if rows.shape[0] == 0 or weight.dtype not in _HALF or x.dtype != weight.dtype or shape in self._too_big:
            return super().linear(x, weight, bias, silu_and_mul=silu_and_mul)
        try:
            y = self._calls["linear"](x=rows, w=weight, bias=bias, dtype=x.dtype)
        except OutOfResources as exc:
            self._remember_too_big(shape, exc)
            return super().linear(x, weight, bias, silu_and_mul=silu_and_mul)
        y = y.view(*x.shape[:-1], weight.shape[0])
        return self.silu_and_mul(y) if silu_and_mul else y

    def _remember_too_big(self, shape: tuple, exc: OutOfResources) -> None:
        """AITER's tile for ``shape`` (op, rows, out, in) does not fit this GPU: ours serves that shape from now on.

        AITER's tile tables are tuned for MI350X. Remembered, so that the failing compile is not retried.
        """
        self._too_big.add(shape)
        self._fall_back(f"{shape[0]} {shape[1:]}", f"AITER's tile does not fit this GPU ({exc})")

    # The interface's composition, not our fused norm-GEMV: AITER's norm, then AITER's GEMM.
    rms_norm_linear = KernelBackend.rms_norm_linear

    def fp8_linear(self, x, weight, weight_scale, bias, *, block_size=None, input_scale=None):
        rows = x.reshape(-1, x.shape[-1])
        n, k = weight.shape
        if not (
            self._fp8_gemm
            and tuple(block_size or ()) == _FP8_BLOCK
            and input_scale is None
            and n % _FP8_BLOCK[0] == 0
            and k % _FP8_BLOCK[1] == 0
            and rows.shape[0] > 0
        ):
            self._fall_back("fp8_linear (other than dynamic 128 x 128 blocks)", "AITER's is wired for those only")
            return super().fp8_linear(x, weight, weight_scale, bias, block_size=block_size, input_scale=input_scale)
        shape = ("fp8_linear", rows.shape[0], n, k)
        if shape in self._too_big:
            return super().fp8_linear(x, weight, weight_scale, bias, block_size=block_size, input_scale=input_scale)
        x_q, x_scale = quantize_activations(rows, FP8_DTYPE, group_size=_FP8_BLOCK[1])
        try:
            y = self._calls["fp8_block_linear"](x=x_q, w=weight, x_scale=x_scale, w_scale=weight_scale, dtype=x.dtype)
        except OutOfResources as exc:
            self._remember_too_big(shape, exc)
            return super().fp8_linear(x, weight, weight_scale, bias, block_size=block_size, input_scale=input_scale)
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], n)


def _ocp_fp8(rocm: bool) -> bool:
    """Whether the GPU's FP8 is ``float8_e4m3fn``, the weights' dtype: NVIDIA's and gfx950's (gfx942 has fnuz)."""
    if not rocm:
        return True
    return "gfx950" in torch.cuda.get_device_properties(torch.cuda.current_device()).gcnArchName
