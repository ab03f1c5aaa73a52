"""What AITER's Triton kernels need to run on an NVIDIA GPU (or Triton's CPU interpreter): the one compatibility module.

AITER's Triton wrappers ask two small modules about the device:
``aiter.ops.triton.utils._triton.arch_info`` (the AMD arch string, which picks
the FP8 dtypes at import and the tuned tile tables) and
``aiter.ops.triton.utils.device_info`` (compute units, XCDs). As shipped,
``arch_info`` compares the arch with strings (``get_arch() in ("gfx950")``),
which raises on an NVIDIA target (an integer such as 90), and the interpreter
has no GPU to ask. Off ROCm, the loader registers this module under both
names instead of running AITER's, so its functions below are the answers.
Their names are AITER's: the contract test checks that every public function
of both AITER modules is defined here.

The second difference is launch options: AITER's wrappers and tile tables pass
AMD-only options (``waves_per_eu``, ``matrix_instr_nonkdim``, ``kpack``) to
every launch, and Triton's CUDA backend rejects an option it does not know.
`drop_amd_launch_options` makes the kernels of AITER's modules drop them;
nothing else of AITER is changed.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

ANSWERED_ARCH = "gfx950"
"""The AMD arch whose kernels' choices suit NVIDIA: OCP FP8 (``float8_e4m3fn``, as on sm89+), MI350X's tile tables."""

_DEVICE_OF_ARCH = {"gfx942": "MI300X", "gfx950": "MI350X"}


def get_arch() -> str:
    return ANSWERED_ARCH


def get_device() -> str:
    return _DEVICE_OF_ARCH[ANSWERED_ARCH]


def is_fp8_avail() -> bool:
    """FP8 tensor cores: sm89 and later; the interpreter emulates them."""
    return not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 9)


def is_fp4_avail() -> bool:
    """No FP4 kernel of AITER is used off ROCm, and Hopper has no FP4 tensor cores."""
    return False


def get_num_sms() -> int:
    """The GPU's SM count, which AITER's wrappers size grids by; 1 in the CPU interpreter."""
    if not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def get_num_xcds() -> int:
    """AITER remaps program ids over MI300's 8 chiplets; one die is 1, which leaves the order as it is."""
    return 1


@functools.cache
def amd_only_launch_options() -> frozenset[str]:
    """The launch options Triton's AMD backend accepts and its CUDA backend does not (Triton's own option classes)."""
    try:
        from triton.backends.amd.compiler import HIPOptions
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # a Triton build without one of the backends
        return frozenset({"waves_per_eu", "matrix_instr_nonkdim", "kpack", "schedule_hint"})
    amd = {field.name for field in dataclasses.fields(HIPOptions)}
    return frozenset(amd - {field.name for field in dataclasses.fields(CUDAOptions)})


def drop_amd_launch_options(module_prefix: str) -> None:
    """Make every jitted kernel in the loaded modules under ``module_prefix`` ignore AMD-only launch options.

    Each kernel's ``run`` (what ``kernel[grid](...)``, autotuners and
    heuristics all call) gets a filter on its own instance; a kernel taking a
    parameter of that name keeps it. Idempotent. Under the interpreter
    (``TRITON_INTERPRET=1``) kernels are not `JITFunction`s and already ignore
    options they do not know.
    """
    from triton.runtime.jit import JITFunction

    for name, module in list(sys.modules.items()):
        if not name.startswith(module_prefix) or module is None:
            continue
        for value in vars(module).values():
            while hasattr(value, "fn") and not isinstance(value, JITFunction):  # Autotuner, Heuristics
                value = value.fn
            if isinstance(value, JITFunction) and not getattr(value.run, "drops_amd_options", False):
                dropped = amd_only_launch_options() - set(value.arg_names)
                value.run = _without_options(value.run, dropped)


def _without_options(run: Callable[..., Any], dropped: frozenset[str]) -> Callable[..., Any]:
    def run_without_amd_options(*args: Any, **kwargs: Any) -> Any:
        for option in dropped & kwargs.keys():
            del kwargs[option]
        return run(*args, **kwargs)

    run_without_amd_options.drops_amd_options = True  # type: ignore[attr-defined]
    return run_without_amd_options
