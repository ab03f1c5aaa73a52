"""Length-prefixed frames: the worker's blocking reads and the engine's `FrameStream`, over real socketpairs."""

from __future__ import annotations

import math
import socket
import threading

import pytest
import trio

from atom_trio.executor import messages
from atom_trio.executor.codec import Decoder, Encoder
from atom_trio.executor.framing import HEADER, MAX_FRAME_BYTES, FrameStream, receive_frame


# -- blocking, as the worker reads ----------------------------------------------------------------


def test_blocking_framing_over_a_socketpair():
    ours, theirs = socket.socketpair()
    sent = [messages.Ack(step_id=i) for i in range(3)] + [
        messages.Error(type_name="X", message="y" * 300_000, traceback="")
    ]
    frames = b"".join(Encoder().encode(m) for m in sent)

    def trickle():  # arbitrary chunk boundaries, as a real stream delivers them
        for i in range(0, len(frames), 7919):
            ours.sendall(frames[i : i + 7919])
        ours.close()

    sender = threading.Thread(target=trickle)
    sender.start()
    decoder = Decoder()
    assert [decoder.decode(receive_frame(theirs)) for _ in sent] == sent
    with pytest.raises(EOFError):
        receive_frame(theirs)
    sender.join()
    theirs.close()


def test_oversized_length_is_refused_before_reading():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(HEADER.pack(MAX_FRAME_BYTES + 1))
        with pytest.raises(messages.ProtocolError, match="exceeds"):
            receive_frame(theirs)


# -- through trio, as the engine reads and writes -------------------------------------------------


async def test_frames_larger_than_the_socket_buffer_cross_both_ways():
    """The engine's non-blocking end must wait for room to send and for the rest of a frame to arrive."""
    ours, theirs = socket.socketpair()
    stream = FrameStream(ours)
    sent = [messages.Error(type_name="X", message="y" * (4 << 20), traceback=""), messages.Ack(step_id=3)]

    def echo() -> None:  # the worker's side, blocking: each frame straight back, then EOF
        with theirs:
            for _ in sent:
                body = receive_frame(theirs)
                theirs.sendall(HEADER.pack(len(body)) + body)

    encoder, decoder = Encoder(), Decoder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, echo)
        for message in sent:
            assert await stream.send(encoder.encode(message), math.inf)
            assert decoder.decode(await stream.receive()) == message
        with pytest.raises(EOFError):
            await stream.receive()
    await stream.aclose()


async def test_a_send_to_a_peer_that_does_not_read_gives_up_at_its_deadline():
    ours, theirs = socket.socketpair()
    stream = FrameStream(ours)
    sent = None
    with theirs, trio.CancelScope() as outside:
        outside.cancel()  # only the deadline may stop it: outside cancellation would split the frame
        sent = await stream.send(b"x" * (16 << 20), trio.current_time() + 0.2)
    assert sent is False
    await stream.aclose()


async def test_a_broken_or_closed_connection_raises_trio_errors():
    ours, theirs = socket.socketpair()
    stream = FrameStream(ours)
    theirs.close()
    with pytest.raises(trio.BrokenResourceError):
        await stream.send(Encoder().encode(messages.Ack(step_id=1)), math.inf)
    await stream.aclose()

    ours, theirs = socket.socketpair()
    stream = FrameStream(ours)
    with theirs:
        async with trio.open_nursery() as nursery:

            async def close_soon() -> None:
                await trio.sleep(0.05)
                await stream.aclose()

            nursery.start_soon(close_soon)
            with pytest.raises(trio.ClosedResourceError):
                await stream.receive()  # waiting for an answer that never comes
        with pytest.raises(trio.ClosedResourceError):
            await stream.send(b"late", math.inf)
