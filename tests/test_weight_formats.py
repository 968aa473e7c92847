"""Weights files through the one reader (nasreid.models.weights): a format added by a plugin file, ``.safetensors``
files, ONNX files refused by name, formats validated in recipes, and the runs' entry point (init_weights) -- all on
the real MSMT17 OSNet file of torchreid's model zoo."""
from __future__ import annotations

import textwrap

import pytest
import torch
import yaml

from nasreid.config import ModelConfig, RecipeError, load_recipe
from nasreid.genotype import preset_genotype
from nasreid.models.pretrained import init_weights, load_pretrained, read_state_dict
from nasreid.models.weights import WEIGHT_FORMATS, PretrainedWeightsError, format_names, read_weights
from nasreid.registry import load_plugins

pytestmark = pytest.mark.usefixtures("one_thread")

MSMT = "osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth"
ONNX = ("torchreid_onnx_reference/osnet_x0_25_msmt17_torchreid_export.onnx",
        "torchreid_onnx_reference/osnet_ain_x0_25_imagenet_torchreid_export.onnx")

#: a fast-reid-like naming: the network under ``backbone.``, its head under ``heads.``
PLUGIN = textwrap.dedent('''
    """A weights format for files saved by a fast-reid-like wrapper (backbone. / heads. prefixes)."""
    from nasreid.models.weights import register_format


    def rename(state):
        out = {}
        for key in state:
            if key.startswith("backbone."):
                out[key] = key[len("backbone."):]
            elif key.startswith("heads."):
                out[key] = "head." + key[len("heads."):]
            else:
                out[key] = None  # anything else (e.g. pixel_mean) is dropped
        return out


    register_format("fastreid_like", rename=rename,
                    recognise=lambda state: any(k.startswith("backbone.") for k in state) and
                    all(k.startswith(("backbone.", "heads.", "pixel_")) for k in state),
                    doc="fast-reid-like names: backbone.<network>, heads.<head>")
''')


def osnet(num_classes: int = 1041) -> torch.nn.Module:
    return preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=num_classes)


@pytest.fixture(scope="module")
def reference(shared_weights) -> torch.nn.Module:
    """The MSMT17 OSNet loaded from torchreid's original file (every tensor, classifier included)."""
    net = osnet()
    load_pretrained(net, shared_weights / MSMT, skip=())
    return net


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def plugin_format(tmp_path):
    """The fast-reid-like format registered from a plugin file (as a recipe's ``plugins:`` does), removed after."""
    path = tmp_path / "fastreid_like_format.py"
    path.write_text(PLUGIN)
    load_plugins([str(path)])
    yield path
    WEIGHT_FORMATS.unregister("fastreid_like")


def test_a_plugin_format_loads_a_real_file_in_its_naming(plugin_format, reference, tmp_path):
    assert "fastreid_like" in format_names()
    file = {("heads." + k[len("head."):] if k.startswith("head.") else "backbone." + k): v.clone()
            for k, v in reference.state_dict().items()}
    file["pixel_mean"] = torch.tensor([123.7, 116.3, 103.5])  # a non-network tensor the format drops
    path = tmp_path / "fastreid_like_msmt17.pth"
    torch.save({"model": file}, path)
    for fmt in ("fastreid_like", "auto"):  # named, and recognised by its predicate
        net = osnet()
        report = load_pretrained(net, path, skip=(), format=fmt)
        assert report["loaded"] == len(reference.state_dict()) and report["skipped"] == ["pixel_mean"]
        assert_same_weights(net, reference)
    with pytest.raises(PretrainedWeightsError, match="format fastreid_like, but its keys are not that format's"):
        load_pretrained(osnet(), reference_file(tmp_path, reference), format="fastreid_like")


def reference_file(tmp_path, net) -> str:
    path = tmp_path / "nasreid_names.pt"
    torch.save(net.state_dict(), path)
    return str(path)


def test_a_recipe_names_a_plugin_format_and_refuses_an_unknown_one(plugin_format, shared_weights, shared_data,
                                                                   tmp_path):
    def recipe(fmt: str, plugins: list[str]) -> str:
        raw = {"name": "fmt", "data": {"dataset": {"name": "cuhk01", "root": str(shared_data / "cuhk01")}},
               "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.25}}, "plugins": plugins,
               "model": {"preset": "osnet", "pretrained": str(shared_weights / MSMT), "pretrained_format": fmt}}
        path = tmp_path / f"{fmt}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    assert load_recipe(recipe("fastreid_like", [plugin_format.name])).model.pretrained_format == "fastreid_like"
    assert load_recipe(recipe("TorchReID", [])).model.pretrained_format == "torchreid"
    with pytest.raises(RecipeError, match=r"timm\.yaml: model\.pretrained_format: unknown weights format 'timm'; "
                                          r"known: auto, .*nasreid, torchreid, torchvision"):
        load_recipe(recipe("timm", []))
    with pytest.raises(PretrainedWeightsError, match="unknown weights format 'timm'; known: auto"):
        load_pretrained(osnet(), shared_weights / MSMT, format="timm")


def test_a_safetensors_file_loads_identically(shared_weights, reference, tmp_path):
    from safetensors.torch import save_file

    sd = read_state_dict(shared_weights / MSMT)  # torchreid's names: the format is recognised after reading
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "msmt17.safetensors"),
              metadata={"source": "osnet_x0_25_msmt17.pth"})
    (tmp_path / "msmt17.bin").write_bytes((tmp_path / "msmt17.safetensors").read_bytes())  # known by its header
    for name in ("msmt17.safetensors", "msmt17.bin"):
        wf = read_weights(tmp_path / name)
        assert wf.container == "safetensors" and wf.extra == {"source": "osnet_x0_25_msmt17.pth"}
        assert set(wf.state) == set(sd) and all(torch.equal(wf.state[k], sd[k]) for k in sd)  # safetensors sorts
        net = osnet()
        assert load_pretrained(net, tmp_path / name, skip=())["loaded"] == len(sd)
        assert_same_weights(net, reference)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "msmt17.safetensors").read_bytes()[:5000])
    with pytest.raises(PretrainedWeightsError, match=r"cannot read safetensors weights .*cut\.safetensors"):
        read_weights(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("name", ONNX)
def test_an_onnx_file_is_named_as_such(name, shared_weights, tmp_path):
    src = shared_weights / name
    disguised = tmp_path / "model.pth"  # recognised by its bytes too, not only by the suffix
    disguised.write_bytes(src.read_bytes())
    for path in (src, disguised):
        with pytest.raises(PretrainedWeightsError) as e:
            load_pretrained(osnet(), path)
        msg = str(e.value)
        assert msg.startswith(f"{path} is an ONNX model, not a weights file; nasreid reads torch / safetensors")
        assert "\n" not in msg and "weights_only" not in msg  # not a pickle: no weights_only advice


def test_garbage_is_not_advised_weights_only_false(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(PretrainedWeightsError, match=r"notes\.pth: not a torch or safetensors weights file") as e:
        read_weights(path)
    assert "weights_only" not in str(e.value)


def test_the_runs_entry_point_loads_or_warm_starts(shared_weights, reference):
    """init_weights: a fixed network is loaded exactly, or warm-started with model.warm_start; a supernet is
    always warm-started; no file, no change."""
    cfg = ModelConfig(pretrained=str(shared_weights / MSMT), pretrained_skip=[])
    net = osnet()
    report = init_weights(net, cfg)
    assert report["loaded"] == len(reference.state_dict()) and "identity" not in report
    assert_same_weights(net, reference)
    ibn = preset_genotype("osnet_ain", "osnet_ibn", width_mult=0.25).build(num_classes=1041)
    with pytest.raises(PretrainedWeightsError, match="do not match the model"):
        init_weights(ibn, cfg)  # exact load: the file has no IN layers
    report = init_weights(ibn, cfg.model_copy(update={"warm_start": True}))
    assert report["identity"] == ["conv2.0.in_out", "conv2.1.in_out"] and report["calibrated"] == []
    assert torch.equal(ibn.state_dict()["conv2.0.residual.conv1.0.weight"],
                       reference.state_dict()["conv2.0.residual.conv1.0.weight"])
    from nasreid.search_spaces.osnet_ain import OSNetAINSpace

    space = OSNetAINSpace(num_classes=1041, width_mult=0.25)
    calls = []
    report = init_weights(space, cfg, supernet=True,
                          calibration_images=lambda n: calls.append(n) or [torch.rand(2, 3, 64, 32)])
    assert calls == [64] and report["identity"] and sorted(report["calibrated"]) == sorted(report["identity"])
    assert init_weights(osnet(), ModelConfig()) is None and init_weights(osnet(), None) is None
