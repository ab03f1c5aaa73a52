"""The ASGI app for hypercorn: ``hypercorn atom_trio.app:app`` (either worker class).

Configured from ``ATOM_TRIO_*`` environment variables that mirror the CLI flags
(``ATOM_TRIO_MODEL``, ``ATOM_TRIO_MAX_NUM_SEQS``, ``ATOM_TRIO_API_KEY``...).
Importing this module builds the app and starts nothing; the engine starts with
the server's lifespan. Under hypercorn's default asyncio worker the trio side
runs as a guest on asyncio's loop (`TrioGuestHost`); under ``-k trio`` it runs
directly.

Where to listen, keep-alive and the log level are hypercorn's own flags here
(``--bind``, ``--keep-alive``, ``--log-level``): the ``ATOM_TRIO_*`` variables
for them cannot be honoured, and each one that is set is logged as ignored at
import. A variable with a wrong value, or options that conflict, fail the
import with `InvalidConfig`, and so does an option this machine cannot run
(`check_device`): hypercorn then exits instead of serving an app whose engine
can never start.

For long streams raise hypercorn's ``--graceful-timeout`` (3 s by default) and,
in a TOML config, ``keep_alive_max_requests``; ``atom-trio serve`` does both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from .executor import check_device
from .options import load, unread_env
from .server import TrioGuestHost, create_app

log = logging.getLogger("atom_trio")


def _app_from(environ: Mapping[str, str]) -> TrioGuestHost:
    for opt in unread_env(environ, "app"):
        log.warning(
            "atom_trio: %s=%s is ignored by `hypercorn atom_trio.app:app`: hypercorn's own %s does its job here",
            opt.env_var, environ[opt.env_var], opt.hypercorn,
        )
    config, settings = load(environ=environ, command="app")
    check_device(config)
    return TrioGuestHost(create_app(config, settings))


app = _app_from(os.environ)
