"""The study report: :func:`collect_results` (one row per retrain job: metrics on every evaluation, complexity,
search cost and entropy) and :func:`build_report` (``study_report.md``, ``study_results.csv`` and the plots of
:mod:`nasreid.study.plots`)."""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from nasreid.config import DatasetRef, load_recipe

from .jobs import (
    DONE,
    StudyJob,
    _as_study,
    _read_json,
    enumerate_jobs,
    evaluation_tag,
    find_evaluation,
    find_tagged_evaluation,
)
from .plots import _plot, _plot_entropy, _plot_triplet, _triplet_margin
from .schema import StudyRecipe
from .statistics import BootstrapResult, _finite, decision_entropy, genotype_agreement, paired_bootstrap

METRICS = ("rank1", "mAP", "mINP")


def _shown(path: Union[str, os.PathLike], base: Optional[Union[str, os.PathLike]] = None) -> str:
    """A path as the report shows it: relative to ``base`` (default the current folder; a study's folder for its run
    folders) when below it, else its name (a committed report carries no machine's absolute paths)."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path(base if base is not None else Path.cwd()).resolve()).as_posix()
    except ValueError:
        return p.name


def _search_seconds(metrics: Mapping[str, Any], genotype: Mapping[str, Any]) -> float:
    """A search's cost in seconds as the study reports it: the supernet's summed epoch time (``metrics.json``
    ``search_seconds``) plus, for a strategy that selects on validation (spos, gumbel ``validate_top_k``), the
    seconds it spent scoring candidates (the genotype's provenance ``scoring_seconds``); ``nan`` without a search."""
    scoring = (genotype.get("provenance") or {}).get("scoring_seconds", 0.0)
    return float(metrics.get("search_seconds", float("nan"))) + float(scoring)


def _job_search_seconds(job: StudyJob) -> float:
    """:func:`_search_seconds` of a search job's run folder."""
    g = job.run_dir / "genotype.json"
    return _search_seconds(job.metrics(), _read_json(g) if g.is_file() else {})


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
    :mod:`nasreid.models.complexity`); ``search_seconds`` (:func:`_search_seconds`), ``entropy_mean``
    (mean over decisions of the entropy of the search's final probabilities, nats), ``entropy_max`` (mean
    ``log k``), ``train_seconds``, ``device`` (the retrain's), ``train_triplet`` / ``train_acc`` (the retrain's
    last-epoch training triplet loss and accuracy: a triplet term that ends at about its margin marks a retrain whose
    training features do not separate the identities by the margin; in the CPU study those runs had the lowest test
    mAP), ``genotype`` (the choices in label order), ``run_dir``, ``search_run`` (relative to the study's folder).

    Raises:
        RecipeError / RunFolderError: see :func:`enumerate_jobs`.
    """
    from nasreid.genotype import Genotype, GenotypeError, preset_genotype

    study = _as_study(recipe)
    if study.retrain_arms:
        return _methods_rows(study)
    retrain = load_recipe(study.retrain.recipe)
    size = (retrain.data.height, retrain.data.width)
    cols = _eval_columns(study)
    rows = []
    for job in (j for j in enumerate_jobs(study) if j.phase == "train" and j.kind != "ranked"):  # ranked: the
        m = job.metrics()                                                # ranking section (nasreid.study.ranking)
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
        sg = (_read_json(job.search_run / "genotype.json")
              if job.search_run is not None and (job.search_run / "genotype.json").is_file() else {})
        row["search_seconds"] = _search_seconds(sm, sg)
        probs = sm.get("final_probabilities")
        if probs is None:
            probs = sg.get("probabilities")
        ent = decision_entropy(probs or {})
        row["entropy_mean"] = float(np.mean([h for h, _ in ent.values()])) if ent else float("nan")
        row["entropy_max"] = float(np.mean([k for _, k in ent.values()])) if ent else float("nan")
        row["train_seconds"] = float(m.get("train_seconds", float("nan")))
        last = (m.get("history") or [{}])[-1]
        row["train_triplet"] = float(last.get("triplet", float("nan")))  # a term stuck at its margin: see README
        row["train_acc"] = float(last.get("acc", float("nan")))
        row["device"] = str(m.get("device", ""))
        row["run_dir"] = _shown(job.run_dir, study.study_dir)
        row["search_run"] = _shown(job.search_run, study.study_dir) if job.search_run is not None else ""
        rows.append(row)
    return rows


def _methods_rows(study: StudyRecipe) -> list[dict[str, Any]]:
    """:func:`collect_results` of a methods study: one row per (train job, evaluation) and per (zero-shot job,
    owner). ``source`` is ``<arm>[+<evaluation>]/<genotype>``; ``arm``, ``evaluation`` ("" for the run's own),
    ``genotype`` (the name), ``kind`` (``hand`` / ``fixed`` trained, ``zero_shot``), ``retrain_seed`` ("" for
    zero-shot), ``split``, ``status`` (``done`` when every dataset of that evaluation is there), metrics in % per
    evaluation column (``nan`` when missing; a zero-shot row's ``same`` is its evaluation of the training dataset's
    test split), ``train_seconds``, ``train_acc`` (last epoch), ``device`` and ``run_dir`` (relative to the study's
    folder)."""
    cols = _eval_columns(study)
    rows: list[dict[str, Any]] = []
    for job in enumerate_jobs(study):
        m = job.metrics()
        ev = m.get("evaluation") or {}
        if job.phase == "zero_shot":
            entries: list[tuple[str, dict]] = [(o, {}) for o in job.owners]
        else:
            entries = [(str(job.retrain_arm), {}), *((f"{job.retrain_arm}+{n}", v) for n, v in job.variants)]
        for label, vsets in entries:
            row: dict[str, Any] = {"source": f"{label}/{job.arm}", "arm": label.split("+")[0],
                                   "evaluation": label.split("+", 1)[1] if "+" in label else "",
                                   "genotype": job.arm, "kind": job.kind,
                                   "retrain_seed": job.retrain_seed if job.retrain_seed is not None else "",
                                   "split": job.split}
            vals = {}
            for pre, _, ref in cols:
                if job.phase == "zero_shot":
                    r = find_evaluation(ev, job.targets[0] if ref is None else ref)
                else:
                    r = find_tagged_evaluation(ev, ref, evaluation_tag(vsets) if vsets else "")
                vals[pre] = r
                for met in METRICS:
                    row[f"{pre}_{met}"] = float((r or {}).get(met, float("nan")))
            row["status"] = DONE if all(v is not None for v in vals.values()) else job.state()
            last = (m.get("history") or [{}])[-1]
            row["train_seconds"] = float(m.get("train_seconds", float("nan")))
            row["train_acc"] = float(last.get("acc", float("nan")))
            row["device"] = str(m.get("device", ""))
            row["run_dir"] = _shown(job.run_dir, study.study_dir)
            rows.append(row)
    return rows


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
        assert st.selection is not None and st.search is not None  # sel_col: a selection; arms: a search section
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
            secs = _ms([_job_search_seconds(j) for j in runs], "{:.0f}")
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
            ss = [_job_search_seconds(j) for j in self.searches if j.arm == s]
            ts = [r["train_seconds"] for r in self.done if r["source"] == s]
            tm = [r for r in self.done if r["source"] == s]  # collect_results already read their metrics.json
            body.append([s, len(ss), len(ts), _ms(ss, "{:.1f}"), _ms(ts, "{:.1f}"),
                         f"{devices(sm) if sm else '–'} / {devices(tm)}"])
        tot_s = sum(_finite(_job_search_seconds(j) for j in self.searches))
        scoring = any((_read_json(j.run_dir / "genotype.json").get("provenance") or {}).get("scoring_seconds")
                      for j in self.searches if (j.run_dir / "genotype.json").is_file())
        body.append(["all", len(self.searches), len(self.done), f"{tot_s:.1f} in all",
                     f"{sum(_finite(r['train_seconds'] for r in self.done)):.1f} in all", ""])
        return ["## Cost\n", "Seconds of training (summed epoch times, evaluation excluded"
                + ("; a search that selects on validation adds the wall seconds of scoring its candidates"
                   if scoring else "")
                + "), mean ± std per run; seconds compare only between runs on the same device (last column).\n",
                *_table(["source", "searches", "retrains", "search s", "retrain s", "device (search / retrain)"],
                        body)]

    def points(self) -> list[str]:
        def cell(r, pre):
            return " / ".join("–" if not math.isfinite(r[f"{pre}_{m}"]) else f"{r[f'{pre}_{m}']:.2f}" for m in METRICS)

        def num(x, fmt="{:.3f}"):
            return "–" if not math.isfinite(x) else fmt.format(x)

        body = [[r["source"], r["split"], r["search_seed"], r["retrain_seed"],
                 *(cell(r, pre) for pre, _, _ in self.cols),
                 f"{num(r['train_triplet'])} / {num(r['train_acc'], '{:.2f}')}", r["genotype"]] for r in self.done]
        L = ["## All points\n",
             "\"train triplet / acc\": the retrain's training loss terms at its last epoch (the triplet margin is "
             "the recipe's `loss.kwargs.triplet_margin`; a value at about the margin means the training features do "
             "not separate the identities by the margin).\n"]
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


def _cells(r: Mapping[str, Any], pre: str) -> str:
    return " / ".join("–" if not math.isfinite(r[f"{pre}_{m}"]) else f"{r[f'{pre}_{m}']:.2f}" for m in METRICS)


@dataclass
class _MethodsReport:
    """The report of a methods study (``retrain_arms``): per (arm [+ evaluation], genotype) its trained runs and
    its zero-shot init, and paired comparisons over (split, retrain seed) units."""

    study: StudyRecipe
    rows: list[dict]
    jobs: list[StudyJob]
    out_dir: Path

    def __post_init__(self) -> None:
        st = self.study
        self.cols = _eval_columns(st)
        self.done = [r for r in self.rows if r["status"] == DONE]
        self.trained = [r for r in self.done if r["kind"] != "zero_shot"]
        self.labels: list[str] = []  # <arm> and <arm>+<evaluation>, recipe order
        for a in st.retrain_arms:
            self.labels += [a.name, *(f"{a.name}+{e.name}" for e in a.evaluations)]
        self.pairs_of: dict[str, list[str]] = {}  # label -> its genotypes
        for a in st.retrain_arms:
            for lab in [a.name, *(f"{a.name}+{e.name}" for e in a.evaluations)]:
                self.pairs_of[lab] = st.arm_genotypes(a)

    def _boot(self, a: Sequence[float], b: Sequence[float]) -> str:
        bs = self.study.bootstrap
        return _fmt_ci(paired_bootstrap(a, b, n_boot=bs.n_boot, seed=bs.seed, level=bs.level))

    def _units(self, source: str, col: str) -> dict:
        """``{(split, retrain_seed): value}`` of a trained source."""
        return {(r["split"], r["retrain_seed"]): r[col] for r in self.trained
                if r["source"] == source and math.isfinite(r[col])}

    def _zero(self, source: str, col: str) -> dict:
        """``{split: value}`` of a source's zero-shot init."""
        return {r["split"]: r[col] for r in self.done
                if r["kind"] == "zero_shot" and r["source"] == source and math.isfinite(r[col])}

    def header(self) -> list[str]:
        st, jobs = self.study, self.jobs
        tgt = ", ".join(f"`{t.name}`" + (f" ({t.root})" if t.root else "") for t in st.evaluation.targets) or "none"
        L = [f"# Study `{st.name}`\n",
             f"Jobs finished: {sum(j.state() == DONE for j in jobs)} of {len(jobs)} "
             f"({sum(j.phase == 'train' for j in jobs)} trainings, {sum(j.phase == 'zero_shot' for j in jobs)} "
             f"zero-shot evaluations). Splits ({st.split_key}): {st.splits}; retrain seeds: {st.retrain.seeds}.",
             f"Evaluation: the training dataset's own test split of each split (same-domain) and {tgt} "
             "(cross-domain). All metrics in %; mean ± sample std over every finished run (splits x seeds).",
             "Zero-shot: the arm's init (its `model.pretrained` file, loaded as the run loads it) evaluated without "
             "training by `nasreid evaluate --weights`, with the arm's input size and evaluation settings (a trained "
             "matcher such as QAConv's has no zero-shot form: distance evaluation instead).\n",
             "Retrain arms (each trains every genotype it lists with the same seeds and splits):\n"]
        for a in st.retrain_arms:
            sets = ", ".join(f"`{k}={_yaml_short(v)}`" for k, v in a.set.items()) or "none"
            evs = "; ".join(f"`{e.name}`: " + ", ".join(f"`{k}={_yaml_short(v)}`" for k, v in e.set.items())
                            for e in a.evaluations) or "none"
            L.append(f"- **{a.name}**: recipe `{_shown(a.recipe or st.retrain.recipe)}`; set {sets}; genotypes "
                     f"{', '.join(st.arm_genotypes(a))}; extra evaluations {evs}")
        return L + [""]

    def per_source(self) -> list[str]:
        body = []
        for lab in self.labels:
            for g in self.pairs_of[lab]:
                src = f"{lab}/{g}"
                rs = [r for r in self.trained if r["source"] == src]
                body.append([lab, g, "trained", len(rs), *(" / ".join(_ms(r[f"{pre}_{m}"] for r in rs) for m in METRICS)
                                                         for pre, _, _ in self.cols)])
                zs = [r for r in self.done if r["kind"] == "zero_shot" and r["source"] == src]
                if self.study.zero_shot:
                    body.append([lab, g, "zero-shot", len(zs),
                                 *(" / ".join(_ms(r[f"{pre}_{m}"] for r in zs) for m in METRICS)
                                   for pre, _, _ in self.cols)])
        L = ["## Results per arm and genotype\n",
             *_table(["arm", "genotype", "", "n", *(f"{t} R1 / mAP / mINP" for _, t, _ in self.cols)], body)]
        srcs = [f"{lab}/{g}" for lab in self.labels for g in self.pairs_of[lab]]
        for pre, title, _ in self.cols:
            p = _plot(self.trained, srcs, f"{pre}_mAP", f"{self.study.name}: mAP, {title}",
                      self.out_dir / "plots" / f"mAP_{pre}.png")
            if p is not None:
                L.append(f"![mAP {title}](plots/{p.name})")
        return L + [""]

    def _pair_list(self) -> list[tuple[str, str, str]]:
        """``(X, Y, what)`` of the paired comparisons (sources ``<label>/<genotype>``; Y ``zero-shot`` = X's init)."""
        st = self.study
        out: list[tuple[str, str, str]] = []
        if st.zero_shot:
            out += [(f"{lab}/{g}", "zero-shot", "training") for lab in self.labels for g in self.pairs_of[lab]]
        for a in st.retrain_arms:
            for e in a.evaluations:
                out += [(f"{a.name}+{e.name}/{g}", f"{a.name}/{g}", "evaluation") for g in st.arm_genotypes(a)]
        for i, x in enumerate(self.labels):
            for y in self.labels[:i]:
                xv, yv = x.split("+", 1)[1:] or [""], y.split("+", 1)[1:] or [""]
                if x.split("+")[0] == y.split("+")[0] or xv != yv:
                    continue
                out += [(f"{x}/{g}", f"{y}/{g}", "method") for g in self.pairs_of[x] if g in self.pairs_of[y]]
        for lab in self.labels:
            gs = self.pairs_of[lab]
            out += [(f"{lab}/{g}", f"{lab}/{gs[0]}", "genotype") for g in gs[1:]]
        return out

    def paired(self) -> list[str]:
        bs = self.study.bootstrap
        L = ["## Paired comparisons\n",
             f"Difference X − Y over the (split, retrain seed) units both have; \"zero-shot\": X's own init on the "
             f"same split (what the training added or cost). Rows: trained − zero-shot; an extra evaluation − the "
             f"run's own; an arm − each earlier arm (same evaluation, same genotype); a genotype − the arm's first "
             f"genotype. Interval: {bs.level:.0%} percentile bootstrap over units ({bs.n_boot} resamples, Efron & "
             f"Tibshirani 1993, Ch. 13); with a handful of units it is optimistic (narrow): an interval that includes "
             f"0 means no evidence of a difference.\n"]
        pairs = self._pair_list()
        for pre, title, _ in self.cols:
            L.append(f"### {title}\n")
            body = []
            for x, y, what in pairs:
                cells, n = [], 0
                for met in METRICS:
                    col = f"{pre}_{met}"
                    vx = self._units(x, col)
                    if y == "zero-shot":
                        z = self._zero(x, col)
                        vy = {u: z[u[0]] for u in vx if u[0] in z}
                    else:
                        vy = self._units(y, col)
                    units = sorted(set(vx) & set(vy))
                    n = max(n, len(units))
                    cells.append(self._boot([vy[u] for u in units], [vx[u] for u in units]) if units else "–")
                body.append([f"{x} − {y}", what, n, *cells])
            L += _table(["X − Y", "what", "n", "Δ rank-1 [CI]", "Δ mAP [CI]", "Δ mINP [CI]"], body)
        return L

    def cost(self) -> list[str]:
        body = []
        for a in self.study.retrain_arms:
            for g in self.study.arm_genotypes(a):
                rs = [r for r in self.trained if r["source"] == f"{a.name}/{g}"]
                body.append([a.name, g, len(rs), _ms([r["train_seconds"] for r in rs], "{:.1f}"),
                             ", ".join(sorted({r["device"] for r in rs if r["device"]})) or "–"])
        return ["## Cost\n", "Seconds of training (summed epoch times, evaluation excluded), mean ± std per run; "
                "seconds compare only between runs on the same device.\n",
                *_table(["arm", "genotype", "runs", "train s", "device"], body)]

    def points(self) -> list[str]:
        body = [[r["source"], r["kind"], r["split"], r["retrain_seed"], *(_cells(r, pre) for pre, _, _ in self.cols)]
                for r in self.done]
        return ["## All points\n",
                *_table(["source", "kind", "split", "retrain seed", *(f"{t} R1 / mAP / mINP" for _, t, _ in self.cols)],
                        body),
                "Per-row values with train seconds and devices: `study_results.csv`.\n"]


def _yaml_short(v: Any) -> str:
    from .jobs import _yaml_value

    return _yaml_value(v)


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
    if study.retrain_arms:
        mr = _MethodsReport(study, rows, enumerate_jobs(study), out_dir)
        path = out_dir / "study_report.md"
        path.write_text("\n".join([*mr.header(), *mr.per_source(), *mr.paired(), *mr.cost(), *mr.points()]))
        return path
    rep = _Report(study, rows, enumerate_jobs(study), out_dir)
    lines = [*rep.header(), *rep.per_source(), *rep.selection(), *rep.paired(), *rep.decided(), *rep.agreement(),
             *rep.cost(), *rep.points()]
    if study.ranking is not None:
        from .ranking import build_ranking_report

        lines += build_ranking_report(study, out_dir)
    path = out_dir / "study_report.md"
    path.write_text("\n".join(lines))
    return path
