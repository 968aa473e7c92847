"""DomainMix vs DirectMix vs A only vs B with true labels on 2 CPU cores (``recipes/domainmix_cpu.yaml``).

Every arm is a plain ``nasreid train recipes/domainmix_cpu.yaml --genotype preset:osnet`` with one ``--set``
(the same network, data, schedule, seed and number of steps), run one after the other into
``results/domainmix_cpu_<arm>/``; a finished arm is skipped, an interrupted one resumed (``--resume``). Then the
table ``results/domainmix_cpu.md`` (+ ``.json``) is written from the run folders' ``metrics.json``: CUHK01-test
(B's domain, identities never trained on) and CUHK03 (never seen) rank-1 / mAP / mINP, the synthetic test split
(A's domain), the last epoch's pseudo-label statistics and the wall time of each run.

Usage: python benchmarks/domainmix_cpu.py [--arms domainmix directmix a_only b_true] [--table-only]
       (needs ``NASREID_DATA`` pointing at the folder with ``cuhk01/`` and ``cuhk03/``)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/domainmix_cpu.yaml"
ARMS = {
    "domainmix": ("DomainMix (pseudo labels, discriminator + L_dm)", []),
    "directmix": ("DirectMix (pseudo labels, no discriminator)", ["training.kwargs.adversarial=false"]),
    "a_only": ("A only (synthetic)", ["training.kwargs.unlabelled=null"]),
    "b_true": ("A + B with true labels (DirectMix, upper bound)",
               ["training.kwargs.b_labels=true", "training.kwargs.adversarial=false"]),
}


def run_arm(arm: str, out_root: Path) -> None:
    run = out_root / f"domainmix_cpu_{arm}"
    metrics = run / "metrics.json"
    if metrics.is_file() and "evaluation" in json.loads(metrics.read_text()):
        print(f"{arm}: finished, skipped")
        return
    if (run / "checkpoints" / "last.pt").is_file():
        cmd = [sys.executable, "-m", "nasreid", "train", "--resume", str(run)]
    else:
        cmd = [sys.executable, "-m", "nasreid", "train", RECIPE, "--genotype", "preset:osnet", "--out", str(run)]
        for s in ARMS[arm][1]:
            cmd += ["--set", s]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.time() - t0
    side = run / "wall_seconds.json"
    prev = json.loads(side.read_text()) if side.is_file() else []
    side.write_text(json.dumps(prev + [round(wall, 1)]))


def _find(ev: dict, prefix: str) -> dict:
    for k, v in ev.items():
        if k.startswith(prefix):
            return v
    return {}


def table(out_root: Path, arms: list[str]) -> str:
    rows, data = [], {}
    for arm in arms:
        run = out_root / f"domainmix_cpu_{arm}"
        m = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
        if not m or "evaluation" not in m:
            rows.append(f"| {ARMS[arm][0]} | (not run) | | | | |")
            continue
        ev = m["evaluation"]
        c01, c03, syn = _find(ev, "cuhk01"), _find(ev, "cuhk03np"), _find(ev, "synthetic")
        last = m["history"][-1]
        walls = json.loads((run / "wall_seconds.json").read_text()) if (run / "wall_seconds.json").is_file() else []
        pl = (f"{last['clusters']} / {last['b_kept']} / {last.get('purity', float('nan')):.2f}"
              if "clusters" in last and arm != "b_true" else "-")
        disc = f"{last['disc_acc']:.2f}" if "disc_acc" in last else "-"

        def f(r):
            return f"{r['rank1']:.2f} / {r['mAP']:.2f} / {r['mINP']:.2f}" if r else "-"

        rows.append(f"| {ARMS[arm][0]} | {f(c01)} | {f(c03)} | {f(syn)} | {pl} | {disc} | "
                    f"{m['train_seconds']:.0f} / {sum(walls):.0f} |")
        data[arm] = {"cuhk01": c01, "cuhk03np": c03, "synthetic": syn, "last_epoch": last,
                     "train_seconds": m["train_seconds"], "wall_seconds": walls}
    head = ("| arm (same network, schedule, 2,400 steps) | CUHK01-test R1 / mAP / mINP | CUHK03 R1 / mAP / mINP | "
            "synthetic test R1 / mAP / mINP | last clustering: clusters / B images kept / purity | "
            "discriminator acc. (last epoch) | train s / wall s |\n|---|---|---|---|---|---|---|")
    (out_root / "domainmix_cpu.json").write_text(json.dumps(data, indent=1))
    text = head + "\n" + "\n".join(rows) + "\n"
    (out_root / "domainmix_cpu.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out-root", default=str(REPO / "results"))
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    out_root = Path(a.out_root)
    if not a.table_only:
        if not os.environ.get("NASREID_DATA"):
            sys.exit("set NASREID_DATA to the folder holding cuhk01/ and cuhk03/")
        for arm in a.arms:
            run_arm(arm, out_root)
    print(table(out_root, a.arms))


if __name__ == "__main__":
    main()
