"""Exact import of torchreid's OSNet-family weights (Zhou et al., "Omni-Scale Feature Learning for Person
Re-Identification", ICCV 2019 / "Learning Generalisable Omni-Scale Representations for Person Re-Identification",
TPAMI 2021; deep-person-reid's ``torchreid/models/osnet.py`` and ``osnet_ain.py``) into the ``osnet_ain`` space.

One name map, both directions, for every width of both files' families:

========================================  ==========================================================================
torchreid model                           nasreid preset (``space: osnet_ain``, ``space.kwargs.width_mult``)
========================================  ==========================================================================
``osnet_x1_0`` / ``x0_75`` / ``x0_5`` /    ``osnet`` (Table 1, "OSNet"), ``width_mult`` 1.0 / 0.75 / 0.5 / 0.25
``x0_25``
``osnet_ibn_x1_0``                         ``osnet_ibn`` (IN in conv1 and after the addition of both conv2 blocks)
``osnet_ain_x1_0`` / ... / ``x0_25``       ``osnet_ain_torchreid`` (conv1 with affine IN; ``OSBlockINin`` without the
                                           BN of its last 1x1 conv; ``pool2`` / ``pool3`` are ``trans2`` / ``trans3``)
========================================  ==========================================================================

Module correspondence (``X`` a stage, ``i`` a block): ``conv1.{conv,bn}`` -> ``conv1.{0,1}``;
``convX.i.conv1.{conv,bn}`` -> ``convX.i.residual.conv1.{0,1}``; the Lite 3x3 streams -- osnet.py's ``conv2a``,
``conv2b.j``, ``conv2c.j``, ``conv2d.j`` and osnet_ain.py's ``conv2.t.layers.j`` -- -> ``residual.streams.t.j``,
inside a Lite 3x3 ``conv1`` / ``conv2`` / ``bn`` -> ``0`` / ``1`` / ``2``; ``gate.fc{1,2}`` ->
``residual.gate.fc{1,2}``; ``conv3.{conv,bn}`` and ``downsample.{conv,bn}`` -> ``residual.conv3.{0,1}``,
``residual.downsample.{0,1}``; the IN of a block -> ``in_out`` (osnet.py: after the addition) or ``in_in``
(osnet_ain.py's ``OSBlockINin``: before it); the transitions ``conv2.2.0`` / ``conv3.2.0`` (osnet.py) and
``pool2.0`` / ``pool3.0`` (osnet_ain.py) -> ``trans2.0`` / ``trans3.0``; ``conv5.{conv,bn}`` -> ``conv5.{0,1}``;
``fc.{0,1}`` -> ``head.embed.{0,1}``; ``classifier`` -> ``head.classifier``.

The correspondence is one table, :data:`NAME_MAP`: ``(flavours, torchreid pattern, nasreid pattern)`` rows whose
``{slot}`` placeholders (:data:`SLOTS`) are matched on one side and written on the other, so the same rows drive
:func:`to_nasreid` and :func:`to_torchreid`. The ``torchreid`` weights format (:mod:`nasreid.models.weights`) is
registered here: it recognises torchreid's keys (:func:`is_torchreid`) and renames them (:func:`rename_map`).

Example::

    >>> from nasreid.models.torchreid import to_nasreid, to_torchreid
    >>> to_nasreid("conv2.0.conv2c.1.bn.weight")
    'conv2.0.residual.streams.2.1.2.weight'
    >>> to_torchreid("conv2.0.residual.streams.2.1.2.weight", "osnet")
    'conv2.0.conv2c.1.bn.weight'
    >>> to_nasreid("pool3.0.conv.weight"), to_nasreid("conv4.0.IN.weight", "osnet_ain")
    ('trans3.0.0.weight', 'conv4.0.in_in.weight')
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Literal, Optional

from nasreid.models.weights import register_format

__all__ = ["Flavour", "detect_flavour", "is_torchreid", "to_nasreid", "to_torchreid", "rename_map", "PRESET_OF",
           "NAME_MAP", "SLOTS"]

#: torchreid's two OSNet model files: ``osnet`` (osnet.py: OSNet, OSNet-IBN) and ``osnet_ain`` (osnet_ain.py)
Flavour = Literal["osnet", "osnet_ain"]
FLAVOURS: tuple[Flavour, ...] = ("osnet", "osnet_ain")

#: the nasreid preset that is each torchreid model (``width_mult`` from the name: x1_0 -> 1.0 ...)
PRESET_OF = {"osnet": "osnet", "osnet_ibn": "osnet_ibn", "osnet_ain": "osnet_ain_torchreid"}

#: placeholders of :data:`NAME_MAP`: ``{slot: (torchreid regex, nasreid regex, {torchreid value: nasreid value})}``;
#: an empty dict keeps the value as it is
SLOTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "blk": (r"conv[234]\.\d", r"conv[234]\.\d", {}),    # an OS block: stage conv2..conv4, block i
    "X": (r"[23]", r"[23]", {}),                          # the stage a transition follows
    "t": (r"\d", r"\d", {}),                             # a stream of an OS block (osnet_ain.py)
    "j": (r"\d", r"\d", {}),                             # a Lite 3x3 layer of a stream
    "k": (r"[01]", r"[01]", {}),                          # fc.0 (Linear) / fc.1 (BN)
    "unit": (r"conv1|conv3|downsample", r"conv1|conv3|downsample", {}),
    "gate": (r"fc[12]", r"fc[12]", {}),
    "cb": (r"conv|bn", r"[01]", {"conv": "0", "bn": "1"}),                          # conv + norm units
    "lite": (r"conv1|conv2|bn", r"[012]", {"conv1": "0", "conv2": "1", "bn": "2"}),  # inside a Lite 3x3
    "leaf": (r"\w+", r"\w+", {}),                         # weight, bias, running_mean ...
}

_BOTH: tuple[Flavour, ...] = FLAVOURS
#: the one name map, ``(flavours, torchreid pattern, nasreid pattern)``: read left to right by :func:`to_nasreid`,
#: right to left by :func:`to_torchreid`
NAME_MAP: tuple[tuple[tuple[Flavour, ...], str, str], ...] = (
    (_BOTH, "conv1.{cb}.{leaf}", "conv1.{cb}.{leaf}"),
    (_BOTH, "conv5.{cb}.{leaf}", "conv5.{cb}.{leaf}"),
    (_BOTH, "fc.{k}.{leaf}", "head.embed.{k}.{leaf}"),
    (_BOTH, "classifier.{leaf}", "head.classifier.{leaf}"),
    (("osnet",), "conv{X}.2.0.{cb}.{leaf}", "trans{X}.0.{cb}.{leaf}"),       # osnet.py: transitions in the stage
    (("osnet_ain",), "pool{X}.0.{cb}.{leaf}", "trans{X}.0.{cb}.{leaf}"),     # osnet_ain.py: pool2 / pool3
    (_BOTH, "{blk}.{unit}.{cb}.{leaf}", "{blk}.residual.{unit}.{cb}.{leaf}"),
    (_BOTH, "{blk}.gate.{gate}.{leaf}", "{blk}.residual.gate.{gate}.{leaf}"),
    (("osnet",), "{blk}.IN.{leaf}", "{blk}.in_out.{leaf}"),                 # OSNet-IBN: after the addition
    (("osnet_ain",), "{blk}.IN.{leaf}", "{blk}.in_in.{leaf}"),              # OSBlockINin: before it
    (("osnet",), "{blk}.conv2a.{lite}.{leaf}", "{blk}.residual.streams.0.0.{lite}.{leaf}"),
    (("osnet",), "{blk}.conv2b.{j}.{lite}.{leaf}", "{blk}.residual.streams.1.{j}.{lite}.{leaf}"),
    (("osnet",), "{blk}.conv2c.{j}.{lite}.{leaf}", "{blk}.residual.streams.2.{j}.{lite}.{leaf}"),
    (("osnet",), "{blk}.conv2d.{j}.{lite}.{leaf}", "{blk}.residual.streams.3.{j}.{lite}.{leaf}"),
    (("osnet_ain",), "{blk}.conv2.{t}.layers.{j}.{lite}.{leaf}", "{blk}.residual.streams.{t}.{j}.{lite}.{leaf}"),
)


def _regex(pattern: str, side: int) -> re.Pattern:
    """``pattern`` with its dots literal and each ``{slot}`` a named group of ``SLOTS[slot][side]``."""
    parts = re.split(r"\{(\w+)\}", pattern)
    out = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{SLOTS[p][side]})" for i, p in enumerate(parts))
    return re.compile(out)


@lru_cache(maxsize=None)
def _rows(direction: int) -> tuple[tuple[tuple[Flavour, ...], re.Pattern, str], ...]:
    """``NAME_MAP`` compiled for one direction: 0 torchreid -> nasreid, 1 nasreid -> torchreid."""
    return tuple((fl, _regex(row[direction], direction), row[1 - direction]) for fl, *row in NAME_MAP)


def _translate(key: str, direction: int, flavours: tuple[Flavour, ...]) -> Optional[str]:
    for fl in flavours:
        for row_flavours, regex, target in _rows(direction):
            if fl not in row_flavours:
                continue
            m = regex.fullmatch(key)
            if m:
                values = {}
                for slot, value in m.groupdict().items():
                    table = SLOTS[slot][2]
                    values[slot] = table.get(value, value) if direction == 0 else \
                        {v: k for k, v in table.items()}.get(value, value)
                return target.format(**values)
    return None


def is_torchreid(keys: Iterable[str]) -> bool:
    """Whether a state dict's keys are torchreid's OSNet names (``conv1.conv.weight``, ``fc.0.weight`` ...)."""
    keys = set(keys)
    return "conv1.conv.weight" in keys and ("fc.0.weight" in keys or "conv5.conv.weight" in keys)


def detect_flavour(keys: Iterable[str]) -> Flavour:
    """``"osnet_ain"`` for osnet_ain.py's names (``conv2.0.conv2.0.layers.0...``, ``pool2``), else ``"osnet"``."""
    for k in keys:
        if k.startswith(("pool2.", "pool3.")) or re.match(r"conv\d\.\d\.conv2\.\d\.layers\.", k):
            return "osnet_ain"
    return "osnet"


def to_nasreid(key: str, flavour: Optional[Flavour] = None) -> Optional[str]:
    """The nasreid name of a torchreid OSNet key (the :data:`NAME_MAP` row that matches it, read left to right),
    or None for a key the map does not know.

    ``flavour`` decides where a block's ``IN`` goes (``osnet``: ``in_out``, after the addition; ``osnet_ain``:
    ``in_in``): that flavour's rows are tried first, then the other's; ``None`` is ``osnet``.
    """
    first = flavour or "osnet"
    return _translate(key, 0, (first, *(f for f in FLAVOURS if f != first)))


def to_torchreid(key: str, flavour: Flavour) -> Optional[str]:
    """The torchreid name of a nasreid ``osnet_ain``-space key in ``flavour``'s file layout (the same
    :data:`NAME_MAP` rows as :func:`to_nasreid`, read right to left), or None for a key torchreid's network of that
    flavour does not have."""
    return _translate(key, 1, (flavour,))


def rename_map(keys: Iterable[str], flavour: Optional[Flavour] = None) -> Mapping[str, Optional[str]]:
    """``{torchreid key: nasreid key or None}`` for a file's keys (flavour detected when not given)."""
    keys = list(keys)
    fl = flavour or detect_flavour(keys)
    return {k: to_nasreid(k, fl) for k in keys}


def _hint(state: Mapping[str, object]) -> str:
    """The preset and width a torchreid file is, for load errors."""
    flavour = detect_flavour(state)
    conv1 = state.get("conv1.conv.weight")
    width = conv1.shape[0] / 64 if hasattr(conv1, "shape") else 1.0  # type: ignore[union-attr]
    return (f" (a torchreid {flavour} file of width x{width:g}: it is the osnet_ain space's preset "
            f"{'osnet_ain_torchreid' if flavour == 'osnet_ain' else 'osnet or osnet_ibn'} with "
            f"space.kwargs.width_mult {width:g})")


register_format("torchreid", recognise=is_torchreid, rename=rename_map, hint=_hint,
                doc="torchreid's OSNet / OSNet-IBN / OSNet-AIN names (conv1.conv.weight, fc.0.weight ...), "
                    "translated onto the osnet_ain space's osnet / osnet_ibn / osnet_ain_torchreid presets")
