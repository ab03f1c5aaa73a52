"""torch.compile of the model's forward on the CPU, chosen by ``EngineConfig.level``.

Per-op dispatch costs ~10 µs on the CPU and a small model's step is
hundreds of small ops, so fusing the elementwise ops (norms, rotary, SiLU,
residual adds) around the matmuls pays. Attention is a custom op that reads
the forward context (see `atom_trio.layers.attention`), so the step's
metadata is neither a graph input nor a guard, and with the token dimension
dynamic one graph serves every batch shape (plus dynamo's own specialization
for a single token: batch-1 decode). Compiling takes ~35 s on 2 cores, at
the first step, hence opt-in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch._inductor.config

from atom_trio.config import EngineConfig

logger = logging.getLogger(__name__)

MAX_LEVEL = 3


def effective_level(config: EngineConfig, device: torch.device) -> int:
    """``config.level``, with None read as 3 on CUDA (graphs) and 0 on the CPU; ``enforce_eager`` gives 0."""
    if config.enforce_eager:
        return 0
    if config.level is None:
        return MAX_LEVEL if device.type == "cuda" else 0
    return config.level


def compiles_on_cpu(device: torch.device, level: int) -> bool:
    """Whether inductor compiles the forward; it then freezes the weights and packs them for oneDNN itself."""
    return device.type == "cpu" and level >= 2


def compile_forward(model: torch.nn.Module, level: int) -> Callable[..., torch.Tensor]:
    """The model's forward at ``level``: 0 eager, 1 dynamo trace only (a check), 2 and 3 inductor."""
    if level == 0:
        return model
    backend = "eager" if level == 1 else "inductor"
    if level >= 2:
        torch._inductor.config.freezing = True  # weights as constants: folded, and prepacked for oneDNN
    logger.info("compiling the model forward with torch.compile (backend %s)", backend)
    compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)

    def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Only the token dimension varies; the weights and everything else stay static shapes.
        torch._dynamo.mark_dynamic(input_ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        return compiled(input_ids, positions)

    return forward
