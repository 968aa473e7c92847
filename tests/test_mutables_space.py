"""Mutables API, the OSNet-AIN space, genotype round trips and the published complexity of OSNet."""
import json

import networkx as nx
import pytest
import torch

from nasreid.genotype import Genotype, GenotypeError, preset_genotype
from nasreid.models.complexity import count_multiply_adds, count_parameters
from nasreid.models.osnet import OSBlock
from nasreid.mutables import (
    Categorical,
    LayerChoice,
    ModelSpace,
    MutableError,
    ensure_frozen,
    freeze,
    iter_layer_choices,
    simplify,
    space_graph,
    validate_sample,
)
from nasreid.registry import get_space

LABELS = ["conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv4_1", "conv4_2"]
VALUES = ["os", "os_in_in", "os_in_out", "os_in_in_out"]


def small_space(**kw):
    return get_space("osnet_ain")(num_classes=5, width_mult=0.25, **kw)


def test_simplify_lists_the_six_blocks_with_four_candidates():
    muts = simplify(small_space())
    assert list(muts) == LABELS
    assert all(m.values == VALUES for m in muts.values())


def test_frozen_genotype_rebuilds_exact_block_types():
    sample = dict(zip(LABELS, ["os_in_in", "os", "os_in_out", "os_in_in_out", "os", "os_in_in"]))
    net = Genotype("osnet_ain", sample, space_kwargs={"width_mult": 0.25}).build(num_classes=5)
    blocks = [net.conv2[0], net.conv2[1], net.conv3[0], net.conv3[1], net.conv4[0], net.conv4[1]]
    assert not any(isinstance(m, LayerChoice) for m in net.modules())
    for b, (label, v) in zip(blocks, sample.items()):
        assert isinstance(b, OSBlock) and b.variant == v, label
        assert (b.in_in is not None) == (v in ("os_in_in", "os_in_in_out"))
        assert (b.in_out is not None) == (v in ("os_in_out", "os_in_in_out"))


def test_freeze_copies_chosen_weights_exactly():
    torch.manual_seed(0)
    space = small_space()
    sample = dict(zip(LABELS, VALUES + VALUES[:2]))
    # make the supernet's path weights differ from a fresh init
    with torch.no_grad():
        for p in space.parameters():
            p.add_(0.01 * torch.randn_like(p))
    # route the supernet through the chosen candidates
    for _name, m in space.named_modules():
        if isinstance(m, LayerChoice):
            m._keys = [sample[m.label]] + [k for k in m._keys if k != sample[m.label]]
    fixed = freeze(space, sample)
    space.eval()
    fixed.eval()
    x = torch.randn(2, 3, 64, 32)
    assert torch.equal(space(x), fixed(x))


def test_invalid_samples_name_the_label():
    space = small_space()
    with pytest.raises(MutableError, match="conv9_9"):
        validate_sample(space, {**{k: "os" for k in LABELS}, "conv9_9": "os"})
    with pytest.raises(MutableError, match="conv2_1"):
        validate_sample(space, {**{k: "os" for k in LABELS}, "conv2_1": "bn"})
    with pytest.raises(MutableError, match="conv4_2"):
        freeze(space, {k: "os" for k in LABELS[:-1]})


def test_categorical_resolves_in_frozen_context():
    class Toy(ModelSpace):
        space_name = "toy"

        def __init__(self, width=4):
            super().__init__()
            self.n = self.add_mutable(Categorical([1, 2, 3], label="stripes"))
            self.heads = torch.nn.ModuleList(torch.nn.Linear(width, 2) for _ in range(ensure_frozen(self.n)))
            self.op = LayerChoice({"a": torch.nn.Identity(), "b": torch.nn.ReLU()}, label="act")

    space = Toy(width=4)
    assert list(simplify(space)) == ["stripes", "act"]
    assert len(space.heads) == 1
    fixed = freeze(space, {"stripes": 3, "act": "b"}, copy_weights=False)
    assert len(fixed.heads) == 3 and isinstance(fixed.op, torch.nn.ReLU)
    with pytest.raises(MutableError, match="stripes"):
        freeze(space, {"stripes": 7, "act": "a"})


def test_genotype_json_and_graph_round_trip(tmp_path):
    g = preset_genotype("osnet_ain", "osnet_ain", width_mult=0.25)
    path = g.save(tmp_path / "genotype.json")
    g2 = Genotype.load(path)
    assert g2.choices == g.choices and g2.space == "osnet_ain"
    gml = g2.write_graphml(tmp_path / "genotype.graphml")
    graph = nx.read_graphml(gml)
    values = {d["label"]: d["value"] for _, d in graph.nodes(data=True) if d.get("kind") == "layer_choice"}
    assert values == g.choices
    assert nx.is_directed_acyclic_graph(graph) and nx.has_path(graph, "conv1", "head")


def test_genotype_errors_name_file_and_field(tmp_path):
    p = tmp_path / "g.json"
    p.write_text("{not json")
    with pytest.raises(GenotypeError, match="g.json"):
        Genotype.load(p)
    p.write_text(json.dumps({"space": "osnet_ain"}))
    with pytest.raises(GenotypeError, match="choices"):
        Genotype.load(p)
    bad = Genotype("osnet_ain", {k: "os" for k in LABELS} | {"conv2_1": "nope"}, space_kwargs={"width_mult": 0.25})
    with pytest.raises(GenotypeError, match="conv2_1"):
        bad.build()


def test_presets_osnet_ibn_and_osnet_ain():
    ibn = preset_genotype("osnet_ain", "osnet_ibn", width_mult=0.25).build()
    assert isinstance(ibn.conv1[1], torch.nn.InstanceNorm2d)
    assert ibn.conv2[0].variant == "os_in_out" and ibn.conv3[0].variant == "os"
    ain = preset_genotype("osnet_ain", "osnet_ain", width_mult=0.25).build()
    assert [b.variant for b in (*ain.conv2, *ain.conv3, *ain.conv4)] == [
        "os_in_in", "os_in_in", "os", "os_in_in", "os_in_in", "os"]


def test_preset_osnet_ain_released_adds_conv1_in_to_table1_choices():
    """Table 1 as printed (conv1 BN) vs the authors' released osnet_ain_x1_0 (conv1_IN=True), same blocks."""
    paper = preset_genotype("osnet_ain", "osnet_ain")
    released = preset_genotype("osnet_ain", "osnet_ain_released")
    assert released.choices == paper.choices
    assert released.space_kwargs == {"conv1_in": True} and paper.space_kwargs == {}
    a = paper.build(num_classes=5, width_mult=0.25)
    b = released.build(num_classes=5, width_mult=0.25)
    assert type(a.conv1[1]) is torch.nn.BatchNorm2d
    assert isinstance(b.conv1[1], torch.nn.InstanceNorm2d) and b.conv1[1].affine
    assert [m.variant for m in (*b.conv2, *b.conv3, *b.conv4)] == [
        "os_in_in", "os_in_in", "os", "os_in_in", "os_in_in", "os"]
    # only conv1's normalisation differs: BN running statistics vs none, same number of parameters
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) - set(sb) == {"conv1.1.running_mean", "conv1.1.running_var", "conv1.1.num_batches_tracked"}
    assert set(sb) <= set(sa)
    assert count_parameters(a) == count_parameters(b)


def _blocks(net):
    return [net.conv2[0], net.conv2[1], net.conv3[0], net.conv3[1], net.conv4[0], net.conv4[1]]


def test_share_weights_true_and_false_freeze_to_the_same_network():
    sample = dict(zip(LABELS, ["os_in_in", "os", "os_in_out", "os_in_in_out", "os", "os_in_in"]))
    x = torch.randn(2, 3, 64, 32)
    # through Genotype.build: same modules, state_dict keys and shapes
    built = {share: Genotype("osnet_ain", sample, space_kwargs={"width_mult": 0.25, "share_weights": share}
                             ).build(num_classes=5) for share in (True, False)}
    # through freeze (what Genotype.build does after building the supernet) from one seed: same values too.
    # (Genotype.build itself first builds the whole supernet, which draws more random numbers when
    # unshared, so it does not give equal values for equal seeds.)
    seeded = {}
    for share in (True, False):
        space = small_space(share_weights=share)
        torch.manual_seed(0)
        seeded[share] = freeze(space, sample, copy_weights=False)
    for a, b in (built[True], built[False]), (seeded[True], seeded[False]):
        assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
        assert [blk.variant for blk in _blocks(a)] == [blk.variant for blk in _blocks(b)] == list(sample.values())
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        assert all(sa[k].shape == sb[k].shape for k in sa)
        # a fixed network carries no memoising residual branch
        assert not any(getattr(m, "memoize", False) for m in (*a.modules(), *b.modules()))
    a, b = seeded[True], seeded[False]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]
    a.eval()
    b.eval()
    assert torch.equal(a(x), b(x))


def test_freeze_of_unshared_supernet_copies_exactly_the_chosen_candidate():
    torch.manual_seed(0)
    space = small_space(share_weights=False)
    choices = {lc.label: lc for _, lc in iter_layer_choices(space)}
    residuals = [c.residual for c in choices["conv3_1"].candidates.values()]
    assert len({id(r) for r in residuals}) == 4  # Fig. 5: four independent blocks per layer
    sample = dict(zip(LABELS, ["os_in_out", "os_in_in_out", "os", "os_in_in", "os_in_in", "os_in_out"]))
    with torch.no_grad():
        for p in space.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for m in choices.values():  # route the supernet through the chosen candidates
        m._keys = [sample[m.label]] + [k for k in m._keys if k != sample[m.label]]
    fixed = freeze(space, sample)
    for label, block in zip(LABELS, _blocks(fixed)):
        chosen = choices[label].candidate(sample[label])
        want = chosen.state_dict()
        got = block.state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in got), label
        for v in VALUES:  # and no other candidate's weights
            if v != sample[label]:
                other = choices[label].candidate(v).residual.conv1[0].weight
                assert not torch.equal(block.residual.conv1[0].weight, other), (label, v)
    space.eval()
    fixed.eval()
    x = torch.randn(2, 3, 64, 32)
    assert torch.equal(space(x), fixed(x))


def test_unshared_supernet_has_four_times_the_residual_branches():
    """Per layer the shared supernet holds one residual branch R_l + the IN layers of its candidates, the
    unshared one four R_l + the same IN layers; the rest (stem, transitions, head) is common. So
    P_unshared - P_shared = 3 * sum_l R_l exactly, and sum_l R_l is the OS-block size of plain OSNet."""
    shared, unshared = small_space(), small_space(share_weights=False)

    def block_params(space):
        return sum(count_parameters(lc) for _, lc in iter_layer_choices(space))

    plain = preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=5)
    residual = sum(count_parameters(b) for b in _blocks(plain))  # sum_l R_l (no IN in plain OS blocks)
    # IN layers of the four candidates: in_in in two, in_out in two, 2 * C_out affine parameters each
    c_out = [64, 64, 96, 96, 128, 128]  # (256, 256, 384, 384, 512, 512) x 0.25
    in_params = sum(4 * 2 * c for c in c_out)
    assert block_params(shared) == residual + in_params
    assert block_params(unshared) == 4 * residual + in_params
    assert count_parameters(unshared) - count_parameters(shared) == 3 * residual
    assert 3.8 < block_params(unshared) / block_params(shared) < 4.0


def test_osnet_x1_complexity_matches_paper():
    """OSNet Table 1: 2.2M parameters, 978.9M multiply-adds at 256x128 (x1.0)."""
    net = preset_genotype("osnet_ain", "osnet").build(num_classes=751)
    no_cls = count_parameters(net, exclude=("head.classifier",))
    assert abs(no_cls - 2.17e6) < 0.01e6, no_cls
    madds = count_multiply_adds(net, (256, 128))
    assert abs(madds - 978.9e6) < 0.5e6, madds
    # IN adds only 2*C affine parameters per IN layer: OSNet-AIN is "similar" in size
    ain = preset_genotype("osnet_ain", "osnet_ain").build(num_classes=751)
    assert 0 < count_parameters(ain) - count_parameters(net) < 10_000


def test_space_graph_of_supernet_lists_candidates():
    g = space_graph(small_space())
    choice_nodes = [n for n, d in g.nodes(data=True) if d["kind"] == "layer_choice"]
    assert len(choice_nodes) == 6
    assert g.nodes[choice_nodes[0]]["candidates"] == ",".join(VALUES)


def test_in_ablation_presets_change_only_what_they_name():
    """``osnet_ain_shallow`` keeps the paper's IN only in conv2; ``osnet_ain_plain_in`` has the paper's placement
    with non-affine IN; both otherwise equal the paper's OSNet-AIN network."""
    import torch

    from nasreid.genotype import preset_genotype

    def ins(name):
        net = preset_genotype("osnet_ain", name, width_mult=0.125, feature_dim=16).build(num_classes=3)
        return {n: m.affine for n, m in net.named_modules() if isinstance(m, torch.nn.InstanceNorm2d)}

    paper, shallow, plain = ins("osnet_ain"), ins("osnet_ain_shallow"), ins("osnet_ain_plain_in")
    assert set(plain) == set(paper) and all(paper.values()) and not any(plain.values())
    assert set(shallow) == {n for n in paper if n.startswith("conv2")} and len(shallow) == 2
