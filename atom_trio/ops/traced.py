"""`TracedOps`: what `KernelBackend.traced` gives by default, the kernels of a model that torch.compile traces."""

from __future__ import annotations

from .interface import KernelBackend
from .torch_ref import TorchRefBackend


class TracedOps(KernelBackend):
    """The device backend's attention (latent attention too), rotary embedding and KV store; plain torch for the rest.

    The attention-side ops run behind the opaque attention op, outside the
    graph, so they keep the device backend's kernels. The norms, SiLU and
    matmuls are traced: plain torch, which Inductor fuses with their
    neighbours. A backend with faster kernels of its own for those overrides
    them in a subclass (as opaque custom ops).
    """

    def __init__(self, device_backend: KernelBackend) -> None:
        self.device_backend = device_backend
        self.name = device_backend.name
        self.supports_fp8_kv_cache = device_backend.supports_fp8_kv_cache
        self._torch = TorchRefBackend()

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return self.device_backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    def plan_attention(self, metadata, **kwargs):
        return self.device_backend.plan_attention(metadata, **kwargs)

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping, **kv_scales) -> None:
        self.device_backend.store_kv(key, value, k_cache, v_cache, slot_mapping, **kv_scales)

    def paged_attention(self, query, key, value, k_cache, v_cache, plan, scale, **options):
        return self.device_backend.paged_attention(query, key, value, k_cache, v_cache, plan, scale, **options)

    def latent_cache_shape(self, num_blocks, block_size, latent_dim):
        return self.device_backend.latent_cache_shape(num_blocks, block_size, latent_dim)

    def store_latent(self, latent, cache, slot_mapping, **cache_scale) -> None:
        self.device_backend.store_latent(latent, cache, slot_mapping, **cache_scale)

    def mla_attention(self, query, latent, cache, kv_b, plan, scale, **cache_scale):
        return self.device_backend.mla_attention(query, latent, cache, kv_b, plan, scale, **cache_scale)

    def rms_norm(self, x, weight, eps, residual=None):
        return self._torch.rms_norm(x, weight, eps, residual)

    def rotary_embedding(self, positions, query, key, cos_sin_cache):
        return self.device_backend.rotary_embedding(positions, query, key, cos_sin_cache)

    def rotary_store_kv(
        self, positions, query, key, value, cos_sin_cache, k_cache, v_cache, slot_mapping, **kv_scales
    ):
        # Like store_kv, inside the opaque attention op.
        return self.device_backend.rotary_store_kv(
            positions, query, key, value, cos_sin_cache, k_cache, v_cache, slot_mapping, **kv_scales
        )

    def silu_and_mul(self, x):
        return self._torch.silu_and_mul(x)
