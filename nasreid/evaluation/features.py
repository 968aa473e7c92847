"""Feature extraction for re-ID evaluation."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["extract_features"]


def _to_list(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().reshape(-1).tolist()
    if isinstance(x, np.ndarray):
        return x.reshape(-1).tolist()
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


@torch.no_grad()
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
        ValueError: the model does not return a ``[B, D]`` tensor, or the loader is empty.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats, pids, camids, paths = [], [], [], []
    if amp:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        autocast = torch.autocast(device_type=device.type, dtype=amp_dtype)
    else:
        autocast = nullcontext()
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            img = batch["img"].to(device, non_blocking=True)
            if channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            with autocast:
                f = model(img)
                if flip:
                    f = f.float() + model(torch.flip(img, dims=[3])).float()
            f = f.float()
            if flip:
                f = f / 2
            if f.ndim != 2 or f.shape[0] != img.shape[0]:
                raise ValueError(
                    f"model must return [B, D] features in eval mode, got shape {tuple(f.shape)} for a batch "
                    f"of {img.shape[0]} images"
                )
            if normalize:
                f = F.normalize(f, p=2, dim=1)
            feats.append(f.cpu())
            pids.extend(_to_list(batch["pid"]))
            camids.extend(_to_list(batch["camid"]))
            paths.extend(str(p) for p in _to_list(batch["path"]))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no batch: cannot extract features from an empty dataset")
    return (torch.cat(feats, 0), np.asarray(pids, dtype=np.int64), np.asarray(camids, dtype=np.int64), paths)
