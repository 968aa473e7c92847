"""Benchmark of nasreid's CMC / mAP evaluation (figures and ratios measured in one run).

(a) Market-1501-sized random problem (3,368 queries x 15,913 gallery, 750 ids, 6 cameras, pid -1 junk and pid 0
    distractors in the gallery, random float32 distances, fixed seed): seconds of ``evaluate_rank`` (CMC + mAP)
    next to a bare ``np.argsort(distmat, axis=1)`` of the same matrix (the floor of every argsort-based evaluator)
    and the textbook per-query reference loop; checks that CMC and mAP equal the reference's.
(c) Peak RAM (ru_maxrss of a fresh spawned process) and seconds of ``evaluate_features`` on an MSMT17-sized
    random problem (11,659 x 82,161 gallery, D=512 float32, 3,060 ids, 15 cameras); target < 4 GiB. This is the
    matcher path every model evaluation takes: ``evaluate_matcher`` with the ``FeatureDistance("cosine")``
    matcher, chunk by chunk.

Usage: python benchmarks/bench_eval.py [--quick] [--skip-msmt]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nasreid.evaluation import evaluate_features, evaluate_rank, evaluate_rank_reference  # noqa: E402


def make_labels(rng, nq, ng, ids, cams, junk_frac=0.176, distractor_frac=0.175):
    """Query pids 1..ids; gallery holds every id, plus pid -1 junk and pid 0 distractors (Market proportions)."""
    q_pids = rng.integers(1, ids + 1, nq)
    q_cams = rng.integers(0, cams, nq)
    g_pids = rng.integers(1, ids + 1, ng)
    g_cams = rng.integers(0, cams, ng)
    u = rng.random(ng)
    g_pids[u < junk_frac] = -1
    g_pids[(u >= junk_frac) & (u < junk_frac + distractor_frac)] = 0
    return q_pids, g_pids, q_cams, g_cams


def best_of(fn, n=3):
    best, out = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_market(nq, ng, ids, cams, seed=0):
    rng = np.random.default_rng(seed)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng, nq, ng, ids, cams)
    dist = rng.random((nq, ng), dtype=np.float32)
    labels = (q_pids, g_pids, q_cams, g_cams)
    t_nas, res = best_of(lambda: evaluate_rank(dist, *labels))
    t_sort, _ = best_of(lambda: np.argsort(dist, axis=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_nas1, _ = best_of(lambda: evaluate_rank(dist, *labels))
    finally:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ref = evaluate_rank_reference(dist, *labels)
    t_ref = time.perf_counter() - t0
    d_cmc = float(np.abs(res["cmc"] - ref["cmc"]).max())
    d_map = abs(res["mAP"] - ref["mAP"])
    same_valid = res["num_valid_queries"] == ref["num_valid_queries"]
    print(f"market-sized problem: {nq} x {ng}, {ids} ids, {cams} cameras, "
          f"{int((g_pids == -1).sum())} junk (pid -1), {int((g_pids == 0).sum())} distractors (pid 0), "
          f"{res['num_valid_queries']} valid queries; torch threads {threads}")
    print(f"market-sized CMC+mAP: nasreid {t_nas:.3f} s | numpy argsort {t_sort:.3f} s | "
          f"ratio {t_nas / t_sort:.3f} (target <= 0.5) | reference loop {t_ref:.2f} s | "
          f"max |Δ| cmc {d_cmc:.3g} mAP {d_map:.3g}")
    print(f"  nasreid with 1 torch thread (numpy's argsort is single-threaded): {t_nas1:.3f} s | "
          f"ratio {t_nas1 / t_sort:.3f} | speed-up over the reference loop {t_ref / t_nas:.1f}x")
    print(f"  rank-1 {100 * res['cmc'][0]:.3f}% mAP {100 * res['mAP']:.4f}% (random distances)")
    ok = same_valid and d_cmc <= 1e-9 and d_map <= 1e-9
    if not ok:
        print("  MISMATCH against the reference evaluation!")
    return ok


def _vm_hwm_kib() -> int | None:
    """Peak RSS of this process image (VmHWM, reset at exec; ru_maxrss may keep the forking parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _msmt_worker(nq, ng, dim, ids, cams, chunk_size, queue):
    """Runs in a fresh spawned process, so ru_maxrss is this problem's peak alone."""
    rng = np.random.default_rng(1)
    q_pids, g_pids, q_cams, g_cams = make_labels(rng, nq, ng, ids, cams, junk_frac=0.0, distractor_frac=0.0)
    g = torch.Generator().manual_seed(1)
    qf = torch.randn(nq, dim, generator=g)
    gf = torch.randn(ng, dim, generator=g)
    base = _vm_hwm_kib()
    t0 = time.perf_counter()
    res = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric="cosine", chunk_size=chunk_size)
    secs = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm = _vm_hwm_kib()
    queue.put((hwm if hwm is not None else maxrss, maxrss, base, secs, res["num_valid_queries"], float(res["mAP"])))


def bench_msmt(nq, ng, dim, ids, cams, chunk_size=256):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_msmt_worker, args=(nq, ng, dim, ids, cams, chunk_size, queue))
    proc.start()
    peak, maxrss, base, secs, valid, m_ap = queue.get()
    proc.join()
    gib = peak / 2**20
    full = nq * ng * 4 / 2**30
    before = f"{base / 2**20:.2f} GiB" if base is not None else "n/a"
    print(f"msmt-sized evaluate_features: {nq} x {ng}, D={dim}, {ids} ids, {cams} cameras, chunk {chunk_size}: "
          f"peak RSS {gib:.2f} GiB (target < 4) | {secs:.1f} s | {valid} valid queries, mAP {100 * m_ap:.3f}%")
    print(f"  fresh spawned process: VmHWM before evaluation (torch + random features) {before}; ru_maxrss "
          f"{maxrss / 2**20:.2f} GiB (on Linux it also keeps the forking parent's peak across exec); a full "
          f"float32 distance matrix alone would take {full:.2f} GiB")
    return gib < 4.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller problems, for a smoke run")
    ap.add_argument("--skip-msmt", action="store_true", help="skip the MSMT17-sized memory benchmark")
    args = ap.parse_args(argv)
    ok = True
    # the memory benchmark runs first, while this parent process is still small
    if args.quick:
        if not args.skip_msmt:
            ok &= bench_msmt(1000, 8000, 128, 300, 15)
        ok &= bench_market(400, 2000, 100, 6)
    else:
        if not args.skip_msmt:
            ok &= bench_msmt(11659, 82161, 512, 3060, 15)
        ok &= bench_market(3368, 15913, 750, 6)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
