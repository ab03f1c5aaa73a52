"""The routes, by what they serve; `create_app` registers each blueprint.

- `openai_api`: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``;
- `tokenizer_api`: ``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` (vLLM's shapes);
- `service`: ``/health``, ``/version``, ``/metrics``, for load balancers and scrapers;
- `profiling`: ``/start_profile`` and ``/stop_profile``, registered only with ``--profile-dir``.

What every route shares lives on the app instead (routes.py): the API key
guard, the error envelopes, the engine's lifespan.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from quart import Blueprint, Response, current_app, request

from .. import __version__
from ..engine.input_processor import INLINE_TOKENS, python_lane
from . import completions, json_body
from .errors import ApiError, bad_request, model_not_found
from .sampling import chat_messages, chat_tools
from .schemas import DetokenizeRequest, TokenizeRequest, read_request
from .state import current_state

if TYPE_CHECKING:
    from ..engine import AsyncEngine

T = TypeVar("T", TokenizeRequest, DetokenizeRequest)

openai_api = Blueprint("openai_api", __name__)
tokenizer_api = Blueprint("tokenizer_api", __name__)
service = Blueprint("service", __name__)
profiling = Blueprint("profiling", __name__)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status=status, headers=headers,
                    content_type="application/json")


def error_response(error: ApiError) -> Response:
    return json_response(error.body(), error.status, error.headers)


async def _large_json_response(payload: Any) -> Response:
    """`json_response` for a payload that may be large, encoded in the python lane a bounded piece at a time."""
    body = await trio.to_thread.run_sync(json_body.dumps_stepwise, payload, limiter=python_lane(),
                                         thread_name="atom-trio encode response")
    return Response(body, status=200, content_type="application/json")


# ---- the OpenAI API -----------------------------------------------------------

@openai_api.post("/v1/completions")
async def create_completion() -> Any:
    return await _generate(chat=False)


@openai_api.post("/v1/chat/completions")
async def create_chat_completion() -> Any:
    return await _generate(chat=True)


async def _generate(*, chat: bool) -> Any:
    result = await completions.handle(current_state(), current_app.nursery, await request.get_data(), chat=chat)
    if isinstance(result, dict):
        return json_response(result)
    if isinstance(result, bytes):  # a large response, encoded already
        return Response(result, status=200, content_type="application/json")
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return result, 200, headers


@openai_api.get("/v1/models")
async def list_models() -> Response:
    srv = current_state()
    max_model_len = srv.engine.max_model_len if srv.engine is not None else srv.config.max_model_len
    card = {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "atom_trio",
            "root": srv.config.model or srv.model_name, "parent": None, "max_model_len": max_model_len}
    return json_response({"object": "list", "data": [card]})


# ---- tokenize / detokenize -----------------------------------------------------

async def _tokenizer_request(cls: type[T]) -> tuple[AsyncEngine, T]:
    """The engine (else a 503) and the body as ``cls`` (else a 400), naming this server's model if any (else a 404)."""
    srv = current_state()
    engine = srv.require_engine()
    req = await read_request(cls, await request.get_data())
    if req.model is not None and req.model != srv.model_name:
        raise model_not_found(req.model)
    return engine, req


@tokenizer_api.post("/tokenize")
async def tokenize() -> Response:
    engine, req = await _tokenizer_request(TokenizeRequest)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", param="prompt")
    _, tokens = await engine.encode_prompt(
        req.prompt if req.messages is None else chat_messages(req),
        add_generation_prompt=True if req.add_generation_prompt is None else req.add_generation_prompt,
        chat_template_kwargs=req.chat_template_kwargs,
        add_special_tokens=req.add_special_tokens,
        tools=chat_tools(req),
    )
    payload = {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}
    return await _large_json_response(payload) if len(tokens) > INLINE_TOKENS else json_response(payload)


@tokenizer_api.post("/detokenize")
async def detokenize() -> Response:
    engine, req = await _tokenizer_request(DetokenizeRequest)
    text = await engine.detokenize(req.tokens)
    large = len(text) > json_body.INLINE_MAX_BYTES
    return await _large_json_response({"prompt": text}) if large else json_response({"prompt": text})


@tokenizer_api.get("/tokenizer_info")
async def tokenizer_info() -> Response:
    """The tokenizer's configuration and chat template, as vLLM serves them.

    Clients that tokenize on their side through the server (lm-eval's
    ``local-completions`` with its remote tokenizer) read the special tokens
    and the chat template here instead of fetching the model's files from the
    hub, which fails offline and for a local model.
    """
    tokenizer = current_state().require_engine().tokenizer
    info = {key: _plain(value) for key, value in tokenizer.init_kwargs.items()
            if key not in ("vocab_file", "merges_file")}  # paths on the server's disk
    info["tokenizer_class"] = type(tokenizer).__name__
    if tokenizer.chat_template:
        info["chat_template"] = tokenizer.chat_template
    return json_response(info)


def _plain(value: Any) -> Any:
    """``value`` as JSON: a special token (tokenizers' ``AddedToken``) as its text, containers item by item."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# ---- health, version, metrics ----------------------------------------------------

@service.get("/health")
async def health() -> Response:
    srv = current_state()
    if srv.healthy():
        return Response("", status=200)
    return error_response(srv.unavailable())


@service.get("/version")
async def version() -> Response:
    return json_response({"version": __version__})


@service.get("/metrics")
async def metrics() -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(current_state().metrics.render(), status=200, content_type=CONTENT_TYPE_LATEST)


# ---- profiling ----------------------------------------------------------------------

@profiling.post("/start_profile")
async def start_profile() -> Response:
    srv = current_state()
    return json_response(await srv.profiler.start(srv.require_engine(), current_app.nursery))


@profiling.post("/stop_profile")
async def stop_profile() -> Response:
    srv = current_state()
    return json_response(await srv.profiler.stop(srv.require_engine()))
