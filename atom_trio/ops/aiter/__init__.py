"""The ``aiter`` kernel backend: AMD's AITER kernels (compiled ops on ROCm, its Triton kernels elsewhere).

Imported only when the backend is chosen (as ``ops.triton`` is); AITER's own
modules load when `AiterBackend` is built, through `loader`.
"""

from __future__ import annotations

from .backend import FALLBACK_OPS, AiterBackend
from .calls import ROCM_CALLS, ROTATE_NEOX, TRITON_CALLS, AiterCall, BoundAiterCall, calls_for
from .loader import PINNED_VERSION, aiter_root, load, on_rocm

__all__ = [
    "FALLBACK_OPS",
    "PINNED_VERSION",
    "ROCM_CALLS",
    "ROTATE_NEOX",
    "TRITON_CALLS",
    "AiterBackend",
    "AiterCall",
    "BoundAiterCall",
    "aiter_root",
    "calls_for",
    "load",
    "on_rocm",
]
