"""Run a real server in a subprocess, for tests and benchmarks.

`server_process` picks a free port, starts ``python -m atom_trio serve`` (or
any command given a ``{port}`` placeholder), waits until ``/health`` answers
200, and on exit sends SIGTERM and waits for the process (SIGKILL if it
hangs). Synchronous on purpose: pytest-trio fixtures cannot be module-scoped,
so a module shares one server through a sync fixture.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs
import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@attrs.define(eq=False)
class ServerProcess:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (a graceful drain), then wait; SIGKILL after ``timeout``. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@contextmanager
def server_process(
    args: Sequence[str] = (),
    *,
    command: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    log_path: Path,
    ready_timeout: float = 300.0,
) -> Iterator[ServerProcess]:
    """Start a server and yield it once healthy.

    Args:
        args: flags for ``atom-trio serve`` (host and port are added).
        command: a whole command instead, with ``{port}`` where the port goes.
        env: extra environment variables.
        log_path: where the server's stdout and stderr go (read it when a test fails).
    """
    port = free_port()
    if command is None:
        command = [sys.executable, "-m", "atom_trio", "serve", "--host", "127.0.0.1", "--port", "{port}", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [part.replace("{port}", str(port)) for part in command], cwd=REPO_ROOT, env=full_env,
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
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
