"""Objective registry: `objective=<name>` -> an `Objective` subclass (like timm's model registry)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from objectives.base import Objective

_REGISTRY: dict[str, type[Objective]] = {}
# Modules imported on first lookup so that registration happens without the caller
# knowing which file defines which objective.
_BUILTIN_MODULES = ("objectives.mae", "objectives.vqkd", "objectives.beitv2", "objectives.maskdistill")

T = TypeVar("T")


def register(cls: T) -> T:
    """Class decorator: register an Objective subclass under `cls.name`."""
    name = cls.name  # type: ignore[attr-defined]
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"objective {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
    _REGISTRY[name] = cls  # type: ignore[assignment]
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available() -> list[str]:
    """Names of the registered objectives."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_objective_class(name: str) -> type[Objective]:
    """The Objective class registered under `name`; a clear error otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid choices: {', '.join(sorted(_REGISTRY))}") from None
