"""torch.compile of the model's forward, chosen by ``EngineConfig.level``, and its on-disk cache.

- 0: eager.
- 1: Dynamo traces the forward (backend ``eager``): a check that the model
  stays one graph, at eager speed.
- 2: the whole traced graph compiled by Inductor.
- 3: piecewise: the graph is cut at every attention op and each piece in
  between is compiled by Inductor on its own (`PiecewiseBackend`), as vLLM
  does. The decoder layers' pieces are the same graph up to their weights, so
  Inductor's cache generates code for one and reuses it for the rest, and a
  capture of the forward (CUDA graphs) sees plain kernel launches between
  the attention calls.

Attention is a custom op that reads the forward context (see
`atom_trio.layers.attention`), so the step's metadata is neither a graph input
nor a guard, and with the token dimension dynamic one graph serves every
batch shape (plus Dynamo's own specialization for a single token: batch-1
decode). Layers built for a compiled forward get the kernel backend's
`KernelBackend.traced` kernels: its attention, rotary embedding and KV store;
for the norms, SiLU and one-row matmuls either its own kernels as opaque
custom ops (where they beat what Inductor generates for long prompts, unlike
vLLM's experience with its CUDA ones) or plain torch for Inductor to fuse.

Inductor's and Triton's caches live under the atom_trio cache directory
(`compile_cache_dir`), so a second start reuses the generated code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from atom_trio.config import EngineConfig
from atom_trio._cache import cache_root

logger = logging.getLogger("atom_trio.runner")

MAX_LEVEL = 3


def effective_level(config: EngineConfig, device: torch.device) -> int:
    """``config.level``; None is 3 on CUDA and 0 on the CPU (compiling is slow there); ``enforce_eager`` is 0."""
    if config.enforce_eager:
        return 0
    if config.level is None:
        return MAX_LEVEL if device.type == "cuda" else 0
    return config.level


def freezes_weights(device: torch.device, level: int) -> bool:
    """Whether Inductor freezes the weights (levels 2-3 on the CPU): it then packs them for oneDNN itself.

    Frozen weights are constants Inductor folds and reorders for its oneDNN
    matmuls; on a GPU they would only be copied, so only the CPU freezes.
    """
    return device.type == "cpu" and level >= 2


def compile_cache_dir() -> Path:
    """Where Inductor's and Triton's generated code is kept between starts: ``<atom_trio cache>/torch_compile``."""
    return cache_root() / "torch_compile"


def use_compile_cache() -> Path:
    """Point Inductor and Triton at `compile_cache_dir` (before anything compiles); returns it.

    Both read their directory from the environment when they look up an
    entry, so setting it here takes effect for this process, including
    Triton kernels that are not Inductor's (the backend's own).
    """
    directory = compile_cache_dir()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
    return directory


class PiecewiseBackend:
    """A torch.compile backend that cuts the graph at every attention op and compiles the pieces with Inductor.

    ``pieces`` records, for every graph Dynamo handed over (one per token
    count specialization), how many pieces Inductor compiled: the number of
    attention layers plus one.
    """

    def __init__(self) -> None:
        self.pieces: list[int] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        split = split_at_attention(graph)
        _move_attributes_into_pieces(split)
        compiled = 0
        for node in split.graph.nodes:
            if node.op != "call_module" or _holds_attention(split.get_submodule(node.target)):
                continue
            piece = split.get_submodule(node.target)
            inputs = [n.meta["example_value"] for n in piece.graph.nodes if n.op == "placeholder"]
            # Replaces the submodule for the split graph's calls; a module attribute could not
            # hold a plain function (vLLM installs its compiled pieces the same way).
            split.__dict__[node.target] = compile_fx(piece, inputs)
            compiled += 1
        self.pieces.append(compiled)
        logger.info("piecewise compile: %d Inductor pieces around %d attention ops", compiled, compiled - 1)
        return split


def split_at_attention(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``graph`` as a chain of submodules: the stretches between attention ops, and each attention op alone."""
    piece, piece_of = 0, {}
    for node in graph.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _is_attention(node):
            piece_of[node] = piece + 1
            piece += 2
        else:
            piece_of[node] = piece
    return split_module(graph, None, piece_of.__getitem__, keep_original_order=True)


def _move_attributes_into_pieces(split: torch.fx.GraphModule) -> None:
    """Make the weights a piece uses its own attributes again, rather than inputs from the split graph.

    Dynamo hands frozen weights over as attributes (``get_attr``), which
    ``split_module`` turns into piece inputs; Inductor freezes only the
    attributes of the graph it compiles.
    """
    for node in split.graph.nodes:
        if node.op != "call_module":
            continue
        piece = split.get_submodule(node.target)
        placeholders = [n for n in piece.graph.nodes if n.op == "placeholder"]
        kept = []
        for placeholder, arg in zip(placeholders, node.args, strict=True):
            if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
                kept.append(arg)
                continue
            value = getattr(split, arg.target)
            name = placeholder.target
            if isinstance(value, torch.nn.Parameter):
                piece.register_parameter(name, value)
            else:
                piece.register_buffer(name, value)
            with piece.graph.inserting_before(placeholder):
                attribute = piece.graph.get_attr(name)
            attribute.meta = placeholder.meta
            placeholder.replace_all_uses_with(attribute)
            piece.graph.erase_node(placeholder)
        node.args = tuple(kept)
        piece.recompile()
    split.graph.eliminate_dead_code()
    split.recompile()


def _is_attention(node: torch.fx.Node) -> bool:
    ops = (torch.ops.atom_trio.paged_attention, torch.ops.atom_trio.mla_attention)
    return node.op == "call_function" and node.target in (*ops, *(op.default for op in ops))


def _holds_attention(piece: torch.nn.Module) -> bool:
    return any(_is_attention(node) for node in piece.graph.nodes)


class CompiledForward:
    """The model's ``forward(input_ids, positions)`` through torch.compile at ``level`` (1 to 3).

    ``freeze``: Inductor treats the weights as constants (see
    `freezes_weights`). Dynamo reads that setting when it traces, so calls
    that may compile run inside `tracing` (the runner compiles every graph at
    start), and the process's own setting stays as it was.
    """

    def __init__(self, model: torch.nn.Module, level: int, *, freeze: bool) -> None:
        if not 1 <= level <= MAX_LEVEL:
            raise ValueError(f"no torch.compile at level {level}")
        self.level = level
        self.backend: str | PiecewiseBackend = {1: "eager", 2: "inductor", 3: PiecewiseBackend()}[level]
        self._config = {"freezing": freeze}
        self._model = model
        # A code object of its own: Dynamo keeps compiled graphs, and counts recompiles against its
        # limit, per code object, so each runner's graphs stay apart from other runners' and go with it.
        call = types.FunctionType(_call_model.__code__.replace(), _call_model.__globals__)
        self._compiled = torch.compile(call, backend=self.backend, dynamic=False, fullgraph=True)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Only the token dimension varies; the weights and everything else stay static shapes.
        torch._dynamo.mark_dynamic(input_ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        return self._compiled(self._model, input_ids, positions)

    def tracing(self) -> contextlib.AbstractContextManager:
        """Inductor's settings for this forward, for the calls that trace and compile it."""
        import torch._inductor.config  # a second of imports that an eager runner never needs

        return torch._inductor.config.patch(self._config)


def _call_model(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return model(input_ids, positions)


def warmup_steps(
    *,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    query_group: int,
    decodes: bool,
) -> list[list[tuple[int, int]]]:
    """Steps, each a list of ``(query_len, context_len)`` sequences, that reach every kernel variant a scheduler makes.

    Triton compiles a kernel once per variant at its first launch (seconds,
    which a request would wait for), and a variant is a tile shape (the attention kernel picks one
    of three from the longest query of the step, ``64 // query_group`` tokens
    being the middle one's limit), whether keys are split (short queries over
    long contexts) and how many ways, and for every integer argument whether
    it is 1, a multiple of 16 or neither (sequence counts, block-table
    widths). These steps cover prompts alone, prompts together, a chunk over
    cached context beside decodes, and that chunk at every power-of-two
    context up to 8192 (64 splits of 128 keys). ``decodes`` adds decode-only
    steps, for a runner that runs them without CUDA graphs. Steps that would
    break the limits are left out.
    """
    short = max(2, 64 // query_group)
    steps = [
        [(short, short)],
        [(block_size + 1, block_size + 1)],
        [(256, 256)],
        [(5, 5), (40, 40), (100, 100)],
        [(8, 8)] * 16,
        [(short, 3 * short)] + [(1, 50)] * 3,
    ]
    long_contexts = [c for c in (256 * 2**i for i in range(6)) if c <= max_model_len]
    for context in long_contexts:
        steps += [[(2, context), (1, context)], [(128, context)]]
    if decodes:
        steps += [[(1, 20)], [(1, 20)] * 3, [(1, 20)] * 16]
        steps += [[(1, context)] for context in long_contexts]
    return steps_within(
        steps, max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
    )


def steps_within(
    steps: list[list[tuple[int, int]]], *, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int
) -> list[list[tuple[int, int]]]:
    """The warm-up ``steps`` a scheduler with these limits could plan."""
    return [
        step
        for step in steps
        if len(step) <= max_num_seqs
        and sum(q for q, _ in step) <= max_num_batched_tokens
        and all(context <= max_model_len for _, context in step)
    ]
