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
        """Bytes of one block: what every layer caches for ``block_size`` tokens."""
        per_layer = sum(math.prod(shape) for shape in self.layer_shapes(1))
        return len(self.layers) * per_layer * self.dtype.itemsize

    def allocate(self, num_blocks: int) -> torch.Tensor:
        """One tensor ``[tensors, layers, *layout]``; each layer gets views of its own.

        Zeroed, because the decode path reads whole blocks, and a never-written
        slot must be finite for its (masked, zero-weight) value row to vanish.
        On the CPU the zeros are the operating system's: `torch.zeros` would
        write every page of a cache of gigabytes at start (seconds), while an
        anonymous mapping reads as zeros and takes memory only for the pages
        the cache writes.
        """
        tensors = self.layer_shapes(num_blocks)
        shape = (len(tensors), len(self.layers), *tensors[0])
        if any(t != tensors[0] for t in tensors):
            raise ModelLoadError(f"an attention layer's cache tensors differ in shape: {tensors}")
        if self.device.type == "cpu":
            pages = mmap.mmap(-1, math.prod(shape) * self.dtype.itemsize)  # the tensor keeps the mapping alive
            kv = torch.frombuffer(pages, dtype=self.dtype).view(shape)
        else:
            kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.layers):
            attn.bind_kv_cache(*kv[:, i])
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
