"""Quantized copies of the tiny models, each written once per session by its format's writer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from atom_trio.testing.quantize import TINY_FORMATS


@pytest.fixture(scope="session")
def quantized_dirs(tmp_path_factory, tiny_model_dirs) -> Callable[[str], tuple[Path, Path, dict]]:
    """``quantized_dirs(format)``: (the quantized directory, its unquantized source, its dequantized weights)."""
    root = tmp_path_factory.mktemp("quantized")
    made: dict[str, tuple[Path, Path, dict]] = {}

    def get(name: str) -> tuple[Path, Path, dict]:
        if name not in made:
            arch, write = TINY_FORMATS[name]
            src = tiny_model_dirs[arch]
            made[name] = (root / name, src, write(src, root / name))
        return made[name]

    return get
