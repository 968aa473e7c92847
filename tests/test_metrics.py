"""Tests of nasreid.evaluation: CMC / mAP (Market-1501 protocol), distances, chunked evaluation, features."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nasreid.data import build_dataset, build_test_loaders
from nasreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from nasreid.evaluation import (
    compute_distance,
    evaluate_features,
    evaluate_model,
    evaluate_rank,
    evaluate_rank_reference,
    extract_features,
)

# ---------------------------------------------------------------------------------------------------------------
# hand-computed example
#
# gallery: idx  pid  cam
#           g0    1    0
#           g1    2    1
#           g2    1    1
#           g3   -1    2   (junk for everyone)
#           g4    0    1   (distractor: a negative)
#           g5    1    2
#           g6    3    0
#           g7    2    2
G_PIDS = np.array([1, 2, 1, -1, 0, 1, 3, 2])
G_CAMS = np.array([0, 1, 1, 2, 1, 2, 0, 2])
# q0: pid 1 cam 0. g0 is junk (same pid, same cam), g3 junk (pid -1).
#     valid order by distance: g1 (.10 neg), g2 (.20 POS), g4 (.25 distractor), g5 (.30 POS), g6, g7
#     positives at 1-based ranks 2 and 4 -> AP = (1/2 + 2/4) / 2 = 0.5 ; first hit at rank 2 ; INP = 2/4
# q1: pid 2 cam 1. g3 (.01, pid -1) and g1 (.05, same cam) are junk -> g7 (.10 POS) is rank 1
#     -> AP = 1 ; first hit at rank 1 ; INP = 1/1
# q2: pid 3 cam 0. its only same-pid entry g6 has the same camera -> no valid positive -> skipped
Q_PIDS = np.array([1, 2, 3])
Q_CAMS = np.array([0, 1, 0])
DIST = np.array([
    #  g0    g1    g2    g3    g4    g5    g6    g7
    [0.05, 0.10, 0.20, 0.15, 0.25, 0.30, 0.40, 0.50],
    [0.30, 0.05, 0.40, 0.01, 0.20, 0.50, 0.60, 0.10],
    [0.30, 0.20, 0.10, 0.40, 0.50, 0.60, 0.05, 0.70],
])


@pytest.mark.parametrize("fn", [evaluate_rank, evaluate_rank_reference])
def test_hand_computed(fn):
    res = fn(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=5)
    assert res["num_valid_queries"] == 2
    assert res["num_skipped_queries"] == 1
    # cmc[0]: q1 hits at rank 1, q0 does not -> 1/2 ; from rank 2 on both hit
    np.testing.assert_allclose(res["cmc"], [0.5, 1.0, 1.0, 1.0, 1.0], atol=1e-12)
    assert res["mAP"] == pytest.approx((0.5 + 1.0) / 2, abs=1e-12)
    assert res["mINP"] == pytest.approx((0.5 + 1.0) / 2, abs=1e-12)


def test_single_query_ap():
    res = evaluate_rank(DIST[:1], Q_PIDS[:1], G_PIDS, Q_CAMS[:1], G_CAMS, max_rank=3)
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    np.testing.assert_allclose(res["cmc"], [0.0, 1.0, 1.0])


@pytest.mark.parametrize("fn", [evaluate_rank, evaluate_rank_reference])
def test_no_valid_query_raises(fn):
    with pytest.raises(ValueError, match="no valid query"):
        fn(DIST[2:], Q_PIDS[2:], G_PIDS, Q_CAMS[2:], G_CAMS)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        evaluate_rank(DIST, Q_PIDS[:2], G_PIDS, Q_CAMS, G_CAMS)
    with pytest.raises(ValueError):
        evaluate_rank(DIST[0], Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    with pytest.raises(ValueError):
        compute_distance(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        compute_distance(torch.zeros(2, 3), torch.zeros(2, 3), metric="manhattan")


# ---------------------------------------------------------------------------------------------------------------
# random problems against the reference loop
def _problem(seed, nq=150, ng=900, ids=60, cams=4, junk=0.1, distractor=0.1):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, ids + 1, nq)
    q_cams = rng.integers(0, cams, nq)
    g_pids = rng.integers(1, ids + 1, ng)
    g_cams = rng.integers(0, cams, ng)
    u = rng.random(ng)
    g_pids[u < junk] = -1
    g_pids[(u >= junk) & (u < junk + distractor)] = 0
    return rng, q_pids, g_pids, q_cams, g_cams


def _assert_same(a, b, atol=1e-12):
    assert a["num_valid_queries"] == b["num_valid_queries"]
    assert a["num_skipped_queries"] == b["num_skipped_queries"]
    np.testing.assert_allclose(a["cmc"], b["cmc"], rtol=0, atol=atol)
    assert a["mAP"] == pytest.approx(b["mAP"], abs=atol)
    assert a["mINP"] == pytest.approx(b["mINP"], abs=atol)


@pytest.mark.parametrize("seed", range(4))
def test_random_matches_reference(seed):
    rng, qp, gp, qc, gc = _problem(seed)
    dist = rng.random((len(qp), len(gp)))
    for chunk in (1, 16, 1000):
        _assert_same(evaluate_rank(dist, qp, gp, qc, gc, chunk_size=chunk),
                     evaluate_rank_reference(dist, qp, gp, qc, gc))


@pytest.mark.parametrize("seed", range(3))
def test_ties_match_stable_argsort(seed):
    # few distinct values: many ties between positives, negatives and junk; broken by gallery index
    rng, qp, gp, qc, gc = _problem(seed, ids=20)
    dist = rng.integers(0, 6, (len(qp), len(gp))).astype(np.float32)
    _assert_same(evaluate_rank(dist, qp, gp, qc, gc, chunk_size=32), evaluate_rank_reference(dist, qp, gp, qc, gc))


def test_float32_torch_input_and_many_positives():
    rng, qp, gp, qc, gc = _problem(7, nq=100, ng=3000, ids=8, cams=6)  # hundreds of positives per query
    dist = torch.from_numpy(rng.random((len(qp), len(gp)), dtype=np.float32))
    _assert_same(evaluate_rank(dist, qp, gp, qc, gc), evaluate_rank_reference(dist.numpy(), qp, gp, qc, gc))


def test_non_finite_distances():
    rng, qp, gp, qc, gc = _problem(3)
    dist = rng.random((len(qp), len(gp)))
    d_inf = dist.copy()
    d_inf[rng.random(dist.shape) < 0.05] = np.inf
    d_inf[rng.random(dist.shape) < 0.05] = -np.inf
    d_nan = dist.copy()
    d_nan[rng.random(dist.shape) < 0.05] = np.nan  # nan ranks last, like numpy's sort
    for d in (d_inf, d_nan):
        _assert_same(evaluate_rank(d, qp, gp, qc, gc), evaluate_rank_reference(d, qp, gp, qc, gc))


def test_max_rank_longer_than_gallery():
    res = evaluate_rank(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=20)
    ref = evaluate_rank_reference(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=20)
    _assert_same(res, ref)
    assert res["cmc"].shape == (20,) and res["cmc"][-1] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# distances and chunked evaluation from features
def test_compute_distance_direct_formula():
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    cos = 1 - (qf[:, None, :] * gf[None]).sum(-1) / (qf.norm(dim=1)[:, None] * gf.norm(dim=1)[None])
    sq = ((qf[:, None, :] - gf[None]) ** 2).sum(-1)
    torch.testing.assert_close(compute_distance(qf, gf, "cosine"), cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(compute_distance(qf, gf, "euclidean"), sq, atol=1e-4, rtol=1e-5)
    assert (compute_distance(qf, qf, "euclidean") >= 0).all()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_evaluate_features_chunked_equals_full(metric):
    rng, qp, gp, qc, gc = _problem(11, nq=120, ng=700, ids=40)
    qf = torch.from_numpy(rng.standard_normal((len(qp), 16), dtype=np.float32))
    gf = torch.from_numpy(rng.standard_normal((len(gp), 16), dtype=np.float32))
    full = evaluate_rank(compute_distance(qf, gf, metric), qp, gp, qc, gc)
    for chunk in (1, 7, len(qp)):
        _assert_same(evaluate_features(qf, gf, qp, gp, qc, gc, metric=metric, chunk_size=chunk), full, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# feature extraction
class _FirstRow(torch.nn.Module):
    """Features = first pixel row of channel 0 (width W), so a horizontal flip reverses them."""

    def forward(self, x):
        return x[:, 0, 0, :] * 1.0


def _loader(n=10, w=6, batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = [{"img": torch.randn(3, 4, w, generator=g), "pid": i // 2, "camid": i % 3, "path": f"img_{i}.jpg"}
             for i in range(n)]
    return DataLoader(items, batch_size=batch_size, shuffle=False), items


def test_extract_features_shapes_and_flip():
    loader, items = _loader()
    model = _FirstRow().train()
    f, pids, cams, paths = extract_features(model, loader, progress=False)
    assert f.shape == (10, 6) and f.dtype == torch.float32
    assert pids.tolist() == [i // 2 for i in range(10)] and cams.tolist() == [i % 3 for i in range(10)]
    assert paths == [f"img_{i}.jpg" for i in range(10)]
    assert model.training  # mode restored
    rows = torch.stack([it["img"][0, 0] for it in items])
    torch.testing.assert_close(f, rows)
    ff, *_ = extract_features(model, loader, flip=True, progress=False)
    torch.testing.assert_close(ff, (rows + rows.flip(1)) / 2)
    fn, *_ = extract_features(model, loader, flip=True, normalize=True, channels_last=True, progress=False)
    torch.testing.assert_close(fn.norm(dim=1), torch.ones(10))


class ColourHistogram(torch.nn.Module):
    """A fixed hand-crafted descriptor (nothing is learned): soft 8-bin histograms of the chromaticities
    ``r / (r + g + b)``, ``g / (r + g + b)`` and of the intensity, in 8 horizontal stripes, square-rooted
    (Hellinger). :meth:`maps` gives ``[B, 24, 8, 1]`` per-stripe maps, ``forward`` the pooled ``[B, 192]``.
    Colour layout carries identity across CUHK01's two cameras: rank-1 far above chance."""

    def __init__(self, bins: int = 8, stripes: int = 8):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("centers", ((torch.arange(bins) + 0.5) / bins).view(1, 1, -1, 1, 1))
        self.bins, self.stripes = bins, stripes

    def maps(self, x):
        x = (x.float() * self.std + self.mean).clamp(0, 1)  # undo the loader's normalisation
        total = x.sum(1, keepdim=True) + 1e-3
        x = torch.cat([x[:, :2] / total, x.mean(1, keepdim=True)], 1)
        soft = torch.relu(1 - (x.unsqueeze(2) - self.centers).abs() * self.bins)  # [B, 3, bins, H, W]
        return F.adaptive_avg_pool2d(soft.flatten(1, 2), (self.stripes, 1)).sqrt()

    def forward(self, x):
        return self.maps(x).flatten(1)


@pytest.fixture(scope="module")
def cuhk01_test_split(cuhk01_dir):
    """CUHK01 with 100 test ids: 200 queries (camera A) and 200 gallery images (camera B)."""
    return build_dataset("cuhk01", cuhk01_dir.parent, max_ids=200)


def test_extract_features_and_evaluate_model_on_real_images(cuhk01_test_split):
    ds = copy.copy(cuhk01_test_split)
    dropped = sorted({r.pid for r in ds.query})[:10]
    ds.gallery = [r for r in ds.gallery if r.pid not in dropped]  # their 20 queries have no positive left
    qloader, gloader = build_test_loaders(ds, height=64, width=32, batch_size=64)
    model = ColourHistogram()
    f, *_ = extract_features(model, qloader, amp=True, progress=False)
    assert f.shape == (200, 192) and f.dtype == torch.float32

    res = evaluate_model(model, qloader, gloader, flip=True, progress=False)
    qf, qp, qc, _ = extract_features(model, qloader, flip=True, progress=False)
    gf, gp, gc, _ = extract_features(model, gloader, flip=True, progress=False)
    ref = evaluate_rank_reference(compute_distance(qf, gf, "cosine"), qp, gp, qc, gc, max_rank=20)
    for k in (1, 5, 10, 20):
        assert res[f"rank{k}"] == pytest.approx(100 * ref["cmc"][k - 1], abs=1e-9)
    assert res["mAP"] == pytest.approx(100 * ref["mAP"], abs=1e-9)
    assert res["mINP"] == pytest.approx(100 * ref["mINP"], abs=1e-9)
    assert res["num_query"] == 200 and res["num_gallery"] == 180
    assert res["num_skipped_queries"] == 20 == ref["num_skipped_queries"]
    assert res["num_valid_queries"] == 180
    # each valid query has 2 positives among 180 gallery images: a random ranking gets rank-1 ~ 1.1%
    assert res["rank1"] >= 10.0
