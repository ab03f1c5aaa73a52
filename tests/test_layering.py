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


def test_import_contracts_hold(monkeypatch, capsys):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(REPO)
    status = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    printed = capsys.readouterr().out
    assert status == 0, printed
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
