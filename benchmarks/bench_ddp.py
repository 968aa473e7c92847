"""What data-parallel training costs and buys on this CPU: images/s of a training step with 2 gloo processes
(``DistributedDataParallel``, ``torchrun``) vs 1 process, same global batch, measured in ONE run.

Network: the derived OSNet-AIN (preset ``osnet_ain``) at the CPU recipes' size (width x0.25, 128x64 input,
485 classes), one full step = forward + ID + triplet loss + backward (+ DDP's gradient all-reduce) + SGD step,
random tensors as images (compute and communication only, no data loading). Arms:

* ``1proc_Tthr`` -- one process with T intra-op threads (T = 1 and T = the number of cores), global batch B;
* ``ddp_2proc`` -- 2 processes x (cores / 2) threads each, B / 2 images per rank (global batch B), gloo
  all-reduce of the gradients (DDP buckets, overlapped with backward);
* ``allreduce`` -- the bare gloo all-reduce of a tensor the size of the network's gradients (one flat
  buffer), 2 processes: the communication floor of one step.

``speedup = images/s(ddp_2proc) / images/s(1proc_<cores>thr)``: above 1 when two processes use the cores better
than one process's intra-op threads; the all-reduce share says what communication costs here.

    python benchmarks/bench_ddp.py                      # writes results/benchmarks/ddp_cpu.json
    python benchmarks/bench_ddp.py --iters 3 --warmup 1 --batch 8    # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_supernet import time_steps
from nasreid.genotype import preset_genotype
from nasreid.losses import build_reid_loss


def make_step(args, per_rank_batch: int, wrap):
    torch.manual_seed(0)
    net = preset_genotype("osnet_ain", "osnet_ain", width_mult=args.width).build(num_classes=args.classes)
    net.train()
    fwd = wrap(net)
    loss_fn = build_reid_loss(args.classes, triplet_weight=1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(per_rank_batch, 3, args.height, args.width_px)
    pid = torch.arange(per_rank_batch // 4).repeat_interleave(4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(fwd(x), {"pid": pid})
        loss.backward()
        opt.step()

    n_params = sum(p.numel() for p in net.parameters())
    return step, n_params


def worker(args) -> None:
    """Run under torchrun: the DDP arm and the bare all-reduce; rank 0 writes ``args.out``."""
    import torch.distributed as dist

    from nasreid.engine import distributed as D

    D.init_distributed("cpu")
    W = D.world_size()
    step, n_params = make_step(args, args.batch // W, lambda m: D.wrap_model(m, torch.device("cpu"),
                                                                           find_unused_parameters=False))
    sec = time_steps(step, args.warmup, args.iters, torch.device("cpu"))
    buf = torch.randn(n_params)
    for _ in range(3):
        dist.all_reduce(buf)
    t = time.perf_counter()
    for _ in range(args.iters * 5):
        dist.all_reduce(buf)
    ar = (time.perf_counter() - t) / (args.iters * 5)
    secs = D.all_reduce_mean({"step": sec, "allreduce": ar})
    if D.is_main():
        Path(args.out).write_text(json.dumps({"world_size": W, "threads_per_rank": torch.get_num_threads(),
                                              "seconds_per_step": secs["step"], "allreduce_seconds": secs["allreduce"],
                                              "gradient_numel": n_params}))
    D.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width-px", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="global batch (P x K, K = 4)")
    ap.add_argument("--classes", type=int, default=485)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "ddp_cpu.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cores = os.cpu_count() or 1
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    doc = {"what": __doc__.split("\n\n")[0], "settings": settings,
           "cpu_cores": cores, "torch": torch.__version__, "arms": {}}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        step, n_params = make_step(args, args.batch, lambda m: m)
        sec = time_steps(step, args.warmup, args.iters, torch.device("cpu"))
        doc["arms"][f"1proc_{threads}thr"] = {"seconds_per_step": sec, "images_per_s": args.batch / sec}
        print(f"1 process, {threads} thread(s): {sec:.3f} s/step, {args.batch / sec:.1f} img/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // 2)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--out", str(out)] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                                 ("width", "height", "width_px", "batch", "classes", "iters", "warmup")]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        d = json.loads(out.read_text())
    sec = d["seconds_per_step"]
    doc["arms"]["ddp_2proc"] = {"seconds_per_step": sec, "images_per_s": args.batch / sec,
                                "threads_per_rank": d["threads_per_rank"]}
    doc["arms"]["allreduce"] = {"seconds": d["allreduce_seconds"], "gradient_numel": d["gradient_numel"],
                                "megabytes": d["gradient_numel"] * 4 / 2**20}
    base = doc["arms"][f"1proc_{cores}thr"]["images_per_s"]
    doc["speedup_ddp2_over_1proc_all_cores"] = doc["arms"]["ddp_2proc"]["images_per_s"] / base
    doc["allreduce_share_of_ddp_step"] = d["allreduce_seconds"] / sec
    print(f"DDP 2 processes x {d['threads_per_rank']} thread(s): {sec:.3f} s/step, {args.batch / sec:.1f} img/s "
          f"(x{doc['speedup_ddp2_over_1proc_all_cores']:.2f} vs 1 process with {cores} threads)")
    print(f"bare gloo all-reduce of {d['gradient_numel']:,} floats ({doc['arms']['allreduce']['megabytes']:.1f} MiB): "
          f"{d['allreduce_seconds'] * 1000:.1f} ms = {100 * doc['allreduce_share_of_ddp_step']:.1f} % of a DDP step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
