"""Worker subprocess entry point: ``python -m atom_trio.executor.worker --fd N --parent-pid P``.

One worker per tensor-parallel rank, started by `ProcessExecutor`. It owns
one `ModelRunner` and answers the engine over the socket it inherited as
file descriptor ``N`` (see ``executor/messages.py`` for the conversation).
Plain blocking Python: the worker has one job at a time, so it needs no
event loop.

A worker never outlives its engine:

1. End of file on the socket (the parent closed it or died) ends the loop.
2. While busy elsewhere (loading weights, stuck in a collective), the kernel
   tells it: ``PR_SET_PDEATHSIG``. That signal fires when the *thread* that
   spawned us exits, and trio spawns from a worker thread that retires after
   10 s idle; so the signal is not a death sentence by itself. A watchdog
   thread waits for it and exits only once our parent pid has changed.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import traceback

from typing import TYPE_CHECKING

from atom_trio.errors import ProfilerError
from atom_trio.executor import messages
from atom_trio.executor.codec import Decoder, Encoder
from atom_trio.executor.framing import receive_frame

if TYPE_CHECKING:
    from atom_trio.runner import RankProfiler
    from atom_trio.runner.model_runner import LaunchedStep

_PR_SET_PDEATHSIG = 1
_PARENT_DEATH_SIGNAL = signal.SIGUSR1


def exit_with_parent(parent_pid: int) -> None:
    """Exit as soon as process ``parent_pid`` is no longer our parent (Linux; elsewhere EOF must do)."""
    if not sys.platform.startswith("linux"):
        return
    # Blocked before any other thread exists (torch's pools inherit the mask), so
    # only the watchdog's sigwait ever receives it, even while the main thread is in C.
    signal.pthread_sigmask(signal.SIG_BLOCK, {_PARENT_DEATH_SIGNAL})
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(_PARENT_DEATH_SIGNAL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")

    def watchdog() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            signal.sigwait({_PARENT_DEATH_SIGNAL})

    # The first check inside the thread also covers a parent that died before prctl.
    threading.Thread(target=watchdog, name="atom-trio-parent-watchdog", daemon=True).start()


def _error(exc: BaseException) -> messages.Error:
    return messages.Error(
        type_name=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )


def _profiled(profiler: RankProfiler, message: messages.ProfileStart | messages.ProfileStop) -> messages.Profiled:
    """Start or stop ``profiler`` as ``message`` asks; a profiler that fails is reported, and the worker serves on."""
    try:
        if isinstance(message, messages.ProfileStart):
            return messages.Profiled(trace=profiler.start(message.trace_prefix))
        return messages.Profiled(trace=profiler.stop())
    except ProfilerError as exc:
        return messages.Profiled(error=str(exc))


def serve(sock: socket.socket) -> int:
    """Answer the engine until Shutdown (0), end of file (0) or a failure (1)."""
    encoder, decoder = Encoder(), Decoder()

    def receive() -> messages.Message:
        return decoder.decode(receive_frame(sock))

    def send(message: messages.Message) -> None:
        sock.sendall(encoder.encode(message))

    try:
        init = receive()
    except EOFError:
        return 0
    if not isinstance(init, messages.Init):
        send(_error(messages.ProtocolError(f"expected Init, got {type(init).__name__}")))
        return 1
    os.environ.update(
        RANK=str(init.rank),
        LOCAL_RANK=str(init.rank),
        WORLD_SIZE=str(init.world_size),
        MASTER_ADDR=init.master_addr,
        MASTER_PORT=str(init.master_port),
    )
    try:
        from atom_trio.runner import ModelRunner, RankProfiler

        runner = ModelRunner(init.config, rank=init.rank, world_size=init.world_size, companion_pids=(os.getppid(),))
        profiler = RankProfiler(init.rank)
        send(messages.InitDone(facts=runner.facts))
    except Exception as exc:
        send(_error(exc))
        return 1

    def answer(step: LaunchedStep) -> None:
        result = runner.collect(step)
        send(messages.Result(result=result) if init.rank == 0 else messages.Ack(step_id=result.step_id))

    held: LaunchedStep | None = None  # launched, answered at the next Launch, Execute or Flush
    try:
        while True:
            try:
                message = receive()
            except EOFError:
                return 0
            if isinstance(message, messages.Launch):
                # The new step goes to the device first; the held one's tokens are read while it runs.
                with profiler.step():
                    step = runner.launch(message.plan)
                if held is not None:
                    answer(held)
                held = step
            elif isinstance(message, messages.Execute):
                if held is not None:
                    answer(held)
                    held = None
                with profiler.step():
                    step = runner.launch(message.plan)
                answer(step)
            elif isinstance(message, messages.Flush):
                if held is None:
                    raise messages.ProtocolError("Flush without a launched step")
                answer(held)
                held = None
            elif isinstance(message, messages.ProfileStart | messages.ProfileStop):
                send(_profiled(profiler, message))
            elif isinstance(message, messages.Shutdown):
                return 0
            else:
                raise messages.ProtocolError(f"unexpected {type(message).__name__}")
            # Free this step's plan before the next one is decoded, which then reuses its
            # memory while it is still in the cache (docs/distributed.md).
            message = step = None
    except Exception as exc:
        try:
            send(_error(exc))
        except OSError:
            pass  # the engine is gone; it will see our exit status instead
        return 1
    finally:
        runner.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atom_trio.executor.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the engine")
    parser.add_argument("--parent-pid", type=int, required=True, help="exit when this process is gone")
    parser.add_argument("--log-level", default="WARNING", help="the engine's logging level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format=f"%(asctime)s %(levelname)s %(name)s[worker {os.getpid()}]: %(message)s"
    )
    logging.getLogger("atom_trio").setLevel(args.log_level)  # over the library default (atom_trio._logging)
    exit_with_parent(args.parent_pid)
    # Ctrl-C reaches the whole process group; the engine decides how its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with socket.socket(fileno=args.fd) as sock:
        return serve(sock)


if __name__ == "__main__":
    status = main()
    # The runner is closed; skip interpreter teardown (slow with torch loaded) so that
    # the engine reads our exit status right after our last message.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
