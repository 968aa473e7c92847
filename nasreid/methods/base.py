"""The training-method base: what every method of ``training.method`` shares (fast-reid ``DefaultTrainer``,
torchreid ``Engine`` in spirit).

A method is how a *fixed* network is trained. :meth:`TrainingMethod.fit` is a template: it checks the
training identities, lets the method prepare the network (:meth:`~TrainingMethod.prepare_network`), builds the
loss, the optimiser over parameter groups (``optim.lr_mult``) and the schedule
(:meth:`~TrainingMethod.build_optimizers`), the hooks (frozen-backbone warm start, checkpointed module state:
:meth:`~TrainingMethod.build_hooks`) and the loader, then runs a :class:`~nasreid.engine.trainer.Trainer`
whose step is the method's one small :meth:`~TrainingMethod.step` (torchreid ``engine/image/softmax.py``).
A method overrides only what it does differently.

Its settings (``training.kwargs``) are a pydantic :class:`TrainingMethod.Config`; an unknown key or a bad value is
a :class:`~nasreid.config.RecipeError` naming ``training.kwargs.<key>``. The *common* recipe keys a method
honours are declared in :attr:`TrainingMethod.honours`; :func:`unhonoured_keys` lists the common keys a recipe
sets that its method does not honour, and the recipe check refuses them by name (nothing is ignored silently).

A new method is one file plus a registration::

    from nasreid.methods import TrainingMethod
    from nasreid.registry import METHODS

    @METHODS.register("center")
    class CenterMethod(TrainingMethod):
        class Config(TrainingMethod.Config):
            weight: float = 0.005                      # training.kwargs.weight

        def step(self, trainer, batch):
            ...                                        # forward, loss, backward, optimiser step -> {"loss": ...}
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from nasreid.config import Recipe, RecipeError
from nasreid.engine.hooks import FreezeBackboneHook, ModuleStateHook
from nasreid.engine.trainer import Hook, Trainer, backward, optimizer_step
from nasreid.registry import config_error

__all__ = ["TrainingMethod", "COMMON_KEYS", "unhonoured_keys", "param_groups_by_lr_mult",
           "reid_loss_setting"]


#: the settings of the ``reid`` loss that a method may honour one by one (``loss.kwargs.<key>``)
_REID_KEYS = ("label_smooth", "triplet_weight", "triplet_margin")


#: the common recipe keys a training method or a search strategy may honour, each with the test "the recipe
#: sets it": a value other than the schema's default, never the key's mere presence (a run folder's
#: ``recipe.yaml`` lists every key with its default, and ``--resume`` reads it back)
COMMON_KEYS: dict[str, Callable[[Recipe], bool]] = {
    "optim.lr_mult": lambda r: bool(r.optim.lr_mult),
    "optim.grad_clip": lambda r: r.optim.grad_clip is not None,
    "training.freeze_backbone_epochs": lambda r: r.training.freeze_backbone_epochs > 0,
    "model.pretrained": lambda r: r.model is not None and r.model.pretrained is not None,
    "loss.name": lambda r: r.loss.name != "reid",
    "loss.kwargs.label_smooth": lambda r: _reid_set(r, "label_smooth"),
    "loss.kwargs.triplet_weight": lambda r: _reid_set(r, "triplet_weight"),
    "loss.kwargs.triplet_margin": lambda r: _reid_set(r, "triplet_margin"),
    "loss.kwargs": lambda r: any(r.loss.name != "reid" or (k not in _REID_KEYS and _reid_set(r, k))
                                 for k in r.loss.kwargs),
}

#: marks a ``loss.kwargs`` key that :func:`~nasreid.losses.build_reid_loss` does not take (it has no default)
_NO_DEFAULT = object()


def _reid_default(key: str) -> Any:
    import inspect

    from nasreid.losses import build_reid_loss

    param = inspect.signature(build_reid_loss).parameters.get(key)
    return _NO_DEFAULT if param is None else param.default


def reid_loss_setting(recipe: Recipe, key: str) -> Any:
    """A setting of the recipe's ``reid`` loss: ``loss.kwargs[key]``, else
    :func:`~nasreid.losses.build_reid_loss`'s default (label smoothing 0.1, triplet weight 0, margin 0.3)."""
    return recipe.loss.kwargs[key] if key in recipe.loss.kwargs else _reid_default(key)


def _reid_set(recipe: Recipe, key: str) -> bool:
    """Whether the recipe sets the ``reid`` loss's ``key`` to a value other than its default."""
    return recipe.loss.name == "reid" and key in recipe.loss.kwargs and recipe.loss.kwargs[key] != _reid_default(key)


def unhonoured_keys(component: type, recipe: Recipe) -> list[str]:
    """The common recipe keys (:data:`COMMON_KEYS`) that ``recipe`` sets to a value other than the schema's
    default and that ``component`` does not honour, in :data:`COMMON_KEYS` order.

    ``component`` is a training method (:attr:`TrainingMethod.honours`) or a search strategy
    (:attr:`strategies.base.Strategy.honours`); the same declaration serves both. A key at its default (as a
    run folder's ``recipe.yaml`` writes every key) is never listed. ``training.open_layers`` is part of
    ``training.freeze_backbone_epochs`` (it means nothing without it). A class without ``honours`` (a plain
    callable registered as a method, a plugin strategy that declares nothing) is taken to honour everything.
    """
    honours = getattr(component, "honours", None)
    if honours is None:
        return []
    return [k for k, is_set in COMMON_KEYS.items() if k not in honours and is_set(recipe)]


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
    named = list(model.named_parameters())
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
    groups: list[dict[str, Any]] = [{"name": pattern, "lr": base_lr * float(mult), "params": []}
                                    for pattern, mult in patterns]
    for name, param in named:
        if not param.requires_grad:
            continue
        i = next((i for i, (pattern, _) in enumerate(patterns) if fnmatch.fnmatchcase(name, pattern)), None)
        (base if i is None else groups[i])["params"].append(param)
    return [base, *groups]


class TrainingMethod:
    """Base of every training method (see the module docstring for the contract).

    Subclasses set :attr:`Config` (their ``training.kwargs``), :attr:`honours` (the common recipe keys they
    honour), and override :meth:`step` and, where they differ, the ``build_*`` methods.

    Attributes set by :meth:`fit` for :meth:`step` and the hooks: ``ctx`` (the
    :class:`~nasreid.engine.context.RunContext`), ``model`` (the network on its device), ``loss_fn``,
    ``optimizer``, ``scheduler``, ``num_classes``.

    Raises:
        RecipeError: ``training.kwargs`` that do not fit :attr:`Config` (names ``training.kwargs.<key>``).
    """

    class Config(BaseModel):
        """``training.kwargs`` of the method (none for the base)."""

        model_config = ConfigDict(extra="forbid")

    #: common recipe keys (:data:`COMMON_KEYS`) this method honours; the recipe check refuses the others
    honours: ClassVar[frozenset[str]] = frozenset(COMMON_KEYS)
    #: modules the method adds to the network that train during a frozen-backbone warm start
    open_layers: ClassVar[tuple[str, ...]] = ()
    #: whether the method runs under torchrun (DDP)
    distributed: ClassVar[bool] = True
    #: whether a step may leave parameters without gradient (DDP's ``find_unused_parameters``)
    find_unused: ClassVar[bool] = False

    def __init__(self, **kwargs: Any):
        try:
            self.cfg = self.Config.model_validate(kwargs)
        except ValidationError as e:
            raise config_error(e, "training.kwargs", f"training method {type(self).__name__}", self.Config) from None

    @property
    def name(self) -> str:
        """The method's registry name (its class name where it is not registered)."""
        from nasreid.registry import METHODS

        return next((n for n, obj in METHODS.items() if obj is type(self)), type(self).__name__)

    # ---- the parts a method may override ---------------------------------------------------------
    @classmethod
    def prepare_network(cls, net: nn.Module, recipe: Recipe) -> nn.Module:
        """Attach what the method adds to the network (saved with it, e.g. QAConv's head) and return it.
        Called before a run's weights are loaded into the network, so a run folder loads back. The base
        adds nothing."""
        return net

    def build_loss(self, num_classes: int) -> Optional[nn.Module]:
        """The training loss (default: the recipe's ``loss`` section for ``num_classes`` identities)."""
        return self.ctx.build_loss(num_classes)

    def build_param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Parameter groups of the network: :func:`param_groups_by_lr_mult` with the recipe's
        ``optim.lr`` / ``optim.lr_mult``; a loss with parameters of its own (MSINet's PAM) adds a group at the
        base lr.

        Raises:
            ValueError: a parameter is shared by the network and the loss.
            RecipeError: an ``optim.lr_mult`` pattern matches no parameter of the network.
        """
        optim = self.ctx.recipe.optim
        lr_mult = getattr(optim, "lr_mult", None) or {}
        groups = param_groups_by_lr_mult(model, optim.lr, lr_mult)
        loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad] if self.loss_fn is not None else []
        if loss_params:
            net_ids = {id(p) for g in groups for p in g["params"]}
            if net_ids & {id(p) for p in loss_params}:
                raise ValueError("the loss shares parameters with the network; a loss's own parameters must not "
                                 "be registered in the model")
            groups.append({"params": loss_params} if not lr_mult else
                          {"name": "loss", "lr": optim.lr, "params": loss_params})
        return groups

    def build_optimizers(self, model: nn.Module) -> tuple[Any, Any]:
        """``(optimizer, scheduler)`` of the recipe's ``optim`` section over :meth:`build_param_groups`.
        A method with more optimisers (a domain discriminator) registers them on the trainer in
        :meth:`build_trainer`."""
        optimizer = self.ctx.build_optimizer(self.build_param_groups(model))
        return optimizer, self.ctx.build_scheduler(optimizer)

    def build_hooks(self, hooks: Sequence[Hook]) -> list[Hook]:
        """The caller's hooks plus the method's: a :class:`~nasreid.engine.hooks.FreezeBackboneHook` first
        when ``training.freeze_backbone_epochs`` is set (:meth:`FreezeBackboneHook.from_recipe
        <nasreid.engine.hooks.FreezeBackboneHook.from_recipe>`: open ``training.open_layers``, by default the
        network's head, and the method's :attr:`open_layers`), and a
        :class:`~nasreid.engine.hooks.ModuleStateHook` ``"loss"`` when the loss has a state of its own.

        Raises:
            RecipeError: a frozen-backbone warm start without ``training.open_layers`` on a network that
                declares no head (not a :class:`~nasreid.models.interface.ReIDNetwork`).
        """
        out = list(hooks)
        if self.loss_fn is not None and len(self.loss_fn.state_dict()):
            out.append(ModuleStateHook(self.loss_fn, name="loss"))
        freeze = FreezeBackboneHook.from_recipe(self.ctx.recipe, self.model, self.open_layers)
        if freeze is not None:
            out.insert(0, freeze)
        return out

    def build_loader(self, records: Optional[Sequence]):
        """The training loader over ``records`` (default: the PK loader of the context)."""
        return self.ctx.loader(records)

    def build_trainer(self, model: nn.Module, *, epochs: int, hooks: list[Hook], records, run_dir) -> Trainer:
        """The :class:`~nasreid.engine.trainer.Trainer` running :meth:`step` (checkpointing into ``run_dir``)."""
        t = self.ctx.recipe.training
        return self.ctx.trainer(model, self.step, loader=self.build_loader(records), optimizer=self.optimizer,
                                scheduler=self.scheduler, hooks=hooks, epochs=epochs, run_dir=run_dir,
                                ddp=self.distributed,
                                find_unused=self.find_unused or bool(t.freeze_backbone_epochs))

    def step(self, trainer: Trainer, batch: dict) -> dict[str, float]:
        """One training step on ``batch`` (``img [B, 3, H, W]``, ``pid [B]`` ...) on the device; returns the
        step's scalars (``"loss"`` is checked for NaN / inf by the trainer)."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(trainer, batch)")

    # ---- helpers for steps ----------------------------------------------------------------------
    def update(self, trainer: Trainer, loss, parts: dict[str, float], optimizer=None, extra_params=()) -> None:
        """Backward (with the finite check and AMP scaling) and one optimiser step over the network's trainable
        parameters (plus ``extra_params``), clipped by ``optim.grad_clip``."""
        opt = optimizer or trainer.optimizer
        if opt is None:
            raise ValueError("TrainingMethod.update needs an optimiser (the trainer has none)")
        backward(loss, trainer.ctx.scaler, parts)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        params += [p for p in extra_params if p.requires_grad]
        optimizer_step(opt, params, trainer.ctx.scaler, self.ctx.recipe.optim.grad_clip)

    # ---- the template ---------------------------------------------------------------------------
    def setup(self, records: Sequence) -> None:
        """Method-specific set-up after the network is on the device and before the loss is built (a second
        dataset, a memory); the base does nothing."""

    def fit(self, ctx, net: nn.Module, *, epochs: int, hooks: Sequence[Hook], records: Optional[Sequence] = None,
            run_dir=None) -> list[dict[str, Any]]:
        """Train ``net`` for ``epochs`` on ``records`` (default: the training split, pids ``0..N-1``),
        checkpointing into ``run_dir`` (default: the run folder) and resuming from there; returns the epoch
        history (see :meth:`~nasreid.engine.context.RunContext.train_fixed`).

        Raises:
            RecipeError: pids not ``0..N-1``; a method that does not run under torchrun started so; an
                ``optim.lr_mult`` pattern that matches no parameter; ``training.open_layers`` that match none.
            NonFiniteLossError: the loss diverged (the last good checkpoint is kept).
        """
        from nasreid.engine.distributed import is_distributed

        if not self.distributed and is_distributed():
            raise RecipeError(f"training.method {self.name} does not run under torchrun yet; start it as one "
                              f"process")
        self.ctx = ctx
        recs = ctx.dataset.train if records is None else records
        self.num_classes = ctx.check_num_classes(recs)
        self.prepare_network(net, ctx.recipe)
        self.model = model = ctx.device.model(net)
        self.setup(recs)
        loss_fn = self.build_loss(self.num_classes)
        self.loss_fn = loss_fn.to(ctx.device.device) if loss_fn is not None else None
        self.optimizer, self.scheduler = self.build_optimizers(model)
        all_hooks = self.build_hooks(hooks)
        trainer = self.build_trainer(model, epochs=epochs, hooks=all_hooks, records=records, run_dir=run_dir)
        self.trainer = trainer
        return trainer.fit()
