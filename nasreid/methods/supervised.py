"""Training method ``supervised`` (the default): the standard re-ID recipe on labelled PK batches.

ID loss (label-smoothing cross-entropy) + optional batch-hard triplet (Hermans et al., "In Defense of the
Triplet Loss for Person Re-Identification", 2017), one optimiser, warm-up + cosine / multistep, optional
frozen-backbone warm start (``training.freeze_backbone_epochs``; OSNet-AIN Sec. 4.1), per-layer learning rates
(``optim.lr_mult``). The head may be a BNNeck (Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person
Re-ID", CVPRW 2019). A loss with parameters of its own (MSINet's spatial alignment module, ``loss.name: msinet``
with ``sam_weight > 0``) is moved to the device, trained by the same optimiser (a second parameter group with the
recipe's ``optim`` settings) and checkpointed under ``"loss"``
(:class:`~nasreid.engine.hooks.ModuleStateHook`); the network never holds those parameters.
"""
from __future__ import annotations

from nasreid.engine.trainer import Trainer
from nasreid.registry import METHODS

from .base import TrainingMethod

__all__ = ["SupervisedMethod"]


@METHODS.register("supervised")
class SupervisedMethod(TrainingMethod):
    """ID + triplet training of a fixed network on labelled PK batches (see the module docstring). No kwargs;
    honours every common recipe key (``optim.*``, ``training.freeze_backbone_epochs`` / ``open_layers``,
    ``model.pretrained``, the whole ``loss`` section)."""

    def step(self, trainer: Trainer, batch: dict) -> dict[str, float]:
        """One step: forward under autocast, loss ``(outputs, batch)``, finite check, backward, optimiser step
        (the loss's own parameters clipped with the network's)."""
        loss_fn, opt = self.loss_fn, trainer.optimizer
        if loss_fn is None or opt is None:
            raise RuntimeError("SupervisedMethod.step runs inside fit(), which builds the loss and the optimiser")
        opt.zero_grad(set_to_none=True)
        with trainer.ctx.autocast():
            loss, parts = loss_fn(trainer.forward_model(batch["img"]), batch)
        self.update(trainer, loss, parts, extra_params=loss_fn.parameters())
        return parts
