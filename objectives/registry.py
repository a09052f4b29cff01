"""Objective registry: `objective=<name>` -> an `Objective` subclass (like timm's model registry)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from objectives.base import Objective

_REGISTRY: dict[str, type[Objective]] = {}
# Every public module of the `objectives` package is imported on first lookup, so an
# objective registers itself by existing: one new file, no list to edit.
_loaded = False

T = TypeVar("T", bound=type)


def register(name: str, config: type, *, views: int = 1, mask: str | None = None) -> Callable[[T], T]:
    """Class decorator: register an Objective subclass as `objective=<name>` with what it needs.

    config: its config dataclass (objectives/configs.py). views: augmented crops per image
    the data pipeline draws; mask: "random" | "block" (data.masks) for a per-sample mask of
    `cfg.mask_ratio`, or None.
    """

    def add(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"objective {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
        cls.name, cls.config_class, cls.views, cls.mask_kind = name, config, views, mask
        _REGISTRY[name] = cls
        return cls

    return add


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    import pkgutil

    import objectives

    for info in pkgutil.iter_modules(objectives.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"objectives.{info.name}")
    _loaded = True


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
