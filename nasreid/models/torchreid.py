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
from typing import Literal, Optional

__all__ = ["Flavour", "detect_flavour", "is_torchreid", "to_nasreid", "to_torchreid", "PRESET_OF"]

#: torchreid's two OSNet model files: ``osnet`` (osnet.py: OSNet, OSNet-IBN) and ``osnet_ain`` (osnet_ain.py)
Flavour = Literal["osnet", "osnet_ain"]

#: the nasreid preset that is each torchreid model (``width_mult`` from the name: x1_0 -> 1.0 ...)
PRESET_OF = {"osnet": "osnet", "osnet_ibn": "osnet_ibn", "osnet_ain": "osnet_ain_torchreid"}

_LITE = {"conv1": "0", "conv2": "1", "bn": "2"}
_LITE_BACK = {v: k for k, v in _LITE.items()}
_STREAM = {"conv2a": 0, "conv2b": 1, "conv2c": 2, "conv2d": 3}
_STREAM_BACK = {v: k for k, v in _STREAM.items()}
_CONV_BN = {"conv": "0", "bn": "1"}
_CONV_BN_BACK = {v: k for k, v in _CONV_BN.items()}


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
    """The nasreid name of a torchreid OSNet key, or None for a key the map does not know.

    ``flavour`` decides where a block's ``IN`` goes (``osnet``: ``in_out``, after the addition; ``osnet_ain``:
    ``in_in``); ``None`` guesses it from this key alone (``osnet``).
    """
    m = re.fullmatch(r"conv1\.(conv|bn)\.(\w+)", key)
    if m:
        return f"conv1.{_CONV_BN[m[1]]}.{m[2]}"
    m = re.fullmatch(r"conv5\.(conv|bn)\.(\w+)", key)
    if m:
        return f"conv5.{_CONV_BN[m[1]]}.{m[2]}"
    m = re.fullmatch(r"fc\.([01])\.(\w+)", key)
    if m:
        return f"head.embed.{m[1]}.{m[2]}"
    m = re.fullmatch(r"classifier\.(\w+)", key)
    if m:
        return f"head.classifier.{m[1]}"
    m = re.fullmatch(r"(?:pool([23])\.0|conv([23])\.2\.0)\.(conv|bn)\.(\w+)", key)  # transitions
    if m:
        return f"trans{m[1] or m[2]}.0.{_CONV_BN[m[3]]}.{m[4]}"
    m = re.fullmatch(r"(conv[234]\.\d)\.(.+)", key)
    if not m:
        return None
    block, rest = m[1], m[2]
    r = re.fullmatch(r"(conv1|conv3|downsample)\.(conv|bn)\.(\w+)", rest)
    if r:
        return f"{block}.residual.{r[1]}.{_CONV_BN[r[2]]}.{r[3]}"
    r = re.fullmatch(r"gate\.(fc[12])\.(\w+)", rest)
    if r:
        return f"{block}.residual.gate.{r[1]}.{r[2]}"
    r = re.fullmatch(r"IN\.(\w+)", rest)
    if r:
        return f"{block}.{'in_in' if flavour == 'osnet_ain' else 'in_out'}.{r[1]}"
    r = re.fullmatch(r"conv2a\.(conv1|conv2|bn)\.(\w+)", rest)  # osnet.py: one Lite 3x3, no index
    if r:
        return f"{block}.residual.streams.0.0.{_LITE[r[1]]}.{r[2]}"
    r = re.fullmatch(r"(conv2[bcd])\.(\d)\.(conv1|conv2|bn)\.(\w+)", rest)
    if r:
        return f"{block}.residual.streams.{_STREAM[r[1]]}.{r[2]}.{_LITE[r[3]]}.{r[4]}"
    r = re.fullmatch(r"conv2\.(\d)\.layers\.(\d)\.(conv1|conv2|bn)\.(\w+)", rest)  # osnet_ain.py streams
    if r:
        return f"{block}.residual.streams.{r[1]}.{r[2]}.{_LITE[r[3]]}.{r[4]}"
    return None


def to_torchreid(key: str, flavour: Flavour) -> Optional[str]:
    """The torchreid name of a nasreid ``osnet_ain``-space key in ``flavour``'s file layout (the inverse of
    :func:`to_nasreid`), or None for a key torchreid's network does not have."""
    m = re.fullmatch(r"(conv1|conv5)\.([01])\.(\w+)", key)
    if m:
        return f"{m[1]}.{_CONV_BN_BACK[m[2]]}.{m[3]}"
    m = re.fullmatch(r"head\.embed\.([01])\.(\w+)", key)
    if m:
        return f"fc.{m[1]}.{m[2]}"
    m = re.fullmatch(r"head\.classifier\.(\w+)", key)
    if m:
        return f"classifier.{m[1]}"
    m = re.fullmatch(r"trans([23])\.0\.([01])\.(\w+)", key)
    if m:
        where = f"pool{m[1]}.0" if flavour == "osnet_ain" else f"conv{m[1]}.2.0"
        return f"{where}.{_CONV_BN_BACK[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(conv[234]\.\d)\.(.+)", key)
    if not m:
        return None
    block, rest = m[1], m[2]
    r = re.fullmatch(r"residual\.(conv1|conv3|downsample)\.([01])\.(\w+)", rest)
    if r:
        return f"{block}.{r[1]}.{_CONV_BN_BACK[r[2]]}.{r[3]}"
    r = re.fullmatch(r"residual\.gate\.(fc[12])\.(\w+)", rest)
    if r:
        return f"{block}.gate.{r[1]}.{r[2]}"
    r = re.fullmatch(r"(in_in|in_out)\.(\w+)", rest)
    if r:
        return f"{block}.IN.{r[2]}"
    r = re.fullmatch(r"residual\.streams\.(\d)\.(\d)\.([012])\.(\w+)", rest)
    if r:
        t, j, part, leaf = int(r[1]), r[2], _LITE_BACK[r[3]], r[4]
        if flavour == "osnet_ain":
            return f"{block}.conv2.{t}.layers.{j}.{part}.{leaf}"
        if t == 0:
            return f"{block}.conv2a.{part}.{leaf}"
        return f"{block}.{_STREAM_BACK[t]}.{j}.{part}.{leaf}"
    return None


def rename_map(keys: Iterable[str], flavour: Optional[Flavour] = None) -> Mapping[str, Optional[str]]:
    """``{torchreid key: nasreid key or None}`` for a file's keys (flavour detected when not given)."""
    keys = list(keys)
    fl = flavour or detect_flavour(keys)
    return {k: to_nasreid(k, fl) for k in keys}
