"""Choosing the aiter backend at start, and the slim wheel's contents (no GPU, nothing of AITER imported)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest

from atom_trio.config import EngineConfig
from atom_trio.errors import InvalidConfig
from atom_trio.executor import check_device
from atom_trio.ops import backend_name
from atom_trio.ops.aiter.slim_wheel import kept

installed = pytest.mark.skipif(importlib.util.find_spec("aiter") is None, reason="amd-aiter is not installed")


@installed
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_aiter_is_available_on_a_gpu_where_amd_aiter_is_installed():
    assert backend_name("aiter", "cuda") == "aiter"


def test_aiter_is_refused_on_the_cpu_before_anything_loads():
    with pytest.raises(ValueError, match="kernel backend 'aiter' is not available on 'cpu': it needs a GPU"):
        backend_name("aiter", "cpu")
    with pytest.raises(InvalidConfig, match="needs a GPU") as caught:
        check_device(EngineConfig(device="cpu", kernel_backend="aiter"))
    assert "kernel_backend" in caught.value.options


@installed
def test_the_slim_wheel_keeps_the_triton_kernels_and_drops_the_rocm_sources():
    names = [str(path) for path in importlib.metadata.files("amd-aiter")]
    triton_sources = [n for n in names if n.startswith("aiter/ops/triton/") and n.endswith((".py", ".json"))]
    assert "aiter/ops/triton/unified_attention.py" in triton_sources
    assert all(kept(n) for n in triton_sources if "__pycache__" not in n)
    assert kept("aiter/__init__.py") and kept("amd_aiter-0.1.7.post2.dev18.dist-info/METADATA")
    dropped = [n for n in names if not kept(n)]
    assert any(n.startswith("aiter_meta/") for n in dropped) and "aiter/jit/core.py" in dropped
    assert not kept("amd_aiter-0.1.7.post2.dev18.dist-info/RECORD")  # rewritten for the files it keeps
