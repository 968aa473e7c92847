"""Keeping what the init knew: weight-space interpolation between a run's pretrained init and its fine-tuned
weights (WiSE-FT; Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022, Eq. 1)::

    theta_alpha = (1 - alpha) * theta_0 + alpha * theta_1,     alpha in [0, 1]

``theta_0`` is the network of a retrain run's genotype as the run started (its recipe's ``model.pretrained``
through :meth:`~nasreid.engine.context.RunContext.init_weights`), ``theta_1`` the run's trained weights
(``model.pt``). ``alpha = 0`` is the zero-shot init, ``alpha = 1`` the fine-tuned network; the curve in between
trades same-domain accuracy (the fine-tuning dataset's test split) against cross-domain accuracy (the recipe's
``eval.targets``).

- :func:`interpolate_state`: Eq. 1 on two state dicts.
- :func:`pretrained_init`: ``theta_0`` of a run folder.
- :func:`run_wise_ft`: the curve over ``alpha``, evaluated with the run's own evaluation functions
  (:func:`~nasreid.evaluation.runner.evaluate_run_model`), written as ``wise_ft.csv`` / ``.md`` / ``.png``
  (``nasreid interpolate RUN``).
"""
from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from nasreid.config import DatasetRef, RecipeError
from nasreid.errors import NasreidError

__all__ = ["InterpolationError", "interpolate_state", "parse_alphas", "pretrained_init", "run_wise_ft",
           "classifier_keys"]

log = logging.getLogger("nasreid")

#: metrics written per evaluated dataset (percent)
METRICS = ("rank1", "mAP", "mINP")


class InterpolationError(NasreidError, ValueError):
    """Two state dicts cannot be interpolated: a key on one side only, or two shapes that differ (the message
    names the key)."""


def interpolate_state(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor], alpha: float,
                      take_from_1: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """WiSE-FT's weight-space ensemble (Wortsman et al., CVPR 2022, Eq. 1):
    ``theta_alpha = (1 - alpha) * theta_0 + alpha * theta_1`` for every floating-point tensor of the state dict --
    parameters and floating-point buffers alike (BN ``running_mean`` / ``running_var`` are mixed as the authors'
    code mixes the whole ``state_dict``). Computed in ``theta_1``'s dtype as written (not ``torch.lerp``), so
    ``alpha = 1`` returns ``theta_1`` and ``alpha = 0`` ``theta_0`` bit for bit.

    Integer and boolean tensors (BN's ``num_batches_tracked``) are taken from ``theta_1``, as are the keys in
    ``take_from_1`` (e.g. the identity classifier: the pretrained file has none for the fine-tuning identities;
    retrieval evaluation does not use it). Tensors are returned as new tensors on ``theta_1``'s devices; the
    inputs are not changed.

    Args:
        theta0: the pretrained state dict (``{key: tensor}``, any shapes).
        theta1: the fine-tuned state dict; its key order is kept.
        alpha: mixing coefficient in ``[0, 1]`` (0: ``theta0``, 1: ``theta1``).
        take_from_1: keys copied from ``theta1`` whatever ``theta0`` holds for them (present there or not).

    Raises:
        InterpolationError: ``alpha`` outside ``[0, 1]`` or not finite; a key (not in ``take_from_1``) in one state
            dict only, or with two different shapes (the message names the key and both shapes).
    """
    a = float(alpha)
    if not (math.isfinite(a) and 0.0 <= a <= 1.0):
        raise InterpolationError(f"alpha must be in [0, 1], got {alpha!r}")
    keep = set(take_from_1)
    only0 = [k for k in theta0 if k not in theta1 and k not in keep]
    if only0:
        raise InterpolationError(f"key {only0[0]!r} is in the pretrained state dict only ({len(only0)} such keys)")
    out: dict[str, torch.Tensor] = {}
    for k, t1 in theta1.items():
        if k in keep or not (t1.is_floating_point() or t1.is_complex()):
            out[k] = t1.detach().clone()
            continue
        if k not in theta0:
            raise InterpolationError(f"key {k!r} is in the fine-tuned state dict only")
        t0 = theta0[k]
        if tuple(t0.shape) != tuple(t1.shape):
            raise InterpolationError(f"key {k!r}: shape {tuple(t0.shape)} in the pretrained state dict, "
                                     f"{tuple(t1.shape)} in the fine-tuned one")
        t0 = t0.detach().to(device=t1.device, dtype=t1.dtype)
        out[k] = (1.0 - a) * t0 + a * t1.detach()
    return out


def parse_alphas(spec: str, where: str = "--alpha") -> list[float]:
    """The mixing coefficients of ``spec``: a comma list (``0,0.25,0.5,0.75,1``) or an inclusive range
    ``START:STOP:STEP`` (``0:1:0.1`` -> 0, 0.1, ..., 1; values rounded to 10 decimals), in order, duplicates
    dropped.

    Raises:
        RecipeError: an unparseable value, a value outside ``[0, 1]``, a range with ``STEP <= 0`` or
            ``STOP < START``, or no value (one line naming ``where``).
    """
    s = str(spec).strip()
    try:
        if ":" in s:
            parts = s.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, step = (float(p) for p in parts)
            if not (step > 0 and stop >= start):
                raise RecipeError(f"{where} {spec!r}: a range START:STOP:STEP needs STEP > 0 and STOP >= START")
            n = int(math.floor((stop - start) / step + 1e-9))
            values = [round(start + i * step, 10) for i in range(n + 1)]
        else:
            values = [float(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise RecipeError(f"{where} {spec!r}: expected numbers in [0, 1] as A,B,C or START:STOP:STEP") from None
    if not values:
        raise RecipeError(f"{where} {spec!r}: no mixing coefficient given")
    bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise RecipeError(f"{where} {spec!r}: {bad[0]} is outside [0, 1]")
    out: list[float] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def classifier_keys(net: nn.Module) -> list[str]:
    """State-dict keys of ``net``'s identity classifiers (:func:`~nasreid.models.interface.classifiers_of`):
    what :func:`run_wise_ft` takes from the fine-tuned weights."""
    from nasreid.models.interface import classifiers_of

    names = set(classifiers_of(net))
    return [k for k in net.state_dict() if k.rpartition(".")[0] in names]


def pretrained_init(run_dir: str | os.PathLike) -> nn.Module:
    """``theta_0`` of a retrain run: the network of ``RUN/genotype.json`` initialised exactly as ``nasreid train``
    initialised it before its first step -- the recipe's seed set before anything is built
    (:func:`~nasreid.engine.checkpoint.seed_everything`), the run's training dataset (with its recorded
    ``data.val_ids`` draw), the network built for that dataset's ``num_train_pids`` identities, the recipe's
    ``model.pretrained`` put in by :meth:`~nasreid.engine.context.RunContext.init_weights` (loaded exactly, or
    warm-started with IN calibration under ``model.warm_start``), then the training method's
    ``prepare_network`` (QAConv's head). In eval mode on the CPU; no file is written.

    Raises:
        RunFolderError / GenotypeError: not a retrain run folder (as :func:`~nasreid.engine.runs.load_run_model`).
        RecipeError: the run's recipe names no ``model.pretrained`` (nothing to interpolate towards).
        PretrainedWeightsError: the file cannot be read or does not fit the network.
    """
    from nasreid.engine.checkpoint import seed_everything
    from nasreid.engine.context import RunContext
    from nasreid.engine.runs import _search_run_error, build_run_dataset, is_search_run, load_run_recipe
    from nasreid.engine.trainer import device_context
    from nasreid.errors import RunFolderError
    from nasreid.genotype import Genotype
    from nasreid.registry import METHODS

    run = Path(run_dir)
    recipe = load_run_recipe(run)
    if is_search_run(run, recipe):
        raise _search_run_error(run)
    if not recipe.model or not recipe.model.pretrained:
        raise RecipeError(f"{run / 'recipe.yaml'}: model.pretrained is not set: the run did not start from "
                          "pretrained weights, so there is no init to interpolate towards")
    if not (run / "genotype.json").is_file():
        raise RunFolderError(f"{run} is not a retrain run folder: genotype.json is missing")
    geno = Genotype.load(run / "genotype.json")
    recipe = recipe.model_copy(update={"device": "cpu"})
    seed_everything(recipe.seed)  # as build_context: seed, device settings, dataset, then the network
    dev = device_context("cpu", False, False)
    dataset = build_run_dataset(recipe, run)
    ctx = RunContext(recipe=recipe, run_dir=run, device=dev, dataset=dataset, writer=None, progress=False)
    net = geno.build(num_classes=dataset.num_train_pids)
    ctx.init_weights(net)
    prepare = getattr(METHODS.get(recipe.training.method), "prepare_network", None)
    if prepare is not None:
        net = prepare(net, recipe)
    return net.eval()


def _fmt(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"


def _cell(v: Optional[str]) -> str:
    return f"{float(v):.2f}" if v else "-"


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def _row(alpha: float, results: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    row = {"alpha": f"{alpha:g}"}
    for key, res in results.items():
        for m in METRICS:
            row[f"{key}/{m}"] = _fmt(float(res.get(m, float("nan"))))
    return row


def _floats(rows: list[dict[str, str]], col: str) -> list[float]:
    return [float(r[col]) if r.get(col) else float("nan") for r in rows]


def _report(out: Path, fields: list[str], rows: list[dict[str, str]], run: Path) -> None:
    """``wise_ft.md`` (table sorted by alpha, best alphas, zero-shot / fine-tuned rows) and ``wise_ft.png``."""
    rows = sorted(rows, key=lambda r: float(r["alpha"]))
    keys = [f[: -len("/mAP")] for f in fields if f.endswith("/mAP")]
    same = [k for k in keys if k.endswith("(same-domain)")]
    cross = [k for k in keys if k not in same]
    alphas = [float(r["alpha"]) for r in rows]

    def cross_mean(r: dict[str, str]) -> float:
        v = [float(r[f"{k}/mAP"]) for k in cross if r.get(f"{k}/mAP")]
        return sum(v) / len(v) if v else float("nan")

    lines = [f"# WiSE-FT: {os.path.relpath(run)}", "",  # relative to the current folder: no machine path
             "theta_alpha = (1 - alpha) * theta_0 (the run's `model.pretrained` init) + alpha * theta_1 (its "
             "fine-tuned weights); Wortsman et al., CVPR 2022, Eq. 1. rank-1 / mAP / mINP in percent.", "",
             "| alpha | " + " | ".join(f"{k} {m}" for k in keys for m in METRICS) + " |",
             "|---:|" + "---:|" * (len(keys) * len(METRICS))]
    for r in rows:
        lines.append(f"| {r['alpha']} | " + " | ".join(_cell(r.get(f"{k}/{m}")) for k in keys for m in METRICS) + " |")

    def best(score) -> str:
        vals = [(score(r), r) for r in rows]
        vals = [(v, r) for v, r in vals if not math.isnan(v)]
        if not vals:
            return "-"
        v, r = max(vals, key=lambda x: x[0])
        return f"alpha {r['alpha']} (mAP {v:.2f})"

    summary = []
    if same:
        summary.append(f"best same-domain ({same[0]}): " + best(lambda r: float(r[f"{same[0]}/mAP"] or "nan")))
    if cross:
        what = cross[0] if len(cross) == 1 else f"mean of {len(cross)} targets"
        summary.append(f"best cross-domain ({what}): " + best(cross_mean))
    for a, name in ((0.0, "zero-shot"), (1.0, "fine-tuned")):
        r0 = next((r for r in rows if float(r["alpha"]) == a), None)
        if r0 is not None:
            summary.append(f"alpha {a:g} ({name}): " + ", ".join(f"{k} mAP {_cell(r0.get(f'{k}/mAP'))}"
                                                                 for k in keys))
    lines += ["", "; ".join(summary) + ".", ""]
    (out / "wise_ft.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    if same and cross:
        x = _floats(rows, f"{same[0]}/mAP")
        for k in cross:
            y = _floats(rows, f"{k}/mAP")
            ax.plot(x, y, "o-", label=k)
            for a, xi, yi in zip(alphas, x, y):
                ax.annotate(f"{a:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{same[0]} mAP (%)")
        ax.set_ylabel("cross-domain mAP (%)")
    else:  # one side only: mAP against alpha
        for k in keys:
            ax.plot(alphas, _floats(rows, f"{k}/mAP"), "o-", label=k)
        ax.set_xlabel("alpha (0: pretrained init, 1: fine-tuned)")
        ax.set_ylabel("mAP (%)")
    ax.set_title("WiSE-FT: weight-space interpolation (points: alpha)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "wise_ft.png", dpi=120)
    plt.close(fig)


def run_wise_ft(run_dir: str | os.PathLike, alphas: Sequence[float], targets: Optional[list[DatasetRef]] = None,
                out: Optional[str | os.PathLike] = None, same_domain: bool = True,
                device: Optional[str] = None) -> Path:
    """The WiSE-FT curve of a retrain run (Wortsman et al., CVPR 2022, Eq. 1; ``nasreid interpolate RUN``).

    For each ``alpha`` the run's network (:func:`~nasreid.engine.runs.load_run_model`) gets
    ``interpolate_state(theta_0, theta_1, alpha)`` -- ``theta_0`` from :func:`pretrained_init`, ``theta_1`` the
    run's ``model.pt``, the identity classifier taken from ``theta_1`` (retrieval evaluates the embedding, not the
    classifier) -- and is evaluated by :func:`~nasreid.evaluation.runner.evaluate_run_model` with the run's
    ``eval`` settings: the training dataset's test split (``same_domain``) and ``targets`` (default the recipe's
    ``eval.targets``). ``alpha = 1`` gives the run's own figures, ``alpha = 0`` the zero-shot figures of the init.

    Writes into ``out`` (default ``RUN/wise_ft``): ``wise_ft.csv`` (``alpha``, then ``<dataset key>/rank1``,
    ``/mAP``, ``/mINP`` in percent, 6 decimals, per evaluated dataset; one row appended per alpha as it finishes),
    ``wise_ft.md`` (the table sorted by alpha; the best alpha same-domain and cross-domain by mAP; the alpha 0 / 1
    rows) and ``wise_ft.png`` (same-domain mAP against cross-domain mAP, one annotated point per alpha). Resumable:
    alphas already in the CSV are skipped.

    Returns:
        ``out``.

    Raises:
        RunFolderError / CheckpointError / GenotypeError: not a retrain run folder.
        RecipeError: the run has no ``model.pretrained``; an ``alpha`` outside ``[0, 1]``; bad targets; nothing to
            evaluate (no same-domain split and no target); ``wise_ft.csv`` holds other datasets' columns.
        InterpolationError: the init's and the run's state dicts do not match (a key or shape, named).
        PretrainedWeightsError: the run's ``model.pretrained`` file cannot be read or does not fit.
    """
    from nasreid.engine.progress import progress_enabled
    from nasreid.engine.runs import build_run_dataset, load_run_model, setup_logging
    from nasreid.engine.trainer import device_context
    from nasreid.engine.validate import check_recipe
    from nasreid.evaluation.runner import evaluate_run_model

    run = Path(run_dir)
    setup_logging(None)
    alphas = [float(a) for a in alphas]
    bad = [a for a in alphas if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
    if bad or not alphas:
        raise RecipeError(f"alpha: {bad[0] if bad else 'none given'}: mixing coefficients must be in [0, 1]")
    model, recipe, _ = load_run_model(run, device=device)
    theta0 = pretrained_init(run).state_dict()
    theta1 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keep = classifier_keys(model)
    interpolate_state(theta0, theta1, 1.0, take_from_1=keep)  # key / shape errors before any evaluation
    if targets is None:
        targets = list(recipe.eval.targets)
    if targets:
        check_recipe(recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"targets": list(targets)})}))
    if not same_domain and not targets:
        raise RecipeError("nothing to evaluate: --no-same-domain and no target (the recipe's eval.targets is empty)")
    dataset = build_run_dataset(recipe, run) if same_domain else None
    out_dir = run / "wise_ft" if out is None else Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "wise_ft.csv"
    fields, rows = _read_csv(csv_path)
    done = {round(float(r["alpha"]), 10) for r in rows}
    ctx = device_context(recipe.device, recipe.amp, recipe.channels_last)
    net = ctx.model(model)
    todo = [a for a in alphas if round(a, 10) not in done]
    if len(todo) < len(alphas):
        log.info("wise-ft: %d of %d alphas already in %s", len(alphas) - len(todo), len(alphas), csv_path)
    for a in todo:
        net.load_state_dict(interpolate_state(theta0, theta1, a, take_from_1=keep))
        net.eval()
        res = evaluate_run_model(net, recipe, ctx, dataset=dataset, targets=targets, same_domain=same_domain,
                                 progress=progress_enabled())
        row = _row(a, res)
        if fields and list(row) != fields:
            raise RecipeError(f"{csv_path} holds the columns {', '.join(fields[1:])}; this evaluation gives "
                              f"{', '.join(list(row)[1:])} (other targets: use another --out)")
        new = not fields
        fields = list(row)
        with open(csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerow(row)
        rows.append(row)
        log.info("wise-ft alpha %g: %s", a, ", ".join(f"{k} mAP {r['mAP']:.2f}" for k, r in res.items()))
    if rows:
        _report(out_dir, fields, rows, run)
    return out_dir
