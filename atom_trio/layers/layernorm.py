"""RMSNorm, with the residual add fused in (the pre-norm transformer's hot pair)."""

from __future__ import annotations

import torch
from torch import nn

from atom_trio.ops import current_backend


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``; called with a residual, returns ``(norm(x + residual), x + residual)``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.ops = current_backend()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rms_norm(x, self.weight, self.eps, residual)
