"""Initialise a network from pretrained weights stored in a local file.

The OSNet-AIN paper (Zhou, Yang, Cavallaro & Xiang, "Learning Generalisable Omni-Scale Representations for
Person Re-Identification", TPAMI 2021, Sec. 4.1 "Implementation Details" and Sec. 4.2) fine-tunes
ImageNet-pretrained OSNet weights, and "during the first 10 epochs, the ImageNet pre-trained base network
is frozen and only the randomly initialised classifier is open for training". nasreid downloads nothing:
the user gives a file written by ``torch.save``, and

* :func:`load_pretrained` copies its tensors into a model, dropping the identity classifier (whose number
  of classes differs between datasets) and reporting what was loaded, skipped, missing or unexpected;
* :func:`backbone_and_head_parameters` splits a model's parameters into the pretrained base and the new
  layers, for that frozen-backbone warm start.

Accepted files: a plain state dict (``{name: tensor}``), or a dict holding one under ``"state_dict"``
(torchreid checkpoints), ``"model"`` (nasreid's ``model.pt``; also its ``checkpoints/last.pt``, with
``weights_only=False`` as that file holds NumPy RNG states too) or ``"model_state_dict"``. A ``module.``
prefix (``nn.DataParallel`` / DDP) is removed from every key.

Module names must match the model's, or be translated: torchreid's OSNet-family files (``conv1.conv.weight``
where nasreid has ``conv1.0.weight``) are recognised and translated exactly (:mod:`nasreid.models.torchreid`,
``format="torchreid"``); ``rename`` translates any other naming.

Example::

    net = Genotype.load("genotype.json").build(num_classes=485)
    report = load_pretrained(net, "osnet_ain_msmt17.pt")          # all but head.classifier, strict
    backbone, head = backbone_and_head_parameters(net)
    for p in backbone:
        p.requires_grad_(False)                                     # first N epochs: train the head only
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nasreid.errors import NasreidError

__all__ = ["PretrainedWeightsError", "load_pretrained", "warm_start", "calibrate_instance_norms", "fixed_name",
           "file_naming", "fitting_prefixes", "read_state_dict", "backbone_and_head_parameters", "under_prefixes",
           "FORMATS"]

#: keys under which checkpoints of torchreid (``state_dict``), nasreid (``model``) and the PyTorch tutorials
#: (``model_state_dict``) keep the network's state dict, tried in this order
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
_SHOW = 5  # keys named in a message
#: the weight-file layouts :func:`load_pretrained` reads (``model.pretrained_format``)
FORMATS = ("auto", "nasreid", "torchreid", "torchvision")


class PretrainedWeightsError(NasreidError, ValueError):
    """Pretrained weights cannot be used: the file is missing or unreadable, holds no state dict, or its
    keys / tensor shapes do not match the model. The message names the file and the keys concerned."""


def under_prefixes(key: str, prefixes: Iterable[str]) -> bool:
    """A parameter or module path ``key`` is one of ``prefixes`` or lies below one (``"head"`` matches ``head.x``
    but not ``header.x``)."""
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def read_state_dict(path: str | os.PathLike, *, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (on the CPU), with any ``module.`` prefix removed.

    Args:
        path: a file written by ``torch.save``: a state dict, or a dict with one under ``"state_dict"``,
            ``"model"`` or ``"model_state_dict"``.
        weights_only: unpickle tensors and plain containers only (``torch.load(weights_only=True)``): safe
            for files from others. ``False`` also accepts arbitrary pickled objects (e.g. the NumPy RNG
            states of nasreid's ``checkpoints/last.pt``); only for files you trust, as unpickling can run
            code.

    Returns:
        ``{key: tensor}`` in the file's order.

    Raises:
        PretrainedWeightsError: the file does not exist, cannot be read (corrupt, not a torch file,
            refused by ``weights_only``), holds no state dict, or a state-dict entry is not a tensor; the
            message names the file (and the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        hint = (" (it holds Python objects other than tensors; if you trust the file, load it with "
                "weights_only=False)") if weights_only else ""
        raise PretrainedWeightsError(f"cannot read pretrained weights {path}{hint}: {e}") from e
    except Exception as e:  # noqa: BLE001 - any failure to read is the file's fault; re-raised naming it
        raise PretrainedWeightsError(f"cannot read pretrained weights {path}: {type(e).__name__}: {e}") from e
    state = _find_state_dict(obj, path)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise PretrainedWeightsError(
                f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def _find_state_dict(obj: Any, path: Path) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                return inner
        top = [str(k) for k in list(obj)[:10]]
        raise PretrainedWeightsError(
            f"{path} holds no state dict: a dict with keys {top}; expected {{name: tensor}} or a dict with "
            f"one under {' / '.join(repr(k) for k in STATE_DICT_KEYS)}")
    raise PretrainedWeightsError(
        f"{path} holds no state dict but a {type(obj).__name__} (a whole pickled model?); save "
        "model.state_dict() instead")


def file_naming(file_sd: Mapping[str, torch.Tensor], path: str | os.PathLike, format: str = "auto"
                ) -> tuple[Callable[[str], str | None] | None, str]:
    """How a weights file's keys become nasreid module names, by ``format`` (see :func:`load_pretrained`).

    Returns:
        ``(rename, hint)``: ``rename`` maps a file key to the fixed network's name (``None``: drop it), or is
        ``None`` when the names are kept as they are; ``hint`` is a sentence for error messages naming the
        preset a torchreid file is (empty otherwise).

    Raises:
        PretrainedWeightsError: an unknown ``format``, or ``format="torchreid"`` for a file whose keys are not
            torchreid's OSNet names.
    """
    if format not in FORMATS:
        raise PretrainedWeightsError(f"unknown weights format {format!r}; expected one of {', '.join(FORMATS)}")
    from nasreid.models import torchreid as TR

    if format == "torchreid" or (format == "auto" and TR.is_torchreid(file_sd)):
        if not TR.is_torchreid(file_sd):
            raise PretrainedWeightsError(f"{path}: format torchreid, but its keys are not torchreid's OSNet "
                                         f"names (first keys: {_few(list(file_sd))})")
        names = TR.rename_map(file_sd)
        flavour = TR.detect_flavour(file_sd)
        width = file_sd["conv1.conv.weight"].shape[0] / 64
        hint = (f" (a torchreid {flavour} file of width x{width:g}: it is the osnet_ain space's preset "
                f"{'osnet_ain_torchreid' if flavour == 'osnet_ain' else 'osnet or osnet_ibn'} with "
                f"space.kwargs.width_mult {width:g})")
        return names.get, hint
    if format == "torchvision":
        def drop_fc(key: str) -> str | None:
            return None if key.startswith("fc.") else key
        return drop_fc, ""
    return None, ""


def fitting_prefixes(skip: Iterable[str], file_keys: Mapping[str, torch.Tensor],
                     model_sd: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The ``skip`` prefixes whose every model tensor is in the file (model names) with the model's shape: a
    classifier whose class count is the file's. :func:`load_pretrained` and :func:`warm_start` load these all the
    same with ``keep_fitting``."""
    out = []
    for p in skip:
        mine = {k: v for k, v in model_sd.items() if under_prefixes(k, (p,))}
        theirs = {k for k in file_keys if under_prefixes(k, (p,))}
        if mine and theirs == set(mine) and all(tuple(file_keys[k].shape) == tuple(v.shape) for k, v in mine.items()):
            out.append(p)
    return tuple(out)


def _select(file_sd: Mapping[str, torch.Tensor], rename: Callable[[str], str | None] | None, skip: tuple[str, ...],
            fit_to: Mapping[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], list[str], tuple[str, ...]]:
    """The file's tensors under the model's names, the file keys dropped (by ``rename`` or ``skip``), and the
    ``skip`` prefixes still in force: those whose tensors fit ``fit_to`` exactly are lifted (``keep_fitting``)."""
    named = {k: (rename(k) if rename is not None else k) for k in file_sd}
    if fit_to is not None:
        fits = fitting_prefixes(skip, {n: file_sd[k] for k, n in named.items() if n is not None}, fit_to)
        skip = tuple(p for p in skip if p not in fits)
    kept: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in file_sd.items():
        new = named[key]
        if new is None or under_prefixes(new, skip):
            skipped.append(key)
        else:
            kept[new] = value
    return kept, skipped, skip


def load_pretrained(model: nn.Module, path: str | os.PathLike, *, skip: Iterable[str] = ("head.classifier",),
                    strict: bool = True, rename: Callable[[str], str | None] | None = None,
                    weights_only: bool = True, format: str = "auto", keep_fitting: bool = True) -> dict[str, Any]:
    """Copy the tensors of a ``torch.save`` d file into ``model`` (in place, via ``load_state_dict``).

    Keys are matched by name after removing a ``module.`` prefix and applying ``rename``. Keys of the
    file *and* of the model under a ``skip`` prefix are left alone: the model keeps its own (random)
    initialisation there -- by default the identity classifier, whose number of classes differs from the
    pretraining data's -- unless ``keep_fitting`` and the file holds every tensor under that prefix with the
    model's shapes (a classifier whose class count fits is loaded).

    Args:
        model: the network to initialise, e.g. ``Genotype.build(num_classes=...)``.
        path: the weights file (see :func:`read_state_dict` for the accepted layouts).
        skip: module-path prefixes to ignore (``"head"`` covers ``head.embed.0.weight`` but not
            ``header.weight``); ``()`` loads everything.
        strict: ``True``: every model key outside ``skip`` must be in the file, every file key outside
            ``skip`` in the model, with the same shape, or nothing is loaded and an error is raised.
            ``False``: load the keys present in both with the same shape and report the rest.
        rename: maps a file key (after the ``module.`` removal) to the model's name for it, or to ``None``
            to drop it; e.g. a translation of another code base's module names.
        weights_only: see :func:`read_state_dict`.
        keep_fitting: load a ``skip`` prefix all the same when the file's tensors there fit the model exactly
            (:func:`fitting_prefixes`); ``False``: always leave it.
        format: the file's naming: ``"nasreid"`` (names as the model's), ``"torchreid"`` (torchreid's OSNet /
            OSNet-IBN / OSNet-AIN files, translated by :mod:`nasreid.models.torchreid` into the ``osnet`` /
            ``osnet_ibn`` / ``osnet_ain_torchreid`` presets), ``"torchvision"`` (a torchvision ResNet-50 state dict
            into a model whose modules are torchvision's, e.g. RMGL's ``resnet50`` trunk: names kept, ``fc.*``
            dropped), or ``"auto"`` (torchreid when the keys are torchreid's, else names as they are).
            Ignored when ``rename`` is given.

    Returns:
        ``{"loaded": n, "skipped": [...], "missing": [...], "unexpected": [...], "mismatched": [...]}``:
        the number of tensors copied; the file keys (without ``module.``, before ``rename``) dropped by
        ``skip`` or ``rename``; the model keys
        outside ``skip`` not in the file (kept at their initialisation); the file keys not in the model;
        and ``(key, file shape, model shape)`` for keys in both whose shapes differ. With ``strict``
        the last three are empty.

    Raises:
        PretrainedWeightsError: file missing / unreadable / holding no state dict (names the file); with
            ``strict``, keys that do not match (names a few missing and unexpected keys and how many) or a
            shape that differs (names the key and both shapes); with ``strict=False``, no tensor of the
            file matches the model at all (wrong architecture).
    """
    skip = tuple(skip)
    path = Path(path)
    file_sd = read_state_dict(path, weights_only=weights_only)
    model_sd = model.state_dict()
    hint = ""
    if rename is None:
        rename, hint = file_naming(file_sd, path, format)

    kept, skipped, skip = _select(file_sd, rename, skip, model_sd if keep_fitting else None)
    wanted = [k for k in model_sd if not under_prefixes(k, skip)]
    missing = [k for k in wanted if k not in kept]
    unexpected = [k for k in kept if k not in model_sd]
    mismatched = [(k, tuple(v.shape), tuple(model_sd[k].shape)) for k, v in kept.items()
                  if k in model_sd and v.shape != model_sd[k].shape]

    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) of the model missing from the file: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) of the file not in the model: {_few(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) (file vs model): "
                         f"{_few([f'{k} {list(fs)} vs {list(ms)}' for k, fs, ms in mismatched])}")
        raise PretrainedWeightsError(
            f"pretrained weights {path} do not match the model ({type(model).__name__}): " + "; ".join(parts)
            + f". Skipped prefixes: {list(skip)}; pass skip=... to leave layers out, or strict=False to load "
              f"the keys that match{hint}")
    if strict and mismatched:
        key, fs, ms = mismatched[0]
        more = f" (and {len(mismatched) - 1} more key(s) with other shapes)" if len(mismatched) > 1 else ""
        raise PretrainedWeightsError(
            f"pretrained weights {path}: {key!r} has shape {list(fs)} in the file but {list(ms)} in the model"
            f"{more}; a different width multiplier / number of classes? Put the layer in skip=... or pass "
            f"strict=False{hint}")

    bad = {k for k, _, _ in mismatched}
    load = {k: v for k, v in kept.items() if k in model_sd and k not in bad}
    if not load and kept:
        raise PretrainedWeightsError(
            f"no tensor of {path} matches the model ({type(model).__name__}): file keys e.g. "
            f"{_few(list(kept))}; model keys e.g. {_few(wanted)}; weights of another architecture, or module "
            "names that need rename=...?")
    model.load_state_dict(load, strict=False)  # `load` holds model keys only; the modules' loading hooks run
    return {"loaded": len(load), "skipped": skipped, "missing": missing, "unexpected": unexpected,
            "mismatched": mismatched}


#: normalisation layers: where the file has none of the same kind, :func:`warm_start` sets them to identity
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def fixed_name(key: str) -> str:
    """The fixed network's name of a supernet key: every ``candidates.<choice>`` segment of a
    :class:`~nasreid.mutables.LayerChoice` removed (``conv2.0.candidates.os_in_in.in_in.weight`` ->
    ``conv2.0.in_in.weight``), which is the name the chosen block has once the genotype is frozen."""
    return re.sub(r"(^|\.)candidates\.[^.]+(?=\.)", "", key)


def _norm_kind(m: nn.Module) -> str:
    return "batch" if isinstance(m, nn.modules.batchnorm._BatchNorm) else type(m).__name__


def _identity_norm(m: nn.Module) -> None:
    """gamma = 1, beta = 0, running mean 0 / variance 1: the layer only normalises."""
    with torch.no_grad():
        if getattr(m, "weight", None) is not None:
            m.weight.fill_(1.0)
        if getattr(m, "bias", None) is not None:
            m.bias.zero_()
        if getattr(m, "running_mean", None) is not None:
            m.reset_running_stats()


def warm_start(model: nn.Module, path: str | os.PathLike, *, skip: Iterable[str] = ("head.classifier",),
               format: str = "auto", weights_only: bool = True, keep_fitting: bool = True) -> dict[str, Any]:
    """Initialise a supernet, or a fixed network of another genotype, from a fixed network's weights file.

    The OSNet-AIN search of Zhou et al. (TPAMI 2021, Sec. 3.3, Fig. 5) grows IN layers into a pretrained
    OSNet; Sec. 4.1 fine-tunes from pretrained weights. Here every tensor of the model takes the file's tensor
    at the same place of the *fixed* network: a supernet key's place is its name with the
    :class:`~nasreid.mutables.LayerChoice` segments removed (:func:`fixed_name`), so the residual branch of
    every candidate of a block (shared or not) takes the file's OS block, and an IN candidate's
    ``in_in`` / ``in_out`` takes the file's IN at that place when the file has one. A normalisation layer the
    file lacks at that place (an IN the file's genotype does not have) starts at identity: gamma 1, beta 0
    (running mean 0 and variance 1 for a BN). One the file has of another kind (a BN where the model has an
    IN, e.g. OSNet-IBN's and the released OSNet-AIN's conv1 from a plain OSNet file) takes the file's gamma and
    beta, the statistics of the file's BN being dropped (a BN replacing an IN starts with mean 0 / variance 1),
    so that the scale and shift the next layer was trained on are kept. Every other
    tensor must be in the file with the same shape; a normalisation layer of the file the model does not have
    (a BN, or an OS block's IN, e.g. the BN of a plain OS block's last 1x1 conv that torchreid's ``OSBlockINin``
    lacks) is reported as unused. The file is read with ``weights_only`` and named by
    ``format`` as in :func:`load_pretrained` (torchreid files translated exactly).

    With a file of exactly the model's architecture this loads the same tensors as :func:`load_pretrained`.

    Args:
        model: a supernet (e.g. ``OSNetAINSpace(num_classes=485, width_mult=0.25)``) or a fixed network.
        path: a weights file (:func:`read_state_dict`).
        skip: module-path prefixes (fixed-network names) left at the model's own initialisation, in the file and
            in the model (default: the identity classifier, whose class count is the training data's), unless
            ``keep_fitting`` and the file's tensors there fit exactly (:func:`fitting_prefixes`).
        format: ``auto`` / ``nasreid`` / ``torchreid`` / ``torchvision`` (:func:`load_pretrained`).
        weights_only: see :func:`read_state_dict`.
        keep_fitting: see :func:`load_pretrained`.

    Returns:
        ``{"loaded": n, "identity": [norm-layer paths set to identity], "converted": [norm-layer paths whose
        gamma / beta came from a norm of another kind], "unused": [file keys of
        normalisation layers the model lacks, or statistics of one it has of another kind], "skipped": [file
        keys dropped by skip / format], "folds": {IN path: the file's BN tensors}}``; ``loaded`` counts the
        model's tensors that took a file tensor (a supernet's candidates count once each). ``folds`` names the
        added IN layers that stand where the file has a BN (a module's ``replaced_norms``: torchreid's
        ``OSBlockINin`` from a plain OSNet file), for :func:`calibrate_instance_norms`.

    Raises:
        PretrainedWeightsError: the file cannot be read; a model tensor other than a normalisation layer's is
            not in the file, or has another shape there; a file tensor has no place in the model (a file of
            another architecture or width). The message names the keys and the file.
    """
    skip = tuple(skip)
    path = Path(path)
    file_sd = read_state_dict(path, weights_only=weights_only)
    rename, hint = file_naming(file_sd, path, format)
    fixed_sd = {fixed_name(k): v for k, v in model.state_dict().items()} if keep_fitting else None
    src, skipped, skip = _select(file_sd, rename, skip, fixed_sd)
    modules = dict(model.named_modules())
    load: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    identity: dict[str, nn.Module] = {}
    converted: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for key, value in model.state_dict().items():
        place = fixed_name(key)
        if under_prefixes(place, skip):
            continue
        owner_path, _, leaf = key.rpartition(".")
        owner = modules.get(owner_path)
        if isinstance(owner, _NORMS):
            prefix = fixed_name(owner_path)
            file_kind = ("batch" if f"{prefix}.running_mean" in src
                         else "other" if f"{prefix}.weight" in src or f"{prefix}.bias" in src else None)
            model_kind = "batch" if _norm_kind(owner) == "batch" else "other"
            if file_kind is None:
                identity[owner_path] = owner
                continue
            if file_kind != model_kind:  # replaced norm: its affine from the file's, statistics reset
                converted.add(owner_path)
                if leaf not in ("weight", "bias"):
                    continue
        if place not in src:
            missing.append(key)
        elif tuple(src[place].shape) != tuple(value.shape):
            mismatched.append(f"{key} {list(src[place].shape)} in the file vs {list(value.shape)}")
        else:
            load[key] = src[place]
            used.add(place)
    def file_norm(prefix: str) -> bool:  # a BN (running statistics) or one of the OS blocks' IN layers
        return f"{prefix}.running_mean" in src or prefix.rpartition(".")[2] in ("in_in", "in_out")

    norm_places = {fixed_name(p) for p in (*identity, *converted)}
    left = [k for k in src if k not in used]
    unused = [k for k in left if k.rpartition(".")[0] in norm_places or file_norm(k.rpartition(".")[0])]
    unplaced = [k for k in left if k not in set(unused)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model not in the file: {_few(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_few(mismatched)}")
    if unplaced:
        problems.append(f"{len(unplaced)} tensor(s) of the file with no place in the model: {_few(unplaced)}")
    if problems:
        raise PretrainedWeightsError(
            f"cannot warm-start {type(model).__name__} from {path}: " + "; ".join(problems)
            + f" (only normalisation layers may be absent; skipped prefixes: {list(skip)}){hint}")
    folds: dict[str, dict[str, torch.Tensor]] = {}  # an added IN where the file has a BN (OSBlockINin)
    for path, m in modules.items():
        for child, bn in (getattr(m, "replaced_norms", None) or {}).items():
            in_path, bn_place = f"{path}.{child}" if path else child, fixed_name(f"{path}.{bn}" if path else bn)
            if in_path in identity and f"{bn_place}.running_var" in src:
                folds[in_path] = {k: src[f"{bn_place}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
    for p in converted:  # a BN that replaced the file's IN: running statistics start at mean 0 / variance 1
        if getattr(modules[p], "running_mean", None) is not None:
            modules[p].reset_running_stats()
    model.load_state_dict(load, strict=False)
    for m in identity.values():
        _identity_norm(m)
    return {"loaded": len(load), "identity": sorted(identity), "converted": sorted(converted), "unused": unused,
            "skipped": skipped, "folds": folds}


def calibrate_instance_norms(model: nn.Module, paths: Iterable[str], images: Iterable[torch.Tensor],
                             folds: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> list[str]:
    """Data-dependent start of affine IN layers grown into a pretrained network: ``gamma_c = E[sigma_c(x)]``,
    ``beta_c = E[mu_c(x)]``, the per-image spatial standard deviation and mean of channel ``c`` of the layer's
    input averaged over ``images``, measured with every such layer bypassed (the pretrained network's own
    activations). Then ``IN(x) = (x - mu(x)) / sigma(x) * E[sigma] + E[mu]`` equals ``x`` for an image whose
    statistics are the average and only removes each image's deviation from them -- the style statistics that
    IN is added to remove (Zhou et al., TPAMI 2021, Sec. 3.2; Pan et al., IBN-Net, ECCV 2018) -- where
    gamma 1 / beta 0 would rescale every channel to unit variance (measured on the MSMT17 OSNet warm-started
    supernet: embedding norm 222 instead of 19, the loss at chance for 3 epochs).

    In a supernet every candidate of each :class:`~nasreid.mutables.LayerChoice` runs on the block's input (the
    first candidate's output goes on), so every candidate's IN layers are measured.

    Args:
        model: the warm-started network or supernet (left in its train / eval mode afterwards).
        paths: module paths of the IN layers to set (e.g. :func:`warm_start`'s ``identity`` list; other kinds
            of module are ignored).
        images: batches ``[B, 3, H, W]`` on the model's device (normalised as for the network), e.g. 64
            training images with the test transform.
        folds: ``{IN path: {"weight", "bias", "running_mean", "running_var"}}`` of a BN the pretrained network
            applies where this IN stands (:func:`warm_start`'s ``folds``): the IN then reproduces that BN for an
            average image, ``gamma = a * E[sigma]``, ``beta = a * E[mu] + b`` with the BN's eval-mode
            ``a = weight / sqrt(running_var + eps)``, ``b = bias - a * running_mean``.

    Returns:
        the paths of the layers set (those the images reached).
    """
    from nasreid.mutables import LayerChoice

    targets = {p: m for p, m in model.named_modules() if p in set(paths)
               and isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.affine}
    stats: dict[str, list] = {p: [] for p in targets}

    def bn_affine(path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        bn = (folds or {}).get(path)
        if bn is None:
            return None
        a = bn["weight"] / (bn["running_var"] + 1e-5).sqrt()
        return a, bn["bias"] - a * bn["running_mean"]

    def bypass(path: str):
        fold = bn_affine(path)

        def hook(module, args, out):
            x = args[0].detach().float()
            mu = x.mean(dim=(2, 3))
            sd = (x.var(dim=(2, 3), unbiased=False) + module.eps).sqrt()
            stats[path].append((mu.sum(0), sd.sum(0), x.shape[0]))
            if fold is None:  # while measuring, later layers see the pretrained network's activations:
                return args[0]  # an added IN is left out,
            a, b = (t.to(args[0]) for t in fold)  # one standing for the file's BN applies that BN (eval mode)
            return args[0] * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
        return hook

    def all_candidates(module, args, out):
        for c in list(module.candidates.values())[1:]:
            c(*args)
        return out

    handles = [m.register_forward_hook(bypass(p)) for p, m in targets.items()]
    handles += [m.register_forward_hook(all_candidates) for m in model.modules()
                if isinstance(m, LayerChoice) and len(m.candidates) > 1]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in images:
                model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    done = []
    with torch.no_grad():
        for p, m in targets.items():
            if stats[p]:
                n = sum(k for _, _, k in stats[p])
                mu = sum(mu for mu, _, _ in stats[p]) / n
                sd = sum(sd for _, sd, _ in stats[p]) / n
                fold = bn_affine(p)
                if fold is not None:  # IN(x) ~ BN(x): fold the replaced BN's eval-mode affine in
                    a, b = fold
                    mu, sd = a * mu + b, a * sd
                m.bias.copy_(mu)
                m.weight.copy_(sd)
                done.append(p)
    return done


def backbone_and_head_parameters(model: nn.Module, head_prefixes: Iterable[str] = ("head",)
                                 ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split ``model``'s parameters into (backbone, head) by module path.

    For the paper's fine-tuning warm start (OSNet-AIN, Sec. 4.1: for the first 10 epochs the pretrained
    base network is frozen and only the new layers train): set ``requires_grad_(False)`` on the backbone
    list for those epochs, or give the optimiser the head list only.

    Args:
        model: the network.
        head_prefixes: module-path prefixes of the new layers; ``("head",)`` is nasreid's embedding and
            classifier, ``("head.classifier",)`` the identity classifier alone (torchreid's
            ``open_layers=["classifier"]``).

    Returns:
        ``(backbone, head)``: lists of parameters in ``named_parameters`` order, each parameter once (shared
        parameters are not repeated), whatever their ``requires_grad``.

    Raises:
        PretrainedWeightsError: no parameter lies under ``head_prefixes`` (the message lists the model's
            top-level modules).
    """
    prefixes = tuple(head_prefixes)
    backbone: list[nn.Parameter] = []
    head: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (head if under_prefixes(name, prefixes) else backbone).append(p)
    if not head:
        top = [n for n, _ in model.named_children()]
        raise PretrainedWeightsError(
            f"no parameter of {type(model).__name__} lies under head prefixes {list(prefixes)}; its top-level "
            f"modules are {top}")
    return backbone, head
