"""Engine configuration: one attrs class whose fields are the CLI flags in snake_case.

The names are the ones vLLM and ATOM users already type (``max_num_seqs``,
``gpu_memory_utilization``, ``kv_cache_dtype``, ``level``...), so a flag, an
``ATOM_TRIO_*`` environment variable and a keyword of ``open_engine`` all mean
the same field.
"""

from __future__ import annotations

import attrs
from attrs import validators as v

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


@attrs.define(kw_only=True)
class EngineConfig:
    """Everything needed to build an engine.

    ``model=None`` means the built-in default model (SmolLM2-135M-Instruct).
    Fields left at ``None`` are derived from the model or the device when the
    engine starts (``max_model_len`` from the model's context length,
    ``num_kv_blocks`` from free memory).
    """

    model: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    revision: str | None = None
    dtype: str = attrs.field(default="auto", validator=v.in_(_DTYPES))
    load_format: str = attrs.field(default="auto", validator=v.in_(_LOAD_FORMATS))
    seed: int = 0
    device: str = "auto"

    # KV cache
    block_size: int = attrs.field(default=16, validator=v.gt(0))
    num_kv_blocks: int | None = None
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = attrs.field(default=0.9, validator=[v.gt(0.0), v.le(1.0)])
    cpu_kv_cache_space_gb: float = 2.0
    enable_prefix_caching: bool = True

    # scheduling
    max_num_seqs: int = attrs.field(default=256, validator=v.gt(0))
    max_num_batched_tokens: int = attrs.field(default=2048, validator=v.gt(0))
    max_model_len: int | None = None
    max_queued_requests: int = attrs.field(default=4096, validator=v.gt(0))
    max_logprobs: int = 20

    # execution
    tensor_parallel_size: int = attrs.field(default=1, validator=v.gt(0))
    executor: str = attrs.field(default="auto", validator=v.in_(("auto", "thread", "process")))
    kernel_backend: str = attrs.field(default="auto", validator=v.in_(("auto", "torch", "triton", "aiter")))
    enforce_eager: bool = False
    level: int | None = attrs.field(default=None, validator=v.optional([v.ge(0), v.le(3)]))
    """torch.compile level: 0 eager, 1 dynamo trace check, 2 whole-graph Inductor, 3 piecewise Inductor (split at
    the attention op); on CUDA levels 1-3 also replay decode steps from CUDA graphs. None: 3 on CUDA, 0 on the CPU
    (compiling there takes tens of seconds on a few cores, for a few percent)."""
    async_scheduling: bool | None = None
    """Plan and prepare step N+1 while the device runs step N, reading sampled tokens a step late
    (vLLM's ``--async-scheduling``). None: on where the model runs on a GPU."""
    worker_timeout: float = 120.0

    @property
    def model_name(self) -> str:
        """The id clients use in the ``model`` field of API requests."""
        if self.served_model_name:
            return self.served_model_name
        return self.model or DEFAULT_MODEL_NAME


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
