"""Zero-shot table of torchreid's model-zoo files (issue 21): each file evaluated with no training at all, as
``nasreid evaluate --weights FILE --genotype preset:... --set space.kwargs.width_mult=0.25`` does, on

* CUHK01, all 971 identities (``protocol: all_ids``: query ``PPPP001``, gallery ``PPPP003`` + ``PPPP004``);
* CUHK01, the test identities of splits 0, 1, 2 (486 ids; query both camera-A images, gallery both camera-B);
* CUHK03 (labeled, ``../shared/data/cuhk03``: 742 queries, 2,866 gallery images),

with euclidean (torchreid's protocol) and cosine distance, at 256x128 (the zoo's training size) and 128x64 (the
CPU recipes' size). Every combination is one run folder under ``--out`` (``recipe.yaml``, ``metrics.json``,
``train.log``); the table is ``<out>/zero_shot_table.md`` and ``.csv``. Resumable: a finished folder is read,
not rerun. Run from the repository root (paths in the run folders stay relative):

    python benchmarks/zero_shot_table.py                      # ~20 min on 2 CPU cores
    python benchmarks/zero_shot_table.py --quick              # 50 ids, one size, one metric (a smoke run)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from nasreid.config import DatasetRef
from nasreid.evaluation.runner import run_evaluate_weights

FILES = {  # name -> (file under --weights, nasreid preset)
    "osnet_x0_25_msmt17": ("osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth", "osnet"),
    "osnet_x0_25_market1501": ("osnet_x0_25_market1501/osnet_x0_25_market1501.pth", "osnet"),
    "osnet_ain_x0_25_imagenet": ("osnet_ain_x0_25_imagenet/osnet_ain_x0_25_imagenet.pyth", "osnet_ain_torchreid"),
}


def targets(quick: bool) -> list[DatasetRef]:
    extra = {"max_ids": 50} if quick else {}
    out = [DatasetRef(name="cuhk01", root="cuhk01", kwargs={"protocol": "all_ids", **extra})]
    out += [DatasetRef(name="cuhk01", root="cuhk01", kwargs={"split_seed": s, **extra}) for s in ((0,) if quick
                                                                                                  else (0, 1, 2))]
    if not quick:
        out.append(DatasetRef(name="cuhk03np", root="cuhk03", kwargs={}))
    return out


def label(key: str) -> str:
    """A metrics key (``cuhk01[protocol=all_ids] (cross-domain)``) as a table column."""
    name = key.split(" (")[0]
    if "protocol=all_ids" in name:
        return "CUHK01 all 971 ids"
    if name.startswith("cuhk01[") and "split_seed=" in name:
        return f"CUHK01 split {name.split('split_seed=')[1].split(',')[0].rstrip(']')} test"
    if name.startswith("cuhk03np"):
        return "CUHK03 labeled"
    return name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="../shared/weights", help="folder of the zoo files (NASREID_WEIGHTS)")
    ap.add_argument("--out", default="results/zero_shot", help="folder of the run folders and the table")
    ap.add_argument("--quick", action="store_true", help="50 ids, 256x128, euclidean only")
    a = ap.parse_args(argv)
    out = Path(a.out)
    sizes = [(256, 128)] if a.quick else [(256, 128), (128, 64)]
    metrics = ["euclidean"] if a.quick else ["euclidean", "cosine"]
    rows = []
    for name, (rel, preset) in FILES.items():
        for h, w in sizes:
            for metric in metrics:
                run = out / f"{name}_{h}x{w}_{metric}"
                done = run / "metrics.json"
                if not (done.is_file() and "evaluation" in json.loads(done.read_text())):
                    run_evaluate_weights(Path(a.weights) / rel, f"preset:{preset}", targets=targets(a.quick),
                                         overrides={"space.kwargs.width_mult": 0.25, "data.height": h,
                                                    "data.width": w, "eval.metric": metric}, out=run)
                ev = json.loads(done.read_text())["evaluation"]
                for key, r in ev.items():
                    rows.append({"weights": name, "preset": preset, "input": f"{h}x{w}", "metric": metric,
                                 "target": label(key), "rank1": r["rank1"], "mAP": r["mAP"], "mINP": r.get("mINP"),
                                 "num_query": r["num_query"], "num_gallery": r["num_gallery"]})
                print(f"{run}: done", file=sys.stderr)
    df = pd.DataFrame(rows)
    df.to_csv(out / "zero_shot_table.csv", index=False)
    lines = ["# Zero-shot: torchreid model-zoo files on CUHK01 and CUHK03, no training\n",
             "Rank-1 / mAP in %. Built by `python benchmarks/zero_shot_table.py` (one run folder per cell's row).\n"]
    for (h_w, metric), part in df.groupby(["input", "metric"], sort=False):
        cols = list(dict.fromkeys(part["target"]))
        lines.append(f"\n## {h_w}, {metric} distance\n")
        lines.append("| weights (preset) | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for (name, preset), r in part.groupby(["weights", "preset"], sort=False):
            cells = [f"{row.rank1:.2f} / {row.mAP:.2f}" for col in cols for row in r[r.target == col].itertuples()]
            lines.append(f"| {name} (`{preset}`) | " + " | ".join(cells) + " |")
    (out / "zero_shot_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
