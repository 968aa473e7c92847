"""Loading pretrained weights from a local file (nasreid.models.pretrained)."""
import pytest
import torch

from nasreid.errors import NasreidError
from nasreid.genotype import preset_genotype
from nasreid.models.pretrained import (
    PretrainedWeightsError,
    load_pretrained,
    read_state_dict,
)


def ain(num_classes, seed, width=0.25, **kw):
    torch.manual_seed(seed)
    return preset_genotype("osnet_ain", "osnet_ain", width_mult=width, **kw).build(num_classes=num_classes)


@pytest.fixture(scope="module")
def source():
    """A 'pretrained' network: trained-looking weights and BN statistics, 10 identities."""
    net = ain(10, seed=0)
    with torch.no_grad():
        for t in net.state_dict().values():  # parameters and BN running statistics (variances stay > 0)
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    return net.eval()


def features(net, x):
    net.eval()
    with torch.no_grad():
        return net(x)


def test_error_class_is_a_nasreid_error():
    assert issubclass(PretrainedWeightsError, NasreidError) and issubclass(PretrainedWeightsError, ValueError)


def test_round_trip_into_a_network_with_other_classes(tmp_path, source):
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    target = ain(7, seed=1)
    x = torch.randn(2, 3, 64, 32)
    assert not torch.equal(features(target, x), features(source, x))  # different initialisation
    cls_before = target.head.classifier.weight.clone()
    report = load_pretrained(target, path)
    assert torch.equal(features(target, x), features(source, x))
    assert torch.equal(target.head.classifier.weight, cls_before)  # 7-class classifier left alone
    assert sorted(report["skipped"]) == ["head.classifier.bias", "head.classifier.weight"]
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    n_keys = len(source.state_dict())
    assert report["loaded"] == n_keys - 2
    # the BN running statistics came along (buffers, not only parameters)
    assert torch.equal(target.conv1[1].running_var, source.conv1[1].running_var)


def test_nasreid_checkpoint_layout(tmp_path, source):
    path = tmp_path / "model.pt"  # what `nasreid train` writes
    torch.save({"model": source.state_dict(), "genotype": {"space": "osnet_ain"}, "num_classes": 10}, path)
    target = ain(10, seed=1)
    report = load_pretrained(target, path, skip=())
    assert report["loaded"] == len(source.state_dict()) and report["skipped"] == []
    x = torch.randn(2, 3, 64, 32)
    assert torch.equal(features(target, x), features(source, x))
    assert torch.equal(target.head.classifier.weight, source.head.classifier.weight)


def test_torchreid_layout_with_dataparallel_prefix(tmp_path, source):
    path = tmp_path / "model.pth.tar"
    sd = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 60, "rank1": 0.71, "optimizer": {"state": {}, "param_groups": []}}, path)
    assert all(not k.startswith("module.") for k in read_state_dict(path))
    target = ain(3, seed=2)
    report = load_pretrained(target, path)
    assert report["skipped"] == ["head.classifier.weight", "head.classifier.bias"]  # named without module.
    x = torch.randn(2, 3, 64, 32)
    assert torch.equal(features(target, x), features(source, x))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found: .*nope.pth"):
        load_pretrained(ain(3, 0), tmp_path / "nope.pth")


def test_unreadable_file_names_the_path(tmp_path):
    p = tmp_path / "corrupt.pth"
    p.write_bytes(b"this is not a torch file")
    with pytest.raises(PretrainedWeightsError, match="cannot read pretrained weights .*corrupt.pth"):
        load_pretrained(ain(3, 0), p)


def test_file_without_state_dict(tmp_path):
    p = tmp_path / "other.pt"
    torch.save({"epoch": 3, "lr": 0.1}, p)
    with pytest.raises(PretrainedWeightsError, match=r"other.pt holds no state dict.*'epoch'"):
        load_pretrained(ain(3, 0), p)


def test_pickled_objects_need_weights_only_false(tmp_path, source):
    import numpy as np
    p = tmp_path / "last.pt"
    torch.save({"model": source.state_dict(), "rng": np.random.get_state()}, p)
    with pytest.raises(PretrainedWeightsError, match="last.pt.*weights_only=False"):
        load_pretrained(ain(10, 1), p)
    assert load_pretrained(ain(10, 1), p, weights_only=False)["loaded"] == len(source.state_dict())  # 10 classes fit


def test_key_mismatch_names_keys_and_counts(tmp_path, source):
    sd = source.state_dict()
    sd.pop("conv1.0.weight")
    sd["extra.layer.weight"] = torch.zeros(3)
    p = tmp_path / "w.pt"
    torch.save(sd, p)
    target = ain(10, 1)
    before = target.conv5[0].weight.clone()
    with pytest.raises(PretrainedWeightsError) as e:
        load_pretrained(target, p)
    msg = str(e.value)
    assert "w.pt" in msg
    assert "1 key(s) of the model missing from the file: conv1.0.weight" in msg
    assert "1 key(s) of the file not in the model: extra.layer.weight" in msg
    assert torch.equal(target.conv5[0].weight, before)  # strict failure loads nothing
    # strict=False loads what matches and reports the rest
    report = load_pretrained(target, p, strict=False)
    assert report["missing"] == ["conv1.0.weight"] and report["unexpected"] == ["extra.layer.weight"]
    assert report["loaded"] == len(sd) - 1  # all but the extra key: the 10-class classifier fits
    assert torch.equal(target.conv5[0].weight, source.conv5[0].weight)


def test_many_missing_keys_are_counted(tmp_path, source):
    p = tmp_path / "w.pt"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("conv4.")}, p)
    n = sum(k.startswith("conv4.") for k in source.state_dict())
    with pytest.raises(PretrainedWeightsError, match=rf"{n} key\(s\) of the model missing .*\({n - 5} more\)"):
        load_pretrained(ain(10, 1), p)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, source):
    p = tmp_path / "w.pt"
    torch.save(source.state_dict(), p)
    wider = ain(10, 1, width=0.5)
    with pytest.raises(PretrainedWeightsError,
                       match=r"'conv1\.0\.weight' has shape \[16, 3, 7, 7\] in the file but \[32, 3, 7, 7\]"):
        load_pretrained(wider, p)
    # the classifier with another number of classes is a shape mismatch unless skipped
    with pytest.raises(PretrainedWeightsError, match=r"head\.classifier\.weight' has shape \[10, 512\].*\[4, 512\]"):
        load_pretrained(ain(4, 1), p, skip=())
    report = load_pretrained(ain(4, 1), p, skip=(), strict=False)
    assert ("head.classifier.weight", (10, 512), (4, 512)) in report["mismatched"]


def test_nothing_matching_is_an_error_even_when_not_strict(tmp_path):
    p = tmp_path / "resnet.pt"
    torch.save({"layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1000, 2048)}, p)
    with pytest.raises(PretrainedWeightsError, match="no tensor of .*resnet.pt matches"):
        load_pretrained(ain(3, 0), p, strict=False)


def test_rename_translates_names(tmp_path, source):
    p = tmp_path / "w.pt"
    torch.save({"backbone." + k: v for k, v in source.state_dict().items()}, p)
    target = ain(10, 1)
    report = load_pretrained(target, p, rename=lambda k: k[len("backbone."):])
    assert report["loaded"] == len(source.state_dict())  # the 10-class classifier fits
    x = torch.randn(2, 3, 64, 32)
    assert torch.equal(features(target, x), features(source, x))


def test_frozen_backbone_warm_start_trains_only_the_head():
    net = ain(5, 0).train()
    backbone, head = ([p for _, p in part] for part in net.split_parameters())  # the network interface's split
    for p in backbone:
        p.requires_grad_(False)
    before = [p.clone() for p in backbone]
    opt = torch.optim.SGD([p for p in head if p.requires_grad], lr=0.1)
    out = net(torch.randn(4, 3, 64, 32))
    torch.nn.functional.cross_entropy(out["logits"], torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert all(p.grad is None for p in backbone)
    assert all(torch.equal(a, b) for a, b in zip(before, backbone))
    assert net.head.classifier.weight.grad is not None


def test_a_classifier_whose_class_count_fits_is_loaded(tmp_path, source):
    """The classifier is dropped unless its class count fits (``keep_fitting``); ``keep_fitting=False`` always
    leaves it."""
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    n = source.head.classifier.out_features
    same = ain(n, seed=1)
    report = load_pretrained(same, path)
    assert report["skipped"] == [] and torch.equal(same.head.classifier.weight, source.head.classifier.weight)
    fresh = ain(n, seed=1)
    before = fresh.head.classifier.weight.clone()
    report = load_pretrained(fresh, path, keep_fitting=False)
    assert sorted(report["skipped"]) == ["head.classifier.bias", "head.classifier.weight"]
    assert torch.equal(fresh.head.classifier.weight, before)
