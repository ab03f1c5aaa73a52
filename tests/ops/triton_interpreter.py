"""Running a test file's Triton cases under Triton's interpreter, on the CPU.

Triton picks the interpreter when a kernel is defined (``TRITON_INTERPRET=1`` at import), so the cases
run in a subprocess that sets it and leaves the rest of the suite's kernels alone.
"""

from __future__ import annotations

import os
import subprocess
import sys

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def assert_passes_under_the_interpreter(test_file: str, selection: str, *, timeout: int = 600) -> None:
    """Run ``test_file``'s tests matching ``-k selection`` with the interpreter on; all must pass."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-6000:] + result.stderr[-2000:]
