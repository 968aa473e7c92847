"""The ranking study: does a one-shot supernet's score of a candidate predict how the candidate does when it is
fine-tuned on its own? (Issue "Can the search be trusted?"; the protocol of Yu et al., "Evaluating the Search Phase
of Neural Architecture Search", ICLR 2020, Sec. 4: Kendall tau between the supernet's ranking and the stand-alone
ranking of the same architectures, and of Guo et al., "Single Path One-Shot NAS", ECCV 2020, Sec. 3.3: BN statistics
recalibrated per candidate before it is scored.)

A study recipe with a ``ranking`` section (:class:`~nasreid.study.schema.StudyRanking`) runs, per split:

1. the searches of its arms (phase ``search``), each supernet trained on the training identities minus
   ``data.val_ids``;
2. ``nasreid rank`` of a uniform pool by the selecting supernet (phase ``pool``);
3. :func:`select_genotypes`: ``select`` candidates of the pool spread evenly over its score ranking (best, worst and
   even steps between), fixed in ``ranking/split<K>/selected.json`` *before any stand-alone run* and never
   rewritten, plus the hand-designed presets;
4. ``nasreid rank`` of that fixed list by every supernet with and without BN recalibration (phase ``score``);
5. stand-alone fine-tunes of each fixed genotype with the retrain recipe and every retrain seed (phase ``train``);
6. :func:`build_ranking_report`: per score, Kendall tau and Spearman rho against the mean stand-alone test mAP over
   the retrain seeds, with percentile bootstrap intervals over genotypes; the ceiling (tau between two retrain seeds:
   how well one stand-alone run predicts another); the regret of the top-1 and top-5 picks (the best stand-alone mAP
   minus the best among the score's top k); a scatter plot per score.
"""
from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from nasreid.engine.checkpoint import write_json

from .jobs import CANDIDATES_FILE, DONE, SELECTED_FILE, StudyJob, enumerate_jobs, find_evaluation, ranking_dir
from .plots import _pyplot, _save
from .schema import StudyRecipe
from .statistics import rng_keyword

__all__ = ["select_genotypes", "ranking_scores", "rank_correlation", "regret", "build_ranking_report",
           "selection_pending"]

#: the scores of a ``nasreid rank`` row the report correlates (higher = better after the sign)
SCORES = (("val_mAP", 1.0), ("val_rank1", 1.0), ("arch_logprob", 1.0), ("train_loss", -1.0))


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def select_genotypes(study: StudyRecipe, split: int) -> Optional[Path]:
    """Fix the split's selection once its pool is scored: ``select`` candidates at even steps of the pool's ranking
    by ``ranking.score`` (place ``round(i * (n - 1) / (select - 1))`` for ``i = 0 .. select - 1``, the best first; a
    candidate equal to a hand design, or already taken, gives way to the next place that is free), written as
    ``selected.json`` (names ``r<place>`` -> choices and pool score), one genotype file per name under
    ``genotypes/`` (what ``nasreid train --genotype`` reads) and ``candidates.json`` (the ``nasreid rank --genotypes``
    list: the ranked genotypes, then the hand designs as ``preset:NAME``).

    An existing ``selected.json`` is never rewritten (the selection is fixed before any stand-alone run).

    Returns:
        ``selected.json``'s path, or ``None`` while the pool is not scored yet.

    Raises:
        ValueError: the pool holds fewer candidates than ``select`` with finite scores.
    """
    from nasreid.config import load_recipe
    from nasreid.genotype import Genotype
    from nasreid.registry import space_presets

    rk = study.ranking
    assert rk is not None
    d = ranking_dir(study, split)
    sel_path = d / SELECTED_FILE
    if sel_path.is_file():
        return sel_path
    if not (d / "pool" / "rank.md").is_file():
        return None
    settings = json.loads((d / "pool" / "rank_settings.json").read_text())
    labels = list(settings["labels"])
    pool = [r for r in _rows(d / "pool" / "rank.csv") if math.isfinite(_float(r[rk.score]))]
    if len(pool) < rk.select:
        raise ValueError(f"{d / 'pool' / 'rank.csv'}: {len(pool)} candidates with a finite {rk.score}, "
                         f"ranking.select asks for {rk.select}")
    pool.sort(key=lambda r: -_float(r[rk.score]))
    retrain = load_recipe(study.retrain.recipe)
    presets = space_presets(retrain.space.name)
    hand = {"/".join(str(presets[h]["choices"][lb]) for lb in labels) for h in study.hand_designed}
    taken: set[int] = set()
    n = len(pool)
    for i in range(rk.select):
        place = round(i * (n - 1) / (rk.select - 1))
        free = sorted((j for j in range(n) if j not in taken and pool[j]["key"] not in hand),
                      key=lambda j: (abs(j - place), j))
        taken.add(free[0])
    ranked: dict[str, dict[str, Any]] = {}
    width = len(str(n - 1))
    (d / "genotypes").mkdir(parents=True, exist_ok=True)
    for j in sorted(taken):
        r = pool[j]
        name = f"r{j:0{width}d}"
        choices = {lb: r[lb] for lb in labels}
        ranked[name] = {"place": j, "key": r["key"], "choices": choices, "pool_score": _float(r[rk.score])}
        Genotype(space=retrain.space.name, choices=choices, space_kwargs=dict(retrain.space.kwargs),
                 provenance={"rule": f"place {j} of {n} in the pool ranked by {rk.selector}'s {rk.score} "
                                     f"(bn_batches {rk.bn_batches})", "study": study.name, "split": split}
                 ).save(d / "genotypes" / f"{name}.json")
    write_json(d / CANDIDATES_FILE, [v["choices"] for v in ranked.values()]
               + [f"preset:{h}" for h in study.hand_designed])
    write_json(sel_path, {"rule": f"{rk.select} of the {n} pool candidates at even steps of {rk.selector}'s "
                                  f"{rk.score} ranking (bn_batches {rk.bn_batches}), fixed before any stand-alone "
                                  "run", "score": rk.score, "selector": rk.selector, "pool_size": n,
                          "ranked": ranked, "hand": list(study.hand_designed)})
    return sel_path


def rank_correlation(score: Sequence[float], target: Sequence[float], n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Kendall tau-b and Spearman rho between ``score`` and ``target`` (shape ``[n]`` each, ``n >= 3``; pairs with
    a non-finite value are dropped) with percentile bootstrap intervals over the pairs (``scipy.stats.bootstrap``,
    ``paired=True``, ``numpy.random.default_rng(seed)``; Efron & Tibshirani 1993, Ch. 13).

    Returns:
        ``{"n", "tau", "tau_low", "tau_high", "rho", "rho_low", "rho_high"}`` (``nan`` when fewer than 3 pairs or a
        constant input).
    """
    from scipy.stats import bootstrap, kendalltau, spearmanr

    x, y = np.asarray(score, dtype=float), np.asarray(target, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out: dict[str, float] = {"n": float(x.size)}
    for name, fn in (("tau", kendalltau), ("rho", spearmanr)):
        if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            out.update({name: math.nan, f"{name}_low": math.nan, f"{name}_high": math.nan})
            continue
        out[name] = float(fn(x, y)[0])

        def stat(a, b, _fn=fn):
            v = _fn(a, b)[0]
            return v if np.isfinite(v) else 0.0  # a resample with a constant side carries no ordering

        with warnings.catch_warnings():  # resamples that repeat one pair are constant: scored 0 above
            warnings.simplefilter("ignore")
            res = bootstrap((x, y), stat, n_resamples=int(n_boot), paired=True, vectorized=False,
                            confidence_level=level, method="percentile",
                            **{rng_keyword(bootstrap): np.random.default_rng(seed)})
        out[f"{name}_low"], out[f"{name}_high"] = (float(v) for v in res.confidence_interval)
    return out


def regret(score: Sequence[float], target: Sequence[float], k: int) -> float:
    """The best ``target`` minus the best ``target`` among the ``k`` highest ``score`` (0: the score's top k hold
    the best; in the target's units). Non-finite scores rank last."""
    x, y = np.asarray(score, dtype=float), np.asarray(target, dtype=float)
    order = np.argsort(-np.where(np.isfinite(x), x, -np.inf), kind="stable")
    return float(np.nanmax(y) - np.nanmax(y[order[:k]]))


def ranking_scores(study: StudyRecipe, split: int) -> list[dict[str, Any]]:
    """One row per fixed genotype of a split: its name (``r<place>`` or the preset), choices key, every supernet's
    scores (columns ``<arm>_bn<K>_<score>``), and the stand-alone same-domain test rank-1 / mAP of each retrain seed
    (``standalone_mAP_seed<R>``) with their mean (``standalone_mAP``); ``nan`` where a job has not finished."""
    rk = study.ranking
    assert rk is not None
    d = ranking_dir(study, split)
    sel = json.loads((d / SELECTED_FILE).read_text()) if (d / SELECTED_FILE).is_file() else {}
    if not sel:
        return []
    rows: dict[str, dict[str, Any]] = {}
    for name, v in sel["ranked"].items():
        rows[v["key"]] = {"genotype": name, "key": v["key"], "pool_score": v["pool_score"]}
    scored = {}
    for arm in rk.supernets:
        for k in (rk.bn_batches, 0):
            for r in _rows(d / f"{arm}_bn{k}" / "rank.csv"):
                if r["source"].startswith("preset:"):
                    rows.setdefault(r["key"], {"genotype": r["source"][len("preset:"):], "key": r["key"],
                                               "pool_score": math.nan})
                scored[(arm, k, r["key"])] = r
    train = {(j.arm, j.retrain_seed): j for j in enumerate_jobs(study) if j.phase == "train" and j.split == split}
    out = []
    for key, row in rows.items():
        for arm in rk.supernets:
            for k in (rk.bn_batches, 0):
                r = scored.get((arm, k, key), {})
                for s, _ in SCORES:
                    row[f"{arm}_bn{k}_{s}"] = _float(r.get(s))
        maps = []
        for seed in study.retrain.seeds:
            j = train.get((row["genotype"], seed))
            ev = find_evaluation(j.metrics().get("evaluation") or {}, None) if j and j.state() == DONE else None
            for m in ("rank1", "mAP"):
                row[f"standalone_{m}_seed{seed}"] = _float((ev or {}).get(m))
            maps.append(row[f"standalone_mAP_seed{seed}"])
        row["standalone_mAP"] = float(np.mean(maps)) if maps and all(math.isfinite(m) for m in maps) else math.nan
        out.append(row)
    return out


def _score_columns(study: StudyRecipe) -> list[tuple[str, str, float]]:
    """``(column, title, sign)`` of every score the report correlates."""
    rk = study.ranking
    assert rk is not None
    cols = []
    for arm in rk.supernets:
        for k in (rk.bn_batches, 0):
            for s, sign in SCORES:
                if k == 0 and s == "arch_logprob":
                    continue  # the same with or without recalibration
                what = {"val_mAP": "validation mAP", "val_rank1": "validation rank-1",
                        "arch_logprob": "architecture log-probability", "train_loss": "training loss (lower first)"}[s]
                bn = f"BN recalibrated on {k} batches" if k else "inherited BN statistics"
                cols.append((f"{arm}_bn{k}_{s}", f"{arm}: {what}" + ("" if s == "arch_logprob" else f", {bn}"), sign))
    return cols


def _fmt_ci(v: float, lo: float, hi: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _plot_scatter(rows: list[dict], col: str, title: str, sign: float, path: Path) -> Optional[Path]:
    pts = [(r[col], r["standalone_mAP"], r["genotype"]) for r in rows
           if math.isfinite(r[col]) and math.isfinite(r["standalone_mAP"])]
    if len(pts) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for x, y, name in pts:
        hand = not name.startswith("r")
        ax.scatter(x, y, s=28 if hand else 16, marker="*" if hand else "o",
                   color="tab:red" if hand else "tab:blue", zorder=3)
        if hand:
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(title + (" (lower is better)" if sign < 0 else ""), fontsize=8)
    ax.set_ylabel("stand-alone test mAP (%), mean of seeds")
    tau = rank_correlation([sign * p[0] for p in pts], [p[1] for p in pts], n_boot=200)["tau"]
    ax.set_title(f"{len(pts)} genotypes, Kendall tau {tau:+.2f}", fontsize=9)
    return _save(fig, ax, path)


def build_ranking_report(study: StudyRecipe, out_dir: Path) -> list[str]:
    """The ranking study's section of the report (markdown lines), ``ranking_results.csv`` and
    ``plots/ranking_<column>.png``; one block per split. See the module docstring for what is computed."""
    rk = study.ranking
    assert rk is not None
    b = study.bootstrap
    lines = ["", "## Ranking: does the supernet's score predict stand-alone accuracy?", "",
             f"Pool: {rk.pool} uniform candidates (seed {rk.pool_seed}) scored by `{rk.selector}`'s supernet; "
             f"{rk.select} of them fixed at even steps of its {rk.score} ranking, plus the hand designs "
             f"({', '.join(study.hand_designed) or 'none'}); every supernet scores them with BN recalibrated on "
             f"{rk.bn_batches} training batches and with its inherited statistics; each is fine-tuned stand-alone "
             f"with `{Path(study.retrain.recipe).name}`, retrain seeds {list(study.retrain.seeds)}, on the training "
             "identities minus the validation ones. Target: same-domain test mAP, mean over the retrain seeds. "
             f"Intervals: {b.level:.0%} percentile bootstrap over genotypes ({b.n_boot} resamples). Regret@k: the "
             "best stand-alone mAP minus the best among the score's top k (mAP points; 0 = the top k hold the best)."]
    all_rows = []
    for split in study.splits:
        rows = ranking_scores(study, split)
        done = [r for r in rows if math.isfinite(r["standalone_mAP"])]
        lines += ["", f"### Split {split}: {len(done)} of {len(rows)} genotypes with every stand-alone run", ""]
        if len(done) < 3:
            lines.append("Too few finished stand-alone runs for a correlation yet.")
            all_rows += [{"split": split, **r} for r in rows]
            continue
        target = [r["standalone_mAP"] for r in done]
        lines += ["| score | n | Kendall tau | Spearman rho | regret@1 | regret@5 |", "|---|---|---|---|---|---|"]
        for col, title, sign in _score_columns(study):
            sc = [sign * r[col] for r in done]
            c = rank_correlation(sc, target, b.n_boot, b.seed, b.level)
            if not c["n"]:
                continue
            fin = [(s, t) for s, t in zip(sc, target) if math.isfinite(s)]
            r1 = regret([s for s, _ in fin], [t for _, t in fin], 1)
            r5 = regret([s for s, _ in fin], [t for _, t in fin], 5)
            lines.append(f"| {title} | {int(c['n'])} | {_fmt_ci(c['tau'], c['tau_low'], c['tau_high'])} | "
                         f"{_fmt_ci(c['rho'], c['rho_low'], c['rho_high'])} | {r1:.2f} | {r5:.2f} |")
            _plot_scatter(done, col, title, sign, out_dir / "plots" / f"ranking_split{split}_{col}.png")
        seeds = list(study.retrain.seeds)
        if len(seeds) >= 2:
            a = [r[f"standalone_mAP_seed{seeds[0]}"] for r in done]
            c = rank_correlation(a, [r[f"standalone_mAP_seed{seeds[1]}"] for r in done], b.n_boot, b.seed, b.level)
            lines.append(f"| ceiling: stand-alone seed {seeds[0]} vs seed {seeds[1]} | {int(c['n'])} | "
                         f"{_fmt_ci(c['tau'], c['tau_low'], c['tau_high'])} | "
                         f"{_fmt_ci(c['rho'], c['rho_low'], c['rho_high'])} | | |")
        best = max(done, key=lambda r: r["standalone_mAP"])
        lines += ["", f"Best stand-alone: {best['genotype']} ({best['key']}) at {best['standalone_mAP']:.2f} mAP; "
                      f"spread {min(target):.2f}-{max(target):.2f}.", "",
                  "| genotype | choices | pool score | stand-alone mAP (mean) | " + " | ".join(
                      f"seed {s}" for s in seeds) + " |", "|---|---|---|---|" + "---|" * len(seeds)]
        for r in sorted(rows, key=lambda r: -r["standalone_mAP"] if math.isfinite(r["standalone_mAP"]) else 1e9):
            lines.append(f"| {r['genotype']} | {r['key']} | {r['pool_score']:.2f} | {r['standalone_mAP']:.2f} | "
                         + " | ".join(f"{r[f'standalone_mAP_seed{s}']:.2f}" for s in seeds) + " |")
        all_rows += [{"split": split, **r} for r in rows]
    if all_rows:
        with open(out_dir / "ranking_results.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(all_rows[0]))
            w.writeheader()
            w.writerows(all_rows)
    return lines


def selection_pending(study: StudyRecipe) -> list[StudyJob]:
    """Fix every split's selection whose pool is scored (:func:`select_genotypes`); the score jobs then become
    ready. Returns the jobs of phase ``score`` that are still waiting for a selection."""
    for split in study.splits:
        select_genotypes(study, split)
    return [j for j in enumerate_jobs(study) if j.phase == "score" and not j.ready()]
