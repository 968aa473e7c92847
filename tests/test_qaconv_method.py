"""``training.method: qaconv`` end to end on real CUHK01 images (tiny network, 2 epochs): the head travels with
the network (model.pt, checkpoints, load_run_model), the class memory is checkpointed and a run resumes,
evaluation with the learned matcher, ``nasreid evaluate --matcher`` / ``--post`` and ``nasreid match``; the
class-memory baseline loss; Random Block from the recipe."""
from __future__ import annotations

import json

import pytest
import torch

from nasreid import cli
from nasreid.config import load_recipe
from nasreid.engine import pipeline
from nasreid.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "name": "tiny_qaconv", "seed": 0, "device": "cpu",
    "data": {"dataset": {"name": "cuhk01", "root": None, "kwargs": {"split_seed": 0, "max_ids": 24}},
             "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "workers": 0,
             "augment": {"flip": True, "random_block": {"p": 0.5, "max_ratio": 0.8}}},
    "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.125, "feature_dim": 64}},
    "model": {"preset": "osnet"},
    "training": {"method": "qaconv", "kwargs": {"stage": "conv3", "dim": 32}},
    "optim": {"lr": 0.05, "epochs": 2, "scheduler": "constant", "warmup_epochs": 0},
    "eval": {"matcher": {"name": "qaconv", "kwargs": {"block_size": 7}}, "batch_size": 32},
}


@pytest.fixture(scope="module")
def qaconv_run(tmp_path_factory, shared_data, one_thread):
    import yaml

    tmp = tmp_path_factory.mktemp("qaconv")
    d = json.loads(json.dumps(TINY))
    d["data"]["dataset"]["root"] = str(shared_data / "cuhk01")
    d["output_root"] = str(tmp / "results")
    (tmp / "tiny_qaconv.yaml").write_text(yaml.safe_dump(d))
    run = pipeline.run_train(load_recipe(tmp / "tiny_qaconv.yaml"), run_dir=tmp / "run", progress=False)
    return tmp, run


def test_qaconv_training_trains_the_head_and_evaluates_with_the_learned_matcher(qaconv_run):
    _, run = qaconv_run
    m = json.loads((run / "metrics.json").read_text())
    assert len(m["history"]) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in m["history"])
    ev = m["evaluation"]["cuhk01 (same-domain)"]
    assert ev["num_query"] > 0 and 0 <= ev["mAP"] <= 100
    state = load_checkpoint(run / "model.pt")["model"]
    assert any(k.startswith("qaconv.") for k in state)                  # the head is saved with the network
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    mem = ck["hooks"]["qaconv_memory"]
    assert mem["maps"].shape[0] == 12 and bool(mem["filled"].all())     # 12 train ids, all seen in 2 epochs
    model, _, _ = pipeline.load_run_model(run)                          # rebuilt with its head
    assert model.qaconv.stage == "conv3" and model.qaconv.dim == 32


def test_evaluate_cli_overrides_the_matcher_and_keeps_both_results(qaconv_run, capsys):
    _, run = qaconv_run
    assert cli.main(["evaluate", str(run), "--matcher", "distance:metric=cosine"]) == 0
    m = json.loads((run / "metrics.json").read_text())["evaluation"]
    assert "cuhk01 (same-domain)" in m and "cuhk01 (same-domain) [distance]" in m
    assert m["cuhk01 (same-domain) [distance]"]["num_query"] == m["cuhk01 (same-domain)"]["num_query"]
    assert cli.main(["evaluate", str(run), "--matcher", "nosuch"]) == 2


def test_match_draws_the_correspondences_of_a_pair(qaconv_run, capsys):
    from PIL import Image

    _, run = qaconv_run
    assert cli.main(["match", str(run), "--query", "0", "--gallery", "0", "--top", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["score"] <= 1.0 and out["query_pid"] == out["gallery_pid"]   # CUHK01: query i ~ gallery i
    png = Image.open(out["picture"]).convert("RGB")
    assert png.size == (2 * 96 + 40 + 20, 256 + 20 + 24)   # two 60x160 crops at 256 px high, gap, margins, caption
    gap = [png.getpixel((10 + 96 + x, y)) for x in range(5, 35) for y in range(10, 266)]
    assert sum(p != (255, 255, 255) for p in gap) > 20     # correspondence lines cross the gap between the images
    assert cli.main(["match", str(run), "--query", "9999", "--gallery", "0"]) == 2


def test_resume_continues_with_the_memory(qaconv_run):
    import shutil

    tmp, run = qaconv_run
    cut = tmp / "cut"
    r = load_recipe(tmp / "tiny_qaconv.yaml")
    one = r.model_copy(update={"optim": r.optim.model_copy(update={"epochs": 1})})
    pipeline.run_train(one, run_dir=cut, progress=False)
    (cut / "model.pt").unlink()
    (cut / "metrics.json").unlink()
    pipeline.run_train(r, run_dir=cut, resume=True, progress=False)
    a = json.loads((run / "metrics.json").read_text())["history"]
    b = json.loads((cut / "metrics.json").read_text())["history"]
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], rel=1e-6)
    shutil.rmtree(cut)


def test_class_memory_loss_trains_and_updates_its_memory():
    from nasreid.losses import LOSSES

    loss = LOSSES.get("class_memory")(6, dim=8)
    feat = torch.randn(12, 8, requires_grad=True)
    pids = torch.arange(6).repeat(2)
    total, parts = loss({"feat": feat}, {"pid": pids})
    assert total.item() == pytest.approx(torch.log(torch.tensor(6.0)).item(), rel=1e-5)  # zero memory: log C
    total.backward()
    assert feat.grad is not None
    assert torch.allclose(loss.memory.features.norm(dim=1), torch.ones(6))           # updated, unit rows
    with pytest.raises(KeyError, match="feat"):
        loss({"logits": feat}, {"pid": pids})


def test_random_block_from_the_recipe_is_in_the_train_transform_only():
    from nasreid.data.random_block import RandomBlock
    from nasreid.data.transforms import build_transforms

    tr = build_transforms(64, 32, is_train=True, random_block={"p": 1.0, "max_ratio": 0.8})
    te = build_transforms(64, 32, is_train=False, random_block={"p": 1.0, "max_ratio": 0.8})
    assert any(isinstance(t, RandomBlock) for t in tr.transforms)
    assert not any(isinstance(t, RandomBlock) for t in te.transforms)


def test_a_fresh_head_on_a_pretrained_backbone_starts_as_a_working_matcher(shared_data, shared_weights):
    """Defect found in issue 28's QAConv study: from the MSMT17 OSNet, QAConv fine-tuned on CUHK03 stayed at chance
    (training accuracy 0.2-0.6 % over 372 classes, 0.44 mAP) while the plain QAConv similarity of the same conv4 maps
    ranked the own class first for 35 % of the training images. PyTorch's default init of the BN-FC-BN's FC (half
    the weights negative) and of the 1x1 reduction (a random bias on every location) started the head as a random
    matcher. A fresh head must rank like QAConv's matching of the pretrained maps: here 40 CUHK03 training ids,
    one image each in the memory and another one as the probe, the head in training mode as in a training step."""
    from nasreid.data import ImageDataset
    from nasreid.data.datasets.base import build_dataset
    from nasreid.data.transforms import build_transforms
    from nasreid.genotype import preset_genotype
    from nasreid.models.pretrained import load_pretrained
    from nasreid.models.qaconv import attach_qaconv

    ds = build_dataset("cuhk03np", shared_data / "cuhk03")
    by_pid: dict[int, list] = {}
    for r in ds.train:
        by_pid.setdefault(r.pid, []).append(r)
    pids = sorted(by_pid)[:40]
    transform = build_transforms(128, 64, is_train=False)

    def images(records):
        data = ImageDataset(records, ds.read_image, transform)
        return torch.stack([data[i]["img"] for i in range(len(data))])

    net = preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=1041)
    load_pretrained(net, shared_weights / "osnet_x0_25_msmt17" / "osnet_x0_25_msmt17.pth", skip=())
    net.eval()
    torch.manual_seed(0)
    for dim in (128, None):  # conv4 has 128 channels: a 1x1 rotation, or no reduction
        if getattr(net, "qaconv", None) is not None:
            del net.qaconv  # attach_qaconv refuses a second head of another configuration
        head = attach_qaconv(net, "conv4", (128, 64), dim=dim).train()
        with torch.no_grad():
            memory = head.extract(net, images([by_pid[p][0] for p in pids]))
            probe = head.extract(net, images([by_pid[p][-1] for p in pids]))
            logits = head(probe, memory)  # [40 probes, 40 classes]
        acc = float((logits.argmax(dim=1) == torch.arange(len(pids))).float().mean())
        plain = head.match(probe, memory).mean(dim=-1)  # QAConv's similarity without the learned block
        acc_plain = float((plain.argmax(dim=1) == torch.arange(len(pids))).float().mean())
        assert acc >= 0.15 and acc == pytest.approx(acc_plain), (dim, acc, acc_plain)  # chance: 0.025
