"""Candidates/s of ``nasreid rank`` on the CPU at 256x128 (``nasreid.ranking.SupernetRanker``).

The supernet is the warm-started OSNet-AIN Gumbel supernet of ``recipes/osnet_ain_warm_cpu.yaml`` (every candidate
takes the torchreid OSNet x0.25 MSMT17 file's block at its place, IN layers calibrated), built as a search builds it
but not trained: the timing of a candidate does not depend on what its weights learnt. Validation: 100 CUHK01
training identities held out (``data.val_ids: 100``; CUHK01 protocol: 200 query and 200 gallery images). Per
candidate: freeze with inherited weights, BN recalibration on ``bn_batches`` PK batches of 32 (0 and 10 measured),
validation rank-1 / mAP, the training loss on 2 batches. The fixed batch set is loaded once before timing (its
seconds are reported apart). The same uniformly drawn candidates (seed 0) are timed for both settings.

Writes ``results/benchmarks/rank_cpu.json`` and ``rank_cpu.txt`` (min / median / max seconds per candidate,
candidates/s = 1 / median, the median seconds of each part -- freeze, BN recalibration, validation, loss -- torch
version and threads). Run it on a quiet machine: another job on the cores shows up in every figure.

Environment: ``NASREID_DATA`` (the folder holding ``cuhk01/``; default ``../shared/data``) and ``NASREID_WEIGHTS``
(holding ``osnet_x0_25_msmt17/``; default ``../shared/weights``), relative to the repository root.

Usage: python benchmarks/bench_rank.py [--candidates 4] [--out results/benchmarks]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nasreid.config import load_recipe  # noqa: E402
from nasreid.engine.context import RunContext  # noqa: E402
from nasreid.engine.runs import build_run_dataset  # noqa: E402
from nasreid.engine.trainer import device_context  # noqa: E402
from nasreid.ranking import SupernetRanker, sample_candidates  # noqa: E402
from nasreid.registry import STRATEGIES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=4, help="candidates timed per setting")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    a = ap.parse_args()
    data = Path(os.environ.get("NASREID_DATA", ROOT.parent / "shared" / "data"))
    weights = Path(os.environ.get("NASREID_WEIGHTS", ROOT.parent / "shared" / "weights"))
    wfile = weights / "osnet_x0_25_msmt17" / "osnet_x0_25_msmt17.pth"
    recipe = load_recipe(ROOT / "recipes" / "osnet_ain_warm_cpu.yaml", {
        "data.dataset.root": str(data / "cuhk01"), "data.val_ids": 100, "data.workers": 0,
        "model.pretrained": str(wfile), "then_retrain": None})
    torch.manual_seed(0)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    ds = build_run_dataset(recipe)
    dev = device_context(recipe.device, recipe.amp, recipe.channels_last)
    ctx = RunContext(recipe=recipe, run_dir=Path("."), device=dev, dataset=ds)
    space = ctx.build_space()  # warm start from the MSMT17 file, as the search builds it
    strategy = STRATEGIES.get("gumbel")(space, **recipe.strategy.kwargs)  # type: ignore[union-attr]
    supernet = ctx.device.model(strategy.attach()).eval()
    t_build = time.perf_counter() - t0
    cands = sample_candidates(strategy.choices, a.candidates, seed=0)
    report: dict = {"what": "nasreid rank: seconds per candidate (freeze + BN recalibration + validation + loss)",
                    "recipe": "recipes/osnet_ain_warm_cpu.yaml (+ data.val_ids 100, untrained warm-started supernet)",
                    "input": f"{recipe.data.height}x{recipe.data.width}", "batch_size": recipe.data.batch_size,
                    "val_query": len(ds.val_query), "val_gallery": len(ds.val_gallery),
                    "val_ids": len(ds.val_split["labels"]), "train_ids": ds.num_train_pids,
                    "candidates": [c.sample for c in cands], "supernet_build_seconds": round(t_build, 2),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "machine": platform.machine(), "python": platform.python_version(), "settings": {}}
    lines = [f"nasreid rank on CPU ({torch.get_num_threads()} torch threads, torch {torch.__version__}), "
             f"OSNet-AIN x0.25 gumbel supernet warm-started from MSMT17, 256x128, validation "
             f"{len(ds.val_query)} query / {len(ds.val_gallery)} gallery images of 100 CUHK01 ids, "
             f"{a.candidates} candidates (seed 0), loss on 2 batches of 32"]
    for k in (0, 10):
        ranker = SupernetRanker(supernet, strategy, ctx, bn_batches=k, loss_batches=2)
        t1 = time.perf_counter()
        ranker.batches()
        t_load = time.perf_counter() - t1
        secs, scores = [], []
        for c in cands:
            s = ranker.score(c.sample)
            secs.append(s["seconds"])
            scores.append({kk: round(v, 4) if isinstance(v, float) else v for kk, v in s.items()})
        med = statistics.median(secs)
        parts = {p: round(statistics.median(x[p] for x in scores), 3)
                 for p in ("seconds_freeze", "seconds_bn", "seconds_val", "seconds_loss")}
        report["settings"][f"bn_batches_{k}"] = {"median_parts": parts,
            "seconds_min": round(min(secs), 3), "seconds_median": round(med, 3), "seconds_max": round(max(secs), 3),
            "candidates_per_s": round(1.0 / med, 4), "batch_set_load_seconds": round(t_load, 2),
            "seconds": [round(x, 3) for x in secs], "scores": scores}
        lines.append(f"bn_batches {k:2d}: {1.0 / med:.3f} candidates/s (seconds per candidate min {min(secs):.2f} / "
                     f"median {med:.2f} / max {max(secs):.2f}; median parts: freeze {parts['seconds_freeze']:.2f}, "
                     f"BN {parts['seconds_bn']:.2f}, validation {parts['seconds_val']:.2f}, loss "
                     f"{parts['seconds_loss']:.2f} s; the fixed batch set loaded once in {t_load:.2f} s)")
        print(lines[-1], flush=True)
    report["loadavg_1_5_15_before"] = [round(x, 2) for x in load_before]
    report["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    lines.append(f"load average (1, 5, 15 min) before {report['loadavg_1_5_15_before']}, after "
                 f"{report['loadavg_1_5_15_after']} on {os.cpu_count()} cores (this benchmark's own threads count in "
                 "it; a 1-min figure well above the thread count would mean another job shared the cores)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "rank_cpu.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
