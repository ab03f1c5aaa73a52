"""Length-prefixed frames over a socketpair: the worker's blocking end and the engine's trio end.

Each message travels as one frame: a 4-byte big-endian length, then the
body that ``codec.py`` makes. Both ends of the connection live here, so
that the format is defined once: the worker reads with plain blocking calls
(it has one job at a time and no event loop), the engine through
`FrameStream`, which waits through trio only when the socket would block.
"""

from __future__ import annotations

import socket
import struct

import trio

from atom_trio.executor.messages import ProtocolError

HEADER = struct.Struct("!I")
"""Frame header: the body's length in bytes, network order."""

MAX_FRAME_BYTES = 256 << 20
"""Largest body accepted; a larger length means a corrupt stream, not a big plan."""


def check_length(length: int) -> int:
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return length


# -- blocking, for the worker ---------------------------------------------------------------------


def _receive_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("peer closed the connection")
        got += k
    return buf


def receive_frame(sock: socket.socket) -> bytearray:
    """The next frame's body; `EOFError` when the peer has closed its end."""
    (length,) = HEADER.unpack(_receive_exactly(sock, HEADER.size))
    return _receive_exactly(sock, check_length(length))


# -- through trio, for the engine -----------------------------------------------------------------


class FrameStream:
    """Length-prefixed frames over the engine's end of a socketpair.

    Talks to the non-blocking socket itself and waits through trio only when
    the socket would block: a step then costs one trip through trio's
    scheduler (waiting for the answer) instead of the handful that
    ``trio.SocketStream`` takes per send and receive (docs/distributed.md).
    Errors come out as `trio.BrokenResourceError` and
    `trio.ClosedResourceError`, as from a trio stream.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._buffer = bytearray()

    async def send(self, frame: bytes, deadline: float) -> bool:
        """All of ``frame``, or False once ``deadline`` passed (the stream is then unusable).

        Nothing else interrupts it: cancelled between two writes, it would
        leave half a frame in the stream, which desyncs it for good. It waits
        (in a shielded scope, which costs µs, so only then) just when the
        socket's buffer is full; a frame the socket takes at once goes out
        without a checkpoint, since waiting for the answer is one.
        """
        view = memoryview(frame)
        view = view[self._send_some(view) :]
        if not view:
            return True
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            while view:
                await trio.lowlevel.wait_writable(self._sock)
                view = view[self._send_some(view) :]
        return not scope.cancelled_caught

    def _send_some(self, view: memoryview) -> int:
        try:
            return self._sock.send(view)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise self._translate(exc) from exc

    async def receive(self) -> bytearray:
        """The next frame's body; `EOFError` when the worker closed its end."""
        header = HEADER.size
        waited = await self._fill(header)
        (length,) = HEADER.unpack_from(self._buffer)
        waited |= await self._fill(header + check_length(length))
        if not waited:  # the answer was already there: still a checkpoint, as every trio operation is
            await trio.lowlevel.checkpoint()
        body = self._buffer[header : header + length]
        del self._buffer[: header + length]
        return body

    async def _fill(self, size: int) -> bool:
        """Read until the buffer holds ``size`` bytes; whether that meant waiting."""
        waited = False
        while len(self._buffer) < size:
            try:
                data = self._sock.recv(max(size - len(self._buffer), 1 << 16))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                waited = True
                continue
            except OSError as exc:
                raise self._translate(exc) from exc
            if not data:
                raise EOFError("worker closed its socket")
            self._buffer += data
        return waited

    def _translate(self, exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self._sock.fileno() < 0:
            return trio.ClosedResourceError("the connection to the worker is closed")
        return trio.BrokenResourceError(f"the connection to the worker broke: {exc}")

    async def aclose(self) -> None:
        if self._sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self._sock)  # a task waiting on it wakes with ClosedResourceError
            self._sock.close()
        await trio.lowlevel.checkpoint()
