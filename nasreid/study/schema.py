"""Study recipe schema: the pydantic models of a study YAML (:class:`StudyRecipe` and its sections),
:func:`load_study` with its up-front checks of every job's effective recipe, and the dotted overrides that each
search / retrain job applies to its recipe (shared by those checks and the job graph)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from nasreid.config import DatasetRef, RecipeError, _format_errors, _Strict, load_recipe
from nasreid.errors import NasreidError

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


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
    report's "how decided" and agreement sections still cover it). The search seed goes to the recipe's ``seed`` and,
    when the strategy's own config has a ``seed`` field (``random``), to ``strategy.kwargs.seed`` too."""

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
    def arm_kind(self) -> Literal["searched", "random"]:
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


class StudyEvalVariant(_Strict):
    """An extra evaluation of every run of a retrain arm (and of its zero-shot init): ``set`` holds evaluation
    keys only (``eval.*``, e.g. ``{eval.postprocessors: [{name: rerank}]}`` for k-reciprocal re-ranking), passed
    as ``nasreid evaluate RUN --set key=value`` (:func:`~nasreid.evaluation.runner.run_evaluate`, which tags the
    result keys with them, e.g. ``"cuhk03np (same-domain) [eval.postprocessors=[{'name': 'rerank'}]]"``). The
    report shows it as the source ``<arm>+<name>``."""

    name: str
    set: dict[str, Any] = Field(min_length=1, description="evaluation keys (eval.*) of this evaluation")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"an evaluation name may hold letters, digits, '_', '-' and '.' only, got {v!r}")
        return v

    @field_validator("set")
    @classmethod
    def _eval_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if not k.startswith("eval.")]
        if bad:
            raise ValueError(f"an evaluation variant sets evaluation keys (eval.*) only, got {', '.join(bad)} (a "
                             "training key belongs in the retrain arm's set)")
        return v


class StudyRetrainArm(_Strict):
    """One training method / recipe of a methods study: every hand design and fixed genotype (or the ones named in
    ``genotypes``) is trained by it with every retrain seed on every split, in ``train/<arm>/<genotype>/
    split<K>_seed<R>``. ``recipe``: its run recipe (relative to the study recipe; default ``retrain.recipe``);
    ``set``: dotted overrides applied after ``retrain.set``; ``evaluations``: extra evaluations of its runs
    (:class:`StudyEvalVariant`, e.g. with and without re-ranking)."""

    name: str
    recipe: Optional[str] = Field(None, description="run recipe of this arm (default: retrain.recipe), relative to "
                                  "the study recipe")
    set: dict[str, Any] = Field(default_factory=dict)
    genotypes: Optional[list[str]] = Field(None, description="hand_designed presets / genotypes names this arm "
                                           "trains (default: all)")
    evaluations: list[StudyEvalVariant] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v) or "+" in v:
            raise ValueError(f"a retrain arm name may hold letters, digits, '_', '-' and '.' only, got {v!r}")
        return v

    @model_validator(mode="after")
    def _unique(self):
        _check_unique([e.name for e in self.evaluations], "evaluations names")
        if self.genotypes is not None:
            _check_unique(self.genotypes, "genotypes")
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


class StudyRanking(_Strict):
    """The ranking study (does a supernet's score predict stand-alone accuracy?): the supernets of the search arms
    named in ``supernets`` (trained on the training identities minus ``data.val_ids``) score candidates with
    inherited weights (``nasreid rank``, :mod:`nasreid.ranking`). First the supernet ``select_by`` scores a ``pool``
    of uniformly drawn candidates (``pool_seed``) with ``bn_batches`` BN recalibration; ``select`` of them, spread
    evenly over the range of its ``score`` (ranks 0, ..., pool - 1 at even steps), plus the study's
    ``hand_designed`` presets, are then fixed (``ranking/split<K>/selected.json``, written once, before any
    stand-alone run) and every supernet scores them with and without recalibration; each is fine-tuned stand-alone
    with the retrain recipe and seeds, and the report gives Kendall tau / Spearman rho between each score and the
    stand-alone test mAP (:mod:`nasreid.study.ranking`)."""

    supernets: list[str] = Field(min_length=1, description="search arms whose supernets score the candidates")
    select_by: Optional[str] = Field(None, description="the supernet whose pool scores spread the selection "
                                     "(default: the first of supernets)")
    pool: int = Field(100, ge=2, description="candidates drawn uniformly and scored by select_by")
    pool_seed: int = 0
    select: int = Field(17, ge=2, description="candidates fixed from the pool, spread over its score range")
    score: Literal["val_mAP", "val_rank1"] = "val_mAP"
    bn_batches: int = Field(10, ge=1, description="training batches of BN recalibration (the scores are also taken "
                            "without it)")

    @model_validator(mode="after")
    def _check(self):
        _check_unique(self.supernets, "ranking.supernets")
        if self.select_by is not None and self.select_by not in self.supernets:
            raise ValueError(f"ranking.select_by {self.select_by!r} is not one of ranking.supernets {self.supernets}")
        if self.select > self.pool:
            raise ValueError(f"ranking.select ({self.select}) exceeds ranking.pool ({self.pool})")
        return self

    @property
    def selector(self) -> str:
        """The supernet whose pool scores spread the selection."""
        return self.select_by or self.supernets[0]


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
    genotypes: dict[str, str] = Field(default_factory=dict, description="fixed genotype files (genotype.json, "
                                      "relative to the study recipe) retrained like hand designs; needs "
                                      "retrain_arms")
    retrain: StudyRetrain
    retrain_arms: list[StudyRetrainArm] = Field(default_factory=list, description="a methods study: training "
                                                "methods / recipes compared on the same genotypes")
    zero_shot: bool = Field(False, description="with retrain_arms: evaluate each arm's init (model.pretrained) "
                            "without training, per genotype and split (nasreid evaluate --weights)")
    splits: list[int] = Field(default_factory=lambda: [0], min_length=1)
    split_key: Optional[str] = Field("data.dataset.kwargs.split_seed",
                                     description="dotted recipe key that receives each split (search and retrain); "
                                     "null: the dataset has one fixed split (one split only, e.g. CUHK03)")
    evaluation: StudyEvaluation = Field(default_factory=StudyEvaluation)
    selection: Optional[StudySelection] = None
    ranking: Optional[StudyRanking] = None
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
        if not arms and not self.hand_designed and not self.genotypes:
            raise ValueError("a study needs search arms, hand_designed presets or genotypes")
        if self.split_key is None and len(self.splits) > 1:
            raise ValueError(f"split_key: null (one fixed split) allows one split, got splits {self.splits}")
        for g in self.genotypes:
            if not _NAME.match(g):
                raise ValueError(f"genotypes: a name may hold letters, digits, '_', '-' and '.' only, got {g!r}")
        clash = sorted(set(self.genotypes) & (set(self.hand_designed) | set(arms)))
        if clash:
            raise ValueError(f"genotypes: names shared with hand_designed presets or search arms: {', '.join(clash)}")
        if self.genotypes and not self.retrain_arms:
            raise ValueError("genotypes: fixed genotype files are retrained by retrain_arms (give at least one)")
        if self.zero_shot and not self.retrain_arms:
            raise ValueError("zero_shot: needs retrain_arms (the init of each arm is evaluated)")
        if self.retrain_arms:
            _check_unique([a.name for a in self.retrain_arms], "retrain_arms names")
            for key in ("search", "selection", "ranking"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: a methods study (retrain_arms) compares training methods on fixed "
                                     "genotypes (hand_designed, genotypes); it has no search, selection or ranking")
            names = [*self.hand_designed, *self.genotypes]
            for i, a in enumerate(self.retrain_arms):
                unknown = [g for g in a.genotypes or [] if g not in names]
                if unknown:
                    raise ValueError(f"retrain_arms.{i}.genotypes: {', '.join(unknown)} is neither a hand_designed "
                                     f"preset nor a genotypes name ({names})")
        if self.ranking is not None:
            unknown = [n for n in self.ranking.supernets if n not in arms]
            if unknown:
                raise ValueError(f"ranking.supernets names no search arm: {', '.join(unknown)} (arms: {arms})")
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

    def arm_genotypes(self, arm: StudyRetrainArm) -> list[str]:
        """The genotype names (presets, then genotype files) that retrain arm ``arm`` trains, in recipe order."""
        names = [*self.hand_designed, *self.genotypes]
        return [g for g in names if arm.genotypes is None or g in arm.genotypes]

    def genotype_arg(self, name: str) -> str:
        """``--genotype`` of a methods study's genotype ``name``: ``preset:NAME`` or the genotype file."""
        return self.genotypes[name] if name in self.genotypes else f"preset:{name}"

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
    and the selection's validation domain must be neither the training dataset nor a final test target. A methods
    study (``retrain_arms``) has each arm's effective recipe checked, its genotypes found in its space (presets;
    ``genotypes`` files of that space), each extra evaluation checked on it, and with ``zero_shot`` a
    ``model.pretrained`` file named (``retrain_arms.<i>``).

    Args:
        path: the study YAML file, or a study folder (its ``study.yaml``, written by :func:`run_study`).
        overrides: dotted-key overrides applied before validation, e.g. ``{"output_root": "/tmp/x"}``.

    Returns:
        The :class:`StudyRecipe` with absolute recipe paths and ``source`` set.

    Raises:
        RecipeError: missing file, YAML error, unknown/missing key, wrong type, a recipe file not found, or a
            failed check; the message names the study file and the dotted key (or the recipe file and key).
    """
    from nasreid.config import _set_dotted, read_yaml_mapping

    p = Path(path)
    if p.is_dir() and (p / "study.yaml").is_file():
        p = p / "study.yaml"
    if p.is_dir():
        raise RecipeError(f"{p} is a folder without study.yaml (the resolved recipe a study run writes there; it is "
                          f"not committed with results): pass the study recipe instead, with --set output_root=<the "
                          f"folder's parent>")
    raw = read_yaml_mapping(p, "study recipe")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        study = StudyRecipe.model_validate({**raw, "source": str(p)})
    except ValidationError as e:
        raise RecipeError(_format_errors(str(p), e)) from None
    base = p.parent
    study.output_root = str(Path(os.path.expanduser(study.output_root)).resolve())  # a copy works from anywhere
    study.retrain.recipe = _resolve_path(base, study.retrain.recipe, f"{p}: retrain.recipe")
    for i, rarm in enumerate(study.retrain_arms):
        if rarm.recipe is not None:
            rarm.recipe = _resolve_path(base, rarm.recipe, f"{p}: retrain_arms.{i}.recipe")
    for name, gfile in study.genotypes.items():
        study.genotypes[name] = _resolve_path(base, gfile, f"{p}: genotypes.{name}")
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
    if study.retrain_arms:
        _check_methods(study, src)
        return
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
        split_kw = (study.split_key.split(".")[-1]
                    if study.split_key and study.split_key.startswith("data.dataset.kwargs.") else None)
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
        if study.ranking is not None and arm.name in study.ranking.supernets:
            if rec.data.val_ids is None:
                raise RecipeError(f"{where}: ranking.supernets: arm {arm.name!r} searches without data.val_ids; its "
                                  "supernet scores candidates on validation identities (set data.val_ids in "
                                  "search.set)")
            if rec.data.val_ids != retrain.data.val_ids:
                raise RecipeError(f"{src}: ranking: the retrain holds out data.val_ids={retrain.data.val_ids!r}, the "
                                  f"supernet of arm {arm.name!r} {rec.data.val_ids!r}; stand-alone runs must train "
                                  "on the identities the supernet trained on (set the same data.val_ids in "
                                  "retrain.set)")


def _check_methods(study: StudyRecipe, src: str) -> None:
    """The checks of a methods study (``retrain_arms``): each arm's effective recipe (:func:`check_recipe`), its
    genotypes in its space (a preset of the space, a genotype file of the space), its evaluation variants on its
    recipe, and with ``zero_shot`` a ``model.pretrained`` file to evaluate."""
    from nasreid.config import apply_overrides
    from nasreid.engine.validate import check_recipe
    from nasreid.genotype import Genotype, preset_genotype

    for i, arm in enumerate(study.retrain_arms):
        where = f"{src}: retrain_arms.{i}"
        rec = _load_with(arm.recipe or study.retrain.recipe,
                         _arm_sets(study, arm, study.splits[0], study.retrain.seeds[0]), where)
        _checked(check_recipe, rec, where=where)
        for name in study.arm_genotypes(arm):
            try:
                if name in study.genotypes:
                    g = Genotype.load(study.genotypes[name])
                    if g.space != rec.space.name:
                        raise RecipeError(f"genotypes.{name}: {study.genotypes[name]} is a genotype of space "
                                          f"{g.space!r}, the arm trains space {rec.space.name!r}")
                else:
                    preset_genotype(rec.space.name, name)
            except NasreidError as e:
                raise RecipeError(f"{where}: {e}") from None
        for k, ev in enumerate(arm.evaluations):
            evrec = _checked(apply_overrides, rec, dict(ev.set), where=f"{where}.evaluations.{k}.set")
            _checked(check_recipe, evrec, where=f"{where}.evaluations.{k}")
        if study.zero_shot and not rec.model.pretrained:
            raise RecipeError(f"{where}: zero_shot: the arm's recipe has no model.pretrained (the init that the "
                              "zero-shot row evaluates); set it or switch zero_shot off")


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


def _search_sets(study: StudyRecipe, arm: StudyArm, seed: int, split: int) -> list[tuple[str, Any]]:
    """Dotted overrides of one search job, in the order they are applied."""
    from nasreid.registry import STRATEGIES

    assert study.search is not None  # search jobs come from the search section
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
    if study.split_key is not None:
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
    if study.split_key is not None:
        sets.append((study.split_key, split))
    return sets


def _arm_sets(study: StudyRecipe, arm: StudyRetrainArm, split: int, seed: int) -> list[tuple[str, Any]]:
    """Dotted overrides of one train job of retrain arm ``arm``: ``retrain.set``, the arm's ``set``, then the
    evaluation targets, the seed and the split."""
    sets: list[tuple[str, Any]] = list(study.retrain.set.items()) + list(arm.set.items())
    sets.append(("eval.targets", [t.model_dump(mode="json") for t in _eval_targets(study)]))
    sets.append(("seed", seed))
    if study.split_key is not None:
        sets.append((study.split_key, split))
    return sets
