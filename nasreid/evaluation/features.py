"""Feature extraction for re-ID evaluation."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .matchers import FeatureSet
from .metrics import EvaluationError

__all__ = ["extract_features", "extract_feature_set"]


def _to_list(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().reshape(-1).tolist()
    if isinstance(x, np.ndarray):
        return x.reshape(-1).tolist()
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


@torch.no_grad()
def _extract(model, loader, *, device, flip, amp, normalize, channels_last, progress, desc, forward):
    """Features ``[N, ...]`` and labels; also the batches' ``index`` entries (``None`` if a batch has none)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats, pids, camids, paths, index = [], [], [], [], []
    if amp:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        autocast = torch.autocast(device_type=device.type, dtype=amp_dtype)
    else:
        autocast = nullcontext()
    run = model if forward is None else (lambda x: forward(model, x))
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            img = batch["img"].to(device, non_blocking=True)
            if channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            with autocast:
                f = run(img)
                if flip:
                    f = f.float() + run(torch.flip(img, dims=[3])).float()
            f = f.float()
            if flip:
                f = f / 2
            if (f.ndim != 2 if forward is None else f.ndim < 2) or f.shape[0] != img.shape[0]:
                want = "[B, D]" if forward is None else "[B, ...]"
                raise EvaluationError(
                    f"model must return {want} features in eval mode, got shape {tuple(f.shape)} for a batch "
                    f"of {img.shape[0]} images"
                )
            if normalize:
                f = F.normalize(f, p=2, dim=1)
            feats.append(f.cpu())
            pids.extend(_to_list(batch["pid"]))
            camids.extend(_to_list(batch["camid"]))
            paths.extend(str(p) for p in _to_list(batch["path"]))
            if index is not None and "index" in batch:
                index.extend(int(i) for i in _to_list(batch["index"]))
            else:
                index = None
    finally:
        model.train(was_training)
    if not feats:
        raise EvaluationError("the loader yielded no batch: cannot extract features from an empty dataset")
    return torch.cat(feats, 0), np.asarray(pids, dtype=np.int64), np.asarray(camids, dtype=np.int64), paths, index


def extract_features(model: torch.nn.Module, loader, *, device="cpu", flip: bool = False, amp: bool = False,
                     normalize: bool = False, channels_last: bool = False, progress: bool = True,
                     desc: str = "features"):
    """Run ``model`` in eval mode over ``loader`` and collect features and labels.

    Args:
        model: maps images ``[B, 3, H, W]`` to features ``[B, D]`` in eval mode. Its train/eval mode is restored
            afterwards; its parameters are not moved (put it on ``device`` yourself).
        loader: iterable of dicts with keys ``img`` (``[B, 3, H, W]`` tensor), ``pid``, ``camid`` (``[B]``
            ints) and ``path`` (``B`` strings), e.g. a ``DataLoader`` over a re-ID dataset.
        device: where images are sent.
        flip: average the features of each image and of its horizontal flip (``torch.flip`` on the width).
        amp: run the forward pass under ``torch.autocast`` (float16 on CUDA, bfloat16 on CPU); features are
            returned as float32.
        normalize: L2-normalise each (flip-averaged) feature vector.
        channels_last: send images in ``torch.channels_last`` memory format.
        progress: show a tqdm progress bar.

    Returns:
        ``(features [N, D] float32 CPU tensor, pids [N] int64 ndarray, camids [N] int64 ndarray, paths list[str])``.

    Raises:
        KeyError: a batch lacks one of the keys above.
        EvaluationError (a ``ValueError``): the model does not return a ``[B, D]`` tensor, or the loader is empty.
    """
    f, pids, camids, paths, _ = _extract(model, loader, device=device, flip=flip, amp=amp, normalize=normalize,
                                         channels_last=channels_last, progress=progress, desc=desc, forward=None)
    return f, pids, camids, paths


def _stamps(records) -> dict:
    """``seqs`` / ``frames`` / ``times`` arrays of :class:`FeatureSet` from records (omitted when all unknown)."""
    out = {}
    for key, dtype, unknown in (("seq", np.int64, -1), ("frame", np.int64, -1), ("time", np.float64, np.nan)):
        vals = [getattr(r, key, None) for r in records]
        if any(v is not None for v in vals):
            out[key + "s"] = np.array([unknown if v is None else v for v in vals], dtype=dtype)
    return out


def extract_feature_set(model: torch.nn.Module, loader, *,
                        forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
                        device="cpu", flip: bool = False, amp: bool = False, normalize: bool = False,
                        channels_last: bool = False, progress: bool = True, desc: str = "features") -> FeatureSet:
    """Like :func:`extract_features`, but returns a :class:`FeatureSet` with the images' stamps.

    Args:
        forward: ``forward(model, images [B, 3, H, W]) -> [B, ...]`` (e.g. :meth:`Matcher.features`, which may
            return feature maps); default ``model(images)``, which must return ``[B, D]``. With ``flip`` the two
            outputs are averaged element-wise (spatial maps are *not* flipped back); ``normalize`` L2-normalises
            along dim 1 (channels of a map).
        Other arguments: as :func:`extract_features`.

    ``seqs`` / ``frames`` / ``times`` come from the records of ``loader.dataset`` (an
    :class:`nasreid.data.ImageDataset`, whose items carry their ``index``) when every batch has ``index`` and
    the paths agree; else they are ``None``.

    Raises:
        KeyError: a batch lacks ``img``, ``pid``, ``camid`` or ``path``.
        EvaluationError (a ``ValueError``): the output is not ``[B, D]`` (``[B, ...]`` with ``forward``), or
            the loader is empty.
    """
    f, pids, camids, paths, index = _extract(model, loader, device=device, flip=flip, amp=amp, normalize=normalize,
                                             channels_last=channels_last, progress=progress, desc=desc,
                                             forward=forward)
    records = getattr(getattr(loader, "dataset", None), "records", None)
    stamps = {}
    if records is not None and index is not None and all(0 <= i < len(records) for i in index):
        recs = [records[i] for i in index]
        if all(getattr(r, "path", None) == p for r, p in zip(recs, paths)):
            stamps = _stamps(recs)
    return FeatureSet(f, pids, camids, paths=paths, **stamps)
