"""Run one benchmark on two source trees in alternating rounds: a baseline revision and this tree.

    python -m benchmarks.ab --baseline 6f4ed1e --rounds 3 -- benchmarks.benchmark_latency --batch-sizes 1 8 32

Each round runs ``python -m MODULE ARGS`` once from the baseline tree, then once
from this one, each in a fresh process with that tree first on ``PYTHONPATH``, so
each side runs its own benchmark code against its own package. Alternating
rounds spread slow drifts of the machine (other load, clocks) over both sides
instead of charging them to whichever ran second. ``--baseline`` is a git
revision (exported with ``git archive`` into a temporary directory) or a
directory holding another checkout (for machines without the repository's
history, such as the GPU machine, where the baseline travels as files).
Output lines are printed as they come, prefixed with the side and round.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def baseline_tree(baseline: str) -> Iterator[Path]:
    """A directory holding the baseline's sources: ``baseline`` itself if it is one, else an export of that revision."""
    if Path(baseline).is_dir():
        yield Path(baseline).resolve()
        return
    archive = subprocess.run(["git", "archive", baseline], cwd=ROOT, check=True, capture_output=True).stdout
    with tempfile.TemporaryDirectory(prefix="atom-trio-baseline-") as directory:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(directory, filter="data")
        yield Path(directory)


def run_side(label: str, tree: Path, module: str, args: list[str]) -> int:
    # The tree goes first; what else PYTHONPATH holds (dependencies installed with --target) stays.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    for line in process.stdout:
        print(f"[{label}] {line}", end="", flush=True)
    return process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a git revision, or a directory with another checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- MODULE [ARGS...]")
    options = parser.parse_args(argv)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command:
        parser.error("give the benchmark module after --")
    module, args = command[0], command[1:]
    with baseline_tree(options.baseline) as tree:
        for round_index in range(1, options.rounds + 1):
            for label, source in (("baseline", tree), ("this tree", ROOT)):
                status = run_side(f"{label}, round {round_index}", source, module, args)
                if status != 0:
                    print(f"{label} exited with status {status}", file=sys.stderr)
                    return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
