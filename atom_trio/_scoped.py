"""Set a context variable for the duration of a ``with`` block.

The runner hands per-build choices (kernel backend, tensor-parallel group) and
per-step state (the forward context) to layers this way, so that models never
pass them through their signatures.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar[T], value: T) -> Iterator[T]:
    """``var`` holds ``value`` inside the block and its previous value after it, however the block ends."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)
