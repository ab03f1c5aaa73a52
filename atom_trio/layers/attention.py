"""Paged attention layer, and the per-step forward context it reads.

The runner describes each step's flat batch once (`AttentionMetadata`, plus
the backend's plan derived from it) and sets it as the forward context; every
attention layer reads it from there rather than through the model's
``forward`` arguments, so model code stays free of batch bookkeeping and a
compiled graph can treat attention as one opaque op.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import torch
from torch import nn

from atom_trio._scoped import scoped
from atom_trio.distributed import current_tp_group
from atom_trio.errors import ModelLoadError
from atom_trio.ops import AttentionMetadata, current_backend

from .rotary import RotaryEmbedding


@attrs.frozen
class ForwardContext:
    """One step's attention metadata and the backend's plan for it, as the first KV cache group sees them.

    ``windowed``: the same for each further group (a model with sliding-window
    layers beside full ones, see `atom_trio.core.BlockManager`), whose block
    tables and slots differ; empty for a model with one group.
    """

    metadata: AttentionMetadata
    attn_plan: Any
    windowed: tuple[ForwardContext, ...] = ()

    def group(self, index: int) -> ForwardContext:
        """The context of KV cache group ``index``."""
        return self.windowed[index - 1] if index else self


_context: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("atom_trio_forward", default=None)


def forward_context(context: ForwardContext) -> contextlib.AbstractContextManager[ForwardContext]:
    """Attention layers read ``context`` (this step's metadata) inside the block."""
    return scoped(_context, context)


def get_forward_context() -> ForwardContext:
    context = _context.get()
    if context is None:
        raise RuntimeError("attention ran outside a forward_context(): the runner sets one per step")
    return context


class CachedAttention(nn.Module):
    """An attention layer with a paged cache: it declares the tensors a block holds, the runner allocates them.

    The runner sizes and allocates the cache in whatever units the layer
    declares (per-head keys and values, or one latent vector a token), so a
    new kind of attention needs no change to the runner.

    Each gets a ``layer_id``, by which a compiled graph's opaque attention op finds it.

    ``sliding_window``: the positions each query sees (``None``: all), by which
    the runner puts the layer in a KV cache group; ``kv_group`` is that group,
    whose block tables the layer reads (set with its cache, `bind_kv_cache`).

    ``k_scale``/``v_scale``: the per-tensor scales of an FP8 cache (float32
    ``[1]`` buffers, 1.0 until the checkpoint's are loaded by `take_kv_scales`;
    ``kv_scales_loaded`` says whether they were). A cache in the model's dtype
    ignores them. Buffers, so that they live on the layer's device and a CUDA
    graph reads them where they are; not in the state dict, which is the
    model's weights.
    """

    sliding_window: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.layer_id = next(_layer_ids)
        self.kv_group = 0
        _layers[self.layer_id] = self
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.kv_scales_loaded = False

    def load_kv_scale(self, which: str, scale: torch.Tensor) -> None:
        """Take the checkpoint's ``which`` (``"k_scale"`` or ``"v_scale"``), a positive finite scalar."""
        if scale.numel() != 1 or not (math.isfinite(value := float(scale.float().reshape(()))) and value > 0):
            raise ValueError(f"a KV cache scale must be one positive finite number; got {scale.reshape(-1)[:4]}")
        getattr(self, which).fill_(value)
        self.kv_scales_loaded = True

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> tuple[tuple[int, ...], ...]:
        """The shapes of the cache tensors this layer keeps for ``num_blocks`` blocks, in its backend's layout."""
        raise NotImplementedError

    def bind_kv_cache(self, *caches: torch.Tensor) -> None:
        """Take the cache tensors (views the runner allocated, shaped as `kv_cache_shapes` says; empty to unbind)."""
        raise NotImplementedError


class Attention(CachedAttention):
    """Rotates this step's queries and keys, stores keys and values in the paged cache, then attends.

    The rotation happens here, not in the model, so that a backend can rotate
    and store in one kernel (`KernelBackend.rotary_store_kv`).

    ``k_cache``/``v_cache`` (laid out as the backend's ``kv_cache_shape``
    says) are bound by the runner after it sizes the cache; they are plain
    attributes, not buffers, so they stay out of the state dict.

    ``sliding_window``: each query sees only the last that many positions; beside full-attention layers
    such layers form a KV cache group of their own, whose blocks before the window are released (their
    table entries then name a null block, which the window masks out). ``sinks``: a learned logit per head in the
    softmax's denominator (GPT-OSS), the parameter ``sinks`` holding this rank's heads.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        rotary_emb: RotaryEmbedding,
        *,
        sliding_window: int | None = None,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not divide into {num_kv_heads} KV heads")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window {sliding_window} is not supported (1 or more positions)")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.rotary_emb = rotary_emb
        self.sliding_window = sliding_window
        if sinks:
            self.sinks = nn.Parameter(torch.empty(num_heads), requires_grad=False)
            self.sinks.weight_loader = self._load_sinks
        else:
            self.register_parameter("sinks", None)
        self.k_cache = self.v_cache = torch.empty(0)
        self.ops = current_backend()
        self.tp = current_tp_group()

    def _load_sinks(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """This rank's heads' sinks: query heads split across ranks in order (as `QKVParallelLinear` splits them)."""
        if loaded.shape != (self.num_heads * self.tp.size,):
            raise ValueError(f"sinks of shape {tuple(loaded.shape)} do not fit {self.num_heads * self.tp.size} heads")
        param.data.copy_(loaded.narrow(0, self.tp.rank * self.num_heads, self.num_heads))

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> tuple[tuple[int, ...], ...]:
        shape = self.ops.kv_cache_shape(num_blocks, block_size, self.num_kv_heads, self.head_dim)
        return (shape, shape)

    def bind_kv_cache(self, *caches: torch.Tensor) -> None:
        self.k_cache, self.v_cache = caches

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        query = query.reshape(-1, self.num_heads, self.head_dim)
        key = key.reshape(-1, self.num_kv_heads, self.head_dim)
        value = value.reshape(-1, self.num_kv_heads, self.head_dim)
        if torch.compiler.is_compiling():  # one opaque op: the metadata never becomes graph input or a guard
            out = torch.ops.atom_trio.paged_attention(positions, query, key, value, self.layer_id)
        else:
            out = self._attend(positions, query, key, value)
        return out.view(-1, self.num_heads * self.head_dim)

    def _attend(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        context = get_forward_context().group(self.kv_group)
        cos_sin_cache, rotary_dim = self.rotary_emb.cos_sin_cache, self.rotary_emb.rotary_dim
        kv_scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        if rotary_dim == self.head_dim:
            query, key = self.ops.rotary_store_kv(
                positions,
                query,
                key,
                value,
                cos_sin_cache,
                self.k_cache,
                self.v_cache,
                context.metadata.slot_mapping,
                **kv_scales,
            )
        else:  # partial rotary: the first rotary_dim features of each head turn, the others pass through
            turned = self.ops.rotary_embedding(positions, query[..., :rotary_dim], key[..., :rotary_dim], cos_sin_cache)
            query, key = (torch.cat((t, x[..., rotary_dim:]), dim=-1) for t, x in zip(turned, (query, key)))
            self.ops.store_kv(key, value, self.k_cache, self.v_cache, context.metadata.slot_mapping, **kv_scales)
        return self.ops.paged_attention(
            query,
            key,
            value,
            self.k_cache,
            self.v_cache,
            context.attn_plan,
            self.scale,
            sinks=self.sinks,
            sliding_window=self.sliding_window,
            **kv_scales,
        )


KV_SCALE_SUFFIXES = {
    "k_scale": ("k_scale",),
    "v_scale": ("v_scale",),
    "kv_scale": ("k_scale", "v_scale"),
    "k_proj.output_scale": ("k_scale",),
    "v_proj.output_scale": ("v_scale",),
}
"""Checkpoint names of the FP8 KV cache scales, after a layer's prefix, and the scales each fills.

``k_scale``/``v_scale`` as llm-compressor (compressed-tensors' ``kv_cache_scheme``) and
vLLM write them; ``kv_scale`` (one for both) and the ``k_proj``/``v_proj`` output scales
as older FP8 checkpoints do."""


def take_kv_scales(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` less the KV cache scales, which go to the attention layers they name as they pass.

    A scale names its layer by the attention module's own path
    (``model.layers.0.self_attn.attn.k_scale``) or by its parent's, the
    Hugging Face attention block (``model.layers.0.self_attn.k_scale``).
    Every rank of a tensor-parallel group takes the same per-tensor scales.
    """
    owners: dict[str, CachedAttention] = {}
    for name, module in model.named_modules():
        if isinstance(module, CachedAttention):
            owners[name] = owners[name.rpartition(".")[0]] = module
    for name, tensor in weights:
        targets = [
            (owners[prefix], scales)
            for suffix, scales in KV_SCALE_SUFFIXES.items()
            if (prefix := name.removesuffix("." + suffix)) != name and prefix in owners
        ]
        if not targets:
            yield name, tensor
            continue
        layer, scales = targets[0]
        try:
            for which in scales:
                layer.load_kv_scale(which, tensor)
        except ValueError as exc:
            raise ModelLoadError(f"checkpoint tensor {name!r}: {exc}") from exc


_layer_ids = itertools.count()
_layers: weakref.WeakValueDictionary[int, CachedAttention] = weakref.WeakValueDictionary()
"""Every live attention layer by ``layer_id``: the custom ops get the layer as an integer, which a graph can hold."""


@torch.library.custom_op("atom_trio::paged_attention", mutates_args=())
def _paged_attention_op(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_id: int
) -> torch.Tensor:
    """`Attention`'s rotate-store-attend step as torch.compile sees it: reads the forward context when it runs.

    The KV cache stays the layer's business, out of the graph: as inputs its
    per-layer views of one allocation would be functionalized into copies of
    the whole cache. Nothing in the graph reads the cache, so its writes
    need no ordering beyond this op's own data dependencies.
    """
    return _layers[layer_id]._attend(positions, query, key, value)


@_paged_attention_op.register_fake
def _(positions, query, key, value, layer_id):
    return torch.empty_like(query)
