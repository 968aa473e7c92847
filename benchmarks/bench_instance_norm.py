"""Instance norm on the CPU (issue 26): forward + backward milliseconds of ``F.instance_norm`` against the same
function computed as ``F.group_norm`` with one group per channel (what :class:`nasreid.models.osnet.InstanceNorm2d`
runs on CPU tensors), at the activation shapes of OSNet x0.25 at 256x128 with batch 32, in the standard and in the
channels_last memory format; plus the largest difference of outputs and input gradients. Random tensors: this
measures kernels only.

    python benchmarks/bench_instance_norm.py [--iters 20] [--json results/benchmarks/instance_norm_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

#: (batch, channels, height, width) after conv1, in conv2, conv3, conv4 of OSNet x0.25 at 256x128
SHAPES = [(32, 16, 128, 64), (32, 64, 64, 32), (32, 96, 32, 16), (32, 128, 16, 8)]


def native(x, w, b):
    return F.instance_norm(x, weight=w, bias=b, eps=1e-5)


def as_group_norm(x, w, b):
    return F.group_norm(x, x.shape[1], w, b, 1e-5)


def ms(fn, x, w, b, iters: int) -> float:
    for _ in range(3):
        fn(x, w, b).sum().backward()
    t = time.perf_counter()
    for _ in range(iters):
        fn(x, w, b).sum().backward()
    return (time.perf_counter() - t) / iters * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__} | {torch.get_num_threads()} threads | forward + backward, ms")
    for shape in SHAPES:
        for cl in (False, True):
            x = torch.randn(shape)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            w = torch.rand(shape[1], requires_grad=True)
            b = torch.rand(shape[1], requires_grad=True)
            y1, y2 = native(x, w, b), as_group_norm(x, w, b)
            g1 = torch.autograd.grad(y1.square().sum(), x)[0]
            g2 = torch.autograd.grad(y2.square().sum(), x)[0]
            row = {"shape": list(shape), "channels_last": cl, "instance_norm_ms": ms(native, x, w, b, a.iters),
                   "group_norm_ms": ms(as_group_norm, x, w, b, a.iters),
                   "max_abs_diff_out": float((y1 - y2).abs().max()), "max_abs_diff_grad": float((g1 - g2).abs().max())}
            rows.append(row)
            print(f"{str(tuple(shape)):<20} {'channels_last' if cl else 'standard':<14} instance_norm "
                  f"{row['instance_norm_ms']:7.2f}  group_norm {row['group_norm_ms']:7.2f}  ratio "
                  f"{row['instance_norm_ms'] / row['group_norm_ms']:.2f}x  |diff| {row['max_abs_diff_out']:.1e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
