"""Standard trainer hooks (see :mod:`nasreid.engine.trainer` for the call order).

* :class:`CheckpointHook` -- atomic ``checkpoints/last.pt`` after every epoch; always called last.
* :class:`EvalHook` -- same-domain CMC/mAP every N epochs (``eval/rank1``, ``eval/mAP``).
* :class:`ArchitectureLogHook` -- a search's architecture weights per epoch: ``alphas.csv`` and TensorBoard
  ``alpha/<label>/<value>``.
* :class:`StrategyStateHook` -- checkpoints a strategy's own state (noise generator, temperature ...).
* :class:`FreezeBackboneHook` -- the "frozen base network" warm start of fine-tuning (OSNet-AIN Sec. 4.1:
  "during the first 10 epochs, the ImageNet pre-trained base network is frozen and only the randomly
  initialised classifier is open for training").
* :class:`CallbackHook` -- wrap plain functions as a hook.
* :class:`ModuleStateHook` -- checkpoints a module that is not the trained network (a loss with parameters,
  e.g. MSINet's PAM) with its ``state_dict``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from nasreid.config import RecipeError
from nasreid.models.interface import NetworkInterfaceError, head_prefixes_of, under_prefixes

from .trainer import Hook, Trainer

__all__ = ["CheckpointHook", "EvalHook", "ArchitectureLogHook", "StrategyStateHook", "FreezeBackboneHook",
           "CallbackHook", "ModuleStateHook"]


class CheckpointHook(Hook):
    """Writes ``run_dir/checkpoints/last.pt`` (atomic) after every epoch with the trainer's whole state.

    The trainer keeps it after every other hook so their ``after_epoch`` updates are in the checkpoint.
    """

    name = "checkpoint"
    last = True

    def after_epoch(self, trainer: Trainer) -> None:
        trainer.save()


class EvalHook(Hook):
    """Evaluate every ``every`` epochs (not after the last one, which the caller evaluates in full); under
    torchrun on rank 0 while the other ranks wait.

    Args:
        every: period in epochs (0 disables).
        evaluate: ``() -> {"rank1": %, "mAP": %, ...}``.
        prefix: name of the logged values: ``eval`` (the test split: history ``eval_rank1`` / ``eval_mAP``,
            TensorBoard ``eval/rank1`` ...) or ``val`` (validation identities, recipe
            ``eval.every_split: val``: ``val_rank1`` / ``val_mAP``, ``val/rank1`` ...).
    """

    name = "eval"

    def __init__(self, every: int, evaluate: Callable[[], Mapping[str, Any]], prefix: str = "eval"):
        self.every = int(every)
        self.evaluate = evaluate
        self.prefix = prefix

    def after_epoch(self, trainer: Trainer) -> None:
        e = trainer.epoch + 1
        if self.every and e % self.every == 0 and e < trainer.epochs:
            if trainer.dist.enabled:  # rank 0 evaluates, the others wait
                from .distributed import barrier

                if trainer.dist.rank == 0:
                    self._evaluate(trainer)
                barrier()
                return
            self._evaluate(trainer)

    def _evaluate(self, trainer: Trainer) -> None:
        res = self.evaluate()
        p = self.prefix
        trainer.log(**{f"{p}_rank1": float(res["rank1"]), f"{p}_mAP": float(res["mAP"])})
        if trainer.writer is not None:
            trainer.writer.add_scalar(f"{p}/rank1", res["rank1"], trainer.epoch)
            trainer.writer.add_scalar(f"{p}/mAP", res["mAP"], trainer.epoch)


class ArchitectureLogHook(Hook):
    """Append the strategy's ``probabilities()`` to ``alphas.csv`` and TensorBoard after every epoch.

    Args:
        strategy: anything with ``probabilities() -> {label: {value: p}}`` and ``temperature() -> float|None``.
        csv_path: the run's ``alphas.csv`` (long format, see :mod:`nasreid.plot`).
    """

    name = "alphas"

    def __init__(self, strategy: Any, csv_path: str | Path):
        self.strategy = strategy
        self.csv_path = Path(csv_path)

    def after_epoch(self, trainer: Trainer) -> None:
        from nasreid.plot import append_alphas_csv, log_alphas_tensorboard

        if trainer.dist.rank != 0:  # identical on every rank; rank 0 writes
            return
        probs = self.strategy.probabilities()
        append_alphas_csv(self.csv_path, trainer.epoch, trainer.global_step, probs, self.strategy.temperature())
        if trainer.writer is not None:
            log_alphas_tensorboard(trainer.writer, probs, trainer.epoch)


class StrategyStateHook(Hook):
    """Checkpoints ``strategy.state_dict()`` (restored with ``load_state_dict`` on resume)."""

    name = "strategy"

    def __init__(self, strategy: Any):
        self.strategy = strategy

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.strategy.load_state_dict(state)


class FreezeBackboneHook(Hook):
    """Train only the modules under ``open_prefixes`` for the first ``epochs`` epochs.

    Frozen parameters get ``requires_grad=False`` and frozen modules run in eval mode (BN statistics
    frozen too); from epoch ``epochs`` on everything trains. Parameters without gradient are skipped by
    the optimisers, so no optimiser state is created for them while frozen. Training methods and one-shot
    strategies alike build it with :meth:`from_recipe`.

    Raises:
        RecipeError: no parameter matches ``open_prefixes`` (names the prefixes and the model's top modules).
    """

    name = "freeze_backbone"

    def __init__(self, epochs: int, open_prefixes: Sequence[str] = ("head",)):
        self.epochs = int(epochs)
        self.open_prefixes = tuple(open_prefixes)

    @classmethod
    def from_recipe(cls, recipe, net: nn.Module, extra_open: Sequence[str] = ()) -> "FreezeBackboneHook | None":
        """The frozen-backbone warm start of ``recipe.training`` (OSNet-AIN Sec. 4.1) for ``net``, or ``None``
        when ``training.freeze_backbone_epochs`` is 0.

        Open while frozen: ``training.open_layers``, else the network's head
        (:func:`~nasreid.models.interface.head_prefixes_of`: :attr:`ReIDNetwork.head_prefixes
        <nasreid.models.interface.ReIDNetwork.head_prefixes>`, the head of
        :meth:`~nasreid.models.interface.ReIDNetwork.split_parameters`), plus ``extra_open`` (layers a training
        method adds, e.g. QAConv's head). ``net`` is the network itself, not a DDP wrapper.

        Raises:
            RecipeError: no ``training.open_layers`` and ``net`` is not a nasreid network (no declared head; the
                message names ``training.open_layers`` and the network's top-level modules).
        """
        t = recipe.training
        if not t.freeze_backbone_epochs:
            return None
        if t.open_layers is not None:
            opened = tuple(t.open_layers)
        else:
            try:
                opened = head_prefixes_of(net)
            except NetworkInterfaceError as e:
                raise RecipeError(f"training.freeze_backbone_epochs: {e}") from None
        return cls(t.freeze_backbone_epochs, [*opened, *extra_open])

    def before_train(self, trainer: Trainer) -> None:
        names = [n for n, _ in trainer.model.named_parameters()]
        if self.epochs and not any(under_prefixes(n, self.open_prefixes) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise RecipeError(f"training.open_layers {list(self.open_prefixes)} match no parameter; "
                             f"top-level modules are {tops}")

    def before_epoch(self, trainer: Trainer) -> None:
        frozen = trainer.epoch < self.epochs
        for n, p in trainer.model.named_parameters():
            p.requires_grad_(not frozen or under_prefixes(n, self.open_prefixes))
        if frozen:  # frozen leaf modules (BN statistics included) in eval mode
            for n, m in trainer.model.named_modules():
                if n and next(m.children(), None) is None and not under_prefixes(n, self.open_prefixes):
                    m.eval()
            trainer.log(frozen_backbone=1.0)


class CallbackHook(Hook):
    """A hook from plain functions: ``CallbackHook("name", after_epoch=lambda trainer: ...)``."""

    def __init__(self, name: str, **fns: Callable[[Trainer], None]):
        self.name = name
        for event, fn in fns.items():
            if event not in ("before_train", "after_train", "before_epoch", "after_epoch", "before_step",
                             "after_step"):
                raise ValueError(f"unknown hook event {event!r}")
            setattr(self, event, fn)



class ModuleStateHook(Hook):
    """Checkpoints ``module.state_dict()`` under ``name`` and restores it (``load_state_dict``, strict) on
    resume: the state of a module trained beside the network but not part of it, such as a loss with
    parameters (MSINet's spatial alignment module) -- its optimiser state is in the optimiser's.

    Args:
        module: the module (its tensors are saved as they are; restored onto the module's own device).
        name: checkpoint key (``"loss"``); two such hooks need two names.
    """

    def __init__(self, module: nn.Module, name: str = "loss"):
        self.module = module
        self.name = name

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state)
