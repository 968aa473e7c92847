"""One registry class for everything nasreid looks up by name (timm ``_registry.py`` style).

Registries: ``SPACES`` (search spaces), ``STRATEGIES`` (search strategies), ``DATASETS`` (dataset layouts),
``LOSSES`` (training losses), ``MATCHERS`` (query/gallery scorers for evaluation), ``POSTPROCESSORS``
(row post-processors after a matcher: re-ranking, TLift) and ``METHODS`` (training methods of a retrain).

A registry knows which package fills it and imports that package on the first lookup, so importing the
engine pulls in no concrete space or strategy until a recipe names one. Names are case-insensitive; a name
registered twice with a different object is refused; an unknown name raises :class:`RegistryError`
listing the known ones.

Spaces and strategies never import each other: they meet through :mod:`nasreid.mutables` and these
registries.

Example (a user's own loss, e.g. in ``my_losses.py`` listed under ``plugins:`` in a recipe)::

    from nasreid.registry import LOSSES

    @LOSSES.register("center")
    class CenterLoss(torch.nn.Module):
        def __init__(self, num_classes, **kwargs): ...
        def forward(self, outputs: dict, batch: dict): return loss, {"loss": float(loss)}

    LOSSES.names("c*")   # -> ['center']
"""
from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from nasreid.errors import RegistryError

__all__ = [
    "Registry", "RegistryError", "SPACES", "STRATEGIES", "DATASETS", "LOSSES", "MATCHERS", "POSTPROCESSORS",
    "METHODS", "ALL_REGISTRIES", "register_space", "register_strategy", "get_space", "get_strategy",
    "load_plugins",
]

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table (classes or factories).

    Args:
        kind: what is registered, used in messages (``"search space"``, ``"loss"`` ...).
        populate: modules imported on the first lookup; they register the built-in entries.

    Raises (from its methods):
        RegistryError: unknown name (message lists the known names), or a name taken by another object.
    """

    def __init__(self, kind: str, populate: tuple[str, ...] = ()):
        self.kind = kind
        self._populate = populate
        self._table: dict[str, T] = {}
        self._populated = False

    # ---- registration ---------------------------------------------------------------------------
    def register(self, name: Optional[str] = None, obj: Optional[T] = None):
        """Register ``obj`` under ``name``; without ``obj`` returns a decorator.

        ``name`` defaults to the object's ``name`` attribute or its ``__name__``. Registering the same
        object (or a class with the same qualified name, as on a module reload) again is a no-op.
        """
        def deco(o: T) -> T:
            key = (name or getattr(o, "name", None) or o.__name__).lower()  # type: ignore[attr-defined]
            old = self._table.get(key)
            if old is not None and old is not o and not _same_definition(old, o):
                raise RegistryError(f"{self.kind} {key!r} is already registered to {_describe(old)}")
            self._table[key] = o
            return o

        return deco(obj) if obj is not None else deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and interactive sessions)."""
        self._table.pop(name.lower(), None)

    # ---- lookup ---------------------------------------------------------------------------------
    def _ensure(self) -> None:
        if not self._populated:
            self._populated = True
            for mod in self._populate:
                importlib.import_module(mod)

    def get(self, name: str) -> T:
        """The object registered as ``name`` (case-insensitive).

        Raises:
            RegistryError: unknown name; the message lists the known ones.
        """
        self._ensure()
        key = str(name).lower()
        if key not in self._table:
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or '(none)'}")
        return self._table[key]

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell ``pattern`` (``"osnet*"``)."""
        self._ensure()
        return sorted(k for k in self._table if fnmatch.fnmatch(k, pattern.lower()))

    def items(self) -> Iterator[tuple[str, T]]:
        """``(name, object)`` pairs, sorted by name."""
        self._ensure()
        return iter(sorted(self._table.items()))

    def __contains__(self, name: object) -> bool:
        self._ensure()
        return isinstance(name, str) and name.lower() in self._table

    def __len__(self) -> int:
        self._ensure()
        return len(self._table)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._table)} entries)"


def _same_definition(a: Any, b: Any) -> bool:
    return (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == \
        (getattr(b, "__module__", None), getattr(b, "__qualname__", None)) and getattr(a, "__qualname__", None)


def _describe(o: Any) -> str:
    return f"{getattr(o, '__module__', '?')}.{getattr(o, '__qualname__', repr(o))}"


SPACES: Registry[type] = Registry("search space", ("nasreid.search_spaces",))
STRATEGIES: Registry[type] = Registry("strategy", ("nasreid.strategies",))
DATASETS: Registry[Callable] = Registry("dataset", ("nasreid.data.datasets",))
LOSSES: Registry[Callable] = Registry("loss", ("nasreid.losses",))
MATCHERS: Registry[Callable] = Registry("matcher", ("nasreid.evaluation.matchers", "nasreid.evaluation.qaconv"))
POSTPROCESSORS: Registry[Callable] = Registry("post-processor", ("nasreid.evaluation.matchers",
                                                                 "nasreid.evaluation.rerank",
                                                                 "nasreid.evaluation.tlift"))
METHODS: Registry[Callable] = Registry("training method", ("nasreid.engine.methods",
                                                            "nasreid.engine.qaconv_method",
                                                            "nasreid.engine.domainmix"))

#: every registry by the plural name ``nasreid list`` prints
ALL_REGISTRIES: dict[str, Registry] = {
    "spaces": SPACES, "strategies": STRATEGIES, "datasets": DATASETS, "losses": LOSSES,
    "matchers": MATCHERS, "postprocessors": POSTPROCESSORS, "methods": METHODS,
}


def register_space(name: str):
    """Class decorator registering a search space (a :class:`nasreid.mutables.ModelSpace`)."""
    return SPACES.register(name)


def register_strategy(name: str):
    """Class decorator registering a search strategy (a :class:`nasreid.strategies.Strategy`)."""
    return STRATEGIES.register(name)


def get_space(name: str) -> type:
    """Space class for ``name``. Raises :class:`RegistryError` listing the known spaces."""
    return SPACES.get(name)


def get_strategy(name: str) -> type:
    """Strategy class for ``name``. Raises :class:`RegistryError` listing the known strategies."""
    return STRATEGIES.get(name)


def load_plugins(entries: list[str], base: Optional[Path] = None) -> list[str]:
    """Import user modules that register spaces, strategies, losses ... (a recipe's ``plugins:``).

    Each entry is a Python file (absolute, or relative to ``base`` -- the recipe's folder -- or to the
    current folder) or an importable module name. Returns the module names imported.

    Raises:
        RegistryError: a file that does not exist / a module that cannot be found (names the entry);
            exceptions raised by the plugin's own code propagate with their traceback.
    """
    done = []
    for entry in entries:
        if entry.endswith(".py"):
            p = Path(entry)
            if not p.is_absolute() and base is not None and (base / p).is_file():
                p = base / p
            if not p.is_file():
                raise RegistryError(f"plugin file not found: {entry}")
            p = p.resolve()
            modname = f"nasreid_plugin_{p.stem}_{abs(hash(str(p))) % 10**8}"
            if modname not in sys.modules:
                spec = importlib.util.spec_from_file_location(modname, p)
                module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                sys.modules[modname] = module
                try:
                    spec.loader.exec_module(module)  # type: ignore[union-attr]
                except BaseException:
                    sys.modules.pop(modname, None)
                    raise
            done.append(modname)
        else:
            if importlib.util.find_spec(entry) is None:
                raise RegistryError(f"plugin module not found: {entry}")
            importlib.import_module(entry)
            done.append(entry)
    return done
