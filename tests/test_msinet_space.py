"""MSINet search space (Gu et al. CVPR 2023, Sec. 3.2, Table 1): interaction ops, cells, space, presets."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from nasreid.genotype import Genotype, preset_genotype
from nasreid.models.complexity import count_parameters
from nasreid.models.osnet import AggregationGate
from nasreid.mutables import LayerChoice, freeze, frozen_context, simplify
from nasreid.registry import get_space
from nasreid.search_spaces.msinet import (
    CHOICE_LABELS,
    OPS,
    PRESET_GENOTYPES,
    ChannelGate,
    CrossAttention,
    Exchange,
    MSICell,
    MSINetSpace,
    NoInteraction,
    interaction_choice,
)

OP_CLASSES = {"none": NoInteraction, "exchange": Exchange, "gate": ChannelGate, "attention": CrossAttention}


pytestmark = pytest.mark.usefixtures("one_thread")


def pair(b=2, c=8, h=6, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)


def small(**kw):
    return MSINetSpace(width_mult=0.25, **kw)


def force(space, sample):
    """Make every plain LayerChoice of ``space`` run ``sample[label]`` (it runs its first candidate)."""
    for m in space.modules():
        if isinstance(m, LayerChoice):
            m._keys = [sample[m.label]] + [k for k in m._keys if k != sample[m.label]]


# ---- interaction operations ---------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_every_op_keeps_shapes(op):
    lc = interaction_choice("cell1_im1", 8, gate_reduction=4)
    cand = lc.candidate(op)
    assert isinstance(cand, OP_CLASSES[op])
    if isinstance(cand, CrossAttention):
        cand.gamma.data.fill_(0.5)
    x1, x2 = pair()
    out = cand((x1, x2))
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == x1.shape and out[1].shape == x2.shape
    assert all(torch.isfinite(o).all() for o in out)


def test_none_returns_inputs_and_exchange_swaps():
    x1, x2 = pair()
    y1, y2 = NoInteraction()((x1, x2))
    assert y1 is x1 and y2 is x2
    e1, e2 = Exchange()((x1, x2))
    assert torch.equal(e1, x2) and torch.equal(e2, x1)
    assert list(NoInteraction().parameters()) == [] and list(Exchange().parameters()) == []


def test_channel_gate_is_one_shared_mlp_eq4():
    c, r = 32, 16
    gate = ChannelGate(c, r)
    mlps = [m for m in gate.modules() if isinstance(m, AggregationGate)]
    assert len(mlps) == 1
    hidden = c // r
    assert count_parameters(gate) == c * hidden + hidden + hidden * c + c
    x1, x2 = pair(c=c)
    y1, y2 = gate((x1, x2))
    fc1, fc2 = mlps[0].fc1, mlps[0].fc2

    def by_hand(x):
        g = x.mean(dim=(2, 3))                                           # GAP [B, C]
        h = F.relu(g @ fc1.weight.view(hidden, c).T + fc1.bias)
        s = torch.sigmoid(h @ fc2.weight.view(c, hidden).T + fc2.bias)   # G(x), Eq. 4
        return x * s[:, :, None, None]

    torch.testing.assert_close(y1, by_hand(x1))
    torch.testing.assert_close(y2, by_hand(x2))
    assert ChannelGate(8, 16).gate.fc1.out_channels == 1  # hidden = max(C // 16, 1)


def test_cross_attention_identity_at_gamma_zero_and_formula_at_one():
    att = CrossAttention()
    assert [p.numel() for p in att.parameters()] == [1] and att.gamma.item() == 0.0
    xa, xb = pair(c=6, h=4, w=3)
    ya, yb = att((xa, xb))
    assert torch.equal(ya, xa) and torch.equal(yb, xb)

    att.gamma.data.fill_(1.0)
    ya, yb = att((xa, xb))
    b, c, h, w = xa.shape
    qa, qb = xa.reshape(b, c, -1), xb.reshape(b, c, -1)

    def expect(q, k, x):
        energy = torch.einsum("bcn,bdn->bcd", q, k)
        attn = torch.softmax(energy.max(dim=-1, keepdim=True).values - energy, dim=-1)
        return torch.einsum("bcd,bdn->bcn", attn, q).view(b, c, h, w) + x

    torch.testing.assert_close(ya, expect(qa, qb, xa))
    torch.testing.assert_close(yb, expect(qb, qa, xb))
    # the key comes from the other branch: changing xb alone changes out_a
    ya2, _ = att((xa, xb + torch.randn_like(xb)))
    assert not torch.allclose(ya, ya2)


# ---- cells -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["sum", "sub", "mul"])
def test_cell_fusion(fusion):
    torch.manual_seed(0)
    cell = MSICell(8, 16, 4, ("cell1_im1", "cell1_im2"), scale_ratio=2, fusion=fusion, gate_reduction=4).eval()
    assert len(cell.conv2b) == 2 and len(cell.conv3b) == 2
    x = torch.randn(2, 8, 6, 4)
    with torch.no_grad():
        a, b = cell.conv2a(cell.conv1a(x)), cell.conv2b(cell.conv1b(x))
        a, b = cell.conv3a(a), cell.conv3b(b)   # the plain LayerChoices run "none"
        a, b = cell.conv4a(a), cell.conv4b(b)
        fused = {"sum": a + b, "sub": a - b, "mul": a * b}[fusion]
        expect = F.relu(fused + cell.downsample(x))
        torch.testing.assert_close(cell(x), expect)


# ---- space ---------------------------------------------------------------------------------------------
def test_twelve_choices_with_labels_and_ops():
    muts = simplify(small())
    assert list(muts) == list(CHOICE_LABELS) == [f"cell{k}_im{j}" for k in range(1, 7) for j in (1, 2)]
    assert all(m.values == list(OPS) for m in muts.values())
    assert OPS == ("none", "exchange", "gate", "attention")
    assert get_space("msinet") is MSINetSpace


@pytest.mark.parametrize("local", [False, True])
def test_forward_shapes_train_and_eval(local):
    torch.manual_seed(0)
    net = small(num_classes=7, local_branch=local)
    x = torch.randn(3, 3, 128, 64)
    out = net.train()(x)
    keys = {"feat", "feat_bn", "logits", "featmap"} | ({"feat_local", "logits_local"} if local else set())
    assert set(out) == keys
    assert out["feat"].shape == (3, 128) and out["logits"].shape == (3, 7)
    assert out["featmap"].shape == (3, 128, 8, 4)
    if local:
        assert out["feat_local"].shape == (3, 256) and out["logits_local"].shape == (3, 7)
    d = 128 + (256 if local else 0)
    assert net.feature_dim == d
    with torch.no_grad():
        assert net.eval()(x).shape == (3, d)


def test_no_classifier_without_classes_and_local_dim():
    net = small(local_branch=True, local_dim=64)
    out = net(torch.randn(2, 3, 128, 64))
    assert set(out) == {"feat", "feat_bn", "featmap", "feat_local"} and out["feat_local"].shape == (2, 64)
    assert net.local_conv.out_channels == 32 and net.local_conv.in_channels == 96
    assert net.feature_dim == 128 + 64


def test_eval_feature_is_bnneck_output():
    torch.manual_seed(0)
    net = small(num_classes=3, local_branch=True).eval()
    with torch.no_grad():
        for bn in (net.head.neck, net.local_head.neck):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        x = torch.randn(2, 3, 128, 64)
        featmap, mid = net.features_and_mid(x)
        torch.testing.assert_close(net.forward_features(x), featmap)
        g = net.head.neck(featmap.mean(dim=(2, 3)))
        m = net.local_conv(mid)
        loc = net.local_head.neck(torch.cat([m[:, :, :4].mean(dim=(2, 3)), m[:, :, 4:].mean(dim=(2, 3))], 1))
        torch.testing.assert_close(net(x), torch.cat([g, loc], 1))


@pytest.mark.parametrize("name", sorted(PRESET_GENOTYPES))
def test_every_preset_builds(name):
    net = preset_genotype("msinet", name, num_classes=4, width_mult=0.25).build()
    assert not any(isinstance(m, LayerChoice) for m in net.modules())
    choices = PRESET_GENOTYPES[name]["choices"]
    cells = [*net.stage1, *net.stage2, *net.stage3]
    for k, cell in enumerate(cells, 1):
        for j, im in ((1, cell.im1), (2, cell.im2)):
            assert isinstance(im, OP_CLASSES[choices[f"cell{k}_im{j}"]])
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 3, 64, 32)).shape == (2, 128)


def test_paper_preset_is_table1():
    ch = PRESET_GENOTYPES["msinet_paper"]["choices"]
    letters = {"none": "N", "exchange": "E", "gate": "G", "attention": "A"}
    assert " ".join(letters[ch[f"cell{k}_im1"]] + letters[ch[f"cell{k}_im2"]] for k in range(1, 7)) == \
        "GG EG AG GN GA EA"


def test_freeze_matches_build_and_supernet_path():
    rng = random.Random(3)
    sample = {k: rng.choice(OPS) for k in CHOICE_LABELS}
    sample["cell6_im2"] = "attention"
    sample["cell1_im1"] = "gate"
    kw = {"num_classes": 5, "width_mult": 0.25, "local_branch": True, "scale_ratio": 2}
    torch.manual_seed(0)
    space = MSINetSpace(**kw)
    with torch.no_grad():  # make weights (and every gamma) differ from a fresh init
        for p in space.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fixed = space.freeze(sample)
    built = Genotype("msinet", sample, space_kwargs=kw).build()
    sd_f, sd_b = fixed.state_dict(), built.state_dict()
    assert list(sd_f) == list(sd_b)
    assert all(sd_f[k].shape == sd_b[k].shape for k in sd_f)
    assert "stage3.1.im2.gamma" in sd_f and "stage1.0.im1.gate.fc1.weight" in sd_f
    force(space, sample)
    space.eval()
    fixed.eval()
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        torch.testing.assert_close(space(x), fixed(x), rtol=0, atol=0)


def test_all_none_sample_equals_unsearched_space():
    torch.manual_seed(1)
    space = small(num_classes=3).eval()
    fixed = freeze(space, {k: "none" for k in CHOICE_LABELS}).eval()
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        assert torch.equal(space(x), fixed(x))


def test_fixed_net_constructs_only_chosen_candidates():
    sample = dict(PRESET_GENOTYPES["msinet_paper"]["choices"])
    with frozen_context(sample):
        net = small()
    assert not any(isinstance(m, LayerChoice) for m in net.modules())
    gates = [m for m in net.modules() if isinstance(m, ChannelGate)]
    atts = [m for m in net.modules() if isinstance(m, CrossAttention)]
    assert len(gates) == 6 and len(atts) == 3
    space = small()
    assert sum(isinstance(m, ChannelGate) for m in space.modules()) == 12
    # the supernet holds all four candidates per module, the fixed net only the chosen one
    extra = sum(count_parameters(m.candidate("gate")) + 1 for m in space.modules() if isinstance(m, LayerChoice))
    assert count_parameters(space) == count_parameters(preset_genotype("msinet", "msinet_none",
                                                                       width_mult=0.25).build()) + extra


def test_authors_search_width_is_narrower_in_first_cells():
    child, authors = small(), small(search_width="authors")
    # width 0.25: channels 16, 64, 96, 128
    assert [c.conv1a[0].out_channels for c in (*child.stage1, *child.stage2, *child.stage3)] == [16, 16, 24, 24, 32, 32]
    assert [c.conv1a[0].out_channels for c in (*authors.stage1, *authors.stage2, *authors.stage3)] == \
        [4, 16, 16, 24, 24, 32]
    assert count_parameters(authors) < count_parameters(child)
    g = preset_genotype("msinet", "msinet_paper", width_mult=0.25, search_width="authors")
    assert g.build().stage1[0].conv1a[0].out_channels == 4


@pytest.mark.parametrize("kwarg,value", [
    ("fusion", "max"), ("search_width", "wide"), ("scale_ratio", 0), ("scale_ratio", 2.5),
    ("width_mult", 0), ("num_classes", -1), ("local_dim", 255), ("local_dim", 0), ("gate_reduction", 0),
    ("local_branch", "yes"),
])
def test_invalid_kwargs_name_the_kwarg(kwarg, value):
    with pytest.raises(ValueError, match=kwarg):
        MSINetSpace(**{kwarg: value})


# ---- parameter count -----------------------------------------------------------------------------------
def formula_params(choices, num_classes=0, local=False, local_dim=256, rho=3, search_width="child"):
    """Parameters of a fixed MSINet at width 1, counted by hand from the layout."""
    c0, c1, c2, c3 = 64, 256, 384, 512
    cbr = lambda i, o, k=1: i * o * k * k + 2 * o          # conv (no bias) + BN
    lite = lambda c: c * c + 9 * c + 2 * c                  # pw 1x1 + dw 3x3 + BN

    def im(op, m):
        h = max(m // 16, 1)
        return {"none": 0, "exchange": 0, "gate": 2 * m * h + h + m, "attention": 1}[op]

    total = cbr(3, c0, 7)
    labels = iter(CHOICE_LABELS)
    for i, o in [(c0, c1), (c1, c1), (c1, c2), (c2, c2), (c2, c3), (c3, c3)]:
        m = (o if search_width == "child" else i) // 4
        total += 2 * cbr(i, m) + 2 * (1 + rho) * lite(m) + 2 * cbr(m, o) + (cbr(i, o) if i != o else 0)
        total += im(choices[next(labels)], m) + im(choices[next(labels)], m)
    total += cbr(c1, c1) + cbr(c2, c2)                      # transitions
    total += 2 * c3 + c3 * num_classes                      # BNNeck + classifier (no bias)
    if local:
        total += c2 * (local_dim // 2) + local_dim // 2 + 2 * local_dim + local_dim * num_classes
    return total


def test_parameter_count_of_msinet_paper():
    ch = PRESET_GENOTYPES["msinet_paper"]["choices"]
    count = lambda **kw: count_parameters(preset_genotype("msinet", "msinet_paper", **kw).build())
    assert count() == formula_params(ch) == 1_950_563
    assert count(local_branch=True) == formula_params(ch, local=True) == 2_000_355
    assert count(num_classes=751) == formula_params(ch, num_classes=751)
    assert count(search_width="authors") == formula_params(ch, search_width="authors")
    # the paper's 2.3M (Table 2) matches the authors' retrained net without classifiers: our backbone with the
    # local branch plus their bias-free fc layers before the two BNNecks (512x512 and 256x256)
    assert count(local_branch=True) + 512 * 512 + 256 * 256 == 2_328_035


# ---- real images ---------------------------------------------------------------------------------------
def test_real_images_forward_backward(cuhk01_dir):
    paths = sorted(cuhk01_dir.glob("*.png"))[:4]
    assert len(paths) == 4
    imgs = [np.asarray(Image.open(p).convert("RGB").resize((64, 128), Image.BILINEAR), dtype=np.float32) / 255.0
            for p in paths]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert x.shape == (4, 3, 128, 64)
    torch.manual_seed(0)
    net = preset_genotype("msinet", "msinet_paper", num_classes=2, width_mult=0.25, local_branch=True).build()
    net.train()
    out = net(x)
    labels = torch.tensor([0, 0, 1, 1])
    loss = (F.cross_entropy(out["logits"], labels) + F.cross_entropy(out["logits_local"], labels)
            + out["feat"].pow(2).mean() + out["feat_local"].pow(2).mean() + out["featmap"].mean())
    loss.backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    gammas = [m.gamma for m in net.modules() if isinstance(m, CrossAttention)]
    assert len(gammas) == 3 and all(g.grad.abs().item() > 0 for g in gammas)
    with torch.no_grad():
        feats = net.eval()(x)
    assert feats.shape == (4, 384) and torch.isfinite(feats).all()


@pytest.mark.parametrize("strategy,kwargs", [("gumbel", {"mode": "hard"}), ("gumbel", {"mode": "soft"}),
                                             ("random", {}), ("darts_tcm", {})])
def test_every_strategy_mixes_the_branch_pairs(strategy, kwargs):
    """Strategies never hard-code a space: each one's mixed op handles candidates that return tuples."""
    from nasreid.registry import get_strategy

    torch.manual_seed(0)
    s = get_strategy(strategy)(MSINetSpace(num_classes=4, width_mult=0.125), **kwargs)
    net = s.attach().train()
    out = net(torch.randn(4, 3, 64, 32))
    (out["logits"].sum() + out["feat"].sum()).backward()
    arch = s.arch_parameters()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in arch)
    assert len(arch) == (0 if strategy == "random" else 12)
