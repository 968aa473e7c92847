"""CMC and mAP for person re-identification (Market-1501 protocol).

Protocol (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015), as used by
Market-1501, DukeMTMC-reID, CUHK03 (new protocol) and MSMT17:

* For a query with identity ``q_pid`` seen by camera ``q_camid``, gallery entries with the same pid *and* the
  same camid are **junk** (excluded from the ranking), and gallery entries with pid ``-1`` are **junk** too.
* **Positives** are gallery entries with the same pid and a different camid (and pid != -1).
* Everything else is a **negative**, distractors (pid ``0``) included: they stay in the ranking.
* A query without any positive is **skipped** (counted in ``num_skipped_queries``); if no query is valid a
  :class:`EvaluationError` (a ``ValueError``) is raised.
* CMC: ``cmc[k]`` = fraction of valid queries whose first positive is within the top ``k + 1`` entries of the
  ranking with junk removed (rank-1 at index 0).
* AP of a query: with the positives in rank order ``j = 0..P-1`` at 0-based ranks ``r_j`` of the junk-free
  ranking, ``AP = mean_j (j + 1) / (r_j + 1)``; mAP is the mean AP over valid queries.
* mINP (Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook", TPAMI 2021):
  ``INP = P / (r_{P-1} + 1)`` (how far down the hardest positive lies); mINP is its mean over valid queries.

All values returned here are **fractions in [0, 1]** (``evaluate_model`` in :mod:`.evaluator` reports percent).

Fast path (:func:`evaluate_rank`)
---------------------------------
CMC, AP and INP need only the ranks of the positives, not a full sort of every gallery row. With the ``P``
positive distances of a query sorted, ``p_0 <= ... <= p_{P-1}``, the junk-free rank of positive ``j`` is
``j + #{negatives ranked before it}``. For a chunk of queries this is computed without Python loops over
queries or gallery entries:

1. each gallery entry gets a *bucket* ``b = #{positives ranked before it}``;
2. a per-query histogram of buckets (``scatter_add``) and its cumulative sum give, for every ``j``, the number
   of entries ranked before positive ``j``;
3. the few non-negatives are taken out again: every same-pid entry (positives and same-camera junk) is
   subtracted, and pid ``-1`` columns go to a bin that is ignored.

Buckets are found with a per-query uniform grid over the positives' distance range: distances are mapped
monotonically onto ~2,048 integer cells (values outside the range are clamped into the end cells); a per-query
lookup table gives the exact bucket of every cell holding no positive, and only the few entries sharing a cell
with a positive are resolved by exact comparisons. Positives' cells are read from the same cell tensor, so the
result is exact whatever the rounding. Rows with nan or infinite positives use :func:`torch.searchsorted`.
The cost is a handful of element-wise passes over the chunk (``O(G)`` per query, no ``O(G log G)`` sort), and
the extra memory is bounded by about ``chunk_size x G x 21`` bytes (reused buffers).

Ties: entries at exactly equal distance are ordered by gallery index, exactly as a stable argsort does, so the
results equal :func:`evaluate_rank_reference` even on tied (e.g. quantised) distances. nan ranks last (after
+inf, ties between nan and +inf by gallery index; numpy puts every nan after every +inf).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nasreid.errors import NasreidError

__all__ = ["evaluate_rank", "evaluate_rank_reference", "RankAccumulator", "EvaluationError"]


class EvaluationError(NasreidError, ValueError):
    """Bad evaluation input: shapes or label lengths that do not match, non-integer labels, an unknown metric,
    ``chunk_size`` / ``max_rank`` / ``ranks`` out of range, a matcher returning scores of the wrong shape, an
    empty loader, or no valid query. The message names the argument and the offending value. A ``ValueError``
    too, so ``except ValueError`` keeps working."""

_GRID_CELLS = 2048  # cells of the per-row grid used to bucket distances (see module docstring)


def _as_int_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise EvaluationError(f"{name} must be 1-D, got shape {a.shape}")
    if a.dtype.kind not in "iub":
        if a.dtype.kind == "f" and np.all(np.equal(np.mod(a, 1), 0)):
            a = a.astype(np.int64)
        else:
            raise EvaluationError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _check_labels(num_q: int, num_g: int, q_pids, g_pids, q_camids, g_camids):
    q_pids = _as_int_array(q_pids, "q_pids")
    g_pids = _as_int_array(g_pids, "g_pids")
    q_camids = _as_int_array(q_camids, "q_camids")
    g_camids = _as_int_array(g_camids, "g_camids")
    if len(q_pids) != num_q or len(q_camids) != num_q:
        raise EvaluationError(
            f"query labels do not match the number of queries {num_q}: "
            f"len(q_pids)={len(q_pids)}, len(q_camids)={len(q_camids)}"
        )
    if len(g_pids) != num_g or len(g_camids) != num_g:
        raise EvaluationError(
            f"gallery labels do not match the gallery size {num_g}: "
            f"len(g_pids)={len(g_pids)}, len(g_camids)={len(g_camids)}"
        )
    return q_pids, g_pids, q_camids, g_camids


class _GalleryIndex:
    """Gallery labels grouped by pid, so that each query finds its same-pid entries without scanning."""

    def __init__(self, g_pids: np.ndarray, g_camids: np.ndarray):
        self.g_pids = g_pids
        self.g_camids = g_camids
        self.num_g = len(g_pids)
        self.order = np.argsort(g_pids, kind="stable")
        sorted_pids = g_pids[self.order]
        self.uniq, self.start, self.count = np.unique(sorted_pids, return_index=True, return_counts=True)
        junk = np.flatnonzero(g_pids == -1)
        # pid -1 columns are junk for every query; None when there is none
        self.junk_cols = torch.from_numpy(junk) if len(junk) else None

    def same_pid(self, q_pids: np.ndarray, q_camids: np.ndarray):
        """Padded [C, E] gallery indices of the same-pid entries of each query, plus masks.

        Returns ``(idx, listed, is_pos)``: ``listed[q, k]`` marks real (non-padding) same-pid entries,
        ``is_pos`` the positives among them (different camera). Queries with pid -1 get no entries.
        """
        c = len(q_pids)
        if len(self.uniq) == 0:
            z = np.zeros((c, 0), dtype=np.int64)
            return z, z.astype(bool), z.astype(bool)
        loc = np.clip(np.searchsorted(self.uniq, q_pids), 0, len(self.uniq) - 1)
        found = (self.uniq[loc] == q_pids) & (q_pids != -1)
        cnt = np.where(found, self.count[loc], 0)
        e = int(cnt.max()) if c else 0
        k = np.arange(e)
        listed = k[None, :] < cnt[:, None]
        pos_in_sorted = self.start[loc][:, None] + np.minimum(k[None, :], np.maximum(cnt - 1, 0)[:, None])
        idx = self.order[pos_in_sorted]
        is_pos = listed & (self.g_camids[idx] != q_camids[:, None])
        return idx, listed, is_pos


def _exact_buckets(pos_sorted: torch.Tensor, pos_cols: torch.Tensor, n_pos: torch.Tensor,
                   vals: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bucket ``#{j < n_pos : (p_j, col_j) < (v, col)}`` (lexicographic) of every entry of ``vals`` [C, K].

    Binary search for the strict part, then a short loop over the (rare) positives at exactly equal distance.
    """
    p = pos_sorted.shape[1]
    vals = vals.contiguous()
    left = torch.searchsorted(pos_sorted, vals)
    right = torch.minimum(torch.searchsorted(pos_sorted, vals, right=True), n_pos.unsqueeze(1))
    ties = (right - left).clamp_(min=0)
    kmax = int(ties.max()) if ties.numel() else 0
    out = left.clone()
    for k in range(kmax):  # tied positives are in column order, so those before `cols` form a prefix
        jj = (left + k).clamp_(max=p - 1)
        out += ((k < ties) & (pos_cols.gather(1, jj) < cols)).to(torch.int64)
    return out


class _Workspace:
    """Reusable ``[chunk, G]`` buffers: large fresh allocations page-fault on every chunk, reuse does not."""

    def __init__(self) -> None:
        self._bufs: dict = {}

    def get(self, name: str, c: int, g: int, dtype) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.shape[1] != g or buf.shape[0] < c:
            buf = torch.empty(c, g, dtype=dtype)
            self._bufs[name] = buf
        return buf[:c]


def _buckets_grid(d: torch.Tensor, pos_sorted: torch.Tensor, pos_cols: torch.Tensor, n_pos: torch.Tensor,
                  junk_cols: torch.Tensor | None, cells: int, ws: _Workspace) -> torch.Tensor | None:
    """Buckets of a whole chunk ``d`` [C, G] (no nan; +-inf allowed) via a per-row uniform grid.

    Same values as :func:`_exact_buckets`, except that the ``junk_cols`` columns get bucket ``P + 1`` (a bin
    that is ignored). Positives must be finite. ``pos_cols[q, j]`` is the gallery column of the ``j``-th
    sorted positive (padding: any column). Returns an int64 [C, G] view of a workspace buffer, or None when the
    grid parameters overflow (the caller then uses the exact path).
    """
    c, g = d.shape
    p = pos_sorted.shape[1]
    has = (n_pos > 0).unsqueeze(1)
    zero = torch.zeros((), dtype=pos_sorted.dtype)
    lo = torch.where(has, pos_sorted[:, :1], zero)
    hi = torch.where(has, pos_sorted.gather(1, (n_pos - 1).clamp(min=0).unsqueeze(1)), zero)
    span = hi - lo
    scale = torch.where(span > 0, cells / span, torch.ones_like(span))
    offset = 1.0 - lo * scale
    if not (bool(torch.isfinite(scale).all()) and bool(torch.isfinite(offset).all())):
        return None  # extreme magnitudes: let the caller use the exact path
    # monotone non-decreasing map d -> cell in [0, cells + 1]: grid over the positives' range, with everything
    # below / above clamped into the end cells (each rounded float op, clamping and truncation are monotone)
    cellf = torch.addcmul(offset, d, scale, out=ws.get("f", c, g, d.dtype))
    cellf.clamp_(0, cells + 1)
    cell = ws.get("i", c, g, torch.int64).copy_(cellf)
    junk_cell = cells + 2
    if junk_cols is not None:
        cell.index_fill_(1, junk_cols, junk_cell)
    # cells of the positives, read from the same tensor, so the two are consistent by construction
    real = torch.arange(p).unsqueeze(0) < n_pos.unsqueeze(1)
    pcell = cell.gather(1, pos_cols).masked_fill_(~real, junk_cell + 1)  # padding -> sentinel cell
    per_cell = torch.zeros(c, junk_cell + 2, dtype=torch.int64).scatter_add_(1, pcell, torch.ones_like(pcell))
    below = per_cell.cumsum(1).sub_(per_cell)  # #positives in strictly lower cells
    # code >= 0: exact bucket of every entry in a cell without positives; < 0: needs refinement
    code = torch.where(per_cell > 0, -1 - below, below)
    code[:, junk_cell] = p + 1
    bucket = torch.gather(code, 1, cell, out=ws.get("o", c, g, torch.int64))
    flat = bucket.view(-1)
    amb = torch.nonzero(torch.lt(flat, 0, out=ws.get("b", c, g, torch.bool).view(-1))).squeeze(1)
    if amb.numel():
        rows = torch.div(amb, g, rounding_mode="floor")
        cols = amb - rows * g
        vals = d[rows, cols]
        base = -1 - flat[amb]
        pcell_amb = pcell[rows, base]  # the cell shared with positive `base`
        k_in = per_cell[rows, pcell_amb]
        res = base.clone()
        for k in range(int(k_in.max())):  # positives sharing the cell are contiguous in sorted order
            jj = (base + k).clamp_(max=p - 1)
            pj = pos_sorted[rows, jj]
            before = (pj < vals) | ((pj == vals) & (pos_cols[rows, jj] < cols))
            res += ((k < k_in) & before).to(torch.int64)
        flat[amb] = res
    return bucket


def _positive_ranks(d: torch.Tensor, q_pids: np.ndarray, q_camids: np.ndarray, gal: _GalleryIndex,
                    ws: _Workspace | None = None):
    """Junk-free 0-based ranks of the positives of each query in the chunk ``d`` [C, G] (not modified).

    Ranks equal those of a stable argsort of each row (ties broken by gallery index).
    Returns ``(n_pos [C] int64, ranks [C, P] int64)``; ``ranks[q, j]`` is valid for ``j < n_pos[q]``.
    """
    ws = ws if ws is not None else _Workspace()
    c, g = d.shape
    idx_np, listed_np, is_pos_np = gal.same_pid(q_pids, q_camids)
    n_pos = torch.from_numpy(is_pos_np.sum(1).astype(np.int64))
    p = int(n_pos.max()) if c else 0
    if p == 0:
        return n_pos, torch.zeros(c, 0, dtype=torch.int64)
    idx = torch.from_numpy(idx_np)  # same-pid columns, ascending within each row
    listed = torch.from_numpy(listed_np)
    is_pos = torch.from_numpy(is_pos_np)
    has_nan = bool(torch.isnan(d.amax()))  # amax propagates nan: one cheap reduction
    if has_nan:  # nan ranks last, like numpy's sort
        d = torch.nan_to_num(d, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    d_same = d.gather(1, idx)  # [C, E] distances to every same-pid entry
    pos_d = d_same.masked_fill(~is_pos, float("inf"))
    # stable sort: equal distances stay in column order, so positives are sorted by (distance, column)
    pos_sorted, order = torch.sort(pos_d, dim=1, stable=True)
    # +inf positives tie with the masked non-positives: move the latter behind, keeping the order otherwise
    _, second = torch.sort((~is_pos.gather(1, order)).to(torch.uint8), dim=1, stable=True)
    order = order.gather(1, second)
    pos_sorted = pos_d.gather(1, order)
    pos_sorted = pos_sorted[:, :p].contiguous()
    pos_cols = idx.gather(1, order[:, :p])
    real = torch.arange(p).unsqueeze(0) < n_pos.unsqueeze(1)
    bucket = None
    if not has_nan and bool(torch.isfinite(pos_sorted[real]).all()):
        bucket = _buckets_grid(d, pos_sorted, pos_cols, n_pos, gal.junk_cols, _GRID_CELLS, ws)
    if bucket is None:  # exact binary search everywhere
        bucket = _exact_buckets(pos_sorted, pos_cols, n_pos, d, torch.arange(g).unsqueeze(0).expand(c, g))
        if gal.junk_cols is not None:
            bucket.index_fill_(1, gal.junk_cols, p + 1)
    ones = torch.ones(1, 1, dtype=torch.int64).expand(c, g)
    hist = torch.zeros(c, p + 2, dtype=torch.int64).scatter_add_(1, bucket, ones)
    del bucket
    # remove every same-pid entry (positives themselves and same-camera junk): they are not negatives
    b_same = _exact_buckets(pos_sorted, pos_cols, n_pos, d_same, idx)
    hist.scatter_add_(1, b_same, -listed.to(torch.int64))
    neg_before = hist.cumsum(1)[:, :p]
    ranks = neg_before + torch.arange(p).unsqueeze(0)
    return n_pos, ranks


@dataclass
class RankAccumulator:
    """Accumulates per-query results chunk by chunk; :meth:`result` returns the metrics dict."""

    max_rank: int
    num_query: int = 0

    def __post_init__(self):
        if self.max_rank < 1:
            raise EvaluationError(f"max_rank must be >= 1, got {self.max_rank}")
        self._first_hist = np.zeros(self.max_rank + 1, dtype=np.int64)
        self._ap_sum = 0.0
        self._inp_sum = 0.0
        self._num_valid = 0

    def add(self, n_pos: torch.Tensor, ranks: torch.Tensor) -> None:
        self.num_query += len(n_pos)
        valid = n_pos > 0
        if not bool(valid.any()):
            return
        n_pos = n_pos[valid]
        ranks = ranks[valid].to(torch.float64)
        p = ranks.shape[1]
        j = torch.arange(p, dtype=torch.float64).unsqueeze(0)
        real = j < n_pos.unsqueeze(1)
        prec = torch.where(real, (j + 1) / (ranks + 1), torch.zeros((), dtype=torch.float64))
        ap = prec.sum(1) / n_pos
        last = ranks.gather(1, (n_pos - 1).unsqueeze(1)).squeeze(1)
        inp = n_pos.to(torch.float64) / (last + 1)
        first = ranks[:, 0].to(torch.int64).clamp_(max=self.max_rank).numpy()
        self._first_hist += np.bincount(first, minlength=self.max_rank + 1)
        self._ap_sum += float(ap.sum())
        self._inp_sum += float(inp.sum())
        self._num_valid += int(valid.sum())

    def result(self) -> dict:
        if self._num_valid == 0:
            raise EvaluationError(
                f"no valid query: none of the {self.num_query} queries has a gallery entry with the same pid "
                "seen by a different camera (check pids/camids, or whether query and gallery were swapped)"
            )
        cmc = np.cumsum(self._first_hist[: self.max_rank]).astype(np.float64) / self._num_valid
        return {
            "cmc": cmc,
            "mAP": self._ap_sum / self._num_valid,
            "mINP": self._inp_sum / self._num_valid,
            "num_valid_queries": self._num_valid,
            "num_skipped_queries": self.num_query - self._num_valid,
        }


def _as_distance_tensor(distmat) -> torch.Tensor:
    if isinstance(distmat, np.ndarray):
        t = torch.from_numpy(distmat if distmat.flags.c_contiguous else np.ascontiguousarray(distmat))
    elif isinstance(distmat, torch.Tensor):
        t = distmat.detach()
        if t.device.type != "cpu":
            t = t.cpu()
    else:
        t = torch.as_tensor(np.asarray(distmat))
    if t.ndim != 2:
        raise EvaluationError(f"distmat must be 2-D [num_query, num_gallery], got shape {tuple(t.shape)}")
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, *, max_rank: int = 50,
                  chunk_size: int = 128) -> dict:
    """CMC and mAP under the Market-1501 protocol, without sorting the gallery.

    Args:
        distmat: ``[Nq, Ng]`` distances (numpy array or CPU/GPU tensor; smaller = more similar). Not modified.
        q_pids, q_camids: ``[Nq]`` integer query identities / cameras.
        g_pids, g_camids: ``[Ng]`` integer gallery identities / cameras; pid ``-1`` = junk, ``0`` = distractor.
        max_rank: length of the returned CMC curve.
        chunk_size: queries processed at once; extra memory is about ``chunk_size * Ng * 21`` bytes.

    Returns:
        ``{"cmc": float64 [max_rank] fractions (rank-1 at index 0), "mAP": float fraction, "mINP": float
        fraction, "num_valid_queries": int, "num_skipped_queries": int}``.

    Raises:
        EvaluationError (a ``ValueError``): wrong shapes / label lengths, ``max_rank < 1``, or no query has a
            valid positive.

    Same numbers as :func:`evaluate_rank_reference` up to float64 rounding (ties are broken by gallery index,
    like a stable argsort; see the module docstring). Protocol: Zheng et al. 2015.
    """
    d = _as_distance_tensor(distmat)
    nq, ng = d.shape
    q_pids, g_pids, q_camids, g_camids = _check_labels(nq, ng, q_pids, g_pids, q_camids, g_camids)
    if chunk_size < 1:
        raise EvaluationError(f"chunk_size must be >= 1, got {chunk_size}")
    gal = _GalleryIndex(g_pids, g_camids)
    acc = RankAccumulator(max_rank)
    ws = _Workspace()
    for s in range(0, nq, chunk_size):
        e = min(s + chunk_size, nq)
        acc.add(*_positive_ranks(d[s:e].contiguous(), q_pids[s:e], q_camids[s:e], gal, ws))
    return acc.result()


def evaluate_rank_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> dict:
    """Textbook Market-1501 evaluation: a plain loop over queries, each row sorted by a stable ``np.argsort``.

    Ground truth for tests and benchmarks of :func:`evaluate_rank` (same arguments and result dict, fractions).
    For each query the gallery is sorted by distance (ties by gallery index), junk entries (same pid and same
    camid, or pid -1) are removed, and CMC / AP / INP are read off the boolean match list.

    Raises:
        EvaluationError (a ``ValueError``): wrong shapes, ``max_rank < 1``, or no query has a valid positive.
    """
    d = distmat.detach().cpu().numpy() if isinstance(distmat, torch.Tensor) else np.asarray(distmat)
    if d.ndim != 2:
        raise EvaluationError(f"distmat must be 2-D [num_query, num_gallery], got shape {d.shape}")
    nq, ng = d.shape
    q_pids, g_pids, q_camids, g_camids = _check_labels(nq, ng, q_pids, g_pids, q_camids, g_camids)
    if max_rank < 1:
        raise EvaluationError(f"max_rank must be >= 1, got {max_rank}")
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(nq):
        order = np.argsort(d[i], kind="stable")
        pid_o, cam_o = g_pids[order], g_camids[order]
        junk = ((pid_o == q_pids[i]) & (cam_o == q_camids[i])) | (pid_o == -1)
        matches = (pid_o[~junk] == q_pids[i]).astype(np.float64)
        if not matches.any():
            continue
        cum = matches.cumsum()
        cmc = np.minimum(cum, 1.0)
        if len(cmc) < max_rank:
            cmc = np.concatenate([cmc, np.ones(max_rank - len(cmc))])
        all_cmc.append(cmc[:max_rank])
        pos_ranks = np.flatnonzero(matches)
        all_ap.append(np.mean(np.arange(1, len(pos_ranks) + 1) / (pos_ranks + 1.0)))
        all_inp.append(len(pos_ranks) / (pos_ranks[-1] + 1.0))
    if not all_cmc:
        raise EvaluationError(
            f"no valid query: none of the {nq} queries has a gallery entry with the same pid "
            "seen by a different camera (check pids/camids, or whether query and gallery were swapped)"
        )
    return {
        "cmc": np.mean(np.asarray(all_cmc), axis=0),
        "mAP": float(np.mean(all_ap)),
        "mINP": float(np.mean(all_inp)),
        "num_valid_queries": len(all_cmc),
        "num_skipped_queries": nq - len(all_cmc),
    }
