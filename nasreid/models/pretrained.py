"""Initialise a network from pretrained weights stored in a local file.

The OSNet-AIN paper (Zhou, Yang, Cavallaro & Xiang, "Learning Generalisable Omni-Scale Representations for
Person Re-Identification", TPAMI 2021, Sec. 4.1 "Implementation Details" and Sec. 4.2) fine-tunes
ImageNet-pretrained OSNet weights, and "during the first 10 epochs, the ImageNet pre-trained base network
is frozen and only the randomly initialised classifier is open for training". nasreid downloads nothing:
the user gives a file written by ``torch.save``, and

* :func:`load_pretrained` copies its tensors into a model of the file's architecture, dropping the identity
  classifier (whose number of classes differs between datasets) and reporting what was loaded, skipped, missing
  or unexpected;
* :func:`warm_start` places them into a supernet or a network of another genotype, and
  :func:`calibrate_instance_norms` sets the IN layers the file lacks;
* :func:`init_weights` is the one entry point of a run: it decides between the two from the recipe's ``model``
  section (search and retrain call it).

Files are read by :func:`nasreid.models.weights.read_weights` (torch pickles with ``weights_only=True``,
``.safetensors``; an ONNX file is refused by name): a plain state dict, or one under ``"state_dict"`` (torchreid
checkpoints), ``"model"`` (nasreid's ``model.pt``; also its ``checkpoints/last.pt``, with ``weights_only=False``
as that file holds NumPy RNG states too) or ``"model_state_dict"``; a ``module.`` prefix is removed.

Module names must match the model's, or be translated by a registered weights format
(:data:`nasreid.models.weights.WEIGHT_FORMATS`): torchreid's OSNet-family files (``conv1.conv.weight`` where nasreid
has ``conv1.0.weight``) are recognised and translated exactly (:mod:`nasreid.models.torchreid`,
``format="torchreid"``); a plugin registers another naming; ``rename`` translates one file ad hoc. A network whose
layout repeats another network's modules places the renamed keys itself with a method ``pretrained_places`` (one
file tensor into several of its keys; its own new layers left at init): RMGL's OSNet trunk and per-branch stage
copies from a plain OSNet file (:meth:`nasreid.search_spaces.rmgl.RMGLSpace.pretrained_places`).

Example::

    net = Genotype.load("genotype.json").build(num_classes=485)
    report = load_pretrained(net, "osnet_ain_msmt17.pt")          # all but head.classifier, strict
    backbone, head = net.split_parameters()                        # the network interface's one split
    for _, p in backbone:
        p.requires_grad_(False)                                     # first N epochs: train the head only
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from nasreid.models.interface import under_prefixes
from nasreid.models.weights import STATE_DICT_KEYS, PretrainedWeightsError, few_keys, file_naming, read_weights

__all__ = ["PretrainedWeightsError", "load_pretrained", "warm_start", "calibrate_instance_norms", "init_weights",
           "fixed_name", "file_naming", "fitting_prefixes", "read_state_dict", "STATE_DICT_KEYS"]

log = logging.getLogger("nasreid")


def read_state_dict(path: str | os.PathLike, *, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (on the CPU), with any ``module.`` prefix removed: the ``state`` of
    :func:`nasreid.models.weights.read_weights` (torch pickle or ``.safetensors``; a state dict, or one under
    ``"state_dict"``, ``"model"`` or ``"model_state_dict"``).

    Args:
        weights_only: torch pickles: tensors and plain containers only (safe for files from others); ``False``
            also accepts arbitrary pickled objects (e.g. the NumPy RNG states of nasreid's
            ``checkpoints/last.pt``), only for files you trust, as unpickling can run code.

    Returns:
        ``{key: tensor}`` in the file's order.

    Raises:
        PretrainedWeightsError: the file does not exist, is an ONNX model, cannot be read (corrupt, neither torch
            nor safetensors, refused by ``weights_only``), holds no state dict, or a state-dict entry is not a
            tensor; the message names the file (and the entry).
    """
    return read_weights(path, weights_only=weights_only).state


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


def _places(model: nn.Module | None, names: list[str], strict: bool, source: str
            ) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]] | None:
    """The model's own placing of a file's (renamed) keys, when it has one: ``model.pretrained_places(names,
    strict=...)`` returns ``({name: (model key, ...)}, new prefixes)`` or ``None`` (names kept). A network whose
    modules repeat those of another network of the project (RMGL's OSNet trunk and per-branch stage copies,
    :meth:`nasreid.search_spaces.rmgl.RMGLSpace.pretrained_places`) fans one file tensor out to several of its keys
    (each takes a copy) and names the prefixes of its own new layers, which the file never holds (left at their
    initialisation like a ``skip`` prefix). Its errors are re-raised naming ``source``."""
    hook = getattr(model, "pretrained_places", None)
    if not callable(hook):
        return None
    try:
        return hook(names, strict=strict)
    except PretrainedWeightsError as e:
        raise PretrainedWeightsError(f"pretrained weights {source}: {e}") from None


def _select(file_sd: Mapping[str, torch.Tensor], rename: Callable[[str], str | None] | None, skip: tuple[str, ...],
            fit_to: Mapping[str, torch.Tensor] | None, model: nn.Module | None = None, strict: bool = True,
            source: str = "the weights") -> tuple[dict[str, torch.Tensor], list[str], tuple[str, ...]]:
    """The file's tensors under the model's names, the file keys dropped (by ``rename``, ``skip`` or the model's
    :func:`_places`), and the ``skip`` prefixes still in force (plus the model's new layers, :func:`_places`):
    those whose tensors fit ``fit_to`` exactly are lifted (``keep_fitting``)."""
    named = {k: (rename(k) if rename is not None else k) for k in file_sd}
    targets: dict[str, tuple[str, ...]] = {k: (() if n is None else (n,)) for k, n in named.items()}
    placed = _places(model, [n for n in named.values() if n is not None], strict, source)
    if placed is not None:  # the model's own placing: one file tensor may go to several keys, or nowhere
        places, new = placed
        targets = {k: (() if n is None else places.get(n, (n,))) for k, n in named.items()}
        skip = (*skip, *(p for p in new if p not in skip))
    if fit_to is not None:
        fits = fitting_prefixes(skip, {t: file_sd[k] for k, ts in targets.items() for t in ts}, fit_to)
        skip = tuple(p for p in skip if p not in fits)
    kept: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in file_sd.items():
        use = [t for t in targets[key] if not under_prefixes(t, skip)]
        if not use:
            skipped.append(key)
        for t in use:
            kept[t] = value
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
        format: the file's naming, a registered weights format (:data:`~nasreid.models.weights.WEIGHT_FORMATS`):
            ``"nasreid"`` (names as the model's), ``"torchreid"`` (torchreid's OSNet / OSNet-IBN / OSNet-AIN
            files, translated by :mod:`nasreid.models.torchreid` into the ``osnet`` / ``osnet_ibn`` /
            ``osnet_ain_torchreid`` presets), ``"torchvision"`` (a torchvision ResNet-50 state dict into a model
            whose modules are torchvision's, e.g. RMGL's ``resnet50`` trunk: names kept, ``fc.*`` dropped), one a
            plugin registered, or ``"auto"`` (the format whose recogniser accepts the file -- torchreid for
            torchreid's keys -- else names as they are). Ignored when ``rename`` is given. After the format (or
            ``rename``), a model with a ``pretrained_places(names, strict=...)`` method places the names itself
            (:func:`_places`; the ``rmgl`` space's OSNet backbone: torchreid's conv3..conv5 into every branch, its
            reductions and classifiers added to ``skip``).

    Returns:
        ``{"loaded": n, "skipped": [...], "missing": [...], "unexpected": [...], "mismatched": [...]}``:
        the number of tensors copied; the file keys (without ``module.``, before ``rename``) dropped by
        ``skip`` or ``rename``; the model keys
        outside ``skip`` not in the file (kept at their initialisation); the file keys not in the model;
        and ``(key, file shape, model shape)`` for keys in both whose shapes differ. With ``strict``
        the last three are empty.

    Raises:
        PretrainedWeightsError: file missing / unreadable / not a weights file (ONNX) / holding no state dict, an
            unknown ``format`` or one that does not recognise the file (names the file); with
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

    kept, skipped, skip = _select(file_sd, rename, skip, model_sd if keep_fitting else None, model, strict,
                                   str(path))
    wanted = [k for k in model_sd if not under_prefixes(k, skip)]
    missing = [k for k in wanted if k not in kept]
    unexpected = [k for k in kept if k not in model_sd]
    mismatched = [(k, tuple(v.shape), tuple(model_sd[k].shape)) for k, v in kept.items()
                  if k in model_sd and v.shape != model_sd[k].shape]

    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) of the model missing from the file: {few_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) of the file not in the model: {few_keys(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) (file vs model): "
                         f"{few_keys([f'{k} {list(fs)} vs {list(ms)}' for k, fs, ms in mismatched])}")
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
            f"{few_keys(list(kept))}; model keys e.g. {few_keys(wanted)}; weights of another architecture, or module "
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
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        if weight is not None:
            weight.fill_(1.0)
        if bias is not None:
            bias.zero_()
        if getattr(m, "running_mean", None) is not None:  # a BatchNorm / InstanceNorm (running statistics)
            cast(nn.modules.batchnorm._NormBase, m).reset_running_stats()


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
    ``format`` as in :func:`load_pretrained` (torchreid files translated exactly), then placed by the model's
    ``pretrained_places`` when it has one (strictly: the ``rmgl`` space's OSNet backbone takes a plain OSNet
    file's every tensor and refuses another's, norm layers included).

    With a file of exactly the model's architecture this loads the same tensors as :func:`load_pretrained`.

    Args:
        model: a supernet (e.g. ``OSNetAINSpace(num_classes=485, width_mult=0.25)``) or a fixed network.
        path: a weights file (:func:`read_state_dict`).
        skip: module-path prefixes (fixed-network names) left at the model's own initialisation, in the file and
            in the model (default: the identity classifier, whose class count is the training data's), unless
            ``keep_fitting`` and the file's tensors there fit exactly (:func:`fitting_prefixes`).
        format: ``auto`` or a registered weights format (:func:`load_pretrained`).
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
    src, skipped, skip = _select(file_sd, rename, skip, fixed_sd, model, True, str(path))
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
        problems.append(f"{len(missing)} tensor(s) of the model not in the file: {few_keys(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {few_keys(mismatched)}")
    if unplaced:
        problems.append(f"{len(unplaced)} tensor(s) of the file with no place in the model: {few_keys(unplaced)}")
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


def init_weights(net: nn.Module, model_cfg: Any, *, supernet: bool = False,
                 calibration_images: Callable[[int], Iterable[torch.Tensor]] | None = None) -> dict[str, Any] | None:
    """Put a recipe's pretrained weights into the network of a run: the one place that decides how (search and
    retrain both call it, through :meth:`nasreid.engine.context.RunContext.init_weights`).

    A supernet (``supernet=True``: a search) is always warm-started (:func:`warm_start`); a fixed network is
    warm-started when ``model_cfg.warm_start`` (a file of another genotype of the space), else loaded exactly
    (:func:`load_pretrained`, strict). After a warm start the IN layers the file lacks are calibrated on
    ``model_cfg.calibrate_norms`` images (:func:`calibrate_instance_norms`) when ``calibration_images`` is given;
    the outcome is logged.

    Args:
        net: the supernet or fixed network, initialised in place.
        model_cfg: the recipe's ``model`` section (:class:`~nasreid.config.ModelConfig`: ``pretrained``,
            ``pretrained_format``, ``pretrained_skip``, ``pretrained_keep_fitting``, ``warm_start``,
            ``calibrate_norms``), or ``None``.
        supernet: ``net`` is a search space's supernet.
        calibration_images: ``calibration_images(n)`` gives batches ``[B, 3, H, W]`` of ``n`` training images
            (normalised as for the network, on its device); called only when there are IN layers to calibrate and
            ``calibrate_norms > 0``. ``None``: the layers stay at gamma 1 / beta 0.

    Returns:
        The report of :func:`warm_start` (plus ``"calibrated"``: the IN paths set) or of :func:`load_pretrained`,
        ``None`` when the section names no file.

    Raises:
        PretrainedWeightsError: the file cannot be read, names an unknown format, or does not fit ``net`` (the
            message names the file and the keys).
    """
    if model_cfg is None or not getattr(model_cfg, "pretrained", None):
        return None
    m = model_cfg
    if supernet or m.warm_start:
        report = warm_start(net, m.pretrained, skip=tuple(m.pretrained_skip), format=m.pretrained_format,
                            keep_fitting=m.pretrained_keep_fitting)
        report["calibrated"] = []
        if m.calibrate_norms and report["identity"] and calibration_images is not None:
            report["calibrated"] = calibrate_instance_norms(net, report["identity"],
                                                            calibration_images(m.calibrate_norms), report["folds"])
        log.info("warm start from %s: %d tensors loaded; IN layers the file lacks: %d calibrated on %d training "
                 "images, %d at gamma 1 / beta 0; %d norm layers converted; %d file tensors unused", m.pretrained,
                 report["loaded"], len(report["calibrated"]), m.calibrate_norms if report["calibrated"] else 0,
                 len(report["identity"]) - len(report["calibrated"]), len(report["converted"]),
                 len(report["unused"]))
        return report
    report = load_pretrained(net, m.pretrained, skip=tuple(m.pretrained_skip), format=m.pretrained_format,
                             keep_fitting=m.pretrained_keep_fitting)
    log.info("loaded %d tensors from %s (skipped %d)", report["loaded"], m.pretrained, len(report["skipped"]))
    return report
