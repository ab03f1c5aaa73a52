"""The kernel backends against plain formulas on random inputs.

Paged attention is checked against dense causal attention computed per
sequence from the full K/V; the cache it reads was written through
`store_kv` with shuffled physical blocks, so slot mapping, block tables,
cached context, GQA and causal masking are all on the path.
"""

from __future__ import annotations

import ctypes
import os
import platform
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from atom_trio.layers import get_rope
from atom_trio.ops import AttentionMetadata, CpuBackend, TorchRefBackend, TracedOps, get_backend
from atom_trio.ops.cpu import kernels as cpu_kernels
from atom_trio.testing import TINY_CONFIGS

# the CPU backend (its fused kernels where they build) and the torch reference it builds on
BACKENDS = [CpuBackend(), TorchRefBackend()]


def backend_id(backend):
    return backend.name

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
# runs of new prompts of one length attend as one batch: 3 and 2 of them here, around singles
PROMPT_RUNS = [(1, 16), (9, 0), (9, 0), (9, 0), (5, 0), (9, 0), (7, 23), (5, 0), (5, 0)]
# a lone decode takes torch_ref's fused path up to a context length, the batched one beyond it
LONE_DECODES = {"lone-decode": [(1, 40)], "lone-long-decode": [(1, 700)]}


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "seqs",
    [MIXED_STEP, DECODE_STEP, PROMPT_RUNS, *LONE_DECODES.values()],
    ids=["mixed", "decodes", "prompt-runs", *LONE_DECODES],
)
def test_paged_attention_matches_dense(backend, dtype, seqs):
    # (query_len, cached_len): decodes at several context lengths, a fresh prefill, prefill chunks
    # over cached context, a one-token sequence, and block-boundary lengths
    out, ref = run_paged_attention(
        backend, seqs, num_heads=8, num_kv_heads=2, head_dim=32, block_size=16, dtype=dtype, seed=0
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **TOLERANCE[dtype])


def test_runs_of_new_prompts_of_one_length_attend_as_one_chunk():
    lens = [n for n, _ in PROMPT_RUNS]
    metadata = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32),
        context_lens=torch.tensor([n + c for n, c in PROMPT_RUNS], dtype=torch.int32),
        block_tables=torch.zeros(len(PROMPT_RUNS), 3, dtype=torch.int32),
        slot_mapping=torch.zeros(sum(lens), dtype=torch.long),
        query_lens_host=lens,
        context_lens_host=[n + c for n, c in PROMPT_RUNS],
        block_size=16,
    )
    plan = TorchRefBackend().plan_attention(metadata)
    assert [(c.num_seqs, c.block_table is None) for c in plan.prefills] == [
        (3, True), (1, True), (1, True), (1, False), (2, True)
    ]


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
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


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
def test_torch_store_kv_writes_each_token_to_its_slot(backend):
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


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
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


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
def test_silu_and_mul(backend):
    x = torch.randn(5, 2 * 48)
    torch.testing.assert_close(backend.silu_and_mul(x), F.silu(x[:, :48]) * x[:, 48:])


ROPE_CONFIGS = {
    "default": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "llama3": dict(rope_parameters=TINY_CONFIGS["llama3"]["rope_parameters"]),
}


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
@pytest.mark.parametrize("rope", sorted(ROPE_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_matches_transformers(backend, rope, dtype):
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
    out_q, out_k = backend.rotary_embedding(positions, q, k, rope_layer.cos_sin_cache)
    tol = dict(atol=0, rtol=0) if dtype == torch.float32 else TOLERANCE[dtype]
    torch.testing.assert_close(out_q, ref_q[0].transpose(0, 1), **tol)
    torch.testing.assert_close(out_k, ref_k[0].transpose(0, 1), **tol)


def test_get_backend_choices():
    assert get_backend("auto", "cpu").name == "cpu"
    assert get_backend("cpu", "cpu").name == "cpu"
    assert get_backend("torch", "cpu").name == "torch"
    assert type(get_backend("torch", "cpu")) is TorchRefBackend  # the pure reference, no C++ kernels
    with pytest.raises(ValueError, match="not available"):
        get_backend("triton", "cpu")
    with pytest.raises(ValueError, match="not available"):
        get_backend("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_backend("cudnn", "cpu")


@pytest.mark.parametrize("backend", BACKENDS, ids=backend_id)
def test_what_the_runner_asks_of_a_cpu_backend(backend):
    # no CUDA graphs, no sampling kernel; for a compiled model, its attention-side ops and plain torch
    assert not backend.supports_cuda_graphs and backend.sampling_min_rows is None
    with pytest.raises(NotImplementedError):
        backend.sample(*[torch.zeros(1)] * 6)
    traced = backend.traced()
    assert isinstance(traced, TracedOps) and traced.device_backend is backend and traced.name == backend.name
    assert traced.kv_cache_shape(6, 4, 2, 8) == backend.kv_cache_shape(6, 4, 2, 8)


# The CPU backend's fused kernels (atom_trio.ops.cpu) on their own.


def paged_decode_reference(q, k_cache, v_cache, tables, context_lens, scale):
    """Dense attention of one query token per sequence over the blocks its table lists."""
    out = []
    for i, ctx in enumerate(context_lens.tolist()):
        blocks = tables[i].tolist()
        k, v = (torch.cat([c[:, b] for b in blocks], dim=1)[:, :ctx].transpose(0, 1) for c in (k_cache, v_cache))
        out.append(dense_causal_attention(q[i : i + 1], k, v, scale))
    return torch.cat(out)


@pytest.fixture(scope="module")
def cpu_kernel():
    """The kernel; only a box without a C++ compiler may skip it, a failed build fails."""
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the CPU decode kernel falls back to the torch path")
    kernel = cpu_kernels.load_cpu_kernels()
    assert kernel is not None, "the CPU decode kernel did not build (see the log)"
    return kernel


@settings(max_examples=40, deadline=None)
@given(
    contexts=st.lists(st.integers(0, 200), min_size=1, max_size=5),
    with_prefill=st.booleans(),
    heads=st.sampled_from([(9, 3), (8, 2), (4, 4), (5, 1), (16, 2), (12, 2), (6, 3), (2, 1)]),
    head_dim=st.sampled_from([64, 128, 48]),  # the AVX-512 sizes, and one for the portable loops
    block_size=st.sampled_from([1, 5, 16, 32]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_cpu_kernels_matches_dense(cpu_kernel, contexts, with_prefill, heads, head_dim, block_size, dtype, seed):
    # every group size the kernel tiles differently, block boundaries inside and across
    # its 16-key tiles, and decodes alone or beside a prefill chunk (the mixed-batch path)
    num_heads, num_kv_heads = heads
    seqs = [(1, cached) for cached in contexts] + ([(5, 20)] if with_prefill else [])
    out, ref = run_paged_attention(
        CpuBackend(),
        seqs,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=seed,
    )
    torch.testing.assert_close(out.float(), ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_kernels_reads_strided_rows_and_skips_padding(cpu_kernel, dtype):
    # q/k/v as the layers pass them: views of one fused projection; a padding row (slot -1,
    # context 0, as CUDA-graph padding has) stores nothing and attends to nothing
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, block_size, num_blocks = 9, 3, 64, 16, 8
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(3, heads, dim), k.view(3, kv_heads, dim), v.view(3, kv_heads, dim)
    k_cache = torch.randn(kv_heads, num_blocks, block_size, dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, dim, generator=gen).to(dtype)
    before = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([5 * block_size + 2, 1 * block_size + 0, -1])
    assert cpu_kernel.store_kv(k, v, k_cache, v_cache, slots)
    for i, slot in enumerate(slots[:2].tolist()):
        assert torch.equal(k_cache[:, slot // block_size, slot % block_size], k[i])
        assert torch.equal(v_cache[:, slot // block_size, slot % block_size], v[i])
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[:2]] = True
    assert torch.equal(k_cache.view(kv_heads, -1, dim)[:, ~written], before[0].view(kv_heads, -1, dim)[:, ~written])
    assert torch.equal(v_cache.view(kv_heads, -1, dim)[:, ~written], before[1].view(kv_heads, -1, dim)[:, ~written])

    # A prefill's keys come out of the rotary as a tensor of their own: other strides than the values'
    rotated = k.clone()
    assert rotated.stride() != v.stride()
    slots = torch.tensor([3 * block_size + 7, 2 * block_size + 1, 4 * block_size])
    assert cpu_kernel.store_kv(rotated, v, k_cache, v_cache, slots)
    for i, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[:, slot // block_size, slot % block_size], rotated[i])
        assert torch.equal(v_cache[:, slot // block_size, slot % block_size], v[i])

    tables = torch.tensor([[5, 0], [0, 1], [0, 0]], dtype=torch.int32)
    context_lens = torch.tensor([19, 1, 0], dtype=torch.int32)
    out = cpu_kernel.decode_attention(q, k_cache, v_cache, tables, context_lens, dim**-0.5)
    assert not q.is_contiguous() and out.shape == (3, heads, dim)
    ref = paged_decode_reference(q[:2], k_cache, v_cache, tables[:2], context_lens[:2], dim**-0.5)
    torch.testing.assert_close(out[:2].float(), ref, **TOLERANCE[dtype])
    assert not out[2].any()


def test_cpu_kernels_build_is_cached_and_falls_back(cpu_kernel, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ATOM_TRIO_CACHE", str(tmp_path))
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    built = cpu_kernels._build(compiler)
    assert built.parent == tmp_path / "cpu_kernels" and built.is_file()
    stamp = built.stat().st_mtime_ns
    assert cpu_kernels._build(compiler) == built and built.stat().st_mtime_ns == stamp  # loaded, not rebuilt

    # no working compiler: the backend keeps the torch path, with the same results
    monkeypatch.setenv("CXX", "false")
    cpu_kernels.load_cpu_kernels.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="atom_trio.ops"):
            assert cpu_kernels.load_cpu_kernels() is None
        assert "unavailable" in caplog.text
        out, ref = run_paged_attention(
            CpuBackend(), DECODE_STEP, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16,
            dtype=torch.float32, seed=1,
        )
        torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
    finally:
        cpu_kernels.load_cpu_kernels.cache_clear()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f is an x86 flag")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_kernels_portable_loops(cpu_kernel, dtype):
    # The loops a CPU without AVX-512 runs (this box compiles the intrinsics instead).
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    library = ctypes.CDLL(str(cpu_kernels._build(compiler, (*cpu_kernels._FLAGS, "-mno-avx512f"))))
    portable = cpu_kernels.CpuKernels(library)
    gen = torch.Generator().manual_seed(4)
    heads, kv_heads, dim, block_size = 9, 3, 64, 16
    k_cache = torch.randn(kv_heads, 12, block_size, dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, 12, block_size, dim, generator=gen).to(dtype)
    q = torch.randn(2, heads, dim, generator=gen).to(dtype)
    tables = torch.tensor([[3, 7, 1, 0], [11, 2, 5, 9]], dtype=torch.int32)
    context_lens = torch.tensor([37, 64], dtype=torch.int32)
    out = portable.decode_attention(q, k_cache, v_cache, tables, context_lens, dim**-0.5)
    ref = paged_decode_reference(q, k_cache, v_cache, tables, context_lens, dim**-0.5)
    torch.testing.assert_close(out.float(), ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_elementwise_kernels_round_as_torch_does(cpu_kernel, dtype):
    # the fused kernels against the torch reference's ops on the layers' layouts (q/k views of a
    # fused projection, rows of a merged gate/up output): equal but for the exp in SiLU and the
    # order of RMSNorm's sum of squares
    gen = torch.Generator().manual_seed(5)
    fused, plain = CpuBackend(), TorchRefBackend()
    x, residual = (torch.randn(33, 576, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + torch.randn(576, generator=gen)).to(dtype)
    normed, summed = fused.rms_norm(x, weight, 1e-5, residual)
    ref_normed, ref_summed = plain.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(summed, ref_summed)
    if dtype == torch.bfloat16:
        # torch sums the squares with the vector width it was dispatched to (8 lanes on AVX2, 16 on
        # AVX-512, four accumulators, a cascade), the kernel in its own order: the float32 scales can
        # differ in their last bit, which moves an output lying at a bfloat16 rounding boundary by one
        # ulp. No summation order matches torch's on every CPU, so: one ulp at most, and rarely.
        ulps = (normed.view(torch.int16).int() - ref_normed.view(torch.int16).int()).abs()
        assert ulps.max() <= 1 and (ulps > 0).sum() <= normed.numel() // 1000
    else:
        torch.testing.assert_close(normed, ref_normed, atol=0, rtol=1e-6)
    torch.testing.assert_close(fused.rms_norm(x, weight, 1e-5), plain.rms_norm(x, weight, 1e-5), **TOLERANCE[dtype])

    qkv = torch.randn(33, 15 * 64, generator=gen).to(dtype)
    q, k = qkv[:, : 9 * 64].view(33, 9, 64), qkv[:, 9 * 64 : 12 * 64].view(33, 3, 64)
    positions = torch.randint(0, 4096, (33,), generator=gen)
    cos_sin = torch.randn(4096, 64, generator=gen)
    for a, b in zip(fused.rotary_embedding(positions, q, k, cos_sin), plain.rotary_embedding(positions, q, k, cos_sin)):
        assert torch.equal(a, b)

    gate_up = (4 * torch.randn(33, 2 * 1536, generator=gen)).to(dtype)
    torch.testing.assert_close(fused.silu_and_mul(gate_up), plain.silu_and_mul(gate_up), **TOLERANCE[dtype])
