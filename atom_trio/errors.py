"""Typed exceptions of the library; the server maps each to an OpenAI error envelope."""

from __future__ import annotations

import signal


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
        if returncode is not None and returncode < 0:  # killed: name the signal, as a shell would
            status += f" ({_signal_name(-returncode)})"
        super().__init__(f"worker rank {rank} {status}" + (f": {detail}" if detail else ""))
        self.rank = rank
        self.returncode = returncode


class ProfilerError(AtomTrioError):
    """A rank could not start, stop or write its profiler session; the engine serves on."""


class ModelLoadError(AtomTrioError):
    """The model could not be resolved or loaded; the message says what to do."""


class InvalidConfig(AtomTrioError, ValueError):
    """An option's value, or a combination of options, this build or device cannot run; ``options`` names them.

    Raised before any weight loads: by `EngineConfig` / `ServerSettings`
    themselves, and by the engine's device check when it starts.
    """

    def __init__(self, message: str, *, options: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.options = options


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
