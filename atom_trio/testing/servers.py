"""Run a real server in a subprocess, for tests and benchmarks.

`server_process` picks a free port, starts ``python -m atom_trio serve`` (or
any command given a ``{port}`` placeholder: hypercorn, another engine's
server), waits until ``/health`` answers 200, and on exit sends SIGTERM and
waits for the process (SIGKILL if it hangs). Synchronous on purpose:
pytest-trio fixtures cannot be module-scoped, so a module shares one server
through a sync fixture, and the benchmark scripts are plain scripts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs
import httpx

from atom_trio._net import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


@attrs.define(eq=False)
class ServerProcess:
    process: subprocess.Popen
    url: str
    log_path: Path
    process_group: bool = False
    """Signal the server's whole process group (it runs in a session of its own), not the server alone."""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (a graceful drain), then wait; SIGKILL after ``timeout``. Returns the exit status."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            return self.process.wait()

    def _signal(self, signum: int) -> None:
        if self.process_group:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)


@contextmanager
def server_process(
    args: Sequence[str] = (),
    *,
    command: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    log_path: Path,
    ready_timeout: float = 300.0,
    process_group: bool = False,
) -> Iterator[ServerProcess]:
    """Start a server and yield it once healthy.

    Args:
        args: flags for ``atom-trio serve`` (host and port are added).
        command: a whole command instead, with ``{port}`` where the port goes.
        env: extra environment variables.
        log_path: where the server's stdout and stderr go (read it when a test fails).
        process_group: start the server in a session of its own and stop the whole group, for a server
            whose own children would outlive a SIGKILL of the server alone. Off for atom-trio, whose
            tests check that the server itself stops its workers.
    """
    port = free_port()
    if command is None:
        command = [sys.executable, "-m", "atom_trio", "serve", "--host", "127.0.0.1", "--port", "{port}", *args]
    # This checkout's package first; what else the path holds (dependencies installed with --target) stays.
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [part.replace("{port}", str(port)) for part in command], cwd=REPO_ROOT, env=full_env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=process_group,
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path, process_group)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-4000:]}")
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy after {ready_timeout} s:\n{server.log()[-4000:]}")
            time.sleep(0.25)
        yield server
    finally:
        server.stop()
