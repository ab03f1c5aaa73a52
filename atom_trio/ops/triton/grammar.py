"""A grammar's token mask on the logits: -inf wherever the row's bitmask has a 0 bit.

One program per (masked row, tile of `_BLOCK` tokens): the rows named are
the few a grammar constrains, so the grid covers only them, and a tile reads
its ``_BLOCK / 32`` mask words once per token lane (cached) and writes only
the tokens it bans. Launch sizes come from host integers: no device sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, vocab, logits_stride, bitmask_stride,
                                BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab
    row = tl.load(rows_ptr + i).to(tl.int64)
    words = tl.load(bitmask_ptr + i * bitmask_stride + tokens // 32, mask=in_vocab, other=-1)
    banned = ((words >> (tokens % 32)) & 1) == 0
    tl.store(logits_ptr + row * logits_stride + tokens, float("-inf"), mask=in_vocab & banned)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """`KernelBackend.apply_token_bitmask`: mask row ``rows[i]`` of ``logits`` by ``bitmask[i]``, in place."""
    vocab = logits.shape[1]
    if bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"a bitmask of {bitmask.shape[1]} words does not cover a vocabulary of {vocab}")
    if not rows.numel():
        return
    if (vocab > 1 and logits.stride(1) != 1) or (bitmask.shape[1] > 1 and bitmask.stride(1) != 1):
        raise ValueError("apply_token_bitmask needs rows laid out contiguously")
    grid = (rows.numel(), triton.cdiv(vocab, _BLOCK))
    _apply_token_bitmask_kernel[grid](logits, bitmask, rows, vocab, logits.stride(0), bitmask.stride(0), BLOCK=_BLOCK)
