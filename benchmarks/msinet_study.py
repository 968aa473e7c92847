"""MSINet ablations on real data at CPU scale: search schemes (Fig. 5(a)) and architectures (Fig. 5(b)).

Gu et al., "MSINet: Twins Contrastive Search of Multi-Scale Interaction for Object ReID", CVPR 2023,
Sec. 4.5 and Fig. 5(a)/(b); Sec. 3.3 / Table 5 for the Spatial Alignment Module.

Every arm is retrained with the SAME recipe (``recipes/msinet_cpu_retrain.yaml``: CUHK01 split seed 0, width
x0.25, 128x64, same epochs and seed) and evaluated on CUHK01's test split (same domain) and on CUHK03
(cross-domain, CUHK01 -> CUHK03). Arms:

* searches with ``recipes/msinet_cpu.yaml`` (same data, epochs, seed): ``tcm`` (the paper's scheme, default
  split), ``tcm_overlap`` (memories, overlap 1), ``ce_overlap`` (cross entropy + classifier, overlap 1);
* presets: ``msinet_paper`` (Table 1) and the four single-operation nets;
* a uniformly random genotype (seed 0);
* the ``tcm`` searched net retrained with SAM (``lambda_sa`` = 2.0).

Runs go to ``--runs`` (default ``runs/msinet_study``); an arm whose run already holds an evaluation is
skipped and an interrupted one is resumed, so the script can be re-run until everything is done. The table is
written to ``--out`` (``results/msinet_cpu_study``) as ``table.md`` and ``summary.json`` with the searched
genotypes.

Usage::

    NASREID_DATA=../shared/data python benchmarks/msinet_study.py            # all arms (about 1 h on 2 cores)
    python benchmarks/msinet_study.py --arms search_tcm,preset_msinet_paper  # some arms
    python benchmarks/msinet_study.py --table-only                           # rebuild the table
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ROOT / "recipes" / "msinet_cpu.yaml"
RETRAIN = ROOT / "recipes" / "msinet_cpu_retrain.yaml"
SCHEMES = {"tcm": [], "tcm_overlap": ["strategy.kwargs.scheme=tcm_overlap", "strategy.kwargs.overlap=1.0"],
           "ce_overlap": ["strategy.kwargs.scheme=ce_overlap", "strategy.kwargs.overlap=1.0"]}
PRESETS = ["msinet_paper", "msinet_none", "msinet_exchange", "msinet_gate", "msinet_attention"]
ORDER = ["search_tcm", "preset_msinet_paper", "random_seed0", "search_tcm_overlap", "search_ce_overlap",
         "search_tcm_sam", "preset_msinet_gate", "preset_msinet_attention", "preset_msinet_none",
         "preset_msinet_exchange"]


def _done(run: Path, key: str) -> bool:
    m = run / "metrics.json"
    return m.is_file() and key in json.loads(m.read_text())


def _run(cmd: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.time() - t


def _search(runs: Path, scheme: str) -> Path:
    run = runs / f"search_{scheme}"
    if not _done(run, "search_done"):
        cmd = ["nasreid", "search", "--no-retrain"]
        cmd += ["--resume", str(run)] if (run / "recipe.yaml").is_file() else [str(SEARCH), "--out", str(run)]
        for s in SCHEMES[scheme]:
            cmd += ["--set", s]
        _run(cmd, runs / "logs" / f"search_{scheme}.log")
    return run / "genotype.json"


def _train(runs: Path, arm: str, genotype: str, extra: list[str] = ()) -> Path:
    run = runs / f"train_{arm}"
    if not _done(run, "evaluation"):
        if (run / "recipe.yaml").is_file():
            cmd = ["nasreid", "train", "--resume", str(run)]
        else:
            cmd = ["nasreid", "train", str(RETRAIN), "--genotype", genotype, "--out", str(run)]
            for s in extra:
                cmd += ["--set", s]
        _run(cmd, runs / "logs" / f"train_{arm}.log")
    return run


def random_genotype(path: Path, seed: int = 0) -> Path:
    """A uniformly random msinet genotype (one value per choice drawn with ``random.Random(seed)``)."""
    from nasreid.genotype import Genotype
    from nasreid.search_spaces.msinet import CHOICE_LABELS, OPS

    rng = random.Random(seed)
    g = Genotype(space="msinet", choices={k: rng.choice(OPS) for k in CHOICE_LABELS},
                 provenance={"rule": f"uniform random sample, random.Random({seed})"})
    path.parent.mkdir(parents=True, exist_ok=True)
    g.save(path)
    return path


def arm_run(runs: Path, arm: str) -> Path:
    """The retrain run of ``arm``: ``train_<arm>``, or the search's own ``then_retrain`` run when the search
    was started as ``nasreid search recipes/msinet_cpu.yaml --out <runs>/search_<scheme>`` (with retrain)."""
    if arm.startswith("search_") and arm != "search_tcm_sam":
        m = runs / arm / "metrics.json"
        prev = json.loads(m.read_text()).get("retrain_run") if m.is_file() else None
        if prev and _done(Path(prev), "evaluation"):
            return Path(prev)
    return runs / f"train_{arm}"


def run_arm(arm: str, runs: Path) -> Path:
    if arm.startswith("search_") and arm != "search_tcm_sam":
        scheme = arm[len("search_"):]
        if _done(arm_run(runs, arm), "evaluation"):
            return arm_run(runs, arm)
        return _train(runs, arm, str(_search(runs, scheme)))
    if arm == "search_tcm_sam":
        return _train(runs, arm, str(_search(runs, "tcm")), ["loss.kwargs.sam_weight=2.0"])
    if arm.startswith("preset_"):
        return _train(runs, arm, f"preset:{arm[len('preset_'):]}")
    if arm.startswith("random_seed"):
        seed = int(arm[len("random_seed"):])
        return _train(runs, arm, str(random_genotype(runs / f"random_seed{seed}.json", seed)))
    raise SystemExit(f"unknown arm {arm!r}; arms: {', '.join(ORDER)}")


def table(runs: Path, out: Path) -> str:
    """Markdown table (rank-1 / mAP / mINP in %, CUHK01 and CUHK01->CUHK03) + summary.json."""
    rows, summary = [], {}
    for arm in ORDER:
        run = arm_run(runs, arm)
        if not _done(run, "evaluation"):
            continue
        m = json.loads((run / "metrics.json").read_text())
        ev = m["evaluation"]
        same = next((v for k, v in ev.items() if k.startswith("cuhk01")), None)
        cross = next((v for k, v in ev.items() if k.startswith("cuhk03")), None)
        geno = m["genotype"]
        summary[arm] = {"genotype": geno, "evaluation": ev, "train_seconds": m.get("train_seconds")}
        search = runs / f"search_{arm.split('_', 1)[1]}" if arm.startswith("search_") else None
        if arm == "search_tcm_sam":
            search = runs / "search_tcm"
        if search is not None and (search / "metrics.json").is_file():
            sm = json.loads((search / "metrics.json").read_text())
            summary[arm]["search_seconds"] = sm.get("search_seconds")
            summary[arm]["search_probabilities"] = sm.get("final_probabilities")
        short = " ".join("".join(v[0].upper() for v in (geno[f"cell{c}_im1"], geno[f"cell{c}_im2"]))
                         for c in range(1, 7))

        def fmt(r):
            return f"{r['rank1']:.2f} / {r['mAP']:.2f} / {r.get('mINP', float('nan')):.2f}" if r else "-"

        rows.append(f"| {arm} | {short} | {fmt(same)} | {fmt(cross)} |")
    md = ("| arm | genotype (cells 1-6) | CUHK01 R1 / mAP / mINP | CUHK01->CUHK03 R1 / mAP / mINP |\n"
          "|---|---|---|---|\n" + "\n".join(rows) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "msinet_study"))
    ap.add_argument("--out", default=str(ROOT / "results" / "msinet_cpu_study"))
    ap.add_argument("--arms", default=",".join(ORDER), help="comma-separated arms, in order")
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args(argv)
    runs, out = Path(a.runs), Path(a.out)
    if not a.table_only:
        for arm in a.arms.split(","):
            t = time.time()
            run_arm(arm.strip(), runs)
            print(f"{arm}: done in {time.time() - t:.0f} s", flush=True)
            print(table(runs, out), flush=True)
    print(table(runs, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
