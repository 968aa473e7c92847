"""Temporal Lifting (Liao & Shao, ECCV 2020, Sec. 4) and the time stamps it needs: Market-1501's cumulative
session clock on the real sample names, DukeMTMC's devkit camera offsets, Eq. (3) by hand, the evaluation chain."""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import missing
from nasreid.data import DatasetLayoutError, build_dataset, build_test_loaders
from nasreid.data.datasets.dukemtmc import DUKEMTMC_START_FRAMES, dukemtmc_times
from nasreid.data.datasets.market1501 import market1501_times
from nasreid.errors import NasreidError
from nasreid.evaluation import (
    EvaluationError,
    FeatureDistance,
    FeatureSet,
    Matcher,
    PostProcessor,
    evaluate_matcher,
    evaluate_model,
)
from nasreid.evaluation.tlift import TLIFT_PRESETS, MissingTimestampsError, TLift
from nasreid.registry import POSTPROCESSORS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (shared CPU cores)

MARKET_NAME = re.compile(r"^(\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")


class Fixed(Matcher):
    """A matcher returning a fixed score matrix (similarities unless told otherwise)."""

    def __init__(self, scores, higher_is_better=True):
        self.s = torch.as_tensor(scores, dtype=torch.float64)
        self.higher_is_better = higher_is_better

    def score(self, query, start, end):
        return self.s[start:end].clone()


def _run(post, matcher, q, g, start=0, end=None):
    end = len(q) if end is None else end
    matcher.prepare_gallery(g)
    post.prepare(q, g, matcher)
    return post(matcher.score(q, start, end), start, end)


# --------------------------------------------------------------------------- a tiny case, Eq. (3) by hand
# queries A, B, C walk together in camera 0 (t = 0, 30, 60 s); Z is alone much later (t = 5000 s).
# gallery, camera 1: A' (t=200), B' (240), C' (260), E (900, a hard negative that looks like A), Z' (5250);
#          camera 0: F (t=10, same camera as the queries).
QT = [0.0, 30.0, 60.0, 5000.0]
GT = [200.0, 240.0, 260.0, 900.0, 5250.0, 10.0]
S = [  # A'    B'    C'    E     Z'    F
    [0.60, 0.20, 0.10, 0.70, 0.05, 0.50],  # A: E looks more like A than A' does
    [0.30, 0.90, 0.20, 0.10, 0.05, 0.40],  # B
    [0.20, 0.10, 0.85, 0.15, 0.05, 0.30],  # C
    [0.10, 0.10, 0.10, 0.30, 0.50, 0.20],  # Z
]


def _tiny():
    q = FeatureSet(torch.zeros(4, 1), [1, 2, 3, 4], [0, 0, 0, 0], times=QT)
    g = FeatureSet(torch.zeros(6, 1), [1, 2, 3, 9, 4, 8], [1, 1, 1, 1, 1, 0], times=GT)
    return q, g


def _pt(t_x, pivots, sigma=100.0):
    return sum(math.exp(-((t_x - t) ** 2) / sigma ** 2) for t in pivots) / len(pivots)


def test_eq3_by_hand_true_match_lifted_hard_negative_suppressed():
    q, g = _tiny()
    out = _run(TLift(k=2), Fixed(S), q, g)  # paper preset: tau = sigma = 100 s, alpha = 0.1; K = 2 here
    assert out.shape == (4, 6)
    # A: R = {A, B, C} (A itself included; Z is 5000 s away). Top-2 of R on camera 1 over all (B, X) pairs:
    # B->B' 0.90, C->C' 0.85 (A's own best, E 0.70, is third) -> pivots at t = 240, 260.
    piv_a = [240.0, 260.0]
    want_a = [(_pt(GT[j], piv_a) + 0.1) * S[0][j] for j in range(5)] + [0.1 * S[0][5]]  # F: own camera, p_t = 0
    np.testing.assert_allclose(out[0].numpy(), want_a, rtol=1e-12, atol=1e-15)
    assert out[0, 0] == pytest.approx((0.5 * (math.exp(-0.16) + math.exp(-0.36)) + 0.1) * 0.6, rel=1e-12)
    # the true match A' (appearance 0.60) now beats the closer-looking E (0.70), which is pushed down to ~alpha*0.7
    assert out[0, 0] > out[0, 3] and S[0][0] < S[0][3]
    assert out[0, 3] == pytest.approx(0.1 * 0.7, rel=1e-12) and out[0, 3] < S[0][3]
    # B and C share A's nearby set, hence the same pivots
    np.testing.assert_allclose(out[1, :5].numpy(), [(_pt(GT[j], piv_a) + 0.1) * S[1][j] for j in range(5)],
                               rtol=1e-12)
    # Z has no nearby person: R = {Z}, its own top-2 on camera 1 are Z' (0.5) and E (0.3)
    piv_z = [5250.0, 900.0]
    np.testing.assert_allclose(out[3, :5].numpy(), [(_pt(GT[j], piv_z) + 0.1) * S[3][j] for j in range(5)],
                               rtol=1e-12)
    assert out[3, 4] == pytest.approx((0.5 * (1 + math.exp(-4350 ** 2 / 1e4)) + 0.1) * 0.5, rel=1e-12)


def test_chunks_and_query_camera_option():
    q, g = _tiny()
    full = _run(TLift(k=2), Fixed(S), q, g)
    t = TLift(k=2)
    m = Fixed(S)
    m.prepare_gallery(g)
    t.prepare(q, g, m)
    rows = torch.cat([t(m.score(q, s, s + 1), s, s + 1) for s in range(4)])
    assert torch.equal(rows, full)  # a chunk's result does not depend on the other rows of its chunk
    # include_query_camera: camera 0 (F) gets pivots too: R's top-2 on camera 0 are F (from B, 0.4; from C, 0.3)
    inc = _run(TLift(k=2, include_query_camera=True), Fixed(S), q, g)
    assert inc[0, 5] == pytest.approx((1.0 + 0.1) * 0.5, rel=1e-12)
    torch.testing.assert_close(inc[:, :5], full[:, :5], rtol=0, atol=0)


def test_untimed_images_and_small_cameras():
    q, g = _tiny()
    qt, gt = np.array(QT), np.array(GT)
    qt[1] = np.nan  # B has no time: not a nearby person of A, and alone in its own R
    gt[1] = np.nan  # B' has no time: never a pivot, and p_t(., B') = 0
    q2 = FeatureSet(q.features, q.pids, q.camids, times=qt)
    g2 = FeatureSet(g.features, g.pids, g.camids, times=gt)
    out = _run(TLift(k=2), Fixed(S), q2, g2)
    # A: R = {A, C}; pairs on camera 1 (B' excluded): C->C' 0.85, A->E 0.70
    piv = [260.0, 900.0]
    assert out[0, 1] == pytest.approx(0.1 * S[0][1], rel=1e-12)
    np.testing.assert_allclose(out[0, [0, 2, 3, 4]].numpy(),
                               [(_pt(GT[j], piv) + 0.1) * S[0][j] for j in (0, 2, 3, 4)], rtol=1e-12)
    # k larger than all candidates: every (B, X) pair of R is a pivot (|P| < K)
    out = _run(TLift(k=100), Fixed(S), q, g)
    piv = [GT[j] for i in range(3) for j in range(5)]
    assert out[0, 0] == pytest.approx((_pt(GT[0], piv) + 0.1) * 0.6, rel=1e-12)


def _reference(S, qcam, qt, gcam, gt, k, tau, sigma, alpha):
    """Eq. (3) and the fusion straight from the paper's definitions, one query and one camera at a time."""
    S = np.asarray(S, dtype=np.float64)
    out = np.zeros_like(S)
    for a in range(len(qcam)):
        R = [b for b in range(len(qcam)) if qcam[b] == qcam[a] and (b == a or abs(qt[a] - qt[b]) < tau)]
        for cam in set(gcam.tolist()):
            xs = [x for x in range(len(gcam)) if gcam[x] == cam]
            pairs = sorted(((S[b, x], x) for b in R for x in xs if np.isfinite(gt[x])), reverse=True)[:k]
            for x in xs:
                pt = 0.0
                if cam != qcam[a] and pairs and np.isfinite(gt[x]):
                    pt = np.mean([math.exp(-((gt[x] - gt[p]) ** 2) / sigma ** 2) for _, p in pairs])
                out[a, x] = (pt + alpha) * S[a, x]
    return out


def test_matches_reference_implementation_on_a_random_problem():
    """Random scores, 3 cameras, times over 6 h (so most pivot-gallery pairs are far apart), some untimed."""
    rng = np.random.default_rng(3)
    nq, ng = 40, 150
    qcam, gcam = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    qt, gt = rng.uniform(0, 6 * 3600, nq), rng.uniform(0, 6 * 3600, ng)
    qt[:5] = rng.uniform(0, 300, 5)  # a few queries close together
    qt[7], gt[[3, 11]] = np.nan, np.nan
    S = rng.uniform(0, 1, (nq, ng))
    q = FeatureSet(torch.zeros(nq, 1), np.arange(nq), qcam, times=qt)
    g = FeatureSet(torch.zeros(ng, 1), np.arange(ng), gcam, times=gt)
    for kw in (dict(k=4, tau=500.0, sigma=900.0), dict(k=30, tau=2000.0, sigma=100.0, alpha=0.0)):
        t = TLift(**kw)
        out = _run(t, Fixed(S), q, g)
        ref = _reference(S, qcam, qt, gcam, gt, t.k, t.tau, t.sigma, t.alpha)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-25)


# --------------------------------------------------------------------------- parameters, conventions, errors
def test_presets_and_overrides():
    assert POSTPROCESSORS.get("tlift") is TLift
    p = TLift()
    assert (p.preset, p.k, p.tau, p.sigma, p.alpha) == ("paper", 100, 100.0, 100.0, 0.1)
    c = TLift("public_code")
    assert (c.k, c.tau, c.sigma, c.alpha) == (10, 100.0, 200.0, 0.2)
    o = TLift("public_code", k=5, sigma=50)
    assert (o.k, o.tau, o.sigma, o.alpha) == (5, 100.0, 50.0, 0.2)
    assert TLIFT_PRESETS["paper"] == {"k": 100, "tau": 100.0, "sigma": 100.0, "alpha": 0.1}
    assert TLift.higher_is_better is True
    with pytest.raises(EvaluationError, match="unknown TLift preset 'github'"):
        TLift("github")
    for bad in (dict(k=0), dict(k=2.5), dict(tau=0), dict(sigma=-1), dict(alpha=-0.1), dict(sigma=float("nan"))):
        with pytest.raises(EvaluationError, match=next(iter(bad))):
            TLift(**bad)
    with pytest.raises(EvaluationError, match="distance_to_similarity"):
        TLift(distance_to_similarity="inverse")
    with pytest.raises(EvaluationError, match="distance_scale"):
        TLift(distance_scale=0)
    # sigma changes the values as Eq. (3) says
    q, g = _tiny()
    out = _run(TLift("public_code", k=2), Fixed(S), q, g)
    assert out[0, 0] == pytest.approx((_pt(200.0, [240.0, 260.0], sigma=200.0) + 0.2) * 0.6, rel=1e-12)


def test_distance_input_converted():
    q, g = _tiny()
    sim = torch.tensor(S, dtype=torch.float64)
    ref = _run(TLift(k=2), Fixed(sim), q, g)
    # cosine-like distances d = 2 (1 - s): "cosine" gives back 1 - d/2 = s
    out = _run(TLift(k=2, distance_to_similarity="cosine"), Fixed(2 * (1 - sim), higher_is_better=False), q, g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)
    # "unit": 1 - d; "exp": exp(-d)
    out = _run(TLift(k=2, distance_to_similarity="unit"), Fixed(1 - sim, higher_is_better=False), q, g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)
    out = _run(TLift(k=2, distance_to_similarity="exp"), Fixed(-torch.log(sim), higher_is_better=False), q, g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)
    out = _run(TLift(k=2, distance_to_similarity="exp", distance_scale=7.0), Fixed(-7 * torch.log(sim), False), q, g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)
    # auto with a cosine FeatureDistance: p_a = 1 - d/2
    gen = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(10, 4, dtype=torch.float64, generator=gen))
    qf = FeatureSet(f[:4], [1, 2, 3, 4], [0, 0, 0, 0], times=QT)
    gf = FeatureSet(f[4:], [1, 2, 3, 9, 4, 8], [1, 1, 1, 1, 1, 0], times=GT)
    m = FeatureDistance("cosine")
    out = _run(TLift(k=2), m, qf, gf)
    ref = _run(TLift(k=2), Fixed(1 - (1 - f[:4] @ f[4:].T) / 2), qf, gf)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    out = _run(TLift(k=2), FeatureDistance("euclidean"), qf, gf)  # auto -> exp(-d)
    ref = _run(TLift(k=2), Fixed(torch.exp(-torch.cdist(f[:4], f[4:]) ** 2)), qf, gf)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)


def test_refuses_without_times():
    q, g = _tiny()
    no_q = FeatureSet(q.features, q.pids, q.camids, frames=[5, 6, 7, 8])
    with pytest.raises(MissingTimestampsError, match=r"the query has none.*frame numbers, but frames are not enough"):
        _run(TLift(), Fixed(S), no_q, g)
    nan_g = FeatureSet(g.features, g.pids, g.camids, times=[float("nan")] * 6)
    with pytest.raises(MissingTimestampsError, match=r"the gallery has none \(FeatureSet.times is all nan\)") as ei:
        _run(TLift(), Fixed(S), q, nan_g)
    assert "timestamps=True" in str(ei.value) and "dukemtmc" in str(ei.value)
    assert isinstance(ei.value, NasreidError) and isinstance(ei.value, EvaluationError)
    with pytest.raises(EvaluationError, match="before prepare"):
        TLift()(torch.zeros(1, 6), 0, 1)


# --------------------------------------------------------------------------- through evaluate_matcher
def _groups(seed=0, groups=10, size=4, dim=16, noise=0.8):
    """People walking in groups: query camera 0 at T_g + 5 i, gallery camera 1 some 300 s later; groups are
    1000 s apart. Noisy appearance features, so appearance alone mixes identities up."""
    rng = np.random.default_rng(seed)
    n = groups * size
    ident = rng.standard_normal((n, dim))
    qf = ident + noise * rng.standard_normal((n, dim))
    gf = ident + noise * rng.standard_normal((n, dim))
    t = np.array([1000.0 * (i // size) + 5.0 * (i % size) for i in range(n)])
    pids = np.arange(1, n + 1)
    q = FeatureSet(torch.tensor(qf), pids, np.zeros(n, dtype=np.int64), times=t)
    g = FeatureSet(torch.tensor(gf), pids, np.ones(n, dtype=np.int64), times=t + 300.0 + rng.uniform(-5, 5, n))
    return q, g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tlift_improves_ranking_in_evaluate_matcher(seed):
    q, g = _groups(seed)
    m = FeatureDistance("cosine")  # distances; TLift's "auto" turns them into p_a = 1 - d/2
    base = evaluate_matcher(m, q, g, max_rank=5)
    lifted = evaluate_matcher(m, q, g, postprocessors=[TLift(k=5)], max_rank=5)
    one = evaluate_matcher(m, q, g, postprocessors=[TLift(k=5)], max_rank=5, chunk_size=1)
    assert base["cmc"][0] < 0.85 and lifted["cmc"][0] >= base["cmc"][0] + 0.075
    assert lifted["mAP"] > base["mAP"] + 0.05
    np.testing.assert_array_equal(one["cmc"], lifted["cmc"])  # chunk_size 1 vs all queries in one chunk
    assert one["mAP"] == pytest.approx(lifted["mAP"], abs=1e-12)  # (only the summation order differs)
    assert one["mINP"] == pytest.approx(lifted["mINP"], abs=1e-12)


class ToUnitDistance(PostProcessor):
    """Similarities in [0, 1] -> distances 1 - s (like a re-ranking step that outputs distances)."""

    higher_is_better = False

    def __call__(self, scores, start, end):
        return 1 - scores


def test_tlift_after_a_distance_postprocessor():
    q, g = _groups(seed=1)
    d = torch.cdist(q.features, g.features)
    sim = torch.exp(-d / d.mean())  # a similarity matcher in (0, 1]
    ref = evaluate_matcher(Fixed(sim), q, g, postprocessors=[TLift(k=3)])
    # the chain turns similarities into distances before TLift: tell TLift by argument ...
    told = evaluate_matcher(Fixed(sim), q, g, postprocessors=[
        ToUnitDistance(), TLift(k=3, input_higher_is_better=False, distance_to_similarity="unit")])
    # ... or by giving it the upstream post-processors (also used for its pivots)
    rr = ToUnitDistance()
    chained = evaluate_matcher(Fixed(sim), q, g, postprocessors=[
        rr, TLift(k=3, upstream=[rr], distance_to_similarity="unit")], chunk_size=5)
    for res in (told, chained):
        np.testing.assert_allclose(res["cmc"], ref["cmc"], rtol=0, atol=1e-12)
        assert res["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
    assert ref["cmc"][0] > evaluate_matcher(Fixed(sim), q, g)["cmc"][0]


# --------------------------------------------------------------------------- Market-1501 clock on real names
@pytest.fixture(scope="module")
def market_samples(shared_data) -> dict[str, Path]:
    files = sorted((shared_data / "market1501_samples" / "visual_data").rglob("*.jpg"))
    if not files:
        missing(f"market1501_samples not present in {shared_data}")
    return {f.name: f for f in files}


QUERIES = ("0531_c2s1_149316_00.jpg", "0051_c3s1_005551_00.jpg")  # c2s1's largest frame is a query


def _market_tree(root: Path, samples: dict[str, Path], extra: tuple[str, ...] = ()) -> list[str]:
    names = [n for n in samples if MARKET_NAME.match(n)]
    for name in names + list(extra):
        dst = root / ("query" if name in QUERIES else "bounding_box_test") / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(samples[name], dst)
    return names


def _by_name(ds):
    return {Path(r.path).name: r for r in ds.train + ds.query + ds.gallery}


def test_market1501_times_on_real_names(tmp_path, market_samples):
    root = tmp_path / "market1501"
    names = _market_tree(root, market_samples)
    assert build_dataset("market1501", root, eval_only=True).query[0].time is None  # opt-in
    ds = build_dataset("market1501", root, eval_only=True, timestamps=True)
    recs = _by_name(ds)
    assert len(recs) == len(names) >= 50 and all(r.time is not None for r in recs.values())
    # (offset + frame) / 25 by hand; offsets = sums of earlier sessions' largest frames of the camera
    #   c1: s1-s4 unseen, s5 max 53991;  c2: s1 max 149316 (a query), s2 max 158702;  c3: s1 111408, s2 104428
    #   c4: s1 10576;  c6: s1 76101, s2 119343, s3 71892
    expect = {
        "0002_c2s1_000351_01.jpg": 351 / 25,
        "0531_c2s1_149316_00.jpg": 149316 / 25,
        "0711_c2s2_056057_03.jpg": (149316 + 56057) / 25,
        "1285_c2s3_021432_00.jpg": (149316 + 158702 + 21432) / 25,
        "0142_c3s3_020203_02.jpg": (111408 + 104428 + 20203) / 25,
        "1285_c1s5_053991_00.jpg": 53991 / 25,
        "0223_c1s6_014296_00.jpg": (53991 + 14296) / 25,
        "0829_c4s4_043560_00.jpg": (10576 + 43560) / 25,
        "0010_c6s4_002427_02.jpg": (76101 + 119343 + 71892 + 2427) / 25,
    }
    for name, t in expect.items():
        assert recs[name].time == pytest.approx(t, abs=1e-9), name
    # cumulative per camera: every frame of session s+1 is later than every frame of session s
    by_cam: dict[tuple[int, int], list[float]] = {}
    for r in recs.values():
        by_cam.setdefault((r.camid, r.seq), []).append(r.time)
    pairs = 0
    for (cam, seq), times in by_cam.items():
        later = [t for (c, s), ts in by_cam.items() if c == cam and s > seq for t in ts]
        if later:
            assert max(times) <= min(later), (cam, seq)
            pairs += 1
    assert pairs >= 8
    # the dataset's times are the pure function's on the same stamps
    rs = list(recs.values())
    np.testing.assert_allclose([r.time for r in rs], market1501_times([r.camid for r in rs], [r.seq for r in rs],
                                                                      [r.frame for r in rs]), rtol=0, atol=0)


def test_evaluate_model_with_tlift_on_real_market_names(tmp_path, market_samples):
    """End to end: parser time stamps -> loaders -> FeatureSet.times -> TLift; refused without time stamps."""
    root = tmp_path / "market1501"
    _market_tree(root, market_samples)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d((4, 2)), torch.nn.Flatten())  # fixed, nothing learned
    ds = build_dataset("market1501", root, eval_only=True)
    qloader, gloader = build_test_loaders(ds, height=32, width=16, batch_size=16)
    with pytest.raises(MissingTimestampsError, match=r"the query has none \(FeatureSet.times is None\)\. The query "
                                                     r"has frame numbers, but frames are not enough"):
        evaluate_model(model, qloader, gloader, postprocessors=[TLift()], progress=False)
    ds = build_dataset("market1501", root, eval_only=True, timestamps=True)
    qloader, gloader = build_test_loaders(ds, height=32, width=16, batch_size=16)
    tl = TLift("public_code")
    res = evaluate_model(model, qloader, gloader, postprocessors=[tl], progress=False)
    # 0051 is also seen by camera 4; 0531 only by camera 2 (no cross-camera positive: skipped by the protocol)
    assert res["num_valid_queries"] == 1 and res["num_skipped_queries"] == 1
    np.testing.assert_array_equal(tl._state["qtime"].numpy(), [r.time for r in ds.query])
    np.testing.assert_array_equal(tl._state["gtime"].numpy(), [r.time for r in ds.gallery])


def test_market1501_clock_independent_of_split_and_bad_names(tmp_path, market_samples):
    root = tmp_path / "market1501"
    _market_tree(root, market_samples)
    ref = {n: r.time for n, r in _by_name(build_dataset("market1501", root, eval_only=True, timestamps=True)).items()}
    # a train image extending camera 2's session 1 to frame 200000 moves c2s2/c2s3, with or without eval_only
    train = root / "bounding_box_train"
    train.mkdir()
    shutil.copy(market_samples["0002_c2s1_000351_01.jpg"], train / "0002_c2s1_200000_01.jpg")
    for kw in (dict(eval_only=True), {}):
        recs = _by_name(build_dataset("market1501", root, timestamps=True, **kw))
        assert recs["0711_c2s2_056057_03.jpg"].time == pytest.approx((200000 + 56057) / 25, abs=1e-9)
        assert recs["0002_c2s1_000351_01.jpg"].time == ref["0002_c2s1_000351_01.jpg"]
        assert recs["0142_c3s3_020203_02.jpg"].time == ref["0142_c3s3_020203_02.jpg"]
    assert recs["0002_c2s1_200000_01.jpg"].time == pytest.approx(8000.0)
    shutil.rmtree(train)
    # real names that do not match are reported as before; skipped ones do not touch the clock
    for bad in ("b0387_c2s1_090996_00.jpg", "bbb.jpg"):
        shutil.copy(market_samples[bad], root / "bounding_box_test" / bad)
    with pytest.raises(DatasetLayoutError, match=re.escape("b0387_c2s1_090996_00.jpg")):
        build_dataset("market1501", root, eval_only=True, timestamps=True)
    with pytest.warns(UserWarning) as caught:
        ds = build_dataset("market1501", root, eval_only=True, timestamps=True, strict=False)
    assert sorted(re.search(r"[^/]+\.jpg$", str(w.message)).group(0) for w in caught) == \
        ["b0387_c2s1_090996_00.jpg", "bbb.jpg"]
    assert {n: r.time for n, r in _by_name(ds).items()} == ref


def test_market1501_times_function():
    t = market1501_times([0, 0, 0, 0, 1, 1], [1, 1, 2, 3, 2, -1], [100, 50, 40, 7, 30, 5])
    np.testing.assert_allclose(t[:5], [4.0, 2.0, 5.6, (100 + 40 + 7) / 25, 1.2])
    assert np.isnan(t[5])
    assert market1501_times([0, 0], [1, 2], [250, 10], fps=10.0).tolist() == [25.0, 26.0]
    with pytest.raises(ValueError, match="same length"):
        market1501_times([0], [1, 1], [1, 2])


# --------------------------------------------------------------------------- DukeMTMC devkit offsets
def test_dukemtmc_offsets_on_constructed_names(tmp_path, market_samples):
    assert DUKEMTMC_START_FRAMES == (5543, 3607, 27244, 31182, 1, 22402, 18968, 46766)
    t = dukemtmc_times([0, 4, 7, 8], [100, 100, 1, 5])
    np.testing.assert_allclose(t[:3], [(100 + 5543 - 1) / 59.94, 100 / 59.94, 46766 / 59.94])
    assert np.isnan(t[3])  # no camera 9 in DukeMTMC
    root = tmp_path / "duke"
    src = market_samples["0002_c2s1_000351_01.jpg"]  # any real image; the names are what is tested
    names = {"query": ["0005_c1_f0046182.jpg", "0007_c5_f0000100.jpg"],
             "bounding_box_test": ["0005_c2_f0048000.jpg", "0007_c8_f0000010.jpg", "0009_c3_f0000001.jpg"],
             "bounding_box_train": ["0001_c6_f0001000.jpg"]}
    for folder, ns in names.items():
        (root / folder).mkdir(parents=True)
        for n in ns:
            shutil.copy(src, root / folder / n)
    ds = build_dataset("dukemtmc", root)
    recs = _by_name(ds)
    want = {"0005_c1_f0046182.jpg": (46182 + 5543 - 1) / 59.94, "0007_c5_f0000100.jpg": 100 / 59.94,
            "0005_c2_f0048000.jpg": (48000 + 3607 - 1) / 59.94, "0007_c8_f0000010.jpg": (10 + 46766 - 1) / 59.94,
            "0009_c3_f0000001.jpg": 27244 / 59.94, "0001_c6_f0001000.jpg": (1000 + 22402 - 1) / 59.94}
    for n, t in want.items():
        assert recs[n].time == pytest.approx(t, abs=1e-9) and recs[n].frame == int(n[-11:-4]), n
    assert all(r.time is None for r in build_dataset("dukemtmc", root, timestamps=False).query)


def test_rerank_then_tlift_composes_through_evaluate_matcher():
    """The chain tells TLift that re-ranking hands it distances; the result equals TLift applied by hand to the
    re-ranked distances (told explicitly; pivots from the matcher's scores, as without ``upstream``), and does
    not depend on the chunk size."""
    from nasreid.evaluation.matchers import FeatureDistance, evaluate_matcher
    from nasreid.evaluation.rerank import KReciprocalRerank

    g = torch.Generator().manual_seed(0)
    nq, ng = 12, 40
    feats = torch.randn(nq + ng, 16, generator=g)
    qt = np.sort(np.random.default_rng(0).uniform(0, 600, nq))
    gt = np.sort(np.random.default_rng(1).uniform(0, 600, ng))
    q = FeatureSet(feats[:nq], np.arange(nq) % 6 + 1, np.zeros(nq, dtype=int), times=qt)
    gal = FeatureSet(feats[nq:], np.arange(ng) % 6 + 1, np.ones(ng, dtype=int), times=gt)
    chain = [KReciprocalRerank(k1=6, k2=3), TLift(k=5, tau=120, sigma=120)]
    res = evaluate_matcher(FeatureDistance("cosine"), q, gal, postprocessors=chain, chunk_size=5)
    assert chain[1].input_higher_is_better is False  # told by the chain, not assumed from the matcher
    res1 = evaluate_matcher(FeatureDistance("cosine"), q, gal,
                            postprocessors=[KReciprocalRerank(k1=6, k2=3), TLift(k=5, tau=120, sigma=120)],
                            chunk_size=nq)
    assert res["mAP"] == pytest.approx(res1["mAP"]) and np.allclose(res["cmc"], res1["cmc"])
    rr = KReciprocalRerank(k1=6, k2=3)
    m = FeatureDistance("cosine")
    m.prepare_gallery(gal)
    rr.input_higher_is_better = False
    rr.prepare(q, gal, m)
    tl = TLift(k=5, tau=120, sigma=120, input_higher_is_better=False)  # pivots from the matcher's own scores
    tl.prepare(q, gal, m)
    by_hand = tl(rr(m.score(q, 0, nq).clone(), 0, nq), 0, nq)
    chained = chain[1](chain[0](m.score(q, 0, nq).clone(), 0, nq), 0, nq)
    assert torch.allclose(chained, by_hand)
