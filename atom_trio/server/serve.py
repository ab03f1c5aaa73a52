"""``atom-trio serve``: the engine and hypercorn under one root nursery.

Owning the root nursery is what makes a dead engine end the process (hypercorn's
lifespan would only log it and keep answering): the engine runs beside
``hypercorn.trio.serve``, a watchdog raises the engine's `EngineDeadError` as
soon as it dies, and the nursery cancels the server. SIGTERM/SIGINT
trigger a graceful shutdown instead: new requests get 503, running ones get
``shutdown_timeout`` to finish (those still running then end with an error
event), then hypercorn closes, the engine stops its workers and the process
exits 0.
"""

from __future__ import annotations

import logging
import signal

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.trio import serve as hypercorn_serve

from ..config import EngineConfig, ServerSettings
from .routes import create_app
from .state import ServerState

log = logging.getLogger("atom_trio.server")


# One access log line: client, request line, status, seconds (as uvicorn's, with the time taken).
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(Uq)s HTTP/%(H)s" %(s)s %(st)s %(L)ss'
# After the drain, how long hypercorn waits for connections to finish sending.
FLUSH_TIMEOUT_S = 3.0
# After the engine died, how long the handlers get to write each stream's error event before the
# connections close: a few scheduler ticks, with margin for a loaded box. No more, because a supervisor
# restarts the server only once the process has exited.
DEAD_ENGINE_GRACE_S = 0.25


# Set in a request's ASGI scope once the app has sent the last of its response.
_RESPONSE_SENT = "atom_trio.response_sent"


class AccessLogger(HypercornLogger):
    """Hypercorn's logger, less a second, status-less access line for a request that was answered in full.

    When a client closes its connection the moment the response ends (as
    curl does), hypercorn may see the close while it still sends the last
    body chunk, and log the request twice: once as if the client had left
    ("-" for the status), then with the status it got. A request whose
    app sent its whole response keeps only the second line; one whose
    client did leave early still gets its "-" line.
    """

    async def access(self, request, response, request_time) -> None:
        if response is None and request.get(_RESPONSE_SENT):
            return
        await super().access(request, response, request_time)


def mark_responses_sent(app):
    """``app`` with `_RESPONSE_SENT` set in each request's scope once the app has sent its whole response.

    Whole: the last body message, or as many body bytes as the response's
    content-length, after which a client may close before that last message.
    """

    async def marked(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        remaining = None  # body bytes still owed, where the response says how many

        async def marking_send(message) -> None:
            nonlocal remaining
            if message["type"] == "http.response.start":
                lengths = [value for name, value in message.get("headers", ()) if name.lower() == b"content-length"]
                remaining = int(lengths[0]) if lengths else None
            elif message["type"] == "http.response.body":
                if remaining is not None:
                    remaining -= len(message.get("body", b""))
                if not message.get("more_body", False) or (remaining is not None and remaining <= 0):
                    scope[_RESPONSE_SENT] = True
            await send(message)

        return await app(scope, receive, marking_send)

    return marked


@attrs.frozen
class Serving:
    """A running server: where it listens, and its state (for embedding and tests)."""

    urls: list[str]
    state: ServerState


def hypercorn_config(settings: ServerSettings) -> HypercornConfig:
    """Hypercorn settings that suit long-lived LLM streams."""
    config = HypercornConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.graceful_timeout = FLUSH_TIMEOUT_S
    config.keep_alive_timeout = settings.keep_alive_timeout
    # Hypercorn's default of 1,000 requests per connection broke HTTP/2 load tests.
    config.keep_alive_max_requests = 1_000_000
    config.h2_max_concurrent_streams = 1_000
    # Loggers, not "-": hypercorn would give each a handler of its own on top of the root's, and print every
    # line ("Running on ...") twice.
    config.accesslog = None if settings.disable_log_requests else logging.getLogger("atom_trio.access")
    config.access_log_format = ACCESS_LOG_FORMAT
    config.logger_class = AccessLogger
    config.errorlog = logging.getLogger("hypercorn.error")
    config.loglevel = settings.log_level.upper()
    return config


async def serve(
    config: EngineConfig,
    settings: ServerSettings,
    *,
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (returns) or until the engine dies (raises `EngineDeadError`).

    ``task_status.started`` receives a `Serving` (the bound URLs and the
    server's state, engine included) once the server listens.
    """
    from ..engine.engine import open_engine

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_engine(config) as engine, trio.open_nursery() as root:
            app = create_app(config, settings, engine=engine)
            srv = app.extensions["atom_trio"]

            async def shutdown_trigger() -> None:
                async for signum in signals:
                    log.info("received %s: draining", signal.Signals(signum).name)
                    break
                # Drain here rather than in hypercorn's graceful period: the listener stays open so new
                # requests get a clear 503, and we stop as soon as the last generation ends (hypercorn
                # would also wait out every idle keep-alive connection).
                srv.draining = True
                with trio.move_on_after(settings.shutdown_timeout) as grace:
                    await srv.activity.wait_idle()
                if grace.cancelled_caught:
                    log.warning("shutdown_timeout=%s s is over: ending %d running requests with an error",
                                settings.shutdown_timeout, srv.activity.running)
                    engine.shutdown()
                    # Each stream now writes its error event and ends; hypercorn's graceful period (below)
                    # waits for the connections to finish sending it.
                log.info("drained: stopping")

            async def watch_engine() -> None:
                error = await engine.wait_dead()
                # In-flight streams already hold their error event and /health answers 503:
                # give them a moment to reach the clients before the nursery tears every
                # connection down.
                await trio.sleep(DEAD_ENGINE_GRACE_S)
                raise error

            async def run_http(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
                await hypercorn_serve(mark_responses_sent(app), hypercorn_config(settings),
                                      shutdown_trigger=shutdown_trigger,
                                      task_status=task_status)
                root.cancel_scope.cancel()  # drained: stop the watchdog; then the engine closes

            root.start_soon(watch_engine)
            urls = await root.start(run_http)
            log.info("serving %s on %s", srv.model_name, ", ".join(urls))
            task_status.started(Serving(urls=urls, state=srv))
