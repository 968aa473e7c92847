"""Mutables API, the OSNet-AIN space, genotype round trips and the published complexity of OSNet."""
import json

import networkx as nx
import pytest
import torch

from nasreid.genotype import Genotype, GenotypeError, preset_genotype
from nasreid.models.complexity import count_multiply_adds, count_parameters
from nasreid.models.osnet import OSBlock
from nasreid.mutables import (Categorical, LayerChoice, ModelSpace, MutableError, ensure_frozen, freeze,
                              simplify, space_graph, validate_sample)
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
    for name, m in space.named_modules():
        if isinstance(m, LayerChoice):
            m._keys = [sample[m.label]] + [k for k in m._keys if k != sample[m.label]]
    fixed = freeze(space, sample)
    space.eval(); fixed.eval()
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
