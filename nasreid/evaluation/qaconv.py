"""QAConv matcher for re-ID evaluation (registered as ``"qaconv"``).

Paper: S. Liao and L. Shao, "Interpretable and Generalizable Person Re-Identification with Query-Adaptive
Convolution and Temporal Lifting", ECCV 2020, Sec. 3.1-3.2 (the head is :class:`nasreid.models.qaconv.QAConvHead`).

Instead of a distance between pooled vectors, every query/gallery pair is scored by the learned QAConv matcher
on feature maps: query-adaptive convolution (cosine similarity of every pair of locations for kernel 1), global
max pooling both ways, BN-FC-BN and a sigmoid.

Inputs:
    model: a network with a QAConv head attached as ``model.qaconv`` (:func:`nasreid.models.qaconv.attach_qaconv`;
        a recipe with ``training.method: qaconv``). :meth:`QAConvMatcher.features` runs the backbone only up to
        the head's stage.
    images: ``[B, 3, H, W]`` normalised images, the size the head was built for.
    query / gallery :class:`~nasreid.evaluation.matchers.FeatureSet`: ``features`` are the head's normalised maps
        ``[N, d, h, w]`` (unit L2 norm over ``d`` at every location), any device; extract them **without**
        ``flip`` (averaging the maps of flipped images mixes locations; :meth:`prepare_gallery` refuses maps
        that are not unit-norm).

Outputs:
    :meth:`QAConvMatcher.features`: maps ``[B, d, h, w]`` (float32 after extraction).
    :meth:`QAConvMatcher.score`: ``[end - start, Ng]`` float32 similarities in ``[0, 1]`` on the head's device,
        entry ``[i, j]`` the QAConv matching probability of query ``start + i`` and gallery ``j`` (higher = more
        alike; ``higher_is_better = True``).

Cost: ``Nq * Ng * hw * hw * d`` multiply-adds (e.g. 742 x 2,866 pairs at 24x8x128: 1e13); memory: the gallery
maps (``Ng * d * h * w`` values, float16 on CUDA by default) plus one block of similarities
(:meth:`QAConvHead.similarity`).
"""
from __future__ import annotations

from typing import cast

import torch
from torch import nn

from nasreid.models.qaconv import QAConvHead
from nasreid.registry import MATCHERS

from .matchers import FeatureSet, Matcher
from .metrics import EvaluationError

__all__ = ["QAConvMatcher"]


def _find_head(model: nn.Module) -> QAConvHead | None:
    for m in (model, getattr(model, "module", None)):  # DataParallel / DDP wrap the network as .module
        head = getattr(m, "qaconv", None) if m is not None else None
        if isinstance(head, QAConvHead):
            return head
    return None


@MATCHERS.register("qaconv")
class QAConvMatcher(Matcher):
    """QAConv similarities (see the module docstring); registered as ``"qaconv"``.

    Args:
        block_size: gallery maps per block of :meth:`QAConvHead.similarity` (probe blocks are sized so a block
            of similarities stays bounded); memory, not results, depends on it.
        half: keep the gallery maps (and compute the matching) in float16; ``None``: float16 on CUDA, float32
            on CPU.
        head: the :class:`QAConvHead` to score with when :meth:`features` is not called (features extracted
            elsewhere); otherwise the model's ``qaconv`` head is remembered by :meth:`features`.

    Raises:
        EvaluationError (a ``ValueError``): ``block_size < 1``; (from the methods) a model without a QAConv head,
            :meth:`score` / :meth:`prepare_gallery` without a known head, maps whose shape is not the head's
            ``[N, d, h, w]`` or that are not unit-norm per location.
    """

    higher_is_better = True

    def __init__(self, block_size: int = 256, half: bool | None = None, head: QAConvHead | None = None):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise EvaluationError(f"QAConvMatcher: block_size must be a positive integer, got {block_size!r}")
        if head is not None and not isinstance(head, QAConvHead):
            raise EvaluationError(f"QAConvMatcher: head must be a QAConvHead, got {type(head).__name__}")
        self.block_size = block_size
        self.half = half
        self.head = head
        self._gallery: torch.Tensor | None = None

    def features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """``model.qaconv.extract(model, images)``: maps ``[B, d, h, w]``; remembers the head."""
        head = _find_head(model)
        if head is None:
            raise EvaluationError(
                f"the qaconv matcher needs a QAConv head on the model (model.qaconv), but {type(model).__name__} "
                "has none: train it with `training.method: qaconv` or attach one with "
                "nasreid.models.qaconv.attach_qaconv"
            )
        self.head = head
        # the head not on the model: found on the network a DataParallel / DDP wrapper holds as .module
        target = cast(nn.Module, model.module) if getattr(model, "qaconv", None) is not head else model
        return head.extract(target, images)

    def _require_head(self) -> QAConvHead:
        if self.head is None:
            raise EvaluationError("QAConvMatcher has no head: call features() (model evaluation) first, or pass "
                                  "head= to the constructor")
        return self.head

    def _check(self, name: str, maps: torch.Tensor) -> None:
        head = self._require_head()
        want = (head.dim, head.height, head.width)
        if maps.ndim != 4 or tuple(maps.shape[1:]) != want:
            raise EvaluationError(
                f"QAConvMatcher needs {name} maps [N, {want[0]}, {want[1]}, {want[2]}] (the head's normalised "
                f"output; images of the size the head was built for), got {tuple(maps.shape)}"
            )

    def _dtype(self, device: torch.device) -> torch.dtype:
        half = (device.type == "cuda") if self.half is None else bool(self.half)
        return torch.float16 if half else torch.float32

    def prepare_gallery(self, gallery: FeatureSet) -> None:
        """Keep the gallery maps once, on the head's device, in float16 when ``half`` (else float32)."""
        head = self._require_head()
        maps = gallery.features
        self._check("gallery", maps)
        sample = maps[:64].float()
        norms = sample.norm(dim=1)
        if sample.numel() and not bool(((norms - 1).abs() < 1e-2).logical_or(norms < 1e-6).all()):
            raise EvaluationError(
                "QAConvMatcher: the gallery maps are not unit-norm over channels at every location (norms in "
                f"[{float(norms.min()):.3f}, {float(norms.max()):.3f}]); extract them with the head (and without "
                "flip averaging)"
            )
        device = head.fc.weight.device
        self._gallery = maps.to(device=device, dtype=self._dtype(device)).contiguous()
        self.gallery = gallery

    def score(self, query: FeatureSet, start: int, end: int) -> torch.Tensor:
        """Similarities ``[end - start, Ng]`` in ``[0, 1]`` of queries ``start..end-1`` (float32, head's device)."""
        head = self._require_head()
        if self._gallery is None:
            raise EvaluationError("QAConvMatcher.score called before prepare_gallery")
        q = query.features[start:end]
        self._check("query", q)
        q = q.to(device=self._gallery.device, dtype=self._gallery.dtype)
        return head.similarity(q, self._gallery, block_size=self.block_size)
