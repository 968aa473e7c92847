"""Statistics of the study report: the paired percentile bootstrap (:func:`paired_bootstrap`), the entropy of a
search's architecture distribution (:func:`decision_entropy`, per epoch from its log: :func:`entropy_per_epoch`) and
the agreement of two genotypes (:func:`genotype_agreement`)."""
from __future__ import annotations

import inspect
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence, Union

import numpy as np


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
    Introduction to the Bootstrap", 1993, Ch. 13, the percentile interval), computed by
    ``scipy.stats.bootstrap(paired=True, method="percentile")`` with ``numpy.random.default_rng(seed)`` (it
    resamples the pair indices with the same draws as a plain ``rng.integers`` loop would). With few pairs (a
    study's splits x seeds) the interval is too narrow (the bootstrap ignores the variance it cannot see); with one
    pair it is the point itself (scipy needs two).

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
    if d.size == 1:  # every resample of one pair is that pair
        return BootstrapResult(float(d[0]), float(d[0]), float(d[0]), 1, int(n_boot), float(level))
    from scipy.stats import bootstrap

    rng = np.random.default_rng(seed)
    res = bootstrap((x, y), _mean_difference, n_resamples=int(n_boot), vectorized=True, paired=True,
                    confidence_level=level, method="percentile", **{rng_keyword(bootstrap): rng})
    lo, hi = res.confidence_interval
    return BootstrapResult(float(d.mean()), float(lo), float(hi), int(d.size), int(n_boot), float(level))


def rng_keyword(fn) -> str:
    """The keyword a scipy.stats resampling function takes its Generator by: ``rng`` (scipy >= 1.15) or
    ``random_state`` (older releases; the dependency floor is 1.10)."""
    return "rng" if "rng" in inspect.signature(fn).parameters else "random_state"


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """mean(y - x) along ``axis``: the statistic of :func:`paired_bootstrap` (vectorised for scipy)."""
    return np.mean(y - x, axis=axis)


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


def _finite(xs) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(float(x))]
