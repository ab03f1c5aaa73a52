"""The paged KV cache: what a block costs, how many blocks a memory budget holds, and the cache's allocation.

One tensor ``[tensors, layers, *layout]`` holds every attention layer's
cache, each layer's tensors as the layer declares them
(`CachedAttention.kv_cache_shapes`): K and V per head, ``[2, layers,
*backend layout]``, or one latent vector a token for multi-head latent
attention, ``[1, layers, *latent layout]``; each layer gets views of its own.
A block's bytes follow from the same declaration, so the budget is counted in
the units the model caches. A GPU's budget is
``gpu_memory_utilization`` of the card less everything else: the weights,
the peak activations of the largest step and the decode CUDA graphs (both
measured at start-up, see `atom_trio.runner.startup`), and memory other
processes and libraries hold. The CPU's is ``cpu_kv_cache_space_gb``.

A model whose layers attend in several ways (full attention beside a sliding
window: GPT-OSS) has one KV cache group per way (`atom_trio.core.BlockManager`).
The groups share one pool of pages: slot ``i`` of the tensor's layer axis holds
the ``i``-th layer of every group, so a page holds one group's layers, and
a page is the full group's or a sliding group's as the block manager hands it
out. A sliding group keeps only its window's pages per sequence, so the pool
holds about ``layers / slots`` times the tokens (twice for GPT-OSS) of a cache
that keeps every position in every layer. One page more, past the pool, is the
null page that released table entries name: never written, it stays zero.

An FP8 cache (``kv_cache_dtype`` "fp8") stores one byte an element, so the
same budget holds twice the blocks of a 16-bit cache; each layer's keys and
values carry per-tensor scales (`CachedAttention.k_scale`), the checkpoint's
or 1.0.
"""

from __future__ import annotations

import logging
import math
import mmap

import attrs
import torch

from atom_trio.config import FP8_KV_CACHE_DTYPES, EngineConfig
from atom_trio.errors import ModelLoadError
from atom_trio.layers import CachedAttention

logger = logging.getLogger("atom_trio.runner")


FP8_KV_CACHE_DTYPE = torch.float8_e4m3fn


def kv_cache_dtype(config: EngineConfig, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type: float8 e4m3 for ``kv_cache_dtype`` "fp8", else the model's ("auto" or its name).

    `EngineConfig` refuses other names and a ``dtype`` that differs; what is
    left to check is the dtype a model with ``dtype`` "auto" turned out to have.
    """
    if config.kv_cache_dtype in FP8_KV_CACHE_DTYPES:
        return FP8_KV_CACHE_DTYPE
    name = str(model_dtype).removeprefix("torch.")
    if config.kv_cache_dtype not in ("auto", name):
        raise ModelLoadError(
            f"kv_cache_dtype {config.kv_cache_dtype!r} differs from the model's dtype {name}: the KV cache holds the "
            f"model's dtype; use kv_cache_dtype 'auto', or dtype {config.kv_cache_dtype!r} for both"
        )
    return model_dtype


@attrs.define(kw_only=True)
class KVCacheLayout:
    """Allocates the KV cache of a model's attention ``layers``, as they declare it, and binds each layer's views."""

    layers: list[CachedAttention]
    block_size: int
    dtype: torch.dtype
    device: torch.device

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The KV cache groups: ``(None,)`` when every layer attends alike, else ``None`` (full) then each window."""
        kinds = {layer.sliding_window for layer in self.layers}
        if len(kinds) <= 1:
            return (None,)
        return (None, *sorted(kinds - {None}))

    def _slots(self) -> list[tuple[int, int]]:
        """Each layer's KV cache group and its slot on the tensor's layer axis (its index among the group's layers)."""
        windows = self.windows
        if len(windows) == 1:
            return [(0, i) for i in range(len(self.layers))]
        counts = [0] * len(windows)
        slots = []
        for layer in self.layers:
            group = windows.index(layer.sliding_window)
            slots.append((group, counts[group]))
            counts[group] += 1
        return slots

    @property
    def num_slots(self) -> int:
        """Layers a page holds: the most of any group (every layer for one group)."""
        return 1 + max((slot for _, slot in self._slots()), default=-1)

    def __attrs_post_init__(self) -> None:
        if self.dtype != FP8_KV_CACHE_DTYPE:
            return
        if missing := sorted({layer.ops.name for layer in self.layers if not layer.ops.supports_fp8_kv_cache}):
            raise ModelLoadError(
                f"kv_cache_dtype fp8: kernel backend {', '.join(missing)} has no FP8 KV cache; use kv_cache_dtype "
                "'auto' or another kernel backend"
            )
        if unscaled := sum(not layer.kv_scales_loaded for layer in self.layers):
            logger.warning(
                "FP8 KV cache: the checkpoint has no k_scale/v_scale for %d of %d attention layers; they use 1.0 "
                "(values beyond +-448 saturate)",
                unscaled,
                len(self.layers),
            )

    def layer_shapes(self, num_blocks: int) -> tuple[tuple[int, ...], ...]:
        """The cache tensors each layer keeps for ``num_blocks`` blocks; every layer must declare the same."""
        shapes = {layer.kv_cache_shapes(num_blocks, self.block_size) for layer in self.layers}
        if len(shapes) != 1:
            raise ModelLoadError(f"attention layers with different caches ({sorted(shapes)}) are not supported")
        return shapes.pop()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: what a page's layers (every layer, for one group) cache for ``block_size`` tokens."""
        per_layer = sum(math.prod(shape) for shape in self.layer_shapes(1))
        return self.num_slots * per_layer * self.dtype.itemsize

    def allocate(self, num_blocks: int) -> torch.Tensor:
        """One tensor ``[tensors, slots, *layout]``; each layer gets views of its own (its group's slot).

        With several KV cache groups it holds ``num_blocks + 1`` pages: the last is the null page.

        Zeroed, because the decode path reads whole blocks, and a never-written
        slot must be finite for its (masked, zero-weight) value row to vanish.
        On the CPU the zeros are the operating system's: `torch.zeros` would
        write every page of a cache of gigabytes at start (seconds), while an
        anonymous mapping reads as zeros and takes memory only for the pages
        the cache writes.
        """
        slots = self._slots()
        tensors = self.layer_shapes(num_blocks + (len(self.windows) > 1))
        shape = (len(tensors), self.num_slots, *tensors[0])
        if any(t != tensors[0] for t in tensors):
            raise ModelLoadError(f"an attention layer's cache tensors differ in shape: {tensors}")
        if self.device.type == "cpu":
            pages = mmap.mmap(-1, math.prod(shape) * self.dtype.itemsize)  # the tensor keeps the mapping alive
            kv = torch.frombuffer(pages, dtype=self.dtype).view(shape)
        else:
            kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for attn, (group, slot) in zip(self.layers, slots):
            attn.kv_group = group
            attn.bind_kv_cache(*kv[:, slot])
        return kv

    def unbind(self) -> None:
        """Take the layers' views away, so that a temporary cache is freed with its last reference."""
        for attn in self.layers:
            attn.bind_kv_cache(*(torch.empty(0) for _ in self.layer_shapes(1)))

    def blocks_within(self, budget: float, where: str) -> int:
        """How many blocks ``budget`` bytes hold (``where`` says where the budget came from, for the log and errors)."""
        blocks = int(budget // self.block_bytes)
        if blocks < 1:
            raise ValueError(f"no memory left for the KV cache with {where}; raise it or set num_kv_blocks")
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB, %s: %d bytes an element) with %s",
            blocks,
            self.block_size,
            blocks * self.block_size,
            blocks * self.block_bytes / 2**30,
            str(self.dtype).removeprefix("torch."),
            self.dtype.itemsize,
            where,
        )
        return blocks

    def log_groups(self, num_blocks: int, max_model_len: int) -> None:
        """Log the KV cache groups, and how many more tokens their pool holds than one that keeps every layer's.

        The gain is counted for sequences of ``max_model_len`` tokens: each
        takes its length in full-group blocks, and a sliding group's window
        (at most ``ceil(W / block_size) + 1`` blocks).
        """
        windows = self.windows
        if len(windows) == 1:
            return
        size = self.block_size
        counts = [sum(1 for group, _ in self._slots() if group == g) for g in range(len(windows))]
        blocks = -(-max_model_len // size)
        pages = blocks + sum(min(blocks, -(-w // size) + 1) for w in windows[1:])
        # per sequence: today every layer keeps every block; here `pages` pages of `num_slots` layers
        ratio = blocks * len(self.layers) / (pages * self.num_slots)
        logger.info(
            "KV cache groups: full attention (%d layers) and sliding windows %s (%s layers) share %d pages of %d "
            "layers; at %d tokens a sequence: %.2fx the tokens of a cache that keeps every position in every layer",
            counts[0],
            list(windows[1:]),
            counts[1:],
            num_blocks,
            self.num_slots,
            max_model_len,
            ratio,
        )


def gpu_budget(config: EngineConfig, device: torch.device, *, peak: int, graph_bytes: int) -> tuple[float, str]:
    """Bytes for the KV cache on a GPU, and where they came from.

    ``peak``: bytes allocated at the largest step's peak (weights included);
    ``graph_bytes``: what the decode graphs will hold.
    """
    free, total = torch.cuda.mem_get_info(device)
    not_torch = total - free - torch.cuda.memory_reserved(device)
    budget = total * config.gpu_memory_utilization - peak - not_torch - graph_bytes
    return budget, f"gpu_memory_utilization={config.gpu_memory_utilization} of {total / 2**30:.1f} GiB"


def cpu_budget(config: EngineConfig) -> tuple[float, str]:
    """Bytes for the KV cache on the CPU, and where they came from."""
    return config.cpu_kv_cache_space_gb * 2**30, f"cpu_kv_cache_space_gb={config.cpu_kv_cache_space_gb}"
