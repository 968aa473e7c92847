"""The epoch loop shared by search and retraining: progress bars, TensorBoard scalars, atomic
per-epoch checkpoints and exact resumption.

The loop knows nothing about what a step does: ``step_fn(images, pids, batch) -> {name: float}`` is
given by the caller (a strategy's ``train_step`` for a search, a plain SGD step for a retrain), and
epoch hooks add what is specific (the Gumbel temperature, architecture weights, evaluation).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = ["Trainer", "build_optimizer", "build_scheduler", "device_context", "DeviceContext", "backward",
           "optimizer_step"]

log = logging.getLogger("nasreid")


@dataclass
class DeviceContext:
    """Device, AMP and memory-format settings of a run (CPU: AMP and channels_last are no-ops)."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False
    scaler: Optional["torch.amp.GradScaler"] = None

    def autocast(self):
        """``torch.autocast`` on CUDA with AMP, a null context otherwise."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Move a ``[B, 3, H, W]`` batch to the device (channels_last when enabled)."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def model(self, m: nn.Module) -> nn.Module:
        """Move a model to the device (channels_last when enabled)."""
        m = m.to(self.device)
        return m.to(memory_format=torch.channels_last) if self.channels_last else m


def device_context(device: str, amp: bool = False, channels_last: bool = False) -> DeviceContext:
    """Resolve the recipe's device settings.

    Raises:
        RuntimeError: ``cuda`` requested but not available (names the device).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"recipe asks for device {device!r} but CUDA is not available; set device: cpu")
    use_amp = amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return DeviceContext(dev, use_amp, channels_last and dev.type == "cuda", scaler)


def backward(loss: torch.Tensor, scaler: Optional["torch.amp.GradScaler"] = None) -> None:
    """``loss.backward()``, through the AMP grad scaler when there is one."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, params=None, scaler: Optional["torch.amp.GradScaler"] = None,
                   grad_clip: Optional[float] = None) -> None:
    """One optimiser step after :func:`backward`: unscale (AMP), clip the global gradient norm of
    ``params`` to ``grad_clip`` when set, step, and update the scaler."""
    if grad_clip:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def build_optimizer(groups: list[dict[str, Any]], cfg) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), Adam or AdamW over parameter ``groups`` (recipe ``optim``)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch LR factor: linear warm-up from ``warmup_factor`` over ``warmup_epochs``, then cosine
    annealing to zero (Loshchilov & Hutter, SGDR, ICLR 2017, Eq. 5 without restarts), multistep decay by
    ``gamma`` at ``milestones``, or constant."""
    E, W = cfg.epochs, cfg.warmup_epochs

    def factor(epoch: int) -> float:
        if epoch < W:
            return cfg.warmup_factor + (1 - cfg.warmup_factor) * epoch / W
        if cfg.scheduler == "cosine":
            t = (epoch - W) / max(E - W, 1)
            return 0.5 * (1 + math.cos(math.pi * t))
        if cfg.scheduler == "multistep":
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Trainer:
    """Runs ``epochs`` epochs of ``step_fn`` over ``loader``, checkpointing after every epoch.

    Args:
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints/last.pt``.
        model, optimizer, scheduler: saved and restored with the checkpoint.
        loader: yields dicts with ``img [B,3,H,W]`` and ``pid [B]``; its sampler's ``set_epoch`` is
            called when present (deterministic PK sampling).
        step_fn: ``(images, pids, batch) -> {name: float}``.
        on_epoch_start / on_epoch_end: ``(epoch) -> {name: float}`` scalars to log (may be None).
        extra_state: ``(get, set)`` pair for strategy state saved in the checkpoint.
        writer: TensorBoard ``SummaryWriter`` or None.

    ``fit()`` resumes from ``last.pt`` if present, restoring model, optimiser, scheduler, strategy state
    and RNG states, so an interrupted run continues exactly where its last completed epoch ended.
    """

    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    step_fn: Callable[[torch.Tensor, torch.Tensor, dict], dict[str, float]]
    epochs: int
    ctx: DeviceContext
    on_epoch_start: Optional[Callable[[int], dict[str, float]]] = None
    on_epoch_end: Optional[Callable[[int], dict[str, float]]] = None
    extra_state: Optional[tuple[Callable[[], Any], Callable[[Any], None]]] = None
    writer: Any = None
    progress: bool = True
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def ckpt_path(self) -> Path:
        return Path(self.run_dir) / "checkpoints" / "last.pt"

    def resume(self) -> int:
        """Load ``last.pt`` if present; return the first epoch to run (0 for a fresh run)."""
        if not self.ckpt_path.is_file():
            return 0
        st = load_checkpoint(self.ckpt_path, map_location=self.ctx.device)
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if self.extra_state is not None and st.get("extra") is not None:
            self.extra_state[1](st["extra"])
        if self.ctx.scaler is not None and st.get("scaler"):
            self.ctx.scaler.load_state_dict(st["scaler"])
        set_rng_state(st["rng"])
        self.history = list(st.get("history", []))
        log.info("resumed from %s (epoch %d done)", self.ckpt_path, st["epoch"] + 1)
        return st["epoch"] + 1

    def save(self, epoch: int) -> None:
        """Atomically write ``last.pt`` after ``epoch`` (0-based) with everything :meth:`resume` restores."""
        save_checkpoint(self.ckpt_path, {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "extra": self.extra_state[0]() if self.extra_state is not None else None,
            "scaler": self.ctx.scaler.state_dict() if self.ctx.scaler is not None else None,
            "rng": rng_state(),
            "history": self.history,
        })

    def fit(self) -> list[dict[str, float]]:
        """Train to ``epochs``; returns the per-epoch history (mean of each step scalar + hook scalars)."""
        start = self.resume()
        global_step = start * max(len(self.loader), 1)
        for epoch in range(start, self.epochs):
            t0 = time.time()
            self.model.train()
            row: dict[str, float] = {"epoch": epoch}
            if self.on_epoch_start is not None:
                row.update(self.on_epoch_start(epoch) or {})
            batch_sampler = getattr(self.loader, "batch_sampler", None)
            samplers = (getattr(self.loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
            for s in {id(s): s for s in samplers if hasattr(s, "set_epoch")}.values():
                s.set_epoch(epoch)  # each sampler once (the PK sampler is reachable by two paths)
            sums: dict[str, float] = {}
            n = 0
            bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.epochs}", disable=not self.progress,
                       leave=False, dynamic_ncols=True)
            for batch in bar:
                images = self.ctx.images(batch["img"])
                pids = batch["pid"].to(self.ctx.device, non_blocking=True)
                parts = self.step_fn(images, pids, batch)
                n += 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                if self.writer is not None:
                    for k, v in parts.items():
                        self.writer.add_scalar(f"train/{k}", float(v), global_step)
                global_step += 1
                bar.set_postfix({k: f"{v / n:.3f}" for k, v in sums.items() if k in ("loss", "acc", "ce")})
            if n == 0:
                raise RuntimeError("the training loader yielded no batch: too few images/ids for the batch size")
            row.update({k: v / n for k, v in sums.items()})
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            row["epoch_seconds"] = time.time() - t0
            if self.on_epoch_end is not None:
                row.update(self.on_epoch_end(epoch) or {})
            if self.writer is not None:
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, (int, float)):
                        self.writer.add_scalar(f"epoch/{k}", v, epoch)
                self.writer.flush()
            self.history.append(row)
            self.save(epoch)
            log.info("epoch %d/%d  %s", epoch + 1, self.epochs,
                     "  ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch" and isinstance(v, float)))
        return self.history
