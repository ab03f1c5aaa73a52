"""The ASGI app for hypercorn: ``hypercorn atom_trio.app:app`` (either worker class).

Configured from ``ATOM_TRIO_*`` environment variables that mirror the CLI flags
(``ATOM_TRIO_MODEL``, ``ATOM_TRIO_MAX_NUM_SEQS``, ``ATOM_TRIO_API_KEY``...).
Importing this module builds the app and starts nothing; the engine starts with
the server's lifespan. Under hypercorn's default asyncio worker the trio side
runs as a guest on asyncio's loop (`TrioGuestHost`); under ``-k trio`` it runs
directly.

For long streams raise hypercorn's ``--graceful-timeout`` (3 s by default) and,
in a TOML config, ``keep_alive_max_requests``; ``atom-trio serve`` does both.
"""

from __future__ import annotations

import os

from .options import load
from .server import TrioGuestHost, create_app

app = TrioGuestHost(create_app(*load(environ=os.environ)))
