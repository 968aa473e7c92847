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

At the end the derived architecture takes ``argmax pi`` per block ("Search Outcome"). With ``validate_top_k: K``
(or ``nasreid derive RUN --top-k K``) it is instead chosen on validation among the K most probable genotypes under
the final ``prod_l softmax(pi_l)`` (:func:`top_k_samples`, exact), each scored with the supernet's inherited weights
and recalibrated BN on the recipe's validation identities (:func:`select_on_validation`, ``RUN/derive_top_k.csv``).
"""
from __future__ import annotations

import csv
import heapq
import itertools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from nasreid.config import RecipeError
from nasreid.engine.trainer import Hook, optimizer_step
from nasreid.genotype import Genotype, GenotypeError
from nasreid.mutables import LayerChoice
from nasreid.registry import register_strategy

from .base import OneShotStrategy, make_genotype, mix_outputs

__all__ = ["GumbelMixedOp", "GumbelStrategy", "StraightThroughMix", "LambdaScheduleHook", "gumbel_softmax_sample",
           "lambda_schedule", "top_k_samples", "select_on_validation", "TOP_K_CSV"]

log = logging.getLogger("nasreid")

#: the file of the validation derive (one row per genotype of the top K by probability)
TOP_K_CSV = "derive_top_k.csv"


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
        validate_top_k: 0 (default): the derived genotype is ``argmax pi`` per choice. K > 0: the best on validation
            (``validate_score``) of the K most probable genotypes under ``prod_l softmax(pi_l)``, each scored with the
            supernet's weights after ``validate_bn_batches`` batches of BN recalibration (:func:`select_on_validation`;
            the recipe must set ``data.val_ids``); ``nasreid derive`` of the run does the same.
        validate_bn_batches: K batches of BN recalibration per scored genotype (10). validate_score: ``val_mAP``
            (default) or ``val_rank1``.

    Raises:
        StrategyConfigError: unknown or invalid kwargs (names the key). RecipeError (from :meth:`search` / derive):
            ``validate_top_k`` > 0 in a recipe without ``data.val_ids``.
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
        validate_top_k: int = Field(0, ge=0)
        validate_bn_batches: int = Field(10, ge=0)
        validate_score: Literal["val_mAP", "val_rank1"] = "val_mAP"

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

    def search(self, ctx) -> Genotype:
        """The shared one-shot loop (:meth:`OneShotStrategy.search`: ``argmax pi``); with ``validate_top_k`` K > 0 the
        trained supernet then scores the K most probable genotypes on validation and the best is returned
        (:func:`select_on_validation`).

        Raises:
            RecipeError: ``validate_top_k`` > 0 and the recipe sets no ``data.val_ids`` (checked before training).
        """
        k = self.cfg.validate_top_k
        if not k:
            return super().search(ctx)
        _require_val_ids(ctx.recipe, f"{ctx.recipe.source or '<recipe>'}: strategy.kwargs.validate_top_k")
        history = self.train_supernet(ctx)
        assert self.model is not None
        probs = self.probabilities()
        sample, prov = select_on_validation(self.model, self, ctx, probs, k, bn_batches=self.cfg.validate_bn_batches,
                                            score=self.cfg.validate_score, out_csv=Path(ctx.run_dir) / TOP_K_CSV)
        return self._genotype(sample, probs, ctx, epoch=len(history), run=Path(ctx.run_dir).name, **prov)

    @classmethod
    def derive(cls, run_dir: str | Path, recipe) -> Genotype:
        """``argmax pi`` per choice from the checkpoint (:meth:`OneShotStrategy.derive`), or, when the recipe sets
        ``strategy.kwargs.validate_top_k`` > 0, the validation choice among the top K (:meth:`derive_validated`).

        Raises:
            CheckpointError / GenotypeError: as :meth:`OneShotStrategy.derive`; RecipeError: as
            :meth:`derive_validated`."""
        kw = cls.Config(**dict(recipe.strategy.kwargs)) if recipe.strategy is not None else cls.Config()
        if kw.validate_top_k:
            return cls.derive_validated(run_dir, recipe, kw.validate_top_k, kw.validate_bn_batches)
        return super().derive(run_dir, recipe)

    @classmethod
    def derive_validated(cls, run_dir: str | Path, recipe, top_k: int, bn_batches: Optional[int] = None,
                         device: Optional[str] = None) -> Genotype:
        """The genotype of a gumbel search run chosen on validation (``nasreid derive RUN --top-k K``): the supernet
        of ``checkpoints/last.pt`` (:func:`nasreid.ranking.load_supernet`) scores the ``top_k`` most probable
        genotypes under its final ``prod_l softmax(pi_l)`` on the run's validation identities
        (:func:`select_on_validation`; ``RUN/derive_top_k.csv``). ``bn_batches`` defaults to the recipe's
        ``validate_bn_batches`` (10).

        Raises:
            RecipeError: the run's recipe sets no ``data.val_ids``; ``top_k`` < 1. RankingError / CheckpointError:
            no checkpoint, or one that does not fit the rebuilt supernet. GenotypeError: non-finite weights.
        """
        from nasreid.ranking import load_supernet

        from .base import _check_finite

        run = Path(run_dir)
        if top_k < 1:
            raise RecipeError(f"--top-k must be >= 1, got {top_k}")
        _require_val_ids(recipe, f"{run}: --top-k")
        kw = cls.Config(**dict(recipe.strategy.kwargs)) if recipe.strategy is not None else cls.Config()
        supernet, strategy, ctx, ckpt = load_supernet(run, device=device, progress=False)
        st = (ckpt.get("hooks") or {}).get("strategy") or {}
        probs = st.get("probabilities")
        if not probs:
            raise GenotypeError(f"{run}: the checkpoint holds no architecture weights (is this a gumbel search run?)")
        _check_finite(probs, f"{run}: ")
        sample, prov = select_on_validation(
            supernet, strategy, ctx, probs, top_k, bn_batches=kw.validate_bn_batches if bn_batches is None
            else bn_batches, score=kw.validate_score, out_csv=run / TOP_K_CSV)
        return make_genotype(recipe, sample, probs, epoch=int(ckpt["epoch"]) + 1, run=run.name, **prov)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lambda": self.lam, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.set_lambda(float(state["lambda"]))
        self.generator.set_state(state["generator"])


# ---- the validation derive -------------------------------------------------------------------------------
def _require_val_ids(recipe, where: str) -> None:
    if recipe.data.val_ids is None:
        raise RecipeError(f"{where}: choosing among the top-k genotypes reads validation identities, and the recipe "
                          "sets no data.val_ids (the test split is never read); search with --set data.val_ids=N")


def top_k_samples(probabilities: Mapping[str, Mapping[str, float]], k: int,
                  enumerate_max: int = 65536) -> list[tuple[dict[str, str], float]]:
    """The ``k`` most probable samples under the product distribution ``P(a) = prod_l p_l(a_l)`` (independent
    choices: the final ``softmax(pi_l)`` of each Gumbel op, OSNet-AIN Eq. 7), with their log-probabilities (nats),
    most probable first; ties go to the sample whose values come earlier in each choice's order (by probability,
    then as listed). Exact either way:

    * the space holds at most ``enumerate_max`` samples: every sample is scored and sorted;
    * else best-first search over the lattice of per-choice ranks (each choice's values sorted by probability,
      sample = one rank per choice; a successor raises one rank by one): the log-probability of a successor is at
      most its predecessor's and its rank tuple is larger, so popping ``(-log P, ranks)`` from a heap yields the
      samples in exactly the sorted order, after ``O(k L)`` pushes for L choices.

    Args:
        probabilities: ``{label: {value: p}}`` (values as strings, as ``probabilities()`` gives them).
        k: samples wanted (fewer when the space is smaller).

    Raises:
        ValueError: ``k`` < 1 or a choice without values.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels = list(probabilities)
    ordered: list[list[tuple[str, float]]] = []
    for label in labels:
        items = list(probabilities[label].items())
        if not items:
            raise ValueError(f"choice {label!r} has no values")
        idx = sorted(range(len(items)), key=lambda i: (-float(items[i][1]), i))
        ordered.append([(items[i][0], math.log(max(float(items[i][1]), 1e-45))) for i in idx])

    def logp(ranks: tuple[int, ...]) -> float:
        total = 0.0
        for o, r in zip(ordered, ranks):
            total += o[r][1]
        return total

    def sample(ranks: tuple[int, ...]) -> dict[str, str]:
        return {label: o[r][0] for label, o, r in zip(labels, ordered, ranks)}

    size = math.prod(len(o) for o in ordered)
    if size <= enumerate_max:
        every = sorted(((-logp(r), r) for r in itertools.product(*(range(len(o)) for o in ordered))))
        return [(sample(r), -neg) for neg, r in every[:k]]
    start = tuple(0 for _ in ordered)
    heap = [(-logp(start), start)]
    seen = {start}
    out: list[tuple[dict[str, str], float]] = []
    while heap and len(out) < k:
        neg, ranks = heapq.heappop(heap)
        out.append((sample(ranks), -neg))
        for i in range(len(ranks)):
            if ranks[i] + 1 < len(ordered[i]):
                nxt = ranks[:i] + (ranks[i] + 1,) + ranks[i + 1:]
                if nxt not in seen:
                    seen.add(nxt)
                    heapq.heappush(heap, (-logp(nxt), nxt))
    return out


def select_on_validation(supernet, strategy, ctx, probabilities: Mapping[str, Mapping[str, float]], k: int, *,
                         bn_batches: int = 10, score: str = "val_mAP",
                         out_csv: Optional[Path] = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Choose among the ``k`` most probable genotypes (:func:`top_k_samples`) the best on validation: each is scored
    by :class:`nasreid.ranking.SupernetRanker` (inherited weights, BN recalibrated on ``bn_batches`` fixed training
    batches -- SPOS Sec. 3.3 --, rank-1 / mAP in percent on ``ctx``'s validation identities, never the test split)
    and written to ``out_csv`` (``prob_rank``, ``key``, ``log_prob`` in nats, ``prob``, validation scores, seconds,
    ``choices`` as JSON), one row per genotype in order of probability. Ties of ``score`` go to the more probable.

    Args:
        supernet / strategy / ctx: as :class:`~nasreid.ranking.SupernetRanker` (the trained supernet, its strategy, a
            context whose dataset holds validation identities).
        probabilities: ``{label: {value: p}}``, the final ``softmax(pi)``.
        score: ``val_mAP`` or ``val_rank1``.

    Returns:
        ``(sample, provenance)``: the chosen sample (the space's typed values) and ``rule``, ``top_k``, ``prob_rank``
        (1 = the argmax genotype), ``log_prob``, ``score``, ``score_value``, ``val_rank1``, ``val_mAP``.

    Raises:
        RankingError: no validation identities in ``ctx.dataset``. ValueError: ``k`` < 1.
    """
    from nasreid.ranking import SupernetRanker, genotype_key

    ranker = SupernetRanker(supernet, strategy, ctx, bn_batches=bn_batches, loss_batches=0,
                            probabilities=probabilities)
    labels = ranker.labels
    top = top_k_samples({label: probabilities[label] for label in labels}, k)
    fields = ["prob_rank", "key", "log_prob", "prob", "val_rank1", "val_mAP", "val_mINP", "seconds", "choices"]
    rows: list[dict[str, Any]] = []
    f = out_csv.open("w", newline="") if out_csv is not None else None
    try:
        w = csv.DictWriter(f, fieldnames=fields) if f is not None else None
        if w is not None and f is not None:
            w.writeheader()
            f.flush()
        for i, (s, lp) in enumerate(top, 1):
            typed = {label: next(v for v in ranker.choices[label].values if str(v) == s[label]) for label in labels}
            res = ranker.score(typed)
            row = {"prob_rank": i, "key": genotype_key(typed, labels), "log_prob": lp, "prob": math.exp(lp),
                   **{m: float(res[m]) for m in ("val_rank1", "val_mAP", "val_mINP", "seconds")},
                   "choices": json.dumps(s)}
            rows.append({**row, "sample": typed})
            if w is not None and f is not None:
                w.writerow({k2: (f"{v:.10g}" if isinstance(v, float) else v) for k2, v in row.items()})
                f.flush()
                os.fsync(f.fileno())
            log.info("top-%d derive: #%d %s p=%.4g %s %.2f", k, i, row["key"], row["prob"], score, row[score])
    finally:
        if f is not None:
            f.close()
    best = min(rows, key=lambda r: (-(r[score] if math.isfinite(r[score]) else -math.inf), r["prob_rank"]))
    prov = {"rule": f"best validation {score} among the {len(rows)} most probable genotypes under prod softmax(pi) "
                    "(inherited weights, BN recalibrated)",
            "top_k": k, "prob_rank": best["prob_rank"], "log_prob": best["log_prob"], "score": score,
            "score_value": best[score], "val_rank1": best["val_rank1"], "val_mAP": best["val_mAP"],
            "bn_batches": bn_batches, "candidates_scored": len(rows),
            "scoring_seconds": float(sum(max(r["seconds"], 0.0) for r in rows))}
    return dict(best["sample"]), prov
