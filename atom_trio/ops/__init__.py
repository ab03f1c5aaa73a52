"""Kernels behind one interface, with the backend chosen once at start.

``get_backend(name, device)`` picks an implementation (``--kernel-backend``);
the runner builds the model inside ``use_backend(backend)`` and every layer
captures `current_backend()` in its constructor, so the choice is made once,
not per call, and models never name a backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util

import torch

from .._scoped import scoped
from .cpu import CpuBackend
from .interface import AttentionMetadata, ClampedSwiGLU, KernelBackend
from .torch_ref import TorchRefBackend
from .traced import TracedOps

BACKEND_NAMES = ("auto", "torch", "cpu", "triton", "aiter")

_current: contextvars.ContextVar[KernelBackend | None] = contextvars.ContextVar("atom_trio_backend", default=None)


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> KernelBackend:
    """The kernel backend ``name`` for ``device``; ``auto`` picks the fastest one available there.

    ``auto`` is Triton on a GPU (when Triton imports), the CPU backend on the
    CPU, and the torch reference elsewhere. ``torch`` is the reference on any
    device, with none of the CPU backend's C++ kernels. Triton is imported only
    when chosen, so CPU-only installs never need it.
    """
    device = torch.device(device)
    name = backend_name(name, device.type)
    if name == "torch":
        return TorchRefBackend()
    if name == "cpu":
        return CpuBackend()
    if name == "aiter":
        from .aiter import AiterBackend

        return AiterBackend(device)
    from .triton import TritonBackend

    return TritonBackend(device)


def backend_name(name: str, device_type: str) -> str:
    """The backend ``name`` stands for on a ``device_type`` device, or ValueError if it cannot run there.

    Builds nothing, so the engine can check a configuration before it loads
    anything (a Triton backend would open a CUDA context to read the device).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        if device_type == "cuda" and _triton_importable():
            return "triton"
        return "cpu" if device_type == "cpu" else "torch"
    if name == "cpu" and device_type != "cpu":
        raise ValueError(f"kernel backend 'cpu' is not available on {device_type!r}: it runs on the CPU")
    if name == "triton":
        if device_type != "cuda":
            raise ValueError(f"kernel backend 'triton' is not available on {device_type!r}: it needs a CUDA or ROCm GPU")
        if not _triton_importable():
            raise ValueError("kernel backend 'triton' is not available: the triton package is not installed")
    if name == "aiter":
        if device_type != "cuda" or not _triton_importable():
            raise ValueError(f"kernel backend 'aiter' is not available on {device_type!r}: it needs a GPU and Triton")
        if importlib.util.find_spec("aiter") is None:
            raise ValueError("kernel backend 'aiter' is not available: amd-aiter is not installed (pip install 'atom-trio[rocm]')")
    return name


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_backend(backend: KernelBackend) -> contextlib.AbstractContextManager[KernelBackend]:
    """Layers constructed inside this block run their kernels on ``backend``."""
    return scoped(_current, backend)


def current_backend() -> KernelBackend:
    """The backend layers built now should use; outside `use_backend`, the CPU backend.

    That is the torch reference with the CPU's fused kernels, which keep to
    the reference's torch code for tensors on any other device.
    """
    backend = _current.get()
    return backend if backend is not None else CpuBackend()


__all__ = [
    "AttentionMetadata",
    "BACKEND_NAMES",
    "ClampedSwiGLU",
    "CpuBackend",
    "KernelBackend",
    "TorchRefBackend",
    "TracedOps",
    "backend_name",
    "current_backend",
    "get_backend",
    "use_backend",
]
