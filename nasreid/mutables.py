"""Labelled architecture choices on plain ``torch.nn`` (NNI-3.0-shaped, no NNI dependency).

A *search space* is an ``nn.Module`` (subclass of :class:`ModelSpace`) that declares its choices with

* :class:`LayerChoice` -- a labelled choice among candidate ``nn.Module`` s (e.g. the four OS blocks of
  OSNet-AIN, Zhou et al. TPAMI 2021, Fig. 5), and
* :class:`Categorical` -- a labelled choice among plain values (integers such as RMGL stripe counts), and
* :class:`Numerical` -- a labelled number in a declared range ``[low, high]`` (linear or log scale, optionally
  integer or on a step grid), e.g. the RSA hyper-parameters of RMGL (Wang et al., TIP 2020, Sec. III-D).

A value choice may name a recipe key (``recipe_key="data.augment.rsa.p"``): the value then configures the
training run rather than the network (an augmentation or optimiser setting searched with the
architecture); :func:`recipe_overrides` collects them so that every trainer of a sample (an HPO trial's
proxy run, ``nasreid train``) applies them the same way.

The words and sample dictionaries follow NNI 3.0 (``LayerChoice(candidates, label=...)``,
``Categorical(values, label=...)``, ``space.simplify()``, ``space.freeze(sample)``, a *sample* being
``{label: value}``), so a bridge to NNI can be added later without changing spaces or genotypes.

Rules of the house: a search space never imports a strategy and a strategy never imports a concrete
space; strategies find the choices with :func:`simplify` / :func:`iter_layer_choices` and replace the
``LayerChoice`` modules by their own mixed ops.

Freezing (:func:`freeze`) rebuilds the space with the same constructor arguments inside
:func:`frozen_context`, where a ``LayerChoice`` *is* its chosen candidate and a ``Categorical`` *is*
its chosen value, and then copies the trained weights of the chosen candidates from the supernet, so the
frozen network computes exactly what the supernet computes on the chosen path.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import re
import threading
from collections import OrderedDict
from typing import Any, Iterator, Mapping, Sequence

import networkx as nx
from torch import nn

from nasreid.errors import NasreidError

__all__ = [
    "Mutable",
    "Categorical",
    "Numerical",
    "LayerChoice",
    "ModelSpace",
    "MutableError",
    "frozen_context",
    "current_frozen_sample",
    "ensure_frozen",
    "simplify",
    "iter_layer_choices",
    "freeze",
    "validate_sample",
    "space_graph",
    "default_sample",
    "random_sample",
    "recipe_overrides",
]

_LABEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_state = threading.local()


class MutableError(NasreidError, ValueError):
    """A sample or a declaration does not fit the space (unknown label, value not among the choices, ...)."""


@contextlib.contextmanager
def frozen_context(sample: Mapping[str, Any]):
    """Context in which ``LayerChoice`` and ``Categorical`` declarations resolve to ``sample[label]``.

    Nested contexts merge (inner wins). Used by :func:`freeze` and by spaces that need a concrete value
    at construction time (e.g. a stripe count that changes the number of heads).
    """
    prev = getattr(_state, "sample", None)
    merged = dict(prev or {})
    merged.update(sample)
    _state.sample = merged
    try:
        yield merged
    finally:
        _state.sample = prev


def current_frozen_sample() -> dict[str, Any] | None:
    """The sample of the innermost :func:`frozen_context`, or ``None`` outside any."""
    return getattr(_state, "sample", None)


class Mutable:
    """Base of labelled choices. ``label`` is unique within a space; ``values`` lists the choices."""

    label: str

    @property
    def values(self) -> list[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def default(self) -> Any:
        """First value: the default when a sample omits this label."""
        return self.values[0]

    def check(self, value: Any) -> None:
        """Raise :class:`MutableError` naming the label if ``value`` is not one of the choices."""
        if value not in self.values:
            raise MutableError(
                f"value {value!r} is not a choice of {self.label!r}; choices are {self.values!r}"
            )

    def sample(self, rng) -> Any:
        """A uniformly drawn value (``rng``: a :class:`random.Random`)."""
        return rng.choice(self.values)


def _check_label(label: str) -> str:
    if not isinstance(label, str) or not _LABEL_RE.match(label):
        raise MutableError(f"invalid mutable label {label!r}: use letters, digits, '_', '.', '-'")
    return label


class Categorical(Mutable):
    """A labelled choice among plain values (NNI ``Categorical``).

    Args:
        values: the candidate values (ints, floats, strings, bools), at least one, no duplicates.
        label: unique name of the choice, used as the key of samples and genotypes.
        default: the value of the unsearched space (default: the first value).
        recipe_key: dotted recipe key this value sets when a sample is trained (see
            :func:`recipe_overrides`); None: the space itself reads the value (:func:`ensure_frozen`).

    Raises:
        MutableError: empty or duplicated values, invalid label.
    """

    def __init__(self, values: Sequence[Any], *, label: str, default: Any = None, recipe_key: str | None = None):
        values = list(values)
        if not values:
            raise MutableError(f"Categorical {label!r} needs at least one value")
        if len(set(map(repr, values))) != len(values):
            raise MutableError(f"Categorical {label!r} has duplicated values {values!r}")
        self._values = values
        self.label = _check_label(label)
        self.recipe_key = recipe_key
        if default is not None and default not in values:
            raise MutableError(f"Categorical {label!r}: default {default!r} is not among {values!r}")
        self._default = values[0] if default is None else default

    def default(self) -> Any:
        """The value an unsearched space uses (``default``, else the first value)."""
        return self._default

    @property
    def values(self) -> list[Any]:
        return list(self._values)

    def __repr__(self) -> str:
        return f"Categorical({self._values!r}, label={self.label!r})"


class Numerical(Mutable):
    """A labelled number in ``[low, high]`` (NNI ``Numerical``; Optuna ``suggest_float`` / ``suggest_int``).

    Args:
        low, high: inclusive range, ``low < high`` (``low > 0`` with ``log``).
        label: unique name of the choice.
        log: sample on a log scale.
        step: grid step (values ``low + k * step``); None: continuous (floats) or 1 (integers).
        integer: the value is an ``int`` (``low``, ``high``, ``step`` integers).
        default: the value an unsearched space uses (default ``low``); must lie in the range.
        recipe_key: dotted recipe key this value sets (see :func:`recipe_overrides`).

    Raises:
        MutableError: empty or inverted range, ``log`` with ``low <= 0``, ``log`` with a ``step``,
            non-integer bounds for ``integer``, a default outside the range, invalid label.

    Example::

        rsa_p = space.add_mutable(Numerical(0.0, 1.0, default=0.5, label="rsa.p", recipe_key="data.augment.rsa.p"))
    """

    def __init__(self, low: float, high: float, *, label: str, log: bool = False, step: float | None = None,
                 integer: bool = False, default: float | None = None, recipe_key: str | None = None):
        self.label = _check_label(label)
        if not low < high:
            raise MutableError(f"Numerical {label!r}: low {low!r} must be below high {high!r}")
        if log and low <= 0:
            raise MutableError(f"Numerical {label!r}: a log-scale range needs low > 0, got {low!r}")
        if log and step is not None:
            raise MutableError(f"Numerical {label!r}: step and log cannot be combined")
        if step is not None and step <= 0:
            raise MutableError(f"Numerical {label!r}: step must be positive, got {step!r}")
        if integer and not all(float(v).is_integer() for v in (low, high, step or 1)):
            raise MutableError(f"Numerical {label!r}: an integer range needs integer low, high and step")
        cast = int if integer else float
        self.low, self.high, self.log, self.integer = cast(low), cast(high), bool(log), bool(integer)
        self.step = None if step is None else cast(step)
        self.recipe_key = recipe_key
        self._default = self.low if default is None else cast(default)
        self.check(self._default)

    @property
    def values(self) -> list[Any]:
        """``[low, high]``: the range (a numerical choice has no finite list of values)."""
        return [self.low, self.high]

    def default(self) -> Any:
        return self._default

    def check(self, value: Any) -> None:
        """Raise :class:`MutableError` naming the label if ``value`` is not a number in the range (an
        integer for ``integer``, on the grid for ``step``)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MutableError(f"value {value!r} of {self.label!r} is not a number")
        if self.integer and not float(value).is_integer():
            raise MutableError(f"value {value!r} of {self.label!r} is not an integer")
        if not self.low - 1e-12 <= value <= self.high + 1e-12:
            raise MutableError(f"value {value!r} of {self.label!r} is outside [{self.low}, {self.high}]")
        if self.step is not None:
            k = (value - self.low) / self.step
            if abs(k - round(k)) > 1e-6:
                raise MutableError(f"value {value!r} of {self.label!r} is not on the grid {self.low} + k * {self.step}")

    def sample(self, rng) -> Any:
        """A uniformly drawn value (log-uniform with ``log``, on the grid with ``step``)."""
        import math

        if self.step is not None:
            k = rng.randint(0, int(math.floor((self.high - self.low) / self.step + 1e-9)))
            v = self.low + k * self.step
        elif self.log:
            v = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        elif self.integer:
            return rng.randint(self.low, self.high)
        else:
            v = rng.uniform(self.low, self.high)
        return int(round(v)) if self.integer else float(v)

    def __repr__(self) -> str:
        opts = "".join([", log=True" if self.log else "", f", step={self.step}" if self.step else "",
                        ", integer=True" if self.integer else ""])
        return f"Numerical({self.low}, {self.high}{opts}, label={self.label!r})"


def ensure_frozen(mutable: Categorical | Numerical | Any) -> Any:
    """Concrete value of a ``Categorical`` / ``Numerical`` in the current :func:`frozen_context` (its
    default outside).

    Non-mutables pass through unchanged, so space code can write ``n = ensure_frozen(self.n_stripes)``.
    """
    if not isinstance(mutable, (Categorical, Numerical)):
        return mutable
    sample = current_frozen_sample()
    if sample is not None and mutable.label in sample:
        value = sample[mutable.label]
        mutable.check(value)
        return value
    return mutable.default()


class LayerChoice(nn.Module, Mutable):
    """A labelled choice among candidate modules (NNI ``LayerChoice``); Eq. (5) of OSNet-AIN.

    Candidates are plain ``nn.Module`` s that map the same input shape to the same output shape.
    Outside a frozen context the module holds all candidates in ``self.candidates`` (an ``nn.ModuleDict``)
    and, as a plain module, runs the *first* candidate (so an unsearched supernet is a valid network);
    strategies replace it with their own mixed op. Inside :func:`frozen_context` with this label in the
    sample, the constructor returns the chosen candidate module itself.

    Args:
        candidates: ``{name: module}`` (names are the genotype values) or a list (values are indices).
        label: unique name, e.g. ``"conv2_1"``.

    Raises:
        MutableError: no candidates, invalid label, unknown frozen value.
    """

    def __new__(cls, *args, **kwargs):
        candidates = args[0] if args else kwargs.get("candidates")
        label = kwargs.get("label")
        sample = current_frozen_sample()
        if cls is LayerChoice and sample is not None and label in sample:
            cands = _as_ordered(candidates, label)
            value = sample[label]
            if value not in cands:
                raise MutableError(
                    f"value {value!r} is not a choice of {label!r}; choices are {list(cands)!r}"
                )
            return cands[value]
        return super().__new__(cls)

    def __init__(self, candidates, *, label: str):
        super().__init__()
        cands = _as_ordered(candidates, label)
        self.label = _check_label(label)
        self.candidates = nn.ModuleDict(OrderedDict((str(k), v) for k, v in cands.items()))
        self._keys: list[Any] = list(cands)

    @property
    def values(self) -> list[Any]:
        return list(self._keys)

    def candidate(self, value: Any) -> nn.Module:
        """The candidate module for ``value`` (a genotype value)."""
        self.check(value)
        return self.candidates[str(value)]

    def forward(self, *args, **kwargs):
        return self.candidates[str(self._keys[0])](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"label={self.label!r}"


def _as_ordered(candidates, label) -> "OrderedDict[Any, nn.Module]":
    if isinstance(candidates, Mapping):
        cands = OrderedDict(candidates.items())
    elif isinstance(candidates, (list, tuple)):
        cands = OrderedDict(enumerate(candidates))
    else:
        raise MutableError(f"LayerChoice {label!r}: candidates must be a dict or a list")
    if not cands:
        raise MutableError(f"LayerChoice {label!r} needs at least one candidate")
    return cands


class ModelSpace(nn.Module):
    """Base class of search spaces: remembers its constructor arguments and its ``Categorical`` s.

    Subclasses call ``self.add_mutable(Categorical(...))`` for value choices (and read the concrete value
    with :func:`ensure_frozen`); ``LayerChoice`` submodules are found automatically. ``space_name`` is the
    registry key written into genotypes.
    """

    space_name: str = "space"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def wrapped(self, *args, **kw):
            if not hasattr(self, "_init_args"):
                object.__setattr__(self, "_init_args", (args, dict(kw)))
            init(self, *args, **kw)

        cls.__init__ = wrapped

    def add_mutable(self, mutable: Categorical | Numerical) -> Categorical | Numerical:
        """Register a value choice so :func:`simplify` lists it; returns it."""
        if "_value_mutables" not in self.__dict__:
            self.__dict__["_value_mutables"] = OrderedDict()
        if mutable.label in self.__dict__["_value_mutables"]:
            raise MutableError(f"duplicated label {mutable.label!r}")
        self.__dict__["_value_mutables"][mutable.label] = mutable
        return mutable

    def simplify(self) -> "OrderedDict[str, Mutable]":
        """``{label: mutable}`` of every choice in this space (see :func:`simplify`)."""
        return simplify(self)

    def freeze(self, sample: Mapping[str, Any], copy_weights: bool = True) -> nn.Module:
        """Fixed network for ``sample`` (see :func:`freeze`)."""
        return freeze(self, sample, copy_weights=copy_weights)


def iter_layer_choices(module: nn.Module) -> Iterator[tuple[str, LayerChoice]]:
    """Yield ``(qualified_name, LayerChoice)`` for every layer choice in ``module`` (depth-first order)."""
    for name, m in module.named_modules():
        if isinstance(m, LayerChoice):
            yield name, m


def simplify(space: nn.Module) -> "OrderedDict[str, Mutable]":
    """All labelled choices of ``space`` as ``{label: mutable}``, in declaration order.

    Raises:
        MutableError: two choices share a label.
    """
    out: "OrderedDict[str, Mutable]" = OrderedDict()
    for m in space.modules():
        for mut in m.__dict__.get("_value_mutables", {}).values():
            if mut.label in out:
                raise MutableError(f"duplicated label {mut.label!r} in space")
            out[mut.label] = mut
    for _, lc in iter_layer_choices(space):
        if lc.label in out:
            raise MutableError(f"duplicated label {lc.label!r} in space")
        out[lc.label] = lc
    return out


def default_sample(space: nn.Module) -> dict[str, Any]:
    """Sample taking every choice's first value."""
    return {k: m.default() for k, m in simplify(space).items()}


def random_sample(space: nn.Module, rng) -> dict[str, Any]:
    """Sample drawing every choice uniformly (:meth:`Mutable.sample`) from ``rng`` (a ``random.Random``)."""
    return {k: m.sample(rng) for k, m in simplify(space).items()}


def recipe_overrides(space: nn.Module, sample: Mapping[str, Any]) -> dict[str, Any]:
    """``{recipe_key: value}`` of the value choices of ``space`` that name a ``recipe_key`` (hyper-parameters
    searched with the architecture, e.g. RMGL's RSA settings), for the labels present in ``sample``.

    Apply them with :func:`nasreid.config.apply_overrides` before training the sample.
    """
    out: dict[str, Any] = {}
    for label, mut in simplify(space).items():
        key = getattr(mut, "recipe_key", None)
        if key and label in sample:
            out[key] = sample[label]
    return out


def validate_sample(space: nn.Module, sample: Mapping[str, Any], *, complete: bool = True) -> dict:
    """Check ``sample`` against ``space``.

    Raises:
        MutableError: a label not in the space, a value not among the choices, or (``complete=True``)
            a label of the space missing from the sample. Messages name the label and the choices.
    """
    muts = simplify(space)
    unknown = [k for k in sample if k not in muts]
    if unknown:
        raise MutableError(f"unknown choice label(s) {unknown}; the space has {list(muts)}")
    for k, v in sample.items():
        muts[k].check(v)
    if complete:
        missing = [k for k in muts if k not in sample]
        if missing:
            raise MutableError(f"sample misses choice label(s) {missing}")
    return dict(sample)


_CAND_RE = re.compile(r"(^|\.)candidates\.([^.]+)\.")


def freeze(space: nn.Module, sample: Mapping[str, Any], *, copy_weights: bool = True) -> nn.Module:
    """Fixed network of ``space`` for ``sample`` ({label: value}).

    The space is rebuilt from its constructor arguments inside :func:`frozen_context`, so each
    ``LayerChoice`` becomes its chosen candidate (same class, same module path minus the choice wrapper)
    and each ``Categorical`` its value. With ``copy_weights`` the parameters and buffers of the chosen
    paths are copied from ``space``, so the frozen network is numerically the supernet's chosen path.
    Strategies' mixed ops subclass :class:`LayerChoice` (same ``label`` and ``candidates``), so a
    supernet under search freezes the same way.

    Raises:
        MutableError: invalid sample (see :func:`validate_sample`).
        TypeError: ``space`` is not a :class:`ModelSpace` (its constructor arguments are unknown).
    """
    if not isinstance(space, ModelSpace):
        raise TypeError(f"freeze needs a ModelSpace, got {type(space).__name__}")
    sample = validate_sample(space, sample)
    args, kwargs = space._init_args  # type: ignore[misc]  # set by ModelSpace.__init_subclass__
    with frozen_context(sample):
        fixed = type(space)(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    if copy_weights:
        src = space.state_dict()
        dst = fixed.state_dict()
        label_of = _choice_prefixes(space)
        mapped = {}
        for name, tensor in src.items():
            new = _map_name(name, label_of, sample)
            if new is not None and new in dst:
                mapped[new] = tensor
        missing = [k for k in dst if k not in mapped]
        if missing:
            raise MutableError(f"could not copy weights for {missing[:5]} (+{max(0, len(missing) - 5)} more)")
        fixed.load_state_dict(mapped)
    return fixed


def _choice_prefixes(space: nn.Module) -> dict[str, str]:
    """Module path of each choice -> its label."""
    return {name: lc.label for name, lc in iter_layer_choices(space)}


def _map_name(name: str, label_of: dict[str, str], sample: Mapping[str, Any]) -> str | None:
    for prefix, label in sorted(label_of.items(), key=lambda kv: -len(kv[0])):
        head = prefix + ".candidates."
        if name.startswith(head):
            rest = name[len(head):]
            key, _, tail = rest.partition(".")
            if key != str(sample[label]):
                return None
            return _map_name(prefix + "." + tail, label_of, sample)
    return name


def space_graph(space: nn.Module, sample: Mapping[str, Any] | None = None) -> nx.DiGraph:
    """Directed graph of the space's top-level data flow with its choices.

    Nodes are the module paths of the choices in declaration order (``kind="layer_choice"`` with
    ``candidates``) and of the fixed top-level stages between them (``kind="fixed"``); value choices
    are graph attributes. With ``sample``, each choice node carries ``value`` and the graph describes the
    derived network. Edges follow forward order (the OSNet/MSINet/RMGL backbones are chains of stages).
    """
    g = nx.DiGraph(space=getattr(space, "space_name", type(space).__name__))
    order: list[str] = []
    choice_paths = {name: lc for name, lc in iter_layer_choices(space)}
    for name, child in space.named_children():
        inner = [p for p in choice_paths if p == name or p.startswith(name + ".")]
        if inner:
            for p in inner:
                lc = choice_paths[p]
                attrs = dict(kind="layer_choice", label=lc.label, candidates=",".join(map(str, lc.values)))
                if sample is not None and lc.label in sample:
                    attrs["value"] = str(sample[lc.label])
                g.add_node(p, **attrs)
                order.append(p)
        else:
            g.add_node(name, kind="fixed", module=type(child).__name__)
            order.append(name)
    for a, b in zip(order, order[1:]):
        g.add_edge(a, b)
    for label, mut in simplify(space).items():
        if isinstance(mut, Numerical):
            g.graph[f"choice:{label}"] = f"[{mut.low}, {mut.high}]" + (" log" if mut.log else "")
            if sample is not None and label in sample:
                g.graph[f"value:{label}"] = str(sample[label])
        elif isinstance(mut, Categorical):
            g.graph[f"choice:{label}"] = ",".join(map(str, mut.values))
            if sample is not None and label in sample:
                g.graph[f"value:{label}"] = str(sample[label])
    return g
