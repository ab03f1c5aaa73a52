"""The option table: every field of `EngineConfig` and `ServerSettings`, seen from outside.

An option's flag is the field name in kebab-case *and* snake_case
(``--max-num-seqs`` and ``--max_num_seqs``: vLLM users type the first, ATOM users
often the second) plus the aliases its field names, and its environment variable
is ``ATOM_TRIO_<FIELD>``. The CLI's flags, ``--help``, the env vars read by
``hypercorn atom_trio.app:app`` and docs/configuration.md are all generated here
from the fields, so a new config field is a new flag, env var and doc row with no
edit here. ``python -m atom_trio.options > docs/configuration.md`` regenerates the doc.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .config import EngineConfig, ServerSettings

ENV_PREFIX = "ATOM_TRIO_"


@attrs.frozen
class Option:
    """One config field seen from the outside: its flags, env var, value parser and documentation."""

    name: str
    owner: type
    kind: type  # int, float, str or bool
    optional: bool
    default: Any
    help: str
    choices: tuple[str, ...]
    aliases: tuple[str, ...]
    section: str

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flags(self) -> list[str]:
        kebab, snake = "--" + self.name.replace("_", "-"), "--" + self.name
        return list(dict.fromkeys([kebab, snake, *self.aliases]))

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


def _option(owner: type, field: attrs.Attribute, hint: Any, section: str) -> Option:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    kinds = [a for a in args if a is not type(None)] or [hint]
    if len(kinds) != 1 or kinds[0] not in (int, float, str, bool):
        raise TypeError(f"{owner.__name__}.{field.name}: unsupported option type {hint!r}")
    about = field.metadata
    return Option(
        name=field.name, owner=owner, kind=kinds[0], optional=type(None) in args, default=field.default,
        help=about["help"], choices=about["choices"], aliases=about["aliases"], section=about["section"] or section,
    )


def _options() -> tuple[Option, ...]:
    out: list[Option] = []
    for owner in (EngineConfig, ServerSettings):
        hints = typing.get_type_hints(owner)
        for field in attrs.fields(owner):
            out.append(_option(owner, field, hints[field.name], out[-1].section if out else ""))
    return tuple(out)


OPTIONS: tuple[Option, ...] = _options()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one argument per option, grouped by section. Defaults are suppressed so env vars can fill the gaps.

    Choices are shown, not enforced, here: a wrong value fails in `load` with
    the same message whether it came from a flag or an env var.
    """
    groups = {section: parser.add_argument_group(section) for section in dict.fromkeys(o.section for o in OPTIONS)}
    for opt in OPTIONS:
        group = groups[opt.section]
        help_text = f"{opt.help} [env {opt.env_var}]".replace("%", "%%")
        if opt.kind is bool:
            group.add_argument(
                *opt.flags, dest=opt.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            metavar = "{" + ",".join(opt.choices) + "}" if opt.choices else opt.name.upper()
            group.add_argument(
                *opt.flags, dest=opt.name, type=opt.parse, default=argparse.SUPPRESS, metavar=metavar, help=help_text,
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


def markdown() -> str:
    """docs/configuration.md: one table row per option, one table per section."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from the fields of EngineConfig and ServerSettings (atom_trio/config.py) by",
        "     `python -m atom_trio.options > docs/configuration.md`; edit those fields, not this file. -->",
        "",
        "Every option is a flag of `atom-trio serve` and `atom-trio generate`, an environment variable read by",
        "those commands and by `hypercorn atom_trio.app:app`, and a keyword of `atom_trio.open_engine`",
        "(`EngineConfig`) or a field of `ServerSettings`. A flag beats its environment variable, which beats the",
        "default. Boolean flags also have a `--no-` form, and their environment variables take `1`/`true`/`yes`/`on`",
        "or `0`/`false`/`no`/`off`; `none` clears an option whose default is none.",
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
            opt.help,
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
