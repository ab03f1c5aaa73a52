"""The ``atom-trio`` command: flags from the config table, and a one-shot ``generate``."""

from __future__ import annotations

from pathlib import Path

import pytest

from atom_trio.cli import _parser, main


def test_serve_accepts_atom_and_vllm_spellings() -> None:
    args = vars(_parser().parse_args(
        ["serve", "-tp", "2", "--kv_cache_dtype", "fp8", "--enforce-eager", "--max_num_seqs", "4", "-O0",
         "--gpu-memory-utilization", "0.8", "--block-size", "32", "--max-model-len", "1024", "--torch-profiler-dir",
         "/tmp/p"]))
    assert args["tensor_parallel_size"] == 2 and args["kv_cache_dtype"] == "fp8" and args["enforce_eager"]
    assert args["max_num_seqs"] == 4 and args["level"] == 0 and args["gpu_memory_utilization"] == 0.8
    assert args["block_size"] == 32 and args["max_model_len"] == 1024 and args["profile_dir"] == "/tmp/p"


def test_invalid_configuration_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--dtype", "float7"]) == 2
    assert "dtype" in capsys.readouterr().err


def test_generate_prints_a_completion(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["generate", "Hello", "--model", str(tiny_llama_dir), "--dtype", "float32", "--max-tokens", "4",
                   "--max-model-len", "128"])
    assert status == 0
    assert capsys.readouterr().out.strip()


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import atom_trio

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"atom-trio {atom_trio.__version__}"
