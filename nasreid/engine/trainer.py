"""The epoch loop shared by every search and retrain: a small loop, everything else a hook.

The loop (fast-reid ``TrainerBase`` shape) knows nothing of what a step does or of what a batch holds::

    hooks.before_train
    for epoch in [start, epochs):
        model.train(); hooks.before_epoch          # a hook may replace trainer.loader here
        sampler.set_epoch(epoch); loader generator seeded from (seed, epoch)
        for batch in trainer.loader:
            hooks.before_step
            parts = step_fn(trainer, batch_on_device)   # {name: float}; "loss" checked for NaN / inf
            hooks.after_step
        every registered scheduler steps
        hooks.after_epoch                          # logging, evaluation, checkpointing (CheckpointHook last)
    hooks.after_train

Hooks run in registration order, and each gets the trainer. Its ``state_dict`` is saved in the checkpoint
under the hook's ``name`` and handed back on ``--resume``, so a resumed run equals an uninterrupted one.
Several ``(module, optimizer, scheduler)`` slots can be registered (e.g. a backbone and a domain
discriminator that alternate); all of them are checkpointed. Steps are counted (``global_step``), never
derived from ``len(loader)``, so the loader may change size between epochs (re-clustered pseudo labels).

A non-finite loss raises :class:`~nasreid.errors.NonFiniteLossError` naming the epoch and step *before*
anything is saved, so ``checkpoints/last.pt`` keeps the last good epoch.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from nasreid.config import RecipeError
from nasreid.errors import NonFiniteLossError

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = ["Trainer", "Hook", "OptimSlot", "build_optimizer", "build_scheduler", "device_context", "DeviceContext",
           "backward", "optimizer_step", "check_finite", "reseed_loader"]

log = logging.getLogger("nasreid")


# ---------------------------------------------------------------------------------------------------
@dataclass
class DeviceContext:
    """Device, AMP and memory-format settings of a run (AMP is CUDA-only; channels_last applies on CPU and CUDA)."""

    device: torch.device
    amp: bool = False
    #: ``None`` ("auto"): decided by :meth:`model` for the first network placed
    channels_last: Optional[bool] = False
    scaler: Optional["torch.amp.GradScaler"] = None
    #: compile the network placed by :meth:`model` with ``torch.compile`` (``nn.Module.compile``: in place, the
    #: state dict keeps its keys)
    compile: bool = False

    def autocast(self):
        """``torch.autocast`` on CUDA with AMP, a null context otherwise."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Move a ``[B, 3, H, W]`` batch to the device (channels_last when enabled)."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Move every tensor of a batch dict to the device; 4-D float tensors (images) go channels_last
        when enabled. Other values (paths ...) are passed through unchanged."""
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                out[k] = (self.images(v) if v.ndim == 4 and v.is_floating_point()
                          else v.to(self.device, non_blocking=True))
            else:
                out[k] = v
        return out

    def model(self, m: nn.Module) -> nn.Module:
        """Move a model to the device (channels_last when enabled; compiled with ``compile``).

        With ``channels_last=None`` ("auto", the recipe default): channels_last on the CPU, the standard memory
        format on CUDA (where AMP is the recipes' fast path). Measured with torch 2.14 on 2 CPU cores at 256x128
        (``benchmarks/bench_cpu_epoch.py``): an OSNet x0.25 training step is ~1.25x faster in channels_last, and so
        are OSNet-AIN genotypes and the OSNet-AIN supernet since their IN layers stay in that format
        (:class:`~nasreid.models.osnet.InstanceNorm2d`); ``F.instance_norm`` alone would convert back and forth
        at every IN layer and lose the gain.
        """
        m = m.to(self.device)
        if self.channels_last is None:
            self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            m = m.to(memory_format=torch.channels_last)
        if self.compile:
            m.compile()
        return m


def device_context(device: str, amp: bool = False, channels_last: Optional[bool] = False,
                   compile: bool = False) -> DeviceContext:
    """Resolve the recipe's device settings (``channels_last=None``: decided per network, see
    :meth:`DeviceContext.model`; ``compile``: ``torch.compile`` the trained network).

    Raises:
        RecipeError: ``cuda`` requested but not available (names the device).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"recipe asks for device {device!r} but CUDA is not available; set device: cpu "
                          "(or --set device=cpu)")
    use_amp = amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return DeviceContext(dev, use_amp, channels_last, scaler, compile)


def check_finite(loss: torch.Tensor, parts: Optional[Mapping[str, float]] = None) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` (a scalar tensor) is NaN or infinite.

    Called before ``backward`` so no weight is touched; the trainer adds the epoch and step to the message.
    """
    if not bool(torch.isfinite(loss.detach()).all()):
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in (parts or {}).items())
        raise NonFiniteLossError(f"non-finite loss {float(loss.detach()):.4g}" + (f" ({detail})" if detail else ""))


def backward(loss: torch.Tensor, scaler: Optional["torch.amp.GradScaler"] = None,
             parts: Optional[Mapping[str, float]] = None) -> None:
    """``loss.backward()`` after :func:`check_finite`, through the AMP grad scaler when there is one."""
    check_finite(loss, parts)
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
    """Optimiser over parameter ``groups`` (recipe ``optim``): SGD (momentum, optional Nesterov), Adam,
    AMSGrad (Reddi, Kale & Kumar, ICLR 2018; the OSNet-AIN fine-tuning optimiser, Sec. 4.1) or AdamW."""
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name in ("adam", "amsgrad"):
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.name == "amsgrad")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch LR schedule (``LambdaLR``, stepped once per epoch) of the recipe's ``optim`` section ``cfg``.

    The factor multiplies each parameter group's *initial* lr (``LambdaLR.base_lrs``), so per-group lr
    multipliers (``optim.lr_mult``) are kept through the schedule. For epoch ``e`` (0-based) and
    ``W = warmup_epochs``:

    * warm-up, ``e < W``: ``warmup_mode="linear"``: ``warmup_factor + (1 - warmup_factor)·e/W``;
      ``"exponential"``: ``warmup_factor ** (1 - e/W)``, geometric from ``warmup_factor`` at ``e = 0`` to 1 at
      ``e = W`` (RMGL, Wang et al., TIP 2020, Sec. IV-A: "exponential warmup from 1e-5 to 0.01 in the starting
      3 epochs", i.e. ``warmup_factor=1e-3``, ``warmup_epochs=3``);
    * then cosine annealing to zero (Loshchilov & Hutter, SGDR, ICLR 2017, Eq. 5 without restarts), multistep
      decay by ``gamma`` at each of ``milestones``, or constant.

    Raises:
        ValueError: unknown ``cfg.warmup_mode`` (the recipe schema already refuses it).
    """
    E, W = cfg.epochs, cfg.warmup_epochs
    mode = getattr(cfg, "warmup_mode", "linear")
    if mode not in ("linear", "exponential"):
        raise ValueError(f"optim.warmup_mode must be 'linear' or 'exponential', got {mode!r}")

    def factor(epoch: int) -> float:
        if epoch < W:
            if mode == "exponential":
                return cfg.warmup_factor ** (1 - epoch / W)
            return cfg.warmup_factor + (1 - cfg.warmup_factor) * epoch / W
        if cfg.scheduler == "cosine":
            t = (epoch - W) / max(E - W, 1)
            return 0.5 * (1 + math.cos(math.pi * t))
        if cfg.scheduler == "multistep":
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------------
def reseed_loader(loader: Any, epoch: int, generator_seed: int) -> None:
    """Make a loader's next pass a function of ``(epoch, generator_seed)`` only: ``set_epoch(epoch)`` on its
    sampler(s) (each once; the PK sampler is reachable by two paths) and its ``torch.Generator`` (worker
    seeds, shuffling) re-seeded with ``generator_seed``. What makes a resumed run draw the same batches."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    samplers = (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    for s in {id(s): s for s in samplers if hasattr(s, "set_epoch")}.values():
        s.set_epoch(epoch)  # type: ignore[union-attr]
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(generator_seed)


class Hook:
    """Base class of trainer hooks; override any of the six calls (each receives the trainer).

    ``name`` keys the hook's :meth:`state_dict` in the checkpoint (default: the class name); give two
    hooks of one class different names. :meth:`log` adds scalars to the current epoch's history row.
    """

    name: Optional[str] = None
    #: called after every hook without it (the checkpoint hook), whatever the registration order
    last: bool = False

    def before_train(self, trainer: "Trainer") -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...
    def before_epoch(self, trainer: "Trainer") -> None: ...
    def after_epoch(self, trainer: "Trainer") -> None: ...
    def before_step(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (empty by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    @property
    def key(self) -> str:
        return self.name or type(self).__name__


@dataclass
class OptimSlot:
    """A ``(module, optimizer, scheduler)`` triple registered with :meth:`Trainer.register_optimizer`.

    ``module`` is checkpointed with it unless it is the trainer's main model (saved as ``model``);
    ``scheduler`` (optional) steps once per epoch.
    """

    name: str
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    module: Optional[nn.Module] = None


class Trainer:
    """Runs ``epochs`` epochs of ``step_fn`` over ``loader`` with hooks (see the module docstring).

    Args:
        model: the main network (checkpointed as ``model``; ``.train()`` at every epoch start).
        step_fn: ``(trainer, batch) -> {name: float}``; ``batch`` is the loader's dict with its tensors on
            the device. Returning a ``"loss"`` that is not finite stops the run.
        epochs: number of epochs.
        loader: iterable of batch dicts; replace ``trainer.loader`` between epochs as needed.
        ctx: device settings (:class:`DeviceContext`).
        optimizer, scheduler: registered as slot ``"main"`` when given.
        hooks: :class:`Hook` s in call order.
        run_dir: with it, :meth:`fit` resumes from ``run_dir/checkpoints/last.pt`` when present.
        seed: the loader's generator is re-seeded from ``(seed, epoch)`` every epoch (worker seeds, random
            augmentations in workers), so resuming with ``workers > 0`` is exact.
        writer: TensorBoard ``SummaryWriter`` (step scalars ``train/<name>``, epoch row ``epoch/<name>``).
        progress: show a tqdm bar per epoch.
        ddp: the recipe's ``distributed`` section; under ``torchrun`` the model is wrapped in
            ``DistributedDataParallel`` (:func:`~nasreid.engine.distributed.wrap_model`) and steps call
            :attr:`forward_model`. ``None``: no wrapper (the step averages gradients itself). In a process
            group, only rank 0 writes checkpoints and TensorBoard, and each epoch row holds the mean over
            ranks of the step scalars.

    Attributes during :meth:`fit`: ``epoch`` (0-based), ``step`` (0-based within the epoch),
    ``global_step``, ``row`` (the epoch's history row), ``history``, ``last_parts`` (the last step's output).
    """

    def __init__(self, model: nn.Module, step_fn: Callable[["Trainer", dict], Mapping[str, float]], *,
                 epochs: int, loader: Iterable, ctx: DeviceContext,
                 optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None,
                 hooks: Iterable[Hook] = (), run_dir: Optional[str | Path] = None, seed: int = 0,
                 writer: Any = None, progress: bool = False, ddp: Any = None):
        from . import distributed as D

        self.dist = D.info()
        self.model = model
        #: what a training step calls: ``DistributedDataParallel(model)`` under torchrun, else ``model``
        self.forward_model = model
        if self.dist.enabled and ddp is not None:
            self.forward_model = D.wrap_model(model, ctx.device, find_unused_parameters=ddp.find_unused_parameters,
                                              sync_bn=ddp.sync_bn)
        if not D.is_main():
            writer, progress = None, False
        self.step_fn = step_fn
        self.epochs = int(epochs)
        self.loader = loader
        self.ctx = ctx
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.seed = int(seed)
        self.writer = writer
        self.progress = progress
        self.slots: dict[str, OptimSlot] = {}
        self.hooks: list[Hook] = []
        if optimizer is not None:
            self.register_optimizer("main", optimizer, scheduler)
        for h in hooks:
            self.register_hook(h)
        self.epoch = 0
        self.step = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.row: dict[str, Any] = {}
        self.last_parts: dict[str, float] = {}

    # ---- registration -----------------------------------------------------------------------------
    def register_optimizer(self, name: str, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                           module: Optional[nn.Module] = None) -> OptimSlot:
        """Add a ``(module, optimizer, scheduler)`` slot; all slots are checkpointed and resumed.

        Raises:
            ValueError: ``name`` is taken.
        """
        if name in self.slots:
            raise ValueError(f"optimizer slot {name!r} is already registered")
        slot = OptimSlot(name, optimizer, scheduler, module)
        self.slots[name] = slot
        return slot

    def register_hook(self, hook: Hook) -> Hook:
        """Append ``hook`` (called after the ones registered before it).

        Raises:
            ValueError: another hook already has the same :attr:`Hook.key`.
        """
        if any(h.key == hook.key for h in self.hooks):
            raise ValueError(f"a hook named {hook.key!r} is already registered; give it another name")
        n_last = sum(bool(getattr(h, "last", False)) for h in self.hooks)
        if getattr(hook, "last", False) or n_last == 0:
            self.hooks.append(hook)
        else:  # hooks marked ``last`` (checkpointing) stay after every other one
            self.hooks.insert(len(self.hooks) - n_last, hook)
        return hook

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The ``"main"`` slot's optimiser (None when there is none)."""
        s = self.slots.get("main")
        return s.optimizer if s is not None else None

    def log(self, **scalars: float) -> None:
        """Add scalars to the current epoch's history row (and TensorBoard ``epoch/<name>``)."""
        self.row.update(scalars)

    # ---- checkpointing ----------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Optional[Path]:
        return self.run_dir / "checkpoints" / "last.pt" if self.run_dir is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` restores: model, slots, hooks, scaler, RNG states, history."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "modules": {n: s.module.state_dict() for n, s in self.slots.items()
                        if s.module is not None and s.module is not self.model},
            "optimizers": {n: s.optimizer.state_dict() for n, s in self.slots.items()},
            "schedulers": {n: s.scheduler.state_dict() for n, s in self.slots.items() if s.scheduler is not None},
            "hooks": {h.key: h.state_dict() for h in self.hooks},
            "scaler": self.ctx.scaler.state_dict() if self.ctx.scaler is not None else None,
            "rng": rng_state(),
            "history": self.history,
        }

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the trainer continues after ``st["epoch"]``)."""
        self.model.load_state_dict(st["model"])
        for n, s in self.slots.items():
            if s.module is not None and s.module is not self.model and n in st.get("modules", {}):
                s.module.load_state_dict(st["modules"][n])
            if n in st.get("optimizers", {}):
                s.optimizer.load_state_dict(st["optimizers"][n])
            if s.scheduler is not None and n in st.get("schedulers", {}):
                s.scheduler.load_state_dict(st["schedulers"][n])
        for h in self.hooks:
            if h.key in st.get("hooks", {}):
                h.load_state_dict(st["hooks"][h.key])
        if self.ctx.scaler is not None and st.get("scaler"):
            self.ctx.scaler.load_state_dict(st["scaler"])
        set_rng_state(st["rng"])
        self.history = list(st.get("history", []))
        self.global_step = int(st.get("global_step", 0))

    def save(self) -> None:
        """Atomically write ``last.pt`` for the epoch just finished (see :class:`CheckpointHook`); rank 0
        only under torchrun (every rank holds the same weights)."""
        if self.ckpt_path is not None and self.dist.rank == 0:
            save_checkpoint(self.ckpt_path, self.state_dict())

    def resume(self) -> int:
        """Load ``last.pt`` if present; return the first epoch to run (0 for a fresh run)."""
        if self.ckpt_path is None or not self.ckpt_path.is_file():
            return 0
        st = load_checkpoint(self.ckpt_path, map_location=self.ctx.device)
        self.load_state_dict(st)
        # relative to the run folder: the log travels with the run (results/, another machine)
        where = self.ckpt_path.relative_to(self.run_dir) if self.run_dir is not None else self.ckpt_path
        log.info("resumed from %s (epoch %d done)", where, st["epoch"] + 1)
        return int(st["epoch"]) + 1

    # ---- the loop ---------------------------------------------------------------------------------
    def _call(self, event: str) -> None:
        for h in self.hooks:
            getattr(h, event)(self)

    def _prepare_loader(self, epoch: int) -> None:
        reseed_loader(self.loader, epoch, (self.seed * 1_000_003 + epoch) % (2**63))

    def fit(self) -> list[dict[str, Any]]:
        """Train to ``epochs`` (resuming when a checkpoint exists); returns the per-epoch history rows
        (mean of every step scalar, ``lr`` of each slot, hook scalars, ``epoch_seconds``)."""
        start = self.resume()
        self._call("before_train")
        for epoch in range(start, self.epochs):
            self.epoch, self.step = epoch, 0
            t0 = time.time()
            self.row = {"epoch": epoch}
            self.model.train()
            self._call("before_epoch")
            self._prepare_loader(epoch)
            sums: dict[str, float] = {}
            bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.epochs}", disable=not self.progress,
                       leave=False, dynamic_ncols=True)
            for batch in bar:
                self._call("before_step")
                try:
                    parts = dict(self.step_fn(self, self.ctx.batch(batch)))
                except NonFiniteLossError as e:
                    raise NonFiniteLossError(f"epoch {epoch + 1}, step {self.step + 1}: {e}; the last good "
                                             f"checkpoint is kept (resume with a lower learning rate)") from None
                loss = parts.get("loss")
                if loss is not None and not math.isfinite(float(loss)):
                    raise NonFiniteLossError(f"epoch {epoch + 1}, step {self.step + 1}: non-finite loss {loss}; "
                                             "the last good checkpoint is kept")
                self.last_parts = parts
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                    if self.writer is not None:
                        self.writer.add_scalar(f"train/{k}", float(v), self.global_step)
                self.step += 1
                self.global_step += 1
                self._call("after_step")
                bar.set_postfix({k: f"{v / self.step:.3f}" for k, v in sums.items() if k in ("loss", "acc", "ce")})
            if self.step == 0:
                raise RecipeError("the training loader yielded no batch: too few images/identities for the batch "
                                  "size (data.batch_size / data.num_instances)")
            means = {k: v / self.step for k, v in sums.items()}
            if self.dist.enabled:  # the global epoch mean (equal steps and shard sizes on every rank)
                from .distributed import all_reduce_mean

                means = all_reduce_mean(means)
            self.row.update(means)
            for n, s in self.slots.items():
                self.row["lr" if n == "main" else f"lr_{n}"] = s.optimizer.param_groups[0]["lr"]
                if s.scheduler is not None:
                    s.scheduler.step()
            self.row["steps"] = self.step
            self.row["epoch_seconds"] = time.time() - t0
            self.history.append(self.row)
            self._call("after_epoch")
            if self.writer is not None:
                for k, v in self.row.items():
                    if k != "epoch" and isinstance(v, (int, float)):
                        self.writer.add_scalar(f"epoch/{k}", v, epoch)
                self.writer.flush()
            log.info("epoch %d/%d  %s", epoch + 1, self.epochs,
                     "  ".join(f"{k}={v:.4g}" for k, v in self.row.items() if k != "epoch" and isinstance(v, float)))
        self._call("after_train")
        return self.history
