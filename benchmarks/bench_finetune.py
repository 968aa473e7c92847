"""Fine-tune throughput (issue 21): training images per second of the fine-tuning step of
``recipes/osnet_finetune_cpu.yaml`` (OSNet x0.25 from a torchreid zoo file, label-smoothed CE, AMSGrad, batch 32)
at 256x128 (the zoo's and the recipe's size) against 128x64 (the from-scratch CPU recipes' size), the two sizes
measured interleaved in one run (best of the rounds), plus evaluation (feature extraction) images per second.
Random tensors as inputs: this measures compute only.

    python benchmarks/bench_finetune.py                          # CPU
    python benchmarks/bench_finetune.py --device cuda --amp --channels-last --batch 64
    python benchmarks/bench_finetune.py --json results/benchmarks/finetune_images_per_s_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_supernet import time_steps  # the timing loop of the supernet benchmarks
from nasreid.engine.trainer import device_context
from nasreid.genotype import preset_genotype
from nasreid.losses import build_reid_loss
from nasreid.models.pretrained import load_pretrained


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="../shared/weights/osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=485)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    ctx = device_context(a.device, a.amp, a.channels_last)
    torch.manual_seed(0)
    net = preset_genotype("osnet_ain", "osnet", width_mult=0.25).build(num_classes=a.classes)
    if Path(a.weights).is_file():
        load_pretrained(net, a.weights)
    model = ctx.model(net)
    loss_fn = build_reid_loss(a.classes, label_smooth=0.1).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=0.0015, weight_decay=5e-4, amsgrad=True)
    scaler = torch.amp.GradScaler("cuda") if a.amp and ctx.device.type == "cuda" else None
    pids = torch.arange(a.batch, device=ctx.device) % a.classes

    def train_step(x):
        model.train()
        opt.zero_grad(set_to_none=True)
        with ctx.autocast():
            loss, _ = loss_fn(model(x), {"pid": pids})
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    @torch.no_grad()
    def eval_step(x):
        model.eval()
        with ctx.autocast():
            model(x)

    def timed(fn, x) -> float:  # images per second, the supernet benchmark's timing loop
        return a.batch / time_steps(lambda: fn(x), a.warmup, a.iters, ctx.device)

    sizes = {"256x128": (256, 128), "128x64": (128, 64)}
    best = {f"{k} {w}": 0.0 for k in sizes for w in ("train", "eval")}
    for _ in range(a.rounds):  # interleaved: both sizes see the same machine state
        for k, (h, w) in sizes.items():
            x = ctx.images(torch.randn(a.batch, 3, h, w, device=ctx.device))
            best[f"{k} train"] = max(best[f"{k} train"], timed(train_step, x))
            best[f"{k} eval"] = max(best[f"{k} eval"], timed(eval_step, x))
    print(f"device {ctx.device} | amp {a.amp} | channels_last {a.channels_last} | batch {a.batch} | "
          f"threads {torch.get_num_threads()} | OSNet x0.25, CE, AMSGrad | best of {a.rounds} rounds")
    for what in ("train", "eval"):
        hi, lo = best[f"256x128 {what}"], best[f"128x64 {what}"]
        print(f"  {what:<5} 256x128 {hi:8.1f} img/s | 128x64 {lo:8.1f} img/s | 256x128 / 128x64 {hi / lo:.3f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"args": vars(a), "images_per_second": best}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
