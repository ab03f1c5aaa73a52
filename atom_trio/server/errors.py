"""Every failure a client can see, as an OpenAI error envelope with the right HTTP status.

OpenAI's shape is ``{"error": {"message", "type", "param", "code"}}``; clients
(the ``openai`` package included) read ``message`` and pick an exception class by
status, so the status matters as much as the text.
"""

from __future__ import annotations

from typing import Any

from ..errors import (
    ContextLengthExceeded,
    EngineDeadError,
    EngineOverloaded,
    InvalidRequest,
)


class ApiError(Exception):
    """An error answered to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


RETRY_AFTER_S = 1


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def engine_unavailable(message: str = "The engine is not running.") -> ApiError:
    return ApiError(503, message, type="service_unavailable_error", code="engine_unavailable")


def from_exception(exc: BaseException) -> ApiError | None:
    """Map an engine exception to its client-facing error; None for bugs (they become 500s)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), param=exc.param)
    if isinstance(exc, EngineOverloaded):
        return ApiError(
            429,
            str(exc) or "The server is overloaded; retry later.",
            type="rate_limit_error",
            code="engine_overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, EngineDeadError):
        return engine_unavailable(f"The engine has stopped: {exc}")
    return None


def internal_error(exc: BaseException) -> ApiError:
    return ApiError(500, f"Internal server error: {type(exc).__name__}: {exc}", type="server_error")
