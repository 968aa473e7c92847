"""The four-init fine-tune table (issue 21, item 4) from the run folders of ``recipes/osnet_finetune_cpu.yaml``:
one recipe and budget, four inits -- random, ImageNet OSNet-AIN (``preset osnet_ain_torchreid``), Market-1501
OSNet, MSMT17 OSNet (``preset osnet``; torchreid zoo files, x0.25) -- on CUHK01 splits 0-2 (same-domain, the
split's 486 test ids) and CUHK03 (cross-domain), with each run's time.

The run folders are ``<root>/<init>_split<k>_<time>/`` (``nasreid train recipes/osnet_finetune_cpu.yaml --set
name=<init>_split<k> --set data.dataset.kwargs.split_seed=<k> ...``, see ``docs/pretrained.md``); a
``walls.txt`` beside them (lines ``<init> split<k> rc=0 wall=<seconds>s``, written by the driver that ran them one
at a time) gives the wall-clock time of each whole command. Writes ``<root>/finetune_table.md`` and ``.csv``.

    python benchmarks/finetune_table.py results/finetune_cpu
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd

INITS = {"random": "random init", "imagenet_ain": "ImageNet OSNet-AIN", "market1501": "Market-1501 OSNet",
         "msmt17": "MSMT17 OSNet"}


def main(argv=None) -> int:
    root = Path((argv or sys.argv[1:] or ["results/finetune_cpu"])[0])
    walls = {}
    if (root / "walls.txt").is_file():
        for line in (root / "walls.txt").read_text().splitlines():
            m = re.match(r"(\w+) split(\d) rc=(\d+) wall=(\d+)s", line)
            if m:
                walls[(m[1], int(m[2]))] = (int(m[3]), int(m[4]))
    rows = []
    for run in sorted(root.iterdir()):
        m = re.match(r"(\w+?)_split(\d)_", run.name)
        if not m or not (run / "metrics.json").is_file():
            continue
        met = json.loads((run / "metrics.json").read_text())
        if "evaluation" not in met:
            continue
        ev = met["evaluation"]
        same = next(v for k, v in ev.items() if k.endswith("(same-domain)"))
        cross = next(v for k, v in ev.items() if k.startswith("cuhk03np"))
        rc, wall = walls.get((m[1], int(m[2])), (0, float("nan")))
        rows.append({"init": m[1], "split": int(m[2]), "cuhk01_rank1": same["rank1"], "cuhk01_mAP": same["mAP"],
                     "cuhk03_rank1": cross["rank1"], "cuhk03_mAP": cross["mAP"],
                     "train_seconds": met.get("train_seconds"),
                     "eval_seconds": same.get("seconds", 0) + cross.get("seconds", 0), "wall_seconds": wall,
                     "run": run.name})
    df = pd.DataFrame(rows).sort_values(["init", "split"])
    df.to_csv(root / "finetune_table.csv", index=False)
    lines = ["# Fine-tuning on CUHK01 from four inits (`recipes/osnet_finetune_cpu.yaml`, 2 CPU cores)\n",
             "OSNet x0.25 at 256x128, AMSGrad lr 0.0015, cosine, 10 epochs (the first 2 train the new classifier "
             "only), flip, label-smoothed CE; cosine distance. Rank-1 / mAP in %; time = the whole `nasreid train` "
             "command (training + both evaluations), run one at a time.\n",
             "| init | split | CUHK01 test R1 / mAP | CUHK01 -> CUHK03 R1 / mAP | train s | wall min |",
             "|---|---|---|---|---|---|"]
    order = [i for i in INITS if i in set(df["init"])]
    for init in order:
        for r in df[df.init == init].itertuples():
            lines.append(f"| {INITS[init]} | {r.split} | {r.cuhk01_rank1:.2f} / {r.cuhk01_mAP:.2f} | "
                         f"{r.cuhk03_rank1:.2f} / {r.cuhk03_mAP:.2f} | {r.train_seconds:.0f} | "
                         f"{r.wall_seconds / 60:.1f} |")
    lines += ["", "Mean over the splits each init has:", "",
              "| init | splits | CUHK01 R1 / mAP | CUHK03 R1 / mAP |", "|---|---|---|---|"]
    for init in order:
        d = df[df.init == init]
        lines.append(f"| {INITS[init]} | {','.join(map(str, d.split))} | {d.cuhk01_rank1.mean():.2f} / "
                     f"{d.cuhk01_mAP.mean():.2f} | {d.cuhk03_rank1.mean():.2f} / {d.cuhk03_mAP.mean():.2f} |")
    (root / "finetune_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
