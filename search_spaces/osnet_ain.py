"""OSNet-AIN search space: instance-normalisation placement in the six OS blocks of OSNet.

Zhou, Yang, Cavallaro & Xiang, "Learning Generalisable Omni-Scale Representations for Person
Re-Identification", TPAMI 2021: Table 1 (architecture), Sec. 3.3 and Fig. 5 (search space Omega of four
OS blocks: OS, OS+IN_in, OS+IN_out, OS+IN_in-out), 4^6 = 4096 architectures.

Layout (input 256x128, width multiplier beta = 1): conv1 7x7/2 (64) -> 3x3 max pool/2 ->
conv2 [2 OS blocks, 256] -> transition (1x1 + 2x2 avg pool) -> conv3 [2 OS, 384] -> transition ->
conv4 [2 OS, 512] -> conv5 1x1 (512) -> GAP -> fc 512 (-> identity classifier).
Each OS block is a :class:`~nasreid.mutables.LayerChoice` labelled ``conv{2,3,4}_{1,2}``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nasreid.models.heads import ReIDHead
from nasreid.models.osnet import IN_VARIANTS, ConvBNReLU, OSBlock, OSResidual, Transition
from nasreid.mutables import LayerChoice, ModelSpace
from nasreid.registry import register_space

__all__ = ["OSNetAINSpace", "BLOCK_LABELS", "PRESET_GENOTYPES"]

BLOCK_LABELS = ("conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv4_1", "conv4_2")
BASE_CHANNELS = (64, 256, 384, 512)

#: Hand-designed and published architectures, expressed as genotypes of this space.
PRESET_GENOTYPES: dict[str, dict[str, Any]] = {
    # plain OSNet (Table 1, "OSNet" column)
    "osnet": {"choices": {k: "os" for k in BLOCK_LABELS}, "space_kwargs": {}},
    # OSNet-IBN, the paper's hand design (Sec. 4.2 "Search vs. Engineering"): IN in conv1 and conv2,
    # IBN-Net style (IN after the residual addition)
    "osnet_ibn": {
        "choices": {**{k: "os" for k in BLOCK_LABELS}, "conv2_1": "os_in_out", "conv2_2": "os_in_out"},
        "space_kwargs": {"conv1_in": True},
    },
    # OSNet-AIN as found by the paper's search (Table 1, "OSNet-AIN" column)
    "osnet_ain": {
        "choices": {
            "conv2_1": "os_in_in", "conv2_2": "os_in_in",
            "conv3_1": "os", "conv3_2": "os_in_in",
            "conv4_1": "os_in_in", "conv4_2": "os",
        },
        "space_kwargs": {},
    },
}


def _scale(c: int, beta: float) -> int:
    return max(int(round(c * beta)), 4)


@register_space("osnet_ain")
class OSNetAINSpace(ModelSpace):
    """OSNet supernet whose six OS blocks each choose among {os, os_in_in, os_in_out, os_in_in_out}.

    Args:
        num_classes: training identities for the classifier (0: feature extractor only).
        width_mult: beta, multiplies the channels (64, 256, 384, 512) (Sec. 3.4).
        feature_dim: embedding size D of the fc head (512).
        conv1_in: instance norm instead of BN in conv1 (used by the hand-designed OSNet-IBN).
        head: ``"fc"`` (OSNet) or ``"bnneck"``.
        streams: T, scales per OS block (4).
        share_weights: the four candidates of a layer share one residual branch (convolutions, gate,
            BN) and own only their IN layers, so the branch runs once per forward even in soft mode
            (:class:`~nasreid.models.osnet.OSResidual` memoises it). ``False`` gives four independent
            blocks per layer (Fig. 5 read literally; soft mode then costs about 4x per block).
            Fixed networks are identical either way.

    Forward: ``[B, 3, H, W]`` (H, W multiples of 16) -> training ``dict(feat=[B, D], logits=[B, C])``,
    eval ``[B, D]``.
    """

    space_name = "osnet_ain"

    def __init__(self, num_classes: int = 0, width_mult: float = 1.0, feature_dim: int = 512,
                 conv1_in: bool = False, head: str = "fc", streams: int = 4, share_weights: bool = True):
        super().__init__()
        c0, c1, c2, c3 = (_scale(c, width_mult) for c in BASE_CHANNELS)
        self.conv1 = ConvBNReLU(3, c0, 7, stride=2, padding=3, instance_norm=conv1_in)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        def choice(label: str, cin: int, cout: int) -> LayerChoice:
            shared = OSResidual(cin, cout, streams, memoize=True) if share_weights else None
            return LayerChoice({v: OSBlock(cin, cout, v, streams=streams, residual=shared) for v in IN_VARIANTS},
                               label=label)

        self.conv2 = nn.Sequential(choice("conv2_1", c0, c1), choice("conv2_2", c1, c1))
        self.trans2 = Transition(c1, c1)
        self.conv3 = nn.Sequential(choice("conv3_1", c1, c2), choice("conv3_2", c2, c2))
        self.trans3 = Transition(c2, c2)
        self.conv4 = nn.Sequential(choice("conv4_1", c2, c3), choice("conv4_2", c3, c3))
        self.conv5 = ConvBNReLU(c3, c3, 1)
        self.head = ReIDHead(c3, feature_dim, num_classes, kind=head)
        self.feature_dim = feature_dim
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.InstanceNorm2d)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map ``[B, 3, H, W] -> [B, C5, H/16, W/16]``."""
        x = self.maxpool(self.conv1(x))
        x = self.trans2(self.conv2(x))
        x = self.trans3(self.conv3(x))
        x = self.conv4(x)
        return self.conv5(x)

    def forward(self, x: torch.Tensor):
        try:
            f = F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)
        finally:
            for m in self.modules():  # drop memoised residual branches (see OSResidual)
                if isinstance(m, OSResidual) and m._cache is not None:
                    m.clear_cache()
        return self.head(f)
