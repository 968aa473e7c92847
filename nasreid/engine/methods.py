"""Training methods: how a fixed network is trained (``training.method`` of a retrain recipe).

A method is registered in :data:`nasreid.registry.METHODS` and has ``fit(ctx, net, *, epochs, hooks,
records, run_dir) -> history``. It builds what it needs from the :class:`~nasreid.engine.context.RunContext`
(loaders, loss, optimisers) and runs a :class:`~nasreid.engine.trainer.Trainer`; methods with several
optimisers (a domain discriminator) register more slots on the trainer, methods whose labels change
between epochs (pseudo labels) replace ``trainer.loader`` in a ``before_epoch`` hook.

``supervised`` (the default) is the standard re-ID recipe: ID loss (label-smoothing CE) + optional
batch-hard triplet on PK batches, one optimiser, warm-up + cosine/multistep, optional frozen-backbone warm
start (``training.freeze_backbone_epochs``). A loss with parameters of its own (MSINet's spatial alignment
module, ``loss.name: msinet`` with ``sam_weight > 0``) is moved to the device, trained by the same optimiser
(a second parameter group with the recipe's ``optim`` settings) and checkpointed under ``"loss"``
(:class:`~nasreid.engine.hooks.ModuleStateHook`); the network never holds those parameters.

Per-layer learning rates: ``optim.lr_mult`` maps fnmatch patterns on the network's parameter names to lr
multipliers (RMGL, Wang et al., TIP 2020, Sec. IV-A: 10x on the reduction and classifier layers).
:func:`param_groups_by_lr_mult` splits the trainable parameters into a base group (lr ``optim.lr``) and one
group per pattern (lr ``optim.lr * mult``; the first matching pattern wins); the schedule
(:func:`~nasreid.engine.trainer.build_scheduler`, a ``LambdaLR`` on each group's initial lr) keeps the
multipliers. Without ``lr_mult`` the network is one parameter group exactly as before, so older checkpoints
resume unchanged.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Mapping, Optional, Sequence

from torch import nn

from nasreid.config import RecipeError
from nasreid.registry import METHODS

from .hooks import FreezeBackboneHook, ModuleStateHook
from .trainer import Hook, Trainer, backward, optimizer_step

__all__ = ["SupervisedMethod", "param_groups_by_lr_mult"]


def param_groups_by_lr_mult(model: nn.Module, base_lr: float,
                            lr_mult: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into optimiser groups by lr multiplier (recipe ``optim.lr_mult``).

    Each parameter name of ``model.named_parameters()`` is matched (``fnmatch.fnmatchcase``, case-sensitive)
    against the patterns of ``lr_mult`` in dict order; the first match decides its group. Per-layer
    multipliers as in RMGL (Wang et al., TIP 2020, Sec. IV-A: 10x lr on reduction and classifier layers).

    Args:
        model: the network (parameters with ``requires_grad=False`` are left out of every group, but still
            count as matched).
        base_lr: lr of the base group (``optim.lr``), in the optimiser's units.
        lr_mult: ``{pattern: multiplier}`` (multiplier >= 0); ``None``/empty: no split.

    Returns:
        Without ``lr_mult``: ``[{"params": [trainable params]}]`` (one group, no extra keys: the pre-``lr_mult``
        layout). Otherwise ``[{"name": "base", "lr": base_lr, "params": [...]}]`` followed by one
        ``{"name": pattern, "lr": base_lr * mult, "params": [...]}`` per pattern in dict order; every group is
        kept (possibly empty, e.g. when its parameters are frozen) so the layout does not depend on freezing.

    Raises:
        RecipeError: a pattern that matches no parameter name at all (names the pattern and a few parameter
            names), or a negative / non-finite multiplier.
    """
    named = [(n, p) for n, p in model.named_parameters()]
    if not lr_mult:
        return [{"params": [p for _, p in named if p.requires_grad]}]
    patterns = list(lr_mult.items())
    for pattern, mult in patterns:
        if not isinstance(mult, (int, float)) or isinstance(mult, bool) or not math.isfinite(mult) or mult < 0:
            raise RecipeError(f"optim.lr_mult: multiplier of pattern {pattern!r} must be a finite number >= 0, "
                              f"got {mult!r}")
    for pattern, _ in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
            examples = ", ".join(repr(n) for n, _ in named[:5]) or "none"
            more = f" (and {len(named) - 5} more)" if len(named) > 5 else ""
            raise RecipeError(f"optim.lr_mult: pattern {pattern!r} matches no parameter of the network; "
                              f"parameter names look like {examples}{more} (fnmatch, case-sensitive; use e.g. "
                              f"'*classifier*')")
    base: dict[str, Any] = {"name": "base", "lr": base_lr, "params": []}
    groups = [{"name": pattern, "lr": base_lr * float(mult), "params": []} for pattern, mult in patterns]
    for name, param in named:
        if not param.requires_grad:
            continue
        i = next((i for i, (pattern, _) in enumerate(patterns) if fnmatch.fnmatchcase(name, pattern)), None)
        (base if i is None else groups[i])["params"].append(param)
    return [base, *groups]


@METHODS.register("supervised")
class SupervisedMethod:
    """ID + triplet training of a fixed network on labelled PK batches (Hermans et al. 2017; Luo et al.
    2019 "Bag of Tricks" for the BNNeck head). No kwargs."""

    def step(self, trainer: Trainer, batch: dict, loss_fn: nn.Module,
             grad_clip: Optional[float] = None) -> dict[str, float]:
        """One SGD step: forward under autocast, loss ``(outputs, batch)``, finite check, backward, step."""
        opt = trainer.optimizer
        opt.zero_grad(set_to_none=True)
        with trainer.ctx.autocast():
            loss, parts = loss_fn(trainer.forward_model(batch["img"]), batch)
        backward(loss, trainer.ctx.scaler, parts)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        params += [p for p in loss_fn.parameters() if p.requires_grad]  # a loss's own (PAM), clipped with the net
        optimizer_step(opt, params, trainer.ctx.scaler, grad_clip)
        return parts

    def fit(self, ctx, net: nn.Module, *, epochs: int, hooks: list[Hook], records: Optional[Sequence] = None,
            run_dir=None) -> list[dict[str, Any]]:
        """Train ``net`` for ``epochs``; returns the history (see :meth:`RunContext.train_fixed`).

        The loss is moved to the device; its trainable parameters (if any) form a second parameter group of
        the one optimiser (same lr / weight decay / schedule) and its ``state_dict`` (if not empty) is
        checkpointed and restored on resume by a :class:`ModuleStateHook` named ``"loss"``. A loss without
        parameters or buffers trains exactly as before (one parameter group, no extra checkpoint entry).

        With ``optim.lr_mult`` the network's parameters are split by :func:`param_groups_by_lr_mult` (base group
        first, so the logged ``lr`` is the base lr); the loss group keeps the base lr.

        Raises:
            ValueError: a parameter is shared by the network and the loss.
            RecipeError: an ``optim.lr_mult`` pattern matches no parameter of the network.
        """
        recs = ctx.dataset.train if records is None else records
        num_classes = ctx.check_num_classes(recs)
        model = ctx.device.model(net)
        loss_fn = ctx.build_loss(num_classes).to(ctx.device.device)
        optim = ctx.recipe.optim
        lr_mult = getattr(optim, "lr_mult", None) or {}
        net_groups = param_groups_by_lr_mult(model, optim.lr, lr_mult)
        net_params = [p for g in net_groups for p in g["params"]]
        loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
        if {id(p) for p in net_params} & {id(p) for p in loss_params}:
            raise ValueError("the loss shares parameters with the network; a loss's own parameters must not be "
                             "registered in the model")
        loss_group = {"params": loss_params} if not lr_mult else {"name": "loss", "lr": optim.lr,
                                                                  "params": loss_params}
        groups = net_groups + ([loss_group] if loss_params else [])
        optimizer = ctx.build_optimizer(groups)
        scheduler = ctx.build_scheduler(optimizer)
        t = ctx.recipe.training
        if len(loss_fn.state_dict()):
            hooks = [*hooks, ModuleStateHook(loss_fn, name="loss")]
        if t.freeze_backbone_epochs:
            hooks = [FreezeBackboneHook(t.freeze_backbone_epochs, t.open_layers), *hooks]
        clip = ctx.recipe.optim.grad_clip
        trainer = ctx.trainer(model, lambda tr, b: self.step(tr, b, loss_fn, clip), loader=ctx.loader(records),
                              optimizer=optimizer, scheduler=scheduler, hooks=hooks, epochs=epochs, run_dir=run_dir,
                              find_unused=bool(t.freeze_backbone_epochs))
        return trainer.fit()
