"""``training.method: domainmix`` (Wang et al., BMVC 2021): refinement bounds (Eq. 1) on a crafted clustering,
stage-1 clustering equal to DBSCAN on a dense literal Jaccard matrix, L_dm (Eq. 6-8) minimal at the uniform output
with a gradient towards it, discriminator and backbone alternating with the other frozen (``.grad`` and values),
and end to end on real CUHK01 images as B (tiny network): the trainer never reads B's labels (a run with B's
identities permuted trains bit-identically), resume mid-stage-3 equals an uninterrupted run, the run folder loads
with its resized classifier, plus the report files and recipe errors that name the key."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nasreid.config import RecipeError, load_recipe
from nasreid.data.datasets.base import build_dataset, register_dataset
from nasreid.engine import pipeline
from nasreid.engine.checkpoint import load_checkpoint
from nasreid.engine.trainer import device_context
from nasreid.losses.triplet import TripletLoss
from nasreid.methods.domainmix import (
    ClusterConfig,
    DomainDiscriminator,
    DomainMixMethod,
    cluster_pseudo_labels,
    cluster_purity,
    domainmix_loss,
    refine_clusters,
    stage_of,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- Eq. 1
def test_refinement_keeps_clusters_within_bounds_inclusive():
    # sizes: cluster 7 -> 1 image, 3 -> 2, 1 -> 4, 9 -> 6, 5 -> 7; four outliers; b_l = 2, b_h = 6
    sizes = {7: 1, 3: 2, 1: 4, 9: 6, 5: 7}
    labels = [c for c, s in sizes.items() for _ in range(s)] + [-1] * 4
    rng = np.random.default_rng(0)
    labels = list(rng.permutation(labels))
    out, st = refine_clusters(labels, b_l=2, b_h=6)
    lab = np.asarray(labels)
    kept = {3, 1, 9}  # 2 == b_l and 6 == b_h are kept (Eq. 1 is inclusive)
    assert ((out >= 0) == np.isin(lab, list(kept))).all()
    assert st == {"clusters": 3, "clusters_before": 5, "largest": 7, "kept": 12, "dropped": 8, "noise": 4,
                  "too_small": 1, "too_large": 1}
    assert sorted(set(out[out >= 0].tolist())) == [0, 1, 2]
    for c in kept:  # one new label per kept cluster, images of a cluster stay together
        assert len(set(out[lab == c].tolist())) == 1
    with pytest.raises(ValueError, match="b_l=7 must not exceed b_h=6"):
        refine_clusters(labels, 7, 6)


# ------------------------------------------------------------------------------------------- stage 1
def test_stage1_clustering_equals_dbscan_on_the_dense_literal_jaccard():
    from sklearn.cluster import DBSCAN

    from nasreid.evaluation.rerank import k_reciprocal_reference

    g = torch.Generator().manual_seed(3)
    centres = torch.randn(12, 16, generator=g)
    sizes = [2, 3, 4, 5, 6, 3, 4, 5, 2, 8, 4, 3]
    x = torch.cat([centres[i] + 0.35 * torch.randn(s, 16, generator=g) for i, s in enumerate(sizes)])
    xn = torch.nn.functional.normalize(x, dim=1).double()
    dist = (2 - 2 * xn @ xn.T).clamp_min(0).numpy()
    cfg = ClusterConfig(k1=8, k2=3, eps=0.6, min_samples=2, b_l=3, b_h=6)
    _, jac = k_reciprocal_reference(dist, cfg.k1, cfg.k2, 0.0, return_jaccard=True)
    raw = DBSCAN(eps=cfg.eps, min_samples=cfg.min_samples, metric="precomputed").fit_predict(jac)
    want, want_stats = refine_clusters(raw, cfg.b_l, cfg.b_h)
    got, stats = cluster_pseudo_labels(x, cfg)
    np.testing.assert_array_equal(got, want)
    assert stats["clusters"] == want_stats["clusters"] > 3 and stats["dropped"] > 0
    truth = np.repeat(np.arange(len(sizes)), sizes)
    assert cluster_purity(got, truth)["purity"] > 0.9  # the crafted set is separable: a working clustering


# ------------------------------------------------------------------------------------------- L_dm
@pytest.mark.parametrize("kind, minimum", [("kl", 0.0), ("db", 1.0 - np.log(2.0))])
def test_dm_loss_is_minimal_at_the_uniform_output_and_its_gradient_points_there(kind, minimum):
    uniform = torch.zeros(5, 2)
    assert float(domainmix_loss(uniform, kind)) == pytest.approx(minimum, abs=1e-6)
    for logits in (torch.tensor([[2.0, 0.0]]), torch.tensor([[-1.0, 3.0]]), torch.randn(8, 2) * 3):
        assert float(domainmix_loss(logits, kind)) > minimum + 1e-4
    three = torch.zeros(4, 3)  # n = 3 domains: h = 1/3; DB minimum -log 3 + 3/2
    assert float(domainmix_loss(three, kind)) == pytest.approx(0.0 if kind == "kl" else 1.5 - np.log(3), abs=1e-6)
    z = torch.tensor([[2.0, -0.5]], requires_grad=True)  # the discriminator is sure of domain 0
    domainmix_loss(z, kind).backward()
    assert z.grad[0, 0] > 0 > z.grad[0, 1]  # descent lowers the confident logit, raises the other
    p_before = torch.softmax(z.detach(), 1)[0, 0]
    p_after = torch.softmax(z.detach() - 0.1 * z.grad, 1)[0, 0]
    assert 0.5 < p_after < p_before  # one step moves p towards 1/2
    with pytest.raises(ValueError, match="unknown DomainMix loss"):
        domainmix_loss(z, "mmd")


# ------------------------------------------------------------------------------------------- alternation
def _method_on_a_tiny_net(alternate: str = "iteration"):
    from nasreid.genotype import preset_genotype

    torch.manual_seed(0)
    net = preset_genotype("osnet_ain", "osnet", width_mult=0.125, feature_dim=32, head="bnneck").build(num_classes=6)
    m = DomainMixMethod(alternate=alternate, lambda_m=1.0)
    m.model, m.heads, m.num_a = net, [net.head], 6
    m.optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    m.disc = DomainDiscriminator(32, (16,), 2)
    m.disc_opt = torch.optim.SGD(m.disc.parameters(), lr=0.5)
    m.triplet = TripletLoss(0.3)
    m.ctx = SimpleNamespace(recipe=SimpleNamespace(loss=SimpleNamespace(name="reid", kwargs={"label_smooth": 0.1}),
                                                   optim=SimpleNamespace(grad_clip=None)))
    m.trainer = SimpleNamespace(ctx=device_context("cpu"), step=0)
    m.stage, m.n3, m.disc_epoch = "stage3", 1, False
    g = torch.Generator().manual_seed(1)
    batch = {"img": torch.randn(8, 3, 64, 32, generator=g), "pid": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
             "dsetid": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])}
    return m, net, batch


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_backbone_and_discriminator_alternate_with_the_other_frozen():
    m, net, batch = _method_on_a_tiny_net()
    net.train()
    d0, n0 = _snapshot(m.disc), _snapshot(net)
    out, parts = m.backbone_update(batch)  # Eq. 11, discriminator frozen
    assert {"l_dm", "disc_acc", "ce", "triplet"} <= set(parts)
    assert all(p.grad is None for p in m.disc.parameters())
    assert not _changed(d0, m.disc)  # neither weights nor BN statistics of the discriminator moved
    assert any(k.startswith("conv") for k in _changed(n0, net))
    assert all(p.requires_grad for p in m.disc.parameters())  # unfrozen again for its own step
    # discriminator step (Eq. 5) on features taken with the backbone fixed
    net.zero_grad(set_to_none=True)
    n1, d1 = _snapshot(net), _snapshot(m.disc)
    d = m.discriminator_update(m.embedding(out).detach(), batch["dsetid"])
    assert set(d) == {"disc_loss", "disc_acc"}
    assert all(p.grad is None for p in net.parameters())
    assert not _changed(n1, net)
    assert {k for k in _changed(d1, m.disc) if k.endswith("weight")}
    assert all(p.grad is not None for p in m.disc.parameters())


def test_discriminator_epoch_keeps_the_backbone_and_its_statistics_fixed():
    m, net, batch = _method_on_a_tiny_net("epoch")
    m.disc_epoch = True
    net.train()
    n0, d0 = _snapshot(net), _snapshot(m.disc)
    parts = m.step(m.trainer, batch)
    assert parts["loss"] == parts["disc_loss"] and "ce" not in parts
    assert not _changed(n0, net) and all(p.grad is None for p in net.parameters())
    assert _changed(d0, m.disc)
    assert net.training  # the trainer's mode is restored


def test_stages_follow_the_epoch_counts():
    assert [stage_of(e, 2, 3, True) for e in range(7)] == [
        ("source", 0), ("source", 0), ("stage2", 0), ("stage2", 0), ("stage2", 0), ("stage3", 1), ("stage3", 2)]
    assert {stage_of(e, 2, 3, False) for e in range(7)} == {("source", 0)}


# ------------------------------------------------------------------------------------------- recipe errors
def test_bad_kwargs_name_the_key():
    with pytest.raises(RecipeError, match=r"training.kwargs.cluster.eps"):
        DomainMixMethod(cluster={"eps": 1.5})
    with pytest.raises(RecipeError, match=r"training.kwargs.cluster.minsamples"):
        DomainMixMethod(cluster={"minsamples": 4})
    with pytest.raises(RecipeError, match=r"b_l=9 exceeds b_h=4"):
        DomainMixMethod(cluster={"b_l": 9, "b_h": 4})
    with pytest.raises(RecipeError, match=r"training.kwargs.dm_loss"):
        DomainMixMethod(dm_loss="mmd")
    with pytest.raises(RecipeError, match=r"training.kwargs.b_labels"):
        DomainMixMethod(b_labels=True)
    with pytest.raises(RecipeError, match=r"training.kwargs.unlabelled.name"):
        DomainMixMethod(unlabelled={"root": "x"})


# ------------------------------------------------------------------------------------------- end to end
@register_dataset("cuhk01_permuted_ids")
def _cuhk01_permuted(root=None, **kwargs):
    """CUHK01 whose train labels are shuffled over the images (same images, another partition into identities):
    for the never-reads-B-labels test."""
    ds = build_dataset("cuhk01", root, **kwargs)
    pids = np.random.default_rng(5).permutation([r.pid for r in ds.train])
    ds.train = [dataclasses.replace(r, pid=int(p)) for r, p in zip(ds.train, pids)]
    return ds


def _recipe(tmp, shared_data, b_name="cuhk01", epochs=6, **kw):
    import yaml

    d = {
        "name": "tiny_domainmix", "seed": 0, "device": "cpu", "output_root": str(tmp / "results"),
        # the standard memory format: this tiny untrained net's DBSCAN finds clusters on that trajectory; in
        # channels_last (the CPU default for plain OSNet) the float rounding differs and stage 2 found none
        "channels_last": False,
        "data": {"dataset": {"name": "synthetic", "kwargs": {"num_ids": 40, "num_train_ids": 24, "num_cams": 3,
                                                             "images_per_id_per_cam": 2, "seed": 0,
                                                             "camera_style": 1.0}},
                 "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "workers": 0},
        "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.125, "feature_dim": 64, "head": "bnneck"}},
        "model": {"preset": "osnet"},
        "training": {"method": "domainmix", "kwargs": {
            "unlabelled": {"name": b_name, "root": str(shared_data / "cuhk01"),
                           "kwargs": {"split_seed": 0, "max_ids": 30}},
            "source_epochs": 1, "stage2_epochs": 1, "alternate": "epoch", "steps_per_epoch": 3,
            "cluster": {"k1": 8, "k2": 3, "eps": 0.7, "min_samples": 2, "b_l": 2, "b_h": 12}, **kw}},
        "optim": {"name": "adam", "lr": 1e-3, "epochs": epochs, "scheduler": "constant", "warmup_epochs": 0},
        "loss": {"triplet_margin": 0.3},
        "eval": {"batch_size": 64, "targets": [{"name": "cuhk01", "root": str(shared_data / "cuhk01"),
                                                "kwargs": {"split_seed": 0, "max_ids": 30}}]},
    }
    path = tmp / f"{b_name}_{epochs}.yaml"
    path.write_text(yaml.safe_dump(d))
    return load_recipe(path)


@pytest.fixture(scope="module")
def dm_run(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("domainmix")
    run = pipeline.run_train(_recipe(tmp, shared_data), run_dir=tmp / "run", progress=False)
    return tmp, run


def test_domainmix_run_logs_stage1_and_the_discriminator_and_loads(dm_run):
    tmp, run = dm_run
    m = json.loads((run / "metrics.json").read_text())
    h = m["history"]
    assert [r["stage"] for r in h] == [0, 2, 3, 3, 3, 3]
    assert [r["disc_epoch"] for r in h] == [0, 0, 0, 1, 0, 1]
    assert "clusters" not in h[0] and all(r["clusters"] >= 1 for r in h[1:])
    assert all("l_dm" in r for r in h if r["stage"] == 3 and not r["disc_epoch"])
    assert all("disc_loss" in r and "ce" not in r for r in h if r["disc_epoch"])
    assert {"purity", "ari", "b_kept", "b_dropped", "b_noise", "largest_cluster"} <= set(h[1])
    assert (run / "pseudo_labels.png").stat().st_size > 1000
    csv = (run / "pseudo_labels.csv").read_text().splitlines()
    # clustered before epochs 2, 3 and 5, not before the discriminator epochs 4 and 6 (the backbone is fixed there)
    assert csv[0].startswith("epoch,clusters") and [r.split(",")[0] for r in csv[1:]] == ["2", "3", "5"]
    st = load_checkpoint(run / "checkpoints" / "last.pt")
    labels = st["hooks"]["domainmix"]["labels"]
    n_clusters = max(labels) + 1
    assert st["model"]["head.classifier.weight"].shape[0] == 24 + n_clusters
    assert "discriminator" in st["optimizers"] and "discriminator" in st["modules"]
    model, _, _ = pipeline.load_run_model(run)  # model.pt records the resized classifier
    assert model.head.classifier.weight.shape[0] == 24 + n_clusters
    ev = m["evaluation"]
    assert {"synthetic (same-domain)", "cuhk01[max_ids=30,split_seed=0] (cross-domain)"} <= set(ev)


def test_the_trainer_never_reads_the_labels_of_b(dm_run, shared_data):
    tmp, run = dm_run
    other = pipeline.run_train(_recipe(tmp, shared_data, b_name="cuhk01_permuted_ids"), run_dir=tmp / "perm",
                               progress=False)
    a = load_checkpoint(run / "checkpoints" / "last.pt")
    b = load_checkpoint(other / "checkpoints" / "last.pt")
    assert a["hooks"]["domainmix"]["labels"] == b["hooks"]["domainmix"]["labels"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["modules"]["discriminator"].items():
        assert torch.equal(v, b["modules"]["discriminator"][k]), k
    ha = json.loads((run / "metrics.json").read_text())["history"]
    hb = json.loads((other / "metrics.json").read_text())["history"]
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    # B does hold other labels there: the report's purity (and only it) sees them
    assert [r["purity"] for r in ha[1:]] != [r["purity"] for r in hb[1:]]
    # and the probe is sensitive: a run that *does* train on B's labels (upper-bound arm) differs
    t1 = pipeline.run_train(_recipe(tmp, shared_data, epochs=3, b_labels=True), run_dir=tmp / "true1", progress=False)
    t2 = pipeline.run_train(_recipe(tmp, shared_data, b_name="cuhk01_permuted_ids", epochs=3, b_labels=True),
                            run_dir=tmp / "true2", progress=False)
    w1 = load_checkpoint(t1 / "checkpoints" / "last.pt")["model"]
    w2 = load_checkpoint(t2 / "checkpoints" / "last.pt")["model"]
    assert any(not torch.equal(v, w2[k]) for k, v in w1.items() if not k.startswith("head."))  # the backbone


def test_resume_mid_stage3_continues_the_alternation(dm_run, shared_data):
    tmp, run = dm_run
    cut = tmp / "cut"
    pipeline.run_train(_recipe(tmp, shared_data, epochs=4), run_dir=cut, progress=False)  # stops after a disc epoch
    (cut / "model.pt").unlink()
    (cut / "metrics.json").unlink()
    pipeline.run_train(_recipe(tmp, shared_data, epochs=6), run_dir=cut, resume=True, progress=False)
    ha = json.loads((run / "metrics.json").read_text())["history"]
    hb = json.loads((cut / "metrics.json").read_text())["history"]
    assert [r["disc_epoch"] for r in hb] == [0, 0, 0, 1, 0, 1]
    for ra, rb in zip(ha, hb):
        for k in ("loss", "clusters", "purity"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["epoch"], k)
    a = load_checkpoint(run / "checkpoints" / "last.pt")
    b = load_checkpoint(cut / "checkpoints" / "last.pt")
    assert a["hooks"]["domainmix"]["labels"] == b["hooks"]["domainmix"]["labels"]
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- RandPerson layout
def _randperson_tree(tmp, names):
    from PIL import Image

    d = tmp / "randperson_subset" / "randperson_subset"
    d.mkdir(parents=True)
    for i, n in enumerate(names):
        Image.new("RGB", (32, 64), (i * 20 % 255, 80, 120)).save(d / n)
    return tmp


def test_randperson_parser_reads_pid_camera_and_frame(tmp_path):
    from nasreid.data.datasets import DatasetLayoutError, parse_randperson_name

    assert parse_randperson_name("00000123_s04_c00_f002345.jpg") == (123, 8, 2345)
    assert parse_randperson_name("7_s10_c03_f5.jpg") == (7, 18, 5)  # scene 10's 4th camera: the 19th camera
    with pytest.raises(ValueError, match="no camera c01 in scene s04"):
        parse_randperson_name("00000001_s04_c01_f000001.jpg")
    with pytest.raises(ValueError, match="not a RandPerson image name"):
        parse_randperson_name("0001_c1s1_000001_00.jpg")
    names = ["00000005_s00_c00_f000010.jpg", "00000005_s00_c01_f000011.jpg", "00000009_s02_c01_f000400.jpg",
             "00000002_s10_c03_f000001.jpg"]
    root = _randperson_tree(tmp_path / "rp", names)
    ds = build_dataset("randperson", root)
    assert not ds.query and not ds.gallery and ds.num_train_pids == 3
    got = sorted((Path(r.path).name, r.pid, r.camid, r.frame) for r in ds.train)
    assert got == [("00000002_s10_c03_f000001.jpg", 0, 18, 1), ("00000005_s00_c00_f000010.jpg", 1, 0, 10),
                   ("00000005_s00_c01_f000011.jpg", 1, 1, 11), ("00000009_s02_c01_f000400.jpg", 2, 5, 400)]
    assert build_dataset("randperson", root, max_ids=2).num_train_pids == 2
    bad = _randperson_tree(tmp_path / "bad", names + ["thumbnail.jpg"])
    with pytest.raises(DatasetLayoutError, match="thumbnail.jpg"):
        build_dataset("randperson", bad)
    with pytest.warns(UserWarning, match="thumbnail.jpg"):
        assert len(build_dataset("randperson", bad, strict=False).train) == 4


def test_domainmix_trains_an_msinet_genotype_and_the_run_loads(tmp_path, shared_data):
    """Any network with a ReIDHead: the paper's MSINet genotype, 3 epochs (A alone, stage 2, stage 3)."""
    from nasreid.genotype import preset_genotype

    r = _recipe(tmp_path, shared_data, epochs=3, stage2_epochs=1)
    r = r.model_copy(update={"space": r.space.model_copy(update={"name": "msinet", "kwargs": {}}),
                             "model": r.model.model_copy(update={"preset": "msinet_paper"})})
    run = pipeline.run_train(r, genotype=preset_genotype("msinet", "msinet_paper"), run_dir=tmp_path / "msinet",
                             progress=False)
    h = json.loads((run / "metrics.json").read_text())["history"]
    assert [x["stage"] for x in h] == [0, 2, 3] and "l_dm" in h[2]
    labels = load_checkpoint(run / "checkpoints" / "last.pt")["hooks"]["domainmix"]["labels"]
    model, _, _ = pipeline.load_run_model(run)
    assert model.head.classifier.weight.shape[0] == 24 + max(labels) + 1
