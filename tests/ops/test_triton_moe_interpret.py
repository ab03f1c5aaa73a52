"""The fused-MoE Triton kernels on the CPU, under Triton's interpreter, against the reference on tiny shapes.

Triton picks the interpreter when a kernel is defined (``TRITON_INTERPRET=1``
at import), so the cases run in a subprocess that sets it and leaves the rest
of the suite's Triton kernels alone: `test_the_kernels_under_the_interpreter`
starts it, and the cases themselves skip anywhere else. The interpreter runs
float32 and float16 (its bfloat16 ``tl.dot`` reads the raw bits as integers);
bf16 at real shapes is `tests/gpu/test_triton_moe.py`'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from atom_trio.ops import TorchRefBackend  # noqa: E402
from atom_trio.ops.triton import moe  # noqa: E402
from atom_trio.ops.triton.moe import MoeTileConfig, fused_experts, moe_align_block_size  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in test_the_kernels_under_the_interpreter's subprocess")
REFERENCE = TorchRefBackend()
# Small tiles, so that tiny shapes still span several row blocks, column tiles and K steps.
SMALL_TILES = [
    MoeTileConfig(block_m=16, block_n=16, block_k=16, group_m=1, num_warps=4, num_stages=1),
    MoeTileConfig(block_m=32, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=1),
]


@pytest.mark.skipif(INTERPRET, reason="starts the interpreter run")
def test_the_kernels_under_the_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not under_the_interpreter"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-6000:] + result.stderr[-2000:]


def _experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=generator) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=generator) / inter**0.5
    return w13.to(dtype), w2.to(dtype)


def _routing(tokens: int, num_experts: int, top_k: int, seed: int, *, skew: bool = False):
    """Distinct experts per token and positive float32 weights; ``skew`` sends every token to experts 0..k-1."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=generator)
    if skew:
        scores[:, :top_k] += 1
    ids = scores.argsort(dim=1, descending=True)[:, :top_k].to(torch.int32)
    return torch.rand(tokens, top_k, generator=generator) + 0.05, ids


@interpreted
@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 40),
    num_experts=st.integers(1, 12),
    block_m=st.sampled_from([16, 32]),
    data=st.data(),
)
def test_align_lists_each_held_entry_once_in_its_experts_padded_blocks(tokens, num_experts, block_m, data):
    top_k = data.draw(st.integers(1, min(num_experts, 4)), label="top_k")
    held = data.draw(st.integers(1, num_experts), label="experts held here")
    offset = data.draw(st.integers(0, num_experts - held), label="expert_offset")
    _, ids = _routing(tokens, num_experts, top_k, seed=data.draw(st.integers(0, 2**16), label="seed"))
    aligned = moe_align_block_size(ids, block_m, expert_offset=offset, num_experts=held)

    local = ids.reshape(-1).long() - offset
    counts = torch.bincount(local[(local >= 0) & (local < held)], minlength=held)
    padded = (counts + block_m - 1) // block_m * block_m
    total = int(padded.sum())
    assert aligned.num_padded.tolist() == [total]
    assert aligned.sorted_ids.numel() == aligned.max_blocks * block_m >= total
    sorted_ids = aligned.sorted_ids[:total].long()
    expert_of_row = aligned.expert_ids[: total // block_m].long().repeat_interleave(block_m)
    assert torch.equal(expert_of_row, torch.arange(held).repeat_interleave(padded))  # ascending, padded runs
    assert (aligned.expert_ids[total // block_m :] == -1).all()
    is_entry = sorted_ids < tokens * top_k
    assert torch.equal(sorted_ids[is_entry].sort().values, torch.nonzero((local >= 0) & (local < held)).flatten())
    assert (sorted_ids[~is_entry] == tokens * top_k).all()
    assert torch.equal(local[sorted_ids[is_entry]], expert_of_row[is_entry])


@interpreted
@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(1, 40),
    num_experts=st.integers(1, 10),
    hidden=st.sampled_from([16, 40, 64]),
    inter=st.sampled_from([16, 24, 48]),
    tiles=st.sampled_from(SMALL_TILES),
    skew=st.booleans(),
    data=st.data(),
)
def test_fused_experts_match_the_reference_in_float32(tokens, num_experts, hidden, inter, tiles, skew, data):
    top_k = data.draw(st.integers(1, min(num_experts, 4)), label="top_k")
    held = data.draw(st.integers(1, num_experts), label="experts held here")
    offset = data.draw(st.integers(0, num_experts - held), label="expert_offset")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    w13, w2 = _experts(held, hidden, inter, torch.float32, seed)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1))
    weights, ids = _routing(tokens, num_experts, top_k, seed + 2, skew=skew)
    got = fused_experts(x, w13, w2, weights, ids, expert_offset=offset, config=tiles)
    expected = REFERENCE.fused_experts(x, w13, w2, weights, ids, expert_offset=offset)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    off_rank = ((ids < offset) | (ids >= offset + held)).all(dim=1)
    assert not got[off_rank].any()  # every choice on another rank: exact zeros


@interpreted
def test_fused_experts_in_float16_with_the_default_tiles():
    w13, w2 = _experts(6, 64, 48, torch.float16, seed=3)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(4)).half()
    weights, ids = _routing(9, 6, 2, seed=5)
    got = fused_experts(x, w13, w2, weights, ids)
    expected = REFERENCE.fused_experts(x.float(), w13.float(), w2.float(), weights, ids)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=5e-3, atol=5e-3)


@interpreted
def test_experts_no_token_chose_are_never_read():
    w13, w2 = _experts(8, 32, 16, torch.float32, seed=6)
    x = torch.randn(6, 32)
    weights, ids = _routing(6, 4, 2, seed=7)  # experts 0..3 only
    expected = REFERENCE.fused_experts(x, w13[:4], w2[:4], weights, ids)
    w13[4:], w2[4:] = float("nan"), float("nan")  # reading one would poison the tile it landed in
    got = fused_experts(x, w13, w2, weights, ids, config=SMALL_TILES[0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@interpreted
def test_a_token_in_a_batch_gets_what_it_gets_alone():
    w13, w2 = _experts(8, 32, 16, torch.float32, seed=8)
    x = torch.randn(12, 32)
    weights, ids = _routing(12, 8, 2, seed=9)
    tiles = SMALL_TILES[0]  # fixed: another tile size would sum in another order
    batched = fused_experts(x, w13, w2, weights, ids, config=tiles)
    alone = [fused_experts(x[t : t + 1], w13, w2, weights[t : t + 1], ids[t : t + 1], config=tiles) for t in range(12)]
    alone = torch.cat(alone)
    torch.testing.assert_close(batched, alone, rtol=1e-6, atol=1e-6)


def test_tiles_come_from_the_nearest_batch_of_the_tuned_table(tmp_path, monkeypatch):
    table = {"1": [16, 32, 128, 1, 4, 4], "64": [32, 64, 64, 8, 4, 3], "512": [64, 128, 64, 8, 8, 3]}
    fields = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
    name = moe.config_file_name(16, 96, "Some GPU 80GB")
    assert name == "E=16,N=96,device_name=Some_GPU_80GB.json"
    (tmp_path / name).write_text(json.dumps({b: dict(zip(fields, v)) for b, v in table.items()}))
    monkeypatch.setattr(moe, "CONFIG_DIR", tmp_path)
    moe.tuned_configs.cache_clear()
    try:
        for tokens, key in [(1, "1"), (20, "1"), (40, "64"), (288, "64"), (289, "512"), (4096, "512")]:
            assert moe.tile_config(16, 96, 2, tokens, "Some GPU 80GB") == MoeTileConfig(*table[key])
        assert moe.tile_config(16, 97, 2, 1, "Some GPU 80GB") == moe.default_tile_config(16, 2, 1)
    finally:
        moe.tuned_configs.cache_clear()


@pytest.mark.parametrize("path", sorted(moe.CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_stored_table_loads_with_tiles_the_kernels_take(path):
    entries = json.loads(path.read_text())
    assert entries and all(int(batch) > 0 for batch in entries)
    for tiles in entries.values():
        config = MoeTileConfig(**tiles)
        for size in (config.block_m, config.block_n, config.block_k):
            assert size >= 16 and size & (size - 1) == 0  # tl.dot's minimum, and Triton's power-of-two tiles
        assert config.group_m >= 1 and config.num_warps in (1, 2, 4, 8, 16) and config.num_stages >= 1
