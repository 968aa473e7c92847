"""The strategy interface: a search algorithm owns its loop and returns a genotype, whatever the space.

A strategy knows a space only through :mod:`nasreid.mutables` (``simplify``, ``iter_layer_choices``,
``freeze``) and the engine only through a :class:`~nasreid.engine.context.SearchContext`. ``nasreid search``
(:func:`nasreid.engine.pipeline.run_search`) does::

    ctx = SearchContext(recipe, run_dir, device, dataset, writer, ...)
    space = ctx.build_space()                                   # the recipe's space, num_classes of the data
    strategy = STRATEGIES.get(name)(space, **recipe.strategy.kwargs)   # kwargs validated by Strategy.Config
    genotype = strategy.search(ctx)                             # the strategy's own loop
    genotype.save(run / "genotype.json")

and ``nasreid derive RUN`` calls ``StrategyCls.derive(run_dir, recipe)``, which reads back whatever the
strategy itself checkpointed (the pipeline reads no strategy-specific key); ``nasreid plot RUN`` calls
``StrategyCls.plot_run(run_dir, recipe, out, formats)`` (the hook the CLI asks, never a strategy's name).

Two families:

* **one-shot** (:class:`OneShotStrategy`: Gumbel, random path sampling, DARTS): ``attach()`` turns the space
  into a supernet (choices replaced by the strategy's mixed ops); the shared loop trains it with
  ``train_step(batch, loss_fn, optimizer, ...)`` and the hooks of :meth:`OneShotStrategy.hooks` (the
  Gumbel temperature schedule, say); ``probabilities()`` is logged every epoch; ``export()`` is the derived
  sample. A strategy with another loop (DARTS: two loaders, its own Adam for alpha) overrides ``search``.
* **sampling** (:class:`SamplingStrategy`: Optuna; evolution would be one): implement ``work(ctx, worker)``
  (ask/train/tell on a study that several processes may share: ``nasreid hpo --workers N``) and
  ``finalize(ctx)``; train proxy networks with
  ``ctx.train_fixed(space.freeze(sample), epochs=..., hooks=[...], run_dir=run/"trials"/k)``. The engine tells
  the families apart with ``issubclass(cls, SamplingStrategy)``: a sampling search is never "done" (its study
  can be extended with more trials), and only sampling strategies run under ``nasreid hpo``.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from nasreid.config import RecipeError
from nasreid.errors import NasreidError
from nasreid.genotype import Genotype, GenotypeError
from nasreid.methods.base import COMMON_KEYS, param_groups_by_lr_mult
from nasreid.mutables import LayerChoice, ModelSpace, iter_layer_choices, simplify

__all__ = ["Strategy", "OneShotStrategy", "SamplingStrategy", "StrategyConfigError", "replace_module", "mix_outputs"]


class StrategyConfigError(NasreidError, ValueError):
    """Invalid strategy kwargs; the message names the key (``strategy.kwargs.<key>``)."""


def replace_module(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    """Put ``new`` at ``qualified_name`` (dotted module path) inside ``root``."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def mix_outputs(weights: torch.Tensor | Sequence[torch.Tensor], outputs: list) -> Any:
    """``sum_k weights[k] * outputs[k]`` for tensors, or element-wise for tuples of tensors: the mixed-op
    output of every one-shot strategy (MSINet Eq. 1, OSNet-AIN Eq. 5), whatever its candidates return
    (MSINet's interaction modules return the branch pair ``(x1, x2)``).

    Args:
        weights: ``[K]`` tensor (or K scalar tensors) of mixing weights; outputs: K tensors of one shape, or
            K tuples of such tensors. Summed in order ``k = 0..K-1``.

    Raises:
        TypeError: the candidates return something else, or tuples of different lengths.
    """
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        out = weights[0] * first
        for w, o in zip(weights[1:], outputs[1:]):
            out = out + w * o
        return out
    if isinstance(first, (tuple, list)):
        if any(not isinstance(o, (tuple, list)) or len(o) != len(first) for o in outputs):
            raise TypeError("candidates of a mixed op return tuples of different lengths")
        return tuple(mix_outputs(weights, [o[i] for o in outputs]) for i in range(len(first)))
    raise TypeError(f"candidates must return a tensor or a tuple of tensors, got {type(first).__name__}")


class Strategy:
    """Base class of search strategies.

    Subclasses set ``Config`` (a pydantic model of their kwargs, ``extra="forbid"``), implement
    :meth:`search` and :meth:`derive`, declare the common recipe keys they honour (:attr:`honours`), and
    register with ``@register_strategy("name")``.

    Raises:
        StrategyConfigError: invalid kwargs (names the key), or a space with no choice.
    """

    name: ClassVar[str] = "base"
    #: the common recipe keys (:data:`nasreid.methods.base.COMMON_KEYS`: ``optim.lr_mult``, ``loss.*``,
    #: ``training.freeze_backbone_epochs`` ...) this strategy's search honours, declared as training methods
    #: declare theirs; the recipe check (:func:`nasreid.engine.validate.check_recipe`) refuses a search recipe
    #: that sets another one to a value other than its default, by name. The base honours every key (a sampling
    #: strategy trains its proxies with the recipe's training method, which declares its own).
    honours: ClassVar[frozenset[str]] = frozenset(COMMON_KEYS)
    #: ``strategy.kwargs`` keys that choose the strategy's own held-out validation identities (Optuna's
    #: ``val_fraction``): a strategy that validates uses the recipe's ``data.val_ids`` identities when the recipe
    #: holds them out, and the recipe check refuses these keys then, by name
    validation_kwargs: ClassVar[tuple[str, ...]] = ()

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, space: ModelSpace, **kwargs: Any):
        self.cfg = self.validate_kwargs(kwargs)
        self.space = space
        self.choices = simplify(space)
        if not self.choices:
            raise StrategyConfigError(f"space {type(space).__name__} declares no choices to search")
        self.model: nn.Module | None = None

    @classmethod
    def validate_kwargs(cls, kwargs: Mapping[str, Any]) -> BaseModel:
        """``cls.Config`` of ``kwargs``, without building a space (the recipe check calls it up front).

        Raises:
            StrategyConfigError: unknown key or invalid value, named as ``strategy.kwargs.<key>``.
        """
        try:
            return cls.Config(**kwargs)
        except ValidationError as e:
            msgs = []
            for err in e.errors():
                loc = ".".join(map(str, err["loc"]))
                where = f"strategy.kwargs.{loc}" if loc else "strategy.kwargs"
                msgs.append(f"{where}: " + ("unknown key" if err["type"] == "extra_forbidden" else err["msg"]))
            raise StrategyConfigError(f"strategy {cls.name!r}: " + "; ".join(msgs)) from None

    # ---- the contract ----------------------------------------------------------------------------
    def search(self, ctx) -> Genotype:
        """Run the search in ``ctx`` (a :class:`~nasreid.engine.context.SearchContext`) and return the
        derived genotype. Must checkpoint into ``ctx.run_dir`` so that :meth:`derive` and ``--resume`` work."""
        raise NotImplementedError

    @classmethod
    def derive(cls, run_dir: str | Path, recipe) -> Genotype:
        """The genotype of a (finished or interrupted) search run folder, from what :meth:`search` saved.

        Raises:
            GenotypeError / CheckpointError: nothing derivable in the folder.
        """
        raise NotImplementedError

    @classmethod
    def plot_run(cls, run_dir: str | Path, recipe, out: str | Path | None = None,
                 formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
        """The plots of a search run folder of this strategy (``nasreid plot RUN``); returns the files written.

        Default: the architecture-weight trajectories of ``alphas.csv``
        (:func:`nasreid.plot.plot_alpha_trajectories`) into ``out`` (default: the run folder) in ``formats``.
        A strategy that logs something else overrides it (Optuna: its trials table and study plots).

        Raises:
            FileNotFoundError / ValueError: as :func:`~nasreid.plot.plot_alpha_trajectories` (no or empty
            ``alphas.csv``).
        """
        from nasreid.plot import plot_alpha_trajectories

        return plot_alpha_trajectories(run_dir, out, formats=formats)

    def probabilities(self) -> dict[str, dict[str, float]]:
        """Current ``{label: {value: probability}}`` of every choice (logged every epoch)."""
        raise NotImplementedError

    def temperature(self) -> float | None:
        """Current softmax temperature (Gumbel lambda) for logs, None when the strategy has none."""
        return None

    def export(self) -> dict[str, Any]:
        """The derived sample ``{label: value}``: argmax of :meth:`probabilities` per choice."""
        return _argmax_sample(self.choices, self.probabilities())

    def state_dict(self) -> dict[str, Any]:
        """Strategy state besides the model's parameters (noise generator, schedules ...), checkpointed."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def _genotype(self, sample: Mapping[str, Any], probs: Mapping[str, Mapping[str, float]], ctx_or_recipe,
                  **provenance: Any) -> Genotype:
        recipe = getattr(ctx_or_recipe, "recipe", ctx_or_recipe)
        return make_genotype(recipe, sample, probs, **provenance)


def _check_finite(probs: Mapping[str, Mapping[str, float]], where: str) -> None:
    """Raise :class:`GenotypeError` if any architecture probability is NaN or infinite (a diverged search)."""
    for label, p in probs.items():
        if not all(math.isfinite(v) for v in p.values()):
            raise GenotypeError(f"{where}architecture weights of {label!r} are not finite ({dict(p)}): the search "
                                "diverged; rerun it with a lower (architecture) learning rate")


def _argmax_sample(choices: Mapping[str, Any], probs: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    _check_finite(probs, "")
    out = {}
    for label, mut in choices.items():
        p = probs[label]
        best = max(p, key=p.__getitem__)
        out[label] = next(v for v in mut.values if str(v) == best)  # the mutable's typed value
    return out


def make_genotype(recipe, sample: Mapping[str, Any], probs: Mapping[str, Mapping[str, float]],
                  **provenance: Any) -> Genotype:
    """A :class:`Genotype` of ``recipe.space`` with the run's provenance (strategy, dataset, seed ...)."""
    return Genotype(
        space=recipe.space.name, choices=dict(sample), probabilities={k: dict(v) for k, v in probs.items()},
        space_kwargs=dict(recipe.space.kwargs),
        provenance={"strategy": recipe.strategy.name if recipe.strategy else None,
                    "epochs": recipe.optim.epochs, "dataset": recipe.data.dataset.name, "seed": recipe.seed,
                    **provenance})


class OneShotStrategy(Strategy):
    """Base of one-shot strategies: one supernet trained on the training split, weights and architecture
    parameters in one optimiser (two parameter groups), per-epoch architecture logging, argmax derive.

    Subclasses implement :meth:`attach`, :meth:`train_step`, :meth:`probabilities` and may add
    :meth:`hooks` (called with the trainer) and :meth:`arch_parameters`.

    Raises:
        StrategyConfigError: the space declares value choices (``Categorical`` / ``Numerical``: stripe counts,
            augmentation settings ...), which a weight-sharing supernet cannot mix; search those with a
            sampling strategy (``optuna``).
    """

    def __init__(self, space: ModelSpace, **kwargs: Any):
        super().__init__(space, **kwargs)
        values = [label for label, m in self.choices.items() if not isinstance(m, LayerChoice)]
        if values:
            raise StrategyConfigError(
                f"strategy {self.name!r} mixes layer choices only; space {getattr(space, 'space_name', '?')!r} "
                f"declares value choices {values}: search it with a sampling strategy (optuna)")

    def attach(self) -> nn.Module:
        """Return the supernet to train (the space with choices replaced by the strategy's mixed ops)."""
        raise NotImplementedError

    def arch_parameters(self) -> list[nn.Parameter]:
        """Architecture parameters (pi / alpha); empty for path-sampling strategies."""
        return []

    def weight_parameters(self) -> list[nn.Parameter]:
        """Network weights (everything trainable that is not an architecture parameter)."""
        arch = {id(p) for p in self.arch_parameters()}
        assert self.model is not None, "call attach() first"
        return [p for p in self.model.parameters() if id(p) not in arch and p.requires_grad]

    def weight_groups(self, lr: float, weight_decay: float,
                      lr_mult: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
        """Optimiser groups of the network weights (:meth:`weight_parameters`): one group ``"weights"`` at
        ``lr`` without ``lr_mult`` (the layout without multipliers); with ``lr_mult`` (recipe ``optim.lr_mult``,
        patterns over the supernet's parameter names) the groups of
        :func:`~nasreid.methods.base.param_groups_by_lr_mult` -- ``"weights"`` at ``lr``, then one per pattern at
        ``lr * multiplier`` -- without the architecture parameters, whose lr is the strategy's own. Every group
        carries ``weight_decay``.

        Raises:
            RecipeError: a pattern that matches no parameter, or only architecture parameters (names it); a
                negative or non-finite multiplier.
        """
        if not lr_mult:
            return [{"params": self.weight_parameters(), "lr": lr, "weight_decay": weight_decay, "name": "weights"}]
        assert self.model is not None, "call attach() first"
        arch = {id(p) for p in self.arch_parameters()}
        named = list(self.model.named_parameters())
        for pattern in lr_mult:
            hit = [p for n, p in named if fnmatch.fnmatchcase(n, pattern)]
            if hit and all(id(p) in arch for p in hit):
                raise RecipeError(f"optim.lr_mult: pattern {pattern!r} matches only architecture parameters of "
                                  f"strategy {self.name!r}; their lr is strategy.kwargs.arch_lr")
        groups = param_groups_by_lr_mult(self.model, lr, lr_mult)
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in arch]
            g["weight_decay"] = weight_decay
        groups[0]["name"] = "weights"
        return groups

    def param_groups(self, lr: float, weight_decay: float,
                     lr_mult: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
        """Optimiser parameter groups: the weights (:meth:`weight_groups`: recipe ``optim.lr`` /
        ``weight_decay``, split by ``optim.lr_mult``) and, when the strategy has any, the architecture
        parameters last (group ``"arch"``: its own ``arch_lr`` / ``arch_weight_decay``).

        Raises:
            RecipeError: a bad ``lr_mult`` pattern (see :meth:`weight_groups`).
        """
        groups = self.weight_groups(lr, weight_decay, lr_mult)
        arch = self.arch_parameters()
        if arch:
            groups.append({"params": arch, "lr": getattr(self.cfg, "arch_lr", None) or lr,
                           "weight_decay": getattr(self.cfg, "arch_weight_decay", 0.0), "name": "arch"})
        return groups

    def hooks(self) -> list:
        """Extra trainer hooks of this strategy (e.g. the temperature schedule); none by default."""
        return []

    def on_epoch_start(self, epoch: int, epochs: int) -> dict[str, float]:
        """Called at the start of each epoch (0-based) by the strategy's hook; returns scalars to log."""
        return {}

    def train_step(self, batch: dict, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                   scaler: "torch.amp.GradScaler | None" = None, grad_clip: float | None = None,
                   autocast: Callable | None = None) -> dict[str, float]:
        """One optimisation step on ``batch`` (``img [B,3,H,W]``, ``pid [B]`` ... on the device); returns
        detached scalars (``loss``, ``ce``, ``acc``, ...)."""
        raise NotImplementedError

    # ---- the shared loop -------------------------------------------------------------------------
    #: the shared loop below honours every common key: ``optim.lr_mult`` (:meth:`param_groups`),
    #: ``optim.grad_clip``, the ``loss`` section (``ctx.build_loss``), ``model.pretrained`` (the warm-started
    #: space) and ``training.freeze_backbone_epochs`` / ``open_layers``; a subclass with its own ``search``
    #: declares what that loop honours
    honours: ClassVar[frozenset[str]] = frozenset(COMMON_KEYS)

    def search(self, ctx) -> Genotype:
        """Train the supernet for ``optim.epochs`` on the training split (resuming from the run's
        checkpoint), logging ``alphas.csv`` every epoch; return the argmax genotype. The weights train at
        ``optim.lr`` times their ``optim.lr_mult`` multiplier (:meth:`param_groups`).

        With ``training.freeze_backbone_epochs`` (a supernet warm-started from pretrained weights,
        ``model.pretrained``), the first epochs train only ``training.open_layers`` (default: the network's head,
        :class:`~nasreid.engine.hooks.FreezeBackboneHook`), as the OSNet-AIN fine-tune does (Sec. 4.1); the
        architecture weights live in the supernet's choices, so they wait for the open epochs with the blocks
        they weigh (unless ``open_layers`` names them). A new classifier's random gradients would otherwise wash
        out the pretrained blocks (measured: loss at chance after 3 epochs of the warm-started CPU search
        without it)."""
        history = self.train_supernet(ctx)
        return self._genotype(self.export(), self.probabilities(), ctx, epoch=len(history),
                              run=ctx.run_dir.name, rule="argmax of architecture weights per choice")

    def train_supernet(self, ctx) -> list[dict[str, Any]]:
        """The shared loop of :meth:`search` without the derivation: attach, train for ``optim.epochs`` (resuming
        from ``checkpoints/last.pt``; a finished checkpoint only loads its weights), log ``alphas.csv``. Returns
        the trainer's per-epoch history (every epoch of the run, the resumed ones included). A strategy that
        selects its genotype otherwise after training (``spos``: an evolutionary search on validation) calls it
        and then works on the trained supernet ``self.model``.

        Raises:
            RecipeError / NonFiniteLossError: as the trainer (no batch, a diverged loss)."""
        from nasreid.engine.hooks import ArchitectureLogHook, FreezeBackboneHook, StrategyStateHook

        supernet = self.attach()
        model = ctx.device.model(supernet)
        o = ctx.recipe.optim
        optimizer = ctx.build_optimizer(self.param_groups(o.lr, o.weight_decay, o.lr_mult))
        scheduler = ctx.build_scheduler(optimizer)
        loss_fn = ctx.build_loss()
        clip = ctx.recipe.optim.grad_clip

        def step(trainer, batch):
            return self.train_step(batch, loss_fn, optimizer, scaler=ctx.device.scaler, grad_clip=clip,
                                   autocast=ctx.device.autocast)

        hooks = [*self.hooks(), ArchitectureLogHook(self, ctx.run_dir / "alphas.csv"), StrategyStateHook(self)]
        freeze = FreezeBackboneHook.from_recipe(ctx.recipe, supernet)  # a warm-started supernet: the new
        if freeze is not None:                                           # classifier learns first (Sec. 4.1)
            hooks.insert(0, freeze)
        trainer = ctx.trainer(model, step, loader=ctx.loader(), optimizer=optimizer, scheduler=scheduler,
                              hooks=hooks)
        self.forward_model = trainer.forward_model
        return trainer.fit()

    def state_dict(self) -> dict[str, Any]:
        # probabilities and the derived sample ride along, so derive needs no supernet rebuild
        return {"probabilities": self.probabilities(), "sample": self.export()}

    @classmethod
    def derive(cls, run_dir: str | Path, recipe) -> Genotype:
        """Argmax genotype from ``checkpoints/last.pt`` (OSNet-AIN "Search Outcome": omega* = argmax pi).

        Raises:
            CheckpointError: no checkpoint yet. GenotypeError: it holds no architecture weights, or they
            are not finite (a diverged search).
        """
        from nasreid.engine.checkpoint import load_checkpoint

        run = Path(run_dir)
        ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
        st = (ckpt.get("hooks") or {}).get("strategy") or {}
        if "probabilities" not in st:
            raise GenotypeError(f"{run}: the checkpoint holds no architecture weights (is this a one-shot search run?)")
        probs = st["probabilities"]
        _check_finite(probs, f"{run}: ")
        sample = dict(st.get("sample") or {})
        return make_genotype(recipe, sample, probs, epoch=int(ckpt["epoch"]) + 1, run=run.name,
                             rule="argmax of architecture weights per choice")

    # ---- helpers for subclasses -----------------------------------------------------------------
    def _replace_choices(self, factory: Callable[[LayerChoice], LayerChoice]) -> nn.Module:
        for name, lc in list(iter_layer_choices(self.space)):
            replace_module(self.space, name, factory(lc))
        self.model = self.space
        return self.space

    def _forward_backward(self, batch: dict, loss_fn: Callable, scaler, autocast, scale: float = 1.0):
        """Forward ``batch['img']``, loss on ``(outputs, batch)`` (times ``scale``), finite check, backward."""
        from nasreid.engine.trainer import backward

        net = getattr(self, "forward_model", None) or self.model  # DDP wrapper under torchrun
        assert net is not None  # the subclass's search sets self.model before its steps
        with autocast() if autocast is not None else contextlib.nullcontext():
            loss, parts = loss_fn(net(batch["img"]), batch)
        backward(loss * scale if scale != 1.0 else loss, scaler, parts)
        return parts


class SamplingStrategy(Strategy):
    """Base of sampling strategies: each step samples a fixed network from the space, trains it as a proxy
    (``ctx.train_fixed``) and scores it; there is no supernet.

    Subclasses implement :meth:`work` (the ask/train/tell loop one process runs on a study that several
    processes may share: ``nasreid hpo --workers N`` runs it in each worker) and :meth:`finalize` (the
    derived genotype once the loop is done, plus any report); :meth:`search` is ``work`` then ``finalize``.
    A sampling search is never "done": ``nasreid search --resume`` / ``nasreid hpo --resume`` run the loop
    again, which adds the trials a larger ``trials`` setting asks for.
    """

    def search(self, ctx) -> Genotype:
        """This process's share of the study (:meth:`work`), then :meth:`finalize`."""
        self.work(ctx)
        return self.finalize(ctx)

    def work(self, ctx, worker: int = 0) -> int:
        """Sample, train and score until the study is complete (shared with other workers); returns the
        number of samples this worker finished. ``worker`` numbers the process (logs, device choice)."""
        raise NotImplementedError

    def finalize(self, ctx) -> Genotype:
        """The derived genotype of the study in ``ctx.run_dir`` (and its report files)."""
        raise NotImplementedError
