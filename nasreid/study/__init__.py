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

A *methods study* (``retrain_arms``, issue 28) compares training methods / recipes on fixed genotypes instead:
every hand design and fixed genotype file (``genotypes``) is trained by each retrain arm (``train/<arm>/<genotype>/
split<K>_seed<R>``, with the arm's extra evaluations such as re-ranking, ``nasreid evaluate RUN --set eval.*``), and
with ``zero_shot`` each arm's init is evaluated without training (phase ``zero_shot``, ``nasreid evaluate
--weights``, ``zero_shot/<genotype>/<label>_split<K>``); the report pairs trained − zero-shot, evaluation − own,
arm − arm and genotype − genotype over (split, retrain seed) units (docs/study.md).

The package: :mod:`~nasreid.study.schema` (the study recipe and its checks), :mod:`~nasreid.study.jobs` (the job
graph, job states and commands), :mod:`~nasreid.study.runner` (the local runner), :mod:`~nasreid.study.statistics`
(bootstrap, entropy, agreement), :mod:`~nasreid.study.report` (results table and report) and
:mod:`~nasreid.study.plots` (the report's plots). Every public name is importable from ``nasreid.study``.
"""
from __future__ import annotations

from .jobs import (
    DONE,
    EVALUATE,
    NEW,
    PARTIAL,
    StudyJob,
    enumerate_jobs,
    evaluation_tag,
    find_evaluation,
    find_tagged_evaluation,
)
from .report import METRICS, build_report, collect_results
from .runner import print_commands, run_study
from .schema import (
                     Seeds,
                     StudyArm,
                     StudyBootstrap,
                     StudyEvaluation,
                     StudyEvalVariant,
                     StudyRanking,
                     StudyRecipe,
                     StudyRetrain,
                     StudyRetrainArm,
                     StudySearch,
                     StudySelection,
                     load_study,
)
from .statistics import BootstrapResult, decision_entropy, entropy_per_epoch, genotype_agreement, paired_bootstrap

__all__ = [
    "StudyRecipe", "StudyArm", "StudySearch", "StudyRetrain", "StudyEvaluation", "StudySelection", "StudyRanking",
    "StudyBootstrap", "StudyJob", "BootstrapResult", "load_study", "enumerate_jobs", "run_study",
    "print_commands", "collect_results", "build_report", "paired_bootstrap", "decision_entropy",
    "genotype_agreement", "find_evaluation", "entropy_per_epoch", "StudyRetrainArm", "StudyEvalVariant",
    "evaluation_tag", "find_tagged_evaluation",
    "DONE", "EVALUATE", "NEW", "PARTIAL", "METRICS", "Seeds",
]
