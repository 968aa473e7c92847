"""torchreid's plain OSNet file (MSMT17 OSNet x0.25) into the rmgl space's OSNet trunk and per-branch stages
(RMGL, Wang et al., TIP 2020, Sec. III-A / IV-A; OSNet, Zhou et al., ICCV 2019, Table 1): parity with the osnet_ain
space's preset ``osnet`` loaded from the same file, every backbone tensor from the file, wrong files refused."""
from __future__ import annotations

import math

import pytest
import torch

from nasreid.config import ModelConfig
from nasreid.genotype import preset_genotype
from nasreid.losses import build_rmgl_loss
from nasreid.models.interface import under_prefixes
from nasreid.models.pretrained import PretrainedWeightsError, init_weights, load_pretrained, read_state_dict, warm_start
from nasreid.models.torchreid import to_torchreid
from nasreid.search_spaces.rmgl import OSNET_PLACES, osnet_name, osnet_places

pytestmark = pytest.mark.usefixtures("one_thread")

MSMT17 = "osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth"
AIN = "osnet_ain_x0_25_imagenet/osnet_ain_x0_25_imagenet.pyth"
PRESETS = ("rmgl_paper", "baseline_2_3", "rmgl_2_3_4", "global_rsa")


def rmgl(preset: str = "rmgl_paper", num_classes: int = 7):
    return preset_genotype("rmgl", preset, width_mult=0.25, reduce_dim=32).build(num_classes=num_classes)


def test_the_name_map_round_trips():
    for src, dst in OSNET_PLACES:
        name = src + "residual.conv1.1.weight"
        keys = osnet_places(name, 3)
        assert keys == tuple(dict.fromkeys(dst.format(b=b) + "residual.conv1.1.weight" for b in range(3)))
        for key in keys:
            assert osnet_name(key) == name
    assert osnet_places("conv3.0.x", 2) == ("branches.0.stages.0.0.x", "branches.1.stages.0.0.x")
    assert osnet_places("head.embed.0.weight", 2) == ()
    assert osnet_places("conv2.0.in_in.weight", 2) == ("trunk.2.in_in.weight",)  # refused by the model: no in_in
    assert osnet_places("pool2.0.weight", 2) is None
    assert osnet_name("branches.1.reductions.0.0.weight") is None
    assert osnet_name("branches.11.stages.2.0.weight") == "conv5.0.weight"


def test_parity_with_the_osnet_preset_for_every_branch(shared_weights):
    """trunk(x) is the OSNet after conv2's transition; each branch's stages are conv3 + trans3, conv4, conv5."""
    path = shared_weights / MSMT17
    ref = preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=1041)
    assert load_pretrained(ref, path, skip=())["loaded"] == len(ref.state_dict())
    net = rmgl("rmgl_2_3_4")  # three branches
    report = load_pretrained(net, path)
    assert not report["missing"] and not report["unexpected"]
    ref.eval()
    net.eval()
    x = torch.randn(2, 3, 256, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        r = ref.forward_intermediates(x)
        t = net.trunk(x)
        torch.testing.assert_close(t, r["trans2"], rtol=1e-5, atol=1e-5)
        assert len(net.branches) == 3
        for branch in net.branches:
            s2 = branch.stages[0](t)
            s3 = branch.stages[1](s2)
            s4 = branch.stages[2](s3)
            torch.testing.assert_close(s2, r["trans3"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s3, r["conv4"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s4, r["conv5"], rtol=1e-5, atol=1e-5)
        assert tuple(s4.shape) == (2, 128, 16, 8)
        assert net(x).shape == (2, net.feature_dim)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("how", ["load", "warm"])
def test_every_backbone_tensor_comes_from_the_file_and_only_the_heads_are_new(preset, how, shared_weights):
    path = shared_weights / MSMT17
    sd = read_state_dict(path)
    net = rmgl(preset)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    report = (load_pretrained if how == "load" else warm_start)(net, path)
    heads = tuple(net.head_prefixes)
    assert all(h.endswith(("reductions", "classifiers")) for h in heads)
    assert sorted(report["skipped"]) == sorted(k for k in sd if k.startswith(("fc.", "classifier.")))
    used = set()
    for key, value in net.state_dict().items():
        if under_prefixes(key, heads):  # RMGL's own reductions and classifiers: at their initialisation
            assert osnet_name(key) is None
            assert torch.equal(value, init[key]), key
            continue
        theirs = to_torchreid(osnet_name(key), "osnet")  # trunk / every branch's stages: the file's tensor
        assert theirs in sd, key
        assert torch.equal(value, sd[theirs]), key
        used.add(theirs)
    assert used == {k for k in sd if not k.startswith(("fc.", "classifier."))}
    assert report["loaded"] == len(net.state_dict()) - sum(under_prefixes(k, heads) for k in net.state_dict())
    # each branch holds its own copy (same initial values, separate storage)
    if len(net.branches) > 1:
        a, b = (br.stages[2][0].weight for br in net.branches[:2])
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_an_osnet_ain_file_is_refused_naming_the_keys(shared_weights):
    for fn in (load_pretrained, warm_start):
        with pytest.raises(PretrainedWeightsError) as e:
            fn(rmgl(), shared_weights / AIN)
        msg = str(e.value)
        assert "osnet_ain_x0_25_imagenet.pyth" in msg and "no place in the rmgl osnet backbone" in msg
        assert "trunk.2.in_in.weight" not in msg and "conv" in msg and "in_in" in msg
        assert "not OSNet-AIN" in msg


def test_a_file_with_a_key_removed_or_added_is_refused(shared_weights, tmp_path):
    sd = read_state_dict(shared_weights / MSMT17)
    less = dict(sd)
    del less["conv4.1.conv2b.1.bn.running_var"]
    torch.save(less, tmp_path / "less.pth")
    for fn in (load_pretrained, warm_start):
        with pytest.raises(PretrainedWeightsError, match=r"2 tensor\(s\) of the rmgl network not in the file: "
                           r"branches\.0\.stages\.1\.1\.residual\.streams\.1\.1\.2\.running_var, branches\.1"):
            fn(rmgl(), tmp_path / "less.pth")
    more = {**sd, "conv3.0.IN.weight": torch.ones(96)}  # an OSNet-IBN-style IN the rmgl backbone does not have
    torch.save(more, tmp_path / "more.pth")
    for fn in (load_pretrained, warm_start):
        with pytest.raises(PretrainedWeightsError, match=r"1 tensor\(s\) of the file with no place in the rmgl osnet "
                           r"backbone \(names after the file's format\): conv3\.0\.in_out\.weight"):
            fn(rmgl(), tmp_path / "more.pth")
    # strict=False loads what fits and reports the rest
    report = load_pretrained(rmgl(), tmp_path / "less.pth", strict=False)
    assert report["missing"] == ["branches.0.stages.1.1.residual.streams.1.1.2.running_var",
                                 "branches.1.stages.1.1.residual.streams.1.1.2.running_var"]


def test_another_width_names_the_shapes(shared_weights):
    net = preset_genotype("rmgl", "rmgl_paper", width_mult=0.5).build(num_classes=3)
    with pytest.raises(PretrainedWeightsError, match=r"'trunk\.0\.0\.weight' has shape \[16, 3, 7, 7\] in the file "
                       r"but \[32, 3, 7, 7\]"):
        load_pretrained(net, shared_weights / MSMT17)


def test_the_recipe_mechanism_warm_starts_an_rmgl_genotype_and_it_trains(shared_weights):
    """model.pretrained + model.warm_start (osnet_finetune_cuhk03_cpu.yaml's keys) on an rmgl genotype, then two
    AMSGrad steps of RMGL's loss: finite, and the pretrained trunk moves."""
    net = rmgl("rmgl_paper", num_classes=4)
    cfg = ModelConfig(preset="rmgl_paper", pretrained=str(shared_weights / MSMT17), warm_start=True)
    report = init_weights(net, cfg)
    assert report is not None and report["identity"] == [] and report["unused"] == []
    before = net.trunk[0][0].weight.detach().clone()
    loss_fn = build_rmgl_loss(4, label_smooth=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=1.5e-3, amsgrad=True)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(2):
        x = torch.randn(8, 3, 256, 128, generator=g)
        pid = torch.arange(4).repeat_interleave(2)
        loss, _ = loss_fn(net(x), {"pid": pid})
        assert math.isfinite(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(net.trunk[0][0].weight, before)


def test_an_rmgl_state_dict_keeps_its_names(tmp_path):
    """The hook places plain OSNet names only: a network's own rmgl state dict (a run's model.pt) loads as before."""
    src = rmgl()
    torch.save(src.state_dict(), tmp_path / "own.pth")
    net = rmgl()
    report = load_pretrained(net, tmp_path / "own.pth", skip=())
    assert report["loaded"] == len(net.state_dict()) and not report["skipped"]
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in net.state_dict().items())
