"""Host-to-device copies that do not wait for the device; shared by the sampler and the runner."""

from __future__ import annotations

import torch


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy host data to `device` without a host sync.

    A pageable host-to-CUDA copy waits for the stream to drain; a pinned,
    non-blocking one is queued (the caching host allocator keeps the pinned
    buffer alive until the copy has run).
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
