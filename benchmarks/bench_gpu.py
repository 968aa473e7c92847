"""GPU benchmark: training throughput of the OSNet-AIN supernet (Gumbel, hard / soft) and of derived networks
in fp32 vs AMP fp16 + channels_last, and the seconds of a Market-1501-sized evaluation. Everything is
measured in ONE run, so every ratio compares figures taken on the same machine minutes apart.

Random tensors and synthetic labels only (no dataset, no data loading, no JPEG decoding): the figures are
COMPUTE ONLY, i.e. upper bounds of what a real run reaches when its data loader keeps up.

1. Training step, ``images/s = batch / median seconds per step`` (256x128, width x1.0, batch 64, 751 classes,
   PK labels P = batch / 4 identities x K = 4 images so the batch-hard triplet has positives):
   one full step = zero_grad + forward + loss (label-smoothed ID + batch-hard triplet, ``build_reid_loss(...,
   triplet_weight=1)``) + backward + SGD (momentum 0.9, wd 5e-4) step, for

   * ``derived``  -- the fixed OSNet-AIN network (preset ``osnet_ain``), trained by the project's own retrain
     step (``SupervisedMethod.step``: autocast, ``backward`` with the finite check, ``optimizer_step``);
   * ``supernet_hard`` / ``supernet_soft`` -- the OSNet-AIN supernet (``share_weights`` default: true) under the
     Gumbel strategy (``GumbelStrategy.train_step``: theta and pi in one SGD step); hard mode samples one path
     and runs the other candidates without autograd (``hard_gradient: full``), soft mode runs all four. Both
     read the sampled argmax on the host (a device sync per mixed op) -- part of the measured cost;
   * ``--unshared`` adds ``supernet_{hard,soft}_unshared`` (``share_weights: false``, Fig. 5 as printed);
   * ``msinet_derived`` (optional, ``--skip-msinet`` leaves it out) -- MSINet preset ``msinet_paper`` as
     ``recipes/msinet_retrain.yaml`` retrains it (local branch, ``msinet`` loss: ID + triplet on both branches).

   each in two precisions: ``fp32`` (float32, channels_first (NCHW); note that PyTorch's default
   ``torch.backends.cudnn.allow_tf32 = True`` lets cuDNN run the float32 convolutions in TF32 -- the flags are
   recorded; ``--no-tf32`` turns TF32 off) and ``amp_cl`` (``torch.autocast`` float16 + ``GradScaler`` +
   channels_last model and input, through ``nasreid.engine.trainer.device_context``). Reported: median
   s/step and images/s per arm, peak GPU memory per arm (``torch.cuda.max_memory_allocated``, statistics reset
   before the network is built, so weights + grads + momentum + activations), the AMP+CL / fp32 speed-up per
   network and the supernet / derived ratio of s/step per precision. Warm-up: ``--warmup`` steps (cuDNN
   autotuning, ``cudnn.benchmark = True``) and, with AMP, more steps until the GradScaler stops skipping
   steps (its initial scale overflows on a fresh network); each timed step is bracketed by
   ``torch.cuda.synchronize()`` (``bench_supernet.time_steps``) and the median of ``--iters`` is kept.

2. Market-sized evaluation (seconds):

   a. feature extraction of 3,368 query + 15,913 gallery images (256x128) with the derived network in eval mode
      through ``nasreid.evaluation.extract_features`` (batch ``--eval-batch``, default 128 as the recipes'
      ``eval.batch_size``), ``amp_cl`` (fp16 autocast + channels_last) vs ``fp32``. The images are a pool of
      random tensors generated on the GPU once, before timing, and handed out in batches: NO data loading,
      decoding, resizing or host-to-device image copy is included. Included: the forward pass, the per-batch
      channels_last conversion, the float32 cast and the device-to-host copy of each batch's features. A
      warm-up pass over every batch shape (full and both remainders) comes first, then the median of
      ``--eval-repeats`` passes.
   b. ranking: ``nasreid.evaluation.evaluate_features`` (cosine, chunk 256, CMC + mAP + mINP) of 3,368 x 15,913
      random D=512 features with Market-like labels (``bench_eval.make_labels``: 750 ids, 6 cameras, pid -1
      junk and pid 0 distractors in the gallery), features on the GPU (distances on the GPU; each chunk's
      distances go to the host and are ranked on the CPU, as ``evaluate_matcher`` does) and, for comparison
      in the same run, features on the CPU (which is what ``evaluate_model`` hands it: extracted features
      are CPU tensors). One warm-up call, then the median of ``--eval-repeats``.
   ``market_total_s`` = extraction (AMP+CL, query + gallery) + ranking (GPU features): the compute of one
   Market-1501 evaluation, excluding data loading and model building.

3. Output: a readable table on stdout (a progress line after every arm) and
   ``results/benchmarks/gpu_<tag>.json`` (``--tag``, default the GPU name as a slug; ``--out`` overrides the
   path), rewritten after every arm so that a timeout loses nothing already measured. It holds the GPU name,
   CUDA / cuDNN / torch versions, TF32 flags, all settings and all figures (per-iteration times included).

The default CUDA run (iters 20) is sized to take a few minutes on an H100 (an estimate from step counts: about
25-55 steps per training arm, four extraction passes over 19,281 images per precision; CUDA start, cuDNN
autotuning and the supernet soft arm dominate), well inside 6 minutes; ``--budget-s`` (default 300) skips the
optional arms (MSINet, unshared) once the run has taken that long.

Usage::

    # on the GPU machine (the command to run; writes results/benchmarks/gpu_<gpu name slug>.json)
    python benchmarks/bench_gpu.py --device cuda

    python benchmarks/bench_gpu.py --device cuda --tag h100 --iters 30 --unshared   # more arms / iterations
    python benchmarks/bench_gpu.py --device cuda --quick                 # tiny sizes on the GPU (smoke)
    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py --device cpu --out /tmp/gpu_smoke.json
        # CPU smoke test (implies --quick: batch 4, 64x32, 2 iterations, evaluation 50 x 200; AMP and
        # channels_last are no-ops on the CPU, so the amp_cl arms run in fp32 there; figures meaningless)
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import make_labels  # Market-like labels: junk, distractors, cameras
from bench_supernet import time_steps  # the timing loop of the supernet benchmarks
from nasreid.engine.trainer import Trainer, device_context
from nasreid.evaluation import evaluate_features, extract_features
from nasreid.genotype import preset_genotype
from nasreid.losses import build_reid_loss
from nasreid.methods import SupervisedMethod
from nasreid.models.complexity import count_parameters
from nasreid.registry import LOSSES, get_space, get_strategy

REPO = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "amp_cl")
#: ``--breakdown`` adds AMP alone and channels_last alone (which of the two costs or helps)
ALL_PRECISIONS = ("fp32", "amp", "cl", "amp_cl")


def _ctx(dev, prec: str):
    return device_context(str(dev), amp=prec in ("amp", "amp_cl"), channels_last=prec in ("cl", "amp_cl"))
FULL = {"batch": 64, "height": 256, "width_px": 128, "width": 1.0, "iters": 20, "warmup": 5, "eval_query": 3368,
        "eval_gallery": 15913, "eval_batch": 128, "eval_repeats": 3, "eval_ids": 750, "eval_dim": 512}
QUICK = {"batch": 4, "height": 64, "width_px": 32, "width": 1.0, "iters": 2, "warmup": 1, "eval_query": 50,
         "eval_gallery": 200, "eval_batch": 16, "eval_repeats": 1, "eval_ids": 20, "eval_dim": 512}
#: recipes/msinet_retrain.yaml: space kwargs and loss kwargs of the MSINet retrain
MSINET_SPACE = {"local_branch": True, "local_dim": 256}
MSINET_LOSS = {"label_smooth": 0.1, "triplet_weight": 1.0, "triplet_margin": 0.3, "local_weight": 1.0,
               "sam_weight": 0.0, "sam_channels": 512}


# ---------------------------------------------------------------------------------------------------------
def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_") or "device"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def fresh_memory(dev: torch.device) -> int:
    """Free what previous arms left, reset the peak statistics; returns the bytes still allocated."""
    gc.collect()
    if dev.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_mib(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def pk_labels(batch: int, classes: int, dev: torch.device, k: int = 4) -> torch.Tensor:
    """PK batch labels (P ids x K images, the samplers' layout) so the batch-hard triplet has positives."""
    k = min(k, batch) if batch >= 2 else 1
    p = math.ceil(batch / k)
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(classes, generator=g)[:p]
    return ids.repeat_interleave(k)[:batch].to(dev)


def environment(dev: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_threads_torch": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(dev),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(gpu_name=torch.cuda.get_device_name(dev), gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 2), gpu_sms=props.multi_processor_count)
    else:
        env.update(gpu_name=None)
    return env


class Report:
    """The JSON document, rewritten (atomically) after every arm."""

    def __init__(self, path: Path, doc: dict):
        self.path, self.doc = path, doc
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        self.doc["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=2)
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------------------
# 1. training steps
def build_arm(net: str, ctx, args, dev):
    """``(step function, parameter count, description)`` of one network under the device context ``ctx``."""
    torch.manual_seed(0)
    x = ctx.images(torch.randn(args.batch, 3, args.height, args.width_px, device=dev))
    batch = {"img": x, "pid": pk_labels(args.batch, args.classes, dev)}
    if net in ("derived", "msinet_derived"):
        if net == "derived":
            geno = preset_genotype("osnet_ain", "osnet_ain", width_mult=args.width)
            loss_fn = build_reid_loss(args.classes, label_smooth=0.1, triplet_weight=1.0)
            what = "OSNet-AIN preset osnet_ain, SupervisedMethod.step, ID + triplet"
        else:
            geno = preset_genotype("msinet", "msinet_paper", width_mult=args.width, **MSINET_SPACE)
            loss_fn = LOSSES.get("msinet")(args.classes, **MSINET_LOSS)
            what = "MSINet preset msinet_paper (local branch), SupervisedMethod.step, msinet loss (ID + triplet)"
        model = ctx.model(geno.build(num_classes=args.classes)).train()
        loss_fn = loss_fn.to(dev)
        params = [p for p in model.parameters() if p.requires_grad] + list(loss_fn.parameters())
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        trainer = Trainer(model, lambda tr, b: {}, epochs=1, loader=[], ctx=ctx, optimizer=opt)
        method = SupervisedMethod()
        method.loss_fn = loss_fn  # what TrainingMethod.fit sets before the first step
        method.ctx = SimpleNamespace(recipe=SimpleNamespace(optim=SimpleNamespace(grad_clip=None)))
        return (lambda: method.step(trainer, batch)), count_parameters(model), what
    mode = "soft" if "soft" in net else "hard"
    share = not net.endswith("_unshared")
    space = get_space("osnet_ain")(num_classes=args.classes, width_mult=args.width, share_weights=share)
    strat = get_strategy("gumbel")(space, mode=mode, seed=1)
    model = ctx.model(strat.attach()).train()
    n_params = count_parameters(model)
    opt = torch.optim.SGD(strat.param_groups(0.01, 5e-4), lr=0.01, momentum=0.9)
    loss_fn = build_reid_loss(args.classes, label_smooth=0.1, triplet_weight=1.0).to(dev)
    autocast = ctx.autocast if ctx.amp else None
    what = (f"OSNet-AIN supernet (share_weights={share}), GumbelStrategy.train_step mode={mode}, "
            "ID + triplet, theta and pi")
    return (lambda: strat.train_step(batch, loss_fn, opt, scaler=ctx.scaler, autocast=autocast)), n_params, what


def run_train_arm(net: str, prec: str, args, dev) -> dict:
    mem0 = fresh_memory(dev)
    ctx = _ctx(dev, prec)
    t_build = time.perf_counter()
    step, n_params, what = build_arm(net, ctx, args, dev)
    t_build = time.perf_counter() - t_build
    t0 = time.perf_counter()
    time_steps(step, args.warmup, 0, dev)
    extra = 0
    if ctx.scaler is not None:  # a fresh GradScaler skips steps until its scale stops overflowing fp16
        while extra < 30:
            before = ctx.scaler.get_scale()
            step()
            extra += 1
            if ctx.scaler.get_scale() >= before:
                break
    warm_s = time.perf_counter() - t0
    scale0 = ctx.scaler.get_scale() if ctx.scaler is not None else None
    times = [time_steps(step, 0, 1, dev) for _ in range(args.iters)]
    scale1 = ctx.scaler.get_scale() if ctx.scaler is not None else None
    med = statistics.median(times)
    res = {
        "network": net, "precision": prec, "what": what,
        "amp": ctx.amp, "channels_last": ctx.channels_last,
        "seconds_per_step_median": med, "seconds_per_step_min": min(times),
        "seconds_per_step_mean": statistics.fmean(times), "images_per_s": args.batch / med,
        "iteration_seconds": [round(t, 6) for t in times],
        "peak_memory_mib": peak_mib(dev), "memory_before_arm_mib": mem0 / 2**20 if dev.type == "cuda" else None,
        "parameters": n_params, "warmup_steps": args.warmup + extra, "warmup_seconds": warm_s,
        "build_seconds": t_build,
    }
    if scale0 is not None:
        res["grad_scale"] = scale1
        res["skipped_steps_while_timed"] = round(math.log2(scale0 / scale1)) if scale1 < scale0 else 0
    return res


# ---------------------------------------------------------------------------------------------------------
# 2. evaluation
class SyntheticLoader:
    """Batches ``{"img", "pid", "camid", "path"}`` of ``n`` images drawn from a pool already on the device."""

    def __init__(self, pool: torch.Tensor, n: int | None = None, sizes: list[int] | None = None):
        self.pool = pool
        self.sizes = sizes if sizes is not None else [min(pool.shape[0], n - s) for s in range(0, n, pool.shape[0])]

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        for b in self.sizes:
            yield {"img": self.pool[:b], "pid": np.zeros(b, np.int64), "camid": np.zeros(b, np.int64),
                   "path": [""] * b}


def run_extraction(prec: str, args, dev) -> dict:
    mem0 = fresh_memory(dev)
    ctx = _ctx(dev, prec)
    torch.manual_seed(0)
    model = ctx.model(preset_genotype("osnet_ain", "osnet_ain", width_mult=args.width)
                      .build(num_classes=args.classes)).eval()
    pool = torch.randn(args.eval_batch, 3, args.height, args.width_px, device=dev)
    kw = {"device": dev, "amp": ctx.amp, "channels_last": ctx.channels_last, "progress": False}
    eb = args.eval_batch
    shapes = sorted({eb, args.eval_query % eb or eb, args.eval_gallery % eb or eb}, reverse=True)
    t0 = time.perf_counter()
    for _ in range(2):  # every batch shape, twice: cuDNN autotuning happens here, not in the timed passes
        extract_features(model, SyntheticLoader(pool, sizes=shapes), **kw)
    sync(dev)
    warm_s = time.perf_counter() - t0
    q_loader, g_loader = SyntheticLoader(pool, args.eval_query), SyntheticLoader(pool, args.eval_gallery)
    out: dict = {}

    def q():
        out["q"] = extract_features(model, q_loader, **kw)[0]

    def g():
        out["g"] = extract_features(model, g_loader, **kw)[0]

    tq, tg = [], []
    for _ in range(args.eval_repeats):
        tq.append(time_steps(q, 0, 1, dev))
        tg.append(time_steps(g, 0, 1, dev))
    tot = [a + b for a, b in zip(tq, tg)]
    n = args.eval_query + args.eval_gallery
    feat_dim = int(out["q"].shape[1])
    return {
        "precision": prec, "amp": ctx.amp, "channels_last": ctx.channels_last,
        "query_seconds": statistics.median(tq), "gallery_seconds": statistics.median(tg),
        "total_seconds": statistics.median(tot), "images_per_s": n / statistics.median(tot),
        "repeat_total_seconds": [round(t, 4) for t in tot], "feature_dim": feat_dim,
        "peak_memory_mib": peak_mib(dev), "memory_before_arm_mib": mem0 / 2**20 if dev.type == "cuda" else None,
        "warmup_seconds": warm_s, "warmup_batch_shapes": shapes,
    }


def run_ranking(feat_dev: torch.device, args, dev) -> dict:
    fresh_memory(dev)
    rng = np.random.default_rng(0)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng, args.eval_query, args.eval_gallery, args.eval_ids, 6)
    gen = torch.Generator().manual_seed(0)
    qf = torch.randn(args.eval_query, args.eval_dim, generator=gen).to(feat_dev)
    gf = torch.randn(args.eval_gallery, args.eval_dim, generator=gen).to(feat_dev)
    res: dict = {}

    def call():
        res["r"] = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric="cosine", chunk_size=256)

    time_steps(call, 1, 0, dev)
    times = [time_steps(call, 0, 1, dev) for _ in range(args.eval_repeats)]
    r = res["r"]
    return {
        "features_on": str(feat_dev), "seconds": statistics.median(times),
        "repeat_seconds": [round(t, 4) for t in times],
        "num_valid_queries": int(r["num_valid_queries"]), "mAP_percent_random": 100 * float(r["mAP"]),
        "junk_gallery": int((g_pids == -1).sum()), "distractor_gallery": int((g_pids == 0).sum()),
        "cpu_threads_for_ranking": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------
def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_tables(doc: dict) -> None:
    tr = doc["train"]
    print()
    print(f"{'training step':<26}{'precision':<10}{'s/step':>9}{'img/s':>9}{'peak MiB':>10}"
          f"{'AMP+CL/fp32':>13}{'vs derived':>12}")
    nets = list(dict.fromkeys(a["network"] for a in tr.values()))
    for net in nets:
        for prec in PRECISIONS:
            a = tr.get(f"{net}/{prec}")
            if a is None:
                continue
            sp = doc["speedup_amp_cl_over_fp32"].get(net) if prec == "amp_cl" else None
            base = "derived" if not net.startswith("msinet") else None
            ratio = doc["ratio_vs_derived"].get(prec, {}).get(net) if base and net != "derived" else None
            print(f"{net:<26}{prec:<10}{a['seconds_per_step_median']:>9.4f}{a['images_per_s']:>9.1f}"
                  f"{fmt(a['peak_memory_mib'], '.0f'):>10}{fmt(sp, '.2f') + ('x' if sp else ''):>13}"
                  f"{fmt(ratio, '.2f') + ('x' if ratio else ''):>12}")
    ev = doc.get("eval", {})
    if ev:
        s = doc["settings"]
        print(f"\nMarket-sized evaluation ({s['eval_query']:,} query + {s['eval_gallery']:,} gallery; random inputs, "
              "no data loading)")
        for prec in PRECISIONS:
            e = ev.get(f"extract/{prec}")
            if e:
                print(f"  extraction {prec:<7} query {e['query_seconds']:7.3f} s | "
                      f"gallery {e['gallery_seconds']:7.3f} s"
                      f" | total {e['total_seconds']:7.3f} s | {e['images_per_s']:8.1f} img/s | peak "
                      f"{fmt(e['peak_memory_mib'], '.0f')} MiB")
        if "extract_speedup_amp_cl_over_fp32" in ev:
            print(f"  extraction AMP+CL / fp32 speed-up {ev['extract_speedup_amp_cl_over_fp32']:.2f}x")
        for key in ("rank/device_features", "rank/cpu_features"):
            e = ev.get(key)
            if e:
                print(f"  evaluate_features (features on {e['features_on']}): {e['seconds']:.3f} s "
                      f"({e['num_valid_queries']} valid queries, {e['cpu_threads_for_ranking']} CPU threads)")
        if "market_total_s" in ev:
            print(f"  Market evaluation compute total ({ev['market_total_precision']} extraction + ranking with "
                  f"features on the device): {ev['market_total_s']:.3f} s")


def derive(doc: dict) -> None:
    tr = doc["train"]
    sp, rat = {}, {}
    for key, a in tr.items():
        net, prec = key.split("/")
        other = tr.get(f"{net}/fp32")
        if prec == "amp_cl" and other:
            sp[net] = a["images_per_s"] / other["images_per_s"]
        base = tr.get(f"derived/{prec}")
        if base and net.startswith("supernet"):
            rat.setdefault(prec, {})[net] = a["seconds_per_step_median"] / base["seconds_per_step_median"]
    doc["speedup_amp_cl_over_fp32"] = sp
    doc["ratio_vs_derived"] = rat
    ev = doc.get("eval", {})
    e32, eamp = ev.get("extract/fp32"), ev.get("extract/amp_cl")
    if e32 and eamp:
        ev["extract_speedup_amp_cl_over_fp32"] = e32["total_seconds"] / eamp["total_seconds"]
    rk = ev.get("rank/device_features")
    best = eamp or e32
    if best and rk:
        ev["market_total_s"] = best["total_seconds"] + rk["seconds"]
        ev["market_total_precision"] = best["precision"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (implies --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test; figures meaningless)")
    ap.add_argument("--tag", help="JSON name results/benchmarks/gpu_<tag>.json (default: GPU name slug)")
    ap.add_argument("--out", help="JSON path (overrides --tag)")
    for k in ("batch", "height", "width_px", "iters", "warmup", "eval_query", "eval_gallery", "eval_batch",
              "eval_repeats", "eval_ids", "eval_dim"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                        help=f"default {FULL[k]} ({QUICK[k]} with --quick)")
    ap.add_argument("--width", type=float, default=None, help="width multiplier (default 1.0)")
    ap.add_argument("--classes", type=int, default=751, help="identity classes (Market-1501 train: 751)")
    ap.add_argument("--unshared", action="store_true", help="also the share_weights: false supernet (hard, soft)")
    ap.add_argument("--skip-msinet", action="store_true", help="leave out the MSINet derived network")
    ap.add_argument("--skip-eval", action="store_true", help="leave out the evaluation benchmark")
    ap.add_argument("--breakdown", action="store_true", help="also AMP alone and channels_last alone (arms "
                    "'amp' and 'cl') for every network")
    ap.add_argument("--no-tf32", action="store_true", help="disable TF32 for cuDNN and matmul (fp32 arms)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="skip optional arms (unshared, MSINet) once the run has taken this long")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 on CPU)")
    args = ap.parse_args(argv)
    global PRECISIONS
    if args.breakdown:
        PRECISIONS = ALL_PRECISIONS
    t_start = time.perf_counter()

    dev = torch.device(args.device)
    notes = []
    if dev.type == "cpu" and not args.quick:
        args.quick = True
        notes.append("--device cpu implies --quick")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine; use --device cpu for the smoke test", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    for k, v in sizes.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads or dev.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if dev.type == "cpu":
        notes.append("CPU: AMP and channels_last are no-ops (device_context), so the amp_cl arms run in fp32 "
                     "channels_first and their 'speed-up' is noise")
    if dev.type == "cuda":
        if dev.index is None:  # "cuda" -> "cuda:<current>" (torch.cuda.set_device refuses an index-less device)
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        if args.no_tf32:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
    env = environment(dev)
    tag = args.tag or (slug(env["gpu_name"]) if env["gpu_name"] else "cpu") + ("_quick" if args.quick else "")
    path = Path(args.out) if args.out else REPO / "results" / "benchmarks" / f"gpu_{tag}.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    settings.update(input=f"{args.height}x{args.width_px}", loss="label-smoothed ID (0.1) + batch-hard triplet (w 1, "
                    "margin 0.3)", optimizer="SGD lr 0.01 momentum 0.9 wd 5e-4", labels="PK, K=4",
                    timing="median of --iters steps, each bracketed by torch.cuda.synchronize()")
    doc = {"benchmark": "bench_gpu", "started": datetime.datetime.now().isoformat(timespec="seconds"),
           "inputs": "random tensors / synthetic labels: compute only, no data loading",
           "environment": env, "settings": settings, "notes": notes, "train": {}, "eval": {},
           "skipped": [], "complete": False}
    report = Report(path, doc)
    report.write()
    print(f"bench_gpu: {env.get('gpu_name') or 'CPU'} | torch {env['torch']} | CUDA {env['cuda']} | cuDNN "
          f"{env['cudnn']} | cudnn.benchmark {env['cudnn_benchmark']} | TF32 conv {env['cudnn_allow_tf32']} "
          f"matmul {env['matmul_allow_tf32']} | CPU threads {env['cpu_threads_torch']}")
    print(f"  train: batch {args.batch}, {args.height}x{args.width_px}, width x{args.width}, {args.classes} classes, "
          f"warm-up {args.warmup}, median of {args.iters} | eval: {args.eval_query} x {args.eval_gallery}, "
          f"batch {args.eval_batch}, median of {args.eval_repeats} | JSON {path}")
    for n in notes:
        print("  note: " + n)

    def elapsed() -> float:
        return time.perf_counter() - t_start

    def train(net: str, optional: bool = False) -> None:
        for prec in PRECISIONS:
            key = f"{net}/{prec}"
            if optional and elapsed() > args.budget_s:
                doc["skipped"].append(f"{key} (budget {args.budget_s:.0f} s reached)")
                print(f"  [{elapsed():6.1f} s] skipped {key}: --budget-s {args.budget_s:.0f} reached")
                report.write()
                continue
            a = run_train_arm(net, prec, args, dev)
            doc["train"][key] = a
            derive(doc)
            report.write()
            print(f"  [{elapsed():6.1f} s] {key:<30} {a['seconds_per_step_median']:.4f} s/step "
                  f"{a['images_per_s']:8.1f} img/s  peak {fmt(a['peak_memory_mib'], '.0f')} MiB "
                  f"(warm-up {a['warmup_steps']} steps {a['warmup_seconds']:.1f} s)", flush=True)

    train("derived")
    train("supernet_hard")
    train("supernet_soft")
    if args.unshared:
        train("supernet_hard_unshared", optional=True)
        train("supernet_soft_unshared", optional=True)
    if not args.skip_eval:
        for prec in PRECISIONS:
            e = run_extraction(prec, args, dev)
            doc["eval"][f"extract/{prec}"] = e
            derive(doc)
            report.write()
            print(f"  [{elapsed():6.1f} s] extraction {prec:<8} {e['total_seconds']:.3f} s "
                  f"({e['images_per_s']:.1f} img/s)", flush=True)
        for key, fdev in (("rank/device_features", dev), ("rank/cpu_features", torch.device("cpu"))):
            if key == "rank/cpu_features" and dev.type == "cpu":
                continue
            r = run_ranking(fdev, args, dev)
            doc["eval"][key] = r
            derive(doc)
            report.write()
            print(f"  [{elapsed():6.1f} s] evaluate_features, features on {fdev}: {r['seconds']:.3f} s", flush=True)
        doc["eval"]["included"] = ("extraction: forward (eval mode), channels_last conversion of each batch, float32 "
                                   "cast, device-to-host copy of the features; ranking: distances (on the "
                                   "features' device), device-to-host copy of each distance chunk, CPU ranking "
                                   "(CMC, mAP, mINP)")
        doc["eval"]["excluded"] = ("data loading, JPEG decoding, resizing / normalisation, host-to-device image "
                                   "copies (images are random tensors already on the device), model building, "
                                   "flip test")
    if not args.skip_msinet:
        train("msinet_derived", optional=True)
    doc["complete"] = True
    doc["total_seconds"] = elapsed()
    derive(doc)
    report.write()
    print_tables(doc)
    if doc["skipped"]:
        print("skipped: " + "; ".join(doc["skipped"]))
    print(f"\nfigures from random inputs (compute only); total {elapsed():.1f} s; JSON written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
