"""What a strategy or a training method gets to run with: :class:`RunContext` / :class:`SearchContext`.

A context holds the recipe, the run folder, the device settings, the TensorBoard writer and the training
dataset, and offers the pieces a search is built from -- a loader over any record list, an identity split
into search-train / search-val with an overlap ratio (MSINet's TCM, Sec. 3.1), the recipe's loss,
optimiser and schedule, a :class:`~nasreid.engine.trainer.Trainer` with the standard hooks, and
:meth:`RunContext.train_fixed` (train a fixed network for N epochs with the recipe's training method, the
piece ``nasreid train`` is made of; a sampling strategy's proxy training).

Example (inside ``Strategy.search``)::

    train_recs, val_recs = ctx.split_identities(overlap=0.2)
    w_loader, a_loader = ctx.loader(train_recs), ctx.loader(val_recs)
    trainer = ctx.trainer(model, step, loader=w_loader, optimizer=opt, scheduler=sched, hooks=[...])
    trainer.fit()
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from nasreid.config import Recipe, RecipeError, loader_workers
from nasreid.registry import LOSSES, METHODS, SPACES

from .checkpoint import read_json, write_json
from .hooks import CheckpointHook
from .trainer import DeviceContext, Hook, Trainer, build_optimizer, build_scheduler

__all__ = ["RunContext", "SearchContext"]

log = logging.getLogger("nasreid")


@dataclass
class RunContext:
    """Recipe, run folder, device, writer and training dataset of a run, plus the helpers built on them.

    Attributes:
        recipe: the validated :class:`~nasreid.config.Recipe`.
        run_dir: the run folder (checkpoints, logs, ``split.json`` ...).
        device: :class:`~nasreid.engine.trainer.DeviceContext` (CPU / CUDA, AMP, channels_last).
        dataset: the training :class:`~nasreid.data.ReIDDataset` (train pids ``0..N-1``).
        writer: TensorBoard ``SummaryWriter`` or None.
        progress: show progress bars.
    """

    recipe: Recipe
    run_dir: Path
    device: DeviceContext
    dataset: Any
    writer: Any = None
    progress: bool = False
    extra_hooks: list[Hook] = field(default_factory=list)

    # ---- data ------------------------------------------------------------------------------------
    def loader(self, records: Sequence | None = None, *, batch_size: int | None = None,
               num_instances: int | None = None, seed: int | None = None):
        """PK-sampled training loader over ``records`` (default: the dataset's train split) with the
        recipe's input size, augmentation, workers and corrupt-image policy.

        ``records`` must carry pids ``0..N-1`` (as :meth:`split_identities` returns them). Workers are not
        persistent: the trainer re-seeds the loader every epoch, which makes resuming exact. Under
        ``torchrun`` this rank's share of each global batch (:class:`~nasreid.data.samplers.PKSampler`).

        Raises:
            ValueError: fewer identities than P = batch_size / num_instances.
        """
        from nasreid.data import build_train_loader

        from .distributed import info

        dist = info()
        d = self.recipe.data
        ds = self.dataset
        if records is not None:
            ds = copy.copy(self.dataset)
            ds.train = list(records)
        return build_train_loader(
            ds, height=d.height, width=d.width, batch_size=batch_size or d.batch_size,
            num_instances=num_instances or d.num_instances, workers=loader_workers(self.recipe),
            seed=self.recipe.seed if seed is None else seed, on_corrupt=d.on_corrupt, persistent_workers=False,
            cache_images=d.cache_images,
            num_replicas=dist.world_size, rank=dist.rank, **d.augment.model_dump())

    def split_identities(self, overlap: float = 0.0, val_fraction: float = 0.5, seed: int | None = None,
                         name: str = "split", order: str = "random") -> tuple[list, list]:
        """Split the training identities into search-train / search-val (MSINet TCM, Sec. 3.1: the two
        sets' categories are unbound, with an adjustable category overlap ratio).

        The identities are ordered (``order="sorted"``: by pid, as the authors' code does;
        ``"random"``: a permutation drawn from ``seed``) and cut into three consecutive groups:
        train-only, shared, val-only. ``round(overlap * N)`` identities are shared -- they appear in both
        sets, their images alternating between the two (each side keeps at least one image) -- and a
        fraction ``val_fraction`` of the others is val-only. The authors' default (first 20 % train only,
        next 40 % shared, last 40 % val only) is ``overlap=0.4, val_fraction=2/3, order="sorted"``;
        ``overlap=1`` is classic DARTS (the same classes on both sides), ``overlap=0`` disjoint sets.

        Each returned list is relabelled to pids ``0..n-1`` (sorted original pid). The split (original
        train pids of each group) is written to ``run_dir/<name>.json`` and read back from there on resume,
        so it never changes within a run.

        Raises:
            ValueError: ``overlap`` outside ``[0, 1]``, ``val_fraction`` outside ``(0, 1)``, unknown
                ``order``, or a set ends up empty.
        """
        from nasreid.data.datasets.base import relabel

        if not 0.0 <= overlap <= 1.0 or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"overlap must be in [0, 1] and val_fraction in (0, 1), got {overlap}, {val_fraction}")
        if order not in ("random", "sorted"):
            raise ValueError(f"unknown identity order {order!r}; expected 'random' or 'sorted'")
        path = self.run_dir / f"{name}.json"
        saved = read_json(path)
        if saved is None:
            pids = sorted({r.pid for r in self.dataset.train})
            if order == "random":
                rng = np.random.default_rng([self.recipe.seed if seed is None else seed, 7])
                pids = [int(p) for p in rng.permutation(pids)]
            n = len(pids)
            n_shared = round(overlap * n)
            n_val = round(val_fraction * (n - n_shared))
            n_train = n - n_shared - n_val
            saved = {"overlap": overlap, "val_fraction": val_fraction, "order": order,
                     "train_only": sorted(pids[:n_train]), "shared": sorted(pids[n_train:n_train + n_shared]),
                     "val_only": sorted(pids[n_train + n_shared:])}
            from .distributed import is_main

            if is_main():  # every rank computes the same split; rank 0 writes it
                write_json(path, saved)
        shared, t_only, v_only = set(saved["shared"]), set(saved["train_only"]), set(saved["val_only"])
        train, val = [], []
        seen: dict[int, int] = {}  # images of each shared identity so far
        for r in self.dataset.train:
            if r.pid in t_only:
                train.append(r)
            elif r.pid in v_only:
                val.append(r)
            elif r.pid in shared:
                k = seen.get(r.pid, 0)
                seen[r.pid] = k + 1
                (train if k % 2 == 0 else val).append(r)
        if not train or not val:
            raise ValueError(f"identity split gives an empty set (train {len(train)}, val {len(val)} images)")
        return relabel(train), relabel(val)

    def feature_loader(self, records: Sequence, batch_size: int = 128):
        """Loader over ``records`` in their order with the test transform (no augmentation): batches as
        in :func:`~nasreid.data.build_train_loader` (``img``, ``pid`` ...). For feature extraction during a
        search (e.g. class-centroid initialisation of a memory)."""
        from torch.utils.data import DataLoader

        from nasreid.data.loaders import ImageDataset
        from nasreid.data.transforms import build_transforms

        d = self.recipe.data
        ds = ImageDataset(list(records), self.dataset.read_image, build_transforms(d.height, d.width, is_train=False),
                          on_corrupt=d.on_corrupt)
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=loader_workers(self.recipe),
                          drop_last=False)

    # ---- model, loss, optimisation ---------------------------------------------------------------
    def build_space(self, num_classes: int | None = None, **overrides: Any) -> nn.Module:
        """The recipe's search space with its ``space.kwargs`` (``num_classes`` defaults to the dataset's),
        warm-started from ``model.pretrained`` when the recipe names a file (:meth:`init_weights`; a supernet is
        always warm-started: every candidate takes the file's block at its place, IN layers the file lacks are
        calibrated).

        Raises:
            PretrainedWeightsError: a ``model.pretrained`` file that does not fit the space (another width ...).
        """
        n = self.dataset.num_train_pids if num_classes is None else num_classes
        space = SPACES.build(self.recipe.space.name, {**self.recipe.space.kwargs, **overrides},
                             f"{self.recipe.source or '<recipe>'}: space.kwargs", num_classes=n)
        self.init_weights(space, supernet=True)
        return space

    def init_weights(self, net: nn.Module, *, supernet: bool = False) -> dict[str, Any] | None:
        """Initialise ``net`` from the recipe's ``model.pretrained``, if any: the run's one entry point for
        pretrained weights (:func:`~nasreid.models.pretrained.init_weights`: a supernet, or a fixed network with
        ``model.warm_start``, is warm-started and the IN layers the file lacks calibrated on ``model.calibrate_norms``
        training images -- evenly spaced over the training split, test transform, on the CPU; otherwise the file
        is loaded exactly). Returns the report, or ``None`` when the recipe names no file.

        Raises:
            PretrainedWeightsError: a file that cannot be read or does not fit ``net``.
        """
        from nasreid.data.loaders import calibration_batches
        from nasreid.models.pretrained import init_weights

        d = self.recipe.data

        def calibration_images(n: int):
            return calibration_batches(self.dataset, n, height=d.height, width=d.width, on_corrupt=d.on_corrupt,
                                       workers=loader_workers(self.recipe))

        return init_weights(net, self.recipe.model, supernet=supernet, calibration_images=calibration_images)

    def build_loss(self, num_classes: int | None = None) -> nn.Module:
        """The recipe's loss (``loss.name`` from the loss registry) for ``num_classes`` identities."""
        L = self.recipe.loss
        n = self.dataset.num_train_pids if num_classes is None else num_classes
        return LOSSES.build(L.name, L.kwargs, f"{self.recipe.source or '<recipe>'}: loss.kwargs", num_classes=n)

    def build_optimizer(self, params_or_groups, cfg=None):
        """Optimiser of the recipe's ``optim`` section (or ``cfg``) over parameters or parameter groups."""
        groups = list(params_or_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        return build_optimizer(groups, cfg or self.recipe.optim)

    def build_scheduler(self, optimizer, cfg=None):
        """Per-epoch LR schedule of the recipe's ``optim`` section (or ``cfg``)."""
        return build_scheduler(optimizer, cfg or self.recipe.optim)

    # ---- training --------------------------------------------------------------------------------
    def trainer(self, model: nn.Module, step_fn: Callable, *, loader, optimizer=None, scheduler=None,
                hooks: Iterable[Hook] = (), epochs: int | None = None, run_dir: Path | None = None,
                checkpoint: bool = True, ddp: bool = True, find_unused: bool = True) -> Trainer:
        """A :class:`Trainer` over ``loader`` with the run's device, seed, writer and progress setting,
        ``hooks`` and (unless ``checkpoint=False``) a :class:`CheckpointHook` into ``run_dir``
        (default: this run's folder). Under ``torchrun`` (and ``ddp``) the trainer wraps ``model`` in
        ``DistributedDataParallel`` with the recipe's ``distributed`` settings: call ``trainer.forward_model``
        in the step. ``ddp=False`` for steps that average gradients themselves
        (:func:`~nasreid.engine.distributed.average_gradients`). ``find_unused``: whether a step may leave
        parameters without gradient (DDP's ``find_unused_parameters``), unless the recipe's
        ``distributed.find_unused_parameters`` says otherwise."""
        rd = self.run_dir if run_dir is None else Path(run_dir)
        all_hooks = [*self.extra_hooks, *hooks] + ([CheckpointHook()] if checkpoint else [])
        return Trainer(model, step_fn, epochs=epochs or self.recipe.optim.epochs, loader=loader, ctx=self.device,
                       optimizer=optimizer, scheduler=scheduler, hooks=all_hooks,
                       run_dir=rd if checkpoint else None, seed=self.recipe.seed, writer=self.writer,
                       progress=self.progress, ddp=self._ddp_settings(find_unused) if ddp else None)

    def _ddp_settings(self, find_unused: bool):
        d = self.recipe.distributed
        if d.find_unused_parameters is not None:
            return d
        return d.model_copy(update={"find_unused_parameters": find_unused})

    def train_fixed(self, net: nn.Module, *, epochs: int | None = None, hooks: Iterable[Hook] = (),
                    records: Sequence | None = None, run_dir: Path | None = None) -> list[dict[str, Any]]:
        """Train a fixed network with the recipe's training method (``training.method``) for ``epochs``
        (default ``optim.epochs``) on ``records`` (default: the training split); checkpoints into
        ``run_dir`` (default: this run's folder) and resumes from there. Returns the epoch history.

        Raises:
            RegistryError: unknown training method.
            NonFiniteLossError: the loss diverged (the last good checkpoint is kept).
        """
        method = METHODS.build(self.recipe.training.method, self.recipe.training.kwargs,
                               f"{self.recipe.source or '<recipe>'}: training.kwargs")
        return method.fit(self, net, epochs=epochs or self.recipe.optim.epochs, hooks=list(hooks),
                          records=records, run_dir=run_dir)

    def evaluate(self, model: nn.Module, dataset=None, split: str = "test") -> dict[str, Any]:
        """Same-domain CMC/mAP (percent) of ``model`` on ``dataset`` (default: the training dataset) with the
        recipe's ``eval`` settings: its query/gallery (``split="test"``), or its validation query/gallery of held-out
        training identities (``split="val"``, recipe ``data.val_ids``; :meth:`evaluate_validation`).

        Raises:
            RecipeError: ``split="val"`` and no validation identities are held out. ValueError: another ``split``.
        """
        from nasreid.evaluation.runner import evaluate_dataset, evaluate_validation

        ds = self.dataset if dataset is None else dataset
        if split == "val":
            return evaluate_validation(model, ds, self.recipe, self.device, progress=self.progress)
        if split != "test":
            raise ValueError(f"unknown evaluation split {split!r}; expected 'test' or 'val'")
        return evaluate_dataset(model, ds, self.recipe, self.device, progress=self.progress)

    def evaluate_validation(self, model: nn.Module) -> dict[str, Any]:
        """Rank-1 / mAP / mINP (percent, with CMC and counts as :func:`~nasreid.evaluation.runner.evaluate_dataset`)
        of ``model`` on the validation query / gallery of the training identities held out by ``data.val_ids``,
        with the recipe's ``eval`` settings: what a search, HPO or a selection may read (never the test split).

        Raises:
            RecipeError: the recipe holds out no validation identities (``data.val_ids`` is not set).
        """
        return self.evaluate(model, split="val")

    def check_num_classes(self, records: Sequence) -> int:
        """Number of identities of ``records`` (pids must be ``0..n-1``).

        Raises:
            RecipeError: pids are not contiguous from 0.
        """
        pids = sorted({r.pid for r in records})
        if pids != list(range(len(pids))):
            raise RecipeError("training records must carry pids 0..N-1 (relabel them first)")
        return len(pids)


class SearchContext(RunContext):
    """The context a :class:`~nasreid.strategies.Strategy` searches with (``Strategy.search(ctx)``): a
    :class:`RunContext` whose run folder is the search run."""
