"""``python -m atom_trio serve ...``: the same as the ``atom-trio`` command."""

from __future__ import annotations

from .cli import run

run()
