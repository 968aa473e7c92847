"""k-reciprocal re-ranking and the k-reciprocal Jaccard distance, memory-bounded and sparse.

Zhong, Zheng, Cao & Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017. For ``N``
items (query and gallery together for re-ranking, an unlabelled training set for clustering) with a distance
``d(p, g)`` (smaller = more alike; it need not be symmetric, row ``p`` ranks from ``p``'s point of view):

* ``N(p, k)``, the k-nearest neighbours (Eq. 3). The item ``p`` itself belongs to the pool, at distance ~0, so
  here ``N(p, k)`` is the ``k + 1`` nearest items of ``p`` **including p** (``p`` normally first), as in the
  authors' code; ties are broken by item index (a stable sort).
* ``R(p, k) = {g in N(p, k) : p in N(g, k)}``, the k-reciprocal nearest neighbours (Eq. 4).
* ``R*(p, k) = R(p, k) + R(q, k/2)`` for every ``q in R(p, k)`` (``p`` included) with
  ``|R(p, k) & R(q, k/2)| >= 2/3 |R(q, k/2)|`` (Eq. 6); ``k/2`` is ``round(k1 / 2)`` (half to even, as
  ``np.around``). The authors' and SpCL's code test ``>`` instead of ``>=``: ``strict_overlap=True``.
* ``V_p`` (Eq. 7): ``V_{p,g} = exp(-d(p, g))`` for ``g in R*(p, k1)``, 0 elsewhere, **normalised to sum 1**
  (as in the authors' code and SpCL / DomainMix, where it is ``softmax(-d)`` over ``R*``); computed as
  ``exp(-(d - min_row d))`` so that large distances do not underflow (the same values mathematically).
* local query expansion (Eq. 10): ``V_p <- mean_{g in N(p, k2)} V_g`` over the ``k2`` nearest items including
  ``p`` (``k2 = 1``: none).
* Jaccard distance (Eq. 11 via Eq. 12): ``d_J(p, g) = 1 - sum_j min(V_pj, V_gj) / sum_j max(V_pj, V_gj)``. With
  ``s = sum_j min`` and ``S_p = sum_j V_pj``, ``sum_j max = S_p + S_g - s``, i.e. ``1 - s / (2 - s)`` for the
  usual rows summing to 1 (the exact general form is used). Pairs whose vectors share no support have
  ``d_J = 1``.
* final distance (Eq. 13): ``d*(p, g) = (1 - lambda) d_J(p, g) + lambda d(p, g)``.

The distance ``d`` is used as given (the paper's Eq. 7 / 13; the authors' code first divides every column by its
maximum). :func:`jaccard_distance` uses SpCL / DomainMix's ``d = 2 - 2 cos`` (squared L2 of L2-normalised
features) by default.

Memory: no ``N x N`` matrix is ever held. :func:`k_reciprocal_encoding` produces distances ``chunk_size`` rows at
a time and keeps only the ``K = max(k1 + 1, k2)`` nearest of each row (ties resolved exactly as a stable
argsort). ``R*`` members outside ``p``'s kept neighbours need ``d(p, g)`` too: from features they are computed
pair by pair; from a ``dist_fn`` (a matcher) a **second pass** re-scores only the chunks holding such rows.
``V`` and its expansion are CSR rows (``V`` has ``|R*(p)|`` non-zeros per row, the expansion at most ``k2``
times that): ``O(N (k1 + 1) k2)`` memory in all (about 1.9 M entries for N = 12,000,
k1 = 30, k2 = 6). Jaccard rows are then computed on demand (:meth:`KReciprocalEncoding.jaccard`,
:meth:`~KReciprocalEncoding.jaccard_dense`), block of rows by block, through the inverted index of the expanded
``V``: for every non-zero ``V_pk`` and every item ``g`` with ``V_gk > 0``, ``min(V_pk, V_gk)`` is added to
``s(p, g)`` in a dense ``[block, N]`` float64 accumulator -- only pairs sharing support are touched. Blocks hold
at most ~256 K such terms and 64 MiB of accumulators, so the temporaries stay at a few tens of MiB whatever N.

Sparsity of the output: two expanded vectors (each ~``k2 |R*|`` non-zeros, ~150 for k1 = 30, k2 = 6) share
support far more often than they are close: for 12,000 512-d features 53 % (clustered) to 86 % (i.i.d. random)
of all pairs share some support, mostly with ``d_J`` near 1 (benchmarks/bench_jaccard.py).
:meth:`KReciprocalEncoding.jaccard` therefore takes ``max_distance``: only pairs with ``d_J <= max_distance``
are stored (the rest read as 1), which is exact for any consumer that only asks ``d_J <= eps`` with
``eps <= max_distance`` (DBSCAN's neighbourhoods) and keeps the matrix at a few entries per row. The
re-ranking post-processor never builds the matrix: it computes the dense ``[chunk, Ng]`` Jaccard block of each
query chunk from the encoding.

Entry points:

* :func:`k_reciprocal_encoding` -- the core, on features or on any ``dist_fn(start, end) -> [end - start, N]``,
  returning a :class:`KReciprocalEncoding` (``.jaccard(rows, cols, max_distance)`` -> :class:`SparseRows`,
  ``.jaccard_dense(rows, cols)`` -> numpy); :func:`k_reciprocal_jaccard` does both steps in one call.
* :func:`jaccard_distance` -- Jaccard distances of a feature set (clustering, e.g. DBSCAN in SpCL / DomainMix,
  ``k1 = 30``, ``k2 = 6``), as a ``scipy.sparse.csr_matrix`` (or dense).
* :class:`KReciprocalRerank` -- the ``"rerank"`` post-processor of :func:`.matchers.evaluate_matcher`, for any
  matcher (feature distance or a learned pairwise matcher such as QAConv).
* :func:`k_reciprocal_reference` -- a dense, literal float64 implementation (test oracle, small ``N``).

DBSCAN on the sparse output (sklearn, ``metric="precomputed"``): a stored entry counts as a neighbour when its
value is ``<= eps`` (explicit zeros included: duplicates at ``d_J = 0`` are kept as stored zeros), an entry not
stored is never a neighbour (sklearn stores the diagonal itself). Since every missing pair has ``d_J = 1`` (or,
with ``max_distance``, more than ``max_distance``), the sparse matrix gives exactly the clustering of the dense
one for any ``eps < 1`` (``eps <= max_distance``; SpCL / DomainMix use ``eps = 0.6``); for ``eps >= 1`` use
``dense=True``. scipy is needed only for :meth:`SparseRows.to_scipy` / :func:`jaccard_distance`'s sparse output.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from nasreid.registry import POSTPROCESSORS

from .distance import METRICS, distance_from_prepared, prepare_features
from .matchers import FeatureSet, Matcher, PostProcessor
from .metrics import EvaluationError

__all__ = [
    "KReciprocalEncoding",
    "KReciprocalRerank",
    "SparseRows",
    "jaccard_distance",
    "k_reciprocal_encoding",
    "k_reciprocal_jaccard",
    "k_reciprocal_reference",
]

_ACC_BYTES = 1 << 26  # dense [block, ncols] float64 accumulator of the Jaccard numerators (64 MiB)
_TERM_BUDGET = 1 << 18  # min(V_pk, V_gk) terms per row block (each term ~ 40 bytes of temporaries)
_BACK_BUDGET = 1 << 20  # elements of the [rows, K, K] reciprocity / [rows, K, Kh, K] overlap tests per block

DistFn = Callable[[int, int], torch.Tensor]


# ---------------------------------------------------------------------------------------------- structures
@dataclass
class SparseRows:
    """Rows of an ``R x C`` matrix in CSR form; entries not stored equal ``fill``.

    Attributes:
        indptr: int64 ``[R + 1]``; row ``r`` is ``indices/data[indptr[r]:indptr[r + 1]]``.
        indices: int64 ``[nnz]`` column of each stored entry, ascending within a row.
        data: float64 ``[nnz]`` stored values.
        shape: ``(R, C)``.
        fill: value of the entries not stored (``1.0`` for Jaccard distances, ``0.0`` for encodings).
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]
    fill: float = 0.0

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def row_nnz(self) -> np.ndarray:
        """Stored entries per row, int64 ``[R]``."""
        return np.diff(self.indptr)

    def to_scipy(self):
        """``scipy.sparse.csr_matrix`` of the stored entries (explicit zeros kept; ``fill`` is *not* applied:
        entries not stored read as 0 in scipy). Needs scipy (a dependency of scikit-learn)."""
        from scipy import sparse

        idx_dtype = np.int32 if max(self.shape[1], self.nnz) < 2**31 else np.int64
        return sparse.csr_matrix((self.data, self.indices.astype(idx_dtype), self.indptr.astype(idx_dtype)),
                                 shape=self.shape)

    def dense_rows(self, start: int, end: int) -> np.ndarray:
        """float64 ``[end - start, C]`` of rows ``start..end-1`` with ``fill`` where nothing is stored."""
        out = np.full((end - start, self.shape[1]), self.fill, dtype=np.float64)
        a, b = int(self.indptr[start]), int(self.indptr[end])
        r = np.repeat(np.arange(end - start), np.diff(self.indptr[start:end + 1]))
        out[r, self.indices[a:b]] = self.data[a:b]
        return out

    def to_dense(self) -> np.ndarray:
        """float64 ``[R, C]`` (``fill`` where nothing is stored)."""
        return self.dense_rows(0, self.shape[0])


# ---------------------------------------------------------------------------------------------- helpers
def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], starts[i] + lengths[i])`` over ``i`` (int64)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths) + np.arange(total)


def _row_blocks(cost: np.ndarray, budget: int, max_rows: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, end)`` blocks of rows with summed ``cost <= budget`` (at least one row each) and at
    most ``max_rows`` rows."""
    n = len(cost)
    blocks, s = [], 0
    cum = np.concatenate(([0], np.cumsum(cost, dtype=np.int64)))
    while s < n:
        e = int(np.searchsorted(cum, cum[s] + budget, side="right")) - 1
        e = min(max(e, s + 1), s + max_rows, n)
        blocks.append((s, e))
        s = e
    return blocks


def _stable_smallest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and values ``[C, k]`` of the ``k`` smallest entries of every row of ``d``, ascending, ties by
    column index: exactly the first ``k`` of a stable argsort of the row."""
    vals = torch.topk(d, k, dim=1, largest=False, sorted=True).values
    t = vals[:, -1:]  # k-th smallest value of each row
    le = d <= t
    if bool((le.sum(1) == k).all()):  # no tie straddles the boundary
        sel = le
    else:  # keep every entry < t and the first (by column) of those == t
        less = d < t
        need = k - less.sum(1, keepdim=True)
        eq = d == t
        sel = less | (eq & (eq.cumsum(1) <= need))
    cols = sel.nonzero()[:, 1].view(d.shape[0], k)  # row-major: ascending column within a row
    v = d.gather(1, cols)
    order = torch.sort(v, dim=1, stable=True).indices
    return cols.gather(1, order), v.gather(1, order)


def _as_distances(d, n_rows: int, n: int, who: str, similarity: bool = False) -> torch.Tensor:
    """Checked float distances; similarities ``s`` become ``1 - s``; nan becomes +inf (ranks last)."""
    if not isinstance(d, torch.Tensor) or tuple(d.shape) != (n_rows, n):
        got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise EvaluationError(f"{who} returned {got}; expected ({n_rows}, {n}) [rows, N]")
    d = d.detach()
    if not d.is_floating_point() or d.dtype in (torch.float16, torch.bfloat16):
        d = d.float()
    if similarity:
        d = 1.0 - d
    inf = float("inf")
    return torch.nan_to_num(d, nan=inf, posinf=inf, neginf=-inf)


def _features_dist_fn(features, metric: str, normalize: bool, device) -> tuple[DistFn, int, Callable]:
    """``(dist_fn, N, pair_fn)`` for features; ``pair_fn(rows, cols)`` gives the distances of single pairs (the
    same formula as the chunks, summed in another order: equal to them up to float rounding)."""
    if metric not in METRICS:
        raise EvaluationError(f"unknown metric {metric!r}; expected one of {METRICS}")
    x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if x.ndim != 2:
        raise EvaluationError(f"features must be 2-D [N, D], got shape {tuple(x.shape)}")
    x = x.detach()
    if device is not None:
        x = x.to(device)
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if normalize:
        x = torch.nn.functional.normalize(x, p=2, dim=1)
    prepared = prepare_features(x, metric)

    def dist_fn(s: int, e: int) -> torch.Tensor:
        return distance_from_prepared((prepared[0][s:e], None if prepared[1] is None else prepared[1][s:e]),
                                      prepared, metric)

    def pair_fn(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows))
        step = max(1, (1 << 22) // max(1, x.shape[1]))  # gathered features: 2 x 16 MiB of float32 at a time
        for a in range(0, len(rows), step):
            r = torch.as_tensor(rows[a:a + step], device=x.device)
            c = torch.as_tensor(cols[a:a + step], device=x.device)
            dot = (prepared[0][r] * prepared[0][c]).sum(1)
            sq = cast(torch.Tensor, prepared[1])  # euclidean: the squared norms (cosine: None, not read)
            d = 1.0 - dot if metric == "cosine" else (sq[r] + sq[c] - 2.0 * dot).clamp_(min=0)
            out[a:a + step] = d.cpu().double().numpy()
        return out

    return dist_fn, x.shape[0], pair_fn


def _reciprocal(knn: np.ndarray, kk: int) -> np.ndarray:
    """``mask[p, j]``: ``knn[p, j]`` is in ``R(p, k)`` (Eq. 4), for the lists ``knn[:, :kk]`` (``kk = k + 1``)."""
    n = knn.shape[0]
    lists = np.ascontiguousarray(knn[:, :kk])
    mask = np.zeros((n, kk), dtype=bool)
    step = max(1, _BACK_BUDGET // (kk * kk))
    for s in range(0, n, step):
        e = min(s + step, n)
        back = lists[lists[s:e]]  # [B, kk, kk]: the lists of p's neighbours
        mask[s:e] = (back == np.arange(s, e)[:, None, None]).any(2)
    return mask


def _k_reciprocal_expansion(knn: np.ndarray, k1: int, strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """``R*(p, k1)`` of every item (Eq. 6) as CSR ``(indptr, indices)``, columns ascending within a row."""
    n = knn.shape[0]
    kk = min(k1 + 1, n)
    kh = min(int(np.around(k1 / 2.0)) + 1, n)
    r1 = _reciprocal(knn, kk)  # [N, kk]
    rh = _reciprocal(knn, kh)  # [N, kh]
    l1 = knn[:, :kk]
    lh = knn[:, :kh]
    rh_size = rh.sum(1)
    keys_all = []
    step = max(1, _BACK_BUDGET // (kk * kh * kk))
    for s in range(0, n, step):
        e = min(s + step, n)
        b1, m1 = l1[s:e], r1[s:e]  # [B, kk]: candidates q of p and whether q is in R(p, k1)
        q_lists, q_mask = lh[b1], rh[b1]  # [B, kk, kh]: R(q, k1/2) of every candidate q
        in_r1 = ((q_lists[..., None] == b1[:, None, None, :]) & m1[:, None, None, :]).any(-1)
        inter = (in_r1 & q_mask).sum(-1)  # |R(p, k1) & R(q, k1/2)|
        size = rh_size[b1]
        ok = 3 * inter > 2 * size if strict else 3 * inter >= 2 * size
        ok &= m1
        rows = np.arange(s, e, dtype=np.int64)
        k_direct = rows[:, None] * n + b1
        added = q_mask & ok[..., None]
        k_added = rows[:, None, None] * n + q_lists
        keys = np.unique(np.concatenate([k_direct[m1], k_added[added]]))
        keys_all.append(keys)
    keys = np.concatenate(keys_all) if keys_all else np.zeros(0, dtype=np.int64)
    rows, cols = np.divmod(keys, n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return indptr, cols


def _gather_rows(m: SparseRows | tuple, rows: np.ndarray) -> np.ndarray:
    """Positions (into indices/data) of the entries of ``rows``, concatenated in the order of ``rows``."""
    indptr = m.indptr if isinstance(m, SparseRows) else m[0]
    return _ranges(indptr[rows], indptr[rows + 1] - indptr[rows])


# ---------------------------------------------------------------------------------------------- core
class KReciprocalEncoding:
    """k-reciprocal encoding of ``N`` items (Eqs. 4-10): the sparse, query-expanded vectors ``V`` from which any
    rows of the Jaccard distance (Eqs. 11-12) are computed on demand. Built by :func:`k_reciprocal_encoding`.

    Memory: ``O(N * (k1 + 1) * k2)`` (the expanded vectors, their inverted index and the neighbour lists); the
    Jaccard rows are produced block by block (:meth:`jaccard`, :meth:`jaccard_dense`).

    Attributes:
        n, k1, k2: sizes (``k2`` clipped to ``N``).
        knn: int64 ``[N, K]`` nearest items of every item, nearest first (``K = min(max(k1 + 1, k2), N)``).
        encoding: ``V`` (Eq. 7) as :class:`SparseRows` (fill 0), ``|R*(p, k1)|`` entries in row ``p``.
        expanded: ``V`` after the local query expansion (Eq. 10); the same object as ``encoding`` if ``k2 = 1``.
        row_total: float64 ``[N]``, ``S_p = sum_j V_pj`` of the expanded vectors (1 up to rounding; 0 for an item
            with an empty ``R*``, possible only with a matcher that does not rank an item first for itself).
        stats: sizes and seconds of the build (``rstar_nnz``, ``max_rstar_row``, ``v_nnz``, ``vqe_nnz``,
            ``max_vqe_row``, ``second_pass_entries`` (distances outside the kept neighbours),
            ``second_pass_chunks`` (chunks re-scored for them; 0 for features, whose pairs are computed directly),
            ``seconds_*``); :meth:`jaccard` adds ``jaccard_*`` entries.
    """

    def __init__(self, knn: np.ndarray, encoding: SparseRows, expanded: SparseRows, k1: int, k2: int,
                 stats: dict):
        self.knn, self.encoding, self.expanded = knn, encoding, expanded
        self.n, self.k1, self.k2 = expanded.shape[0], k1, k2
        self.stats = stats
        lens = expanded.row_nnz()
        self.row_total = np.zeros(self.n)
        if expanded.nnz:
            has = lens > 0
            self.row_total[has] = np.add.reduceat(expanded.data, expanded.indptr[:-1][has])
        self._inverted: dict = {}

    def _inverted_index(self, c0: int, c1: int):
        """For every dimension ``k``: the items ``g in c0..c1-1`` (as ``g - c0``) with ``V_gk != 0`` and the values."""
        key = (c0, c1)
        if key not in self._inverted:
            v = self.expanded
            lens = v.row_nnz()
            a, b = int(v.indptr[c0]), int(v.indptr[c1])
            items = np.repeat(np.arange(c1 - c0, dtype=np.int64), lens[c0:c1])
            dims = v.indices[a:b]
            order = np.argsort(dims, kind="stable")
            ptr = np.zeros(self.n + 1, dtype=np.int64)
            np.cumsum(np.bincount(dims, minlength=self.n), out=ptr[1:])
            self._inverted = {key: (ptr, items[order], v.data[a:b][order])}  # keep one column range only
        return self._inverted[key]

    def _blocks(self, rows: np.ndarray, c0: int, c1: int, max_rows: int | None = None):
        """Yields ``(s, e, smin, smax)``: ``float64 [e - s, c1 - c0]`` sums of min / max (Eq. 12) of the rows
        ``rows[s:e]`` against items ``c0..c1-1``; ``smin`` is 0 exactly where the supports do not meet."""
        v = self.expanded
        ncols = c1 - c0
        ptr, inv_items, inv_vals = self._inverted_index(c0, c1)
        inv_len = np.diff(ptr)
        lens = v.row_nnz()
        cum = np.concatenate(([0], np.cumsum(inv_len[v.indices], dtype=np.int64)))
        cost = cum[v.indptr[rows + 1]] - cum[v.indptr[rows]]  # min() terms of each row
        cap = max(1, _ACC_BYTES // (16 * max(ncols, 1)))
        for s, e in _row_blocks(cost, _TERM_BUDGET, cap if max_rows is None else min(cap, max_rows)):
            blk = rows[s:e]
            pos = _gather_rows(v, blk)  # entries (p, k, V_pk) of the block's rows
            dims = v.indices[pos]
            rep = inv_len[dims]
            ipos = _ranges(ptr[dims], rep)  # every g with V_gk != 0, for every (p, k)
            mins = np.minimum(np.repeat(v.data[pos], rep), inv_vals[ipos])
            key = np.repeat(np.repeat(np.arange(e - s, dtype=np.int64) * ncols, lens[blk]), rep)
            key += inv_items[ipos]
            smin = np.bincount(key, weights=mins, minlength=(e - s) * ncols).reshape(e - s, ncols)
            # Eq. 12's denominator: sum_j max(V_pj, V_gj) = S_p + S_g - sum_j min(V_pj, V_gj)
            smax = self.row_total[blk][:, None] + self.row_total[None, c0:c1] - smin
            yield s, e, smin, smax

    @staticmethod
    def _dj(smin: np.ndarray, smax: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            dj = 1.0 - smin / smax
        dj[~(smin > 0)] = 1.0  # no shared support (also 0 / 0 for two empty encodings)
        return np.clip(dj, 0.0, 1.0, out=dj)

    def _rows_cols(self, rows, cols) -> tuple[np.ndarray, int, int]:
        n = self.n
        r = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(r) and (r.min() < 0 or r.max() >= n):
            raise EvaluationError(f"rows must lie in 0..{n - 1}")
        c0, c1 = (0, n) if cols is None else (int(cols[0]), int(cols[1]))
        if not 0 <= c0 <= c1 <= n:
            raise EvaluationError(f"cols must be (start, stop) with 0 <= start <= stop <= {n}, got {cols!r}")
        return r, c0, c1

    def jaccard(self, rows=None, cols: tuple[int, int] | None = None,
                max_distance: float | None = None) -> SparseRows:
        """Jaccard distances (Eqs. 11-12) of ``rows`` (item indices, default all) against items ``cols =
        (start, stop)`` (default all; output column ``j`` is item ``start + j``), as :class:`SparseRows` with
        ``fill = 1``: stored are the pairs whose expanded vectors share support (the diagonal included), and
        with ``max_distance`` only those with ``d_J <= max_distance`` (the others read as 1: exact for any use
        that only asks whether ``d_J <= eps`` with ``eps <= max_distance``, e.g. DBSCAN)."""
        t0 = time.perf_counter()
        r, c0, c1 = self._rows_cols(rows, cols)
        ind_parts, dat_parts = [], []
        cnt = np.zeros(len(r), dtype=np.int64)
        for s, e, smin, smax in self._blocks(r, c0, c1):
            keep = smin > 0
            if max_distance is not None:
                # d_J <= t  <=>  smin >= (1 - t) smax, tested on the computed d_J itself for consistency
                keep &= self._dj(smin, smax) <= max_distance
            rr, cc = np.nonzero(keep)
            ind_parts.append(cc.astype(np.int64))
            dat_parts.append(self._dj(smin[rr, cc], smax[rr, cc]))
            cnt[s:e] = np.bincount(rr, minlength=e - s)
        indptr = np.zeros(len(r) + 1, dtype=np.int64)
        np.cumsum(cnt, out=indptr[1:])
        out = SparseRows(indptr, np.concatenate(ind_parts) if ind_parts else np.zeros(0, np.int64),
                         np.concatenate(dat_parts) if dat_parts else np.zeros(0), (len(r), c1 - c0), 1.0)
        self.stats.update(jaccard_nnz=out.nnz, max_jaccard_row=int(out.row_nnz().max()) if len(r) else 0,
                          seconds_jaccard=time.perf_counter() - t0)
        return out

    def jaccard_dense(self, rows=None, cols: tuple[int, int] | None = None) -> np.ndarray:
        """Dense float64 ``[len(rows), stop - start]`` Jaccard distances (1 where supports do not meet)."""
        r, c0, c1 = self._rows_cols(rows, cols)
        out = np.empty((len(r), c1 - c0))
        for s, e, smin, smax in self._blocks(r, c0, c1):
            out[s:e] = self._dj(smin, smax)
        return out


def k_reciprocal_encoding(source, n: int | None = None, k1: int = 20, k2: int = 6, *, chunk_size: int = 256,
                          metric: str = "euclidean", normalize: bool = True, device=None,
                          strict_overlap: bool = False) -> KReciprocalEncoding:
    """Neighbours, ``R*`` sets and expanded k-reciprocal vectors (Eqs. 4, 6, 7, 10) without any ``N x N`` matrix.

    Args:
        source: either ``dist_fn(start, end) -> tensor [end - start, N]`` of distances (rows ``start..end-1``
            against all ``N`` items, any device; smaller = more alike; nan counts as +inf; the tensor is read
            before the next call), or features ``[N, D]`` (tensor or array), compared with ``metric``.
        n: number of items ``N`` (required with a ``dist_fn``; taken from the features otherwise).
        k1: ``k`` of ``R(p, k)`` / ``R*(p, k)``. k2: neighbours averaged by the query expansion (1: none).
        chunk_size: rows per call of ``dist_fn`` (memory: ``chunk_size x N`` distances plus a few masks).
        metric, normalize, device: for feature input only: ``"euclidean"`` (the *squared* L2 distance) after L2
            normalisation is SpCL / DomainMix's ``2 - 2 cos`` (default); ``device`` holds features and distances.
        strict_overlap: Eq. 6 with ``>`` (authors' / SpCL code) instead of the paper's ``>=``.

    Returns:
        :class:`KReciprocalEncoding`.

    Raises:
        EvaluationError (a ``ValueError``): ``k1``/``k2``/``chunk_size`` not integers >= 1, ``n`` missing or < 1,
            a ``dist_fn`` returning the wrong shape, bad features or metric.
    """
    t0 = time.perf_counter()
    for name, arg in (("k1", k1), ("k2", k2), ("chunk_size", chunk_size)):
        if isinstance(arg, bool) or int(arg) != arg or arg < 1:
            raise EvaluationError(f"{name} must be an integer >= 1, got {arg!r}")
    k1, k2, chunk_size = int(k1), int(k2), int(chunk_size)
    if callable(source):
        if n is None or int(n) < 1:
            raise EvaluationError(f"a dist_fn needs n >= 1 (the number of items), got {n!r}")
        dist_fn, n, pair_fn = source, int(n), None
    else:
        dist_fn, nf, pair_fn = _features_dist_fn(source, metric, normalize, device)
        if n is not None and int(n) != nf:
            raise EvaluationError(f"n={n} but the features hold {nf} items")
        n = nf
        if n < 1:
            raise EvaluationError("features hold no item")
    K = min(max(k1 + 1, k2), n)
    k2 = min(k2, n)
    stats: dict = {"n": n, "k1": k1, "k2": k2}

    # ---- pass 1: the K nearest of every item, chunk by chunk
    knn = np.empty((n, K), dtype=np.int64)
    knd = np.empty((n, K), dtype=np.float64)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        d = _as_distances(dist_fn(s, e), e - s, n, "dist_fn")
        idx, val = _stable_smallest(d, K)
        knn[s:e] = idx.cpu().numpy()
        knd[s:e] = val.cpu().double().numpy()
        del d, idx, val
    t1 = time.perf_counter()

    # ---- R*(p, k1) (Eqs. 4, 6)
    r_indptr, r_cols = _k_reciprocal_expansion(knn, k1, strict_overlap)
    counts = np.diff(r_indptr)
    r_rows = np.repeat(np.arange(n, dtype=np.int64), counts)
    stats["rstar_nnz"] = len(r_cols)
    stats["max_rstar_row"] = int(counts.max())
    t2 = time.perf_counter()

    # ---- d(p, g) on R*: from the kept neighbours; the rest pair by pair (features) or by a second pass over the
    # chunks that need it (dist_fn: bitwise the values of pass 1 for a deterministic dist_fn)
    rkeys = r_rows * n + r_cols
    kkeys = (np.arange(n, dtype=np.int64)[:, None] * n + knn).ravel()
    korder = np.argsort(kkeys, kind="stable")
    ksorted = kkeys[korder]
    pos = np.minimum(np.searchsorted(ksorted, rkeys), len(ksorted) - 1)
    found = ksorted[pos] == rkeys
    rd = np.empty(len(rkeys), dtype=np.float64)
    rd[found] = knd.ravel()[korder[pos[found]]]
    missing = np.flatnonzero(~found)
    chunks_redone = 0
    if len(missing) and pair_fn is not None:  # features: those pairs directly
        rd[missing] = pair_fn(r_rows[missing], r_cols[missing])
    elif len(missing):
        m_chunk = r_rows[missing] // chunk_size
        for c in np.unique(m_chunk):
            s, e = int(c) * chunk_size, min((int(c) + 1) * chunk_size, n)
            sel = missing[m_chunk == c]
            d = _as_distances(dist_fn(s, e), e - s, n, "dist_fn")
            ri = torch.as_tensor(r_rows[sel] - s, device=d.device)
            ci = torch.as_tensor(r_cols[sel], device=d.device)
            rd[sel] = d[ri, ci].cpu().double().numpy()
            chunks_redone += 1
            del d
    stats["second_pass_chunks"] = chunks_redone
    stats["second_pass_entries"] = len(missing)
    t3 = time.perf_counter()

    # ---- V (Eq. 7): exp(-d) on R*, normalised per row, as exp(-(d - min_row d)) against underflow
    has = counts > 0
    starts = r_indptr[:-1][has]
    row_min = np.full(n, np.inf)
    row_sum = np.zeros(n)
    if len(rd):
        row_min[has] = np.minimum.reduceat(rd, starts)
    m_rep = np.repeat(row_min, counts)
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.where(np.isinf(m_rep), 1.0, np.exp(-(rd - m_rep)))  # a row of +inf distances: equal weights
    w = np.nan_to_num(w, nan=0.0)
    if len(w):
        row_sum[has] = np.add.reduceat(w, starts)
    v = SparseRows(r_indptr, r_cols, w / np.repeat(np.where(row_sum > 0, row_sum, 1.0), counts), (n, n), 0.0)
    stats["v_nnz"] = v.nnz

    # ---- local query expansion (Eq. 10): mean of V over the k2 nearest (p included)
    vqe = _expand(v, knn[:, :k2]) if k2 > 1 else v
    stats["vqe_nnz"] = vqe.nnz
    stats["max_vqe_row"] = int(vqe.row_nnz().max())
    t4 = time.perf_counter()
    stats.update(seconds_neighbours=t1 - t0, seconds_expansion=t2 - t1, seconds_second_pass=t3 - t2,
                 seconds_encoding=t4 - t3, seconds_build=t4 - t0)
    return KReciprocalEncoding(knn, v, vqe, k1, k2, stats)


def k_reciprocal_jaccard(source, n: int | None = None, k1: int = 20, k2: int = 6, *, chunk_size: int = 256,
                         rows=None, cols: tuple[int, int] | None = None, max_distance: float | None = None,
                         **kwargs) -> SparseRows:
    """k-reciprocal Jaccard distances (Eqs. 4-12), memory-bounded and sparse:
    ``k_reciprocal_encoding(source, n, k1, k2, chunk_size=..., **kwargs).jaccard(rows, cols, max_distance)``.

    Returns a :class:`SparseRows` (CSR, ``fill = 1``): row ``r`` is item ``rows[r]`` (default all items), column
    ``j`` item ``cols[0] + j``; stored are the pairs whose expanded encodings share support (with
    ``max_distance``: only those with ``d_J <= max_distance``); every other pair has ``d_J = 1``. ``kwargs``:
    ``metric``, ``normalize``, ``device``, ``strict_overlap`` of :func:`k_reciprocal_encoding`.
    """
    enc = k_reciprocal_encoding(source, n, k1, k2, chunk_size=chunk_size, **kwargs)
    return enc.jaccard(rows, cols, max_distance)


def _expand(v: SparseRows, nbrs: np.ndarray) -> SparseRows:
    """Row ``p`` = mean of the rows ``nbrs[p]`` of ``v`` (CSR in, CSR out), row blocks bounded in terms."""
    n, k2 = nbrs.shape
    lens = v.row_nnz()
    cost = lens[nbrs].sum(1)
    ind_parts, dat_parts, cnt = [], [], np.zeros(n, dtype=np.int64)
    for s, e in _row_blocks(cost, _TERM_BUDGET, n):
        src = nbrs[s:e].ravel()
        pos = _gather_rows(v, src)
        p_rep = np.repeat(np.repeat(np.arange(s, e, dtype=np.int64), k2), lens[src])
        keys = p_rep * n + v.indices[pos]
        order = np.argsort(keys, kind="stable")  # duplicates keep neighbour order
        ks = keys[order]
        first = np.flatnonzero(np.concatenate(([True], ks[1:] != ks[:-1]))) if len(ks) else np.zeros(0, np.int64)
        sums = np.add.reduceat(v.data[pos][order] / k2, first) if len(ks) else np.zeros(0)
        r, c = np.divmod(ks[first], n)
        ind_parts.append(c)
        dat_parts.append(sums)
        cnt += np.bincount(r, minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(cnt, out=indptr[1:])
    return SparseRows(indptr, np.concatenate(ind_parts) if ind_parts else np.zeros(0, np.int64),
                      np.concatenate(dat_parts) if dat_parts else np.zeros(0), (n, n), 0.0)


# ---------------------------------------------------------------------------------------------- clustering
def jaccard_distance(features, k1: int = 30, k2: int = 6, *, max_distance: float | None = None,
                     chunk_size: int = 1024, device=None, metric: str = "euclidean", normalize: bool = True,
                     strict_overlap: bool = False, dense: bool = False):
    """k-reciprocal Jaccard distance between all pairs of ``features [N, D]`` (for clustering).

    Defaults follow SpCL / DomainMix (``k1 = 30``, ``k2 = 6``, ``d = 2 - 2 cos``: squared L2 of L2-normalised
    features), with the paper's ``>=`` 2/3 rule (``strict_overlap=True`` for the public code's ``>``).

    Args:
        features: ``[N, D]`` tensor or array.
        max_distance: store only pairs with ``d_J <= max_distance`` (the rest read as 1). Give DBSCAN's ``eps``
            (or more): the clustering is the same and the matrix far smaller (without it almost every pair of
            random features shares some support). Ignored with ``dense=True``.
        chunk_size: rows of distances per step (``chunk_size x N`` float32 at a time). device: where the
            distances are computed (e.g. ``"cuda"``); the sparse work runs on the CPU.
        metric / normalize / strict_overlap: see :func:`k_reciprocal_encoding`.
        dense: return a dense float64 ``[N, N]`` numpy array instead (``N^2 * 8`` bytes: small ``N`` only).

    Returns:
        ``scipy.sparse.csr_matrix`` float64 ``[N, N]`` (columns sorted in each row) holding ``d_J`` for every pair
        whose expanded encodings share support (and ``d_J <= max_distance``), the diagonal (~0) included;
        **every pair not stored has distance 1** (scipy reads it as 0, so do not densify with ``.toarray()``:
        use ``dense=True``). Symmetric up to rounding. Feed it to
        ``sklearn.cluster.DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(d)``: a stored entry
        ``<= eps`` (explicit zeros too) is a neighbour, a missing one never is -- the same clustering as the
        dense matrix for any ``eps < 1`` (``eps <= max_distance``).
    """
    enc = k_reciprocal_encoding(features, None, k1, k2, chunk_size=chunk_size, device=device, metric=metric,
                                normalize=normalize, strict_overlap=strict_overlap)
    return enc.jaccard_dense() if dense else enc.jaccard(max_distance=max_distance).to_scipy()


# ---------------------------------------------------------------------------------------------- re-ranking
def _concat(query: FeatureSet, gallery: FeatureSet) -> FeatureSet:
    """query followed by gallery as one :class:`FeatureSet` (optional fields kept when both sides have them)."""
    qf, gf = query.features, gallery.features
    if qf.shape[1:] != gf.shape[1:]:
        raise EvaluationError(f"re-ranking needs query and gallery features of one shape per image, got "
                              f"{tuple(qf.shape[1:])} and {tuple(gf.shape[1:])}")
    if gf.device != qf.device:
        gf = gf.to(qf.device)
    if gf.dtype != qf.dtype:
        dt = torch.promote_types(qf.dtype, gf.dtype)
        qf, gf = qf.to(dt), gf.to(dt)

    def both(a, b):
        return None if a is None or b is None else np.concatenate([a, b])

    return FeatureSet(
        torch.cat([qf, gf]), np.concatenate([query.pids, gallery.pids]),
        np.concatenate([query.camids, gallery.camids]), seqs=both(query.seqs, gallery.seqs),
        frames=both(query.frames, gallery.frames), times=both(query.times, gallery.times),
        paths=None if query.paths is None or gallery.paths is None else list(query.paths) + list(gallery.paths),
    )


@POSTPROCESSORS.register("rerank")
class KReciprocalRerank(PostProcessor):
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) as a row post-processor: ``d* = (1 - lambda) d_J +
    lambda d`` (Eq. 13) for every query x gallery pair; see the module docstring.

    :meth:`prepare` scores query + gallery against itself **through the matcher** (so it works for any matcher:
    feature distance, QAConv ...): ``matcher.prepare_gallery(query + gallery)``, then ``matcher.score`` chunk by
    chunk keeping each row's ``k1 + 1`` nearest (plus a second pass over the chunks with ``R*`` members outside
    them), then ``matcher.prepare_gallery(gallery)`` again to restore the matcher. It keeps only the sparse
    encoding of the ``Nq + Ng`` items (``O((Nq + Ng) (k1 + 1) k2)``, ~2 M entries for Market-1501);
    :meth:`__call__` computes the chunk's ``[chunk, Ng]`` Jaccard block from it (the same values whatever the
    chunking), then Eq. 13. Place it first in the chain (or give ``input_higher_is_better``).

    Similarities (``higher_is_better`` input) become distances ``d = 1 - s`` (cosine similarity -> cosine
    distance). Any per-row offset gives the same result up to that offset in ``lambda d``: ``V`` is normalised
    per row and the neighbour rankings do not move. The ``lambda d`` term uses the scores this post-processor
    is given, converted the same way. Output: distances (``higher_is_better = False``) in the dtype of the
    input (at least float32), on its device.

    Args:
        k1: 20, k2: 6, lambda_value: 0.3 -- the paper's defaults (``lambda_value = 0``: Jaccard only).
        chunk_size: rows per ``matcher.score`` call of the neighbour pass over the ``Nq + Ng`` items.
        strict_overlap: Eq. 6 with ``>`` (authors' code) instead of ``>=``.
        input_higher_is_better: convention of the incoming scores when it is not the matcher's (e.g. after a
            post-processor that changes it); ``None``: the matcher's.

    Raises:
        EvaluationError (a ``ValueError``): ``k1``/``k2``/``chunk_size`` < 1, ``lambda_value`` outside [0, 1];
            from :meth:`prepare`, query/gallery features of different per-image shapes or matcher scores of the
            wrong shape; from :meth:`__call__`, use before :meth:`prepare` or a chunk of the wrong shape.
    """

    higher_is_better = False

    def __init__(self, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *, chunk_size: int = 256,
                 strict_overlap: bool = False, input_higher_is_better: bool | None = None):
        for name, v in (("k1", k1), ("k2", k2), ("chunk_size", chunk_size)):
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise EvaluationError(f"rerank {name} must be an integer >= 1, got {v!r}")
        if not (isinstance(lambda_value, (int, float)) and 0.0 <= float(lambda_value) <= 1.0):
            raise EvaluationError(f"rerank lambda_value must be in [0, 1], got {lambda_value!r}")
        self.k1, self.k2, self.lambda_value = int(k1), int(k2), float(lambda_value)
        self.chunk_size = int(chunk_size)
        self.strict_overlap = bool(strict_overlap)
        self.input_higher_is_better = input_higher_is_better
        self._encoding: KReciprocalEncoding | None = None
        self._nq = 0
        self._incoming = False
        self.stats: dict = {}

    def __repr__(self) -> str:
        return f"KReciprocalRerank(k1={self.k1}, k2={self.k2}, lambda_value={self.lambda_value:g})"

    def prepare(self, query: FeatureSet, gallery: FeatureSet, matcher: Matcher) -> None:
        """k-reciprocal encoding of query + gallery through ``matcher`` (see the class docstring); the matcher is
        left prepared on ``gallery``, also when this raises."""
        nq, ng = len(query), len(gallery)
        both = _concat(query, gallery)
        n = nq + ng
        higher = bool(matcher.higher_is_better)

        def dist_fn(s: int, e: int) -> torch.Tensor:
            # a new tensor (the matcher may reuse its buffer): 1 - s for similarities, nan -> +inf
            return _as_distances(matcher.score(both, s, e), e - s, n, f"{type(matcher).__name__}.score", higher)

        self._encoding = None
        matcher.prepare_gallery(both)
        try:
            enc = k_reciprocal_encoding(dist_fn, n, self.k1, self.k2, chunk_size=self.chunk_size,
                                        strict_overlap=self.strict_overlap)
        finally:
            matcher.prepare_gallery(gallery)
        self._encoding, self._nq = enc, nq
        self.stats = enc.stats
        self._incoming = higher if self.input_higher_is_better is None else bool(self.input_higher_is_better)

    def __call__(self, scores: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Re-ranked distances ``[end - start, Ng]`` of queries ``start..end-1`` (a new tensor)."""
        enc = self._encoding
        if enc is None:
            raise EvaluationError("KReciprocalRerank called before prepare(query, gallery, matcher)")
        nq, ng = self._nq, enc.n - self._nq
        if tuple(scores.shape) != (end - start, ng) or not 0 <= start <= end <= nq:
            raise EvaluationError(f"rerank got scores {tuple(scores.shape)} for queries {start}..{end - 1}; "
                                  f"expected ({end - start}, {ng}) within the {nq} prepared queries")
        d = scores.detach()
        if not d.is_floating_point() or d.dtype in (torch.float16, torch.bfloat16):
            d = d.float()
        if self._incoming:
            d = 1.0 - d
        jac_np = enc.jaccard_dense(np.arange(start, end), (nq, enc.n))  # float64 [chunk, Ng], 1 off the support
        jac = torch.from_numpy(jac_np).to(device=d.device, dtype=d.dtype)
        lam = self.lambda_value
        return jac.mul_(1.0 - lam).add_(d, alpha=lam)


# ---------------------------------------------------------------------------------------------- reference
def k_reciprocal_reference(dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                           strict_overlap: bool = False, return_jaccard: bool = False):
    """Dense, literal float64 k-reciprocal re-ranking of a full distance matrix (test oracle; ``O(N^3)``).

    Same definitions as the module docstring, written out step by step with Python sets: ``N(p, k)`` = first
    ``k + 1`` of a stable argsort of row ``p``; ``R`` (Eq. 4); ``R*`` (Eq. 6, ``>=`` unless ``strict_overlap``);
    ``V_p = exp(-d(p, R*)) / sum`` (Eq. 7, normalised); ``V_p <- mean of V over N(p, k2 - 1)`` (Eq. 10);
    ``d_J = 1 - sum min / sum max`` over all ``N`` entries (Eqs. 11-12); ``(1 - lambda) d_J + lambda d``
    (Eq. 13).

    Args:
        dist: ``[N, N]`` distances (row ``p`` ranks from ``p``). k1, k2, lambda_value: as the paper.

    Returns:
        float64 ``[N, N]`` final distances, or ``(final, jaccard)`` with ``return_jaccard=True``.
    """
    d = np.asarray(dist, dtype=np.float64)
    n = d.shape[0]
    order = np.argsort(d, axis=1, kind="stable")

    def nn(p, k):
        return set(order[p, :min(k + 1, n)].tolist())

    def recip(p, k):
        return {g for g in nn(p, k) if p in nn(g, k)}

    half = int(np.around(k1 / 2.0))
    v = np.zeros((n, n))
    for p in range(n):
        r = recip(p, k1)
        rstar = set(r)
        for q in r:
            rq = recip(q, half)
            inter = len(r & rq)  # the 2/3 rule in exact integers: 3 |R & Rq| >= 2 |Rq|
            if (3 * inter > 2 * len(rq)) if strict_overlap else (3 * inter >= 2 * len(rq)):
                rstar |= rq
        idx = sorted(rstar)
        w = np.exp(-d[p, idx])
        v[p, idx] = w / w.sum()
    kk2 = min(k2, n)
    v_qe = np.stack([v[order[p, :kk2]].mean(axis=0) for p in range(n)]) if kk2 > 1 else v
    jac = np.empty((n, n))
    for p in range(n):
        mins = np.minimum(v_qe[p][None, :], v_qe).sum(1)
        maxs = np.maximum(v_qe[p][None, :], v_qe).sum(1)
        jac[p] = 1.0 - mins / maxs
    final = (1.0 - lambda_value) * jac + lambda_value * d
    return (final, jac) if return_jaccard else final
