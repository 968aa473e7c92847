"""One registry class for everything nasreid looks up by name (timm ``_registry.py`` style).

Registries: ``SPACES`` (search spaces), ``STRATEGIES`` (search strategies), ``DATASETS`` (dataset layouts),
``LOSSES`` (training losses), ``MATCHERS`` (query/gallery scorers for evaluation), ``POSTPROCESSORS``
(row post-processors after a matcher: re-ranking, TLift), ``METHODS`` (training methods of a retrain) and
``AUGMENTATIONS`` (training-image augmentations named under ``data.augment``: RSA, Random Block).

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
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, Optional, TypeVar

from nasreid.errors import NasreidError, RecipeError, RegistryError

__all__ = [
    "Registry", "RegistryError", "SPACES", "STRATEGIES", "DATASETS", "LOSSES", "MATCHERS", "POSTPROCESSORS",
    "METHODS", "AUGMENTATIONS", "ALL_REGISTRIES", "register_space", "register_strategy", "get_space", "get_strategy",
    "load_plugins", "check_kwargs", "space_presets", "config_error",
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

    # ---- validation and construction --------------------------------------------------------------
    def validate(self, name: str, kwargs: Mapping[str, Any], where: str, reserved: Iterable[str] = ()) -> Any:
        """Check ``kwargs`` for the entry ``name`` before anything is built: the one validation path of
        every registered component.

        A component with a pydantic ``Config`` (training methods, strategies) is validated by it (a strategy's
        own ``validate_kwargs`` where it has one); any other by its signature (:func:`check_kwargs`).

        Args:
            where: recipe location for messages, e.g. ``"recipes/x.yaml: training.kwargs"``.
            reserved: arguments nasreid fills itself (``num_classes``, ``root``): the recipe may not set them.

        Returns:
            The validated ``Config`` instance, or None for a signature check.

        Raises:
            RecipeError: an unknown name (lists the known ones), an unknown, reserved or invalid key, a missing
                required argument -- named as ``where.<key>``.
        """
        try:
            obj: Any = self.get(name)
        except RegistryError as e:
            raise RecipeError(f"{where.rsplit('.', 1)[0]}.name: {e}") from None
        for key in kwargs:
            if key in set(reserved):
                raise RecipeError(f"{where}.{key}: set by nasreid, not by the recipe")
        if hasattr(obj, "validate_kwargs"):
            try:
                return obj.validate_kwargs(kwargs)
            except NasreidError as e:
                raise RecipeError(f"{where.split(':')[0]}: {e}") from None
        config: Any = getattr(obj, "Config", None)
        if isinstance(config, type) and hasattr(config, "model_validate"):
            from pydantic import ValidationError

            try:
                return config.model_validate(dict(kwargs))
            except ValidationError as e:
                raise config_error(e, where, f"{self.kind} {name!r}", config) from None
        check_kwargs(obj, kwargs, where, f"{self.kind} {name!r}", reserved=reserved)
        return None

    def build(self, name: str, kwargs: Mapping[str, Any] | None = None, where: str = "kwargs", /,
              *args: Any, **fixed: Any) -> Any:
        """``self.get(name)(*args, **fixed, **kwargs)`` after :meth:`validate`: the one way nasreid builds a
        registered component from a recipe section.

        Args:
            kwargs: the recipe's arguments (e.g. ``loss.kwargs``), validated.
            where: recipe location for messages, e.g. ``"recipes/x.yaml: loss.kwargs"``.
            *args: arguments nasreid passes positionally, e.g. the search space of a strategy.
            **fixed: arguments nasreid fills by keyword, e.g. ``num_classes``.

        ``args`` and ``fixed`` are not validated: they fill the component's parameters, which the recipe may
        not set (the parameters that ``args`` bind, read from the signature, count as reserved like ``fixed``).

        Raises:
            RecipeError: see :meth:`validate`.
        """
        kwargs = dict(kwargs or {})
        reserved = set(fixed)
        if args:
            try:
                reserved |= set(_positional_names(self.get(name), len(args)))
            except RegistryError:
                pass  # validate names the unknown entry
        self.validate(name, kwargs, where, reserved=reserved)
        factory: Any = self.get(name)
        return factory(*args, **fixed, **kwargs)


def config_error(err: Any, where: str, what: str, config: Any) -> Exception:
    """A pydantic ``ValidationError`` of a component's ``Config`` as one :class:`~nasreid.errors.RecipeError`
    naming the first offending key (``where.<key>``): an unknown key with the accepted ones, a model validator's
    own message (which starts with its key), or pydantic's message with the value."""
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    key = f"{where}.{loc}" if loc else where
    if first["type"] == "extra_forbidden":
        accepted = ", ".join(getattr(config, "model_fields", {})) or "(none)"
        return RecipeError(f"{key}: unknown argument of {what}; accepted: {accepted}")
    msg = str(first["msg"]).removeprefix("Value error, ")
    if not loc and first["type"] == "value_error":
        return RecipeError(f"{where}.{msg}")
    return RecipeError(f"{key}: {msg} (got {first.get('input')!r})")


def check_kwargs(fn: Callable, kwargs: Mapping[str, Any], where: str, what: str,
                 reserved: Iterable[str] = ()) -> None:
    """Check ``kwargs`` against the signature of ``fn`` (a function or a class).

    Args:
        where: recipe location for messages, e.g. ``"recipes/x.yaml: space.kwargs"``.
        what: what ``fn`` is, e.g. ``"search space 'osnet_ain'"``.
        reserved: arguments nasreid fills itself (``num_classes``, ``root``): the recipe may not set them.

    Raises:
        RecipeError: an unknown or reserved key (named, with the accepted ones), or a required argument
            missing.
    """
    import inspect

    reserved = set(reserved)
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY) and n != "self"]
    accepted = [n for n in named if n not in reserved]
    for key in kwargs:
        if key in reserved:
            raise RecipeError(f"{where}.{key}: set by nasreid, not by the recipe")
        if key not in named and not var_kw:
            raise RecipeError(f"{where}.{key}: unknown argument of {what}; accepted: {', '.join(accepted) or '(none)'}")
    missing = [n for n in accepted if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise RecipeError(f"{where}: {what} needs {', '.join(missing)}")


def _positional_names(fn: Any, n: int) -> list[str]:
    """The names of the first ``n`` positional parameters of ``fn`` (a function or a class; ``self`` left out),
    empty when its signature cannot be read."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.name != "self"][:n]


def _same_definition(a: Any, b: Any) -> bool:
    return bool((getattr(a, "__module__", None), getattr(a, "__qualname__", None)) ==
                (getattr(b, "__module__", None), getattr(b, "__qualname__", None)) and getattr(a, "__qualname__", None))


def _describe(o: Any) -> str:
    return f"{getattr(o, '__module__', '?')}.{getattr(o, '__qualname__', repr(o))}"


SPACES: Registry[type] = Registry("search space", ("nasreid.search_spaces",))
# Strategy subclasses; typed Any since mypy cannot resolve nasreid.strategies.base.Strategy (pyproject's
# package-dir installs strategies/ under that name; mypy reads it as ``strategies``), so that their classmethods
# (derive, plot_run) type-check where a registered strategy is looked up
STRATEGIES: Registry[Any] = Registry("strategy", ("nasreid.strategies",))
DATASETS: Registry[Callable] = Registry("dataset", ("nasreid.data.datasets",))
LOSSES: Registry[Callable] = Registry("loss", ("nasreid.losses",))
MATCHERS: Registry[Callable] = Registry("matcher", ("nasreid.evaluation.matchers", "nasreid.evaluation.qaconv"))
POSTPROCESSORS: Registry[Callable] = Registry("post-processor", ("nasreid.evaluation.matchers",
                                                                 "nasreid.evaluation.rerank",
                                                                 "nasreid.evaluation.tlift"))
AUGMENTATIONS: Registry[Callable] = Registry("augmentation", ("nasreid.data.transforms", "nasreid.data.random_block"))
METHODS: Registry[Callable] = Registry("training method", ("nasreid.methods.supervised",
                                                            "nasreid.methods.qaconv",
                                                            "nasreid.methods.domainmix"))

#: every registry by the plural name ``nasreid list`` prints
ALL_REGISTRIES: dict[str, Registry] = {
    "spaces": SPACES, "strategies": STRATEGIES, "datasets": DATASETS, "losses": LOSSES,
    "matchers": MATCHERS, "postprocessors": POSTPROCESSORS, "methods": METHODS, "augmentations": AUGMENTATIONS,
}


def register_space(name: str, presets: Optional[Mapping[str, Mapping[str, Any]]] = None):
    """Class decorator registering a search space (a :class:`nasreid.mutables.ModelSpace`) with its presets.

    Args:
        presets: named architectures of the space (published or hand-designed networks), each
            ``{"choices": {label: value}, "space_kwargs": {...} (optional), "doc": "..." (optional)}``; set as the
            class attribute ``presets`` and found by :func:`space_presets` / ``preset:NAME`` genotypes, so a
            plugin space has presets too.
    """
    def deco(cls):
        if presets is not None:
            cls.presets = {k: dict(v) for k, v in presets.items()}
        return SPACES.register(name)(cls)

    return deco


def space_presets(space: str) -> dict[str, dict[str, Any]]:
    """``{preset name: {"choices": ..., "space_kwargs": ...}}`` registered with ``space``.

    Raises:
        RegistryError: unknown space (lists the known ones).
    """
    return dict(getattr(SPACES.get(space), "presets", None) or {})


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
