"""Configuration: `EngineConfig` for the engine, `ServerSettings` for the HTTP server.

The names are the ones vLLM and ATOM users already type (``max_num_seqs``,
``gpu_memory_utilization``, ``kv_cache_dtype``, ``level``...), so a flag, an
``ATOM_TRIO_*`` environment variable and a keyword of ``open_engine`` all mean
the same field. Every field is an option: its help text, choices and extra flag
spellings sit beside it, and `atom_trio.options` turns the fields into CLI flags,
env vars, ``--help`` and docs/configuration.md.

Both classes check themselves when built, so a flag, an env var and a keyword
fail alike and at once, with `InvalidConfig`: each field's type and range,
and combinations this build cannot run. What depends on the device (is there a
GPU, how many, which kernels run there) is checked when the engine starts,
before anything loads (`atom_trio.executor.check_device`).

No ``from __future__ import annotations`` here: the type checks read each
field's annotation as a type.
"""

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, get_args

import attrs

from .errors import InvalidConfig

_DTYPES = ("auto", "float32", "bfloat16", "float16")
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
"""The names of the FP8 (e4m3, per-tensor scales) KV cache: vLLM's spellings."""
_KV_CACHE_DTYPES = (*_DTYPES, *FP8_KV_CACHE_DTYPES)
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

#: The tool-call parsers of ``--tool-call-parser`` (vLLM's names; `atom_trio.server.tool_parsers` has one for each).
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "deepseek_v3", "glm45", "kimi_k2", "openai")
#: The reasoning parsers of ``--reasoning-parser`` (`atom_trio.server.reasoning` has one for each).
REASONING_PARSERS = ("qwen3", "deepseek_r1", "openai_gptoss")

#: The weight quantization schemes of ``--quantization`` (the ``quant_method`` names of config.json).
QUANTIZATIONS = ("fp8", "compressed-tensors", "gptq", "awq", "mxfp4")

# Where an option is read: `atom-trio serve`, `atom-trio generate`, and the app `hypercorn atom_trio.app:app` imports.
COMMANDS = ("serve", "generate", "app")


def _must(test: Callable[[Any], bool], requirement: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    """A validator: ``test(value)`` holds, or `InvalidConfig` says the field ``must be <requirement>``.

    None passes: an optional field's None means "derive it when the engine starts".
    """

    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not test(value):
            raise InvalidConfig(f"{attribute.name} must be {requirement}; got {value!r}", options=(attribute.name,))

    return validate


def _one_of(choices: tuple[str, ...], why: str = "") -> Callable[[Any, attrs.Attribute, Any], None]:
    return _must(lambda value: value in choices, "one of " + ", ".join(choices) + why)


def _kv_cache_dtype(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value == "fp8_e5m2":  # vLLM has it; say why it is refused rather than only that it is no choice
        raise InvalidConfig(
            "kv_cache_dtype 'fp8_e5m2' is not supported: the FP8 KV cache is e4m3 with per-tensor scales; use "
            "'fp8' (or 'fp8_e4m3')",
            options=(attribute.name,),
        )
    _one_of(_KV_CACHE_DTYPES)(instance, attribute, value)


_POSITIVE = _must(lambda n: n > 0, "positive")


def _field(
    default: Any,
    help_text: str,
    *,
    validator: Any = None,
    choices: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    section: str | None = None,
    commands: tuple[str, ...] | None = None,
    hypercorn: str | None = None,
    converter: Callable[[Any], Any] | None = None,
) -> Any:
    """A field that is also an option; ``section`` starts a new group of the option table at this field.

    A field with ``choices`` accepts only those (unless ``validator`` says more
    about them). ``commands`` lists where the option is read (None: every
    command that has its class, see `atom_trio.options`); an option the app
    does not read names the ``hypercorn`` flag that does its job there.
    """
    metadata = {
        "help": help_text, "choices": choices, "aliases": aliases, "section": section, "commands": commands,
        "hypercorn": hypercorn,
    }
    if choices and validator is None:
        validator = _one_of(choices)
    return attrs.field(default=default, validator=validator, metadata=metadata, converter=converter)


KIND_NAMES = {int: "an integer", float: "a number", str: "a non-empty string", bool: "true or false"}
"""What a value of each option type is called in messages."""


def _type_check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """``value`` has the field's type: an int field takes no bool or float, a str field no empty string."""
    args = get_args(attribute.type)  # (kind, NoneType) for an optional field
    if value is None and type(None) in args:
        return
    kind = next(k for k in args or (attribute.type,) if k is not type(None))
    if isinstance(value, bool):
        ok = kind is bool
    elif kind is float:
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, kind) and value != ""
    if not ok:
        raise InvalidConfig(f"{attribute.name} must be {KIND_NAMES[kind]}; got {value!r}", options=(attribute.name,))


def _type_checked(cls: type, fields: list[attrs.Attribute]) -> list[attrs.Attribute]:
    """Every field checks its type before its own validator runs (which may compare the value)."""
    return [f.evolve(validator=attrs.validators.and_(_type_check, *filter(None, [f.validator]))) for f in fields]


#: Speculative-decoding methods, as vLLM and ATOM name them.
SPECULATIVE_METHODS = ("ngram", "eagle", "eagle3", "mtp")
#: The methods whose drafts come from a draft model (``draft_model``); the others need none.
SPECULATIVE_METHODS_WITH_DRAFT_MODEL = ("eagle", "eagle3")


def _spec_error(message: str) -> InvalidConfig:
    return InvalidConfig(f"speculative_config: {message}", options=("speculative_config",))


@attrs.frozen(kw_only=True)
class SpeculativeConfig:
    """How decoding speculates: vLLM's ``speculative_config`` (``{"method": "ngram", "num_speculative_tokens": 3}``).

    ``ngram`` (prompt lookup) drafts the tokens that followed the latest
    earlier occurrence of the sequence's last ``n`` tokens, ``n`` from
    ``prompt_lookup_max`` down to ``prompt_lookup_min``. Unset lookup bounds
    follow vLLM: both 5 when neither is given, else the one given. ``eagle``
    and ``eagle3`` draft with an EAGLE or EAGLE-3 head, ``draft_model``
    (vLLM's ``model``), reading the target's hidden states; ``mtp`` with the
    multi-token-prediction layer in a DeepSeek-V3 target's own checkpoint
    (no draft model). Either way the target verifies up to
    ``num_speculative_tokens`` drafts in one step, so outputs keep the target's
    distribution exactly.

    Raises:
        InvalidConfig: an unknown method or field, or a bad value.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int
    prompt_lookup_max: int
    draft_model: str | None = None

    @classmethod
    def parse(cls, value: "SpeculativeConfig | Mapping[str, Any] | str | None") -> "SpeculativeConfig | None":
        """A config from a dict (``open_engine(speculative_config={...})``) or its JSON text (the CLI, env var)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            if value.strip().lower() in ("", "none", "null"):
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise _spec_error(f"not valid JSON ({exc})") from None
        if not isinstance(value, Mapping):
            raise _spec_error(f"expected an object such as {{\"method\": \"ngram\", \"num_speculative_tokens\": 3}}; got {value!r}")
        fields = dict(value)
        unknown = sorted(set(fields) - {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                                        "draft_model", "model"})
        if unknown:
            raise _spec_error(f"unknown field(s) {', '.join(unknown)}; known: method, num_speculative_tokens, "
                              "prompt_lookup_min, prompt_lookup_max, draft_model (or model)")
        if "model" in fields:  # vLLM's spelling of the draft model
            if fields.get("draft_model") is not None:
                raise _spec_error("give the draft model once, as draft_model or model")
            fields["draft_model"] = fields.pop("model")
        method = fields.get("method")
        if method not in SPECULATIVE_METHODS:
            raise _spec_error(f"method must be one of {', '.join(SPECULATIVE_METHODS)}; got {method!r}")
        draft_model = fields.get("draft_model")
        if method in SPECULATIVE_METHODS_WITH_DRAFT_MODEL:
            if not isinstance(draft_model, str) or not draft_model:
                raise _spec_error(
                    f"method {method!r} needs a draft model (draft_model, or --draft-model); got {draft_model!r}"
                )
        elif draft_model is not None:
            raise _spec_error(f"method {method!r} takes no draft model; got {draft_model!r}")
        k = fields.get("num_speculative_tokens")
        if type(k) is not int or not 1 <= k <= 16:
            raise _spec_error(f"num_speculative_tokens must be an integer in [1, 16]; got {k!r}")
        low, high = fields.get("prompt_lookup_min"), fields.get("prompt_lookup_max")
        low, high = (5, 5) if low is None and high is None else (high if low is None else low, low if high is None else high)
        for name, n in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
            if type(n) is not int or n < 1:
                raise _spec_error(f"{name} must be a positive integer; got {n!r}")
        if low > high:
            raise _spec_error(f"prompt_lookup_min {low} is above prompt_lookup_max {high}")
        return cls(method=method, num_speculative_tokens=k, prompt_lookup_min=low, prompt_lookup_max=high,
                   draft_model=draft_model)

    def __str__(self) -> str:
        """The JSON an env var or ``--speculative-config`` would hold."""
        return json.dumps(attrs.asdict(self, filter=lambda a, v: v is not None))


@attrs.define(kw_only=True, field_transformer=_type_checked)
class EngineConfig:
    """Everything needed to build an engine.

    ``model=None`` means the built-in default model (SmolLM2-135M-Instruct).
    Fields left at ``None`` are derived from the model or the device when the
    engine starts (``max_model_len`` from the model's context length,
    ``num_kv_blocks`` from free memory).

    Raises:
        InvalidConfig: a field's type or range, or a combination of fields
            (`check_combinations`); ``options`` names the fields.
    """

    model: str | None = _field(
        None, "HF directory, GGUF file or hub id (default: SmolLM2-135M-Instruct)", section="Model"
    )
    tokenizer: str | None = _field(None, "where the tokenizer comes from, as for the model (default: the model)")
    served_model_name: str | None = _field(
        None, "the id clients put in the `model` field (default: the model argument)"
    )
    revision: str | None = _field(None, "hub branch, tag or commit to fetch the model and tokenizer at")
    trust_remote_code: bool = _field(
        False,
        "run the tokenizer code a checkpoint ships (named by tokenizer_config.json's `auto_map`, as Kimi-K2's "
        "tiktoken tokenizer is); a checkpoint's config and model code never runs, with or without it",
    )
    dtype: str = _field("auto", "weight and activation dtype", choices=_DTYPES)
    load_format: str = _field("auto", "weights format; `dummy` gives random weights", choices=_LOAD_FORMATS)
    quantization: str | None = _field(
        None,
        "quantized weights: by default the scheme of config.json's `quantization_config`; a scheme named here must be "
        "the checkpoint's, except `fp8`, which quantizes an unquantized checkpoint as it loads (per-channel FP8 "
        "weights, dynamic per-token FP8 activations)",
        choices=QUANTIZATIONS,
    )
    seed: int = _field(
        0, "seeds torch's default generator at start-up (sampling without a request seed) and dummy weights",
        validator=_must(lambda n: -(2**63) <= n < 2**64, "within [-2**63, 2**64) (torch's seed range)"),
    )
    device: str = _field(
        "auto",
        "cpu, cuda, cuda:N or auto (cuda when available, else cpu); the engine checks it against the visible GPUs "
        "before anything loads",
        validator=_must(_DEVICE.fullmatch, "auto, cpu, cuda or cuda:N"),
    )
    cpu_threads: int = _field(
        0,
        "intra-op threads of a model on the CPU; 0: one per core this process may use (or OMP_NUM_THREADS), fewer "
        "while other processes keep cores busy, so a shared box slows the engine in proportion to the CPU it takes "
        "instead of stalling every parallel region on a preempted thread",
        validator=_must(lambda n: n >= 0, "0 (follow the free cores) or a thread count"),
    )

    block_size: int = _field(
        16, "tokens per KV cache block (every kernel backend takes any size)", validator=_POSITIVE, section="KV cache"
    )
    num_kv_blocks: int | None = _field(
        None,
        "KV cache blocks (default: sized from `gpu_memory_utilization` or `cpu_kv_cache_space_gb`, which a set "
        "value takes the place of)",
        validator=_POSITIVE,
    )
    kv_cache_dtype: str = _field(
        "auto",
        "KV cache dtype: `auto` or the model's dtype by name, or `fp8` (alias `fp8_e4m3`): float8 e4m3 with a "
        "per-tensor scale for each layer's keys and values (the checkpoint's `k_scale`/`v_scale`, else 1.0), "
        "half the bytes of a 16-bit cache, so twice the blocks in the same memory",
        choices=_KV_CACHE_DTYPES,
        validator=_kv_cache_dtype,
    )
    gpu_memory_utilization: float = _field(
        0.9,
        "fraction of the GPU's memory this engine may use; the KV cache gets what weights, activations and graphs "
        "leave of it",
        validator=_must(lambda x: 0 < x <= 1, "in (0, 1]"),
    )
    cpu_kv_cache_space_gb: float = _field(2.0, "GiB of memory for the KV cache on the CPU", validator=_POSITIVE)
    enable_prefix_caching: bool = _field(True, "reuse the KV blocks of an earlier prompt that shares a prefix")

    max_num_seqs: int = _field(256, "most sequences running at once", validator=_POSITIVE, section="Scheduling")
    max_num_batched_tokens: int = _field(
        2048,
        "most tokens in one step (prefill chunks and decodes together); a longer prompt is prefilled in chunks, so "
        "it may be below `max_model_len`",
        validator=_POSITIVE,
    )
    max_model_len: int | None = _field(
        None,
        "context length (default: the model's, capped at what the KV cache holds); with `num_kv_blocks` set, it "
        "must fit `num_kv_blocks * block_size`",
        validator=_POSITIVE,
    )
    max_queued_requests: int = _field(4096, "waiting requests beyond this are refused with 429", validator=_POSITIVE)
    max_logprobs: int = _field(
        20, "most `logprobs` / `prompt_logprobs` a request may ask for", validator=_must(lambda n: n >= 0, ">= 0")
    )

    tensor_parallel_size: int = _field(
        1,
        "ranks (one worker process each) the model is sharded over: on CUDA one GPU each, at most the GPUs visible, "
        "with `device` cuda or auto (rank r on GPU r)",
        validator=_POSITIVE,
        aliases=("-tp",),
        section="Parallelism",
    )
    enable_expert_parallel: bool = _field(
        False,
        "mixture-of-experts layers: each tensor-parallel rank holds whole experts (1/N of them) instead of 1/N of "
        "every expert; attention and dense layers stay tensor-parallel. With one rank, or a model without experts, "
        "the layout is the same either way",
    )
    executor: str = _field(
        "auto",
        "`thread`: the model runs in this process (one rank: not with tensor parallelism); `process`: in worker "
        "processes, one per rank; `auto`: processes on a GPU or with tensor parallelism, else a thread",
        choices=("auto", "thread", "process"),
    )
    worker_timeout: float = _field(
        120.0,
        "seconds a worker process gets to answer (and torch.distributed to connect) before it counts as dead",
        validator=_POSITIVE,
    )

    kernel_backend: str = _field(
        "auto",
        "kernel implementation (`auto`: the fastest available on the device; `triton` needs a GPU, `cpu` the CPU, "
        "`aiter` a GPU and amd-aiter: AMD's kernels, ours where it has none)",
        choices=("auto", "torch", "cpu", "triton", "aiter"),
        section="Compilation",
    )
    enforce_eager: bool = _field(
        False, "no torch.compile and no CUDA graphs: level 0 (with `--level` 1-3 it is an error, not an override)"
    )
    level: int | None = _field(
        None,
        "torch.compile level: 0 eager, 1 dynamo trace check, 2 whole-graph Inductor, 3 piecewise Inductor (split at "
        "the attention op); on CUDA levels 1-3 also replay decode steps from CUDA graphs. None: 3 on CUDA, 0 on the "
        "CPU (compiling there takes tens of seconds on a few cores, for a few percent), 0 with `--enforce-eager`",
        validator=_must(lambda n: 0 <= n <= 3, "0, 1, 2 or 3"),
        aliases=("-O",),
    )
    async_scheduling: bool | None = _field(
        None,
        "plan and prepare step N+1 while the device runs step N, reading sampled tokens a step late "
        "(vLLM's `--async-scheduling`). None: on where the model runs on a GPU",
    )
    speculative_config: SpeculativeConfig | None = _field(
        None,
        "speculative decoding, as JSON: `{\"method\": \"ngram\", \"num_speculative_tokens\": 3, "
        "\"prompt_lookup_min\": 2, \"prompt_lookup_max\": 5}` (prompt lookup; the target verifies the drafts "
        "exactly, by rejection sampling). ATOM's `--method`, `--num-speculative-tokens` and `--draft-model` set "
        "its fields too; `{\"method\": \"eagle\", \"num_speculative_tokens\": 3, \"draft_model\": PATH}` "
        "drafts with an EAGLE head (eagle3: an EAGLE-3 head); `{\"method\": \"mtp\", \"num_speculative_tokens\": 1}` "
        "with a DeepSeek-V3 checkpoint's own multi-token-prediction layer",
        section="Speculative decoding",
        converter=SpeculativeConfig.parse,
    )

    def __attrs_post_init__(self) -> None:
        check_combinations(self)

    @property
    def model_name(self) -> str:
        """The id clients use in the ``model`` field of API requests."""
        if self.served_model_name:
            return self.served_model_name
        return self.model or DEFAULT_MODEL_NAME


def check_combinations(config: EngineConfig) -> None:
    """Refuse options that each parse but together cannot run, or would silently mean something else.

    Raises:
        InvalidConfig: naming both options and what to change.
    """
    tp = config.tensor_parallel_size
    if config.executor == "thread" and tp > 1:
        raise InvalidConfig(
            f"executor 'thread' cannot run tensor_parallel_size {tp}: tensor parallelism needs one worker process "
            "per rank; use executor 'process' or 'auto'",
            options=("executor", "tensor_parallel_size"),
        )
    if config.enforce_eager and config.level:
        raise InvalidConfig(
            f"enforce_eager means level 0, and level {config.level} was asked for: drop one of them",
            options=("enforce_eager", "level"),
        )
    if config.dtype != "auto" and config.kv_cache_dtype not in ("auto", config.dtype, *FP8_KV_CACHE_DTYPES):
        raise InvalidConfig(
            f"kv_cache_dtype {config.kv_cache_dtype!r} differs from dtype {config.dtype!r}: the KV cache holds the "
            "model's dtype or FP8; use kv_cache_dtype 'auto' or 'fp8'",
            options=("kv_cache_dtype", "dtype"),
        )
    if config.device.startswith("cuda:") and tp > 1:
        raise InvalidConfig(
            f"device {config.device!r} names one GPU, and tensor_parallel_size {tp} needs one per rank: use device "
            "'cuda' (rank r on GPU r; pick the GPUs with CUDA_VISIBLE_DEVICES)",
            options=("device", "tensor_parallel_size"),
        )
    spec = config.speculative_config
    if spec is not None and spec.method != "ngram" and tp > 1:
        raise InvalidConfig(
            f"speculative method {spec.method!r} drafts on one rank, and tensor_parallel_size is {tp}: use "
            "tensor_parallel_size 1, or method 'ngram'",
            options=("speculative_config", "tensor_parallel_size"),
        )
    if config.num_kv_blocks is not None and config.max_model_len is not None:
        holds = config.num_kv_blocks * config.block_size
        if config.max_model_len > holds:
            raise InvalidConfig(
                f"max_model_len {config.max_model_len} does not fit the KV cache: num_kv_blocks "
                f"{config.num_kv_blocks} of block_size {config.block_size} hold {holds} tokens; raise num_kv_blocks "
                "or lower max_model_len",
                options=("max_model_len", "num_kv_blocks", "block_size"),
            )


@attrs.define(kw_only=True, field_transformer=_type_checked)
class ServerSettings:
    """How the HTTP server behaves (the engine's own knobs live in `EngineConfig`).

    Raises:
        InvalidConfig: a field's type or range; ``options`` names it.
    """

    host: str = _field(
        "0.0.0.0", "address to listen on", section="Server", commands=("serve",), hypercorn="--bind HOST:PORT"
    )
    port: int = _field(
        8000, "port to listen on (0: any free port)", validator=_must(lambda n: 0 <= n <= 65535, "in [0, 65535]"),
        commands=("serve",), hypercorn="--bind HOST:PORT",
    )
    api_key: str | None = _field(
        None,
        "require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize, /tokenizer_info and the profiling "
        "routes",
    )
    max_request_bytes: int = _field(
        16 * 1024 * 1024, "larger request bodies are refused with 413", validator=_POSITIVE
    )
    shutdown_timeout: float = _field(
        30.0,
        "seconds in-flight requests get to finish after SIGTERM (under hypercorn also bounded by its "
        "`--graceful-timeout`)",
        validator=_must(lambda x: x >= 0, ">= 0"),
    )
    keep_alive_timeout: float = _field(
        75.0, "seconds an idle keep-alive connection stays open", validator=_POSITIVE, commands=("serve",),
        hypercorn="--keep-alive",
    )
    profile_dir: str | None = _field(
        None, "directory for /start_profile + /stop_profile traces",
        aliases=("--torch-profiler-dir", "--torch_profiler_dir"),
    )
    profile_max_seconds: float = _field(
        60.0, "a profile stops by itself after this many seconds (each rank records at most 256 steps); "
        "/stop_profile then returns its traces", validator=_POSITIVE,
    )
    log_level: str = _field(
        "info", "logging level of the `atom-trio` command (and of hypercorn under `serve`)",
        choices=("debug", "info", "warning", "error"),
        section="Logging",
        commands=("serve", "generate"),
        hypercorn="--log-level",
    )
    disable_log_requests: bool = _field(
        False,
        "no access log: without it, hypercorn logs one line per HTTP request (client, request line, status, "
        "seconds)",
        aliases=("--disable-uvicorn-access-log",),
        commands=("serve",),
        hypercorn="--access-logfile",
    )
    disable_log_stats: bool = _field(
        False,
        "no periodic stats line (prompt and generation tokens/s, running and waiting requests, KV cache usage, "
        "prefix cache hit rate), which is otherwise logged every `log_stats_interval` seconds while the engine works",
    )
    log_stats_interval: float = _field(
        5.0, "seconds between two stats lines (none is logged while the engine is idle)", validator=_POSITIVE
    )
    enable_auto_tool_choice: bool = _field(
        False,
        "let the model decide whether to call the request's tools (`tool_choice: \"auto\"`, the default when "
        "`tools` are given); its calls are parsed from the output by `tool_call_parser`, which this needs. "
        "`required` and a named function work without it: a grammar enforces them",
        section="Tools and reasoning",
    )
    tool_call_parser: str | None = _field(
        None, "how the model writes tool calls, for `enable_auto_tool_choice`", choices=TOOL_CALL_PARSERS,
    )
    reasoning_parser: str | None = _field(
        None,
        "how the model marks its reasoning: chat responses then carry it apart from the answer, in "
        "`reasoning_content`",
        choices=REASONING_PARSERS,
    )

    def __attrs_post_init__(self) -> None:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise InvalidConfig(
                "enable_auto_tool_choice needs tool_call_parser: name how the model writes its tool calls "
                f"({', '.join(TOOL_CALL_PARSERS)})",
                options=("enable_auto_tool_choice", "tool_call_parser"),
            )


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
