"""Temporal Lifting (TLift): model-free temporal co-occurrence re-weighting of re-ID scores.

Liao & Shao, "Interpretable and Generalizable Person Re-Identification with Query-Adaptive Convolution and
Temporal Lifting", ECCV 2020, Sec. 4. People walking near each other in one camera are likely still near each
other in another one, so the best matches of a query's *nearby persons* act as temporal pivots in each
gallery camera: gallery images close in time to the pivots are lifted, those far from every pivot suppressed.
No transition-time model is learned; everything is computed on the fly from the query and gallery stamps.

For a query ``A`` of camera ``Q`` taken at time ``t_A`` (seconds on a clock shared by the cameras):

1. nearby persons ``R = {B in the query set, camera(B) = Q, |t_A - t_B| < tau}`` -- ``A`` itself is in ``R``
   (``|t_A - t_A| = 0 < tau``, as in the paper's definition); only *query* images are nearby persons (the
   gallery is not scored against itself). A query without a time has ``R = {A}``.
2. for every gallery camera ``G`` the pivot set ``P_G`` is the overall top ``K`` retrievals of ``R`` on ``G``:
   the ``K`` best (``B``, gallery image) pairs over all ``B`` in ``R`` (a gallery image retrieved by several
   members of ``R`` counts once per retrieval, which weights it by their agreement). Gallery images without a
   time are never pivots.
3. Eq. (3): ``p_t(A, X) = 1/|P_G| * sum_{B' in P_G} exp(-(t_X - t_B')^2 / sigma^2)`` for every gallery ``X`` of
   camera ``G`` (``0`` for an ``X`` without a time, or a camera without pivots);
4. fusion: ``p(A, X) = (p_t(A, X) + alpha) * p_a(A, X)``, ``p_a`` the appearance similarity.

Gallery cameras: the paper performs "cross-camera person retrieval ... on a gallery camera G", so by default
only cameras ``G != Q`` get pivots; gallery images of the query's own camera get ``p_t = 0``, i.e.
``alpha * p_a`` (no cross-camera temporal evidence). Their positives are junk in the Market-1501 protocol
anyway, and lifting them would lift the nearby persons' *own* same-camera images, which are negatives for
``A``. ``include_query_camera=True`` treats camera ``Q`` like any other.

Appearance similarity ``p_a``: the fusion multiplies, so ``p_a`` must be a similarity, ideally in ``[0, 1]``.
Similarities are used as they are (a warning is issued once if one is negative); distances are converted by
``distance_to_similarity``: ``"cosine"`` ``1 - d / 2`` (cosine distance in [0, 2]), ``"unit"`` ``1 - d``
(distances in [0, 1], e.g. k-reciprocal re-ranking), ``"exp"`` ``exp(-d / distance_scale)`` (any
non-negative distance), or ``"auto"`` (default): ``"cosine"`` when the matcher has ``metric == "cosine"``
(:class:`.FeatureDistance`), else ``"exp"``. The output is always a similarity (``higher_is_better = True``).
The fusion is not invariant to how distances are mapped: with ``"exp"`` the temporal factor
``p_t + alpha`` (between ``alpha`` and ``1 + alpha``) can only reorder gallery images whose distances differ
by less than ``distance_scale * ln((1 + alpha) / alpha)`` (~2.4 for the paper's alpha), so unnormalised
squared Euclidean distances of large features need a ``distance_scale`` of their typical spread (or use
normalised features and ``"cosine"``).

Parameters (``preset``): ``"paper"`` (default): ``K = tau = sigma = 100``, ``alpha = 0.1`` (Sec. 5.1; tau and
sigma in seconds); ``"public_code"``: ``K = 10``, ``tau = 100``, ``sigma = 200``, ``alpha = 0.2`` (the defaults
of the authors' public code). ``k``, ``tau``, ``sigma``, ``alpha`` override the preset one by one.

Time stamps: ``FeatureSet.times`` of both sides (from ``ImageRecord.time``: ``market1501`` with
``timestamps=True``, ``dukemtmc``, or a custom parser). Frame numbers alone are refused: they are not on a
clock shared by the cameras (Market-1501 frames even restart in every session).

Place in the chain: a row post-processor of :func:`.matchers.evaluate_matcher`, possibly after another one
(the paper applies it after k-reciprocal re-ranking, whose output is distances). The convention of the
incoming scores is, in order of precedence: the attribute ``input_higher_is_better`` (constructor argument,
or set by the evaluator before :meth:`prepare`), else ``matcher.higher_is_better`` followed by the
conventions declared by the post-processors given as ``upstream`` (those placed before TLift in the chain).
Without ``upstream`` the pivots come from the matcher's own scores, not from a re-ranked chain.

Cost: the pivots need the score rows of *other* queries than the chunk being processed, so :meth:`prepare`
runs a **second scoring pass** over all queries (``matcher.score`` and the ``upstream`` post-processors, chunk
by chunk; as costly as the evaluation's own scoring) keeping only each query's top ``K`` candidates per
gallery camera: ``O(Nq * C * K)`` memory, 12 bytes each (``C`` gallery cameras; Market-1501 with K = 100:
3,368 x 6 x 100 -> 24 MB). :meth:`__call__` then costs, per query, ``O(|R| * C * K)`` to merge the candidates
of ``R``, and for Eq. (3) one term per (pivot, same-camera gallery image) pair closer in time than
``8.3 sigma`` (farther terms are below ``exp(-69) = 1e-30`` and skipped; the gallery is sorted by camera and
time once, so each pivot's window is found by binary search): at most ``O(Ng * K)``, far fewer when a camera's
gallery spans much more than ``17 sigma``. Plus ``O(chunk * Nq)`` to find the nearby persons of a chunk. All
on the scores' device, vectorised per query. Measured on a Market-1501-sized problem (3,368 x 19,732, 6
cameras, paper preset, times spread over 5 h), whole evaluation with TLift vs without: one CPU thread ~15 s vs
1.3 s; 16 CPU cores 8.5 s vs 0.2 s; H100 3.9 s vs 0.3 s (the per-query loop is launch-bound there).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from nasreid.registry import POSTPROCESSORS

from .matchers import FeatureSet, Matcher, PostProcessor
from .metrics import EvaluationError

__all__ = ["TLift", "TLIFT_PRESETS", "MissingTimestampsError"]

#: TLift parameters: ``"paper"`` (Liao & Shao ECCV 2020, Sec. 5.1) and the defaults of the authors' public code
TLIFT_PRESETS = {
    "paper": {"k": 100, "tau": 100.0, "sigma": 100.0, "alpha": 0.1},
    "public_code": {"k": 10, "tau": 100.0, "sigma": 200.0, "alpha": 0.2},
}

_CONVERSIONS = ("auto", "cosine", "unit", "exp")
#: Eq. (3) skips (pivot, gallery) pairs farther apart than _CUT * sigma: exp(-_CUT^2) = 1e-30
_CUT = math.sqrt(30 * math.log(10))


class MissingTimestampsError(EvaluationError):
    """A time-aware post-processor (TLift) was given a query or gallery side without capture times; the message
    names the side and how to get times. An :class:`EvaluationError` (so a ``NasreidError`` and ``ValueError``)."""


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _has_times(fs: FeatureSet) -> bool:
    return fs.times is not None and bool(np.isfinite(fs.times).any())


def _missing_times_message(side: str, fs: FeatureSet) -> str:
    msg = (f"TLift needs capture times (seconds on a clock shared by the cameras) on both sides, but the {side} "
           f"has none (FeatureSet.times is {'None' if fs.times is None else 'all nan'}).")
    if fs.frames is not None and (fs.frames >= 0).any():
        msg += (f" The {side} has frame numbers, but frames are not enough: they are not on a clock shared by the "
                "cameras (Market-1501 frames even restart in every session).")
    return msg + (" Build the dataset with time stamps -- market1501 with timestamps=True (cumulative per-camera "
                  "session clock, 25 fps), dukemtmc (devkit camera offsets, 59.94 fps, the default) -- or set "
                  "ImageRecord.time in a custom parser, or pass FeatureSet(times=...).")


@POSTPROCESSORS.register("tlift")
class TLift(PostProcessor):
    """Temporal Lifting (Liao & Shao, ECCV 2020, Sec. 4, Eq. 3); see the module docstring for the method.

    Args:
        preset: ``"paper"`` (default; ``k = tau = sigma = 100``, ``alpha = 0.1``) or ``"public_code"``
            (``k = 10``, ``tau = 100``, ``sigma = 200``, ``alpha = 0.2``, the authors' public code).
        k: pivots per gallery camera (top-``k`` retrievals of the nearby persons); overrides the preset.
        tau: nearby-person threshold in seconds (``|t_A - t_B| < tau``); overrides the preset.
        sigma: kernel width in seconds of Eq. (3); overrides the preset.
        alpha: regulariser of the fusion ``(p_t + alpha) * p_a``; overrides the preset.
        distance_to_similarity: how incoming distances become ``p_a``: ``"auto"``, ``"cosine"`` (``1 - d/2``),
            ``"unit"`` (``1 - d``) or ``"exp"`` (``exp(-d / distance_scale)``); ignored for similarities.
        distance_scale: the scale of ``"exp"`` (> 0, default 1).
        include_query_camera: also lift gallery images of the query's own camera (default ``False``: they get
            ``p_t = 0``, as the paper retrieves across cameras).
        input_higher_is_better: convention of the incoming scores when it differs from what ``matcher`` and
            ``upstream`` imply (``False``: distances, ``True``: similarities); ``None``: derive it.
        upstream: the post-processors placed before TLift in the chain (already prepared by then): they are also
            applied in the pivot pass, so that pivots come from the same scores TLift re-weights (e.g. after
            re-ranking), and they tell the incoming convention. Not settable from a recipe.
        chunk_size: queries per chunk of the pivot pass of :meth:`prepare`.

    Attributes:
        higher_is_better: ``True`` -- the output is a similarity whatever the input.

    Raises:
        EvaluationError (a ``ValueError``): unknown preset or conversion, ``k < 1``, ``tau``/``sigma`` <= 0 or
            ``alpha`` < 0, ``distance_scale`` <= 0; :class:`MissingTimestampsError` from :meth:`prepare` when
            the query or gallery side has no times (the message names the side).
    """

    higher_is_better = True

    def __init__(self, preset: str = "paper", *, k: int | None = None, tau: float | None = None,
                 sigma: float | None = None, alpha: float | None = None, distance_to_similarity: str = "auto",
                 distance_scale: float = 1.0, include_query_camera: bool = False,
                 input_higher_is_better: bool | None = None, upstream: Sequence[PostProcessor] = (),
                 chunk_size: int = 256):
        if preset not in TLIFT_PRESETS:
            raise EvaluationError(f"unknown TLift preset {preset!r}; expected one of {sorted(TLIFT_PRESETS)}")
        p = dict(TLIFT_PRESETS[preset])
        for name, value in (("k", k), ("tau", tau), ("sigma", sigma), ("alpha", alpha)):
            if value is not None:
                p[name] = value
        if not (_real(p["k"]) and int(p["k"]) == p["k"] and p["k"] >= 1):
            raise EvaluationError(f"TLift k must be an integer >= 1, got {p['k']!r}")
        for name in ("tau", "sigma"):
            if not (_real(p[name]) and p[name] > 0):
                raise EvaluationError(f"TLift {name} must be a finite number > 0 (seconds), got {p[name]!r}")
        if not (_real(p["alpha"]) and p["alpha"] >= 0):
            raise EvaluationError(f"TLift alpha must be a finite number >= 0, got {p['alpha']!r}")
        if distance_to_similarity not in _CONVERSIONS:
            raise EvaluationError(f"unknown distance_to_similarity {distance_to_similarity!r}; expected one of "
                                  f"{_CONVERSIONS}")
        if not (_real(distance_scale) and distance_scale > 0):
            raise EvaluationError(f"TLift distance_scale must be a finite number > 0, got {distance_scale!r}")
        if chunk_size < 1:
            raise EvaluationError(f"chunk_size must be >= 1, got {chunk_size}")
        self.preset = preset
        self.k, self.tau, self.sigma, self.alpha = int(p["k"]), float(p["tau"]), float(p["sigma"]), float(p["alpha"])
        self.distance_to_similarity = distance_to_similarity
        self.distance_scale = float(distance_scale)
        self.include_query_camera = bool(include_query_camera)
        self.input_higher_is_better = input_higher_is_better
        self.upstream = list(upstream)
        self.chunk_size = int(chunk_size)
        self._state: dict[str, Any] | None = None
        self._warned_negative = False

    def __repr__(self) -> str:
        return (f"TLift(preset={self.preset!r}, k={self.k}, tau={self.tau:g}, sigma={self.sigma:g}, "
                f"alpha={self.alpha:g})")

    # ------------------------------------------------------------------ conversion
    def _similarity(self, scores: torch.Tensor, higher: bool, mode: str) -> torch.Tensor:
        s = scores.detach()
        if not s.is_floating_point() or s.dtype in (torch.float16, torch.bfloat16):
            s = s.float()
        if higher:
            return s.clone()
        if mode == "cosine":
            return 1.0 - s / 2.0
        if mode == "unit":
            return 1.0 - s
        return torch.exp(-s / self.distance_scale)

    # ------------------------------------------------------------------ protocol
    def prepare(self, query: FeatureSet, gallery: FeatureSet, matcher: Matcher) -> None:
        """Check the time stamps, resolve the input convention and collect every query's top-``k`` candidates
        per gallery camera (the second scoring pass; see the module docstring)."""
        for side, fs in (("query", query), ("gallery", gallery)):
            if not _has_times(fs):
                raise MissingTimestampsError(_missing_times_message(side, fs))
        # conventions: of the pivot pass (matcher -> upstream) and of the scores TLift will be given
        chain = bool(matcher.higher_is_better)
        for u in self.upstream:
            chain = chain if u.higher_is_better is None else bool(u.higher_is_better)
        incoming = chain if self.input_higher_is_better is None else bool(self.input_higher_is_better)
        mode = self.distance_to_similarity
        if mode == "auto":
            mode = "cosine" if getattr(matcher, "metric", None) == "cosine" else "exp"
        nq, ng = len(query), len(gallery)
        gcam = torch.as_tensor(gallery.camids, dtype=torch.int64)
        cams, gcam_idx = torch.unique(gcam, sorted=True, return_inverse=True)
        gtime = torch.as_tensor(gallery.times, dtype=torch.float64)
        untimed = ~torch.isfinite(gtime)
        members = [torch.nonzero(gcam_idx == c).flatten() for c in range(len(cams))]
        k = self.k
        cand_val: torch.Tensor | None = None
        cand_idx: torch.Tensor | None = None
        for s in range(0, nq, self.chunk_size):
            e = min(s + self.chunk_size, nq)
            sc = matcher.score(query, s, e)
            for u in self.upstream:
                sc = u(sc, s, e)
            if not isinstance(sc, torch.Tensor) or tuple(sc.shape) != (e - s, ng):
                raise EvaluationError(f"TLift pivot pass: scores of queries {s}..{e - 1} have shape "
                                      f"{tuple(getattr(sc, 'shape', ()))}, expected {(e - s, ng)}")
            sim = self._similarity(sc, chain, mode)
            if cand_val is None:
                dev = sim.device
                cand_val = torch.full((nq, len(cams), k), -math.inf, dtype=sim.dtype, device=dev)
                cand_idx = torch.full((nq, len(cams), k), -1, dtype=torch.int64, device=dev)
                members = [m.to(dev) for m in members]
                untimed = untimed.to(dev)
            assert cand_idx is not None  # allocated with cand_val
            # untimed gallery images are never pivots, nor nan scores
            sim = sim.masked_fill(untimed.unsqueeze(0) | sim.isnan(), -math.inf)
            for c, m in enumerate(members):
                kk = min(k, len(m))
                v, i = sim.index_select(1, m).topk(kk, dim=1)
                cand_val[s:e, c, :kk] = v
                cand_idx[s:e, c, :kk] = m[i]
        # Eq. (3) only visits (pivot, gallery) pairs closer than _CUT sigma (the others add < 1e-30): the timed
        # gallery is sorted by (camera, time) into one key array, each camera in its own band of the key axis
        timed = torch.isfinite(gtime)
        tmin = float(gtime[timed].min())
        cut = _CUT * self.sigma
        band = float(gtime[timed].max()) - tmin + 2 * cut + 1.0
        key = torch.where(timed, gcam_idx.to(torch.float64) * band + (gtime - tmin),
                          torch.full_like(gtime, math.inf))
        order = torch.argsort(key, stable=True)
        self._state = dict(
            nq=nq, ng=ng, incoming=incoming, mode=mode, cand_val=cand_val, cand_idx=cand_idx,
            qcam=torch.as_tensor(query.camids, dtype=torch.int64),
            qtime=torch.as_tensor(query.times, dtype=torch.float64),
            gcam=gcam, gtime=gtime, order=order, skey=key[order], stime=gtime[order], scam=gcam_idx[order],
            tmin=tmin, band=band, cut=cut,
        )
        self._moved: tuple[torch.device, dict[str, Any]] | None = None

    def _on(self, device: torch.device) -> dict:
        st = self._state
        assert st is not None  # called after prepare()
        if self._moved is None or self._moved[0] != device:
            self._moved = (device, {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in st.items()})
        return self._moved[1]

    def __call__(self, scores: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Lifted similarities ``(p_t + alpha) * p_a`` of queries ``start..end-1`` (a new tensor)."""
        if self._state is None:
            raise EvaluationError("TLift called before prepare(query, gallery, matcher)")
        st = self._on(scores.device)
        if tuple(scores.shape) != (end - start, st["ng"]) or not 0 <= start <= end <= st["nq"]:
            raise EvaluationError(f"TLift got scores {tuple(scores.shape)} for queries {start}..{end - 1}; expected "
                                  f"({end - start}, {st['ng']}) within the {st['nq']} prepared queries")
        pa = self._similarity(scores, st["incoming"], st["mode"])
        if not self._warned_negative and bool((pa < 0).any()):
            self._warned_negative = True
            warnings.warn("TLift: negative appearance similarities p_a; the fusion (p_t + alpha) * p_a assumes "
                          "p_a >= 0 (pick another distance_to_similarity or shift the scores)", stacklevel=2)
        n = end - start
        qcam, qtime = st["qcam"], st["qtime"]
        # nearby persons of the chunk: same camera, |dt| < tau, and the query itself
        dt_q = (qtime[start:end, None] - qtime[None, :]).abs()
        near = (qcam[start:end, None] == qcam[None, :]) & (dt_q < self.tau)
        near[torch.arange(n, device=near.device), torch.arange(start, end, device=near.device)] = True
        cand_val, cand_idx, gtime = st["cand_val"], st["cand_idx"], st["gtime"]
        skey, stime, scam, order = st["skey"], st["stime"], st["scam"], st["order"]
        ncam, k = cand_val.shape[1], cand_val.shape[2]
        inv_s2 = 1.0 / (self.sigma * self.sigma)
        dev = pa.device
        cam_of = torch.arange(ncam, device=dev).unsqueeze(1)
        pt = torch.zeros(n, st["ng"], dtype=torch.float64, device=dev)
        psum = torch.zeros(st["ng"], dtype=torch.float64, device=dev)
        for i in range(n):
            r = torch.nonzero(near[i]).flatten()
            vals = cand_val[r].permute(1, 0, 2).reshape(ncam, -1)  # [C, |R| * k]
            idx = cand_idx[r].permute(1, 0, 2).reshape(ncam, -1)
            top, pos = vals.topk(min(k, vals.shape[1]), dim=1)  # overall top-k retrievals of R on each camera
            valid = torch.isfinite(top)  # (fewer than k timed gallery images on a camera)
            cnt = valid.sum(1).to(torch.float64)  # |P_G| per camera
            piv = idx.gather(1, pos)[valid]  # pivots (gallery indices), camera by camera
            piv_t = gtime[piv]
            piv_key = cam_of.expand_as(valid)[valid].to(torch.float64) * st["band"] + (piv_t - st["tmin"])
            # Eq. (3): sum over the pivots of camera G of exp(-(t_X - t_B')^2 / sigma^2), for X in G
            lo = torch.searchsorted(skey, piv_key - st["cut"])
            hi = torch.searchsorted(skey, piv_key + st["cut"], right=True)
            length = hi - lo
            first = torch.repeat_interleave(lo - (torch.cumsum(length, 0) - length), length)
            at = first + torch.arange(int(length.sum()), device=dev)  # sorted gallery positions, pivot by pivot
            dt = stime[at] - torch.repeat_interleave(piv_t, length)
            psum.zero_()
            psum.index_add_(0, at, torch.exp(-(dt * dt) * inv_s2))
            p = torch.empty_like(psum)
            p[order] = psum / cnt[scam].clamp(min=1.0)  # back to gallery order; untimed X: 0
            if not self.include_query_camera:
                p.masked_fill_(st["gcam"] == qcam[start + i], 0.0)
            pt[i] = p
        out = (pt + self.alpha) * pa.to(torch.float64)
        return out.to(pa.dtype)
