"""The Triton backend against the torch reference, on fresh random inputs.

Skipped without a GPU (or Triton's CPU interpreter: ``TRITON_INTERPRET=1``
runs the same kernels on CPU tensors, slowly, for debugging).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs a GPU")
pytest.importorskip("triton")

from atom_trio.ops import AttentionMetadata, TorchRefBackend  # noqa: E402
from atom_trio.ops.triton import TritonBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
REF = TorchRefBackend()


def ref_layout(cache: torch.Tensor) -> torch.Tensor:
    """A Triton-layout cache ``[blocks, block_size, kv_heads, dim]`` in torch_ref's head-major layout."""
    return cache.permute(2, 0, 1, 3).contiguous()


def triton_layout(ref_cache: torch.Tensor) -> torch.Tensor:
    return ref_cache.permute(1, 2, 0, 3)


@pytest.fixture(scope="module")
def triton_backend():
    return TritonBackend(DEVICE)


def make_step(seqs, *, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, spare_blocks=3):
    """A random step: ``seqs`` = [(query_len, cached_len), ...] over shuffled physical blocks.

    Returns (query, key, value, k_cache, v_cache, metadata). The whole cache is
    random, so a kernel reading a slot it should not see changes the result.
    """
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    rng = random.Random(seed)
    blocks_needed = [-(-(n + cached) // block_size) for n, cached in seqs]
    num_blocks = sum(blocks_needed) + spare_blocks
    physical = list(range(num_blocks))
    rng.shuffle(physical)
    tables = [[physical.pop() for _ in range(nb)] for nb in blocks_needed]
    max_blocks = max(blocks_needed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)

    k_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    num_tokens = sum(n for n, _ in seqs)
    slots = [
        table[p // block_size] * block_size + p % block_size
        for (n, cached), table in zip(seqs, tables)
        for p in range(cached, cached + n)
    ]
    query_lens = [n for n, _ in seqs]
    context_lens = [n + c for n, c in seqs]
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    metadata = AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor(
            [t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32, device=DEVICE
        ),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_lens_host=query_lens,
        context_lens_host=context_lens,
        block_size=block_size,
    )
    return (
        rand(num_tokens, num_heads, head_dim),
        rand(num_tokens, num_kv_heads, head_dim),
        rand(num_tokens, num_kv_heads, head_dim),
        k_cache,
        v_cache,
        metadata,
    )


def check_attention(backend, seqs, *, num_heads, num_kv_heads, head_dim, dtype, block_size=16, seed=0, num_splits=None):
    q, k, v, k_cache, v_cache, metadata = make_step(
        seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        dtype=dtype, seed=seed,
    )
    scale = head_dim**-0.5
    ref_k_cache, ref_v_cache = ref_layout(k_cache), ref_layout(v_cache)
    REF.store_kv(k, v, ref_k_cache, ref_v_cache, metadata.slot_mapping)
    expected = REF.paged_attention(q, k, v, ref_k_cache, ref_v_cache, REF.plan_attention(metadata), scale)

    backend.store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
    assert torch.equal(k_cache, triton_layout(ref_k_cache)) and torch.equal(v_cache, triton_layout(ref_v_cache))
    plan = backend.plan_attention(metadata, num_splits=num_splits)
    out = backend.paged_attention(q, k, v, k_cache, v_cache, plan, scale)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


# decodes at several context lengths (block boundaries included), a fresh prefill, prefill
# chunks over cached context, a one-token sequence and a prefill longer than one query block
MIXED = [(1, 16), (9, 0), (7, 23), (1, 0), (1, 45), (16, 16), (3, 1), (1, 31), (150, 70)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_mixed_batch(triton_backend, dtype, head_dim, group):
    check_attention(triton_backend, MIXED, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_long_context_decode_splits_kv(triton_backend, dtype, head_dim, group):
    """Few decode tokens over long contexts: the plan splits the keys and merges the partials."""
    seqs = [(1, 5000), (1, 17), (1, 2047)] if not INTERPRET else [(1, 700), (1, 17)]
    num_kv_heads = 2
    plan = triton_backend.plan_attention(make_step(seqs, num_heads=2 * group, num_kv_heads=num_kv_heads,
                                                   head_dim=head_dim, block_size=16, dtype=dtype, seed=1)[-1])
    if not INTERPRET:
        from atom_trio.ops.triton import launch_config

        config = launch_config(
            num_tokens=3, num_seqs=3, max_query_len=1, max_context_len=plan.max_context_len, group=group,
            head_dim=head_dim, num_kv_heads=num_kv_heads, num_sms=triton_backend.num_sms, num_splits=None,
        )
        assert config.num_splits > 1
    check_attention(
        triton_backend, seqs, num_heads=2 * group, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, seed=1,
        num_splits=None if not INTERPRET else 4,
    )


@pytest.mark.parametrize("num_splits", [2, 8])
def test_forced_splits_on_a_mixed_batch(triton_backend, num_splits):
    """Splitting is exact for causal prefill chunks too (some splits then see no key at all)."""
    check_attention(
        triton_backend, MIXED, num_heads=16, num_kv_heads=2, head_dim=128, dtype=DTYPES[0], num_splits=num_splits
    )


@pytest.mark.parametrize("block_size", [1, 32, 128])
def test_block_sizes(triton_backend, block_size):
    check_attention(
        triton_backend, MIXED, num_heads=8, num_kv_heads=2, head_dim=64, dtype=DTYPES[-1], block_size=block_size
    )


def test_head_dim_not_a_power_of_two(triton_backend):
    check_attention(triton_backend, MIXED, num_heads=6, num_kv_heads=3, head_dim=96, dtype=DTYPES[-1])


@pytest.mark.skipif(INTERPRET, reason="too slow for the interpreter")
@pytest.mark.parametrize("seqs", [[(2048, 0)], [(512, 1536), (1, 4000), (300, 0)]], ids=["prefill", "chunked"])
def test_long_prefill(triton_backend, seqs):
    check_attention(triton_backend, seqs, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)


@settings(max_examples=15 if INTERPRET else 40, deadline=None)
@given(
    seqs=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 300)), min_size=1, max_size=8),
    heads=st.sampled_from([(4, 4), (8, 2), (6, 1), (9, 3)]),
    block_size=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_any_layout(seqs, heads, block_size, seed):
    num_heads, num_kv_heads = heads
    check_attention(
        TritonBackend(DEVICE), seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=64,
        dtype=DTYPES[-1], block_size=block_size, seed=seed,
    )


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_decode_step_replays_in_a_cuda_graph(triton_backend):
    """Store + split-KV attention captured once, replayed with new lengths, tables, slots and inputs.

    This is what the runner's decode graphs rely on: the kernels read every
    per-step value from device tensors, and the launch depends only on the
    batch size and the split count fixed at capture.
    """
    num_heads, num_kv_heads, head_dim, block_size, batch = 32, 8, 128, 16, 4
    first = make_step([(1, 100), (1, 3000), (1, 7), (1, 900)], num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=head_dim, block_size=block_size, dtype=torch.bfloat16, seed=3, spare_blocks=300)
    q, k, v, k_cache, v_cache, metadata = first
    static = dict(q=q.clone(), k=k.clone(), v=v.clone(), cu=metadata.cu_seqlens_q.clone(),
                  ctx=metadata.context_lens.clone(), slots=metadata.slot_mapping.clone(),
                  tables=torch.zeros(batch, 400, dtype=torch.int32, device=DEVICE))
    static["tables"][:, : metadata.block_tables.shape[1]] = metadata.block_tables

    def step_plan(meta):
        return triton_backend.plan_attention(
            AttentionMetadata(cu_seqlens_q=static["cu"], context_lens=static["ctx"], block_tables=static["tables"],
                              slot_mapping=static["slots"], query_lens_host=[1] * batch,
                              context_lens_host=meta.context_lens_host, block_size=block_size),
            num_splits=16,
        )

    def step(plan):
        triton_backend.store_kv(static["k"], static["v"], k_cache, v_cache, static["slots"])
        return triton_backend.paged_attention(static["q"], static["k"], static["v"], k_cache, v_cache, plan, 0.1)

    plan = step_plan(metadata)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(plan)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(plan)

    # A different batch of the same size: longer and shorter contexts, other blocks.
    q2, k2, v2, _, _, meta2 = make_step([(1, 4500), (1, 1), (1, 250), (1, 1024)], num_heads=num_heads,
                                        num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                                        dtype=torch.bfloat16, seed=4, spare_blocks=0)
    assert meta2.block_tables.max() < k_cache.shape[0]
    static["q"].copy_(q2), static["k"].copy_(k2), static["v"].copy_(v2)
    static["ctx"].copy_(meta2.context_lens), static["slots"].copy_(meta2.slot_mapping)
    static["tables"].zero_()
    static["tables"][:, : meta2.block_tables.shape[1]] = meta2.block_tables
    graph.replay()

    ref_k, ref_v = ref_layout(k_cache), ref_layout(v_cache)  # the graph stored this step's keys
    ref_meta = AttentionMetadata(cu_seqlens_q=static["cu"], context_lens=static["ctx"], block_tables=static["tables"],
                                 slot_mapping=static["slots"], query_lens_host=[1] * batch,
                                 context_lens_host=meta2.context_lens_host, block_size=block_size)
    REF.store_kv(k2, v2, ref_k, ref_v, meta2.slot_mapping)
    assert torch.equal(triton_layout(ref_k), k_cache)
    expected = REF.paged_attention(q2, k2, v2, ref_k, ref_v, REF.plan_attention(ref_meta), 0.1)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.bfloat16])


def test_padding_tokens_are_skipped_and_attend_to_nothing(triton_backend):
    """A graph pads its batch with slot -1, context 0 tokens: no cache write, zero output, no NaN."""
    q, k, v, k_cache, v_cache, metadata = make_step([(1, 20), (1, 0)], num_heads=4, num_kv_heads=2, head_dim=64,
                                                    block_size=16, dtype=DTYPES[-1], seed=5)
    before = k_cache.clone()
    slots = metadata.slot_mapping.clone()
    slots[1] = -1
    padded = AttentionMetadata(
        cu_seqlens_q=metadata.cu_seqlens_q, context_lens=torch.tensor([21, 0], dtype=torch.int32, device=DEVICE),
        block_tables=metadata.block_tables, slot_mapping=slots, query_lens_host=[1, 1], context_lens_host=[21, 0],
        block_size=16,
    )
    triton_backend.store_kv(k, v, k_cache, v_cache, slots)
    changed = (k_cache != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [slots[0].item() // 16]
    for splits in (None, 4):
        out = triton_backend.paged_attention(q, k, v, k_cache, v_cache,
                                             triton_backend.plan_attention(padded, num_splits=splits), 0.125)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_matches_reference_on_strided_inputs(triton_backend, dtype):
    """Keys and values arrive as views of the fused QKV projection."""
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    num_tokens, num_kv_heads, head_dim = 37, 8, 128
    qkv = torch.randn(num_tokens, (32 + 2 * num_kv_heads) * head_dim, generator=gen, device=DEVICE).to(dtype)
    key = qkv[:, 32 * head_dim : 40 * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 40 * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(20 * 16, generator=gen, device=DEVICE)[:num_tokens]
    caches = [torch.randn(20, 16, num_kv_heads, head_dim, generator=gen, device=DEVICE).to(dtype) for _ in range(2)]
    ref_caches = [ref_layout(c) for c in caches]
    triton_backend.store_kv(key, value, *caches, slots)
    REF.store_kv(key, value, *ref_caches, slots)
    assert all(torch.equal(c, triton_layout(r)) for c, r in zip(caches, ref_caches))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 4096), (7, 64), (300, 5120)])
def test_rms_norm(triton_backend, dtype, shape):
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    x, residual = (torch.randn(*shape, generator=gen, device=DEVICE).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen, device=DEVICE)).to(dtype)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(triton_backend.rms_norm(x, weight, 1e-5), REF.rms_norm(x, weight, 1e-5), **tol)
    normed, summed = triton_backend.rms_norm(x, weight, 1e-6, residual)
    ref_normed, ref_summed = REF.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(summed, ref_summed)
    torch.testing.assert_close(normed, ref_normed, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (4, 2, 64), (6, 6, 96)])
def test_rotary_embedding_on_fused_qkv_views(triton_backend, dtype, heads):
    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    num_tokens, max_pos = 45, 8192
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen, device=DEVICE).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, device=DEVICE).float(), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen, device=DEVICE)
    out_q, out_k = triton_backend.rotary_embedding(positions, q, k, cos_sin)
    ref_q, ref_k = REF.rotary_embedding(positions, q, k, cos_sin)
    torch.testing.assert_close(out_q, ref_q, **TOLERANCE[dtype])
    torch.testing.assert_close(out_k, ref_k, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (6, 6, 96)])
def test_rotary_store_kv_is_rotary_then_store_kv(triton_backend, dtype, heads):
    """The fused kernel against the two it replaces (each tested against torch_ref above), padding slots included."""
    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator(device=DEVICE).manual_seed(10)
    num_tokens, block_size, num_blocks = 21, 16, 4
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen, device=DEVICE).to(dtype)
    q, k, v = (
        t.view(num_tokens, -1, head_dim)
        for t in qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
    )
    freqs = torch.outer(torch.arange(4096, device=DEVICE).float(), torch.rand(head_dim // 2, generator=gen, device=DEVICE))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen, device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=DEVICE)[:num_tokens]
    slots[::5] = -1  # padding rows: rotated, never stored
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen, device=DEVICE).to(dtype)
              for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    expected_q, expected_k = triton_backend.rotary_embedding(positions, q, k, cos_sin)
    triton_backend.store_kv(expected_k, v, *expected_caches, slots)
    out_q, out_k = triton_backend.rotary_store_kv(positions, q, k, v, cos_sin, *caches, slots)
    assert torch.equal(out_q, expected_q) and torch.equal(out_k, expected_k)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected_caches))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2 * 14336), (33, 2 * 1000), (2, 3, 2 * 64)])
def test_silu_and_mul(triton_backend, dtype, shape):
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    x = (3 * torch.randn(*shape, generator=gen, device=DEVICE)).to(dtype)
    torch.testing.assert_close(triton_backend.silu_and_mul(x), REF.silu_and_mul(x), **TOLERANCE[dtype])


GEMV_SHAPES = [(37, 100), (64, 2048)] if INTERPRET else [(6144, 4096), (4096, 14336), (128256, 4096), (37, 100), (1000, 3000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_one_row_linear_is_the_gemv_and_matches_float32(triton_backend, dtype, shape, bias):
    n, k = shape
    gen = torch.Generator(device=DEVICE).manual_seed(n + k)
    weight = (torch.randn(n, k, generator=gen, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if bias else None
    x = torch.randn(1, k, generator=gen, device=DEVICE).to(dtype)
    assert triton_backend.uses_gemv(x, weight)
    out = triton_backend.linear(x, weight, b)
    exact = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
    assert out.shape == (1, n) and out.dtype == dtype
    torch.testing.assert_close(out.float(), exact, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_silu_and_mul_in_the_gemv_epilogue_is_exact(triton_backend, dtype, bias):
    n, k = (2 * 40, 200) if INTERPRET else (2 * 14336, 4096)
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    weight = (2 * torch.randn(n, k, generator=gen, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if bias else None
    x = torch.randn(1, k, generator=gen, device=DEVICE).to(dtype)
    fused = triton_backend.linear(x, weight, b, silu_and_mul=True)
    assert fused.shape == (1, n // 2)
    # Both halves are rounded as the projection stores them, so the epilogue computes the very same values.
    assert torch.equal(fused, triton_backend.silu_and_mul(triton_backend.linear(x, weight, b)))
    exact = REF.silu_and_mul(torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float()))
    torch.testing.assert_close(fused.float(), exact, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("silu_and_mul", [False, True], ids=["", "silu"])
def test_rms_norm_in_the_gemv_prologue_matches_float32(triton_backend, dtype, with_residual, silu_and_mul):
    n, k = (2 * 40, 1500) if INTERPRET else (2 * 14336, 4096)  # 1500: a ragged last tile
    gen = torch.Generator(device=DEVICE).manual_seed(13)
    weight = (2 * torch.randn(n, k, generator=gen, device=DEVICE) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=gen, device=DEVICE).to(dtype)
    norm_weight = (1 + torch.randn(k, generator=gen, device=DEVICE) / 4).to(dtype)
    x = (3 * torch.randn(1, k, generator=gen, device=DEVICE)).to(dtype)
    residual = torch.randn(1, k, generator=gen, device=DEVICE).to(dtype) if with_residual else None
    out, summed = triton_backend.rms_norm_linear(
        x, residual, norm_weight, 1e-5, weight, bias, silu_and_mul=silu_and_mul
    )
    # The sum is handed on exactly as the add + RMSNorm kernel hands it on.
    expected_sum = x if residual is None else triton_backend.rms_norm(x, norm_weight, 1e-5, residual)[1]
    assert torch.equal(summed, expected_sum)
    xf = expected_sum.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight.float()
    exact = torch.nn.functional.linear(normed, weight.float(), bias.float())
    exact = REF.silu_and_mul(exact) if silu_and_mul else exact
    assert out.shape == exact.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), exact, **TOLERANCE[dtype])
    # Two rows go to cuBLAS after the add + RMSNorm kernel, which rounds the normalised input to the
    # weight's dtype first: the same function, with that rounding's error (about 0.3% in bf16), which
    # the GEMV avoids; near-zero outputs of the SiLU product exceed the elementwise tolerance there.
    rows = torch.cat([x, x])
    rows_out, _ = triton_backend.rms_norm_linear(
        rows, None if residual is None else torch.cat([residual, residual]), norm_weight, 1e-5, weight, bias,
        silu_and_mul=silu_and_mul,
    )
    for ours in (out, rows_out[1:]):
        assert float((ours.float() - exact).norm() / exact.norm()) < 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
def test_rms_norm_gemv_custom_op_passes_opcheck(with_residual):
    """The op torch.compile traces: schema, fake tensor and no aliasing of inputs (its sum is never ``x``)."""
    from atom_trio.ops.triton.opaque import rms_norm_gemv_op

    gen = torch.Generator(device=DEVICE).manual_seed(14)
    weight = torch.randn(2 * 24, 64, generator=gen, device=DEVICE).to(torch.float16)
    x, residual = (torch.randn(1, 64, generator=gen, device=DEVICE).to(torch.float16) for _ in range(2))
    norm_weight = torch.rand(64, generator=gen, device=DEVICE).to(torch.float16)
    args = (x, residual if with_residual else None, norm_weight, 1e-6, weight, None, True, 1)
    torch.library.opcheck(rms_norm_gemv_op, args)
    out, summed = rms_norm_gemv_op(*args)
    assert out.shape == (1, 24) and summed.shape == ((1, 64) if with_residual else (0,))


def test_linear_of_several_rows_and_bad_shapes(triton_backend):
    gen = torch.Generator(device=DEVICE).manual_seed(12)
    weight = torch.randn(40, 64, generator=gen, device=DEVICE).to(torch.float16)
    rows = torch.randn(3, 64, generator=gen, device=DEVICE).to(torch.float16)
    assert not triton_backend.uses_gemv(rows, weight)  # from two rows on, cuBLAS
    out = triton_backend.linear(rows, weight, silu_and_mul=True)
    assert torch.equal(out, triton_backend.silu_and_mul(torch.nn.functional.linear(rows, weight)))
    from atom_trio.ops.triton.gemv import gemv

    with pytest.raises(ValueError, match="one row of 64"):
        gemv(rows[:2], weight, None, silu_and_mul=False, num_sms=1)
    with pytest.raises(ValueError, match="even number of weight rows"):
        gemv(rows[:1], weight[:39], None, silu_and_mul=True, num_sms=1)
