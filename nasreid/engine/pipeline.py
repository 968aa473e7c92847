"""search -> derive -> train -> evaluate, each reading and writing a run folder under ``results/``.

Run folder contents:
    recipe.yaml         the resolved recipe (a run can be resumed, plotted, evaluated from its files alone)
    retrain_recipe.yaml a search's ``then_retrain`` recipe, copied when the search starts
    train.log           the log
    checkpoints/last.pt atomic per-epoch checkpoint (model, optimiser, scheduler, strategy, RNG states)
    tb/                 TensorBoard event files (losses, lambda, every choice's softmax(pi))
    alphas.csv          architecture-weight trajectories (search runs)
    genotype.json       derived (search) or trained (retrain) architecture; genotype.graphml its graph
    model.pt            final weights of a retrained network (+ genotype, num_classes)
    metrics.json        history, timings, CMC/mAP same-domain and cross-domain; a search's ``retrain_run``

Importing this module imports no concrete search space or strategy: they are looked up by name in the
registries when a recipe names them.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from torch import nn

from nasreid.config import DatasetRef, Recipe, RecipeError, apply_overrides, load_recipe, resolve_data_root
from nasreid.errors import RunFolderError
from nasreid.genotype import Genotype, GenotypeError, preset_genotype
from nasreid.registry import METHODS, STRATEGIES

from .checkpoint import load_checkpoint, new_run_dir, read_json, save_checkpoint, seed_everything, write_json
from .context import RunContext, SearchContext, progress_enabled
from .hooks import EvalHook
from .trainer import device_context
from .validate import check_recipe

__all__ = ["run_search", "run_hpo", "run_hpo_worker", "derive", "run_train", "run_evaluate", "setup_logging", "load_run_recipe",
           "evaluate_dataset", "evaluate_run_model", "load_run_model", "DatasetRef"]

log = logging.getLogger("nasreid")


# ---------------------------------------------------------------------------------------------------
def setup_logging(run_dir: Optional[Path] = None, level: int = logging.INFO) -> None:
    """Log to stderr and, with ``run_dir``, to ``run_dir/train.log`` (appending across resumes)."""
    log.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_nasreid_console", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        h._nasreid_console = True  # type: ignore[attr-defined]
        log.addHandler(h)
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()
    if run_dir is not None:
        fh = logging.FileHandler(Path(run_dir) / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)


def _writer(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tb"))


def load_run_recipe(run_dir: str | os.PathLike) -> Recipe:
    """The resolved recipe of a run folder (``recipe.yaml``).

    Raises:
        RunFolderError: not a run folder (no ``recipe.yaml``); RecipeError: an invalid recipe.
    """
    p = Path(run_dir) / "recipe.yaml"
    if not p.is_file():
        raise RunFolderError(f"{run_dir} is not a nasreid run folder: {p} is missing")
    return load_recipe(p)


def _prepare_run(recipe: Recipe, run_dir: Optional[str | os.PathLike], resume: bool) -> Path:
    """The run folder (created, ``recipe.yaml`` written, logging to ``train.log``). Under torchrun rank 0
    prepares it and the other ranks receive its path (an error on rank 0 is raised on every rank)."""
    from . import distributed as D

    if not D.is_distributed():
        return _prepare_run_local(recipe, run_dir, resume)
    run, err = None, None
    if D.is_main():
        try:
            run = str(_prepare_run_local(recipe, run_dir, resume))
        except RunFolderError as e:
            err = str(e)
    run, err = D.broadcast_object((run, err))
    if err is not None:
        raise RunFolderError(err)
    if not D.is_main():
        setup_logging(None, level=logging.WARNING)
    return Path(run)


def _dist_setup(recipe: Recipe) -> Recipe:
    """Join torchrun's process group when there is one (:mod:`.distributed`); a ``cuda`` device becomes
    ``cuda:LOCAL_RANK``. The recipe unchanged in a single process."""
    from . import distributed as D

    d = recipe.distributed
    info = D.init_distributed(recipe.device, backend=d.backend, timeout_minutes=d.timeout_minutes)
    if info.enabled and recipe.device.startswith("cuda"):
        recipe = recipe.model_copy(update={"device": f"cuda:{info.local_rank}"})
    return recipe


def _prepare_run_local(recipe: Recipe, run_dir: Optional[str | os.PathLike], resume: bool) -> Path:
    if run_dir is None:
        run = new_run_dir(recipe.output_root, recipe.name)
    else:
        run = Path(run_dir)
        if run.exists() and (run / "checkpoints" / "last.pt").exists() and not resume:
            raise RunFolderError(f"{run} already holds a run; pass --resume to continue it or choose another folder")
        run.mkdir(parents=True, exist_ok=True)
    if not (resume and (run / "recipe.yaml").exists()):
        update: dict[str, Any] = {"source": None}
        if recipe.then_retrain:  # a copy of the retrain recipe makes the run folder self-contained
            retrain = load_recipe(recipe.then_retrain)
            (run / "retrain_recipe.yaml").write_text(retrain.model_copy(update={"source": None}).to_yaml())
            update["then_retrain"] = "retrain_recipe.yaml"  # resolved relative to the run folder
        (run / "recipe.yaml").write_text(recipe.model_copy(update=update).to_yaml())
    setup_logging(run)
    return run


def _build_dataset(recipe: Recipe):
    from nasreid.data import build_dataset

    ref = recipe.data.dataset
    dataset = build_dataset(ref.name, resolve_data_root(ref.root), **ref.kwargs)
    if not dataset.train:
        raise RecipeError(f"{recipe.source}: data.dataset: the train split of {ref.name!r} is empty")
    log.info("dataset %s\n%s", ref.name, dataset.summary())
    return dataset


def _context(cls, recipe: Recipe, run: Path, progress: Optional[bool]):
    seed_everything(recipe.seed)
    dev = device_context(recipe.device, recipe.amp, recipe.channels_last)
    dataset = _build_dataset(recipe)
    from .distributed import is_main

    return cls(recipe=recipe, run_dir=run, device=dev, dataset=dataset, writer=_writer(run) if is_main() else None,
               progress=progress_enabled() if progress is None else progress)


# ---------------------------------------------------------------------------------------------------
def strategy_kwargs(recipe: Recipe) -> dict[str, Any]:
    """``strategy.kwargs`` of a search recipe, with the strategy's own ``seed`` (Gumbel noise, the random
    baseline's draw, DARTS' alpha init, Optuna's sampler) defaulting to the recipe's ``seed`` when the recipe
    does not set it, so that ``--set seed=S`` gives another search and not only other network weights."""
    kw = dict(recipe.strategy.kwargs)
    cfg = getattr(STRATEGIES.get(recipe.strategy.name), "Config", None)
    fields = getattr(cfg, "model_fields", {}) or {}
    if "seed" in fields and "seed" not in kw:
        kw["seed"] = recipe.seed
    return kw


def run_search(recipe: Recipe, run_dir: Optional[str | os.PathLike] = None, resume: bool = False,
               progress: Optional[bool] = None) -> Path:
    """Search ``recipe.space`` with ``recipe.strategy``; returns the run folder.

    Builds a :class:`~nasreid.engine.context.SearchContext`, lets the strategy run its own search
    (``strategy.search(ctx) -> Genotype``), writes ``genotype.json`` / ``.graphml``, then runs
    ``recipe.then_retrain`` on it. With ``resume``, a finished search is not repeated and an interrupted
    retrain (recorded as ``retrain_run`` in ``metrics.json``) is resumed in its own folder.

    Raises:
        RecipeError: no ``strategy`` section, or anything :func:`~nasreid.engine.validate.check_recipe`
            finds (checked before any data is read, ``then_retrain`` included).
    """
    check_recipe(recipe, search=True)
    recipe = _dist_setup(recipe)
    from . import distributed as D

    run = _prepare_run(recipe, run_dir, resume)
    metrics = read_json(run / "metrics.json", {}) or {}
    t_start = time.time()
    sampling = hasattr(STRATEGIES.get(recipe.strategy.name), "work")  # a study can be extended: never "done"
    if sampling or not (metrics.get("search_done") and (run / "genotype.json").is_file()):
        ctx = _context(SearchContext, recipe, run, progress)
        strategy = STRATEGIES.get(recipe.strategy.name)(ctx.build_space(), **strategy_kwargs(recipe))
        t_search = time.time()
        geno = strategy.search(ctx)
        t_search = time.time() - t_search
        if not D.is_main():  # rank 0 writes the genotype and metrics, then every rank retrains
            D.barrier()
            return _then_retrain(recipe, run, metrics, progress, t_start)
        ctx.writer.close()
        geno.save(run / "genotype.json")
        geno.write_graphml(run / "genotype.graphml")
        ckpt = run / "checkpoints" / "last.pt"
        history = load_checkpoint(ckpt).get("history", []) if ckpt.is_file() else []
        metrics.update({"kind": "search", "space": recipe.space.name, "strategy": recipe.strategy.name,
                        "history": history, "search_seconds": sum(h.get("epoch_seconds", 0.0) for h in history),
                        "search_wall_seconds": t_search,  # this process (an HPO run: after its workers, if any)
                        "final_probabilities": geno.probabilities, "device": str(ctx.device.device),
                        "world_size": D.world_size(), "search_done": True})
        write_json(run / "metrics.json", metrics)
        log.info("derived genotype\n%s", geno.summary())
        D.barrier()
    return _then_retrain(recipe, run, metrics, progress, t_start)


def _then_retrain(recipe: Recipe, run: Path, metrics: dict, progress: Optional[bool], t_start: float) -> Path:
    """Run (or resume) a search's ``then_retrain`` on its genotype; the search run folder. Under torchrun
    every rank retrains (rank 0 names the folder and writes ``metrics.json``)."""
    from . import distributed as D

    metrics = D.broadcast_object(metrics)  # rank 0's record decides for every rank (new retrain or resume)
    if recipe.then_retrain:
        retrain = load_recipe(recipe.then_retrain)
        prev = metrics.get("retrain_run")
        if prev and Path(prev).is_dir():
            if "evaluation" in (read_json(Path(prev) / "metrics.json", {}) or {}):
                return run
            log.info("resuming the interrupted retrain %s", prev)
            train_run = run_train(retrain, genotype=run / "genotype.json", run_dir=prev, resume=True,
                                  progress=progress)
        else:
            train_dir = None
            if D.is_main():
                train_dir = new_run_dir(retrain.output_root, retrain.name).resolve()
                metrics["retrain_run"] = str(train_dir)  # recorded first, so an interrupted retrain is found again
                write_json(run / "metrics.json", metrics)
                log.info("retraining with %s in %s", recipe.then_retrain, train_dir)
            train_dir = D.broadcast_object(train_dir)
            train_run = run_train(retrain, genotype=run / "genotype.json", run_dir=train_dir, progress=progress)
        metrics["retrain_run"] = str(Path(train_run).resolve())
        metrics["pipeline_seconds"] = metrics.get("pipeline_seconds", 0.0) + time.time() - t_start
        if D.is_main():
            write_json(run / "metrics.json", metrics)
    return run


def run_hpo(recipe: Recipe, workers: int = 1, run_dir: Optional[str | os.PathLike] = None, resume: bool = False,
            progress: Optional[bool] = None, threads: Optional[int] = None) -> Path:
    """``nasreid hpo``: a sampling search (``strategy.name: optuna``) run by ``workers`` processes on one study.

    The run folder is prepared here (it holds the study's journal storage unless the recipe names another);
    ``workers`` processes of ``nasreid hpo-worker RUN`` then ask/train/tell on the shared study, each with
    ``threads`` CPU threads (default: the machine's cores divided among the workers) or, on CUDA, GPU
    ``worker % device_count``. When they are done (a worker killed meanwhile loses at most its current
    epoch: its trial is failed by heartbeat and retried by the others), this process finishes any trial
    still missing, writes the trials table, plots and ``genotype.json`` (:func:`run_search` with ``resume``)
    and runs ``then_retrain``. With ``workers=1`` it is :func:`run_search`.

    Raises:
        RecipeError: the strategy cannot share a study between processes (it has no ``work`` loop).
    """
    import subprocess

    check_recipe(recipe, search=True)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise RecipeError("nasreid hpo runs its own worker processes (--workers N); do not start it with torchrun")
    if not hasattr(STRATEGIES.get(recipe.strategy.name), "work"):
        raise RecipeError(f"{recipe.source}: strategy.name: {recipe.strategy.name!r} is not a sampling strategy with "
                          "workers (use 'optuna' with nasreid hpo, or nasreid search)")
    run = _prepare_run(recipe, run_dir, resume).resolve()
    if resume:  # the workers read the run's recipe: keep its strategy section in step (e.g. more trials)
        import yaml

        raw = yaml.safe_load((run / "recipe.yaml").read_text())
        if raw.get("strategy") != recipe.strategy.model_dump(mode="json"):
            raw["strategy"] = recipe.strategy.model_dump(mode="json")
            (run / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            log.info("strategy settings of %s updated: %s", run, raw["strategy"]["kwargs"])
    if workers <= 1:
        return run_search(recipe, run_dir=run, resume=True, progress=progress)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    env = dict(os.environ, NASREID_NO_PROGRESS="1")
    procs = []
    for i in range(workers):
        cmd = [sys.executable, "-m", "nasreid.cli", "hpo-worker", str(run), "--worker", str(i),
               "--threads", str(threads)] + [a for p in recipe.plugins for a in ("--plugin", p)]
        with open(run / f"worker_{i}.log", "a") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env))
        log.info("started HPO worker %d (pid %d, %d threads), log %s", i, procs[-1].pid, threads,
                 run / f"worker_{i}.log")
    codes = [p.wait() for p in procs]
    for i, c in enumerate(codes):
        if c != 0:
            log.warning("HPO worker %d exited with code %d (see worker_%d.log); its trial is retried", i, c, i)
    return run_search(recipe, run_dir=run, resume=True, progress=progress)


def run_hpo_worker(run_dir: str | os.PathLike, worker: int = 0, threads: Optional[int] = None) -> int:
    """One worker of :func:`run_hpo` on the run folder's study (``nasreid hpo-worker RUN``); returns the
    number of trials it finished."""
    import torch

    run = Path(run_dir)
    recipe = load_run_recipe(run)
    check_recipe(recipe, search=True)
    if threads:
        torch.set_num_threads(int(threads))
    if recipe.device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        recipe = recipe.model_copy(update={"device": f"cuda:{worker % torch.cuda.device_count()}"})
    setup_logging(None)
    ctx = _context(SearchContext, recipe, run, progress=False)
    strategy = STRATEGIES.get(recipe.strategy.name)(ctx.build_space(), **strategy_kwargs(recipe))
    try:
        return strategy.work(ctx, worker=worker)
    finally:
        ctx.writer.close()


def derive(run_dir: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Genotype:
    """Derive the architecture of a search run from its files: the run's strategy reads back what it
    checkpointed (``Strategy.derive``; one-shot strategies take the argmax of the architecture weights,
    OSNet-AIN "Search Outcome").

    Writes ``genotype.json`` and ``genotype.graphml`` into the run folder (or ``out``).

    Raises:
        RunFolderError / CheckpointError / GenotypeError: not a search run folder, no checkpoint yet, or
            architecture weights that are not finite.
    """
    run = Path(run_dir)
    recipe = load_run_recipe(run)
    if recipe.strategy is None:
        raise RunFolderError(f"{run} is not a search run (its recipe has no strategy)")
    if recipe.plugins:
        check_recipe(recipe)  # imports the plugins that may define the strategy
    geno = STRATEGIES.get(recipe.strategy.name).derive(run, recipe)
    out_dir = Path(out) if out is not None else run
    out_dir.mkdir(parents=True, exist_ok=True)
    geno.save(out_dir / "genotype.json")
    geno.write_graphml(out_dir / "genotype.graphml")
    return geno


# ---------------------------------------------------------------------------------------------------
def _load_genotype(recipe: Recipe, genotype: Optional[str | os.PathLike | Genotype]) -> Genotype:
    if isinstance(genotype, Genotype):
        return genotype
    if genotype is not None:
        return Genotype.load(genotype)
    if recipe.model and recipe.model.genotype:
        return Genotype.load(recipe.model.genotype)
    if recipe.model and recipe.model.preset:
        return preset_genotype(recipe.space.name, recipe.model.preset)
    raise RecipeError(f"{recipe.source}: give --genotype or set model.genotype / model.preset")


def run_train(recipe: Recipe, genotype: Optional[str | os.PathLike | Genotype] = None,
              run_dir: Optional[str | os.PathLike] = None, resume: bool = False,
              progress: Optional[bool] = None) -> Path:
    """Retrain the fixed network of ``genotype`` with the recipe's training method and evaluate it.

    Default method ``supervised``: ID loss (label-smoothing CE) + optional batch-hard triplet, warm-up +
    cosine/multistep, optional pretrained weights (``model.pretrained``) and frozen-backbone warm start
    (``training.freeze_backbone_epochs``), per-epoch atomic checkpoints, ``--resume``; CMC/mAP/mINP on the
    dataset's query/gallery and on every ``eval.targets`` dataset (cross-domain) written to ``metrics.json``.

    Raises:
        RecipeError / GenotypeError: missing genotype, genotype of another space, bad recipe.
        PretrainedWeightsError: a ``model.pretrained`` file that does not fit the network.
    """
    check_recipe(recipe)
    recipe = _dist_setup(recipe)
    from . import distributed as D

    if resume and run_dir is not None and (Path(run_dir) / "genotype.json").is_file():
        geno = Genotype.load(Path(run_dir) / "genotype.json")
    else:
        geno = _load_genotype(recipe, genotype)
    if geno.space != recipe.space.name:
        raise GenotypeError(f"genotype is for space {geno.space!r} but the recipe trains {recipe.space.name!r}")
    overrides = Genotype(space=geno.space, choices=geno.choices,
                         space_kwargs={**geno.space_kwargs, **recipe.space.kwargs}).recipe_overrides()
    if overrides:  # searched training settings (RMGL's RSA ...) travel with the genotype and win over the recipe
        recipe = apply_overrides(recipe, overrides, where=f"{recipe.source or 'recipe'} + genotype choices")
    run = _prepare_run(recipe, run_dir, resume)
    if overrides:
        log.info("training settings from the genotype: %s", overrides)
    geno.space_kwargs = {**geno.space_kwargs, **recipe.space.kwargs}
    if D.is_main():
        geno.save(run / "genotype.json")
    ctx = _context(RunContext, recipe, run, progress)
    net = geno.build(num_classes=ctx.dataset.num_train_pids)
    if D.is_main():
        geno.write_graphml(run / "genotype.graphml")
    if recipe.model and recipe.model.pretrained and not (run / "checkpoints" / "last.pt").is_file():
        from nasreid.models.pretrained import load_pretrained

        report = load_pretrained(net, recipe.model.pretrained, skip=tuple(recipe.model.pretrained_skip))
        log.info("loaded %d tensors from %s (skipped %d)", report["loaded"], recipe.model.pretrained,
                 len(report["skipped"]))
    model = ctx.device.model(net)
    history = ctx.train_fixed(model, hooks=[EvalHook(recipe.eval.every, lambda: ctx.evaluate(model))])
    if not D.is_main():  # rank 0 saves and evaluates; the others wait so that no rank leaves the group early
        D.barrier()
        return run
    save_checkpoint(run / "model.pt", {"model": model.state_dict(), "genotype": geno.to_dict(),
                                       "num_classes": _num_classes(model, ctx.dataset.num_train_pids)})
    metrics = {"kind": "train", "space": geno.space, "genotype": geno.choices, "history": history,
               "train_seconds": sum(h.get("epoch_seconds", 0.0) for h in history), "device": str(ctx.device.device),
               "world_size": D.world_size()}
    write_json(run / "metrics.json", metrics)
    results = evaluate_run_model(model, recipe, ctx.device, ctx.dataset, progress=ctx.progress)
    metrics["evaluation"] = results
    write_json(run / "metrics.json", metrics)
    for name, r in results.items():
        ctx.writer.add_scalar(f"final/{name}/rank1", r["rank1"], recipe.optim.epochs)
        ctx.writer.add_scalar(f"final/{name}/mAP", r["mAP"], recipe.optim.epochs)
    ctx.writer.close()
    D.barrier()
    return run


def _num_classes(model: nn.Module, default: int) -> int:
    """Rows of the network's identity classifier (a training method may resize it: DomainMix's pseudo-label
    classes), ``default`` when it has none."""
    from nasreid.models.heads import ReIDHead

    for m in model.modules():
        if isinstance(m, ReIDHead) and m.classifier is not None:
            return int(m.classifier.weight.shape[0])
    return int(default)


def evaluate_dataset(model: nn.Module, dataset, recipe: Recipe, ctx, progress: bool = False) -> dict[str, Any]:
    """CMC (rank-k), mAP and mINP in percent of ``model`` on ``dataset``'s query/gallery with the recipe's
    ``eval`` settings (``eval.matcher`` / ``eval.postprocessors`` from the registries, feature distance with
    ``eval.metric`` by default); also ``num_query``, ``num_gallery``, ``num_valid_queries``, ``num_skipped_queries``
    (queries with no gallery match in another camera, excluded by the protocol) and ``seconds``.

    Raises:
        RecipeError: empty query or gallery split.
    """
    from nasreid.data import build_test_loaders
    from nasreid.evaluation import evaluate_model

    if not dataset.query or not dataset.gallery:
        raise RecipeError(f"dataset {dataset.name!r} has an empty query or gallery split")
    d, e = recipe.data, recipe.eval
    q, g = build_test_loaders(dataset, height=d.height, width=d.width, batch_size=e.batch_size,
                              workers=d.workers, on_corrupt=d.on_corrupt)
    from nasreid.registry import MATCHERS, POSTPROCESSORS

    matcher = MATCHERS.get(e.matcher.name)(**e.matcher.kwargs) if e.matcher is not None else None
    post = [POSTPROCESSORS.get(pp.name)(**pp.kwargs) for pp in e.postprocessors]
    t0 = time.time()
    res = evaluate_model(model, q, g, device=ctx.device, flip=e.flip, metric=e.metric, amp=ctx.amp,
                         ranks=tuple(e.ranks), progress=progress, matcher=matcher, postprocessors=post)
    res["seconds"] = time.time() - t0
    skipped = res["num_skipped_queries"]
    if skipped:
        log.warning("%s: %d of %d queries have no gallery match in another camera and are skipped by the "
                    "protocol", dataset.name, skipped, res["num_query"])
    return res


def evaluate_run_model(model: nn.Module, recipe: Recipe, ctx, dataset=None,
                       targets: Optional[list[DatasetRef]] = None, same_domain: bool = True,
                       progress: bool = False) -> dict[str, dict[str, Any]]:
    """CMC/mAP of ``model`` on the training dataset's test split (``same-domain``) and on each target
    dataset (``cross-domain``, which needs only query and gallery); keys are ``"<dataset> (same-domain)"`` /
    ``"<dataset>[k=v,...] (cross-domain)"`` (the target's parser options in brackets, so two settings of one
    dataset do not overwrite each other). Every target is built before the first is evaluated, so a bad
    target fails fast."""
    from nasreid.data import build_dataset

    results: dict[str, dict[str, Any]] = {}
    src = recipe.data.dataset
    jobs = []
    if same_domain:
        if dataset is None:
            dataset = build_dataset(src.name, resolve_data_root(src.root), **src.kwargs)
        if dataset.query and dataset.gallery:
            jobs.append((dataset, "same-domain", {}))
        else:  # a train-only source (RandPerson): cross-domain targets only
            log.info("%s has no query/gallery split: no same-domain evaluation", dataset.name)
    for t in (recipe.eval.targets if targets is None else targets):
        jobs.append((build_dataset(t.name, resolve_data_root(t.root), eval_only=True, **t.kwargs), "cross-domain",
                     t.kwargs))
    for ds, kind, kwargs in jobs:
        res = evaluate_dataset(model, ds, recipe, ctx, progress=progress)
        res["protocol"] = kind
        res["dataset_kwargs"] = dict(kwargs)
        tag = "[" + ",".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + "]" if kwargs else ""
        key = f"{ds.name}{tag} ({kind})"
        results[key] = res
        log.info("%s: rank-1 %.2f  rank-5 %.2f  rank-10 %.2f  mAP %.2f  mINP %.2f  (%d query, %d gallery, "
                 "%d skipped)", key, res["rank1"], res.get("rank5", float("nan")), res.get("rank10", float("nan")),
                 res["mAP"], res.get("mINP", float("nan")), res.get("num_query", -1), res.get("num_gallery", -1),
                 res["num_skipped_queries"])
    return results


def load_run_model(run_dir: str | os.PathLike, device: Optional[str] = None) -> tuple[nn.Module, Recipe, Genotype]:
    """The trained network of a retrain run folder, in eval mode on CPU, with its recipe and genotype.

    Weights come from ``model.pt`` (a finished run) or ``checkpoints/last.pt`` (an interrupted one); the
    classifier size from the checkpoint's ``num_classes`` or, failing that, from any 2-D ``classifier``
    weight. ``device`` replaces the recipe's ``device`` in the returned recipe (the model stays on CPU: move
    it with :func:`~nasreid.engine.trainer.device_context` ``(...).model``).

    Raises:
        RunFolderError: no ``recipe.yaml``; GenotypeError: no or bad ``genotype.json``;
        CheckpointError: neither weights file is readable, or the weights do not fit the genotype's network.
    """
    from .checkpoint import CheckpointError

    run = Path(run_dir)
    recipe = load_run_recipe(run)
    if device is not None:
        recipe = recipe.model_copy(update={"device": device})
    if not (run / "genotype.json").is_file():
        raise RunFolderError(f"{run} is not a retrain run folder: genotype.json is missing")
    geno = Genotype.load(run / "genotype.json")
    src = run / "model.pt" if (run / "model.pt").is_file() else run / "checkpoints" / "last.pt"
    st = load_checkpoint(src)
    state = st["model"]
    num_classes = st.get("num_classes")
    if num_classes is None:
        w = [v for k, v in state.items() if "classifier" in k and k.endswith("weight") and v.dim() == 2]
        num_classes = int(w[0].shape[0]) if w else 0
    model = geno.build(num_classes=num_classes)
    prepare = getattr(METHODS.get(recipe.training.method), "prepare_network", None)
    if prepare is not None:  # method-owned modules saved with the network (QAConv's head)
        model = prepare(model, recipe)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{src}: the weights do not fit the network of {run / 'genotype.json'}: "
                              f"{str(e).splitlines()[0]}") from None
    return model.eval(), recipe, geno


def run_evaluate(run_dir: str | os.PathLike, targets: Optional[list[DatasetRef]] = None,
                 device: Optional[str] = None, same_domain: bool = True, matcher=None,
                 postprocessors: Optional[list] = None) -> dict[str, dict[str, Any]]:
    """Evaluate the model of a retrain run folder (``model.pt``, or ``checkpoints/last.pt``).

    ``matcher`` / ``postprocessors`` (``NamedConfig`` s, e.g. ``qaconv`` / ``tlift``) replace the recipe's
    ``eval.matcher`` / ``eval.postprocessors`` for this evaluation; the result keys then carry them, e.g.
    ``"cuhk03np (cross-domain) [qaconv+tlift]"``, so several evaluations of one run sit side by side.

    Args:
        targets: datasets to evaluate on instead of the recipe's ``eval.targets``.
        same_domain: also evaluate on the training dataset's test split.

    Results are merged into ``metrics.json`` under ``"evaluation"`` and returned.

    Raises:
        RunFolderError / CheckpointError / GenotypeError: not a retrain run folder.
        RecipeError: an unknown target dataset or target options that do not fit its parser.
    """
    run = Path(run_dir)
    setup_logging(None)
    model, recipe, _ = load_run_model(run, device=device)
    tag = ""
    if matcher is not None or postprocessors is not None:
        upd = {}
        if matcher is not None:
            upd["matcher"] = matcher
        if postprocessors is not None:
            upd["postprocessors"] = list(postprocessors)
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update=upd)})
        check_recipe(recipe)
        e = recipe.eval
        tag = " [" + "+".join([e.matcher.name if e.matcher else "distance"] + [p.name for p in e.postprocessors]) + "]"
    ctx = device_context(recipe.device, recipe.amp, recipe.channels_last)
    model = ctx.model(model)
    if targets is None:
        targets = recipe.eval.targets
    if targets:  # eval.targets or --target: known datasets with fitting options, before any evaluation
        check_recipe(recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"targets": list(targets)})}))
    results = evaluate_run_model(model, recipe, ctx, targets=targets, same_domain=same_domain,
                                 progress=progress_enabled())
    results = {k + tag: v for k, v in results.items()}
    metrics = read_json(run / "metrics.json", {}) or {}
    metrics.setdefault("evaluation", {}).update(results)
    write_json(run / "metrics.json", metrics)
    return results
