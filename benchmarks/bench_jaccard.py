"""Benchmark: k-reciprocal Jaccard distance + DBSCAN (the clustering step of SpCL / DomainMix), sparse vs dense.

For N = 4,000 and 12,000 random 512-d float32 features (fixed seed), k1 = 30, k2 = 6, DBSCAN(eps=0.6,
min_samples=4, metric="precomputed"), each measurement in a fresh spawned process (seconds of every stage and
peak RSS = VmHWM of that process, with the RSS before the measured work -- torch imported, features made --
reported apart):

* ``sparse``: :func:`nasreid.evaluation.rerank.k_reciprocal_encoding` (chunked neighbours, sparse encodings)
  then ``.jaccard(max_distance=eps)`` -> ``scipy.sparse.csr_matrix`` -> DBSCAN. Exactly the dense clustering for
  ``eps <= max_distance < 1``.
* ``sparse-all``: the same with every pair sharing support stored (no ``max_distance``), the full sparse
  Jaccard matrix.
* ``dense``: a plain dense implementation of the same maths (full ``N x N`` distance matrix, full stable argsort,
  ``R*`` per item with set operations, dense ``V`` and expanded ``V`` in float64, the Jaccard row by row through
  the inverted index, dense ``N x N`` float64 Jaccard matrix) -> DBSCAN on the dense matrix.

Two data sets: ``random`` (i.i.d. Gaussian features: almost every pair of items shares some support, nothing
is within eps) and ``clustered`` (random Gaussian centres, 12 images per identity, noise of the same norm as
the centres: DBSCAN finds clusters). Agreement: DBSCAN labels of sparse and dense identical; the largest
``|d_J|`` difference over 64 sample rows (< 1e-6; both start from the same float32 distances, the sparse path
computes the few distances outside each item's 31 nearest pair by pair, which rounds differently).

Usage: python benchmarks/bench_jaccard.py [--quick] [--sizes 4000 12000] [--data random clustered]
       [--max-dense 12000] [--out results/benchmarks/jaccard_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_eval import _vm_hwm_kib  # noqa: E402  (peak RSS of a fresh process, one helper for every benchmark)

K1, K2, EPS, MIN_SAMPLES, DIM = 30, 6, 0.6, 4, 512
SAMPLE_ROWS = 64


def make_features(n: int, data: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    if data == "random":
        return torch.randn(n, DIM, generator=g)
    ids = max(1, n // 12)
    centres = torch.randn(ids, DIM, generator=g)
    labels = torch.arange(n) % ids
    return centres[labels] + torch.randn(n, DIM, generator=g)


def sample_rows(n: int) -> np.ndarray:
    return np.linspace(0, n - 1, SAMPLE_ROWS).astype(np.int64)


# ---------------------------------------------------------------------------------------------- dense
def dense_jaccard(x, k1: int, k2: int) -> np.ndarray:
    """Plain dense k-reciprocal Jaccard distance (same definitions as nasreid.evaluation.rerank): N x N
    matrices throughout, loops over items."""
    import torch

    from nasreid.evaluation.distance import distance_from_prepared, prepare_features

    xn = torch.nn.functional.normalize(x.float(), dim=1)
    n = xn.shape[0]
    # float32 N x N, 2 - 2 cos (squared L2 of normalised features), computed in the same 1,024-row products as
    # the sparse path so that both start from bitwise the same distances
    prep = prepare_features(xn, "euclidean")
    dist = np.empty((n, n), dtype=np.float32)
    for s in range(0, n, 1024):
        dist[s:s + 1024] = distance_from_prepared((prep[0][s:s + 1024], prep[1][s:s + 1024]), prep, "euclidean").numpy()
    rank = np.argsort(dist, axis=1, kind="stable")  # int64 N x N
    kk, kh = min(k1 + 1, n), min(int(np.around(k1 / 2.0)) + 1, n)
    fwd1 = [set(r) for r in rank[:, :kk].tolist()]
    fwdh = [set(r) for r in rank[:, :kh].tolist()]
    r1 = [[g for g in rank[p, :kk].tolist() if p in fwd1[g]] for p in range(n)]
    rh = [{g for g in rank[p, :kh].tolist() if p in fwdh[g]} for p in range(n)]
    v = np.zeros((n, n))  # float64
    for p in range(n):
        rp = set(r1[p])
        star = set(rp)
        for q in r1[p]:
            if 3 * len(rp & rh[q]) >= 2 * len(rh[q]):
                star |= rh[q]
        idx = np.fromiter(sorted(star), dtype=np.int64)
        w = np.exp(-(dist[p, idx].astype(np.float64) - dist[p, idx].min()))
        v[p, idx] = w / w.sum()
    del dist
    if k2 > 1:
        vqe = np.zeros_like(v)
        for p in range(n):
            vqe[p] = v[rank[p, :k2]].mean(axis=0)
        v = vqe
    del rank
    inv = [np.flatnonzero(v[:, k]) for k in range(n)]  # items with V_gk != 0, per dimension k
    total = v.sum(1)
    jac = np.ones((n, n))
    for p in range(n):
        dims = np.flatnonzero(v[p])
        gs = np.concatenate([inv[k] for k in dims])
        reps = [len(inv[k]) for k in dims]
        mins = np.minimum(np.repeat(v[p, dims], reps), v[gs, np.repeat(dims, reps)])
        smin = np.bincount(gs, weights=mins, minlength=n)
        hit = smin > 0
        jac[p, hit] = np.clip(1.0 - smin[hit] / (total[p] + total[hit] - smin[hit]), 0.0, 1.0)
    return jac


# ---------------------------------------------------------------------------------------------- workers
def _worker(method: str, n: int, data: str, queue):
    import torch
    from sklearn.cluster import DBSCAN

    from nasreid.evaluation.rerank import k_reciprocal_encoding

    x = make_features(n, data)
    base = _vm_hwm_kib()
    rows = sample_rows(n)
    stages = {}
    t0 = time.perf_counter()
    if method == "dense":
        jac = dense_jaccard(x, K1, K2)
        t1 = time.perf_counter()
        stages["jaccard"] = t1 - t0
        sample = jac[rows]
        nnz = int((jac < 1.0).sum())
        labels = DBSCAN(eps=EPS, min_samples=MIN_SAMPLES, metric="precomputed").fit_predict(jac)
        stages["dbscan"] = time.perf_counter() - t1
    else:
        enc = k_reciprocal_encoding(x, None, K1, K2, chunk_size=1024)
        t1 = time.perf_counter()
        stages["encoding"] = t1 - t0
        sp = enc.jaccard(max_distance=EPS if method == "sparse" else None).to_scipy()
        t2 = time.perf_counter()
        stages["jaccard"] = t2 - t1
        nnz = int(sp.nnz)
        labels = DBSCAN(eps=EPS, min_samples=MIN_SAMPLES, metric="precomputed").fit_predict(sp)
        stages["dbscan"] = time.perf_counter() - t2
        sample = enc.jaccard_dense(rows)  # not timed
        stages = {**stages, "detail": {k: round(v, 3) for k, v in enc.stats.items() if k.startswith("seconds")}}
    secs = time.perf_counter() - t0
    peak = _vm_hwm_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(dict(secs=secs, stages=stages, peak_kib=peak, base_kib=base, nnz=nnz, labels=labels.tolist(),
                   sample=sample.tolist(), threads=torch.get_num_threads()))


def measure(method: str, n: int, data: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(method, n, data, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 1,000 and 2,000 only (a smoke run)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 12000])
    ap.add_argument("--data", nargs="+", default=["random", "clustered"], choices=["random", "clustered"])
    ap.add_argument("--max-dense", type=int, default=12000, help="largest N run with the dense implementation")
    ap.add_argument("--out", default="results/benchmarks/jaccard_cpu.json", help="JSON path (repo-relative)")
    args = ap.parse_args(argv)
    sizes = [1000, 2000] if args.quick else args.sizes
    out_path = args.out if os.path.isabs(args.out) else os.path.join(REPO, args.out)
    rows, ok = [], True
    for data in args.data:
        for n in sizes:
            res = {}
            for method in ("sparse", "sparse-all", "dense"):
                if method == "dense" and n > args.max_dense:
                    print(f"  dense skipped for N={n} (--max-dense {args.max_dense})")
                    continue
                r = measure(method, n, data)
                res[method] = r
                labels = np.asarray(r["labels"])
                row = dict(data=data, n=n, method=method, seconds=round(r["secs"], 2),
                           stages={k: (round(v, 2) if isinstance(v, float) else v) for k, v in r["stages"].items()},
                           peak_rss_gib=round(r["peak_kib"] / 2**20, 3), rss_before_gib=round(r["base_kib"] / 2**20, 3),
                           stored_pairs=r["nnz"], clusters=len(set(labels.tolist()) - {-1}),
                           noise=int((labels == -1).sum()), torch_threads=r["threads"])
                rows.append(row)
                print(f"{data:9s} N={n:6d} {method:10s} {row['seconds']:8.2f} s  peak RSS "
                      f"{row['peak_rss_gib']:6.2f} GiB (before {row['rss_before_gib']:.2f})  "
                      f"stored {row['stored_pairs']:>11d}  clusters {row['clusters']:5d} noise {row['noise']:6d}",
                      flush=True)
            if "dense" in res:
                dl = np.asarray(res["dense"]["labels"])
                ds = np.asarray(res["dense"]["sample"])
                for m in ("sparse", "sparse-all"):
                    same = bool(np.array_equal(np.asarray(res[m]["labels"]), dl))
                    diff = float(np.abs(np.asarray(res[m]["sample"]) - ds).max())
                    ok &= same and diff < 1e-6
                    for row in rows:
                        if row["data"] == data and row["n"] == n and row["method"] == m:
                            row.update(labels_equal_dense=same, max_abs_diff_dense_sample=diff)
                    print(f"  {m} vs dense: DBSCAN labels equal {same}, "
                          f"max |d_J diff| on {SAMPLE_ROWS} rows {diff:.2e}")
    print()
    hdr = (f"{'data':9s} {'N':>6s} {'method':10s} {'seconds':>8s} {'peak GiB':>9s} {'stored pairs':>13s} "
           f"{'clusters':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['data']:9s} {r['n']:6d} {r['method']:10s} {r['seconds']:8.2f} {r['peak_rss_gib']:9.2f} "
              f"{r['stored_pairs']:13d} {r['clusters']:8d}")
    meta = dict(k1=K1, k2=K2, eps=EPS, min_samples=MIN_SAMPLES, dim=DIM, cpu_count=os.cpu_count(),
                platform=platform.platform(), python=platform.python_version(), quick=args.quick,
                load_average_at_end=list(os.getloadavg()),
                note="fresh spawned process per measurement; peak RSS = VmHWM of that process; "
                     "rss_before = after torch import and feature creation")
    if not args.quick or args.out != ap.get_default("out"):
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(dict(meta=meta, results=rows, all_agree=ok), f, indent=1)
        print(f"\nwritten {os.path.relpath(out_path, REPO)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
