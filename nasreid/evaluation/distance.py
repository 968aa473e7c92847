"""Query-gallery distance matrices.

``cosine``: ``1 - cos(q, g)``, in ``[0, 2]`` (features are L2-normalised internally; zero vectors stay zero,
so their distance to everything is 1). ``euclidean``: **squared** L2 distance ``||q - g||^2`` (monotone in the
L2 distance, so rankings, CMC and mAP are the same; no square root is taken), clamped at 0 against rounding.
Smaller means more similar for both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import EvaluationError

__all__ = ["compute_distance", "prepare_features", "distance_from_prepared", "METRICS"]

METRICS = ("cosine", "euclidean")


def _check(metric: str) -> None:
    if metric not in METRICS:
        raise EvaluationError(f"unknown metric {metric!r}; expected one of {METRICS}")


def prepare_features(x: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-side preprocessing shared by all query chunks: ``(features, squared_norms_or_None)``.

    float16/bfloat16 inputs are promoted to float32; cosine L2-normalises, euclidean precomputes ``||x||^2``.
    """
    _check(metric)
    if x.ndim != 2:
        raise EvaluationError(f"features must be 2-D [N, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if metric == "cosine":
        return F.normalize(x, p=2, dim=1), None
    return x, x.pow(2).sum(1)


def distance_from_prepared(q: tuple, g: tuple, metric: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Distance ``[Nq, Ng]`` between two outputs of :func:`prepare_features` (written into ``out`` if given)."""
    qx, qn = q
    gx, gn = g
    if qx.shape[1] != gx.shape[1]:
        raise EvaluationError(f"feature dimensions differ: query {qx.shape[1]} vs gallery {gx.shape[1]}")
    if metric == "cosine":
        # 1 - q @ g.T in one BLAS call
        one = torch.ones((), dtype=qx.dtype, device=qx.device)
        if out is None:
            return torch.addmm(one, qx, gx.t(), beta=1, alpha=-1)
        return torch.addmm(one, qx, gx.t(), beta=1, alpha=-1, out=out)
    if out is None:
        d = torch.addmm(gn.unsqueeze(0), qx, gx.t(), beta=1, alpha=-2)
    else:
        d = torch.addmm(gn.unsqueeze(0), qx, gx.t(), beta=1, alpha=-2, out=out)
    d.add_(qn.unsqueeze(1))
    return d.clamp_(min=0)


def compute_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Distance matrix between query features ``qf`` [Nq, D] and gallery features ``gf`` [Ng, D].

    Args:
        metric: ``"cosine"`` (``1 - cos``, range [0, 2]) or ``"euclidean"`` (**squared** L2 distance).

    Returns:
        ``[Nq, Ng]`` float tensor on the inputs' device (float32 for half-precision inputs).

    Raises:
        EvaluationError (a ``ValueError``): unknown metric, non-2-D inputs or mismatched feature dimensions.
    """
    return distance_from_prepared(prepare_features(qf, metric), prepare_features(gf, metric), metric)
