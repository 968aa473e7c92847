"""Evaluating a network with a recipe's ``eval`` settings: on one dataset (:func:`evaluate_dataset`), on the
training dataset's test split and the recipe's cross-domain targets (:func:`evaluate_run_model`), on the training
identities held out for validation by ``data.val_ids`` (:func:`evaluate_validation`), and a retrain
run folder as ``nasreid evaluate RUN`` does (:func:`run_evaluate`, results merged into ``metrics.json``).

The engine calls these (``RunContext.evaluate``, the end of ``nasreid train``); they build the test loaders,
the registered matcher / post-processors and call :func:`nasreid.evaluation.evaluate_model`. Importing this
module imports no concrete search space or strategy.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from torch import nn

from nasreid.config import DatasetRef, Recipe, RecipeError, loader_workers, resolve_data_root
from nasreid.engine.checkpoint import read_json, write_json
from nasreid.engine.progress import progress_enabled
from nasreid.engine.runs import load_run_model, setup_logging, track_new_run
from nasreid.engine.trainer import device_context
from nasreid.engine.validate import check_recipe

__all__ = ["evaluate_dataset", "evaluate_validation", "evaluate_run_model", "run_evaluate", "run_evaluate_weights"]

log = logging.getLogger("nasreid")


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
                              workers=loader_workers(recipe), on_corrupt=d.on_corrupt)
    from nasreid.registry import MATCHERS, POSTPROCESSORS

    src = recipe.source or "<recipe>"
    matcher = MATCHERS.build(e.matcher.name, e.matcher.kwargs, f"{src}: eval.matcher.kwargs") \
        if e.matcher is not None else None
    post = [POSTPROCESSORS.build(pp.name, pp.kwargs, f"{src}: eval.postprocessors[{i}].kwargs")
            for i, pp in enumerate(e.postprocessors)]
    t0 = time.time()
    res = evaluate_model(model, q, g, device=ctx.device, flip=e.flip, metric=e.metric, amp=ctx.amp,
                         ranks=tuple(e.ranks), progress=progress, matcher=matcher, postprocessors=post)
    res["seconds"] = time.time() - t0
    skipped = res["num_skipped_queries"]
    if skipped:
        log.warning("%s: %d of %d queries have no gallery match in another camera and are skipped by the "
                    "protocol", dataset.name, skipped, res["num_query"])
    return res


def evaluate_validation(model: nn.Module, dataset, recipe: Recipe, ctx, progress: bool = False) -> dict[str, Any]:
    """CMC (rank-k), mAP and mINP in percent of ``model`` on the validation query / gallery of ``dataset``: the
    training identities held out by the recipe's ``data.val_ids``
    (:func:`~nasreid.data.datasets.base.hold_out_validation`; build the dataset with
    :func:`~nasreid.engine.runs.build_run_dataset` to get a run's own draw), with the recipe's ``eval`` settings,
    as :func:`evaluate_dataset` (same keys, plus ``protocol: "validation"``). No test image is read: what searches,
    HPO and selection evaluate on.

    Raises:
        RecipeError: ``dataset`` holds no validation identities (``data.val_ids`` is not set).
    """
    from nasreid.data.datasets.base import validation_view

    res = evaluate_dataset(model, validation_view(dataset), recipe, ctx, progress=progress)
    res["protocol"] = "validation"
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
    jobs: list[tuple[Any, str, dict[str, Any]]] = []  # (dataset, protocol, the target's parser options)
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


#: the recipe keys ``nasreid evaluate RUN --set`` applies: how the run's network is evaluated, not what it is (its
#: architecture, input size and weights are the run's; retrain to change them)
EVALUATE_KEYS = ("eval.", "data.workers", "data.on_corrupt", "device")


def evaluate_overrides(overrides: Optional[dict[str, Any]], where: str = "--set") -> dict[str, Any]:
    """The ``overrides`` (dotted recipe keys) that :func:`run_evaluate` applies to a finished run: keys under
    :data:`EVALUATE_KEYS` (``eval.metric``, ``eval.flip``, ``eval.rerank`` ..., ``data.workers``, ``device``).

    Raises:
        RecipeError: any other key, named (``--set optim.lr=...`` on a finished run would be ignored).
    """
    out = dict(overrides or {})
    for key in out:
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in EVALUATE_KEYS):
            raise RecipeError(f"{where}: {key}: nasreid evaluate RUN applies only evaluation settings "
                              f"({', '.join(k + '*' if k.endswith('.') else k for k in EVALUATE_KEYS)}); the run's "
                              "network, input size and training keys are fixed by its recipe (retrain to change them)")
    return out


def run_evaluate(run_dir: str | os.PathLike, targets: Optional[list[DatasetRef]] = None,
                 device: Optional[str] = None, same_domain: bool = True, matcher=None,
                 postprocessors: Optional[list] = None,
                 overrides: Optional[dict[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """Evaluate the model of a retrain run folder (``model.pt``, or ``checkpoints/last.pt``).

    ``matcher`` / ``postprocessors`` (``NamedConfig`` s, e.g. ``qaconv`` / ``tlift``) replace the recipe's
    ``eval.matcher`` / ``eval.postprocessors`` for this evaluation; the result keys then carry them, e.g.
    ``"cuhk03np (cross-domain) [qaconv+tlift]"``, so several evaluations of one run sit side by side. Likewise
    ``overrides`` (``--set``; evaluation keys only, :func:`evaluate_overrides`) tag the keys with what they set,
    e.g. ``"cuhk01 (same-domain) [eval.metric=euclidean]"``.

    Args:
        targets: datasets to evaluate on instead of the recipe's ``eval.targets``.
        same_domain: also evaluate on the training dataset's test split.
        overrides: dotted evaluation keys applied to the run's recipe for this evaluation.

    Results are merged into ``metrics.json`` under ``"evaluation"`` and returned.

    Raises:
        RunFolderError / CheckpointError / GenotypeError: not a retrain run folder (a search run: the message
            names its retrain run, or the ``nasreid train`` command that makes one; see
            :func:`~nasreid.engine.runs.load_run_model`).
        RecipeError: an unknown target dataset or target options that do not fit its parser; an override
            outside the evaluation keys, or one the schema refuses.
    """
    from nasreid.config import apply_overrides

    run = Path(run_dir)
    setup_logging(None)
    overrides = evaluate_overrides(overrides)
    model, recipe, _ = load_run_model(run, device=device)
    tag = ""
    if overrides:
        recipe = apply_overrides(recipe, overrides, where="--set")
        check_recipe(recipe)
        tag = " [" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + "]"
    if matcher is not None or postprocessors is not None:
        upd = {}
        if matcher is not None:
            upd["matcher"] = matcher
        if postprocessors is not None:
            upd["postprocessors"] = list(postprocessors)
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update=upd)})
        check_recipe(recipe)
        e = recipe.eval
        tag += " [" + "+".join([e.matcher.name if e.matcher else "distance"] + [p.name for p in e.postprocessors]) + "]"
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


def _calibration_source(recipe: Recipe):
    """``calibration_images(n)`` for a zero-shot warm start (``model.warm_start``): the IN layers the file lacks are
    calibrated as a run's start calibrates them (:func:`~nasreid.data.loaders.calibration_batches` over the training
    split of ``data.dataset``, by default the first target), so the zero-shot figure is the figure of the weights a
    fine-tune from the same recipe starts from. Built only when a layer needs it.

    Raises (when called):
        RecipeError: ``data.dataset`` has no training images (names it: set ``data.dataset`` to the training set).
    """
    from nasreid.data import build_dataset
    from nasreid.data.loaders import calibration_batches

    d = recipe.data

    def images(n: int):
        src = d.dataset
        ds = build_dataset(src.name, resolve_data_root(src.root), **src.kwargs)
        if not ds.train:
            raise RecipeError(f"data.dataset {src.name!r}: no training images to calibrate the warm start's IN layers "
                              "on; set data.dataset to the dataset a fine-tune would train on (--set data.dataset=...)")
        return calibration_batches(ds, n, height=d.height, width=d.width, on_corrupt=d.on_corrupt)

    return images


def run_evaluate_weights(weights: str | os.PathLike, genotype: str | os.PathLike, *,
                         targets: list[DatasetRef], space: str = "osnet_ain",
                         overrides: Optional[dict[str, Any]] = None, out: Optional[str | os.PathLike] = None,
                         weights_format: str = "auto", device: Optional[str] = None) -> Path:
    """Zero-shot evaluation of a weights file, with no run folder and no training: the network of ``genotype``
    initialised from ``weights`` by the runs' entry point (:func:`~nasreid.models.pretrained.init_weights` with the
    recipe's ``model`` section: loaded exactly by :func:`~nasreid.models.pretrained.load_pretrained`; a torchreid
    model-zoo file is translated exactly, its classifier left out; ``weights_format`` is a registered weights
    format or ``auto``) and evaluated on every target (the re-ID protocols:
    CMC, mAP, mINP; ``cuhk01`` with ``protocol: all_ids`` for all 971 identities).

    The evaluation settings are a recipe's (``data.height`` / ``width``, default 256 x 128 as the zoo's models
    were trained; ``eval.metric`` euclidean by default, torchreid's protocol; ``eval.flip`` off), changed with
    ``overrides`` (dotted keys, ``--set``), e.g. ``{"space.kwargs.width_mult": 0.25, "eval.metric": "cosine"}``.

    Args:
        weights: the weights file.
        genotype: a ``genotype.json`` or ``preset:NAME`` of ``space``.
        targets: the datasets to evaluate on (query and gallery only).
        out: folder for ``recipe.yaml`` and ``metrics.json`` (default: a new ``results/zero_shot_<file>-<time>``).

    Returns:
        The folder written (``metrics.json``: ``kind: zero_shot``, the weights file and its load report, the
        evaluation per target as ``nasreid evaluate`` writes it).

    Raises:
        RecipeError: no target, a bad override or target; GenotypeError: a bad genotype;
        PretrainedWeightsError: a file that does not fit the network (names the preset it would fit).
    """
    from nasreid.config import apply_overrides
    from nasreid.engine.checkpoint import new_run_dir
    from nasreid.genotype import Genotype, preset_genotype
    from nasreid.models.pretrained import init_weights

    if not targets:
        raise RecipeError("zero-shot evaluation needs at least one target dataset (--target NAME[=ROOT])")
    g = str(genotype)
    geno = preset_genotype(space, g.split(":", 1)[1]) if g.startswith("preset:") else Genotype.load(g)
    raw = {"name": f"zero_shot_{Path(weights).stem}", "device": device or "cpu",
           "data": {"dataset": targets[0].model_dump(), "height": 256, "width": 128, "workers": 2},
           "space": {"name": geno.space, "kwargs": dict(geno.space_kwargs)},
           "model": {"pretrained": str(weights), "pretrained_format": weights_format},
           "eval": {"metric": "euclidean", "flip": False, "targets": [t.model_dump() for t in targets]}}
    recipe = apply_overrides(Recipe.model_validate(raw), overrides or {}, where="--set")
    check_recipe(recipe)
    if out is None:
        run = track_new_run(new_run_dir(recipe.output_root, recipe.name))
    else:
        run = Path(out)
        if not run.exists():
            track_new_run(run)
        run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    setup_logging(run)
    geno = Genotype(space=geno.space, choices=geno.choices, space_kwargs={**geno.space_kwargs, **recipe.space.kwargs},
                    provenance=geno.provenance)
    net = geno.build(num_classes=0)
    report = init_weights(net, recipe.model, calibration_images=_calibration_source(recipe))
    assert report is not None  # the recipe names the weights file
    log.info("zero-shot: %s into %s (%d tensors; left out: %s)", weights, geno.provenance.get("preset", g),
             report["loaded"], ", ".join(report["skipped"]) or "nothing")
    ctx = device_context(recipe.device, recipe.amp, recipe.channels_last)
    results = evaluate_run_model(ctx.model(net.eval()), recipe, ctx, targets=recipe.eval.targets,
                                 same_domain=False, progress=progress_enabled())
    write_json(run / "metrics.json", {
        "kind": "zero_shot", "weights": str(weights), "genotype": geno.to_dict(),
        "load_report": {k: v for k, v in report.items() if k not in ("mismatched", "folds")},
        "input": [recipe.data.height, recipe.data.width], "metric": recipe.eval.metric, "evaluation": results})
    return run
