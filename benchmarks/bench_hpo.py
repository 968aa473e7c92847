"""HPO throughput: trials per hour with 1 worker (all cores) vs N workers (cores / N each) on one study, and the
storage overhead per trial (Optuna journal file vs in-memory), both measured in this one run.

    python benchmarks/bench_hpo.py [--trials 8] [--workers 2] [--epochs 2] [--max-ids 60] [--out results/benchmarks]

Arms share the recipe, the data (CUHK01 from $NASREID_DATA, the first --max-ids identities), the space and the
trial budget; pruning is off so every trial costs the same number of epochs. The storage overhead replays a
trial's storage traffic (ask, the two user attributes, the sample, one report per epoch, tell) without training,
``--reps`` times, on a fresh journal file and on ``InMemoryStorage``; it is reported next to the measured mean
proxy-training time per trial.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def recipe_dict(data_root: str, out: str, trials: int, epochs: int, max_ids: int) -> dict:
    return {
        "name": "bench_hpo", "seed": 0, "device": "cpu", "output_root": out,
        "data": {"dataset": {"name": "cuhk01", "root": data_root, "kwargs": {"split_seed": 0, "max_ids": max_ids}},
                 "height": 128, "width": 64, "batch_size": 32, "num_instances": 4, "workers": 0},
        "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.25, "feature_dim": 128}},
        "strategy": {"name": "optuna", "kwargs": {"trials": trials, "epochs": epochs, "val_fraction": 0.25,
                                                  "pruner": "none", "sampler": "random"}},
        "optim": {"lr": 0.05, "epochs": epochs},
        "eval": {"flip": False, "batch_size": 128},
    }


def storage_overhead(reps: int, epochs: int) -> dict:
    import optuna
    from optuna.storages import InMemoryStorage, JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = {}
    tmp = Path(tempfile.mkdtemp())
    for name, storage in (("memory", InMemoryStorage()),
                          ("journal", JournalStorage(JournalFileBackend(str(tmp / "s.journal"))))):
        study = optuna.create_study(storage=storage, study_name="x", sampler=optuna.samplers.RandomSampler(0))
        t0 = time.perf_counter()
        for _ in range(reps):
            tr = study.ask()
            tr.set_user_attr("heartbeat", time.time())
            tr.set_user_attr("worker", "w")
            for k in range(6):
                tr.suggest_categorical(f"c{k}", ["a", "b", "c", "d"])
            tr.set_user_attr("sample", "{}")
            for e in range(epochs):
                tr.report(float(e), e + 1)
                tr.should_prune()
            study.get_trials(deepcopy=False)  # the worker loop's count before ask
            study.tell(tr, 1.0)
        out[name] = (time.perf_counter() - t0) / reps
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-ids", type=int, default=60)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks"))
    args = ap.parse_args()
    os.environ.setdefault("NASREID_NO_PROGRESS", "1")
    from nasreid.config import data_dir, load_recipe
    from nasreid.strategies import hpo_workers
    from nasreid.strategies.optuna_hpo import read_trial_records

    data_root = str(data_dir() / "cuhk01")
    work = Path(tempfile.mkdtemp(prefix="bench_hpo_"))
    cores = os.cpu_count() or 1
    arms = {}
    for workers in (1, args.workers):
        d = recipe_dict(data_root, str(work / "results"), args.trials, args.epochs, args.max_ids)
        p = work / f"recipe_{workers}.yaml"
        p.write_text(yaml.safe_dump(d))
        recipe = load_recipe(p)
        run = work / f"run_w{workers}"
        t0 = time.time()
        hpo_workers.run_hpo(recipe, workers=workers, run_dir=run, threads=max(1, cores // workers), progress=False)
        wall = time.time() - t0
        recs = read_trial_records(run)
        arms[workers] = {"workers": workers, "threads_per_worker": max(1, cores // workers), "wall_s": wall,
                         "trials": len(recs), "trials_per_hour": 3600 * len(recs) / wall,
                         "mean_trial_s": sum(r["seconds"] for r in recs) / max(1, len(recs))}
        print(json.dumps(arms[workers]))
    ov = storage_overhead(args.reps, args.epochs)
    mean_trial = arms[1]["mean_trial_s"]
    res = {
        "cores": cores, "trials": args.trials, "epochs_per_trial": args.epochs, "max_ids": args.max_ids,
        "arms": list(arms.values()),
        "throughput_ratio_N_vs_1": arms[args.workers]["trials_per_hour"] / arms[1]["trials_per_hour"],
        "storage_s_per_trial": ov,
        "journal_overhead_vs_trial": ov["journal"] / mean_trial,
        "journal_minus_memory_s_per_trial": ov["journal"] - ov["memory"],
    }
    print(json.dumps(res, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hpo_workers_storage.json").write_text(json.dumps(res, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
