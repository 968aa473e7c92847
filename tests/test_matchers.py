"""The matcher / post-processor protocol of nasreid.evaluation.matchers, on features of real CUHK01 images
(random tensors only where shapes and errors are checked)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nasreid.data import build_dataset, build_test_loaders, parse_market1501_name
from nasreid.errors import NasreidError
from nasreid.evaluation import (
    EvaluationError,
    FeatureDistance,
    FeatureSet,
    Matcher,
    PostProcessor,
    compute_distance,
    evaluate_features,
    evaluate_matcher,
    evaluate_model,
    evaluate_rank_reference,
    extract_feature_set,
)
from nasreid.registry import MATCHERS
from test_metrics import ColourHistogram


def _assert_same(a, b):
    assert a["num_valid_queries"] == b["num_valid_queries"]
    assert a["num_skipped_queries"] == b["num_skipped_queries"]
    np.testing.assert_allclose(a["cmc"], b["cmc"], rtol=0, atol=1e-12)
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-12)
    assert a["mINP"] == pytest.approx(b["mINP"], abs=1e-12)


@pytest.fixture(scope="module")
def cuhk01_loaders(cuhk01_dir):
    """CUHK01, 100 test ids: 200 queries (camera A), 200 gallery images (camera B)."""
    ds = build_dataset("cuhk01", cuhk01_dir.parent, max_ids=200)
    return build_test_loaders(ds, height=64, width=32, batch_size=64)


@pytest.fixture(scope="module")
def real_features(cuhk01_loaders):
    """Colour-histogram features of the real images, in float64 (so that ``1 - s`` and ``-s`` order alike)."""
    model = ColourHistogram()
    q, g = (extract_feature_set(model, loader, progress=False) for loader in cuhk01_loaders)
    return (FeatureSet(q.features.double(), q.pids, q.camids, paths=q.paths),
            FeatureSet(g.features.double(), g.pids, g.camids, paths=g.paths))


class CosineSimilarity(Matcher):
    """Similarity matcher: ``cos(q, g)``, higher = more alike."""

    higher_is_better = True

    def prepare_gallery(self, gallery):
        self.g = F.normalize(gallery.features, dim=1)

    def score(self, query, start, end):
        return F.normalize(query.features[start:end], dim=1) @ self.g.t()


def test_similarity_matcher_ranks_like_negative_distance(real_features):
    q, g = real_features
    sim = evaluate_matcher(CosineSimilarity(), q, g, chunk_size=37)
    dist = evaluate_matcher(FeatureDistance("cosine"), q, g, chunk_size=37)
    _assert_same(sim, dist)
    s_full = F.normalize(q.features, dim=1) @ F.normalize(g.features, dim=1).t()
    _assert_same(sim, evaluate_rank_reference(-s_full, q.pids, g.pids, q.camids, g.camids))
    # the legacy entry point is the same matcher path
    _assert_same(dist, evaluate_features(q.features, g.features, q.pids, g.pids, q.camids, g.camids, chunk_size=37))
    assert sim["num_valid_queries"] == 200 and sim["cmc"][0] > 0.1  # identity signal: chance is 1%


class ReverseOddQueries(PostProcessor):
    """Deterministic re-ordering: the ranking of every odd-numbered query is reversed (``d -> 2 - d``)."""

    def prepare(self, query, gallery, matcher):
        self.prepared = (len(query), len(gallery), matcher.higher_is_better)
        self.calls = []

    def __call__(self, scores, start, end):
        self.calls.append((start, end))
        odd = (torch.arange(start, end) % 2 == 1).unsqueeze(1)
        return torch.where(odd, 2 - scores, scores)


def test_postprocessor_applied_to_every_chunk(real_features):
    q, g = real_features
    post = ReverseOddQueries()
    res = evaluate_matcher(FeatureDistance("cosine"), q, g, postprocessors=[post], chunk_size=37)
    assert post.prepared == (200, 200, False)
    assert post.calls == [(s, min(s + 37, 200)) for s in range(0, 200, 37)]
    d = compute_distance(q.features, g.features, "cosine")
    odd = (torch.arange(len(q)) % 2 == 1).unsqueeze(1)
    _assert_same(res, evaluate_rank_reference(torch.where(odd, 2 - d, d), q.pids, g.pids, q.camids, g.camids))
    assert res["mAP"] < evaluate_matcher(FeatureDistance("cosine"), q, g)["mAP"]  # it did change the ranking


class ToSimilarity(PostProcessor):
    """Turns distances into similarities: declares its output convention."""

    higher_is_better = True

    def __call__(self, scores, start, end):
        return -scores


def test_postprocessor_declares_output_convention(real_features):
    q, g = real_features
    _assert_same(evaluate_matcher(FeatureDistance("euclidean"), q, g, postprocessors=[ToSimilarity()]),
                 evaluate_matcher(FeatureDistance("euclidean"), q, g))


class StripeDistance(Matcher):
    """Toy QAConv-style matcher on feature maps ``[N, C, S, 1]``: mean cosine distance of corresponding stripes."""

    def features(self, model, images):
        return model.maps(images)

    def prepare_gallery(self, gallery):
        self.g = F.normalize(gallery.features.flatten(2), dim=1)

    def score(self, query, start, end):
        qm = F.normalize(query.features[start:end].flatten(2), dim=1)
        return 1 - torch.einsum("qcs,gcs->qg", qm, self.g) / qm.shape[2]


def test_feature_map_matcher_through_evaluate_model(cuhk01_loaders):
    qloader, gloader = cuhk01_loaders
    model, matcher = ColourHistogram(), StripeDistance()
    res = evaluate_model(model, qloader, gloader, matcher=matcher, chunk_size=64, progress=False)
    q, g = (extract_feature_set(model, loader, forward=matcher.features, progress=False)
            for loader in cuhk01_loaders)
    assert q.features.shape == (200, 24, 8, 1)
    qm, gm = F.normalize(q.features.flatten(2), dim=1), F.normalize(g.features.flatten(2), dim=1)
    d = 1 - torch.einsum("qcs,gcs->qg", qm, gm) / 8
    ref = evaluate_rank_reference(d, q.pids, g.pids, q.camids, g.camids, max_rank=20)
    assert res["rank1"] == pytest.approx(100 * ref["cmc"][0], abs=1e-9)
    assert res["mAP"] == pytest.approx(100 * ref["mAP"], abs=1e-9)
    assert res["num_skipped_queries"] == 0 and res["rank1"] >= 10.0


class Recorder(PostProcessor):
    def prepare(self, query, gallery, matcher):
        self.query, self.gallery = query, gallery

    def __call__(self, scores, start, end):
        return scores


def test_evaluate_model_gives_postprocessors_frames(market_root):
    ds = build_dataset("market1501", market_root)
    qloader, gloader = build_test_loaders(ds, height=32, width=16, batch_size=3)
    rec = Recorder()
    res = evaluate_model(ColourHistogram(), qloader, gloader, postprocessors=[rec], progress=False)
    assert res["num_valid_queries"] == 4 and res["num_skipped_queries"] == 0
    for fs, records in ((rec.query, ds.query), (rec.gallery, ds.gallery)):
        assert fs.paths == [r.path for r in records]
        names = [parse_market1501_name(p) for p in fs.paths]
        assert fs.seqs.tolist() == [n[2] for n in names] and fs.frames.tolist() == [n[3] for n in names]
        assert fs.times is None  # Market-1501 names carry no clock time
    # a loader without records: no stamps
    items = [{"img": torch.zeros(3, 8, 4), "pid": 1, "camid": 0, "path": "x.jpg"}]
    fs = extract_feature_set(ColourHistogram(), DataLoader(items, batch_size=1), progress=False)
    assert fs.frames is None and fs.seqs is None and fs.times is None


def test_registry_and_input_errors():
    assert MATCHERS.get("distance") is FeatureDistance and "distance" in MATCHERS.names()
    f = torch.zeros(4, 3)
    with pytest.raises(EvaluationError, match="camids has 3 entries"):
        FeatureSet(f, [1, 2, 3, 4], [0, 1, 0])
    with pytest.raises(EvaluationError, match=r"times must have shape \(4,\)"):
        FeatureSet(f, [1, 2, 3, 4], [0, 1, 0, 1], times=[0.0])
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        FeatureDistance("manhattan")
    fs = FeatureSet(torch.randn(4, 3), [1, 2, 1, 2], [0, 0, 1, 1])
    with pytest.raises(NasreidError, match=re.escape("[N, D] features, got gallery features of shape (4, 3, 2)")):
        evaluate_matcher(FeatureDistance(), fs, FeatureSet(torch.randn(4, 3, 2), fs.pids, fs.camids))

    class Wrong(CosineSimilarity):
        def score(self, query, start, end):
            return super().score(query, start, end)[:, :2]

    with pytest.raises(EvaluationError, match=r"Wrong returned scores \(2, 2\) for queries 0\.\.1; expected \(2, 4\)"):
        evaluate_matcher(Wrong(), fs, fs, chunk_size=2)
    with pytest.raises(EvaluationError, match="chunk_size"):
        evaluate_matcher(FeatureDistance(), fs, fs, chunk_size=0)
    with pytest.raises(EvaluationError, match="query must be a FeatureSet"):
        evaluate_matcher(FeatureDistance(), fs.features, fs)
    assert issubclass(EvaluationError, NasreidError) and issubclass(EvaluationError, ValueError)
