"""The CPU backend: the torch reference with fused C++ kernels, built on first use and cached."""

from __future__ import annotations

from .backend import CpuBackend
from .kernels import CpuKernels, load_cpu_kernels

__all__ = ["CpuBackend", "CpuKernels", "load_cpu_kernels"]
