"""Benchmark of QAConv pairwise scoring (Liao & Shao, ECCV 2020): throughput and memory of the blocked matcher.

CPU (default): a CUHK03-sized problem -- 742 probe x 2,866 gallery maps, d = 128, 24 x 8 locations (the paper's
layer3 map of a 384 x 128 image), random unit-norm maps, a "trained-like" head (random BN affine and FC
weights, BN statistics measured on random pairs; speed does not depend on training) -- scored through ``QAConvMatcher``
(``prepare_gallery`` then ``score`` per chunk of 256 queries, as ``evaluate_matcher`` does; gallery blocks of
``--block-size``) in a fresh spawned process, whose peak RSS (VmHWM) is reported. In the same run, a naive per-pair loop
(one ``[hw, d] x [d, hw]`` product, two max reductions and BN-FC-BN per pair) scores 2 probes against the first
1,000 gallery maps: pairs/s of both, their ratio and the largest score difference. The explicit loop reference
(:func:`nasreid.models.qaconv.qaconv_reference`) scores a single pair as a sanity check.

``--device cuda``: a Market-1501-sized problem (3,368 x 15,913), gallery maps in float16 (the matcher's default
on CUDA); peak GPU memory from ``torch.cuda.max_memory_allocated``.

Writes ``results/benchmarks/qaconv_<device>.json`` (relative to the repository root; ``--out`` to change) and
prints a table. Full CPU run: a few minutes on 2 cores (about 1e13 multiply-adds).

Usage: python benchmarks/bench_qaconv.py [--device cpu|cuda] [--quick] [--block-size N] [--naive-probes K]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_eval import _vm_hwm_kib  # noqa: E402  (peak RSS of a fresh process, one helper for every benchmark)
from nasreid.evaluation.matchers import FeatureSet  # noqa: E402
from nasreid.evaluation.qaconv import QAConvMatcher  # noqa: E402
from nasreid.models.qaconv import QAConvHead, qaconv_reference  # noqa: E402

CHUNK = 256  # queries per evaluate_matcher chunk


def make_head(d: int, h: int, w: int, device) -> QAConvHead:
    """A "trained-like" head in eval mode: random BN affine parameters and FC weights, BN running statistics
    measured on pairs of random maps (as training leaves them), so the scores spread over (0, 1)."""
    g = torch.Generator().manual_seed(0)
    head = QAConvHead(d, h, w, "layer3", dim=None)
    with torch.no_grad():
        for bn in (head.bn_in, head.bn_out):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
            bn.momentum = None  # cumulative average over the calibration batches
        head.fc.weight.copy_(torch.randn(head.fc.weight.shape, generator=g) * 0.1)
        head.train()
        for seed in range(3):
            head(make_maps(8, d, h, w, 100 + seed), make_maps(32, d, h, w, 200 + seed))
        for bn in (head.bn_in, head.bn_out):
            bn.momentum = 0.1
    return head.eval().to(device)


def make_maps(n: int, d: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, d, h, w)
    for s in range(0, n, 512):  # no large temporary
        out[s:s + 512] = F.normalize(torch.randn(min(512, n - s), d, h, w, generator=g), dim=1)
    return out


def feature_set(maps: torch.Tensor) -> FeatureSet:
    n = maps.shape[0]
    return FeatureSet(maps, np.arange(n), np.zeros(n, dtype=np.int64))


def run_blocked(nq, ng, d, h, w, device, block_size, keep_rows, threads=None):
    """Score all pairs through QAConvMatcher; returns timings, memory and the first ``keep_rows`` score rows."""
    if threads:
        torch.set_num_threads(threads)
    head = make_head(d, h, w, device)
    query, gallery = feature_set(make_maps(nq, d, h, w, 1)), feature_set(make_maps(ng, d, h, w, 2))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_kib = _vm_hwm_kib()
    matcher = QAConvMatcher(block_size=block_size, head=head)
    t0 = time.perf_counter()
    matcher.prepare_gallery(gallery)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_prep = time.perf_counter() - t0
    kept, checksum = [], 0.0
    t0 = time.perf_counter()
    for s in range(0, nq, CHUNK):
        e = min(s + CHUNK, nq)
        scores = matcher.score(query, s, e)
        checksum += float(scores.double().sum())  # consumes the chunk (and syncs on CUDA)
        if s < keep_rows:
            kept.append(scores[: keep_rows - s].cpu())
    secs = time.perf_counter() - t0
    out = {"seconds": secs, "prepare_seconds": t_prep, "pairs_per_s": nq * ng / secs, "checksum": checksum,
           "gallery_dtype": str(matcher._gallery.dtype).replace("torch.", "")}
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    peak = _vm_hwm_kib()
    if peak is not None:
        out["peak_rss_gib"] = peak / 2 ** 20
        out["rss_before_scoring_gib"] = (base_kib or 0) / 2 ** 20
    out["threads"] = torch.get_num_threads()
    return out, torch.cat(kept).numpy() if kept else None  # numpy: crosses the process boundary by value


def _worker(args, queue):
    try:
        queue.put(run_blocked(*args))
    except BaseException as e:  # report instead of hanging the parent
        queue.put(e)


def naive_scores(head, query, gallery):
    """Per-pair loop: ``S = q^T g`` ([hw, hw]), max over each side, BN-FC-BN; one pair at a time."""
    hw = head.height * head.width
    qf = query.flatten(2).transpose(1, 2).contiguous()  # [P, hw, d]
    gf = gallery.flatten(2)  # [G, d, hw]
    out = torch.empty(query.shape[0], gallery.shape[0])
    with torch.no_grad():
        for i in range(query.shape[0]):
            for j in range(gallery.shape[0]):
                sim = qf[i] @ gf[j]  # [hw, hw]
                vec = torch.cat((sim.amax(dim=1), sim.amax(dim=0))).view(1, 2 * hw)
                out[i, j] = torch.sigmoid(head.classify(vec.float()))[0]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small problem, for a smoke run")
    ap.add_argument("--block-size", type=int, default=256, help="gallery maps per block (QAConvMatcher)")
    ap.add_argument("--naive-probes", type=int, default=None, help="probes scored by the naive loop (2)")
    ap.add_argument("--out", default=None, help="JSON path (default results/benchmarks/qaconv_<device>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    d, h, w = 128, 24, 8
    if args.quick:
        nq, ng, name = (64, 512, "quick") if device.type == "cpu" else (512, 4096, "quick")
    elif device.type == "cpu":
        nq, ng, name = 742, 2866, "CUHK03-sized"
    else:
        nq, ng, name = 3368, 15913, "Market-1501-sized"
    naive_p = args.naive_probes or 2
    load_start = os.getloadavg()[0]  # other users of the machine show here
    hw = h * w

    # blocked matcher: fresh spawned process on CPU (its own peak RSS); in-process on CUDA (GPU memory stats)
    job = (nq, ng, d, h, w, device, args.block_size, naive_p)
    if device.type == "cpu":
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(job, queue))
        proc.start()
        res = queue.get()
        proc.join()
        if isinstance(res, BaseException):
            raise res
        blocked, kept = res
    else:
        run_blocked(min(nq, 64), min(ng, 1024), d, h, w, device, args.block_size, 0)  # warm-up (cuBLAS, allocator)
        blocked, kept = run_blocked(*job)
    kept = torch.from_numpy(kept)

    # naive per-pair loop on a subset, same maps (same seeds); the blocked matcher on the same subset, interleaved
    # with it (best of 2 each), so that both see the same machine load
    head = make_head(d, h, w, device)
    query = make_maps(naive_p, d, h, w, 1).to(device)
    gallery_maps = make_maps(ng, d, h, w, 2)
    naive_g = min(ng, 1000)
    gallery = gallery_maps[:naive_g].to(device)
    if device.type == "cuda":
        gallery = gallery.half()
        query = query.half()

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, res

    t_naive = t_sub = float("inf")
    for _ in range(2):
        dt, naive = timed(lambda: naive_scores(head, query, gallery))
        t_naive = min(t_naive, dt)
        dt, _ = timed(lambda: head.similarity(query, gallery, block_size=args.block_size))
        t_sub = min(t_sub, dt)
    naive_pps = naive_p * naive_g / t_naive
    sub_pps = naive_p * naive_g / t_sub
    max_diff = float((naive - kept[:, :naive_g]).abs().max())

    # explicit loop reference: one pair (sanity: same logit as the head)
    hcpu = make_head(d, h, w, "cpu")
    q1, g1 = make_maps(1, d, h, w, 1), gallery_maps[:1]
    t0 = time.perf_counter()
    ref = torch.sigmoid(qaconv_reference(hcpu, q1, g1)).float()
    t_ref = time.perf_counter() - t0
    ref_diff = float((ref[0, 0] - kept[0, 0]).abs())

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(0)
    else:
        dev_name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                dev_name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), dev_name)
        except OSError:
            pass
    full_gib = nq * ng * hw * hw * 4 / 2 ** 30
    report = {
        "problem": name, "num_query": nq, "num_gallery": ng, "dim": d, "map": [h, w], "kernel": 1,
        "device": args.device, "device_name": dev_name, "torch": torch.__version__,
        "torch_threads": blocked["threads"], "block_size": args.block_size, "chunk_size": CHUNK,
        "blocked": blocked,
        "naive": {"probes": naive_p, "gallery": naive_g, "pairs": naive_p * naive_g, "seconds": t_naive,
                  "pairs_per_s": naive_pps},
        "blocked_on_naive_subset": {"pairs": naive_p * naive_g, "seconds": t_sub, "pairs_per_s": sub_pps},
        "speedup_blocked_over_naive_same_subset": sub_pps / naive_pps,
        "speedup_full_run_over_naive": blocked["pairs_per_s"] / naive_pps,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "max_abs_diff_blocked_vs_naive": max_diff,
        "reference_loop": {"pairs": 1, "seconds": t_ref, "abs_diff_vs_blocked": ref_diff},
        "full_similarity_tensor_gib": full_gib,
        "gflops_effective": blocked["pairs_per_s"] * hw * hw * d * 2 / 1e9,
    }
    out = args.out or os.path.join(ROOT, "results", "benchmarks", f"qaconv_{args.device}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)

    mem = (f"peak GPU {blocked['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in blocked
           else f"peak RSS {blocked.get('peak_rss_gib', float('nan')):.2f} GiB "
                f"(before scoring {blocked.get('rss_before_scoring_gib', float('nan')):.2f} GiB)")
    print(f"QAConv scoring, {name}: {nq} x {ng} pairs, d={d}, map {h}x{w}, kernel 1, {args.device} "
          f"({dev_name}), torch {torch.__version__}, {blocked['threads']} threads, block {args.block_size}, "
          f"gallery {blocked['gallery_dtype']}")
    print(f"{'method':<34}{'pairs':>12}{'seconds':>10}{'pairs/s':>12}  memory / check")
    print(f"{'QAConvMatcher (blocked)':<34}{nq * ng:>12,}{blocked['seconds']:>10.2f}{blocked['pairs_per_s']:>12,.0f}  "
          f"{mem}")
    print(f"{'naive per-pair loop (subset)':<34}{naive_p * naive_g:>12,}{t_naive:>10.2f}{naive_pps:>12,.0f}  "
          f"max |diff| vs blocked {max_diff:.2e}")
    print(f"{'QAConvMatcher blocking (subset)':<34}{naive_p * naive_g:>12,}{t_sub:>10.2f}{sub_pps:>12,.0f}  "
          f"head.similarity, interleaved with the naive loop")
    print(f"{'explicit loop reference':<34}{1:>12,}{t_ref:>10.2f}{1 / t_ref:>12,.2f}  "
          f"|diff| vs blocked {ref_diff:.2e}")
    print(f"speed-up blocked / naive: {report['speedup_blocked_over_naive_same_subset']:.2f}x on the same subset, "
          f"{report['speedup_full_run_over_naive']:.2f}x full run vs subset; "
          f"effective {report['gflops_effective']:.0f} "
          f"GFLOP/s in the full run; the full similarity tensor would take {full_gib:,.0f} GiB")
    print(f"1-min load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end "
          f"({os.cpu_count()} logical CPUs)")
    print(f"wrote {os.path.relpath(out, ROOT) if out.startswith(ROOT) else out}")
    tol = 1e-4 if device.type == "cpu" else 5e-3
    return 0 if max_diff <= tol and ref_diff <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
