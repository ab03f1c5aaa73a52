"""Every AITER function the backend calls, with the parameters it passes: one table for backend and contract test.

The backend reaches AITER only through `bind` on an entry here, and a bound
call takes exactly the entry's parameters, by name, in order, and passes them
positionally. The contract test (tests/ops/test_aiter_contract.py) parses the
pinned wheel's sources and checks each entry against the function's
definition: the same module, the same leading parameter names in the same
order, defaults for the rest. An AITER upgrade that renames, reorders or adds
a required parameter fails CI rather than a run on an MI300X.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from . import loader


@attrs.frozen
class AiterCall:
    """One AITER function: its defining module, its name, and the leading parameters the backend passes, in order."""

    module: str
    function: str
    parameters: tuple[str, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.module}.{self.function}"

    def bind(self) -> BoundAiterCall:
        """The function, loaded (`loader.load`), behind a check of the arguments' names and order."""
        return BoundAiterCall(self, getattr(loader.load(self.module), self.function))


@attrs.frozen
class BoundAiterCall:
    call: AiterCall
    function: Callable[..., Any]

    def __call__(self, **arguments: Any) -> Any:
        if tuple(arguments) != self.call.parameters:
            raise TypeError(
                f"{self.call.qualified_name} is called with ({', '.join(arguments)}); "
                f"the call table says ({', '.join(self.call.parameters)})"
            )
        return self.function(*arguments.values())


_RMSNORM_ADD = ("out", "input", "residual_in", "residual_out", "weight", "epsilon")

TRITON_CALLS: dict[str, AiterCall] = {
    "rms_norm": AiterCall("aiter.ops.triton.rmsnorm", "rms_norm", ("input", "weight", "epsilon")),
    "add_rms_norm": AiterCall("aiter.ops.triton.rmsnorm", "rmsnorm2d_fwd_with_add", _RMSNORM_ADD),
    "rotary_embedding": AiterCall(
        "aiter.ops.triton.rope",
        "rope_cached_thd_positions_2c_fwd",
        ("x", "y", "cos", "sin", "positions", "rotate_style", "reuse_freqs_front_part", "nope_first"),
    ),
    "paged_attention": AiterCall(
        "aiter.ops.triton.unified_attention",
        "unified_attention",
        (
            "q",
            "k",
            "v",
            "out",
            "cu_seqlens_q",
            "max_seqlen_q",
            "seqused_k",
            "max_seqlen_k",
            "softmax_scale",
            "causal",
            "window_size",
            "block_table",
            "softcap",
            "q_descale",
            "k_descale",
            "v_descale",
            "alibi_slopes",
            "output_scale",
            "qq_bias",
            "sinks",
        ),
    ),
    "linear": AiterCall("aiter.ops.triton.gemm_a16w16", "gemm_a16w16", ("x", "w", "bias", "dtype")),
    "fp8_block_linear": AiterCall(
        "aiter.ops.triton.gemm_a8w8_blockscale", "gemm_a8w8_blockscale", ("x", "w", "x_scale", "w_scale", "dtype")
    ),
}
"""AITER's Triton kernels, by the `KernelBackend` op they serve: off ROCm, and on ROCm where no compiled op does."""

ROCM_CALLS: dict[str, AiterCall] = {
    "rms_norm": AiterCall("aiter.ops.rmsnorm", "rmsnorm2d_fwd", ("input", "weight", "epsilon")),
    "add_rms_norm": AiterCall("aiter.ops.rmsnorm", "rmsnorm2d_fwd_with_add", _RMSNORM_ADD),
    "silu_and_mul": AiterCall("aiter.ops.activation", "silu_and_mul", ("out", "input")),
}
"""AITER's compiled (HIP/CK) ops, as ATOM calls them: only on ROCm, where they take precedence."""

ROTATE_NEOX = 0
"""``aiter.ops.triton.rope.RotateStyle.NEOX``: dimension ``i`` pairs with ``i + head_dim/2``, as the interface's."""


def calls_for(rocm: bool) -> dict[str, AiterCall]:
    """The function serving each op here: a compiled op on ROCm where there is one, else the Triton kernel."""
    return {**TRITON_CALLS, **ROCM_CALLS} if rocm else dict(TRITON_CALLS)


__all__ = ["ROCM_CALLS", "ROTATE_NEOX", "TRITON_CALLS", "AiterCall", "BoundAiterCall", "calls_for"]
