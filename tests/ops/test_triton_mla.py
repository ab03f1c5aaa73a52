"""The Triton backend's latent attention (store, decode kernel, mixed batches) against the torch reference.

Runs on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``) at tiny
shapes (a few heads, latent 32 + rope 16), and on a GPU when there is one;
skipped otherwise. The whole cache is random, so a kernel that reads a slot
outside a sequence's context changes the result.
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
from atom_trio.ops.triton import TritonBackend, mla_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LATENT, ROPE, NOPE, V = 32, 16, 16, 24
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3)}
REF = TorchRefBackend()


@pytest.fixture(scope="module")
def backend():
    return TritonBackend(DEVICE)


def latent_step(seqs, *, heads, block_size, dtype, seed, spare_blocks=2):
    """A random step over a random latent cache: ``seqs`` = [(query_len, cached_len), ...] on shuffled blocks.

    Returns (query ``[tokens, heads, nope + rope]``, latent ``[tokens, latent + rope]``, cache, kv_b, metadata).
    """
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    rng = random.Random(seed)
    blocks_needed = [max(1, -(-(n + cached) // block_size)) for n, cached in seqs]
    num_blocks = sum(blocks_needed) + spare_blocks
    physical = list(range(num_blocks))
    rng.shuffle(physical)
    tables = [[physical.pop() for _ in range(count)] for count in blocks_needed]

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=DEVICE) * std).to(dtype)

    query_lens = [n for n, _ in seqs]
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    metadata = AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        context_lens=torch.tensor([n + c for n, c in seqs], dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor(
            [t + [0] * (max(blocks_needed) - len(t)) for t in tables], dtype=torch.int32, device=DEVICE
        ),
        slot_mapping=torch.tensor(
            [t[p // block_size] * block_size + p % block_size for (n, c), t in zip(seqs, tables) for p in range(c, c + n)],
            dtype=torch.int64,
            device=DEVICE,
        ),
        query_lens_host=query_lens,
        context_lens_host=[n + c for n, c in seqs],
        block_size=block_size,
    )
    tokens = cu[-1]
    return (
        rand(tokens, heads, NOPE + ROPE),
        rand(tokens, LATENT + ROPE),
        rand(num_blocks, block_size, LATENT + ROPE),
        rand(heads, NOPE + V, LATENT, std=LATENT**-0.5),
        metadata,
    )


def check_step(backend, seqs, *, heads, block_size, dtype=torch.float32, seed=0, num_splits=None):
    query, latent, cache, kv_b, metadata = latent_step(seqs, heads=heads, block_size=block_size, dtype=dtype, seed=seed)
    scale = (NOPE + ROPE) ** -0.5
    ref_cache = cache.clone()
    REF.store_latent(latent, ref_cache, metadata.slot_mapping)
    expected = REF.mla_attention(query, latent, ref_cache, kv_b, REF.plan_attention(metadata), scale)

    backend.store_latent(latent, cache, metadata.slot_mapping)
    assert torch.equal(cache, ref_cache)
    out = backend.mla_attention(query, latent, cache, kv_b, backend.plan_attention(metadata, num_splits=num_splits), scale)
    assert out.shape == (query.shape[0], heads, V) and out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


# decodes at contexts on and off block boundaries, a fresh prefill, prefill chunks over cached context
# (a prefix-cache hit, a later chunk of a chunked prefill), a one-token prompt
MIXED = [(1, 16), (5, 0), (7, 23), (1, 44), (1, 0), (4, 9), (1, 31)]


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_mixed_batch(backend, block_size):
    check_step(backend, MIXED, heads=4, block_size=block_size)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_decodes_only(backend, num_splits):
    """The CUDA-graph shape: every sequence decodes one token (forced splits: some split ranges are empty)."""
    check_step(backend, [(1, 70), (1, 5), (1, 33)], heads=4, block_size=16, num_splits=num_splits)


def test_heads_beyond_one_tile_in_half_precision(backend):
    """More heads than a program's tile, not a multiple of it: the last tile's spare rows are masked."""
    check_step(backend, [(1, 40), (3, 12), (1, 17)], heads=20, block_size=8, dtype=torch.float16, num_splits=2)


@settings(max_examples=8, deadline=None)
@given(
    seqs=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 40)), min_size=1, max_size=4),
    heads=st.sampled_from([1, 3, 4]),
    block_size=st.sampled_from([1, 4, 16]),
    num_splits=st.sampled_from([None, 2, 5]),
    seed=st.integers(0, 2**16),
)
def test_any_step(seqs, heads, block_size, num_splits, seed):
    check_step(TritonBackend(DEVICE), seqs, heads=heads, block_size=block_size, seed=seed, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [None, 4])
def test_decode_kernel_against_the_reference(backend, num_splits):
    """`mla_decode` alone, queries already in the latent space; a context-0 row (graph padding) gives zeros."""
    seqs = [(1, 50), (1, 9), (1, 7), (1, 16)]
    _, _, cache, _, metadata = latent_step(seqs, heads=4, block_size=16, dtype=torch.float32, seed=3)
    metadata.context_lens[1] = 0
    query = torch.randn(len(seqs), 4, LATENT + ROPE, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(4))
    scale = 0.2
    out = backend.mla_decode(query, cache, backend.plan_attention(metadata, num_splits=num_splits), scale, LATENT)
    assert out.shape == (len(seqs), 4, LATENT)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    expected = REF.mla_decode(query, cache, REF.plan_attention(metadata), scale, LATENT)  # row 1: NaN (no key)
    live = [0, 2, 3]
    torch.testing.assert_close(out[live], expected[live], **TOLERANCE[torch.float32])


def test_strided_queries_and_a_wide_split(backend):
    """The kernel reads queries through their strides (the absorbed path hands it views) and splits past the context."""
    gen = torch.Generator(DEVICE).manual_seed(5)
    cache = torch.randn(6, 4, LATENT + ROPE, device=DEVICE, generator=gen)
    tables = torch.tensor([[5, 1, 3, 0, 2, 4]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([21], dtype=torch.int32, device=DEVICE)
    query = torch.randn(3, 1, LATENT + ROPE, device=DEVICE, generator=gen).transpose(0, 1)  # [1 seq, 3 heads, ...]
    out = mla_decode(
        query[..., :LATENT], query[..., LATENT:], cache, tables, lens, max_context_len=21, scale=0.3, num_sms=1,
        num_splits=8,
    )
    context = cache[tables[0].long()].reshape(-1, LATENT + ROPE)[:21]
    expected = torch.softmax(query[0] @ context.T * 0.3, dim=-1) @ context[:, :LATENT]
    torch.testing.assert_close(out[0], expected, **TOLERANCE[torch.float32])


def test_store_skips_negative_slots(backend):
    """A CUDA graph's padding rows carry slot -1 and must write nothing."""
    cache = torch.zeros(3, 4, LATENT + ROPE, device=DEVICE)
    latent = torch.randn(3, LATENT + ROPE, device=DEVICE)
    backend.store_latent(latent, cache, torch.tensor([5, -1, 0], dtype=torch.int64, device=DEVICE))
    flat = cache.view(-1, LATENT + ROPE)
    assert torch.equal(flat[5], latent[0]) and torch.equal(flat[0], latent[2])
    assert flat.abs().sum(-1).nonzero().flatten().tolist() == [0, 5]
