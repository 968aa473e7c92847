"""Benchmark: seconds per search step of the MSINet DARTS supernet (darts_tcm, BOTH updates: the omega step on
a search-train batch and the alpha step on a search-val batch, with the twin memories) divided by the seconds
per training step of the derived network (``msinet_paper``, retrained with the ``msinet`` loss: ID +
triplet), same batch size and input size, measured in the same run, interleaved (best of ``--rounds``).

Target (issue #6): <= 3x. The supernet runs all four candidates of each of the 12 interaction choices and
does two forward/backward passes per step (omega, then alpha), so 2x is the floor set by the two updates.
Optionally also the second-order (unrolled) alpha step (``--unrolled``; five passes per step) and the search
width of the authors' code (``--authors-width``). Images/s count the images that go through a forward pass
per second of step (2 x batch per search step).

Random tensors as inputs: this measures compute only (no data loading).

    python benchmarks/bench_msinet.py                                   # CPU: x0.25, 128x64, batch 32
    python benchmarks/bench_msinet.py --device cuda --width 1.0 --height 256 --width-px 128 --batch 64 \\
        --amp --channels-last --json results/benchmarks/msinet_step_h100.json
    python benchmarks/bench_msinet.py --batch 4 --height 64 --width-px 32 --iters 1 --warmup 1 --rounds 1
                                                                        # smoke test (figures meaningless)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from nasreid.genotype import preset_genotype
from nasreid.models.complexity import count_parameters
from nasreid.registry import LOSSES, get_space, get_strategy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_supernet import (
    time_steps,  # same timing loop as the other supernet benchmark
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=float, default=0.25, help="width multiplier")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width-px", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=485, help="identities of the derived net / of each memory")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best is kept)")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--unrolled", action="store_true", help="also time the second-order alpha step")
    ap.add_argument("--authors-width", action="store_true", help="also time search_width='authors'")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.height, args.width_px, device=dev)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)
    xv = torch.randn_like(x)
    if args.channels_last:
        x, xv = (t.contiguous(memory_format=torch.channels_last) for t in (x, xv))
    batch, vbatch = {"img": x, "pid": y}, {"img": xv, "pid": y}
    amp = args.amp and dev.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if amp else contextlib.nullcontext
    scaler_fixed = torch.amp.GradScaler("cuda") if amp else None

    def prep(m):
        m = m.to(dev)
        return m.to(memory_format=torch.channels_last) if args.channels_last else m

    # derived network: the published genotype, trained with the msinet loss (ID + triplet), no local branch
    fixed = prep(preset_genotype("msinet", "msinet_paper", width_mult=args.width).build(num_classes=args.classes))
    fixed.train()
    loss_fn = LOSSES.get("msinet")(args.classes).to(dev)
    opt = torch.optim.SGD(fixed.parameters(), lr=0.01, momentum=0.9)

    def fixed_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss, _ = loss_fn(fixed(x), batch)
        if scaler_fixed:
            scaler_fixed.scale(loss).backward()
            scaler_fixed.step(opt)
            scaler_fixed.update()
        else:
            loss.backward()
            opt.step()

    steps = {"fixed": fixed_step}
    params = {"fixed": count_parameters(fixed)}
    variants = [("search", {}, "child")]
    if args.unrolled:
        variants.append(("search_unrolled", {"unrolled": True}, "child"))
    if args.authors_width:
        variants.append(("search_authors_width", {}, "authors"))
    for key, kw, width_kind in variants:
        space = get_space("msinet")(num_classes=args.classes, width_mult=args.width, search_width=width_kind)
        params[key] = count_parameters(space)
        strat = get_strategy("darts_tcm")(space, **kw)
        model = prep(strat.attach()).train()
        strat.build_memories(args.classes, args.classes, model.feature_dim, dev)
        strat.w_opt = torch.optim.SGD(strat.weight_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        strat.a_opt = torch.optim.Adam(strat.arch_parameters(), lr=0.002, betas=(0.5, 0.999), weight_decay=1e-3)
        strat.scaler = torch.amp.GradScaler("cuda") if amp else None
        strat.autocast = autocast if amp else None
        steps[key] = (lambda s=strat: s.step(batch, vbatch))
    for fn in steps.values():  # warm-up every network before timing any
        time_steps(fn, args.warmup, 0, dev)
    rounds: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, fn in steps.items():
            rounds[k].append(time_steps(fn, 0, args.iters, dev))
    results = {k: min(v) for k, v in rounds.items()}
    images = {k: (args.batch if k == "fixed" else 2 * args.batch) / v for k, v in results.items()}
    header = (f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}) | width "
              f"x{args.width} | input {args.height}x{args.width_px} | batch {args.batch} | amp {amp} | "
              f"channels_last {args.channels_last} | threads {torch.get_num_threads()}")
    print(header)
    print(f"{'network':<34}{'s/step':>10}{'img/s':>10}{'ratio':>8}{'target':>9}")
    ratios = {}
    for k, v in results.items():
        r = v / results["fixed"]
        if k != "fixed":
            ratios["ratio_" + k] = r
        verdict = ("<= 3 " + ("ok" if r <= 3 else "MISSED")) if k == "search" else ""
        print(f"{k:<34}{v:>10.4f}{images[k]:>10.1f}{r:>8.2f}{verdict:>9}")
    print("parameters (weights): " + " | ".join(f"{k} {v:,}" for k, v in params.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "header": header, "seconds_per_step": results, "images_per_second": images,
                       **ratios, "parameters": params}, f, indent=2)


if __name__ == "__main__":
    main()
