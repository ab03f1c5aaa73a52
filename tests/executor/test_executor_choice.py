"""Which executor an engine gets: processes for TP and by default on CUDA, a thread on the CPU."""

from __future__ import annotations

import pytest
import torch

from atom_trio.config import EngineConfig
from atom_trio.executor import wants_processes


@pytest.mark.parametrize(
    ("fields", "processes"),
    [
        (dict(device="cpu"), False),
        (dict(device="cpu", executor="process"), True),
        (dict(device="cuda:0"), True),
        (dict(device="cuda", executor="thread"), False),
        (dict(device="cpu", tensor_parallel_size=2), True),
    ],
)
def test_executor_choice(fields, processes):
    assert wants_processes(EngineConfig(**fields)) is processes


def test_auto_device_follows_cuda_availability():
    assert wants_processes(EngineConfig()) is torch.cuda.is_available()
