"""RMGL search space: receptive partition depth, branches, stripes per branch, ABP and the RSA settings.

Reference: G. Wang, Y. Yuan, J. Li, S. Ge, X. Zhou, "Receptive Multi-granularity Representation for Person
Re-Identification", IEEE Transactions on Image Processing 29, 2020: Sec. III-A (framework, Eq. 1, Fig. 2),
Sec. III-B (receptive partition, Eq. 5-7, Fig. 3b), Sec. III-C (activation balanced pooling, Eq. 8-11),
Sec. III-D (random shifting augmentation), Sec. IV-A (implementation), Sec. IV-D and Table V (ablations:
2 / 3 / 2+3 stripes, RP, ABP, RSA, RMGL(1+2+3), RMGL(2+3+4)).

The authors released no code; this space is a re-implementation from the paper. The building blocks
(receptive partition, activation balanced pooling, the dual-path branch) are in :mod:`nasreid.models.rmgl`.

Layout (Fig. 2): a shared trunk, then ``num_branches`` independent branches, each a copy of the rest of the
backbone split into three stages ``s2, s3, s4`` with weights of its own::

    resnet50 (torchvision, weights=None):  trunk = conv1, bn1, relu, maxpool, layer1 (res_conv2)
                                           s2 = layer2, s3 = layer3, s4 = layer4 (stride last_stride)
    osnet (channels (64, 256, 384, 512) x width_mult, plain "os" blocks):
                                           trunk = conv1 7x7/2 + max pool + conv2 (2 OS blocks) + transition
                                           s2 = conv3 (2 OS blocks) + transition, s3 = conv4 (2 OS blocks),
                                           s4 = conv5 (1x1 conv-BN-ReLU)

Pretrained OSNet (``backbone="osnet"``): torchreid's plain OSNet files (``osnet_x1_0`` .. ``osnet_x0_25``, e.g. the
MSMT17 ``osnet_x0_25_msmt17.pth``) load through ``model.pretrained`` (exactly, or ``model.warm_start``) at the file's
``width_mult``: its weights format names the keys as the ``osnet_ain`` space's preset ``osnet``
(:func:`nasreid.models.torchreid.to_nasreid`), then :meth:`RMGLSpace.pretrained_places` puts conv1, conv2 and its
transition into ``trunk`` and conv3 + transition, conv4, conv5 into *every* branch's ``stages.0/1/2`` (each its own
copy, :data:`OSNET_PLACES`); the file's ``fc`` / ``classifier`` are dropped, the reductions and classifiers stay at
their initialisation. The paper fine-tunes an ImageNet-pretrained backbone (Sec. IV-A) whose later stages every
branch copies (Sec. III-A); OSNet's stages are Table 1 of Zhou et al., ICCV 2019.

Branch ``b`` has ``n_b`` stripes. Its original path pools the output map into a global feature (GMP,
``k = 0``) and ``n_b`` uniform stripe features (max pooling). With receptive partition (``rp_depth`` not
``"off"``) the *input* of the chosen stage is cut into ``n_b`` horizontal stripes that run through the
remaining stages of the same branch as separate images (RP path, shared weights), giving another global
feature (maximum over all stripes) and ``n_b`` stripe features. ``"stage2"`` partitions the trunk output,
i.e. after ``res_conv2c`` -- the paper's setting (Sec. IV-A/D). With the osnet backbone ``"stage4"`` is the
input of the 1x1 conv5, so its RP path sees no spatial context and equals output partition followed by a
1x1 convolution. Every pooled feature has its own 1x1 conv + BN reduction to ``reduce_dim`` (256) and its
own identity classifier.

Outputs. Training mode: ``dict(feat=[B, D], feat_branches=[[B, D_b], ...], logits_list=[[B, K], ...],
logits=[B, K])`` -- ``feat`` the concatenation of all reduced features (Eq. 1: branch by branch; in a
branch the original path ``k = 0..n_b`` then the RP path ``k = 0..n_b``), ``feat_branches[b]`` branch
``b``'s part of it (its triplet loss, Eq. 3), ``logits_list`` one per reduced feature in the same order
(Eq. 2), ``logits`` the first of them (for accuracy logging); the ``logits`` keys only when
``num_classes > 0``. Eval mode: ``[B, D]``, the same concatenation of BN-reduced features, with the original
path's stripes pooled by ABP when ``abp`` is on. ``D = reduce_dim * sum_b (1 + n_b) * (2 if RP else 1)``.

Choices (all value choices read with :func:`~nasreid.mutables.ensure_frozen`; the space builds the network
of the current frozen sample, or of the defaults -- the paper's RMGL -- outside a frozen context). RMGL is
searched by sampling strategies (random / evolution / HPO), not as a weight-sharing supernet: different
samples have different heads, so build each with ``Genotype.build`` / ``freeze(..., copy_weights=False)``.

* ``rp_depth``: which branch stage's input is partitioned, ``"off" | "stage2" | "stage3" | "stage4"``
  (default ``"stage2"``, Sec. IV-D "after the res_conv2c layer"; Fig. 9 studies the depth).
* ``num_branches``: 1, 2, 3 (default 2, Sec. III-A "bident").
* ``branch1_stripes`` .. ``branch{M}_stripes`` (``M = max(branch_choices)``): 1, 2, 3, 4, 6 (defaults 2, 3,
  4: Local-2, Local-3, and the Local-4 branch of RMGL(2+3+4)). A branch beyond ``num_branches`` is not
  built and its value is ignored (a sample must still give it, as every label of the space).
* ``abp``: activation balanced pooling at evaluation, True / False (default True).
* ``rsa.p``, ``rsa.p_c``, ``rsa.r_c_min``, ``rsa.r_h_min``, ``rsa.r_w_min`` (``search_rsa=True``): the RSA
  settings (Sec. III-D; defaults Sec. IV-A: ``p_c = 0.5, r_c = 0.7, r_h_min = r_w_min = 0.5``; ``p`` is not
  given in the paper, 0.5 here). They name recipe keys ``data.augment.rsa.*``; the network ignores them and
  the training pipeline applies them through :func:`~nasreid.mutables.recipe_overrides`.

Deviations and choices not fixed by the paper:

* RP stripes have one height ``ceil(H / n)`` (they are stacked along the batch); when ``n`` does not divide
  ``H`` consecutive stripes overlap by a row or so (:func:`~nasreid.models.rmgl.stripe_starts`). The
  original path's uniform stripes use adaptive max pooling, whose windows overlap likewise.
* In training mode the stages after the RP point run twice (original batch, then the ``n * B`` stripe
  batch), so their BN layers see two batches and update their running statistics twice per step.
* ``n_b = 1``: the stripe feature pools the same map as the global one (they differ by their reduction and
  classifier), and the RP path (whole map) equals the original path; kept so that the feature size follows
  ``(1 + n_b)`` for every branch.
* ResNet-50's ``layer4`` downsampling is removed (``last_stride=1``, as for PCB / MGN local branches); the
  reduction has no ReLU; classifiers are linear layers with bias.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from nasreid.models.interface import ReIDNetwork
from nasreid.models.osnet import ConvBNReLU, OSBlock, Transition, init_reid_weights
from nasreid.models.pretrained import PretrainedWeightsError
from nasreid.models.rmgl import ABP_POOLS, RMGLBranch
from nasreid.mutables import Categorical, ModelSpace, Numerical, ensure_frozen
from nasreid.registry import register_space

__all__ = [
    "BACKBONES",
    "PRESET_GENOTYPES",
    "RP_DEPTHS",
    "RSA_CHOICES",
    "OSNET_PLACES",
    "RMGLSpace",
    "load_resnet50_weights",
    "osnet_name",
    "osnet_places",
]

#: Backbones of the space.
BACKBONES = ("osnet", "resnet50")
#: Values of ``rp_depth``: no RP path, or the branch stage whose input is partitioned.
RP_DEPTHS = ("off", "stage2", "stage3", "stage4")
#: Channels of the osnet trunk and stages at width 1 (conv1, conv2, conv3, conv4).
OSNET_CHANNELS = (64, 256, 384, 512)
#: RSA value choices: label -> (low, high, paper default, recipe key) (Sec. III-D, IV-A).
RSA_CHOICES: dict[str, tuple[float, float, float, str]] = {
    "rsa.p": (0.0, 1.0, 0.5, "data.augment.rsa.p"),
    "rsa.p_c": (0.0, 1.0, 0.5, "data.augment.rsa.p_c"),
    "rsa.r_c_min": (0.3, 1.0, 0.7, "data.augment.rsa.r_c_min"),
    "rsa.r_h_min": (0.3, 1.0, 0.5, "data.augment.rsa.r_h_min"),
    "rsa.r_w_min": (0.3, 1.0, 0.5, "data.augment.rsa.r_w_min"),
}
#: The paper's stripe counts of branches 1, 2, 3 (Local-2, Local-3, the Local-4 of RMGL(2+3+4)).
_PAPER_STRIPES = (2, 3, 4)
_PAPER_RSA = {k: v[2] for k, v in RSA_CHOICES.items()}


def _choices(rp: str, stripes: Sequence[int], abp: bool, rsa: dict[str, float] | None = None) -> dict[str, Any]:
    padded = list(stripes) + list(_PAPER_STRIPES[len(stripes):])
    out: dict[str, Any] = {"rp_depth": rp, "num_branches": len(stripes)}
    out.update({f"branch{i + 1}_stripes": n for i, n in enumerate(padded)})
    out["abp"] = abp
    out.update(rsa if rsa is not None else _PAPER_RSA)
    return out


#: Published architectures (Sec. IV, Table V) as genotypes of the default space.
PRESET_GENOTYPES: dict[str, dict[str, Any]] = {
    # RMGL as proposed (Table V "2+3-stripe+RP+ABP+RSA"): Local-2 and Local-3 branches, RP after
    # res_conv2c, ABP at test, RSA with the Sec. IV-A parameters
    "rmgl_paper": {"choices": _choices("stage2", (2, 3), True), "space_kwargs": {}},
    # Table V "2+3-stripe (BL)": the two branches without RP, ABP or RSA (rsa.p = 0: never applied); the
    # branch3 value is ignored
    "baseline_2_3": {"choices": _choices("off", (2, 3), False, {**_PAPER_RSA, "rsa.p": 0.0}), "space_kwargs": {}},
    # Table V "RMGL (1+2+3)": an extra global branch (1 stripe)
    "rmgl_1_2_3": {"choices": _choices("stage2", (1, 2, 3), True), "space_kwargs": {}},
    # Table V "RMGL (2+3+4)": an extra Local-4 branch with its RP path
    "rmgl_2_3_4": {"choices": _choices("stage2", (2, 3, 4), True), "space_kwargs": {}},
    # not in the paper: the plain global head in RMGL's framework -- one branch of one stripe (its GMP feature and
    # a whole-map "stripe", each with its reduction and classifier), no RP, no ABP -- with rmgl_paper's RSA, so that
    # rmgl_paper - global_rsa on the same pretrained OSNet trunk is the RMGL head (2+3 stripes, RP, ABP) alone
    "global_rsa": {"choices": _choices("off", (1,), False), "space_kwargs": {}},
}


def _paper_default(values: Sequence[Any], paper: Any) -> Any:
    """The paper's value when the recipe's choices include it, else None (the first value)."""
    return paper if paper in list(values) else None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_int_choices(name: str, values: Any) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
    for v in values:
        _check_int(f"every value of {name}", v, 1)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicated values: {list(values)!r}")
    return list(values)


def _scale(c: int, beta: float) -> int:
    return max(round(c * beta), 4)


def load_resnet50_weights(net: nn.Module, path: str | os.PathLike) -> int:
    """Copy a torchvision ResNet-50 state dict from the file ``path`` into ``net`` (a torchvision
    ``resnet50``), ignoring the ImageNet classifier ``fc.*``.

    Args:
        net: ``torchvision.models.resnet50(...)``.
        path: a file written by ``torch.save(resnet50.state_dict(), path)`` (or a checkpoint dict holding one,
            see :func:`~nasreid.models.pretrained.read_state_dict`).

    Returns:
        the number of tensors copied.

    Raises:
        PretrainedWeightsError: the file is missing or unreadable, or its keys / shapes are not those of a
            ResNet-50 (the message names the file and a few of the keys concerned).
    """
    from nasreid.models.pretrained import load_pretrained

    try:  # one loader for every weights file: torchvision's names kept, its ImageNet classifier fc.* dropped
        report = load_pretrained(net, path, skip=("fc",), format="torchvision")
    except PretrainedWeightsError as e:
        raise PretrainedWeightsError(f"imagenet_weights (a torchvision ResNet-50 state dict): {e}") from None
    return int(report["loaded"])


#: Where the osnet backbone's modules are in the ``osnet_ain`` space's plain OSNet (preset ``osnet``; torchreid's
#: ``osnet_x*`` files, translated by :func:`nasreid.models.torchreid.to_nasreid`): ``(osnet prefix, rmgl prefix)``,
#: ``{b}`` standing for every branch (each has its own copy of conv3 .. conv5). OSNet, ICCV 2019, Table 1: conv1,
#: max pool, conv2 (2 OS blocks) + transition, conv3 (2) + transition, conv4 (2), conv5 (1x1); RMGL, TIP 2020,
#: Sec. III-A / Fig. 2: a shared trunk up to the first partition point, then per-branch copies of the later stages.
OSNET_PLACES: tuple[tuple[str, str], ...] = (
    ("conv1.", "trunk.0."),
    ("conv2.0.", "trunk.2."),
    ("conv2.1.", "trunk.3."),
    ("trans2.", "trunk.4."),
    ("conv3.0.", "branches.{b}.stages.0.0."),
    ("conv3.1.", "branches.{b}.stages.0.1."),
    ("trans3.", "branches.{b}.stages.0.2."),
    ("conv4.0.", "branches.{b}.stages.1.0."),
    ("conv4.1.", "branches.{b}.stages.1.1."),
    ("conv5.", "branches.{b}.stages.2."),
)
#: The plain OSNet's head (torchreid ``fc`` -> ``head.embed``, ``classifier`` -> ``head.classifier``): no place in
#: RMGL, whose own reductions and classifiers (``branches.{b}.reductions`` / ``.classifiers``) start at their init.
OSNET_DROPPED = ("head.",)


def osnet_places(name: str, num_branches: int) -> tuple[str, ...] | None:
    """The rmgl ``osnet``-backbone keys of a key of the ``osnet_ain`` space's plain OSNet (:data:`OSNET_PLACES`):
    one trunk key, or one key per branch for conv3 .. conv5; ``()`` for the OSNet's head (dropped); ``None`` for a
    name of no OSNet module the rmgl backbone has (e.g. an IN layer ``conv2.0.in_in.weight`` of OSNet-AIN).

    >>> osnet_places("conv2.1.residual.gate.fc1.weight", 2)
    ('trunk.3.residual.gate.fc1.weight',)
    >>> osnet_places("conv5.1.running_var", 2)
    ('branches.0.stages.2.1.running_var', 'branches.1.stages.2.1.running_var')
    """
    if name.startswith(OSNET_DROPPED):
        return ()
    for src, dst in OSNET_PLACES:
        if name.startswith(src):
            rest = name[len(src):]
            if "{b}" not in dst:
                return (dst + rest,)
            return tuple(dst.format(b=b) + rest for b in range(num_branches))
    return None


def osnet_name(key: str) -> str | None:
    """The plain OSNet name (``osnet_ain`` space) of an rmgl ``osnet``-backbone key (trunk or any branch's stages;
    the inverse of :func:`osnet_places`), ``None`` for RMGL's own layers (reductions, classifiers)."""
    for src, dst in OSNET_PLACES:
        head, _, tail = dst.partition("{b}")
        if not tail:
            if key.startswith(head):
                return src + key[len(head):]
        elif key.startswith(head):
            b, dot, rest = key[len(head):].partition(".")
            if b.isdigit() and dot and rest.startswith(tail[1:]):
                return src + rest[len(tail) - 1:]
    return None


@register_space("rmgl", presets=PRESET_GENOTYPES)
class RMGLSpace(ModelSpace, ReIDNetwork):
    """RMGL network for the current sample of its choices (Wang et al., TIP 2020, Fig. 2; see the module
    docstring for layout, choices, outputs and deviations).

    Args:
        num_classes: training identities of the classifiers (0: feature extractor only, no classifier).
        backbone: ``"osnet"`` (default) or ``"resnet50"`` (the paper's).
        width_mult: multiplies the osnet channels (64, 256, 384, 512) (> 0); must be 1.0 for resnet50.
        reduce_dim: size of every reduced feature (256, Sec. III-A).
        last_stride: stride of ResNet-50's ``layer4`` (1: no downsampling, the default; 2: torchvision's);
            must be 1 for osnet, whose last stages do not downsample.
        imagenet_weights: a local file holding a torchvision ResNet-50 state dict, loaded into the trunk and
            into every branch's copy of ``layer2/3/4`` (``fc.*`` ignored); resnet50 only. None: random
            initialisation (torchvision's for the backbone). Nothing is ever downloaded.
        rp_choices: values of ``rp_depth`` (a subset of ``("off", "stage2", "stage3", "stage4")``).
        branch_choices: values of ``num_branches`` (integers >= 1).
        stripe_choices: values of every ``branch{i}_stripes`` (integers >= 1).
        search_rsa: declare the five ``rsa.*`` value choices (recipe keys ``data.augment.rsa.*``).
        abp_pool: pooling of the ABP stripes at evaluation, ``"max"`` (consistent with the GMP of training)
            or ``"avg"`` (Eq. 11 as printed).

    Defaults of the choices are the paper's RMGL (``rp_depth="stage2"``, 2 branches of 2 and 3 stripes,
    ``abp=True``) whenever those values are among the given choices, else the first value.

    Forward: ``[B, 3, H, W]`` (H, W multiples of 16 for osnet, of 32 for resnet50 with ``last_stride=2``)
    -> training dict / eval ``[B, feature_dim]`` (module docstring). With osnet the final map is
    ``H/16 x W/16`` (8 x 4 at 128 x 64), with resnet50 ``H/16 x W/16`` (``last_stride=1``).

    Raises:
        ValueError: an invalid keyword argument (the message names it and the allowed values).
        PretrainedWeightsError: ``imagenet_weights`` missing, unreadable or not a ResNet-50 state dict.

    Pretrained OSNet: ``load_pretrained`` / ``warm_start`` (a recipe's ``model.pretrained``) of a torchreid plain
    OSNet file place it through :meth:`pretrained_places` (osnet backbone: trunk + every branch's stages).
    """

    space_name = "rmgl"
    classifier_patterns = ("branches.*.classifiers.*",)
    default_match_stage = "branches.0.stages.1"  # QAConv: branch 0's 1/16 map before its last stage

    def __init__(self, num_classes: int = 0, backbone: str = "osnet", width_mult: float = 1.0,
                 reduce_dim: int = 256, last_stride: int = 1, imagenet_weights: str | os.PathLike | None = None,
                 rp_choices: Sequence[str] = RP_DEPTHS, branch_choices: Sequence[int] = (1, 2, 3),
                 stripe_choices: Sequence[int] = (1, 2, 3, 4, 6), search_rsa: bool = True,
                 abp_pool: str = "max"):
        super().__init__()
        _check_int("num_classes", num_classes, 0)
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {backbone!r}")
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"width_mult must be a number > 0, got {width_mult!r}")
        if backbone == "resnet50" and width_mult != 1.0:
            raise ValueError(f"width_mult applies to backbone='osnet' only; resnet50 needs 1.0, got {width_mult!r}")
        _check_int("reduce_dim", reduce_dim, 1)
        if last_stride not in (1, 2) or isinstance(last_stride, bool):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
        if backbone == "osnet" and last_stride != 1:
            raise ValueError(f"last_stride applies to backbone='resnet50' only (osnet's last stages do not "
                             f"downsample); got last_stride={last_stride!r} with backbone='osnet'")
        if imagenet_weights is not None:
            if not isinstance(imagenet_weights, (str, os.PathLike)):
                raise ValueError(f"imagenet_weights must be a file path or None, got {imagenet_weights!r}")
            if backbone != "resnet50":
                raise ValueError(f"imagenet_weights (a torchvision ResNet-50 state dict) needs "
                                 f"backbone='resnet50', got backbone={backbone!r}")
        if isinstance(rp_choices, (str, bytes)) or not isinstance(rp_choices, Sequence) or not rp_choices:
            raise ValueError(f"rp_choices must be a non-empty list from {list(RP_DEPTHS)}, got {rp_choices!r}")
        bad = [v for v in rp_choices if v not in RP_DEPTHS]
        if bad or len(set(rp_choices)) != len(rp_choices):
            raise ValueError(f"rp_choices must be distinct values from {list(RP_DEPTHS)}, got {list(rp_choices)!r}")
        branch_choices = _check_int_choices("branch_choices", branch_choices)
        stripe_choices = _check_int_choices("stripe_choices", stripe_choices)
        if not isinstance(search_rsa, bool):
            raise ValueError(f"search_rsa must be True or False, got {search_rsa!r}")  # noqa: TRY004
        if abp_pool not in ABP_POOLS:
            raise ValueError(f"abp_pool must be one of {list(ABP_POOLS)}, got {abp_pool!r}")

        # ---- choices -------------------------------------------------------------------------------
        self.rp_depth = self.add_mutable(Categorical(list(rp_choices), label="rp_depth",
                                                     default=_paper_default(rp_choices, "stage2")))
        self.num_branches = self.add_mutable(
            Categorical(branch_choices, label="num_branches", default=_paper_default(branch_choices, 2)))
        self.branch_stripes = [
            self.add_mutable(Categorical(
                stripe_choices, label=f"branch{i + 1}_stripes",
                default=_paper_default(stripe_choices, _PAPER_STRIPES[i]) if i < len(_PAPER_STRIPES) else None))
            for i in range(max(branch_choices))
        ]
        self.abp = self.add_mutable(Categorical([True, False], label="abp", default=True))
        if search_rsa:
            for label, (low, high, default, key) in RSA_CHOICES.items():
                self.add_mutable(Numerical(low, high, default=default, label=label, recipe_key=key))

        rp = ensure_frozen(self.rp_depth)
        nb = ensure_frozen(self.num_branches)
        stripes = [ensure_frozen(m) for m in self.branch_stripes[:nb]]
        abp = ensure_frozen(self.abp)
        rp_stage = None if rp == "off" else RP_DEPTHS.index(rp) - 1

        # ---- network -------------------------------------------------------------------------------
        self.backbone = backbone
        if backbone == "resnet50":
            self.trunk, stages, channels = self._resnet50(last_stride, imagenet_weights)
        else:
            self.trunk, stages, channels = self._osnet(width_mult)
        branches = [RMGLBranch(stages(), channels, n, rp_stage, reduce_dim=reduce_dim, num_classes=num_classes,
                               abp=abp, abp_pool=abp_pool)
                    for n in stripes]
        self.branches = nn.ModuleList(branches)
        self.num_classes = num_classes
        self.reduce_dim = reduce_dim
        self.stripes = tuple(stripes)
        self.rp_stage = rp_stage
        self.feature_dim = sum(b.feature_dim for b in branches)
        # the interface: the trunk and branch 0's original path are the chain of stages; each branch's
        # reductions and classifiers are head
        self.head_prefixes = tuple(f"branches.{i}.{part}" for i in range(len(self.branches))
                                   for part in ("reductions", "classifiers"))
        if backbone == "resnet50":
            chans = [("trunk", 256, 4), ("branches.0.stages.0", 512, 8), ("branches.0.stages.1", 1024, 16),
                     ("branches.0.stages.2", 2048, 16 * last_stride)]
        else:
            c0, c1, c2, c3 = (_scale(c, width_mult) for c in OSNET_CHANNELS)
            chans = [("trunk", c1, 8), ("branches.0.stages.0", c2, 16), ("branches.0.stages.1", c3, 16),
                     ("branches.0.stages.2", c3, 16)]
        self.feature_info = [{"module": m, "num_chs": c, "reduction": r} for m, c, r in chans]
        if backbone == "osnet":
            init_reid_weights(self)
        else:  # torchvision's initialisation (or the ImageNet weights) for the backbone
            for b in branches:
                init_reid_weights(b.reductions)
                init_reid_weights(b.classifiers)

    @staticmethod
    def _resnet50(last_stride: int, weights: str | os.PathLike | None):
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        if weights is not None:
            load_resnet50_weights(net, weights)
        if last_stride == 1:
            block = net.layer4[0]
            block.conv2.stride = (1, 1)
            block.downsample[0].stride = (1, 1)
        trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)

        def stages() -> list[nn.Module]:  # each branch: a deep copy (own weights, same initial values)
            return [copy.deepcopy(net.layer2), copy.deepcopy(net.layer3), copy.deepcopy(net.layer4)]

        return trunk, stages, 2048

    @staticmethod
    def _osnet(width_mult: float):
        c0, c1, c2, c3 = (_scale(c, width_mult) for c in OSNET_CHANNELS)
        trunk = nn.Sequential(
            ConvBNReLU(3, c0, 7, stride=2, padding=3), nn.MaxPool2d(3, stride=2, padding=1),
            OSBlock(c0, c1, "os"), OSBlock(c1, c1, "os"), Transition(c1, c1))

        def stages() -> list[nn.Module]:  # fresh modules per branch (initialised by init_reid_weights)
            return [nn.Sequential(OSBlock(c1, c2, "os"), OSBlock(c2, c2, "os"), Transition(c2, c2)),
                    nn.Sequential(OSBlock(c2, c3, "os"), OSBlock(c3, c3, "os")),
                    ConvBNReLU(c3, c3, 1)]

        return trunk, stages, c3

    def pretrained_places(self, names: Collection[str], *, strict: bool = True
                          ) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]] | None:
        """Where the tensors of a plain OSNet weights file go in this network (``backbone="osnet"``); the hook
        :func:`~nasreid.models.pretrained.load_pretrained` and :func:`~nasreid.models.pretrained.warm_start` call
        with the file's keys once its weights format has renamed them (a torchreid ``osnet_x*`` file: format
        ``torchreid``, :func:`nasreid.models.torchreid.to_nasreid`, to the ``osnet_ain`` space's preset ``osnet``).

        conv1, conv2 and its transition go to ``trunk.*``; conv3 + transition, conv4 and conv5 to
        ``branches.{b}.stages.{0,1,2}`` of *every* branch (each takes its own copy of the same tensors: RMGL,
        TIP 2020, Sec. III-A / IV-A, the branches copy the backbone after the trunk); the OSNet's ``head.*``
        (torchreid ``fc`` / ``classifier``) is dropped, and this network's reductions and classifiers
        (:attr:`head_prefixes`) stay at their initialisation. OSNet channels (ICCV 2019, Table 1) times
        ``width_mult`` must be the file's (a shape mismatch is reported by the loader).

        Args:
            names: the file's keys after its format's renaming.
            strict: every backbone tensor of this network must come from the file and every file name (but the
                OSNet head) have a place here; ``False``: the names that fit are placed, the others reported by
                the loader (``load_pretrained(strict=False)``).

        Returns:
            ``({OSNet name: (rmgl key, ...)}, head prefixes)``; ``None`` for the resnet50 backbone, or when no
            name is an OSNet module's (the file already has this network's names, e.g. an rmgl run's
            ``model.pt``).

        Raises:
            PretrainedWeightsError: with ``strict``, OSNet names with no place here (an OSNet-AIN / OSNet-IBN file's
                IN layers, the BN-less conv3 of OSNet-AIN's blocks ...) or backbone keys of this network the file
                lacks; the message names a few of each and how many.
        """
        if self.backbone != "osnet":
            return None
        names = list(names)
        if not any(osnet_places(n, 0) is not None and not n.startswith(OSNET_DROPPED) for n in names):
            return None
        nb = len(self.branches)
        own = list(self.state_dict())
        keys = set(own)
        places: dict[str, tuple[str, ...]] = {}
        unplaced: list[str] = []
        for n in names:
            p = osnet_places(n, nb)
            if p is None or not all(k in keys for k in p):  # no OSNet module of this backbone (an IN layer ...)
                unplaced.append(n)
            else:
                places[n] = p
        lacking = [k for k in own if osnet_name(k) is not None and osnet_name(k) not in places]
        if strict and (unplaced or lacking):
            from nasreid.models.weights import few_keys

            parts = []
            if unplaced:
                parts.append(f"{len(unplaced)} tensor(s) of the file with no place in the rmgl osnet backbone "
                             f"(names after the file's format): {few_keys(unplaced)}")
            if lacking:
                parts.append(f"{len(lacking)} tensor(s) of the rmgl network not in the file: {few_keys(lacking)} "
                             f"(the plain OSNet's {few_keys([str(osnet_name(k)) for k in lacking])})")
            raise PretrainedWeightsError(
                "; ".join(parts) + ". The rmgl space's osnet backbone takes a plain OSNet: torchreid's osnet_x1_0 .. "
                "osnet_x0_25 (format torchreid; not OSNet-AIN / OSNet-IBN, whose IN layers it lacks) or the "
                "osnet_ain space's preset osnet, with space.kwargs.width_mult the file's width")
        return places, tuple(self.head_prefixes)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The trunk, then branch 0's stages on its original path (see :attr:`feature_info`); every branch
        runs the same stages on the trunk's output with weights of its own."""
        return [(f["module"], self.get_submodule(f["module"])) for f in self.feature_info]

    def is_active(self, label: str, sample: dict[str, Any]) -> bool:
        """Whether choice ``label`` matters given the choices already in ``sample`` (declaration order):
        ``branch{i}_stripes`` only when ``num_branches >= i``. Sampling strategies skip inactive choices
        (they keep their default), so a branch that is not built does not cost the sampler a dimension."""
        if label.startswith("branch") and label.endswith("_stripes") and "num_branches" in sample:
            return int(label[len("branch"):-len("_stripes")]) <= int(sample["num_branches"])
        return True

    def forward(self, x: torch.Tensor):
        """``[B, 3, H, W]`` -> training ``dict(feat, feat_branches, logits_list, logits)`` / eval ``[B, D]``
        (see the module docstring)."""
        t = self.trunk(x)
        outs = [branch(t) for branch in self.branches]
        feat_branches = [torch.cat(feats, dim=1) for feats, _ in outs]
        feat = torch.cat(feat_branches, dim=1)
        if not self.training:
            return feat
        out: dict[str, Any] = {"feat": feat, "feat_branches": feat_branches}
        if self.num_classes > 0:
            out["logits_list"] = [lg for _, logits in outs for lg in logits]
            out["logits"] = out["logits_list"][0]
        return out

    def extra_repr(self) -> str:
        return f"backbone={self.backbone!r}, stripes={self.stripes}, rp_stage={self.rp_stage}"
