"""The package's layers point one way, and the host side loads without torch.

The contracts live in pyproject.toml (``[tool.importlinter]``); import-linter
reads every import statement, including those inside functions, so a lazy
back-edge breaks them too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_import_contracts_hold():
    # In a process of its own: import-linter configures logging with disable_existing_loggers, which would
    # silence the atom_trio loggers of every later test in this worker.
    result = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=REPO, capture_output=True, text=True,
    )
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    assert "each layer imports only the layers below it KEPT" in printed
    assert "the core and the shared vocabulary need no torch KEPT" in printed


def test_engine_side_imports_without_torch():
    """The server process's own modules (engine, core, tokenizer loading) never pull torch in."""
    code = (
        "import sys, atom_trio, atom_trio.core, atom_trio.engine, atom_trio.loader, atom_trio.server, atom_trio.executor\n"
        "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
