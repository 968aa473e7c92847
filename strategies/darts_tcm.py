"""DARTS with MSINet's Twins Contrastive Mechanism (TCM).

Gu et al., "MSINet: Twins Contrastive Search of Multi-Scale Interaction for Object ReID", CVPR 2023,
Sec. 3.1 (Eq. 1-3) and Sec. 4.2 / 4.5 (settings, Fig. 5(a) ablation); DARTS: Liu, Simonyan & Yang,
"DARTS: Differentiable Architecture Search", ICLR 2019 (Eq. 3-8).

**Mixed ops (Eq. 1).** Every choice of the space becomes a :class:`DartsMixedOp` with architecture weights
``alpha [num_candidates]`` (initialised ``1e-3 * N(0, 1)`` like DARTS); its output is
``sum_o softmax(alpha)_o * o(x)``. Candidates may return a tensor or a tuple of tensors (MSINet's interaction
modules map the branch pair ``(x1, x2)`` to a pair): tuples are mixed element-wise. Every candidate runs.

**Alternating updates (Sec. 3.1, the paper's order).** Each iteration:

1. weights omega (SGD, the recipe's ``optim``) on a search-train batch with the training loss;
   backward reaches omega only (``backward(inputs=omega)``), so alpha gets no training gradient;
2. C_tr updated with the batch's features (Eq. 3);
3. alpha (Adam, ``arch_lr`` 0.002, betas (0.5, 0.999), weight decay 1e-3, decayed at the pace of the
   recipe's schedule without its warm-up) on a search-val batch with the validation loss; backward reaches
   alpha only, so no validation gradient leaks into omega;
4. C_val updated with the validation batch's features.

**Schemes (Fig. 5(a)).** ``scheme: tcm`` -- losses are Eq. 2 against the twin memories C_tr / C_val of
class centroids (``tau`` 0.05, ``beta`` 0.2; :class:`~nasreid.losses.memory.ClassMemory`), no linear
classifier, so search-train and search-val identities are unbound and may overlap by any ratio
(``overlap``; the default is the authors' split: ids in order, first 20 % train only, next 40 % shared with
their images halved between the sides, last 40 % val only). ``tcm_overlap`` -- the same memories with fully
overlapping classes (``overlap`` 1). ``ce_overlap`` -- classic DARTS for classification: cross entropy
through the space's linear classifier on fully overlapping classes.

**Second order.** ``unrolled: true`` computes DARTS Eq. 7-8: the validation loss at the virtual step
``omega' = omega - xi * grad_omega L_tr`` (``xi`` = the weights' current learning rate; plain SGD with the
weight decay, no momentum), with the Hessian-vector product by central finite differences (DARTS Eq. 8,
``epsilon = 0.01 / ||grad_omega' L_val||``). In that mode the alpha step comes first (as in DARTS), the
memories are read but not written during the unrolled computation, and the extra forwards also update
BatchNorm running statistics (as in DARTS).

**reference_mode** reproduces the authors' public search loop (vimar-gu/MSINet ``reid/engine/searcher.py``)
for comparison only: the alpha step comes first (skipped on each epoch's first iteration), its backward is a
plain ``loss.backward()`` that ALSO accumulates validation gradients into omega, and the following omega step
applies them together with the training gradients -- validation data leak into the weights. Do not use it for
a real search.

Memories (and alpha, which lives in the model's state) are checkpointed every epoch, so a search resumes
exactly (the public code saves neither alpha nor the memories). Derive: ``argmax alpha`` per choice.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F

from nasreid.engine.distributed import all_gather_cat, average_gradients
from nasreid.engine.trainer import Hook, check_finite, optimizer_step, reseed_loader
from nasreid.genotype import Genotype
from nasreid.losses.memory import ClassMemory
from nasreid.methods.base import COMMON_KEYS
from nasreid.mutables import LayerChoice
from nasreid.registry import register_strategy

from .base import OneShotStrategy, StrategyConfigError, mix_outputs

__all__ = ["DartsMixedOp", "DartsTCMStrategy", "mix_outputs"]

log = logging.getLogger("nasreid")


class DartsMixedOp(LayerChoice):
    """A :class:`LayerChoice` whose output is the softmax(alpha)-weighted sum of all candidates (Eq. 1).

    Keeps the choice's ``label`` and ``candidates`` (so :func:`nasreid.mutables.freeze` works on the
    supernet) and adds ``alpha``: ``nn.Parameter [num_candidates]`` (part of the model's state, so every
    checkpoint holds it). Train and eval modes both mix (the supernet is evaluated as itself).
    """

    def __init__(self, choice: LayerChoice, init_std: float = 1e-3, generator: torch.Generator | None = None):
        super().__init__({str(k): m for k, m in choice.candidates.items()}, label=choice.label)
        self._keys = list(choice.values)
        self.alpha = nn.Parameter(torch.randn(len(self._keys), generator=generator) * init_std)

    def forward(self, x):
        w = F.softmax(self.alpha, dim=-1)
        return mix_outputs(w, [op(x) for op in self.candidates.values()])

    def probabilities(self) -> dict[str, float]:
        """``softmax(alpha)`` as ``{value: p}``."""
        p = F.softmax(self.alpha.detach().float(), dim=-1).tolist()
        return {str(k): float(v) for k, v in zip(self._keys, p)}


class _ValStream(Hook):
    """Endless search-val batches for the alpha steps, re-seeded from ``(seed, epoch)`` at every epoch
    start (so a resumed search draws the same batches as an uninterrupted one)."""

    name = "val_stream"

    def __init__(self, loader, seed: int):
        self.loader, self.seed = loader, int(seed)
        self._it: Iterator[Any] | None = None
        self._epoch = 0
        self._restarts = 0

    def _restart(self) -> None:
        k = self._epoch * 1000 + self._restarts
        reseed_loader(self.loader, k, (self.seed * 1_000_003 + 7919 * (k + 1)) % (2 ** 63))
        self._it = iter(self.loader)
        self._restarts += 1

    def before_epoch(self, trainer) -> None:
        self._epoch, self._restarts = trainer.epoch, 0
        self._restart()

    def next(self, ctx) -> dict:
        assert self._it is not None  # before_epoch starts the stream
        try:
            batch = next(self._it)
        except StopIteration:
            self._restart()
            batch = next(self._it)
        return ctx.batch(batch)


class _MemoryInit(Hook):
    """Initialise the memories on a fresh start (``before_train``; a resumed run restores them instead)."""

    name = "memory_init"

    def __init__(self, strategy: DartsTCMStrategy, ctx, train_recs, val_recs):
        self.strategy, self.ctx, self.recs = strategy, ctx, (train_recs, val_recs)

    def before_train(self, trainer) -> None:
        self.strategy.init_memories(self.ctx, trainer.model, *self.recs)


@register_strategy("darts_tcm")
class DartsTCMStrategy(OneShotStrategy):
    """DARTS with the Twins Contrastive Mechanism (MSINet Sec. 3.1). See the module docstring.

    Kwargs (``strategy.kwargs`` of the recipe):
        scheme: ``"tcm"`` (twin memories, unbound classes), ``"tcm_overlap"`` (memories, overlap 1) or
            ``"ce_overlap"`` (cross entropy + linear classifier, overlap 1) -- Fig. 5(a).
        overlap: category overlap ratio of the identity split (share of ids in both sets); default 0.4 for
            ``tcm`` (the authors' split), must be 1 (the default) for the two ``*_overlap`` schemes.
        val_fraction: share of the non-shared ids that are val-only (2/3: 20 % train-only, 40 % val-only).
        split_order: ``"sorted"`` (ids in order, the authors' split) or ``"random"`` (seeded permutation).
        temperature, momentum: tau (0.05) and beta (0.2) of Eq. 2-3.
        memory_init: ``"centroid"`` (class means, the paper) or ``"zero"`` (the authors' code).
        arch_lr, arch_betas, arch_weight_decay: Adam for alpha (0.002, (0.5, 0.999), 1e-3).
        unrolled: second-order DARTS (Eq. 7-8) instead of first order.
        reference_mode: the authors' loop with its validation-gradient leak into omega (see the module
            docstring; for comparison only).
        init_std: std of alpha's initialisation (1e-3); seed: its generator's seed.
        feature_key: the model output the memories read (``"feat"``, the pre-neck embedding).

    Raises:
        StrategyConfigError: invalid kwargs (names the key), or an ``*_overlap`` scheme with overlap < 1.
    """

    name = "darts_tcm"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        scheme: Literal["tcm", "tcm_overlap", "ce_overlap"] = "tcm"
        overlap: float | None = Field(None, ge=0.0, le=1.0)
        val_fraction: float = Field(2.0 / 3.0, gt=0.0, lt=1.0)
        split_order: Literal["sorted", "random"] = "sorted"
        temperature: float = Field(0.05, gt=0)
        momentum: float = Field(0.2, ge=0, lt=1)
        memory_init: Literal["centroid", "zero"] = "centroid"
        arch_lr: float = Field(0.002, gt=0)
        arch_betas: tuple[float, float] = (0.5, 0.999)
        arch_weight_decay: float = Field(1e-3, ge=0)
        unrolled: bool = False
        reference_mode: bool = False
        init_std: float = Field(1e-3, ge=0)
        seed: int = 0
        feature_key: str = "feat"

        @model_validator(mode="after")
        def _overlap_fits_scheme(self):
            if self.scheme != "tcm" and self.overlap is not None and self.overlap != 1.0:
                raise ValueError(f"scheme {self.scheme!r} uses fully overlapping classes: overlap must be 1 "
                                 f"(or left out), got {self.overlap}")
            if self.unrolled and self.reference_mode:
                raise ValueError("unrolled and reference_mode cannot be combined")
            return self

    cfg: Config  # the validated ``strategy.kwargs`` (set by Strategy.__init__)

    def __init__(self, space, **kwargs: Any):
        super().__init__(space, **kwargs)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.ops: dict[str, DartsMixedOp] = {}
        self.memories = nn.ModuleDict()
        self.w_opt: torch.optim.Optimizer | None = None
        self.a_opt: torch.optim.Optimizer | None = None
        self.scaler = None
        self.grad_clip: float | None = None
        self.autocast = None

    @property
    def overlap(self) -> float:
        """The category overlap ratio in use (0.4 default for ``tcm``, 1 for the ``*_overlap`` schemes)."""
        if self.cfg.overlap is not None:
            return float(self.cfg.overlap)
        return 0.4 if self.cfg.scheme == "tcm" else 1.0

    # ---- supernet --------------------------------------------------------------------------------
    def attach(self) -> nn.Module:
        def factory(lc: LayerChoice) -> DartsMixedOp:
            op = DartsMixedOp(lc, init_std=self.cfg.init_std, generator=self.generator)
            self.ops[lc.label] = op
            return op

        return self._replace_choices(factory)

    def arch_parameters(self) -> list[nn.Parameter]:
        return [op.alpha for op in self.ops.values()]

    def probabilities(self) -> dict[str, dict[str, float]]:
        return {label: op.probabilities() for label, op in self.ops.items()}

    # ---- memories --------------------------------------------------------------------------------
    @property
    def uses_memories(self) -> bool:
        return self.cfg.scheme != "ce_overlap"

    def build_memories(self, num_train: int, num_val: int, dim: int, device) -> None:
        """Create C_tr ``[num_train, dim]`` and C_val ``[num_val, dim]`` (zeros; see :meth:`init_memories`)."""
        c = self.cfg
        self.memories = nn.ModuleDict({
            "tr": ClassMemory(num_train, dim, c.temperature, c.momentum),
            "val": ClassMemory(num_val, dim, c.temperature, c.momentum),
        }).to(device)

    @torch.no_grad()
    def extract(self, ctx, model: nn.Module, records) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-mode features (``outputs[feature_key]``, batch statistics, no augmentation) of
        ``records`` and their pids; BatchNorm running statistics are left untouched.

        Returns ``([M, D], [M])`` on the device."""
        saved = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
        was_training = model.training
        model.train()
        feats, pids = [], []
        try:
            for batch in ctx.feature_loader(records, batch_size=ctx.recipe.data.batch_size):
                b = ctx.device.batch(batch)
                with ctx.device.autocast():
                    out = model(b["img"])
                feats.append(self._feat(out).float())
                pids.append(b["pid"])
        finally:
            model.load_state_dict(saved, strict=False)
            model.train(was_training)
        return torch.cat(feats), torch.cat(pids)

    def init_memories(self, ctx, model: nn.Module, train_recs, val_recs) -> None:
        """Fill C_tr / C_val with the class centroids of their split (``memory_init: centroid``, Sec. 3.1),
        or leave them at zero (``zero``). No-op for ``ce_overlap`` or when already initialised (resume)."""
        if not self.uses_memories or self.cfg.memory_init == "zero":
            return
        for key, recs in (("tr", train_recs), ("val", val_recs)):
            mem = cast(ClassMemory, self.memories[key])
            if bool(mem.initialised):
                continue
            f, p = self.extract(ctx, model, recs)
            mem.init_centroids(f, p)
        log.info("TCM memories initialised with class centroids (%d train / %d val classes)",
                 self.memories["tr"].num_classes, self.memories["val"].num_classes)

    def _feat(self, outputs) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return outputs
        if self.cfg.feature_key not in outputs:
            raise KeyError(f"darts_tcm: the model outputs {sorted(outputs)} lack feature_key "
                           f"{self.cfg.feature_key!r}")
        return outputs[self.cfg.feature_key]

    # ---- losses ----------------------------------------------------------------------------------
    def _loss(self, outputs, batch: dict, side: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Loss of one side (``"tr"``/``"val"``), the features it used, and top-1 accuracy."""
        pids = batch["pid"]
        if self.cfg.scheme == "ce_overlap":
            if "logits" not in outputs:
                raise KeyError("darts_tcm scheme ce_overlap needs the model's 'logits' (a space with num_classes > 0)")
            logits = outputs["logits"].float()
            loss = F.cross_entropy(logits, pids)
        else:
            mem = cast(ClassMemory, self.memories[side])
            logits = mem.logits(self._feat(outputs).float())
            loss = F.cross_entropy(logits, pids)
        with torch.no_grad():
            acc = float((logits.argmax(1) == pids).float().mean())
        return loss, self._feat(outputs), acc

    def _autocast(self):
        import contextlib

        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, inputs: list | None = None) -> None:
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        scaled.backward(inputs=inputs)

    # ---- the two updates -------------------------------------------------------------------------
    def weight_step(self, batch: dict) -> dict[str, float]:
        """Update omega on a search-train batch (backward into omega only), then C_tr (Eq. 3).

        In ``reference_mode`` omega's gradients are not cleared first: whatever :meth:`arch_step` left
        there (the validation gradient) is applied too, as in the authors' loop."""
        W = self.weight_parameters()
        assert self.model is not None and self.w_opt is not None  # search() builds them before the steps
        if not self.cfg.reference_mode:
            self.w_opt.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.model(batch["img"])
        loss, feat, acc = self._loss(out, batch, "tr")
        parts = {"loss": float(loss.detach()), "acc": acc}
        check_finite(loss, parts)
        self._backward(loss, None if self.cfg.reference_mode else W)
        average_gradients(W)  # torchrun: the mean over ranks (no DDP wrapper: backward reaches a subset)
        optimizer_step(self.w_opt, W, self.scaler, self.grad_clip)
        if self.uses_memories:  # every rank's memory sees the global batch
            cast(ClassMemory, self.memories["tr"]).update(all_gather_cat(feat.detach()), all_gather_cat(batch["pid"]))
        return parts

    def arch_step(self, vbatch: dict, batch: dict | None = None) -> dict[str, float]:
        """Update alpha on a search-val batch (Adam), then C_val (Eq. 3). First order: backward into alpha
        only. ``unrolled``: DARTS Eq. 7-8 with the search-train ``batch``. ``reference_mode``: plain
        backward, validation gradients also left on omega (the authors' leak)."""
        A = self.arch_parameters()
        # search() builds them before the steps
        assert self.model is not None and self.w_opt is not None and self.a_opt is not None
        self.a_opt.zero_grad(set_to_none=True)
        if self.cfg.reference_mode:
            self.w_opt.zero_grad(set_to_none=True)
        if self.cfg.unrolled:
            if batch is None:
                raise ValueError("unrolled arch_step needs the search-train batch")
            vloss, vfeat, vacc = self._unrolled_grads(batch, vbatch)
        else:
            with self._autocast():
                out = self.model(vbatch["img"])
            loss, vfeat, vacc = self._loss(out, vbatch, "val")
            check_finite(loss, {"val_loss": float(loss.detach())})
            self._backward(loss, None if self.cfg.reference_mode else A)
            vloss = float(loss.detach())
        average_gradients(A)  # torchrun: alpha stays identical on every rank
        if self.scaler is not None:
            self.scaler.step(self.a_opt)
            self.scaler.update()
        else:
            self.a_opt.step()
        if self.uses_memories:
            cast(ClassMemory, self.memories["val"]).update(all_gather_cat(vfeat.detach()),
                                                           all_gather_cat(vbatch["pid"]))
        return {"val_loss": vloss, "val_acc": vacc}

    def _unrolled_grads(self, batch: dict, vbatch: dict) -> tuple[float, torch.Tensor, float]:
        """Set ``alpha.grad`` to DARTS Eq. 7 with the finite-difference Hessian-vector product of Eq. 8."""
        W, A = self.weight_parameters(), self.arch_parameters()
        model = self.model
        assert model is not None and self.w_opt is not None  # search() builds them before the steps
        xi = float(self.w_opt.param_groups[0]["lr"])
        wd = float(self.w_opt.param_groups[0].get("weight_decay", 0.0))
        backup = [w.detach().clone() for w in W]

        def train_loss():
            out = model(batch["img"])
            return self._loss(out, batch, "tr")[0]

        g = torch.autograd.grad(train_loss(), W, allow_unused=True)
        with torch.no_grad():  # virtual step omega' = omega - xi * (grad + wd * omega)
            for w, gi in zip(W, g):
                w.sub_(xi * ((gi if gi is not None else 0.0) + wd * w))
        out = model(vbatch["img"])
        vloss, vfeat, vacc = self._loss(out, vbatch, "val")
        check_finite(vloss, {"val_loss": float(vloss.detach())})
        grads = torch.autograd.grad(vloss, A + W, allow_unused=True)
        d_alpha = [gi if gi is not None else torch.zeros_like(a) for gi, a in zip(grads[:len(A)], A)]
        d_w = [gi if gi is not None else torch.zeros_like(w) for gi, w in zip(grads[len(A):], W)]
        eps = 0.01 / torch.cat([d.flatten() for d in d_w]).norm().clamp_min(1e-12)
        hess = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, b, d in zip(W, backup, d_w):
                    w.copy_(b + sign * eps * d)
            hess.append(torch.autograd.grad(train_loss(), A, allow_unused=True))
        with torch.no_grad():
            for w, b in zip(W, backup):
                w.copy_(b)
        for a, da, gp, gn in zip(A, d_alpha, *hess):
            gp = gp if gp is not None else torch.zeros_like(a)
            gn = gn if gn is not None else torch.zeros_like(a)
            a.grad = (da - xi * (gp - gn) / (2 * eps)).detach()
        return float(vloss.detach()), vfeat, vacc

    def step(self, batch: dict, vbatch: dict, first_of_epoch: bool = False) -> dict[str, float]:
        """One search iteration (see the module docstring for the order of each mode)."""
        if self.cfg.reference_mode:
            parts = {} if first_of_epoch else self.arch_step(vbatch)
            parts = {**self.weight_step(batch), **parts}
        elif self.cfg.unrolled:
            parts = self.arch_step(vbatch, batch)
            parts = {**self.weight_step(batch), **parts}
        else:
            parts = self.weight_step(batch)
            parts.update(self.arch_step(vbatch))
        return parts

    # ---- the search loop -------------------------------------------------------------------------
    #: its own bilevel loop (below) has no frozen warm start, builds its losses from ``scheme`` (Eq. 2-3; the
    #: recipe's ``loss`` section is not used) and one weight group (the virtual step of ``unrolled`` takes its
    #: lr), so it honours neither ``training.freeze_backbone_epochs``, the ``loss`` keys nor ``optim.lr_mult``
    honours: ClassVar[frozenset[str]] = frozenset(
        k for k in COMMON_KEYS
        if k not in ("training.freeze_backbone_epochs", "optim.lr_mult") and not k.startswith("loss."))

    def search(self, ctx) -> Genotype:
        """Split the identities, build the supernet, memories and the two optimisers, and alternate the
        omega / alpha updates for ``optim.epochs`` epochs over the search-train loader (resuming from
        the run's checkpoint); return the argmax genotype.

        Raises:
            ValueError: the split leaves a side empty. RecipeError: too few identities for a PK batch.
        """
        from nasreid.engine.hooks import ArchitectureLogHook, StrategyStateHook

        c = self.cfg
        train_recs, val_recs = ctx.split_identities(self.overlap, c.val_fraction, name="split", order=c.split_order)
        n_tr = len({r.pid for r in train_recs})
        n_val = len({r.pid for r in val_recs})
        if c.scheme == "ce_overlap" and n_tr != n_val:  # the classifier's labels must mean the same ids
            raise StrategyConfigError(f"ce_overlap needs the same classes on both sides, got {n_tr} / {n_val}")
        model = ctx.device.model(self.attach())
        dev = ctx.device.device
        if self.uses_memories:
            dim = self.extract(ctx, model, train_recs[:2])[0].shape[1]  # BN statistics left as they are
            self.build_memories(n_tr, n_val, dim, dev)
        self.w_opt = ctx.build_optimizer(self.weight_parameters())
        w_sched = ctx.build_scheduler(self.w_opt)
        self.a_opt = torch.optim.Adam(self.arch_parameters(), lr=c.arch_lr, betas=c.arch_betas,
                                      weight_decay=c.arch_weight_decay)
        arch_cfg = ctx.recipe.optim.model_copy(update={"lr": c.arch_lr, "warmup_epochs": 0})
        a_sched = ctx.build_scheduler(self.a_opt, arch_cfg)
        self.scaler, self.grad_clip, self.autocast = ctx.device.scaler, ctx.recipe.optim.grad_clip, ctx.device.autocast

        val_stream = _ValStream(ctx.loader(val_recs, seed=ctx.recipe.seed + 1), ctx.recipe.seed)

        def step(trainer, batch):
            return self.step(batch, val_stream.next(ctx.device), first_of_epoch=trainer.step == 0)

        hooks = [val_stream, _MemoryInit(self, ctx, train_recs, val_recs),
                 ArchitectureLogHook(self, ctx.run_dir / "alphas.csv"), StrategyStateHook(self)]
        # ddp=False: the two updates back-propagate into omega or alpha only, which DDP's reducer cannot
        # follow; each step averages its gradients over ranks itself (average_gradients)
        trainer = ctx.trainer(model, step, loader=ctx.loader(train_recs), optimizer=self.w_opt, scheduler=w_sched,
                              hooks=hooks, ddp=False)
        trainer.register_optimizer("arch", self.a_opt, a_sched)
        trainer.fit()
        return self._genotype(self.export(), self.probabilities(), ctx, epoch=len(trainer.history),
                              run=ctx.run_dir.name, rule="argmax of architecture weights alpha per choice",
                              scheme=c.scheme, overlap=self.overlap, unrolled=c.unrolled,
                              reference_mode=c.reference_mode, train_classes=n_tr, val_classes=n_val)

    # ---- checkpointed state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state(),
                "memories": {k: v.detach().cpu() for k, v in self.memories.state_dict().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if state.get("memories"):
            self.memories.load_state_dict(state["memories"])
