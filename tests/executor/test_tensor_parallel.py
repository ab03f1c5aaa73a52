"""Tensor parallelism on CPU over gloo: sharded layers and models match one rank, through real worker processes.

Layer and runner checks run in ranks started with ``torch.multiprocessing``
(each rank holds only its shards and talks over gloo); the engine tests go
through the `ProcessExecutor`'s worker subprocesses, as a user's
``--tensor-parallel-size`` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from atom_trio import EngineConfig, SamplingParams, open_engine
from atom_trio._net import free_port
from atom_trio.distributed import TensorParallelGroup, destroy_distributed, init_distributed, use_tp_group
from atom_trio.errors import ModelLoadError
from atom_trio.core.plan import SeqChunk, StepPlan
from atom_trio.layers import (
    MergedColumnParallelLinear,
    MLAAttention,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from atom_trio.runner import ModelRunner
from atom_trio.testing import write_tiny_model_dir

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 1345, 28, 253, 3191, 3304, 282, 2942, 30],
    [1, 23, 4921, 30, 2070],
]


def _run_ranks(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined over gloo; re-raise a failure."""
    mp.spawn(_rank_main, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def _rank_main(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(rank, world_size, *args)


# -- layers ---------------------------------------------------------------------------------------


def _check_layers(rank: int, world_size: int) -> None:
    group = TensorParallelGroup(rank=rank, size=world_size)
    init_distributed(group, torch.device("cpu"), timeout_s=60)
    try:
        torch.manual_seed(0)  # every rank draws the same full weights and inputs
        with torch.no_grad(), use_tp_group(group):
            _check_mlp(group)
            for heads, kv_heads in [(4, 2), (4, 1)]:  # K/V heads split, then replicated (fewer than ranks)
                _check_attention_projections(group, heads, kv_heads)
            _check_vocab_parallel(group, vocab=11, hidden=6)  # 11 rows do not split evenly: the last rank pads
    finally:
        destroy_distributed()


def _check_mlp(group: TensorParallelGroup) -> None:
    hidden, inter = 6, 8
    gate, up, down = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)
    bias = torch.randn(hidden)
    x = torch.randn(5, hidden)
    expected = F.linear(F.silu(x @ gate.T) * (x @ up.T), down, bias)

    gate_up = MergedColumnParallelLinear(hidden, [inter, inter], silu_and_mul=True)
    down_proj = RowParallelLinear(inter, hidden, bias=True)
    assert gate_up.weight.shape == (2 * inter // group.size, hidden)
    assert down_proj.weight.shape == (hidden, inter // group.size)
    gate_up.weight.weight_loader(gate_up.weight, gate, 0)
    gate_up.weight.weight_loader(gate_up.weight, up, 1)
    down_proj.weight.weight_loader(down_proj.weight, down)
    down_proj.bias.weight_loader(down_proj.bias, bias)
    torch.testing.assert_close(down_proj(gate_up(x)), expected)


def _check_attention_projections(group: TensorParallelGroup, heads: int, kv_heads: int) -> None:
    hidden, head_dim, tokens = 8, 4, 3
    x = torch.randn(tokens, hidden)
    wo = torch.randn(hidden, heads * head_dim)
    q, full_q = _check_qkv_shard(group, x, heads, kv_heads, head_dim)
    # o_proj takes this rank's heads (stand-in attention output: the queries) and the all-reduce sums the ranks.
    o_proj = RowParallelLinear(heads * head_dim, hidden)
    o_proj.weight.weight_loader(o_proj.weight, wo)
    torch.testing.assert_close(o_proj(q.reshape(tokens, -1)), full_q.reshape(tokens, -1) @ wo.T)


def _check_qkv_shard(
    group: TensorParallelGroup, x: torch.Tensor, heads: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check this rank's q/k/v against the full projection; return its queries and the full ones."""
    generator = torch.Generator().manual_seed(1)  # the same full weights whichever rank asks
    wq, wk, wv = (torch.randn(n * head_dim, x.shape[1], generator=generator) for n in (heads, kv_heads, kv_heads))
    bq, bk, bv = (torch.randn(n * head_dim, generator=generator) for n in (heads, kv_heads, kv_heads))
    tokens = x.shape[0]
    full_q = F.linear(x, wq, bq).view(tokens, heads, head_dim)
    full_k = F.linear(x, wk, bk).view(tokens, kv_heads, head_dim)
    full_v = F.linear(x, wv, bv).view(tokens, kv_heads, head_dim)

    with use_tp_group(group):
        qkv = QKVParallelLinear(x.shape[1], head_dim, heads, kv_heads, bias=True)
    for shard, weight, bias in [("q", wq, bq), ("k", wk, bk), ("v", wv, bv)]:
        qkv.weight.weight_loader(qkv.weight, weight, shard)
        qkv.bias.weight_loader(qkv.bias, bias, shard)
    q, k, v = (t.reshape(tokens, -1, head_dim) for t in qkv.split(qkv(x)))
    assert (q.shape[1], k.shape[1]) == (heads // group.size, max(1, kv_heads // group.size))

    # Each local query head must meet, under the local GQA grouping, the K/V head it attends to in the full model.
    for local in range(q.shape[1]):
        head = group.rank * q.shape[1] + local
        torch.testing.assert_close(q[:, local], full_q[:, head])
        local_kv = local // (q.shape[1] // k.shape[1])
        torch.testing.assert_close(k[:, local_kv], full_k[:, head // (heads // kv_heads)])
        torch.testing.assert_close(v[:, local_kv], full_v[:, head // (heads // kv_heads)])
    return q, full_q


def _check_vocab_parallel(group: TensorParallelGroup, vocab: int, hidden: int) -> None:
    table = torch.randn(vocab, hidden)
    embed, head = VocabParallelEmbedding(vocab, hidden), ParallelLMHead(vocab, hidden)
    assert embed.weight.shape == (-(-vocab // group.size), hidden)
    embed.weight.weight_loader(embed.weight, table)
    head.weight.weight_loader(head.weight, table)
    ids = torch.tensor([0, vocab - 1, 3, 5, 6, 10, 2])
    torch.testing.assert_close(embed(ids), F.embedding(ids, table))
    hidden_states = torch.randn(4, hidden)
    torch.testing.assert_close(head(hidden_states), hidden_states @ table.T)


def test_sharded_layers_match_unsharded_over_gloo():
    _run_ranks(_check_layers, 2)


@pytest.mark.parametrize(
    ("size", "heads", "kv_heads"),
    [(1, 4, 2), (2, 4, 2), (2, 4, 1), (4, 8, 2), (4, 8, 1), (3, 9, 3)],
)
def test_each_rank_holds_its_query_heads_and_their_kv_heads(size, heads, kv_heads):
    """Column-parallel q/k/v need no collective, so every rank of a larger group can be checked here in one process."""
    x = torch.randn(3, 8)
    for rank in range(size):
        _check_qkv_shard(TensorParallelGroup(rank=rank, size=size), x, heads, kv_heads, head_dim=4)


# -- a whole model in the runner --------------------------------------------------------------------


def _prefill_then_decode(prompt: list[int], next_token: int) -> list[StepPlan]:
    blocks = [0, 1]
    return [
        StepPlan(
            step_id=0,
            chunks=[_chunk(prompt, start_pos=0, prompt_len=len(prompt), blocks=blocks)],
        ),
        StepPlan(
            step_id=1,
            chunks=[_chunk([next_token], start_pos=len(prompt), prompt_len=len(prompt), blocks=blocks)],
        ),
    ]


def _chunk(tokens: list[int], *, start_pos: int, prompt_len: int, blocks: list[int]) -> SeqChunk:
    return SeqChunk(
        seq_id=0,
        token_ids=tokens,
        start_pos=start_pos,
        block_table=blocks,
        prompt_len=prompt_len,
        sample=True,
        sampling_params=GREEDY,
    )


def _runner_logits(config: EngineConfig, rank: int, world_size: int) -> list[torch.Tensor]:
    runner = ModelRunner(config, rank=rank, world_size=world_size)
    try:
        _check_latent_attention_split(runner.model, world_size)
        return [runner.compute_logits(plan) for plan in _prefill_then_decode(PROMPTS[0], next_token=42)]
    finally:
        runner.close()


def _check_latent_attention_split(model: torch.nn.Module, world_size: int) -> None:
    """Latent attention (DeepSeek): this rank's share of the heads, and the whole latent cache, which all of them read."""
    for layer in model.modules():
        if isinstance(layer, MLAAttention):
            assert layer.num_heads * world_size == model.config.num_attention_heads
            assert layer.latent_cache.shape[-1] == layer.kv_lora_rank + layer.qk_rope_head_dim


def _check_runner_logits(rank: int, world_size: int, model_dirs: list[str], load_format: str) -> None:
    for model_dir in model_dirs:
        config = EngineConfig(model=model_dir, dtype="float32", device="cpu", num_kv_blocks=4, load_format=load_format)
        # Every rank builds the one-rank reference too: a rank that went on alone would wait in the next
        # sharded runner's first collective for as long as the other's build took, and could time out.
        expected = _runner_logits(config, 0, 1)
        for got, want in zip(_runner_logits(config, rank, world_size), expected):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_mla_dirs(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-mla")
    return {arch: write_tiny_model_dir(arch, root, default_model_dir) for arch in ("deepseek_v2", "deepseek_v3")}


@pytest.mark.parametrize("load_format", ["safetensors", "dummy"])
def test_sharded_runner_logits_match_one_rank(tiny_model_dirs, tiny_mla_dirs, load_format):
    """Qwen3 (4 heads, 2 KV heads: split) and Llama 3 (4 heads, 1 KV head: replicated, tied LM head) at TP=2;
    from their checkpoints also DeepSeek-V2 and V3 (latent attention: 4 heads split, the latent cache whole on
    each rank; routed experts).

    With dummy weights too: each rank draws the full tensors and keeps its
    shard, so TP=2 runs the very model TP=1 does.
    """
    dirs = [str(tiny_model_dirs["qwen3"]), str(tiny_model_dirs["llama3"])]
    if load_format == "safetensors":
        dirs += [str(path) for path in tiny_mla_dirs.values()]
    _run_ranks(_check_runner_logits, 2, dirs, load_format)


# -- unsplittable models ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "heads", "kv_heads", "message"),
    [
        (2, 9, 3, "tensor_parallel_size 2 does not divide the model's 9 attention heads"),
        (2, 6, 3, "tensor_parallel_size 2 does not divide the model's 3 key/value heads"),
        (4, 12, 3, "tensor_parallel_size 4 is not a multiple of the model's 3 key/value heads"),
    ],
)
def test_heads_that_do_not_split_are_a_clear_error(size, heads, kv_heads, message):
    with use_tp_group(TensorParallelGroup(rank=0, size=size)), pytest.raises(ValueError, match=message):
        QKVParallelLinear(64, 8, heads, kv_heads)


def test_default_model_at_tp2_fails_before_the_rendezvous(default_model_dir):
    """SmolLM2-135M has 9 query and 3 KV heads: TP=2 cannot split it, and says so instead of waiting for rank 1."""
    config = EngineConfig(model=str(default_model_dir), device="cpu", num_kv_blocks=4)
    with pytest.raises(ModelLoadError, match="tensor_parallel_size 2 does not divide the model's 9 attention heads"):
        ModelRunner(config, rank=0, world_size=2)


# -- through the engine and its worker processes ----------------------------------------------------


async def _greedy_tokens(
    model_dir: Path, prompts: list[list[int]], params: SamplingParams, **fields
) -> list[list[int]]:
    config = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", num_kv_blocks=64, **fields)
    async with open_engine(config) as engine:
        if fields.get("tensor_parallel_size", 1) > 1:
            assert len(engine.executor.worker_pids) == fields["tensor_parallel_size"]
        tokens = []
        for prompt in prompts:
            out: list[int] = []
            async for delta in engine.generate(prompt, params):
                out += delta.outputs[0].token_ids
            tokens.append(out)
        return tokens


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
async def test_tiny_qwen3_tp2_same_greedy_tokens_as_tp1(tiny_qwen3_dir, async_scheduling):
    # With async scheduling every decode feeds back the previous token on the device: rank 0 broadcasts it.
    single = await _greedy_tokens(tiny_qwen3_dir, PROMPTS, GREEDY)
    split = await _greedy_tokens(
        tiny_qwen3_dir, PROMPTS, GREEDY, tensor_parallel_size=2, async_scheduling=async_scheduling
    )
    assert all(len(t) == GREEDY.max_tokens for t in single)
    assert split == single


async def test_deepseek_v2_tp2_in_worker_processes_same_greedy_tokens_as_tp1(tiny_mla_dirs):
    """Latent attention in two worker processes, async scheduling on: each rank attends with its half of the heads
    over its own whole copy of the latent cache; o_proj's all-reduce joins the heads. (DeepSeek-V3 at TP=2 through
    the engine, scheduling one step at a time: tests/models/test_deepseek.py; both at the runner: above.)"""
    single = await _greedy_tokens(tiny_mla_dirs["deepseek_v2"], PROMPTS, GREEDY)
    split = await _greedy_tokens(
        tiny_mla_dirs["deepseek_v2"], PROMPTS, GREEDY, tensor_parallel_size=2, async_scheduling=True
    )
    assert all(len(t) == GREEDY.max_tokens for t in single)
    assert split == single


async def test_default_model_tp3_same_greedy_tokens_as_tp1(default_model_dir):
    """TP=3, not 2: SmolLM2-135M's 9 query and 3 KV heads split only by 3 (see the TP=2 test above)."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    single = await _greedy_tokens(default_model_dir, PROMPTS[:1], params)
    split = await _greedy_tokens(default_model_dir, PROMPTS[:1], params, tensor_parallel_size=3)
    assert len(single[0]) == 4
    assert split == single
