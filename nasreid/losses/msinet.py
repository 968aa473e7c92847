"""MSINet's retraining loss: ID + triplet on the global and the local branch, plus the spatial alignment
loss (registered as ``"msinet"``).

Reference: Gu et al., "MSINet: Twins Contrastive Search of Multi-Scale Interaction for Object ReID",
CVPR 2023: Sec. 3.2 end (Eq. 5: identity cross entropy, Eq. 6: batch-hard triplet with margin
``m = 0.3``, Sec. 4.3), Sec. 3.3 (SAM, Eq. 7-8, :mod:`nasreid.losses.sam`), ``lambda_sa = 2.0``
(Sec. 4.3, Fig. 5e)::

    L = CE_ls(logits) + w_tri * L_tri(feat)
      + w_local * (CE_ls(logits_local) + w_tri * L_tri(feat_local))      # when the model has the local branch
      + lambda_sa * L_sa(featmap)                                       # when sam_weight > 0

The local (two-stripe) branch and its loss are in the authors' public code (github.com/vimar-gu/MSINet,
``reid/engine/trainer.py``: the same ID + triplet criterion on the local feature and logits, weight 1, and
the spatial term once, on the global branch); the paper only mentions the FBLNeck structure it adopts
from CDNet. Label smoothing (0.1) is the public code's ``CrossEntropyLabelSmooth`` (Eq. 5 prints plain
cross entropy). The public code's triplet L2-normalises the features before the Euclidean distance
(``triplet_normalize=True`` here); Eq. 6 does not (default ``False``).

Outputs read from the model (training mode): ``logits [B, num_classes]``, ``feat [B, D]`` (when
``triplet_weight > 0``), optionally ``logits_local [B, num_classes]`` / ``feat_local [B, D_l]``, and
``featmap [B, C, H, W]`` (the last feature map, when ``sam_weight > 0``). The batch's ``pid [B]``.

The SAM's learnable part (PAM) belongs to this loss module, not to the network: the loss has parameters
exactly when ``sam_weight > 0`` and ``sam_mode`` contains ``"pos"``. :class:`~nasreid.methods.
SupervisedMethod` moves a loss to the device, adds its parameters to the optimiser (a second parameter
group) and checkpoints its ``state_dict``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nasreid.registry import LOSSES

from .classification import CrossEntropyLabelSmooth
from .sam import SAM_MODES, SpatialAlignLoss
from .triplet import TripletLoss

__all__ = ["MSINetLoss", "build_msinet_loss"]


class MSINetLoss(nn.Module):
    """ID + triplet (global and optional local branch) + weighted spatial alignment loss.

    Args:
        ce: label-smoothed identity cross entropy (Eq. 5).
        triplet: batch-hard triplet (Eq. 6) or None.
        triplet_weight: weight of the triplet terms (>= 0; 0 skips them).
        local_weight: weight of the local branch's ``CE + triplet_weight * triplet`` (>= 0; 0 skips it).
        sam: a :class:`~nasreid.losses.sam.SpatialAlignLoss` or None.
        sam_weight: ``lambda_sa`` (>= 0; 0 skips the term).
        triplet_normalize: L2-normalise the features before the triplet loss (the public code does).

    Forward:
        outputs: the model's training outputs (see the module docstring for the keys).
        batch: the batch dict (its ``pid [B]``) or the pid tensor.
        returns: ``(total, parts)``; ``parts`` plain floats ``{"loss", "ce", "triplet", "ce_local",
            "triplet_local", "sam", "acc"}`` (a disabled / absent term is 0.0; ``acc`` the global top-1
            training accuracy in ``[0, 1]``).

    Raises:
        KeyError: a needed output is missing (the message names it).
        ValueError: bad weights, shapes or labels.
    """

    def __init__(self, ce: CrossEntropyLabelSmooth, triplet: TripletLoss | None = None,
                 triplet_weight: float = 1.0, local_weight: float = 1.0, sam: SpatialAlignLoss | None = None,
                 sam_weight: float = 0.0, triplet_normalize: bool = False):
        super().__init__()
        for name, w in (("triplet_weight", triplet_weight), ("local_weight", local_weight),
                        ("sam_weight", sam_weight)):
            if not w >= 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        if sam_weight > 0 and sam is None:
            raise ValueError("sam_weight > 0 needs a SpatialAlignLoss")
        self.ce = ce
        self.triplet = triplet
        self.triplet_weight = float(triplet_weight)
        self.local_weight = float(local_weight)
        self.sam = sam if sam_weight > 0 else None
        self.sam_weight = float(sam_weight)
        self.triplet_normalize = bool(triplet_normalize)

    @staticmethod
    def _get(outputs: dict, key: str, shape: str, why: str) -> torch.Tensor:
        if key not in outputs:
            raise KeyError(f"the msinet loss needs the model output {key!r} {shape} ({why}); "
                           f"the model returned {sorted(outputs)}")
        return outputs[key]

    def _tri(self, feat: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        if self.triplet_normalize:
            feat = F.normalize(feat, p=2, dim=1)
        assert self.triplet is not None  # called only when the triplet term is on (use_tri)
        return self.triplet(feat, pids)

    def forward(self, outputs: dict, batch) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(outputs, dict):
            raise KeyError(f"the msinet loss needs a dict of model outputs, got {type(outputs).__name__}")
        pids = batch["pid"] if isinstance(batch, dict) else batch
        use_tri = self.triplet is not None and self.triplet_weight > 0
        parts = {"ce": 0.0, "triplet": 0.0, "ce_local": 0.0, "triplet_local": 0.0, "sam": 0.0}

        logits = self._get(outputs, "logits", "[B, num_classes]", "identity loss, Eq. 5")
        ce = self.ce(logits, pids)
        total = ce
        parts["ce"] = float(ce.detach())
        if use_tri:
            tri = self._tri(self._get(outputs, "feat", "[B, D]", "triplet loss, Eq. 6"), pids)
            total = total + self.triplet_weight * tri
            parts["triplet"] = float(tri.detach())

        if self.local_weight > 0 and ("logits_local" in outputs or "feat_local" in outputs):
            why = "local branch: the model returned one of 'logits_local' / 'feat_local' but not both"
            ce_l = self.ce(self._get(outputs, "logits_local", "[B, num_classes]", why), pids)
            local = ce_l
            parts["ce_local"] = float(ce_l.detach())
            if use_tri:
                tri_l = self._tri(self._get(outputs, "feat_local", "[B, D_local]", why), pids)
                local = local + self.triplet_weight * tri_l
                parts["triplet_local"] = float(tri_l.detach())
            total = total + self.local_weight * local

        if self.sam is not None:
            fmap = self._get(outputs, "featmap", "[B, C, H, W]",
                             "spatial alignment loss, sam_weight > 0: the model must return its last feature map")
            sa = self.sam(fmap, pids)
            total = total + self.sam_weight * sa
            parts["sam"] = float(sa.detach())

        with torch.no_grad():
            acc = float((logits.argmax(dim=1) == pids).float().mean()) if pids.numel() else 0.0
        return total, {"loss": float(total.detach()), **parts, "acc": acc}

    def extra_repr(self) -> str:
        return (f"triplet_weight={self.triplet_weight}, local_weight={self.local_weight}, "
                f"sam_weight={self.sam_weight}, triplet_normalize={self.triplet_normalize}")


@LOSSES.register("msinet")
def build_msinet_loss(num_classes: int, *, label_smooth: float = 0.1, triplet_weight: float = 1.0,
                      triplet_margin: float = 0.3, local_weight: float = 1.0, sam_weight: float = 0.0,
                      sam_mode: str = "pos_neg", sam_channels: int | None = None, sam_reduction: int = 8,
                      sam_positions: str = "anchor", triplet_normalize: bool = False) -> MSINetLoss:
    """Build MSINet's retraining loss (recipe: ``loss: {name: msinet, kwargs: {...}}``).

    Args:
        num_classes: training identities.
        label_smooth: label-smoothing ``eps`` of the ID loss (0.1).
        triplet_weight: weight of the batch-hard triplet terms (1.0; 0 disables).
        triplet_margin: triplet margin ``m`` (0.3, Sec. 4.3).
        local_weight: weight of the local branch's ID + triplet loss (1.0; used only when the model returns
            ``logits_local`` / ``feat_local``).
        sam_weight: ``lambda_sa`` (0 disables SAM; the paper uses 2.0).
        sam_mode: ``"pos_neg"``, ``"pos"`` or ``"neg"`` (Table 5).
        sam_channels: channels ``C`` of ``outputs["featmap"]``; required when ``sam_weight > 0`` and
            ``sam_mode`` has ``"pos"`` (PAM's convolutions are built here, so the optimiser sees them from
            the start; no lazy module).
        sam_reduction: PAM's channel reduction (8).
        sam_positions: ``"anchor"`` (paper) or ``"other"`` (public code) indexing, see :mod:`nasreid.losses.sam`.
        triplet_normalize: L2-normalise features before the triplet loss (public code: True; Eq. 6: False).

    Raises:
        ValueError: invalid arguments (e.g. ``sam_channels`` missing when PAM is needed).
    """
    if sam_mode not in SAM_MODES:
        raise ValueError(f"unknown sam_mode {sam_mode!r}; expected one of {list(SAM_MODES)}")
    if sam_weight > 0 and "pos" in sam_mode and sam_channels is None:
        raise ValueError(f"loss 'msinet' with sam_weight > 0 and sam_mode {sam_mode!r} needs sam_channels, the "
                         "channel count C of the model's 'featmap' output (e.g. 512 for MSINet / OSNet at width 1)")
    ce = CrossEntropyLabelSmooth(num_classes, epsilon=label_smooth)
    triplet = TripletLoss(margin=triplet_margin) if triplet_weight > 0 else None
    sam = (SpatialAlignLoss(sam_channels, mode=sam_mode, reduction=sam_reduction, positions=sam_positions)
           if sam_weight > 0 else None)
    return MSINetLoss(ce, triplet, triplet_weight, local_weight, sam, sam_weight, triplet_normalize)
