"""Architecture-weight (alpha) logging and plotting for differentiable NAS search runs.

A search run folder ``results/<run>/`` holds ``alphas.csv`` in *long* format with header
``epoch,step,label,value,probability,lambda``: one row per (epoch, choice label, candidate
value). ``probability`` is the softmax of the architecture weights at the end of that epoch
(unitless, in ``[0, 1]``, summing to 1 over the values of one label); ``lambda`` is the
Gumbel-softmax temperature (Jang et al., ICLR 2017; used e.g. by FBNet / GDAS) or empty.

Plots are rendered with matplotlib's Agg canvas directly (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``), so no display and no global ``pyplot`` state are needed.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

__all__ = [
    "ALPHA_COLUMNS",
    "read_alphas",
    "append_alphas_csv",
    "plot_alpha_trajectories",
    "log_alphas_tensorboard",
]

ALPHA_COLUMNS = ("epoch", "step", "label", "value", "probability", "lambda")
_DPI = 100
_SUPPORTED_FORMATS = ("png", "svg", "pdf")


def read_alphas(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a long-format ``alphas.csv``.

    Args:
        path: the CSV file.

    Returns:
        DataFrame with columns ``epoch`` (int), ``step`` (int), ``label`` (str), ``value`` (str),
        ``probability`` (float), ``lambda`` (float, NaN when empty), in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist (message contains the path).
        ValueError: the file is empty or a required column is missing (message names the file
            and the missing column(s)).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"alphas file not found: {path}")
    try:
        df = pd.read_csv(path, dtype={"label": str, "value": str}, keep_default_na=False,
                         na_values={"lambda": [""], "probability": [""]})
    except pd.errors.EmptyDataError as e:
        raise ValueError(f"{path}: empty file, expected header {','.join(ALPHA_COLUMNS)}") from e
    missing = [c for c in ALPHA_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                         f"expected {','.join(ALPHA_COLUMNS)}")
    df = df[list(ALPHA_COLUMNS)].copy()
    df["epoch"] = df["epoch"].astype(int)
    df["step"] = df["step"].astype(int)
    df["probability"] = pd.to_numeric(df["probability"], errors="raise").astype(float)
    df["lambda"] = pd.to_numeric(df["lambda"], errors="coerce").astype(float)
    return df


def append_alphas_csv(path: str | os.PathLike, epoch: int, step: int,
                      probabilities: Mapping[str, Mapping[str, float]],
                      lam: float | None) -> None:
    """Append one epoch of architecture probabilities to ``alphas.csv``.

    Writes the header when the file is new. Resume-safe: rows already present for the same
    ``epoch`` are dropped first, so re-logging an epoch after a restart replaces it instead of
    duplicating it. The file is rewritten atomically (temp file + ``os.replace``).

    Args:
        path: CSV file (parent directories are created).
        epoch: epoch index.
        step: global optimisation step at the end of the epoch.
        probabilities: ``{label: {value: probability}}``; values are converted to ``str``.
        lam: Gumbel temperature, or ``None`` (written as an empty cell).

    Raises:
        ValueError: empty ``probabilities`` or an existing file with missing columns.
    """
    if not probabilities:
        raise ValueError("probabilities is empty; nothing to append")
    path = Path(path)
    rows = [
        {"epoch": int(epoch), "step": int(step), "label": str(label), "value": str(value),
         "probability": float(p), "lambda": (np.nan if lam is None else float(lam))}
        for label, choices in probabilities.items() for value, p in choices.items()
    ]
    new = pd.DataFrame(rows, columns=list(ALPHA_COLUMNS))
    if path.is_file() and path.stat().st_size > 0:
        old = read_alphas(path)
        old = old[old["epoch"] != int(epoch)]
        df = pd.concat([old, new], ignore_index=True) if len(old) else new
    else:
        df = new
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".alphas.", suffix=".csv", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            df.to_csv(f, index=False, na_rep="", float_format="%.8g")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _ordered_unique(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def _save(fig, out_dir: Path, stem: str, formats: Iterable[str]) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    paths = []
    for fmt in formats:
        p = out_dir / f"{stem}.{fmt}"
        fig.savefig(p, format=fmt, dpi=_DPI)
        paths.append(p)
    return paths


def plot_alpha_trajectories(alphas_csv_or_run_dir: str | os.PathLike,
                            out_dir: str | os.PathLike | None = None,
                            formats: Iterable[str] = ("png", "svg")) -> list[Path]:
    """Plot architecture-probability trajectories and the final-epoch heatmap.

    Produces two figures:

    * ``alpha_trajectories.<fmt>``: grid of subplots, one per choice label (shared x = epoch,
      y = probability in ``[0, 1]``), one line per candidate value, with a legend; the title
      carries the run name. Size: ``4*ncols x 3*nrows`` inches at 100 dpi with
      ``ncols = min(3, n_labels)``, i.e. ``400*ncols x 300*nrows`` pixels for PNG.
    * ``alpha_final.<fmt>``: heatmap of the last epoch's probabilities (rows = labels,
      columns = candidate values; blank where a label lacks that value), annotated.

    Args:
        alphas_csv_or_run_dir: path to ``alphas.csv`` or to the run folder containing it.
        out_dir: output folder (created); default: the folder holding the CSV.
        formats: matplotlib output formats, subset of ``png``, ``svg``, ``pdf``.

    Returns:
        Paths written: trajectories in ``formats`` order, then final heatmaps.

    Raises:
        FileNotFoundError / ValueError: from :func:`read_alphas`; ValueError for an empty file
            or an unsupported format.
    """
    from matplotlib.figure import Figure

    src = Path(alphas_csv_or_run_dir)
    csv_path = src / "alphas.csv" if src.is_dir() else src
    formats = tuple(formats)
    bad = [f for f in formats if f not in _SUPPORTED_FORMATS]
    if bad or not formats:
        raise ValueError(f"unsupported format(s) {bad or formats}; choose from {_SUPPORTED_FORMATS}")
    df = read_alphas(csv_path)
    if df.empty:
        raise ValueError(f"{csv_path}: no rows to plot")
    # Keep the last row per key in case the file was hand-edited with duplicates.
    df = df.drop_duplicates(subset=["epoch", "label", "value"], keep="last")
    run_name = csv_path.resolve().parent.name
    out = Path(out_dir) if out_dir is not None else csv_path.parent
    out.mkdir(parents=True, exist_ok=True)

    labels = _ordered_unique(df["label"])
    n = len(labels)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)

    # --- trajectories ---
    fig = Figure(figsize=(4 * ncols, 3 * nrows), dpi=_DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
    for ax, label in zip(axes, labels):
        sub = df[df["label"] == label]
        for value in _ordered_unique(sub["value"]):
            s = sub[sub["value"] == value].sort_values("epoch")
            ax.plot(s["epoch"], s["probability"], marker="o", markersize=3, label=value)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0.0, 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[(nrows - 1) * ncols:]:
        ax.set_xlabel("epoch")
    for ax in axes[::ncols]:
        ax.set_ylabel("probability")
    fig.suptitle(f"Architecture weights: {run_name}")
    paths = _save(fig, out, "alpha_trajectories", formats)

    # --- final-epoch heatmap ---
    last = df[df["epoch"] == df["epoch"].max()]
    values = _ordered_unique(last["value"])
    last_labels = _ordered_unique(last["label"])
    grid = (last.pivot(index="label", columns="value", values="probability")
            .reindex(index=last_labels, columns=values))
    mat = grid.to_numpy(dtype=float)
    fig = Figure(figsize=(max(4.0, 0.9 * len(values) + 2.5), max(3.0, 0.5 * len(last_labels) + 1.5)),
                 dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(mat), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(values)), labels=values, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(last_labels)), labels=last_labels, fontsize=8)
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            if np.isfinite(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i, j] < 0.5 else "black")
    fig.colorbar(im, ax=ax, label="probability")
    ax.set_xlabel("candidate value")
    ax.set_title(f"{run_name}: epoch {int(last['epoch'].iloc[0])}")
    paths += _save(fig, out, "alpha_final", formats)
    return paths


def log_alphas_tensorboard(writer, probabilities: Mapping[str, Mapping[str, float]], step: int,
                           prefix: str = "alpha") -> None:
    """Log architecture probabilities as TensorBoard scalars.

    One scalar per (label, value), tag ``f"{prefix}/{label}/{value}"``, via ``writer.add_scalar``.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_scalar``).
        probabilities: ``{label: {value: probability}}``.
        step: global step (x axis).
        prefix: tag prefix.
    """
    for label, choices in probabilities.items():
        for value, p in choices.items():
            writer.add_scalar(f"{prefix}/{label}/{value}", float(p), int(step))
