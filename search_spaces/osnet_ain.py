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
from nasreid.models.interface import ReIDNetwork
from nasreid.models.osnet import (
    IN_VARIANTS,
    ConvBNReLU,
    OSBlock,
    OSResidual,
    Transition,
    init_reid_weights,
)
from nasreid.mutables import LayerChoice, ModelSpace, current_frozen_sample
from nasreid.registry import register_space

__all__ = ["OSNetAINSpace", "BLOCK_LABELS", "PRESET_GENOTYPES"]

BLOCK_LABELS = ("conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv4_1", "conv4_2")
BASE_CHANNELS = (64, 256, 384, 512)

#: Table 1 "OSNet-AIN" column of the paper: the block choices found by the search, shared by both
#: OSNet-AIN presets below.
_AIN_CHOICES = {
    "conv2_1": "os_in_in", "conv2_2": "os_in_in",
    "conv3_1": "os", "conv3_2": "os_in_in",
    "conv4_1": "os_in_in", "conv4_2": "os",
}

#: Hand-designed and published architectures, expressed as genotypes of this space.
PRESET_GENOTYPES: dict[str, dict[str, Any]] = {
    # plain OSNet (Table 1, "OSNet" column): no IN anywhere, conv1 with BN
    "osnet": {"choices": {k: "os" for k in BLOCK_LABELS}, "space_kwargs": {}},
    # OSNet-IBN, the paper's hand design (Sec. 4.2 "Search vs. Engineering": "we add IN only to the lowest
    # layers in OSNet (conv1 & conv2 as shown in Table 1)", mimicking IBN-Net): conv1 with IN instead of BN
    # and IN after the residual addition of both conv2 blocks; conv3 and conv4 plain. This is also what the
    # authors' released code builds (deep-person-reid, torchreid/models/osnet.py, osnet_ibn_x1_0: IN=True
    # reaches conv1 and the conv2 blocks, where OSBlock applies IN to x3 + identity before the ReLU).
    "osnet_ibn": {
        "choices": {**{k: "os" for k in BLOCK_LABELS}, "conv2_1": "os_in_out", "conv2_2": "os_in_out"},
        "space_kwargs": {"conv1_in": True},
    },
    # OSNet-AIN as printed in the paper (Table 1, "OSNet-AIN" column): the searched block choices, conv1
    # "7x7 conv, stride 2" with BN like OSNet (the table shows no IN in conv1, and the search space of
    # Sec. 3.3 / Fig. 5 covers only the six OS blocks). The committed baseline
    # results/cpu_retrain_preset_osnet_ain used this one.
    "osnet_ain": {"choices": dict(_AIN_CHOICES), "space_kwargs": {}},
    # OSNet-AIN as released by the authors (deep-person-reid, torchreid/models/osnet_ain.py, osnet_ain_x1_0):
    # the same block choices ([[OSBlockINin, OSBlockINin], [OSBlock, OSBlockINin], [OSBlockINin, OSBlock]])
    # plus conv1_IN=True, i.e. conv1 normalised by an affine IN instead of BN. One difference remains: the
    # released OSBlockINin drops the BN of the last 1x1 conv (IN replaces it), while this space's
    # ``os_in_in`` keeps conv3's BN before the IN (BN then IN on the same channels is redundant up to the
    # sign of BN's scale; it adds 2 * C parameters and running statistics per block).
    "osnet_ain_released": {"choices": dict(_AIN_CHOICES), "space_kwargs": {"conv1_in": True}},
    # torchreid's osnet_ain_x* exactly (deep-person-reid, torchreid/models/osnet_ain.py): the released choices,
    # conv1 with affine IN, and OSBlockINin's last 1x1 conv without BN (its IN replaces it). Its pool2/pool3
    # transitions (1x1 conv-BN-ReLU + 2x2 average pool) are this space's trans2/trans3. torchreid's files load
    # into it with every tensor placed (nasreid.models.torchreid).
    "osnet_ain_torchreid": {"choices": dict(_AIN_CHOICES), "space_kwargs": {"conv1_in": True, "in_in_bn": False}},
    # Ablations for the IN regression at CPU scale (issue: every IN variant halves same-domain mAP at 128x64,
    # width x0.25, from scratch). Not published designs. ``osnet_ain_shallow``: the paper's OSNet-AIN with IN
    # kept only where the maps are large (conv2, 32x16 at a 128x64 input), conv3/conv4 plain (their IN layers
    # normalise over 16x8 and 8x4 positions there); ``osnet_ain_plain_in``: the paper's choices with non-affine
    # IN layers (tests the affine IN of the implementation).
    "osnet_ain_shallow": {"choices": {**{k: "os" for k in BLOCK_LABELS}, "conv2_1": "os_in_in",
                                      "conv2_2": "os_in_in"}, "space_kwargs": {}},
    "osnet_ain_plain_in": {"choices": dict(_AIN_CHOICES), "space_kwargs": {"in_affine": False}},
}


def _scale(c: int, beta: float) -> int:
    return max(int(round(c * beta)), 4)


@register_space("osnet_ain", presets=PRESET_GENOTYPES)
class OSNetAINSpace(ModelSpace, ReIDNetwork):
    """OSNet supernet whose six OS blocks each choose among {os, os_in_in, os_in_out, os_in_in_out}.

    Zhou, Yang, Cavallaro & Xiang, TPAMI 2021: Table 1 (layout), Sec. 3.3 and Fig. 5 (search space).

    **Weight sharing is a deviation from the paper (default on).** In Fig. 5 the four candidates of a
    layer are four independent OS blocks, each with its own convolutions, gate and BN. With
    ``share_weights=True`` (the default) the four candidates of a layer share *one* residual branch
    (1x1 convs, Lite 3x3 streams, aggregation gate, BN, shortcut projection) and own only their IN layers,
    so the supernet has about a quarter of the OS-block parameters of Fig. 5, a step through any candidate
    updates the branch of all four, and the shared branch runs once per forward even in soft mode
    (:class:`~nasreid.models.osnet.OSResidual` memoises it). ``share_weights=False`` builds Fig. 5 as
    printed: four independent blocks per layer (about 4x the OS-block parameters; soft mode then costs
    about 4x per block). Either way, freezing a genotype gives the same fixed network: same modules,
    state_dict keys and shapes, and the same initial weights for the same torch RNG state at the
    :func:`~nasreid.mutables.freeze` call (:meth:`~nasreid.genotype.Genotype.build` builds the supernet
    first, which draws more random numbers when unshared). :func:`~nasreid.mutables.freeze` with
    ``copy_weights`` takes the chosen candidate's own weights in both cases.

    Args:
        num_classes: training identities for the classifier (0: feature extractor only).
        width_mult: beta, multiplies the channels (64, 256, 384, 512) (Sec. 3.4).
        feature_dim: embedding size D of the fc head (512).
        conv1_in: affine instance norm instead of BN in conv1 (the hand-designed OSNet-IBN of Sec. 4.2,
            and the authors' released OSNet-AIN, ``conv1_IN=True``; Table 1 prints conv1 with BN).
        head: ``"fc"`` (OSNet) or ``"bnneck"``.
        streams: T, scales per OS block (4).
        share_weights: ``True`` (default): the four candidates of a layer share one residual branch
            and own only their IN layers (a deviation from Fig. 5, see above). ``False``: four
            independent blocks per layer, as in Fig. 5.
        in_affine: affine IN layers in the OS blocks (default, as released); ``False``: plain IN.
        in_in_bn: ``os_in_in`` blocks keep the BN of their last 1x1 conv before the IN (default); ``False``: no
            BN there, as torchreid's ``OSBlockINin`` (preset ``osnet_ain_torchreid``).

    Forward: ``[B, 3, H, W]`` (H, W multiples of 16) -> training ``dict(feat=[B, D], logits=[B, C])``,
    eval ``[B, D]``.
    """

    space_name = "osnet_ain"
    default_match_stage = "conv4"  # QAConv: the 1/16 map before conv5 (ResNet layer3's place, Sec. 5.1)

    def __init__(self, num_classes: int = 0, width_mult: float = 1.0, feature_dim: int = 512,
                 conv1_in: bool = False, head: str = "fc", streams: int = 4, share_weights: bool = True,
                 in_affine: bool = True, in_in_bn: bool = True):
        super().__init__()
        c0, c1, c2, c3 = (_scale(c, width_mult) for c in BASE_CHANNELS)
        self.conv1 = ConvBNReLU(3, c0, 7, stride=2, padding=3, instance_norm=conv1_in)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        def choice(label: str, cin: int, cout: int) -> LayerChoice:
            frozen = (current_frozen_sample() or {}).get(label)
            if isinstance(frozen, str) and frozen in IN_VARIANTS:
                # building a fixed network (freeze / Genotype.build): only the chosen block, with its own
                # non-memoising residual branch, whatever share_weights says -- so both settings give the
                # same modules and draw the same random numbers (same initial weights from one seed)
                return LayerChoice({frozen: OSBlock(cin, cout, frozen, streams=streams, in_affine=in_affine,
                                                    in_in_bn=in_in_bn)},
                                   label=label)
            shared = OSResidual(cin, cout, streams, memoize=True) if share_weights else None
            return LayerChoice({v: OSBlock(cin, cout, v, streams=streams, residual=shared, in_affine=in_affine,
                                           in_in_bn=in_in_bn)
                                for v in IN_VARIANTS}, label=label)

        self.conv2 = nn.Sequential(choice("conv2_1", c0, c1), choice("conv2_2", c1, c1))
        self.trans2 = Transition(c1, c1)
        self.conv3 = nn.Sequential(choice("conv3_1", c1, c2), choice("conv3_2", c2, c2))
        self.trans3 = Transition(c2, c2)
        self.conv4 = nn.Sequential(choice("conv4_1", c2, c3), choice("conv4_2", c3, c3))
        self.conv5 = ConvBNReLU(c3, c3, 1)
        self.head = ReIDHead(c3, feature_dim, num_classes, kind=head)
        self.feature_dim = feature_dim
        self.feature_info = [{"module": m, "num_chs": c, "reduction": r} for m, c, r in (
            ("conv1", c0, 2), ("maxpool", c0, 4), ("conv2", c1, 4), ("trans2", c1, 8), ("conv3", c2, 8),
            ("trans3", c2, 16), ("conv4", c3, 16), ("conv5", c3, 16))]
        self._init_weights()

    def _init_weights(self) -> None:
        init_reid_weights(self)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """conv1, maxpool, conv2, trans2, conv3, trans3, conv4, conv5 (Table 1), see :attr:`feature_info`."""
        return [(f["module"], getattr(self, f["module"])) for f in self.feature_info]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map ``[B, 3, H, W] -> [B, C5, H/16, W/16]`` (the chain of :meth:`stages`)."""
        x = self.maxpool(self.conv1(x))
        x = self.trans2(self.conv2(x))
        x = self.trans3(self.conv3(x))
        x = self.conv4(x)
        return self.conv5(x)

    def forward_intermediates(self, x: torch.Tensor, stop_at: str | None = None) -> dict[str, torch.Tensor]:
        """Maps of the stages up to ``stop_at`` (:meth:`ReIDNetwork.forward_intermediates`); a supernet's
        memoised residual branches are dropped afterwards, as in :meth:`forward`."""
        try:
            return super().forward_intermediates(x, stop_at)
        finally:
            self._clear_caches()

    def _clear_caches(self) -> None:
        for m in self.modules():  # drop memoised residual branches (see OSResidual)
            if isinstance(m, OSResidual) and m._cache is not None:
                m.clear_cache()

    def forward(self, x: torch.Tensor):
        try:
            f = F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)
        finally:
            self._clear_caches()
        return self.head(f)
