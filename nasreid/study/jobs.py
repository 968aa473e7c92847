"""The study's job graph: :class:`StudyJob` (one ``nasreid search`` / ``train`` / ``evaluate`` command in its
own run folder, with its state and its fresh or resumed command line), :func:`enumerate_jobs` (every job, phase by
phase) and :func:`find_evaluation` (one dataset's result in a run's ``metrics.json``); the commands for an external
scheduler: :func:`nasreid.study.runner.print_commands`."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml

from nasreid.config import DatasetRef
from nasreid.errors import RunFolderError

from .schema import StudyRecipe, _arm_sets, _eval_targets, _retrain_sets, _search_sets, load_study

NEW, PARTIAL, EVALUATE, DONE = "new", "partial", "evaluate", "done"
#: the phases of a study in the order they run (``pool`` and ``score``: a ranking study's ``nasreid rank`` jobs;
#: ``zero_shot``: a methods study's evaluations of the init, ``nasreid evaluate --weights``)
PHASES = ("search", "pool", "score", "zero_shot", "train")


def _yaml_value(v: Any) -> str:
    """A value as the CLI's ``--set key=value`` reads it back (``yaml.safe_load``), on one line."""
    s = yaml.safe_dump(v, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    if s.endswith("\n..."):
        s = s[: -len("\n...")].strip()
    elif s.endswith("..."):
        s = s[:-3].strip()
    return s


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
                and k.split("[")[0].split(" ")[0] == ref.name
                and dict(r.get("dataset_kwargs") or {}) == dict(ref.kwargs)):
            return dict(r)
    return None


def evaluation_tag(sets: Mapping[str, Any]) -> str:
    """The suffix :func:`~nasreid.evaluation.runner.run_evaluate` gives the result keys of ``nasreid evaluate RUN
    --set k=v ...`` (``" [k=v, ...]"``, each value as the CLI parses it back)."""
    return " [" + ", ".join(f"{k}={yaml.safe_load(_yaml_value(v))}" for k, v in sets.items()) + "]"


def find_tagged_evaluation(evaluation: Mapping[str, Mapping[str, Any]], ref: Optional[DatasetRef],
                           tag: str) -> Optional[dict]:
    """Like :func:`find_evaluation` for the results of one ``nasreid evaluate RUN --set ...`` (keys ending in
    ``tag``, :func:`evaluation_tag`); ``tag=""`` is :func:`find_evaluation`."""
    if not tag:
        return find_evaluation(evaluation, ref)
    stripped = {k[: -len(tag)]: v for k, v in evaluation.items() if k.endswith(tag)}
    return find_evaluation(stripped, ref)


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

    A ranking study (:class:`~nasreid.study.schema.StudyRanking`) adds ``nasreid rank`` jobs between them: phase
    ``pool`` (the selecting supernet scores a uniform pool) and phase ``score`` (every supernet scores the fixed
    selection, with and without BN recalibration), and train jobs of kind ``ranked`` for the selected genotypes.

    A methods study (:class:`~nasreid.study.schema.StudyRetrainArm`) has train jobs of kind ``hand`` (a preset) or
    ``fixed`` (a genotype file) per retrain arm in ``train/<arm>/<genotype>/split<K>_seed<R>``, each with the
    arm's extra evaluations (``variants``), and phase ``zero_shot`` jobs (kind ``zero_shot``): ``nasreid evaluate
    --weights`` of an arm's init in ``zero_shot/<genotype>/<label>_split<K>`` (one job per distinct command;
    ``owners`` lists the ``<arm>`` / ``<arm>+<evaluation>`` labels whose init it is).

    Attributes:
        phase: ``"search"``, ``"pool"``, ``"score"``, ``"zero_shot"`` or ``"train"`` (the phases run in that
            order).
        arm: the genotype source: a search arm's name, a preset name, or a ranked genotype's name (``r007``: place
            7 of the pool by the selecting supernet's score); a rank job's supernet arm.
        kind: ``"searched"``, ``"random"``, ``"hand"``, ``"ranked"``, ``"fixed"`` or ``"zero_shot"``.
        split: the value of the study's ``split_key`` (CUHK01's ``split_seed``).
        search_seed: the search seed (``None`` for a hand design).
        retrain_seed: the retrain seed (``None`` for a search job).
        run_dir: the run folder (absolute).
        recipe: the search or retrain recipe file (absolute).
        sets: ``(dotted key, value)`` overrides of a fresh run (``--set key=value``, in order).
        genotype: a train job's ``--genotype``: ``<search run>/genotype.json`` or ``preset:NAME``.
        search_run: the search run folder a train job depends on (``None`` for a hand design).
        targets: the cross-domain evaluations a finished train job must hold (same-domain is always expected).
        rank_args: a rank job's selection and settings (``--sample N --seed S`` or ``--genotypes FILE``, then
            ``--bn-batches K``), after ``nasreid rank <search_run>``.
        retrain_arm: a methods study's retrain arm of a train job (``None`` otherwise).
        variants: a train job's extra evaluations ``(name, eval sets)`` (``nasreid evaluate RUN --set ...``).
        weights_args: a zero-shot job's arguments after ``nasreid evaluate`` (``--weights ... --target ...``).
        owners: a zero-shot job's ``<arm>`` / ``<arm>+<evaluation>`` labels.
    """

    phase: Literal["search", "pool", "score", "zero_shot", "train"]
    arm: str
    kind: Literal["searched", "random", "hand", "ranked", "fixed", "zero_shot"]
    split: int
    search_seed: Optional[int]
    retrain_seed: Optional[int]
    run_dir: Path
    recipe: Path
    sets: list[tuple[str, Any]] = field(default_factory=list)
    genotype: Optional[str] = None
    search_run: Optional[Path] = None
    targets: list[DatasetRef] = field(default_factory=list)
    rank_args: list[str] = field(default_factory=list)
    retrain_arm: Optional[str] = None
    variants: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    weights_args: list[str] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        """The run folder relative to the study folder, e.g. ``search/gumbel/split0_seed1`` (a methods study's
        train job: ``train/<arm>/<genotype>/split<K>_seed<R>``)."""
        return "/".join(self.run_dir.parts[-4:] if self.retrain_arm is not None else self.run_dir.parts[-3:])

    def metrics(self) -> dict:
        """The run's ``metrics.json`` (``{}`` when absent or unreadable)."""
        return _read_json(self.run_dir / "metrics.json")

    def missing_targets(self) -> list[Optional[DatasetRef]]:
        """Evaluations a train job's ``metrics.json`` lacks (``None`` stands for the same-domain split)."""
        ev = self.metrics().get("evaluation") or {}
        return [t for t in [None, *self.targets] if find_evaluation(ev, t) is None]

    def missing_variants(self) -> list[tuple[str, dict[str, Any], list[Optional[DatasetRef]]]]:
        """The extra evaluations a train job's ``metrics.json`` lacks: ``(name, eval sets, missing datasets)``."""
        ev = self.metrics().get("evaluation") or {}
        out = []
        for name, sets in self.variants:
            tag = evaluation_tag(sets)
            miss = [t for t in [None, *self.targets] if find_tagged_evaluation(ev, t, tag) is None]
            if miss:
                out.append((name, sets, miss))
        return out

    def state(self) -> str:
        """``"done"``; ``"partial"`` (started: the run folder holds ``recipe.yaml``, resumed with ``--resume``);
        ``"evaluate"`` (a train job trained and evaluated, but some expected evaluation is missing: a
        ``nasreid evaluate`` adds it); ``"new"``. A search is done when its ``metrics.json`` says
        ``search_done`` and ``genotype.json`` exists; a retrain when its ``metrics.json`` holds ``evaluation``
        with every expected dataset."""
        if self.phase in ("pool", "score"):  # rank.md is written once every candidate is scored
            if (self.run_dir / "rank.md").is_file():
                return DONE
            return PARTIAL if (self.run_dir / "rank.csv").is_file() else NEW
        m = self.metrics()
        if self.phase == "zero_shot":  # one evaluation command: rerun whole when anything is missing
            ev = m.get("evaluation") or {}
            ok = m.get("kind") == "zero_shot" and all(find_evaluation(ev, t) is not None for t in self.targets)
            return DONE if ok else NEW
        if self.phase == "search":
            if m.get("search_done") and (self.run_dir / "genotype.json").is_file():
                return DONE
        elif m.get("evaluation"):
            return DONE if not self.missing_targets() and not self.missing_variants() else EVALUATE
        return PARTIAL if (self.run_dir / "recipe.yaml").is_file() else NEW

    def ready(self) -> bool:
        """Whether the job can start: a retrain of a searched genotype and a rank job need the search's
        ``genotype.json`` (a finished search), a score job the fixed selection, a ranked retrain its genotype."""
        if self.search_run is not None and not (self.search_run / "genotype.json").is_file():
            return False
        if self.phase == "score":
            return Path(self.rank_args[self.rank_args.index("--genotypes") + 1]).is_file()
        if self.kind == "ranked":
            return Path(str(self.genotype)).is_file()
        return True

    def command(self, state: Optional[str] = None) -> list[str]:
        """The command line of this job in ``state`` (default: its current :meth:`state`): a fresh run
        (``--out``), a resumed one (``--resume RUN``), or ``nasreid evaluate`` for missing evaluations. A
        done job gets its fresh command (what it ran)."""
        state = state or self.state()
        py = [sys.executable, "-m", "nasreid"]
        if self.phase in ("pool", "score"):  # the same command resumes (rows already in rank.csv are skipped)
            return [*py, "rank", str(self.search_run), *self.rank_args, "--out", str(self.run_dir)]
        if self.phase == "zero_shot":
            return [*py, "evaluate", *self.weights_args, "--out", str(self.run_dir)]
        if self.phase == "search":
            if state == PARTIAL:
                return [*py, "search", "--resume", str(self.run_dir), "--no-retrain"]
            cmd = [*py, "search", str(self.recipe), "--out", str(self.run_dir), "--no-retrain"]
        else:
            if state == EVALUATE:  # a missing target, else a missing extra evaluation (variant)
                missing = self.missing_targets()
                sets: Mapping[str, Any] = {}
                if not missing:
                    _, sets, missing = self.missing_variants()[0]
                cmd = [*py, "evaluate", str(self.run_dir)]
                for k, v in sets.items():
                    cmd += ["--set", f"{k}={_yaml_value(v)}"]
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
        with the hand designs before the later search seeds). A methods study (``retrain_arms``): its zero-shot
        jobs, then ``len(retrain_arms) x genotypes x retrain seeds x splits`` train jobs (each arm its own
        genotypes), ordered by split, retrain seed, genotype and arm (:func:`_methods_jobs`).

    Raises:
        RecipeError: an invalid study recipe; RunFolderError: a folder without ``study.yaml``.
    """
    study = _as_study(recipe)
    root = study.study_dir
    targets = _eval_targets(study)
    if study.retrain_arms:
        return _methods_jobs(study)
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
    if study.ranking is not None:
        jobs += _rank_jobs(study, searches)
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
    if study.ranking is not None:
        jobs += _ranked_train_jobs(study, targets)
    # retrains in the order that completes paired units first: split by split, retrain seed by retrain seed, and
    # within them every source's first search seed (with the hand designs) before the next search seeds
    n_search = sum(1 for j in jobs if j.phase != "train")
    order = {a.name: i for i, a in enumerate(study.search.arms)} if study.search is not None else {}
    seeds = list(study.search.seeds) if study.search is not None else []
    hands = {name: i for i, name in enumerate(study.hand_designed)}

    def key(j: StudyJob):
        k = seeds.index(j.search_seed) if j.search_seed is not None else 0
        src = (order[j.arm] if j.kind in ("searched", "random") else
               len(order) + hands[j.arm] if j.kind == "hand" else len(order) + len(hands) + int(j.arm[1:]))
        return (study.splits.index(j.split), j.retrain_seed, k, src)

    return jobs[:n_search] + sorted(jobs[n_search:], key=key)


def _methods_jobs(study: StudyRecipe) -> list[StudyJob]:
    """The jobs of a methods study (``retrain_arms``): the zero-shot evaluations (one per distinct ``nasreid evaluate
    --weights`` command, when ``zero_shot``), then per split and retrain seed every (arm, genotype) train job."""
    from nasreid.config import load_recipe

    root, targets = study.study_dir, _eval_targets(study)
    trains: list[StudyJob] = []
    zero: dict[str, StudyJob] = {}
    for arm in study.retrain_arms:
        recipe = Path(arm.recipe or study.retrain.recipe)
        variants = [(e.name, dict(e.set)) for e in arm.evaluations]
        for g in study.arm_genotypes(arm):
            kind: Literal["hand", "fixed"] = "fixed" if g in study.genotypes else "hand"
            for split in study.splits:
                for r in study.retrain.seeds:
                    trains.append(StudyJob(
                        phase="train", arm=g, kind=kind, split=split, search_seed=None, retrain_seed=r,
                        run_dir=root / "train" / arm.name / g / f"split{split}_seed{r}", recipe=recipe,
                        sets=_arm_sets(study, arm, split, r), genotype=study.genotype_arg(g), targets=targets,
                        retrain_arm=arm.name, variants=variants))
        if not study.zero_shot:
            continue
        for split in study.splits:
            rec = load_recipe(recipe, dict(_arm_sets(study, arm, split, study.retrain.seeds[0])))
            for vname, vsets in [("", {}), *variants]:
                label = f"{arm.name}+{vname}" if vname else arm.name
                for g in study.arm_genotypes(arm):
                    args, refs = _zero_shot_args(study, rec, g, vsets, targets)
                    key = json.dumps([args, split])
                    if key not in zero:
                        zero[key] = StudyJob(
                            phase="zero_shot", arm=g, kind="zero_shot", split=split, search_seed=None,
                            retrain_seed=None, run_dir=root / "zero_shot" / g / f"{label}_split{split}",
                            recipe=recipe, genotype=study.genotype_arg(g), targets=refs, weights_args=args)
                    zero[key].owners.append(label)
    order = {a.name: i for i, a in enumerate(study.retrain_arms)}
    names = [*study.hand_designed, *study.genotypes]
    trains.sort(key=lambda j: (study.splits.index(j.split), j.retrain_seed, names.index(j.arm),
                               order[str(j.retrain_arm)]))
    return [*zero.values(), *trains]


def _zero_shot_args(study: StudyRecipe, rec, g: str, vsets: Mapping[str, Any],
                    targets: list[DatasetRef]) -> tuple[list[str], list[DatasetRef]]:
    """The ``nasreid evaluate --weights`` arguments that evaluate the init of a run of recipe ``rec`` (its
    ``model`` section but the preset: the same file loaded the same way; its input size, width, device and
    evaluation settings, with the evaluation variant ``vsets`` but any ``eval.matcher``: a matcher trained with the
    network, such as QAConv's, has no zero-shot form) on the run's training dataset (its test split, as a
    target) and on every study target; and the datasets its ``metrics.json`` must hold."""
    model = rec.model.model_dump(mode="json", exclude={"preset", "genotype"})
    src = DatasetRef(name=rec.data.dataset.name, root=rec.data.dataset.root, kwargs=dict(rec.data.dataset.kwargs))
    refs = [src, *(t for t in targets if not (t.name == src.name and t.root == src.root
                                            and dict(t.kwargs) == dict(src.kwargs)))]
    sets: list[tuple[str, Any]] = [
        ("space.kwargs", dict(rec.space.kwargs)), ("model", model), ("device", rec.device),
        ("data.height", rec.data.height), ("data.width", rec.data.width),
        *([("data.workers", rec.data.workers)] if rec.data.workers is not None else []),
        ("eval.metric", rec.eval.metric), ("eval.flip", rec.eval.flip), ("eval.batch_size", rec.eval.batch_size),
        ("eval.postprocessors", [p.model_dump(mode="json") for p in rec.eval.postprocessors])]
    sets += [(k, v) for k, v in vsets.items() if not k.startswith("eval.matcher")]
    args = ["--weights", str(rec.model.pretrained), "--genotype", study.genotype_arg(g), "--space", rec.space.name]
    for k, v in sets:
        args += ["--set", f"{k}={_yaml_value(v)}"]
    for t in refs:
        args += ["--target", _target_spec(t)]
    return args, refs


def ranking_dir(study: StudyRecipe, split: int) -> Path:
    """``<study>/ranking/split<K>``: the pool and score outputs, ``selected.json`` and the ranked genotypes."""
    return study.study_dir / "ranking" / f"split{split}"


#: the file that fixes a split's selection (written once by :func:`nasreid.study.ranking.select_genotypes`)
SELECTED_FILE = "selected.json"
#: the ``nasreid rank --genotypes`` list of a split's selection (the ranked genotypes and the hand designs)
CANDIDATES_FILE = "candidates.json"


def _rank_jobs(study: StudyRecipe, searches: list[StudyJob]) -> list[StudyJob]:
    """The ``nasreid rank`` jobs of a ranking study: per split, the selecting supernet's pool (phase ``pool``) and
    every supernet's scores of the selection with ``bn_batches`` and without recalibration (phase ``score``). The
    supernet of an arm is its first search seed's run."""
    rk = study.ranking
    assert rk is not None and study.search is not None
    first = study.search.seeds[0]
    out: list[StudyJob] = []
    for split in study.splits:
        d = ranking_dir(study, split)
        run = {sj.arm: sj for sj in searches if sj.split == split and sj.search_seed == first}
        sel = run[rk.selector]
        out.append(StudyJob(phase="pool", arm=rk.selector, kind=sel.kind, split=split, search_seed=first,
                            retrain_seed=None, run_dir=d / "pool", recipe=sel.recipe, search_run=sel.run_dir,
                            rank_args=["--sample", str(rk.pool), "--seed", str(rk.pool_seed),
                                       "--bn-batches", str(rk.bn_batches)]))
        for arm in rk.supernets:
            for k in (rk.bn_batches, 0):
                out.append(StudyJob(phase="score", arm=arm, kind=run[arm].kind, split=split, search_seed=first,
                                    retrain_seed=None, run_dir=d / f"{arm}_bn{k}", recipe=run[arm].recipe,
                                    search_run=run[arm].run_dir,
                                    rank_args=["--genotypes", str(d / CANDIDATES_FILE), "--bn-batches", str(k)]))
    return out


def _ranked_train_jobs(study: StudyRecipe, targets: list[DatasetRef]) -> list[StudyJob]:
    """Stand-alone retrains of each split's fixed selection (none before ``selected.json`` exists)."""
    out: list[StudyJob] = []
    for split in study.splits:
        d = ranking_dir(study, split)
        for name in _read_json(d / SELECTED_FILE).get("ranked", {}):
            for r in study.retrain.seeds:
                out.append(StudyJob(
                    phase="train", arm=name, kind="ranked", split=split, search_seed=None, retrain_seed=r,
                    run_dir=study.study_dir / "train" / name / f"split{split}_seed{r}",
                    recipe=Path(study.retrain.recipe), sets=_retrain_sets(study, split, r),
                    genotype=str(d / "genotypes" / f"{name}.json"), targets=targets))
    return out
