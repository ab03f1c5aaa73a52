"""The package logger's default output: start-up progress on stderr when the application sets up no logging.

A library user (``atom_trio.LLM(...)``, ``hypercorn atom_trio.app:app``)
would otherwise see nothing for the seconds a model takes to fetch, convert
and load: Python's last-resort handler shows warnings only. As vLLM does,
the ``atom_trio`` logger gets its own stderr handler at INFO. It steps aside
as soon as the application configures the root logger (`logging.basicConfig`,
``atom-trio serve``'s own set-up), so no line is printed twice; set the
``atom_trio`` logger's level to change what it shows, or
``ATOM_TRIO_CONFIGURE_LOGGING=0`` to leave the logger untouched.
"""

from __future__ import annotations

import logging
import os

PACKAGE_LOGGER = "atom_trio"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DefaultHandler(logging.StreamHandler):
    """stderr, for records that no handler of the application's root logger will show."""

    def handle(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().handlers:  # the application has set up logging: its handlers show the record
            return False
        return super().handle(record)


def install_default_handler() -> None:
    """Give the package logger `DefaultHandler` at INFO, unless it or the environment is already configured."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if os.environ.get("ATOM_TRIO_CONFIGURE_LOGGING") == "0" or logger.handlers or logger.level != logging.NOTSET:
        return
    handler = DefaultHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
