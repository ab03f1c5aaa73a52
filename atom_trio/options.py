"""The option table: every field of `EngineConfig` and `ServerSettings`, seen from outside.

An option's flag is the field name in kebab-case *and* snake_case
(``--max-num-seqs`` and ``--max_num_seqs``: vLLM users type the first, ATOM users
often the second) plus the aliases its field names, and its environment variable
is ``ATOM_TRIO_<FIELD>``. The CLI's flags, ``--help``, the env vars read by
``hypercorn atom_trio.app:app`` and docs/configuration.md are all generated here
from the fields, so a new config field is a new flag, env var and doc row with no
edit here. ``python -m atom_trio.options > docs/configuration.md`` regenerates the doc.

Each option is read where it means something (`Option.commands`): engine
options everywhere, server options by ``serve`` and the app, and the few that
only ``atom-trio serve`` can honour (where to listen, keep-alive, hypercorn's
log level) not by the app, where hypercorn's own flags do their job. A flag of
``serve`` given to ``generate`` is an error there, and a variable the app cannot
honour is reported (`unread_env`), so no option is ever accepted and ignored.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .config import (
    COMMANDS,
    KIND_NAMES,
    EngineConfig,
    ServerSettings,
    SpeculativeConfig,
)
from .errors import InvalidConfig

ENV_PREFIX = "ATOM_TRIO_"


@attrs.frozen
class Option:
    """One config field seen from the outside: its flags, env var, value parser and documentation."""

    name: str
    owner: type
    kind: type  # int, float, str, bool, or SpeculativeConfig (JSON text)
    optional: bool
    default: Any
    help: str
    choices: tuple[str, ...]
    aliases: tuple[str, ...]
    section: str
    commands: tuple[str, ...]
    """Where it is read: ``serve``, ``generate`` and ``app`` (``hypercorn atom_trio.app:app``)."""
    hypercorn: str | None
    """The hypercorn flag that does this option's job where the app does not read it."""

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flags(self) -> list[str]:
        kebab, snake = "--" + self.name.replace("_", "-"), "--" + self.name
        return list(dict.fromkeys([kebab, snake, *self.aliases]))

    @property
    def full_help(self) -> str:
        """The field's help, and where the option is not read, what to use there instead."""
        if "app" in self.commands:
            return self.help
        return (
            f"{self.help}; not read by `hypercorn atom_trio.app:app`, where hypercorn's `{self.hypercorn}` does its "
            f"job (a set `{self.env_var}` is logged as ignored)"
        )

    def parse(self, text: str) -> Any:
        """Parse a flag's or env var's text; ``none`` clears an optional field (so does an empty number)."""
        cleared = ("none", "null") if self.kind is str else ("", "none", "null")
        if self.optional and text.strip().lower() in cleared:
            return None
        if self.kind is SpeculativeConfig:
            return text  # the field's converter parses the JSON, with the field's own errors
        if self.kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected a boolean (true/false), got {text!r}")
        try:
            return self.kind(text)
        except ValueError:
            raise ValueError(f"expected {KIND_NAMES[self.kind]}, got {text!r}") from None


def _option(owner: type, field: attrs.Attribute, hint: Any, section: str) -> Option:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    kinds = [a for a in args if a is not type(None)] or [hint]
    if len(kinds) != 1 or kinds[0] not in (int, float, str, bool, SpeculativeConfig):
        raise TypeError(f"{owner.__name__}.{field.name}: unsupported option type {hint!r}")
    about = field.metadata
    commands = about["commands"] or (COMMANDS if owner is EngineConfig else ("serve", "app"))
    if "app" not in commands and not about["hypercorn"]:
        raise TypeError(f"{owner.__name__}.{field.name}: the app does not read it, so name the hypercorn flag that does")
    return Option(
        name=field.name, owner=owner, kind=kinds[0], optional=type(None) in args, default=field.default,
        help=about["help"], choices=about["choices"], aliases=about["aliases"], section=about["section"] or section,
        commands=commands, hypercorn=about["hypercorn"],
    )


def _options() -> tuple[Option, ...]:
    out: list[Option] = []
    for owner in (EngineConfig, ServerSettings):
        hints = typing.get_type_hints(owner)
        for field in attrs.fields(owner):
            out.append(_option(owner, field, hints[field.name], out[-1].section if out else ""))
    return tuple(out)


OPTIONS: tuple[Option, ...] = _options()


def options_of(command: str) -> list[Option]:
    """The options ``command`` (``serve``, ``generate`` or ``app``) reads."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    return [opt for opt in OPTIONS if command in opt.commands]


def _flag_type(opt: Option) -> Any:
    """``opt.parse`` for argparse, whose message for a failed ``type`` then says what was expected."""

    def parse(text: str) -> Any:
        try:
            return opt.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


class _NotHere(argparse.Action):
    """A flag of another command: an error that says whose it is, instead of argparse's "unrecognized"."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 - argparse's signature
        parser.error(f"{option_string} is an option of `atom-trio serve` (the HTTP server); `{parser.prog}` does not "
                     "take it")


ATOM_SPEC_FLAGS = {
    "method": ("--method", str, "ATOM's spelling of speculative_config's method (ngram, eagle, eagle3, mtp)"),
    "num_speculative_tokens": (
        "--num-speculative-tokens", int, "ATOM's spelling of speculative_config's num_speculative_tokens",
    ),
    "draft_model": ("--draft-model", str, "ATOM's spelling of speculative_config's draft model (an EAGLE head's directory or hub id)"),
}
"""ATOM's flags for the fields of ``--speculative-config``; given with it, they override its fields."""


def _fold_spec_flags(overrides: Mapping[str, Any], current: Any) -> Any:
    """``speculative_config`` with the values of ATOM's flags (`ATOM_SPEC_FLAGS`) in ``overrides`` laid over it."""
    parts = {name: overrides[f"_spec_{name}"] for name in ATOM_SPEC_FLAGS if f"_spec_{name}" in overrides}
    if not parts:
        return current
    base = SpeculativeConfig.parse(current)
    fields = {} if base is None else attrs.asdict(base, filter=lambda a, v: v is not None)
    return {**fields, **parts}


def add_arguments(parser: argparse.ArgumentParser, command: str = "serve") -> None:
    """Add one argument per option ``command`` reads, grouped by section; the other options' flags are errors.

    Defaults are suppressed so env vars can fill the gaps; each help line
    states its default instead (a None default is explained by the help
    itself). Choices are shown, not enforced, here: a wrong value fails in
    `load` with the same message whether it came from a flag or an env var.
    The backticks that mark code in docs/configuration.md are dropped: a
    terminal shows them as they are.
    """
    wanted = options_of(command)
    groups = {section: parser.add_argument_group(section) for section in dict.fromkeys(o.section for o in wanted)}
    for opt in wanted:
        group = groups[opt.section]
        default = "" if opt.default is None else f"default: {_shown(opt.default)}; "
        help_text = f"{opt.full_help} [{default}env {opt.env_var}]".replace("`", "").replace("%", "%%")
        if opt.kind is bool:
            group.add_argument(
                *opt.flags, dest=opt.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            metavar = "{" + ",".join(opt.choices) + "}" if opt.choices else "JSON" if opt.kind is SpeculativeConfig else opt.name.upper()
            group.add_argument(
                *opt.flags, dest=opt.name, type=_flag_type(opt), default=argparse.SUPPRESS, metavar=metavar,
                help=help_text,
            )
    spec = next((o for o in wanted if o.kind is SpeculativeConfig), None)
    if spec is not None:
        for name, (flag, kind, help_text) in ATOM_SPEC_FLAGS.items():
            groups[spec.section].add_argument(
                flag, f"--{name}", dest=f"_spec_{name}", type=kind, default=argparse.SUPPRESS, help=help_text
            )
    for opt in OPTIONS:
        if opt not in wanted:
            parser.add_argument(
                *opt.flags, dest=f"_not_{opt.name}", action=_NotHere, nargs="?", default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )


def load(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    command: str = "serve",
) -> tuple[EngineConfig, ServerSettings]:
    """Build both configs: field defaults, then ``ATOM_TRIO_*`` env vars, then ``overrides`` (parsed flags).

    Only the options ``command`` reads are taken from ``environ``.

    Raises:
        InvalidConfig: an env var does not parse, a value is out of range, or
            options conflict; the message names the variables a value came from.
    """
    values: dict[type, dict[str, Any]] = {EngineConfig: {}, ServerSettings: {}}
    from_env: dict[str, str] = {}
    for opt in options_of(command):
        if environ is not None and opt.env_var in environ:
            try:
                values[opt.owner][opt.name] = opt.parse(environ[opt.env_var])
            except ValueError as exc:
                raise InvalidConfig(f"{opt.env_var}: {exc}", options=(opt.name,)) from None
            from_env[opt.name] = opt.env_var
        if overrides is not None and opt.name in overrides:
            values[opt.owner][opt.name] = overrides[opt.name]
            from_env.pop(opt.name, None)
    if overrides is not None:
        spec = _fold_spec_flags(overrides, values[EngineConfig].get("speculative_config"))
        if spec is not None:
            values[EngineConfig]["speculative_config"] = spec
    try:
        return EngineConfig(**values[EngineConfig]), ServerSettings(**values[ServerSettings])
    except InvalidConfig as exc:
        sources = [from_env[name] for name in exc.options if name in from_env]
        if not sources:
            raise
        raise InvalidConfig(f"{exc} (set by {', '.join(sources)})", options=exc.options) from None


def unread_env(environ: Mapping[str, str], command: str) -> list[Option]:
    """The options set in ``environ`` that ``command`` does not read (to report them, never to drop them silently)."""
    return [opt for opt in OPTIONS if opt.env_var in environ and command not in opt.commands]


def parse_args(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, command: str = "serve"
) -> tuple[EngineConfig, ServerSettings]:
    """Parse ``command``'s flags (for tests and embedding; the CLI adds subcommands around the same table)."""
    parser = argparse.ArgumentParser(prog=f"atom-trio {command}")
    add_arguments(parser, command)
    return load(vars(parser.parse_args(argv)), environ, command)


def markdown() -> str:
    """docs/configuration.md: one table row per option, one table per section."""
    generate_only = [o for o in options_of("generate") if o.owner is not EngineConfig]
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from the fields of EngineConfig and ServerSettings (atom_trio/config.py) by",
        "     `python -m atom_trio.options > docs/configuration.md`; edit those fields, not this file. -->",
        "",
        "Every option is a flag of `atom-trio serve`, an environment variable, and a keyword of",
        "`atom_trio.open_engine` (`EngineConfig`) or a field of `ServerSettings`. A flag beats its environment",
        "variable, which beats the default. Boolean flags also have a `--no-` form, and their environment variables",
        "take `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`; `none` clears an option whose default is none.",
        "",
        "`atom-trio generate` takes the engine options (every section but Server) and "
        + ", ".join(f"`{o.flags[0]}`" for o in generate_only)
        + "; a server flag there is",
        "an error. `hypercorn atom_trio.app:app` reads the environment variables of every option but those that say",
        "otherwise below, whose job hypercorn's own flags do there; such a variable set in its environment is logged",
        "as ignored.",
        "",
        "Values are checked as they are read: each against its type and range, and against the others (options",
        "that conflict are an error, never a silent override). What depends on the device (a GPU for `cuda` and",
        "`triton`, one GPU per tensor-parallel rank) is checked when the engine starts, before the tokenizer or",
        "any weight loads. A wrong value ends `atom-trio` with status 2 and one line that says why, and raises",
        "`atom_trio.InvalidConfig` in the library.",
    ]
    section = None
    for opt in OPTIONS:
        if opt.section != section:
            section = opt.section
            lines += ["", f"## {section}", "", "| flags | env var | type | default | choices | what it does |"]
            lines.append("|---|---|---|---|---|---|")
        cells = [
            "<br>".join(f"`{flag}`" for flag in opt.flags),
            f"`{opt.env_var}`",
            opt.kind.__name__,
            f"`{_shown(opt.default)}`",
            ", ".join(f"`{choice}`" for choice in opt.choices),
            opt.full_help,
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    """A default as an env var would spell it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


if __name__ == "__main__":
    print(markdown(), end="")
