"""The strategy interface: how a search algorithm drives a space, whatever the space is.

A strategy knows a space only through :mod:`nasreid.mutables` (``simplify``, ``iter_layer_choices``,
``freeze``). The search engine (:mod:`nasreid.engine.search`) calls, per run::

    strategy = StrategyCls(space, **recipe.strategy.kwargs)   # kwargs validated by StrategyCls.Config
    model = strategy.attach()                 # supernet to train (mixed ops in place of choices)
    groups = strategy.param_groups(optim_cfg) # optimiser parameter groups (weights, architecture)
    for epoch: strategy.on_epoch_start(epoch, epochs)
               for batch: parts = strategy.train_step(batch, loss_fn, optimizer, ...)
               strategy.probabilities() -> {label: {value: p}}     # logged to alphas.csv / TensorBoard
    strategy.export() -> {label: value}                            # the derived sample (genotype choices)

One-shot strategies (Gumbel, DARTS) implement all of it; sampling strategies (random, Optuna) use
:meth:`Strategy.propose` / :meth:`Strategy.report` through their own loop.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from nasreid.errors import NasreidError
from nasreid.mutables import LayerChoice, ModelSpace, iter_layer_choices, simplify

__all__ = ["Strategy", "StrategyConfigError", "replace_module"]


class StrategyConfigError(NasreidError, ValueError):
    """Invalid strategy kwargs; the message names the key (``strategy.kwargs.<key>``)."""


def replace_module(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    """Put ``new`` at ``qualified_name`` (dotted module path) inside ``root``."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class Strategy:
    """Base class of search strategies.

    Subclasses set ``Config`` (a pydantic model of their kwargs, ``extra="forbid"``) and implement
    :meth:`attach`, :meth:`train_step`, :meth:`probabilities`, :meth:`export`.
    """

    name: ClassVar[str] = "base"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, space: ModelSpace, **kwargs: Any):
        try:
            self.cfg = self.Config(**kwargs)
        except ValidationError as e:
            msgs = []
            for err in e.errors():
                loc = ".".join(map(str, err["loc"]))
                msgs.append(f"strategy.kwargs.{loc}: " + ("unknown key" if err["type"] == "extra_forbidden" else err["msg"]))
            raise StrategyConfigError(f"strategy {self.name!r}: " + "; ".join(msgs)) from None
        self.space = space
        self.choices = simplify(space)
        if not self.choices:
            raise StrategyConfigError(f"space {type(space).__name__} declares no choices to search")
        self.model: nn.Module | None = None

    # ---- one-shot interface ---------------------------------------------------------------------
    def attach(self) -> nn.Module:
        """Return the supernet to train (the space with choices replaced by the strategy's mixed ops)."""
        raise NotImplementedError

    def arch_parameters(self) -> list[nn.Parameter]:
        """Architecture parameters (pi / alpha); empty for sampling strategies."""
        return []

    def weight_parameters(self) -> list[nn.Parameter]:
        """Network weights (everything trainable that is not an architecture parameter)."""
        arch = {id(p) for p in self.arch_parameters()}
        assert self.model is not None, "call attach() first"
        return [p for p in self.model.parameters() if id(p) not in arch and p.requires_grad]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups: the weights (recipe ``optim.lr`` / ``weight_decay``) and, when the
        strategy has any, the architecture parameters (its own ``arch_lr`` / ``arch_weight_decay``)."""
        groups = [{"params": self.weight_parameters(), "lr": lr, "weight_decay": weight_decay, "name": "weights"}]
        arch = self.arch_parameters()
        if arch:
            groups.append({"params": arch, "lr": getattr(self.cfg, "arch_lr", None) or lr,
                           "weight_decay": getattr(self.cfg, "arch_weight_decay", 0.0), "name": "arch"})
        return groups

    def on_epoch_start(self, epoch: int, epochs: int) -> dict[str, float]:
        """Hook at the start of each epoch (0-based); returns scalars to log (e.g. ``{"lambda": 9.5}``)."""
        return {}

    def train_step(self, images: torch.Tensor, pids: torch.Tensor, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                   scaler: "torch.amp.GradScaler | None" = None, grad_clip: float | None = None,
                   **batch: Any) -> dict[str, float]:
        """One optimisation step; returns detached scalars (``loss``, ``ce``, ``acc``, ...)."""
        raise NotImplementedError

    def probabilities(self) -> dict[str, dict[str, float]]:
        """Current ``{label: {value: probability}}`` of every choice."""
        raise NotImplementedError

    def export(self) -> dict[str, Any]:
        """The derived sample ``{label: value}`` (argmax of the architecture weights)."""
        probs = self.probabilities()
        out = {}
        for label, mut in self.choices.items():
            p = probs[label]
            best = max(p, key=p.get)
            # map the string key back to the mutable's typed value
            out[label] = next(v for v in mut.values if str(v) == best)
        return out

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Strategy state besides the model's parameters (sampler RNG, schedules, ...)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    # ---- helpers for subclasses -----------------------------------------------------------------
    def _replace_choices(self, factory: Callable[[LayerChoice], LayerChoice]) -> nn.Module:
        for name, lc in list(iter_layer_choices(self.space)):
            replace_module(self.space, name, factory(lc))
        self.model = self.space
        return self.space
