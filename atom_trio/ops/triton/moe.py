"""Fused mixture-of-experts: every token's chosen experts in two grouped GEMMs over the rows sorted by expert.

A token ``t`` routed to experts ``topk_ids[t]`` with weights ``topk_weights[t]``
is ``k`` rows of work, one per (token, choice) *entry* ``t * k + j``. The layer
runs in four launches, each sized by host integers alone (the token count, the
expert count, the tile), so a decode step of fixed batch size can be captured
in a CUDA graph and replayed with new routing:

1. `moe_align_block_size` (one program) lists the entries by expert, each
   expert's list padded to a multiple of ``BLOCK_M``, and names the expert of
   every ``BLOCK_M``-row block. Entries whose expert another rank holds (expert
   parallelism: outside ``[expert_offset, expert_offset + E_local)``) are left
   out, so they contribute nothing here. The list has a fixed length, the
   bound ``T*k + min(E_local, T*k) * (BLOCK_M - 1)``; the padded length is a
   device value that the GEMM programs read, and programs past it exit.
2. The gate/up GEMM: a program owns one block of rows of one expert and
   ``BLOCK_N`` columns of the intermediate; it streams the matching gate and up
   rows of ``w13[e]`` and writes ``silu(gate) * up`` (fp32 accumulation, the
   activation in the epilogue), so the ``[T*k, 2I]`` projection never exists.
   GPT-OSS's experts add their biases and take `ClampedSwiGLU` in the same epilogue.
3. The down GEMM over that ``[T*k, I]`` activation, adding the expert's bias
   if it has one and multiplying each row by its routing weight in the epilogue.
4. The sum over the ``k`` choices of each token, in fp32, with no atomics:
   one program per (token, column tile) adds its token's rows whose expert is
   local, so the output does not depend on which program finishes first.

Quantized experts (`atom_trio.ops.quant_experts`: FP8 with block or per-row
scales, 4-bit with group scales and zero points, MXFP4) stay quantized in
memory: both GEMMs load each weight tile as stored (a byte holds two 4-bit
columns), dequantize it in float32 with the scale of each element's block
or group (e2m1 codes by their bits, e8m0 scales as float32 exponents), round
it once to the activations' dtype and multiply as the dense tiles do. The
activations are not quantized: the experts compute weight-only.

Rows are written at their entry index, not at their sorted position, so the
order of entries inside an expert's list (the align kernel assigns slots with
atomics) does not change any result: every row of a tile is computed by the
same sequence of products.

Tile sizes come per (local expert count, intermediate size, device) from the
JSON tables in ``moe_configs/`` (written by ``benchmarks/tune_moe.py``; the
batch-size key nearest the token count wins), else from `default_tile_config`.
One ``BLOCK_M`` serves both GEMMs, since both walk the same aligned list.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import attrs
import torch
import triton
import triton.language as tl

from ..interface import ClampedSwiGLU
from ..quant_experts import QuantizedExperts

CONFIG_DIR = Path(__file__).parent / "moe_configs"

_ALIGN_CHUNK = 1024  # entries the align kernel takes per step of its loops
_ALIGN_BLOCKS = 32  # blocks whose expert it decides per step
_SUM_BLOCK_H = 1024
_WEIGHT_FORMATS = {"fp8": 1, "w4a16": 2, "mxfp4": 3}  # the GEMM kernel's WEIGHT_FORMAT (0: dense)


@attrs.frozen
class MoeTileConfig:
    """The tiles of both expert GEMMs: ``block_m`` rows of one expert by ``block_n`` output columns, ``block_k`` deep.

    ``group_m`` consecutive row blocks share a column tile before the grid
    moves to the next one, so an expert's weight tile is read by neighbouring
    programs while it is in L2.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def default_tile_config(num_experts: int, top_k: int, tokens: int) -> MoeTileConfig:
    """Tiles for a shape with no tuned table, from the rows an expert gets on average (``tokens * top_k / E``).

    Few rows (decode) make the GEMMs weight streams: the smallest row tile
    ``tl.dot`` takes (16) and narrow column tiles, so that many programs stream
    at once (at batch 1, Qwen3-30B-A3B's gate/up pass is 8 experts times
    768 / 32 column tiles: 192 programs, where 64-column tiles would leave an
    H100's 132 SMs partly idle). Many rows (prefill) make them compute-bound: large square tiles.
    Every choice fits 160 KB of shared memory at three stages, the gate/up
    pass's two weight tiles included.
    """
    rows_per_expert = tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:
        return MoeTileConfig(block_m=16, block_n=32, block_k=128, group_m=1, num_warps=4, num_stages=3)
    if rows_per_expert <= 64:
        return MoeTileConfig(block_m=32, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3)
    if rows_per_expert <= 256:
        return MoeTileConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)
    return MoeTileConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)


def config_file_name(num_experts: int, intermediate: int, device_name: str) -> str:
    """The table for ``num_experts`` local experts of ``intermediate`` columns on ``device_name`` (spaces as ``_``)."""
    return f"E={num_experts},N={intermediate},device_name={device_name.replace(' ', '_')}.json"


@functools.cache
def tuned_configs(num_experts: int, intermediate: int, device_name: str) -> dict[int, MoeTileConfig]:
    """The tuned table ``{batch size: tiles}`` for this shape and device; empty where none is stored."""
    path = CONFIG_DIR / config_file_name(num_experts, intermediate, device_name)
    if not path.is_file():
        return {}
    return {int(batch): MoeTileConfig(**tiles) for batch, tiles in json.loads(path.read_text()).items()}


def tile_config(num_experts: int, intermediate: int, top_k: int, tokens: int, device_name: str) -> MoeTileConfig:
    """The tiles for ``tokens`` tokens: the tuned entry of the nearest batch size, else `default_tile_config`."""
    table = tuned_configs(num_experts, intermediate, device_name)
    if not table:
        return default_tile_config(num_experts, top_k, tokens)
    return table[min(table, key=lambda batch: (abs(batch - tokens), batch))]


@functools.cache
def device_name(device: torch.device) -> str:
    """What the tables are keyed by: the CUDA device's name, or the device type elsewhere (the interpreter)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@attrs.frozen
class AlignedEntries:
    """`moe_align_block_size`'s lists, on the device.

    ``sorted_ids[p]`` is the entry (``t * k + j``) at sorted position ``p``, or
    ``T*k`` in padding; ``expert_ids[b]`` is the local expert of the rows
    ``[b * block_m, (b + 1) * block_m)``, or -1 past the padded length
    ``num_padded[0]``.
    """

    sorted_ids: torch.Tensor  # [max_blocks * block_m] int32
    expert_ids: torch.Tensor  # [max_blocks] int32
    num_padded: torch.Tensor  # [1] int32
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.expert_ids.shape[0]


# The entry and block counts change with every batch size: specialising on them (divisibility by 16)
# would compile another variant for half the sizes a server captures.
@triton.jit(do_not_specialize=["num_entries", "max_blocks"])
def _align_kernel(
    topk_ids_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    cursor_ptr,
    num_entries,
    expert_offset,
    num_experts,
    max_blocks,
    BLOCK_M: tl.constexpr,
    EXPERTS_P2: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    # Pass 1: rows per local expert. Entries of other ranks' experts (and the tail of the last chunk)
    # count in bin ``num_experts``, which gets no rows.
    experts = tl.arange(0, EXPERTS_P2)
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros((EXPERTS_P2,), dtype=tl.int32)
    for start in range(0, num_entries, CHUNK):
        entry = start + offs
        local = tl.load(topk_ids_ptr + entry, mask=entry < num_entries, other=-1).to(tl.int32) - expert_offset
        local = tl.where((entry < num_entries) & (local >= 0) & (local < num_experts), local, num_experts)
        counts += tl.histogram(local, EXPERTS_P2)
    padded = tl.where(experts < num_experts, tl.cdiv(counts, BLOCK_M) * BLOCK_M, 0)
    ends = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    # Each expert's next free slot, handed out by atomics below.
    tl.store(cursor_ptr + experts, ends - padded)
    tl.store(num_padded_ptr, total)
    # A block belongs to the first expert whose rows end after the block starts.
    for b0 in range(0, max_blocks, BLOCKS):
        blocks = b0 + tl.arange(0, BLOCKS)
        first_row = blocks * BLOCK_M
        owner = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), 1)
        tl.store(expert_ids_ptr + blocks, tl.where(first_row < total, owner, -1), mask=blocks < max_blocks)
    for p0 in range(0, max_blocks * BLOCK_M, CHUNK):
        tl.store(sorted_ids_ptr + p0 + offs, num_entries, mask=p0 + offs < max_blocks * BLOCK_M)
    # The padding and the cursors must be in place before any entry takes its slot.
    tl.debug_barrier()
    # Pass 2: every local entry takes the next slot of its expert.
    for start in range(0, num_entries, CHUNK):
        entry = start + offs
        local = tl.load(topk_ids_ptr + entry, mask=entry < num_entries, other=-1).to(tl.int32) - expert_offset
        valid = (entry < num_entries) & (local >= 0) & (local < num_experts)
        slot = tl.atomic_add(cursor_ptr + local, 1, mask=valid)
        tl.store(sorted_ids_ptr + slot, entry, mask=valid)


def max_padded_rows(num_entries: int, num_experts: int, block_m: int) -> int:
    """The most rows the aligned list can need: every entry, plus padding for each expert that has any."""
    return num_entries + min(num_experts, num_entries) * (block_m - 1)


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, *, expert_offset: int = 0, num_experts: int
) -> AlignedEntries:
    """The entries of ``topk_ids`` ``[T, k]`` grouped by local expert, each group padded to ``block_m`` rows.

    Local expert ``e`` is global ``expert_offset + e`` for ``e < num_experts``;
    entries of other experts are left out. Sizes follow from ``T``, ``k``,
    ``num_experts`` and ``block_m`` alone, so the launch can be captured.
    """
    topk_ids = topk_ids.contiguous()
    num_entries = topk_ids.numel()
    max_blocks = triton.cdiv(max_padded_rows(num_entries, num_experts, block_m), block_m)
    device = topk_ids.device
    aligned = AlignedEntries(
        sorted_ids=torch.empty(max_blocks * block_m, dtype=torch.int32, device=device),
        expert_ids=torch.empty(max_blocks, dtype=torch.int32, device=device),
        num_padded=torch.empty(1, dtype=torch.int32, device=device),
        block_m=block_m,
    )
    experts_p2 = triton.next_power_of_2(num_experts + 1)
    cursor = torch.empty(experts_p2, dtype=torch.int32, device=device)
    _align_kernel[(1,)](
        topk_ids,
        aligned.sorted_ids,
        aligned.expert_ids,
        aligned.num_padded,
        cursor,
        num_entries,
        expert_offset,
        num_experts,
        max_blocks,
        BLOCK_M=block_m,
        EXPERTS_P2=experts_p2,
        CHUNK=_ALIGN_CHUNK,
        BLOCKS=_ALIGN_BLOCKS,
        num_warps=8,
    )
    return aligned


@triton.jit
def _dequantized_tile(
    w_ptrs,
    s_ptrs,
    z_ptrs,
    shift,
    mask,
    a_dtype: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One ``[BLOCK_K, BLOCK_N]`` weight tile in ``a_dtype``: loaded as stored, dequantized in float32, rounded once.

    ``mask`` (with ``MASKED``) leaves out the columns past K; they come out zero.
    """
    if WEIGHT_FORMAT == 0:
        if MASKED:
            return tl.load(w_ptrs, mask=mask, other=0.0)
        return tl.load(w_ptrs)
    # Quantized tiles load masked lanes as whatever is there (an FP8 "other" has no cast) and zero them at the end.
    w = tl.load(w_ptrs, mask=mask) if MASKED else tl.load(w_ptrs)
    s = tl.load(s_ptrs, mask=mask) if MASKED else tl.load(s_ptrs)
    if WEIGHT_FORMAT == 1:  # FP8 times its block's (or row's) float32 scale
        value = w.to(tl.float32) * s
    else:
        code = (w >> shift) & 0xF  # column 2j in the low nibble, 2j + 1 in the high
        if WEIGHT_FORMAT == 2:  # 4-bit: (q - zero) * scale, rounded to the scales' dtype as the dense layout is
            if HAS_ZEROS:
                zero = (tl.load(z_ptrs, mask=mask) if MASKED else tl.load(z_ptrs)).to(tl.float32)
            else:
                zero = 8.0
            value = ((code.to(tl.float32) - zero) * s.to(tl.float32)).to(s.dtype).to(tl.float32)
        else:  # MXFP4: e2m1 (sign, two exponent bits, one mantissa bit) times 2 ** (e8m0 - 127) from its float32 bits
            exponent = (code >> 1) & 3
            mantissa = (code & 1).to(tl.float32)
            magnitude = tl.where(
                exponent == 0, mantissa * 0.5, (2.0 + mantissa) * ((1 << exponent).to(tl.float32) * 0.25)
            )
            power = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
            value = tl.where(code >= 8, -magnitude, magnitude) * power
    if MASKED:
        value = tl.where(mask, value, 0.0)
    return value.to(a_dtype)


@triton.jit(do_not_specialize=["num_entries", "max_blocks"])
def _expert_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    routing_weights_ptr,
    bias_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    N,
    K,
    num_entries,
    max_blocks,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    up_offset,
    stride_be,
    swiglu_alpha,
    swiglu_limit,
    scale_ptr,
    zeros_ptr,
    stride_se,
    stride_sn,
    stride_sk,
    scale_up_offset,
    SCALE_ROWS: tl.constexpr,
    SCALE_COLS: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    ENTRIES_PER_A_ROW: tl.constexpr,
    SILU_AND_MUL: tl.constexpr,
    ROUTING_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CLAMPED_SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grouped order: GROUP_M row blocks walk the column tiles together, sharing weight tiles in L2.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(max_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    entries = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_valid = entries < num_entries
    # Padding rows read row 0 (a load needs no mask then) and are never stored.
    a_rows = tl.where(row_valid, entries // ENTRIES_PER_A_ROW, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past N wrap to valid weight rows for the same reason.
    w_cols = (cols % N).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]
    # The 4-bit layouts hold two columns a byte: column k is byte k // 2, its nibble (k % 2) * 4 bits up.
    w_ptrs = w_ptr + expert * stride_we + w_cols[None, :] * stride_wn
    if WEIGHT_FORMAT >= 2:
        w_ptrs += ks[:, None] // 2
    else:
        w_ptrs += ks[:, None]
    shift = ((ks % 2) * 4)[:, None].to(tl.uint8)
    # Quantized weights: each element's scale (and zero point) by its row's and column's blocks.
    scale_rows = expert * stride_se + (w_cols // SCALE_ROWS)[None, :] * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = (ks < K - k0)[:, None] & (w_cols[None, :] >= 0)
        scale_at = scale_rows + ((k0 + ks) // SCALE_COLS)[:, None] * stride_sk
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(ks < K - k0)[None, :], other=0.0)
        w = _dequantized_tile(
            w_ptrs, scale_ptr + scale_at, zeros_ptr + scale_at, shift, k_in,
            a.dtype, WEIGHT_FORMAT, HAS_ZEROS, not EVEN_K,
        )
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if SILU_AND_MUL:
            up_scale_at = scale_at + scale_up_offset
            up = _dequantized_tile(
                w_ptrs + up_offset, scale_ptr + up_scale_at, zeros_ptr + up_scale_at, shift, k_in,
                a.dtype, WEIGHT_FORMAT, HAS_ZEROS, not EVEN_K,
            )
            acc_up = tl.dot(a, up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        if WEIGHT_FORMAT >= 2:
            w_ptrs += BLOCK_K // 2
        else:
            w_ptrs += BLOCK_K
    if HAS_BIAS:  # gate (or down) bias at the output columns; up bias N further on
        bias_row = bias_ptr + expert * stride_be + w_cols
        acc += tl.load(bias_row).to(tl.float32)[None, :]
        if SILU_AND_MUL:
            acc_up += tl.load(bias_row + N).to(tl.float32)[None, :]
    if SILU_AND_MUL:
        if CLAMPED_SWIGLU:  # GPT-OSS: (clamp(up) + 1) * gate * sigmoid(alpha * gate), gate clamped above
            gate = tl.minimum(acc, swiglu_limit)
            up = tl.minimum(tl.maximum(acc_up, -swiglu_limit), swiglu_limit)
            acc = (up + 1.0) * (gate * tl.sigmoid(gate * swiglu_alpha))
        else:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if ROUTING_WEIGHT:
        acc *= tl.load(routing_weights_ptr + entries, mask=row_valid, other=0.0)[:, None]
    out_ptrs = out_ptr + entries.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (cols[None, :] < N))


def _expert_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    aligned: AlignedEntries,
    config: MoeTileConfig,
    *,
    entries_per_a_row: int,
    silu_and_mul: bool,
    routing_weights: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    activation: ClampedSwiGLU | None = None,
    quant: QuantizedExperts | None = None,
    scale: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> None:
    """``out[entry] = a[entry // entries_per_a_row] @ w[expert].T + bias[expert]`` for every aligned entry, then
    the epilogues.

    With ``silu_and_mul`` the output has half the weight's rows: gate rows
    ``[0, N)`` and up rows ``[N, 2N)`` of each expert, activated by SiLU-and-mul or ``activation``.
    With ``quant``, ``w`` is in its layout with ``scale`` (and ``zeros``), dequantized tile by tile.
    """
    n = out.shape[1]
    k = a.shape[1]
    if quant is None:
        scale_rows, scale_cols, weight_format = 1, 1, 0
        scale = zeros = out  # not read
    else:
        scale_rows, scale_cols = quant.scale_block(scale, k)
        weight_format = _WEIGHT_FORMATS[quant.kind]
        scale = scale.contiguous()
        if weight_format != 1 and config.block_k % 2:
            raise ValueError(f"block_k {config.block_k} must be even for 4-bit weights (two columns a byte)")
    if silu_and_mul and n % scale_rows:
        raise ValueError(f"the gate's {n} rows end inside a block of {scale_rows} scale rows, where the up rows begin")
    grid = (aligned.max_blocks * triton.cdiv(n, config.block_n),)
    _expert_gemm_kernel[grid](
        a,
        w,
        out,
        routing_weights if routing_weights is not None else out,
        bias if bias is not None else out,  # not read without a bias
        aligned.sorted_ids,
        aligned.expert_ids,
        aligned.num_padded,
        n,
        k,
        out.shape[0],
        aligned.max_blocks,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        n * w.stride(1),
        bias.stride(0) if bias is not None else 0,
        activation.alpha if activation is not None else 0.0,
        activation.limit if activation is not None else 0.0,
        scale,
        zeros if zeros is not None else scale,
        scale.stride(0) if quant is not None else 0,
        scale.stride(1) if quant is not None else 0,
        scale.stride(2) if quant is not None else 0,
        (n // scale_rows) * scale.stride(1) if quant is not None else 0,
        SCALE_ROWS=scale_rows,
        SCALE_COLS=scale_cols,
        WEIGHT_FORMAT=weight_format,
        HAS_ZEROS=zeros is not None,
        ENTRIES_PER_A_ROW=entries_per_a_row,
        SILU_AND_MUL=silu_and_mul,
        ROUTING_WEIGHT=routing_weights is not None,
        HAS_BIAS=bias is not None,
        CLAMPED_SWIGLU=activation is not None,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        EVEN_K=k % config.block_k == 0,
        # float32 (tests) stays exact; 16-bit inputs take the default, portable to ROCm.
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


@triton.jit
def _sum_choices_kernel(
    out_ptr,
    rows_ptr,
    topk_ids_ptr,
    H,
    expert_offset,
    num_experts,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_in = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        # Rows of other ranks' experts were never written: skip them, never read them. (Compared as a
        # vector: Triton's interpreter types a scalar condition and'ed into a vector mask as int32.)
        local = tl.load(topk_ids_ptr + token * TOP_K + j).to(tl.int32) - expert_offset + tl.zeros_like(cols)
        is_local = (local >= 0) & (local < num_experts)
        acc += tl.load(rows_ptr + (token * TOP_K + j) * H + cols, mask=col_in & is_local, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_in)


def fused_experts(
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
    config: MoeTileConfig | None = None,
) -> torch.Tensor:
    """``KernelBackend.fused_experts``: ``hidden`` ``[T, H]`` through its chosen local experts, weighted and summed.

    ``w13`` ``[E_local, 2I, H]`` (gate rows, then up rows), ``w2`` ``[E_local,
    H, I]``, or with ``quant`` in its layout (the 4-bit ones hold two columns a
    byte); ``topk_ids`` ``[T, k]`` are global expert ids, of which those in
    ``[expert_offset, expert_offset + E_local)`` are computed here. ``config``
    forces the tiles (the tuning script); otherwise `tile_config` picks them.
    """
    tokens, hidden_size = hidden.shape
    num_experts, two_i, _ = w13.shape
    intermediate = two_i // 2
    top_k = topk_ids.shape[1]
    columns = 1 if quant is None or quant.kind == "fp8" else 2  # per stored element
    expected_w2 = (num_experts, hidden_size, intermediate // columns)
    if w13.shape != (num_experts, 2 * intermediate, hidden_size // columns) or w2.shape != expected_w2:
        raise ValueError(
            f"fused_experts: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit hidden size {hidden_size}"
        )
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != tokens:
        raise ValueError(
            f"fused_experts: topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} "
            f"must both be [{tokens}, k]"
        )
    out = torch.empty_like(hidden)
    if tokens == 0 or top_k == 0:
        return out.zero_()
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    w2 = w2 if w2.stride(-1) == 1 else w2.contiguous()
    topk_ids = topk_ids.contiguous()
    if config is None:
        config = tile_config(num_experts, intermediate, top_k, tokens, device_name(hidden.device))
    aligned = moe_align_block_size(topk_ids, config.block_m, expert_offset=expert_offset, num_experts=num_experts)
    num_entries = tokens * top_k
    activated = torch.empty(num_entries, intermediate, dtype=hidden.dtype, device=hidden.device)
    _expert_gemm(
        hidden,
        w13,
        activated,
        aligned,
        config,
        entries_per_a_row=top_k,
        silu_and_mul=True,
        routing_weights=None,
        bias=None if w13_bias is None else w13_bias.contiguous(),
        activation=activation,
        quant=quant,
        scale=None if quant is None else quant.w13_scale,
        zeros=None if quant is None else quant.w13_zeros,
    )
    rows = torch.empty(num_entries, hidden_size, dtype=hidden.dtype, device=hidden.device)
    _expert_gemm(
        activated,
        w2,
        rows,
        aligned,
        config,
        entries_per_a_row=1,
        silu_and_mul=False,
        routing_weights=topk_weights.to(torch.float32).contiguous(),
        bias=None if w2_bias is None else w2_bias.contiguous(),
        quant=quant,
        scale=None if quant is None else quant.w2_scale,
        zeros=None if quant is None else quant.w2_zeros,
    )
    _sum_choices_kernel[(tokens, triton.cdiv(hidden_size, _SUM_BLOCK_H))](
        out, rows, topk_ids, hidden_size, expert_offset, num_experts, TOP_K=top_k, BLOCK_H=_SUM_BLOCK_H
    )
    return out
