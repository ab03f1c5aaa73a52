"""The tensor-parallel group a layer belongs to, and the two collectives layers need.

Layers capture `current_tp_group()` in their constructors (as they capture
the kernel backend), so a model is written once and the runner decides how
it is split by building it inside `use_tp_group`. At size 1 every collective
returns its input untouched, so a single-rank model pays one attribute check.
"""

from __future__ import annotations

import contextlib
import contextvars

import attrs
import torch
import torch.distributed as dist

from .._scoped import scoped


def _check_rank(group: TensorParallelGroup, attribute: attrs.Attribute, rank: int) -> None:
    if not 0 <= rank < group.size:
        raise ValueError(f"tensor-parallel rank {rank} is outside a group of {group.size}")


@attrs.frozen
class TensorParallelGroup:
    """This process's place in the tensor-parallel group: ``rank`` of ``size``.

    The collectives run on torch.distributed's default group: tensor
    parallelism is the only parallelism here, so the whole world is the group.
    """

    rank: int = attrs.field(default=0, validator=_check_rank)
    size: int = attrs.field(default=1, validator=attrs.validators.gt(0))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of every rank's ``tensor``, in place."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``tensor`` as rank ``src`` holds it, on every rank (in place)."""
        if self.size > 1:
            dist.broadcast(tensor, src=src)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim``, in rank order (same shapes on every rank)."""
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=dim)

    def divide(self, total: int, what: str) -> int:
        """``total`` split evenly across the ranks; a clear error where it does not split."""
        if total % self.size:
            raise ValueError(f"tensor_parallel_size {self.size} does not divide the model's {total} {what}")
        return total // self.size


SINGLE = TensorParallelGroup()
"""One rank holding everything: what layers built outside `use_tp_group` get."""

_current: contextvars.ContextVar[TensorParallelGroup] = contextvars.ContextVar("atom_trio_tp_group", default=SINGLE)


def use_tp_group(group: TensorParallelGroup) -> contextlib.AbstractContextManager[TensorParallelGroup]:
    """Layers constructed inside this block hold (and load) only ``group.rank``'s shard."""
    return scoped(_current, group)


def current_tp_group() -> TensorParallelGroup:
    """The group layers built now belong to (`SINGLE` outside `use_tp_group`)."""
    return _current.get()
