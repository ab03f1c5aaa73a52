"""The kernel backends against plain formulas on random inputs.

Paged attention is checked against dense causal attention computed per
sequence from the full K/V; the cache it reads was written through
`store_kv` with shuffled physical blocks, so slot mapping, block tables,
cached context, GQA and causal masking are all on the path.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from atom_trio.layers import get_rope
from atom_trio.ops import AttentionMetadata, TorchRefBackend, get_backend

BACKENDS = [TorchRefBackend()]
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def dense_causal_attention(q, k, v, scale):
    """Reference: query i of n sits at position len(k) - n + i; GQA by repeating KV heads."""
    n, num_heads, _ = q.shape
    ctx, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    allowed = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def run_paged_attention(backend, seqs, *, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """Attend ``seqs`` = [(query_len, cached_len), ...] in one flat step; return (out, reference)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    blocks_needed = [-(-(n + cached) // block_size) for n, cached in seqs]
    num_blocks = sum(blocks_needed) + 3
    physical = list(range(num_blocks))
    rng.shuffle(physical)
    k_cache = torch.zeros(backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype)
    v_cache = torch.zeros_like(k_cache)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    tables, queries, keys, values, slots, references = [], [], [], [], [], []
    for (n, cached), nb in zip(seqs, blocks_needed):
        table = [physical.pop() for _ in range(nb)]
        ctx = n + cached
        q, k, v = rand(n, num_heads, head_dim), rand(ctx, num_kv_heads, head_dim), rand(ctx, num_kv_heads, head_dim)
        seq_slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        # The cached context was written by earlier steps.
        backend.store_kv(k[:cached], v[:cached], k_cache, v_cache, seq_slots[:cached])
        tables.append(table)
        queries.append(q)
        keys.append(k[cached:])
        values.append(v[cached:])
        slots.append(seq_slots[cached:])
        references.append(dense_causal_attention(q, k, v, head_dim**-0.5))

    max_blocks = max(blocks_needed)
    query_lens = [n for n, _ in seqs]
    metadata = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32),
        context_lens=torch.tensor([n + c for n, c in seqs], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.cat(slots),
        query_lens_host=query_lens,
        context_lens_host=[n + c for n, c in seqs],
        block_size=block_size,
    )
    key, value = torch.cat(keys), torch.cat(values)
    backend.store_kv(key, value, k_cache, v_cache, metadata.slot_mapping)
    plan = backend.plan_attention(metadata)
    out = backend.paged_attention(torch.cat(queries), key, value, k_cache, v_cache, plan, head_dim**-0.5)
    return out, torch.cat(references)


MIXED_STEP = [(1, 16), (9, 0), (7, 23), (1, 0), (1, 45), (16, 16), (3, 1), (1, 31)]
DECODE_STEP = [(1, 16), (1, 0), (1, 45), (1, 31), (1, 7)]
# a lone decode takes torch_ref's fused path up to a context length, the batched one beyond it
LONE_DECODES = {"lone-decode": [(1, 40)], "lone-long-decode": [(1, 700)]}


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "seqs", [MIXED_STEP, DECODE_STEP, *LONE_DECODES.values()], ids=["mixed", "decodes", *LONE_DECODES]
)
def test_paged_attention_matches_dense(backend, dtype, seqs):
    # (query_len, cached_len): decodes at several context lengths, a fresh prefill, prefill chunks
    # over cached context, a one-token sequence, and block-boundary lengths
    out, ref = run_paged_attention(
        backend, seqs, num_heads=8, num_kv_heads=2, head_dim=32, block_size=16, dtype=dtype, seed=0
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@settings(max_examples=30, deadline=None)
@given(
    seqs=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 40)), min_size=1, max_size=6),
    heads=st.sampled_from([(4, 4), (4, 2), (6, 1), (9, 3)]),
    block_size=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_any_layout_matches_dense(backend, seqs, heads, block_size, seed):
    num_heads, num_kv_heads = heads
    out, ref = run_paged_attention(
        backend,
        seqs,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=8,
        block_size=block_size,
        dtype=torch.float32,
        seed=seed,
    )
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


def test_torch_store_kv_writes_each_token_to_its_slot():
    backend = TorchRefBackend()
    k_cache = torch.zeros(backend.kv_cache_shape(6, 4, 2, 8))
    v_cache = torch.zeros_like(k_cache)
    key, value = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([23, 0, 5, 12, 7])
    backend.store_kv(key, value, k_cache, v_cache, slots)
    for i, slot in enumerate(slots.tolist()):  # head-major: [kv_heads, blocks, block_size, dim]
        assert torch.equal(k_cache[:, slot // 4, slot % 4], key[i])
        assert torch.equal(v_cache[:, slot // 4, slot % 4], value[i])
    written = torch.zeros(24, dtype=torch.bool)
    written[slots] = True
    assert not k_cache.view(2, 24, 8)[:, ~written].any() and not v_cache.view(2, 24, 8)[:, ~written].any()


def hf_rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm, verbatim."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_with_and_without_residual(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(7, 64, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + torch.randn(64, generator=gen)).to(dtype)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(backend.rms_norm(x, weight, 1e-5), hf_rms_norm(x, weight, 1e-5), **tol)
    normed, summed = backend.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(summed, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(normed, hf_rms_norm(x + residual, weight, 1e-5), **tol)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_silu_and_mul(backend):
    x = torch.randn(5, 2 * 48)
    torch.testing.assert_close(backend.silu_and_mul(x), F.silu(x[:, :48]) * x[:, 48:])


ROPE_CONFIGS = {
    "default": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "llama3": dict(
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        )
    ),
}


@pytest.mark.parametrize("rope", sorted(ROPE_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_matches_transformers(rope, dtype):
    config = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **ROPE_CONFIGS[rope]
    )
    head_dim = 64
    positions = torch.tensor([0, 1, 2, 17, 300, 1023, 4095, 5])
    q = torch.randn(len(positions), 4, head_dim).to(dtype)
    k = torch.randn(len(positions), 2, head_dim).to(dtype)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None, :])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    rope_layer = get_rope(config, head_dim, config.max_position_embeddings)
    out_q, out_k = rope_layer(positions, q, k)
    tol = dict(atol=0, rtol=0) if dtype == torch.float32 else TOLERANCE[dtype]
    torch.testing.assert_close(out_q, ref_q[0].transpose(0, 1), **tol)
    torch.testing.assert_close(out_k, ref_k[0].transpose(0, 1), **tol)


def test_get_backend_choices():
    assert get_backend("auto", "cpu").name == "torch"
    assert get_backend("torch", "cpu").name == "torch"
    with pytest.raises(ValueError, match="not available"):
        get_backend("triton", "cpu")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_backend("cudnn", "cpu")
