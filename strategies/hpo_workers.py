"""``nasreid hpo`` / ``nasreid hpo-worker``: a sampling search (:class:`~nasreid.strategies.base.SamplingStrategy`,
e.g. ``optuna``) run by several worker processes on one shared study.

:func:`run_hpo` prepares the run folder, starts ``workers`` processes of ``nasreid hpo-worker RUN`` (each runs
:func:`run_hpo_worker`: the strategy's ``work`` loop on the run's study) and, when they are done, finishes the
search in this process (:func:`nasreid.engine.pipeline.run_search` with ``resume``: trials still missing, the
trials table, plots, ``genotype.json``, ``then_retrain``).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

from nasreid.config import Recipe, RecipeError
from nasreid.engine import pipeline
from nasreid.engine.context import SearchContext
from nasreid.engine.runs import build_context, load_run_recipe, prepare_run, setup_logging
from nasreid.engine.validate import check_recipe
from nasreid.registry import STRATEGIES

from .base import SamplingStrategy

__all__ = ["run_hpo", "run_hpo_worker"]

log = logging.getLogger("nasreid")


def run_hpo(recipe: Recipe, workers: int = 1, run_dir: Optional[str | os.PathLike] = None, resume: bool = False,
            progress: Optional[bool] = None, threads: Optional[int] = None) -> Path:
    """``nasreid hpo``: a sampling search (``strategy.name: optuna``) run by ``workers`` processes on one study.

    The run folder is prepared here (it holds the study's journal storage unless the recipe names another);
    ``workers`` processes of ``nasreid hpo-worker RUN`` then ask/train/tell on the shared study, each with
    ``threads`` CPU threads (default: the machine's cores divided among the workers) or, on CUDA, GPU
    ``worker % device_count``. When they are done (a worker killed meanwhile loses at most its current
    epoch: its trial is failed by heartbeat and retried by the others), this process finishes any trial
    still missing, writes the trials table, plots and ``genotype.json``
    (:func:`~nasreid.engine.pipeline.run_search` with ``resume``) and runs ``then_retrain``. With
    ``workers=1`` it is ``run_search``. Returns the run folder.

    Raises:
        RecipeError: the strategy cannot share a study between processes (not a
            :class:`~nasreid.strategies.base.SamplingStrategy`), or the process was started under torchrun.
    """
    import subprocess

    check_recipe(recipe, search=True)
    assert recipe.strategy is not None  # check_recipe(search=True) requires the section
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise RecipeError("nasreid hpo runs its own worker processes (--workers N); do not start it with torchrun")
    if not issubclass(STRATEGIES.get(recipe.strategy.name), SamplingStrategy):
        raise RecipeError(f"{recipe.source}: strategy.name: {recipe.strategy.name!r} is not a sampling strategy with "
                          "workers (use 'optuna' with nasreid hpo, or nasreid search)")
    run = prepare_run(recipe, run_dir, resume).resolve()
    if resume:  # the workers read the run's recipe: keep its strategy section in step (e.g. more trials)
        import yaml

        raw = yaml.safe_load((run / "recipe.yaml").read_text())
        if raw.get("strategy") != recipe.strategy.model_dump(mode="json"):
            raw["strategy"] = recipe.strategy.model_dump(mode="json")
            (run / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            log.info("strategy settings of %s updated: %s", run, raw["strategy"]["kwargs"])
    if workers <= 1:
        return pipeline.run_search(recipe, run_dir=run, resume=True, progress=progress)
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
    return pipeline.run_search(recipe, run_dir=run, resume=True, progress=progress)


def run_hpo_worker(run_dir: str | os.PathLike, worker: int = 0, threads: Optional[int] = None) -> int:
    """One worker of :func:`run_hpo` on the run folder's study (``nasreid hpo-worker RUN``): the strategy's
    ``work`` loop with ``threads`` CPU threads (or GPU ``worker % device_count`` on CUDA; the process's thread
    count is restored on return); returns the number of trials it finished.

    Raises:
        RunFolderError / RecipeError: not a run folder, or its recipe is invalid or names a strategy that is not
            a :class:`~nasreid.strategies.base.SamplingStrategy`.
    """
    import torch

    run = Path(run_dir)
    recipe = load_run_recipe(run)
    check_recipe(recipe, search=True)
    assert recipe.strategy is not None  # check_recipe(search=True) requires the section
    cls = STRATEGIES.get(recipe.strategy.name)
    if not issubclass(cls, SamplingStrategy):
        raise RecipeError(f"{run / 'recipe.yaml'}: strategy.name: {recipe.strategy.name!r} is not a sampling "
                          "strategy with workers (nasreid hpo-worker runs optuna studies)")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _work(run, recipe, worker)
    finally:  # called in-process (tests, notebooks): the caller's thread count is its own again
        torch.set_num_threads(old_threads)


def _work(run: Path, recipe, worker: int) -> int:
    import torch

    if recipe.device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        recipe = recipe.model_copy(update={"device": f"cuda:{worker % torch.cuda.device_count()}"})
    setup_logging(None)
    ctx = build_context(SearchContext, recipe, run, progress=False)
    strategy = STRATEGIES.build(recipe.strategy.name, pipeline.strategy_kwargs(recipe),
                                f"{recipe.source or '<recipe>'}: strategy.kwargs", ctx.build_space())
    try:
        return strategy.work(ctx, worker=worker)
    finally:
        ctx.writer.close()
