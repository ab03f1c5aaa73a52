"""The device half of option checking: what `EngineConfig` cannot know without torch.

`EngineConfig` refuses what no device could run; `check_device` refuses what
this machine cannot: a GPU that is not there, more tensor-parallel ranks than
GPUs, kernels that do not run on the device. It runs when the engine starts,
before the tokenizer, the model or a worker process, so a wrong option costs
a second, not a model load. It reads the device without opening a CUDA context
(no backend is built), so the server process holds no GPU memory for it.
"""

from __future__ import annotations

from atom_trio.config import EngineConfig
from atom_trio.errors import InvalidConfig


def check_device(config: EngineConfig) -> None:
    """Refuse ``config`` if this machine cannot run it, in the style of `EngineConfig`'s own checks.

    Raises:
        InvalidConfig: naming the options and what to change.
    """
    import torch

    from atom_trio.ops import backend_name

    kind, _, index = config.device.partition(":")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    elif kind == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None and torch.version.hip is None:
            why = f"this torch {torch.__version__} is built without CUDA or ROCm"
        else:
            why = "no GPU is visible (see nvidia-smi and CUDA_VISIBLE_DEVICES)"
        raise InvalidConfig(f"device {config.device!r} is not available: {why}; use device 'cpu'", options=("device",))
    if kind == "cuda":
        visible = torch.cuda.device_count()
        if index and int(index) >= visible:
            raise InvalidConfig(
                f"device {config.device!r} is not available: {_gpus(visible)} visible", options=("device",)
            )
        tp = config.tensor_parallel_size
        if tp > visible:
            raise InvalidConfig(
                f"tensor_parallel_size {tp} needs {tp} GPUs (one per rank), and {_gpus(visible)} visible",
                options=("tensor_parallel_size",),
            )
    try:
        backend_name(config.kernel_backend, kind)
    except ValueError as exc:
        raise InvalidConfig(str(exc), options=("kernel_backend", "device")) from None


def _gpus(count: int) -> str:
    return f"{count} GPU is" if count == 1 else f"{count} GPUs are"
