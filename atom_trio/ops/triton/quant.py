"""Quantized GEMMs: FP8 and INT8 W8A8, and 4-bit weights with 16-bit activations (W4A16).

The layouts are `atom_trio.ops.quant_ref`'s, and these kernels compute what
the torch reference's emulation does (the activations quantized the same way,
the products summed in float32), so that reference is their test.

- Activations (W8A8): one fused kernel quantizes each token's row, or each
  1 x ``group_size`` group of it, to FP8 or INT8 and writes its float32
  scales (``amax * (1 / qmax)``; a static per-tensor scale skips the amax pass).
- FP8 with per-tensor or per-channel weight scales: cuBLASLt through
  ``torch._scaled_mm`` (per-token x per-channel is its rowwise scaling) where
  its shape and dtype rules allow; otherwise, and for 128 x 128 block weight
  scales with 1 x 128 activation groups (DeepSeek-V3, Qwen3-FP8), the Triton
  GEMM below, which applies block scales to each K block's partial product
  and per-row/per-column scales once in the epilogue. INT8 runs the same
  kernel with an int32 accumulator.
- One row (a batch-1 decode step): the GEMM is a stream of weight bytes, so a
  GEMV reads the 8-bit or packed 4-bit weights once, as `gemv` does for bf16
  (a program owns a few whole rows and walks K, partial products stay in
  registers until one sum at the end). The 8-bit GEMV quantizes the row
  itself, with the same arithmetic as the activation kernel, which saves
  that kernel's launch: at batch 1 it would cost about as much as a small GEMV.
- W4A16 with several rows: a GEMM that unpacks and dequantizes each weight
  tile in registers, rounds it to the activations' dtype and feeds the tensor cores.

Every launch is sized by host integers (shapes, the SM count), so a step
that runs these can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant_ref import FP8_DTYPE, FP8_MAX, INT8_MAX, MIN_AMAX, SYMMETRIC_INT4_ZERO
from .fp8 import RNE_MAGIC, clamp_to_fp8_range, round_to_e4m3
from .gemv import gemv_block_n

SYMMETRIC_ZERO = tl.constexpr(float(SYMMETRIC_INT4_ZERO))


@triton.jit
def _scale_of(amax, QMAX: tl.constexpr, MIN_AMAX: tl.constexpr):
    """A dynamic activation scale: `quant_ref.dynamic_scale`'s ``max(amax, MIN_AMAX) * (1 / qmax)``, bit for bit."""
    return tl.maximum(amax, MIN_AMAX) * (1.0 / QMAX)


@triton.jit
def _quantize(x, scale, QMAX: tl.constexpr, INT8: tl.constexpr):
    """``x / scale`` clamped to +-qmax and rounded to an INT8 integer or an e4m3 value, still float32.

    Rounded here, so the conversion to the 8-bit type after it is exact, on
    the GPU and in the interpreter.
    """
    q = tl.math.div_rn(x, scale)
    if INT8:
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
        q = (q + RNE_MAGIC) - RNE_MAGIC
    else:
        q = round_to_e4m3(clamp_to_fp8_range(q))
    return q


@triton.jit
def _quantize_rows_kernel(
    out_ptr,
    scale_ptr,
    x_ptr,
    static_scale_ptr,
    K,
    GROUP,
    num_groups,
    stride_xm,
    stride_om,
    QMAX: tl.constexpr,
    MIN_AMAX: tl.constexpr,
    STATIC: tl.constexpr,
    INT8: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program (row, group) quantizes columns [group * GROUP, (group + 1) * GROUP) of one row.
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    start = group * GROUP
    end = tl.minimum(start + GROUP, K)
    x_row = x_ptr + row * stride_xm
    out_row = out_ptr + row * stride_om
    cols = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(static_scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(start, end, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < end, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = _scale_of(tl.max(amax, 0), QMAX, MIN_AMAX)
        tl.store(scale_ptr + row * num_groups + group, scale)
    for k0 in range(start, end, BLOCK):
        x = tl.load(x_row + k0 + cols, mask=k0 + cols < end, other=0.0)
        q = _quantize(x.to(tl.float32), scale, QMAX, INT8)
        tl.store(out_row + k0 + cols, q.to(out_ptr.dtype.element_ty), mask=k0 + cols < end)


def quantize_activations(
    x: torch.Tensor,
    dtype: torch.dtype,
    *,
    group_size: int | None = None,
    input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[tokens, k]`` quantized to FP8 or INT8 (symmetric), with its float32 scales.

    Dynamic: one scale per token ``[tokens, 1]``, or per 1 x ``group_size``
    group ``[tokens, ceil(k / group_size)]``. Static: ``input_scale`` ``[1]``
    itself. The values are `quant_ref.quantize_fp8_per_token` /
    `quantize_fp8_static` / `quantize_int8`'s.
    """
    tokens, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    group = k if group_size is None or input_scale is not None else group_size
    num_groups = triton.cdiv(k, group)
    out = torch.empty((tokens, k), dtype=dtype, device=x.device)
    if input_scale is not None:
        scale = input_scale.reshape(1).float()
    else:
        scale = torch.empty((tokens, num_groups), dtype=torch.float32, device=x.device)
    if tokens == 0:
        return out, scale
    _quantize_rows_kernel[(tokens, num_groups)](
        out,
        scale,
        x,
        scale,
        k,
        group,
        num_groups,
        x.stride(0),
        out.stride(0),
        QMAX=INT8_MAX if dtype == torch.int8 else FP8_MAX,
        MIN_AMAX=MIN_AMAX,
        STATIC=input_scale is not None,
        INT8=dtype == torch.int8,
        BLOCK=min(1024, triton.next_power_of_2(group)),
        num_warps=4,
    )
    return out, scale


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile): GROUP_M row tiles walk the column tiles together, sharing them in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * grid_n) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * grid_n)) % group_rows, (pid % (GROUP_M * grid_n)) // group_rows


@triton.jit
def _scaled_gemm_kernel(
    c_ptr,
    a_ptr,
    b_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    stride_asm,
    stride_ask,
    stride_bsn,
    stride_bsk,
    SCALE_BLOCK_N,
    SCALE_BLOCK_K,
    BLOCK_SCALED: tl.constexpr,
    INT_DOT: tl.constexpr,
    DOT_16BIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # C = (A_q * a_scale) @ (B_q * b_scale).T for B [N, K] row-major. Scales are indexed as
    # a_scale[m * stride_asm + (k // SCALE_BLOCK_K) * stride_ask] and
    # b_scale[(n // SCALE_BLOCK_N) * stride_bsn + (k // SCALE_BLOCK_K) * stride_bsk]
    # (a zero stride broadcasts): with BLOCK_SCALED they vary along K and multiply each
    # K block's partial product (BLOCK_K divides SCALE_BLOCK_K); without, once in the epilogue.
    # FP8 tensor cores take K blocks of 32 or more: a scale block of 16 (or 48) columns
    # needs a 16-wide K block, whose FP8 tiles go to float16 first (DOT_16BIT): every e4m3
    # value is a float16 one and their products are exact in the float32 sums, so the
    # result is the FP8 dot's.
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_in = rows < M
    col_in = cols < N
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    b_ptrs = b_ptr + cols.to(tl.int64)[None, :] * stride_bn + ks[:, None]
    a_scale_rows = a_scale_ptr + rows * stride_asm
    b_scale_cols = b_scale_ptr + (cols // SCALE_BLOCK_N) * stride_bsn
    if INT_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = k0 + ks < K
        a = tl.load(a_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None] & col_in[None, :], other=0.0)
        if DOT_16BIT:
            a = a.to(tl.float16)
            b = b.to(tl.float16)
        if BLOCK_SCALED:
            k_block = k0 // SCALE_BLOCK_K
            a_s = tl.load(a_scale_rows + k_block * stride_ask, mask=row_in, other=0.0)
            b_s = tl.load(b_scale_cols + k_block * stride_bsk, mask=col_in, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        elif INT_DOT:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if BLOCK_SCALED:
        y = acc
    else:
        a_s = tl.load(a_scale_rows, mask=row_in, other=0.0)
        b_s = tl.load(b_scale_cols, mask=col_in, other=0.0)
        y = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


@triton.jit
def _w8_gemv_kernel(
    out_ptr,
    x_ptr,
    w_ptr,
    input_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    N,
    K,
    stride_wn,
    stride_bsn,
    stride_bsk,
    SCALE_BLOCK_N,
    SCALE_BLOCK_K,
    QMAX: tl.constexpr,
    MIN_AMAX: tl.constexpr,
    INT8: tl.constexpr,
    STATIC: tl.constexpr,
    BLOCK_SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_GROUP: tl.constexpr,
):
    # One row x against 8-bit W [N, K], quantizing x on the fly exactly as _quantize_rows_kernel
    # would (one launch, not two: at batch 1 the second launch costs as much as a small GEMV):
    # with a static scale, or one scale for the row (an amax pass over x first, from L2), or,
    # with block weight scales, one per SCALE_GROUP = SCALE_BLOCK_K columns (a power of two),
    # taken from the tile itself. A K tile is GROUPS runs of SCALE_GROUP columns, whose weight
    # scales (indexed as in _scaled_gemm_kernel) are loaded once a run and broadcast; without
    # block scales, SCALE_GROUP is the tile and the weight scale multiplies in the epilogue.
    GROUPS: tl.constexpr = BLOCK_K // SCALE_GROUP
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    gs = tl.arange(0, GROUPS) * SCALE_GROUP
    row_in = rows < N
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    w_scale_rows = w_scale_ptr + (rows // SCALE_BLOCK_N) * stride_bsn
    if STATIC:
        row_scale = tl.load(input_scale_ptr).to(tl.float32)
    elif not BLOCK_SCALED:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + k0 + ks, mask=k0 + ks < K, other=0.0).to(tl.float32)))
        row_scale = _scale_of(tl.max(amax, 0), QMAX, MIN_AMAX)
    acc = tl.zeros((BLOCK_N, GROUPS, SCALE_GROUP), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = k0 + ks < K
        w = tl.load(w_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0, eviction_policy="evict_first")
        w = tl.reshape(w.to(tl.float32), (BLOCK_N, GROUPS, SCALE_GROUP))
        x = tl.reshape(tl.load(x_ptr + k0 + ks, mask=k_in, other=0.0).to(tl.float32), (GROUPS, SCALE_GROUP))
        if BLOCK_SCALED and not STATIC:
            x_scale = _scale_of(tl.max(tl.abs(x), axis=1), QMAX, MIN_AMAX)[:, None]
        else:
            x_scale = row_scale
        x = _quantize(x, x_scale, QMAX, INT8) * x_scale
        if BLOCK_SCALED:
            w_s = tl.load(
                w_scale_rows[:, None] + ((k0 + gs) // SCALE_BLOCK_K)[None, :] * stride_bsk,
                mask=row_in[:, None] & (k0 + gs < K)[None, :],
                other=0.0,
            )
            w = w * w_s[:, :, None]
        acc += w * x[None, :, :]
        w_ptrs += BLOCK_K
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if not BLOCK_SCALED:
        y *= tl.load(w_scale_rows, mask=row_in, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_in, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_in)


@triton.jit
def _w4_gemv_kernel(
    out_ptr,
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    bias_ptr,
    N,
    K,
    stride_qn,
    stride_sn,
    GROUP_SIZE,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_PACKED: tl.constexpr,
    GROUP_PACKED: tl.constexpr,
):
    # One row x against packed 4-bit W: byte j of a row holds columns 2j (low nibble) and
    # 2j + 1 (high), so the even and odd columns of x meet the two nibbles without
    # interleaving them back. A tile of BLOCK_PACKED bytes is GROUPS groups of GROUP_PACKED
    # bytes, which share one scale (and zero) a row: loaded once, broadcast over the group.
    # GROUP_PACKED = 1 when the group size is not a power of two: then a scale per byte.
    GROUPS: tl.constexpr = BLOCK_PACKED // GROUP_PACKED
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    gs = tl.arange(0, GROUPS)
    js = tl.arange(0, BLOCK_PACKED)
    q_ptrs = qweight_ptr + rows.to(tl.int64)[:, None] * stride_qn + js[None, :]
    scale_rows = scales_ptr + rows.to(tl.int64)[:, None] * stride_sn
    zero_rows = zeros_ptr + rows.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros((BLOCK_N, GROUPS, GROUP_PACKED), dtype=tl.float32)
    dtype = x_ptr.dtype.element_ty
    for j0 in range(0, K // 2, BLOCK_PACKED):
        j_in = j0 + js < K // 2
        packed = tl.load(q_ptrs, mask=row_in[:, None] & j_in[None, :], other=0, eviction_policy="evict_first")
        packed = tl.reshape(packed, (BLOCK_N, GROUPS, GROUP_PACKED))
        group_cols = (2 * (j0 + gs * GROUP_PACKED)) // GROUP_SIZE
        group_mask = row_in[:, None] & (j0 + gs * GROUP_PACKED < K // 2)[None, :]
        scale = tl.load(scale_rows + group_cols[None, :], mask=group_mask, other=0.0).to(tl.float32)[:, :, None]
        if HAS_ZEROS:
            zero = tl.load(zero_rows + group_cols[None, :], mask=group_mask, other=0).to(tl.float32)[:, :, None]
        else:
            zero = SYMMETRIC_ZERO
        # Each weight rounded to the activations' dtype, as the GEMM (and the reference) feed their dot.
        low = (((packed & 0xF).to(tl.float32) - zero) * scale).to(dtype).to(tl.float32)
        high = (((packed >> 4).to(tl.float32) - zero) * scale).to(dtype).to(tl.float32)
        x_even = tl.load(x_ptr + 2 * (j0 + js), mask=j_in, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + 2 * (j0 + js) + 1, mask=j_in, other=0.0).to(tl.float32)
        x_even = tl.reshape(x_even, (GROUPS, GROUP_PACKED))[None, :, :]
        x_odd = tl.reshape(x_odd, (GROUPS, GROUP_PACKED))[None, :, :]
        acc += low * x_even + high * x_odd
        q_ptrs += BLOCK_PACKED
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_in, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_in)


@triton.jit
def _w4_gemm_kernel(
    c_ptr,
    a_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_qn,
    stride_sn,
    stride_cm,
    GROUP_SIZE,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # C = A @ W.T with W dequantized tile by tile: weight column k is the low (even k) or high
    # (odd k) nibble of byte k // 2, so each [BLOCK_N, BLOCK_K] tile loads every byte twice
    # (one memory transaction: the pairs share addresses) and shifts it, with no interleaving
    # of register tiles; then scaled and rounded to A's dtype.
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    nibble_shifts = (ks % 2) * 4
    row_in = rows < M
    col_in = cols < N
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    q_ptrs = qweight_ptr + cols.to(tl.int64)[:, None] * stride_qn + (ks // 2)[None, :]
    scale_cols = cols.to(tl.int64)[:, None] * stride_sn
    dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = k0 + ks < K
        a = tl.load(a_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
        packed = tl.load(q_ptrs, mask=col_in[:, None] & k_in[None, :], other=0).to(tl.int32)
        q = ((packed >> nibble_shifts[None, :]) & 0xF).to(tl.float32)
        if SCALE_PER_TILE:  # the tile lies in one group: one scale (and zero) per weight row
            groups = scale_cols + k0 // GROUP_SIZE
            w_mask = col_in[:, None]
        else:
            groups = scale_cols + ((k0 + ks) // GROUP_SIZE)[None, :]
            w_mask = col_in[:, None] & k_in[None, :]
        scale = tl.load(scales_ptr + groups, mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + groups, mask=w_mask, other=0).to(tl.float32)
        else:
            zero = SYMMETRIC_ZERO
        w = ((q - zero) * scale).to(dtype)
        acc = tl.dot(a, tl.trans(w), acc)
        a_ptrs += BLOCK_K
        q_ptrs += BLOCK_K // 2
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    block_size: tuple[int, int] | None,
    input_scale: torch.Tensor | None,
    num_sms: int,
) -> torch.Tensor:
    """`KernelBackend.fp8_linear` on FP8 tensor cores (see the module docstring for which kernel runs)."""
    x2 = x.reshape(-1, x.shape[-1])
    if _gemv_covers(x2, block_size):
        out = _w8_gemv(x2, weight, weight_scale, bias, block_size, input_scale, FP8_DTYPE, num_sms)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    group_size = block_size[1] if block_size is not None and input_scale is None else None
    x_q, x_scale = quantize_activations(x2, FP8_DTYPE, group_size=group_size, input_scale=input_scale)
    if block_size is None and _scaled_mm_covers(x2, x_scale, weight, weight_scale, bias):
        out = _scaled_mm(x_q, x_scale, weight, weight_scale, bias, x.dtype)
    else:
        out = _w8a8_gemm(x_q, x_scale, weight, weight_scale, bias, block_size, x.dtype, num_sms)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    input_scale: torch.Tensor | None,
    num_sms: int,
) -> torch.Tensor:
    """`KernelBackend.int8_linear`: INT8 activations (per token, or static) times INT8 weights, int32 sums."""
    x2 = x.reshape(-1, x.shape[-1])
    if _gemv_covers(x2, None):
        out = _w8_gemv(x2, weight, weight_scale, bias, None, input_scale, torch.int8, num_sms)
    else:
        x_q, x_scale = quantize_activations(x2, torch.int8, input_scale=input_scale)
        out = _w8a8_gemm(x_q, x_scale, weight, weight_scale, bias, None, x.dtype, num_sms)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    group_size: int,
    num_sms: int,
) -> torch.Tensor:
    """`KernelBackend.w4a16_linear`: the GEMV for one row, the dequantize-in-the-loop GEMM for more."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if group_size % 2 or k % group_size or x.shape[-1] != k:
        raise ValueError(f"w4a16_linear: group size {group_size} must be even and divide the input width {k}")
    if qweight.stride(-1) != 1 or scales.stride(-1) != 1 or (zeros is not None and zeros.stride() != scales.stride()):
        raise ValueError("w4a16_linear needs contiguous rows, with zeros laid out as the scales")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    common = {"HAS_ZEROS": zeros is not None, "HAS_BIAS": bias is not None}
    power_of_two_groups = group_size & (group_size - 1) == 0
    if m == 1:
        block_n = gemv_block_n(n, k // 2, 1, 1, num_sms)
        group_packed = group_size // 2 if power_of_two_groups else 1
        block_packed = max(group_packed, min(512, triton.next_power_of_2(k // 2)))
        _w4_gemv_kernel[(triton.cdiv(n, block_n),)](
            out, x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
            n, k, qweight.stride(0), scales.stride(0), group_size,
            BLOCK_N=block_n, BLOCK_PACKED=block_packed, GROUP_PACKED=group_packed, num_warps=4, **common,
        )  # fmt: skip
    elif m > 1:
        block_m, block_n, warps = _w4_gemm_tiles(m, n, num_sms)
        # A K block inside one group takes one scale a row; else a scale per weight. K blocks
        # of 32 or 64 only, the widths the GPU tests cover at every shape.
        block_k = next((b for b in (64, 32) if group_size % b == 0), 64)
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
        _w4_gemm_kernel[grid](
            out, x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
            m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), group_size,
            SCALE_PER_TILE=group_size % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            GROUP_M=8, num_warps=warps, num_stages=3, **common,
        )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def _w4_gemm_tiles(m: int, n: int, num_sms: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps) for the W4A16 GEMM: narrower column tiles while the grid leaves SMs idle."""
    block_m, block_n = _gemm_tiles(m, n, num_sms)
    return block_m, block_n, 8 if block_m >= 128 else 4


def _gemm_tiles(m: int, n: int, num_sms: int) -> tuple[int, int]:
    """Row tiles as tall as the batch (16 to 128); column tiles of 128, halved (to 32) while SMs would sit idle."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n = 128
    while block_n > 32 and triton.cdiv(m, block_m) * triton.cdiv(n, block_n) < num_sms:
        block_n //= 2
    return block_m, block_n


def _scaled_mm_covers(x, x_scale, weight, weight_scale, bias) -> bool:
    """Whether cuBLASLt's FP8 GEMM takes this product: 16-aligned dims; rowwise scales (per-channel or per-token) need bf16 out."""
    n, k = weight.shape
    rowwise = weight_scale.numel() > 1 or x_scale.numel() > 1
    return (
        x.is_cuda
        and n % 16 == 0
        and k % 16 == 0
        and weight.stride(-1) == 1
        and (x.dtype == torch.bfloat16 or (not rowwise and x.dtype == torch.float16))
        and (bias is None or bias.dtype == x.dtype)
    )


def _scaled_mm(x_q, x_scale, weight, weight_scale, bias, dtype) -> torch.Tensor:
    m, n = x_q.shape[0], weight.shape[0]
    if x_scale.numel() == 1 and weight_scale.numel() == 1:
        scale_a, scale_b = x_scale.reshape(()), weight_scale.reshape(()).float()
    else:  # rowwise: [m, 1] x [1, n]
        scale_a = x_scale.reshape(-1, 1).expand(m, 1).contiguous()
        scale_b = weight_scale.float().reshape(1, -1).expand(1, n).contiguous()
    return torch._scaled_mm(x_q, weight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=dtype)


def _w8a8_gemm(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: tuple[int, int] | None,
    dtype: torch.dtype,
    num_sms: int,
) -> torch.Tensor:
    """The Triton W8A8 GEMM (or GEMV for one row) on quantized activations and their scales."""
    m, k = x_q.shape
    n = weight.shape[0]
    if weight.stride(-1) != 1 or weight.shape[1] != k:
        raise ValueError(f"an 8-bit weight {tuple(weight.shape)} with contiguous rows must match inputs of width {k}")
    out = torch.empty((m, n), dtype=dtype, device=x_q.device)
    if m == 0:
        return out
    weight_scale = weight_scale.float()
    if block_size is not None:
        scale_block_n, scale_block_k = block_size
        stride_bsn, stride_bsk = weight_scale.stride()
    else:
        # Per-channel [n, 1] or per-tensor [1]: one scale per row of W (a zero stride repeats it).
        scale_block_n, scale_block_k = 1, k
        stride_bsn, stride_bsk = (weight_scale.stride(0) if weight_scale.numel() > 1 else 0), 0
    # Activation scales: per token [m, 1], per group [m, ceil(k / group)], or one static [1].
    stride_asm = x_scale.stride(0) if x_scale.dim() == 2 else 0
    stride_ask = x_scale.stride(1) if x_scale.dim() == 2 and x_scale.shape[1] > 1 else 0
    block_scaled = block_size is not None
    bias_arg = bias if bias is not None else weight_scale
    block_k = 128
    if block_scaled:
        while scale_block_k % block_k:
            block_k //= 2
        if block_k < 16:
            raise ValueError(f"FP8 block scales need a K block that is a multiple of 16, got {block_size}")
    block_m, block_n = _gemm_tiles(m, n, num_sms)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _scaled_gemm_kernel[grid](
        out, x_q, weight, x_scale, weight_scale, bias_arg,
        m, n, k, x_q.stride(0), weight.stride(0), out.stride(0),
        stride_asm, stride_ask, stride_bsn, stride_bsk, scale_block_n, scale_block_k,
        INT_DOT=x_q.dtype == torch.int8, DOT_16BIT=block_k < 32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        BLOCK_SCALED=block_scaled, HAS_BIAS=bias is not None,
        num_warps=8 if block_m >= 128 else 4, num_stages=4 if block_m <= 64 else 3,
    )  # fmt: skip
    return out


def _gemv_covers(x: torch.Tensor, block_size: tuple[int, int] | None) -> bool:
    """Whether the 8-bit GEMV takes this product: one row, and block scales (if any) a power of two wide."""
    return x.shape[0] == 1 and (block_size is None or block_size[1] & (block_size[1] - 1) == 0)


def _w8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: tuple[int, int] | None,
    input_scale: torch.Tensor | None,
    qdtype: torch.dtype,
    num_sms: int,
) -> torch.Tensor:
    """One row through `_w8_gemv_kernel`, its activations quantized to ``qdtype`` inside."""
    n, k = weight.shape
    if weight.stride(-1) != 1 or x.shape[1] != k:
        raise ValueError(f"an 8-bit weight {tuple(weight.shape)} with contiguous rows must match inputs of width {k}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight_scale = weight_scale.float()
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_k = min(1024, triton.next_power_of_2(k))
    if block_size is not None:
        scale_block_n, scale_block_k = block_size
        stride_bsn, stride_bsk = weight_scale.stride()
        block_k = max(block_k, scale_block_k)
        scale_group = scale_block_k
    else:
        scale_block_n, scale_block_k, scale_group = 1, k, block_k
        stride_bsn, stride_bsk = (weight_scale.stride(0) if weight_scale.numel() > 1 else 0), 0
    block_n = gemv_block_n(n, k, 1, 1, num_sms)
    _w8_gemv_kernel[(triton.cdiv(n, block_n),)](
        out, x, weight, input_scale if input_scale is not None else weight_scale, weight_scale,
        bias if bias is not None else weight_scale,
        n, k, weight.stride(0), stride_bsn, stride_bsk, scale_block_n, scale_block_k,
        QMAX=INT8_MAX if qdtype == torch.int8 else FP8_MAX, MIN_AMAX=MIN_AMAX, INT8=qdtype == torch.int8,
        STATIC=input_scale is not None, BLOCK_SCALED=block_size is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, SCALE_GROUP=scale_group, num_warps=4,
    )  # fmt: skip
    return out
