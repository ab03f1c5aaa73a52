"""Quantized layers split over two tensor-parallel ranks compute what one rank computes.

Each rank's model is built and loaded from the quantized checkpoint as a worker
builds it (no collectives run: each linear layer is checked alone), so block
scales, group scales, zero points and g_idx must shard with their weights.
Splits that would cut a block or a group are refused before any weight is read.
"""

from __future__ import annotations

import pytest
import torch

from atom_trio.config import EngineConfig
from atom_trio.distributed import TensorParallelGroup
from atom_trio.engine import LLM
from atom_trio.errors import ModelLoadError
from atom_trio.layers.linear import LinearBase
from atom_trio.layers.quantization.base import shard_sizes
from atom_trio.loader.resolve import resolve_model
from atom_trio.ops import get_backend
from atom_trio.runner import startup
from atom_trio.sampling_params import SamplingParams
from atom_trio.testing.quantize import write_quantized

CPU = torch.device("cpu")


def build(model_dir, rank: int, size: int, backend: str):
    resolved = resolve_model(EngineConfig(model=str(model_dir), dtype="float32"))
    group = TensorParallelGroup(rank=rank, size=size)
    model = startup.build_model(
        resolved, CPU, get_backend(backend, CPU), level=0, tp_group=group, expert_parallel=False
    )
    startup.load_weights(model, resolved, seed=0, device=CPU, level=0, progress=False)
    return model


def linear_layers(model) -> dict[str, LinearBase]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LinearBase)}


@pytest.mark.parametrize(
    ("fmt", "backend"),
    [
        *((fmt, "cpu") for fmt in ("fp8-block", "gptq-sym", "awq", "ct-w4a16-asym", "ct-int8")),
        # On the quantized path: per-token INT8 activations of a rank's input slice differ from the whole row's
        # by design; 4-bit weights and FP8 activation groups of 32 columns do not depend on the split.
        *((fmt, "torch") for fmt in ("fp8-block", "gptq-sym", "awq", "ct-w4a16-asym")),
    ],
)
def test_two_ranks_compute_what_one_does(quantized_dirs, fmt, backend):
    model_dir, _, _ = quantized_dirs(fmt)
    whole = linear_layers(build(model_dir, 0, 1, backend))
    ranks = [linear_layers(build(model_dir, rank, 2, backend)) for rank in (0, 1)]
    generator = torch.Generator().manual_seed(0)
    for name, layer in whole.items():
        x = torch.randn(3, layer.input_size, generator=generator)
        with torch.no_grad():
            want = layer._linear(x, layer.bias)
            if layer.input_is_split:
                parts = [r[name]._linear(x.chunk(2, dim=1)[i], layer.bias if i == 0 else None) for i, r in enumerate(ranks)]
                got = parts[0] + parts[1]
            else:
                outputs = [r[name]._linear(x, r[name].bias) for r in ranks]
                if layer.silu_and_mul:  # gate/up: each rank returns its slice of silu(gate) * up
                    got = torch.cat(outputs, dim=1)
                else:  # each rank's [q | k | v] (or its one slice): stack shard by shard
                    pieces = [out.split(shard_sizes(r[name]), dim=1) for out, r in zip(outputs, ranks, strict=True)]
                    got = torch.cat([torch.cat(shard, dim=1) for shard in zip(*pieces, strict=True)], dim=1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{fmt} {name}")


@pytest.mark.parametrize(
    ("fmt", "options", "message"),
    [
        ("fp8", {"block_size": (48, 48)}, "splits the 64 input features of a layer into 32, which cuts its FP8 blocks"),
        ("gptq", {"group_size": 64}, "splits a layer's 64 input features into 32, which cuts its 4-bit groups of 64"),
        ("gptq", {"group_size": 16, "desc_act": True}, "desc_act .act-order. with tensor_parallel_size 2"),
    ],
)
def test_a_split_that_cuts_a_block_or_group_is_refused(tiny_llama_dir, tmp_path, fmt, options, message):
    write_quantized(tiny_llama_dir, tmp_path / fmt, fmt, **options)
    with pytest.raises(ModelLoadError, match=message):
        resolved = resolve_model(EngineConfig(model=str(tmp_path / fmt), dtype="float32"))
        startup.build_model(
            resolved, CPU, get_backend("cpu", CPU), level=0, tp_group=TensorParallelGroup(rank=0, size=2),
            expert_parallel=False,
        )


def test_the_engine_at_tensor_parallel_size_2_gives_the_tokens_of_one_rank(quantized_dirs):
    """Worker processes over gloo: the block-quantized Qwen3 greedy tokens at TP=2 equal TP=1's."""
    model_dir, _, _ = quantized_dirs("fp8-block")
    prompts = [[11, 400, 1234, 77, 9], [3000, 5, 600]]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tokens = []
    for tp in (1, 2):
        fields = dict(dtype="float32", num_kv_blocks=32, block_size=4, max_num_batched_tokens=64, tensor_parallel_size=tp)
        with LLM(model=str(model_dir), **fields) as llm:
            tokens.append([out.outputs[0].token_ids for out in llm.generate(prompts, greedy, use_tqdm=False)])
    assert tokens[0] == tokens[1]
