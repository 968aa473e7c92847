"""The network interface of every space (timm's model API): stages and their maps, a forward stopped at a stage,
the final map, classifiers found, reset in place and split from the backbone; presets registered with their
space."""
from __future__ import annotations

import pytest
import torch

from nasreid.genotype import GenotypeError, preset_genotype
from nasreid.models.interface import NetworkInterfaceError, ReIDNetwork
from nasreid.registry import SPACES, space_presets

pytestmark = pytest.mark.usefixtures("one_thread")

NETS = {  # space -> (preset, space kwargs, a module after the match stage)
    "osnet_ain": ("osnet_ain", {"width_mult": 0.25}, "conv5"),
    "msinet": ("msinet_paper", {"width_mult": 0.25, "local_branch": True}, "head"),
    "rmgl": ("rmgl_paper", {"width_mult": 0.25}, "branches.0.stages.2"),
}


def _net(space):
    preset, kw, _ = NETS[space]
    torch.manual_seed(0)
    return preset_genotype(space, preset, **kw).build(num_classes=7)


@pytest.mark.parametrize("space", sorted(NETS))
def test_feature_info_describes_the_maps_and_stop_at_ends_the_forward(space):
    net = _net(space).eval()
    assert isinstance(net, ReIDNetwork)
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        maps = net.forward_intermediates(x)
        assert list(maps) == [f["module"] for f in net.feature_info]
        for f in net.feature_info:
            assert maps[f["module"]].shape == (2, f["num_chs"], 128 // f["reduction"], 64 // f["reduction"])
        torch.testing.assert_close(net.forward_features(x), maps[net.feature_info[-1]["module"]])
        later = NETS[space][2]
        calls = []
        h = net.get_submodule(later).register_forward_hook(lambda *a: calls.append(1))
        stage = net.default_match_stage
        part = net.forward_intermediates(x, stop_at=stage)
        h.remove()
        assert list(part)[-1] == stage and not calls  # nothing after the stage ran
        torch.testing.assert_close(part[stage], maps[stage])
    with pytest.raises(NetworkInterfaceError, match="its stages are"):
        net.forward_intermediates(x, stop_at="nosuch")


@pytest.mark.parametrize("space", sorted(NETS))
def test_reset_classifier_resizes_in_place_keeping_rows(space):
    net = _net(space).train()
    clf = net.get_classifier()
    assert clf and all(m.out_features == 7 for m in clf.values())
    params = {n: (m.weight, m.weight.detach().clone()) for n, m in clf.items()}
    out = net.reset_classifier(12, keep=5)
    assert set(out) == set(clf)
    for n, m in out.items():
        w, old = params[n]
        assert m.weight is w and m.weight.shape == (12, old.shape[1]) and m.out_features == 12
        torch.testing.assert_close(m.weight[:5].detach(), old[:5])
    assert net.num_classes_now == 12
    logits = net(torch.randn(4, 3, 128, 64))["logits"]
    assert logits.shape == (4, 12)
    rows = net.reset_classifier(3, keep=0, init=lambda name, c, n: torch.ones(n, c.in_features))
    assert all(bool((m.weight == 1).all()) for m in rows.values())
    with pytest.raises(NetworkInterfaceError, match="keep=9"):
        net.reset_classifier(4, keep=9)


@pytest.mark.parametrize("space", sorted(NETS))
def test_split_parameters_puts_every_classifier_in_the_head(space):
    net = _net(space)
    backbone, head = net.split_parameters()
    names = {n for n, _ in net.named_parameters()}
    assert {n for n, _ in backbone} | {n for n, _ in head} == names and backbone and head
    assert {n + ".weight" for n in net.get_classifier()} <= {n for n, _ in head}
    assert any(n.startswith("conv1") or n.startswith("trunk") for n, _ in backbone)


def test_presets_are_registered_with_their_space():
    assert "osnet_ibn" in space_presets("osnet_ain") and "msinet_paper" in space_presets("msinet")
    for space in SPACES.names():
        for name in space_presets(space):
            assert preset_genotype(space, name).space == space
    with pytest.raises(GenotypeError, match="presets: "):
        preset_genotype("osnet_ain", "nosuch")


def test_list_presets_prints_every_space_s_presets(capsys):
    from nasreid import cli

    assert cli.main(["list", "presets", "osnet*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "presets:" and any(line.split()[0] == "osnet_ain:osnet_ibn" and "conv1_in=True" in line
                                        for line in out[1:])
    assert not any("msinet" in line for line in out)


def test_a_plugin_space_has_presets():
    from torch import nn

    from nasreid.mutables import LayerChoice, ModelSpace
    from nasreid.registry import register_space

    @register_space("tiny_preset_space", presets={"wide": {"choices": {"op": "wide"}}})
    class Tiny(ModelSpace):
        def __init__(self, num_classes: int = 0):
            super().__init__()
            self.op = LayerChoice({"narrow": nn.Conv2d(3, 4, 1), "wide": nn.Conv2d(3, 8, 1)}, label="op")

    try:
        g = preset_genotype("tiny_preset_space", "wide")
        assert g.choices == {"op": "wide"} and isinstance(g.build().op, nn.Conv2d) and g.build().op.out_channels == 8
    finally:
        SPACES.unregister("tiny_preset_space")


def test_one_freeze_hook_from_the_recipe_opens_the_interface_head():
    """``FreezeBackboneHook.from_recipe``: open ``training.open_layers``, else the network's head (the head of
    ``split_parameters``); a network without the interface and no ``open_layers`` is a one-line RecipeError; no
    freeze epochs, no hook. The hooks module takes the split from the interface, not from the weights code."""
    import ast
    from pathlib import Path

    from nasreid.config import RecipeError, load_recipe
    from nasreid.engine import hooks
    from nasreid.engine.hooks import FreezeBackboneHook
    from nasreid.models.interface import head_prefixes_of, under_prefixes

    msinet = SPACES.get("msinet")(num_classes=5, width_mult=0.125)
    recipe = load_recipe("recipes/quickstart.yaml", {"training.freeze_backbone_epochs": 2})
    hook = FreezeBackboneHook.from_recipe(recipe, msinet, ("qaconv",))
    assert hook.epochs == 2 and hook.open_prefixes == (*msinet.head_prefixes, "qaconv") == (
        *head_prefixes_of(msinet), "qaconv")
    _, head = msinet.split_parameters()
    assert {n for n, _ in head} == {n for n, _ in msinet.named_parameters() if under_prefixes(n, hook.open_prefixes)}
    opened = load_recipe("recipes/quickstart.yaml", {"training.freeze_backbone_epochs": 1,
                                                     "training.open_layers": ["head.classifier"]})
    assert FreezeBackboneHook.from_recipe(opened, msinet).open_prefixes == ("head.classifier",)
    assert FreezeBackboneHook.from_recipe(load_recipe("recipes/quickstart.yaml"), msinet) is None
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(RecipeError, match=r"^training.freeze_backbone_epochs: Sequential is not a nasreid network "
                                          r".*training.open_layers \(its top-level modules are \['0'\]\)$"):
        FreezeBackboneHook.from_recipe(recipe, plain)
    assert FreezeBackboneHook.from_recipe(opened.model_copy(update={"training": opened.training.model_copy(
        update={"open_layers": ["0"]})}), plain).open_prefixes == ("0",)
    imported = {n.module for n in ast.walk(ast.parse(Path(hooks.__file__).read_text()))
                if isinstance(n, ast.ImportFrom) and n.module}
    assert "nasreid.models.pretrained" not in imported and "nasreid.models.interface" in imported
    assert under_prefixes("head.x", ("head",)) and not under_prefixes("header.x", ("head",))
