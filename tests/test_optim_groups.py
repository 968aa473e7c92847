"""Exponential warm-up (RMGL, TIP 2020, Sec. IV-A) and per-layer lr multipliers (``optim.lr_mult``)."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from nasreid.config import OptimConfig, RecipeError
from nasreid.engine.trainer import build_optimizer, build_scheduler
from nasreid.methods import param_groups_by_lr_mult


def _factors(cfg: OptimConfig, n: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_exponential_warmup_is_geometric():
    W = 3
    cfg = OptimConfig(lr=1.0, epochs=10, warmup_epochs=W, warmup_factor=1e-3, warmup_mode="exponential",
                      scheduler="constant")
    f = _factors(cfg, W + 2)
    assert f[0] == pytest.approx(1e-3)
    assert f[W] == pytest.approx(1.0) and f[W + 1] == pytest.approx(1.0)
    ratios = [f[e + 1] / f[e] for e in range(W)]
    assert ratios == pytest.approx([1e-3 ** (-1 / W)] * W)  # constant ratio 10 for 1e-5 -> 1e-2 in 3 epochs
    assert ratios[0] == pytest.approx(10.0)


def test_linear_warmup_unchanged_and_cosine_after_exponential():
    lin = _factors(OptimConfig(lr=1.0, epochs=10, warmup_epochs=4, warmup_factor=0.2, scheduler="constant"), 5)
    assert lin == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    cfg = OptimConfig(lr=1.0, epochs=10, warmup_epochs=2, warmup_factor=0.01, warmup_mode="exponential",
                      scheduler="cosine")
    f = _factors(cfg, 10)
    assert f[:3] == pytest.approx([0.01, 0.1, 1.0])
    assert f[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))


def _net() -> nn.Module:
    return nn.Sequential(OrderedDict(
        backbone=nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
        reduction=nn.Linear(4, 2),
        classifier=nn.Linear(2, 5, bias=False),
    ))


def test_groups_and_lrs_through_schedule():
    net = _net()
    mult = {"reduction.*": 10.0, "*classifier*": 5.0, "*": 0.5}  # "*" catches only what is left: the backbone
    groups = param_groups_by_lr_mult(net, 0.01, mult)
    assert [g["name"] for g in groups] == ["base", "reduction.*", "*classifier*", "*"]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1, 0.05, 0.005])
    def ids(ps):
        return {id(p) for p in ps}

    assert ids(groups[1]["params"]) == ids(net.reduction.parameters())
    assert ids(groups[2]["params"]) == ids(net.classifier.parameters())
    assert ids(groups[3]["params"]) == ids(net.backbone.parameters())
    assert groups[0]["params"] == []
    cfg = OptimConfig(lr=0.01, epochs=6, warmup_epochs=2, warmup_factor=0.1, warmup_mode="exponential",
                      scheduler="multistep", milestones=[4], gamma=0.1, lr_mult=mult)
    opt = build_optimizer(groups, cfg)
    sched = build_scheduler(opt, cfg)
    expect_factor = [0.1, 0.1 ** 0.5, 1.0, 1.0, 0.1, 0.1]
    for e in range(6):
        for g, m in zip(opt.param_groups, [1.0, 10.0, 5.0, 0.5]):
            assert g["lr"] == pytest.approx(0.01 * m * expect_factor[e]), (e, g["name"])
        opt.step()
        sched.step()


def test_first_match_wins_and_frozen_params():
    net = _net()
    net.backbone.requires_grad_(False)
    groups = param_groups_by_lr_mult(net, 1.0, {"*classifier*": 10.0, "classifier.weight": 2.0, "backbone.*": 3})
    by_name = {g["name"]: g for g in groups}
    assert len(by_name["*classifier*"]["params"]) == 1
    assert by_name["classifier.weight"]["params"] == []  # shadowed by the earlier pattern
    assert by_name["backbone.*"]["params"] == []  # frozen: matched (no error) but not trained
    assert {id(p) for p in by_name["base"]["params"]} == {id(p) for p in net.reduction.parameters()}


def test_no_lr_mult_is_the_old_single_group():
    net = _net()
    net.backbone[1].requires_grad_(False)
    for lr_mult in (None, {}):
        groups = param_groups_by_lr_mult(net, 0.05, lr_mult)
        assert len(groups) == 1 and set(groups[0]) == {"params"}
        assert groups[0]["params"] == [p for p in net.parameters() if p.requires_grad]


def test_unknown_pattern_error():
    with pytest.raises(RecipeError) as exc:
        param_groups_by_lr_mult(_net(), 0.01, {"*classifier*": 10, "*reduction_layer*": 10})
    msg = str(exc.value)
    assert "optim.lr_mult" in msg and "'*reduction_layer*'" in msg and "backbone.0.weight" in msg


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_bad_multiplier(bad):
    with pytest.raises(RecipeError, match=r"optim\.lr_mult.*classifier"):
        param_groups_by_lr_mult(_net(), 0.01, {"*classifier*": bad})


class _Loss(nn.Module):
    def __init__(self, with_param: bool):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1)) if with_param else None


def _fit_optimizer(lr_mult: dict, with_loss_param: bool) -> torch.optim.Optimizer:
    """Run ``SupervisedMethod.fit`` up to the trainer (stubbed) and return the optimiser it built."""
    from types import SimpleNamespace

    from nasreid.engine.trainer import DeviceContext
    from nasreid.methods import SupervisedMethod

    optim = OptimConfig(lr=0.02, epochs=2, lr_mult=lr_mult)
    captured = {}

    def trainer(model, step_fn, *, optimizer, scheduler, **kw):
        captured["opt"] = optimizer
        return SimpleNamespace(fit=list)

    ctx = SimpleNamespace(
        dataset=SimpleNamespace(train=[]), check_num_classes=lambda recs: 5,
        device=DeviceContext(torch.device("cpu")), build_loss=lambda n: _Loss(with_loss_param),
        build_optimizer=lambda groups: build_optimizer(groups, optim),
        build_scheduler=lambda opt: build_scheduler(opt, optim),
        recipe=SimpleNamespace(optim=optim, training=SimpleNamespace(freeze_backbone_epochs=0, open_layers=[])),
        trainer=trainer, loader=lambda records: None,
    )
    assert SupervisedMethod().fit(ctx, _net(), epochs=2, hooks=[]) == []
    return captured["opt"]


def test_fit_uses_lr_mult_groups_and_keeps_the_loss_group_at_base_lr():
    opt = _fit_optimizer({"*classifier*": 10.0}, with_loss_param=True)
    assert [g.get("name") for g in opt.param_groups] == ["base", "*classifier*", "loss"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.2, 0.02])
    plain = _fit_optimizer({}, with_loss_param=True)
    extra = [set(g) - set(plain.defaults) - {"initial_lr"} for g in plain.param_groups]  # initial_lr: LambdaLR
    assert extra == [{"params"}, {"params"}]  # no "name"/per-group keys: the pre-lr_mult layout
    assert [g["lr"] for g in plain.param_groups] == [0.02, 0.02]
    with pytest.raises(RecipeError, match="nothing_here"):
        _fit_optimizer({"nothing_here": 2.0}, with_loss_param=False)
