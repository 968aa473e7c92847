"""CPU training and evaluation speed at 256x128 (issue 26), measured through nasreid's own loop on real CUHK01 images,
beside torchreid's OSNet model code in a minimal loop. One run prints:

* ``finetune open epoch``: one open (unfrozen) epoch of ``recipes/osnet_finetune_cpu.yaml`` (OSNet x0.25 from
  the MSMT17 file, 60 steps of batch 32) through ``RunContext.train_fixed``: loader, training method, hooks,
  checkpoint -- everything but the evaluation;
* ``search open epoch``: one open epoch of ``recipes/osnet_ain_warm_cpu.yaml`` (the warm-started hard-Gumbel
  supernet; warm start and IN calibration before it are not counted);
* ``evaluation``: images per second of the same-domain evaluation of the MSMT17 OSNet on CUHK01's test split
  (972 query + 972 gallery images: loading, features, distances, CMC / mAP);
* ``torchreid minimal loop`` / ``nasreid minimal loop``: 60 steps of the same training step (label-smoothed CE,
  AMSGrad lr 0.0015) over 60 batches of real images decoded and augmented beforehand, with torchreid's own
  ``osnet_x0_25`` (``torchreid/reid/models/osnet.py`` of the torchreid 0.2.5 release, fetched from PyPI into a
  cache folder and imported as a file: nothing of it enters this repository) and with nasreid's ``osnet`` preset
  as the run places it (channels_last by the recipe's default).

Before / after a change, paired and interleaved, with min / median / max over rounds:

    python benchmarks/before_after.py --before <rev> --rounds 3 bench_cpu_epoch \\
        --json results/benchmarks/cpu_epoch_before_after.json

The recipes are this checkout's; the library under them is each revision's (its defaults decide channels_last,
loader workers and the image cache).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TORCHREID = "torchreid==0.2.5"


def _paths(a) -> tuple[Path, Path]:
    data = Path(a.data or os.environ.get("NASREID_DATA", ROOT.parent / "shared" / "data"))
    weights = Path(a.weights or Path(os.environ.get("NASREID_WEIGHTS", ROOT.parent / "shared" / "weights"))
                   / "osnet_x0_25_msmt17" / "osnet_x0_25_msmt17.pth")
    return data, weights


def _recipe(name: str, data: Path, weights: Path, **extra):
    """A shipped recipe for one open epoch on ``data``'s CUHK01 from ``weights`` (``extra``: more dotted keys)."""
    from nasreid.config import load_recipe

    over = {"data.dataset.root": str(data / "cuhk01"), "model.pretrained": str(weights), "optim.epochs": 1,
            "training.freeze_backbone_epochs": 0, **extra}
    return load_recipe(ROOT / "recipes" / name, over)


def finetune_setup(data: Path, weights: Path, run_dir: Path, **extra):
    """``(ctx, model)``: the fine-tune recipe's run context in ``run_dir`` and its OSNet from ``weights``, placed."""
    from nasreid.engine.context import RunContext
    from nasreid.engine.runs import build_context
    from nasreid.genotype import preset_genotype

    recipe = _recipe("osnet_finetune_cpu.yaml", data, weights, **{"eval.targets": [], **extra})
    ctx = build_context(RunContext, recipe, run_dir, progress=False)
    net = preset_genotype("osnet_ain", "osnet", **recipe.space.kwargs).build(num_classes=ctx.dataset.num_train_pids)
    ctx.init_weights(net)
    return ctx, ctx.device.model(net)


def finetune_epoch(data: Path, weights: Path) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        ctx, model = finetune_setup(data, weights, Path(tmp))
        hist = ctx.train_fixed(model, epochs=1, run_dir=Path(tmp))
        ctx.writer.close()
    return hist[-1]["epoch_seconds"], hist[-1]["steps"]


def search_epoch(data: Path, weights: Path) -> tuple[float, int]:
    from nasreid.engine import pipeline

    recipe = _recipe("osnet_ain_warm_cpu.yaml", data, weights, then_retrain=None)
    with tempfile.TemporaryDirectory() as tmp:
        run = pipeline.run_search(recipe, run_dir=Path(tmp) / "s", progress=False)
        hist = json.loads((run / "metrics.json").read_text())["history"]
    return hist[-1]["epoch_seconds"], hist[-1]["steps"]


def evaluation(data: Path, weights: Path) -> tuple[float, int]:
    from nasreid.data import build_dataset
    from nasreid.engine.runs import build_context
    from nasreid.evaluation.runner import evaluate_run_model
    from nasreid.genotype import preset_genotype
    from nasreid.models.pretrained import load_pretrained

    recipe = _recipe("osnet_finetune_cpu.yaml", data, weights, **{"eval.targets": []})
    ds = build_dataset("cuhk01", str(data / "cuhk01"), split_seed=0)
    net = preset_genotype("osnet_ain", "osnet", **recipe.space.kwargs).build(num_classes=0)
    load_pretrained(net, weights)
    with tempfile.TemporaryDirectory() as tmp:
        from nasreid.engine.context import RunContext

        ctx = build_context(RunContext, recipe, Path(tmp), progress=False)
        model = ctx.device.model(net).eval()
        t = time.perf_counter()
        evaluate_run_model(model, recipe, ctx.device, ds, targets=[], same_domain=True)
        seconds = time.perf_counter() - t
        ctx.writer.close()
    n = len(ds.query) + len(ds.gallery)
    return n / seconds, n


def _torchreid_osnet(cache: Path):
    """torchreid's ``osnet`` module of the 0.2.5 release (PyPI sdist), imported from a file in ``cache``."""
    src = cache / "torchreid_osnet.py"
    if not src.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", TORCHREID, "--no-deps", "--no-binary", ":all:",
                            "-d", tmp, "-q"], check=True)
            (sdist,) = Path(tmp).glob("torchreid-*.tar.gz")
            with tarfile.open(sdist) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("torchreid/reid/models/osnet.py"))
                f = tar.extractfile(member)
                assert f is not None
                src.write_bytes(f.read())
    spec = importlib.util.spec_from_file_location("torchreid_osnet", src)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def minimal_loops(data: Path, weights: Path, cache: Path, steps: int = 60) -> dict[str, float]:
    """Seconds for ``steps`` training steps over preloaded real batches: torchreid's model, nasreid's."""
    from nasreid.engine.context import RunContext
    from nasreid.engine.runs import build_context
    from nasreid.genotype import preset_genotype
    from nasreid.models.pretrained import load_pretrained

    recipe = _recipe("osnet_finetune_cpu.yaml", data, weights, **{"eval.targets": []})
    with tempfile.TemporaryDirectory() as tmp:
        ctx = build_context(RunContext, recipe, Path(tmp), progress=False)
        ctx.writer.close()
        batches = []
        for b in ctx.loader():
            batches.append((b["img"], b["pid"]))
            if len(batches) == steps:
                break
    n_cls = ctx.dataset.num_train_pids
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    tr = _torchreid_osnet(cache).osnet_x0_25(num_classes=n_cls, pretrained=False, loss="softmax")
    tr.load_state_dict({k.removeprefix("module."): v for k, v in state.items() if "classifier" not in k}, strict=False)
    mine = preset_genotype("osnet_ain", "osnet", **recipe.space.kwargs).build(num_classes=n_cls)
    load_pretrained(mine, weights)
    mine = ctx.device.model(mine)

    def loop(net, logits_of, prep) -> float:
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=0.0015, weight_decay=5e-4, amsgrad=True)
        t = time.perf_counter()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(logits_of(net(prep(x))), y, label_smoothing=0.1)
            loss.backward()
            opt.step()
        return time.perf_counter() - t

    out = {"torchreid": loop(tr, lambda o: o, lambda x: x),
           "nasreid": loop(mine, lambda o: o["logits"], ctx.device.images)}
    out["nasreid_channels_last"] = bool(ctx.device.channels_last)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder with cuhk01/ (default $NASREID_DATA or ../shared/data)")
    ap.add_argument("--weights", help="the MSMT17 OSNet x0.25 file (default from $NASREID_WEIGHTS)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "nasreid-bench"),
                    help="where torchreid's model file is kept once fetched")
    ap.add_argument("--only", choices=["finetune", "search", "eval", "minimal"], action="append")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    os.environ.setdefault("NASREID_NO_PROGRESS", "1")
    logging.getLogger("nasreid").setLevel(logging.WARNING)
    data, weights = _paths(a)
    only = set(a.only or ["finetune", "search", "eval", "minimal"])
    res: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"torch {torch.__version__} | {torch.get_num_threads()} threads | CUHK01 at 256x128, batch 32", flush=True)
    # (--only name, measure, JSON key, printed line): the lines before_after.py reads
    figures = [("finetune", finetune_epoch, "finetune_epoch_s", "finetune open epoch: {:.2f} s ({} steps)"),
               ("search", search_epoch, "search_epoch_s", "search open epoch: {:.2f} s ({} steps)"),
               ("eval", evaluation, "eval_images_per_s", "evaluation: {:.1f} images/s ({} images)")]
    for name, measure, key, line in figures:
        if name in only:
            value, n = measure(data, weights)
            logging.getLogger("nasreid").setLevel(logging.WARNING)  # a run's setup_logging resets it
            res[key] = value
            print(line.format(value, n), flush=True)
    if "minimal" in only:
        m = minimal_loops(data, weights, Path(a.cache))
        res["minimal_loop_s"] = m
        print(f"torchreid minimal loop: {m['torchreid']:.2f} s (60 steps)", flush=True)
        print(f"nasreid minimal loop: {m['nasreid']:.2f} s (60 steps, channels_last {m['nasreid_channels_last']})",
              flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
