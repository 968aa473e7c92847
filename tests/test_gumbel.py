"""Gumbel-softmax one-shot strategy (OSNet-AIN Eq. 7-15): gradients to pi, lambda schedule, modes, S."""
import pytest
import torch
from torch import nn

from nasreid.losses import build_reid_loss
from nasreid.mutables import LayerChoice, freeze
from nasreid.registry import get_space, get_strategy
from nasreid.strategies import StrategyConfigError
from nasreid.strategies.gumbel import GumbelMixedOp, gumbel_softmax_sample, lambda_schedule


def make(mode="hard", **kw):
    torch.manual_seed(0)
    space = get_space("osnet_ain")(num_classes=4, width_mult=0.25)
    strat = get_strategy("gumbel")(space, mode=mode, **kw)
    model = strat.attach()
    return strat, model


def test_lambda_schedule_follows_paper():
    # lambda starts at 10 and decreases by 0.5 every 20 epochs, floor 1 (Sec. 4.2)
    got = [lambda_schedule(e, 10.0, 0.5, 20, 1.0) for e in (0, 19, 20, 39, 40, 119)]
    assert got == [10.0, 10.0, 9.5, 9.5, 9.0, 7.5]
    assert lambda_schedule(10_000, 10.0, 0.5, 20, 1.0) == 1.0
    strat, _ = make(lambda_start=4.0, lambda_step=1.0, lambda_every=2, lambda_min=1.5)
    seen = [strat.on_epoch_start(e, 10)["lambda"] for e in range(8)]
    assert seen == [4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.5, 1.5]
    assert all(op.lam == 1.5 for op in strat.ops.values())


def test_gumbel_softmax_sample_is_a_distribution_and_sharpens_with_lambda():
    pi = torch.tensor([2.0, 0.0, -1.0, 0.5], requires_grad=True)
    g = torch.Generator().manual_seed(0)
    a = gumbel_softmax_sample(pi, 1.0, g)
    assert torch.isclose(a.sum(), torch.tensor(1.0)) and (a >= 0).all()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    hot, cold = gumbel_softmax_sample(pi, 10.0, g1), gumbel_softmax_sample(pi, 0.1, g2)
    assert cold.max() > hot.max()  # same noise, lower temperature -> closer to one-hot
    # frequency of argmax follows softmax(pi) (Eq. 7): Gumbel-max trick
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[gumbel_softmax_sample(pi.detach(), 1.0, gen).argmax()] += 1
    assert torch.allclose(counts / 4000, torch.softmax(pi.detach(), 0), atol=0.03)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_pi_receives_gradients_in_both_modes(mode):
    strat, model = make(mode)
    loss_fn = build_reid_loss(4)
    opt = torch.optim.SGD(strat.param_groups(0.1, 5e-4), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 64, 32), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    before = [op.pi.detach().clone() for op in strat.ops.values()]
    parts = strat.train_step({"img": x, "pid": y}, loss_fn, opt)
    assert parts["lambda"] == 10.0 and parts["loss"] > 0
    for op in strat.ops.values():
        assert op.pi.grad is not None and torch.isfinite(op.pi.grad).all()
        assert op.pi.grad.abs().sum() > 0, op.label
    moved = sum(float((op.pi.detach() - b).abs().sum()) for op, b in zip(strat.ops.values(), before))
    assert moved > 0  # pi updated by the same SGD step as the weights
    assert {g["name"] for g in opt.param_groups} == {"weights", "arch"}


def test_soft_mode_is_alpha_weighted_sum_and_hard_mode_runs_one_path():
    torch.manual_seed(0)
    cands = {"a": nn.Linear(3, 3), "b": nn.Linear(3, 3), "c": nn.Linear(3, 3)}
    lc = LayerChoice(cands, label="x")
    x = torch.randn(5, 3)
    soft = GumbelMixedOp(lc, mode="soft", lam=1.0, generator=torch.Generator().manual_seed(7))
    out = soft(x)
    a = soft.last_alpha
    want = sum(w * m(x) for w, m in zip(a, cands.values()))
    assert torch.allclose(out, want, atol=1e-6)

    calls = []
    hard = GumbelMixedOp(lc, mode="hard", lam=1.0, generator=torch.Generator().manual_seed(7),
                         hard_gradient="selected")
    for k, m in hard.candidates.items():
        m.register_forward_hook(lambda mod, i, o, k=k: calls.append((k, torch.is_grad_enabled())))
    y = hard(x)
    assert len(calls) == 1  # one path per step
    chosen = calls[0][0]
    assert torch.allclose(y, hard.candidates[chosen](x), atol=1e-6)  # straight-through value is 1
    y.sum().backward()
    assert hard.pi.grad is not None and hard.pi.grad.abs().sum() > 0
    hard.eval()
    calls.clear()
    hard(x)
    assert [c[0] for c in calls] == [list(hard.candidates)[int(hard.pi.argmax())]]

    # full straight-through gradient: other candidates run without autograd, value unchanged,
    # their weights get no gradient, but every alpha_k does
    full = GumbelMixedOp(lc, mode="hard", lam=1.0, generator=torch.Generator().manual_seed(7))
    for m in full.candidates.values():
        m.zero_grad()
    calls.clear()
    y_full = full(x)
    assert torch.allclose(y_full, y, atol=1e-6)
    assert sum(g for _, g in calls) == 1 and len(calls) == 3
    y_full.sum().backward()
    for k, m in full.candidates.items():
        assert (m.weight.grad is not None) == (k == chosen), k
    assert (full.pi.grad != 0).all()


def test_full_straight_through_reaches_blocks_followed_by_bn():
    """A block feeding a BN (transition / conv5) is scale-invariant: with gradients through the sampled
    path only, its pi gets ~0 gradient; the full straight-through estimator fixes that."""
    grads = {}
    for hg in ("selected", "full"):
        torch.manual_seed(0)
        space = get_space("osnet_ain")(num_classes=4, width_mult=0.25)
        strat = get_strategy("gumbel")(space, mode="hard", hard_gradient=hg)
        model = strat.attach()
        loss, _ = build_reid_loss(4)(model(torch.randn(8, 3, 64, 32)), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        loss.backward()
        grads[hg] = {k: float(op.pi.grad.abs().sum()) for k, op in strat.ops.items()}
    for label in ("conv2_2", "conv3_2", "conv4_2"):  # followed by transition / conv5 (conv + BN)
        assert grads["selected"][label] < 1e-5 * grads["full"][label] + 1e-6, label
        assert grads["full"][label] > 1e-5, label


def test_monte_carlo_samples_average_the_loss():
    """Eq. 12 & 15: with S samples the gradient is the mean of the S per-sample gradients (not their sum)."""
    strat, model = make("soft", samples=3)
    n_forward = []
    model.register_forward_hook(lambda *a: n_forward.append(1))
    batch = {"img": torch.randn(4, 3, 64, 32), "pid": torch.tensor([0, 0, 1, 1])}
    loss_fn = build_reid_loss(4)
    opt = torch.optim.SGD(strat.param_groups(0.0, 0.0), lr=0.0)
    noise = strat.generator.get_state()
    torch.manual_seed(1)
    parts = strat.train_step(batch, loss_fn, opt)
    assert len(n_forward) == 3 and parts["loss"] > 0
    averaged = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # replay the same three Gumbel draws one forward at a time
    strat.generator.set_state(noise)
    torch.manual_seed(1)
    per_sample = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(batch["img"]), batch)
        loss.backward()
        per_sample.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert any(not torch.allclose(per_sample[0][k], per_sample[1][k]) for k in averaged)  # the draws differ
    # the whole gradient vector, relative to its norm (float32 accumulation order differs; dividing by S
    # wrongly -- a sum, or the last sample only -- is off by a relative 2 or ~1)
    got = torch.cat([averaged[k].flatten() for k in averaged])
    want = torch.cat([(sum(ps[k] for ps in per_sample) / 3).flatten() for k in averaged])
    assert float((got - want).norm()) <= 1e-4 * float(want.norm())
    pi_name = next(n for n, p in model.named_parameters() if p is strat.ops["conv2_1"].pi)
    assert float(averaged[pi_name].abs().sum()) > 0


def test_export_is_argmax_pi_and_freezes():
    strat, model = make()
    with torch.no_grad():
        for i, op in enumerate(strat.ops.values()):
            op.pi.zero_()
            op.pi[i % 4] = 1.0
    sample = strat.export()
    assert list(sample.values()) == ["os", "os_in_in", "os_in_out", "os_in_in_out", "os", "os_in_in"]
    probs = strat.probabilities()
    assert abs(sum(probs["conv2_1"].values()) - 1) < 1e-6
    fixed = freeze(model, sample)
    model.eval()
    fixed.eval()
    x = torch.randn(2, 3, 64, 32)
    assert torch.equal(model(x), fixed(x))


def test_bad_strategy_kwargs_name_the_key():
    space = get_space("osnet_ain")(num_classes=4, width_mult=0.25)
    with pytest.raises(StrategyConfigError, match="strategy.kwargs.temperature"):
        get_strategy("gumbel")(space, temperature=3)
    with pytest.raises(StrategyConfigError, match="strategy.kwargs.mode"):
        get_strategy("gumbel")(space, mode="medium")
    with pytest.raises(KeyError, match="unknown strategy"):
        get_strategy("evolution")


def test_shared_residual_is_computed_once_and_soft_output_is_exact():
    """share_weights: the four IN variants of a layer share one residual branch, run once per forward."""
    torch.manual_seed(0)
    space = get_space("osnet_ain")(num_classes=4, width_mult=0.25)
    strat = get_strategy("gumbel")(space, mode="soft")
    model = strat.attach()
    op = strat.ops["conv3_1"]
    residual = op.candidates["os"].residual
    assert all(c.residual is residual for c in op.candidates.values())
    runs = []
    residual.conv1.register_forward_hook(lambda *a: runs.append(1))
    x = torch.randn(2, 64, 16, 8)  # conv3_1 input: 256 * 0.25 channels
    y = op(x)
    assert len(runs) == 1
    alpha = op.last_alpha
    residual.clear_cache()
    want = sum(a * c(x) for a, c in zip(alpha, op.candidates.values()))
    assert torch.allclose(y, want, atol=1e-5)
    # forward of the whole supernet leaves no memoised tensors behind
    model(torch.randn(2, 3, 64, 32))
    from nasreid.models.osnet import OSResidual
    assert all(m._cache is None for m in model.modules() if isinstance(m, OSResidual))


def test_random_baseline_is_seeded_and_valid():
    space = get_space("osnet_ain")(num_classes=4, width_mult=0.25)
    a = get_strategy("random")(space, seed=3).export()
    b = get_strategy("random")(get_space("osnet_ain")(num_classes=4, width_mult=0.25), seed=3).export()
    assert a == b and set(a) == {"conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv4_1", "conv4_2"}
    strat = get_strategy("random")(space, seed=3)
    model = strat.attach()
    opt = torch.optim.SGD(strat.param_groups(0.01, 0.0), lr=0.01)
    parts = strat.train_step({"img": torch.randn(4, 3, 64, 32), "pid": torch.tensor([0, 0, 1, 1])},
                             build_reid_loss(4), opt)
    assert parts["loss"] > 0
    fixed = freeze(model, strat.export())
    assert [b.variant for b in (*fixed.conv2, *fixed.conv3, *fixed.conv4)] == list(a.values())


@pytest.mark.usefixtures("one_thread")
def test_fair_sampling_trains_every_candidate_once_per_step():
    """``fair: true`` (FairNAS strict fairness): in one step every candidate of every choice runs exactly once, the
    k-th paths of the choices follow seeded permutations, and the returned loss is the mean over the m paths; the
    default keeps one path per step."""
    def calls_per_step(fair: bool, seed: int = 3):
        torch.manual_seed(0)
        space = get_space("osnet_ain")(num_classes=4, width_mult=0.125, feature_dim=16)
        strat = get_strategy("random")(space, seed=seed, fair=fair)
        model = strat.attach().train()
        seen: dict[str, list[str]] = {}
        for label, op in strat.ops.items():
            for key, cand in op.candidates.items():
                cand.register_forward_hook(lambda m, i, o, label=label, key=key: seen.setdefault(label, []).append(key))
        opt = torch.optim.SGD(strat.param_groups(0.01, 0.0), lr=0.01)
        batch = {"img": torch.randn(4, 3, 64, 32), "pid": torch.tensor([0, 0, 1, 1])}
        parts = strat.train_step(batch, build_reid_loss(4), opt)
        assert all(op.fixed is None for op in strat.ops.values()) and model.training
        return seen, parts

    seen, parts = calls_per_step(True)
    assert set(seen) == {"conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv4_1", "conv4_2"}
    assert all(sorted(v) == ["os", "os_in_in", "os_in_in_out", "os_in_out"] for v in seen.values())
    assert seen != calls_per_step(True, seed=4)[0] and seen == calls_per_step(True)[0]  # seeded permutations
    assert parts["loss"] > 0
    plain, _ = calls_per_step(False)
    assert all(len(v) == 1 for v in plain.values())


@pytest.mark.usefixtures("one_thread")
def test_a_one_shot_search_honours_optim_lr_mult(tmp_path):
    """``optim.lr_mult`` in a one-shot search recipe takes effect: the weights split into the multiplier groups
    (every weight in exactly one, pi in none), pi keeps its own ``arch_lr``; seen in the search's checkpointed
    optimiser. Without ``lr_mult`` the layout is the one weights group as before; a pattern that matches only
    pi is refused by name."""
    from nasreid.config import RecipeError, load_recipe
    from nasreid.engine import pipeline
    from nasreid.engine.checkpoint import load_checkpoint
    from nasreid.engine.validate import check_recipe

    recipe = load_recipe("recipes/quickstart.yaml", {
        "optim.lr_mult": {"head.classifier*": 10.0, "conv1.*": 0.5}, "optim.epochs": 1, "then_retrain": None,
        "data.dataset.kwargs.num_ids": 24, "data.dataset.kwargs.num_train_ids": 12, "data.height": 64,
        "data.width": 32})
    check_recipe(recipe, search=True)
    run = pipeline.run_search(recipe, run_dir=tmp_path / "run", progress=False)
    groups = next(iter(load_checkpoint(run / "checkpoints" / "last.pt")["optimizers"].values()))["param_groups"]
    assert [(g["name"], g["initial_lr"]) for g in groups] == [
        ("weights", 0.1), ("head.classifier*", 1.0), ("conv1.*", 0.05), ("arch", 0.3)]
    assert [len(g["params"]) for g in groups[1:]] == [2, 3, 6]  # classifier W, b; conv1 conv W, BN W, b; 6 pi

    for name in ("gumbel", "random"):
        strat = get_strategy(name)(get_space("osnet_ain")(num_classes=4, width_mult=0.25))
        model = strat.attach()
        plain = strat.param_groups(0.01, 5e-4)
        assert [(g["name"], g["lr"], g["weight_decay"]) for g in plain][0] == ("weights", 0.01, 5e-4)
        split = strat.param_groups(0.01, 5e-4, {"head.classifier*": 10.0})
        weights = [id(p) for g in split if g["name"] != "arch" for p in g["params"]]
        assert sorted(weights) == sorted(id(p) for p in plain[0]["params"])  # a partition of the same weights
        assert split[1]["lr"] == pytest.approx(0.1) and split[1]["weight_decay"] == 5e-4
        assert {id(p) for p in split[1]["params"]} == {id(p) for p in model.head.classifier.parameters()}
    strat, _ = make()
    with pytest.raises(RecipeError, match=r"optim.lr_mult: pattern '\*\.pi' matches only architecture parameters "
                                          r"of strategy 'gumbel'; their lr is strategy.kwargs.arch_lr"):
        strat.param_groups(0.01, 0.0, {"*.pi": 2.0})


def test_straight_through_mix_equals_the_weighted_sum_in_value_and_gradient():
    """StraightThroughMix (hard mode's fast path) gives the value of sum_k h_k o_k bit for bit and the same gradients
    to the sampled candidate's weights and to pi as autograd through the sum (mix_outputs), on a real OS-block
    choice of the OSNet-AIN space."""
    import nasreid.strategies.gumbel as G
    from nasreid.strategies.base import mix_outputs

    def run(fast: bool):
        torch.manual_seed(0)
        space = get_space("osnet_ain")(num_classes=10, width_mult=0.25)
        strat = get_strategy("gumbel")(space, mode="hard", seed=3)
        net = strat.attach().train()
        if not fast:
            G.StraightThroughMix.apply = lambda h, *o: mix_outputs(list(h.unbind(0)), list(o))
        try:
            x = torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(1))
            out = net(x)
            feat = out["feat"] if isinstance(out, dict) else out
            (feat.square().mean()).backward()
        finally:
            G.StraightThroughMix.apply = apply
        pis = [m.pi.grad.clone() for m in net.modules() if isinstance(m, GumbelMixedOp)]
        convs = [p.grad.clone() for n, p in net.named_parameters()
                 if n.endswith("conv1.0.weight") and p.grad is not None]
        return feat.detach(), pis, convs

    apply = G.StraightThroughMix.apply
    (y_fast, pi_fast, w_fast), (y_sum, pi_sum, w_sum) = run(True), run(False)
    assert torch.equal(y_fast, y_sum)
    assert len(pi_fast) == 6 and all(g.abs().sum() > 0 for g in pi_fast)
    for a, b in zip(pi_fast + w_fast, pi_sum + w_sum):
        # the inner products <g, o_k> are one torch.dot each, summed in another order than (g * o).sum(): the
        # gradients of pi (~1e-4 here) agree to float32 rounding of the sum, not bit for bit
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
