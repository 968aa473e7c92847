"""Batch-hard triplet loss.

Reference: A. Hermans, L. Beyer, B. Leibe, "In Defense of the Triplet Loss for Person
Re-Identification", arXiv:1703.07737, 2017, Eq. (5) (batch hard):

    L_BH = sum_a [ m + max_{p: y_p = y_a, p != a} D(f_a, f_p) - min_{n: y_n != y_a} D(f_a, f_n) ]_+

averaged here over the valid anchors. The soft-margin variant (Sec. 2, "softplus") replaces
``[m + x]_+`` by ``log(1 + exp(x))`` and ignores ``m``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TripletLoss", "pairwise_distance"]

_EPS = 1e-12


def pairwise_distance(x: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """Pairwise distance matrix.

    Args:
        x: ``[B, D]`` features.
        metric: ``"euclidean"`` (L2 distance, same units as the features; squared distances
            are clamped to ``>= 1e-12`` before the square root so the gradient stays finite,
            including on the diagonal) or ``"cosine"`` (``1 - cos``, in ``[0, 2]``).

    Returns:
        ``[B, B]`` distance matrix.

    Raises:
        ValueError: unknown metric.
    """
    if metric == "euclidean":
        sq = (x * x).sum(dim=1, keepdim=True)
        d2 = sq + sq.t() - 2.0 * (x @ x.t())
        return d2.clamp(min=_EPS).sqrt()
    if metric == "cosine":
        xn = F.normalize(x, p=2, dim=1, eps=_EPS)
        return 1.0 - xn @ xn.t()
    raise ValueError(f"unknown metric {metric!r}; expected 'euclidean' or 'cosine'")


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017, Eq. 5).

    For each anchor ``a``: hardest positive = max distance over samples with the same pid
    (excluding ``a`` itself); hardest negative = min distance over samples with a different pid.
    Anchors with no positive or no negative in the batch are ignored; if no anchor is valid the
    loss is ``0 * features.sum()`` (a zero that still carries a graph, so ``backward`` works).

    Args:
        margin: margin ``m`` (distance units), >= 0; unused when ``soft_margin``.
        metric: ``"euclidean"`` or ``"cosine"``.
        soft_margin: use ``softplus(d_ap - d_an)`` instead of ``relu(m + d_ap - d_an)``.

    Forward:
        features: ``[B, D]`` float embeddings.
        pids: ``[B]`` integer identity labels.
        returns: scalar, mean over valid anchors.

    Raises:
        ValueError: bad arguments, wrong shapes or batch-size mismatch.
    """

    def __init__(self, margin: float = 0.3, metric: str = "euclidean", soft_margin: bool = False):
        super().__init__()
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"unknown metric {metric!r}; expected 'euclidean' or 'cosine'")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.metric = metric
        self.soft_margin = bool(soft_margin)

    def forward(self, features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2:
            raise ValueError(f"features must be [B, D], got shape {tuple(features.shape)}")
        if pids.dim() != 1 or pids.shape[0] != features.shape[0]:
            raise ValueError(
                f"pids must be [B={features.shape[0]}], got shape {tuple(pids.shape)}"
            )
        dist = pairwise_distance(features, self.metric)  # [B, B]
        b = features.shape[0]
        same = pids.view(-1, 1) == pids.view(1, -1)  # [B, B]
        eye = torch.eye(b, dtype=torch.bool, device=features.device)
        pos_mask = same & ~eye
        neg_mask = ~same
        valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)  # [B]
        if not bool(valid.any()):
            return features.sum() * 0.0
        neg_inf = torch.finfo(dist.dtype).min
        pos_inf = torch.finfo(dist.dtype).max
        d_ap = dist.masked_fill(~pos_mask, neg_inf).max(dim=1).values[valid]
        d_an = dist.masked_fill(~neg_mask, pos_inf).min(dim=1).values[valid]
        if self.soft_margin:
            losses = F.softplus(d_ap - d_an)
        else:
            losses = F.relu(self.margin + d_ap - d_an)
        return losses.mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, metric={self.metric!r}, soft_margin={self.soft_margin}"
