"""search -> derive -> train, each reading and writing a run folder under ``results/``: the orchestration of
``nasreid search`` (:func:`run_search`, chaining the recipe's ``then_retrain``), ``nasreid derive``
(:func:`derive`) and ``nasreid train`` (:func:`run_train`).

The other jobs live beside it and are re-exported here (``__all__``) for existing callers:

* run folders, logging and loading a finished run (:func:`load_run_recipe`, :func:`load_run_model`,
  :func:`setup_logging`; the folder layout): :mod:`nasreid.engine.runs`;
* evaluation (:func:`evaluate_dataset`, :func:`evaluate_run_model`, :func:`run_evaluate`):
  :mod:`nasreid.evaluation.runner`;

``nasreid hpo``'s worker processes (``run_hpo``, ``run_hpo_worker``) live in :mod:`nasreid.strategies.hpo_workers`,
which imports this module; they are not re-exported here (that would be an import circle).

Importing this module imports no concrete search space or strategy: they are looked up by name in the
registries when a recipe names them.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from torch import nn

from nasreid.config import DatasetRef, Recipe, RecipeError, apply_overrides, load_recipe
from nasreid.errors import RunFolderError
from nasreid.evaluation.runner import evaluate_dataset, evaluate_run_model, evaluate_validation, run_evaluate
from nasreid.genotype import Genotype, GenotypeError, preset_genotype
from nasreid.models.interface import classifiers_of
from nasreid.registry import STRATEGIES

from .checkpoint import load_checkpoint, new_run_dir, read_json, save_checkpoint, write_json
from .context import RunContext, SearchContext
from .hooks import EvalHook
from .runs import build_context, dist_setup, load_run_model, load_run_recipe, prepare_run, setup_logging
from .validate import check_recipe

__all__ = ["run_search", "derive", "run_train", "run_evaluate", "setup_logging", "load_run_recipe",
           "evaluate_dataset", "evaluate_run_model", "load_run_model", "strategy_kwargs", "DatasetRef"]

log = logging.getLogger("nasreid")

_prepare_run = prepare_run  # its name when it lived here (tests call ``pipeline._prepare_run``)

def _is_sampling(name: str) -> bool:
    """Whether the registered strategy ``name`` is a :class:`~nasreid.strategies.base.SamplingStrategy`."""
    from nasreid.strategies.base import SamplingStrategy

    return issubclass(STRATEGIES.get(name), SamplingStrategy)


# ---------------------------------------------------------------------------------------------------
def strategy_kwargs(recipe: Recipe) -> dict[str, Any]:
    """``strategy.kwargs`` of a search recipe, with the strategy's own ``seed`` (Gumbel noise, the random
    baseline's draw, DARTS' alpha init, Optuna's sampler) defaulting to the recipe's ``seed`` when the recipe
    does not set it, so that ``--set seed=S`` gives another search and not only other network weights."""
    assert recipe.strategy is not None  # a search recipe (check_recipe(search=True) requires the section)
    kw = dict(recipe.strategy.kwargs)
    cfg = getattr(STRATEGIES.get(recipe.strategy.name), "Config", None)
    fields = getattr(cfg, "model_fields", {}) or {}
    if "seed" in fields and "seed" not in kw:
        kw["seed"] = recipe.seed
    return kw


#: provenance keys of a genotype chosen by scoring candidates on validation (spos, gumbel ``validate_top_k``)
SELECTION_KEYS = ("rule", "score", "score_value", "val_rank1", "val_mAP", "candidates_scored", "scoring_seconds",
                  "selection", "selection_done", "bn_batches", "top_k", "prob_rank", "generation")


def selection_record(geno: Genotype) -> dict:
    """What a search's validation selection did, for its ``metrics.json`` (key ``selection``): the genotype's
    provenance keys :data:`SELECTION_KEYS` it has -- the rule, the score and its value, the candidates scored and the
    seconds spent scoring them (``scoring_seconds``: wall seconds, not in ``search_seconds``, which sums the supernet's
    epochs). Empty for a strategy that does not score candidates on validation (``candidates_scored`` absent)."""
    prov = geno.provenance or {}
    if "candidates_scored" not in prov:
        return {}
    return {k: prov[k] for k in SELECTION_KEYS if k in prov}


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
    recipe = dist_setup(recipe)
    assert recipe.strategy is not None  # check_recipe(search=True) requires the section
    from . import distributed as D

    run = prepare_run(recipe, run_dir, resume)
    metrics = read_json(run / "metrics.json", {}) or {}
    t_start = time.time()
    sampling = _is_sampling(recipe.strategy.name)  # a study can be extended: never "done"
    if sampling or not (metrics.get("search_done") and (run / "genotype.json").is_file()):
        ctx = build_context(SearchContext, recipe, run, progress)
        strategy = STRATEGIES.build(recipe.strategy.name, strategy_kwargs(recipe),
                                    f"{recipe.source or '<recipe>'}: strategy.kwargs", ctx.build_space())
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
                        "selection": selection_record(geno),
                        "search_wall_seconds": t_search,  # this process (an HPO run: after its workers, if any)
                        "final_probabilities": geno.probabilities, "device": str(ctx.device.device),
                        "world_size": D.world_size(), "search_done": True, **_identities(ctx.dataset)})
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


def derive(run_dir: str | os.PathLike, out: Optional[str | os.PathLike] = None, top_k: Optional[int] = None,
           bn_batches: Optional[int] = None) -> Genotype:
    """Derive the architecture of a search run from its files: the run's strategy reads back what it
    checkpointed (``Strategy.derive``; one-shot strategies take the argmax of the architecture weights,
    OSNet-AIN "Search Outcome"). With ``top_k`` (``nasreid derive RUN --top-k K``), the strategy's
    ``derive_validated(run, recipe, top_k, bn_batches)`` instead (gumbel: the best on validation of the K most
    probable genotypes, :func:`nasreid.strategies.gumbel.select_on_validation`).

    Writes ``genotype.json`` and ``genotype.graphml`` into the run folder (or ``out``).

    Raises:
        RunFolderError / CheckpointError / GenotypeError: not a search run folder, no checkpoint yet, or
            architecture weights that are not finite. RecipeError: ``top_k`` for a strategy without a validation
            derive, or a run without ``data.val_ids``.
    """
    run = Path(run_dir)
    recipe = load_run_recipe(run)
    if recipe.strategy is None:
        raise RunFolderError(f"{run} is not a search run (its recipe has no strategy)")
    if recipe.plugins:
        check_recipe(recipe)  # imports the plugins that may define the strategy
    cls = STRATEGIES.get(recipe.strategy.name)
    if top_k is not None:
        if not hasattr(cls, "derive_validated"):
            raise RecipeError(f"--top-k: strategy {recipe.strategy.name!r} of {run} has no validation derive (gumbel "
                              "has; spos selects on validation during its search)")
        geno = cls.derive_validated(run, recipe, int(top_k), bn_batches)
    else:
        geno = cls.derive(run, recipe)
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
    dataset's query/gallery and on every ``eval.targets`` dataset (cross-domain) written to ``metrics.json``; with
    ``data.val_ids`` also on the held-out validation identities (key ``"<dataset> (validation)"``, and every
    ``eval.every`` epochs instead of the test split with ``eval.every_split: val``). ``metrics.json`` states the
    identities trained on (``train_ids``, ``val_ids_held_out``).

    Raises:
        RecipeError / GenotypeError: missing genotype, genotype of another space, bad recipe.
        PretrainedWeightsError: a ``model.pretrained`` file that does not fit the network.
    """
    check_recipe(recipe)
    recipe = dist_setup(recipe)
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
    run = prepare_run(recipe, run_dir, resume)
    if overrides:
        log.info("training settings from the genotype: %s", overrides)
    geno.space_kwargs = {**geno.space_kwargs, **recipe.space.kwargs}
    if D.is_main():
        geno.save(run / "genotype.json")
    ctx = build_context(RunContext, recipe, run, progress)
    net = geno.build(num_classes=ctx.dataset.num_train_pids)
    if D.is_main():
        geno.write_graphml(run / "genotype.graphml")
    if not (run / "checkpoints" / "last.pt").is_file():  # a resumed run has its weights in the checkpoint
        ctx.init_weights(net)  # model.pretrained: loaded exactly, or warm-started (model.warm_start)
    model = ctx.device.model(net)
    on = recipe.eval.every_split
    history = ctx.train_fixed(model, hooks=[EvalHook(recipe.eval.every, lambda: ctx.evaluate(model, split=on),
                                                     prefix="val" if on == "val" else "eval")])
    if not D.is_main():  # rank 0 saves and evaluates; the others wait so that no rank leaves the group early
        D.barrier()
        return run
    save_checkpoint(run / "model.pt", {"model": model.state_dict(), "genotype": geno.to_dict(),
                                       "num_classes": _num_classes(model, ctx.dataset.num_train_pids)})
    metrics = {"kind": "train", "space": geno.space, "genotype": geno.choices, "history": history,
               "train_seconds": sum(h.get("epoch_seconds", 0.0) for h in history), "device": str(ctx.device.device),
               "world_size": D.world_size(), **_identities(ctx.dataset)}
    write_json(run / "metrics.json", metrics)
    results = evaluate_run_model(model, recipe, ctx.device, ctx.dataset, progress=ctx.progress)
    if recipe.data.val_ids is not None:
        res = evaluate_validation(model, ctx.dataset, recipe, ctx.device, progress=ctx.progress)
        results[f"{ctx.dataset.name} (validation)"] = res
        log.info("%s (validation): rank-1 %.2f  mAP %.2f  mINP %.2f  (%d query, %d gallery)", ctx.dataset.name,
                 res["rank1"], res["mAP"], res.get("mINP", float("nan")), res["num_query"], res["num_gallery"])
    metrics["evaluation"] = results
    write_json(run / "metrics.json", metrics)
    for name, r in results.items():
        ctx.writer.add_scalar(f"final/{name}/rank1", r["rank1"], recipe.optim.epochs)
        ctx.writer.add_scalar(f"final/{name}/mAP", r["mAP"], recipe.optim.epochs)
    ctx.writer.close()
    D.barrier()
    return run


def _identities(dataset) -> dict[str, Any]:
    """What a run trained on, for its ``metrics.json``: ``train_ids`` (identities of the training split it used)
    and ``val_ids_held_out`` (training identities held out for validation by ``data.val_ids``, 0 when none: a
    retrain without ``val_ids`` trains on every training identity, those a search held out included), with
    ``val_pids`` (their validation pids) when there are any."""
    split = getattr(dataset, "val_split", None) or {}
    out: dict[str, Any] = {"train_ids": int(dataset.num_train_pids), "val_ids_held_out": len(split.get("labels", []))}
    if split:
        out["val_pids"] = list(split["pids"])
    return out


def _num_classes(model: nn.Module, default: int) -> int:
    """Rows of the network's identity classifier (a training method may resize it: DomainMix's pseudo-label
    classes; :func:`~nasreid.models.interface.classifiers_of`), ``default`` when it has none."""
    classifiers = classifiers_of(model)
    return int(next(iter(classifiers.values())).out_features) if classifiers else int(default)
