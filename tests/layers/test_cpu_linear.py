"""oneDNN weight packing for CPU linears (bfloat16 and float32) computes what ``F.linear`` computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atom_trio.config import EngineConfig
from atom_trio.core.plan import SeqChunk, StepPlan
from atom_trio.sampling_params import SamplingParams
from atom_trio.layers.linear import cpu_linear, pack_cpu_weight
from atom_trio.runner import ModelRunner

# bfloat16 packs only where the CPU computes bfloat16 natively; float32 wherever oneDNN is built in.
DTYPES = [
    pytest.param(
        dtype,
        marks=pytest.mark.skipif(
            pack_cpu_weight(torch.zeros(8, 8, dtype=dtype)) is None, reason=f"oneDNN has no {dtype} linear here"
        ),
    )
    for dtype in (torch.bfloat16, torch.float32)
]
TOLERANCES = {torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "fan_in", "fan_out", "bias"), [(1, 576, 1536, False), (37, 64, 192, True)])
def test_packed_linear_matches_f_linear(dtype, tokens, fan_in, fan_out, bias):
    torch.manual_seed(0)
    x = torch.randn(tokens, fan_in, dtype=dtype)
    w = torch.randn(fan_out, fan_in, dtype=dtype) / fan_in**0.5
    b = torch.randn(fan_out, dtype=dtype) if bias else None
    torch.testing.assert_close(cpu_linear(x, pack_cpu_weight(w), b), F.linear(x, w, b), **TOLERANCES[dtype])


def _greedy(runner: ModelRunner, steps: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    chunks = [
        SeqChunk(seq_id=i, token_ids=list(range(10 + 7 * i, 40 + 7 * i)), start_pos=0,
                 block_table=[4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3], prompt_len=30, sample=True,
                 sampling_params=params)
        for i in range(3)
    ]
    tokens = []
    for step in range(steps):
        result = runner.execute(StepPlan(step_id=step, chunks=chunks))
        tokens.append(result.token_ids)
        chunks = [c.next_decode(t) for c, t in zip(chunks, result.token_ids)]
    return tokens


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_runner_gives_the_unpacked_greedy_tokens(default_model_dir, monkeypatch, dtype):
    config = EngineConfig(model=str(default_model_dir), dtype=str(dtype).removeprefix("torch."), num_kv_blocks=16)
    packed = ModelRunner(config)
    assert any(getattr(m, "packed_weight", None) is not None for m in packed.model.modules())
    packed_tokens = _greedy(packed)
    packed.close()
    for module in ("atom_trio.layers.linear", "atom_trio.layers.embedding"):
        monkeypatch.setattr(f"{module}.pack_cpu_weight", lambda weight: None)
    unpacked = ModelRunner(config)
    assert all(getattr(m, "packed_weight", None) is None for m in unpacked.model.modules())
    assert _greedy(unpacked) == packed_tokens
    unpacked.close()
