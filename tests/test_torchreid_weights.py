"""torchreid's model-zoo files load exactly into the osnet_ain space's presets: every tensor placed, the
features of torchreid's own network reproduced (against an ONNX export that torchreid's code made, on real CUHK01
and CUHK03 images at 256x128), and the name map inverts for every width of the OSNet family."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nasreid.data import build_dataset
from nasreid.data.transforms import build_transforms
from nasreid.genotype import preset_genotype
from nasreid.models.pretrained import PretrainedWeightsError, load_pretrained, read_state_dict
from nasreid.models.torchreid import detect_flavour, rename_map, to_nasreid, to_torchreid

pytestmark = pytest.mark.usefixtures("one_thread")

FILES = {  # file -> (nasreid preset, torchreid flavour, classes of its head)
    "osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth": ("osnet", "osnet", 1041),
    "osnet_x0_25_market1501/osnet_x0_25_market1501.pth": ("osnet", "osnet", 751),
    "osnet_ain_x0_25_imagenet/osnet_ain_x0_25_imagenet.pyth": ("osnet_ain_torchreid", "osnet_ain", 1000),
}
#: ONNX exports made by torchreid's own model code (the folder's PROVENANCE.md): model -> (weights file, nasreid
#: preset, classes of its head, the export)
ONNX = {
    "msmt17": ("osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth", "osnet", 1041,
               "torchreid_onnx_reference/osnet_x0_25_msmt17_torchreid_export.onnx"),
    "ain_imagenet": ("osnet_ain_x0_25_imagenet/osnet_ain_x0_25_imagenet.pyth", "osnet_ain_torchreid", 1000,
                     "torchreid_onnx_reference/osnet_ain_x0_25_imagenet_torchreid_export.onnx"),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_tensor_of_the_real_files_is_placed(name, shared_weights):
    preset, flavour, classes = FILES[name]
    sd = read_state_dict(shared_weights / name)
    assert detect_flavour(sd) == flavour
    net = preset_genotype("osnet_ain", preset, width_mult=0.25).build(num_classes=classes)
    report = load_pretrained(net, shared_weights / name, skip=())  # the classifier fits: nothing skipped
    assert report["loaded"] == len(sd) == len(net.state_dict())
    assert not (report["skipped"] or report["missing"] or report["unexpected"] or report["mismatched"])
    for key, value in sd.items():  # placed where the map says, bit for bit
        assert torch.equal(net.state_dict()[to_nasreid(key, flavour)], value)
    other = preset_genotype("osnet_ain", preset, width_mult=0.25).build(num_classes=5)
    report = load_pretrained(other, shared_weights / name)  # another class count: only the classifier is left
    assert report["skipped"] == ["classifier.weight", "classifier.bias"] and report["loaded"] == len(sd) - 2


def test_a_torchreid_file_into_the_wrong_preset_names_the_right_one(shared_weights):
    net = preset_genotype("osnet_ain", "osnet_ain_released", width_mult=0.25).build(num_classes=5)
    with pytest.raises(PretrainedWeightsError, match=r"preset osnet_ain_torchreid with space.kwargs.width_mult 0.25"):
        load_pretrained(net, shared_weights / "osnet_ain_x0_25_imagenet/osnet_ain_x0_25_imagenet.pyth")
    net = preset_genotype("osnet_ain", "osnet", width_mult=0.5).build(num_classes=5)
    with pytest.raises(PretrainedWeightsError, match=r"width_mult 0.25"):
        load_pretrained(net, shared_weights / "osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth")


def _images(dataset, n_query: int, n_gallery: int) -> tuple[torch.Tensor, list, list]:
    """Normalised ``[N, 3, 256, 128]`` test images: the first query and gallery entries of ``dataset``."""
    tf = build_transforms(256, 128, is_train=False)
    recs = dataset.query[:n_query] + dataset.gallery[:n_gallery]
    return torch.stack([tf(dataset.read_image(r)) for r in recs]), recs[:n_query], recs[n_query:]


@pytest.mark.parametrize("model", sorted(ONNX))
@pytest.mark.parametrize("data", ["cuhk01", "cuhk03"])
def test_zoo_models_give_torchreid_s_features(model, data, shared_weights, shared_data):
    """Parity with torchreid's code (osnet.py for the MSMT17 OSNet, osnet_ain.py for the ImageNet OSNet-AIN: its
    IN layers, pool2 / pool3, conv1's affine IN): features within 1e-4 of the ONNX export and the same top-10
    rankings (measured, one thread: max |diff| 2.1e-5 / 1.7e-5 on CUHK01 / CUHK03 for the MSMT17 OSNet, 2.2e-5 /
    2.3e-5 for the ImageNet OSNet-AIN)."""
    import onnxruntime as ort

    weights, preset, classes, export = ONNX[model]

    if data == "cuhk01":
        ds = build_dataset("cuhk01", shared_data / "cuhk01", split_seed=0)
    else:
        ds = build_dataset("cuhk03np", shared_data / "cuhk03", eval_only=True)
    x, _, _ = _images(ds, 24, 96)
    net = preset_genotype("osnet_ain", preset, width_mult=0.25).build(num_classes=classes)
    assert load_pretrained(net, shared_weights / weights, skip=())["loaded"] == len(net.state_dict())
    with torch.no_grad():
        ours = net.eval()(x).numpy()
    session = ort.InferenceSession(str(shared_weights / export), providers=["CPUExecutionProvider"])
    ref = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert ours.shape == ref.shape == (120, 512)
    assert float(np.abs(ours - ref).max()) <= 1e-4
    assert float(np.abs(ref).mean()) > 0.01  # real features, not zeros
    q, g = slice(0, 24), slice(24, 120)

    def top10(f):
        d = ((f[q, None, :] - f[None, g, :]) ** 2).sum(-1)  # euclidean, torchreid's protocol
        return np.argsort(d, axis=1, kind="stable")[:, :10]

    np.testing.assert_array_equal(top10(ours), top10(ref))


WIDTHS = (1.0, 0.75, 0.5, 0.25)


@pytest.mark.parametrize("preset, flavour, width", [
    *[("osnet", "osnet", w) for w in WIDTHS], ("osnet_ibn", "osnet", 1.0),
    *[("osnet_ain_torchreid", "osnet_ain", w) for w in WIDTHS],
])
def test_the_name_map_round_trips_every_width(preset, flavour, width, shared_weights):
    """nasreid names -> torchreid names -> nasreid names, for every tensor of every OSNet-family width; at x0.25
    the torchreid names are exactly the real files'."""
    net = preset_genotype("osnet_ain", preset, width_mult=width).build(num_classes=10)
    keys = list(net.state_dict())
    theirs = [to_torchreid(k, flavour) for k in keys]
    assert None not in theirs and len(set(theirs)) == len(keys)
    assert detect_flavour(theirs) == flavour
    assert [rename_map(theirs, flavour)[t] for t in theirs] == keys
    assert net.state_dict()["conv1.0.weight"].shape[0] == round(64 * width)
    if width == 0.25 and preset != "osnet_ibn":
        name = next(n for n, (p, _, _) in FILES.items() if p == preset)
        assert set(theirs) == set(read_state_dict(shared_weights / name))
    if preset == "osnet_ibn":  # torchreid's osnet_ibn_x1_0: IN in conv1 and after the addition of the conv2 blocks
        assert {t for t in theirs if ".IN." in t} == {f"conv2.{i}.IN.{p}" for i in (0, 1) for p in ("weight", "bias")}


def test_cuhk01_all_ids_protocol(shared_data):
    ds = build_dataset("cuhk01", shared_data / "cuhk01", protocol="all_ids")
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (0, 971, 1942)
    assert all(r.path.endswith("001.png") and r.camid == 0 for r in ds.query)
    assert {r.path[-7:-4] for r in ds.gallery} == {"003", "004"} and {r.camid for r in ds.gallery} == {1}
    assert sorted({r.pid for r in ds.query}) == sorted({r.pid for r in ds.gallery}) == list(range(1, 972))
    from nasreid.data.datasets.base import DatasetLayoutError

    with pytest.raises(DatasetLayoutError, match="protocol must be 'split' or 'all_ids'"):
        build_dataset("cuhk01", shared_data / "cuhk01", protocol="all")


def test_zero_shot_evaluate_of_a_zoo_file_with_no_run_folder(tmp_path, shared_weights, shared_data, capsys):
    """``nasreid evaluate --weights``: the MSMT17 model, never trained on CUHK01, ranks most of 60 CUHK01
    identities first; an untrained network of the same genotype does not."""
    import json

    from nasreid import cli

    zoo = shared_weights / "osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth"
    target = f"cuhk01={shared_data / 'cuhk01'}:protocol=all_ids,max_ids=60"
    args = ["evaluate", "--weights", str(zoo), "--genotype", "preset:osnet", "--set", "space.kwargs.width_mult=0.25",
            "--target", target, "--out", str(tmp_path / "zs")]
    assert cli.main(args) == 0
    m = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert m["kind"] == "zero_shot" and m["load_report"]["loaded"] == 565 and m["input"] == [256, 128]
    (r,) = m["evaluation"].values()
    assert (r["num_query"], r["num_gallery"]) == (60, 120)
    assert r["rank1"] >= 60 and r["mAP"] >= 50, r
    scratch = tmp_path / "scratch.pt"
    torch.save(preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=0).state_dict(), scratch)
    assert cli.main([*args[:2], str(scratch), *args[3:-1], str(tmp_path / "zs_random")]) == 0
    (rr,) = json.loads((tmp_path / "zs_random" / "metrics.json").read_text())["evaluation"].values()
    assert rr["rank1"] < r["rank1"] - 30
    capsys.readouterr()
    assert cli.main(["evaluate", "--weights", str(zoo), "--target", target]) == 2  # no genotype
    assert "needs --genotype" in capsys.readouterr().err


def test_the_feature_extractor_takes_a_zoo_file(shared_weights, shared_data):
    from nasreid.extractor import FeatureExtractor

    fx = FeatureExtractor("preset:osnet", shared_weights / "osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth",
                          space="osnet_ain", space_kwargs={"width_mult": 0.25})
    campus = shared_data / "cuhk01" / "campus"
    same, other = [], []
    for pid in range(1, 21):
        f = fx([campus / f"{pid:04d}001.png", campus / f"{pid:04d}003.png", campus / f"{pid % 20 + 1:04d}003.png"])
        same.append(float(f[0] @ f[1]))
        other.append(float(f[0] @ f[2]))
    assert np.mean(same) > np.mean(other) + 0.15  # a person is closer to themself in the other camera
