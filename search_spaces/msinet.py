"""MSINet search space: the interaction operations of the twelve Interaction Modules of MSINet.

Gu, Wang, Luo, Chen, Jiang, Fang, Zhang, You & Zhao, "MSINet: Twins Contrastive Search of Multi-Scale Interaction for
Object ReID", CVPR 2023: Sec. 3.2 (Multi-Scale Interaction space), Fig. 2 (layout), Table 1 (searched
architecture), Fig. 5(c) (fusion ablation), Fig. 5(d) (scale ratio rho). Cross-checked against the authors'
public code (github.com/vimar-gu/MSINet: ``reid/models/msinet.py``, ``operations.py``, ``search_cnn.py``).
Space version 1.

Layout (input ``[B, 3, H, W]``, H and W multiples of 16, e.g. 256x128; channels ``(64, 256, 384, 512)``
times ``width_mult``)::

    conv1 7x7/2 (64) + BN + ReLU -> 3x3 max pool/2                               (the OSNet stem)
    stage1 = [MSI cell(64 -> 256), MSI cell(256 -> 256)]   -> trans1 (1x1 conv-BN-ReLU, 2x2 avg pool/2)
    stage2 = [MSI cell(256 -> 384), MSI cell(384 -> 384)]  -> trans2 (1x1 conv-BN-ReLU, 2x2 avg pool/2)
    stage3 = [MSI cell(384 -> 512), MSI cell(512 -> 512)]  -> featmap [B, 512, H/16, W/16]
    GAP -> feat [B, 512] -> BNNeck (BN with frozen bias; classifier without bias)

MSI cell (``in -> out``, bottleneck ``mid = out // 4``; Sec. 3.2, Fig. 2)::

    a = ReLU(BN(conv1x1_a(x)))              b = ReLU(BN(conv1x1_b(x)))           (in -> mid each)
    a = Lite3x3(a)                          b = Lite3x3^rho(b)                   (level 2)
    (a, b) = IM1(a, b)                                                          (interaction 1)
    a = Lite3x3(a)                          b = Lite3x3^rho(b)                   (level 3)
    (a, b) = IM2(a, b)                                                          (interaction 2)
    y = ReLU(fuse(BN(conv1x1(a)), BN(conv1x1(b))) + shortcut(x))                 (mid -> out)

``Lite3x3`` is OSNet's pointwise 1x1 + depthwise 3x3 + BN + ReLU; ``Lite3x3^rho`` stacks ``rho`` of them
(``scale_ratio``, rho = 3 gives the paper's scale ratio 3:1); ``fuse`` is a sum (the paper), a difference
``a - b`` ("Minus", Fig. 5(c)) or a product ``a * b`` ("Mul"); ``shortcut`` is the identity or a 1x1-BN
projection when ``in != out``. The two branches share no parameters except the Interaction Modules.

Each Interaction Module is a :class:`~nasreid.mutables.LayerChoice` labelled ``cell{k}_im{j}``
(k = 1..6 in forward order, j = 1, 2) among :data:`OPS` = ``("none", "exchange", "gate", "attention")``
(Sec. 3.2: None, Exchange, Channel Gate Eq. 4, Cross Attention): 4^12 = 16,777,216 architectures. Each
candidate maps one argument, the tuple ``(x1 [B, C, H, W], x2 [B, C, H, W])``, to a tuple of the same
shapes; a strategy's mixed op calls ``candidate(xs)`` and sums the outputs element-wise over the tuple.

Outputs: training mode ``dict(feat=[B, D_g], feat_bn=[B, D_g], logits=[B, num_classes], featmap=[B, D_g, h, w])``
(``feat_bn`` the BNNeck output with batch statistics), plus
``feat_local=[B, local_dim], logits_local=[B, num_classes]`` with ``local_branch=True`` (``logits`` keys only
when ``num_classes > 0``). ``feat`` / ``feat_local`` are the pre-neck GAP features (for the triplet and
memory losses), ``featmap`` the last feature map (for the Spatial Alignment loss of Sec. 3.3). Eval mode:
one tensor ``[B, D]`` -- the global BNNeck feature, concatenated with the local BNNeck feature when
``local_branch`` (``D = 512`` or ``512 + 256`` at width 1). ``D_g = 512 * width_mult``.

Deviations from the authors' code (all deliberate, listed so results can be compared):

* **Test feature.** The authors' retrained MSINet returns the *pre-neck* GAP features at test time
  (``torch.cat((v, f_v))``, unless ``test_transfer``); ours is the BNNeck output (as ``ReIDHead`` does for
  every nasreid space). ``feat`` in training mode is their ``v``.
* **No extra fc before the neck.** Their retrained head is ``BN(fc(v))`` with a bias-free 512x512 ``fc``
  (and 256x256 ``f_fc`` in the local branch) and classifiers *with* bias; ours is the plain BNNeck of
  Luo et al. 2019 (BN directly on the GAP feature, classifier without bias), as in their *search* network.
  Their fc adds 512*512 + 256*256 = 327,680 parameters.
* **Local branch optional.** Their retrained net always has the two-stripe local branch (1x1 conv with bias
  384 -> 128 on the output of the second transition, upper/lower halves GAP-pooled and concatenated to
  256-d); here it is ``local_branch=True`` (default off, as in their search network).
* **Search width.** Their search network uses ``mid = in // 4`` in every cell, so the first cell of each
  stage is narrower than in the retrained child (stage 1: 16 instead of 64). ``search_width="authors"``
  reproduces that; the default ``"child"`` uses ``mid = out // 4`` as the retrained net, so freezing the
  supernet gives exactly the network that is retrained.
* **Candidate order.** Their search code orders the candidates ``none, ag, cross_att, exc``; ours is
  ``none, exchange, gate, attention`` (only the order of the architecture weights differs).
* ``gate_reduction`` hidden width is ``max(C // r, 1)`` (theirs ``C // r``, equal at width >= 0.25).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nasreid.models.heads import ReIDHead
from nasreid.models.interface import ReIDNetwork
from nasreid.models.osnet import (
    AggregationGate,
    Conv1x1BN,
    ConvBNReLU,
    LiteConv3x3,
    Transition,
    init_reid_weights,
)
from nasreid.mutables import LayerChoice, ModelSpace, current_frozen_sample
from nasreid.registry import register_space

__all__ = [
    "BASE_CHANNELS",
    "CHOICE_LABELS",
    "FUSIONS",
    "OPS",
    "PRESET_GENOTYPES",
    "SEARCH_WIDTHS",
    "ChannelGate",
    "CrossAttention",
    "Exchange",
    "MSICell",
    "MSINetSpace",
    "NoInteraction",
    "interaction_choice",
]

#: Interaction operations (Sec. 3.2), in LayerChoice order; the first is what an unsearched space runs.
OPS = ("none", "exchange", "gate", "attention")
#: Labels of the twelve Interaction Modules: ``cell{k}_im{j}``, cell k = 1..6 in forward order, j = 1, 2.
CHOICE_LABELS = tuple(f"cell{k}_im{j}" for k in range(1, 7) for j in (1, 2))
#: Channels of the stem and of stages 1-3 at width 1.
BASE_CHANNELS = (64, 256, 384, 512)
#: Fusion of the two branches after the last interaction (Fig. 5(c)): sum (paper), a - b, a * b.
FUSIONS = ("sum", "sub", "mul")
#: Bottleneck width rule: "child" (mid = out // 4, retrained net) or "authors" (mid = in // 4, their search net).
SEARCH_WIDTHS = ("child", "authors")

_TABLE1 = ("gate", "gate", "exchange", "gate", "attention", "gate",
           "gate", "none", "gate", "attention", "exchange", "attention")

#: Published and single-operation architectures as genotypes of this space.
PRESET_GENOTYPES: dict[str, dict[str, Any]] = {
    # Table 1 (searched on MSMT17): cells 1..6 = (G,G) (E,G) (A,G) (G,N) (G,A) (E,A); the authors' code lists
    # the same twelve ops (operations.py, genotype_factory["msmt"]).
    "msinet_paper": {"choices": dict(zip(CHOICE_LABELS, _TABLE1)), "space_kwargs": {}},
    # Fig. 5(b): "4 models each with a unique interaction operation from the 4 options"
    **{f"msinet_{op}": {"choices": {k: op for k in CHOICE_LABELS}, "space_kwargs": {}} for op in OPS},
}


def _scale(c: int, beta: float) -> int:
    return max(round(c * beta), 4)


# ---------------------------------------------------------------------------------------------------------
# Interaction operations: (x1 [B, C, H, W], x2 [B, C, H, W]) -> tuple of the same shapes
# ---------------------------------------------------------------------------------------------------------
class NoInteraction(nn.Module):
    """None (Sec. 3.2): no parameters, returns the input pair unchanged, ``(x1, x2)`` (the same tensors).

    Forward: ``(x1, x2)`` each ``[B, C, H, W]`` -> ``(x1, x2)``.
    """

    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = xs
        return x1, x2


class Exchange(nn.Module):
    """Exchange (Sec. 3.2): no parameters, swaps the branches, ``(x1, x2) -> (x2, x1)``.

    Forward: ``(x1, x2)`` each ``[B, C, H, W]`` -> ``(x2, x1)``.
    """

    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = xs
        return x2, x1


class ChannelGate(nn.Module):
    """Channel Gate (Sec. 3.2, Eq. 4): ``G(x) = sigmoid(MLP(GAP(x)))``, returns ``(G(x1)*x1, G(x2)*x2)``.

    The MLP (1x1 conv ``C -> max(C // reduction, 1)`` with bias, ReLU, 1x1 conv back to ``C`` with bias) is
    *one* module shared by both branches ("its parameters are shared for both branches"), the OSNet
    aggregation gate :class:`~nasreid.models.osnet.AggregationGate`.

    Args:
        channels: C, channels of each branch.
        reduction: r of the hidden width ``max(C // r, 1)`` (16).

    Forward: ``(x1, x2)`` each ``[B, C, H, W]`` -> ``(x1 * G(x1), x2 * G(x2))``, gates ``[B, C, 1, 1]``.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.gate = AggregationGate(channels, reduction)

    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = xs
        return self.gate(x1), self.gate(x2)


class CrossAttention(nn.Module):
    """Cross Attention (Sec. 3.2): channel attention whose *key* comes from the other branch.

    With ``X_a, X_b`` the branches reshaped to ``[B, C, N]`` (``N = H * W``), the DANet channel-attention
    form used by the authors::

        E_a = X_a X_b^T                      E_b = X_b X_a^T                     ([B, C, C])
        A_a = softmax(rowmax(E_a) - E_a)     A_b = softmax(rowmax(E_b) - E_b)    (over the last dim)
        y_a = gamma * (A_a X_a) + x_a        y_b = gamma * (A_b X_b) + x_b

    ``gamma`` is one learnable scalar of the module, initialised to 0 (the module starts as the identity)
    and shared by both branches. No other parameters.

    Forward: ``(x_a, x_b)`` each ``[B, C, H, W]`` -> ``(y_a, y_b)`` of the same shapes.
    """

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        energy = torch.bmm(q, k.transpose(1, 2))                       # [B, C, C]
        energy = energy.amax(dim=-1, keepdim=True) - energy
        return torch.bmm(F.softmax(energy, dim=-1), q)                 # [B, C, N], value = query branch

    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        xa, xb = xs
        b, c, h, w = xa.shape
        qa, qb = xa.reshape(b, c, h * w), xb.reshape(b, c, h * w)
        ya = self.gamma * self._attend(qa, qb).view(b, c, h, w) + xa
        yb = self.gamma * self._attend(qb, qa).view(b, c, h, w) + xb
        return ya, yb


_OP_FACTORIES: dict[str, Callable[[int, int], nn.Module]] = {
    "none": lambda c, r: NoInteraction(),
    "exchange": lambda c, r: Exchange(),
    "gate": lambda c, r: ChannelGate(c, r),
    "attention": lambda c, r: CrossAttention(),
}


def interaction_choice(label: str, channels: int, gate_reduction: int = 16) -> LayerChoice:
    """The Interaction Module ``label``: a :class:`LayerChoice` over :data:`OPS` on ``channels`` per branch.

    Inside a :func:`~nasreid.mutables.frozen_context` holding ``label`` only the chosen candidate is
    constructed (and returned, as ``LayerChoice`` does), so a fixed network's modules and random
    initialisation do not depend on the unused candidates.

    Forward of the choice (and of every candidate): ``(x1, x2)`` each ``[B, channels, H, W]`` -> same.
    """
    frozen = (current_frozen_sample() or {}).get(label)
    if isinstance(frozen, str) and frozen in _OP_FACTORIES:
        return LayerChoice({frozen: _OP_FACTORIES[frozen](channels, gate_reduction)}, label=label)
    return LayerChoice({op: _OP_FACTORIES[op](channels, gate_reduction) for op in OPS}, label=label)


class MSICell(nn.Module):
    """Multi-Scale Interaction cell (Sec. 3.2, Fig. 2; see the module docstring for the equations).

    Args:
        in_ch, out_ch: input and output channels.
        mid_ch: bottleneck width of both branches (``out_ch // 4`` in the retrained net).
        labels: labels of the two Interaction Modules, ``(cell{k}_im1, cell{k}_im2)``.
        scale_ratio: rho, stacked Lite 3x3 per level in branch b (branch a has one per level), i.e. the
            paper's scale ratio rho:1 between the branches (3).
        fusion: ``"sum"`` (paper), ``"sub"`` (``a - b``) or ``"mul"`` (``a * b``) (Fig. 5(c)).
        gate_reduction: reduction of the Channel Gate MLP (16).

    Shapes: ``[B, in_ch, H, W] -> [B, out_ch, H, W]``.
    """

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int, labels: tuple[str, str], scale_ratio: int = 3,
                 fusion: str = "sum", gate_reduction: int = 16):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        self.fusion = fusion
        self.conv1a = ConvBNReLU(in_ch, mid_ch, 1)
        self.conv1b = ConvBNReLU(in_ch, mid_ch, 1)
        self.conv2a = LiteConv3x3(mid_ch, mid_ch)
        self.conv2b = nn.Sequential(*[LiteConv3x3(mid_ch, mid_ch) for _ in range(scale_ratio)])
        self.im1 = interaction_choice(labels[0], mid_ch, gate_reduction)
        self.conv3a = LiteConv3x3(mid_ch, mid_ch)
        self.conv3b = nn.Sequential(*[LiteConv3x3(mid_ch, mid_ch) for _ in range(scale_ratio)])
        self.im2 = interaction_choice(labels[1], mid_ch, gate_reduction)
        self.conv4a = Conv1x1BN(mid_ch, out_ch)
        self.conv4b = Conv1x1BN(mid_ch, out_ch)
        self.downsample = Conv1x1BN(in_ch, out_ch) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        a, b = self.conv2a(self.conv1a(x)), self.conv2b(self.conv1b(x))
        a, b = self.im1((a, b))
        a, b = self.conv3a(a), self.conv3b(b)
        a, b = self.im2((a, b))
        a, b = self.conv4a(a), self.conv4b(b)
        if self.fusion == "sum":
            y = a + b
        elif self.fusion == "sub":
            y = a - b
        else:
            y = a * b
        return F.relu(y + identity)

    def extra_repr(self) -> str:
        return f"fusion={self.fusion!r}"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@register_space("msinet", presets=PRESET_GENOTYPES)
class MSINetSpace(ModelSpace, ReIDNetwork):
    """MSINet supernet: twelve Interaction Modules, each choosing among :data:`OPS` (Gu et al. CVPR 2023).

    Args:
        num_classes: training identities for the classifier(s) (0: feature extractor only).
        width_mult: multiplies the channels (64, 256, 384, 512) (> 0).
        scale_ratio: rho, Lite 3x3 per level in branch b (branch a has 1); 3 is the paper's 3:1 (Fig. 5(d)).
        fusion: ``"sum"`` (paper), ``"sub"`` or ``"mul"`` fusion of the two branches (Fig. 5(c)).
        search_width: ``"child"`` (``mid = out // 4`` in every cell, the retrained net; default) or
            ``"authors"`` (``mid = in // 4``, the authors' search network: narrower first cell per stage).
        local_branch: add the authors' two-stripe local branch (1x1 conv with bias on the output of the
            second transition to ``local_dim // 2`` channels, upper / lower halves GAP-pooled and
            concatenated, own BNNeck and classifier).
        local_dim: size of the local feature (256; even). Not scaled by ``width_mult``.
        gate_reduction: reduction of the Channel Gate MLP (16).

    Forward: ``[B, 3, H, W]`` (H, W multiples of 16) -> training ``dict(feat=[B, C3], logits=[B, K],
    featmap=[B, C3, H/16, W/16])`` (+ ``feat_local=[B, local_dim], logits_local=[B, K]`` with the local
    branch; logits only when ``num_classes > 0``), eval ``[B, feature_dim]`` with
    ``feature_dim = C3 (+ local_dim)``, ``C3 = 512 * width_mult``.

    Raises:
        ValueError: an invalid keyword argument (the message names it and the allowed values).
    """

    space_name = "msinet"
    head_prefixes = ("head", "local_conv", "local_head")
    default_match_stage = "stage3"  # QAConv: the last 1/16 map

    def __init__(self, num_classes: int = 0, width_mult: float = 1.0, scale_ratio: int = 3, fusion: str = "sum",
                 search_width: str = "child", local_branch: bool = False, local_dim: int = 256,
                 gate_reduction: int = 16):
        super().__init__()
        _check_int("num_classes", num_classes, 0)
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"width_mult must be a number > 0, got {width_mult!r}")
        _check_int("scale_ratio", scale_ratio, 1)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        if search_width not in SEARCH_WIDTHS:
            raise ValueError(f"search_width must be one of {list(SEARCH_WIDTHS)}, got {search_width!r}")
        if not isinstance(local_branch, bool):
            raise ValueError(f"local_branch must be True or False, got {local_branch!r}")  # noqa: TRY004
        _check_int("local_dim", local_dim, 2)
        if local_dim % 2:
            raise ValueError(f"local_dim must be even (two stripes of local_dim // 2), got {local_dim!r}")
        _check_int("gate_reduction", gate_reduction, 1)

        c0, c1, c2, c3 = (_scale(c, width_mult) for c in BASE_CHANNELS)
        self.channels = (c0, c1, c2, c3)
        self.conv1 = ConvBNReLU(3, c0, 7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        labels = iter(zip(CHOICE_LABELS[0::2], CHOICE_LABELS[1::2]))

        def cell(cin: int, cout: int) -> MSICell:
            mid = max((cout if search_width == "child" else cin) // 4, 1)
            return MSICell(cin, cout, mid, next(labels), scale_ratio=scale_ratio, fusion=fusion,
                           gate_reduction=gate_reduction)

        self.stage1 = nn.Sequential(cell(c0, c1), cell(c1, c1))
        self.trans1 = Transition(c1, c1)
        self.stage2 = nn.Sequential(cell(c1, c2), cell(c2, c2))
        self.trans2 = Transition(c2, c2)
        self.stage3 = nn.Sequential(cell(c2, c3), cell(c3, c3))
        self.head = ReIDHead(c3, c3, num_classes, kind="bnneck")
        self.local_branch = local_branch
        if local_branch:
            self.local_conv = nn.Conv2d(c2, local_dim // 2, 1, bias=True)
            self.local_head = ReIDHead(local_dim, local_dim, num_classes, kind="bnneck")
        self.feature_dim = c3 + (local_dim if local_branch else 0)
        self.feature_info = [{"module": m, "num_chs": c, "reduction": r} for m, c, r in (
            ("conv1", c0, 2), ("maxpool", c0, 4), ("stage1", c1, 4), ("trans1", c1, 8), ("stage2", c2, 8),
            ("trans2", c2, 16), ("stage3", c3, 16))]
        self._init_weights()

    def _init_weights(self) -> None:
        init_reid_weights(self)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """conv1, maxpool, stage1, trans1, stage2, trans2, stage3 (Table 1), see :attr:`feature_info`."""
        return [(f["module"], getattr(self, f["module"])) for f in self.feature_info]

    def features_and_mid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W] -> (featmap [B, C3, H/16, W/16], stage-3 input [B, C2, H/16, W/16])`` (the local
        branch reads the second)."""
        maps = self.forward_intermediates(x, stop_at="stage3")
        return maps["stage3"], maps["trans2"]

    def forward(self, x: torch.Tensor):
        featmap, mid = self.features_and_mid(x)
        g = self.head(F.adaptive_avg_pool2d(featmap, 1).flatten(1))
        loc = None
        if self.local_branch:
            m = self.local_conv(mid)
            h = m.shape[2] // 2
            if h == 0:
                raise ValueError(f"local_branch needs an input height >= 32 (two stripes), got {x.shape[2]}")
            f_loc = torch.cat([F.adaptive_avg_pool2d(m[:, :, :h], 1).flatten(1),
                               F.adaptive_avg_pool2d(m[:, :, h:], 1).flatten(1)], dim=1)
            loc = self.local_head(f_loc)
        if not self.training:
            return g if loc is None else torch.cat([g, loc], dim=1)
        out = dict(g)
        out["featmap"] = featmap
        if loc is not None:
            out["feat_local"] = loc["feat"]
            if "logits" in loc:
                out["logits_local"] = loc["logits"]
        return out
