"""The hand-fused elementwise kernels, the one-row GEMV, the fused experts and the quantized GEMMs as custom ops, for a compiled forward.

Dynamo records one opaque call per op instead of tracing into Triton's
launcher, and Inductor schedules the matmuls and glue around it. Plain torch
ops for Inductor to fuse itself were slower for long prompts: Inductor's own
norm/rotary/SiLU kernels made a long prefill slower at ``--level 3`` than
these eagerly (docs/compilation.md has the figures).
The fused experts have no torch equivalent that Inductor could fuse: traced,
a mixture-of-experts layer would fall back to the reference, which runs every
expert on every token.
Every op returns new tensors (never a view of an input), as custom ops must.
`TracedTritonOps` is what `TritonBackend.traced` gives the layers: these ops
where plain `TracedOps` has torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..interface import ClampedSwiGLU
from ..quant_experts import QuantizedExperts
from ..traced import TracedOps
from . import quant
from .activation import silu_and_mul
from .gemv import gemv, rms_norm_gemv
from .moe import fused_experts
from .norm import rms_norm

if TYPE_CHECKING:
    from .backend import TritonBackend


@torch.library.custom_op("atom_trio::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps)


@rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("atom_trio::add_rms_norm", mutates_args=())
def add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm(x, weight, eps, residual)


@add_rms_norm_op.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("atom_trio::silu_and_mul", mutates_args=())
def silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul(x)


@silu_and_mul_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("atom_trio::gemv", mutates_args=())
def gemv_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_and_mul: bool, num_sms: int
) -> torch.Tensor:
    return gemv(x, weight, bias, silu_and_mul=silu_and_mul, num_sms=num_sms)


@gemv_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_and_mul: bool, num_sms: int) -> torch.Tensor:
    return _gemv_output(x, weight, silu_and_mul)


@torch.library.custom_op("atom_trio::rms_norm_gemv", mutates_args=())
def rms_norm_gemv_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu_and_mul: bool,
    num_sms: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_gemv`; without a residual the sum is ``x`` itself, which an op may not return: it returns an empty tensor."""
    out, summed = rms_norm_gemv(x, residual, norm_weight, eps, weight, bias, silu_and_mul=silu_and_mul, num_sms=num_sms)
    return out, summed if residual is not None else x.new_empty(0)


@rms_norm_gemv_op.register_fake
def _(x, residual, norm_weight, eps, weight, bias, silu_and_mul, num_sms) -> tuple[torch.Tensor, torch.Tensor]:
    return _gemv_output(x, weight, silu_and_mul), x.new_empty(x.shape if residual is not None else 0)


@torch.library.custom_op("atom_trio::fused_experts", mutates_args=())
def fused_experts_op(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_offset: int,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    swiglu: list[float] | None = None,
    quant_kind: str | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_zeros: torch.Tensor | None = None,
    w2_zeros: torch.Tensor | None = None,
    quant_sizes: list[int] | None = None,
) -> torch.Tensor:
    """``swiglu``: `ClampedSwiGLU`'s ``[alpha, limit]`` (a schema holds no attrs class); None for SiLU-and-mul.

    Quantized experts: `QuantizedExperts` as its ``kind``, its tensors, and ``[block rows, block columns,
    group size]`` (block 0 x 0: none).
    """
    activation = None if swiglu is None else ClampedSwiGLU(*swiglu)
    quant = None
    if quant_kind is not None:
        rows, cols, group_size = quant_sizes
        quant = QuantizedExperts(
            kind=quant_kind,
            w13_scale=w13_scale,
            w2_scale=w2_scale,
            w13_zeros=w13_zeros,
            w2_zeros=w2_zeros,
            block_size=(rows, cols) if rows else None,
            group_size=group_size,
        )
    options = dict(expert_offset=expert_offset, w13_bias=w13_bias, w2_bias=w2_bias, activation=activation, quant=quant)
    return fused_experts(hidden, w13, w2, topk_weights, topk_ids, **options)


@fused_experts_op.register_fake
def _(
    hidden,
    w13,
    w2,
    topk_weights,
    topk_ids,
    expert_offset,
    w13_bias=None,
    w2_bias=None,
    swiglu=None,
    quant_kind=None,
    w13_scale=None,
    w2_scale=None,
    w13_zeros=None,
    w2_zeros=None,
    quant_sizes=None,
):
    return hidden.new_empty(hidden.shape)


@torch.library.custom_op("atom_trio::fp8_linear", mutates_args=())
def fp8_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
    input_scale: torch.Tensor | None,
    num_sms: int,
) -> torch.Tensor:
    """`quant.fp8_linear`; ``block_n = block_k = 0``: no block scales."""
    block_size = (block_n, block_k) if block_n else None
    return quant.fp8_linear(
        x, weight, weight_scale, bias, block_size=block_size, input_scale=input_scale, num_sms=num_sms
    )


@fp8_linear_op.register_fake
def _(x, weight, weight_scale, bias, block_n, block_k, input_scale, num_sms) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("atom_trio::int8_linear", mutates_args=())
def int8_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    num_sms: int,
) -> torch.Tensor:
    return quant.int8_linear(x, weight, weight_scale, bias, input_scale=input_scale, num_sms=num_sms)


@int8_linear_op.register_fake
def _(x, weight, weight_scale, bias, input_scale, num_sms) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("atom_trio::w4a16_linear", mutates_args=())
def w4a16_linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    num_sms: int,
) -> torch.Tensor:
    return quant.w4a16_linear(x, qweight, scales, zeros, bias, group_size=group_size, num_sms=num_sms)


@w4a16_linear_op.register_fake
def _(x, qweight, scales, zeros, bias, group_size, num_sms) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _gemv_output(x: torch.Tensor, weight: torch.Tensor, silu_and_mul: bool) -> torch.Tensor:
    """An empty tensor shaped like a GEMV's output (half the rows of ``weight`` after SiLU-and-mul)."""
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2 if silu_and_mul else weight.shape[0])


class TracedTritonOps(TracedOps):
    """`TracedOps` with the Triton backend's norms, SiLU, one-row matmuls and fused experts as the opaque ops above."""

    device_backend: TritonBackend

    def rms_norm(self, x, weight, eps, residual=None):
        if residual is None:
            return rms_norm_op(x, weight, eps)
        return add_rms_norm_op(x, residual, weight, eps)

    def silu_and_mul(self, x):
        return silu_and_mul_op(x)

    def linear(self, x, weight, bias=None, *, silu_and_mul=False):
        # The token dimension is dynamic except at one token, which Dynamo specializes: the test is a trace-time constant.
        if self.device_backend.uses_gemv(x, weight):
            return gemv_op(x, weight, bias, silu_and_mul, self.device_backend.num_sms)
        return super().linear(x, weight, bias, silu_and_mul=silu_and_mul)

    def fused_experts(
        self, hidden, w13, w2, topk_weights, topk_ids, *, expert_offset=0, activation=None, quant=None, **options
    ):
        swiglu = None if activation is None else [activation.alpha, activation.limit]
        if quant is not None:  # a schema holds no attrs class either: its fields
            options.update(
                quant_kind=quant.kind,
                w13_scale=quant.w13_scale,
                w2_scale=quant.w2_scale,
                w13_zeros=quant.w13_zeros,
                w2_zeros=quant.w2_zeros,
                quant_sizes=[*(quant.block_size or (0, 0)), quant.group_size],
            )
        return fused_experts_op(hidden, w13, w2, topk_weights, topk_ids, expert_offset, swiglu=swiglu, **options)

    @property
    def quantized_experts(self):
        return self.device_backend.quantized_experts

    @property
    def quantized_weights(self):
        return self.device_backend.quantized_weights

    def fp8_linear(self, x, weight, weight_scale, bias, *, block_size=None, input_scale=None):
        block_n, block_k = block_size if block_size is not None else (0, 0)
        return fp8_linear_op(
            x, weight, weight_scale, bias, block_n, block_k, input_scale, self.device_backend.num_sms
        )

    def int8_linear(self, x, weight, weight_scale, bias, *, input_scale=None):
        return int8_linear_op(x, weight, weight_scale, bias, input_scale, self.device_backend.num_sms)

    def w4a16_linear(self, x, qweight, scales, zeros, bias, *, group_size):
        return w4a16_linear_op(x, qweight, scales, zeros, bias, group_size, self.device_backend.num_sms)

    def rms_norm_linear(self, x, residual, norm_weight, eps, weight, bias=None, *, silu_and_mul=False):
        if not self.device_backend.uses_gemv(x, weight):
            return super().rms_norm_linear(x, residual, norm_weight, eps, weight, bias, silu_and_mul=silu_and_mul)
        out, summed = rms_norm_gemv_op(
            x, residual, norm_weight, eps, weight, bias, silu_and_mul, self.device_backend.num_sms
        )
        return out, summed if residual is not None else x
