"""Training method ``qaconv``: query-adaptive convolution with a class memory (Liao & Shao, "Interpretable and
Generalizable Person Re-Identification with Query-Adaptive Convolution and Temporal Lifting", ECCV 2020,
Sec. 3.3-3.4), for any fixed network of any space.

Recipe::

    training: {method: qaconv, kwargs: {stage: conv4, dim: 128, kernel: 1, gamma: 2.0}}
    data: {augment: {random_block: {p: 0.5, max_ratio: 0.8}}}        # Sec. 5.1 (optional)
    eval: {matcher: {name: qaconv, kwargs: {block_size: 256}}}        # score with the learned matcher
    optim: {lr_mult: {"qaconv.*": 10}}                                # Sec. 5.1: new layers at 10x the backbone

What a step does, for a PK batch ``images [b, 3, H, W]`` with pids ``y [b]`` (``0..c-1``):

1. ``maps = head.extract(net, images)``: the output of the backbone module ``stage`` (the forward stops there),
   an optional 1x1 conv to ``dim`` channels, L2-normalised over channels: ``[b, d, h, w]``;
2. ``logits = head(maps, memory.maps)``: QAConv of every batch map against the class memory ``[c, d, h, w]``
   (Sec. 3.1), two-way global max pooling, BN-FC-BN (Sec. 3.2): ``[b, c]``;
3. the focal-weighted binary cross-entropy of Eq. 1-2 (``gamma``) over the ``b x c`` pairs, backward, SGD step;
4. the memory slots of the batch's classes are *replaced* by their newest map (Sec. 3.3, after the loss).

The head is a submodule of the network (``net.qaconv``), so ``model.pt`` and the checkpoints hold it;
:meth:`QAConvMethod.prepare_network` rebuilds it when a run folder is loaded (``load_run_model``). The memory
is checkpointed under ``qaconv_memory``. Not available under torchrun yet (the head's early-stopping forward
does not go through ``DistributedDataParallel``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from nasreid.config import RecipeError
from nasreid.registry import METHODS

from .hooks import FreezeBackboneHook, ModuleStateHook
from .methods import param_groups_by_lr_mult
from .trainer import Hook, backward, optimizer_step

__all__ = ["QAConvMethod", "DEFAULT_STAGES"]

#: backbone module whose output QAConv matches, per space (the paper takes ResNet's layer3: its layer4 map is
#: "too small"); both give maps at 1/16 of the input: 8 x 4 at 128 x 64, 16 x 8 at 256 x 128. RMGL has several
#: branches (e.g. ``branches.0.stages.1`` is branch 0's original path): give its stage explicitly.
DEFAULT_STAGES = {"osnet_ain": "conv4", "msinet": "stage3"}


@METHODS.register("qaconv")
class QAConvMethod:
    """QAConv training with a class memory and the focal BCE of Eq. 1 (see the module docstring).

    Args:
        stage: dotted name of the backbone module whose output is matched (default per space:
            :data:`DEFAULT_STAGES`; required for other spaces).
        dim: channels of the 1x1 conv after the stage (paper 128); ``None``: no conv.
        kernel: QAConv kernel size s (paper 1).
        gamma: focal parameter of Eq. 1 (paper 2; 0 gives plain BCE).

    Raises:
        RecipeError: no default stage for the space, or a run under torchrun.
    """

    def __init__(self, stage: Optional[str] = None, dim: Optional[int] = 128, kernel: int = 1, gamma: float = 2.0):
        self.stage, self.dim, self.kernel, self.gamma = stage, dim, int(kernel), float(gamma)

    @classmethod
    def prepare_network(cls, net: nn.Module, recipe) -> nn.Module:
        """Attach the QAConv head (``net.qaconv``) for the recipe's input size and ``training.kwargs``, unless
        it is there already; returns ``net``. Called before weights are loaded into a run's network.

        Raises:
            RecipeError: no stage for the space.
        """
        from nasreid.models.qaconv import attach_qaconv

        if getattr(net, "qaconv", None) is not None:
            return net
        kw = dict(recipe.training.kwargs)
        stage = kw.get("stage") or DEFAULT_STAGES.get(recipe.space.name)
        if stage is None:
            raise RecipeError(f"{recipe.source or 'recipe'}: training.kwargs.stage: give the backbone module whose "
                              f"feature map QAConv matches (no default for space {recipe.space.name!r})")
        attach_qaconv(net, stage, (recipe.data.height, recipe.data.width), dim=kw.get("dim", 128),
                      kernel=kw.get("kernel", 1))
        return net

    def fit(self, ctx, net: nn.Module, *, epochs: int, hooks: list[Hook], records: Optional[Sequence] = None,
            run_dir=None) -> list[dict[str, Any]]:
        """Train ``net`` (with its QAConv head) for ``epochs``; returns the history (see
        :meth:`~nasreid.engine.context.RunContext.train_fixed`).

        Raises:
            RecipeError: under torchrun; an ``optim.lr_mult`` pattern that matches no parameter.
        """
        from nasreid.models.qaconv import QAConvMemory, qaconv_focal_loss

        from .distributed import is_distributed

        if is_distributed():
            raise RecipeError("training.method qaconv does not run under torchrun yet; start it as one process")
        recs = ctx.dataset.train if records is None else records
        num_classes = ctx.check_num_classes(recs)
        self.prepare_network(net, ctx.recipe)
        model = ctx.device.model(net)
        head = model.qaconv
        dev = ctx.device.device
        memory = QAConvMemory(num_classes, head.dim, head.height, head.width).to(dev)
        optim = ctx.recipe.optim
        groups = param_groups_by_lr_mult(model, optim.lr, getattr(optim, "lr_mult", None) or {})
        optimizer = ctx.build_optimizer(groups)
        scheduler = ctx.build_scheduler(optimizer)
        hooks = [*hooks, ModuleStateHook(memory, name="qaconv_memory")]
        t = ctx.recipe.training
        if t.freeze_backbone_epochs:
            hooks = [FreezeBackboneHook(t.freeze_backbone_epochs, [*t.open_layers, "qaconv"]), *hooks]
        clip, gamma = optim.grad_clip, self.gamma

        def step(trainer, batch):
            optimizer.zero_grad(set_to_none=True)
            pids = batch["pid"]
            with trainer.ctx.autocast():
                maps = head.extract(model, batch["img"])
                logits = head(maps, memory.maps.to(maps.dtype))
            loss = qaconv_focal_loss(logits.float(), pids, gamma=gamma)
            with_grad = [p for p in model.parameters() if p.requires_grad]
            parts = {"loss": float(loss.detach())}
            backward(loss, trainer.ctx.scaler, parts)
            optimizer_step(optimizer, with_grad, trainer.ctx.scaler, clip)
            filled = memory.filled[pids]  # accuracy over classes already in memory
            memory.update(maps.detach().float(), pids)
            if bool(filled.any()):
                pred = logits.detach().argmax(dim=1)
                parts["acc"] = float((pred == pids)[filled].float().mean())
            return parts

        trainer = ctx.trainer(model, step, loader=ctx.loader(records), optimizer=optimizer, scheduler=scheduler,
                              hooks=hooks, epochs=epochs, run_dir=run_dir, ddp=False)
        return trainer.fit()
