"""The hook trainer: hook state across an interrupted run, a loader swapped between epochs, two
optimisers alternating, a non-finite loss, the lambda schedules, and what importing the engine pulls in.

The trainer's mechanics are tested on small random tensors (shapes and gradients only, no accuracy claim);
the real-data runs are in test_pipeline.py.
"""
import subprocess
import sys

import pytest
import torch
from torch import nn

from nasreid.engine.checkpoint import load_checkpoint
from nasreid.engine.hooks import CheckpointHook, FreezeBackboneHook
from nasreid.engine.trainer import Hook, Trainer, backward, device_context
from nasreid.errors import NasreidError, NonFiniteLossError


def batches(n, size=8, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(size, dim, generator=g), "y": torch.randint(0, 3, (size,), generator=g)}
            for _ in range(n)]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def sgd_step(trainer, batch):
    opt = trainer.optimizer
    opt.zero_grad()
    loss = nn.functional.cross_entropy(trainer.model(batch["x"]), batch["y"]) * trainer.loss_scale
    backward(loss)
    opt.step()
    return {"loss": float(loss.detach())}


class CountingHook(Hook):
    """Carries state across epochs (a running count and a random draw per epoch) and checkpoints it."""

    name = "counter"

    def __init__(self):
        self.steps = 0
        self.draws = []

    def after_step(self, trainer):
        self.steps += 1

    def after_epoch(self, trainer):
        self.draws.append(float(torch.rand(())))  # global RNG: restored on resume too
        trainer.log(steps_seen=float(self.steps))

    def state_dict(self):
        return {"steps": self.steps, "draws": list(self.draws)}

    def load_state_dict(self, st):
        self.steps, self.draws = st["steps"], list(st["draws"])


def make_trainer(run_dir, epochs=4, hooks=(), loader=None):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    t = Trainer(model, sgd_step, epochs=epochs, loader=loader or batches(3), ctx=device_context("cpu"),
                optimizer=opt, scheduler=sched, hooks=[*hooks, CheckpointHook()], run_dir=run_dir)
    t.loss_scale = 1.0
    return t


def test_hook_state_survives_an_interrupted_run(tmp_path):
    ref_hook = CountingHook()
    ref = make_trainer(tmp_path / "ref", hooks=[ref_hook])
    ref.fit()

    class Die(Hook):
        name = "die"

        def after_step(self, trainer):
            if trainer.epoch == 2 and trainer.step == 2:
                raise KeyboardInterrupt

    cut = make_trainer(tmp_path / "cut", hooks=[CountingHook(), Die()])
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["epoch"] == 1
    hook = CountingHook()
    resumed = make_trainer(tmp_path / "cut", hooks=[hook])
    resumed.fit()
    assert hook.steps == ref_hook.steps == 12
    assert hook.draws == ref_hook.draws  # same RNG stream as the uninterrupted run
    assert [r["steps_seen"] for r in resumed.history] == [3.0, 6.0, 9.0, 12.0]
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.optimizer.param_groups[0]["lr"] == ref.optimizer.param_groups[0]["lr"]


def test_checkpoint_hook_runs_after_hooks_registered_later(tmp_path):
    t = make_trainer(tmp_path, hooks=[])
    t.register_hook(CountingHook())
    assert [h.key for h in t.hooks] == ["counter", "checkpoint"]
    with pytest.raises(ValueError, match="counter"):
        t.register_hook(CountingHook())


def test_loader_swapped_between_epochs_and_steps_are_counted(tmp_path):
    sizes = {0: 2, 1: 5, 2: 1}

    class Swap(Hook):
        name = "swap"

        def before_epoch(self, trainer):  # e.g. re-clustered pseudo labels: another loader, another length
            trainer.loader = batches(sizes[trainer.epoch], seed=trainer.epoch)

    t = make_trainer(tmp_path, epochs=3, hooks=[Swap()], loader=batches(4))
    hist = t.fit()
    assert [r["steps"] for r in hist] == [2, 5, 1]
    assert t.global_step == 8
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["global_step"] == 8


def test_two_optimisers_alternate_with_the_other_module_frozen(tmp_path):
    """DomainMix-style: a discriminator with its own optimiser (lr x100) alternates with the backbone."""
    torch.manual_seed(0)
    backbone, disc = nn.Linear(6, 4), nn.Linear(4, 2)
    opt_b = torch.optim.SGD(backbone.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(disc.parameters(), lr=1.0)
    seen = []

    def step(trainer, batch):
        train_disc = trainer.epoch % 2 == 0
        backbone.requires_grad_(not train_disc)
        disc.requires_grad_(train_disc)
        for o in (opt_b, opt_d):
            o.zero_grad(set_to_none=True)
        logits = disc(backbone(batch["x"]))
        loss = nn.functional.cross_entropy(logits, batch["y"] % 2)
        backward(loss)
        seen.append((train_disc, backbone.weight.grad is not None, disc.weight.grad is not None))
        (opt_d if train_disc else opt_b).step()
        return {"loss": float(loss.detach())}

    before = {"b": backbone.weight.detach().clone(), "d": disc.weight.detach().clone()}
    t = Trainer(backbone, step, epochs=2, loader=batches(2), ctx=device_context("cpu"),
                hooks=[CheckpointHook()], run_dir=tmp_path)
    t.register_optimizer("backbone", opt_b)
    t.register_optimizer("discriminator", opt_d, module=disc)
    t.fit()
    # epoch 0 trains only the discriminator, epoch 1 only the backbone: asserted by the gradients
    assert seen == [(True, False, True)] * 2 + [(False, True, False)] * 2
    assert not torch.equal(before["b"], backbone.weight) and not torch.equal(before["d"], disc.weight)
    st = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert set(st["optimizers"]) == {"backbone", "discriminator"} and "discriminator" in st["modules"]
    assert torch.equal(st["modules"]["discriminator"]["weight"], disc.weight.detach())


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    class Poison(Hook):
        name = "poison"

        def before_step(self, trainer):
            trainer.loss_scale = float("nan") if (trainer.epoch, trainer.step) == (2, 1) else 1.0

    t = make_trainer(tmp_path, epochs=4, hooks=[Poison()])
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 2") as e:
        t.fit()
    assert isinstance(e.value, NasreidError)
    st = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert st["epoch"] == 1  # epochs 1-2 done, nothing of epoch 3 written
    assert all(torch.isfinite(v).all() for v in st["model"].values())
    assert all(torch.isfinite(p).all() for p in t.model.parameters())  # checked before backward


def test_freeze_backbone_hook_trains_only_open_layers(tmp_path):
    t = make_trainer(tmp_path, epochs=2, hooks=[FreezeBackboneHook(1, ("head",))])
    body0, head0 = t.model.body.weight.detach().clone(), t.model.head.weight.detach().clone()
    grads = []
    t.register_hook(type("G", (Hook,), {"name": "g", "after_epoch": lambda self, tr: grads.append(
        (tr.model.body.weight.requires_grad, tr.model.head.weight.requires_grad))})())
    t.fit()
    assert grads == [(False, True), (True, True)]
    assert not torch.equal(body0, t.model.body.weight) and not torch.equal(head0, t.model.head.weight)
    with pytest.raises(ValueError, match="match no parameter"):
        make_trainer(tmp_path / "x", hooks=[FreezeBackboneHook(1, ("classifier",))]).fit()


def test_multiplicative_lambda_schedule_of_the_released_config():
    from nasreid.strategies.gumbel import lambda_schedule

    got = [lambda_schedule(e, 10.0, 0.5, 20, 1.0, decay="multiplicative", rate=0.5) for e in range(0, 120, 20)]
    assert got == [10.0, 5.0, 2.5, 1.25, 1.0, 1.0]
    assert lambda_schedule(119, 10.0, 0.5, 20, 1.0) == 7.5  # the paper text's subtractive reading ends at 7.5


def test_importing_the_pipeline_imports_no_concrete_space_or_strategy():
    code = ("import sys, nasreid.engine.pipeline, nasreid.cli; "
            "bad = [m for m in sys.modules if m.startswith(('nasreid.search_spaces', 'nasreid.strategies'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
