"""Paged attention with sinks and a sliding window (GPT-OSS) on every backend.

The torch reference and the CPU backend are checked against transformers' own GPT-OSS attention
(``eager_attention_forward``: the sink joins each row's logits, the window is transformers'
sliding-window mask) on mixed steps whose cache was written through ``store_kv`` over shuffled
blocks. The Triton kernels are checked against the reference: on a GPU, and on the CPU under
Triton's interpreter in a subprocess (it is chosen when a kernel is defined, ``TRITON_INTERPRET=1``
at import), with and without split-K so that the sink is counted once in the merge.
"""

from __future__ import annotations

import types

import attrs
import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
from triton_interpreter import INTERPRET, assert_passes_under_the_interpreter

from atom_trio.ops import CpuBackend, TorchRefBackend

REF = TorchRefBackend()
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 32
# (query_len, cached_len): decodes before, at and past the window, a fresh prefill longer than the
# window, chunks over cached context, a one-token sequence, runs of fresh prompts of one length
MIXED = [(1, 16), (9, 0), (7, 23), (1, 0), (1, 45), (16, 16), (3, 1), (1, 3), (9, 0), (9, 0)]
DECODES = [(1, 16), (1, 0), (1, 45), (1, 31), (1, 7)]
LONE_DECODE = [(1, 40)]
WINDOWS = [None, 5, 17]


def _step(seqs, dtype, seed, *, on_cpu=True):
    """`make_step`'s random step (on the GPU where there is one), on the CPU if ``on_cpu``; and `ref_layout`."""
    from test_triton_ops import make_step, ref_layout  # noqa: PLC0415 (its module needs triton)

    q, k, v, k_cache, v_cache, metadata = make_step(
        seqs, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, block_size=4, dtype=dtype, seed=seed
    )
    if on_cpu:
        tensors = ("cu_seqlens_q", "context_lens", "block_tables", "slot_mapping")
        metadata = attrs.evolve(metadata, **{name: getattr(metadata, name).cpu() for name in tensors})
        q, k, v, k_cache, v_cache = (x.cpu() for x in (q, k, v, k_cache, v_cache))
    return q, k, v, k_cache, v_cache, metadata, ref_layout


def _sinks(seed: int) -> torch.Tensor:
    return torch.randn(NUM_HEADS, generator=torch.Generator().manual_seed(seed)) * 2


def _transformers_attention(q, k_cache, v_cache, metadata, scale, sinks, window):
    """Each sequence's queries over its whole context through transformers' GPT-OSS attention."""
    module = types.SimpleNamespace(
        num_key_value_groups=NUM_HEADS // NUM_KV_HEADS,
        sinks=torch.zeros(NUM_HEADS) if sinks is None else sinks,
        training=False,
    )
    outs = []
    for i, (n, ctx) in enumerate(zip(metadata.query_lens_host, metadata.context_lens_host)):
        blocks = metadata.block_tables[i, : -(-ctx // metadata.block_size)].long()
        k, v = (c[:, blocks].flatten(1, 2)[None, :, :ctx].float() for c in (k_cache, v_cache))
        start = metadata.cu_seqlens_q[i]
        query = q[start : start + n].float().transpose(0, 1)[None]
        q_pos = torch.arange(ctx - n, ctx)[:, None]
        k_pos = torch.arange(ctx)[None, :]
        visible = (k_pos <= q_pos) & (True if window is None else k_pos > q_pos - window)
        mask = torch.zeros(n, ctx).masked_fill(~visible, float("-inf"))
        out, _ = eager_attention_forward(module, query, k, v, mask, scaling=scale)
        if sinks is None:  # transformers' sink of zero still counts exp(0): take it back out
            logits = torch.matmul(query, k.repeat_interleave(module.num_key_value_groups, 1).transpose(2, 3))
            lse = torch.logsumexp(logits * scale + mask, dim=-1)  # [1, heads, n]
            out = out * (1 + torch.exp(-lse)).transpose(1, 2)[..., None]
        outs.append(out[0])
    return torch.cat(outs)


@pytest.mark.parametrize("backend", [CpuBackend(), TorchRefBackend()], ids=lambda b: b.name)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("with_sinks", [True, False], ids=["sinks", "no-sinks"])
@pytest.mark.parametrize(
    ("seqs", "dtype"),
    [(MIXED, torch.float32), (DECODES, torch.float32), (LONE_DECODE, torch.float32), (MIXED, torch.bfloat16)],
    ids=["mixed", "decodes", "lone-decode", "mixed-bf16"],
)
def test_reference_and_cpu_match_transformers(backend, window, with_sinks, seqs, dtype):
    q, k, v, k_cache, v_cache, metadata, ref_layout = _step(seqs, dtype, seed=len(seqs))
    k_cache, v_cache = ref_layout(k_cache), ref_layout(v_cache)
    sinks = _sinks(1).to(dtype) if with_sinks else None
    backend.store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
    out = backend.paged_attention(
        q, k, v, k_cache, v_cache, backend.plan_attention(metadata), HEAD_DIM**-0.5, sinks=sinks, sliding_window=window
    )
    expected = _transformers_attention(q, k_cache, v_cache, metadata, HEAD_DIM**-0.5, sinks, window)
    tolerance = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, **tolerance)


def test_a_sink_takes_a_share_and_a_window_hides_keys():
    """The properties themselves, on one decode: a large sink empties the output; a window of one reads one value."""
    q, k, v, k_cache, v_cache, metadata, ref_layout = _step([(1, 9)], torch.float32, seed=3)
    k_cache, v_cache = ref_layout(k_cache), ref_layout(v_cache)
    REF.store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
    plan = REF.plan_attention(metadata)
    attend = lambda **kw: REF.paged_attention(q, k, v, k_cache, v_cache, plan, 0.1, **kw)  # noqa: E731
    assert attend(sinks=torch.full((NUM_HEADS,), 80.0)).abs().max() < 1e-20
    torch.testing.assert_close(attend(sliding_window=1), v.repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=1))


@pytest.mark.skipif(INTERPRET, reason="starts the interpreter run")
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    assert_passes_under_the_interpreter(__file__, "test_triton_matches")


@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs a GPU or Triton's interpreter")
@pytest.mark.parametrize(
    ("window", "with_sinks", "seqs", "num_splits"),
    [
        (5, True, MIXED, None),
        (None, True, DECODES, 4),
        (5, False, DECODES, 4),
        (70, True, [(1, 150), (1, 63), (1, 0)], 3),
        (5, True, [(70, 30), (1, 90)], 2),
    ],
    ids=["mixed-window", "decodes-4-splits", "decodes-4-splits-window", "long-decodes-3-splits", "prefill-2-splits"],
)
def test_triton_matches_the_reference(window, with_sinks, seqs, num_splits):
    from atom_trio.ops.triton import TritonBackend  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if INTERPRET else torch.bfloat16  # the interpreter's bf16 dot reads raw bits
    q, k, v, k_cache, v_cache, metadata, ref_layout = _step(seqs, dtype, seed=5, on_cpu=False)
    sinks = _sinks(2).to(device, dtype) if with_sinks else None
    ref_k, ref_v = ref_layout(k_cache), ref_layout(v_cache)
    REF.store_kv(k, v, ref_k, ref_v, metadata.slot_mapping)
    expected = REF.paged_attention(
        q, k, v, ref_k, ref_v, REF.plan_attention(metadata), 0.2, sinks=sinks, sliding_window=window
    )
    backend = TritonBackend(device)
    backend.store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
    plan = backend.plan_attention(metadata, num_splits=num_splits)
    out = backend.paged_attention(q, k, v, k_cache, v_cache, plan, 0.2, sinks=sinks, sliding_window=window)
    tolerance = dict(atol=4e-3, rtol=4e-3) if dtype == torch.float16 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance)


def _null_before_window(metadata, window, num_blocks):
    """``metadata`` whose table entries wholly before the window of each sequence's first query name one
    unused block, as a sliding-window KV cache group's released entries name the null page; and that block."""
    null = min(set(range(num_blocks)) - set(metadata.block_tables.flatten().tolist()))
    tables = metadata.block_tables.clone()
    for i, (n, ctx) in enumerate(zip(metadata.query_lens_host, metadata.context_lens_host)):
        tables[i, : max(0, ctx - n - window + 1) // metadata.block_size] = null
    assert (tables == null).any()
    return attrs.evolve(metadata, block_tables=tables), null


@pytest.mark.parametrize("backend", [CpuBackend(), TorchRefBackend()], ids=lambda b: b.name)
def test_null_blocks_before_the_window_are_never_weighed(backend):
    """Whatever the null page holds (here huge finite values), a sliding layer's output is that of its real blocks."""
    window = 5
    q, k, v, k_cache, v_cache, metadata, ref_layout = _step(MIXED, torch.float32, seed=7)
    k_cache, v_cache = ref_layout(k_cache), ref_layout(v_cache)
    backend.store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
    nulled, null = _null_before_window(metadata, window, k_cache.shape[1])

    def attend(meta):
        plan = backend.plan_attention(meta)
        return backend.paged_attention(q, k, v, k_cache, v_cache, plan, 0.2, sinks=_sinks(1), sliding_window=window)

    expected = attend(metadata)
    k_cache[:, null], v_cache[:, null] = 1e4, -1e4
    torch.testing.assert_close(attend(nulled), expected)


@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs a GPU or Triton's interpreter")
@pytest.mark.parametrize("num_splits", [None, 2])
def test_triton_matches_the_reference_with_null_blocks_before_the_window(num_splits):
    """The Triton kernel reads no block before a query block's window: a null page of NaN changes nothing."""
    from atom_trio.ops.triton import TritonBackend  # noqa: PLC0415

    window, device = 5, "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    q, k, v, k_cache, v_cache, metadata, ref_layout = _step([(1, 45), (7, 23), (1, 3)], dtype, seed=9, on_cpu=False)
    ref_k, ref_v = ref_layout(k_cache), ref_layout(v_cache)
    REF.store_kv(k, v, ref_k, ref_v, metadata.slot_mapping)
    expected = REF.paged_attention(
        q, k, v, ref_k, ref_v, REF.plan_attention(metadata), 0.2, sinks=_sinks(2).to(device, dtype), sliding_window=window
    )
    nulled, null = _null_before_window(metadata, window, k_cache.shape[0])
    k_cache[null], v_cache[null] = float("nan"), float("nan")
    backend = TritonBackend(device)
    backend.store_kv(k, v, k_cache, v_cache, nulled.slot_mapping)
    plan = backend.plan_attention(nulled, num_splits=num_splits)
    out = backend.paged_attention(
        q, k, v, k_cache, v_cache, plan, 0.2, sinks=_sinks(2).to(device, dtype), sliding_window=window
    )
    tolerance = dict(atol=4e-3, rtol=4e-3) if dtype == torch.float16 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance)
