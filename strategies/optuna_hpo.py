"""Hyper-parameter and architecture search with Optuna: ask/tell over the space's mutables, pruning, shared
storage, several workers on one study.

Akiba, Sano, Yanase, Ohta & Koyama, "Optuna: A Next-generation Hyperparameter Optimization Framework", KDD 2019
(define-by-run ask/tell, pruning with ``report``/``should_prune``); TPE (Bergstra et al., NeurIPS 2011),
NSGA-II (Deb et al., IEEE TEC 2002) for the multi-objective mode; median stopping, successive halving (ASHA,
Li et al., MLSys 2020) and Hyperband (Li et al., JMLR 2018) pruners -- all Optuna's own. Built for RMGL's
search (Wang et al., TIP 2020: RP depth, branches, stripe counts, ABP, RSA), but it only sees mutables, so it
searches any registered space (``osnet_ain``, ``msinet`` ...).

One trial:

1. ``study.ask()``; every choice of the space (:func:`nasreid.mutables.simplify`, declaration order) becomes a
   ``suggest_*`` call: a ``LayerChoice`` / ``Categorical`` -> ``suggest_categorical(label, values)``, a
   ``Numerical`` -> ``suggest_int`` / ``suggest_float`` with its declared range, ``step`` and ``log``. A
   space may skip choices that do not apply to a partial sample (``space.is_active(label, sample)``, e.g.
   the stripe count of a branch the sample does not build); those take their default value.
2. The sample is frozen into a fixed network and trained for ``epochs`` with ``ctx.train_fixed`` (the
   recipe's training method and loss; value choices with a ``recipe_key`` -- RMGL's RSA settings -- are
   applied to the trial's recipe first) on the **search-train identities**; after every ``val_every``
   epochs the mAP on held-out **training identities** (the validation identities of the recipe's ``data.val_ids``
   when it sets them, else ``val_fraction`` of the training identities; never the test split) is reported, and the
   pruner may stop the trial.
3. ``study.tell`` with the last validation mAP (single objective) or (mAP, inference parameters in millions
   / measured latency in ms per image) in the multi-objective mode.

Storage: by default Optuna's journal file ``study.journal`` in the run folder (file lock: safe for several
processes on one machine); ``storage`` in the strategy kwargs takes any SQLAlchemy URL (SQLite, PostgreSQL,
MySQL) for workers on several machines, or another journal file path. Every worker (``nasreid hpo --workers N``
starts N processes; several invocations with one storage and study name join the same study) runs the loop of
:meth:`OptunaStrategy.work` until the study holds ``trials`` finished or running trials.

Killed workers: Optuna 5's journal storage has no heartbeat (only ``RDBStorage`` has one, and only inside
``study.optimize``), so each running trial carries a ``heartbeat`` user attribute refreshed by a thread every
``heartbeat_seconds``; before each ``ask`` a worker fails the trials whose heartbeat is older than
``grace_seconds`` and hands them to Optuna's :class:`~optuna.storages.RetryFailedTrialCallback`, which enqueues
a copy with the same parameters. The retry resumes the killed proxy training from the dead trial's last epoch
checkpoint (and re-reports its validation history), so an interrupted study loses at most one epoch per worker.

Files of a run: ``study.journal``, ``trials/trial_NNNN/`` (the proxy run: checkpoints, ``record.json`` with
params, per-epoch validation mAP, seconds, state), ``trials.csv`` (``study.trials_dataframe()``), Optuna's
plots as PNG under ``plots/``, ``genotype.json`` of the best trial (or of the Pareto point picked by
``pareto_rule``).

Example (the caller owns the loop, as in Optuna)::

    strategy = OptunaStrategy(space, trials=12, epochs=4, pruner="median")
    genotype = strategy.search(ctx)        # = work(ctx) + finalize(ctx)
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import logging
import math
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from nasreid.config import apply_overrides
from nasreid.engine.checkpoint import read_json, write_json
from nasreid.engine.trainer import Hook
from nasreid.errors import NasreidError
from nasreid.genotype import Genotype, GenotypeError
from nasreid.mutables import Categorical, LayerChoice, Numerical, freeze, recipe_overrides, simplify
from nasreid.registry import register_strategy

from .base import SamplingStrategy, StrategyConfigError, make_genotype

__all__ = ["OptunaStrategy", "HPOError", "query_gallery_split", "open_study", "suggest_sample", "pick_pareto"]

log = logging.getLogger("nasreid")

_OBJECTIVE_DIRECTIONS = {"mAP": "maximize", "rank1": "maximize", "params": "minimize", "latency": "minimize"}


class HPOError(NasreidError, RuntimeError):
    """The study cannot go on (e.g. every trial fails); the message names the cause and where to look."""


def _optuna():
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - optuna is a dependency
        raise StrategyConfigError("the 'optuna' strategy needs the optuna package (pip install optuna)") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def query_gallery_split(records) -> tuple[list, list]:
    """Query / gallery of held-out identities for a validation CMC/mAP: for each pid the first image of
    each camera is a query, the other images form the gallery (so every query of an identity seen by two
    cameras has a cross-camera match, the re-ID protocol's condition).

    Args:
        records: image records (``pid``, ``camid``), in a fixed order.

    Returns:
        ``(query, gallery)`` lists of records.

    Raises:
        ValueError: no query would have a cross-camera gallery match.
    """
    query: list = []
    gallery: list = []
    seen = set()
    for r in records:
        key = (r.pid, r.camid)
        (gallery if key in seen else query).append(r)
        seen.add(key)
    cams: dict[int, set] = {}
    for r in gallery:
        cams.setdefault(r.pid, set()).add(r.camid)
    if not any(cams.get(q.pid, set()) - {q.camid} for q in query):
        raise ValueError("validation identities need images from two cameras: no query has a cross-camera match")
    return query, gallery


def suggest_sample(trial, space) -> dict[str, Any]:
    """A sample of ``space`` drawn through ``trial`` (define-by-run): one ``suggest_*`` per active choice, in
    declaration order; choices the space reports inactive (``space.is_active(label, sample_so_far)``) take
    their default and are not suggested.

    Raises:
        StrategyConfigError: a categorical value Optuna cannot store (only None, bool, int, float, str).
    """
    sample: dict[str, Any] = {}
    is_active = getattr(space, "is_active", None)
    for label, mut in simplify(space).items():
        if is_active is not None and not is_active(label, dict(sample)):
            sample[label] = mut.default()
            continue
        if isinstance(mut, Numerical):
            if mut.integer:
                sample[label] = trial.suggest_int(label, mut.low, mut.high, step=mut.step or 1, log=mut.log)
            else:
                sample[label] = trial.suggest_float(label, mut.low, mut.high, step=mut.step, log=mut.log)
        elif isinstance(mut, (Categorical, LayerChoice)):
            values = mut.values
            bad = [v for v in values if v is not None and not isinstance(v, (bool, int, float, str))]
            if bad:
                raise StrategyConfigError(f"choice {label!r}: Optuna stores only None/bool/int/float/str values, "
                                          f"got {bad!r}")
            sample[label] = trial.suggest_categorical(label, values)
        else:  # pragma: no cover - every mutable is one of the above
            raise StrategyConfigError(f"choice {label!r}: unsupported mutable {type(mut).__name__}")
    return sample


def pick_pareto(trials, rule: str, directions: list[str]):
    """One trial of a Pareto front by ``rule``: ``best_first`` (best first objective), ``cheapest`` (best
    second objective), ``knee`` (closest to the ideal point after min-max normalising each objective).

    Raises:
        GenotypeError: empty front.
    """
    if not trials:
        raise GenotypeError("the study has no completed trial to derive from")
    sign = [1.0 if d == "minimize" else -1.0 for d in directions]
    if rule == "best_first":
        return min(trials, key=lambda t: sign[0] * t.values[0])
    if rule == "cheapest":
        return min(trials, key=lambda t: (sign[1] * t.values[1], sign[0] * t.values[0]))
    vals = [[s * v for s, v in zip(sign, t.values)] for t in trials]  # all minimised
    lo = [min(c) for c in zip(*vals)]
    hi = [max(c) for c in zip(*vals)]
    norm = [[(v - a) / (b - a) if b > a else 0.0 for v, a, b in zip(row, lo, hi)] for row in vals]
    return trials[min(range(len(trials)), key=lambda i: math.hypot(*norm[i]))]


# ---------------------------------------------------------------------------------------------------
class _PruneHook(Hook):
    """Validation mAP on held-out identities every ``every`` epochs (and after the last), reported to the
    trial; raises ``optuna.TrialPruned`` when the pruner says so. On a resumed proxy run, the validation
    history of the finished epochs is reported again first (a retried trial, or an interrupted worker)."""

    name = "hpo_validation"

    def __init__(self, trial, evaluate, every: int, optuna, report: bool = True):
        self.trial, self.evaluate, self.every, self.optuna = trial, evaluate, max(1, int(every)), optuna
        self.report = report  # Optuna has no intermediate values (nor pruning) for multi-objective studies

    def before_train(self, trainer) -> None:
        for row in trainer.history if self.report else ():
            if "val_mAP" in row:
                self.trial.report(float(row["val_mAP"]), int(row["epoch"]) + 1)

    def after_epoch(self, trainer) -> None:
        e = trainer.epoch + 1
        if e % self.every and e < trainer.epochs:
            return
        res = self.evaluate(trainer.model)
        trainer.log(val_mAP=float(res["mAP"]), val_rank1=float(res["rank1"]))
        if not self.report:
            return
        self.trial.report(float(res["mAP"]), e)
        if e < trainer.epochs and self.trial.should_prune():
            trainer.save()  # keep the pruned epoch's row for the trial record
            raise self.optuna.TrialPruned(f"pruned after epoch {e} at validation mAP {res['mAP']:.2f}")


class _Heartbeat:
    """Refresh a trial's ``heartbeat`` user attribute every ``interval`` seconds in a daemon thread."""

    def __init__(self, trial, interval: float):
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a trial told meanwhile refuses updates
                self.trial.set_user_attr("heartbeat", time.time())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def open_study(cfg, run_dir: Path, study_name: str, worker: int = 0, create: bool = True):
    """The run's Optuna study (created on first use, loaded afterwards) with the configured storage, sampler
    (seeded per worker, so two workers do not propose the same first points) and pruner.

    Raises:
        StrategyConfigError: an existing study with other objective directions.
    """
    optuna = _optuna()
    storage = _storage(cfg.storage, run_dir)
    directions = [_OBJECTIVE_DIRECTIONS[o] for o in cfg.objectives]
    multi = len(directions) > 1
    seed = cfg.seed + 1000 * worker
    skw = dict(cfg.sampler_kwargs)
    name = cfg.sampler if cfg.sampler != "auto" else ("nsga2" if multi else "tpe")
    if name == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, **skw)
    elif name == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed, **skw)
    else:
        sampler = optuna.samplers.NSGAIISampler(seed=seed, **skw)
    pkw = dict(cfg.pruner_kwargs)
    if cfg.pruner == "median":
        pruner = optuna.pruners.MedianPruner(**pkw)
    elif cfg.pruner == "sha":
        pruner = optuna.pruners.SuccessiveHalvingPruner(**pkw)
    elif cfg.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(**{"min_resource": 1, **pkw})
    else:
        pruner = optuna.pruners.NopPruner()
    if create:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=directions, sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
    else:
        study = optuna.load_study(storage=storage, study_name=study_name, sampler=sampler, pruner=pruner)
    have = [d.name.lower() for d in study.directions]
    if have != directions:
        raise StrategyConfigError(f"study {study_name!r} in {cfg.storage or run_dir / 'study.journal'} optimises "
                                  f"{have}, the recipe asks for {directions} (strategy.kwargs.objectives)")
    return study


def _storage(spec: Optional[str], run_dir: Path):
    """An SQLAlchemy URL -> ``RDBStorage``; a file path (``$VARS`` and ``~`` expanded) or None (the run's
    ``study.journal``) -> Optuna's journal file storage."""
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if spec and "://" in spec:
        return optuna.storages.RDBStorage(spec)
    path = Path(os.path.expandvars(spec)).expanduser() if spec else run_dir / "study.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _default_objectives() -> list[Literal["mAP", "rank1", "params", "latency"]]:
    """``objectives`` by default: mAP alone."""
    return ["mAP"]


# ---------------------------------------------------------------------------------------------------
@register_strategy("optuna")
class OptunaStrategy(SamplingStrategy):
    """Optuna HPO over the space's mutables with proxy trainings, pruning and a shared storage.

    Kwargs (``strategy.kwargs``): see :class:`OptunaStrategy.Config`.

    Raises:
        StrategyConfigError: invalid kwargs (named), pruning with several objectives.
    """

    name = "optuna"
    validation_kwargs: ClassVar[tuple[str, ...]] = ("val_fraction",)

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        trials: int = Field(20, gt=0, description="trials the study runs to (complete + pruned + running)")
        epochs: Optional[int] = Field(None, gt=0, description="proxy epochs per trial (default optim.epochs)")
        val_fraction: float = Field(0.2, gt=0, lt=1, description="held-out training identities for validation, "
                                    "unless the recipe's data.val_ids holds them out (then refused: those are used)")
        val_every: int = Field(1, gt=0, description="validate (report to the pruner) every N epochs")
        sampler: Literal["auto", "tpe", "random", "nsga2"] = "auto"
        sampler_kwargs: dict[str, Any] = Field(default_factory=dict)
        pruner: Literal["median", "sha", "hyperband", "none"] = "median"
        pruner_kwargs: dict[str, Any] = Field(default_factory=dict)
        objectives: list[Literal["mAP", "rank1", "params", "latency"]] = Field(default_factory=_default_objectives)
        pareto_rule: Literal["knee", "best_first", "cheapest"] = "knee"
        storage: Optional[str] = Field(None, description="SQLAlchemy URL or journal file; None: run/study.journal")
        study_name: Optional[str] = Field(None, description="default: the recipe name")
        seed: int = 0
        heartbeat_seconds: float = Field(10.0, gt=0)
        grace_seconds: float = Field(60.0, gt=0, description="a running trial without heartbeat for this long failed")
        max_retry: int = Field(2, ge=0, description="retries of a trial whose worker died")
        max_failures: int = Field(3, gt=0, description="a worker stops after this many failed trials in a row")
        latency_batch: int = Field(16, gt=0, description="images per forward for the latency objective")

        @model_validator(mode="after")
        def _checks(self):
            if self.objectives[:1] not in (["mAP"], ["rank1"]):
                raise ValueError("objectives: the first objective must be 'mAP' or 'rank1'")
            if len(self.objectives) > 2:
                raise ValueError("objectives: at most two (accuracy and one cost)")
            if len(self.objectives) > 1 and self.pruner != "none":
                raise ValueError("pruner: Optuna prunes single-objective studies only; set pruner: none with "
                                 "several objectives")
            if self.grace_seconds <= self.heartbeat_seconds:
                raise ValueError("grace_seconds must exceed heartbeat_seconds")
            return self

    cfg: Config  # the validated ``strategy.kwargs`` (set by Strategy.__init__)

    def __init__(self, space, **kwargs: Any):
        super().__init__(space, **kwargs)
        self.worker = 0

    # ---- the loop --------------------------------------------------------------------------------
    def search(self, ctx) -> Genotype:
        """Run this process's share of the study (:meth:`work`), then write the trials table, the plots and
        the best trial's genotype (:meth:`finalize`)."""
        self.work(ctx)
        return self.finalize(ctx)

    def _study_name(self, recipe) -> str:
        return self.cfg.study_name or recipe.name

    def work(self, ctx, worker: int = 0) -> int:
        """Ask, train, tell until the study holds ``trials`` trials that are complete, pruned or running (a
        trial whose worker died is failed after ``grace_seconds`` and retried); returns the number of trials
        this worker finished."""
        optuna = _optuna()
        self.worker = worker
        study = open_study(self.cfg, ctx.run_dir, self._study_name(ctx.recipe), worker=worker)
        TS = optuna.trial.TrialState
        done = failures = 0
        while True:
            with self._ask_lock(ctx.run_dir):
                self._fail_stale(study)
                trials = study.get_trials(deepcopy=False)
                waiting = [t for t in trials if t.state == TS.WAITING]
                live = [t for t in trials if t.state in (TS.COMPLETE, TS.PRUNED, TS.RUNNING, TS.WAITING)]
                trial = None
                if waiting or len(live) < self.cfg.trials:
                    trial = study.ask()
                    trial.set_user_attr("heartbeat", time.time())
                    trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}:{worker}")
            if trial is None:
                if any(t.state == TS.RUNNING for t in trials):  # others still run: watch for their death
                    time.sleep(self.cfg.heartbeat_seconds)
                    continue
                break
            state, error = self._run_trial(ctx, study, trial)
            done += 1
            failures = failures + 1 if state == "FAIL" else 0
            if failures >= self.cfg.max_failures:
                raise HPOError(f"{failures} trials in a row failed in this worker (strategy.kwargs.max_failures); "
                               f"the last: {error}; see {ctx.run_dir / 'train.log'} and the trials' record.json")
        return done

    @contextlib.contextmanager
    def _ask_lock(self, run_dir: Path):
        """Serialise count-then-ask among the workers of this machine (so the study stops at exactly
        ``trials``; workers on other machines may overshoot by one trial each)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / ".hpo_ask.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _fail_stale(self, study) -> None:
        optuna = _optuna()
        from optuna.storages import RetryFailedTrialCallback

        now = time.time()
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            beat = t.user_attrs.get("heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else now)
            if now - float(beat) <= self.cfg.grace_seconds:
                continue
            try:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except Exception:  # another worker failed it first
                continue
            log.warning("trial %d: no heartbeat for %.0f s (worker %s died); marked failed and retried", t.number,
                        now - float(beat), t.user_attrs.get("worker"))
            failed = next(x for x in study.get_trials(deepcopy=True) if x.number == t.number)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning
                RetryFailedTrialCallback(max_retry=self.cfg.max_retry)(study, failed)

    def _trial_dir(self, run_dir: Path, number: int) -> Path:
        return run_dir / "trials" / f"trial_{number:04d}"

    def _run_trial(self, ctx, study, trial) -> tuple[str, Any]:
        """Train and tell one trial; returns its state's name and its error (``None`` if none)."""
        optuna = _optuna()
        from optuna.storages import RetryFailedTrialCallback
        from torch.utils.tensorboard import SummaryWriter

        tdir = self._trial_dir(ctx.run_dir, trial.number)
        tdir.mkdir(parents=True, exist_ok=True)
        frozen = next(x for x in study.get_trials(deepcopy=False) if x.number == trial.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning
            origin = RetryFailedTrialCallback.retried_trial_number(frozen)
        if origin is not None:  # a retry: continue the dead trial's proxy run from its last checkpoint
            src = self._trial_dir(ctx.run_dir, origin) / "checkpoints"
            if src.is_dir() and not (tdir / "checkpoints").exists():
                shutil.copytree(src, tdir / "checkpoints")
        t0 = time.time()
        record: dict[str, Any] = {"number": trial.number, "retry_of": origin, "worker": trial.user_attrs.get("worker")}
        state, values, history = optuna.trial.TrialState.FAIL, None, []
        writer = SummaryWriter(log_dir=str(tdir / "tb"))
        try:
            with _Heartbeat(trial, self.cfg.heartbeat_seconds):
                sample = suggest_sample(trial, self.space)
                record["sample"] = sample
                trial.set_user_attr("sample", json.dumps(sample))
                values, history = self._train_and_score(ctx, trial, sample, tdir, writer)
            state = optuna.trial.TrialState.COMPLETE
        except optuna.TrialPruned as e:
            state = optuna.trial.TrialState.PRUNED
            record["pruned"] = str(e)
        except Exception as e:
            record["error"] = f"{type(e).__name__}: {e}"
            log.exception("trial %d failed", trial.number)
        finally:
            writer.close()
        from nasreid.engine.checkpoint import load_checkpoint

        ck = tdir / "checkpoints" / "last.pt"
        if not history and ck.is_file():
            with contextlib.suppress(Exception):
                history = load_checkpoint(ck).get("history", [])
        record.update({"state": state.name, "values": values, "seconds": time.time() - t0,
                       "val_mAP": [r.get("val_mAP") for r in history if "val_mAP" in r],
                       "epochs_run": len(history), "params": dict(trial.params)})
        write_json(tdir / "record.json", record)
        if state == optuna.trial.TrialState.COMPLETE:
            study.tell(trial, values)
        else:
            study.tell(trial, state=state)
        if ck.is_file() and state != optuna.trial.TrialState.FAIL:
            shutil.rmtree(tdir / "checkpoints")  # keep trial folders small; the record holds the history
        log.info("trial %d %s in %.0f s: %s  %s", trial.number, state.name, record["seconds"],
                 values, json.dumps(record.get("sample", {})))
        return state.name, record.get("error")

    def _splits(self, ctx):
        """Trial training records (pids ``0..N-1``) and the validation query / gallery: the validation identities
        of the recipe's ``data.val_ids`` when it sets them (the trials train on the other training identities),
        else ``val_fraction`` of the training identities split off here (``hpo_split.json``); never the test split."""
        if getattr(ctx.dataset, "val_query", None):
            return list(ctx.dataset.train), list(ctx.dataset.val_query), list(ctx.dataset.val_gallery)
        train_recs, val_recs = ctx.split_identities(overlap=0.0, val_fraction=self.cfg.val_fraction,
                                                    name="hpo_split")
        query, gallery = query_gallery_split(val_recs)
        return train_recs, query, gallery

    def _train_and_score(self, ctx, trial, sample, tdir: Path, writer):
        train_recs, query, gallery = self._splits(ctx)
        n_cls = ctx.check_num_classes(train_recs)
        torch.manual_seed(ctx.recipe.seed * 100_003 + trial.number)
        space = ctx.build_space(num_classes=n_cls)
        net = freeze(space, sample, copy_weights=False)
        recipe = apply_overrides(ctx.recipe, recipe_overrides(space, sample), where=f"trial {trial.number} sample")
        tctx = dataclasses.replace(ctx, recipe=recipe, run_dir=tdir, writer=writer, extra_hooks=list(ctx.extra_hooks))
        valset = copy.copy(ctx.dataset)
        valset.query, valset.gallery = list(query), list(gallery)
        valset.name = f"{getattr(ctx.dataset, 'name', 'train')}-heldout"

        def evaluate(model):
            return tctx.evaluate(model, dataset=valset)

        hook = _PruneHook(trial, evaluate, self.cfg.val_every, _optuna(), report=len(self.cfg.objectives) == 1)
        history = tctx.train_fixed(net, epochs=self.cfg.epochs or recipe.optim.epochs, hooks=[hook],
                                   records=train_recs, run_dir=tdir)
        last = [r for r in history if "val_mAP" in r][-1]
        acc = float(last["val_mAP"] if self.cfg.objectives[0] == "mAP" else last["val_rank1"])
        values: list[float] = [acc]
        for obj in self.cfg.objectives[1:]:
            if obj == "params":
                values.append(_inference_params(net) / 1e6)
            else:
                values.append(_latency_ms(net, recipe, tctx.device, self.cfg.latency_batch))
        trial.set_user_attr("inference_params_M", _inference_params(net) / 1e6)
        return (values[0] if len(values) == 1 else values), history

    # ---- results ---------------------------------------------------------------------------------
    def finalize(self, ctx) -> Genotype:
        """Write ``trials.csv`` and the plots, and return the derived genotype (see :meth:`derive`)."""
        self.report(ctx.run_dir, ctx.recipe)
        return self.derive(ctx.run_dir, ctx.recipe)

    @classmethod
    def load_study(cls, run_dir, recipe):
        """The study of a run folder (its recipe's storage and study name), read-only use."""
        cfg = cls.validate_kwargs(recipe.strategy.kwargs)
        return open_study(cfg, Path(run_dir), cfg.study_name or recipe.name, create=False)

    @classmethod
    def report(cls, run_dir, recipe) -> dict[str, Any]:
        """``trials.csv`` and Optuna's plots of a run folder (:func:`write_study_report`)."""
        return write_study_report(cls.load_study(run_dir, recipe), Path(run_dir))

    @classmethod
    def plot_run(cls, run_dir, recipe, out=None, formats=("png", "svg")) -> list[Path]:
        """``nasreid plot RUN`` of a study: ``trials.csv`` and Optuna's plots (PNG) under the run folder
        (:meth:`report`; ``out`` and ``formats`` do not apply). Returns the files written."""
        return list(cls.report(run_dir, recipe)["plots"])

    def probabilities(self) -> dict[str, dict[str, float]]:
        return {}

    @classmethod
    def derive(cls, run_dir, recipe) -> Genotype:
        """Genotype of the best complete trial (single objective) or of the Pareto point picked by
        ``pareto_rule`` (multi-objective), read from the study storage.

        Raises:
            GenotypeError: no complete trial yet.
        """
        optuna = _optuna()
        cfg = cast(OptunaStrategy.Config, cls.validate_kwargs(recipe.strategy.kwargs))  # cls.Config's instance
        study = cls.load_study(run_dir, recipe)
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            raise GenotypeError(f"{run_dir}: the study has no complete trial yet")
        directions = [d.name.lower() for d in study.directions]
        if len(directions) == 1:
            best, rule = study.best_trial, f"best trial by {cfg.objectives[0]} on held-out training identities"
        else:
            best = pick_pareto(study.best_trials, cfg.pareto_rule, directions)
            rule = f"Pareto point by rule {cfg.pareto_rule!r} over {cfg.objectives}"
        sample = json.loads(best.user_attrs["sample"])
        values = dict(zip(cfg.objectives, best.values))
        return make_genotype(recipe, sample, {}, trial=best.number, values=values, rule=rule,
                             trials=len(study.trials), run=Path(run_dir).name)


def _inference_params(net) -> int:
    return sum(p.numel() for n, p in net.named_parameters() if "classifier" not in n)


def _latency_ms(net, recipe, device, batch: int) -> float:
    """Median eval-forward time per image in ms over 5 runs (after 2 warm-up runs) at the recipe's input size."""
    net.eval()
    x = torch.randn(batch, 3, recipe.data.height, recipe.data.width, device=device.device)
    times = []
    with torch.no_grad():
        for i in range(7):
            if device.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            net(x)
            if device.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1000 / batch)
    net.train()
    return float(sorted(times)[len(times) // 2])


def write_study_report(study, run_dir: Path) -> dict[str, Any]:
    """``trials.csv`` (pandas, via ``study.trials_dataframe()``) and Optuna's matplotlib plots under
    ``plots/``: optimisation history, intermediate values, parameter importances (when at least two trials
    are complete), Pareto front (multi-objective). Returns ``{"csv": path, "plots": [paths], "counts": ...}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    run_dir = Path(run_dir)
    df = study.trials_dataframe()
    df.to_csv(run_dir / "trials.csv", index=False)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    multi = len(study.directions) > 1
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    makers = {"intermediate_values": ovm.plot_intermediate_values}
    if multi:
        makers["pareto_front"] = ovm.plot_pareto_front
    else:
        makers["optimization_history"] = ovm.plot_optimization_history
        if len(complete) >= 2:
            makers["param_importances"] = ovm.plot_param_importances
    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in makers.items():
            try:
                ax: Any = fn(study)  # an Axes, or an array of them
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                fig.savefig(out / f"{name}.png", dpi=110)
                plt.close(fig)
                files.append(out / f"{name}.png")
            except Exception as e:  # e.g. importances with a single distinct value
                log.warning("plot %s skipped: %s", name, e)
    counts = {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    write_json(run_dir / "study_summary.json", {"counts": counts, "trials": len(study.trials),
                                                "directions": [d.name for d in study.directions]})
    return {"csv": run_dir / "trials.csv", "plots": files, "counts": counts}


def read_trial_records(run_dir: Path) -> list[dict[str, Any]]:
    """The ``record.json`` of every trial folder of a run, by trial number."""
    recs = [read_json(p) for p in sorted(Path(run_dir).glob("trials/trial_*/record.json"))]
    return [r for r in recs if r]
