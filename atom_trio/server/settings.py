"""Server settings, and the one table that turns config fields into CLI flags and env vars.

Every field of `EngineConfig` and `ServerSettings` is an option. Its flag is the
field name in kebab-case *and* snake_case (``--max-num-seqs`` and
``--max_num_seqs``: vLLM users type the first, ATOM users often the second), its
environment variable is ``ATOM_TRIO_<FIELD>``. Generating both from the attrs
fields keeps one source of truth: a new config field is a new flag and a new env
var with no edit here.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from attrs import validators as v

from ..config import EngineConfig

ENV_PREFIX = "ATOM_TRIO_"


@attrs.define(kw_only=True)
class ServerSettings:
    """How the HTTP server behaves (the engine's own knobs live in `EngineConfig`).

    ``shutdown_timeout`` bounds the drain after SIGTERM: requests in flight get
    that long to finish before the engine stops. ``profile_dir`` is where
    ``/stop_profile`` writes torch profiler traces.
    """

    host: str = "0.0.0.0"
    port: int = attrs.field(default=8000, validator=[v.ge(0), v.le(65535)])
    api_key: str | None = None
    max_request_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=v.gt(0))
    shutdown_timeout: float = attrs.field(default=30.0, validator=v.ge(0))
    keep_alive_timeout: float = attrs.field(default=75.0, validator=v.gt(0))
    profile_dir: str | None = None
    log_level: str = attrs.field(default="info", validator=v.in_(("debug", "info", "warning", "error")))


# Extra spellings users bring from ATOM and vLLM.
_ALIASES: dict[str, tuple[str, ...]] = {
    "tensor_parallel_size": ("-tp",),
    "profile_dir": ("--torch-profiler-dir", "--torch_profiler_dir"),
    "level": ("-O",),
}

_HELP: dict[str, str] = {
    "model": "model: HF directory, GGUF file or hub id (default: SmolLM2-135M-Instruct)",
    "served_model_name": "the id clients put in the `model` field (default: the model argument)",
    "dtype": "weight and activation dtype",
    "load_format": "weights format; `dummy` gives random weights",
    "device": "cpu, cuda, cuda:N or auto",
    "num_kv_blocks": "KV cache blocks (default: sized from free memory)",
    "max_model_len": "context length (default: the model's)",
    "max_queued_requests": "waiting requests beyond this are refused with 429",
    "level": "0 eager, 1 dynamo trace check, 2 whole-graph inductor, 3 piecewise inductor (split at attention); "
    "CUDA graphs for decode at 1-3 on CUDA; default 3 on CUDA, 0 on the CPU",
    "async_scheduling": "plan step N+1 while the device runs step N (default: on a GPU)",
    "api_key": "require `Authorization: Bearer KEY` on /v1/*",
    "max_request_bytes": "larger request bodies are refused with 413",
    "shutdown_timeout": "seconds in-flight requests get to finish after SIGTERM",
    "profile_dir": "directory for /start_profile + /stop_profile traces",
}


@attrs.frozen
class Option:
    """One config field seen from the outside: its flags, env var and value parser."""

    name: str
    owner: type
    kind: type  # int, float, str or bool
    optional: bool

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flags(self) -> list[str]:
        kebab, snake = "--" + self.name.replace("_", "-"), "--" + self.name
        return list(dict.fromkeys([kebab, snake, *_ALIASES.get(self.name, ())]))

    def parse(self, text: str) -> Any:
        """Parse a flag's or env var's text; ``none`` clears an optional field."""
        if self.optional and text.strip().lower() in ("", "none", "null"):
            return None
        if self.kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected a boolean (true/false), got {text!r}")
        return self.kind(text)


def _option(owner: type, field: attrs.Attribute, hint: Any) -> Option:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    kinds = [a for a in args if a is not type(None)] or [hint]
    if len(kinds) != 1 or kinds[0] not in (int, float, str, bool):
        raise TypeError(f"{owner.__name__}.{field.name}: unsupported option type {hint!r}")
    return Option(name=field.name, owner=owner, kind=kinds[0], optional=type(None) in args)


def _options() -> tuple[Option, ...]:
    out = []
    for owner in (EngineConfig, ServerSettings):
        hints = typing.get_type_hints(owner)
        out.extend(_option(owner, f, hints[f.name]) for f in attrs.fields(owner))
    return tuple(out)


OPTIONS: tuple[Option, ...] = _options()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one argument per option. Defaults are suppressed so env vars can fill the gaps."""
    for opt in OPTIONS:
        help_text = _HELP.get(opt.name, opt.name.replace("_", " ")) + f" [env {opt.env_var}]"
        if opt.kind is bool:
            parser.add_argument(
                *opt.flags, dest=opt.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                *opt.flags, dest=opt.name, type=opt.parse, default=argparse.SUPPRESS, metavar=opt.name.upper(),
                help=help_text,
            )


def load(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[EngineConfig, ServerSettings]:
    """Build both configs: field defaults, then ``ATOM_TRIO_*`` env vars, then ``overrides`` (parsed flags).

    Raises:
        ValueError: an env var does not parse, or a value is out of range; the
            message names the variable or field.
    """
    values: dict[type, dict[str, Any]] = {EngineConfig: {}, ServerSettings: {}}
    for opt in OPTIONS:
        if environ is not None and opt.env_var in environ:
            try:
                values[opt.owner][opt.name] = opt.parse(environ[opt.env_var])
            except ValueError as exc:
                raise ValueError(f"{opt.env_var}: {exc}") from None
        if overrides is not None and opt.name in overrides:
            values[opt.owner][opt.name] = overrides[opt.name]
    try:
        return EngineConfig(**values[EngineConfig]), ServerSettings(**values[ServerSettings])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid configuration: {exc}") from None


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> tuple[EngineConfig, ServerSettings]:
    """Parse serve flags (for tests and embedding; the CLI adds subcommands around the same table)."""
    parser = argparse.ArgumentParser(prog="atom-trio serve")
    add_arguments(parser)
    return load(vars(parser.parse_args(argv)), environ)
