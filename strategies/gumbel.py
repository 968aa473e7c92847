"""One-shot Gumbel-softmax search (OSNet-AIN, Zhou et al. TPAMI 2021, Sec. 3.3, Eq. 5-15).

Each choice becomes a :class:`GumbelMixedOp` holding learnable architecture parameters pi (one per
candidate; ``softmax(pi)`` is P(alpha_omega = 1) of Eq. 7). Every forward pass draws Gumbel noise
``z = -log(-log u)`` and forms the relaxed one-hot

    alpha = softmax((log softmax(pi) + z) / lambda)                                   (Eq. 8)

and the block output ``y = sum_omega alpha_omega * omega(x)`` (Eq. 5). Weights theta and pi are trained
jointly by SGD on the Monte-Carlo estimate of Eq. 9 with S samples (Eq. 12 and 15).

Temperature schedule (a trainer hook, :class:`LambdaScheduleHook`), floor ``lambda_min`` ("setting
lambda < 1 makes the training unstable", footnote 6):

* ``lambda_decay: subtractive`` -- ``lambda_start - lambda_step * (epoch // lambda_every)``: the paper's text
  ("starts from 10 and decreases by 0.5 every 20 epochs": 10 -> 7.5 over 120 epochs);
* ``lambda_decay: multiplicative`` -- ``lambda_start * lambda_rate ** (epoch // lambda_every)``: the authors'
  released configuration (deep-person-reid ``projects/OSNet_AIN``: ``init_lmda 10``, ``lmda_decay_step 20``,
  ``lmda_decay_rate 0.5``, ``min_lmda 1``): 10, 5, 2.5, 1.25, 1, 1 over 120 epochs, reaching the floor of 1.

Modes:
* ``soft`` -- every candidate runs and is weighted by alpha (Eq. 5 as written);
* ``hard`` -- straight-through Gumbel estimator (Jang et al., ICLR 2017, Sec. 2.2):
  ``y = sum_omega h_omega * omega(x)`` with ``h = onehot(argmax alpha) - stopgrad(alpha) + alpha``, whose
  value is the one-hot sample, so the weights theta are trained through the sampled path only, while
  ``dL/dalpha_omega = <dL/dy, omega(x)>`` for *every* candidate. With ``hard_gradient: full`` (default) the
  other candidates run without autograd (their outputs enter only the gradient of alpha); with ``selected``
  only the sampled path runs (GDAS-style, cheapest). ``selected`` gives pi no gradient when the block is
  followed by a scale-invariant layer (a BN right after the block, e.g. OSNet's transitions and conv5):
  ``dL/dh = <dL/dy, y> = 0`` there, which is why ``full`` is the default.

At the end the derived architecture takes ``argmax pi`` per block ("Search Outcome").
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from nasreid.engine.trainer import Hook, optimizer_step
from nasreid.mutables import LayerChoice
from nasreid.registry import register_strategy

from .base import OneShotStrategy, mix_outputs

__all__ = ["GumbelMixedOp", "GumbelStrategy", "StraightThroughMix", "LambdaScheduleHook", "gumbel_softmax_sample",
           "lambda_schedule"]


def gumbel_softmax_sample(pi: torch.Tensor, lam: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Relaxed one-hot alpha of Eq. 8 for logits ``pi`` (shape ``[N]``) at temperature ``lam`` > 0.

    ``log pi_omega`` of Eq. 8 is the log-probability ``log_softmax(pi)`` (pi are unnormalised logits).
    Returns ``[N]`` non-negative weights summing to 1, differentiable w.r.t. ``pi``.
    """
    u = torch.rand(pi.shape, generator=generator, device="cpu", dtype=torch.float32).to(pi.device, pi.dtype)
    z = -torch.log(-torch.log(u.clamp_(1e-10, 1 - 1e-7)))
    return F.softmax((F.log_softmax(pi, dim=-1) + z) / lam, dim=-1)


def lambda_schedule(epoch: int, start: float, step: float, every: int, minimum: float,
                    decay: str = "subtractive", rate: float = 0.5) -> float:
    """Temperature at (0-based) ``epoch``: ``max(minimum, start - step * (epoch // every))`` (subtractive,
    the paper's text) or ``max(minimum, start * rate ** (epoch // every))`` (multiplicative, the authors'
    released configuration).

    Raises:
        ValueError: unknown ``decay``.
    """
    if decay == "subtractive":
        return max(minimum, start - step * (epoch // every))
    if decay == "multiplicative":
        return max(minimum, start * rate ** (epoch // every))
    raise ValueError(f"unknown lambda decay {decay!r}; expected 'subtractive' or 'multiplicative'")


class LambdaScheduleHook(Hook):
    """Sets the strategy's temperature at the start of every epoch (``strategy.on_epoch_start``) and logs
    it as the epoch scalar ``lambda``."""

    name = "lambda_schedule"

    def __init__(self, strategy: "GumbelStrategy"):
        self.strategy = strategy

    def before_epoch(self, trainer) -> None:
        trainer.log(**self.strategy.on_epoch_start(trainer.epoch, trainer.epochs))


class StraightThroughMix(torch.autograd.Function):
    """The hard-mode block output ``y = sum_k h_k o_k`` (straight-through Gumbel, Jang et al., ICLR 2017, Sec. 2.2)
    computed from what its value and gradient need. ``h = onehot - stopgrad(alpha) + alpha`` has the value
    ``h_sel`` (1 up to rounding) on the sampled candidate and exactly 0 elsewhere, so the forward is
    ``y = h_sel * o_sel`` -- bit for bit what the sum gives, as ``0 * o_k`` adds ``+-0`` -- without the K - 1
    products and sums over activation-sized tensors; the backward is the sum's: ``dL/do_sel = h_sel * g`` and
    ``dL/dh_k = <g, o_k>`` for every candidate (the outputs ``o_k`` of the other candidates were computed without
    autograd and get no gradient). Measured on 2 CPU cores: about 5% of a supernet training step at 256x128.

    Args (of ``apply``):
        h: ``[K]`` straight-through weights, the sampled candidate first.
        o_sel: the sampled candidate's output (with autograd), ``[B, C, H, W]``.
        *o_rest: the other K - 1 candidates' outputs (no autograd), same shape, in the order of ``h[1:]``.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, o_sel: torch.Tensor, *o_rest: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(h, o_sel, *o_rest)
        ctx.unit = _is_one(h[0])
        return o_sel if ctx.unit else o_sel * h[0]  # o * 1 == o bit for bit: the product is skipped

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        h, o_sel, *o_rest = ctx.saved_tensors
        grad_h = torch.stack([_inner(g, o) for o in (o_sel, *o_rest)]).to(h.dtype)
        return (grad_h, g if ctx.unit else g * h[0], *([None] * len(o_rest)))


def _is_one(w: torch.Tensor) -> bool:
    """Whether the 0-d weight ``w`` is exactly 1 (read on the CPU only: on CUDA the read would synchronise)."""
    return w.device.type == "cpu" and bool(w == 1)


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b> = sum(a * b)`` of two tensors of one shape, as one ``torch.dot`` over their memory when both have
    the same dense layout (standard or channels_last): no activation-sized temporary. Shapes ``[B, C, H, W]`` -> 0-d."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        if a.dim() == 4 and a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt):
            if fmt is torch.channels_last:
                a, b = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)  # dense views in memory order
            return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum()


class GumbelMixedOp(LayerChoice):
    """A :class:`LayerChoice` whose forward mixes candidates with Gumbel-softmax weights (Eq. 5, 8).

    Keeps the choice's ``label`` and ``candidates`` (so :func:`nasreid.mutables.freeze` works on the
    supernet) and adds ``pi``: ``nn.Parameter [num_candidates]``, initialised to zeros (uniform P).

    In eval mode the op runs the argmax candidate only (the derived network).
    """

    def __init__(self, choice: LayerChoice, mode: str = "hard", lam: float = 10.0,
                 init_std: float = 1e-3, generator: torch.Generator | None = None, hard_gradient: str = "full"):
        super().__init__({str(k): m for k, m in choice.candidates.items()}, label=choice.label)
        self._keys = list(choice.values)
        self.mode = mode
        self.hard_gradient = hard_gradient
        self.lam = lam
        self.generator = generator
        self.pi = nn.Parameter(torch.randn(len(self._keys), generator=generator) * init_std)
        self.last_alpha: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = list(self.candidates.values())
        if not self.training:
            return ops[int(self.pi.argmax())](x)
        alpha = gumbel_softmax_sample(self.pi, self.lam, self.generator)
        self.last_alpha = alpha.detach()
        if self.mode == "soft":
            return mix_outputs(alpha, [op(x) for op in ops])
        idx = int(alpha.argmax())
        hard = torch.zeros_like(alpha)
        hard[idx] = 1.0
        h = hard - alpha.detach() + alpha  # straight-through: value one-hot, gradient of alpha
        weights, outs = [h[idx]], [ops[idx](x)]
        if self.hard_gradient == "full":
            for k, op in enumerate(ops):
                if k != idx:
                    with torch.no_grad():
                        outs.append(op(x))  # value + 0; gradient <dL/dy, omega_k(x)> to alpha_k
                    weights.append(h[k])
        if all(isinstance(o, torch.Tensor) for o in outs):
            return StraightThroughMix.apply(torch.stack(weights), *outs)
        return mix_outputs(weights, outs)  # candidates returning tuples (MSINet's interaction modules)

    def probabilities(self) -> dict[str, float]:
        """``softmax(pi)`` as ``{value: p}`` (Eq. 7)."""
        p = F.softmax(self.pi.detach().float(), dim=-1).tolist()
        return {str(k): float(v) for k, v in zip(self._keys, p)}

    def extra_repr(self) -> str:
        return f"label={self.label!r}, mode={self.mode!r}, lambda={self.lam}"


@register_strategy("gumbel")
class GumbelStrategy(OneShotStrategy):
    """Gumbel-softmax one-shot search (OSNet-AIN Sec. 3.3). See the module docstring for equations.

    Kwargs (``strategy.kwargs`` of the recipe):
        mode: ``"hard"`` (straight-through, one path per step) or ``"soft"`` (all candidates).
        hard_gradient: ``"full"`` (all candidates' outputs feed the gradient of alpha, computed without
            autograd) or ``"selected"`` (sampled path only; see the module docstring).
        samples: S, Monte-Carlo samples per step (Eq. 12, 15); losses of the S forwards are averaged.
        lambda_start, lambda_step, lambda_every, lambda_min: temperature schedule (paper 10, 0.5, 20, 1).
        lambda_decay: ``"subtractive"`` (paper text, default) or ``"multiplicative"`` (authors' code) with
            ``lambda_rate`` (0.5).
        arch_lr: learning rate of pi (None: the weights' lr); arch_weight_decay: weight decay of pi.
        seed: seed of the Gumbel noise generator.

    Raises:
        StrategyConfigError: unknown or invalid kwargs (names the key).
    """

    name = "gumbel"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mode: Literal["hard", "soft"] = "hard"
        hard_gradient: Literal["full", "selected"] = "full"
        samples: int = Field(1, ge=1)
        lambda_start: float = Field(10.0, gt=0)
        lambda_step: float = Field(0.5, ge=0)
        lambda_every: int = Field(20, ge=1)
        lambda_min: float = Field(1.0, gt=0)
        lambda_decay: Literal["subtractive", "multiplicative"] = "subtractive"
        lambda_rate: float = Field(0.5, gt=0, le=1)
        arch_lr: float | None = Field(None, gt=0)
        arch_weight_decay: float = Field(0.0, ge=0)
        init_std: float = Field(1e-3, ge=0)
        seed: int = 0

    cfg: Config  # the validated ``strategy.kwargs`` (set by Strategy.__init__)

    def __init__(self, space, **kwargs: Any):
        super().__init__(space, **kwargs)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.lam = self.cfg.lambda_start
        self.ops: dict[str, GumbelMixedOp] = {}

    def attach(self) -> nn.Module:
        def factory(lc: LayerChoice) -> GumbelMixedOp:
            op = GumbelMixedOp(lc, mode=self.cfg.mode, lam=self.lam, init_std=self.cfg.init_std,
                               generator=self.generator, hard_gradient=self.cfg.hard_gradient)
            self.ops[lc.label] = op
            return op

        return self._replace_choices(factory)

    def arch_parameters(self) -> list[nn.Parameter]:
        return [op.pi for op in self.ops.values()]

    def set_lambda(self, lam: float) -> None:
        """Set the Gumbel-softmax temperature lambda (Eq. 8) of every mixed op."""
        self.lam = lam
        for op in self.ops.values():
            op.lam = lam

    def temperature(self) -> float:
        return self.lam

    def hooks(self) -> list[Hook]:
        return [LambdaScheduleHook(self)]

    def on_epoch_start(self, epoch: int, epochs: int) -> dict[str, float]:
        c = self.cfg
        self.set_lambda(lambda_schedule(epoch, c.lambda_start, c.lambda_step, c.lambda_every, c.lambda_min,
                                        c.lambda_decay, c.lambda_rate))
        return {"lambda": self.lam}

    def train_step(self, batch: dict, loss_fn: Callable, optimizer, scaler=None, grad_clip=None,
                   autocast: Callable | None = None) -> dict[str, float]:
        """Eq. 12 & 15: average the loss over S Gumbel samples (each forward draws its own noise; the
        gradients of the S losses, each divided by S, accumulate), one SGD step on theta and pi jointly."""
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        S = self.cfg.samples
        for _ in range(S):
            parts = self._forward_backward(batch, loss_fn, scaler, autocast, scale=1.0 / S)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v) / S
        optimizer_step(optimizer, self.weight_parameters(), scaler, grad_clip)
        totals["lambda"] = self.lam
        return totals

    def probabilities(self) -> dict[str, dict[str, float]]:
        return {label: op.probabilities() for label, op in self.ops.items()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lambda": self.lam, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.set_lambda(float(state["lambda"]))
        self.generator.set_state(state["generator"])
