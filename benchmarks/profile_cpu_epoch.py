"""Where the time of one CPU training epoch goes (issue 26, item 1): one open epoch of the fine-tune
(``recipes/osnet_finetune_cpu.yaml``) and one open epoch of the warm-started search
(``recipes/osnet_ain_warm_cpu.yaml``), each run through nasreid's own loop (context, loader, training method or
strategy, hooks, checkpoint) under ``cProfile``, on real CUHK01 images at 256x128.

The breakdown is read from the profile's cumulative times (a function's time includes what it calls; a recursive
function counts once): waiting for the next batch (``DataLoader.__next__``: with workers, only the time the step
waited; with ``data.workers: 0``, the CPU default, the whole of reading, decoding, augmenting and collating), the
training step, inside it backward and the optimiser step (forward + loss is the rest of the step), the hooks,
TensorBoard scalars and the checkpoint. cProfile slows Python-heavy parts (the forward's module calls) more than
the C++ kernels: compare shares between runs of this script, not with un-profiled timings.

    python benchmarks/profile_cpu_epoch.py --json results/benchmarks/profile_cpu_epoch_before.json
    python benchmarks/profile_cpu_epoch.py --set data.workers=2 --only finetune
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_epoch import _recipe, finetune_setup  # the same recipes and set-up as the benchmark

ROOT = Path(__file__).resolve().parents[1]
#: (label, file name ending, function name): the cumulative times reported
PARTS = [
    ("data wait (DataLoader.__next__)", "dataloader.py", "__next__"),
    ("training step (fine-tune: SupervisedMethod.step)", "supervised.py", "step"),
    ("training step (search: OneShotStrategy step)", "strategies/base.py", "step"),
    ("  backward (Tensor.backward)", "_tensor.py", "backward"),
    ("  optimiser step (Optimizer.step)", "optimizer.py", "wrapper"),
    ("  batch to device", "trainer.py", "batch"),
    ("hooks (all)", "trainer.py", "_call"),
    ("TensorBoard add_scalar", "writer.py", "add_scalar"),
    ("checkpoint save", "checkpoint.py", "save_checkpoint"),
    ("image read + decode (main process)", "datasets/base.py", "read_image_file"),
    ("transforms (main process)", "transforms/v2/_container.py", "forward"),
]


def _cumtimes(prof: cProfile.Profile) -> dict[str, float]:
    st = pstats.Stats(prof)
    out: dict[str, float] = {}
    for (fname, _, func), (_, _, _, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        for label, suffix, name in PARTS:
            if func == name and fname.replace(os.sep, "/").endswith(suffix):
                out[label] = out.get(label, 0.0) + ct
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: [p[0] for p in PARTS].index(kv[0]))}


def _overrides(sets: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs as dotted recipe keys with YAML-typed values."""
    out = {}
    for s in sets:
        k, v = s.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def profile_finetune(data: Path, weights: Path, sets: list[str]) -> dict:
    """One open epoch of the CPU fine-tune recipe through RunContext.train_fixed, profiled."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx, model = finetune_setup(data, weights, Path(tmp), **_overrides(sets))
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        hist = ctx.train_fixed(model, epochs=1, run_dir=Path(tmp))
        prof.disable()
        wall = time.perf_counter() - t
        ctx.writer.close()
    return {"epoch_seconds": round(hist[-1]["epoch_seconds"], 3), "wall_seconds": round(wall, 3),
            "steps": hist[-1]["steps"], "parts_seconds": _cumtimes(prof)}


def profile_search(data: Path, weights: Path, sets: list[str]) -> dict:
    """One open epoch of the warm-started gumbel search (supernet warm start and IN calibration excluded)."""
    from nasreid.engine import pipeline

    recipe = _recipe("osnet_ain_warm_cpu.yaml", data, weights, then_retrain=None, **_overrides(sets))
    with tempfile.TemporaryDirectory() as tmp:
        prof = cProfile.Profile()
        prof.enable()
        run = pipeline.run_search(recipe, run_dir=Path(tmp) / "s", progress=False)
        prof.disable()
        hist = json.loads((run / "metrics.json").read_text())["history"]
    return {"epoch_seconds": round(hist[-1]["epoch_seconds"], 3), "steps": hist[-1]["steps"],
            "parts_seconds": _cumtimes(prof)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("NASREID_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--weights", default=str(Path(os.environ.get("NASREID_WEIGHTS", ROOT.parent / "shared" / "weights"))
                                            / "osnet_x0_25_msmt17" / "osnet_x0_25_msmt17.pth"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (both runs)")
    ap.add_argument("--only", choices=["finetune", "search"])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    os.environ.setdefault("NASREID_NO_PROGRESS", "1")
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "set": a.set}
    if a.only in (None, "finetune"):
        out["finetune"] = profile_finetune(Path(a.data), Path(a.weights), a.set)
        print(json.dumps(out["finetune"], indent=2), flush=True)
    if a.only in (None, "search"):
        out["search"] = profile_search(Path(a.data), Path(a.weights), a.set)
        print(json.dumps(out["search"], indent=2), flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
