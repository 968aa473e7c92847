"""OSNet building blocks (Zhou, Yang, Cavallaro & Xiang, "Learning Generalisable Omni-Scale
Representations for Person Re-Identification", TPAMI 2021 -- OSNet / OSNet-AIN).

* :class:`LiteConv3x3` -- pointwise 1x1 then depthwise 3x3 ("Lite 3x3", Sec. 3.1, Fig. 3b).
* :class:`AggregationGate` -- the unified channel-wise aggregation gate G of Eq. (3): GAP -> FC
  (reduction 16) -> ReLU -> FC -> sigmoid, shared by the T streams.
* :class:`OSBlock` -- omni-scale residual bottleneck with T streams of t = 1..T stacked Lite 3x3
  (Eq. 2-3, Fig. 4b), and the instance-normalisation variants of the OSNet-AIN search space
  (Sec. 3.3, Fig. 5): ``in_in`` puts IN on the residual branch before the addition, ``in_out`` after
  the addition (IBN-Net style, "only adding IN after the residual"), ``in_in_out`` both.

These are plain ``nn.Module`` s: the search space uses them as candidates and the fixed networks are
built from the same classes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "InstanceNorm2d",
    "ConvBNReLU",
    "Conv1x1BN",
    "LiteConv3x3",
    "AggregationGate",
    "OSBlock",
    "OSResidual",
    "IN_VARIANTS",
    "Transition",
    "init_reid_weights",
]

#: IN placement of an OS block: value -> (IN on the residual branch, IN after the addition)
IN_VARIANTS = {
    "os": (False, False),
    "os_in_in": (True, False),
    "os_in_out": (False, True),
    "os_in_in_out": (True, True),
}


class InstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (Ulyanov et al., 2016: ``y = (x - mu_bc) / sqrt(var_bc + eps) * gamma_c + beta_c``,
    statistics per image and channel over H x W) computed on the CPU as a group norm with one group per channel,
    which is the same function (GroupNorm, Wu & He, ECCV 2018, Eq. 1 with G = C) and, measured with torch 2.14 on
    2 CPU cores, 1.2-3.9x faster forward + backward than ``F.instance_norm`` on OSNet x0.25's activations at
    256x128 (``benchmarks/bench_instance_norm.py``); outputs agree to 1e-5. A ``channels_last`` tensor stays in its
    format (group norm has a channels_last CPU kernel, where ``F.instance_norm`` returns the standard format and a
    channels_last network converts back and forth at every IN layer): an OSNet-AIN genotype and supernet then train
    faster in channels_last than in the standard format (``benchmarks/bench_cpu_epoch.py``). CUDA tensors, running
    statistics and ONNX export take ``nn.InstanceNorm2d``'s own path, so state dicts, exports and every other use
    are unchanged.

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dim() == 4 and not self.track_running_stats
                and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
                and not torch.onnx.is_in_onnx_export()):
            return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        return super().forward(x)


class ConvBNReLU(nn.Sequential):
    """k x k convolution (no bias) + BN (or affine IN when ``instance_norm``) + ReLU.

    Shapes: ``[B, C_in, H, W] -> [B, C_out, H/stride, W/stride]``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, instance_norm: bool = False):
        norm = InstanceNorm2d(out_ch, affine=True) if instance_norm else nn.BatchNorm2d(out_ch)
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False, groups=groups),
            norm,
            nn.ReLU(inplace=True),
        )


class Conv1x1BN(nn.Sequential):
    """1x1 convolution (no bias) + BN, no activation (the "linear" 1x1 of the bottleneck)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


class LiteConv3x3(nn.Sequential):
    """Lite 3x3 (OSNet Sec. 3.1, Fig. 3b): ReLU(BN(DW3x3(PW1x1(x)))), pointwise before depthwise.

    Parameters: ``(1 + 9/C_in) * C_in * C_out`` weights -- ``C_in*C_out + 9*C_out`` + BN.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False, groups=out_ch),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class AggregationGate(nn.Module):
    """Unified aggregation gate G (OSNet Eq. 3): channel-wise weights in (0, 1) from GAP + MLP.

    Shapes: ``[B, C, H, W] -> [B, C, H, W]`` (input scaled by ``sigmoid(MLP(GAP(x)))``).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.adaptive_avg_pool2d(x, 1)
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(g), inplace=True)))
        return x * g


class OSResidual(nn.Module):
    """The residual branch of an OS block, ``conv3(sum_t G(F^t(conv1(x))))`` (OSNet Eq. 2-3), and its
    shortcut (identity, or 1x1-BN projection when channels differ).

    Forward: ``[B, in_ch, H, W] -> (residual [B, out_ch, H, W], shortcut [B, out_ch, H, W], conv3 output before
    its BN [B, out_ch, H, W])``; with ``conv3_bn=False`` conv3 has no BN (torchreid's ``OSBlockINin``, whose IN
    replaces it) and the first and last entries are the same tensor.

    With ``memoize=True`` the last result is reused when called again on the *same* input tensor
    (same object, same version, same train/eval mode; a result computed with grad is also served, detached,
    to a no-grad call): the OSNet-AIN candidates that share one residual branch then compute it once per
    forward pass (see :class:`OSBlock`). :meth:`clear_cache` drops it.
    """

    def __init__(self, in_ch: int, out_ch: int, streams: int = 4, bottleneck_reduction: int = 4,
                 gate_reduction: int = 16, memoize: bool = False, conv3_bn: bool = True):
        super().__init__()
        mid = max(out_ch // bottleneck_reduction, 1)
        self.conv1 = ConvBNReLU(in_ch, mid, 1)
        self.streams = nn.ModuleList(
            nn.Sequential(*[LiteConv3x3(mid, mid) for _ in range(t)]) for t in range(1, streams + 1)
        )
        self.gate = AggregationGate(mid, gate_reduction)
        self.conv3 = Conv1x1BN(mid, out_ch) if conv3_bn else nn.Sequential(nn.Conv2d(mid, out_ch, 1, bias=False))
        self.downsample = Conv1x1BN(in_ch, out_ch) if in_ch != out_ch else None
        self.memoize = memoize
        self._cache: tuple | None = None

    def clear_cache(self) -> None:
        """Drop the memoised result (called by the space at the end of every forward pass)."""
        self._cache = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self._cache
        grad = torch.is_grad_enabled()
        if c is not None and c[0] is x and c[1] == x._version and c[3] == self.training:
            if c[2] == grad:
                return c[4]
            if not grad:  # a no-grad caller (e.g. a straight-through estimator's other candidates)
                return tuple(t.detach() for t in c[4])
        identity = x if self.downsample is None else self.downsample(x)
        h = self.conv1(x)
        res = None
        for stream in self.streams:
            s = self.gate(stream(h))
            res = s if res is None else res + s
        pre = self.conv3[0](res)
        out = (self.conv3[1](pre) if len(self.conv3) > 1 else pre, identity, pre)
        if self.memoize:
            self._cache = (x, x._version, grad, self.training, out)
        return out


class OSBlock(nn.Module):
    """Omni-scale residual block, optionally with instance normalisation (OSNet Eq. 1-3; AIN Fig. 5).

    ``y = ReLU(IN_out(x' + IN_in(conv3(sum_t G(F^t(conv1(x)))))))`` where ``F^t`` stacks t Lite 3x3,
    ``x'`` is ``x`` or a 1x1-BN projection when channels differ, and ``IN_in`` / ``IN_out`` are affine
    ``InstanceNorm2d`` present according to ``variant`` (see :data:`IN_VARIANTS`). ``conv3`` ends with a BN,
    except in an ``IN_in`` block built with ``in_in_bn=False`` (torchreid's ``OSBlockINin``: the IN replaces the BN;
    a shared residual branch keeps its BN for the other candidates, this block reads conv3's output before it).

    Args:
        in_ch, out_ch: channels; the bottleneck width is ``out_ch // 4``.
        variant: one of ``"os", "os_in_in", "os_in_out", "os_in_in_out"``.
        streams: T, the number of scales (4 in the paper: receptive fields 3, 5, 7, 9).
        residual: an existing :class:`OSResidual` to share (weight-sharing supernet: the four IN
            variants of one layer then differ only in their IN layers); a new one by default.
        in_affine: the IN layers learn a per-channel scale and shift (default, as the released OSNet-AIN);
            ``False``: plain IN (an ablation of the IN implementation).
        in_in_bn: with an ``IN_in`` layer, keep the BN of conv3 before it (default, this space's original
            ``os_in_in``); ``False``: no BN there, as torchreid's released OSNet-AIN (``OSBlockINin``).

    Shapes: ``[B, in_ch, H, W] -> [B, out_ch, H, W]``.

    Raises:
        ValueError: unknown ``variant``.
    """

    def __init__(self, in_ch: int, out_ch: int, variant: str = "os", streams: int = 4,
                 bottleneck_reduction: int = 4, gate_reduction: int = 16, residual: OSResidual | None = None,
                 in_affine: bool = True, in_in_bn: bool = True):
        super().__init__()
        if variant not in IN_VARIANTS:
            raise ValueError(f"unknown OS block variant {variant!r}; expected one of {list(IN_VARIANTS)}")
        self.variant = variant
        in_in, in_out = IN_VARIANTS[variant]
        self.skip_conv3_bn = in_in and not in_in_bn
        self.residual = residual if residual is not None else OSResidual(
            in_ch, out_ch, streams, bottleneck_reduction, gate_reduction, conv3_bn=not self.skip_conv3_bn)
        self.in_in = InstanceNorm2d(out_ch, affine=in_affine) if in_in else None
        self.in_out = InstanceNorm2d(out_ch, affine=in_affine) if in_out else None
        #: IN layers that stand where a plain OS block has a BN (``{IN child: that BN's path in a plain block}``):
        #: a warm start from a plain block folds the file's BN into the IN's calibration
        #: (:func:`~nasreid.models.pretrained.calibrate_instance_norms`)
        self.replaced_norms = {"in_in": "residual.conv3.1"} if self.skip_conv3_bn else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res, identity, pre_bn = self.residual(x)
        if self.skip_conv3_bn:
            res = pre_bn
        if self.in_in is not None:
            res = self.in_in(res)
        out = res + identity
        if self.in_out is not None:
            out = self.in_out(out)
        return F.relu(out, inplace=True)  # a fresh tensor, whose producer's backward does not read it

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"


class Transition(nn.Sequential):
    """Transition between stages (OSNet Table 1): 1x1 conv-BN-ReLU then 2x2 average pool, stride 2."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(ConvBNReLU(in_ch, out_ch, 1), nn.AvgPool2d(2, stride=2))


def init_reid_weights(module: nn.Module) -> None:
    """The weight initialisation of OSNet-style re-ID networks (torchreid / the MSINet code use the same):
    convolutions Kaiming-normal (``fan_out``, ReLU gain) with zero bias; affine BN / IN weight 1, bias 0;
    linear layers N(0, 0.01) with zero bias. Visits ``module.modules()`` in order (a fixed RNG order)."""
    for m in module.modules():
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
