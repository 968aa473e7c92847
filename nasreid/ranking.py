"""Ranking candidate architectures with a trained supernet's inherited weights (``nasreid rank RUN``).

One-shot NAS trains one supernet whose candidates share weights; a candidate (a sample ``{label: value}``) can then
be scored without training it: the fixed network of the sample takes the supernet's weights on its path
(:func:`nasreid.mutables.freeze` with ``copy_weights=True``: the strategies' mixed ops keep ``label`` and
``candidates``, so every one-shot supernet freezes the same way, whatever the strategy).

Per candidate (:meth:`SupernetRanker.score`):

1. **BN recalibration** (Guo et al., "Single Path One-Shot Neural Architecture Search with Uniform Sampling",
   ECCV 2020, Sec. 3.3): the running statistics a supernet accumulates are a mixture over the paths it sampled
   (or, for a soft mixture, of the mixed outputs), not the statistics of one fixed path; SPOS recomputes them per
   candidate on training batches before evaluating it. Every ``BatchNorm`` is reset (mean 0, variance 1,
   ``num_batches_tracked`` 0) with ``momentum=None`` (a cumulative average over the batches), the network
   forwards ``bn_batches`` K training batches in train mode under ``no_grad`` (dropout layers in eval mode, so the
   statistics are a deterministic function of the images), then switches to eval. ``bn_batches=0`` keeps the
   supernet's inherited statistics. The K batches are one fixed, seeded set of training images shared by every
   candidate (PK batches: P identities x ``num_instances`` images, the test transform -- no augmentation, the
   images the statistics will normalise at evaluation look like these), loaded once and kept on the device.
2. **Validation rank-1 / mAP / mINP** (percent) on the run's held-out validation identities (recipe
   ``data.val_ids``; :meth:`nasreid.engine.context.RunContext.evaluate` with ``split="val"``, the recipe's ``eval``
   settings). No test image is read.
3. **Training loss**: the recipe's loss (``ctx.build_loss()``) on the first ``loss_batches`` batches of the same
   fixed set, the network in train mode with every BN and dropout in eval mode (the recalibrated running
   statistics are used, the head returns its training outputs -- logits and features -- which the loss needs).
   A DARTS-TCM supernet trains with its class memories, not the recipe's loss, so its classifier is untrained and
   this loss only orders candidates by their features' fit to that random classifier: read it with care.
4. **Architecture log-probability** (the strategy's own score): ``sum_l log p_l(sample[l])`` over the choices,
   ``p_l`` the strategy's probabilities -- ``softmax(pi)`` of Gumbel (OSNet-AIN Eq. 7), ``softmax(alpha)`` of
   DARTS-TCM (MSINet Eq. 1); ``nan`` for a strategy without architecture parameters (the random baseline's
   "probabilities" are one-hot on one draw, not a distribution it learnt).

:class:`SupernetRanker` is the in-search API (a strategy that scores genotypes during its own search builds one
on its supernet); :func:`rank_run` ranks candidates of a finished (or interrupted) one-shot search run folder and
writes ``rank.csv`` (one row per candidate, appended as each is scored, so a killed run loses at most one), ``rank.md``
(sorted by validation mAP), ``rank.png`` and ``rank_settings.json`` (a resume with other settings is refused).
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from nasreid.errors import NasreidError

__all__ = ["RankingError", "SupernetRanker", "recalibrate_bn", "arch_logprob", "genotype_key", "load_candidates",
           "sample_candidates", "enumerate_candidates", "load_supernet", "rank_run", "RankResult", "SCORE_KEYS"]

log = logging.getLogger("nasreid")

#: what :meth:`SupernetRanker.score` returns for every candidate (besides the sample)
SCORE_KEYS = ("val_rank1", "val_mAP", "val_mINP", "train_loss", "arch_logprob", "seconds")
RANK_CSV, RANK_MD, RANK_PNG, RANK_SETTINGS = "rank.csv", "rank.md", "rank.png", "rank_settings.json"


class RankingError(NasreidError, ValueError):
    """Candidates cannot be ranked: the run is not a one-shot search with validation identities, a candidate
    list that does not fit its space, or a resume with other settings (the message names the file / key)."""


# ---- pieces ---------------------------------------------------------------------------------------
def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def _norms_in_eval(model: nn.Module, dropout: bool = True, batchnorm: bool = True):
    """``model`` as it is, with its dropout and/or BN layers switched to eval mode inside the context."""
    kinds: tuple[type, ...] = ()
    if dropout:
        kinds += (nn.modules.dropout._DropoutNd,)
    if batchnorm:
        kinds += (nn.modules.batchnorm._BatchNorm,)
    mods = [m for m in model.modules() if isinstance(m, kinds) and m.training] if kinds else []
    for m in mods:
        m.eval()
    try:
        yield model
    finally:
        for m in mods:
            m.train()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], autocast: Callable[[], Any] | None = None) -> int:
    """Recompute the running statistics of every tracking ``BatchNorm`` of ``model`` on ``batches``
    (SPOS, Guo et al., ECCV 2020, Sec. 3.3): reset them, forward the batches in train mode under ``no_grad`` with
    ``momentum=None`` (cumulative average: every batch weighs the same), dropout in eval mode; the layers' momentum
    is restored and the model is left in eval mode.

    Args:
        model: the (fixed) network, modified in place.
        batches: image tensors ``[B, 3, H, W]`` on the model's device (B >= 2: a BN needs two values per channel).
        autocast: a context factory for the forward (AMP on CUDA), or ``None``.

    Returns:
        The number of BN layers recalibrated (0: the network has none; nothing changes then).

    Raises:
        RankingError: ``batches`` is empty while the network has BN layers.
    """
    bns = _batchnorms(model)
    if not bns:
        model.eval()
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = 0
    try:
        with _norms_in_eval(model, dropout=True, batchnorm=False):
            for x in batches:
                with autocast() if autocast is not None else contextlib.nullcontext():
                    model(x)
                n += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    if n == 0:
        raise RankingError("BN recalibration got no batch")
    return len(bns)


def arch_logprob(probabilities: Optional[Mapping[str, Mapping[str, float]]], sample: Mapping[str, Any]) -> float:
    """``sum_l log p_l(sample[l])`` (natural log) over the labels of ``sample``; ``nan`` when ``probabilities`` is
    ``None`` (a strategy without an architecture distribution). ``probabilities``: ``{label: {str(value): p}}`` as
    ``Strategy.probabilities()`` and the checkpoint's strategy state hold them.

    Raises:
        RankingError: a label or value of ``sample`` that ``probabilities`` lacks.
    """
    if probabilities is None:
        return float("nan")
    total = 0.0
    for label, value in sample.items():
        p = probabilities.get(label)
        if p is None or str(value) not in p:
            raise RankingError(f"the strategy's probabilities have no entry for {label}={value!r}")
        total += math.log(max(float(p[str(value)]), 1e-45))
    return total


def genotype_key(sample: Mapping[str, Any], labels: Sequence[str]) -> str:
    """A stable key of a candidate: its values in the space's label order, joined by ``/``
    (e.g. ``os_in_in/os/os/os_in_in/os_in_in/os``)."""
    return "/".join(str(sample[label]) for label in labels)


# ---- the ranker -----------------------------------------------------------------------------------
class SupernetRanker:
    """Scores candidates of a trained one-shot supernet with inherited weights (see the module docstring).

    Args:
        supernet: the supernet (a :class:`~nasreid.mutables.ModelSpace` whose choices are the strategy's mixed ops,
            ``strategy.attach()``) with its trained weights; left unchanged (each candidate is a frozen copy).
        strategy: the :class:`~nasreid.strategies.base.OneShotStrategy` that built it; its ``probabilities()`` give
            the architecture log-probability when it has architecture parameters.
        ctx: a :class:`~nasreid.engine.context.RunContext` whose ``dataset`` holds validation identities (recipe
            ``data.val_ids``) and whose ``device`` is where candidates run.
        bn_batches: K training batches of BN recalibration (0: keep the supernet's statistics).
        loss_batches: batches of the training loss (the first ones of the same fixed set).
        batch_size: images per batch (default: the recipe's ``data.batch_size``).
        seed: seed of the fixed batch set (default: the recipe's ``seed``).
        probabilities: ``{label: {value: p}}`` to score with instead of ``strategy.probabilities()`` (a checkpoint's);
            ``None`` and a strategy without architecture parameters: ``arch_logprob`` is ``nan``.

    Raises:
        RankingError: the dataset holds no validation identities, or too few training identities for one batch.
    """

    def __init__(self, supernet: nn.Module, strategy: Any, ctx: Any, *, bn_batches: int = 10, loss_batches: int = 2,
                 batch_size: Optional[int] = None, seed: Optional[int] = None,
                 probabilities: Optional[Mapping[str, Mapping[str, float]]] = None):
        from nasreid.mutables import simplify

        if bn_batches < 0 or loss_batches < 0:
            raise RankingError(f"bn_batches and loss_batches must be >= 0, got {bn_batches}, {loss_batches}")
        if not getattr(ctx.dataset, "val_query", None):
            raise RankingError("the run's dataset holds no validation identities: set data.val_ids in the search "
                               "recipe (ranking reads validation images, never the test split)")
        self.supernet, self.strategy, self.ctx = supernet, strategy, ctx
        self.bn_batches, self.loss_batches = int(bn_batches), int(loss_batches)
        d = ctx.recipe.data
        self.batch_size = int(batch_size or d.batch_size)
        self.num_instances = max(1, min(int(d.num_instances), self.batch_size))
        self.seed = int(ctx.recipe.seed if seed is None else seed)
        self.choices = simplify(supernet)
        self.labels = list(self.choices)
        if probabilities is None and list(strategy.arch_parameters()):
            probabilities = strategy.probabilities()
        self.probabilities = probabilities
        self._batches: Optional[list[dict[str, Any]]] = None
        self._loss_fn: Optional[nn.Module] = None

    # -- the fixed batch set ------------------------------------------------------------------------
    def batch_records(self) -> list[list[Any]]:
        """The records of the fixed batch set: ``max(bn_batches, loss_batches)`` PK batches drawn with ``seed``
        from the training split (P = batch_size / num_instances identities with two or more images each,
        ``num_instances`` images of each, without replacement where the identity has enough)."""
        n = max(self.bn_batches, self.loss_batches)
        by_pid: dict[int, list[Any]] = {}
        for r in self.ctx.dataset.train:
            by_pid.setdefault(int(r.pid), []).append(r)
        pids = sorted(p for p, rs in by_pid.items() if len(rs) >= 2) or sorted(by_pid)
        k = self.num_instances
        p_per = max(1, self.batch_size // k)
        if len(pids) < p_per:
            p_per = len(pids)
        rng = random.Random(self.seed)
        out = []
        for _ in range(n):
            recs: list[Any] = []
            for pid in rng.sample(pids, p_per):
                pool = by_pid[pid]
                recs += rng.sample(pool, k) if len(pool) >= k else [rng.choice(pool) for _ in range(k)]
            out.append(recs)
        return out

    def batches(self) -> list[dict[str, Any]]:
        """The fixed batch set on the device (``img [B, 3, H, W]``, ``pid [B]``), loaded once (test transform)."""
        if self._batches is None:
            self._batches = []
            for recs in self.batch_records():
                loader = self.ctx.feature_loader(recs, batch_size=len(recs))
                b = next(iter(loader))
                self._batches.append(self.ctx.device.batch({"img": b["img"], "pid": b["pid"]}))
        return self._batches

    # -- a candidate ---------------------------------------------------------------------------------
    def candidate(self, sample: Mapping[str, Any], timing: Optional[dict[str, float]] = None) -> nn.Module:
        """The fixed network of ``sample`` with the supernet's weights, on the device, BN recalibrated on the
        first ``bn_batches`` batches (none: the inherited statistics), in eval mode. ``timing``, when given, receives
        ``seconds_freeze`` and ``seconds_bn``.

        Raises:
            MutableError: ``sample`` does not fit the space (names the label and the choices).
        """
        from nasreid.mutables import freeze

        t0 = time.perf_counter()
        net = freeze(self.supernet, dict(sample), copy_weights=True)
        net = self.ctx.device.model(net)
        t1 = time.perf_counter()
        if self.bn_batches:
            recalibrate_bn(net, [b["img"] for b in self.batches()[:self.bn_batches]], self.ctx.device.autocast)
        self._sync()
        if timing is not None:
            timing.update(seconds_freeze=t1 - t0, seconds_bn=time.perf_counter() - t1)
        return net.eval()

    def _sync(self) -> None:
        if self.ctx.device.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device.device)

    @torch.no_grad()
    def train_loss(self, net: nn.Module) -> float:
        """Mean of the recipe's loss over the first ``loss_batches`` batches of the fixed set, ``net`` in train
        mode with BN and dropout in eval mode (running statistics used; the head's training outputs); ``nan``
        with ``loss_batches=0``. ``net`` is left in eval mode."""
        if not self.loss_batches:
            return float("nan")
        if self._loss_fn is None:
            self._loss_fn = self.ctx.build_loss().to(self.ctx.device.device)
        total = 0.0
        net.train()
        try:
            with _norms_in_eval(net, dropout=True, batchnorm=True):
                for b in self.batches()[:self.loss_batches]:
                    with self.ctx.device.autocast():
                        out = net(b["img"])
                    loss, _ = self._loss_fn(out, b)
                    total += float(loss)
        finally:
            net.eval()
        return total / self.loss_batches

    def arch_logprob(self, sample: Mapping[str, Any]) -> float:
        """:func:`arch_logprob` of ``sample`` under this ranker's probabilities (``nan`` without)."""
        return arch_logprob(self.probabilities, sample)

    def score(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Score one candidate. Returns ``{"key", "val_rank1", "val_mAP", "val_mINP"`` (percent), ``"train_loss"``,
        ``"arch_logprob"`` (nats; ``nan`` without), ``"seconds"`` (wall time of this call) and its parts
        ``"seconds_freeze"``, ``"seconds_bn"``, ``"seconds_val"``, ``"seconds_loss"``}``.

        Raises:
            MutableError: ``sample`` does not fit the space.
        """
        t0 = time.perf_counter()
        timing: dict[str, float] = {}
        net = self.candidate(sample, timing)
        t1 = time.perf_counter()
        res = self.ctx.evaluate(net, split="val")
        t2 = time.perf_counter()
        loss = self.train_loss(net)
        self._sync()
        t3 = time.perf_counter()
        return {"key": genotype_key(sample, self.labels), "val_rank1": float(res["rank1"]),
                "val_mAP": float(res["mAP"]), "val_mINP": float(res.get("mINP", float("nan"))),
                "train_loss": loss, "arch_logprob": self.arch_logprob(sample), "seconds": t3 - t0,
                **timing, "seconds_val": t2 - t1, "seconds_loss": t3 - t2}


# ---- candidates -----------------------------------------------------------------------------------
@dataclass
class Candidate:
    """A sample to rank and where it came from (``preset:NAME``, ``file:PATH``, ``list[i]``, ``sample``, ``all``)."""

    sample: dict[str, Any]
    source: str
    note: str = ""


def _typed(choices: Mapping[str, Any], sample: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``sample`` with each value as the mutable's own typed value (a genotype file stores strings)."""
    out = {}
    for label, value in sample.items():
        mut = choices.get(label)
        if mut is None:
            raise RankingError(f"{where}: unknown choice label {label!r}; the space has {list(choices)}")
        match = [v for v in mut.values if v == value or str(v) == str(value)]
        if not match:
            raise RankingError(f"{where}: {value!r} is not a choice of {label!r}; choices are {mut.values!r}")
        out[label] = match[0]
    missing = [label for label in choices if label not in out]
    if missing:
        raise RankingError(f"{where}: the candidate misses choice label(s) {missing}")
    return out


def load_candidates(path: str | os.PathLike, choices: Mapping[str, Any], space: str,
                    space_kwargs: Mapping[str, Any]) -> list[Candidate]:
    """The candidates of a ``--genotypes`` file: a JSON or YAML list whose entries are ``preset:NAME`` or a bare
    preset name of the run's space (:func:`~nasreid.registry.space_presets`), a path to a ``genotype.json``
    (relative to the list file's folder), a ``{label: value}`` dict, or a genotype dict (with ``choices``). The file
    may also be a single genotype (a dict with ``choices``, e.g. a run's ``genotype.json``).

    A preset or genotype whose ``space_kwargs`` differ from the run's (``osnet_ibn``'s ``conv1_in``) is ranked by its
    choices in the run's supernet; its ``note`` says which constructor arguments were not applied.

    Raises:
        RankingError: the file is missing or unreadable, an entry names no preset or file, or does not fit the space.
    """
    import yaml

    from nasreid.genotype import Genotype
    from nasreid.registry import space_presets

    p = Path(path)
    if not p.is_file():
        raise RankingError(f"--genotypes: {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise RankingError(f"--genotypes: {p} is neither JSON nor YAML: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and "choices" in data:
        data = [data]
    if not isinstance(data, list) or not data:
        raise RankingError(f"--genotypes: {p} must hold a non-empty list (of preset names, genotype files or "
                           f"{{label: value}} dicts) or one genotype")
    presets = space_presets(space)

    def note_for(kw: Mapping[str, Any]) -> str:
        diff = {k: v for k, v in kw.items() if space_kwargs.get(k) != v and k != "num_classes"}
        return f"space_kwargs {diff} not applied (ranked in the run's supernet)" if diff else ""

    out = []
    for i, entry in enumerate(data):
        where = f"{p}[{i}]"
        if isinstance(entry, str):
            name = entry[len("preset:"):] if entry.startswith("preset:") else entry
            f = (p.parent / entry) if not Path(entry).is_absolute() else Path(entry)
            if not entry.startswith("preset:") and f.is_file():
                g = Genotype.load(f)
                if g.space != space:
                    raise RankingError(f"{where}: {f} is a genotype of space {g.space!r}, the run's is {space!r}")
                out.append(Candidate(_typed(choices, g.choices, where), f"file:{entry}", note_for(g.space_kwargs)))
            elif name in presets:
                pr = presets[name]
                out.append(Candidate(_typed(choices, pr["choices"], where), f"preset:{name}",
                                     note_for(pr.get("space_kwargs") or {})))
            else:
                raise RankingError(f"{where}: {entry!r} is neither a file nor a preset of space {space!r} "
                                   f"(presets: {sorted(presets)})")
        elif isinstance(entry, dict):
            if "choices" in entry:
                g = Genotype.from_dict(entry, source=where)
                out.append(Candidate(_typed(choices, g.choices, where), f"list[{i}]", note_for(g.space_kwargs)))
            else:
                out.append(Candidate(_typed(choices, entry, where), f"list[{i}]"))
        else:
            raise RankingError(f"{where}: expected a preset name, a genotype file or a {{label: value}} dict, "
                               f"got {type(entry).__name__}")
    return out


def _space_size(choices: Mapping[str, Any]) -> int:
    return math.prod(len(m.values) for m in choices.values())


def sample_candidates(choices: Mapping[str, Any], n: int, seed: int) -> list[Candidate]:
    """``n`` distinct candidates drawn uniformly (each choice uniform, duplicates redrawn) with ``seed``.

    Raises:
        RankingError: ``n < 1`` or more than the space holds.
    """
    size = _space_size(choices)
    if n < 1 or n > size:
        raise RankingError(f"--sample {n}: the space holds {size} candidates (use --all for every one)")
    rng = random.Random(seed)
    seen: dict[tuple, dict[str, Any]] = {}
    while len(seen) < n:
        s = {label: rng.choice(m.values) for label, m in choices.items()}
        seen.setdefault(tuple(str(v) for v in s.values()), s)
    return [Candidate(s, f"sample(seed={seed})") for s in seen.values()]


def enumerate_candidates(choices: Mapping[str, Any]) -> Iterator[Candidate]:
    """Every candidate of the space, lazily (``itertools.product`` over the choices, in label order; the space's
    size is ``prod_l len(values_l)``, e.g. 4^6 = 4,096 for OSNet-AIN, 4^12 for MSINet)."""
    labels = list(choices)
    for vals in itertools.product(*(choices[label].values for label in labels)):
        yield Candidate(dict(zip(labels, vals)), "all")


# ---- a run folder -----------------------------------------------------------------------------------
def load_supernet(run_dir: str | os.PathLike, device: Optional[str] = None, progress: Optional[bool] = None):
    """The trained supernet of a one-shot search run folder, on its device in eval mode, with its strategy, a
    :class:`~nasreid.engine.context.RunContext` (the run's dataset with its validation identities,
    :func:`~nasreid.engine.runs.build_run_dataset`; no TensorBoard writer) and the checkpoint.

    The space is rebuilt from the recipe with ``num_classes`` of the run's training split, the strategy's
    ``attach()`` turns it into the supernet, and ``checkpoints/last.pt``'s ``model`` replaces every tensor (so the
    recipe's ``model.pretrained`` is not read again: the warm start only set values the checkpoint overwrites).

    Raises:
        RunFolderError: not a run folder. RankingError: not a one-shot search run, no ``data.val_ids`` in its recipe,
            no checkpoint. CheckpointError: the checkpoint does not fit the rebuilt supernet.
    """
    from nasreid.engine.checkpoint import CheckpointError, load_checkpoint
    from nasreid.engine.context import RunContext
    from nasreid.engine.pipeline import strategy_kwargs
    from nasreid.engine.progress import progress_enabled
    from nasreid.engine.runs import build_run_dataset, load_run_recipe
    from nasreid.engine.trainer import device_context
    from nasreid.registry import SPACES, STRATEGIES, load_plugins
    from nasreid.strategies.base import OneShotStrategy

    run = Path(run_dir)
    recipe = load_run_recipe(run)
    if recipe.strategy is None:
        raise RankingError(f"{run} is not a search run (its recipe has no strategy section): nothing to rank")
    if recipe.plugins:
        load_plugins(recipe.plugins, run)
    cls = STRATEGIES.get(recipe.strategy.name)
    if not issubclass(cls, OneShotStrategy):
        raise RankingError(f"{run}: strategy {recipe.strategy.name!r} trains no supernet (a sampling strategy): "
                           "nasreid rank needs a one-shot search run (gumbel, random, darts_tcm ...)")
    if recipe.data.val_ids is None:
        raise RankingError(f"{run}: its recipe sets no data.val_ids, so every training identity trained the "
                           "supernet and no validation identity is left to rank on (the test split is never read); "
                           "search again with --set data.val_ids=N")
    ckpt_path = run / "checkpoints" / "last.pt"
    if not ckpt_path.is_file():
        raise RankingError(f"{run}: {ckpt_path.name} is missing (checkpoints/): no trained supernet to rank with")
    if device is not None:
        recipe = recipe.model_copy(update={"device": device})
    ckpt = load_checkpoint(ckpt_path)
    dataset = build_run_dataset(recipe, run)
    dev = device_context(recipe.device, recipe.amp, recipe.channels_last, compile=False)
    ctx = RunContext(recipe=recipe, run_dir=run, device=dev, dataset=dataset,
                     progress=progress_enabled() if progress is None else progress)
    src = recipe.source or str(run / "recipe.yaml")
    space = SPACES.build(recipe.space.name, recipe.space.kwargs, f"{src}: space.kwargs",
                         num_classes=dataset.num_train_pids)
    assert recipe.strategy is not None  # checked above; model_copy keeps it
    strategy = STRATEGIES.build(recipe.strategy.name, strategy_kwargs(recipe), f"{src}: strategy.kwargs", space)
    supernet = strategy.attach()
    try:
        supernet.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{ckpt_path}: its model does not fit the supernet rebuilt from {run / 'recipe.yaml'}: "
                              f"{str(e).splitlines()[0]}") from None
    supernet = dev.model(supernet).eval()
    return supernet, strategy, ctx, ckpt


@dataclass
class RankResult:
    """What :func:`rank_run` did: the output folder and files, rows scored now / skipped (already in ``rank.csv``),
    the wall seconds of the scored ones and their rate."""

    out_dir: Path
    csv: Path
    markdown: Path
    plot: Optional[Path]
    scored: int
    skipped: int
    seconds: float

    @property
    def candidates_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else float("nan")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.10g}"
    return str(v)


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_markdown(path: Path, rows: list[dict[str, str]], labels: Sequence[str], settings: Mapping[str, Any]) -> None:
    def num(r, k):
        try:
            return float(r[k])
        except (KeyError, ValueError):
            return float("nan")

    rows = sorted(rows, key=lambda r: (-num(r, "val_mAP") if not math.isnan(num(r, "val_mAP")) else math.inf))
    lines = [f"# Candidates ranked with the supernet of `{settings['run']}`", "",
             f"Inherited weights, BN recalibrated on {settings['bn_batches']} training batches of "
             f"{settings['batch_size']} (seed {settings['seed']}; 0 = the supernet's statistics), validation on "
             f"{settings['val_ids']} held-out training identities (data.val_ids), training loss on "
             f"{settings['loss_batches']} batches, checkpoint epoch {settings['checkpoint_epoch']}. "
             f"Sorted by validation mAP. Key: {' / '.join(labels)}.", "",
             "| # | key | source | val mAP | val rank-1 | val mINP | train loss | arch log-prob | s | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        vals = [f"{num(r, k):.2f}" for k in ("val_mAP", "val_rank1", "val_mINP")]
        lines.append(f"| {i} | `{r['key']}` | {r.get('source', '')} | " + " | ".join(vals)
                     + f" | {num(r, 'train_loss'):.4f} | {num(r, 'arch_logprob'):.3f} | {num(r, 'seconds'):.1f} | "
                     + f"{r.get('note', '')} |")
    path.write_text("\n".join(lines) + "\n")


def _plot(path: Path, rows: list[dict[str, str]], title: str) -> Optional[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def col(k):
        out = []
        for r in rows:
            try:
                out.append(float(r[k]))
            except (KeyError, ValueError):
                out.append(float("nan"))
        return out

    if not rows:
        return None
    mAP, lp, loss = col("val_mAP"), col("arch_logprob"), col("train_loss")
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    if any(math.isfinite(v) for v in lp):
        a.scatter(lp, mAP, s=14)
        a.set_xlabel("architecture log-probability (nats)")
    else:
        order = sorted(mAP, reverse=True)
        a.plot(range(1, len(order) + 1), order, marker="o", ms=3)
        a.set_xlabel("candidate (sorted; the strategy has no architecture distribution)")
    a.set_ylabel("validation mAP (%)")
    b.scatter(loss, mAP, s=14, color="tab:orange")
    b.set_xlabel("training loss (recalibrated BN)")
    b.set_ylabel("validation mAP (%)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def rank_run(run_dir: str | os.PathLike, *, genotypes: Optional[str | os.PathLike] = None,
             sample: Optional[int] = None, seed: int = 0, all_candidates: bool = False, bn_batches: int = 10,
             loss_batches: int = 2, batch_size: Optional[int] = None, out: Optional[str | os.PathLike] = None,
             device: Optional[str] = None, progress: Optional[bool] = None,
             echo: Callable[[str], None] = print) -> RankResult:
    """Rank candidates of a one-shot search run folder with its supernet (see the module docstring) and write
    ``OUT/rank.csv`` (appended row by row), ``rank.md``, ``rank.png`` and ``rank_settings.json`` (``OUT`` default
    ``RUN/rank``). Exactly one of ``genotypes`` (a file, :func:`load_candidates`), ``sample`` (N distinct uniform
    draws with ``seed``) and ``all_candidates`` (the whole space; its size and, after the first candidate, the
    estimated time are printed first). Candidates already in ``rank.csv`` are skipped (resume).

    Args:
        bn_batches: K training batches of BN recalibration (0: the supernet's statistics).
        loss_batches: batches of the training loss. batch_size: images per batch (default ``data.batch_size``).
        device: overrides the recipe's device (``cpu``, ``cuda``). progress: a progress bar (default: on a terminal
            unless ``NASREID_NO_PROGRESS``). echo: where the lines for the user go.

    Raises:
        RankingError: no or several selections; a run without validation identities or supernet; ``rank.csv`` made
            with other settings (names the key of ``rank_settings.json``). RunFolderError / CheckpointError /
            MutableError: as :func:`load_supernet` and :func:`load_candidates`.
    """
    from nasreid.engine.checkpoint import write_json

    picked = [genotypes is not None, sample is not None, bool(all_candidates)]
    if sum(picked) != 1:
        raise RankingError("nasreid rank: give exactly one of --genotypes FILE, --sample N or --all")
    run = Path(run_dir)
    supernet, strategy, ctx, ckpt = load_supernet(run, device=device, progress=progress)
    st = (ckpt.get("hooks") or {}).get("strategy") or {}
    probs = st.get("probabilities") if list(strategy.arch_parameters()) else None
    ranker = SupernetRanker(supernet, strategy, ctx, bn_batches=bn_batches, loss_batches=loss_batches,
                            batch_size=batch_size, probabilities=probs)
    choices, labels = ranker.choices, ranker.labels
    cands: Iterable[Candidate]
    if genotypes is not None:
        cands = load_candidates(genotypes, choices, ctx.recipe.space.name, ctx.recipe.space.kwargs)
        total = len(cands)
    elif sample is not None:
        cands = sample_candidates(choices, int(sample), seed)
        total = len(cands)
    else:
        cands, total = enumerate_candidates(choices), _space_size(choices)
        echo(f"--all: the space holds {total} candidates")

    out_dir = Path(out) if out is not None else run / "rank"
    out_dir.mkdir(parents=True, exist_ok=True)
    vs = ctx.dataset.val_split or {}
    assert ctx.recipe.strategy is not None  # load_supernet refuses a recipe without one
    settings = {"run": run.name, "strategy": ctx.recipe.strategy.name, "space": ctx.recipe.space.name,
                "checkpoint_epoch": int(ckpt.get("epoch", -1)) + 1, "bn_batches": ranker.bn_batches,
                "loss_batches": ranker.loss_batches, "batch_size": ranker.batch_size,
                "num_instances": ranker.num_instances, "seed": ranker.seed, "val_ids": ctx.recipe.data.val_ids,
                "val_pids": list(vs.get("pids", [])), "height": ctx.recipe.data.height,
                "width": ctx.recipe.data.width, "eval_flip": ctx.recipe.eval.flip,
                "eval_metric": ctx.recipe.eval.metric,
                "labels": labels}
    spath = out_dir / RANK_SETTINGS
    csv_path = out_dir / RANK_CSV
    if spath.is_file():
        old = json.loads(spath.read_text())
        for k, v in settings.items():
            if k != "run" and k in old and old[k] != v:  # the folder may have been moved or renamed
                raise RankingError(f"{spath}: {k} is {old[k]!r} there, this ranking asks for {v!r}; rank into "
                                   "another folder (--out) or remove it")
    elif csv_path.is_file():
        raise RankingError(f"{csv_path} exists without {RANK_SETTINGS}: rank into another folder (--out)")
    write_json(spath, settings)

    done = {r["key"] for r in _read_rows(csv_path)}
    n_done = len(done) if all_candidates else sum(genotype_key(c.sample, labels) in done for c in cands)
    if n_done:
        echo(f"{n_done} of {total} candidates already in {csv_path}: skipped")
    fields = ["key", "source", *labels, "val_rank1", "val_mAP", "val_mINP", "train_loss", "arch_logprob",
              "seconds", "note"]
    new_file = not csv_path.is_file() or csv_path.stat().st_size == 0
    if not new_file:
        with csv_path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise RankingError(f"{csv_path}: its columns {header} are not this ranking's {fields}")
    remaining = total - n_done
    bar = None
    if ctx.progress and remaining > 0:
        from tqdm import tqdm

        bar = tqdm(total=remaining, desc="rank", unit="cand")
    t0 = time.perf_counter()
    n, skipped = 0, 0
    seen = set(done)
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            w.writeheader()
            f.flush()
        for c in cands:
            key = genotype_key(c.sample, labels)
            if key in seen:  # already ranked (resume), or listed twice
                skipped += 1
                continue
            if not all_candidates:
                seen.add(key)
            res = ranker.score(c.sample)
            row = {"source": c.source, "note": c.note, **{label: c.sample[label] for label in labels}, **res}
            w.writerow({k: _fmt(row[k]) for k in fields})
            f.flush()
            os.fsync(f.fileno())
            n += 1
            if bar is not None:
                bar.update(1)
            if all_candidates and n == 1 and remaining > 1:
                echo(f"--all: first candidate took {res['seconds']:.1f} s: about "
                     f"{res['seconds'] * (remaining - 1) / 60:.1f} min for the remaining {remaining - 1}")
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    rows = _read_rows(csv_path)
    md = out_dir / RANK_MD
    _write_markdown(md, rows, labels, settings)
    png = _plot(out_dir / RANK_PNG, rows,
                f"{run.name}: {len(rows)} candidates, BN recalibrated on {bn_batches} batches")
    result = RankResult(out_dir, csv_path, md, png, n, skipped, elapsed)
    if n:
        echo(f"scored {n} candidates in {elapsed:.1f} s: {result.candidates_per_s:.3f} candidates/s "
             f"({ctx.device.device}, {torch.get_num_threads()} threads)")
    echo(f"wrote {csv_path}, {md}" + (f", {png}" if png else ""))
    return result
