"""DARTS with MSINet's Twins Contrastive Mechanism on real CUHK01 images: class-centroid memories and the
Eq. 3 update, the category overlap ratio of the identity split, which step sends gradients where (and the
authors' leak behind ``reference_mode``), and exact resume of an interrupted search."""
import json

import pytest
import torch
from torch.nn import functional as F

from conftest import missing
from nasreid.config import load_recipe
from nasreid.data import build_dataset
from nasreid.engine import pipeline
from nasreid.engine.checkpoint import load_checkpoint
from nasreid.engine.context import SearchContext
from nasreid.engine.trainer import device_context
from nasreid.genotype import preset_genotype
from nasreid.losses.memory import ClassMemory
from nasreid.strategies.base import StrategyConfigError
from nasreid.strategies.darts_tcm import DartsMixedOp, DartsTCMStrategy, mix_outputs

TINY = {
    "name": "tiny_msinet",
    "seed": 0,
    "device": "cpu",
    "data": {
        "dataset": {"name": "cuhk01", "root": None, "kwargs": {"split_seed": 0, "max_ids": 40}},
        "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "workers": 0,
        "augment": {"flip": True},
    },
    "space": {"name": "msinet", "kwargs": {"width_mult": 0.125}},
    "strategy": {"name": "darts_tcm", "kwargs": {"arch_lr": 0.05}},
    "optim": {"lr": 0.05, "epochs": 2, "scheduler": "cosine"},
    "eval": {"flip": False, "batch_size": 64},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def recipe_file(write_recipe):
    return lambda **over: write_recipe(TINY, **over)


@pytest.fixture
def ctx(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file())
    ds = build_dataset("cuhk01", recipe.data.dataset.root, split_seed=0, max_ids=40)
    return SearchContext(recipe=recipe, run_dir=tmp_path / "run", device=device_context("cpu"), dataset=ds)


def _strategy(ctx, **kw) -> tuple[DartsTCMStrategy, list, list]:
    """Strategy attached to the recipe's msinet space, memories built and initialised, optimisers set."""
    torch.manual_seed(0)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    s = DartsTCMStrategy(ctx.build_space(), **kw)
    tr, val = ctx.split_identities(s.overlap, s.cfg.val_fraction, order=s.cfg.split_order)
    model = s.attach()
    s.build_memories(len({r.pid for r in tr}), len({r.pid for r in val}), model.feature_dim, "cpu")
    s.init_memories(ctx, model, tr, val)
    s.w_opt = torch.optim.SGD(s.weight_parameters(), lr=0.05, momentum=0.9)
    s.a_opt = torch.optim.Adam(s.arch_parameters(), lr=0.01)
    return s, tr, val


def _batch(ctx, records, n=16):
    loader = ctx.loader(records, batch_size=n, num_instances=4)
    return ctx.device.batch(next(iter(loader)))


# ---- memories ------------------------------------------------------------------------------------
def test_memories_start_at_class_centroids_of_real_features(ctx):
    s, tr, val = _strategy(ctx)
    for side, recs in (("tr", tr), ("val", val)):
        feats, pids = s.extract(ctx, s.model, recs)
        assert feats.shape == (len(recs), s.model.feature_dim)
        mem = s.memories[side]
        assert bool(mem.initialised) and mem.num_classes == len({r.pid for r in recs})
        for c in range(mem.num_classes):  # c^n = normalise(mean_i normalise(f_i)), Sec. 3.1
            expect = F.normalize(F.normalize(feats[pids == c], dim=1).mean(0), dim=0)
            assert torch.allclose(mem.features[c], expect, atol=1e-5), (side, c)
    # centroids of different identities differ (real images, not a constant vector)
    f = s.memories["tr"].features
    assert (f @ f.t()).fill_diagonal_(0).max() < 0.9999


def test_extract_leaves_batchnorm_statistics_alone(ctx):
    s, tr, _ = _strategy(ctx)
    before = {k: v.clone() for k, v in s.model.state_dict().items() if "running_" in k}
    s.extract(ctx, s.model, tr[:8])
    for k, v in s.model.state_dict().items():
        if "running_" in k:
            assert torch.equal(v, before[k]), k


def test_memory_update_is_eq3_then_renormalised():
    torch.manual_seed(1)
    mem = ClassMemory(5, 8, momentum=0.2)
    mem.init_centroids(torch.randn(10, 8), torch.tensor([0, 1, 2, 3, 4] * 2))
    old = mem.features.clone()
    f = torch.randn(3, 8)
    mem.update(f, torch.tensor([2, 4, 2]))
    fn = F.normalize(f, dim=1)
    c2 = F.normalize(0.2 * old[2] + 0.8 * fn[0], dim=0)
    c2 = F.normalize(0.2 * c2 + 0.8 * fn[2], dim=0)  # the second sample of class 2 updates again
    assert torch.allclose(mem.features[2], c2, atol=1e-6)
    assert torch.allclose(mem.features[4], F.normalize(0.2 * old[4] + 0.8 * fn[1], dim=0), atol=1e-6)
    assert torch.equal(mem.features[[0, 1, 3]], old[[0, 1, 3]])
    # Eq. 2: cross entropy of normalise(f) . c / tau
    loss = mem(f, torch.tensor([0, 1, 2]))
    ref = F.cross_entropy(fn @ mem.features.t() / 0.05, torch.tensor([0, 1, 2]))
    assert torch.allclose(loss, ref)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        mem(f, torch.tensor([0, 1, 5]))


# ---- identity split ------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [0.0, 0.4, 1.0])
def test_overlap_ratio_gives_the_requested_share_of_shared_identities(recipe_file, tmp_path, overlap):
    recipe = load_recipe(recipe_file())
    ds = build_dataset("cuhk01", recipe.data.dataset.root, split_seed=0)  # all 485 training ids
    c = SearchContext(recipe=recipe, run_dir=tmp_path / f"o{overlap}", device=device_context("cpu"), dataset=ds)
    c.run_dir.mkdir()
    tr, val = c.split_identities(overlap, 2 / 3, order="sorted")
    saved = json.loads((c.run_dir / "split.json").read_text())
    n = ds.num_train_pids
    by_path = {r.path: r.pid for r in ds.train}
    ids_tr, ids_val = {by_path[r.path] for r in tr}, {by_path[r.path] for r in val}
    shared = ids_tr & ids_val
    assert len(shared) == round(overlap * n) and shared == set(saved["shared"])
    assert ids_tr | ids_val == set(range(n))
    assert not {r.path for r in tr} & {r.path for r in val}  # every image on one side only
    if overlap == 0.4:  # the authors' layout: ids in order, first 20 % train-only, next 40 % shared
        assert saved["train_only"] == list(range(97)) and saved["shared"] == list(range(97, 291))
        assert saved["val_only"] == list(range(291, 485))
    if overlap == 1.0:  # classic DARTS: the same classes, images halved between the sides
        assert ids_tr == ids_val and abs(len(tr) - len(val)) <= n


def test_overlap_schemes_refuse_a_partial_overlap(ctx):
    with pytest.raises(StrategyConfigError, match="overlap must be 1"):
        DartsTCMStrategy(ctx.build_space(), scheme="tcm_overlap", overlap=0.4)
    assert DartsTCMStrategy(ctx.build_space(), scheme="ce_overlap").overlap == 1.0
    assert DartsTCMStrategy(ctx.build_space()).overlap == 0.4


# ---- where gradients go --------------------------------------------------------------------------
def _grads(params):
    return [p.grad for p in params]


def test_alpha_learns_only_from_validation_and_omega_only_from_training(ctx):
    s, tr, val = _strategy(ctx)
    A, W = s.arch_parameters(), s.weight_parameters()
    assert len(A) == 12 and all(isinstance(op, DartsMixedOp) for op in s.ops.values())
    alpha0 = [a.detach().clone() for a in A]
    s.weight_step(_batch(ctx, tr))
    assert all(g is None for g in _grads(A))  # no training gradient on alpha
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in _grads(W)) > len(W) // 2
    assert all(torch.equal(a, a0) for a, a0 in zip(A, alpha0))
    s.w_opt.zero_grad(set_to_none=True)
    w0 = [w.detach().clone() for w in W]
    s.arch_step(_batch(ctx, val))
    assert all(g is None for g in _grads(W))  # no validation gradient on omega
    assert all(g is not None and bool(g.abs().sum() > 0) for g in _grads(A))
    assert all(torch.equal(w, v) for w, v in zip(W, w0))
    assert any(not torch.equal(a, a0) for a, a0 in zip(A, alpha0))


def test_reference_mode_leaks_validation_gradients_into_omega(ctx):
    s, _tr, val = _strategy(ctx, reference_mode=True)
    W = s.weight_parameters()
    s.arch_step(_batch(ctx, val))
    leaked = [g for g in _grads(W) if g is not None and bool(g.abs().sum() > 0)]
    assert len(leaked) > len(W) // 2  # the authors' alpha step also fills omega's gradients


def test_unrolled_alpha_gradient_is_first_order_plus_the_hessian_term(ctx):
    """Eq. 7 at xi = 0 is the first-order gradient; with xi > 0 it differs, omega is left unchanged."""
    s1, tr, val = _strategy(ctx, unrolled=True)
    b, vb = _batch(ctx, tr), _batch(ctx, val)
    W = s1.weight_parameters()
    w0 = [w.detach().clone() for w in W]
    s1.model.eval()  # BN from running statistics: the extra forwards of Eq. 8 then compare like with like
    for g in s1.w_opt.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    s1._unrolled_grads(b, vb)
    g_xi0 = [a.grad.clone() for a in s1.arch_parameters()]
    assert all(torch.equal(w, v) for w, v in zip(W, w0))
    for a in s1.arch_parameters():
        a.grad = None
    out = s1.model(vb["img"])
    loss = s1.memories["val"](out["feat"] if isinstance(out, dict) else out, vb["pid"])
    first = torch.autograd.grad(loss, s1.arch_parameters())
    for x, y in zip(g_xi0, first):
        assert torch.allclose(x, y, atol=1e-6)
    for g in s1.w_opt.param_groups:
        g["lr"] = 0.5
    s1._unrolled_grads(b, vb)
    assert any(not torch.allclose(a.grad, y, atol=1e-6) for a, y in zip(s1.arch_parameters(), first))
    assert all(torch.equal(w, v) for w, v in zip(W, w0))


def test_mixed_op_mixes_tuples_elementwise():
    w = torch.tensor([0.25, 0.75])
    a = (torch.ones(2), torch.zeros(2))
    b = (torch.zeros(2), torch.ones(2))
    x1, x2 = mix_outputs(w, [a, b])
    assert torch.equal(x1, torch.full((2,), 0.25)) and torch.equal(x2, torch.full((2,), 0.75))
    with pytest.raises(TypeError):
        mix_outputs(w, [a, (torch.ones(2),)])


# ---- the whole search ----------------------------------------------------------------------------
def test_interrupted_search_resumes_to_the_same_alpha_and_memories(recipe_file, tmp_path, monkeypatch):
    recipe = load_recipe(recipe_file())
    ref = pipeline.run_search(recipe, run_dir=tmp_path / "ref", progress=False)
    ref_state = load_checkpoint(ref / "checkpoints" / "last.pt")
    orig = DartsTCMStrategy.step
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == ref_state["history"][0]["steps"] + 2:  # die inside the second epoch
            raise KeyboardInterrupt("simulated interruption")
        return orig(self, *a, **k)

    monkeypatch.setattr(DartsTCMStrategy, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_search(recipe, run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(DartsTCMStrategy, "step", orig)
    cut = pipeline.run_search(recipe, run_dir=tmp_path / "cut", progress=False, resume=True)
    cut_state = load_checkpoint(cut / "checkpoints" / "last.pt")
    alphas = [k for k in ref_state["model"] if k.endswith(".alpha")]
    assert len(alphas) == 12
    for k in ref_state["model"]:
        assert torch.equal(ref_state["model"][k], cut_state["model"][k]), k
    mem_ref, mem_cut = ref_state["hooks"]["strategy"]["memories"], cut_state["hooks"]["strategy"]["memories"]
    assert set(mem_ref) >= {"tr.features", "val.features"}
    for k in mem_ref:
        assert torch.equal(mem_ref[k], mem_cut[k]), k
    g_ref = json.loads((ref / "genotype.json").read_text())
    assert g_ref == json.loads((cut / "genotype.json").read_text()) or \
        g_ref["choices"] == json.loads((cut / "genotype.json").read_text())["choices"]
    assert g_ref["provenance"]["scheme"] == "tcm" and g_ref["provenance"]["overlap"] == 0.4
    # alpha moved and the architecture log has every epoch once
    assert max(max(p.values()) for p in g_ref["probabilities"].values()) > 0.26
    rows = (cut / "alphas.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 12 * 4


def test_train_preset_with_sam_evaluates_cuhk01_and_cuhk03_without_sam_parameters(tmp_path, shared_data):
    """``nasreid train recipes/msinet_cpu_retrain.yaml --genotype preset:...`` (shrunk): the SAM loss trains, the
    saved network holds no SAM/PAM tensor, and CMC/mAP come back for CUHK01 and cross-domain CUHK03."""
    from pathlib import Path

    from nasreid import cli

    if not (shared_data / "cuhk03").is_dir():
        missing(f"cuhk03 not present in {shared_data}")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "msinet_cpu_retrain.yaml"
    sets = {"data.dataset.root": str(shared_data / "cuhk01"), "data.dataset.kwargs.max_ids": 24,
            "data.height": 64, "data.width": 32, "data.batch_size": 16, "data.workers": 0,
            "space.kwargs.width_mult": 0.125, "loss.kwargs.sam_weight": 2.0, "loss.kwargs.sam_channels": 64,
            "optim.epochs": 1, "optim.warmup_epochs": 0, "eval.targets": json.dumps(
                [{"name": "cuhk03np", "root": str(shared_data / "cuhk03")}])}
    args = ["train", str(recipe), "--genotype", "preset:msinet_gate", "--out", str(tmp_path / "t")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert cli.main(args) == 0
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert m["history"][0]["sam"] > 0 and set(m["genotype"].values()) == {"gate"}
    ev = m["evaluation"]
    assert any(k.startswith("cuhk01") for k in ev) and any(k.startswith("cuhk03") for k in ev)
    for r in ev.values():
        assert r["num_query"] > 0 and 0 <= r["mAP"] <= 100
    state = load_checkpoint(tmp_path / "t" / "model.pt")["model"]
    ck = load_checkpoint(tmp_path / "t" / "checkpoints" / "last.pt")
    pam = [k for k in ck["hooks"]["loss"] if ".pam." in k]  # PAM is checkpointed with the loss, for --resume
    assert pam and set(ck["model"]) == set(state)
    assert not [k for k in state if k.split(".")[0] in ("sam", "pam") or ".pam." in k]
    net = preset_genotype("msinet", "msinet_gate", width_mult=0.125, local_branch=True).build(num_classes=12)
    assert set(net.state_dict()) == set(state)  # exactly the network's tensors, nothing of SAM


def test_a_darts_tcm_recipe_refuses_the_keys_its_loop_does_not_honour(recipe_file, tmp_path):
    """Its losses come from ``scheme`` (Eq. 2-3), not the recipe's ``loss`` section, and its one weight group's lr
    drives the unrolled step: a non-default ``loss`` or an ``optim.lr_mult`` stops the search with one line
    naming the file, the key and the strategy; the defaults a run folder's recipe.yaml writes back do not."""
    from nasreid.config import RecipeError
    from nasreid.engine.validate import check_recipe

    for over, key in (({"loss.kwargs.triplet_weight": 1.0}, "loss.kwargs.triplet_weight"),
                      ({"loss.name": "rmgl"}, "loss.name"),
                      ({"optim.lr_mult": {"head.*": 10.0}}, "optim.lr_mult")):
        path = recipe_file(**over)
        with pytest.raises(RecipeError) as e:
            check_recipe(load_recipe(path), search=True)
        msg = str(e.value)
        assert msg.startswith(f"{path}: {key}: strategy 'darts_tcm' does not honour this key") and "\n" not in msg
        check_recipe(load_recipe(path))  # a train recipe's training method honours it
    # the reid loss at its defaults, written out as a run folder does, and read back
    recipe = load_recipe(recipe_file(**{"loss.kwargs": {"label_smooth": 0.1, "triplet_metric": "euclidean"}}))
    check_recipe(recipe, search=True)
    (tmp_path / "recipe.yaml").write_text(recipe.model_copy(update={"source": None}).to_yaml())
    check_recipe(load_recipe(tmp_path / "recipe.yaml"), search=True)
