"""Class-memory loss on pooled features: the "class memory loss" baseline of QAConv's Table 2 (Liao & Shao,
"Interpretable and Generalizable Person Re-Identification with Query-Adaptive Convolution and Temporal
Lifting", ECCV 2020, Sec. 5.3: the compared losses train the pooled feature, evaluated by cosine distance).

The memory is :class:`~nasreid.losses.memory.ClassMemory` (one L2-normalised feature per class, softmax over
``f . c^n / tau``, momentum update ``beta``; the SpCL / MSINet form). The QAConv paper does not give the
baseline's temperature or update rule; ``tau = 0.05`` and ``beta = 0.2`` here, the memory starting from zeros
(the first steps' loss is ``log C``). Recipe: ``loss: {name: class_memory, kwargs: {dim: 512}}``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from nasreid.registry import LOSSES

from .memory import ClassMemory

__all__ = ["ClassMemoryLoss", "build_class_memory_loss"]


class ClassMemoryLoss(nn.Module):
    """``L = CE(softmax(normalise(f) . C^T / tau), y)`` on the training output ``feat [B, D]``, then the memory
    update with the batch (after the loss, without gradient), optionally plus ``triplet_weight`` x batch-hard
    triplet on the same feature.

    Args:
        num_classes: C, training identities (pids ``0..C-1``).
        dim: D, the network's feature dimension (``space.kwargs.feature_dim``).
        temperature, momentum: tau and beta of the memory.
        triplet_weight, triplet_margin: optional batch-hard triplet term (Hermans et al. 2017).

    Buffers (checkpointed with the loss): the memory ``[C, D]``.

    Raises:
        KeyError: the network's training output has no ``feat``. ValueError: ``feat`` is not ``[B, dim]``.
    """

    def __init__(self, num_classes: int, dim: int, temperature: float = 0.05, momentum: float = 0.2,
                 triplet_weight: float = 0.0, triplet_margin: float = 0.3):
        super().__init__()
        from .triplet import TripletLoss

        self.memory = ClassMemory(num_classes, dim, temperature, momentum)
        self.triplet = TripletLoss(margin=triplet_margin) if triplet_weight > 0 else None
        self.triplet_weight = float(triplet_weight)

    def forward(self, outputs: dict, batch) -> tuple[torch.Tensor, dict[str, float]]:
        if "feat" not in outputs:
            raise KeyError("the class-memory loss needs the network's training output 'feat' [B, D]")
        pids = batch["pid"] if isinstance(batch, dict) else batch
        feat = outputs["feat"]
        # a snapshot of the memory enters the graph: the update below happens before the caller's backward
        m = self.memory
        logits = (F.normalize(feat, dim=1) @ m.features.clone().to(feat.dtype).t() / m.temperature).float()
        mem = torch.nn.functional.cross_entropy(logits, pids)
        total, tri = mem, 0.0
        if self.triplet is not None:
            t = self.triplet(feat, pids)
            total = total + self.triplet_weight * t
            tri = float(t.detach())
        self.memory.update(feat.detach(), pids)
        with torch.no_grad():
            acc = float((logits.argmax(dim=1) == pids).float().mean()) if pids.numel() else 0.0
        return total, {"loss": float(total.detach()), "memory": float(mem.detach()), "triplet": tri, "acc": acc}


@LOSSES.register("class_memory")
def build_class_memory_loss(num_classes: int, *, dim: int, temperature: float = 0.05, momentum: float = 0.2,
                            triplet_weight: float = 0.0, triplet_margin: float = 0.3) -> ClassMemoryLoss:
    """Build the class-memory loss (recipe: ``loss: {name: class_memory, kwargs: {dim: 512, ...}}``)."""
    return ClassMemoryLoss(num_classes, dim, temperature, momentum, triplet_weight, triplet_margin)
