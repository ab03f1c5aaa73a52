"""The QuartTrio application: the blueprints, the API key, error envelopes, and the engine's lifespan.

`create_app` builds the app and starts nothing. Who runs the engine depends on
who serves the app:

- under hypercorn (either worker class), the app's ``while_serving`` opens the
  engine in the app's nursery and closes it after the HTTP drain;
- under `atom_trio.server.serve`, the caller owns the engine (in its root
  nursery, so an engine crash ends the process) and passes it in.

The routes themselves live in blueprints.py. The guard and the error handlers
stay on the app, not on a blueprint: an unknown path under ``/v1/`` must answer
401 without the key and a 404 in the OpenAI envelope, and neither belongs to
any blueprint.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio
from quart import Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..config import EngineConfig, ServerSettings
from ..errors import EngineDeadError
from .blueprints import error_response, openai_api, profiling, service, tokenizer_api
from .errors import ApiError, from_exception, internal_error
from .metrics import log_stats
from .openapi import openapi_blueprint
from .state import ServerState, current_state

if TYPE_CHECKING:
    from ..engine import AsyncEngine

log = logging.getLogger("atom_trio.server")


def create_app(
    config: EngineConfig | None = None, settings: ServerSettings | None = None, *, engine: AsyncEngine | None = None
) -> QuartTrio:
    """Build the app. With ``engine``, serve that engine; without, open one from ``config`` while serving."""
    config = config or EngineConfig()
    settings = settings or ServerSettings()
    app = QuartTrio(__name__)
    # Streams last as long as generation does; quart's default 60 s would cut them silently.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = settings.shutdown_timeout + 30
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False  # read as each blueprint's routes are added below
    app.extensions["atom_trio"] = ServerState(config, settings, engine=engine)

    if engine is None:
        app.while_serving(_engine_lifespan)
    if not settings.disable_log_stats:
        app.while_serving(_stats_lifespan)  # after the engine's: it reads the engine that one opens
    app.before_request(_guard)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    for blueprint in (openai_api, tokenizer_api, service, openapi_blueprint(guarded)):
        app.register_blueprint(blueprint)
    if settings.profile_dir:  # the profiling routes exist only where traces have somewhere to go
        app.register_blueprint(profiling)
    return app


_GUARDED_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info", "/start_profile", "/stop_profile"})


def guarded(path: str) -> bool:
    """Whether ``path`` needs the API key, when the server has one (the OpenAPI document says so too)."""
    return path.startswith("/v1/") or path in _GUARDED_PATHS


async def _guard() -> Response | None:
    """With an API key set, ``/v1/*``, the tokenizer routes and profiling need ``Authorization: Bearer <key>``
    (as in vLLM); ``/health``, ``/version`` and ``/metrics`` stay open to load balancers and scrapers."""
    key = current_state().settings.api_key
    if key and guarded(request.path):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            # Refused before its body is read: the connection cannot carry another request.
            return error_response(ApiError(401, "Missing or invalid API key (Authorization: Bearer ...).",
                                           code="invalid_api_key", headers={"Connection": "close"}))
    return None


async def _api_error(error: ApiError) -> Response:
    return error_response(error)


async def _http_error(error: HTTPException) -> Response:
    code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(error.code or 0)
    message = error.description or error.name
    if error.code == 413:
        limit = current_state().settings.max_request_bytes
        message = f"The request body is larger than the server's limit of {limit} bytes."
    # An unknown route or a body over the limit is answered before the body is read, and hypercorn would
    # then wait for it on the kept-alive connection: close it instead.
    headers = {"Connection": "close"} if request.content_length or "Transfer-Encoding" in request.headers else {}
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        headers["Allow"] = ", ".join(error.valid_methods)  # RFC 9110 requires it with a 405
    return error_response(ApiError(error.code or 500, message, code=code, headers=headers))


async def _unexpected(error: Exception) -> Response:
    api_error = from_exception(error)
    if api_error is None:
        log.exception("unhandled error in %s %s", request.method, request.path)
        api_error = internal_error(error)
    return error_response(api_error)


async def _engine_lifespan() -> AsyncIterator[None]:
    """Open the engine while the app serves (the hypercorn-CLI path)."""
    from ..engine import open_engine

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    srv: ServerState = app.extensions["atom_trio"]
    stop = trio.CancelScope()

    async def run_engine(task_status: trio.TaskStatus[AsyncEngine] = trio.TASK_STATUS_IGNORED) -> None:
        with stop:
            started = False
            try:
                async with open_engine(srv.config) as engine:
                    task_status.started(engine)
                    started = True
                    raise await engine.wait_dead()
            except Exception as exc:
                if not started:
                    raise
                # Under hypercorn's lifespan an exception here would only be logged while the server kept
                # answering; record it so /health and every request answer 503 instead. A death the
                # engine has logged already.
                srv.engine_error = exc
                srv.engine = None
                if not isinstance(exc, EngineDeadError):
                    log.error("the engine stopped: %r", exc)

    srv.engine = await app.nursery.start(run_engine)
    yield
    srv.draining = True
    # quart-trio runs this under a deadline that may cancel it: shield a bounded drain.
    with trio.CancelScope(shield=True):
        with trio.move_on_after(srv.settings.shutdown_timeout):
            await srv.activity.wait_idle()
        stop.cancel()


async def _stats_lifespan() -> AsyncIterator[None]:
    """Log the engine's stats line while the app serves (`metrics.log_stats`), a task of the app's nursery."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    srv: ServerState = app.extensions["atom_trio"]
    stop = trio.CancelScope()

    async def run() -> None:
        with stop:
            await log_stats(lambda: srv.engine, srv.settings.log_stats_interval)

    app.nursery.start_soon(run)
    yield
    stop.cancel()


__all__ = ["create_app"]
