"""Mixture of experts: the router's choice (`select_experts`) and the experts themselves (`FusedMoE`).

A model computes its router logits with its own gate, picks each token's
experts with `select_experts`, and hands hidden states, weights and ids to a
`FusedMoE`, which holds every expert's gate/up and down weights stacked in two
tensors, so that one backend call (`KernelBackend.fused_experts`) runs them all.

Tensor parallelism splits the experts one of two ways. By default every rank
holds every expert, sliced along the intermediate dimension like a gate/up
(column-parallel) and down (row-parallel) pair: each rank's output is a
partial sum. With expert parallelism (`use_expert_parallel`, which the runner
sets from ``--enable-expert-parallel``) each rank holds whole experts, a
contiguous ``1/size`` of them, and computes their contribution for every
token: again a partial sum. Either way one all-reduce completes the layer.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

from atom_trio._scoped import scoped
from atom_trio.distributed import current_tp_group
from atom_trio.ops import ClampedSwiGLU, current_backend
from atom_trio.ops.quant_experts import QuantizedExperts

from .linear import _copy_shard
from .quantization import quantized_build
from .quantization.experts import ExpertsQuantMethod

_expert_parallel: contextvars.ContextVar[bool] = contextvars.ContextVar("atom_trio_expert_parallel", default=False)


def use_expert_parallel(enabled: bool) -> contextlib.AbstractContextManager[bool]:
    """`FusedMoE` layers constructed inside this block hold whole experts per rank (``enabled``) or slices of all."""
    return scoped(_expert_parallel, enabled)


def select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring_func: str = "softmax",
    renormalize: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``top_k`` experts: ``(weights [tokens, top_k] float32, ids [tokens, top_k] int32)``.

    ``router_logits`` ``[tokens, experts]`` in any float dtype; scores are
    computed in float32, with the operations of the Hugging Face models in
    their order, so that float32 routing matches theirs bit for bit.

    - ``softmax`` (Qwen3-MoE, Mixtral, DeepSeek-V2): the top-k of the softmax
      over all experts, renormalized to sum to one if asked (Mixtral always,
      Qwen3-MoE with ``norm_topk_prob``). With ``num_expert_group`` groups
      (DeepSeek-V2's group-limited greedy), each group is rated by its best
      score and only the experts of the ``topk_group`` best groups compete.
    - ``sigmoid`` (GLM-4-MoE, DeepSeek-V3): scores ``sigmoid(logits)``; the
      choice ranks ``scores + correction_bias``. With ``num_expert_group``
      groups of consecutive experts, each group is rated by the sum of its
      two best biased scores, and only the experts of the ``topk_group``
      best groups compete. The weights are the chosen experts' unbiased
      scores, renormalized if asked (plus 1e-20, as Hugging Face does).

    Both then scale the weights by ``routed_scaling_factor``. The gate must
    produce logits as the checkpoint's model does (GLM-4-MoE's in float32).

    Ties: of equal scores, the lower expert id wins (and of equally rated
    groups, the lower group), on every device and for every batch: a
    token's experts never depend on the kernel's order of work.
    ``torch.topk`` alone has no such rule (on the CPU it picks among equals
    by its partial sort), so the ranking breaks ties by id explicitly
    (`_top_k_lowest_id`). Rows are ordered by descending score.
    """
    if scoring_func == "softmax":
        scores = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        choice = scores
        if num_expert_group is not None and num_expert_group > 1:
            choice = _keep_best_groups(scores, num_expert_group, topk_group or num_expert_group, rated_by=1)
        ids = _top_k_lowest_id(choice, top_k)
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif scoring_func == "sigmoid":
        scores = router_logits.float().sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if num_expert_group is not None and num_expert_group > 1:
            choice = _keep_best_groups(choice, num_expert_group, topk_group or num_expert_group)
        ids = _top_k_lowest_id(choice, top_k)
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"unknown expert scoring function {scoring_func!r}: softmax or sigmoid")
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


def _keep_best_groups(choice: torch.Tensor, num_groups: int, keep: int, *, rated_by: int = 2) -> torch.Tensor:
    """``choice`` with the experts outside each token's ``keep`` best groups set to -inf.

    A group's rating is the sum of its ``rated_by`` best scores: two for
    DeepSeek-V3's rule (which GLM-4-MoE shares), one for DeepSeek-V2's.
    """
    tokens, num_experts = choice.shape
    groups = choice.view(tokens, num_groups, num_experts // num_groups)
    rating = groups.topk(rated_by, dim=-1).values.sum(dim=-1)
    kept = torch.zeros(tokens, num_groups, dtype=torch.bool, device=choice.device)
    kept.scatter_(1, _top_k_lowest_id(rating, keep), True)
    return groups.masked_fill(~kept.unsqueeze(-1), float("-inf")).view(tokens, num_experts)


def _top_k_lowest_id(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's ``k`` largest float32 ``scores``, by descending score; of equal scores, the lower index.

    Each score becomes an int64 key that orders as the float does, with the
    index's complement below it, so no two keys are equal and any top-k
    returns the same indices. (``torch.sort(stable=True)`` gives the same
    rule at several times the cost.)
    """
    bits = (scores + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes +0.0, which it equals as a float
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats' magnitude bits reversed: int order == float order
    width = scores.shape[-1]
    keys = ordered.long() * width + torch.arange(width - 1, -1, -1, device=scores.device)
    return keys.topk(k, dim=-1).indices


class FusedMoE(nn.Module):
    """Every expert of one mixture-of-experts layer, with its gate/up and down weights stacked.

    ``w13_weight`` ``[local experts, 2 * local inter, hidden]`` (each expert's
    gate rows, then its up rows) and ``w2_weight`` ``[local experts, hidden,
    local inter]``. Without expert parallelism this rank holds every expert
    and ``1/size`` of each one's intermediate features (``expert_offset``
    0); with it, whole experts ``[expert_offset, expert_offset +
    num_local_experts)``. The forward's output is this rank's partial sum,
    all-reduced over the group when ``reduce_results`` (a model that adds a
    shared expert's partial sum first passes False and reduces once).

    A quantized checkpoint's experts get their parameters from an
    `ExpertsQuantMethod` (`quantize_as`); after loading, the weights are
    either in a quantized layout that ``quant`` describes, or dense.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        reduce_results: bool = True,
        bias: bool = False,
        activation: ClampedSwiGLU | None = None,
    ) -> None:
        super().__init__()
        self.tp = current_tp_group()
        self.ops = current_backend()
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.reduce_results = reduce_results
        self.expert_parallel = _expert_parallel.get() and self.tp.size > 1
        if self.expert_parallel:
            self.num_local_experts = self.tp.divide(num_experts, "experts")
            self.expert_offset = self.tp.rank * self.num_local_experts
            self.intermediate_size = intermediate_size
        else:
            self.num_local_experts = num_experts
            self.expert_offset = 0
            self.intermediate_size = self.tp.divide(intermediate_size, "expert intermediate features")
        self.intermediate_size_full = intermediate_size
        self.quant_method: ExpertsQuantMethod | None = None
        self.quant: QuantizedExperts | None = None
        # In a quantized build the dense weights are placeholders until `quantize_as` (no memory meanwhile).
        self._dense_weights(device="meta" if quantized_build() else None)
        self.activation = activation
        if bias:
            local, inter = self.num_local_experts, self.intermediate_size
            self.w13_bias = nn.Parameter(torch.empty(local, 2 * inter), requires_grad=False)
            self.w2_bias = nn.Parameter(torch.empty(local, hidden_size), requires_grad=False)
            self.w13_bias.weight_loader = self.w2_bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("w13_bias", None)
            self.register_parameter("w2_bias", None)

    def _dense_weights(self, device: str | None = None) -> None:
        local, inter, hidden = self.num_local_experts, self.intermediate_size, self.hidden_size
        self.w13_weight = nn.Parameter(torch.empty(local, 2 * inter, hidden, device=device), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(local, hidden, inter, device=device), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def quantize_as(self, method: ExpertsQuantMethod | None) -> None:
        """Give the experts of a quantized build their parameters: ``method``'s, or dense weights (None: unquantized)."""
        del self.w13_weight, self.w2_weight  # the placeholders
        if method is None:
            self._dense_weights()
        else:
            method.create_weights(self)
        self.quant_method = method

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int | str, str]) -> None:
        """Copy this rank's part of a checkpoint tensor into ``param``.

        ``shard_id`` is ``(expert, "w1" | "w3" | "w2")`` for one expert's
        gate, up or down ``[out, in]`` tensor (a global expert id; an expert
        another rank holds is skipped), or ``("stacked", "w13" | "w2")`` for
        every expert's in one tensor: ``[experts, 2 * inter, hidden]`` (gate
        rows, then up rows) or ``[experts, hidden, inter]``, and their biases
        ``[experts, 2 * inter]`` and ``[experts, hidden]``. Every rank's slice
        of an expert adds to one output, so one rank adds its down bias: the
        first (with expert parallelism, the rank holding the expert).

        Quantized experts' tensors (packed weights, scales, zero points) load
        the same way: their rows are the gate's then the up's, at any
        granularity (a scale row per block of rows), and their columns (the
        down projection's input) split between ranks unless the parameter
        says ``split_columns = False`` (a scale per output row).
        """
        expert, name = shard_id
        parts, index = (1, 0) if self.expert_parallel else (self.tp.size, self.tp.rank)
        if not getattr(param, "split_columns", True):
            parts, index = 1, 0
        half = param.shape[1] // 2  # the gate's rows of a w13 tensor
        if expert == "stacked":
            if loaded.shape[0] != self.num_experts:
                raise ValueError(f"stacked experts tensor of shape {tuple(loaded.shape)}: expected {self.num_experts}")
            mine = loaded.narrow(0, self.expert_offset, self.num_local_experts)
            if name == "w13":  # gate and up each split like a column-parallel layer
                for rows, part in zip((param.data[:, :half], param.data[:, half:]), mine.chunk(2, dim=1)):
                    _copy_shard(rows, part, dim=1, index=index, parts=parts)
            elif param is self.w2_bias:
                _copy_shard(param.data, mine, dim=1, index=0, parts=1)
                if index:
                    param.data.zero_()
            else:
                _copy_shard(param.data, mine, dim=2, index=index, parts=parts)
            return
        local = expert - self.expert_offset
        if not 0 <= local < self.num_local_experts:
            return  # another expert-parallel rank's
        if name == "w2":
            _copy_shard(param.data[local], loaded, dim=1, index=index, parts=parts)
        else:
            rows = param.data[local].narrow(0, 0 if name == "w1" else half, half)
            _copy_shard(rows, loaded, dim=0, index=index, parts=parts)

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = self.ops.fused_experts(
            hidden,
            self.w13_weight,
            self.w2_weight,
            topk_weights,
            topk_ids,
            expert_offset=self.expert_offset,
            w13_bias=self.w13_bias,
            w2_bias=self.w2_bias,
            activation=self.activation,
            quant=self.quant,
        )
        return self.tp.all_reduce(out) if self.reduce_results else out

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_local_experts}/{self.num_experts} (offset {self.expert_offset}), top_k={self.top_k}, "
            f"hidden={self.hidden_size}, intermediate={self.intermediate_size}"
            + ("" if self.quant is None else f", weights={self.quant.kind}")
        )
