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
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from nasreid.registry import METHODS

from .hooks import FreezeBackboneHook, ModuleStateHook
from .trainer import Hook, Trainer, backward, optimizer_step

__all__ = ["SupervisedMethod"]


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
            loss, parts = loss_fn(trainer.model(batch["img"]), batch)
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

        Raises:
            ValueError: a parameter is shared by the network and the loss.
        """
        recs = ctx.dataset.train if records is None else records
        num_classes = ctx.check_num_classes(recs)
        model = ctx.device.model(net)
        loss_fn = ctx.build_loss(num_classes).to(ctx.device.device)
        net_params = [p for p in model.parameters() if p.requires_grad]
        loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
        if {id(p) for p in net_params} & {id(p) for p in loss_params}:
            raise ValueError("the loss shares parameters with the network; a loss's own parameters must not be "
                             "registered in the model")
        groups = [{"params": net_params}] + ([{"params": loss_params}] if loss_params else [])
        optimizer = ctx.build_optimizer(groups)
        scheduler = ctx.build_scheduler(optimizer)
        t = ctx.recipe.training
        if len(loss_fn.state_dict()):
            hooks = [*hooks, ModuleStateHook(loss_fn, name="loss")]
        if t.freeze_backbone_epochs:
            hooks = [FreezeBackboneHook(t.freeze_backbone_epochs, t.open_layers), *hooks]
        clip = ctx.recipe.optim.grad_clip
        trainer = ctx.trainer(model, lambda tr, b: self.step(tr, b, loss_fn, clip), loader=ctx.loader(records),
                              optimizer=optimizer, scheduler=scheduler, hooks=hooks, epochs=epochs, run_dir=run_dir)
        return trainer.fit()
