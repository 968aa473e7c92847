"""End-to-end re-ID evaluation: features -> distances -> CMC / mAP, in query chunks."""
from __future__ import annotations

import numpy as np
import torch

from .distance import distance_from_prepared, prepare_features
from .features import extract_features
from .metrics import RankAccumulator, _check_labels, _GalleryIndex, _positive_ranks, _Workspace

__all__ = ["evaluate_features", "evaluate_model"]


def _as_features(x, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
    return t


def evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, *, metric: str = "cosine",
                      chunk_size: int = 256, max_rank: int = 50) -> dict:
    """CMC / mAP from features, never materialising the full ``Nq x Ng`` distance matrix.

    Distances (see :func:`nasreid.evaluation.compute_distance`) and the ranking of :func:`evaluate_rank` are
    computed for ``chunk_size`` queries at a time, so peak memory is the features plus about
    ``chunk_size * Ng * 25`` bytes: an MSMT17-sized problem (11,659 x 82,161, D=512) stays well under 4 GB.
    Distances are computed on the features' device (e.g. CUDA), ranking on CPU.

    Args:
        qf, gf: ``[Nq, D]`` / ``[Ng, D]`` features (tensors or arrays).
        q_pids, g_pids, q_camids, g_camids: integer labels (pid -1 = junk, 0 = distractor).
        metric: ``"cosine"`` or ``"euclidean"`` (squared L2).
        chunk_size: queries per chunk. max_rank: length of the CMC curve.

    Returns:
        Same dict as :func:`evaluate_rank`: ``cmc`` (fractions, rank-1 at index 0), ``mAP``, ``mINP`` (fractions),
        ``num_valid_queries``, ``num_skipped_queries``.

    Raises:
        ValueError: bad shapes, unknown metric, ``chunk_size < 1``, or no valid query (Market-1501 protocol,
        Zheng et al. 2015).
    """
    qf = _as_features(qf, "qf")
    gf = _as_features(gf, "gf")
    nq, ng = qf.shape[0], gf.shape[0]
    q_pids, g_pids, q_camids, g_camids = _check_labels(nq, ng, q_pids, g_pids, q_camids, g_camids)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    gprep = prepare_features(gf, metric)
    gal = _GalleryIndex(g_pids, g_camids)
    acc = RankAccumulator(max_rank)
    ws = _Workspace()
    on_cpu = gf.device.type == "cpu"
    for s in range(0, nq, chunk_size):
        e = min(s + chunk_size, nq)
        qprep = prepare_features(qf[s:e].to(gf.device), metric)
        out = ws.get("dist", e - s, ng, gprep[0].dtype) if on_cpu else None
        d = distance_from_prepared(qprep, gprep, metric, out=out)
        if not on_cpu:
            d = d.float().cpu()
        acc.add(*_positive_ranks(d, q_pids[s:e], q_camids[s:e], gal, ws))
    return acc.result()


def evaluate_model(model: torch.nn.Module, query_loader, gallery_loader, *, device="cpu", flip: bool = False,
                   metric: str = "cosine", amp: bool = False, ranks=(1, 5, 10, 20), chunk_size: int = 256,
                   progress: bool = True) -> dict:
    """Extract query and gallery features with ``model`` and evaluate them (Market-1501 protocol).

    Loaders yield dicts ``{"img", "pid", "camid", "path"}`` (see :func:`extract_features`).

    Returns:
        ``{"rank1": .., "rank5": .., "rank10": .., "rank20": .., "mAP": .., "mINP": ..}`` in **percent**
        ([0, 100]; one ``rank{k}`` per entry of ``ranks``), plus ``num_query``, ``num_gallery`` and
        ``num_valid_queries``.

    Raises:
        ValueError: empty loader, bad ``ranks``, or no valid query.
    """
    ranks = tuple(int(r) for r in ranks)
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    qf, q_pids, q_camids, _ = extract_features(model, query_loader, device=device, flip=flip, amp=amp,
                                               progress=progress, desc="query")
    gf, g_pids, g_camids, _ = extract_features(model, gallery_loader, device=device, flip=flip, amp=amp,
                                               progress=progress, desc="gallery")
    res = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, metric=metric, chunk_size=chunk_size,
                            max_rank=max(ranks))
    out = {f"rank{r}": 100.0 * float(res["cmc"][r - 1]) for r in ranks}
    out["mAP"] = 100.0 * res["mAP"]
    out["mINP"] = 100.0 * res["mINP"]
    out["num_query"] = int(len(q_pids))
    out["num_gallery"] = int(len(g_pids))
    out["num_valid_queries"] = res["num_valid_queries"]
    return out
