"""MSINet's spatial alignment module (SAM) and the "msinet" retraining loss (nasreid.losses.sam / .msinet),
and training a loss that has parameters of its own through SupervisedMethod.

Eq. 7 and Eq. 8 are checked against explicit-loop references written here; on real CUHK01 images the SAM
loss is shown to decrease when a batch is optimised on; the optimiser / checkpoint plumbing is run on the
synthetic dataset (a tiny network, 2 epochs, about a second).
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from nasreid.losses import MSINetLoss, SpatialAlignLoss, mutual_correlation
from nasreid.registry import LOSSES


# ---------------------------------------------------------------------------------------------------
# references with explicit loops (readable, slow)
def ref_correlation(x):
    """a[i][j][n] = max over positions m of sample j of <x_i[:, n], x_j[:, m]> (Eq. 7)."""
    B, C, H, W = x.shape
    N = H * W
    xt = x.reshape(B, C, N)
    a = torch.zeros(B, B, N, dtype=x.dtype)
    for i in range(B):
        for j in range(B):
            for n in range(N):
                a[i, j, n] = max(float(xt[i, :, n] @ xt[j, :, m]) for m in range(N))
    return a


def cos(u, v):
    return float(u @ v) / max(float(u.norm()), 1e-8) / max(float(v.norm()), 1e-8)


@torch.no_grad()
def ref_pam(pam, x):
    """a_hat(i)[n] = max_m <W_q x_i[:, n] + b_q, W_k x_i[:, m] + b_k>."""
    B, C, H, W = x.shape
    N = H * W
    wq, bq = pam.query.weight.reshape(-1, C), pam.query.bias
    wk, bk = pam.key.weight.reshape(-1, C), pam.key.bias
    out = torch.zeros(B, N)
    for i in range(B):
        xi = x[i].reshape(C, N)
        for n in range(N):
            q = wq @ xi[:, n] + bq
            out[i, n] = max(float(q @ (wk @ xi[:, m] + bk)) for m in range(N))
    return out


def ref_eq8(x, pids, pam=None, mode="pos_neg", positions="anchor"):
    """Eq. 8 averaged over anchors, with the public code's conventions: the anchor is one of its own
    positives; the negative term averages over all ordered pairs (n1, n2) of negatives, n1 = n2 included."""
    pids = [int(p) for p in pids]
    B = len(pids)
    a = ref_correlation(x)
    if positions == "other":
        a = a.transpose(0, 1)
    a_hat = ref_pam(pam, x) if "pos" in mode else None
    pos_terms, neg_terms = [], []
    for i in range(B):
        positives = [p for p in range(B) if pids[p] == pids[i]]  # i itself included
        negatives = [n for n in range(B) if pids[n] != pids[i]]
        if "pos" in mode:
            pos_terms.append(sum(1 - cos(a_hat[i], a[i, p]) for p in positives) / len(positives))
        if "neg" in mode and negatives:
            pairs = [(n1, n2) for n1 in negatives for n2 in negatives]
            neg_terms.append(sum(1 - cos(a[i, n1], a[i, n2]) for n1, n2 in pairs) / len(pairs))
    total = 0.0
    if pos_terms:
        total += sum(pos_terms) / len(pos_terms)
    if neg_terms:
        total += sum(neg_terms) / len(neg_terms)
    return total


# ---------------------------------------------------------------------------------------------------
def test_mutual_correlation_matches_eq7_by_hand_and_by_loops():
    # two samples, C = 2, H x W = 1 x 2: sample 0 positions (1, 0), (0, 2); sample 1 positions (3, 1), (0, 1)
    x = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]],
                      [[[3.0, 0.0]], [[1.0, 1.0]]]])
    a = mutual_correlation(x)
    assert a.shape == (2, 2, 2)
    # a[0, 1]: position (1, 0) of sample 0 against (3, 1) -> 3, (0, 1) -> 0: max 3;
    #          position (0, 2) of sample 0 against (3, 1) -> 2, (0, 1) -> 2: max 2
    assert a[0, 1].tolist() == [3.0, 2.0]
    # a[1, 0]: (3, 1) against (1, 0) -> 3, (0, 2) -> 2: max 3; (0, 1) against (1, 0) -> 0, (0, 2) -> 2: max 2
    assert a[1, 0].tolist() == [3.0, 2.0]
    assert a[0, 0].tolist() == [1.0, 4.0] and a[1, 1].tolist() == [10.0, 1.0]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, 2, generator=g)
    torch.testing.assert_close(mutual_correlation(x), ref_correlation(x))


@pytest.mark.parametrize("mode,positions", [("pos_neg", "anchor"), ("pos", "anchor"), ("neg", "anchor"),
                                            ("pos_neg", "other")])
def test_spatial_align_loss_equals_a_loop_reference_of_eq8(mode, positions):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(6, 16, 2, 2))
    pids = torch.tensor([0, 0, 0, 1, 1, 2])  # not PK-balanced: 3 / 2 / 1 images
    loss_fn = SpatialAlignLoss(16, mode=mode, positions=positions)
    got = loss_fn(x, pids)
    want = ref_eq8(x, pids, loss_fn.pam, mode, positions)
    assert got.shape == () and math.isclose(float(got.detach()), want, rel_tol=1e-5, abs_tol=1e-6)
    assert (loss_fn.pam is None) == (mode == "neg")


def test_sam_gradients_reach_pam_and_the_feature_map():
    """The positive target a_hat(i) is not detached (public code): PAM learns from this loss alone."""
    torch.manual_seed(1)
    x = torch.relu(torch.randn(8, 16, 4, 2)).requires_grad_(True)
    pids = torch.arange(4).repeat_interleave(2)
    loss_fn = SpatialAlignLoss(16)
    loss_fn(x, pids).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in loss_fn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # one identity only: no negative pair, the negative term is 0 and backward still works
    x1 = torch.relu(torch.randn(4, 16, 2, 2)).requires_grad_(True)
    only_neg = SpatialAlignLoss(mode="neg")
    out = only_neg(x1, torch.zeros(4, dtype=torch.long))
    out.backward()
    assert float(out.detach()) == 0.0
    with pytest.raises(ValueError, match="in_channels"):
        SpatialAlignLoss(None, mode="pos")
    with pytest.raises(ValueError, match="PAM expects"):
        SpatialAlignLoss(8)(x, pids)


def load_cuhk01_batch(cuhk01_dir, ids=(1, 2, 3, 4), height=128, width=64):
    from PIL import Image

    imgs, pids = [], []
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for k, pid in enumerate(ids):
        for idx in (1, 2, 3, 4):  # camera A: 001 / 002, camera B: 003 / 004
            im = Image.open(cuhk01_dir / f"{pid:04d}{idx:03d}.png").convert("RGB").resize((width, height),
                                                                                          Image.BILINEAR)
            arr = (np.asarray(im, dtype=np.float64) / 255.0 - mean) / std
            imgs.append(torch.from_numpy(arr).permute(2, 0, 1).float())
            pids.append(k)
    return torch.stack(imgs), torch.tensor(pids)


def small_convnet(c=32):
    layers, cin = [], 3
    for cout in (16, 24, c, c):  # four stride-2 stages: 128x64 -> 8x4 (N = 32)
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers)


def test_sam_loss_decreases_when_optimised_on_real_cuhk01_images(cuhk01_dir):
    """4 identities x 4 CUHK01 images (two cameras) at 128x64: a few Adam steps on network + PAM lower the
    spatial alignment loss clearly (optimisation sanity on real images, no accuracy claim)."""
    torch.manual_seed(0)
    imgs, pids = load_cuhk01_batch(cuhk01_dir)
    assert imgs.shape == (16, 3, 128, 64)
    net = small_convnet()
    sam = SpatialAlignLoss(32, mode="pos_neg")
    assert net(imgs).shape == (16, 32, 8, 4)
    opt = torch.optim.Adam([*net.parameters(), *sam.parameters()], lr=3e-3)
    pam_before = [p.detach().clone() for p in sam.parameters()]
    history = []
    for _ in range(10):
        opt.zero_grad()
        loss = sam(net(imgs), pids)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    with torch.no_grad():
        final = float(sam(net(imgs), pids))
    assert final < 0.5 * history[0], (history[0], final)
    assert any(not torch.equal(a, b) for a, b in zip(pam_before, sam.parameters()))  # PAM was trained


# ---------------------------------------------------------------------------------------------------
def outputs_for(B=8, C=16, num_classes=4, local=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {"logits": torch.randn(B, num_classes, generator=g), "feat": torch.randn(B, 12, generator=g),
           "featmap": torch.relu(torch.randn(B, C, 4, 2, generator=g))}
    if local:
        out["logits_local"] = torch.randn(B, num_classes, generator=g)
        out["feat_local"] = torch.randn(B, 6, generator=g)
    return out


def test_msinet_loss_registered_parts_and_parameters():
    build = LOSSES.get("msinet")
    pids = torch.arange(4).repeat_interleave(2)
    plain = build(4)
    assert isinstance(plain, MSINetLoss) and list(plain.parameters()) == [] and len(plain.state_dict()) == 0
    out = outputs_for()
    total, parts = plain(out, {"pid": pids})
    assert set(parts) == {"loss", "ce", "triplet", "ce_local", "triplet_local", "sam", "acc"}
    assert all(isinstance(v, float) for v in parts.values()) and parts["sam"] == 0.0
    assert math.isclose(parts["loss"], parts["ce"] + parts["triplet"] + parts["ce_local"] + parts["triplet_local"],
                        rel_tol=1e-6)
    no_local = {k: v for k, v in out.items() if not k.endswith("_local")}
    _, p2 = plain(no_local, pids)
    assert p2["ce_local"] == p2["triplet_local"] == 0.0 and math.isclose(p2["ce"], parts["ce"])

    torch.manual_seed(0)
    with_sam = build(4, sam_weight=2.0, sam_channels=16, local_weight=0.5, triplet_weight=2.0)
    names = [n for n, _ in with_sam.named_parameters()]
    assert names and all(n.startswith("sam.pam.") for n in names)
    total, parts = with_sam(out, {"pid": pids})
    ref = SpatialAlignLoss(16)
    ref.load_state_dict(with_sam.sam.state_dict())
    assert math.isclose(parts["sam"], float(ref(out["featmap"], pids).detach()), rel_tol=1e-6)
    want = (parts["ce"] + 2.0 * parts["triplet"] + 0.5 * (parts["ce_local"] + 2.0 * parts["triplet_local"])
            + 2.0 * parts["sam"])
    assert math.isclose(float(total.detach()), want, rel_tol=1e-5)
    total.backward()
    assert all(p.grad is not None for p in with_sam.parameters())
    assert list(build(4, sam_weight=2.0, sam_mode="neg").parameters()) == []  # no PAM without the pos term

    with pytest.raises(ValueError, match="sam_channels"):
        build(4, sam_weight=2.0)
    with pytest.raises(ValueError, match="sam_mode"):
        build(4, sam_weight=2.0, sam_mode="both")
    with pytest.raises(KeyError, match="featmap"):
        with_sam({k: v for k, v in out.items() if k != "featmap"}, pids)
    with pytest.raises(KeyError, match="'feat'"):
        plain({"logits": out["logits"]}, pids)
    with pytest.raises(KeyError, match="feat_local"):
        plain({k: v for k, v in out.items() if k != "feat_local"}, pids)
    with pytest.raises(ValueError, match=r"\[B, 8, H, W\]"):
        build(4, sam_weight=1.0, sam_channels=8)(out, pids)


# ---------------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """[B, 3, 32, 16] -> featmap [B, 16, 4, 2]; training dict(logits, feat, featmap), eval feat."""

    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        fm = self.body(x)
        f = fm.mean((2, 3))
        if not self.training:
            return f
        return {"logits": self.classifier(f), "feat": f, "featmap": fm}


def make_ctx(run_dir, loss):
    from nasreid.config import Recipe
    from nasreid.data import SyntheticReID
    from nasreid.engine.context import RunContext
    from nasreid.engine.trainer import device_context

    recipe = Recipe.model_validate({
        "name": "sam_tiny", "seed": 0, "device": "cpu",
        "data": {"dataset": {"name": "synthetic"}, "height": 32, "width": 16, "batch_size": 8,
                 "num_instances": 4, "workers": 0, "augment": {"flip": True}},
        "space": {"name": "osnet_ain"}, "optim": {"name": "adam", "lr": 0.01, "epochs": 2},
        "loss": loss})
    ds = SyntheticReID(num_ids=8, images_per_id_per_cam=1, num_cams=4, height=32, width=16, seed=0)
    return RunContext(recipe=recipe, run_dir=run_dir, device=device_context("cpu"), dataset=ds)


def fit(run_dir, loss, epochs=2):
    from nasreid.engine.hooks import CallbackHook
    from nasreid.methods import SupervisedMethod

    seen = {}

    def probe(trainer):
        seen["groups"] = [list(g["params"]) for g in trainer.optimizer.param_groups]
        seen["trainer"] = trainer
        seen["loss"] = next((h.module for h in trainer.hooks if h.key == "loss"), None)
        if seen["loss"] is not None:  # its state when training starts (after a resume: the restored one)
            seen["start"] = {k: v.clone() for k, v in seen["loss"].state_dict().items()}

    ctx = make_ctx(run_dir, loss)
    torch.manual_seed(0)
    net = TinyNet(ctx.dataset.num_train_pids)
    hist = SupervisedMethod().fit(ctx, net, epochs=epochs, hooks=[CallbackHook("probe", before_train=probe)])
    return hist, seen


SAM_LOSS = {"name": "msinet", "kwargs": {"sam_weight": 2.0, "sam_channels": 16}}


def test_supervised_training_optimises_and_checkpoints_the_loss_parameters(tmp_path):
    from nasreid.engine.checkpoint import load_checkpoint

    hist, seen = fit(tmp_path / "ref", SAM_LOSS)
    pam = seen["loss"]
    assert pam is not None and len(hist) == 2 and hist[-1]["sam"] > 0
    model = seen["trainer"].model
    assert not any("pam" in n or n.startswith("sam") for n, _ in model.named_parameters())  # SAM not in the net
    net_ids, loss_ids = {id(p) for p in model.parameters()}, {id(p) for p in pam.parameters()}
    g0, g1 = ({id(p) for p in g} for g in seen["groups"])
    assert len(seen["groups"]) == 2 and g0 == net_ids and g1 == loss_ids and not g0 & g1
    ckpt = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    assert set(ckpt["hooks"]["loss"]) == set(pam.state_dict())
    ref_state = {k: v.clone() for k, v in pam.state_dict().items()}
    assert all(not torch.equal(ref_state[k], v) for k, v in seen["start"].items())  # PAM was trained

    # interrupted after epoch 1, resumed: the PAM (and the network) end as in the uninterrupted run
    _, seen1 = fit(tmp_path / "cut", SAM_LOSS, epochs=1)
    _, seen2 = fit(tmp_path / "cut", SAM_LOSS, epochs=2)
    for k, v in seen2["start"].items():  # restored from the checkpoint, not the new loss's fresh init
        torch.testing.assert_close(v, seen1["loss"].state_dict()[k], rtol=0, atol=0, msg=k)
    for k, v in seen2["loss"].state_dict().items():
        torch.testing.assert_close(v, ref_state[k], rtol=0, atol=0, msg=k)
    for k, v in seen2["trainer"].model.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0, msg=k)


def test_a_loss_without_parameters_trains_as_before(tmp_path):
    from nasreid.engine.checkpoint import load_checkpoint

    hist, seen = fit(tmp_path / "r", {"name": "reid", "triplet_weight": 1.0}, epochs=1)
    assert seen["loss"] is None and len(seen["groups"]) == 1
    assert {id(p) for p in seen["groups"][0]} == {id(p) for p in seen["trainer"].model.parameters()}
    assert "loss" not in load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["hooks"]
    assert math.isfinite(hist[0]["loss"])


def test_msinet_retrain_recipes_check_and_refuse_reid_only_loss_fields():
    """The shipped MSINet recipes pass the recipe check (presets, loss kwargs, CUHK03 target); a top-level
    loss.triplet_weight (a field of the 'reid' loss) is refused for loss 'msinet' instead of being ignored."""
    from pathlib import Path

    from nasreid.config import RecipeError, load_recipe
    from nasreid.engine.validate import check_recipe

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("msinet_cpu_retrain.yaml", "msinet_retrain.yaml"):
        check_recipe(load_recipe(recipes / name))
    for name in ("msinet_cpu.yaml", "msinet.yaml"):
        check_recipe(load_recipe(recipes / name), search=True)
    check_recipe(load_recipe(recipes / "msinet_cpu_retrain.yaml", {"loss.kwargs.sam_weight": 2.0}))
    with pytest.raises(RecipeError, match=r"loss.triplet_weight applies to loss 'reid' only"):
        check_recipe(load_recipe(recipes / "msinet_cpu_retrain.yaml", {"loss.triplet_weight": 1.0}))
