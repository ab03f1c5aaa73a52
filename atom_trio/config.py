"""Configuration: `EngineConfig` for the engine, `ServerSettings` for the HTTP server.

The names are the ones vLLM and ATOM users already type (``max_num_seqs``,
``gpu_memory_utilization``, ``kv_cache_dtype``, ``level``...), so a flag, an
``ATOM_TRIO_*`` environment variable and a keyword of ``open_engine`` all mean
the same field. Every field is an option: its help text, choices and extra flag
spellings sit beside it, and `atom_trio.options` turns the fields into CLI flags,
env vars, ``--help`` and docs/configuration.md.
"""

from __future__ import annotations

from typing import Any

import attrs
from attrs import validators as v

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


def _field(
    default: Any,
    help_text: str,
    *,
    validator: Any = None,
    choices: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    section: str | None = None,
) -> Any:
    """A field that is also an option; ``section`` starts a new group of the option table at this field.

    A field with ``choices`` accepts only those (they are its validator).
    """
    metadata = {"help": help_text, "choices": choices, "aliases": aliases, "section": section}
    return attrs.field(default=default, validator=v.in_(choices) if choices else validator, metadata=metadata)


@attrs.define(kw_only=True)
class EngineConfig:
    """Everything needed to build an engine.

    ``model=None`` means the built-in default model (SmolLM2-135M-Instruct).
    Fields left at ``None`` are derived from the model or the device when the
    engine starts (``max_model_len`` from the model's context length,
    ``num_kv_blocks`` from free memory).
    """

    model: str | None = _field(
        None, "HF directory, GGUF file or hub id (default: SmolLM2-135M-Instruct)", section="Model"
    )
    tokenizer: str | None = _field(None, "where the tokenizer comes from, as for the model (default: the model)")
    served_model_name: str | None = _field(
        None, "the id clients put in the `model` field (default: the model argument)"
    )
    revision: str | None = _field(None, "hub branch, tag or commit to fetch the model and tokenizer at")
    dtype: str = _field("auto", "weight and activation dtype", choices=_DTYPES)
    load_format: str = _field("auto", "weights format; `dummy` gives random weights", choices=_LOAD_FORMATS)
    seed: int = _field(
        0, "seeds torch's default generator at start-up (sampling without a request seed) and dummy weights"
    )
    device: str = _field("auto", "cpu, cuda, cuda:N or auto (cuda when available, else cpu)")

    block_size: int = _field(16, "tokens per KV cache block", validator=v.gt(0), section="KV cache")
    num_kv_blocks: int | None = _field(None, "KV cache blocks (default: sized from free memory)")
    kv_cache_dtype: str = _field("auto", "KV cache dtype: `auto` (the model's dtype) or that same dtype by name")
    gpu_memory_utilization: float = _field(
        0.9,
        "fraction of the GPU's memory this engine may use; the KV cache gets what weights, activations and graphs "
        "leave of it",
        validator=[v.gt(0.0), v.le(1.0)],
    )
    cpu_kv_cache_space_gb: float = _field(2.0, "GiB of memory for the KV cache on the CPU")
    enable_prefix_caching: bool = _field(True, "reuse the KV blocks of an earlier prompt that shares a prefix")

    max_num_seqs: int = _field(256, "most sequences running at once", validator=v.gt(0), section="Scheduling")
    max_num_batched_tokens: int = _field(
        2048, "most tokens in one step (prefill chunks and decodes together)", validator=v.gt(0)
    )
    max_model_len: int | None = _field(None, "context length (default: the model's)")
    max_queued_requests: int = _field(4096, "waiting requests beyond this are refused with 429", validator=v.gt(0))
    max_logprobs: int = _field(20, "most `logprobs` / `prompt_logprobs` a request may ask for")

    tensor_parallel_size: int = _field(
        1, "GPUs (one worker process each) the model is sharded over", validator=v.gt(0), aliases=("-tp",),
        section="Execution",
    )
    executor: str = _field(
        "auto",
        "`thread`: the model runs in this process; `process`: in worker processes (always with tensor parallelism); "
        "`auto`: processes on a GPU",
        choices=("auto", "thread", "process"),
    )
    kernel_backend: str = _field(
        "auto", "kernel implementation (`auto`: the fastest available on the device)",
        choices=("auto", "torch", "cpu", "triton", "aiter"),
    )
    enforce_eager: bool = _field(False, "no torch.compile and no CUDA graphs (level 0 whatever `--level` says)")
    level: int | None = _field(
        None,
        "torch.compile level: 0 eager, 1 dynamo trace check, 2 whole-graph Inductor, 3 piecewise Inductor (split at "
        "the attention op); on CUDA levels 1-3 also replay decode steps from CUDA graphs. None: 3 on CUDA, 0 on the "
        "CPU (compiling there takes tens of seconds on a few cores, for a few percent)",
        validator=v.optional([v.ge(0), v.le(3)]),
        aliases=("-O",),
    )
    async_scheduling: bool | None = _field(
        None,
        "plan and prepare step N+1 while the device runs step N, reading sampled tokens a step late "
        "(vLLM's `--async-scheduling`). None: on where the model runs on a GPU",
    )
    worker_timeout: float = _field(
        120.0, "seconds a worker process gets to answer (and torch.distributed to connect) before it counts as dead"
    )

    @property
    def model_name(self) -> str:
        """The id clients use in the ``model`` field of API requests."""
        if self.served_model_name:
            return self.served_model_name
        return self.model or DEFAULT_MODEL_NAME


@attrs.define(kw_only=True)
class ServerSettings:
    """How the HTTP server behaves (the engine's own knobs live in `EngineConfig`)."""

    host: str = _field("0.0.0.0", "address to listen on", section="Server")
    port: int = _field(8000, "port to listen on", validator=[v.ge(0), v.le(65535)])
    api_key: str | None = _field(None, "require `Authorization: Bearer KEY` on /v1/* and the profiling routes")
    max_request_bytes: int = _field(16 * 1024 * 1024, "larger request bodies are refused with 413", validator=v.gt(0))
    shutdown_timeout: float = _field(30.0, "seconds in-flight requests get to finish after SIGTERM", validator=v.ge(0))
    keep_alive_timeout: float = _field(75.0, "seconds an idle keep-alive connection stays open", validator=v.gt(0))
    profile_dir: str | None = _field(
        None, "directory for /start_profile + /stop_profile traces",
        aliases=("--torch-profiler-dir", "--torch_profiler_dir"),
    )
    log_level: str = _field(
        "info", "logging level of the `atom-trio` command (and of hypercorn under `serve`)",
        choices=("debug", "info", "warning", "error"),
    )


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
