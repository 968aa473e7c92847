"""Run folders: create and prepare them (``recipe.yaml``, logging, the process group under torchrun), build a
run's context, and load what a finished run left (its recipe, its trained network).

Run folder contents (under ``results/`` by default):
    recipe.yaml         the resolved recipe (a run can be resumed, plotted, evaluated from its files alone)
    retrain_recipe.yaml a search's ``then_retrain`` recipe, copied when the search starts
    train.log           the log
    checkpoints/last.pt atomic per-epoch checkpoint (model, optimiser, scheduler, strategy, RNG states)
    tb/                 TensorBoard event files (losses, lambda, every choice's softmax(pi))
    alphas.csv          architecture-weight trajectories (search runs)
    genotype.json       derived (search) or trained (retrain) architecture; genotype.graphml its graph
    model.pt            final weights of a retrained network (+ genotype, num_classes)
    metrics.json        history, timings, CMC/mAP same-domain and cross-domain; a search's ``retrain_run``

A **search run** is one whose recipe has a ``strategy`` section (its ``metrics.json`` says ``"kind": "search"``);
its ``checkpoints/last.pt`` holds a supernet or nothing loadable, and its retrained network lives in another
folder (``retrain_run``). A **retrain run** (``nasreid train``) holds the fixed network of its genotype.

Importing this module imports no concrete search space or strategy.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from torch import nn

from nasreid.config import Recipe, RecipeError, load_recipe, resolve_data_root
from nasreid.errors import RunFolderError
from nasreid.genotype import Genotype
from nasreid.registry import METHODS

from .checkpoint import load_checkpoint, new_run_dir, read_json, seed_everything, write_json
from .progress import progress_enabled
from .trainer import device_context

__all__ = ["setup_logging", "load_run_recipe", "load_run_model", "prepare_run", "dist_setup", "build_context",
           "is_search_run", "build_run_dataset", "VAL_SPLIT_FILE"]

log = logging.getLogger("nasreid")


def setup_logging(run_dir: Optional[Path] = None, level: int = logging.INFO) -> None:
    """Log to stderr and, with ``run_dir``, to ``run_dir/train.log`` (appending across resumes)."""
    log.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_nasreid_console", False) for h in log.handlers):
        h: logging.Handler = logging.StreamHandler(sys.stderr)
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


def load_run_recipe(run_dir: str | os.PathLike) -> Recipe:
    """The resolved recipe of a run folder (``recipe.yaml``).

    Raises:
        RunFolderError: not a run folder (no ``recipe.yaml``); RecipeError: an invalid recipe.
    """
    p = Path(run_dir) / "recipe.yaml"
    if not p.is_file():
        raise RunFolderError(f"{run_dir} is not a nasreid run folder: {p} is missing")
    return load_recipe(p)


# ---- preparing a run ------------------------------------------------------------------------------
def prepare_run(recipe: Recipe, run_dir: Optional[str | os.PathLike], resume: bool) -> Path:
    """The run folder of ``recipe``: created (``<output_root>/<name>_<timestamp>`` when ``run_dir`` is None),
    ``recipe.yaml`` (and a search's ``retrain_recipe.yaml``) written unless resuming, logging to
    ``train.log``. Under torchrun rank 0 prepares it and the other ranks receive its path (an error on rank 0
    is raised on every rank).

    Raises:
        RunFolderError: ``run_dir`` already holds a run and ``resume`` is false.
        RecipeError: a ``then_retrain`` recipe that does not load.
    """
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


def dist_setup(recipe: Recipe) -> Recipe:
    """Join torchrun's process group when there is one (:mod:`.distributed`); a ``cuda`` device becomes
    ``cuda:LOCAL_RANK``. The recipe unchanged in a single process."""
    from . import distributed as D

    d = recipe.distributed
    info = D.init_distributed(recipe.device, backend=d.backend, timeout_minutes=d.timeout_minutes)
    if info.enabled and recipe.device.startswith("cuda"):
        recipe = recipe.model_copy(update={"device": f"cuda:{info.local_rank}"})
    return recipe


#: run folders this process created (:func:`track_new_run`), removed again by :func:`discard_new_runs` when the
#: command stops on an input error before the run wrote a result
_NEW_RUNS: list[Path] = []
#: what a run folder holds before it has produced anything: its recipe(s), its log, TensorBoard's empty event
#: files, an identity split, and a retrain's genotype (a search writes its genotype beside its checkpoints, which
#: keep the folder)
_SETUP_FILES = ("recipe.yaml", "retrain_recipe.yaml", "train.log", "tb", "split.json", "val_split.json",
                "genotype.json", "genotype.graphml")


def track_new_run(run: Path) -> Path:
    """Record ``run`` as a folder this process created, for :func:`discard_new_runs`; returns ``run``."""
    _NEW_RUNS.append(Path(run))
    return Path(run)


def discard_new_runs() -> list[Path]:
    """Remove the run folders this process created (:func:`track_new_run`) that hold nothing but what a run
    writes before it starts (recipe, log, empty TensorBoard folder, split): called when a command stops on an
    input error (a missing or corrupt file, a bad recipe, an empty split, a weights file that does not fit), so
    that a failed command leaves nothing behind. A folder with a checkpoint, ``metrics.json`` or any other file
    is kept; folders that existed before the command are never tracked. Returns the folders removed."""
    import shutil

    removed = []
    for run in reversed(_NEW_RUNS):
        if run.is_dir() and all(p.name in _SETUP_FILES for p in run.iterdir()) \
                and not any((run / "tb").glob("*/**/*")):
            for h in list(log.handlers):  # the folder's train.log handler, if any
                if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == run.resolve():
                    log.removeHandler(h)
                    h.close()
            shutil.rmtree(run, ignore_errors=True)
            removed.append(run)
    _NEW_RUNS.clear()
    return removed


def _prepare_run_local(recipe: Recipe, run_dir: Optional[str | os.PathLike], resume: bool) -> Path:
    if run_dir is None:
        run = track_new_run(new_run_dir(recipe.output_root, recipe.name))
    else:
        run = Path(run_dir)
        if run.exists() and (run / "checkpoints" / "last.pt").exists() and not resume:
            raise RunFolderError(f"{run} already holds a run; pass --resume to continue it or choose another folder")
        if not run.exists():
            track_new_run(run)
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


def _writer(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tb"))


def _build_dataset(recipe: Recipe, run: Optional[Path] = None):
    from nasreid.data import build_dataset

    ref = recipe.data.dataset
    dataset = build_dataset(ref.name, resolve_data_root(ref.root), **ref.kwargs)
    if not dataset.train:
        raise RecipeError(f"{recipe.source}: data.dataset: the train split of {ref.name!r} is empty")
    if recipe.data.val_ids is not None:
        dataset = _hold_out(recipe, dataset, run)
    log.info("dataset %s\n%s", ref.name, dataset.summary())
    return dataset


#: the held-out validation identities of a run (``data.val_ids``), written when the run starts and read back by a
#: resumed run and by later commands (:func:`build_run_dataset`)
VAL_SPLIT_FILE = "val_split.json"


def _hold_out(recipe: Recipe, dataset, run: Optional[Path]):
    """``dataset`` with ``recipe.data.val_ids`` training identities held out
    (:func:`~nasreid.data.datasets.base.hold_out_validation`): the draw recorded in ``run/val_split.json`` when
    there is one, else a new draw from the split's seed (``dataset.split_seed``; 0 for a fixed split), written
    there (rank 0)."""
    from nasreid.data.datasets.base import hold_out_validation

    val_ids = recipe.data.val_ids
    assert val_ids is not None
    seed = getattr(dataset, "split_seed", None)
    seed = int(seed) if isinstance(seed, int) else 0
    path = None if run is None else Path(run) / VAL_SPLIT_FILE
    saved = read_json(path) if path is not None else None
    src = recipe.source or "<recipe>"
    if saved is not None and (saved.get("val_ids") != val_ids or saved.get("seed") != seed):
        raise RecipeError(f"{src}: data.val_ids: {path} holds validation identities drawn for val_ids "
                          f"{saved.get('val_ids')!r}, seed {saved.get('seed')!r}; the recipe asks for {val_ids!r}, "
                          f"seed {seed} (start a new run folder)")
    try:
        held = hold_out_validation(dataset, val_ids, seed, labels=None if saved is None else saved["labels"])
    except RecipeError as e:
        raise RecipeError(f"{src}: {e}") from None
    if path is not None and saved is None:
        from .distributed import is_main

        if is_main():
            try:
                write_json(path, held.val_split)
            except OSError:  # HPO workers starting together draw the same split; one of them wrote it
                if not path.is_file():
                    raise
    info: dict = held.val_split or {}
    log.info("validation identities (data.val_ids %s, seed %d): %d held out of the train split (%d query, "
             "%d gallery images); %d identities left to train on%s", val_ids, seed, len(info["labels"]),
             info["num_query"], info["num_gallery"], info["train_ids"],
             f" (written to the run's {path.name})" if path is not None else "")
    return held


def build_run_dataset(recipe: Recipe, run_dir: Optional[str | os.PathLike] = None):
    """The training dataset of a run as the run itself built it: the recipe's dataset, with the validation
    identities of ``data.val_ids`` held out as the run drew them (``run_dir/val_split.json``; drawn afresh from the
    split's seed when the folder holds none). What a resumed run and later commands (ranking candidates on
    validation) read.

    Raises:
        RecipeError / DatasetLayoutError: the dataset cannot be built, its train split is empty, or the recorded
            validation identities do not fit it (the message names ``data.val_ids``).
    """
    return _build_dataset(recipe, None if run_dir is None else Path(run_dir))


def build_context(cls, recipe: Recipe, run: Path, progress: Optional[bool]):
    """A ``cls`` (:class:`~nasreid.engine.context.RunContext` or ``SearchContext``) for ``run``: seeds set
    from ``recipe.seed``, the recipe's device settings, its training dataset built, a TensorBoard writer on
    ``run/tb`` (rank 0 only; None on the other ranks), progress bars per ``progress`` (None: on a terminal
    unless ``NASREID_NO_PROGRESS``).

    Raises:
        RecipeError / DatasetError: the training dataset cannot be built, or its train split is empty.
    """
    seed_everything(recipe.seed)
    dev = device_context(recipe.device, recipe.amp, recipe.channels_last, compile=recipe.compile)
    dataset = _build_dataset(recipe, run)
    from .distributed import is_main

    return cls(recipe=recipe, run_dir=run, device=dev, dataset=dataset, writer=_writer(run) if is_main() else None,
               progress=progress_enabled() if progress is None else progress)


# ---- reading a finished run -----------------------------------------------------------------------
def is_search_run(run_dir: str | os.PathLike, recipe: Optional[Recipe] = None) -> bool:
    """Whether ``run_dir`` is a search run: its recipe (``recipe``, default ``recipe.yaml``) has a
    ``strategy`` section, or its ``metrics.json`` says ``"kind": "search"``.

    Raises:
        RunFolderError / RecipeError: as :func:`load_run_recipe` when ``recipe`` is not given.
    """
    recipe = load_run_recipe(run_dir) if recipe is None else recipe
    if recipe.strategy is not None:
        return True
    return (read_json(Path(run_dir) / "metrics.json", {}) or {}).get("kind") == "search"


def _search_run_error(run: Path) -> RunFolderError:
    """The error for a search run given where a retrain run is needed: it names the retrain run recorded in
    ``metrics.json`` (``retrain_run``) or the command that makes one."""
    metrics = read_json(run / "metrics.json", {}) or {}
    retrain = metrics.get("retrain_run")
    head = f"{run} is a search run, not a retrain run (it holds no trained fixed network)"
    if retrain and Path(retrain).is_dir():
        return RunFolderError(f"{head}; its genotype was retrained in {retrain}: use that run folder")
    recipe_hint = run / "retrain_recipe.yaml" if (run / "retrain_recipe.yaml").is_file() else "<retrain recipe>"
    missing = f" (the retrain run {retrain} recorded in metrics.json is missing)" if retrain else ""
    return RunFolderError(f"{head}{missing}; retrain its genotype first: "
                          f"nasreid train {recipe_hint} --genotype {run / 'genotype.json'}")


def load_run_model(run_dir: str | os.PathLike, device: Optional[str] = None) -> tuple[nn.Module, Recipe, Genotype]:
    """The trained network of a retrain run folder, in eval mode on CPU, with its recipe and genotype.

    Weights come from ``model.pt`` (a finished run) or ``checkpoints/last.pt`` (an interrupted one); the
    classifier size from the checkpoint's ``num_classes`` or, failing that, from any 2-D ``classifier``
    weight. ``device`` replaces the recipe's ``device`` in the returned recipe (the model stays on CPU: move
    it with :func:`~nasreid.engine.trainer.device_context` ``(...).model``).

    Raises:
        RunFolderError: no ``recipe.yaml``, or a search run (:func:`is_search_run`; the message names its
        retrain run from ``metrics.json``, or the ``nasreid train`` command that makes one);
        GenotypeError: no or bad ``genotype.json``;
        CheckpointError: neither weights file is readable, or the weights do not fit the genotype's network.
    """
    from .checkpoint import CheckpointError

    run = Path(run_dir)
    recipe = load_run_recipe(run)
    if is_search_run(run, recipe):
        raise _search_run_error(run)
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
