"""Training method ``qaconv``: query-adaptive convolution with a class memory (Liao & Shao, "Interpretable and
Generalizable Person Re-Identification with Query-Adaptive Convolution and Temporal Lifting", ECCV 2020,
Sec. 3.3-3.4), for any fixed network of any space.

Recipe::

    training: {method: qaconv, kwargs: {stage: conv4, dim: 128, kernel: 1, gamma: 2.0}}
    data: {augment: {random_block: {p: 0.5, max_ratio: 0.8}}}        # Sec. 5.1 (optional)
    eval: {matcher: {name: qaconv, kwargs: {block_size: 256}}}        # score with the learned matcher
    optim: {lr_mult: {"qaconv.*": 10}}                                # Sec. 5.1: new layers at 10x the backbone

What a step does, for a PK batch ``images [b, 3, H, W]`` with pids ``y [b]`` (``0..c-1``):

1. ``maps = head.extract(net, images)``: the output of the network's stage ``stage``
   (``forward_intermediates(stop_at=stage)``: the forward ends there), an optional 1x1 conv to ``dim`` channels,
   L2-normalised over channels: ``[b, d, h, w]``;
2. ``logits = head(maps, memory.maps)``: QAConv of every batch map against the class memory ``[c, d, h, w]``
   (Sec. 3.1), two-way global max pooling, BN-FC-BN (Sec. 3.2): ``[b, c]``;
3. the focal-weighted binary cross-entropy of Eq. 1-2 (``gamma``) over the ``b x c`` pairs, backward, SGD step;
4. the memory slots of the batch's classes are *replaced* by their newest map (Sec. 3.3, after the loss).

The head is a submodule of the network (``net.qaconv``), so ``model.pt`` and the checkpoints hold it;
:meth:`QAConvMethod.prepare_network` rebuilds it when a run folder is loaded. The memory is checkpointed under
``qaconv_memory``. Honours ``optim.*`` (``lr_mult`` included), ``training.freeze_backbone_epochs`` (the head
``qaconv`` is open with ``training.open_layers``) and ``model.pretrained``; the loss is Eq. 1, so the recipe's
``loss`` section is refused. Not available under torchrun yet (the head's stopped forward does not go through
``DistributedDataParallel``).

Optimiser: the paper's (Sec. 5.1), SGD with momentum, the backbone at 0.001 and the new layers at 10x. The memory
holds maps from up to an epoch ago, so the backbone must change slowly. Measured (issue 28, MSMT17 OSNet x0.25 on
CUHK03 at 128x64, conv4): AMSGrad at the fine-tune rate 0.0015 (or 0.00015 with the head at 10x) drives the
backbone away from its memory -- training accuracy over the 372 classes falls from 8 % after the frozen epoch to
0.4-4 % -- where SGD 0.001 / 0.01 keeps learning (16.5 % -> 57 % in 6 epochs). An Adam-type optimiser is
logged as a warning.
"""
from __future__ import annotations

import logging
from typing import Optional

from pydantic import Field
from torch import nn

from nasreid.config import RecipeError
from nasreid.engine.hooks import ModuleStateHook
from nasreid.engine.trainer import Trainer
from nasreid.registry import METHODS

from .base import COMMON_KEYS, TrainingMethod

__all__ = ["QAConvMethod"]

log = logging.getLogger("nasreid")


@METHODS.register("qaconv")
class QAConvMethod(TrainingMethod):
    """QAConv training with a class memory and the focal BCE of Eq. 1 (see the module docstring).

    ``training.kwargs`` (:class:`QAConvMethod.Config`):
        stage: the network stage whose map is matched (default: the network's ``default_match_stage``, e.g.
            ``conv4`` of OSNet-AIN, ``stage3`` of MSINet, ``branches.0.stages.1`` of RMGL).
        dim: channels of the 1x1 conv after the stage (paper 128); ``None``: no conv.
        kernel: QAConv kernel size s (paper 1).
        gamma: focal parameter of Eq. 1 (paper 2; 0 gives plain BCE).

    Raises:
        RecipeError: a bad kwarg, no stage for the network, a run under torchrun.
    """

    class Config(TrainingMethod.Config):
        stage: Optional[str] = Field(None, description="network stage whose map is matched")
        dim: Optional[int] = Field(128, ge=1, description="1x1 conv channels after the stage; None: no conv")
        kernel: int = Field(1, ge=1, description="QAConv kernel size s (odd)")
        gamma: float = Field(2.0, ge=0, description="focal parameter of Eq. 1")

    cfg: Config  # the validated ``training.kwargs`` (set by TrainingMethod.__init__)
    honours = frozenset(k for k in COMMON_KEYS if not k.startswith("loss."))
    open_layers = ("qaconv",)
    distributed = False

    @classmethod
    def prepare_network(cls, net: nn.Module, recipe) -> nn.Module:
        """Attach the QAConv head (``net.qaconv``) for the recipe's input size and ``training.kwargs``, unless
        it is there already; returns ``net``. Called before weights are loaded into a run's network.

        Raises:
            RecipeError: no stage given and the network declares no ``default_match_stage``.
        """
        from nasreid.models.qaconv import attach_qaconv

        if getattr(net, "qaconv", None) is not None:
            return net
        cfg = cls.Config.model_validate(dict(recipe.training.kwargs))
        stage = cfg.stage or getattr(net, "default_match_stage", None)
        if stage is None:
            raise RecipeError(f"{recipe.source or 'recipe'}: training.kwargs.stage: give the network stage whose "
                              f"feature map QAConv matches ({type(net).__name__} declares no default_match_stage)")
        attach_qaconv(net, stage, (recipe.data.height, recipe.data.width), dim=cfg.dim, kernel=cfg.kernel)
        return net

    def build_loss(self, num_classes: int) -> None:
        """No recipe loss: the focal BCE of Eq. 1 is computed in :meth:`step`."""
        return None

    def setup(self, records) -> None:
        """The class memory ``[c, d, h, w]`` (Sec. 3.3) on the device."""
        from nasreid.models.qaconv import QAConvMemory

        head = self.model.qaconv
        optim = self.ctx.recipe.optim.name
        if optim != "sgd":
            log.warning("training.method qaconv with optim.name %s: the class memory holds maps from up to an epoch "
                        "ago and an adaptive optimiser moves the backbone away from them (training collapsed in "
                        "issue 28's measurements); the paper uses SGD (optim.name sgd, lr 0.001, optim.lr_mult "
                        "{'qaconv.*': 10})", optim)
        self.memory = QAConvMemory(self.num_classes, head.dim, head.height, head.width).to(self.ctx.device.device)

    def build_hooks(self, hooks):
        """The base hooks plus the memory, checkpointed as ``qaconv_memory``."""
        return [*super().build_hooks(hooks), ModuleStateHook(self.memory, name="qaconv_memory")]

    def step(self, trainer: Trainer, batch: dict) -> dict[str, float]:
        """Steps 1-4 of the module docstring; logs ``loss`` and ``acc`` (over classes already in memory)."""
        from nasreid.models.qaconv import qaconv_focal_loss

        model, memory, head = self.model, self.memory, self.model.qaconv
        assert trainer.optimizer is not None  # fit() builds it before the steps
        trainer.optimizer.zero_grad(set_to_none=True)
        pids = batch["pid"]
        with trainer.ctx.autocast():
            maps = head.extract(model, batch["img"])
            logits = head(maps, memory.maps.to(maps.dtype))
        loss = qaconv_focal_loss(logits.float(), pids, gamma=self.cfg.gamma)
        parts = {"loss": float(loss.detach())}
        self.update(trainer, loss, parts)
        filled = memory.filled[pids]  # accuracy over classes already in memory
        memory.update(maps.detach().float(), pids)
        if bool(filled.any()):
            pred = logits.detach().argmax(dim=1)
            parts["acc"] = float((pred == pids)[filled].float().mean())
        return parts
