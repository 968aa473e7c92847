"""End-to-end re-ID evaluation: features -> matcher scores -> CMC / mAP, in query chunks (Market-1501 protocol,
Zheng et al. ICCV 2015). The matcher protocol itself is in :mod:`.matchers`."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .features import extract_feature_set
from .matchers import FeatureDistance, FeatureSet, Matcher, PostProcessor, evaluate_matcher
from .metrics import EvaluationError

__all__ = ["evaluate_features", "evaluate_model"]


def _as_features(x, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise EvaluationError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
    return t


def evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, *, metric: str = "cosine",
                      chunk_size: int = 256, max_rank: int = 50) -> dict:
    """CMC / mAP from pooled features, never materialising the full ``Nq x Ng`` distance matrix.

    ``evaluate_matcher(FeatureDistance(metric), ...)``: distances (see :func:`nasreid.evaluation.compute_distance`)
    and the ranking of :func:`evaluate_rank` are computed for ``chunk_size`` queries at a time, so peak memory is
    the features plus about ``chunk_size * Ng * 25`` bytes: an MSMT17-sized problem (11,659 x 82,161, D=512)
    stays well under 4 GB. Distances are computed on the features' device (e.g. CUDA), ranking on CPU.

    Args:
        qf, gf: ``[Nq, D]`` / ``[Ng, D]`` features (tensors or arrays).
        q_pids, g_pids, q_camids, g_camids: integer labels (pid -1 = junk, 0 = distractor).
        metric: ``"cosine"`` or ``"euclidean"`` (squared L2).
        chunk_size: queries per chunk. max_rank: length of the CMC curve.

    Returns:
        Same dict as :func:`evaluate_rank`: ``cmc`` (fractions, rank-1 at index 0), ``mAP``, ``mINP`` (fractions),
        ``num_valid_queries``, ``num_skipped_queries``.

    Raises:
        EvaluationError (a ``ValueError``): bad shapes, unknown metric, ``chunk_size < 1``, or no valid query
        (Market-1501 protocol, Zheng et al. 2015).
    """
    matcher = FeatureDistance(metric)
    query = FeatureSet(_as_features(qf, "qf"), q_pids, q_camids)
    gallery = FeatureSet(_as_features(gf, "gf"), g_pids, g_camids)
    return evaluate_matcher(matcher, query, gallery, chunk_size=chunk_size, max_rank=max_rank)


def evaluate_model(model: torch.nn.Module, query_loader, gallery_loader, *, device="cpu", flip: bool = False,
                   metric: str = "cosine", amp: bool = False, ranks=(1, 5, 10, 20), chunk_size: int = 256,
                   progress: bool = True, matcher: Matcher | None = None,
                   postprocessors: Sequence[PostProcessor] = ()) -> dict:
    """Extract query and gallery features with ``model`` and evaluate them (Market-1501 protocol).

    Loaders yield dicts ``{"img", "pid", "camid", "path"}`` (and ``"index"`` for
    :class:`nasreid.data.ImageDataset`: then the :class:`FeatureSet` s carry the records' ``seqs`` / ``frames``
    / ``times`` for post-processors such as TLift; see :func:`extract_feature_set`).

    Args:
        matcher: a :class:`Matcher`; ``None`` = ``FeatureDistance(metric)``. Its ``features(model, images)``
            computes what is extracted. ``metric`` is ignored when a matcher is given.
        postprocessors: :class:`PostProcessor` s applied, in order, to every chunk of scores.
        Others: see :func:`extract_features` (``device``, ``flip``, ``amp``, ``progress``) and
            :func:`evaluate_matcher` (``chunk_size``).

    Returns:
        ``{"rank1": .., "rank5": .., "rank10": .., "rank20": .., "mAP": .., "mINP": ..}`` in **percent**
        ([0, 100]; one ``rank{k}`` per entry of ``ranks``), plus ``num_query``, ``num_gallery``,
        ``num_valid_queries`` and ``num_skipped_queries`` (queries without any gallery positive -- same pid, other
        camera -- left out of every average; ``num_valid + num_skipped = num_query``).

    Raises:
        EvaluationError (a ``ValueError``): unknown metric, bad ``ranks``, empty loader, features of the wrong
            shape for the matcher, or no valid query.
    """
    ranks = tuple(int(r) for r in ranks)
    if not ranks or min(ranks) < 1:
        raise EvaluationError(f"ranks must be positive integers, got {ranks}")
    matcher = FeatureDistance(metric) if matcher is None else matcher
    kw = dict(forward=matcher.features, device=device, flip=flip, amp=amp, progress=progress)
    query = extract_feature_set(model, query_loader, desc="query", **kw)
    gallery = extract_feature_set(model, gallery_loader, desc="gallery", **kw)
    res = evaluate_matcher(matcher, query, gallery, postprocessors=postprocessors, chunk_size=chunk_size,
                           max_rank=max(ranks))
    out = {f"rank{r}": 100.0 * float(res["cmc"][r - 1]) for r in ranks}
    out["mAP"] = 100.0 * res["mAP"]
    out["mINP"] = 100.0 * res["mINP"]
    out["num_query"] = len(query)
    out["num_gallery"] = len(gallery)
    out["num_valid_queries"] = res["num_valid_queries"]
    out["num_skipped_queries"] = res["num_skipped_queries"]
    return out
