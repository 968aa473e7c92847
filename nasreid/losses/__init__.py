"""Re-ID training losses: label-smoothed identity cross entropy + batch-hard triplet.

Every training loss is registered in :data:`nasreid.registry.LOSSES` as a factory
``factory(num_classes, **kwargs) -> nn.Module`` whose forward is ``(outputs: dict, batch: dict) -> (loss,
parts)``: ``outputs`` the model's named training outputs (``logits [B, C]``, ``feat [B, D]``, or whatever the
model returns), ``batch`` the loader's dict (``pid [B]``, ``camid``, ``img`` ...), ``loss`` a scalar tensor with
graph and ``parts`` plain floats for logging (``loss`` among them). A recipe picks one with ``loss.name``.

``"reid"`` (:func:`build_reid_loss`) is ``L = CE_ls(logits, pids) + triplet_weight * L_BH(feat, pids)``.
``"msinet"`` (:func:`~nasreid.losses.msinet.build_msinet_loss`) is MSINet's retraining loss: ID + triplet on the
global and the local branch plus the spatial alignment loss (SAM, :mod:`nasreid.losses.sam`), whose PAM gives the
loss module parameters of its own (trained and checkpointed by the training method).
"""
from __future__ import annotations

import torch
from torch import nn

from nasreid.registry import LOSSES

from .class_memory import ClassMemoryLoss, build_class_memory_loss  # registers "class_memory"
from .classification import CrossEntropyLabelSmooth, check_targets
from .msinet import MSINetLoss, build_msinet_loss  # registers "msinet"
from .rmgl import RMGLLoss, build_rmgl_loss  # registers "rmgl"
from .sam import PositionActivation, SpatialAlignLoss, mutual_correlation
from .triplet import TripletLoss, pairwise_distance

__all__ = [
    "CrossEntropyLabelSmooth",
    "TripletLoss",
    "ReIDLoss",
    "build_reid_loss",
    "pairwise_distance",
    "check_targets",
    "MSINetLoss",
    "build_msinet_loss",
    "RMGLLoss",
    "build_rmgl_loss",
    "SpatialAlignLoss",
    "PositionActivation",
    "mutual_correlation",
    "ClassMemoryLoss",
    "build_class_memory_loss",
]


class ReIDLoss(nn.Module):
    """Weighted sum of identity cross entropy and (optionally) batch-hard triplet loss.

    Args:
        ce: a :class:`CrossEntropyLabelSmooth`.
        triplet: a :class:`TripletLoss` or ``None``.
        triplet_weight: weight of the triplet term (>= 0); 0 skips computing it.

    Forward:
        outputs: dict with ``logits`` ``[B, C]`` and (if the triplet term is used) ``feat`` ``[B, D]``.
        batch: the batch dict (its ``pid`` ``[B]`` long identity labels in ``[0, C)`` are used), or the
            ``pid`` tensor itself.
        returns: ``(total, parts)``; ``total`` a scalar tensor with graph; ``parts`` a dict of
            plain floats ``{"loss", "ce", "triplet", "acc"}`` (``loss`` = the total) (``acc`` = top-1 accuracy in
            ``[0, 1]``; ``triplet`` is 0.0 when disabled), plus ``feat_norm`` (mean L2 norm of ``feat``) when the
            outputs hold a ``[B, D]`` ``feat``: a triplet term stuck at its margin with a small ``feat_norm`` marks
            the poor retrains described in :func:`build_reid_loss`.

    Raises:
        KeyError: ``logits`` missing, or ``feat`` missing while the triplet term is enabled.
        ValueError: propagated from the component losses (bad labels / shapes).
    """

    def __init__(self, ce: CrossEntropyLabelSmooth, triplet: TripletLoss | None = None,
                 triplet_weight: float = 0.0):
        super().__init__()
        if triplet_weight < 0:
            raise ValueError(f"triplet_weight must be >= 0, got {triplet_weight}")
        self.ce = ce
        self.triplet = triplet
        self.triplet_weight = float(triplet_weight)

    def forward(self, outputs: dict, batch) -> tuple[torch.Tensor, dict[str, float]]:
        pids = batch["pid"] if isinstance(batch, dict) else batch
        if "logits" not in outputs:
            raise KeyError("outputs must contain 'logits' [B, C]")
        logits = outputs["logits"]
        ce = self.ce(logits, pids)
        total = ce
        tri_val = 0.0
        if self.triplet is not None and self.triplet_weight > 0:
            if "feat" not in outputs:
                raise KeyError("outputs must contain 'feat' [B, D] when triplet_weight > 0")
            tri = self.triplet(outputs["feat"], pids)
            total = total + self.triplet_weight * tri
            tri_val = float(tri.detach())
        with torch.no_grad():
            acc = float((logits.argmax(dim=1) == pids).float().mean()) if pids.numel() else 0.0
            stats = {"loss": float(total.detach()), "ce": float(ce.detach()), "triplet": tri_val, "acc": acc}
            if "feat" in outputs and outputs["feat"].dim() == 2:  # a collapse of the metric term shows here
                stats["feat_norm"] = float(outputs["feat"].detach().float().norm(dim=1).mean())
        return total, stats


@LOSSES.register("reid")
def build_reid_loss(num_classes: int, *, label_smooth: float = 0.1, triplet_weight: float = 0.0,
                    triplet_margin: float = 0.3, triplet_metric: str = "euclidean",
                    triplet_soft_margin: bool = False) -> ReIDLoss:
    """Build the standard Re-ID loss.

    Args:
        num_classes: training identities ``C``.
        label_smooth: label-smoothing ``eps`` (Szegedy et al. 2016, Sec. 7).
        triplet_weight: weight of the batch-hard triplet term (Hermans et al. 2017, Eq. 5); 0 disables.
        triplet_margin: triplet margin, in the units of ``triplet_metric``.
        triplet_metric: ``"euclidean"`` (on the raw pre-BN feature, the BNNeck default of Luo et al. 2019) or
            ``"cosine"`` (``1 - cos`` of the L2-normalised feature, in ``[0, 2]``). Set it in a recipe as
            ``loss.kwargs: {triplet_metric: cosine}``. Neither is a cure for a metric term stuck at the margin
            in small from-scratch retrains: the euclidean hinge is not scale-invariant (while the hardest
            positive is farther than the hardest negative, shrinking every feature lowers the loss towards
            ``margin``), and on the CPU CUHK01 retrain the cosine form sat at exactly ``margin`` from epoch 18
            on (the pre-BN feature's shared offset, which the BNNeck removes for the classifier, makes every
            cosine near 1) and did not raise mAP (results/README.md, study section).
        triplet_soft_margin: ``softplus(d_ap - d_an)`` instead of the hinge (Hermans et al. 2017, Sec. 2).

    Raises:
        ValueError: invalid arguments (unknown metric, negative margin or weight).
    """
    ce = CrossEntropyLabelSmooth(num_classes, epsilon=label_smooth)
    # built (and so validated) even when the term is off: a typo in ``triplet_metric`` must not pass silently
    # in a CE-only recipe and fail only when someone turns the triplet on
    triplet = TripletLoss(margin=triplet_margin, metric=triplet_metric, soft_margin=triplet_soft_margin)
    return ReIDLoss(ce, triplet if triplet_weight > 0 else None, triplet_weight)
