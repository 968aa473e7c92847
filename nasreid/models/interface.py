"""The interface every nasreid network provides: search spaces and the fixed networks frozen from them
(timm's ``forward_features`` / ``forward_intermediates`` / ``get_classifier`` / ``reset_classifier`` are the
model).

A network is a chain of named *stages* from the image to the final feature map (:meth:`ReIDNetwork.stages`),
described by :attr:`ReIDNetwork.feature_info`; a head pools the final map into the embedding (``feature_dim``)
and holds the identity classifier(s). What the rest of nasreid asks of a network goes through here:

* the feature maps at named stages: :meth:`~ReIDNetwork.forward_intermediates` (``stop_at`` ends the forward
  at a stage; QAConv matches such a map, :attr:`~ReIDNetwork.default_match_stage` names its default);
* the final map: :meth:`~ReIDNetwork.forward_features`; the pooled embedding: ``forward`` in eval mode
  (``[B, feature_dim]``);
* the classifiers: :meth:`~ReIDNetwork.get_classifier`, :meth:`~ReIDNetwork.reset_classifier` (pseudo-label
  classes, a new dataset's identities);
* the split into backbone and head parameters: :meth:`~ReIDNetwork.split_parameters`
  (:attr:`~ReIDNetwork.head_prefixes`; a frozen-backbone warm start opens the head).

A network that is not a nasreid network (a torchvision ResNet) is handled by :func:`as_stages`: its top-level
children in registration order are taken as its chain of stages (true of torchvision's ResNets).

Example::

    >>> import torch
    >>> from nasreid.genotype import preset_genotype
    >>> net = preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=10).eval()
    >>> [f["module"] for f in net.feature_info][-3:]
    ['trans3', 'conv4', 'conv5']
    >>> maps = net.forward_intermediates(torch.zeros(1, 3, 128, 64), stop_at="conv4")
    >>> tuple(maps["conv4"].shape)
    (1, 128, 8, 4)
    >>> {k: v.out_features for k, v in net.reset_classifier(25, keep=10).items()}
    {'head.classifier': 25}
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, Optional, TypedDict

import torch
from torch import nn

from nasreid.errors import NasreidError

__all__ = ["FeatureInfo", "ReIDNetwork", "NetworkInterfaceError", "as_stages", "stage_names", "classifiers_of",
           "under_prefixes", "head_prefixes_of"]


class NetworkInterfaceError(NasreidError, ValueError):
    """A stage name or classifier request that the network cannot serve; the message names the valid ones."""


def under_prefixes(key: str, prefixes: Iterable[str]) -> bool:
    """A parameter or module path ``key`` is one of ``prefixes`` or lies below one (``"head"`` matches ``head.x``
    but not ``header.x``): the one test of "under a module path" of the backbone / head split, the
    frozen-backbone warm start and the pretrained-file selection."""
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def head_prefixes_of(net: nn.Module) -> tuple[str, ...]:
    """The head's module paths of ``net`` (:attr:`ReIDNetwork.head_prefixes`): what a frozen-backbone warm start
    opens when the recipe names no ``training.open_layers``.

    Raises:
        NetworkInterfaceError: ``net`` is not a :class:`ReIDNetwork` (it declares no head; the message names its
            class and its top-level modules, to be named in ``training.open_layers``).
    """
    if not isinstance(net, ReIDNetwork):
        tops = [n for n, _ in net.named_children()]
        raise NetworkInterfaceError(f"{type(net).__name__} is not a nasreid network (ReIDNetwork), so it declares no "
                                    f"head_prefixes; name the layers to open in training.open_layers (its top-level "
                                    f"modules are {tops})")
    return tuple(net.head_prefixes)


class FeatureInfo(TypedDict):
    """One stage of a network: its module path, output channels and total stride (reduction) w.r.t. the
    image (timm's ``feature_info`` entries)."""

    module: str
    num_chs: int
    reduction: int


class ReIDNetwork:
    """Mixin of every nasreid network (a :class:`~nasreid.mutables.ModelSpace` subclass lists it as a base).

    A subclass sets ``self.feature_info`` (a list of :class:`FeatureInfo`, in forward order, ending with the
    final map) in its constructor and implements :meth:`stages`; the rest is shared.

    Class attributes:
        head_prefixes: module paths of the head (embedding, BNNeck, classifiers); every other parameter is
            backbone. An instance may set its own where the head depends on its arguments (RMGL's branches).
        classifier_patterns: fnmatch patterns of the identity classifiers' module paths (``nn.Linear``).
        default_match_stage: the stage a feature-map matcher (QAConv) uses when the recipe names none: a map
            at 1/16 of the input before the last 1x1 (Liao & Shao, ECCV 2020, Sec. 5.1 take ResNet's layer3).
    """

    head_prefixes: tuple[str, ...] = ("head",)
    classifier_patterns: ClassVar[tuple[str, ...]] = ("*classifier",)
    default_match_stage: ClassVar[Optional[str]] = None
    feature_info: list[FeatureInfo]

    # ---- stages and maps ------------------------------------------------------------------------
    def stages(self) -> list[tuple[str, nn.Module]]:
        """``(module path, module)`` of every stage in forward order, from the image to the final map."""
        raise NotImplementedError(f"{type(self).__name__} must implement stages()")

    def forward_intermediates(self, x: torch.Tensor, stop_at: Optional[str] = None) -> dict[str, torch.Tensor]:
        """Feature maps of the stages, ``{module path: [B, C_s, H / r_s, W / r_s]}`` in forward order, for
        images ``x [B, 3, H, W]``; with ``stop_at`` the forward ends after that stage (nothing later runs, no
        exception is used to stop it). Autograd, train/eval mode and BN statistics behave as in ``forward``.

        Raises:
            NetworkInterfaceError: ``stop_at`` is not a stage (the message lists the stages).
        """
        return run_stages(self.stages(), x, stop_at, type(self).__name__)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map ``[B, C, H / r, W / r]`` (the last entry of :attr:`feature_info`)."""
        last = self.feature_info[-1]["module"]
        return self.forward_intermediates(x, stop_at=last)[last]

    # ---- classifiers ----------------------------------------------------------------------------
    def get_classifier(self) -> dict[str, nn.Linear]:
        """The identity classifiers ``{module path: nn.Linear(D_i, num_classes)}`` (empty without any)."""
        return {n: m for n, m in self.named_modules()  # type: ignore[attr-defined]
                if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in self.classifier_patterns)}

    @property
    def num_classes_now(self) -> int:
        """Rows of the identity classifier (0 without one)."""
        clf = self.get_classifier()
        return int(next(iter(clf.values())).out_features) if clf else 0

    def reset_classifier(self, num_classes: int, keep: int = 0,
                         init: Optional[Callable[[str, nn.Linear, int], torch.Tensor]] = None) -> dict[str, nn.Linear]:
        """Resize every identity classifier to ``num_classes`` rows **in place**: the ``nn.Parameter`` objects
        stay the same (an optimiser built before keeps training them; drop its per-parameter state for them),
        the first ``keep`` rows (and biases) are kept, new rows are drawn as at construction
        (``N(0, 0.001)``, bias 0: :func:`~nasreid.models.osnet.init_reid_weights`) or, with ``init``, set to
        ``init(name, classifier, n_new) -> [n_new, D]`` (called before the classifier changes; e.g. DomainMix's
        cluster centroids). Returns :meth:`get_classifier`.

        Raises:
            NetworkInterfaceError: the network has no classifier (built with ``num_classes=0``: rebuild it with
                classes), ``num_classes < 1`` or ``keep`` outside ``[0, min(old rows, num_classes)]``.
        """
        classifiers = self.get_classifier()
        if not classifiers:
            raise NetworkInterfaceError(f"{type(self).__name__} has no identity classifier to reset (built with "
                                        f"num_classes=0)")
        if int(num_classes) < 1:
            raise NetworkInterfaceError(f"reset_classifier: num_classes must be >= 1, got {num_classes}")
        for name, clf in classifiers.items():
            old = clf.weight.shape[0]
            if not 0 <= keep <= min(old, num_classes):
                raise NetworkInterfaceError(f"reset_classifier: keep={keep} rows of {name} ({old} rows) into "
                                            f"{num_classes}")
            n_new = num_classes - keep
            w = clf.weight.data.new_empty(num_classes, clf.in_features)
            if init is None:
                w[keep:].normal_(0, 0.001)
            else:
                w[keep:] = init(name, clf, n_new).to(w.dtype)
            w[:keep] = clf.weight.data[:keep]
            clf.weight.data = w
            if clf.bias is not None:
                b = clf.bias.data.new_zeros(num_classes)
                b[:keep] = clf.bias.data[:keep]
                clf.bias.data = b
            clf.out_features = int(num_classes)
        if isinstance(getattr(self, "num_classes", None), int):
            self.num_classes: int = int(num_classes)
        return classifiers

    # ---- parameter split ------------------------------------------------------------------------
    def split_parameters(self) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
        """``(backbone, head)``: ``(name, parameter)`` pairs in ``named_parameters`` order, head = under
        :attr:`head_prefixes` (:func:`under_prefixes`): the one backbone / head split of nasreid (a frozen-backbone
        warm start, :class:`~nasreid.engine.hooks.FreezeBackboneHook`, opens the head)."""
        backbone: list[tuple[str, nn.Parameter]] = []
        head: list[tuple[str, nn.Parameter]] = []
        for n, p in self.named_parameters():  # type: ignore[attr-defined]
            (head if under_prefixes(n, self.head_prefixes) else backbone).append((n, p))
        return backbone, head


def stage_names(net: nn.Module) -> list[str]:
    """The stage names of ``net`` (:attr:`ReIDNetwork.feature_info`, or the top-level children of a network
    without the interface, see :func:`as_stages`)."""
    return [n for n, _ in as_stages(net)]


def classifiers_of(net: nn.Module) -> dict[str, nn.Linear]:
    """The identity classifiers of ``net``: :meth:`ReIDNetwork.get_classifier` for a nasreid network, ``{}``
    for any other (a plugin space without the interface; a timm model's own ``get_classifier`` is not asked)."""
    return net.get_classifier() if isinstance(net, ReIDNetwork) else {}


def as_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """``net.stages()`` for a :class:`ReIDNetwork`; for any other network its top-level children in
    registration order (a chain for torchvision's ResNets; modules named ``qaconv`` are left out)."""
    if isinstance(net, ReIDNetwork):
        return net.stages()
    return [(n, m) for n, m in net.named_children() if n != "qaconv"]


def run_stages(stages: Sequence[tuple[str, nn.Module]], x: torch.Tensor, stop_at: Optional[str],
               what: str = "network") -> dict[str, torch.Tensor]:
    """Apply ``stages`` in order to ``x`` and return every output by stage name, ending after ``stop_at``.

    Raises:
        NetworkInterfaceError: ``stop_at`` is not among the stage names (the message lists them).
    """
    names = [n for n, _ in stages]
    if stop_at is not None and stop_at not in names:
        close = difflib.get_close_matches(str(stop_at), names, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise NetworkInterfaceError(f"{stop_at!r} is not a stage of {what}{hint}; its stages are: {', '.join(names)}")
    out: dict[str, torch.Tensor] = {}
    for name, module in stages:
        x = module(x)
        out[name] = x
        if name == stop_at:
            break
    return out
