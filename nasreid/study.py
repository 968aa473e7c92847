"""``nasreid study``: does the search beat random sampling and the hand designs, with error bars?

A *study recipe* (:class:`StudyRecipe`, YAML) names the search recipe(s) and the search arms (strategies such as
``gumbel`` and the ``random`` baseline) with their search seeds, the hand-designed genotypes (presets such as
``osnet``, ``osnet_ibn``, ``osnet_ain``), one retrain recipe with its retrain seeds, the dataset splits (the
CUHK01 protocol averages random identity splits: ``data.dataset.kwargs.split_seed``), the cross-domain test
targets, and the validation domain of the selection rule "best of k search seeds".

Every (genotype source, seed, split) is an independent job with its own run folder; each job is one plain
``nasreid search`` / ``nasreid train`` / ``nasreid evaluate`` command line that could run on any machine
(:func:`print_commands` prints them for a SLURM array or any job queue, phase by phase). :func:`run_study`
runs them with a local pool of worker processes, skipping finished jobs and resuming interrupted ones
(``--resume``). Phases: 1. all searches, 2. all retrains (a searched source needs its search's
``genotype.json``). The validation domain is evaluated by the retrain itself (it is added to the retrain's
``eval.targets``), so no third phase is needed; a finished retrain that lacks an evaluation the study expects
(a target added to the study later) gets a ``nasreid evaluate RUN --target ...`` job in phase 2 instead.

On-disk layout (``<output_root>/<name>/``)::

    study.yaml                                       the resolved study recipe (written by run_study)
    search/<arm>/split<K>_seed<S>/                   nasreid search run (+ job.log)
    train/<arm>/split<K>_search<S>_seed<R>/          retrain of the genotype of search/<arm>/split<K>_seed<S>
    train/<preset>/split<K>_seed<R>/                 retrain of a hand-designed preset
    study_report.md, study_results.csv, plots/*.png  :func:`build_report`

The report (:func:`build_report`): per source (arm) mean +- std and all points of rank-1 / mAP / mINP on the
same-domain test split and on every cross-domain target; parameters and multiply-adds; search cost; paired
comparisons searched vs random vs each hand design over the same (split, retrain seed) units with a percentile
bootstrap interval (:func:`paired_bootstrap`); how decided each search was (entropy of the final architecture
probabilities, :func:`decision_entropy`); whether the genotypes of different seeds agree
(:func:`genotype_agreement`); and both selection rules, "each seed as it comes" and "best of k search seeds by
cross-domain mAP on a validation domain that is not the final test domain" (the rule of Zhou et al., "Learning
Generalisable Omni-Scale Representations for Person Re-Identification" (OSNet-AIN), TPAMI 2021, Sec. 4: the
search is run with several seeds and the architecture that is best on a validation domain is kept).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from nasreid.config import DatasetRef, RecipeError, _format_errors, _Strict, load_recipe
from nasreid.errors import NasreidError, RunFolderError

__all__ = [
    "StudyRecipe", "StudyArm", "StudySearch", "StudyRetrain", "StudyEvaluation", "StudySelection",
    "StudyBootstrap", "StudyJob", "BootstrapResult", "load_study", "enumerate_jobs", "run_study",
    "print_commands", "collect_results", "build_report", "paired_bootstrap", "decision_entropy",
    "genotype_agreement", "find_evaluation", "entropy_per_epoch",
]

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
METRICS = ("rank1", "mAP", "mINP")
NEW, PARTIAL, EVALUATE, DONE = "new", "partial", "evaluate", "done"


# ---------------------------------------------------------------------------------------------------
# recipe schema
def _seed_list(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("give a number of seeds (int >= 1) or a list of seeds")
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"number of seeds must be >= 1, got {v}")
        return list(range(v))
    return v


def _check_unique(values: Sequence[Any], what: str) -> None:
    dup = sorted({str(x) for x in values if list(values).count(x) > 1})
    if dup:
        raise ValueError(f"{what} must be unique, repeated: {', '.join(dup)}")


#: a list of seeds, or a count n meaning seeds 0..n-1 (search and retrain seeds)
Seeds = Annotated[list[int], BeforeValidator(_seed_list)]


class StudyArm(_Strict):
    """One search arm: a registered strategy run with every search seed on every split.

    ``name`` is the arm's label (folder and report name); ``strategy`` the registered strategy (default:
    ``name``). ``kwargs`` replace the search recipe's ``strategy.kwargs`` (``None``: keep the recipe's own when
    it names the same strategy, else ``{}``). ``set`` holds extra dotted overrides of this arm's search jobs
    (e.g. ``{optim.epochs: 1}`` for the random baseline, whose exported genotype does not depend on its
    supernet training). ``kind``: ``random`` for the baseline, ``searched`` otherwise (default: ``random``
    for strategy ``random``). ``retrain: false``: a search-only arm (its genotypes are not retrained; the
    report's "how decided" and agreement sections still cover it). The search seed goes to the recipe's ``seed`` and, when the strategy's own
    config has a ``seed`` field (``random``), to ``strategy.kwargs.seed`` too."""

    name: str
    strategy: Optional[str] = None
    recipe: Optional[str] = Field(None, description="search recipe of this arm (default: search.recipe), "
                                  "relative to the study recipe")
    kwargs: Optional[dict[str, Any]] = None
    set: dict[str, Any] = Field(default_factory=dict)
    kind: Optional[Literal["searched", "random"]] = None
    retrain: bool = Field(True, description="retrain this arm's genotypes; False: search only (the report's "
                          "'how decided' and agreement sections, e.g. to compare search settings cheaply)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"an arm name may hold letters, digits, '_', '-' and '.' only, got {v!r}")
        return v

    @property
    def strategy_name(self) -> str:
        """The registered strategy of this arm."""
        return self.strategy or self.name

    @property
    def arm_kind(self) -> str:
        """``searched`` or ``random``."""
        return self.kind or ("random" if self.strategy_name == "random" else "searched")


class StudySearch(_Strict):
    """Search jobs: ``recipe`` (relative to the study recipe), ``seeds`` (a count n: seeds 0..n-1, or a
    list), ``arms`` and ``set`` (dotted overrides of every search job)."""

    recipe: str
    seeds: Seeds = Field(default_factory=lambda: [0, 1, 2])
    arms: list[StudyArm] = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique(self):
        _check_unique(self.seeds, "search.seeds")
        _check_unique([a.name for a in self.arms], "search.arms names")
        return self


class StudyRetrain(_Strict):
    """Retrain jobs: one ``recipe`` (relative to the study recipe) for every source, ``seeds`` (count or
    list; the recipe's ``seed``) and ``set`` (dotted overrides of every retrain job)."""

    recipe: str
    seeds: Seeds = Field(default_factory=lambda: [0])
    set: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique(self):
        _check_unique(self.seeds, "retrain.seeds")
        return self


class StudyEvaluation(_Strict):
    """Final test domains: the training dataset's own test split of each split (same-domain, always) and
    ``targets`` (cross-domain datasets, e.g. ``{name: cuhk03np, root: cuhk03}``); they replace the retrain
    recipe's ``eval.targets``."""

    targets: list[DatasetRef] = Field(default_factory=list)


class StudySelection(_Strict):
    """Selection rule "best of k search seeds by ``metric`` on the ``validation`` domain" (OSNet-AIN, TPAMI
    2021, Sec. 4). ``validation`` must be neither the training dataset nor a final test target; retrains
    evaluate on it too."""

    validation: DatasetRef
    metric: Literal["rank1", "mAP", "mINP"] = "mAP"


class StudyBootstrap(_Strict):
    """Paired percentile bootstrap settings of the report (:func:`paired_bootstrap`)."""

    n_boot: int = Field(10000, ge=100)
    level: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class StudyRecipe(_Strict):
    """A whole study (see the module docstring). Paths of recipes are resolved relative to the study recipe
    file, ``output_root`` relative to the current folder (as in a run recipe); :func:`load_study` stores
    both absolute."""

    name: str
    output_root: str = "runs"
    search: Optional[StudySearch] = None
    hand_designed: list[str] = Field(default_factory=list, description="presets of the retrain recipe's space")
    retrain: StudyRetrain
    splits: list[int] = Field(default_factory=lambda: [0], min_length=1)
    split_key: str = Field("data.dataset.kwargs.split_seed",
                           description="dotted recipe key that receives each split (search and retrain)")
    evaluation: StudyEvaluation = Field(default_factory=StudyEvaluation)
    selection: Optional[StudySelection] = None
    bootstrap: StudyBootstrap = Field(default_factory=StudyBootstrap)
    workers: int = Field(1, ge=1, description="local worker processes of run_study")
    source: Optional[str] = Field(None, description="file the study recipe was loaded from")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"a study name may hold letters, digits, '_', '-' and '.' only, got {v!r}")
        return v

    @model_validator(mode="after")
    def _unique(self):
        _check_unique(self.splits, "splits")
        _check_unique(self.hand_designed, "hand_designed")
        arms = [a.name for a in self.search.arms] if self.search else []
        clash = sorted(set(arms) & set(self.hand_designed))
        if clash:
            raise ValueError(f"search arm names and hand_designed presets share names: {', '.join(clash)}")
        if not arms and not self.hand_designed:
            raise ValueError("a study needs search arms or hand_designed presets")
        return self

    @property
    def study_dir(self) -> Path:
        """``<output_root>/<name>``, absolute."""
        return (Path(self.output_root) / self.name).resolve()

    def arm(self, name: str) -> StudyArm:
        """The search arm called ``name`` (KeyError if none)."""
        for a in self.search.arms if self.search else []:
            if a.name == name:
                return a
        raise KeyError(name)

    def to_yaml(self) -> str:
        """The resolved study recipe as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _resolve_path(base: Path, p: str, where: str) -> str:
    q = Path(os.path.expanduser(p))
    if not q.is_absolute():
        q = base / q if (base / q).is_file() else q
    if not q.is_file():
        raise RecipeError(f"{where}: file not found: {p}")
    return str(q.resolve())


def load_study(path: Union[str, os.PathLike], overrides: Optional[Mapping[str, Any]] = None) -> StudyRecipe:
    """Read, validate and check a study recipe.

    Beyond its own schema, every job's effective recipe is checked up front (:func:`~nasreid.engine.validate.
    check_recipe`: strategy names and kwargs, the split key on the dataset, evaluation targets), the presets
    must exist in the retrain recipe's space, search and retrain recipes must search/train the same space,
    and the selection's validation domain must be neither the training dataset nor a final test target.

    Args:
        path: the study YAML file, or a study folder (its ``study.yaml``, written by :func:`run_study`).
        overrides: dotted-key overrides applied before validation, e.g. ``{"output_root": "/tmp/x"}``.

    Returns:
        The :class:`StudyRecipe` with absolute recipe paths and ``source`` set.

    Raises:
        RecipeError: missing file, YAML error, unknown/missing key, wrong type, a recipe file not found, or a
            failed check; the message names the study file and the dotted key (or the recipe file and key).
    """
    from nasreid.config import _set_dotted

    p = Path(path)
    if p.is_dir() and (p / "study.yaml").is_file():
        p = p / "study.yaml"
    if p.is_dir():
        raise RecipeError(f"{p} is a folder without study.yaml (the resolved recipe a study run writes there; it is "
                          f"not committed with results): pass the study recipe instead, with --set output_root=<the "
                          f"folder's parent>")
    if not p.is_file():
        raise RecipeError(f"study recipe file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: YAML syntax error: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{p}: a study recipe must be a mapping of keys, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        study = StudyRecipe.model_validate({**raw, "source": str(p)})
    except ValidationError as e:
        raise RecipeError(_format_errors(str(p), e)) from None
    base = p.parent
    study.output_root = str(Path(os.path.expanduser(study.output_root)).resolve())  # a copy works from anywhere
    study.retrain.recipe = _resolve_path(base, study.retrain.recipe, f"{p}: retrain.recipe")
    if study.search is not None:
        study.search.recipe = _resolve_path(base, study.search.recipe, f"{p}: search.recipe")
        for i, arm in enumerate(study.search.arms):
            if arm.recipe is not None:
                arm.recipe = _resolve_path(base, arm.recipe, f"{p}: search.arms.{i}.recipe")
    _check_study(study)
    return study


def _same_ref(a: DatasetRef, b: DatasetRef) -> bool:
    return a.name == b.name and (a.root or None) == (b.root or None) and dict(a.kwargs) == dict(b.kwargs)


def _check_study(study: StudyRecipe) -> None:
    from nasreid.engine.validate import check_recipe
    from nasreid.genotype import preset_genotype
    from nasreid.registry import STRATEGIES

    src = study.source or "<study>"
    retrain = _load_with(study.retrain.recipe, _retrain_sets(study, study.splits[0], study.retrain.seeds[0]),
                         f"{src}: retrain")
    _checked(check_recipe, retrain, where=f"{src}: retrain")
    for i, name in enumerate(study.hand_designed):
        try:
            preset_genotype(retrain.space.name, name)
        except NasreidError as e:
            raise RecipeError(f"{src}: hand_designed.{i}: {e}") from None
    train_ref = retrain.data.dataset
    if study.selection is not None:
        val = study.selection.validation
        for i, t in enumerate(study.evaluation.targets):
            if _same_ref(val, t):
                raise RecipeError(f"{src}: selection.validation: the validation domain is the final test target "
                                  f"evaluation.targets.{i} ({t.name}); choose a domain that is not tested on")
        # the training dataset itself (any split): same name, root and options, the split's own kwarg aside
        split_kw = study.split_key.split(".")[-1] if study.split_key.startswith("data.dataset.kwargs.") else None
        strip = lambda kw: {k: v for k, v in kw.items() if k != split_kw}
        if (val.name == train_ref.name and (val.root or None) == (train_ref.root or None)
                and strip(val.kwargs) == strip(train_ref.kwargs)):
            raise RecipeError(f"{src}: selection.validation: {val.name!r} is the training dataset; the rule needs "
                              "a cross-domain validation set that is not the final test domain")
    if study.search is None:
        return
    for i, arm in enumerate(study.search.arms):
        where = f"{src}: search.arms.{i}"
        try:
            STRATEGIES.get(arm.strategy_name)
        except NasreidError as e:
            raise RecipeError(f"{where}.strategy: {e}") from None
        rec = _load_with(arm.recipe or study.search.recipe,
                         _search_sets(study, arm, study.search.seeds[0], study.splits[0]), where)
        rec = rec.model_copy(update={"then_retrain": None})
        _checked(check_recipe, rec, search=True, where=where)
        if rec.space.name != retrain.space.name:
            raise RecipeError(f"{where}: the search recipe searches space {rec.space.name!r} but the retrain recipe "
                              f"trains {retrain.space.name!r}")


def _checked(fn, *args, where: str, **kwargs):
    """``fn(*args, **kwargs)`` with a RecipeError's message prefixed by the study location ``where``."""
    try:
        return fn(*args, **kwargs)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


def _load_with(path: str, sets: Sequence[tuple[str, Any]], where: str):
    """The recipe at ``path`` with ``sets`` applied in order (as the CLI's ``--set`` would)."""
    try:
        return load_recipe(path, dict(sets))
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# jobs
def _yaml_value(v: Any) -> str:
    """A value as the CLI's ``--set key=value`` reads it back (``yaml.safe_load``), on one line."""
    s = yaml.safe_dump(v, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    if s.endswith("\n..."):
        s = s[: -len("\n...")].strip()
    elif s.endswith("..."):
        s = s[:-3].strip()
    return s


def _search_sets(study: StudyRecipe, arm: StudyArm, seed: int, split: int) -> list[tuple[str, Any]]:
    """Dotted overrides of one search job, in the order they are applied."""
    from nasreid.registry import STRATEGIES

    base = load_recipe(arm.recipe or study.search.recipe)
    sets: list[tuple[str, Any]] = list(study.search.set.items())
    if base.strategy is None or arm.strategy_name != base.strategy.name:
        sets.append(("strategy.name", arm.strategy_name))
        sets.append(("strategy.kwargs", dict(arm.kwargs or {})))
    elif arm.kwargs is not None:
        sets.append(("strategy.kwargs", dict(arm.kwargs)))
    sets += list(arm.set.items())
    sets.append(("seed", seed))
    cfg = getattr(STRATEGIES.get(arm.strategy_name), "Config", None)
    if cfg is not None and "seed" in getattr(cfg, "model_fields", {}):
        sets.append(("strategy.kwargs.seed", seed))
    sets.append((study.split_key, split))
    return sets


def _eval_targets(study: StudyRecipe) -> list[DatasetRef]:
    t = list(study.evaluation.targets)
    if study.selection is not None:
        t.append(study.selection.validation)
    return t


def _retrain_sets(study: StudyRecipe, split: int, seed: int) -> list[tuple[str, Any]]:
    sets: list[tuple[str, Any]] = list(study.retrain.set.items())
    sets.append(("eval.targets", [t.model_dump(mode="json") for t in _eval_targets(study)]))
    sets.append(("seed", seed))
    sets.append((study.split_key, split))
    return sets


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def find_evaluation(evaluation: Mapping[str, Mapping[str, Any]], ref: Optional[DatasetRef]) -> Optional[dict]:
    """The result of one dataset in a run's ``metrics.json`` ``evaluation`` (``None`` if absent).

    ``ref=None`` is the same-domain test split (key ``"<dataset> (same-domain)"``); a :class:`DatasetRef` is a
    cross-domain target, found by the key :func:`~nasreid.engine.pipeline.evaluate_run_model` writes
    (``"<name>[k=v,...] (cross-domain)"``) or else by its ``protocol`` / ``dataset_kwargs`` fields. Results
    of another matcher (keys with a ``[matcher]`` suffix) are not taken.
    """
    if ref is None:
        for k, r in evaluation.items():
            if k.endswith(" (same-domain)") and isinstance(r, Mapping):
                return dict(r)
        return None
    tag = "[" + ",".join(f"{k}={v}" for k, v in sorted(ref.kwargs.items())) + "]" if ref.kwargs else ""
    key = f"{ref.name}{tag} (cross-domain)"
    if key in evaluation:
        return dict(evaluation[key])
    for k, r in evaluation.items():
        if (isinstance(r, Mapping) and k.endswith(" (cross-domain)") and r.get("protocol") == "cross-domain"
                and k.split("[")[0].split(" ")[0] == ref.name and dict(r.get("dataset_kwargs") or {}) == dict(ref.kwargs)):
            return dict(r)
    return None


def _target_spec(ref: DatasetRef) -> str:
    """``name[=root][:k=v,...]`` as ``nasreid evaluate --target`` reads it."""
    s = ref.name + (f"={ref.root}" if ref.root else "")
    if ref.kwargs:
        s += ":" + ",".join(f"{k}={_yaml_value(v)}" for k, v in ref.kwargs.items())
    return s


@dataclass
class StudyJob:
    """One job of a study: a ``nasreid search`` (phase ``search``) or ``nasreid train`` (phase ``train``) run
    in its own folder ``run_dir``.

    Attributes:
        phase: ``"search"`` or ``"train"`` (all searches run before any retrain).
        arm: the genotype source: a search arm's name or a preset name.
        kind: ``"searched"``, ``"random"`` or ``"hand"``.
        split: the value of the study's ``split_key`` (CUHK01's ``split_seed``).
        search_seed: the search seed (``None`` for a hand design).
        retrain_seed: the retrain seed (``None`` for a search job).
        run_dir: the run folder (absolute).
        recipe: the search or retrain recipe file (absolute).
        sets: ``(dotted key, value)`` overrides of a fresh run (``--set key=value``, in order).
        genotype: a train job's ``--genotype``: ``<search run>/genotype.json`` or ``preset:NAME``.
        search_run: the search run folder a train job depends on (``None`` for a hand design).
        targets: the cross-domain evaluations a finished train job must hold (same-domain is always expected).
    """

    phase: Literal["search", "train"]
    arm: str
    kind: Literal["searched", "random", "hand"]
    split: int
    search_seed: Optional[int]
    retrain_seed: Optional[int]
    run_dir: Path
    recipe: Path
    sets: list[tuple[str, Any]] = field(default_factory=list)
    genotype: Optional[str] = None
    search_run: Optional[Path] = None
    targets: list[DatasetRef] = field(default_factory=list)

    @property
    def id(self) -> str:
        """The run folder relative to the study folder, e.g. ``search/gumbel/split0_seed1``."""
        return "/".join(self.run_dir.parts[-3:])

    def metrics(self) -> dict:
        """The run's ``metrics.json`` (``{}`` when absent or unreadable)."""
        return _read_json(self.run_dir / "metrics.json")

    def missing_targets(self) -> list[Optional[DatasetRef]]:
        """Evaluations a train job's ``metrics.json`` lacks (``None`` stands for the same-domain split)."""
        ev = self.metrics().get("evaluation") or {}
        return [t for t in [None, *self.targets] if find_evaluation(ev, t) is None]

    def state(self) -> str:
        """``"done"``; ``"partial"`` (started: the run folder holds ``recipe.yaml``, resumed with ``--resume``);
        ``"evaluate"`` (a train job trained and evaluated, but some expected evaluation is missing: a
        ``nasreid evaluate`` adds it); ``"new"``. A search is done when its ``metrics.json`` says
        ``search_done`` and ``genotype.json`` exists; a retrain when its ``metrics.json`` holds ``evaluation``
        with every expected dataset."""
        m = self.metrics()
        if self.phase == "search":
            if m.get("search_done") and (self.run_dir / "genotype.json").is_file():
                return DONE
        elif m.get("evaluation"):
            return DONE if not self.missing_targets() else EVALUATE
        return PARTIAL if (self.run_dir / "recipe.yaml").is_file() else NEW

    def ready(self) -> bool:
        """Whether the job can start: a retrain of a searched genotype needs its search's ``genotype.json``."""
        return self.search_run is None or (self.search_run / "genotype.json").is_file()

    def command(self, state: Optional[str] = None) -> list[str]:
        """The command line of this job in ``state`` (default: its current :meth:`state`): a fresh run
        (``--out``), a resumed one (``--resume RUN``), or ``nasreid evaluate`` for missing evaluations. A
        done job gets its fresh command (what it ran)."""
        state = state or self.state()
        py = [sys.executable, "-m", "nasreid"]
        if self.phase == "search":
            if state == PARTIAL:
                return [*py, "search", "--resume", str(self.run_dir), "--no-retrain"]
            cmd = [*py, "search", str(self.recipe), "--out", str(self.run_dir), "--no-retrain"]
        else:
            if state == EVALUATE:
                missing = self.missing_targets()
                cmd = [*py, "evaluate", str(self.run_dir)]
                for t in missing:
                    if t is not None:
                        cmd += ["--target", _target_spec(t)]
                if None not in missing:
                    cmd.append("--no-same-domain")
                return cmd
            if state == PARTIAL:
                return [*py, "train", "--resume", str(self.run_dir), "--genotype", str(self.genotype)]
            cmd = [*py, "train", str(self.recipe), "--genotype", str(self.genotype), "--out", str(self.run_dir)]
        for k, v in self.sets:
            cmd += ["--set", f"{k}={_yaml_value(v)}"]
        return cmd


def _as_study(recipe: Union[StudyRecipe, str, os.PathLike]) -> StudyRecipe:
    if isinstance(recipe, StudyRecipe):
        return recipe
    p = Path(recipe)
    if p.is_dir() and not (p / "study.yaml").is_file():
        raise RunFolderError(f"{p} is not a study folder: study.yaml is missing (run_study writes it)")
    return load_study(p)


def enumerate_jobs(recipe: Union[StudyRecipe, str, os.PathLike]) -> list[StudyJob]:
    """Every job of a study, phase by phase: searches (arm, search seed, split), then retrains of each
    search's genotype (arm, search seed, retrain seed, split) and of each hand design (preset, retrain seed,
    split). Nothing is run or written.

    Args:
        recipe: a :class:`StudyRecipe`, a study YAML file or a study folder (its ``study.yaml``).

    Returns:
        ``len(arms) * len(search seeds) * len(splits)`` search jobs followed by
        ``(len(arms) * len(search seeds) + len(hand_designed)) * len(retrain seeds) * len(splits)`` train jobs,
        ordered so that paired units complete first (split, retrain seed, then each arm's first search seed
        with the hand designs before the later search seeds).

    Raises:
        RecipeError: an invalid study recipe; RunFolderError: a folder without ``study.yaml``.
    """
    study = _as_study(recipe)
    root = study.study_dir
    targets = _eval_targets(study)
    jobs: list[StudyJob] = []
    searches: list[StudyJob] = []
    if study.search is not None:
        for arm in study.search.arms:
            for split in study.splits:
                for s in study.search.seeds:
                    searches.append(StudyJob(
                        phase="search", arm=arm.name, kind=arm.arm_kind, split=split, search_seed=s,
                        retrain_seed=None, run_dir=root / "search" / arm.name / f"split{split}_seed{s}",
                        recipe=Path(arm.recipe or study.search.recipe), sets=_search_sets(study, arm, s, split)))
    jobs += searches
    for sj in searches:
        if not study.arm(sj.arm).retrain:
            continue
        for r in study.retrain.seeds:
            jobs.append(StudyJob(
                phase="train", arm=sj.arm, kind=sj.kind, split=sj.split, search_seed=sj.search_seed,
                retrain_seed=r, run_dir=root / "train" / sj.arm / f"split{sj.split}_search{sj.search_seed}_seed{r}",
                recipe=Path(study.retrain.recipe), sets=_retrain_sets(study, sj.split, r),
                genotype=str(sj.run_dir / "genotype.json"), search_run=sj.run_dir, targets=targets))
    for name in study.hand_designed:
        for split in study.splits:
            for r in study.retrain.seeds:
                jobs.append(StudyJob(
                    phase="train", arm=name, kind="hand", split=split, search_seed=None, retrain_seed=r,
                    run_dir=root / "train" / name / f"split{split}_seed{r}", recipe=Path(study.retrain.recipe),
                    sets=_retrain_sets(study, split, r), genotype=f"preset:{name}", targets=targets))
    # retrains in the order that completes paired units first: split by split, retrain seed by retrain seed, and
    # within them every source's first search seed (with the hand designs) before the next search seeds
    n_search = len(searches)
    order = {a.name: i for i, a in enumerate(study.search.arms)} if study.search is not None else {}
    seeds = list(study.search.seeds) if study.search is not None else []
    hands = {name: i for i, name in enumerate(study.hand_designed)}

    def key(j: StudyJob):
        k = seeds.index(j.search_seed) if j.search_seed is not None else 0
        src = order[j.arm] if j.kind != "hand" else len(order) + hands[j.arm]
        return (study.splits.index(j.split), j.retrain_seed, k, src)

    return jobs[:n_search] + sorted(jobs[n_search:], key=key)


def print_commands(recipe: Union[StudyRecipe, str, os.PathLike], pending_only: bool = True,
                   file=None) -> list[str]:
    """Print one shell command per job, phase by phase (``# phase 1: search`` / ``# phase 2: train`` comment
    lines between them), for an external scheduler: every command of a phase may run in parallel, and a
    phase starts when the previous one is finished. Each command is resumable: a job interrupted after
    this was printed is best re-listed (its command then carries ``--resume``).

    Args:
        recipe: a :class:`StudyRecipe`, a study YAML file or a study folder.
        pending_only: skip finished jobs (default); ``False`` lists every job.
        file: where to print (default ``sys.stdout``).

    Returns:
        The printed commands (without the comment lines).
    """
    file = file or sys.stdout
    jobs = enumerate_jobs(recipe)
    out = []
    for i, phase in enumerate(("search", "train"), 1):
        sel = [j for j in jobs if j.phase == phase]
        cmds = []
        for j in sel:
            st = j.state()
            if pending_only and st == DONE:
                continue
            cmds.append(shlex.join(j.command(st)))
        print(f"# phase {i}: {phase} ({len(cmds)} of {len(sel)} jobs" + (" pending)" if pending_only else ")"),
              file=file)
        for c in cmds:
            print(c, file=file)
        out += cmds
    return out


def _run_job(job: StudyJob, env: Mapping[str, str]) -> dict:
    """Run one job's command with its output appended to ``<run>/job.log``; the job's record."""
    state = job.state()
    cmd = job.command(state)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(job.run_dir / "job.log", "a") as fh:
        fh.write(f"# {_dt.datetime.now().isoformat(timespec='seconds')} ({state}) $ {shlex.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dict(env), check=False).returncode
        fh.write(f"# exit {rc} after {time.time() - t0:.1f} s\n")
    return {"id": job.id, "state_before": state, "rc": rc, "seconds": time.time() - t0,
            "state": job.state(), "log": str(job.run_dir / "job.log")}


def run_study(recipe: Union[StudyRecipe, str, os.PathLike], workers: Optional[int] = None, dry_run: bool = False,
              report: bool = True, echo: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run every unfinished job of a study with ``workers`` local processes, phase by phase.

    Finished jobs are skipped; started ones are resumed (``--resume``); a retrain whose search failed is
    skipped (``blocked``). Each job is a ``subprocess.run`` of its plain CLI command (:meth:`StudyJob.command`)
    driven from a ``concurrent.futures`` pool, its output appended to ``<run>/job.log``. Every job gets
    ``NASREID_NO_PROGRESS=1`` and, unless already set, ``OMP_NUM_THREADS`` = CPU cores // workers. Writes
    ``study.yaml`` into the study folder and, with ``report``, builds the report at the end (with whatever
    finished).

    Args:
        recipe: a :class:`StudyRecipe`, a study YAML file or a study folder.
        workers: parallel jobs (default: the recipe's ``workers``).
        dry_run: print the pending commands (:func:`print_commands`) and run nothing.
        report: build the report after the last phase.
        echo: progress lines (default: printed to stderr).

    Returns:
        ``{"skipped": [ids done before], "ran": [job records], "failed": [records with rc != 0 or not done
        after running], "blocked": [ids], "report": path of study_report.md or None}``.

    Raises:
        RecipeError: an invalid study recipe.
    """
    study = _as_study(recipe)
    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    workers = int(workers or study.workers)
    if workers < 1:
        raise RecipeError(f"workers must be >= 1, got {workers}")
    if dry_run:
        print_commands(study)
        return {"skipped": [], "ran": [], "failed": [], "blocked": [], "report": None}
    study.study_dir.mkdir(parents=True, exist_ok=True)
    (study.study_dir / "study.yaml").write_text(study.model_copy(update={"source": None}).to_yaml())
    env = dict(os.environ)
    env["NASREID_NO_PROGRESS"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    jobs = enumerate_jobs(study)
    out: dict[str, Any] = {"skipped": [], "ran": [], "failed": [], "blocked": [], "report": None}
    for i, phase in enumerate(("search", "train"), 1):
        todo = []
        for j in (j for j in jobs if j.phase == phase):
            if j.state() == DONE:
                out["skipped"].append(j.id)
            elif not j.ready():
                out["blocked"].append(j.id)
            else:
                todo.append(j)
        echo(f"study {study.name}: phase {i} ({phase}): {len(todo)} jobs to run with {workers} workers")
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for rec in pool.map(lambda j: _run_job(j, env), todo):
                out["ran"].append(rec)
                ok = rec["rc"] == 0 and rec["state"] == DONE
                if not ok:
                    out["failed"].append(rec)
                echo(f"  {'done' if ok else 'FAILED'} {rec['id']} ({rec['state_before']}, {rec['seconds']:.0f} s"
                     + ("" if ok else f", exit {rec['rc']}, see {rec['log']}") + ")")
    if out["blocked"]:
        echo(f"study {study.name}: {len(out['blocked'])} retrains not run (their search did not finish)")
    if report:
        out["report"] = str(build_report(study))
        echo(f"study {study.name}: report {out['report']}")
    return out


# ---------------------------------------------------------------------------------------------------
# statistics
class BootstrapResult(NamedTuple):
    """Paired bootstrap summary: ``mean_diff`` = mean(b - a), percentile interval ``[low, high]`` at
    ``level``, ``n`` pairs, ``n_boot`` resamples."""

    mean_diff: float
    low: float
    high: float
    n: int
    n_boot: int
    level: float


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> BootstrapResult:
    """Mean paired difference ``b - a`` with a percentile bootstrap confidence interval.

    The ``n`` pairs ``d_i = b_i - a_i`` are resampled with replacement ``n_boot`` times; the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means (Efron & Tibshirani, "An
    Introduction to the Bootstrap", 1993, Ch. 13, the percentile interval). With few pairs (a study's
    splits x seeds) the interval is too narrow (the bootstrap ignores the variance it cannot see); with one
    pair it is the point itself.

    Args:
        a, b: paired values, shape ``[n]`` each (e.g. mAP in % of two sources on the same splits and seeds).
        n_boot: bootstrap resamples.
        seed: seed of the resampling (``numpy.random.default_rng``).
        level: coverage of the interval, in (0, 1).

    Returns:
        :class:`BootstrapResult` (units of ``a`` / ``b``).

    Raises:
        ValueError: different lengths, no pairs, a non-finite value, ``n_boot < 1`` or ``level`` outside (0, 1).
    """
    x, y = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired_bootstrap: a and b must have the same length, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError("paired_bootstrap: no pairs")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired_bootstrap: values must be finite")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    d = y - x
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapResult(float(d.mean()), float(lo), float(hi), int(d.size), int(n_boot), float(level))


def decision_entropy(probabilities: Mapping[str, Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Entropy of each decision's final architecture distribution: ``{label: (H, log k)}`` in nats, where
    ``H = -sum_i p_i log p_i`` over the ``k`` candidates (``log k``: a uniform, undecided choice; 0: one-hot).
    Probabilities are renormalised to sum 1; zeros contribute 0."""
    out = {}
    for label, probs in probabilities.items():
        p = np.asarray([float(v) for v in probs.values()], dtype=float)
        if p.size == 0:
            continue
        s = p.sum()
        p = p / s if s > 0 else np.full_like(p, 1.0 / p.size)
        nz = p[p > 0]
        out[label] = (float(-(nz * np.log(nz)).sum()), float(math.log(p.size)))
    return out


def genotype_agreement(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Fraction of decisions (labels present in both choice maps) on which two genotypes agree, in [0, 1]
    (``nan`` when they share no label)."""
    common = [k for k in a if k in b]
    if not common:
        return float("nan")
    return sum(str(a[k]) == str(b[k]) for k in common) / len(common)


# ---------------------------------------------------------------------------------------------------
# results and report
def _shown(path: Union[str, os.PathLike]) -> str:
    """A recipe path as the report shows it: relative to the current folder when below it, else its name (a
    committed report carries no machine's absolute paths)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")


def _eval_columns(study: StudyRecipe) -> list[tuple[str, str, Optional[DatasetRef]]]:
    """``(column prefix, title, ref)`` of every evaluation: same-domain, targets, validation."""
    out: list[tuple[str, str, Optional[DatasetRef]]] = [("same", "same-domain", None)]
    used = {"same"}
    for t in study.evaluation.targets:
        pre = f"cross_{_slug(t.name)}"
        i = 2
        while pre in used:
            pre, i = f"cross_{_slug(t.name)}_{i}", i + 1
        used.add(pre)
        out.append((pre, f"cross-domain {t.name}", t))
    if study.selection is not None:
        out.append((f"val_{_slug(study.selection.validation.name)}",
                    f"validation {study.selection.validation.name}", study.selection.validation))
    return out


def _genotype_str(choices: Mapping[str, Any]) -> str:
    return " ".join(str(v) for v in choices.values())


_COMPLEXITY: dict[str, tuple[float, float]] = {}


def _complexity(geno, size: tuple[int, int]) -> tuple[float, float]:
    """(parameters without the classifier, multiply-adds of one image) of a genotype's network."""
    from nasreid.models.complexity import count_multiply_adds, count_parameters

    key = json.dumps([geno.space, geno.choices, geno.space_kwargs, list(size)], sort_keys=True, default=str)
    if key not in _COMPLEXITY:
        import torch

        with torch.random.fork_rng():
            net = geno.build(num_classes=0)
        _COMPLEXITY[key] = (float(count_parameters(net)), float(count_multiply_adds(net, size)))
    return _COMPLEXITY[key]


def collect_results(recipe: Union[StudyRecipe, str, os.PathLike]) -> list[dict[str, Any]]:
    """One row per retrain job of a study (finished or not; ``status`` says which).

    Columns: ``source`` (arm or preset), ``kind`` (searched / random / hand), ``strategy``, ``search_seed``,
    ``retrain_seed``, ``split``, ``status``; ``<prefix>_rank1`` / ``_mAP`` / ``_mINP`` in % for every
    evaluation (prefix ``same``, ``cross_<target>``, ``val_<validation>``; ``nan`` when missing); ``params``
    (without the identity classifier) and ``macs`` (multiply-adds of one image at the retrain input size,
    :mod:`nasreid.models.complexity`); ``search_seconds`` (the search's summed epoch time), ``entropy_mean``
    (mean over decisions of the entropy of the search's final probabilities, nats), ``entropy_max`` (mean
    ``log k``), ``train_seconds``, ``device`` (the retrain's), ``train_triplet`` / ``train_acc`` (the retrain's last-epoch training triplet
    loss and accuracy: a triplet term that ends at about its margin marks a retrain whose training features do
    not separate the identities by the margin; in the CPU study those runs had the lowest test mAP),
    ``genotype`` (the choices in label order), ``run_dir``, ``search_run``.

    Raises:
        RecipeError / RunFolderError: see :func:`enumerate_jobs`.
    """
    from nasreid.genotype import Genotype, GenotypeError, preset_genotype

    study = _as_study(recipe)
    retrain = load_recipe(study.retrain.recipe)
    size = (retrain.data.height, retrain.data.width)
    cols = _eval_columns(study)
    rows = []
    for job in (j for j in enumerate_jobs(study) if j.phase == "train"):
        m = job.metrics()
        ev = m.get("evaluation") or {}
        row: dict[str, Any] = {
            "source": job.arm, "kind": job.kind,
            "strategy": study.arm(job.arm).strategy_name if job.kind != "hand" else "",
            "search_seed": job.search_seed if job.search_seed is not None else "",
            "retrain_seed": job.retrain_seed, "split": job.split, "status": job.state()}
        for pre, _, ref in cols:
            r = find_evaluation(ev, ref) or {}
            for met in METRICS:
                row[f"{pre}_{met}"] = float(r.get(met, float("nan")))
        geno = None
        try:
            if (job.run_dir / "genotype.json").is_file():
                geno = Genotype.load(job.run_dir / "genotype.json")
            elif job.kind == "hand":
                geno = preset_genotype(retrain.space.name, job.arm)
            elif job.search_run is not None and (job.search_run / "genotype.json").is_file():
                geno = Genotype.load(job.search_run / "genotype.json")
        except GenotypeError:
            geno = None
        row["params"], row["macs"] = float("nan"), float("nan")
        row["genotype"] = ""
        if geno is not None:
            geno = Genotype(space=geno.space, choices=geno.choices,
                            space_kwargs={**geno.space_kwargs, **retrain.space.kwargs})
            row["params"], row["macs"] = _complexity(geno, size)
            row["genotype"] = _genotype_str(geno.choices)
        sm = _read_json(job.search_run / "metrics.json") if job.search_run is not None else {}
        row["search_seconds"] = float(sm.get("search_seconds", float("nan")))
        probs = sm.get("final_probabilities")
        if probs is None and job.search_run is not None and (job.search_run / "genotype.json").is_file():
            probs = _read_json(job.search_run / "genotype.json").get("probabilities")
        ent = decision_entropy(probs or {})
        row["entropy_mean"] = float(np.mean([h for h, _ in ent.values()])) if ent else float("nan")
        row["entropy_max"] = float(np.mean([k for _, k in ent.values()])) if ent else float("nan")
        row["train_seconds"] = float(m.get("train_seconds", float("nan")))
        last = (m.get("history") or [{}])[-1]
        row["train_triplet"] = float(last.get("triplet", float("nan")))  # a term stuck at its margin: see README
        row["train_acc"] = float(last.get("acc", float("nan")))
        row["device"] = str(m.get("device", ""))
        row["run_dir"] = str(job.run_dir)
        row["search_run"] = str(job.search_run) if job.search_run is not None else ""
        rows.append(row)
    return rows


def _finite(xs) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(float(x))]


def _ms(xs, fmt: str = "{:.2f}") -> str:
    xs = _finite(xs)
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(np.mean(xs))} ± {fmt.format(np.std(xs, ddof=1))}"


def _unit_values(rows: list[dict], source: str, col: str, rule: str, sel_col: Optional[str]) -> dict:
    """``{(split, retrain_seed): value}`` of a source under a selection rule.

    ``each``: a searched / random source's mean over its search seeds (the expected value of one seed as it
    comes); ``best``: the value of the seed with the highest ``sel_col`` (validation metric; ties: lowest
    seed). Hand designs have one value per unit under both rules."""
    units: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["source"] == source and r["status"] == DONE:
            units.setdefault((r["split"], r["retrain_seed"]), []).append(r)
    out = {}
    for u, rs in units.items():
        if rs[0]["kind"] == "hand" or rule == "each":
            vals = _finite(r[col] for r in rs)
            if vals:
                out[u] = float(np.mean(vals))
        else:
            cand = [r for r in rs if sel_col and math.isfinite(r[sel_col]) and math.isfinite(r[col])]
            if cand:
                best = sorted(cand, key=lambda r: (-r[sel_col], r["search_seed"]))[0]
                out[u] = float(best[col])
    return out


def _selected_seeds(rows: list[dict], source: str, sel_col: str) -> dict:
    units: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["source"] == source and r["status"] == DONE and math.isfinite(r[sel_col]):
            units.setdefault((r["split"], r["retrain_seed"]), []).append(r)
    return {u: sorted(rs, key=lambda r: (-r[sel_col], r["search_seed"]))[0]["search_seed"] for u, rs in units.items()}


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend (reports are written on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, grid: str = "both", legend_loc: Optional[str] = None) -> Path:
    """Grid (``grid``: matplotlib's axis name), optional legend, tight layout, write ``path`` (parents created)
    at 120 dpi, close the figure."""
    ax.grid(axis=grid, alpha=0.3)
    if legend_loc is not None:
        ax.legend(fontsize=7, loc=legend_loc)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _plot(rows: list[dict], sources: list[str], col: str, title: str, path: Path) -> Optional[Path]:
    plt = _pyplot()
    data = [(s, _finite(r[col] for r in rows if r["source"] == s and r["status"] == DONE)) for s in sources]
    data = [(s, v) for s, v in data if v]
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(data), 3.6))
    rng = np.random.default_rng(0)
    for i, (_, v) in enumerate(data):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=16, alpha=0.6, color="tab:blue", zorder=2)
        sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        ax.errorbar(i + 0.25, float(np.mean(v)), yerr=sd, fmt="o", color="black", capsize=4, zorder=3)
    ax.set_xticks(range(len(data)))
    ax.set_xticklabels([s for s, _ in data], rotation=30, ha="right")
    ax.set_ylabel("mAP (%)")
    ax.set_title(title + "\n(points: runs; black: mean ± std)", fontsize=9)
    return _save(fig, ax, path, grid="y")


def _plot_triplet(pts: Mapping[str, Sequence[tuple[float, float]]], margin: Optional[float], path: Path
                  ) -> Optional[Path]:
    """Same-domain mAP (%) against the retrain's last-epoch training triplet loss (``pts``: source -> finite
    ``(triplet, mAP)`` points), one colour per source, the recipe's triplet margin as a dashed line: where people
    would rather look than read the "All points" table."""
    pts = {s: v for s, v in pts.items() if v}
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    markers = "osD^vP*Xh"
    for i, (s, v) in enumerate(pts.items()):
        x, y = zip(*v)
        ax.scatter(x, y, s=22, alpha=0.75, marker=markers[i % len(markers)], label=s)
    if margin is not None:
        ax.axvline(margin, ls="--", color="gray", lw=1)
        ax.text(margin, ax.get_ylim()[1], " margin", va="top", ha="left", fontsize=8, color="gray")
    ax.set_xlabel("training triplet loss, last epoch")
    ax.set_ylabel("same-domain mAP (%)")
    ax.set_title("retrain outcome vs the triplet term at the end of training", fontsize=9)
    return _save(fig, ax, path, legend_loc="best")


def _triplet_margin(study: StudyRecipe) -> Optional[float]:
    """The retrain recipe's triplet margin (``loss.triplet_margin``, after the study's ``retrain.set``), or None
    where it has no triplet term or cannot be loaded (a report rebuilt away from its recipes)."""
    try:
        rec = _load_with(study.retrain.recipe, list(study.retrain.set.items()), where="retrain.recipe")
    except (RecipeError, OSError):  # the plot's margin line is optional
        return None
    return float(rec.loss.triplet_margin) if rec.loss.triplet_weight > 0 else None


def entropy_per_epoch(alphas_csv: Union[str, os.PathLike]):
    """Mean decision entropy of a search after each epoch, from its ``alphas.csv``.

    Args:
        alphas_csv: a search run's ``alphas.csv`` (columns ``epoch``, ``label``, ``value``, ``probability``: one
            row per candidate per decision per logged epoch, as :mod:`nasreid.visualize` writes it).

    Returns:
        ``(series, log_k)``: a ``pandas.Series`` indexed by epoch (0-based) of the entropy
        ``-sum_c p_c log p_c`` (nats) averaged over the decisions, and the mean ``log k`` (the uniform level).

    Raises:
        KeyError: a column is missing; ValueError / pandas ParserError: an unreadable file.
    """
    import pandas as pd

    df = pd.read_csv(alphas_csv)
    p = df["probability"].astype(float).clip(lower=1e-12)
    df = df.assign(h=-(p * np.log(p)))
    per = df.groupby(["epoch", "label"]).agg(h=("h", "sum"), k=("value", "nunique")).reset_index()
    return per.groupby("epoch")["h"].mean(), (float(np.log(per["k"]).mean()) if len(per) else float("nan"))


def _plot_entropy(runs: Mapping[str, Sequence[Path]], path: Path) -> Optional[Path]:
    """Mean decision entropy (nats) after each search epoch, one line per search, one colour per arm, read from
    each search's ``alphas.csv`` (``epoch, label, value, probability`` rows; see :mod:`nasreid.visualize`);
    the dashed line is the uniform (undecided) level. ``None`` when no search has the file."""
    import pandas as pd

    plt = _pyplot()

    curves: list[tuple[str, np.ndarray, np.ndarray]] = []
    logk: list[float] = []
    for arm, dirs in runs.items():
        for d in dirs:
            f = Path(d) / "alphas.csv"
            if not f.is_file():
                continue
            try:
                ep, lk = entropy_per_epoch(f)
            except (KeyError, ValueError, pd.errors.ParserError):
                continue  # an unreadable log: the table above still reports the final entropies
            if ep.empty:
                continue
            curves.append((arm, ep.index.to_numpy() + 1, ep.to_numpy()))
            logk.append(lk)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colours = {a: f"C{i}" for i, a in enumerate(dict.fromkeys(a for a, _, _ in curves))}
    seen = set()
    for arm, x, y in curves:
        ax.plot(x, y, color=colours[arm], alpha=0.75, lw=1.4, label=None if arm in seen else arm)
        seen.add(arm)
    ax.axhline(float(np.mean(logk)), ls="--", color="grey", lw=1, label="uniform (log k)")
    ax.set_xlabel("search epoch")
    ax.set_ylabel("mean decision entropy (nats)")
    ax.set_ylim(bottom=0)
    ax.set_title("How fast each search decides (one line per search)", fontsize=9)
    return _save(fig, ax, path, legend_loc="lower left")


def _fmt_ci(b: BootstrapResult) -> str:
    return f"{b.mean_diff:+.2f} [{b.low:+.2f}, {b.high:+.2f}]"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Markdown table lines (a blank line after)."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


@dataclass
class _Report:
    """What the report's sections share: the study, its rows (:func:`collect_results`) and jobs."""

    study: StudyRecipe
    rows: list[dict]
    jobs: list[StudyJob]
    out_dir: Path

    def __post_init__(self):
        st = self.study
        self.cols = _eval_columns(st)
        self.test_cols = [c for c in self.cols if not c[0].startswith("val_")]
        self.arms = [a.name for a in st.search.arms] if st.search else []
        self.sources = self.arms + list(st.hand_designed)
        self.kinds = {**{a: st.arm(a).arm_kind for a in self.arms}, **{h: "hand" for h in st.hand_designed}}
        self.sel_col = f"{self.cols[-1][0]}_{st.selection.metric}" if st.selection is not None else None
        self.done = [r for r in self.rows if r["status"] == DONE]
        self.searches = [j for j in self.jobs if j.phase == "search" and j.state() == DONE]

    def _boot(self, a: Sequence[float], b: Sequence[float]) -> str:
        bs = self.study.bootstrap
        return _fmt_ci(paired_bootstrap(a, b, n_boot=bs.n_boot, seed=bs.seed, level=bs.level))

    def header(self) -> list[str]:
        st, jobs = self.study, self.jobs
        tgt = ", ".join(f"`{t.name}`" + (f" ({t.root})" if t.root else "") for t in st.evaluation.targets) or "none"
        val = (f" Validation domain of the selection rule: `{st.selection.validation.name}` ({st.selection.metric})."
               if st.selection else "")
        return [f"# Study `{st.name}`\n",
                f"Jobs finished: {sum(j.state() == DONE for j in jobs)} of {len(jobs)} "
                f"({sum(j.phase == 'search' for j in jobs)} searches, {sum(j.phase == 'train' for j in jobs)} "
                f"retrains). Splits ({st.split_key}): {st.splits}; search seeds: "
                f"{st.search.seeds if st.search else []}; retrain seeds: {st.retrain.seeds}.",
                f"Search recipe: `{_shown(st.search.recipe) if st.search else '-'}`; retrain recipe: "
                f"`{_shown(st.retrain.recipe)}`.",
                f"Evaluation: the training dataset's own test split of each split (same-domain) and {tgt} "
                f"(cross-domain).{val}",
                "All metrics in %; mean ± sample std over every finished retrain of the source (splits x search "
                "seeds x retrain seeds).\n"]

    def per_source(self) -> list[str]:
        L = ["## Results per genotype source\n"]
        body = []
        for s in self.sources:
            rs = [r for r in self.done if r["source"] == s]
            body.append([s, self.kinds[s], len(rs),
                         *(" / ".join(_ms(r[f"{pre}_{m}"] for r in rs) for m in METRICS) for pre, _, _ in self.cols),
                         _ms([r["params"] / 1e6 for r in rs], "{:.3f}"), _ms([r["macs"] / 1e6 for r in rs], "{:.1f}"),
                         _ms([r["search_seconds"] for r in rs], "{:.0f}")])
        L += _table(["source", "kind", "n", *(f"{t} R1 / mAP / mINP" for _, t, _ in self.cols), "params (M)",
                     "MACs (M)", "search s"], body)
        for pre, title, _ in self.cols:
            p = _plot(self.rows, self.sources, f"{pre}_mAP", f"{self.study.name}: mAP, {title}",
                      self.out_dir / "plots" / f"mAP_{pre}.png")
            if p is not None:
                L.append(f"![mAP {title}](plots/{p.name})")
        return L + [""]

    def selection(self) -> list[str]:
        st = self.study
        if not self.arms:
            return []
        L = ["## Selection rules: each seed as it comes vs best of k\n"]
        if self.sel_col is None:
            return L + ["No `selection` section: only \"each seed as it comes\" is reported.\n"]
        L.append(f"\"Each seed\": every search seed's retrain counts (mean ± std over all). \"Best of k\": per "
                 f"(split, retrain seed) the search seed whose retrain has the highest {st.selection.metric} on the "
                 f"validation domain `{st.selection.validation.name}` (not a test domain) is kept (OSNet-AIN, TPAMI "
                 f"2021, Sec. 4), then mean ± std over units. k = {len(st.search.seeds)}.\n")
        body = []
        for a in self.arms:
            rs = [r for r in self.done if r["source"] == a]
            body.append([a, "each seed", len(rs), *(_ms(r[f"{pre}_mAP"] for r in rs) for pre, _, _ in self.test_cols),
                         "all"])
            vals = [_unit_values(self.rows, a, f"{pre}_mAP", "best", self.sel_col) for pre, _, _ in self.test_cols]
            ch = _selected_seeds(self.rows, a, self.sel_col)
            body.append([a, "best of k", len(vals[0]), *(_ms(v.values()) for v in vals),
                         ", ".join(f"split {u[0]}/r{u[1]}: s{s}" for u, s in sorted(ch.items())) or "–"])
        L += _table(["arm", "rule", "n", *(f"{t} mAP" for _, t, _ in self.test_cols), "seeds chosen"], body)
        L.append(f"What the selection buys: best of k − each seed, paired over (split, retrain seed) units, mAP, "
                 f"{st.bootstrap.level:.0%} percentile bootstrap interval.\n")
        body = []
        for a in self.arms:
            cells = []
            for pre, _, _ in self.test_cols:
                vb = _unit_values(self.rows, a, f"{pre}_mAP", "best", self.sel_col)
                ve = _unit_values(self.rows, a, f"{pre}_mAP", "each", self.sel_col)
                units = sorted(set(vb) & set(ve))
                cells.append(self._boot([ve[u] for u in units], [vb[u] for u in units]) if units else "–")
            body.append([a, *cells])
        return L + _table(["arm", *(t for _, t, _ in self.test_cols)], body)

    def paired(self) -> list[str]:
        st, bs = self.study, self.study.bootstrap
        searched = [a for a in self.arms if self.kinds[a] == "searched"]
        randoms = [a for a in self.arms if self.kinds[a] == "random"]
        # a later searched arm against each earlier one (e.g. a changed search setting against the committed one)
        pairs = [(x, y) for i, x in enumerate(searched) for y in searched[:i]]
        pairs += [(x, y) for x in searched for y in randoms + list(st.hand_designed)]
        pairs += [(x, h) for x in randoms for h in st.hand_designed]
        hands = list(st.hand_designed)
        pairs += [(h, hands[0]) for h in hands[1:]]  # every hand design against the first listed (the reference)
        if not pairs:
            return []
        L = ["## Paired comparisons\n",
             f"Difference X − Y over the units (split, retrain seed) both have; a searched / random source enters per "
             f"unit as the mean over its search seeds (\"each seed\") or as the seed selected on the validation "
             f"domain (\"best of k\"). Interval: {bs.level:.0%} percentile bootstrap over units ({bs.n_boot} "
             f"resamples, Efron & Tibshirani 1993, Ch. 13); with a handful of units it is optimistic (narrow): an "
             f"interval that includes 0 means no evidence of a difference. Hand designs are also compared with the "
             f"first one listed (the reference), under one rule (they have no search seeds).\n"]
        rules = ["each"] + (["best"] if self.sel_col else [])
        for pre, title, _ in self.test_cols:
            L.append(f"### {title}\n")
            body = []
            for x, y in pairs:
                for rule in (rules if self.kinds[x] != "hand" else ["each"]):
                    cells, n = [], 0
                    for met in METRICS:
                        vx = _unit_values(self.rows, x, f"{pre}_{met}", rule, self.sel_col)
                        vy = _unit_values(self.rows, y, f"{pre}_{met}", rule, self.sel_col)
                        units = sorted(set(vx) & set(vy))
                        n = max(n, len(units))
                        cells.append(self._boot([vy[u] for u in units], [vx[u] for u in units]) if units else "–")
                    label = "–" if self.kinds[x] == "hand" else "each seed" if rule == "each" else "best of k"
                    body.append([f"{x} − {y}", label, n, *cells])
            L += _table(["X − Y", "rule", "n", "Δ rank-1 [CI]", "Δ mAP [CI]", "Δ mINP [CI]"], body)
        return L

    def decided(self) -> list[str]:
        if self.study.search is None:
            return []
        L = ["## How decided were the searches?\n",
             "Entropy of each decision's final architecture distribution (softmax of the architecture weights), in "
             "nats: 0 = one-hot, log k = uniform (undecided); mean ± std over the arm's searches (last column: each "
             "search's mean over its decisions, then mean ± std over searches). \"max p\": the probability of "
             "the chosen (argmax) candidate. The random baseline "
             "reports a one-hot distribution on its uniform draw by construction (entropy 0 says nothing).\n"]
        for a in self.arms:
            per: dict[str, list[float]] = {}
            logk: dict[str, float] = {}
            maxp: dict[str, list[float]] = {}
            run_means = []
            runs = [j for j in self.searches if j.arm == a]
            for j in runs:
                probs = (j.metrics().get("final_probabilities")
                         or _read_json(j.run_dir / "genotype.json").get("probabilities") or {})
                ent = decision_entropy(probs)
                for lab, (h, lk) in ent.items():
                    per.setdefault(lab, []).append(h)
                    logk[lab] = lk
                    maxp.setdefault(lab, []).append(max(float(v) for v in probs[lab].values()))
                if ent:
                    run_means.append(float(np.mean([h for h, _ in ent.values()])))
            if not per:
                continue
            labels = list(per)
            secs = _ms([j.metrics().get("search_seconds", float("nan")) for j in runs], "{:.0f}")
            L.append(f"**{a}** ({len(runs)} searches; search seconds {secs})\n")
            L += _table(["", *labels, "mean"], [
                ["entropy (nats)", *(_ms(per[lab], "{:.3f}") for lab in labels), _ms(run_means, "{:.3f}")],
                ["log k (uniform)", *(f"{logk[lab]:.3f}" for lab in labels), f"{np.mean(list(logk.values())):.3f}"],
                ["max p", *(_ms(maxp[lab], "{:.3f}") for lab in labels), ""]])
        p = _plot_entropy({a: [j.run_dir for j in self.searches if j.arm == a] for a in self.arms
                           if self.kinds[a] != "random"},
                          self.out_dir / "plots" / "decision_entropy.png")
        if p is not None:
            L.append(f"![decision entropy per epoch](plots/{p.name})\n")
        return L

    def agreement(self) -> list[str]:
        if self.study.search is None:
            return []
        L = ["## Do the derived genotypes of different seeds agree?\n",
             "Fraction of decisions on which two derived genotypes agree, over pairs of search seeds of the same split "
             "(mean ± std over pairs), and over all pairs of runs of the arm (any split). Chance level for "
             "independent uniform choices is 1/k.\n"]
        genos = []
        for j in self.searches:
            g = _read_json(j.run_dir / "genotype.json").get("choices")
            if isinstance(g, dict):
                genos.append((j, g))
        body = []
        for a in self.arms:
            gs = [(j, g) for j, g in genos if j.arm == a]
            same, anyp = [], []
            for i in range(len(gs)):
                for k in range(i + 1, len(gs)):
                    v = genotype_agreement(gs[i][1], gs[k][1])
                    anyp.append(v)
                    if gs[i][0].split == gs[k][0].split:
                        same.append(v)
            modal = []
            for lab in (gs[0][1] if gs else []):
                vals = [str(g.get(lab)) for _, g in gs]
                top = max(sorted(set(vals)), key=vals.count)
                modal.append(f"{lab}: {top} ({vals.count(top)}/{len(vals)})")
            body.append([a, _ms(same, "{:.2f}"), _ms(anyp, "{:.2f}"), "; ".join(modal) or "–"])
        L += _table(["arm", "same split", "any split", "per decision: most frequent choice (share)"], body)
        L.append("Derived genotypes:\n")
        for j, g in sorted(genos, key=lambda t: (t[0].arm, t[0].split, t[0].search_seed)):
            L.append(f"- `{j.id}`: {_genotype_str(g)}")
        return L + [""]

    def cost(self) -> list[str]:
        def devices(ms) -> str:
            return ", ".join(sorted({str(m["device"]) for m in ms if m.get("device")})) or "–"

        body = []
        for s in self.sources:
            sm = [j.metrics() for j in self.searches if j.arm == s]
            ss = [m.get("search_seconds", float("nan")) for m in sm]
            ts = [r["train_seconds"] for r in self.done if r["source"] == s]
            tm = [r for r in self.done if r["source"] == s]  # collect_results already read their metrics.json
            body.append([s, len(ss), len(ts), _ms(ss, "{:.1f}"), _ms(ts, "{:.1f}"),
                         f"{devices(sm) if sm else '–'} / {devices(tm)}"])
        tot_s = sum(_finite(j.metrics().get("search_seconds", float("nan")) for j in self.searches))
        body.append(["all", len(self.searches), len(self.done), f"{tot_s:.1f} in all",
                     f"{sum(_finite(r['train_seconds'] for r in self.done)):.1f} in all", ""])
        return ["## Cost\n", "Seconds of training (summed epoch times, evaluation excluded), mean ± std per run; "
                "seconds compare only between runs on the same device (last column).\n",
                *_table(["source", "searches", "retrains", "search s", "retrain s", "device (search / retrain)"],
                        body)]

    def points(self) -> list[str]:
        def cell(r, pre):
            return " / ".join("–" if not math.isfinite(r[f"{pre}_{m}"]) else f"{r[f'{pre}_{m}']:.2f}" for m in METRICS)

        def num(x, fmt="{:.3f}"):
            return "–" if not math.isfinite(x) else fmt.format(x)

        body = [[r["source"], r["split"], r["search_seed"], r["retrain_seed"], *(cell(r, pre) for pre, _, _ in self.cols),
                 f"{num(r['train_triplet'])} / {num(r['train_acc'], '{:.2f}')}", r["genotype"]] for r in self.done]
        L = ["## All points\n",
             "\"train triplet / acc\": the retrain's training loss terms at its last epoch (the triplet margin is "
             "the recipe's `loss.triplet_margin`; a value at about the margin means the training features do not "
             "separate the identities by the margin).\n"]
        pts = {s: [(r["train_triplet"], r["same_mAP"]) for r in self.done if r["source"] == s
                   and math.isfinite(r["train_triplet"]) and math.isfinite(r["same_mAP"])] for s in self.sources}
        tm = [xy for v in pts.values() for xy in v]
        if len(tm) >= 3 and len({x for x, _ in tm}) > 1 and len({y for _, y in tm}) > 1:
            from scipy.stats import spearmanr

            rho, pv = spearmanr([x for x, _ in tm], [y for _, y in tm])
            L.append(f"Spearman rank correlation between the last-epoch training triplet and same-domain mAP over "
                     f"{len(tm)} retrains: ρ = {rho:+.2f} (p = {pv:.1g}).\n")
        p = _plot_triplet(pts, _triplet_margin(self.study), self.out_dir / "plots" / "mAP_vs_train_triplet.png")
        if p is not None:
            L.append(f"![mAP vs training triplet](plots/{p.name})\n")
        return L + [
                *_table(["source", "split", "search seed", "retrain seed",
                         *(f"{t} R1 / mAP / mINP" for _, t, _ in self.cols), "train triplet / acc", "genotype"], body),
                "Per-job rows with parameters, MACs, search seconds and entropies: `study_results.csv`.\n"]


def build_report(recipe_or_dir: Union[StudyRecipe, str, os.PathLike], out: Optional[Union[str, os.PathLike]] = None
                 ) -> Path:
    """Write ``study_report.md``, ``study_results.csv`` (:func:`collect_results`) and ``plots/*.png`` of a
    study, from whatever jobs have finished.

    Report sections: jobs finished; per source mean ± std (sample std) of rank-1 / mAP / mINP on every
    evaluation, params and multiply-adds; both selection rules (each seed as it comes vs best of k by
    validation-domain metric, OSNet-AIN TPAMI 2021 Sec. 4) with the seeds chosen and what the selection buys;
    paired comparisons (a later searched arm vs each earlier one, searched vs random vs each hand design, every
    hand design vs the first listed; units = (split, retrain seed), differences
    "X − Y" with a percentile bootstrap interval, :func:`paired_bootstrap`); how decided each search was
    (entropy of the final probabilities per decision in nats, against its maximum ``log k``); agreement of the
    derived genotypes between search seeds; search and retrain cost in seconds; and all points, with the
    Spearman correlation of the retrain's last-epoch training triplet and same-domain mAP. Plots: per source,
    every point and mean ± std of mAP for each evaluation (``plots/mAP_<prefix>.png``), the decision entropy
    per search epoch (``plots/decision_entropy.png``) and same-domain mAP against the training triplet
    (``plots/mAP_vs_train_triplet.png``).

    Args:
        recipe_or_dir: a :class:`StudyRecipe`, a study YAML file or a study folder.
        out: output folder (default: the study folder).

    Returns:
        The path of ``study_report.md``.

    Raises:
        RecipeError / RunFolderError: see :func:`enumerate_jobs`.
    """
    study = _as_study(recipe_or_dir)
    out_dir = Path(out) if out is not None else study.study_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect_results(study)
    with open(out_dir / "study_results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["source"])
        w.writeheader()
        w.writerows(rows)
    rep = _Report(study, rows, enumerate_jobs(study), out_dir)
    lines = [*rep.header(), *rep.per_source(), *rep.selection(), *rep.paired(), *rep.decided(), *rep.agreement(),
             *rep.cost(), *rep.points()]
    path = out_dir / "study_report.md"
    path.write_text("\n".join(lines))
    return path
