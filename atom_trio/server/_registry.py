"""Looking up a parser by the name an option gave, for the tool-call and reasoning parser registries."""

from __future__ import annotations

from typing import TypeVar

from ..errors import InvalidConfig

T = TypeVar("T")


def instantiate(registry: dict[str, type[T]], name: str, *, what: str, option: str) -> T:
    """A new ``registry[name]``; an unknown name is an `InvalidConfig` naming ``option`` and listing the choices."""
    parser = registry.get(name)
    if parser is None:
        raise InvalidConfig(f"unknown {what} {name!r}; choose one of: {', '.join(registry)}", options=(option,))
    return parser()
