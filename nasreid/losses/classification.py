"""Identity-classification loss with label smoothing.

Reference: C. Szegedy, V. Vanhoucke, S. Ioffe, J. Shlens, Z. Wojna,
"Rethinking the Inception Architecture for Computer Vision", CVPR 2016, Sec. 7
("Model Regularization via Label-smoothing"): the one-hot target ``q(k)`` is replaced by

    q'(k) = (1 - eps) * delta_{k,y} + eps / C,

so the loss is ``H(q', p) = (1 - eps) * H(q, p) + eps * H(u, p)`` with ``u`` uniform, i.e.
``(1 - eps) * CE(logits, y) + eps * mean_k(-log p_k)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossEntropyLabelSmooth", "check_targets"]


def check_targets(targets: torch.Tensor, num_classes: int) -> None:
    """Validate integer class labels.

    Args:
        targets: ``[B]`` integer tensor of class indices.
        num_classes: number of classes ``C``.

    Raises:
        ValueError: if ``targets`` is not 1-D integer, or any label lies outside ``[0, C)``;
            the message names the first offending label and its batch position.
    """
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D [B], got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer (long) tensor, got {targets.dtype}")
    if targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= num_classes)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"label {int(targets[idx])} at batch position {idx} is out of range [0, {num_classes})"
        )


class CrossEntropyLabelSmooth(nn.Module):
    """Cross entropy with label smoothing (Szegedy et al., CVPR 2016, Sec. 7).

    Implemented with :func:`torch.nn.functional.cross_entropy` and its ``label_smoothing``
    argument, which computes exactly ``(1 - eps) * CE + eps * mean_k(-log softmax(z)_k)``.

    Args:
        num_classes: number of identity classes ``C`` (> 0).
        epsilon: smoothing weight ``eps`` in ``[0, 1]``; 0 gives plain cross entropy.

    Forward:
        logits: ``[B, C]`` unnormalised class scores (float).
        targets: ``[B]`` long class indices in ``[0, C)``.
        returns: scalar loss (mean over the batch), in nats.

    Raises:
        ValueError: bad constructor arguments, ``logits`` not ``[B, C]``, batch-size mismatch,
            or a label outside ``[0, C)`` (the message names the label).
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.num_classes = int(num_classes)
        self.epsilon = float(epsilon)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must be [B, {self.num_classes}], got shape {tuple(logits.shape)}"
            )
        check_targets(targets, self.num_classes)
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(
                f"batch size mismatch: logits {logits.shape[0]} vs targets {targets.shape[0]}"
            )
        return F.cross_entropy(logits, targets.long(), label_smoothing=self.epsilon)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, epsilon={self.epsilon}"
