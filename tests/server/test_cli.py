"""The ``atom-trio`` command: flags from the config table, every refusal before anything loads, a one-shot ``generate``.

Every refused case runs with ``--model`` pointing nowhere: had the check come
after the engine started to load, the command would fail with status 1 on the
missing model, not with status 2 and the option's message.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from atom_trio.cli import _parser, main
from atom_trio.config import ServerSettings
from atom_trio.options import parse_args
from atom_trio.server import hypercorn_config
from atom_trio.server.serve import mark_responses_sent
from atom_trio.testing import server_process

NOWHERE = ["--model", "/nonexistent/model"]


def test_serve_accepts_atom_and_vllm_spellings() -> None:
    args = vars(_parser().parse_args(
        ["serve", "-tp", "2", "--kv_cache_dtype", "bfloat16", "--enforce-eager", "--max_num_seqs", "4", "-O0",
         "--gpu-memory-utilization", "0.8", "--block-size", "32", "--max-model-len", "1024", "--torch-profiler-dir",
         "/tmp/p"]))
    assert args["tensor_parallel_size"] == 2 and args["kv_cache_dtype"] == "bfloat16" and args["enforce_eager"]
    assert args["max_num_seqs"] == 4 and args["level"] == 0 and args["gpu_memory_utilization"] == 0.8
    assert args["block_size"] == 32 and args["max_model_len"] == 1024 and args["profile_dir"] == "/tmp/p"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["serve", "--dtype", "float7"], {}, "dtype must be one of auto, float32, bfloat16, float16; got 'float7'"),
        (["serve", "--kv_cache_dtype", "fp8_e5m2"], {},
         "kv_cache_dtype 'fp8_e5m2' is not supported: the FP8 KV cache is e4m3 with per-tensor scales"),
        (["serve", "--dtype", "float16", "--kv-cache-dtype", "bfloat16"], {},
         "kv_cache_dtype 'bfloat16' differs from dtype 'float16'"),
        (["serve", "--executor", "thread", "-tp", "2"], {},
         "executor 'thread' cannot run tensor_parallel_size 2: tensor parallelism needs one worker process per rank"),
        (["serve", "--enforce-eager", "--level", "3"], {}, "enforce_eager means level 0, and level 3 was asked for"),
        (["serve", "--enforce-eager", "-O1"], {}, "enforce_eager means level 0, and level 1 was asked for"),
        (["generate", "hi", "--enforce-eager"], {"ATOM_TRIO_LEVEL": "2"},
         "enforce_eager means level 0, and level 2 was asked for: drop one of them (set by ATOM_TRIO_LEVEL)"),
        (["serve", "--device", "cuda:1", "-tp", "2"], {}, "device 'cuda:1' names one GPU"),
        (["serve", "--device", "tpu"], {}, "device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
        (["serve", "--kernel-backend", "cuda"], {}, "kernel_backend must be one of auto, torch, cpu, triton, aiter"),
        (["serve", "--port", "0", "--device", "cpu", "--kernel-backend", "triton"], {},
         "kernel backend 'triton' is not available on 'cpu': it needs a CUDA or ROCm GPU"),
        (["generate", "hi", "--device", "cpu", "--kernel-backend", "triton"], {}, "it needs a CUDA or ROCm GPU"),
        (["serve", "--num-kv-blocks", "4", "--max-model-len", "100"], {},
         "max_model_len 100 does not fit the KV cache: num_kv_blocks 4 of block_size 16 hold 64 tokens"),
        (["serve", "--block-size", "0"], {}, "block_size must be positive; got 0"),
        (["serve"], {"ATOM_TRIO_API_KEY": ""}, "api_key must be a non-empty string; got '' (set by ATOM_TRIO_API_KEY)"),
        (["serve", "--host", "no-such-host.invalid", "--port", "0"], {}, "cannot listen on host 'no-such-host.invalid'"),
        (["generate", "hi", "--max-tokens", "0"], {}, "max_tokens must be at least 1"),
    ],
)
def test_a_refused_option_exits_2_with_one_line(
    argv: list[str], env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main([*argv, *NOWHERE]) == 2
    err = capsys.readouterr().err
    assert err == f"atom-trio {argv[0]}: {err.split(': ', 1)[1]}" and err.count("\n") == 1, err
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_cuda_without_a_gpu_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "0", "--device", "cuda", *NOWHERE]) == 2
    assert "device 'cuda' is not available: " in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag", ["--host", "--port", "--api-key", "--max-request-bytes", "--shutdown-timeout", "--keep-alive-timeout",
             "--profile-dir", "--torch_profiler_dir"],
)
def test_generate_refuses_the_servers_flags(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "hi", flag, "1"])
    assert info.value.code == 2
    assert f"{flag} is an option of `atom-trio serve` (the HTTP server); `atom-trio generate` does not take it" in (
        capsys.readouterr().err)


def test_serve_refuses_a_port_in_use_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--host", "127.0.0.1", "--port", str(port), *NOWHERE]) == 2
    assert f"cannot listen on host '127.0.0.1' port {port}: Address already in use" in capsys.readouterr().err


def test_generate_prints_a_completion(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["generate", "Hello", "--model", str(tiny_llama_dir), "--dtype", "float32", "--max-tokens", "4",
                   "--max-model-len", "128", "--log-level", "warning"])
    assert status == 0
    assert capsys.readouterr().out.strip()


def test_hypercorn_ignores_and_reports_the_variables_it_cannot_honour(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """``ATOM_TRIO_PORT`` cannot move a real hypercorn's listener: it serves on ``--bind`` and says so in its log."""
    command = [sys.executable, "-m", "hypercorn", "--bind", "127.0.0.1:{port}", "atom_trio.app:app"]
    env = {"ATOM_TRIO_MODEL": str(tiny_llama_dir), "ATOM_TRIO_DTYPE": "float32", "ATOM_TRIO_MAX_MODEL_LEN": "128",
           "ATOM_TRIO_PORT": "1", "ATOM_TRIO_HOST": "203.0.113.1"}
    with server_process(command=command, env=env, log_path=tmp_path / "hypercorn.log") as server:
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    log = server.log()
    for var, flag in (("ATOM_TRIO_HOST=203.0.113.1", "--bind HOST:PORT"), ("ATOM_TRIO_PORT=1", "--bind HOST:PORT")):
        assert f"{var} is ignored by `hypercorn atom_trio.app:app`: hypercorn's own {flag} does its job here" in log


def test_hypercorn_refuses_a_device_it_cannot_use_at_import(tmp_path: Path) -> None:
    """An app whose engine could never start is not served: the import fails with the one message."""
    env = {"ATOM_TRIO_DEVICE": "cpu", "ATOM_TRIO_KERNEL_BACKEND": "triton", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([sys.executable, "-m", "hypercorn", "--bind", "127.0.0.1:0", "atom_trio.app:app"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert ("atom_trio.errors.InvalidConfig: kernel backend 'triton' is not available on 'cpu': it needs a CUDA or "
            "ROCm GPU") in result.stderr
    assert "Running on" not in result.stderr + result.stdout


def test_help_is_plain_text_and_generate_explains_its_own_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "``" not in top and "serve an OpenAI-compatible server" in top
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "most tokens to generate [default: 64]" in shown and "0 is greedy [default: 0.0]" in shown
    assert "--port" not in shown and "--disable-log-requests" not in shown and "Server:" not in shown


def test_disable_log_requests_turns_the_access_log_off() -> None:
    _, settings = parse_args(["--disable-uvicorn-access-log"])
    assert settings.disable_log_requests
    assert hypercorn_config(settings).accesslog is None
    assert hypercorn_config(ServerSettings()).accesslog is logging.getLogger("atom_trio.access")


async def test_a_response_counts_as_sent_once_its_content_length_is_out() -> None:
    """The access log's duplicate filter: the scope is marked when the body is whole, before the app's last message."""
    marks = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"no", "more_body": True})
        marks.append(scope.get("atom_trio.response_sent"))
        await send({"type": "http.response.body", "body": b""})

    async def send(message) -> None:
        marks.append(message["type"])

    scope = {"type": "http"}
    await mark_responses_sent(app)(scope, None, send)
    assert marks == ["http.response.start", "http.response.body", True, "http.response.body"]
    streamed = {"type": "http"}
    await mark_responses_sent(_streaming_app)(streamed, None, send)
    assert streamed["atom_trio.response_sent"]


async def _streaming_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    assert "atom_trio.response_sent" not in scope  # no length: only the last message ends it
    await send({"type": "http.response.body", "body": b""})


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import atom_trio

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"atom-trio {atom_trio.__version__}"
