import math

import pytest
import torch
import torch.nn.functional as F

from nasreid.losses import CrossEntropyLabelSmooth, ReIDLoss, TripletLoss, build_reid_loss, pairwise_distance


def test_label_smoothing_matches_hand_formula():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    targets = torch.tensor([0, 1])
    eps = 0.2
    logp = torch.log_softmax(logits, dim=1)
    ce = -logp[torch.arange(2), targets].mean()
    uniform = (-logp).mean(dim=1).mean()
    expected = (1 - eps) * ce + eps * uniform
    got = CrossEntropyLabelSmooth(3, epsilon=eps)(logits, targets)
    assert torch.allclose(got, expected, atol=1e-6)
    # eps = 0 is plain cross entropy
    assert torch.allclose(CrossEntropyLabelSmooth(3, 0.0)(logits, targets), ce, atol=1e-6)


@pytest.mark.parametrize("bad", [3, -1])
def test_out_of_range_label_raises(bad):
    loss = CrossEntropyLabelSmooth(3)
    with pytest.raises(ValueError, match=f"label {bad} "):
        loss(torch.zeros(2, 3), torch.tensor([0, bad]))


def test_ce_shape_errors():
    with pytest.raises(ValueError):
        CrossEntropyLabelSmooth(3)(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        CrossEntropyLabelSmooth(3, epsilon=1.5)


def _square_example():
    # x0=(0,0), x1=(3,0) -> pid 0 ; x2=(0,1), x3=(3,4) -> pid 1
    feats = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [3.0, 4.0]], requires_grad=True)
    pids = torch.tensor([0, 0, 1, 1])
    return feats, pids


def test_triplet_batch_hard_hand_value():
    feats, pids = _square_example()
    # Distances: d01=3, d02=1, d03=5, d12=sqrt(10), d13=4, d23=sqrt(18).  margin m=0.3
    # anchor 0: hardest pos d01=3,        hardest neg min(d02,d03)=1       -> 0.3+3-1          = 2.3
    # anchor 1: hardest pos d10=3,        hardest neg min(d12,d13)=sqrt10  -> 0.3+3-sqrt10     = 0.13772
    # anchor 2: hardest pos d23=sqrt18,   hardest neg min(d20,d21)=1       -> 0.3+sqrt18-1     = 3.54264
    # anchor 3: hardest pos d32=sqrt18,   hardest neg min(d30,d31)=4       -> 0.3+sqrt18-4     = 0.54264
    # mean = (1.2 - sqrt10 + 2*sqrt18) / 4 = 1.630750
    expected = (1.2 - math.sqrt(10) + 2 * math.sqrt(18)) / 4
    loss = TripletLoss(margin=0.3)(feats, pids)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert loss.item() == pytest.approx(1.630750, abs=1e-5)


def test_triplet_soft_margin_hand_value():
    feats, pids = _square_example()
    d = [3 - 1, 3 - math.sqrt(10), math.sqrt(18) - 1, math.sqrt(18) - 4]  # d_ap - d_an per anchor
    expected = sum(math.log1p(math.exp(v)) for v in d) / 4
    loss = TripletLoss(soft_margin=True)(feats, pids)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_triplet_gradient_flows_and_finite():
    feats, pids = _square_example()
    TripletLoss(0.3)(feats, pids).backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert feats.grad.abs().sum() > 0
    # duplicated points (zero distance) must not give NaN gradients
    x = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [2.0, 2.0]], requires_grad=True)
    TripletLoss(0.3)(x, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(x.grad).all()


def test_triplet_ignores_anchors_without_positive():
    # pids [0, 0, 1]: anchor 2 has no positive and is ignored.
    # x0=(0,0), x1=(1,0), x2=(0,2): anchor0: 0.3+1-2 -> 0 (relu); anchor1: 0.3+1-sqrt5 -> 0
    # With margin 2: anchor0: 2+1-2=1; anchor1: 2+1-sqrt5=0.76393; mean=0.881966
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    loss = TripletLoss(margin=2.0)(x, torch.tensor([0, 0, 1]))
    assert loss.item() == pytest.approx((1 + 3 - math.sqrt(5)) / 2, abs=1e-5)


def test_triplet_no_valid_anchor_returns_zero_with_grad():
    x = torch.randn(4, 8, requires_grad=True)
    loss = TripletLoss()(x, torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_cosine_distance():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    d = pairwise_distance(x, "cosine")
    assert torch.allclose(d, torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError):
        TripletLoss(metric="manhattan")


def test_reid_loss_combined():
    torch.manual_seed(0)
    feats, pids = _square_example()
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0], [0.0, 5.0]], requires_grad=True)
    loss_fn = build_reid_loss(2, label_smooth=0.1, triplet_weight=0.5, triplet_margin=0.3)
    assert isinstance(loss_fn, ReIDLoss)
    total, parts = loss_fn({"logits": logits, "feat": feats}, pids)
    ce = F.cross_entropy(logits, pids, label_smoothing=0.1).item()
    tri = TripletLoss(0.3)(feats, pids).item()
    assert parts["ce"] == pytest.approx(ce, abs=1e-6)
    assert parts["triplet"] == pytest.approx(tri, abs=1e-6)
    assert parts["acc"] == pytest.approx(0.75)
    assert total.item() == pytest.approx(ce + 0.5 * tri, abs=1e-5)
    assert all(isinstance(v, float) for v in parts.values())
    total.backward()
    assert logits.grad is not None and feats.grad is not None

    ce_only = build_reid_loss(2)
    total, parts = ce_only({"logits": logits.detach()}, pids)
    assert parts["triplet"] == 0.0


def test_euclidean_triplet_rewards_shrinking_features_cosine_does_not():
    """A triplet term at its margin (the low CPU retrains of results/README.md, study section): while the hardest
    positive is farther than the hardest negative, the euclidean hinge falls towards the margin as every
    feature shrinks, so its gradient points at zero scale; the cosine form is unchanged by the scale."""
    feats, pids = _square_example()
    feats = feats.detach() + torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.9, 0.0], [0.0, 0.0]])  # a hard positive
    euc = build_reid_loss(2, triplet_weight=1.0, triplet_margin=0.3)
    cos = build_reid_loss(2, triplet_weight=1.0, triplet_margin=0.3, triplet_metric="cosine")
    logits = torch.zeros(4, 2)

    def tri(loss_fn, scale):
        return loss_fn({"logits": logits, "feat": feats * scale}, pids)[1]["triplet"]

    e = [tri(euc, s) for s in (1.0, 0.5, 0.1, 0.01)]
    assert e[0] > 0.3 and all(a > b for a, b in zip(e, e[1:])) and e[-1] == pytest.approx(0.3, abs=0.02)
    c = [tri(cos, s) for s in (1.0, 0.5, 0.1, 0.01)]
    assert c[0] > 0 and all(x == pytest.approx(c[0], rel=1e-4) for x in c)
    scale = torch.tensor(1.0, requires_grad=True)
    euc({"logits": logits, "feat": feats * scale}, pids)[0].backward()
    assert scale.grad > 0  # gradient descent shrinks the features


def test_reid_loss_reports_feature_norm_and_recipe_kwargs_reach_the_triplet():
    from nasreid.config import Recipe, RecipeError
    from nasreid.engine.validate import check_recipe

    feats, pids = _square_example()
    parts = build_reid_loss(2, triplet_weight=1.0)({"logits": torch.zeros(4, 2), "feat": feats}, pids)[1]
    assert parts["feat_norm"] == pytest.approx(float(feats.detach().norm(dim=1).mean()), rel=1e-6)
    loss = build_reid_loss(2, triplet_weight=1.0, triplet_metric="cosine", triplet_soft_margin=True)
    assert loss.triplet.metric == "cosine" and loss.triplet.soft_margin
    with pytest.raises(ValueError, match="manhattan"):
        build_reid_loss(2, triplet_weight=1.0, triplet_metric="manhattan")
    with pytest.raises(ValueError, match="manhattan"):  # validated even when the term is off (CE only)
        build_reid_loss(2, triplet_weight=0.0, triplet_metric="manhattan")
    assert build_reid_loss(2, triplet_weight=0.0).triplet is None
    base = {"name": "t", "data": {"dataset": {"name": "synthetic"}}, "space": {"name": "osnet_ain"},
            "model": {"genotype": "preset:osnet"},
            "loss": {"triplet_weight": 1.0, "kwargs": {"triplet_metrc": "cosine"}}}
    with pytest.raises(RecipeError, match="triplet_metrc"):
        check_recipe(Recipe.model_validate(base))
