"""RMGL's training loss: one identity cross entropy per reduced feature plus one batch-hard triplet loss per
branch (registered as ``"rmgl"``).

Reference: G. Wang, Y. Yuan, J. Li, S. Ge, X. Zhou, "Receptive Multi-granularity Representation for Person
Re-Identification", IEEE TIP 29, 2020, Sec. III-A: Eq. 2 (softmax cross entropy of the classifier of
branch ``b``, path ``p``, stripe ``s``), Eq. 3 (batch-hard triplet loss, Hermans et al. 2017, on the
concatenated features of branch ``b``), Eq. 4::

    L = sum_b [ triplet_weight * L_dis^(b) + id_weight * sum_{p, s} L_cls^(b, p, s) ]

with margin 0.6 (Sec. IV-A, IV-D Fig. 10). The authors released no code; this is a re-implementation from
the paper. Each term is a mean over the batch (Eq. 2 and 3 print sums over the images, i.e. the same up to
the batch size factor). Label smoothing (default off, as in the paper) is optional.

Outputs read from the model (:class:`~nasreid.search_spaces.rmgl.RMGLSpace` in training mode):
``logits_list`` (list of ``[B, num_classes]``, one per reduced feature), ``feat_branches`` (list of
``[B, D_b]``, one per branch) and ``logits`` (``[B, num_classes]``, for the accuracy; the first entry of
``logits_list`` when absent). The batch's ``pid [B]``.
"""
from __future__ import annotations

import torch
from torch import nn

from nasreid.registry import LOSSES

from .classification import CrossEntropyLabelSmooth
from .triplet import TripletLoss

__all__ = ["RMGLLoss", "build_rmgl_loss"]


class RMGLLoss(nn.Module):
    """Sum of the identity losses of all reduced features and the triplet losses of all branches (Eq. 4).

    Args:
        ce: identity cross entropy (Eq. 2), optionally label-smoothed.
        triplet: batch-hard triplet loss (Eq. 3), or None when ``triplet_weight == 0``.
        id_weight: weight of the summed cross entropies (>= 0).
        triplet_weight: weight of the summed triplet losses (>= 0; 0 skips them).
        id_reduction: ``"sum"`` over the (branch, path, stripe) classifiers as Eq. 4 prints, or ``"mean"``
            (the sum divided by the number of classifiers, so the trunk's identity gradient does not grow with
            the number of stripes: with 14 summed heads, 2+3 stripes + RP collapsed from scratch at SGD lr 0.05
            on CUHK01 while 8 heads trained; see results/README.md).

    Forward:
        outputs: the model's training outputs (``logits_list``, ``feat_branches``, optionally ``logits``).
        batch: the batch dict (its ``pid [B]``) or the pid tensor.
        returns: ``(total, parts)``; ``total`` a scalar tensor with graph, ``parts`` plain floats
            ``{"loss", "ce", "triplet", "acc"}``: ``ce`` the reduced cross entropies (nats), ``triplet`` the
            sum of the branch triplet losses (distance units; 0.0 when disabled), ``acc`` the top-1 training
            accuracy of ``logits`` in ``[0, 1]``.

    Raises:
        KeyError: ``outputs`` is not a dict or lacks ``logits_list`` / ``feat_branches`` (the message names
            the key and what the model returned).
        ValueError: bad weights, an empty ``logits_list`` or ``feat_branches``, bad shapes or labels.
    """

    def __init__(self, ce: CrossEntropyLabelSmooth, triplet: TripletLoss | None = None, id_weight: float = 1.0,
                 triplet_weight: float = 1.0, id_reduction: str = "sum"):
        super().__init__()
        if id_reduction not in ("sum", "mean"):
            raise ValueError(f"id_reduction must be 'sum' or 'mean', got {id_reduction!r}")
        self.id_reduction = id_reduction
        for name, w in (("id_weight", id_weight), ("triplet_weight", triplet_weight)):
            if not w >= 0:
                raise ValueError(f"{name} must be >= 0, got {w!r}")
        if triplet_weight > 0 and triplet is None:
            raise ValueError("triplet_weight > 0 needs a TripletLoss")
        self.ce = ce
        self.triplet = triplet if triplet_weight > 0 else None
        self.id_weight = float(id_weight)
        self.triplet_weight = float(triplet_weight)

    @staticmethod
    def _get(outputs: dict, key: str, shape: str) -> list[torch.Tensor]:
        if key not in outputs:
            raise KeyError(f"the rmgl loss needs the model output {key!r} ({shape}); the model returned "
                           f"{sorted(outputs)} -- an RMGL network in training mode with num_classes > 0?")
        value = outputs[key]
        if isinstance(value, torch.Tensor):
            value = [value]
        if not value:
            raise ValueError(f"the rmgl loss got an empty {key!r}")
        return list(value)

    def forward(self, outputs: dict, batch) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(outputs, dict):
            raise KeyError(f"the rmgl loss needs a dict of model outputs, got {type(outputs).__name__}")
        pids = batch["pid"] if isinstance(batch, dict) else batch
        logits_list = self._get(outputs, "logits_list", "list of [B, num_classes], Eq. 2")
        feats = self._get(outputs, "feat_branches", "list of [B, D_b], Eq. 3")
        ce = sum(self.ce(lg, pids) for lg in logits_list)
        if self.id_reduction == "mean":
            ce = ce / len(logits_list)
        total = self.id_weight * ce
        tri_val = 0.0
        if self.triplet is not None:
            tri = sum(self.triplet(f, pids) for f in feats)
            total = total + self.triplet_weight * tri
            tri_val = float(tri.detach())
        logits = outputs.get("logits", logits_list[0])
        with torch.no_grad():
            acc = float((logits.argmax(dim=1) == pids).float().mean()) if pids.numel() else 0.0
        return total, {"loss": float(total.detach()), "ce": float(ce.detach()), "triplet": tri_val, "acc": acc}

    def extra_repr(self) -> str:
        return f"id_weight={self.id_weight}, triplet_weight={self.triplet_weight}, id_reduction={self.id_reduction!r}"


@LOSSES.register("rmgl")
def build_rmgl_loss(num_classes: int, *, margin: float = 0.6, label_smooth: float = 0.0, id_weight: float = 1.0,
                    triplet_weight: float = 1.0, id_reduction: str = "sum") -> RMGLLoss:
    """Build RMGL's loss (recipe: ``loss: {name: rmgl, kwargs: {...}}``).

    Args:
        num_classes: training identities (> 0).
        margin: triplet margin ``alpha`` of Eq. 3, in feature-distance units (0.6, Sec. IV-A).
        label_smooth: label-smoothing ``eps`` of the cross entropies, in ``[0, 1]`` (0: plain Eq. 2).
        id_weight: weight of the summed cross entropies (1.0, Eq. 4).
        triplet_weight: weight of the summed branch triplet losses (1.0, Eq. 4; 0 disables them).
        id_reduction: ``"sum"`` (Eq. 4) or ``"mean"`` over the classifiers (see :class:`RMGLLoss`).

    Raises:
        ValueError: invalid arguments (the message names the argument).
    """
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    if not 0.0 <= label_smooth <= 1.0:
        raise ValueError(f"label_smooth must be in [0, 1], got {label_smooth!r}")
    ce = CrossEntropyLabelSmooth(num_classes, epsilon=label_smooth)
    triplet = TripletLoss(margin=margin, metric="euclidean") if triplet_weight > 0 else None
    return RMGLLoss(ce, triplet, id_weight=id_weight, triplet_weight=triplet_weight, id_reduction=id_reduction)
