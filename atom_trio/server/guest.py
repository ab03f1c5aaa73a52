"""Serve a trio ASGI app from an asyncio server by running trio as a guest on asyncio's loop.

``hypercorn atom_trio.app:app`` uses hypercorn's asyncio worker unless told
``-k trio``; a QuartTrio app called from asyncio fails every request (500). With
`trio.lowlevel.start_guest_run` trio runs on top of the asyncio loop in the same
thread: its tasks run in asyncio callbacks and its I/O waits in a helper
thread. `TrioGuestHost` starts that guest run on the first ASGI call, runs each
ASGI call as a trio task, and bridges ``receive``/``send`` back to asyncio.

Cancellation crosses both ways: if asyncio cancels an ASGI call, its trio task
is cancelled (so a disconnected stream still aborts its request); if trio
cancels a ``receive``/``send`` it is waiting on, the asyncio task is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import sniffio
import trio

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class TrioGuestHost:
    """An ASGI app that runs ``app`` (a trio ASGI app) under trio, whichever loop calls it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        self._done: asyncio.Future[outcome.Outcome] | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None

    def __getattr__(self, name: str) -> Any:
        # Lets callers reach the wrapped app's attributes (config, routes) through the host.
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if sniffio.current_async_library() == "trio":
            await self.app(scope, receive, send)
            return
        await self._start_guest()
        if scope["type"] != "lifespan":
            await self._call_in_trio(scope, receive, send)
            return
        # Hypercorn cancels the lifespan call as soon as it hears "shutdown.complete"; hold that
        # message back until the guest run has ended, then return right after sending it.
        held: list[dict] = []

        async def lifespan_send(message: dict) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                held.append(message)
            else:
                await send(message)

        try:
            await self._call_in_trio(scope, receive, lifespan_send)
        finally:
            await self._stop_guest()
        for message in held:
            await send(message)

    async def _start_guest(self) -> None:
        if self._ready is None:
            self._loop = asyncio.get_running_loop()
            self._ready = self._loop.create_future()
            self._done = self._loop.create_future()

            async def guest_main() -> None:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._token = trio.lowlevel.current_trio_token()
                    self._ready.set_result(None)  # type: ignore[union-attr]
                    await trio.sleep_forever()

            def done(result: outcome.Outcome) -> None:
                if not self._done.done():  # type: ignore[union-attr]
                    self._done.set_result(result)  # type: ignore[union-attr]

            trio.lowlevel.start_guest_run(
                guest_main,
                run_sync_soon_threadsafe=self._loop.call_soon_threadsafe,
                done_callback=done,
                host_uses_signal_set_wakeup_fd=True,
            )
        await asyncio.shield(self._ready)

    async def _stop_guest(self) -> None:
        assert self._token is not None and self._nursery is not None and self._done is not None
        self._token.run_sync_soon(self._nursery.cancel_scope.cancel)
        (await asyncio.shield(self._done)).unwrap()

    async def _call_in_trio(self, scope: dict, receive: Any, send: Any) -> None:
        assert self._loop is not None and self._token is not None and self._nursery is not None
        loop, token = self._loop, self._token
        finished: asyncio.Future[None] = loop.create_future()
        cancel_scope = trio.CancelScope()

        async def run() -> None:
            try:
                with cancel_scope:
                    await self.app(scope, _awaiting(loop, token, receive), _awaiting(loop, token, send))
            except BaseException as exc:  # handed to the asyncio caller, never to the guest's nursery
                if not cancel_scope.cancel_called and not finished.done():
                    finished.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                return
            if not finished.done():
                finished.set_result(None)

        token.run_sync_soon(self._nursery.start_soon, run)
        try:
            await asyncio.shield(finished)
        except asyncio.CancelledError:
            token.run_sync_soon(cancel_scope.cancel)
            raise


def _awaiting(loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken, fn: Any) -> Any:
    """Wrap an asyncio coroutine function so trio tasks can await it."""

    async def call(*args: Any) -> Any:
        task = loop.create_task(fn(*args))
        done = trio.Event()
        task.add_done_callback(lambda _: token.run_sync_soon(done.set))
        try:
            await done.wait()
        except trio.Cancelled:
            task.cancel()
            raise
        return task.result()

    return call
