"""Weights files: the one reader of pretrained weights and the registry of weights *formats* (key namings).

Two steps turn a file into tensors under nasreid's module names:

1. the **container** (:func:`read_weights`): a ``torch.save`` pickle, read with ``torch.load(weights_only=True)``
   (tensors and plain containers only: safe for files from others), or a ``.safetensors`` file (the
   ``safetensors`` package; no code runs on reading). The state dict is the file's ``{name: tensor}`` mapping or
   the one a checkpoint keeps under ``"state_dict"`` (torchreid), ``"model"`` (nasreid's ``model.pt``) or
   ``"model_state_dict"``; a ``module.`` (``nn.DataParallel`` / DDP) or ``_orig_mod.`` (``torch.compile``) prefix
   is removed from every key. A file of a known non-weights kind -- an ONNX model -- is refused by name.
2. the **format** (:data:`WEIGHT_FORMATS`): how a state dict is *recognised* (a predicate over its keys and
   tensors, for ``format="auto"``) and how its keys are *renamed* to nasreid's (``None``: the key is dropped).
   Built in: ``nasreid`` (names kept), ``torchreid`` (torchreid's OSNet family, :mod:`nasreid.models.torchreid`),
   ``torchvision`` (a torchvision ResNet state dict, ``fc.*`` dropped). A plugin adds one with
   :func:`register_format` (``docs/extending.md``, "A weights format").

:func:`nasreid.models.pretrained.load_pretrained` / ``warm_start``, ``nasreid evaluate --weights`` and
:class:`nasreid.extractor.FeatureExtractor` all read files here; nasreid's own training checkpoints
(``checkpoints/last.pt``, which hold RNG states) are read by :func:`nasreid.engine.checkpoint.load_checkpoint`.

Example (a plugin file listed under a recipe's ``plugins:``)::

    from nasreid.models.weights import register_format

    register_format(
        "prefixed",
        recognise=lambda sd: all(k.startswith("backbone.") for k in sd),
        rename=lambda sd: {k: k.removeprefix("backbone.") for k in sd},
        doc="a network saved inside a wrapper module called 'backbone'")
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nasreid.errors import NasreidError
from nasreid.registry import Registry

__all__ = ["PretrainedWeightsError", "WeightsFile", "WeightsFormat", "WEIGHT_FORMATS", "STATE_DICT_KEYS",
           "register_format", "read_weights", "few_keys", "state_dict_of", "resolve_format", "file_naming",
           "format_names", "check_format"]

#: keys under which checkpoints of torchreid (``state_dict``), nasreid (``model``) and the PyTorch tutorials
#: (``model_state_dict``) keep the network's state dict, tried in this order
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
#: key prefixes of wrapper modules removed from every key: ``nn.DataParallel`` / DDP, ``torch.compile``
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # keys named in a message


class PretrainedWeightsError(NasreidError, ValueError):
    """Pretrained weights cannot be used: the file is missing or unreadable, is not a weights file, holds no
    state dict, names an unknown format, or its keys / tensor shapes do not match the model. The message names
    the file and the keys concerned."""


def few_keys(keys: list[str]) -> str:
    """The first few of ``keys`` joined for a message, with how many more there are."""
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


# ---- formats -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsFormat:
    """A naming of weights-file keys, registered in :data:`WEIGHT_FORMATS` by :func:`register_format`.

    Attributes:
        name: the name recipes give (``model.pretrained_format``), lower case.
        rename: ``rename(state) -> {file key: nasreid key, or None to drop it}`` for a whole state dict (a map
            may depend on the file, e.g. torchreid's two OSNet layouts); ``None``: names kept as they are. A key
            the returned mapping lacks is kept under its own name.
        recognise: ``recognise(state) -> bool``: whether a state dict is in this format (for ``"auto"``);
            ``None``: never picked by ``"auto"``, only by name.
        hint: ``hint(state) -> str``: a sentence (starting with a space) appended to load errors, e.g. the
            preset a file fits; ``None``: none.
        doc: one line for listings and messages.
    """

    name: str
    rename: Callable[[Mapping[str, torch.Tensor]], Mapping[str, str | None]] | None = None
    recognise: Callable[[Mapping[str, torch.Tensor]], bool] | None = None
    hint: Callable[[Mapping[str, torch.Tensor]], str] | None = None
    doc: str = ""


#: weights formats by name (``nasreid``, ``torchreid``, ``torchvision`` and those plugins register)
WEIGHT_FORMATS: Registry[WeightsFormat] = Registry("weights format", ("nasreid.models.weights",
                                                                      "nasreid.models.torchreid"))


def register_format(name: str, *, rename: Callable[[Mapping[str, torch.Tensor]], Mapping[str, str | None]] | None
                    = None, recognise: Callable[[Mapping[str, torch.Tensor]], bool] | None = None,
                    hint: Callable[[Mapping[str, torch.Tensor]], str] | None = None, doc: str = "") -> WeightsFormat:
    """Register a weights format (see :class:`WeightsFormat` for the arguments) and return it.

    Raises:
        PretrainedWeightsError: ``name`` is ``"auto"`` (reserved: detection) or not an identifier-like string.
        RegistryError: ``name`` is already registered to another format (``WEIGHT_FORMATS.unregister`` first).
    """
    if not isinstance(name, str) or not name or name.lower() == "auto" or not name.replace("-", "_").isidentifier():
        raise PretrainedWeightsError(f"weights format name {name!r}: give a name such as 'fastreid' ('auto' is "
                                     "reserved for detection)")
    fmt = WeightsFormat(name.lower(), rename=rename, recognise=recognise, hint=hint, doc=doc)
    old = WEIGHT_FORMATS._table.get(fmt.name)
    if old is not None and old == fmt:
        return old
    return WEIGHT_FORMATS.register(fmt.name, fmt)


def format_names() -> list[str]:
    """``["auto", <registered formats, sorted>]``: what ``model.pretrained_format`` accepts."""
    return ["auto", *WEIGHT_FORMATS.names()]


def check_format(name: str) -> str:
    """``name`` lower-cased when it is ``"auto"`` or a registered format.

    Raises:
        PretrainedWeightsError: an unknown format; the message lists the known ones.
    """
    if not isinstance(name, str) or (name.lower() != "auto" and name not in WEIGHT_FORMATS):
        raise PretrainedWeightsError(f"unknown weights format {name!r}; known: {', '.join(format_names())}")
    return name.lower()


def resolve_format(state: Mapping[str, torch.Tensor], format: str = "auto", source: str = "the weights"
                   ) -> WeightsFormat:
    """The format of a state dict: the named one (whose recogniser, if any, must accept the file), or for
    ``"auto"`` the one registered format whose recogniser accepts it (``nasreid`` when none does).

    Raises:
        PretrainedWeightsError: an unknown format (lists the known ones); a named format whose recogniser
            refuses the file (names its first keys); ``"auto"`` and several formats recognise the file (names
            them: set the format).
    """
    name = check_format(format)
    if name != "auto":
        fmt = WEIGHT_FORMATS.get(name)
        if fmt.recognise is not None and not fmt.recognise(state):
            raise PretrainedWeightsError(f"{source}: format {name}, but its keys are not that format's "
                                         f"({fmt.doc or 'its recogniser refuses them'}; first keys: "
                                         f"{few_keys(list(state))})")
        return fmt
    hits = [f for _, f in WEIGHT_FORMATS.items() if f.recognise is not None and f.recognise(state)]
    if len(hits) > 1:
        raise PretrainedWeightsError(f"{source}: its keys fit several weights formats "
                                     f"({', '.join(f.name for f in hits)}); name one (model.pretrained_format)")
    return hits[0] if hits else WEIGHT_FORMATS.get("nasreid")


def file_naming(state: Mapping[str, torch.Tensor], path: str | os.PathLike | str, format: str = "auto"
                ) -> tuple[Callable[[str], str | None] | None, str]:
    """How a weights file's keys become nasreid module names, by ``format`` (:func:`resolve_format`).

    Returns:
        ``(rename, hint)``: ``rename`` maps a file key to the network's name (``None``: drop it), or is ``None``
        when the names are kept as they are; ``hint`` is the format's sentence for error messages (e.g. the
        preset a torchreid file is), empty when it has none.

    Raises:
        PretrainedWeightsError: see :func:`resolve_format`.
    """
    fmt = resolve_format(state, format, str(path))
    hint = fmt.hint(state) if fmt.hint is not None else ""
    if fmt.rename is None:
        return None, hint
    names = dict(fmt.rename(state))
    return (lambda key: names.get(key, key)), hint


register_format("nasreid", doc="nasreid's own module names (a run's model.pt), kept as they are")
register_format("torchvision", rename=lambda sd: {k: (None if k.startswith("fc.") else k) for k in sd},
                doc="a torchvision ResNet state dict into a model with torchvision's module names; fc.* dropped")


# ---- containers ----------------------------------------------------------------------------------------------
@dataclass
class WeightsFile:
    """The tensors of a weights file (or of a given state-dict mapping).

    Attributes:
        state: ``{key: tensor}`` in the file's order (a safetensors file: sorted by name), on the CPU, wrapper
            prefixes removed (names as in the file otherwise: the format renames them).
        source: the path, or ``"the given state_dict"``, for messages.
        container: ``"torch"``, ``"safetensors"`` or ``"mapping"``.
        extra: the entries a checkpoint keeps beside its state dict (nasreid's ``model.pt``: ``num_classes``,
            ``genotype``; torchreid's: ``epoch`` ...), or a ``.safetensors`` file's string metadata.
    """

    state: dict[str, torch.Tensor]
    source: str
    container: str
    extra: dict[str, Any] = field(default_factory=dict)


def _is_onnx(path: Path, head: bytes) -> bool:
    """An ONNX ``ModelProto``: suffix ``.onnx``, or protobuf field 1 (``ir_version``, varint) followed by a
    length-delimited field 2/3/4/7/8 (producer name / version, domain, graph, opset), as exporters write them."""
    if path.suffix.lower() == ".onnx":
        return True
    return len(head) >= 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] in (0x12, 0x1A, 0x22, 0x3A, 0x42)


def _is_safetensors(path: Path, head: bytes) -> bool:
    """Suffix ``.safetensors``, or an 8-byte little-endian header length followed by the JSON header's ``{``."""
    return path.suffix.lower() == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"
                                                     and 0 < int.from_bytes(head[:8], "little") < 1 << 30)


def read_weights(path: str | os.PathLike, *, weights_only: bool = True) -> WeightsFile:
    """Read a weights file: a ``torch.save`` pickle or a ``.safetensors`` file (see the module docstring).

    Args:
        path: the file.
        weights_only: torch pickles: unpickle tensors and plain containers only (``torch.load(weights_only=True)``),
            safe for files from others. ``False`` also accepts arbitrary pickled objects -- only for files you
            trust, as unpickling can run code.

    Returns:
        a :class:`WeightsFile` (``state`` ``{key: tensor}``, ``extra`` the checkpoint's other entries).

    Raises:
        PretrainedWeightsError: the file does not exist; is an ONNX model (named so); cannot be read (corrupt,
            neither torch nor safetensors, or a pickle holding objects ``weights_only`` refuses -- only then is
            ``weights_only=False`` mentioned); holds no state dict; or a state-dict entry is not a tensor. The
            message names the file (and the entry).
    """
    p = Path(path)
    if not p.is_file():
        raise PretrainedWeightsError(f"pretrained weights file not found: {p}")
    with open(p, "rb") as fh:
        head = fh.read(16)
    if _is_safetensors(p, head):
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="pt", device="cpu") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                meta = dict(f.metadata() or {})
        except Exception as e:  # noqa: BLE001 - any failure to read is the file's fault; re-raised naming it
            raise PretrainedWeightsError(f"cannot read safetensors weights {p}: {type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
        return WeightsFile(_strip(state, str(p)), str(p), "safetensors", meta)
    if _is_onnx(p, head):
        raise PretrainedWeightsError(f"{p} is an ONNX model, not a weights file; nasreid reads torch / safetensors "
                                     "state dicts (load the network's .pth / .safetensors file instead)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - any failure to read is the file's fault; re-raised naming it
        first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if weights_only and isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower():
            raise PretrainedWeightsError(
                f"cannot read pretrained weights {p}: it holds Python objects other than tensors (if you trust "
                f"the file, load it with weights_only=False): {first}") from None
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch's zip nor its legacy pickle
            raise PretrainedWeightsError(f"cannot read pretrained weights {p}: not a torch or safetensors weights "
                                         f"file ({first})") from None
        raise PretrainedWeightsError(f"cannot read pretrained weights {p}: {first}") from None
    state, extra = state_dict_of(obj, str(p))
    return WeightsFile(state, str(p), "torch", extra)


def state_dict_of(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict in a loaded object (a ``{name: tensor}`` mapping, or a checkpoint dict keeping one under
    :data:`STATE_DICT_KEYS`), wrapper prefixes removed, and the checkpoint's other entries.

    Raises:
        PretrainedWeightsError: no state dict (names ``source`` and the dict's top keys, or the object's type),
            or an entry that is not a tensor.
    """
    if not isinstance(obj, Mapping):
        raise PretrainedWeightsError(f"{source} holds no state dict but a {type(obj).__name__} (a whole pickled "
                                     "model?); save model.state_dict() instead")
    extra: dict[str, Any] = {}
    state: Mapping[str, Any] | None = None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                state, extra = inner, {str(k): v for k, v in obj.items() if k != key}
                break
    if state is None:
        top = [str(k) for k in list(obj)[:10]]
        raise PretrainedWeightsError(
            f"{source} holds no state dict: a dict with keys {top}; expected {{name: tensor}} or a dict with one "
            f"under {' / '.join(repr(k) for k in STATE_DICT_KEYS)}")
    return _strip(state, source), extra


def _strip(state: Mapping[Any, Any], source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise PretrainedWeightsError(f"{source}: state dict entry {key!r} is a {type(value).__name__}, not a "
                                         "tensor")
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out
