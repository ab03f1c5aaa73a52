"""Where atom_trio keeps what it builds or fetches: the default model, compiled kernels, compile caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$ATOM_TRIO_CACHE``, or ``~/.cache/atom_trio``."""
    return Path(os.environ.get("ATOM_TRIO_CACHE") or Path.home() / ".cache" / "atom_trio")
