"""Mixture-of-experts layers: routing against transformers' routers, `FusedMoE` against its MoE block, and its splits.

The split tests build every rank's layer in this process (`use_tp_group`)
and add their un-reduced outputs, which is what the all-reduce computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.glm4_moe.configuration_glm4_moe import Glm4MoeConfig
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, Qwen3MoeTopKRouter

from atom_trio.distributed import TensorParallelGroup, use_tp_group
from atom_trio.layers import FusedMoE, select_experts, use_expert_parallel
from atom_trio.ops import CpuBackend, TorchRefBackend, use_backend

# -- routing ------------------------------------------------------------------------------------------------


def _by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (weights, ids) ordered by expert id: transformers' GLM router returns its choice unsorted."""
    order = ids.long().argsort(dim=1)
    return weights.float().gather(1, order), ids.long().gather(1, order)


def _hidden(tokens: int, size: int, *, ties: bool, seed: int) -> torch.Tensor:
    """Router inputs; with ``ties``, small integers, so that many logits (and scores) are equal."""
    generator = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-2, 3, (tokens, size), generator=generator).float()
    return torch.randn(tokens, size, generator=generator)


def _identity_router(router: torch.nn.Module, ties: bool, seed: int) -> None:
    """With ties, the router's logits are its inputs (an identity weight); else a random weight."""
    if ties:
        router.weight.data.copy_(torch.eye(*router.weight.shape))
    else:
        router.weight.data.copy_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(seed)))


def _lowest_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The tie rule, stated with a stable sort: by descending score, equal scores in id order."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_softmax_routing_matches_qwen3_moe(ties, norm_topk_prob):
    config = Qwen3MoeConfig(hidden_size=16, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    router = Qwen3MoeTopKRouter(config)
    _identity_router(router, ties, seed=1)
    hidden = _hidden(64, 16, ties=ties, seed=2)
    logits, their_weights, their_ids = router(hidden)
    weights, ids = select_experts(logits, 4, renormalize=norm_topk_prob)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(weights, their_weights)  # same values in the same order: descending score
    if ties:  # transformers' top-k picks among equal scores as its sort falls; ours takes the lower ids
        assert torch.equal(ids.long(), _lowest_ids(torch.softmax(logits, -1), 4))
    else:
        assert torch.equal(ids.long(), their_ids)


@pytest.mark.parametrize("ties", [False, True])
def test_softmax_routing_matches_mixtral(ties):
    config = MixtralConfig(hidden_size=8, num_local_experts=8, num_experts_per_tok=2)
    router = MixtralTopKRouter(config)
    _identity_router(router, ties, seed=3)
    hidden = _hidden(64, 8, ties=ties, seed=4)
    logits, their_weights, their_ids = router(hidden)
    weights, ids = select_experts(logits, 2, renormalize=True)
    assert torch.equal(weights, their_weights)
    if ties:
        assert torch.equal(ids.long(), _lowest_ids(logits, 2))
    else:
        assert torch.equal(ids.long(), their_ids)


def _glm_router(n_group: int, topk_group: int, *, ties: bool, seed: int) -> Glm4MoeTopkRouter:
    config = Glm4MoeConfig(
        hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )
    router = Glm4MoeTopkRouter(config)
    _identity_router(router, ties, seed)
    if not ties:
        router.e_score_correction_bias.copy_(torch.rand(16, generator=torch.Generator().manual_seed(seed + 1)) / 4)
    return router


def _glm_select(router: Glm4MoeTopkRouter, logits: torch.Tensor, *, renormalize: bool = True):
    return select_experts(
        logits, router.top_k, scoring_func="sigmoid", renormalize=renormalize, num_expert_group=router.num_group,
        topk_group=router.topk_group, correction_bias=router.e_score_correction_bias,
        routed_scaling_factor=router.routed_scaling_factor,
    )


@pytest.mark.parametrize(("n_group", "topk_group"), [(1, 1), (4, 2), (8, 3)])
def test_grouped_sigmoid_routing_matches_glm4_moe(n_group, topk_group):
    router = _glm_router(n_group, topk_group, ties=False, seed=5)
    logits, their_weights, their_ids = router(_hidden(64, 16, ties=False, seed=6))
    weights, ids = _by_expert(*_glm_select(router, logits))
    their_weights, their_ids = _by_expert(their_weights, their_ids)
    assert torch.equal(ids, their_ids)
    torch.testing.assert_close(weights, their_weights, rtol=1e-6, atol=0)  # their unsorted sum: another order


def test_sigmoid_routing_with_ties_takes_the_lower_ids():
    router = _glm_router(1, 1, ties=True, seed=7)  # no bias, no groups: equal logits are equal scores
    logits, their_weights, _ = router(_hidden(64, 16, ties=True, seed=8))
    weights, ids = _glm_select(router, logits)
    assert torch.equal(ids.long(), _lowest_ids(logits, 4))
    # transformers chose experts of the same scores, so the same weights
    torch.testing.assert_close(weights.sort(dim=1).values, their_weights.sort(dim=1).values, rtol=1e-6, atol=0)


def test_equally_rated_groups_keep_the_lower_group():
    # Groups of 4: groups 1 and 2 rate 1.0 + 0.5 (their two best) and tie; group 0 rates lower, group 3 higher.
    scores = torch.tensor([[0.1, 0.1, 0.1, 0.1, 1.0, 0.5, 0.0, 0.0, 0.5, 1.0, 0.2, 0.0, 0.9, 0.9, 0.1, 0.1]])
    logits = torch.logit(scores.double()).float()
    _, ids = select_experts(logits, 4, scoring_func="sigmoid", num_expert_group=4, topk_group=2)
    assert sorted(ids[0].tolist()) == [4, 5, 12, 13]  # group 3, and group 1 of the tied pair
    _, ids = select_experts(torch.zeros(3, 16), 3, scoring_func="sigmoid", num_expert_group=4, topk_group=2)
    assert ids.tolist() == [[0, 1, 2]] * 3
    _, ids = select_experts(torch.zeros(3, 16), 3)
    assert ids.tolist() == [[0, 1, 2]] * 3


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 24),
    num_experts=st.integers(2, 64),
    data=st.data(),
    scoring_func=st.sampled_from(["softmax", "sigmoid"]),
    seed=st.integers(0, 2**16),
)
def test_a_token_is_routed_alone_as_in_any_batch(tokens, num_experts, data, scoring_func, seed):
    top_k = data.draw(st.integers(1, min(num_experts, 8)), label="top_k")
    logits = torch.randint(-3, 3, (tokens, num_experts), generator=torch.Generator().manual_seed(seed)).float()
    weights, ids = select_experts(logits, top_k, scoring_func=scoring_func, renormalize=True)
    for t in range(tokens):
        alone_weights, alone_ids = select_experts(logits[t : t + 1], top_k, scoring_func=scoring_func, renormalize=True)
        assert torch.equal(alone_ids[0], ids[t]) and torch.equal(alone_weights[0], weights[t])
    scores = torch.softmax(logits, -1) if scoring_func == "softmax" else logits.sigmoid()
    assert torch.equal(ids.long(), _lowest_ids(scores, top_k))


def test_negative_biased_scores_and_negative_zero_rank_as_floats():
    # Bias can push a choice score below zero; -0.0 equals 0.0, so the lower id takes the tie.
    logits = torch.logit(torch.tensor([[0.5, 0.5, 0.25, 0.75]]).double()).float()
    bias = torch.tensor([-0.5, -0.5, -1.0, -0.25])  # choice scores 0.0, 0.0, -0.75, 0.5
    weights, ids = select_experts(logits, 3, scoring_func="sigmoid", correction_bias=bias)
    assert ids.tolist() == [[3, 0, 1]]
    torch.testing.assert_close(weights, torch.tensor([[0.75, 0.5, 0.5]]))  # the unbiased scores
    assert _top_k_ids(torch.tensor([[-0.0, 0.0, -1.0, -0.0]]), 3) == [[0, 1, 3]]


def _top_k_ids(scores: torch.Tensor, k: int) -> list[list[int]]:
    from atom_trio.layers.moe import _top_k_lowest_id

    return _top_k_lowest_id(scores, k).tolist()


# -- FusedMoE -----------------------------------------------------------------------------------------------

NUM_EXPERTS, TOP_K, HIDDEN, INTER = 8, 2, 32, 24


def _qwen3_moe_block(seed: int = 0) -> Qwen3MoeSparseMoeBlock:
    config = Qwen3MoeConfig(
        hidden_size=HIDDEN, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=INTER,
        norm_topk_prob=True,
    )
    block = Qwen3MoeSparseMoeBlock(config)
    generator = torch.Generator().manual_seed(seed)
    for param in block.parameters():
        param.data.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    return block


def _load_stacked(moe: FusedMoE, block: Qwen3MoeSparseMoeBlock) -> None:
    moe.w13_weight.weight_loader(moe.w13_weight, block.experts.gate_up_proj.data, ("stacked", "w13"))
    moe.w2_weight.weight_loader(moe.w2_weight, block.experts.down_proj.data, ("stacked", "w2"))


def _load_per_expert(moe: FusedMoE, block: Qwen3MoeSparseMoeBlock) -> None:
    for expert in range(NUM_EXPERTS):
        gate, up = block.experts.gate_up_proj.data[expert].chunk(2)
        moe.w13_weight.weight_loader(moe.w13_weight, gate, (expert, "w1"))
        moe.w13_weight.weight_loader(moe.w13_weight, up, (expert, "w3"))
        moe.w2_weight.weight_loader(moe.w2_weight, block.experts.down_proj.data[expert], (expert, "w2"))


def _route(block: Qwen3MoeSparseMoeBlock, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return select_experts(F.linear(hidden, block.gate.weight), TOP_K, renormalize=True)


@pytest.mark.parametrize("backend", [TorchRefBackend(), CpuBackend()], ids=lambda b: b.name)
@pytest.mark.parametrize("load", [_load_stacked, _load_per_expert], ids=["stacked", "per-expert"])
def test_fused_moe_matches_the_transformers_moe_block(backend, load):
    block = _qwen3_moe_block()
    with use_backend(backend):
        moe = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTER)
    load(moe, block)
    hidden = torch.randn(11, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = block(hidden[None])[0]
    torch.testing.assert_close(moe(hidden, *_route(block, hidden)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "ep"])
def test_two_ranks_add_up_to_one(expert_parallel):
    block = _qwen3_moe_block(seed=2)
    single = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTER)
    _load_stacked(single, block)
    hidden = torch.randn(13, HIDDEN, generator=torch.Generator().manual_seed(3))
    routing = _route(block, hidden)
    total = torch.zeros(13, HIDDEN)
    for rank, load in enumerate((_load_per_expert, _load_stacked)):
        with use_tp_group(TensorParallelGroup(rank, 2)), use_expert_parallel(expert_parallel):
            moe = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTER, reduce_results=False)
        if expert_parallel:
            assert (moe.num_local_experts, moe.expert_offset, moe.intermediate_size) == (4, 4 * rank, INTER)
        else:
            assert (moe.num_local_experts, moe.expert_offset, moe.intermediate_size) == (8, 0, INTER // 2)
        load(moe, block)
        total += moe(hidden, *routing)
    torch.testing.assert_close(total, single(hidden, *routing), rtol=1e-5, atol=1e-5)


def test_expert_parallel_on_one_rank_holds_every_expert():
    with use_expert_parallel(True):
        moe = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTER)
    assert not moe.expert_parallel
    assert moe.w13_weight.shape == (NUM_EXPERTS, 2 * INTER, HIDDEN) and moe.w2_weight.shape == (
        NUM_EXPERTS, HIDDEN, INTER
    )


def test_splits_that_do_not_divide_are_refused_by_name():
    with use_tp_group(TensorParallelGroup(0, 4)):
        with use_expert_parallel(True), pytest.raises(ValueError, match="does not divide the model's 6 experts"):
            FusedMoE(6, 2, HIDDEN, INTER)
        with pytest.raises(ValueError, match="does not divide the model's 6 expert intermediate features"):
            FusedMoE(8, 2, HIDDEN, 6)


def test_a_checkpoint_tensor_of_the_wrong_shape_is_refused():
    moe = FusedMoE(NUM_EXPERTS, TOP_K, HIDDEN, INTER)
    with pytest.raises(ValueError, match="does not fit"):
        moe.w13_weight.weight_loader(moe.w13_weight, torch.zeros(INTER, HIDDEN + 1), (0, "w1"))
    with pytest.raises(ValueError, match="expected 8"):
        moe.w2_weight.weight_loader(moe.w2_weight, torch.zeros(4, HIDDEN, INTER), ("stacked", "w2"))
