"""QAConv (Liao & Shao, ECCV 2020): the matcher head against explicit computations, the class memory, the focal
loss, blocked evaluation, Random Block, and the head on real backbones with real CUHK01 images."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision import tv_tensors
from torchvision.transforms import v2

from conftest import missing
from nasreid.data import ImageDataset, build_dataset, build_test_loaders, build_transforms
from nasreid.data.random_block import RandomBlock
from nasreid.errors import NasreidError
from nasreid.evaluation import EvaluationError, FeatureSet, evaluate_matcher, evaluate_model, evaluate_rank
from nasreid.evaluation.qaconv import QAConvMatcher
from nasreid.genotype import preset_genotype
from nasreid.models.qaconv import (
    QAConvError,
    QAConvHead,
    QAConvMemory,
    attach_qaconv,
    qaconv_diagnostics,
    qaconv_focal_loss,
    qaconv_reference,
)
from nasreid.registry import MATCHERS

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_like(head: QAConvHead, seed: int = 0) -> QAConvHead:
    """Random (not default) BN statistics and affine parameters, FC weights: a head as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (head.bn_in, head.bn_out):
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) * 0.6)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 0.5 + 0.05)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
        head.fc.weight.copy_(torch.randn(head.fc.weight.shape, generator=g) * 0.3)
        head.fc.bias.fill_(-0.2)
    return head


def _unit_maps(n: int, d: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, h, w, generator=g), dim=1)


# ---- QAConv matching --------------------------------------------------------------------------------------------
def test_kernel1_is_max_cosine_similarity_both_ways():
    g = torch.Generator().manual_seed(1)
    raw_p, raw_g = torch.randn(3, 6, 4, 3, generator=g), torch.randn(5, 6, 4, 3, generator=g)
    head = QAConvHead(6, 4, 3, "layer3", dim=None)
    scores = head.match(head.normalize(raw_p), head.normalize(raw_g))
    assert scores.shape == (3, 5, 2 * 12)
    # direct: cosine of every probe location i and gallery location j with explicitly normalised vectors
    pv = raw_p.flatten(2).double()
    gv = raw_g.flatten(2).double()
    pv = pv / pv.pow(2).sum(1, keepdim=True).sqrt()
    gv = gv / gv.pow(2).sum(1, keepdim=True).sqrt()
    cos = torch.einsum("pdi,gdj->pgij", pv, gv)
    np.testing.assert_allclose(scores[..., :12].double(), cos.amax(dim=3), atol=1e-6)  # best gallery loc per probe loc
    np.testing.assert_allclose(scores[..., 12:].double(), cos.amax(dim=2), atol=1e-6)  # best probe loc per gallery loc
    assert float(scores.abs().max()) <= 1 + 1e-6
    # a pair with itself: every location finds itself, similarity 1
    self_scores = head.match(head.normalize(raw_p[:1]), head.normalize(raw_p[:1]))
    np.testing.assert_allclose(self_scores, torch.ones(1, 1, 24), atol=1e-6)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_match_and_logits_equal_the_loop_reference(kernel, mode):
    head = _trained_like(QAConvHead(10, 3, 2, "conv4", dim=5, kernel=kernel), seed=kernel)
    head.train(mode == "train")
    g = torch.Generator().manual_seed(2)
    probe = head.normalize(torch.randn(2, 10, 3, 2, generator=g))
    gallery = head.normalize(torch.randn(3, 10, 3, 2, generator=g))
    assert probe.shape == (2, 5, 3, 2)
    ref_logits, ref_scores = qaconv_reference(head, probe, gallery, return_scores=True)
    np.testing.assert_allclose(head.match(probe, gallery).detach().double(), ref_scores, atol=1e-5)
    logits = head(probe, gallery)
    assert logits.shape == (2, 3)
    np.testing.assert_allclose(logits.detach().double(), ref_logits, atol=1e-4)


def test_head_errors():
    head = QAConvHead(8, 4, 2, "conv4", dim=4)
    with pytest.raises(QAConvError, match=r"\[N, 4, 4, 2\]"):
        head(torch.zeros(2, 4, 4, 3), torch.zeros(2, 4, 4, 2))
    with pytest.raises(QAConvError, match="in_channels|\\[B, 8"):
        head.normalize(torch.zeros(2, 5, 4, 2))
    with pytest.raises(QAConvError, match="odd"):
        QAConvHead(8, 4, 2, "conv4", kernel=2)
    with pytest.raises(QAConvError, match="block_size"):
        head.similarity(torch.zeros(1, 4, 4, 2), torch.zeros(1, 4, 4, 2), block_size=0)
    assert isinstance(QAConvError("x"), NasreidError) and isinstance(QAConvError("x"), ValueError)


# ---- class memory -----------------------------------------------------------------------------------------------
def test_memory_direct_replacement_last_occurrence_wins():
    mem = QAConvMemory(5, 4, 2, 2)
    assert mem.maps.shape == (5, 4, 2, 2) and float(mem.maps.abs().sum()) == 0.0 and not mem.filled.any()
    assert {"maps", "filled"} <= set(mem.state_dict())
    first = torch.randn(1, 4, 2, 2)
    mem.update(first, torch.tensor([2]))
    x = torch.randn(6, 4, 2, 2, requires_grad=True)
    y = x * 2  # part of a graph
    mem.update(y, torch.tensor([1, 3, 1, 0, 3, 1]))
    assert torch.equal(mem.maps[1], y[5].detach())  # class 1 at 0, 2, 5: the last one
    assert torch.equal(mem.maps[3], y[4].detach())
    assert torch.equal(mem.maps[0], y[3].detach())
    assert torch.equal(mem.maps[2], first[0])  # absent from the batch: untouched
    assert float(mem.maps[4].abs().sum()) == 0.0
    assert mem.filled.tolist() == [True, True, True, True, False]
    assert not mem.maps.requires_grad and mem.maps.grad_fn is None
    kept = mem.maps[1].clone()
    with torch.no_grad():
        y.add_(1.0)  # no aliasing with the batch
    assert torch.equal(mem.maps[1], kept)
    with pytest.raises(QAConvError, match=r"\[0, 5\)"):
        mem.update(torch.zeros(1, 4, 2, 2), torch.tensor([5]))
    with pytest.raises(QAConvError, match="expects"):
        mem.update(torch.zeros(2, 4, 2, 2), torch.tensor([1]))


# ---- focal loss -------------------------------------------------------------------------------------------------
def test_focal_loss_gamma0_is_bce_and_eq1_explicit():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 10, generator=g) * 3
    pids = torch.tensor([0, 3, 3, 9, 5, 1])
    onehot = F.one_hot(pids, 10).float()
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / 6
    assert float(qaconv_focal_loss(logits, pids, gamma=0.0)) == pytest.approx(float(bce), rel=1e-6)
    # Eq. 1-2 written out with probabilities
    p = torch.sigmoid(logits.double())
    p_hat = torch.where(onehot.bool(), p, 1 - p)
    eq1 = -((1 - p_hat) ** 2 * torch.log(p_hat)).sum() / 6
    assert float(qaconv_focal_loss(logits, pids)) == pytest.approx(float(eq1), rel=1e-6)


def test_focal_loss_downweights_easy_pairs_and_is_stable():
    pids = torch.tensor([0, 1])
    easy = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])  # p_hat = 0.982 everywhere
    hard = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])  # p_hat = 0.269 everywhere
    ratio_easy = qaconv_focal_loss(easy, pids) / qaconv_focal_loss(easy, pids, gamma=0)
    ratio_hard = qaconv_focal_loss(hard, pids) / qaconv_focal_loss(hard, pids, gamma=0)
    assert float(ratio_easy) == pytest.approx(float(1 - torch.sigmoid(torch.tensor(4.0))) ** 2, rel=1e-5)
    assert float(ratio_easy) < 1e-3
    assert float(ratio_hard) > 0.5
    extreme = torch.tensor([[200.0, 200.0], [-200.0, -200.0]], requires_grad=True)
    loss = qaconv_focal_loss(extreme, pids)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(extreme.grad).all()
    assert float(loss.detach()) == pytest.approx(200.0, rel=1e-3)  # two confident errors of log-loss 200, weight 1
    with pytest.raises(QAConvError):
        qaconv_focal_loss(easy, torch.tensor([0, 2]))
    d = qaconv_diagnostics(torch.tensor([[3.0, 0.0, -1.0], [2.0, 1.0, 0.0]]), torch.tensor([0, 1]))
    assert d["acc"] == 0.5
    assert d["pos_prob"] == pytest.approx(float(torch.sigmoid(torch.tensor([3.0, 1.0])).mean()))


# ---- blocked evaluation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [1, 3])
def test_blocked_similarity_equals_unblocked(kernel):
    head = _trained_like(QAConvHead(8, 4, 2, "conv4", dim=None, kernel=kernel))
    probe, gallery = _unit_maps(7, 8, 4, 2, seed=4), _unit_maps(11, 8, 4, 2, seed=5)
    head.eval()
    full = torch.sigmoid(head(probe, gallery)).detach()
    head.train()  # similarity must use the running statistics whatever the mode, and restore the mode
    running = head.bn_in.running_mean.clone()
    for bs, elems in ((3, 1), (4, 200), (5, 64 * 7), (256, None)):  # tiles of 1, 3 and 7 pairs; one tile
        sims = head.similarity(probe, gallery, block_size=bs, max_block_elements=elems)
        assert sims.shape == (7, 11) and sims.dtype == torch.float32
        np.testing.assert_allclose(sims, full, atol=1e-6)
    assert head.training and torch.equal(head.bn_in.running_mean, running)
    assert float(sims.min()) >= 0 and float(sims.max()) <= 1


def _feature_set(maps, pids, camids):
    return FeatureSet(maps, np.asarray(pids), np.asarray(camids))


def test_matcher_blocked_equals_unblocked_through_evaluate_matcher():
    head = _trained_like(QAConvHead(8, 4, 2, "conv4", dim=None)).eval()
    q_maps, g_maps = _unit_maps(6, 8, 4, 2, seed=6), _unit_maps(9, 8, 4, 2, seed=7)
    g_maps[:6] = F.normalize(q_maps + 0.3 * _unit_maps(6, 8, 4, 2, seed=8), dim=1)  # near copies: real positives
    query = _feature_set(q_maps, [1, 2, 3, 4, 5, 6], [0] * 6)
    gallery = _feature_set(g_maps, [1, 2, 3, 4, 5, 6, 7, 8, 9], [1] * 9)
    assert MATCHERS.get("qaconv") is QAConvMatcher and QAConvMatcher.higher_is_better
    matcher = QAConvMatcher(block_size=2, head=head)
    matcher.prepare_gallery(gallery)
    full = torch.sigmoid(head(q_maps, g_maps)).detach()
    np.testing.assert_allclose(matcher.score(query, 2, 5), full[2:5], atol=1e-6)
    res = evaluate_matcher(QAConvMatcher(block_size=2, head=head), query, gallery, chunk_size=4, max_rank=5)
    ref = evaluate_rank((-full).numpy(), query.pids, gallery.pids, query.camids, gallery.camids, max_rank=5)
    np.testing.assert_allclose(res["cmc"], ref["cmc"], atol=1e-12)
    assert res["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
    # errors: no head, not unit-norm maps, wrong shape, score before prepare_gallery
    with pytest.raises(EvaluationError, match="features"):
        QAConvMatcher().prepare_gallery(gallery)
    with pytest.raises(EvaluationError, match="unit-norm"):
        QAConvMatcher(head=head).prepare_gallery(_feature_set(g_maps * 2, gallery.pids, gallery.camids))
    with pytest.raises(EvaluationError, match=r"\[N, 8, 4, 2\]"):
        QAConvMatcher(head=head).prepare_gallery(_feature_set(g_maps[:, :, :3], gallery.pids, gallery.camids))
    with pytest.raises(EvaluationError, match="prepare_gallery"):
        QAConvMatcher(head=head).score(query, 0, 2)
    with pytest.raises(EvaluationError, match="training.method: qaconv"):
        QAConvMatcher().features(torch.nn.Conv2d(3, 4, 1), torch.zeros(1, 3, 8, 4))


# ---- Random Block -----------------------------------------------------------------------------------------------
def _check_block(before: torch.Tensor, after: torch.Tensor, white, max_side: int) -> int:
    """The changed pixels form one white square fully inside; returns its side."""
    changed = (after != before).any(dim=0)
    ys, xs = changed.nonzero(as_tuple=True)
    assert len(ys) > 0
    t, b, left, r = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    side = b - t + 1
    assert side == r - left + 1 <= max_side
    assert 0 <= t and b < before.shape[1] and 0 <= left and r < before.shape[2]
    assert bool(changed[t:b + 1, left:r + 1].all()) and int(changed.sum()) == side * side
    assert bool((after[:, t:b + 1, left:r + 1] == white).all())
    return side


def test_random_block_tensor_stays_inside():
    torch.manual_seed(0)
    rb = RandomBlock(p=1.0)
    H, W = 40, 20
    img = torch.randint(0, 255, (3, H, W), dtype=torch.uint8)  # no white pixel yet
    sides = [_check_block(img, rb(img), 255, 16) for _ in range(300)]
    assert min(sides) == 1 and max(sides) == 16  # U{1 .. floor(0.8 * 20)}
    f = torch.rand(3, H, W) * 0.99
    out = rb(tv_tensors.Image(f))
    assert isinstance(out, tv_tensors.Image)
    _check_block(f, out.as_subclass(torch.Tensor), 1.0, 16)
    wide = torch.randint(0, 255, (3, 5, 30), dtype=torch.uint8)  # side clamped to the height
    assert max(_check_block(wide, rb(wide), 255, 5) for _ in range(100)) == 5
    assert torch.equal(RandomBlock(p=0.0)(img), img)
    applied = sum(not torch.equal(RandomBlock(p=0.5)(img), img) for _ in range(400))
    assert 150 < applied < 250
    assert repr(RandomBlock(0.3, 0.5)) == "RandomBlock(p=0.3, max_ratio=0.5)"
    with pytest.raises(ValueError, match="max_ratio"):
        RandomBlock(max_ratio=0)
    with pytest.raises(TypeError, match="dtype"):
        RandomBlock(p=1.0)(torch.zeros(3, 8, 8, dtype=torch.int32))


def test_random_block_pil_real_image(cuhk01_dir):
    rb = RandomBlock(p=1.0)
    torch.manual_seed(1)
    rng = np.random.default_rng(0)
    synth = PIL.Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8))
    base = torch.from_numpy(np.array(synth)).permute(2, 0, 1)
    for _ in range(200):
        out = rb(synth)
        assert isinstance(out, PIL.Image.Image) and out.size == synth.size and out.mode == "RGB"
        _check_block(base, torch.from_numpy(np.array(out)).permute(2, 0, 1), 255, 24)
    with PIL.Image.open(min(cuhk01_dir.glob("*.png"))) as im:
        real = im.convert("RGB")
    arr = np.asarray(real)
    for seed in range(20):
        torch.manual_seed(seed)
        prm = rb.get_params(real.height, real.width)
        torch.manual_seed(seed)
        out = np.asarray(rb(real))
        t, left, s = prm["top"], prm["left"], prm["size"]
        assert 1 <= s <= int(0.8 * real.width) and t + s <= real.height and left + s <= real.width
        assert (out[t:t + s, left:left + s] == 255).all()
        mask = np.ones(arr.shape[:2], bool)
        mask[t:t + s, left:left + s] = False
        assert (out[mask] == arr[mask]).all()
    assert np.array_equal(np.asarray(RandomBlock(p=0.0)(real)), arr)
    # in a pipeline, before ToDtype / Normalize
    pipe = v2.Compose([v2.ToImage(), v2.Resize((128, 64)), RandomBlock(p=1.0), v2.ToDtype(torch.float32, scale=True)])
    x = pipe(real)
    assert x.shape == (3, 128, 64) and float(x.max()) == 1.0
    with pytest.raises(TypeError, match="mode"):
        rb(real.convert("P"))


# ---- real backbones, real images --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuhk01_images(shared_data):
    root = shared_data / "cuhk01"
    if not (root / "campus").is_dir():
        missing(f"cuhk01 not present in {shared_data}")
    ds = build_dataset("cuhk01", root, split_seed=0, max_ids=24)
    items = ImageDataset(ds.train[:4], transform=build_transforms(128, 64, is_train=False))
    return torch.stack([items[i]["img"] for i in range(4)])


BACKBONES = {
    # space -> (factory, stage, channels at the stage, a module that runs after the stage, one before it)
    "osnet_ain": (lambda: preset_genotype("osnet_ain", "osnet_ain").build(num_classes=10), "conv4", 512, "conv5",
                  "conv1"),
    "msinet": (lambda: preset_genotype("msinet", "msinet_paper").build(num_classes=10), "stage3", 512, "head",
               "conv1"),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), "layer3", 1024, "layer4", "conv1"),
}


@pytest.mark.parametrize("space", sorted(BACKBONES))
def test_attach_and_extract_on_real_images(space, cuhk01_images):
    make, stage, channels, later, earlier = BACKBONES[space]
    torch.manual_seed(0)
    net = make()
    net.train()
    head = attach_qaconv(net, stage, (128, 64))
    assert net.training and head.training  # modes restored / matched
    assert net.qaconv is head and (head.in_channels, head.dim, head.height, head.width) == (channels, 128, 8, 4)
    assert "qaconv.fc.weight" in net.state_dict() and "qaconv.reduce.weight" in net.state_dict()
    assert attach_qaconv(net, stage, (128, 64)) is head  # idempotent
    with pytest.raises(QAConvError, match="del net.qaconv"):
        attach_qaconv(net, stage, (128, 64), dim=64)

    calls = {"later": 0, "stage": 0}
    h1 = net.get_submodule(later).register_forward_hook(lambda *a: calls.__setitem__("later", calls["later"] + 1))
    h2 = net.get_submodule(stage).register_forward_hook(lambda *a: calls.__setitem__("stage", calls["stage"] + 1))
    net.eval()
    with torch.no_grad():
        maps = head.extract(net, cuhk01_images)
    assert maps.shape == (4, 128, 8, 4)
    np.testing.assert_allclose(maps.norm(dim=1), torch.ones(4, 8, 4), atol=1e-5)
    assert calls == {"later": 0, "stage": 1}  # stopped right after the stage

    net.train()
    maps = head.extract(net, cuhk01_images)
    loss = qaconv_focal_loss(head(maps, maps.detach()), torch.arange(4))
    loss.backward()
    assert calls["later"] == 0
    h1.remove()
    h2.remove()
    w_before = net.get_submodule(earlier)
    w_before = w_before.weight if hasattr(w_before, "weight") else next(w_before.parameters())
    assert w_before.grad is not None and float(w_before.grad.abs().sum()) > 0  # flows into the backbone
    assert all(p.grad is None for p in net.get_submodule(later).parameters())  # nothing ran after the stage
    assert head.fc.weight.grad is not None and head.reduce.weight.grad is not None

    with pytest.raises(QAConvError, match=r"'layer9'.*(conv1|layer1)"):
        attach_qaconv(make(), "layer9", (128, 64))
    bad = QAConvHead(channels, 8, 4, stage + "x")
    with pytest.raises(QAConvError, match=stage + "x"):
        bad.extract(net, cuhk01_images)


def test_attach_errors_and_rmgl_stage(cuhk01_images):
    net = preset_genotype("rmgl", "rmgl_paper").build(num_classes=10)
    head = attach_qaconv(net, "branches.0.stages.1", (128, 64))  # branch 0's s3 (OSNet conv4), original path
    assert (head.in_channels, head.height, head.width) == (512, 8, 4)
    net.eval()
    with torch.no_grad():
        assert head.extract(net, cuhk01_images).shape == (4, 128, 8, 4)
    with pytest.raises(QAConvError, match="feature map"):
        attach_qaconv(preset_genotype("msinet", "msinet_paper").build(num_classes=10), "head", (128, 64))
    other = torchvision.models.resnet18(weights=None)
    other.qaconv = torch.nn.Linear(2, 2)
    with pytest.raises(QAConvError, match="already has an attribute 'qaconv'"):
        attach_qaconv(other, "layer3", (128, 64))


def test_evaluate_model_with_qaconv_matcher_on_cuhk01(shared_data):
    ds = build_dataset("cuhk01", shared_data / "cuhk01", split_seed=0, max_ids=24)
    query_loader, gallery_loader = build_test_loaders(ds, height=128, width=64, batch_size=16)
    torch.manual_seed(0)
    net = preset_genotype("osnet_ain", "osnet_ain").build(num_classes=10)
    head = _trained_like(attach_qaconv(net, "conv4", (128, 64)))
    matcher = QAConvMatcher(block_size=5)
    res = evaluate_model(net, query_loader, gallery_loader, matcher=matcher, progress=False)
    assert matcher.head is head
    assert res["num_query"] == len(ds.query) and res["num_gallery"] == len(ds.gallery)
    assert 0 <= res["mAP"] <= 100 and res["num_valid_queries"] > 0
    with pytest.raises(EvaluationError, match="training.method: qaconv"):
        evaluate_model(preset_genotype("osnet_ain", "osnet_ain").build(num_classes=10), query_loader,
                       gallery_loader, matcher=QAConvMatcher(), progress=False)
