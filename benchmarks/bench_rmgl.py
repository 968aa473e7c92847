r"""RMGL training-step throughput (images/s) and the cost of the receptive-partitioned path, measured in one run.

    python benchmarks/bench_rmgl.py --device cuda --backbone resnet50 --height 384 --width 128 --batch 48 \
        --amp --channels-last
    python benchmarks/bench_rmgl.py                      # CPU: osnet x0.25, 128x64, batch 32

Arms (presets of the ``rmgl`` space, same input, batch, loss ``rmgl`` and SGD step): ``rmgl_paper`` (2+3 stripes,
RP after res_conv2c, ABP) and ``baseline_2_3`` (no RP path). Reported: images/s of a full training step (forward,
Eq. 4 loss, backward, SGD step) for each, the ratio paper / baseline, and peak GPU memory on CUDA. Random tensors
as images (throughput only). Writes ``results/benchmarks/rmgl_step_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_supernet import time_steps  # noqa: E402  (the project's warm-up + synchronised timing loop)


def bench(preset: str, args, device: torch.device) -> dict:
    """Images/s and step time of one preset (forward, Eq. 4 loss, backward, SGD step)."""
    from nasreid.genotype import preset_genotype
    from nasreid.registry import LOSSES

    kw = {"backbone": args.backbone, "reduce_dim": args.reduce_dim}
    if args.backbone == "osnet":
        kw["width_mult"] = args.width_mult
    net = preset_genotype("rmgl", preset, **kw).build(num_classes=args.classes).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    loss_fn = LOSSES.get("rmgl")(args.classes, margin=0.6)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    use_amp = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    x = torch.randn(args.batch, 3, args.height, args.width, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batch = {"pid": torch.arange(args.batch // 4, device=device).repeat_interleave(4)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=use_amp):
            loss, _ = loss_fn(net(x), batch)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    dt = time_steps(step, args.warmup, args.steps, device)  # seconds per step
    out = {"preset": preset, "images_per_s": args.batch / dt, "step_ms": 1000 * dt,
           "params_M": sum(p.numel() for p in net.parameters()) / 1e6}
    if device.type == "cuda":
        out["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="osnet", choices=["osnet", "resnet50"])
    ap.add_argument("--width-mult", dest="width_mult", type=float, default=0.25, help="osnet channel multiplier")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64, help="input width in pixels")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=751)
    ap.add_argument("--reduce-dim", dest="reduce_dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--channels-last", dest="channels_last", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    args = ap.parse_args()
    device = torch.device(args.device)
    res = []
    for preset in ("baseline_2_3", "rmgl_paper"):
        res.append(bench(preset, args, device))
        print(json.dumps(res[-1]))
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch_threads": torch.get_num_threads(), "backbone": args.backbone,
               "width_mult": args.width_mult if args.backbone == "osnet" else None,
               "input": [args.height, args.width], "batch": args.batch, "amp": args.amp,
               "channels_last": args.channels_last, "arms": res,
               "rp_cost_ratio_step_time": res[1]["step_ms"] / res[0]["step_ms"]}
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rmgl_step_{device.type}_{args.backbone}.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
