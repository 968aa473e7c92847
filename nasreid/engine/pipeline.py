"""search -> derive -> train -> evaluate, each reading and writing a run folder under ``results/``.

Run folder contents:
    recipe.yaml         the resolved recipe (a run can be resumed, plotted, evaluated from its files alone)
    train.log           the log
    checkpoints/last.pt atomic per-epoch checkpoint (model, optimiser, scheduler, strategy, RNG states)
    tb/                 TensorBoard event files (losses, lambda, every choice's softmax(pi))
    alphas.csv          architecture-weight trajectories (search runs)
    genotype.json       derived (search) or trained (retrain) architecture; genotype.graphml its graph
    model.pt            final weights of a retrained network (+ genotype, num_classes)
    metrics.json        history, timings, CMC/mAP same-domain and cross-domain
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from torch import nn

from nasreid.config import DatasetRef, Recipe, RecipeError, load_recipe, resolve_data_root
from nasreid.genotype import Genotype, GenotypeError, preset_genotype
from nasreid.registry import get_space, get_strategy

from .checkpoint import load_checkpoint, new_run_dir, read_json, save_checkpoint, seed_everything, write_json
from .trainer import Trainer, backward, build_optimizer, build_scheduler, device_context, optimizer_step

__all__ = ["run_search", "derive", "run_train", "run_evaluate", "setup_logging", "load_run_recipe"]

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


def _progress() -> bool:
    return sys.stderr.isatty() and not os.environ.get("NASREID_NO_PROGRESS")


def load_run_recipe(run_dir: str | os.PathLike) -> Recipe:
    """The resolved recipe of a run folder (``recipe.yaml``).

    Raises:
        RecipeError: not a run folder (no ``recipe.yaml``) or an invalid recipe.
    """
    p = Path(run_dir) / "recipe.yaml"
    if not p.is_file():
        raise RecipeError(f"{run_dir} is not a nasreid run folder: {p} is missing")
    return load_recipe(p)


def _prepare_run(recipe: Recipe, run_dir: Optional[str | os.PathLike], resume: bool) -> Path:
    if run_dir is None:
        run = new_run_dir(recipe.output_root, recipe.name)
    else:
        run = Path(run_dir)
        if run.exists() and (run / "checkpoints" / "last.pt").exists() and not resume:
            raise FileExistsError(f"{run} already holds a run; pass --resume to continue it or choose another folder")
        run.mkdir(parents=True, exist_ok=True)
    if not (resume and (run / "recipe.yaml").exists()):
        dumped = recipe.model_copy(update={"source": None})
        (run / "recipe.yaml").write_text(dumped.to_yaml())
    setup_logging(run)
    return run


def _build_data(recipe: Recipe):
    from nasreid.data import build_dataset, build_train_loader

    ref = recipe.data.dataset
    dataset = build_dataset(ref.name, resolve_data_root(ref.root), **ref.kwargs)
    if not dataset.train:
        raise RecipeError(f"{recipe.source}: data.dataset: the train split of {ref.name!r} is empty")
    log.info("dataset %s\n%s", ref.name, dataset.summary())
    d = recipe.data
    loader = build_train_loader(
        dataset, height=d.height, width=d.width, batch_size=d.batch_size, num_instances=d.num_instances,
        workers=d.workers, seed=recipe.seed, on_corrupt=d.on_corrupt, **d.augment.model_dump())
    return dataset, loader


def _loss(recipe: Recipe, num_classes: int):
    from nasreid.losses import build_reid_loss

    L = recipe.loss
    return build_reid_loss(num_classes, label_smooth=L.label_smooth, triplet_weight=L.triplet_weight,
                           triplet_margin=L.triplet_margin)


# ---------------------------------------------------------------------------------------------------
def run_search(recipe: Recipe, run_dir: Optional[str | os.PathLike] = None, resume: bool = False,
               progress: Optional[bool] = None) -> Path:
    """Search ``recipe.space`` with ``recipe.strategy`` on the training data; returns the run folder.

    Writes ``alphas.csv`` and TensorBoard scalars every epoch, derives ``genotype.json`` at the end, and
    runs ``recipe.then_retrain`` on it when set.

    Raises:
        RecipeError: the recipe has no ``strategy`` section or bad data settings.
    """
    from nasreid.plot import append_alphas_csv, log_alphas_tensorboard

    if recipe.strategy is None:
        raise RecipeError(f"{recipe.source}: a search recipe needs a 'strategy' section")
    run = _prepare_run(recipe, run_dir, resume)
    t_start = time.time()
    seed_everything(recipe.seed)
    ctx = device_context(recipe.device, recipe.amp, recipe.channels_last)
    dataset, loader = _build_data(recipe)
    space = get_space(recipe.space.name)(num_classes=dataset.num_train_pids, **recipe.space.kwargs)
    strategy = get_strategy(recipe.strategy.name)(space, **recipe.strategy.kwargs)
    model = ctx.model(strategy.attach())
    optimizer = build_optimizer(strategy.param_groups(recipe.optim.lr, recipe.optim.weight_decay), recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim)
    loss_fn = _loss(recipe, dataset.num_train_pids)
    writer = _writer(run)
    alphas_csv = run / "alphas.csv"
    steps_per_epoch = len(loader)

    def step(images, pids, batch):
        return strategy.train_step(images, pids, loss_fn, optimizer, scaler=ctx.scaler,
                                   grad_clip=recipe.optim.grad_clip, autocast=ctx.autocast)

    def epoch_start(epoch):
        return strategy.on_epoch_start(epoch, recipe.optim.epochs)

    def epoch_end(epoch):
        probs = strategy.probabilities()
        lam = getattr(strategy, "lam", None)
        append_alphas_csv(alphas_csv, epoch, (epoch + 1) * steps_per_epoch, probs, lam)
        log_alphas_tensorboard(writer, probs, epoch)
        return {}

    trainer = Trainer(run, model, optimizer, scheduler, loader, step, recipe.optim.epochs, ctx,
                      on_epoch_start=epoch_start, on_epoch_end=epoch_end,
                      extra_state=(lambda: {"strategy": strategy.state_dict(), "probabilities": strategy.probabilities(),
                                            "sample": strategy.export()},
                                   lambda s: strategy.load_state_dict(s["strategy"])),
                      writer=writer, progress=_progress() if progress is None else progress)
    history = trainer.fit()
    writer.close()
    metrics = read_json(run / "metrics.json", {}) or {}
    metrics.update({"kind": "search", "space": recipe.space.name, "strategy": recipe.strategy.name,
                    "history": history, "search_seconds": sum(h.get("epoch_seconds", 0.0) for h in history),
                    "final_probabilities": strategy.probabilities(), "device": str(ctx.device)})
    write_json(run / "metrics.json", metrics)
    geno = derive(run)
    log.info("derived genotype\n%s", geno.summary())
    if recipe.then_retrain:
        retrain = load_recipe(recipe.then_retrain)
        log.info("retraining with %s", recipe.then_retrain)
        train_run = run_train(retrain, genotype=run / "genotype.json", progress=progress)
        metrics["retrain_run"] = str(train_run)
        metrics["pipeline_seconds"] = time.time() - t_start
        write_json(run / "metrics.json", metrics)
    return run


def derive(run_dir: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Genotype:
    """Derive the architecture of a search run from its last checkpoint: argmax of the architecture
    weights per choice (OSNet-AIN "Search Outcome": omega* = argmax_omega pi_omega).

    Writes ``genotype.json`` (space, choices, final probabilities, space kwargs, provenance) and
    ``genotype.graphml`` into the run folder (or ``out``).

    Raises:
        RecipeError / CheckpointError: not a search run folder, or no checkpoint yet.
    """
    run = Path(run_dir)
    recipe = load_run_recipe(run)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    extra = ckpt.get("extra") or {}
    if "sample" not in extra:
        raise RecipeError(f"{run}: the checkpoint holds no architecture weights (is this a search run?)")
    geno = Genotype(
        space=recipe.space.name,
        choices=dict(extra["sample"]),
        probabilities=extra.get("probabilities", {}),
        space_kwargs=dict(recipe.space.kwargs),
        provenance={
            "strategy": recipe.strategy.name if recipe.strategy else None,
            "run": run.name,
            "epoch": int(ckpt["epoch"]) + 1,
            "epochs": recipe.optim.epochs,
            "dataset": recipe.data.dataset.name,
            "seed": recipe.seed,
            "rule": "argmax of architecture weights per choice",
        },
    )
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
    """Retrain the fixed network of ``genotype`` with the full pipeline and evaluate it.

    ID loss (label-smoothing CE) + optional batch-hard triplet, warm-up + cosine/multistep, per-epoch
    atomic checkpoints, ``--resume``; CMC/mAP on the dataset's query/gallery and on every
    ``eval.targets`` dataset (cross-domain) written to ``metrics.json``.

    Raises:
        RecipeError / GenotypeError: missing genotype, genotype of another space.
    """
    if resume and run_dir is not None and (Path(run_dir) / "genotype.json").is_file():
        geno = Genotype.load(Path(run_dir) / "genotype.json")
    else:
        geno = _load_genotype(recipe, genotype)
    if geno.space != recipe.space.name:
        raise GenotypeError(f"genotype is for space {geno.space!r} but the recipe trains {recipe.space.name!r}")
    run = _prepare_run(recipe, run_dir, resume)
    geno.space_kwargs = {**geno.space_kwargs, **recipe.space.kwargs}
    geno.save(run / "genotype.json")
    seed_everything(recipe.seed)
    ctx = device_context(recipe.device, recipe.amp, recipe.channels_last)
    dataset, loader = _build_data(recipe)
    net = geno.build(num_classes=dataset.num_train_pids)
    geno.write_graphml(run / "genotype.graphml")
    model = ctx.model(net)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = build_optimizer(groups, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim)
    loss_fn = _loss(recipe, dataset.num_train_pids)
    writer = _writer(run)

    def step(images, pids, batch):
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            loss, parts = loss_fn(model(images), pids)
        backward(loss, ctx.scaler)
        optimizer_step(optimizer, model.parameters(), ctx.scaler, recipe.optim.grad_clip)
        return parts

    def epoch_end(epoch):
        every = recipe.eval.every
        if every and (epoch + 1) % every == 0 and epoch + 1 < recipe.optim.epochs:
            res = _evaluate_dataset(model, dataset, recipe, ctx)
            for k in ("rank1", "mAP"):
                writer.add_scalar(f"eval/{k}", res[k], epoch)
            return {"eval_rank1": res["rank1"], "eval_mAP": res["mAP"]}
        return {}

    trainer = Trainer(run, model, optimizer, scheduler, loader, step, recipe.optim.epochs, ctx,
                      on_epoch_end=epoch_end, writer=writer, progress=_progress() if progress is None else progress)
    history = trainer.fit()
    save_checkpoint(run / "model.pt", {"model": model.state_dict(), "genotype": geno.to_dict(),
                                       "num_classes": dataset.num_train_pids})
    metrics = {"kind": "train", "space": geno.space, "genotype": geno.choices, "history": history,
               "train_seconds": sum(h.get("epoch_seconds", 0.0) for h in history), "device": str(ctx.device)}
    write_json(run / "metrics.json", metrics)
    results = evaluate_run_model(model, recipe, ctx, dataset)
    metrics["evaluation"] = results
    write_json(run / "metrics.json", metrics)
    for name, r in results.items():
        writer.add_scalar(f"final/{name}/rank1", r["rank1"], recipe.optim.epochs)
        writer.add_scalar(f"final/{name}/mAP", r["mAP"], recipe.optim.epochs)
    writer.close()
    return run


def _evaluate_dataset(model: nn.Module, dataset, recipe: Recipe, ctx) -> dict[str, Any]:
    from nasreid.data import build_test_loaders
    from nasreid.evaluation import evaluate_model

    if not dataset.query or not dataset.gallery:
        raise RecipeError(f"dataset {dataset.name!r} has an empty query or gallery split")
    d, e = recipe.data, recipe.eval
    q, g = build_test_loaders(dataset, height=d.height, width=d.width, batch_size=e.batch_size,
                              workers=d.workers, on_corrupt=d.on_corrupt)
    t0 = time.time()
    res = evaluate_model(model, q, g, device=ctx.device, flip=e.flip, metric=e.metric, amp=ctx.amp,
                         ranks=tuple(e.ranks), progress=_progress())
    res["seconds"] = time.time() - t0
    return res


def evaluate_run_model(model: nn.Module, recipe: Recipe, ctx, dataset=None,
                       targets: Optional[list[DatasetRef]] = None,
                       same_domain: bool = True) -> dict[str, dict[str, Any]]:
    """CMC/mAP of ``model`` on the training dataset's test split (``same-domain``) and on each target
    dataset (``cross-domain``); keys are ``"<dataset> (same-domain)"`` / ``"<dataset>[k=v,...] (cross-domain)"``
    (the target's parser options in brackets, so two settings of one dataset do not overwrite each other)."""
    from nasreid.data import build_dataset

    results: dict[str, dict[str, Any]] = {}
    src = recipe.data.dataset
    jobs = []
    if same_domain:
        if dataset is None:
            dataset = build_dataset(src.name, resolve_data_root(src.root), **src.kwargs)
        jobs.append((dataset, "same-domain", {}))
    for t in (recipe.eval.targets if targets is None else targets):
        jobs.append((build_dataset(t.name, resolve_data_root(t.root), **t.kwargs), "cross-domain", t.kwargs))
    for ds, kind, kwargs in jobs:
        res = _evaluate_dataset(model, ds, recipe, ctx)
        res["protocol"] = kind
        res["dataset_kwargs"] = dict(kwargs)
        tag = "[" + ",".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + "]" if kwargs else ""
        key = f"{ds.name}{tag} ({kind})"
        results[key] = res
        log.info("%s: rank-1 %.2f  rank-5 %.2f  rank-10 %.2f  mAP %.2f  (%d query, %d gallery)", key,
                 res["rank1"], res.get("rank5", float("nan")), res.get("rank10", float("nan")), res["mAP"],
                 res.get("num_query", -1), res.get("num_gallery", -1))
    return results


def run_evaluate(run_dir: str | os.PathLike, targets: Optional[list[DatasetRef]] = None,
                 device: Optional[str] = None, same_domain: bool = True) -> dict[str, dict[str, Any]]:
    """Evaluate the model of a retrain run folder (``model.pt``, or ``checkpoints/last.pt``).

    Args:
        targets: datasets to evaluate on instead of the recipe's ``eval.targets``.
        same_domain: also evaluate on the training dataset's test split.

    Results are merged into ``metrics.json`` under ``"evaluation"`` and returned.

    Raises:
        RecipeError / CheckpointError / GenotypeError: not a retrain run folder.
    """
    run = Path(run_dir)
    recipe = load_run_recipe(run)
    if device is not None:
        recipe = recipe.model_copy(update={"device": device})
    setup_logging(None)
    geno = Genotype.load(run / "genotype.json")
    src = run / "model.pt" if (run / "model.pt").is_file() else run / "checkpoints" / "last.pt"
    st = load_checkpoint(src)
    state = st["model"]
    num_classes = st.get("num_classes")
    if num_classes is None:
        w = [v for k, v in state.items() if k.endswith("classifier.weight")]
        num_classes = int(w[0].shape[0]) if w else 0
    model = geno.build(num_classes=num_classes)
    model.load_state_dict(state)
    ctx = device_context(recipe.device, recipe.amp, recipe.channels_last)
    model = ctx.model(model)
    if targets is None:
        targets = recipe.eval.targets
    results = evaluate_run_model(model, recipe, ctx, targets=targets, same_domain=same_domain)
    metrics = read_json(run / "metrics.json", {}) or {}
    metrics.setdefault("evaluation", {}).update(results)
    write_json(run / "metrics.json", metrics)
    return results
