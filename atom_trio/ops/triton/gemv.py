"""The matrix-vector product of a one-sequence decode step: ``y = x @ W.T`` for a single row ``x``.

At batch 1 a decode step is a stream of weight reads. cuBLAS's kernels for
one row read a bf16 weight below the copy bandwidth (``o_proj`` the furthest;
`benchmarks/benchmark_kernels.py --gemv-only`, figures in docs/kernels.md),
and the tall ``down_proj`` takes a split-K reduction kernel besides. Here each program owns a few whole rows of ``W`` and walks
``K`` in 1024-column tiles, keeping every partial product in registers until
one sum at the end, so there is no reduction kernel and the weight streams
through once (``evict_first``: it is not read again this step). With two
or four rows, a layer's four matmuls took longer than cuBLAS's in the same
sweep, so the backends use this for one row only.

``SILU_AND_MUL`` is Llama's MLP activation as the epilogue of the merged
gate/up projection: a program reads matching rows of the gate and the up
halves and writes ``silu(gate) * up``, which saves the activation kernel and
a round trip of the projection through memory. Both halves are rounded to the
output dtype first, as the projection would store them, so the result is
bit-identical to the projection followed by `silu_and_mul`. (Computing the
activation instead in ``down_proj``'s prologue, where every program would
recompute it for the whole input, was slower than the two kernels.)

``NORM`` is the pre-norm block's entry as the prologue: ``y = W @ rms_norm(x
+ residual)``. At one row the add + RMSNorm kernel before each of a layer's
two input projections is a single program reading 8 KB, a launch that
does nothing else; here every program forms ``x + residual``
itself, tile by tile, while its weight tiles stream in (program 0 writes the
sum out: it is the next residual), accumulates the sum of squares beside the
products and scales its dot products by ``rsqrt(mean + eps)`` at the end.
Normalising after the dot product keeps one pass over the weight; the price
is that the normalised input is never rounded to the weight's dtype, so the
result differs from the two kernels by bf16 rounding (it is closer to
float32), not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(
    out_ptr,
    x_ptr,
    w_ptr,
    bias_ptr,
    residual_ptr,
    summed_ptr,
    norm_weight_ptr,
    eps,
    N,
    K,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU_AND_MUL: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # With SILU_AND_MUL, N is the width of one half, and output row r reads weight rows r and N + r:
    # a program loads its gate rows and their up rows as one tile, so both stream like one matrix.
    HALVES: tl.constexpr = 2 if SILU_AND_MUL else 1
    tile_rows = tl.arange(0, HALVES * BLOCK_N)
    out_rows = tl.program_id(0) * BLOCK_N + tile_rows % BLOCK_N
    w_rows = out_rows + (tile_rows // BLOCK_N) * N
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + w_rows.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    acc = tl.zeros((HALVES * BLOCK_N, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = (k0 + ks) < K
        if EVEN_N and EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=(out_rows[:, None] < N) & k_in[None, :], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + k0 + ks, mask=k_in, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + k0 + ks, mask=k_in, other=0.0)
            # Rounded to the input dtype, as the add + RMSNorm kernel hands the residual on.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(summed_ptr + k0 + ks, x, mask=k_in & (tl.program_id(0) == 0))
        xf = x.to(tl.float32)
        if NORM:
            squares += xf * xf
            xf *= tl.load(norm_weight_ptr + k0 + ks, mask=k_in, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * xf[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if NORM:
        y *= tl.rsqrt(tl.sum(squares, 0) / K + eps)
    if HAS_BIAS:
        y += tl.load(bias_ptr + w_rows, mask=out_rows < N, other=0.0).to(tl.float32)
    if SILU_AND_MUL:
        # The float32 expression of silu_and_mul, on the halves rounded as the projection stores them.
        gate, up = tl.split(tl.trans(tl.reshape(y.to(out_ptr.dtype.element_ty).to(tl.float32), (2, BLOCK_N))))
        y = gate / (1.0 + tl.exp(-gate)) * up
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rows < N)


def gemv_block_n(n: int, k: int, element_size: int, halves: int, num_sms: int) -> int:
    """Output rows a program computes: a program reads ``halves * BLOCK_N`` weight rows.

    From a sweep of tile sizes on an H100 (Llama-3.1-8B shapes; 2-32 rows,
    256-1024 columns, 4 or 8 warps; 1024 columns and 4 warps won everywhere):
    8 weight rows a program, halved (down to 2) while the grid has under 10
    programs an SM and a program would read under 128 KB, so that short
    matrices still keep every SM streaming while long rows (``down_proj``)
    keep their long loops.
    """
    rows = 8
    while rows > 2 and triton.cdiv(n * halves, rows) < 10 * num_sms and rows * k * element_size < 128 * 1024:
        rows //= 2
    return max(1, rows // halves)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, silu_and_mul: bool, num_sms: int
) -> torch.Tensor:
    """``x @ weight.T + bias`` for one row ``x``; with ``silu_and_mul``, then `silu_and_mul` of that."""
    return _launch(x, weight, bias, silu_and_mul=silu_and_mul, num_sms=num_sms)


def rms_norm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    silu_and_mul: bool,
    num_sms: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gemv` of ``rms_norm(x + residual)`` for one row; returns it with ``x + residual`` (``x`` without a residual)."""
    if norm_weight.shape != (weight.shape[1],) or (residual is not None and residual.shape != x.shape):
        raise ValueError(
            f"rms_norm_gemv: norm weight {tuple(norm_weight.shape)} and residual "
            f"{None if residual is None else tuple(residual.shape)} must match the input {tuple(x.shape)}"
        )
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x
    out = _launch(
        x, weight, bias, silu_and_mul=silu_and_mul, num_sms=num_sms, norm=(norm_weight, eps, residual, summed)
    )
    return out, summed


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    silu_and_mul: bool,
    num_sms: int,
    norm: tuple[torch.Tensor, float, torch.Tensor | None, torch.Tensor] | None = None,
) -> torch.Tensor:
    n, k = weight.shape
    if x.numel() != k:
        raise ValueError(f"gemv takes one row of {k} values, got shape {tuple(x.shape)}")
    if weight.stride(-1) != 1 or (bias is not None and bias.stride(-1) != 1):
        raise ValueError("gemv needs a weight with contiguous rows and a contiguous bias")
    halves = 2 if silu_and_mul else 1
    if n % halves:
        raise ValueError(f"silu_and_mul needs an even number of weight rows, got {n}")
    n //= halves
    norm_weight, eps, residual, summed = norm if norm is not None else (weight, 0.0, None, x)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    block_n = gemv_block_n(n, k, weight.element_size(), halves, num_sms)
    block_k = min(1024, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        out,
        x.contiguous(),
        weight,
        bias if bias is not None else weight,
        residual.contiguous() if residual is not None else x,
        summed,
        norm_weight,
        eps,
        n,
        k,
        weight.stride(0),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        HAS_BIAS=bias is not None,
        SILU_AND_MUL=silu_and_mul,
        NORM=norm is not None,
        HAS_RESIDUAL=residual is not None,
        EVEN_N=n % block_n == 0,
        EVEN_K=k % block_k == 0,
        num_warps=4,
    )
    return out
