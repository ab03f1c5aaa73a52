"""The package logger's default handler: library users see start-up progress, applications that log keep control."""

from __future__ import annotations

import os
import subprocess
import sys

LOG_ONE_LINE = 'import logging; logging.getLogger("atom_trio.runner").info("phase done")'


def _stderr(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "ATOM_TRIO_CONFIGURE_LOGGING"} | env
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)
    return done.stderr


def test_a_library_user_sees_the_package_info_lines():
    assert "INFO atom_trio.runner: phase done" in _stderr(f"import atom_trio; {LOG_ONE_LINE}")


def test_an_application_that_configures_logging_gets_each_line_once_in_its_format():
    code = f'import atom_trio, logging; logging.basicConfig(format="app %(name)s %(message)s"); {LOG_ONE_LINE}'
    stderr = _stderr(code)
    assert stderr.count("phase done") == 1 and "app atom_trio.runner phase done" in stderr


def test_the_default_handler_can_be_turned_off():
    assert "phase done" not in _stderr(f"import atom_trio; {LOG_ONE_LINE}", ATOM_TRIO_CONFIGURE_LOGGING="0")
