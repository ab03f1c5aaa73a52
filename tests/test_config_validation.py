"""`EngineConfig` and `open_engine(**kw)` refuse what cannot run, with one typed error, before anything loads.

The CLI's side of the same checks (exit status 2, the message on stderr) is in
tests/server/test_cli.py; here is the library's: `InvalidConfig` from the
constructor, from ``attrs.evolve`` and assignment, from the device check when
the engine starts, and `ModelLoadError` for the one check only the model can
answer (its dtype), raised before its weights load by either executor.
"""

from __future__ import annotations

import subprocess
import sys

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_trio import EngineConfig, InvalidConfig, ModelLoadError, open_engine
from atom_trio.config import ServerSettings
from atom_trio.executor import check_device
from atom_trio.executor.codec import converter

NOWHERE = "/nonexistent/model"


@pytest.mark.parametrize(
    ("fields", "options", "message"),
    [
        (dict(kv_cache_dtype="fp8_e5m2"), ("kv_cache_dtype",),
         "kv_cache_dtype 'fp8_e5m2' is not supported: the FP8 KV cache is e4m3 with per-tensor scales; use 'fp8' "
         "(or 'fp8_e4m3')"),
        (dict(kv_cache_dtype="int8"), ("kv_cache_dtype",),
         "kv_cache_dtype must be one of auto, float32, bfloat16, float16, fp8, fp8_e4m3; got 'int8'"),
        (dict(dtype="bfloat16", kv_cache_dtype="float32"), ("kv_cache_dtype", "dtype"),
         "kv_cache_dtype 'float32' differs from dtype 'bfloat16': the KV cache holds the model's dtype or FP8"),
        (dict(executor="thread", tensor_parallel_size=2), ("executor", "tensor_parallel_size"),
         "executor 'thread' cannot run tensor_parallel_size 2: tensor parallelism needs one worker process per rank; "
         "use executor 'process' or 'auto'"),
        (dict(enforce_eager=True, level=3), ("enforce_eager", "level"),
         "enforce_eager means level 0, and level 3 was asked for: drop one of them"),
        (dict(device="cuda:1", tensor_parallel_size=4), ("device", "tensor_parallel_size"),
         "device 'cuda:1' names one GPU, and tensor_parallel_size 4 needs one per rank"),
        (dict(device="gpu"), ("device",), "device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
        (dict(num_kv_blocks=8, block_size=4, max_model_len=33), ("max_model_len", "num_kv_blocks", "block_size"),
         "max_model_len 33 does not fit the KV cache: num_kv_blocks 8 of block_size 4 hold 32 tokens"),
        (dict(kernel_backend="cuda"), ("kernel_backend",), "kernel_backend must be one of auto, torch, cpu, triton, aiter"),
        (dict(level=4), ("level",), "level must be 0, 1, 2 or 3; got 4"),
        (dict(gpu_memory_utilization=1.5), ("gpu_memory_utilization",), "gpu_memory_utilization must be in (0, 1]"),
        (dict(num_kv_blocks=0), ("num_kv_blocks",), "num_kv_blocks must be positive; got 0"),
        (dict(seed=2**64), ("seed",), "seed must be within [-2**63, 2**64)"),
        (dict(max_num_seqs="8"), ("max_num_seqs",), "max_num_seqs must be an integer; got '8'"),
        (dict(max_num_seqs=True), ("max_num_seqs",), "max_num_seqs must be an integer; got True"),
        (dict(enable_prefix_caching="false"), ("enable_prefix_caching",),
         "enable_prefix_caching must be true or false; got 'false'"),
        (dict(model=""), ("model",), "model must be a non-empty string; got ''"),
        (dict(dtype=None), ("dtype",), "dtype must be a non-empty string; got None"),
    ],
)
def test_engine_config_refuses_with_one_typed_error(fields: dict, options: tuple[str, ...], message: str) -> None:
    with pytest.raises(InvalidConfig) as info:
        EngineConfig(**fields)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert info.value.options == options
    assert isinstance(info.value, ValueError)  # callers that caught ValueError still do


def test_what_was_valid_stays_valid() -> None:
    for fields in [
        dict(enforce_eager=True, level=0), dict(enforce_eager=True), dict(level=3), dict(executor="thread"),
        dict(executor="process", tensor_parallel_size=2), dict(tensor_parallel_size=2, device="cuda"),
        dict(kv_cache_dtype="bfloat16"), dict(dtype="float16", kv_cache_dtype="float16"),
        dict(device="cuda:3"), dict(num_kv_blocks=8, block_size=4, max_model_len=32), dict(block_size=7),
        dict(gpu_memory_utilization=1), dict(max_logprobs=0), dict(seed=-1), dict(max_num_batched_tokens=16),
        dict(max_model_len=4096, max_num_batched_tokens=256),  # chunked prefill: a prompt may exceed the budget
    ]:
        EngineConfig(**fields)
    ServerSettings(port=0, shutdown_timeout=0)


def test_evolve_and_assignment_are_checked_too() -> None:
    config = EngineConfig(tensor_parallel_size=2)
    with pytest.raises(InvalidConfig, match="tensor parallelism needs one worker process per rank"):
        attrs.evolve(config, executor="thread")
    with pytest.raises(InvalidConfig, match="block_size must be positive"):
        config.block_size = 0
    with pytest.raises(InvalidConfig, match="port must be in"):
        ServerSettings(port=70000)
    with pytest.raises(InvalidConfig, match="api_key must be a non-empty string"):
        ServerSettings(api_key="")


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5000), st.floats(-2, 300, allow_nan=False),
    st.sampled_from(["", "auto", "cpu", "cuda", "cuda:1", "thread", "process", "triton", "torch", "float16",
                     "bfloat16", "fp8", "dummy", "8"]),
)


@settings(max_examples=400, deadline=None)
@given(fields=st.dictionaries(st.sampled_from([f.name for f in attrs.fields(EngineConfig)]), _VALUES, max_size=6))
def test_any_keywords_give_a_config_that_crosses_the_wire_or_one_invalid_config(fields: dict) -> None:
    """No keyword makes the constructor fail any other way; what it accepts, a worker process rebuilds unchanged."""
    try:
        config = EngineConfig(**fields)
    except InvalidConfig as exc:
        assert exc.options and set(exc.options) <= {f.name for f in attrs.fields(EngineConfig)}
        assert "\n" not in str(exc)
        return
    assert converter.structure(converter.unstructure(config), EngineConfig) == config
    assert not (config.executor == "thread" and config.tensor_parallel_size > 1)
    assert not (config.enforce_eager and config.level)


# -- when the engine starts: the device, before the tokenizer or any weight ---------------------------


async def test_open_engine_keywords_are_checked_before_anything_loads() -> None:
    # NOWHERE would raise ModelLoadError if anything got as far as loading.
    with pytest.raises(InvalidConfig, match="kv_cache_dtype 'fp8_e5m2' is not supported"):
        async with open_engine(model=NOWHERE, kv_cache_dtype="fp8_e5m2"):
            pass
    with pytest.raises(InvalidConfig, match="kernel backend 'triton' is not available on 'cpu'") as info:
        async with open_engine(EngineConfig(model=NOWHERE), device="cpu", kernel_backend="triton"):
            pass
    assert info.value.options == ("kernel_backend", "device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
async def test_cuda_without_a_gpu_is_refused_before_anything_loads() -> None:
    with pytest.raises(InvalidConfig, match="device 'cuda' is not available: ") as info:
        async with open_engine(model=NOWHERE, device="cuda"):
            pass
    assert info.value.options == ("device",)
    check_device(EngineConfig(tensor_parallel_size=8))  # auto is the CPU here: gloo ranks, no GPU count applies


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_device_check_counts_the_visible_gpus() -> None:
    visible = torch.cuda.device_count()
    check_device(EngineConfig(device="cuda", tensor_parallel_size=visible))
    check_device(EngineConfig(device=f"cuda:{visible - 1}"))
    with pytest.raises(InvalidConfig, match=f"tensor_parallel_size {visible + 1} needs {visible + 1} GPUs"):
        check_device(EngineConfig(tensor_parallel_size=visible + 1))
    with pytest.raises(InvalidConfig, match=f"device 'cuda:{visible}' is not available: {visible} GPU"):
        check_device(EngineConfig(device=f"cuda:{visible}"))
    with pytest.raises(InvalidConfig, match="kernel backend 'cpu' is not available on 'cuda'"):
        check_device(EngineConfig(device="cuda", kernel_backend="cpu"))
    # No CUDA context in a process that only checked (this one may hold one from other tests).
    probe = "\n".join([
        "import torch",
        "from atom_trio.config import EngineConfig",
        "from atom_trio.executor import check_device",
        f"check_device(EngineConfig(device='cuda', tensor_parallel_size={visible}))",
        "print(torch.cuda.is_initialized())",
    ])
    checked = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert checked.stdout.split() == ["False"], checked.stderr[-2000:]


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_a_kv_cache_dtype_that_is_not_the_models_is_a_model_load_error(tiny_llama_dir, executor: str) -> None:
    """Only the model knows its dtype (``dtype`` auto): both executors say so with the same typed error."""
    config = EngineConfig(model=str(tiny_llama_dir), device="cpu", executor=executor, kv_cache_dtype="bfloat16",
                          max_model_len=128)
    with pytest.raises(ModelLoadError, match="kv_cache_dtype 'bfloat16' differs from the model's dtype float32"):
        async with open_engine(config):
            pass
