"""Genotype: the one architecture format shared by every space and strategy.

JSON form (DESIGN.md)::

    {"space": "osnet_ain",
     "choices": {"conv2_1": "os_in_in", ...},          # label -> value (a sample of the space)
     "probabilities": {"conv2_1": {"os": 0.1, ...}},   # final softmax(pi) / softmax(alpha), if any
     "space_kwargs": {"width_mult": 0.25, ...},        # constructor arguments that are not choices
     "provenance": {"strategy": "gumbel", "run": "...", "epoch": 10, ...}}

Loading a genotype and freezing its space (:meth:`Genotype.build`) gives exactly the derived network.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
from torch import nn

from nasreid.errors import NasreidError
from nasreid.mutables import freeze, space_graph
from nasreid.registry import get_space

__all__ = ["Genotype", "GenotypeError", "preset_genotype"]


class GenotypeError(NasreidError, ValueError):
    """A genotype file is missing, malformed or does not fit its space; the message names the file/field."""


@dataclass
class Genotype:
    """An architecture: space name, ``{label: value}`` choices, probabilities and provenance."""

    space: str
    choices: dict[str, Any]
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    space_kwargs: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dictionary (see the module docstring)."""
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temp file + rename). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "Genotype":
        """Validate and build from a parsed JSON object. Raises :class:`GenotypeError` naming ``source``
        and the missing/unknown field."""
        if not isinstance(d, dict):
            raise GenotypeError(f"{source}: a genotype must be a JSON object")
        for key in ("space", "choices"):
            if key not in d:
                raise GenotypeError(f"{source}: missing field {key!r}")
        unknown = set(d) - {"space", "choices", "probabilities", "space_kwargs", "provenance"}
        if unknown:
            raise GenotypeError(f"{source}: unknown field(s) {sorted(unknown)}")
        if not isinstance(d["choices"], dict):
            raise GenotypeError(f"{source}: field 'choices' must be an object of label -> value")
        return cls(space=d["space"], choices=dict(d["choices"]),
                   probabilities=dict(d.get("probabilities") or {}),
                   space_kwargs=dict(d.get("space_kwargs") or {}),
                   provenance=dict(d.get("provenance") or {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Genotype":
        """Read a genotype JSON file.

        Raises:
            GenotypeError: missing file, invalid JSON, missing/unknown fields (message names the file).
        """
        path = Path(path)
        if not path.is_file():
            raise GenotypeError(f"genotype file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise GenotypeError(f"{path}: invalid JSON ({e})") from e
        return cls.from_dict(d, source=str(path))

    # ---- networks ------------------------------------------------------------------------------
    def build(self, **space_kwargs: Any) -> nn.Module:
        """Fixed network: the registered space built with ``self.space_kwargs`` updated by
        ``space_kwargs`` (e.g. ``num_classes`` of the retrain data), frozen with ``choices``.

        Raises:
            GenotypeError: unknown space, or choices that do not fit it (names the label / value).
        """
        try:
            space_cls = get_space(self.space)
        except KeyError as e:
            raise GenotypeError(str(e)) from e
        kwargs = {**self.space_kwargs, **space_kwargs}
        space = space_cls(**kwargs)
        try:
            return freeze(space, self.choices, copy_weights=False)
        except ValueError as e:
            raise GenotypeError(f"genotype does not fit space {self.space!r}: {e}") from e

    def recipe_overrides(self) -> dict[str, Any]:
        """``{recipe_key: value}`` of the choices that configure training rather than the network (value
        choices declared with a ``recipe_key``, e.g. RMGL's RSA settings ``data.augment.rsa.*``); empty for
        spaces without such choices. ``nasreid train`` applies them to the retrain recipe (they win over it).

        Raises:
            GenotypeError: unknown space.
        """
        from nasreid.mutables import recipe_overrides

        try:
            space_cls = get_space(self.space)
        except KeyError as e:
            raise GenotypeError(str(e)) from e
        space = space_cls(**{**self.space_kwargs, "num_classes": 0})
        return recipe_overrides(space, self.choices)

    def to_networkx(self, space: nn.Module | None = None) -> nx.DiGraph:
        """Graph of the derived network (nodes: stages and chosen blocks with ``value`` attributes)."""
        if space is None:
            space = get_space(self.space)(**self.space_kwargs)
        g = space_graph(space, self.choices)
        g.graph["space"] = self.space
        return g

    def write_graphml(self, path: str | os.PathLike, space: nn.Module | None = None) -> Path:
        """Write :meth:`to_networkx` as GraphML (readable by networkx, Gephi, yEd)."""
        path = Path(path)
        nx.write_graphml(self.to_networkx(space), path)
        return path

    def summary(self) -> str:
        """One line per choice: ``label: value (p=0.73)``."""
        lines = [f"space: {self.space}"]
        for k, v in self.choices.items():
            p = self.probabilities.get(k, {}).get(str(v))
            lines.append(f"  {k}: {v}" + (f"  (p={p:.3f})" if p is not None else ""))
        return "\n".join(lines)


def preset_genotype(space: str, name: str, **space_kwargs: Any) -> Genotype:
    """A named published/hand-designed architecture of a space (e.g. ``"osnet_ain", "osnet_ibn"``), as
    registered with the space (``register_space(name, presets=...)``, :func:`~nasreid.registry.space_presets`).

    Raises:
        GenotypeError: unknown space, or the space has no such preset (message lists the presets).
    """
    from nasreid.registry import space_presets

    try:
        presets = space_presets(space)
    except NasreidError as e:
        raise GenotypeError(str(e)) from None
    if name not in presets:
        raise GenotypeError(f"space {space!r} has no preset {name!r}; presets: {sorted(presets)}")
    p = presets[name]
    return Genotype(space=space, choices=dict(p["choices"]),
                    space_kwargs={**p.get("space_kwargs", {}), **space_kwargs},
                    provenance={"preset": name})
