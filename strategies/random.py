"""Random-sampling baseline (Li & Talwalkar, "Random Search and Reproducibility for NAS", UAI 2019;
single-path uniform sampling as in Guo et al., "Single Path One-Shot NAS", ECCV 2020, Sec. 3.2).

The supernet is trained with one uniformly sampled candidate per choice per step; the exported
architecture is a uniform random sample of the space drawn from ``seed`` -- the baseline a searched
architecture has to beat at equal retraining budget.
"""
from __future__ import annotations

import random as _random
from typing import Any, Mapping

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from nasreid.engine.trainer import optimizer_step
from nasreid.mutables import LayerChoice
from nasreid.registry import register_strategy

from .base import OneShotStrategy

__all__ = ["RandomStrategy", "UniformPathOp"]


class UniformPathOp(LayerChoice):
    """A choice that runs one uniformly sampled candidate per training forward (the first in eval)."""

    def __init__(self, choice: LayerChoice, rng: _random.Random):
        super().__init__({str(k): m for k, m in choice.candidates.items()}, label=choice.label)
        self._keys = list(choice.values)
        self.rng = rng
        self.fixed: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (self.fixed if self.fixed is not None
               else (self.rng.choice(self._keys) if self.training else self._keys[0]))
        return self.candidates[str(key)](x)


@register_strategy("random")
class RandomStrategy(OneShotStrategy):
    """Uniform random sampling baseline. Kwargs: ``seed`` (int)."""

    name = "random"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        seed: int = 0

    cfg: Config  # the validated ``strategy.kwargs`` (set by Strategy.__init__)

    def __init__(self, space, **kwargs: Any):
        super().__init__(space, **kwargs)
        self.rng = _random.Random(self.cfg.seed)
        self.ops: dict[str, UniformPathOp] = {}
        self._sample = {label: self.rng.choice(m.values) for label, m in self.choices.items()}

    def attach(self) -> nn.Module:
        def factory(lc: LayerChoice) -> UniformPathOp:
            op = UniformPathOp(lc, self.rng)
            self.ops[lc.label] = op
            return op
        return self._replace_choices(factory)

    def train_step(self, batch, loss_fn, optimizer, scaler=None, grad_clip=None, autocast=None):
        """One SGD step of the supernet with one uniformly sampled path per choice."""
        optimizer.zero_grad(set_to_none=True)
        parts = self._forward_backward(batch, loss_fn, scaler, autocast)
        optimizer_step(optimizer, self.weight_parameters(), scaler, grad_clip)
        return {k: float(v) for k, v in parts.items()}

    def probabilities(self) -> dict[str, dict[str, float]]:
        """One-hot on the drawn sample (the baseline has no learned weights)."""
        return {label: {str(v): float(v == self._sample[label]) for v in m.values}
                for label, m in self.choices.items()}

    def export(self) -> dict[str, Any]:
        return dict(self._sample)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.rng.getstate(), "sample": self._sample}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self._sample = dict(state["sample"])
