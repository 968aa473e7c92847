"""Warm start from a pretrained file (nasreid.models.pretrained.warm_start): the OSNet-AIN supernet and networks
of other genotypes take the real torchreid MSMT17 OSNet's tensors at their fixed-network place; IN layers the file
lacks start at identity; a search recipe's model.pretrained warm-starts the supernet it searches."""
from __future__ import annotations

import pytest
import torch

from nasreid.config import load_recipe
from nasreid.data import build_dataset
from nasreid.data.transforms import build_transforms
from nasreid.engine.context import SearchContext
from nasreid.engine.runs import build_context
from nasreid.genotype import preset_genotype
from nasreid.models.pretrained import (
    PretrainedWeightsError,
    calibrate_instance_norms,
    fixed_name,
    load_pretrained,
    read_state_dict,
    warm_start,
)
from nasreid.models.torchreid import to_nasreid
from nasreid.mutables import LayerChoice
from nasreid.registry import SPACES

pytestmark = pytest.mark.usefixtures("one_thread")

MSMT = "osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth"
BLOCKS = ("conv2", "conv3", "conv4")


def _file(shared_weights) -> dict[str, torch.Tensor]:
    """The MSMT17 file under nasreid's fixed-network names (classifier left out)."""
    sd = read_state_dict(shared_weights / MSMT)
    return {to_nasreid(k, "osnet"): v for k, v in sd.items() if not k.startswith("classifier.")}


def test_fixed_name_drops_the_choice_segments():
    assert fixed_name("conv2.0.candidates.os_in_in.in_in.weight") == "conv2.0.in_in.weight"
    assert fixed_name("conv2.0.candidates.os.residual.conv1.0.weight") == "conv2.0.residual.conv1.0.weight"
    assert fixed_name("head.embed.0.weight") == "head.embed.0.weight"


@pytest.mark.parametrize("share", [True, False])
def test_every_candidate_of_the_supernet_takes_the_file_block(shared_weights, share):
    src = _file(shared_weights)
    space = SPACES.get("osnet_ain")(num_classes=485, width_mult=0.25, share_weights=share)
    report = warm_start(space, shared_weights / MSMT)
    sd = space.state_dict()
    assert report["unused"] == [] and report["converted"] == []
    assert report["skipped"] == ["classifier.weight", "classifier.bias"]
    placed = 0
    for key, value in sd.items():
        place = fixed_name(key)
        if place in src:
            assert torch.equal(value, src[place]), key
            placed += 1
    assert placed == report["loaded"]
    # each of the 6 blocks x 4 candidates holds the whole pretrained OS block (shared or its own copy)
    per_block = sum(1 for k in src if k.startswith("conv2.0."))
    assert sum(1 for k in sd if k.startswith("conv2.0.") and fixed_name(k) in src) == 4 * per_block
    ins = [m for m in space.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert len(ins) == 6 * 4 and len(report["identity"]) == 24  # os_in_in 1, os_in_out 1, os_in_in_out 2 each
    for m in ins:
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_the_supernet_os_path_is_the_pretrained_network(shared_weights):
    """Frozen at the all-``os`` genotype, the warm-started supernet computes the exactly loaded OSNet."""
    torch.manual_seed(0)
    space = SPACES.get("osnet_ain")(num_classes=485, width_mult=0.25)
    warm_start(space, shared_weights / MSMT)
    fixed = space.freeze({f"{s}_{i}": "os" for s in BLOCKS for i in (1, 2)})
    ref = preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=485)
    load_pretrained(ref, shared_weights / MSMT)
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        assert torch.allclose(fixed.eval()(x), ref.eval()(x), atol=1e-6)
    assert not any(isinstance(m, LayerChoice) and len(m.candidates) > 1 for m in fixed.modules())


def test_other_genotypes_from_a_plain_osnet_file(shared_weights):
    src = _file(shared_weights)
    ibn = preset_genotype("osnet_ain", "osnet_ibn", width_mult=0.25).build(num_classes=485)
    r = warm_start(ibn, shared_weights / MSMT)
    # conv1: the file's BN becomes OSNet-IBN's affine IN: gamma / beta kept, the BN statistics reported unused
    assert r["converted"] == ["conv1.1"] and isinstance(ibn.conv1[1], torch.nn.InstanceNorm2d)
    assert torch.equal(ibn.conv1[1].weight, src["conv1.1.weight"])
    assert r["unused"] == ["conv1.1.running_mean", "conv1.1.running_var", "conv1.1.num_batches_tracked"]
    assert r["identity"] == ["conv2.0.in_out", "conv2.1.in_out"]
    assert torch.equal(ibn.conv2[0].residual.conv1[0].weight, src["conv2.0.residual.conv1.0.weight"])
    ain = preset_genotype("osnet_ain", "osnet_ain_torchreid", width_mult=0.25).build(num_classes=485)
    r = warm_start(ain, shared_weights / MSMT)
    # torchreid's OSBlockINin has no BN after its last 1x1 conv: the file's BN there is reported, not placed
    assert {k.rsplit(".", 1)[0] for k in r["unused"]} == {"conv1.1", *(f"{b}.residual.conv3.1" for b in (
        "conv2.0", "conv2.1", "conv3.1", "conv4.0"))}
    assert r["identity"] == ["conv2.0.in_in", "conv2.1.in_in", "conv3.1.in_in", "conv4.0.in_in"]
    # with a file of exactly its architecture, warm_start is load_pretrained
    a = preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=485)
    b = preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=485)
    assert warm_start(a, shared_weights / MSMT)["identity"] == []
    load_pretrained(b, shared_weights / MSMT)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items() if "classifier" not in k)


def test_warm_start_refuses_what_does_not_fit(shared_weights, tmp_path):
    wide = SPACES.get("osnet_ain")(num_classes=10, width_mult=0.5)
    # the message names the file with the count of mismatches, then what the file is (a width x0.25 OSNet)
    with pytest.raises(PretrainedWeightsError,
                       match=r"osnet_x0_25_msmt17\.pth: \d+ shape mismatch\(es\).*osnet file of width x0\.25"):
        warm_start(wide, shared_weights / MSMT)
    src = _file(shared_weights)
    del src["conv3.0.residual.gate.fc1.weight"]  # a file lacking a convolution: only norms may be absent
    torch.save(src, tmp_path / "cut.pt")
    net = preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=10)
    with pytest.raises(PretrainedWeightsError, match=r"conv3\.0\.residual\.gate\.fc1\.weight.*only normalisation"):
        warm_start(net, tmp_path / "cut.pt")
    src = _file(shared_weights)
    src["conv9.0.weight"] = torch.zeros(3)  # a layer the model does not have
    torch.save(src, tmp_path / "extra.pt")
    with pytest.raises(PretrainedWeightsError, match=r"no place in the model: conv9\.0\.weight"):
        warm_start(net, tmp_path / "extra.pt")


def test_a_search_recipe_warm_starts_its_supernet(tmp_path):
    """``model.pretrained`` in a search recipe: the space the strategy gets holds the file's blocks (here a
    nasreid fixed network saved on the quickstart recipe's synthetic data)."""
    torch.manual_seed(1)
    recipe = load_recipe("recipes/quickstart.yaml")
    net = preset_genotype("osnet_ain", "osnet", **recipe.space.kwargs).build(num_classes=7)
    torch.save({"model": net.state_dict()}, tmp_path / "osnet.pt")
    recipe = load_recipe("recipes/quickstart.yaml", {"model.pretrained": str(tmp_path / "osnet.pt")})
    ctx = build_context(SearchContext, recipe, tmp_path / "run", False)
    space = ctx.build_space()
    want = net.state_dict()["conv3.1.residual.streams.2.1.1.weight"]
    for v in ("os", "os_in_in", "os_in_out", "os_in_in_out"):
        assert torch.equal(space.state_dict()[f"conv3.1.candidates.{v}.residual.streams.2.1.1.weight"], want)
    assert space.num_classes_now == ctx.dataset.num_train_pids != 7  # the classifier stays new


def test_a_search_recipe_refuses_the_fixed_network_keys():
    from nasreid.config import RecipeError
    from nasreid.engine.validate import check_recipe

    for key, value in (("model.preset", "osnet"), ("model.warm_start", True)):
        recipe = load_recipe("recipes/quickstart.yaml", {key: value})
        with pytest.raises(RecipeError, match=rf"{key}: a search recipe does not honour this key"):
            check_recipe(recipe, search=True)
        check_recipe(recipe)  # a train recipe takes it


def test_warm_start_keeps_a_classifier_that_fits(shared_weights):
    space = SPACES.get("osnet_ain")(num_classes=1041, width_mult=0.25)  # MSMT17's 1,041 training identities
    report = warm_start(space, shared_weights / MSMT)
    assert report["skipped"] == []
    file_clf = read_state_dict(shared_weights / MSMT)["classifier.weight"]
    assert torch.equal(space.head.classifier.weight, file_clf)
    assert warm_start(space, shared_weights / MSMT, keep_fitting=False)["skipped"] == [
        "classifier.weight", "classifier.bias"]


def test_calibrated_in_layers_keep_the_pretrained_embedding(shared_weights, shared_data):
    """On real CUHK01 images: with its IN layers calibrated (gamma = mean per-image std, beta = mean per-image
    mean of their input), the all-IN genotype of the warm-started supernet (12 IN layers) embeds test images close
    to the pretrained OSNet; at gamma 1 / beta 0 it does not (features of another network, 10x the norm)."""
    ds = build_dataset("cuhk01", shared_data / "cuhk01", split_seed=0)
    tf = build_transforms(256, 128, is_train=False)
    calib = torch.stack([tf(ds.read_image(r)) for r in ds.train[::60][:32]])
    test = torch.stack([tf(ds.read_image(r)) for r in ds.query[:16]])
    all_in = {f"{s}_{i}": "os_in_in_out" for s in BLOCKS for i in (1, 2)}
    torch.manual_seed(0)
    space = SPACES.get("osnet_ain")(num_classes=485, width_mult=0.25)
    report = warm_start(space, shared_weights / MSMT)
    plain = space.freeze(all_in)
    assert sorted(calibrate_instance_norms(space, report["identity"], [calib[:16], calib[16:]])) == report["identity"]
    calibrated = space.freeze(all_in)
    ref = space.freeze({k: "os" for k in all_in})
    in_in = space.conv3[0].candidates["os_in_in"].in_in
    assert not torch.equal(in_in.weight, torch.ones_like(in_in.weight))
    with torch.no_grad():
        r, c, p = (n.eval()(test) for n in (ref, calibrated, plain))
    cos = torch.nn.functional.cosine_similarity
    # measured: mean cosine 0.81 vs 0.32, embedding norm 14.0 and 194 against the pretrained network's 18.6 (the
    # calibrated IN still removes each image's own style statistics, so not 1.0)
    assert cos(c, r).mean() > 0.75 > 0.5 > cos(p, r).mean()
    ratio_c, ratio_p = (x.norm(dim=1).mean() / r.norm(dim=1).mean() for x in (c, p))
    assert 0.5 < ratio_c < 1.5 and ratio_p > 5


def test_a_warm_started_search_trains_the_classifier_first(tmp_path, monkeypatch):
    """``training.freeze_backbone_epochs`` in a one-shot search, 1 frozen + 1 open epoch: in the frozen epoch the
    supernet's pretrained blocks (BN statistics and the embedding included) and its architecture weights pi stay as
    loaded while its classifier trains; in the open epoch the blocks and pi train too. DARTS-TCM, whose loop has no
    frozen start, refuses the key."""
    from nasreid.config import RecipeError
    from nasreid.engine import pipeline
    from nasreid.engine.checkpoint import read_json
    from nasreid.engine.hooks import CheckpointHook, FreezeBackboneHook
    from nasreid.engine.validate import check_recipe

    states: list[dict[str, torch.Tensor]] = []  # the supernet before training, then after each epoch

    def snapshot(trainer):
        states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    before_train, after_epoch = FreezeBackboneHook.before_train, CheckpointHook.after_epoch
    monkeypatch.setattr(FreezeBackboneHook, "before_train", lambda self, tr: (before_train(self, tr), snapshot(tr)))
    monkeypatch.setattr(CheckpointHook, "after_epoch", lambda self, tr: (snapshot(tr), after_epoch(self, tr)))
    torch.manual_seed(2)
    base = load_recipe("recipes/quickstart.yaml")
    net = preset_genotype("osnet_ain", "osnet", **base.space.kwargs).build(num_classes=7)
    torch.save(net.state_dict(), tmp_path / "osnet.pt")
    recipe = load_recipe("recipes/quickstart.yaml", {
        "model.pretrained": str(tmp_path / "osnet.pt"), "training.freeze_backbone_epochs": 1,
        "training.open_layers": ["head.classifier"], "optim.epochs": 2, "then_retrain": None})
    run = pipeline.run_search(recipe, run_dir=tmp_path / "run", progress=False)
    history = read_json(run / "metrics.json")["history"]
    assert [h.get("frozen_backbone") for h in history] == [1.0, None]
    start, frozen, opened = states
    assert start.keys() == frozen.keys() == opened.keys()
    loaded = net.state_dict()
    for key in ("conv3.0.residual.conv1.0.weight", "conv1.1.running_mean", "head.embed.0.weight"):
        places = [k for k in start if fixed_name(k) == key]
        assert places and all(torch.equal(frozen[k], loaded[key]) for k in places), key  # frozen: as loaded
        assert any(not torch.equal(opened[k], loaded[key]) for k in places), key        # open: trained
    pis = [k for k in start if k.endswith(".pi")]
    assert len(pis) == 6
    assert all(torch.equal(frozen[k], start[k]) for k in pis)       # pi waits for the open blocks
    assert all(not torch.equal(opened[k], frozen[k]) for k in pis)  # and trains with them
    for k in ("head.classifier.weight", "head.classifier.bias"):
        assert not torch.equal(frozen[k], start[k]), k               # the new classifier trains from the start
    darts = load_recipe("recipes/msinet_cpu.yaml", {"training.freeze_backbone_epochs": 1})
    with pytest.raises(RecipeError, match="training.freeze_backbone_epochs: strategy 'darts_tcm' does not honour"):
        check_recipe(darts, search=True)


def test_an_in_standing_for_the_file_bn_reproduces_it(shared_weights, shared_data):
    """torchreid's OSNet-AIN from a plain OSNet file: its OSBlockINin has no BN after conv3, its IN stands there.
    Calibrated with that BN folded in, the network embeds real CUHK01 images close to the pretrained OSNet
    (measured: cosine 0.74, norm 19.1 vs 18.6); calibrated as an added IN it does not (0.38, norm 38)."""
    ds = build_dataset("cuhk01", shared_data / "cuhk01", split_seed=0)
    tf = build_transforms(256, 128, is_train=False)
    calib = torch.stack([tf(ds.read_image(r)) for r in ds.train[::30][:64]])
    test = torch.stack([tf(ds.read_image(r)) for r in ds.query[:16]])
    ref = preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=485)
    load_pretrained(ref, shared_weights / MSMT)
    out = {}
    for fold in (True, False):
        net = preset_genotype("osnet_ain", "osnet_ain_torchreid", width_mult=0.25).build(num_classes=485)
        report = warm_start(net, shared_weights / MSMT)
        assert sorted(report["folds"]) == ["conv2.0.in_in", "conv2.1.in_in", "conv3.1.in_in", "conv4.0.in_in"]
        assert torch.equal(report["folds"]["conv2.0.in_in"]["running_var"],
                           read_state_dict(shared_weights / MSMT)["conv2.0.conv3.bn.running_var"])
        calibrate_instance_norms(net, report["identity"], [calib[:32], calib[32:]], report["folds"] if fold else None)
        with torch.no_grad():
            out[fold] = net.eval()(test)
    with torch.no_grad():
        r = ref.eval()(test)
    cos = torch.nn.functional.cosine_similarity
    assert cos(out[True], r).mean() > 0.65 > 0.5 > cos(out[False], r).mean()
    assert 0.8 < out[True].norm(dim=1).mean() / r.norm(dim=1).mean() < 1.25


def test_zero_shot_of_a_warm_start_calibrates_its_in_layers_as_a_run_start(tmp_path, shared_weights, shared_data,
                                                                             capsys):
    """``nasreid evaluate --weights ... --set model.warm_start=true`` of an IN genotype calibrates the IN layers the
    file lacks on the training images of ``data.dataset`` (the first target), as a fine-tune's start does, so the
    zero-shot figure is that start's; a dataset without training images is refused by name."""
    import json

    from nasreid import cli
    from nasreid.data.loaders import calibration_batches

    if not (shared_data / "cuhk01" / "campus").is_dir():
        from conftest import missing

        missing(f"cuhk01 not present in {shared_data}")
    zoo = shared_weights / "osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth"
    base = ["evaluate", "--weights", str(zoo), "--genotype", "preset:osnet_ain_torchreid", "--set",
            "space.kwargs.width_mult=0.25", "--set", "model.warm_start=true", "--set", "data.height=64", "--set",
            "data.width=32"]
    assert cli.main([*base, "--target", f"cuhk01={shared_data / 'cuhk01'}", "--out", str(tmp_path / "zs")]) == 0
    m = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    rep = m["load_report"]
    assert rep["calibrated"] and sorted(rep["calibrated"]) == sorted(rep["identity"])
    (zero_shot,) = m["evaluation"].values()
    # the same start built directly (warm start + calibration on the same training images) gives the same figures;
    # left uncalibrated (gamma 1 / beta 0) it does not
    from nasreid.engine.runs import load_run_recipe
    from nasreid.engine.trainer import device_context
    from nasreid.evaluation.runner import evaluate_run_model

    recipe = load_run_recipe(tmp_path / "zs")
    ctx = device_context(recipe.device, recipe.amp, recipe.channels_last)
    ds = build_dataset("cuhk01", shared_data / "cuhk01")
    figures = []
    for calib in (lambda n: calibration_batches(ds, n, height=64, width=32), None):
        net = preset_genotype("osnet_ain", "osnet_ain_torchreid", width_mult=0.25).build(num_classes=0)
        init_weights_for_test(net, zoo, calib)
        (res,) = evaluate_run_model(ctx.model(net.eval()), recipe, ctx, targets=recipe.eval.targets,
                                    same_domain=False).values()
        figures.append(res["mAP"])
    assert figures[0] == pytest.approx(zero_shot["mAP"], abs=1e-6)
    assert abs(figures[1] - zero_shot["mAP"]) > 0.1, figures
    capsys.readouterr()
    target = f"cuhk01={shared_data / 'cuhk01'}:protocol=all_ids,max_ids=20"
    assert cli.main([*base, "--target", target, "--out", str(tmp_path / "zs2")]) == 2
    assert "data.dataset 'cuhk01': no training images" in capsys.readouterr().err


def init_weights_for_test(net, zoo, calibration_images):
    """The runs' entry point with a warm start of ``zoo`` (64 calibration images, the recipe default)."""
    from nasreid.config import ModelConfig
    from nasreid.models.pretrained import init_weights

    return init_weights(net, ModelConfig(pretrained=str(zoo), warm_start=True), calibration_images=calibration_images)
