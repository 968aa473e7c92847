"""Name -> class registries for search spaces and strategies.

Spaces and strategies never import each other: they meet through :mod:`nasreid.mutables` and these
registries. ``nasreid.search_spaces`` and ``nasreid.strategies`` register themselves on import.
"""
from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["SPACES", "STRATEGIES", "register_space", "register_strategy", "get_space", "get_strategy"]

SPACES: dict[str, type] = {}
STRATEGIES: dict[str, type] = {}


def _register(table: dict, kind: str, name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in table and table[name].__qualname__ != cls.__qualname__:
            raise KeyError(f"{kind} {name!r} is already registered")
        table[name] = cls
        return cls
    return deco


def register_space(name: str):
    """Class decorator registering a search space (a :class:`nasreid.mutables.ModelSpace`)."""
    return _register(SPACES, "search space", name)


def register_strategy(name: str):
    """Class decorator registering a search strategy."""
    return _register(STRATEGIES, "strategy", name)


def get_space(name: str) -> type:
    """Space class for ``name``. Raises KeyError listing the known spaces."""
    importlib.import_module("nasreid.search_spaces")
    if name not in SPACES:
        raise KeyError(f"unknown search space {name!r}; known: {sorted(SPACES)}")
    return SPACES[name]


def get_strategy(name: str) -> type:
    """Strategy class for ``name``. Raises KeyError listing the known strategies."""
    importlib.import_module("nasreid.strategies")
    if name not in STRATEGIES:
        raise KeyError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[name]
