"""Typed exceptions of the library; the server maps each to an OpenAI error envelope."""

from __future__ import annotations


class AtomTrioError(Exception):
    """Base class of every error atom_trio raises on purpose."""


class InvalidRequest(AtomTrioError, ValueError):
    """A request parameter is out of range or malformed; ``param`` names it."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequest):
    """The prompt (plus the requested output) does not fit the model's context."""

    def __init__(self, *, prompt_tokens: int, max_model_len: int, max_tokens: int | None = None) -> None:
        if max_tokens is None or prompt_tokens >= max_model_len:
            message = (
                f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                f"{prompt_tokens} input tokens. Please reduce the length of the input."
            )
            param = "input_tokens"
        else:
            message = (
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
                f"context length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
                f"({max_tokens} > {max_model_len} - {prompt_tokens})."
            )
            param = "max_tokens"
        super().__init__(message, param=param)
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens


class EngineOverloaded(AtomTrioError):
    """The waiting queue is full (``max_queued_requests``); retry later."""


class EngineDeadError(AtomTrioError):
    """The engine stopped because a step failed; ``__cause__`` holds the original error."""


class WorkerDied(AtomTrioError):
    """A worker subprocess exited or stopped answering."""

    def __init__(self, *, rank: int, returncode: int | None, detail: str = "") -> None:
        status = "did not answer" if returncode is None else f"exited with status {returncode}"
        super().__init__(f"worker rank {rank} {status}" + (f": {detail}" if detail else ""))
        self.rank = rank
        self.returncode = returncode


class ModelLoadError(AtomTrioError):
    """The model could not be resolved or loaded; the message says what to do."""
