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
    """Uniform random sampling baseline.

    Kwargs:
        seed: seed of the path sampling and of the exported draw.
        fair: strict fairness (Chu et al., "FairNAS: Rethinking Evaluation Fairness of Weight Sharing Neural
            Architecture Search", ICCV 2021, Sec. 3.2, Alg. 1): each step draws, per choice, a random permutation of
            its m candidates and runs m single paths (path k takes the k-th entry of every permutation), their
            gradients accumulated (each loss divided by m) before one optimiser step, so every candidate of every
            choice is trained exactly once per step (m times the forward/backward work of a uniform step).
            Default off: one uniformly drawn path per step (SPOS, Eq. 4-5).
    """

    name = "random"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        seed: int = 0
        fair: bool = False

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
        """One SGD step of the supernet: one uniformly sampled path per choice, or with ``fair`` the m paths of
        strict fairness (FairNAS Alg. 1; losses averaged over the paths, which the returned scalars are)."""
        optimizer.zero_grad(set_to_none=True)
        if not getattr(self.cfg, "fair", False):
            parts = self._forward_backward(batch, loss_fn, scaler, autocast)
            out = {k: float(v) for k, v in parts.items()}
        else:
            ops = list(self.ops.values())
            perms = [self.rng.sample(op._keys, len(op._keys)) for op in ops]
            m = max(len(p) for p in perms)
            out = {}
            try:
                for k in range(m):
                    for op, perm in zip(ops, perms):
                        op.fixed = perm[k % len(perm)]
                    parts = self._forward_backward(batch, loss_fn, scaler, autocast, scale=1.0 / m)
                    for key, v in parts.items():
                        out[key] = out.get(key, 0.0) + float(v) / m
            finally:
                for op in ops:
                    op.fixed = None
        optimizer_step(optimizer, self.weight_parameters(), scaler, grad_clip)
        return out

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
