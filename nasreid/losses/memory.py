"""Class memory with a contrastive loss: the twin memories C_tr / C_val of MSINet's Twins Contrastive
Mechanism (Gu et al., "MSINet: Twins Contrastive Search of Multi-Scale Interaction for Object ReID",
CVPR 2023, Sec. 3.1, Eq. 2-3; the memory form follows SpCL, Ge et al. NeurIPS 2020, ref. [17] there).

A :class:`ClassMemory` stores one L2-normalised feature ``c^n`` per class (``features [N_c, D]``, a buffer,
so it is checkpointed with its owner's ``state_dict``). For an embedded feature ``f`` of class ``j``:

* loss (Eq. 2):   ``L = -log( exp(f . c^j / tau) / sum_n exp(f . c^n / tau) )``, ``f`` L2-normalised,
  ``tau = 0.05``; averaged over the batch. Gradients flow into ``f`` only; the memory is not a parameter.
* update (Eq. 3): ``c^j <- beta * c^j + (1 - beta) * f`` then ``c^j <- c^j / ||c^j||`` (``beta = 0.2``), one
  sample after the other in batch order (a class seen k times in a batch is updated k times, as the
  authors' code does).

Initialisation: the paper initialises each ``c^n`` with the class centroid, "calculated by averaging the
features of each category" (:meth:`ClassMemory.init_centroids`); the authors' public code starts from zeros
(``init="zero"``; the first steps' loss is then ``log N_c``).

Since no linear classifier is involved, the classes of two memories need not be the same: that is what
unbinds the search-train and search-val identities in TCM.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ClassMemory"]


class ClassMemory(nn.Module):
    """One L2-normalised centroid per class with the contrastive loss of MSINet Eq. 2 and the momentum
    update of Eq. 3.

    Args:
        num_classes: N_c, classes of the split this memory serves (pids ``0..N_c-1``).
        dim: D, feature dimension (512 for MSINet at width 1).
        temperature: tau of Eq. 2 (0.05).
        momentum: beta of Eq. 3 (0.2: the memory keeps 20 % of its old value).

    Buffers: ``features [N_c, D]`` (float32), ``initialised`` (bool scalar).

    Raises:
        ValueError: non-positive sizes, ``temperature <= 0`` or ``momentum`` outside ``[0, 1)``.
    """

    features: torch.Tensor  # buffers (registered in __init__)
    initialised: torch.Tensor

    def __init__(self, num_classes: int, dim: int, temperature: float = 0.05, momentum: float = 0.2):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"ClassMemory needs num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
        if temperature <= 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"temperature must be > 0 and momentum in [0, 1), got {temperature}, {momentum}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.register_buffer("features", torch.zeros(num_classes, dim))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def init_centroids(self, feats: torch.Tensor, pids: torch.Tensor) -> None:
        """``c^n = normalise(mean of normalise(f) over the samples of class n)`` (Sec. 3.1).

        Args:
            feats: ``[M, D]`` features of the split's images; pids: ``[M]`` labels in ``[0, N_c)``.

        Raises:
            ValueError: shapes disagree, a label is out of range, or a class has no sample.
        """
        self._check(feats, pids)
        f = F.normalize(feats.float(), dim=1)
        sums = torch.zeros_like(self.features).index_add_(0, pids.to(self.features.device), f.to(self.features))
        counts = torch.bincount(pids.cpu(), minlength=self.num_classes)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"class(es) {empty[:5]} have no sample to initialise the memory from")
        self.features.copy_(F.normalize(sums, dim=1))
        self.initialised.fill_(True)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``normalise(f) . c^n / tau`` for every class: ``[B, D] -> [B, N_c]`` (the softmax argument of Eq. 2)."""
        return F.normalize(feats, dim=1) @ self.features.to(feats.dtype).t() / self.temperature

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        """Eq. 2 averaged over the batch: ``[B, D], [B] -> scalar`` (graph to ``feats`` only).

        Raises:
            ValueError: shapes disagree or a label is out of range.
        """
        self._check(feats, pids)
        return F.cross_entropy(self.logits(feats).float(), pids)

    @torch.no_grad()
    def update(self, feats: torch.Tensor, pids: torch.Tensor) -> None:
        """Eq. 3 for every sample in batch order: ``c^j <- normalise(beta c^j + (1 - beta) normalise(f))``."""
        self._check(feats, pids)
        f = F.normalize(feats.detach().float(), dim=1).to(self.features.device)
        b = self.momentum
        for x, y in zip(f, pids.tolist()):
            c = b * self.features[y] + (1.0 - b) * x
            self.features[y] = c / c.norm().clamp_min(1e-12)

    def _check(self, feats: torch.Tensor, pids: torch.Tensor) -> None:
        if feats.dim() != 2 or feats.shape[1] != self.dim or pids.shape != (feats.shape[0],):
            raise ValueError(f"ClassMemory expects feats [B, {self.dim}] and pids [B], got {tuple(feats.shape)} "
                             f"and {tuple(pids.shape)}")
        if pids.numel() and (int(pids.min()) < 0 or int(pids.max()) >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got range "
                             f"[{int(pids.min())}, {int(pids.max())}]")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, tau={self.temperature}, beta={self.momentum}"
