"""RMGL (Wang et al., TIP 2020): receptive partition, activation balanced pooling, the space, presets, the loss."""
import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from nasreid.data.transforms import build_transforms
from nasreid.genotype import preset_genotype
from nasreid.losses import build_rmgl_loss
from nasreid.models.pretrained import PretrainedWeightsError
from nasreid.models.rmgl import (
    abp_boundaries,
    merge_partitions,
    receptive_partition,
    stripe_pool,
    stripe_starts,
    uniform_boundaries,
)
from nasreid.mutables import default_sample, frozen_context, recipe_overrides, simplify
from nasreid.registry import LOSSES, get_space
from nasreid.search_spaces.rmgl import PRESET_GENOTYPES, RSA_CHOICES, RMGLSpace

LABELS = ["rp_depth", "num_branches", "branch1_stripes", "branch2_stripes", "branch3_stripes", "abp",
          "rsa.p", "rsa.p_c", "rsa.r_c_min", "rsa.r_h_min", "rsa.r_w_min"]


pytestmark = pytest.mark.usefixtures("one_thread")


def sample(rp="stage2", stripes=(2, 3), abp=True, **rsa):
    s = {"rp_depth": rp, "num_branches": len(stripes), "abp": abp}
    padded = list(stripes) + [2, 3, 4][len(stripes):]
    s.update({f"branch{i + 1}_stripes": n for i, n in enumerate(padded)})
    s.update({k: v[2] for k, v in RSA_CHOICES.items()})
    s.update(rsa)
    return s


def build(s, **kw):
    with frozen_context(s):
        return RMGLSpace(**kw)


def expected_dim(stripes, rp, d=256):
    return d * sum(1 + n for n in stripes) * (2 if rp != "off" else 1)


@pytest.fixture(scope="module")
def cuhk_batch(cuhk01_dir):
    """Four real CUHK01 images (two identities), test transform at 128x64: [4, 3, 128, 64]."""
    tf = build_transforms(128, 64, is_train=False)
    files = sorted(cuhk01_dir.glob("*.png"))[:8:2]
    return torch.stack([tf(Image.open(f).convert("RGB")) for f in files])


# ---- receptive partition ---------------------------------------------------------------------------------
def test_stripe_starts_uniform_when_divisible_and_overlapping_otherwise():
    assert stripe_starts(16, 2) == (8, [0, 8])
    assert stripe_starts(24, 6) == (4, [0, 4, 8, 12, 16, 20])
    assert stripe_starts(16, 3) == (6, [0, 5, 10])  # ceil(16/3) rows, last stripe ends at row 15
    assert stripe_starts(8, 3) == (3, [0, 3, 5])  # round half up of 2.5
    assert stripe_starts(7, 1) == (7, [0])
    for h in range(1, 30):
        for n in range(1, h + 1):
            hs, starts = stripe_starts(h, n)
            assert starts[0] == 0 and starts[-1] + hs == h and hs == math.ceil(h / n)
            assert all(b > a for a, b in itertools.pairwise(starts))
            assert all(b <= a + hs for a, b in itertools.pairwise(starts))  # no row left out
    with pytest.raises(ValueError, match="4 stripes"):
        stripe_starts(3, 4)
    with pytest.raises(ValueError, match="integer >= 1"):
        stripe_starts(8, 0)


def test_partition_and_merge_shapes_and_order():
    x = torch.arange(2 * 1 * 6 * 2, dtype=torch.float32).view(2, 1, 6, 2)
    p = receptive_partition(x, 3)
    assert p.shape == (6, 1, 2, 2)
    m = merge_partitions(p, 3)
    assert m.shape == (3, 2, 1, 2, 2)
    for k in range(3):
        assert torch.equal(m[k], x[:, :, 2 * k:2 * k + 2])
    assert receptive_partition(x, 1) is x
    with pytest.raises(ValueError, match="7 stripes"):
        receptive_partition(x, 7)
    with pytest.raises(ValueError, match="multiple of n=4"):
        merge_partitions(p, 4)


@pytest.mark.parametrize("rp", ["stage2", "stage3"])
def test_rp_path_equals_branch_on_each_stripe_real_images(cuhk_batch, rp):
    """Eval mode, real images: the RP path's output for stripe k is the branch's remaining stages run on
    stripe k alone (n = 2 on 16 rows; n = 3 on 16 rows at stage2, i.e. overlapping stripes of 6 rows)."""
    torch.manual_seed(0)
    net = build(sample(rp=rp, stripes=(2, 3)), width_mult=0.25, num_classes=0).eval()
    x = cuhk_batch
    with torch.no_grad():
        t = net.trunk(x)
        assert t.shape[2] == 16
        feat = net(x)
        offset = 0
        for branch, n in zip(net.branches, (2, 3)):
            mid = t
            for stage in branch.stages[:branch.rp_stage]:
                mid = stage(mid)
            _, z = branch.paths(t)
            assert z.shape[0] == n and z.shape[1] == x.shape[0]
            hs, starts = stripe_starts(mid.shape[2], n)
            if rp == "stage2" and n == 3:
                assert mid.shape[2] % 3 != 0 and hs * 3 > mid.shape[2]  # the non-divisible, overlapping case
            refs = []
            for k, s in enumerate(starts):
                r = mid[:, :, s:s + hs]
                for stage in branch.stages[branch.rp_stage:]:
                    r = stage(r)
                refs.append(r)
                assert torch.allclose(z[k], r, atol=1e-5, rtol=1e-4), (n, k)
            # the RP features of the eval output are the reductions of these maps' max pooling
            ref_pooled = [torch.stack(refs).amax(dim=(0, 3, 4))] + [r.amax(dim=(2, 3)) for r in refs]
            rp_feats = [branch.reductions[1 + n + i](p) for i, p in enumerate(ref_pooled)]
            d = net.reduce_dim
            start = offset + (1 + n) * d
            assert torch.allclose(feat[:, start:start + (1 + n) * d], torch.cat(rp_feats, 1), atol=1e-5, rtol=1e-4)
            offset += branch.feature_dim
        assert offset == feat.shape[1]


# ---- activation balanced pooling -------------------------------------------------------------------------
def crafted(rows, height=6, width=2):
    """[1, C, H, W] map whose channel c peaks (value 1, elsewhere -1) at row rows[c], column c % W."""
    fmap = -torch.ones(1, len(rows), height, width)
    for c, r in enumerate(rows):
        fmap[0, c, r, c % width] = 1.0
    return fmap


def test_abp_boundaries_on_a_crafted_map():
    rows = [0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 5]  # H(h) = 3, 5, 6, 8, 9, 12 for h = 1..6
    f = crafted(rows)
    assert abp_boundaries(f, 3).tolist() == [[0, 1, 4, 6]]  # ceil(kC/n) = 4, 8
    assert abp_boundaries(f, 2).tolist() == [[0, 3, 6]]  # 6
    assert abp_boundaries(f, 4).tolist() == [[0, 1, 3, 5, 6]]  # 3, 6, 9
    assert abp_boundaries(f, 1).tolist() == [[0, 6]]
    # batched with an image whose maxima all lie in row 0 (the raw boundaries of Eq. 10 would be 0, 0):
    # pushed to one row per stripe; a constant channel counts its first row (ties)
    g = crafted([0] * 11 + [0])
    g[0, 11] = 0.0
    both = torch.cat([f, g])
    assert abp_boundaries(both, 3).tolist() == [[0, 1, 4, 6], [0, 1, 2, 6]]
    with pytest.raises(ValueError, match="7 stripes"):
        abp_boundaries(f, 7)


def test_abp_boundaries_satisfy_eq10_on_random_maps():
    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(6, 64, 24, 8, generator=g)
    for n in (2, 3, 4, 6):
        bounds = abp_boundaries(fmap, n).numpy()
        assert bounds.shape == (6, n + 1)
        for b in range(6):
            rows = fmap[b].flatten(1).argmax(1).numpy() // 8
            cum = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=24))])  # H(h), h = 0..24
            assert bounds[b, 0] == 0 and bounds[b, -1] == 24 and (np.diff(bounds[b]) >= 1).all()
            for k in range(1, n):
                t, h = math.ceil(k * 64 / n), bounds[b, k]
                assert cum[h] <= t < cum[h + 1], (n, b, k)  # Eq. 10


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_stripe_pool_equals_direct_pooling(mode):
    g = torch.Generator().manual_seed(1)
    fmap = torch.randn(3, 5, 9, 4, generator=g)
    bounds = torch.tensor([[0, 2, 5, 9], [0, 1, 2, 9], [0, 7, 8, 9]])
    out = stripe_pool(fmap, bounds, mode)
    assert out.shape == (3, 5, 3)
    for b in range(3):
        for k in range(3):
            part = fmap[b, :, bounds[b, k]:bounds[b, k + 1]]
            ref = part.amax(dim=(1, 2)) if mode == "max" else part.mean(dim=(1, 2))
            assert torch.allclose(out[b, :, k], ref, atol=1e-6)
    uni = uniform_boundaries(fmap, 3)
    assert uni.tolist() == [[0, 3, 6, 9]] * 3
    if mode == "max":  # uniform divisible stripes: the adaptive max pooling of training
        assert torch.allclose(stripe_pool(fmap, uni, "max"), F.adaptive_max_pool2d(fmap, (3, 1)).flatten(2))
    with pytest.raises(ValueError, match="'median'"):
        stripe_pool(fmap, bounds, "median")
    with pytest.raises(ValueError, match="strictly"):
        stripe_pool(fmap, torch.tensor([[0, 2, 2, 9]] * 3), mode)


def test_eval_uses_abp_for_original_stripes_only_when_on(cuhk_batch):
    torch.manual_seed(0)
    on = build(sample(rp="off", stripes=(3,), abp=True), width_mult=0.25).eval()
    off = build(sample(rp="off", stripes=(3,), abp=False), width_mult=0.25).eval()
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        y, _ = on.branches[0].paths(on.trunk(cuhk_batch))
        stripes = stripe_pool(y, abp_boundaries(y, 3), "max")
        ref = torch.cat([on.branches[0].reductions[0](y.amax(dim=(2, 3)))]
                        + [on.branches[0].reductions[1 + k](stripes[:, :, k]) for k in range(3)], 1)
        assert torch.allclose(on(cuhk_batch), ref, atol=1e-5)
        uni = F.adaptive_max_pool2d(y, (3, 1)).flatten(2)
        ref_off = torch.cat([off.branches[0].reductions[0](y.amax(dim=(2, 3)))]
                            + [off.branches[0].reductions[1 + k](uni[:, :, k]) for k in range(3)], 1)
        assert torch.allclose(off(cuhk_batch), ref_off, atol=1e-5)


# ---- the space -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rp, stripes", [("stage2", (2, 3)), ("off", (1, 4, 6)), ("stage3", (6,)),
                                         ("stage4", (3, 1))])
def test_osnet_shapes_train_and_eval(rp, stripes):
    torch.manual_seed(0)
    net = build(sample(rp=rp, stripes=stripes), width_mult=0.25, num_classes=7)
    x = torch.randn(2, 3, 128, 64)
    out = net.train()(x)
    d = expected_dim(stripes, rp)
    assert net.feature_dim == d and out["feat"].shape == (2, d)
    n_feats = sum(1 + n for n in stripes) * (2 if rp != "off" else 1)
    assert len(out["logits_list"]) == n_feats and all(lg.shape == (2, 7) for lg in out["logits_list"])
    assert out["logits"] is out["logits_list"][0]
    assert [f.shape[1] for f in out["feat_branches"]] == [256 * (1 + n) * (2 if rp != "off" else 1) for n in stripes]
    assert torch.equal(torch.cat(out["feat_branches"], 1), out["feat"])
    with torch.no_grad():
        assert net.eval()(x).shape == (2, d)


def test_resnet50_shapes_train_and_eval():
    torch.manual_seed(0)
    net = RMGLSpace(backbone="resnet50", num_classes=5)  # the defaults: RP stage2, 2 + 3 stripes, ABP
    assert net.branches[0].stages[2][0].conv2.stride == (1, 1)
    out = net.train()(torch.randn(2, 3, 128, 64))
    assert out["feat"].shape == (2, expected_dim((2, 3), "stage2")) and len(out["logits_list"]) == 14
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 3, 384, 128)).shape == (2, net.feature_dim)  # the paper's input
    # the branches are independent copies of layer2-4
    assert net.branches[0].stages[0] is not net.branches[1].stages[0]
    assert net.branches[0].stages[0][0].conv1.weight.data_ptr() != net.branches[1].stages[0][0].conv1.weight.data_ptr()


def test_num_classes_zero_has_no_classifier():
    net = build(sample(), width_mult=0.25)
    assert not any("classifier" in k for k, _ in net.named_parameters())
    out = net.train()(torch.randn(2, 3, 128, 64))
    assert "logits" not in out and "logits_list" not in out


def test_param_names_match_the_10x_lr_patterns():
    import fnmatch

    net = build(sample(), width_mult=0.25, num_classes=3)
    names = [k for k, _ in net.named_parameters()]
    red = [k for k in names if fnmatch.fnmatch(k, "*reduction*")]
    cls = [k for k in names if fnmatch.fnmatch(k, "*classifier*")]
    assert len(red) == 14 * 3 and len(cls) == 14 * 2  # conv weight, BN weight + bias; linear weight + bias


def test_labels_defaults_and_recipe_overrides():
    space = RMGLSpace(width_mult=0.25)
    assert list(simplify(space)) == LABELS
    assert default_sample(space) == PRESET_GENOTYPES["rmgl_paper"]["choices"]  # the paper's RMGL
    assert space.stripes == (2, 3) and space.rp_stage == 0 and space.branches[0].abp
    s = sample(**{"rsa.p": 0.25, "rsa.r_c_min": 0.9})
    assert recipe_overrides(space, s) == {"data.augment.rsa.p": 0.25, "data.augment.rsa.p_c": 0.5,
                                          "data.augment.rsa.r_c_min": 0.9, "data.augment.rsa.r_h_min": 0.5,
                                          "data.augment.rsa.r_w_min": 0.5}
    plain = RMGLSpace(width_mult=0.25, search_rsa=False, branch_choices=(1, 2), rp_choices=("off", "stage3"))
    assert list(simplify(plain)) == ["rp_depth", "num_branches", "branch1_stripes", "branch2_stripes", "abp"]
    assert default_sample(plain)["rp_depth"] == "off"  # the paper's stage2 is not a choice: first value
    assert recipe_overrides(plain, default_sample(plain)) == {}


@pytest.mark.parametrize("name", sorted(PRESET_GENOTYPES))
def test_every_preset_builds_and_runs(name):
    geno = preset_genotype("rmgl", name)
    space = get_space("rmgl")()
    assert set(geno.choices) == set(simplify(space))
    torch.manual_seed(0)
    net = geno.build(num_classes=5)
    stripes = tuple(geno.choices[f"branch{i + 1}_stripes"] for i in range(geno.choices["num_branches"]))
    assert net.stripes == stripes
    out = net.train()(torch.randn(2, 3, 128, 64))  # osnet: final map 8 x 4 (3 and 6 stripes do not divide 8)
    assert out["feat"].shape == (2, expected_dim(stripes, geno.choices["rp_depth"]))


@pytest.mark.parametrize("kwargs, match", [
    ({"backbone": "vgg"}, "backbone"), ({"width_mult": 0}, "width_mult"), ({"reduce_dim": 0}, "reduce_dim"),
    ({"last_stride": 3}, "last_stride"), ({"last_stride": 2}, "last_stride"), ({"num_classes": -1}, "num_classes"),
    ({"rp_choices": ("stage5",)}, "rp_choices"), ({"branch_choices": ()}, "branch_choices"),
    ({"stripe_choices": (2, 0)}, "stripe_choices"), ({"abp_pool": "sum"}, "abp_pool"),
    ({"search_rsa": 1}, "search_rsa"), ({"imagenet_weights": "x.pt"}, "imagenet_weights"),
    ({"backbone": "resnet50", "width_mult": 0.5}, "width_mult"),
])
def test_bad_kwargs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RMGLSpace(**kwargs)


def test_bad_sample_value_is_named():
    with pytest.raises(ValueError, match="branch2_stripes"):
        build(sample(stripes=(2, 5)), width_mult=0.25)


# ---- ImageNet weights ------------------------------------------------------------------------------------
def test_imagenet_weights_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(PretrainedWeightsError, match="nope.pt"):
        RMGLSpace(backbone="resnet50", imagenet_weights=str(missing))
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(3, 3), "head.bias": torch.zeros(2)}, wrong)
    with pytest.raises(PretrainedWeightsError, match=r"wrong\.pt.*missing.*head\.bias.*conv1\.weight \[3, 3\]"):
        RMGLSpace(backbone="resnet50", imagenet_weights=wrong)


def test_imagenet_weights_load_into_trunk_and_every_branch(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    sd = resnet50(weights=None).state_dict()
    path = tmp_path / "r50.pt"
    torch.save(sd, path)
    torch.manual_seed(2)  # a different random init: equality below means loaded
    with frozen_context(sample(stripes=(1, 2, 3))):
        net = RMGLSpace(backbone="resnet50", imagenet_weights=path, num_classes=4)
    assert torch.equal(net.trunk[0].weight, sd["conv1.weight"])
    assert torch.equal(net.trunk[4][2].conv3.weight, sd["layer1.2.conv3.weight"])
    assert len(net.branches) == 3
    for b in net.branches:
        assert torch.equal(b.stages[0][1].conv2.weight, sd["layer2.1.conv2.weight"])
        assert torch.equal(b.stages[1][0].conv1.weight, sd["layer3.0.conv1.weight"])
        assert torch.equal(b.stages[2][0].downsample[1].running_var, sd["layer4.0.downsample.1.running_var"])
        assert b.stages[2][0].conv2.stride == (1, 1)


# ---- the loss --------------------------------------------------------------------------------------------
def test_rmgl_loss_values_and_gradients():
    torch.manual_seed(0)
    net = build(sample(stripes=(2, 3)), width_mult=0.25, num_classes=4).train()
    loss_fn = LOSSES.get("rmgl")(4, margin=0.6)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = net(torch.randn(8, 3, 128, 64))
    total, parts = loss_fn(out, {"pid": pids})
    assert torch.isfinite(total) and set(parts) == {"loss", "ce", "triplet", "acc"}
    assert 0.0 <= parts["acc"] <= 1.0
    ce = sum(F.cross_entropy(lg, pids) for lg in out["logits_list"])
    tri = loss_fn.triplet
    ref = ce + sum(tri(f, pids) for f in out["feat_branches"])
    assert torch.allclose(total, ref) and math.isclose(parts["ce"], float(ce.detach()), rel_tol=1e-5)
    total.backward()
    for name, p in net.named_parameters():
        if "reduction" in name or "classifier" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_rmgl_loss_errors_and_weights():
    loss_fn = build_rmgl_loss(3, triplet_weight=0.0, label_smooth=0.1)
    assert loss_fn.triplet is None
    with pytest.raises(KeyError, match="logits_list"):
        loss_fn({"feat": torch.zeros(2, 4), "feat_branches": [torch.zeros(2, 4)]}, torch.tensor([0, 1]))
    with pytest.raises(KeyError, match="feat_branches"):
        loss_fn({"logits_list": [torch.zeros(2, 3)]}, torch.tensor([0, 1]))
    _, parts = loss_fn({"logits_list": [torch.zeros(2, 3)], "feat_branches": [torch.zeros(2, 4)]},
                           torch.tensor([0, 1]))
    assert parts["triplet"] == 0.0 and math.isclose(parts["ce"], math.log(3), rel_tol=1e-6)
    with pytest.raises(ValueError, match="margin"):
        build_rmgl_loss(3, margin=-1)
    with pytest.raises(ValueError, match="id_weight"):
        build_rmgl_loss(3, id_weight=-1)
    with pytest.raises(ValueError, match="label_smooth"):
        build_rmgl_loss(3, label_smooth=2)


def test_rmgl_loss_id_reduction_mean_divides_by_the_number_of_classifiers():
    torch.manual_seed(0)
    logits = [torch.randn(4, 3) for _ in range(5)]
    out = {"logits_list": logits, "feat_branches": [torch.randn(4, 8)]}
    pids = torch.tensor([0, 0, 1, 1])
    s, ps = build_rmgl_loss(3, triplet_weight=0.0)(out, pids)
    m, pm = build_rmgl_loss(3, triplet_weight=0.0, id_reduction="mean")(out, pids)
    assert torch.allclose(m * 5, s) and math.isclose(pm["ce"] * 5, ps["ce"], rel_tol=1e-6)
    with pytest.raises(ValueError, match="id_reduction"):
        build_rmgl_loss(3, id_reduction="max")


def test_equal_stripe_pool_and_running_max_equal_the_torch_ops_they_replace():
    """The ONNX-exportable forms (static slices, elementwise maxima) equal F.adaptive_max_pool2d(y, (n, 1)) and
    torch.cummax exactly, for every n <= H, divisible or not."""
    from nasreid.models.rmgl import _running_max, equal_stripe_pool

    g = torch.Generator().manual_seed(0)
    for h in (1, 3, 5, 8, 12, 16):
        for n in range(1, h + 1):
            y = torch.randn(2, 3, h, 4, generator=g)
            assert torch.equal(equal_stripe_pool(y, n), F.adaptive_max_pool2d(y, (n, 1)).flatten(2)), (h, n)
    x = torch.randint(-9, 9, (5, 7), generator=g)
    assert torch.equal(_running_max(x), torch.cummax(x, dim=1).values)
