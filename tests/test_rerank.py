"""k-reciprocal re-ranking and Jaccard distance (nasreid.evaluation.rerank) against the dense, literal float64
reference ``k_reciprocal_reference`` (Zhong et al., CVPR 2017, Eqs. 4-13), on small random problems."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nasreid.evaluation import (
    EvaluationError,
    FeatureDistance,
    FeatureSet,
    Matcher,
    PostProcessor,
    evaluate_matcher,
    evaluate_rank_reference,
)
from nasreid.evaluation.distance import compute_distance
from nasreid.evaluation.rerank import (
    KReciprocalEncoding,
    KReciprocalRerank,
    SparseRows,
    _stable_smallest,
    jaccard_distance,
    k_reciprocal_encoding,
    k_reciprocal_jaccard,
    k_reciprocal_reference,
)
from nasreid.registry import POSTPROCESSORS

pytestmark = pytest.mark.usefixtures("one_thread")


def clustered(n: int, dim: int = 32, clusters: int = 8, spread: float = 0.6, seed: int = 0) -> torch.Tensor:
    """``n`` float32 features around ``clusters`` random centres (some structure, some overlap)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, n)
    return torch.tensor(centres[labels] + spread * rng.normal(size=(n, dim)), dtype=torch.float32)


def spcl_distance(x: torch.Tensor) -> np.ndarray:
    """The distance ``jaccard_distance`` uses by default: squared L2 of L2-normalised features (2 - 2 cos)."""
    xn = F.normalize(x, dim=1)
    return compute_distance(xn, xn, "euclidean").double().numpy()


def sparse_to_dense(m) -> np.ndarray:
    """A scipy CSR of Jaccard distances -> dense, with 1 where nothing is stored."""
    out = np.ones(m.shape)
    coo = m.tocoo()
    out[coo.row, coo.col] = coo.data
    return out


# ---------------------------------------------------------------------------------------------- Jaccard distance
@pytest.mark.parametrize("k1,k2", [(20, 6), (30, 6), (10, 3), (5, 1), (3, 6), (1, 1)])
def test_jaccard_equals_dense_reference(k1, k2):
    x = clustered(60)
    _, ref = k_reciprocal_reference(spcl_distance(x), k1, k2, return_jaccard=True)
    enc = k_reciprocal_encoding(x, k1=k1, k2=k2, chunk_size=7)  # 9 chunks, the last one short
    assert isinstance(enc, KReciprocalEncoding)
    np.testing.assert_allclose(enc.jaccard().to_dense(), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(enc.jaccard_dense(), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(jaccard_distance(x, k1, k2, dense=True), ref, rtol=0, atol=1e-6)
    # sub-blocks: rows in any order x a column range
    rows = np.array([59, 3, 17, 0])
    sub = k_reciprocal_jaccard(x, k1=k1, k2=k2, rows=rows, cols=(10, 50))
    np.testing.assert_allclose(sub.to_dense(), ref[rows][:, 10:50], rtol=0, atol=1e-6)


def test_jaccard_distance_scipy_output():
    """The scipy CSR output: canonical (sorted, no duplicates), missing pairs at distance 1, explicit zeros kept."""
    x = clustered(60)
    x[50:] = x[:10]  # exact duplicates: d_J = 0 off the diagonal
    for k1, k2 in ((30, 6), (5, 1)):
        ref = jaccard_distance(x, k1, k2, dense=True)
        sp = jaccard_distance(x, k1, k2, chunk_size=16)
        assert sp.format == "csr" and sp.has_canonical_format and sp.shape == (60, 60)
        np.testing.assert_allclose(sparse_to_dense(sp), ref, rtol=0, atol=1e-12)
        assert sp.nnz == int((ref < 1.0).sum())
        coo = sp.tocoo()
        assert ((coo.data == 0) & (coo.row != coo.col)).sum() > 0


@pytest.mark.parametrize("strict", [False, True])
def test_sparse_support_and_overlap_rule(strict):
    """Tight, well separated clusters: most pairs share no support (distance 1, not stored); both 2/3 rules."""
    x = clustered(60, clusters=12, spread=0.05, seed=1)
    _, ref = k_reciprocal_reference(spcl_distance(x), 6, 3, strict_overlap=strict, return_jaccard=True)
    jac = k_reciprocal_jaccard(x, k1=6, k2=3, chunk_size=13, strict_overlap=strict)
    assert isinstance(jac, SparseRows) and jac.fill == 1.0
    np.testing.assert_allclose(jac.to_dense(), ref, rtol=0, atol=1e-6)
    assert jac.nnz == int((ref < 1.0 - 1e-12).sum())  # stored = exactly the pairs sharing support
    assert jac.nnz < 0.5 * 60 * 60


def test_paper_and_code_overlap_rules_differ_somewhere():
    x = clustered(60)
    d = spcl_distance(x)
    paper = k_reciprocal_reference(d, 20, 6, return_jaccard=True)[1]
    code = k_reciprocal_reference(d, 20, 6, strict_overlap=True, return_jaccard=True)[1]
    assert np.abs(paper - code).max() > 1e-3  # the switch matters on this problem (so both are exercised)
    enc = k_reciprocal_encoding(x, k1=20, k2=6, strict_overlap=True)
    np.testing.assert_allclose(enc.jaccard_dense(), code, rtol=0, atol=1e-6)


def test_ties_are_broken_by_index_like_a_stable_sort():
    """Integer distances (many ties, a non-symmetric matrix) through a dist_fn, against the reference."""
    rng = np.random.default_rng(3)
    n = 40
    d = rng.integers(0, 6, (n, n)).astype(np.float64)
    np.fill_diagonal(d, 0.0)
    for k1, k2 in ((8, 4), (20, 6)):
        _, ref = k_reciprocal_reference(d, k1, k2, return_jaccard=True)
        enc = k_reciprocal_encoding(lambda s, e: torch.from_numpy(d[s:e]), n, k1, k2, chunk_size=6)
        np.testing.assert_allclose(enc.jaccard_dense(), ref, rtol=0, atol=1e-12)
    for _ in range(5):
        m = torch.from_numpy(rng.integers(0, 4, (9, 30)).astype(np.float32))
        idx, val = _stable_smallest(m, 7)
        want = np.argsort(m.numpy(), axis=1, kind="stable")[:, :7]
        np.testing.assert_array_equal(idx.numpy(), want)
        np.testing.assert_array_equal(val.numpy(), np.take_along_axis(m.numpy(), want, 1))


def test_second_pass_and_bad_inputs():
    """R* members outside the kept neighbours: computed pair by pair from features, re-scored chunk by chunk
    through a dist_fn (then bitwise the distances of the first pass: equal to the reference to 1e-12)."""
    x = clustered(60)
    enc = k_reciprocal_encoding(x, k1=20, k2=6, chunk_size=7)
    assert enc.stats["second_pass_entries"] > 0 and enc.stats["second_pass_chunks"] == 0
    assert enc.encoding.row_nnz().max() <= enc.stats["max_rstar_row"]
    d = spcl_distance(x)
    enc = k_reciprocal_encoding(lambda s, e: torch.from_numpy(d[s:e]), 60, 20, 6, chunk_size=7)
    assert enc.stats["second_pass_chunks"] > 0
    np.testing.assert_allclose(enc.jaccard_dense(), k_reciprocal_reference(d, 20, 6, return_jaccard=True)[1],
                               rtol=0, atol=1e-12)
    with pytest.raises(EvaluationError, match="k1"):
        k_reciprocal_encoding(x, k1=0)
    with pytest.raises(EvaluationError, match="needs n"):
        k_reciprocal_encoding(lambda s, e: torch.zeros(e - s, 5))
    with pytest.raises(EvaluationError, match=r"expected \(2, 5\)"):
        k_reciprocal_encoding(lambda s, e: torch.zeros(e - s, 4), 5, chunk_size=2)
    with pytest.raises(EvaluationError, match="cols"):
        enc.jaccard(cols=(10, 70))


def test_dbscan_on_the_sparse_matrix_equals_dense():
    """DBSCAN(metric="precomputed") gives the same labels on the sparse output (with or without max_distance)
    as on the dense matrix; duplicates give explicit zeros, which must stay neighbours."""
    from sklearn import cluster

    x = clustered(80, clusters=6, spread=0.3, seed=2)
    x[70:] = x[:10]  # exact duplicates: Jaccard distance 0 off the diagonal
    dense = jaccard_distance(x, 30, 6, dense=True)
    want = cluster.DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(dense)
    assert len(set(want) - {-1}) >= 3  # a non-trivial clustering
    for max_distance in (None, 0.6):
        sp = jaccard_distance(x, 30, 6, max_distance=max_distance)
        assert sp.format == "csr" and sp.has_sorted_indices
        assert ((sp.tocoo().data == 0) & (sp.tocoo().row != sp.tocoo().col)).any()  # explicit zeros reach DBSCAN
        if max_distance is not None:
            assert sp.data.max() <= 0.6 and sp.nnz < 0.5 * dense.size
        got = cluster.DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(sp)
        np.testing.assert_array_equal(got, want)


def test_structure_stays_sparse_for_4000_random_features():
    """N = 4,000 random 512-d features, k1 = 30, k2 = 6 (DomainMix): the encodings are O(N k1 k2), and the
    numpy memory of the whole build + thresholded Jaccard stays far below one N x N float64 matrix."""
    n = 4000
    x = torch.randn(n, 512, generator=torch.Generator().manual_seed(0))
    tracemalloc.start()
    try:
        enc = k_reciprocal_encoding(x, k1=30, k2=6, chunk_size=512)
        jac = enc.jaccard(max_distance=0.6)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    k1, k2 = 30, 6
    half = int(np.around(k1 / 2))
    assert enc.encoding.row_nnz().max() <= (k1 + 1) * (half + 2)  # |R*(p)| <= |R| + |R| |R(q, k1/2)|
    assert enc.encoding.row_nnz().max() <= 2 * (k1 + 1)  # what random features actually give
    assert enc.expanded.row_nnz().max() <= k2 * enc.encoding.row_nnz().max()
    assert enc.expanded.nnz <= n * 200
    assert jac.row_nnz().max() <= 50
    assert peak < n * n * 4, f"numpy peak {peak / 2**20:.0f} MiB"  # < one N x N float32 (61 MiB)


# ---------------------------------------------------------------------------------------------- post-processor
class _Record(PostProcessor):
    """Keeps a copy of every chunk it is given (placed after the re-ranker)."""

    def __init__(self):
        self.chunks = {}

    def __call__(self, scores, start, end):
        self.chunks[start] = scores.detach().double().clone()
        return scores


class CosineSimilarity(Matcher):
    """Similarity matcher: ``cos(q, g)`` (higher = more alike)."""

    higher_is_better = True

    def prepare_gallery(self, gallery):
        self.g = F.normalize(gallery.features.float(), dim=1)

    def score(self, query, start, end):
        return F.normalize(query.features[start:end].float(), dim=1) @ self.g.t()


def _query_gallery(nq=20, ng=50, seed=4):
    x = clustered(nq + ng, dim=32, clusters=10, spread=0.5, seed=seed)
    rng = np.random.default_rng(seed)
    pids = rng.integers(1, 11, nq + ng)
    q = FeatureSet(x[:nq], pids[:nq], np.zeros(nq, dtype=np.int64))
    g = FeatureSet(x[nq:], pids[nq:], np.ones(ng, dtype=np.int64))
    return q, g


def test_registered_as_rerank():
    assert POSTPROCESSORS.get("rerank") is KReciprocalRerank


def test_rerank_equals_reference_for_every_chunk_size():
    q, g = _query_gallery()
    nq = len(q)
    both = torch.cat([q.features, g.features])
    d = compute_distance(both, both, "cosine").double().numpy()  # FeatureDistance("cosine") on query + gallery
    ref = k_reciprocal_reference(d, 20, 6, 0.3)[:nq, nq:]
    want = evaluate_rank_reference(ref, q.pids, g.pids, q.camids, g.camids)
    results = []
    for chunk in (1, 7, nq):
        rec = _Record()
        res = evaluate_matcher(FeatureDistance("cosine"), q, g, postprocessors=[KReciprocalRerank(), rec],
                               chunk_size=chunk)
        got = torch.cat([rec.chunks[s] for s in sorted(rec.chunks)]).numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
        results.append((got, res))
    for got, res in results[1:]:
        np.testing.assert_allclose(got, results[0][0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(res["cmc"], want["cmc"], rtol=0, atol=1e-12)
        assert res["mAP"] == pytest.approx(want["mAP"], abs=1e-12)
    assert results[0][1]["mAP"] == pytest.approx(want["mAP"], abs=1e-12)


def test_rerank_similarity_matcher_and_restored_gallery():
    """A similarity matcher gives d = 1 - s: the same as the cosine distance matcher; the matcher is left
    prepared on the gallery; lambda = 1 returns the original distances."""
    q, g = _query_gallery(seed=5)
    rec_d, rec_s = _Record(), _Record()
    evaluate_matcher(FeatureDistance("cosine"), q, g, postprocessors=[KReciprocalRerank(), rec_d], chunk_size=8)
    m = CosineSimilarity()
    evaluate_matcher(m, q, g, postprocessors=[KReciprocalRerank(), rec_s], chunk_size=8)
    for s in rec_d.chunks:
        np.testing.assert_allclose(rec_s.chunks[s].numpy(), rec_d.chunks[s].numpy(), rtol=0, atol=1e-5)
    assert m.g.shape[0] == len(g)
    rr = KReciprocalRerank(lambda_value=1.0)
    rr.prepare(q, g, m)
    sc = m.score(q, 0, 5)
    np.testing.assert_allclose(rr(sc, 0, 5).numpy(), (1 - sc).numpy(), rtol=0, atol=1e-6)
    assert rr.stats["n"] == len(q) + len(g)


def test_rerank_bad_use():
    with pytest.raises(EvaluationError, match="lambda_value"):
        KReciprocalRerank(lambda_value=1.5)
    with pytest.raises(EvaluationError, match="k2"):
        KReciprocalRerank(k2=0)
    q, g = _query_gallery()
    rr = KReciprocalRerank()
    with pytest.raises(EvaluationError, match="before prepare"):
        rr(torch.zeros(2, len(g)), 0, 2)
    m = FeatureDistance("cosine")
    m.prepare_gallery(g)
    rr.prepare(q, g, m)
    with pytest.raises(EvaluationError, match="expected"):
        rr(torch.zeros(2, len(g) + 1), 0, 2)


def test_rerank_improves_rank1_when_the_nearest_neighbour_is_a_distractor():
    """Per identity (directions in the plane of a centre c and a unit u _|_ c): 10 gallery images at angle 0,
    the query at 20 deg, one distractor at 24 deg (the query's nearest image) that belongs to a tight group of
    25 distractors at 45 deg. The query's k-reciprocal neighbourhood is its own cluster, the distractor's is
    the distractor group, so the Jaccard distance puts the cluster first."""
    rng = np.random.default_rng(0)
    dim, ids = 64, 6

    def at(c, u, deg, k, noise=0.02):
        t = np.deg2rad(deg)
        return np.cos(t) * c + np.sin(t) * u + noise * rng.normal(size=(k, dim))

    qf, qp, gf, gp = [], [], [], []
    for i in range(ids):
        c = rng.normal(size=dim)
        c /= np.linalg.norm(c)
        u = rng.normal(size=dim)
        u -= (u @ c) * c
        u /= np.linalg.norm(u)
        qf.append(at(c, u, 20, 1, 0.0)[0])
        qp.append(i + 1)
        gf += list(at(c, u, 0, 10)) + list(at(c, u, 24, 1, 0.0)) + list(at(c, u, 45, 25))
        gp += [i + 1] * 10 + [0] * 26
    q = FeatureSet(torch.tensor(np.array(qf), dtype=torch.float32), np.array(qp), np.zeros(ids, dtype=np.int64))
    g = FeatureSet(torch.tensor(np.array(gf), dtype=torch.float32), np.array(gp), np.ones(len(gp), dtype=np.int64))
    before = evaluate_matcher(FeatureDistance("cosine"), q, g)
    after = evaluate_matcher(FeatureDistance("cosine"), q, g, postprocessors=[KReciprocalRerank()])
    assert before["cmc"][0] == 0.0  # the distractor is every query's nearest image
    assert after["cmc"][0] == 1.0
    assert after["mAP"] > before["mAP"] + 0.1
