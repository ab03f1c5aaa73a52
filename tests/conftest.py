"""Shared fixtures: the real default model, and tiny random-weight models of each architecture.

Tiny models (``atom_trio.testing.TINY_CONFIGS``) are real Hugging Face model
directories written by transformers with random weights and the default
model's tokenizer, once per session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from atom_trio.testing import TINY_CONFIGS, write_tiny_model_dir


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The built-in default model (SmolLM2-135M-Instruct), fetched and converted once per machine."""
    from atom_trio.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, default_model_dir) -> dict[str, Path]:
    """Every tiny architecture, by name (``llama``, ``llama3``, ``qwen3``)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: write_tiny_model_dir(arch, root, default_model_dir) for arch in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["qwen3"]


@pytest.fixture
def inject_step_fault() -> Iterator[Callable[[Any, BaseException], None]]:
    """``inject_step_fault(runner, exc)``: the runner's next step raises ``exc`` instead of running.

    What a failing device or model looks like to the step's caller: `launch`
    or `execute`, whichever comes first, raises in the thread that runs it,
    and the steps after run as usual. A fault no step met is taken back when
    the test ends.
    """
    armed = []

    def disarm(runner: Any) -> None:
        for name in ("execute", "launch"):
            vars(runner).pop(name, None)  # the class's methods again

    def inject(runner: Any, exc: BaseException) -> None:
        def fail(plan: Any) -> Any:
            disarm(runner)
            raise exc

        runner.execute = runner.launch = fail
        armed.append(runner)

    yield inject
    for runner in armed:
        disarm(runner)
