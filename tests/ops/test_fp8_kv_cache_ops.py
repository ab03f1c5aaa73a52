"""The FP8 (e4m3) KV cache and latent cache on every backend.

A cache holds ``fp8(x / scale)`` with one float32 scale for a layer's keys and one for its
values (one for a latent cache). Checked here:

- the store writes exactly `quant_ref.quantize_fp8_static`'s bytes (saturating at +-448);
- attention over an FP8 cache equals attention over a full-precision cache holding the
  dequantized values (float32, tight): reading dequantizes and nothing else changes, also for
  chunks with nothing cached (they attend to their keys as the cache holds them, so a prefix-cache
  hit and a fresh prefill see the same values), sinks and windows;
- against attention on the unrounded keys and values, the error stays within the bound FP8
  rounding implies (derived in `_fp8_attention_bound`);
- the Triton kernels (store, rotary store, split-K decode, mixed prefill, sinks and windows, the
  MLA store and decode kernel) against the reference on the same FP8 cache, on a GPU or under
  Triton's interpreter in a subprocess, and that they read the scales at run time (tensors, so a
  CUDA graph replays with the values the layer holds).
"""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_interpreter import INTERPRET, assert_passes_under_the_interpreter

from atom_trio.ops import CpuBackend, TorchRefBackend
from atom_trio.ops.quant_ref import FP8_DTYPE, FP8_MAX, quantize_fp8_static

REF = TorchRefBackend()
BACKENDS = [REF, CpuBackend()]
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 16, 4
# (query_len, cached_len): decodes, a fresh prefill, chunks over cached context, runs of fresh prompts
MIXED = [(1, 9), (6, 0), (5, 7), (1, 0), (1, 14), (3, 1), (6, 0)]
DECODES = [(1, 9), (1, 0), (1, 30), (1, 5)]

E4M3_RELATIVE = 2.0**-4
"""Round-to-nearest error of a normal e4m3 value, relative: half a step of its 3 mantissa bits."""
E4M3_SUBNORMAL = 2.0**-10
"""Round-to-nearest error below e4m3's normal range (2**-6), absolute: half its step of 2**-9."""


def _scale(value: float, device="cpu") -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32, device=device)


def _step(seqs, *, dtype=torch.float32, seed=0, device="cpu"):
    """`test_triton_ops.make_step`'s random step (Triton's cache layout, random everywhere) on ``device``."""
    from test_triton_ops import make_step  # noqa: PLC0415 (its module needs triton)

    q, k, v, k_cache, v_cache, metadata = make_step(
        seqs, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=dtype,
        seed=seed,
    )
    tensors = ("cu_seqlens_q", "context_lens", "block_tables", "slot_mapping")
    metadata = attrs.evolve(metadata, **{name: getattr(metadata, name).to(device) for name in tensors})
    return (*(x.to(device) for x in (q, k, v, k_cache, v_cache)), metadata)


def _ref_layout(cache: torch.Tensor) -> torch.Tensor:
    """A Triton-layout cache ``[blocks, block_size, kv_heads, dim]`` in torch_ref's head-major layout."""
    return cache.permute(2, 0, 1, 3).contiguous()


def _fp8_caches(k_cache, v_cache, k_scale, v_scale):
    """Random FP8 caches (Triton layout) from random full-precision ones, and their dequantized values."""
    fp8 = quantize_fp8_static(k_cache, k_scale), quantize_fp8_static(v_cache, v_scale)
    return fp8, (fp8[0].float() * k_scale, fp8[1].float() * v_scale)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@settings(max_examples=15, deadline=None)
@given(
    scale=st.floats(2.0**-8, 4.0),
    magnitude=st.floats(2.0**-12, 2.0**12),
    seed=st.integers(0, 2**16),
)
def test_store_writes_the_rounded_scaled_values(backend, scale, magnitude, seed):
    """Keys and values land as ``fp8(x / scale)``, saturated at +-448, however large or small."""
    gen = torch.Generator().manual_seed(seed)
    key, value = (torch.randn(5, NUM_KV_HEADS, HEAD_DIM, generator=gen) * magnitude for _ in range(2))
    k_cache = torch.zeros(backend.kv_cache_shape(3, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), dtype=FP8_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([11, 0, 5, 6, 2])
    k_scale, v_scale = _scale(scale), _scale(scale * 3)
    backend.store_kv(key, value, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    for x, cache, x_scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        stored = cache.view(NUM_KV_HEADS, -1, HEAD_DIM)[:, slots].transpose(0, 1)
        expected = quantize_fp8_static(x, x_scale)
        assert torch.equal(stored.view(torch.uint8), expected.view(torch.uint8))
        assert stored.float().abs().max() <= FP8_MAX
    latent = torch.randn(5, HEAD_DIM, generator=gen) * magnitude
    latent_cache = torch.zeros(backend.latent_cache_shape(3, BLOCK_SIZE, HEAD_DIM), dtype=FP8_DTYPE)
    backend.store_latent(latent, latent_cache, slots, cache_scale=k_scale)
    stored = latent_cache.view(-1, HEAD_DIM)[slots]
    assert torch.equal(stored.view(torch.uint8), quantize_fp8_static(latent, k_scale).view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize(
    ("seqs", "window", "with_sinks"),
    [(MIXED, None, False), (DECODES, None, False), (MIXED, 5, True), ([(1, 6)], None, False)],
    ids=["mixed", "decodes", "mixed-window-sinks", "lone-decode"],
)
def test_attention_over_fp8_is_attention_over_the_dequantized_cache(backend, seqs, window, with_sinks):
    """float32 throughout: the only difference FP8 makes is the rounding of what is stored."""
    q, k, v, k_cache, v_cache, metadata = _step(seqs, seed=1)
    k_scale, v_scale = _scale(0.03), _scale(0.011)
    (k8, v8), (k_deq, v_deq) = _fp8_caches(k_cache, v_cache, k_scale, v_scale)
    k8, v8, k_deq, v_deq = (_ref_layout(c) for c in (k8, v8, k_deq, v_deq))
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    backend.store_kv(k, v, k8, v8, metadata.slot_mapping, **scales)
    # The full-precision cache holds what the FP8 one dequantizes to, this step's tokens too.
    k_as_cached, v_as_cached = (quantize_fp8_static(x, s).float() * s for x, s in ((k, k_scale), (v, v_scale)))
    backend.store_kv(k_as_cached, v_as_cached, k_deq, v_deq, metadata.slot_mapping)
    sinks = torch.randn(NUM_HEADS, generator=torch.Generator().manual_seed(3)) if with_sinks else None
    options = dict(sinks=sinks, sliding_window=window)
    plan = backend.plan_attention(metadata)
    out = backend.paged_attention(q, k, v, k8, v8, plan, 0.25, **options, **scales)
    expected = backend.paged_attention(q, k_as_cached, v_as_cached, k_deq, v_deq, plan, 0.25, **options)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _fp8_attention_bound(q, k, v, k_scale, v_scale, softmax_scale):
    """Per query and head, how far attention over FP8-rounded ``k``/``v`` can be from attention over them exactly.

    A stored key is ``k + dk`` with ``|dk| <= 2**-4 |k| + 2**-10 k_scale`` (round to nearest: half a step,
    relative above e4m3's normal range, absolute in it), a value likewise. So a score moves by at most
    ``e = softmax_scale * sum_i |q_i| |dk_i|``, over the context ``eps = max_j e_j``; every probability then
    moves by a factor within ``exp(+-2 eps)``, so ``sum_j |p'_j - p_j| <= exp(2 eps) - 1``, and
    ``|o' - o| <= (exp(2 eps) - 1) max_j |v_j| + max_j |dv_j|`` (plus float32 arithmetic, far below).
    ``q`` ``[heads, dim]``, ``k``/``v`` ``[ctx, kv_heads, dim]``; returns ``[heads, 1]``.
    """
    group = q.shape[0] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1).transpose(0, 1) for x in (k, v))  # [heads, ctx, dim]
    dk = E4M3_RELATIVE * k.abs() + E4M3_SUBNORMAL * k_scale
    eps = (softmax_scale * (q.abs()[:, None, :] * dk).sum(-1)).amax(-1, keepdim=True)
    dv = E4M3_RELATIVE * v.abs() + E4M3_SUBNORMAL * v_scale
    return torch.expm1(2 * eps) * v.abs().amax(dim=(1, 2))[:, None] + dv.amax(dim=(1, 2))[:, None]


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.02, 0.05)], ids=["unit-scales", "small-scales"])
def test_fp8_decode_is_within_fp8_rounding_of_full_precision(scales):
    """Decode tokens over FP8 against the same over the unrounded keys and values, bound by `_fp8_attention_bound`."""
    q, _, _, k_cache, v_cache, metadata = _step(DECODES, seed=4)
    k_scale, v_scale = _scale(scales[0]), _scale(scales[1])
    (k8, v8), _ = _fp8_caches(k_cache, v_cache, k_scale, v_scale)
    plan = REF.plan_attention(metadata)
    out = REF.paged_attention(q, q, q, _ref_layout(k8), _ref_layout(v8), plan, 0.25, k_scale=k_scale, v_scale=v_scale)
    exact = REF.paged_attention(q, q, q, _ref_layout(k_cache), _ref_layout(v_cache), plan, 0.25)
    for i, ctx in enumerate(metadata.context_lens_host):
        blocks = metadata.block_tables[i, : -(-ctx // BLOCK_SIZE)].long()
        k, v = (c[blocks].flatten(0, 1)[:ctx] for c in (k_cache, v_cache))
        bound = _fp8_attention_bound(q[i], k, v, scales[0], scales[1], 0.25)
        error = (out[i] - exact[i]).abs()
        assert (error <= bound).all(), (error.amax(-1), bound.squeeze(-1))
    assert (out - exact).abs().max() > 0  # the cache did round


def _latent_step(seqs, *, latent=32, rope=16, nope=16, value=24, dtype=torch.float32, seed=0, device="cpu"):
    """`test_triton_mla.latent_step`'s random step (query, latent, cache, kv_b, metadata) on ``device``."""
    import test_triton_mla  # noqa: PLC0415 (its module needs triton)

    assert (test_triton_mla.LATENT, test_triton_mla.ROPE, test_triton_mla.NOPE, test_triton_mla.V) == (
        latent, rope, nope, value
    )
    query, lat, cache, kv_b, metadata = test_triton_mla.latent_step(
        seqs, heads=NUM_HEADS, block_size=BLOCK_SIZE, dtype=dtype, seed=seed
    )
    tensors = ("cu_seqlens_q", "context_lens", "block_tables", "slot_mapping")
    metadata = attrs.evolve(metadata, **{name: getattr(metadata, name).to(device) for name in tensors})
    return (*(x.to(device) for x in (query, lat, cache, kv_b)), metadata)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("seqs", [MIXED, DECODES], ids=["mixed", "decodes"])
def test_latent_attention_over_fp8_is_latent_attention_over_the_dequantized_cache(backend, seqs):
    """The expanded prefill path and the absorbed decode path both read the FP8 latents as dequantized."""
    query, latent, cache, kv_b, metadata = _latent_step(seqs, seed=2)
    scale = _scale(0.02)
    cache8 = quantize_fp8_static(cache, scale)
    cache_deq = cache8.float() * scale
    backend.store_latent(latent, cache8, metadata.slot_mapping, cache_scale=scale)
    latent_as_cached = quantize_fp8_static(latent, scale).float() * scale
    backend.store_latent(latent_as_cached, cache_deq, metadata.slot_mapping)
    plan = backend.plan_attention(metadata)
    out = backend.mla_attention(query, latent, cache8, kv_b, plan, 0.3, cache_scale=scale)
    expected = backend.mla_attention(query, latent_as_cached, cache_deq, kv_b, plan, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_latent_decode_over_fp8_is_within_fp8_rounding_of_full_precision():
    """`mla_decode` in the latent space: the same bound, with every head reading the one cached vector."""
    query, _, cache, _, metadata = _latent_step(DECODES, seed=6)
    latent_dim = 32
    q = torch.randn(len(DECODES), NUM_HEADS, cache.shape[-1], generator=torch.Generator().manual_seed(1))
    scale = 0.05
    cache8 = quantize_fp8_static(cache, _scale(scale))
    plan = REF.plan_attention(metadata)
    out = REF.mla_decode(q, cache8, plan, 0.2, latent_dim, cache_scale=_scale(scale))
    exact = REF.mla_decode(q, cache, plan, 0.2, latent_dim)
    for i, ctx in enumerate(metadata.context_lens_host):
        blocks = metadata.block_tables[i, : -(-ctx // BLOCK_SIZE)].long()
        vectors = cache[blocks].flatten(0, 1)[:ctx]
        # Keys are whole vectors, values their latent part: one "KV head" both read.
        k, v = vectors[:, None, :], vectors[:, None, :latent_dim]
        bound = _fp8_attention_bound(q[i], k, v, scale, scale, 0.2)
        assert ((out[i] - exact[i]).abs() <= bound).all()
    assert (out - exact).abs().max() > 0


# -- the Triton kernels, against the reference on the same FP8 cache -------------------------------------------


@pytest.mark.skipif(INTERPRET or torch.cuda.is_available(), reason="starts the interpreter run (or runs on the GPU)")
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    assert_passes_under_the_interpreter(__file__, "triton_fp8")


triton_only = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRET), reason="needs a GPU or Triton's interpreter"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's bfloat16 dot reads raw bits: float16 there, bfloat16 on a GPU.
DTYPE = torch.float16 if INTERPRET else torch.bfloat16
TOLERANCE = dict(atol=4e-3, rtol=4e-3) if INTERPRET else dict(atol=2e-2, rtol=2e-2)


@triton_only
def test_triton_fp8_store_and_rotary_store_write_the_references_bytes():
    from atom_trio.ops.triton import TritonBackend  # noqa: PLC0415

    backend = TritonBackend(DEVICE)
    q, k, v, k_cache, v_cache, metadata = _step(MIXED, dtype=DTYPE, seed=7, device=DEVICE)
    k_scale, v_scale = _scale(0.02, DEVICE), _scale(0.5, DEVICE)
    k8, v8 = (torch.zeros_like(c, dtype=FP8_DTYPE) for c in (k_cache, v_cache))
    backend.store_kv(k, v, k8, v8, metadata.slot_mapping, k_scale=k_scale, v_scale=v_scale)
    ref_k, ref_v = (torch.zeros_like(_ref_layout(c), dtype=FP8_DTYPE) for c in (k_cache, v_cache))
    REF.store_kv(k, v, ref_k, ref_v, metadata.slot_mapping, k_scale=k_scale, v_scale=v_scale)
    for ours, theirs in ((k8, ref_k), (v8, ref_v)):
        assert torch.equal(_ref_layout(ours).view(torch.uint8), theirs.view(torch.uint8))

    freqs = torch.outer(torch.arange(64, device=DEVICE).float(), torch.rand(HEAD_DIM // 2, device=DEVICE))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.arange(q.shape[0], device=DEVICE)
    rotated = backend.rotary_store_kv(
        positions, q, k, v, cos_sin, k8, v8, metadata.slot_mapping, k_scale=k_scale, v_scale=v_scale
    )
    REF.store_kv(rotated[1], v, ref_k, ref_v, metadata.slot_mapping, k_scale=k_scale, v_scale=v_scale)
    # The kernel rounds its float32 rotation straight to FP8, the reference from the rotated key's dtype:
    # at most one e4m3 step apart where the two roundings straddle a tie.
    diff = (_ref_layout(k8).float() - ref_k.float()).abs()
    assert (diff <= 2 * E4M3_RELATIVE * ref_k.float().abs() + 2 * 2.0**-9).all()
    assert torch.equal(_ref_layout(v8).view(torch.uint8), ref_v.view(torch.uint8))


@triton_only
@pytest.mark.parametrize(
    ("seqs", "num_splits", "window", "with_sinks"),
    [(MIXED, None, None, False), (DECODES, 4, None, False), (DECODES, 3, 5, True), (MIXED, 2, 6, True)],
    ids=["mixed", "decodes-4-splits", "decodes-3-splits-window-sinks", "mixed-2-splits-window-sinks"],
)
def test_triton_fp8_attention_matches_the_reference(seqs, num_splits, window, with_sinks):
    from atom_trio.ops.triton import TritonBackend  # noqa: PLC0415

    backend = TritonBackend(DEVICE)
    q, k, v, k_cache, v_cache, metadata = _step(seqs, dtype=DTYPE, seed=8, device=DEVICE)
    k_scale, v_scale = _scale(0.03, DEVICE), _scale(0.008, DEVICE)
    (k8, v8), _ = _fp8_caches(k_cache.float(), v_cache.float(), k_scale, v_scale)
    ref_k, ref_v = _ref_layout(k8), _ref_layout(v8)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    sinks = torch.randn(NUM_HEADS, device=DEVICE).to(DTYPE) if with_sinks else None
    backend.store_kv(k, v, k8, v8, metadata.slot_mapping, **scales)
    REF.store_kv(k, v, ref_k, ref_v, metadata.slot_mapping, **scales)
    options = dict(sinks=sinks, sliding_window=window, **scales)
    expected = REF.paged_attention(q, k, v, ref_k, ref_v, REF.plan_attention(metadata), 0.25, **options)
    plan = backend.plan_attention(metadata, num_splits=num_splits)
    out = backend.paged_attention(q, k, v, k8, v8, plan, 0.25, **options)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE)
    # The scales are read where they live when the kernel runs: a new value is a new result, no new launch.
    v_scale.mul_(2)
    torch.testing.assert_close(backend.paged_attention(q, k, v, k8, v8, plan, 0.25, **options), out * 2, **TOLERANCE)


@triton_only
@pytest.mark.parametrize(("seqs", "num_splits"), [(MIXED, None), (DECODES, 3)], ids=["mixed", "decodes-3-splits"])
def test_triton_fp8_latent_attention_matches_the_reference(seqs, num_splits):
    from atom_trio.ops.triton import TritonBackend  # noqa: PLC0415

    backend = TritonBackend(DEVICE)
    query, latent, cache, kv_b, metadata = _latent_step(seqs, dtype=DTYPE, seed=9, device=DEVICE)
    scale = _scale(0.015, DEVICE)
    cache8 = quantize_fp8_static(cache.float(), scale)
    ref_cache = cache8.clone()
    backend.store_latent(latent, cache8, metadata.slot_mapping, cache_scale=scale)
    REF.store_latent(latent, ref_cache, metadata.slot_mapping, cache_scale=scale)
    assert torch.equal(cache8.view(torch.uint8), ref_cache.view(torch.uint8))
    plan = backend.plan_attention(metadata, num_splits=num_splits)
    out = backend.mla_attention(query, latent, cache8, kv_b, plan, 0.3, cache_scale=scale)
    expected = REF.mla_attention(query, latent, ref_cache, kv_b, REF.plan_attention(metadata), 0.3, cache_scale=scale)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE)
    if num_splits is not None:  # the decode kernel alone
        q = torch.randn(len(seqs), NUM_HEADS, cache.shape[-1], device=DEVICE).to(DTYPE)
        decoded = backend.mla_decode(q, cache8, plan, 0.3, 32, cache_scale=scale)
        reference = REF.mla_decode(q, ref_cache, REF.plan_attention(metadata), 0.3, 32, cache_scale=scale)
        torch.testing.assert_close(decoded.float(), reference.float(), **TOLERANCE)
