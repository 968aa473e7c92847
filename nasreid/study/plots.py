"""Plots of the study report (matplotlib on the headless Agg backend): mAP per genotype source, same-domain mAP
against the retrain's last-epoch training triplet loss (with the retrain's triplet margin), and the decision
entropy per search epoch."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from nasreid.config import RecipeError

from .jobs import DONE
from .schema import StudyRecipe, _load_with
from .statistics import _finite, entropy_per_epoch


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
    """The retrain recipe's triplet margin (``loss.kwargs.triplet_margin``, after the study's ``retrain.set``), or None
    where it has no triplet term or cannot be loaded (a report rebuilt away from its recipes)."""
    try:
        rec = _load_with(study.retrain.recipe, list(study.retrain.set.items()), where="retrain.recipe")
    except (RecipeError, OSError):  # the plot's margin line is optional
        return None
    from nasreid.methods.base import reid_loss_setting

    if rec.loss.name != "reid" or not float(reid_loss_setting(rec, "triplet_weight")) > 0:
        return None
    return float(reid_loss_setting(rec, "triplet_margin"))


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
