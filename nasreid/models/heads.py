"""Re-ID embedding heads on top of a pooled backbone feature.

* ``"fc"`` -- OSNet's head (Zhou et al. TPAMI 2021, Table 1): Linear -> BN1d -> ReLU giving the
  ``feature_dim`` embedding, then a linear identity classifier.
* ``"bnneck"`` -- BNNeck (Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person Re-ID",
  CVPRW 2019, Sec. 4.4): the embedding ``f_t`` (used by the triplet loss) goes through a BN whose bias
  is frozen to give ``f_i``, used by the classifier (no bias) and at test time.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ReIDHead"]


class ReIDHead(nn.Module):
    """Embedding + identity classifier.

    Args:
        in_dim: channels of the pooled backbone feature.
        feature_dim: embedding size D (512 in OSNet).
        num_classes: training identities; 0 builds no classifier (feature extractor only).
        kind: ``"fc"`` or ``"bnneck"``.

    Forward: ``[B, in_dim] -> dict(feat=[B, D] (pre-BN for bnneck, for the triplet loss),
    feat_bn=[B, D] (bnneck only: the BN output f_i, batch statistics), logits=[B, num_classes])`` in
    training; ``[B, D]`` test-time features in eval mode.

    Raises:
        ValueError: unknown ``kind``.
    """

    def __init__(self, in_dim: int, feature_dim: int = 512, num_classes: int = 0, kind: str = "fc"):
        super().__init__()
        if kind not in ("fc", "bnneck"):
            raise ValueError(f"unknown head kind {kind!r}; expected 'fc' or 'bnneck'")
        self.kind = kind
        if kind == "fc":
            self.embed: nn.Module = nn.Sequential(nn.Linear(in_dim, feature_dim), nn.BatchNorm1d(feature_dim),
                                                  nn.ReLU(inplace=True))
            self.neck = None
            self.classifier = nn.Linear(feature_dim, num_classes) if num_classes > 0 else None
        else:
            self.embed = nn.Linear(in_dim, feature_dim) if feature_dim != in_dim else nn.Identity()
            self.neck = nn.BatchNorm1d(feature_dim)
            self.neck.bias.requires_grad_(False)
            self.classifier = nn.Linear(feature_dim, num_classes, bias=False) if num_classes > 0 else None
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor):
        f = self.embed(x)
        fi = self.neck(f) if self.neck is not None else f
        if not self.training:
            return fi
        out = {"feat": f}
        if self.neck is not None:
            out["feat_bn"] = fi
        if self.classifier is not None:
            out["logits"] = self.classifier(fi)
        return out
