"""What training MSINet costs per epoch on the CPU, measured on real images: seconds per training step at 256x128,
batch 64 (PK 16 x 4), of the paper's network and losses beside OSNet x1.0 in the same run, and from them the
seconds per epoch and the hours of the paper's schedules. No pretrained MSINet exists, so a fair test of the
paper's claim means training it from scratch; this states what that costs on this machine.

Arms (each built from a shipped recipe through nasreid's own pieces: ``load_recipe`` with dotted overrides,
``build_context`` (dataset, device), ``preset_genotype(...).build`` (the network), the recipe's training method
(``supervised``: the loss from the loss registry, SGD from the recipe's ``optim``, ``Trainer``)):

* ``msinet``: ``recipes/msinet_retrain.yaml`` as it is -- space ``msinet`` (``width_mult: 1.0``,
  ``local_branch: true``, ``local_dim: 256``), preset ``msinet_paper``, loss ``msinet`` (ID + triplet on the
  global and the local feature), SAM off; SGD lr 0.065 momentum 0.9, batch 64, 4 images per identity;
* ``msinet_sam``: the same with the Spatial Alignment Module on (``loss.kwargs.sam_weight: 2.0``, Sec. 3.3);
* ``osnet``: the baseline, OSNet x1.0 (space ``osnet_ain``, preset ``osnet``, ``width_mult: 1.0``) with the
  ``reid`` loss, ID (label smoothing 0.1) + batch-hard triplet (weight 1.0, margin 0.3), the same SGD and batch
  (only space, preset and loss differ from the MSINet recipe).

Every arm runs with ``device: cpu``, ``amp: false`` (channels_last as the recipe says: on), on CUHK03 (labeled
boxes, ``cuhk03/`` under ``--data``, ``$NASREID_DATA`` or ``../shared/data``).

How it is timed: the supervised method's ``fit`` (what ``RunContext.train_fixed`` runs) runs one epoch whose loader
is a list of ``--warmup + --steps`` real PK batches, read and augmented once beforehand by the recipe's own loader
(so image reading and decoding are not counted: on a busy CPU they add to a real epoch unless loader workers keep
up). The trainer has no step limit; this list is how it runs N steps, no second training loop. A hook times each
step, from the trainer's ``before_step`` to its ``after_step`` (batch to device, forward, loss, backward, optimiser
step); the first ``--warmup`` steps are left out. Each round builds every arm afresh (new weights, new optimiser)
and the arms are interleaved, ``--rounds`` times. Reported per arm: min / median / max seconds per step over every
timed step, images/s at the median, and seconds per epoch = ceil(train images / 64) x median step (PK sampling drops
a few images per epoch; this counts every one) for CUHK03 (this copy's train split, counted), Market-1501 (12,936
train images) and MSMT17 (32,621), with the hours of 350 epochs (the in-domain retraining, MSINet paper Sec. 4.1)
and 250 epochs (the cross-domain setting, Sec. 4.2). These are hours of training the derived network only: the
search itself (same 350-epoch schedule) runs the supernet, two passes per step, and costs more per step
(``benchmarks/bench_msinet.py``). Parameter counts: the network with its classifier for the CUHK03 identities,
without it (``num_classes=0``), and the loss's own parameters (SAM).

The machine's load average is printed before and after: the figures are only as good as the machine is quiet.

    python benchmarks/bench_msinet_epoch.py --json results/benchmarks/msinet_epoch_cpu.json
    python benchmarks/bench_msinet_epoch.py --steps 2 --rounds 1 --warmup 1      # smoke run (figures meaningless)
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
#: train images of the full datasets the paper trains on (Market-1501: 751 ids; MSMT17: 1,041 ids)
TRAIN_IMAGES = {"market1501": 12936, "msmt17": 32621}
#: the paper's schedules in epochs: search and in-domain retraining (Sec. 4.1), cross-domain (Sec. 4.2)
SCHEDULES = {"350ep": 350, "250ep": 250}

_COMMON = {"device": "cpu", "amp": False, "data.batch_size": BATCH, "data.num_instances": 4, "eval.targets": [],
           "optim.epochs": 1}
#: arm -> dotted overrides of recipes/msinet_retrain.yaml
ARMS: dict[str, dict] = {
    "msinet": {"loss.kwargs.sam_weight": 0.0},
    "msinet_sam": {"loss.kwargs.sam_weight": 2.0},
    "osnet": {"space.name": "osnet_ain", "space.kwargs": {"width_mult": 1.0}, "model.preset": "osnet",
              "loss.name": "reid",
              "loss.kwargs": {"label_smooth": 0.1, "triplet_weight": 1.0, "triplet_margin": 0.3}},
}


def _recipe(arm: str, data: Path, workers: int):
    from nasreid.config import load_recipe

    over = {**_COMMON, "data.dataset": {"name": "cuhk03np", "root": str(data / "cuhk03")}, "data.workers": workers,
            **ARMS[arm]}
    return load_recipe(ROOT / "recipes" / "msinet_retrain.yaml", over)


def _context(recipe, run_dir: Path):
    from nasreid.engine.context import RunContext
    from nasreid.engine.runs import build_context

    ctx = build_context(RunContext, recipe, run_dir, progress=False)
    if ctx.writer is not None:  # no TensorBoard writes inside the timed steps
        ctx.writer.close()
        ctx.writer = None
    return ctx


def _network(recipe, num_classes: int):
    from nasreid.genotype import preset_genotype

    return preset_genotype(recipe.space.name, recipe.model.preset, **recipe.space.kwargs).build(num_classes=num_classes)


def _step_timer():
    """A trainer hook that keeps the seconds of every step (``before_step`` to ``after_step``)."""
    from nasreid.engine.trainer import Hook

    class StepTimer(Hook):
        name = "step_timer"

        def __init__(self):
            self.seconds: list[float] = []
            self._t = 0.0

        def before_step(self, trainer) -> None:
            self._t = time.perf_counter()

        def after_step(self, trainer) -> None:
            self.seconds.append(time.perf_counter() - self._t)

    return StepTimer()


def _batches(ctx, n: int) -> list[dict]:
    """``n`` real PK batches of the recipe's loader (read, augmented, collated), kept in memory."""
    out: list[dict] = []
    while len(out) < n:
        for b in ctx.loader(seed=len(out)):
            out.append(b)
            if len(out) == n:
                break
    return out


def _time_arm(ctx, batches: list[dict], run_dir: Path) -> tuple[list[float], dict[str, int]]:
    """Step seconds of one fresh network trained by the recipe's method (``supervised``, as
    ``RunContext.train_fixed`` builds it) for one epoch whose loader is ``batches``."""
    from nasreid.methods.supervised import SupervisedMethod
    from nasreid.models.complexity import count_parameters

    if ctx.recipe.training.method != "supervised":
        raise SystemExit(f"expected training.method supervised, got {ctx.recipe.training.method!r}")

    class PreRead(SupervisedMethod):
        def build_loader(self, records):  # the trainer has no step limit: its epoch is these batches
            return batches

    timer = _step_timer()
    net = _network(ctx.recipe, ctx.dataset.num_train_pids)
    method = PreRead(**ctx.recipe.training.kwargs)
    method.fit(ctx, ctx.device.model(net), epochs=1, hooks=[timer], run_dir=run_dir)
    params = {"with_classifier": count_parameters(net),
              "without_classifier": count_parameters(_network(ctx.recipe, 0)),
              "loss_own": count_parameters(method.loss_fn) if method.loss_fn is not None else 0}
    return timer.seconds, params


def _epoch_table(median: float, cuhk03_images: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, n in {"cuhk03": cuhk03_images, **TRAIN_IMAGES}.items():
        steps = math.ceil(n / BATCH)
        row = {"train_images": n, "steps": steps, "epoch_s": steps * median}
        for sched, epochs in SCHEDULES.items():
            row[f"hours_{sched}"] = steps * median * epochs / 3600
        out[name] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder with cuhk03/ (default $NASREID_DATA or ../shared/data)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per arm and round")
    ap.add_argument("--warmup", type=int, default=2, help="steps before the timed ones (not counted)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each builds every arm afresh)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="loader workers for reading the batches beforehand (not timed)")
    ap.add_argument("--json", help="also write the figures to this JSON file (e.g. under results/benchmarks/)")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.rounds < 1:
        ap.error("--steps and --rounds must be >= 1, --warmup >= 0")
    os.environ.setdefault("NASREID_NO_PROGRESS", "1")
    logging.getLogger("nasreid").setLevel(logging.WARNING)
    data = Path(a.data or os.environ.get("NASREID_DATA", ROOT.parent / "shared" / "data"))
    load_before = os.getloadavg()
    print(f"torch {torch.__version__} | {torch.get_num_threads()} threads | {os.cpu_count()} CPUs | "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} (a guide: the machine "
          f"should be quiet)", flush=True)
    print(f"CUHK03 ({data / 'cuhk03'}) at 256x128, batch {BATCH} (PK 16x4), device cpu, no AMP; "
          f"{a.warmup} warm-up + {a.steps} timed steps x {a.rounds} round(s) per arm", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ctxs = {arm: _context(_recipe(arm, data, a.workers), Path(tmp) / arm) for arm in a.arms}
        logging.getLogger("nasreid").setLevel(logging.WARNING)  # build_context's logging setup may reset it
        first = ctxs[a.arms[0]]
        cuhk03_images = len(first.dataset.train)
        t = time.perf_counter()
        batches = _batches(first, a.warmup + a.steps)  # the same real batches for every arm and round
        print(f"read {len(batches)} batches of real images in {time.perf_counter() - t:.1f} s (not timed); CUHK03 "
              f"train split: {cuhk03_images} images, {first.dataset.num_train_pids} ids", flush=True)
        times: dict[str, list[float]] = {arm: [] for arm in a.arms}
        params: dict[str, dict[str, int]] = {}
        for r in range(a.rounds):
            for arm in a.arms:
                secs, params[arm] = _time_arm(ctxs[arm], batches, Path(tmp) / f"{arm}_round{r}")
                times[arm] += secs[a.warmup:]
                logging.getLogger("nasreid").setLevel(logging.WARNING)
                print(f"round {r + 1}/{a.rounds} {arm}: median {statistics.median(secs[a.warmup:]):.2f} s/step",
                      flush=True)
    load_after = os.getloadavg()
    res: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                 "load_before": load_before, "load_after": load_after, "batch": BATCH, "height": 256, "width": 128,
                 "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds, "cuhk03_train_images": cuhk03_images,
                 "timing": "supervised method fit (as RunContext.train_fixed), pre-read real batches, per-step hook",
                 "arms": {}}
    print()
    print(f"{'arm':<11} {'params':>9} {'no cls':>9} {'loss':>7} {'min s':>7} {'median s':>8} {'max s':>7} "
          f"{'img/s':>7}")
    for arm in a.arms:
        s, p = times[arm], params[arm]
        med = statistics.median(s)
        res["arms"][arm] = {"params": p, "step_s": {"min": min(s), "median": med, "max": max(s), "n": len(s)},
                            "images_per_s": BATCH / med, "epochs": _epoch_table(med, cuhk03_images)}
        print(f"{arm:<11} {p['with_classifier'] / 1e6:>8.2f}M {p['without_classifier'] / 1e6:>8.2f}M "
              f"{p['loss_own'] / 1e6:>6.2f}M {min(s):>7.2f} {med:>8.2f} {max(s):>7.2f} {BATCH / med:>7.1f}")
    print()
    print(f"{'arm':<11} {'dataset':<11} {'images':>7} {'steps':>6} {'s/epoch':>9} {'h @350ep':>9} {'h @250ep':>9}")
    for arm in a.arms:
        for ds, row in res["arms"][arm]["epochs"].items():
            print(f"{arm:<11} {ds:<11} {row['train_images']:>7} {row['steps']:>6} {row['epoch_s']:>9.0f} "
                  f"{row['hours_350ep']:>9.1f} {row['hours_250ep']:>9.1f}")
    print(f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
