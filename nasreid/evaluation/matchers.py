"""Matchers and score post-processors: the pluggable part of re-ID evaluation.

Evaluation runs ``features -> matcher (scores) -> post-processors (re-weighted scores) -> ranker (CMC / mAP)``,
``chunk_size`` queries at a time, so the full ``Nq x Ng`` score matrix is never held. The ranker is the exact,
sort-free one of :mod:`.metrics` (Market-1501 protocol, Zheng et al., "Scalable Person Re-identification: A
Benchmark", ICCV 2015).

Inputs -- one :class:`FeatureSet` per side (query, gallery) of ``N`` images:
    features: tensor ``[N, ...]`` of whatever the matcher compares: pooled vectors ``[N, D]`` for
        :class:`FeatureDistance`, feature maps ``[N, C, H, W]`` for a QAConv-style matcher. Any device.
    pids: int64 ``[N]`` identities; ``-1`` = junk (never ranked), ``0`` = distractor (a negative).
    camids: int64 ``[N]`` 0-based cameras; a gallery entry with the query's pid *and* camid is junk for it.
    seqs, frames: int64 ``[N]`` video sequence / frame number of each image (``-1`` unknown), or ``None``.
    times: float64 ``[N]`` capture time in seconds on a clock shared by the cameras (``nan`` unknown), or ``None``.
    paths: ``N`` image paths, or ``None``.

Outputs:
    ``Matcher.score(query, start, end)``: tensor ``[end - start, Ng]``, entry ``[i, j]`` scores query
        ``start + i`` against gallery ``j``: a **distance** (smaller = more alike) when the matcher's
        ``higher_is_better`` is False, a **similarity** when True.
    ``PostProcessor(scores, start, end)``: the re-weighted chunk, same shape; its ``higher_is_better`` says its
        output convention (``None``: same as its input).
    :func:`evaluate_matcher`: ``{"cmc": float64 [max_rank], "mAP", "mINP", "num_valid_queries",
        "num_skipped_queries"}``, fractions in [0, 1]; a skipped query has no gallery positive (same pid, other
        camera) and is left out of the averages. Final similarities ``s`` are ranked as distances ``d = -s``;
        ties go by gallery index, nan ranks last.

Intended users of the protocol: QAConv (Liao & Shao, "Interpretable and Generalizable Person Re-Identification
with Query-Adaptive Convolution and Temporal Lifting", ECCV 2020) -- :meth:`Matcher.features` asks the model for
feature maps and :meth:`Matcher.score` runs the learned pairwise matcher (similarities) -- and its Temporal
Lifting (TLift, same paper), a :class:`PostProcessor` re-weighting each score row with the camids and frame/time
stamps of query and gallery; k-reciprocal re-ranking (Zhong et al., CVPR 2017) is another post-processor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from nasreid.registry import MATCHERS

from .distance import METRICS, distance_from_prepared, prepare_features
from .metrics import EvaluationError, RankAccumulator, _as_int_array, _GalleryIndex, _positive_ranks, _Workspace

__all__ = ["FeatureSet", "Matcher", "FeatureDistance", "PostProcessor", "evaluate_matcher"]


def _labels(values, name: str, n: int) -> np.ndarray:
    a = _as_int_array(values, name)
    if len(a) != n:
        raise EvaluationError(f"{name} has {len(a)} entries but the features hold {n} images")
    return a


@dataclass
class FeatureSet:
    """Features and labels of one side (query or gallery) of an evaluation; see the module docstring.

    Args:
        features: ``[N, ...]`` tensor or array (kept on its device, detached).
        pids, camids: ``[N]`` integer identities / 0-based cameras (converted to int64 numpy).
        seqs, frames: optional ``[N]`` integer sequence / frame numbers, ``-1`` unknown.
        times: optional ``[N]`` capture times in seconds, ``nan`` unknown.
        paths: optional ``N`` image paths.

    Raises:
        EvaluationError (a ``ValueError``): 0-d features, non-integer labels, or any field whose length is not
            ``N`` (the message names the field).
    """

    features: torch.Tensor
    pids: np.ndarray
    camids: np.ndarray
    seqs: np.ndarray | None = None
    frames: np.ndarray | None = None
    times: np.ndarray | None = None
    paths: list[str] | None = None

    def __post_init__(self):
        f = self.features if isinstance(self.features, torch.Tensor) else torch.as_tensor(np.asarray(self.features))
        if f.ndim < 1:
            raise EvaluationError("features must be [N, ...], got a 0-d tensor")
        self.features = f.detach()
        n = f.shape[0]
        self.pids = _labels(self.pids, "pids", n)
        self.camids = _labels(self.camids, "camids", n)
        self.seqs = None if self.seqs is None else _labels(self.seqs, "seqs", n)
        self.frames = None if self.frames is None else _labels(self.frames, "frames", n)
        if self.times is not None:
            self.times = np.asarray(self.times, dtype=np.float64)
            if self.times.shape != (n,):
                raise EvaluationError(f"times must have shape ({n},), got {self.times.shape}")
        if self.paths is not None:
            self.paths = [str(p) for p in self.paths]
            if len(self.paths) != n:
                raise EvaluationError(f"paths has {len(self.paths)} entries but the features hold {n} images")

    def __len__(self) -> int:
        return self.features.shape[0]


class Matcher:
    """Scores queries against the gallery, one chunk of queries at a time (see the module docstring).

    Subclasses set ``higher_is_better`` (False: :meth:`score` returns distances; True: similarities) and
    implement :meth:`score`; they may override :meth:`features` (what the model computes for each image, e.g.
    feature maps) and :meth:`prepare_gallery` (one-off gallery work, e.g. normalisation). Register one with
    ``@MATCHERS.register("name")``.
    """

    higher_is_better: bool = False

    def features(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, ...]`` of a batch ``images [B, 3, H, W]`` (eval mode, no grad); default ``model(images)``."""
        return model(images)

    def prepare_gallery(self, gallery: FeatureSet) -> None:
        """Called once before any :meth:`score`; the default keeps ``gallery`` as ``self.gallery``."""
        self.gallery = gallery

    def score(self, query: FeatureSet, start: int, end: int) -> torch.Tensor:
        """Scores ``[end - start, Ng]`` of queries ``start..end-1`` against the prepared gallery (any device).

        The tensor may be a buffer reused by the next call: consume it before calling again.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement score(query, start, end)")


@MATCHERS.register("distance")
class FeatureDistance(Matcher):
    """Distance between pooled features ``[N, D]`` (the standard re-ID matcher; registered as ``"distance"``).

    ``cosine``: ``d(q, g) = 1 - q.g / (||q|| ||g||)`` in [0, 2]; ``euclidean``: squared L2
    ``d(q, g) = ||q||^2 + ||g||^2 - 2 q.g`` (same ranking as L2). One matrix product per chunk
    (:func:`.distance.distance_from_prepared`), written into a reused buffer on CPU.

    Args:
        metric: ``"cosine"`` or ``"euclidean"``.

    Raises:
        EvaluationError (a ``ValueError``): unknown metric; (from :meth:`prepare_gallery` / :meth:`score`)
            features that are not ``[N, D]``, or query and gallery dimensions that differ.
    """

    higher_is_better = False

    def __init__(self, metric: str = "cosine"):
        if metric not in METRICS:
            raise EvaluationError(f"unknown metric {metric!r}; expected one of {METRICS}")
        self.metric = metric
        self._gallery: tuple[torch.Tensor, torch.Tensor | None] | None = None  # prepare_features of the gallery
        self._ws = _Workspace()

    def features(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """``model(images)``, which must be ``[B, D]`` (checked on the first batch, not after extraction)."""
        f = model(images)
        if f.ndim != 2:
            raise EvaluationError(f"FeatureDistance needs [B, D] features, the model returned {tuple(f.shape)} "
                                  "in eval mode")
        return f

    def prepare_gallery(self, gallery: FeatureSet) -> None:
        if gallery.features.ndim != 2:
            raise EvaluationError(
                f"FeatureDistance compares pooled [N, D] features, got gallery features of shape "
                f"{tuple(gallery.features.shape)} (the model must return [B, D] in eval mode)"
            )
        self._gallery = prepare_features(gallery.features, self.metric)

    def score(self, query: FeatureSet, start: int, end: int) -> torch.Tensor:
        if self._gallery is None:
            raise EvaluationError("FeatureDistance.score called before prepare_gallery")
        gx = self._gallery[0]
        q = prepare_features(query.features[start:end].to(gx.device), self.metric)
        out = self._ws.get("dist", end - start, gx.shape[0], gx.dtype) if gx.device.type == "cpu" else None
        return distance_from_prepared(q, self._gallery, self.metric, out=out)


class PostProcessor:
    """Re-weights each chunk of scores after the matcher (re-ranking, TLift); register with
    ``@POSTPROCESSORS.register("name")``.

    ``higher_is_better``: convention of the output -- ``None`` (default) keeps the input's, ``False`` / ``True``
    when it returns distances / similarities whatever it was given.
    """

    higher_is_better: bool | None = None
    #: set by :func:`evaluate_matcher` before :meth:`prepare`: the convention of this post-processor's input
    #: (the matcher's, or that of the post-processor before it in the chain)
    input_higher_is_better: bool | None = None

    def prepare(self, query: FeatureSet, gallery: FeatureSet, matcher: Matcher) -> None:
        """Called once, after ``matcher.prepare_gallery``: read stamps (``frames``, ``times``, ``camids``) or
        precompute. ``matcher.higher_is_better`` tells the convention of the scores to come."""

    def __call__(self, scores: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Post-processed ``scores [end - start, Ng]`` of queries ``start..end-1`` (may be modified in place)."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(scores, start, end)")


def _checked(scores, who, start: int, end: int, num_gallery: int) -> torch.Tensor:
    want = (end - start, num_gallery)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != want:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise EvaluationError(
            f"{type(who).__name__} returned scores {got} for queries {start}..{end - 1}; expected {want} "
            "[chunk, num_gallery]"
        )
    return scores


def evaluate_matcher(matcher: Matcher, query: FeatureSet, gallery: FeatureSet, *,
                     postprocessors: Sequence[PostProcessor] = (), chunk_size: int = 256, max_rank: int = 50) -> dict:
    """CMC / mAP / mINP of ``matcher`` (then ``postprocessors``, in order) on ``query`` vs ``gallery``.

    Per chunk of ``chunk_size`` queries: ``matcher.score`` -> each post-processor -> exact positive ranks
    (Market-1501 protocol, Zheng et al. ICCV 2015; ``AP = mean_j (j + 1) / (r_j + 1)`` over the junk-free
    ranks ``r_j`` of the positives, see :mod:`.metrics`). Scores are moved to CPU for ranking; similarities
    are ranked as their negation. Memory: the matcher's chunk plus about ``chunk_size * Ng * 21`` bytes.

    Args:
        matcher: a :class:`Matcher`; ``prepare_gallery(gallery)`` is called first.
        query, gallery: :class:`FeatureSet` of each side.
        postprocessors: :class:`PostProcessor` objects, each ``prepare``-d once then applied to every chunk.
        chunk_size: queries per chunk. max_rank: length of the CMC curve.

    Returns:
        Same dict as :func:`.metrics.evaluate_rank`: ``cmc`` (float64 ``[max_rank]`` fractions, rank-1 at index
        0), ``mAP``, ``mINP`` (fractions), ``num_valid_queries``, ``num_skipped_queries``.

    Raises:
        EvaluationError (a ``ValueError``): ``chunk_size`` or ``max_rank`` < 1, a side that is not a
            :class:`FeatureSet`, scores of the wrong shape (naming the matcher / post-processor), or no valid
            query; plus whatever the matcher raises on its input.
    """
    if chunk_size < 1:
        raise EvaluationError(f"chunk_size must be >= 1, got {chunk_size}")
    for side, fs in (("query", query), ("gallery", gallery)):
        if not isinstance(fs, FeatureSet):
            raise EvaluationError(f"{side} must be a FeatureSet, got {type(fs).__name__}")
    acc = RankAccumulator(max_rank)
    post = list(postprocessors)
    matcher.prepare_gallery(gallery)
    higher = matcher.higher_is_better
    for p in post:
        p.input_higher_is_better = higher  # the convention of the scores p will be given (after the ones before it)
        p.prepare(query, gallery, matcher)
        higher = higher if p.higher_is_better is None else p.higher_is_better
    gal = _GalleryIndex(gallery.pids, gallery.camids)
    ws = _Workspace()
    nq, ng = len(query), len(gallery)
    for s in range(0, nq, chunk_size):
        e = min(s + chunk_size, nq)
        scores = _checked(matcher.score(query, s, e), matcher, s, e, ng)
        for p in post:
            scores = _checked(p(scores, s, e), p, s, e, ng)
        d = scores.detach()
        if not d.is_floating_point() or d.dtype in (torch.float16, torch.bfloat16):
            d = d.float()
        if higher:
            d = d.neg()
        acc.add(*_positive_ranks(d.cpu().contiguous(), query.pids[s:e], query.camids[s:e], gal, ws))
    return acc.result()
