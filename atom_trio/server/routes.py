"""The QuartTrio application: routes, error envelopes, API key, and the engine's lifespan.

`create_app` builds the app and starts nothing. Who runs the engine depends on
who serves the app:

- under hypercorn (either worker class), the app's ``while_serving`` opens the
  engine in the app's nursery and closes it after the HTTP drain;
- under `atom_trio.server.serve`, the caller owns the engine (in its root
  nursery, so an engine crash ends the process) and passes it in.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

import attrs
import trio
from quart import Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..config import EngineConfig
from . import completions
from .errors import ApiError, bad_request, engine_unavailable, from_exception, internal_error, model_not_found
from .generation import Activity
from .metrics import ServerMetrics
from .profiler import Profiler
from .sampling import chat_messages
from .schemas import DetokenizeRequest, TokenizeRequest, parse_json, structure
from .settings import ServerSettings

log = logging.getLogger("atom_trio.server")

VERSION = "0.1.0"


@attrs.define(eq=False)
class ServerState:
    """What the handlers share: configs, the engine once it runs, metrics and the drain flag."""

    config: EngineConfig
    settings: ServerSettings
    engine: Any = None
    engine_error: BaseException | None = None
    draining: bool = False
    activity: Activity = attrs.Factory(Activity)
    metrics: ServerMetrics = attrs.field(init=False)
    profiler: Profiler = attrs.field(init=False)
    created: int = attrs.Factory(lambda: int(time.time()))

    def __attrs_post_init__(self) -> None:
        self.metrics = ServerMetrics(lambda: self.engine, self.model_name)
        self.profiler = Profiler(self.settings.profile_dir)

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def healthy(self) -> bool:
        return self.engine is not None and self.engine.is_healthy() and not self.draining

    def require_engine(self) -> Any:
        """The engine, if it can take a request now; otherwise the 503 to answer."""
        if self.draining:
            raise engine_unavailable("The server is shutting down.")
        if self.engine is None:
            raise engine_unavailable("The engine is not running." if self.engine_error is None
                                     else f"The engine failed: {self.engine_error}")
        if not self.engine.is_healthy():
            raise engine_unavailable("The engine has stopped.")
        return self.engine


def state() -> ServerState:
    return current_app.extensions["atom_trio"]


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status=status, headers=headers,
                    content_type="application/json")


def _error_response(error: ApiError) -> Response:
    return _json(error.body(), error.status, error.headers)


async def _body() -> Any:
    return parse_json(await request.get_data())


def create_app(
    config: EngineConfig | None = None, settings: ServerSettings | None = None, *, engine: Any = None
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
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    srv = ServerState(config, settings, engine=engine)
    app.extensions["atom_trio"] = srv

    if engine is None:
        app.while_serving(_engine_lifespan)

    @app.before_request
    async def _guard() -> Response | None:
        guarded = request.path.startswith("/v1/") or request.path in ("/start_profile", "/stop_profile")
        key = settings.api_key
        if key and guarded:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return _error_response(ApiError(401, "Missing or invalid API key (Authorization: Bearer ...).",
                                                code="invalid_api_key"))
        return None

    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> Response:
        return _error_response(error)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(error.code or 0)
        message = error.description or error.name
        if error.code == 413:
            message = f"The request body is larger than the server's limit of {settings.max_request_bytes} bytes."
        return _error_response(ApiError(error.code or 500, message, code=code))

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        api_error = from_exception(error)
        if api_error is None:
            log.exception("unhandled error in %s %s", request.method, request.path)
            api_error = internal_error(error)
        return _error_response(api_error)

    @app.post("/v1/completions")
    async def _completions() -> Any:
        return await _generate(chat=False)

    @app.post("/v1/chat/completions")
    async def _chat_completions() -> Any:
        return await _generate(chat=True)

    @app.get("/v1/models")
    async def _models() -> Response:
        srv = state()
        max_model_len = srv.engine.max_model_len if srv.engine is not None else srv.config.max_model_len
        card = {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "atom_trio",
                "root": srv.config.model or srv.model_name, "parent": None, "max_model_len": max_model_len}
        return _json({"object": "list", "data": [card]})

    @app.get("/health")
    async def _health() -> Response:
        srv = state()
        if srv.healthy():
            return Response("", status=200)
        return _error_response(_unavailable(srv))

    @app.get("/version")
    async def _version() -> Response:
        return _json({"version": VERSION})

    @app.get("/metrics")
    async def _metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state().metrics.render(), status=200, content_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def _tokenize() -> Response:
        srv = state()
        engine = srv.require_engine()
        req = structure(TokenizeRequest, await _body())
        _check_model(srv, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", param="prompt")
        _, tokens = await engine.encode_prompt(
            req.prompt if req.messages is None else chat_messages(req),
            add_generation_prompt=True if req.add_generation_prompt is None else req.add_generation_prompt,
            chat_template_kwargs=req.chat_template_kwargs,
            add_special_tokens=req.add_special_tokens,
        )
        return _json({"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens})

    @app.post("/detokenize")
    async def _detokenize() -> Response:
        srv = state()
        engine = srv.require_engine()
        req = structure(DetokenizeRequest, await _body())
        _check_model(srv, req.model)
        vocab = len(engine.tokenizer)
        if any(not 0 <= t < vocab for t in req.tokens):
            raise bad_request(f"tokens holds a token id outside [0, {vocab})", param="tokens")
        return _json({"prompt": engine.tokenizer.decode(req.tokens)})

    @app.post("/start_profile")
    async def _start_profile() -> Response:
        state().profiler.start()
        return _json({"status": "profiling"})

    @app.post("/stop_profile")
    async def _stop_profile() -> Response:
        path = await state().profiler.stop()
        return _json({"status": "stopped", "trace": str(path)})

    return app


def _unavailable(srv: ServerState) -> ApiError:
    try:
        srv.require_engine()
    except ApiError as error:
        return error
    return engine_unavailable()


def _check_model(srv: ServerState, model: str | None) -> None:
    if model is not None and model != srv.model_name:
        raise model_not_found(model)


async def _generate(*, chat: bool) -> Any:
    srv = state()
    result = await completions.handle(srv, current_app.nursery, await _body(), chat=chat)
    if isinstance(result, dict):
        return _json(result)
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return result, 200, headers


async def _engine_lifespan() -> Any:
    """Open the engine while the app serves (the hypercorn-CLI path)."""
    from ..engine.engine import open_engine

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    srv: ServerState = app.extensions["atom_trio"]
    stop = trio.CancelScope()

    async def run_engine(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        with stop:
            started = False
            try:
                async with open_engine(srv.config) as engine:
                    task_status.started(engine)
                    started = True
                    await trio.sleep_forever()
            except Exception as exc:
                if not started:
                    raise
                # Under hypercorn's lifespan an exception here would only be logged while the server kept
                # answering; record it so /health and every request answer 503 instead.
                srv.engine_error = exc
                srv.engine = None
                log.error("the engine stopped: %r", exc)

    srv.engine = await app.nursery.start(run_engine)
    yield
    srv.draining = True
    # quart-trio runs this under a deadline that may cancel it: shield a bounded drain.
    with trio.CancelScope(shield=True):
        with trio.move_on_after(srv.settings.shutdown_timeout):
            await srv.activity.wait_idle()
        stop.cancel()


__all__ = ["ServerState", "create_app"]
