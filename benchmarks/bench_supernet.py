"""Benchmark (b): seconds per training step of the OSNet-AIN supernet under the Gumbel strategy (hard and
soft mode) divided by the seconds per step of the derived (fixed) network, same batch and input size.

Two supernets are measured in the same run, interleaved with the derived network:

* ``share_weights: true`` (default of the space): the four candidates of a layer share one residual
  branch and own only their IN layers -- a deviation from the paper's Fig. 5. Targets (issue #2):
  hard <= 1.25x, soft <= 2.5x.
* ``share_weights: false``: four independent OS blocks per layer, Fig. 5 as printed (about 4x the
  OS-block parameters; soft mode runs four residual branches per layer). No target: reported for
  comparison (``--skip-unshared`` leaves it out).

Parameter counts (weights only, without the architecture parameters pi) are printed for the three networks.
Random tensors as inputs: this measures compute only.

    python benchmarks/bench_supernet.py                       # CPU, x0.25, 128x64, batch 32
    python benchmarks/bench_supernet.py --device cuda --width 1.0 --height 256 --width-px 128 --batch 64 --amp
    python benchmarks/bench_supernet.py --batch 4 --height 64 --width-px 32 --iters 1 --warmup 1 --rounds 1
                                                              # smoke test (seconds; figures meaningless)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from nasreid.genotype import preset_genotype
from nasreid.losses import build_reid_loss
from nasreid.models.complexity import count_parameters
from nasreid.mutables import iter_layer_choices
from nasreid.registry import get_space, get_strategy


def time_steps(step, warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if iters == 0:
        return 0.0
    t = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=float, default=0.25, help="width multiplier beta")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width-px", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=485)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best is kept)")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--skip-unshared", action="store_true",
                    help="do not measure the share_weights: false supernet (Fig. 5 as printed)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.height, args.width_px, device=dev)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batch = {"img": x, "pid": y}  # what the data loader gives a strategy's train_step
    loss_fn = build_reid_loss(args.classes)
    amp = args.amp and dev.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if amp else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda") if amp else None

    def prep(m):
        m = m.to(dev)
        return m.to(memory_format=torch.channels_last) if args.channels_last else m

    # derived network: the paper's OSNet-AIN genotype
    fixed = prep(preset_genotype("osnet_ain", "osnet_ain", width_mult=args.width)
                 .build(num_classes=args.classes)).train()
    opt = torch.optim.SGD(fixed.parameters(), lr=0.01, momentum=0.9)

    def fixed_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss, _ = loss_fn(fixed(x), batch)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    steps = {"fixed": fixed_step}
    params = {"fixed": count_parameters(fixed)}
    variants = [("", True)] + ([] if args.skip_unshared else [("_unshared", False)])
    for suffix, share in variants:
        for mode in ("hard", "soft"):
            space = get_space("osnet_ain")(num_classes=args.classes, width_mult=args.width, share_weights=share)
            if mode == "hard":  # weights only, before the strategy adds pi; OS blocks = the six choices
                params["supernet" + suffix] = count_parameters(space)
                params["supernet" + suffix + "_os_blocks"] = sum(count_parameters(lc)
                                                                for _, lc in iter_layer_choices(space))
            strat = get_strategy("gumbel")(space, mode=mode, seed=1)
            prep(strat.attach()).train()
            sopt = torch.optim.SGD(strat.param_groups(0.01, 5e-4), lr=0.01, momentum=0.9)
            steps[mode + suffix] = (lambda s=strat, o=sopt: s.train_step(batch, loss_fn, o, scaler=scaler,
                                                                         autocast=autocast if amp else None))
    for fn in steps.values():  # warm-up every network before timing any (allocator, oneDNN/cuDNN plans)
        time_steps(fn, args.warmup, 0, dev)
    # interleaved rounds, best round per network: robust to drifts of machine load
    rounds: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, fn in steps.items():
            rounds[k].append(time_steps(fn, 0, args.iters, dev))
    results = {k: min(v) for k, v in rounds.items()}
    print(f"device {dev} | width x{args.width} | input {args.height}x{args.width_px} | batch {args.batch} | "
          f"amp {amp} | channels_last {args.channels_last} | threads {torch.get_num_threads()}")
    print(f"{'network':<28}{'s/step':>10}{'ratio':>8}{'target':>9}")
    print(f"{'derived (fixed)':<28}{results['fixed']:>10.4f}{1.0:>8.2f}{'':>9}")
    ratios = {}
    for suffix, share in variants:
        for mode, target in (("hard", 1.25), ("soft", 2.5)):
            key = mode + suffix
            ratios["ratio_" + key] = r = results[key] / results["fixed"]
            name = f"supernet {mode} ({'shared' if share else 'unshared'})"
            verdict = (f"{'<= ' + str(target):>9} " + ("ok" if r <= target else "MISSED")) if share else f"{'-':>9}"
            print(f"{name:<28}{results[key]:>10.4f}{r:>8.2f}{verdict}")
    print("parameters (weights, no pi): derived {fixed:,} | shared supernet {supernet:,} (OS blocks "
          "{supernet_os_blocks:,})".format(**params)
          + ("" if args.skip_unshared else " | unshared supernet {supernet_unshared:,} (OS blocks "
             "{supernet_unshared_os_blocks:,}, {r:.2f}x the shared)".format(
                 r=params["supernet_unshared_os_blocks"] / params["supernet_os_blocks"], **params)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds_per_step": results, **ratios, "parameters": params},
                      f, indent=2)


if __name__ == "__main__":
    main()
