"""Data-parallel search and retrain under torchrun (2 gloo processes on CPU, real CUHK01 images).

A probe strategy (a plugin: the Gumbel strategy that, on every rank, appends its pi after every step to
``pi_rank<r>.jsonl``) shows what no file written by rank 0 alone could: the architecture parameters of both
ranks after every step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import missing
from nasreid.data.samplers import PKSampler

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent('''
    """Test plugin: Gumbel search that records pi on every rank after every step."""
    import json, os

    import torch

    from nasreid.engine.distributed import rank
    from nasreid.registry import register_strategy
    from nasreid.strategies.gumbel import GumbelStrategy


    @register_strategy("gumbel_probe")
    class GumbelProbe(GumbelStrategy):
        name = "gumbel_probe"

        def train_step(self, *args, **kwargs):
            out = super().train_step(*args, **kwargs)
            pis = {k: op.pi.detach().tolist() for k, op in sorted(self.ops.items())}
            with open(os.path.join(os.environ["PROBE_DIR"], f"pi_rank{rank()}.jsonl"), "a") as fh:
                fh.write(json.dumps(pis) + "\\n")
            return out


    from nasreid.strategies.darts_tcm import DartsTCMStrategy


    @register_strategy("darts_probe")
    class DartsProbe(DartsTCMStrategy):
        """DARTS-TCM that records alpha and both twin memories on every rank after every step."""
        name = "darts_probe"

        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            rec = {"alpha": [a.detach().tolist() for a in self.arch_parameters()],
                   "memories": {k: m.features.sum().item() for k, m in sorted(self.memories.items())}}
            with open(os.path.join(os.environ["PROBE_DIR"], f"alpha_rank{rank()}.jsonl"), "a") as fh:
                fh.write(json.dumps(rec) + "\\n")
            return out
''')

EXACT = textwrap.dedent('''
    """Run under torchrun (2 ranks) or alone: an epoch of SGD steps of a fixed OSNet-AIN on the shards of a PK sampler.
    BatchNorm in eval mode (fixed statistics) so that the global-batch gradient is well defined; DDP wrapper
    (mode "ddp") or plain backward + average_gradients (mode "avg", the DARTS path)."""
    import json, sys

    import torch

    from nasreid.data.samplers import PKSampler
    from nasreid.engine import distributed as D
    from nasreid.genotype import preset_genotype
    from nasreid.losses import build_reid_loss

    out, mode = sys.argv[1], sys.argv[2]
    D.init_distributed("cpu")
    torch.manual_seed(0)
    net = preset_genotype("osnet_ain", "osnet_ain", width_mult=0.125, feature_dim=32).build(num_classes=6)
    net.train()
    for m in net.modules():  # BN on its running statistics: the loss is a plain mean over images
        if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout)):
            m.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, 64, 32, generator=g)
    pids = torch.arange(12).repeat_interleave(4) % 6
    sampler = PKSampler(pids.tolist(), num_instances=4, batch_size=16, seed=0, num_replicas=D.world_size(),
                        rank=D.rank())
    idx = list(sampler)
    fwd = D.wrap_model(net, torch.device("cpu"), find_unused_parameters=False) if mode == "ddp" else net
    loss_fn = build_reid_loss(6, label_smooth=0.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    per = 16 // D.world_size()
    assert len(idx) >= 2 * per
    for t in range(len(idx) // per):
        b = idx[t * per:(t + 1) * per]
        opt.zero_grad()
        loss, _ = loss_fn(fwd(x[b]), {"pid": pids[b]})
        loss.backward()
        if mode == "avg":
            D.average_gradients(list(net.parameters()))
        opt.step()
    if D.is_main():
        torch.save({k: v.clone() for k, v in net.state_dict().items()}, out)
    D.shutdown()
''')

BASE = {
    "name": "ddp_search", "seed": 0, "device": "cpu",
    "data": {"dataset": {"name": "cuhk01", "root": None, "kwargs": {"split_seed": 0, "max_ids": 40}},
             "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "workers": 0,
             "augment": {"flip": False}},
    "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.125, "feature_dim": 64}},
    "strategy": {"name": "gumbel_probe", "kwargs": {"mode": "hard", "lambda_start": 2.0, "lambda_step": 0.0,
                                                    "arch_lr": 0.05, "seed": 3}},
    "optim": {"lr": 0.05, "epochs": 2, "warmup_epochs": 0, "scheduler": "constant"},
    "loss": {"triplet_weight": 0.0},
    "plugins": ["probe_plugin.py"],
}


# ---------------------------------------------------------------------------------------------------
def test_pk_shards_partition_each_global_batch():
    """Each rank's step-t batch holds P/W whole identities; together they are the single-process batch t."""
    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(30), rng.integers(2, 9, size=30)).tolist()
    single = PKSampler(pids, num_instances=4, batch_size=24, seed=5)
    shards = [PKSampler(pids, num_instances=4, batch_size=24, seed=5, num_replicas=3, rank=r) for r in range(3)]
    for epoch in (0, 1):
        for s in (single, *shards):
            s.set_epoch(epoch)
        full = list(single)
        parts = [list(s) for s in shards]
        assert all(len(p) == len(s) == len(full) // 3 for p, s in zip(parts, shards))
        for t in range(len(full) // 24):
            batch = [p[t * 8:(t + 1) * 8] for p in parts]
            assert sorted(sum(batch, [])) == sorted(full[t * 24:(t + 1) * 24])
            ids = [{pids[i] for i in b} for b in batch]
            assert all(len(x) == 2 for x in ids)                       # P/W = 6/3 identities per rank
            assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # disjoint within the step
        assert sorted(sum(parts, [])) == sorted(full)                  # every image on exactly one rank
    with pytest.raises(ValueError, match="data.batch_size"):
        PKSampler(pids, num_instances=4, batch_size=20, num_replicas=2)  # P = 5 identities, 2 processes


def test_sync_bn_on_cpu_is_a_recipe_error(write_recipe, tmp_path):
    from nasreid.config import RecipeError, load_recipe
    from nasreid.engine.validate import check_recipe

    r = load_recipe(write_recipe({**BASE, "plugins": []}, **{"strategy.name": "gumbel", "distributed.sync_bn": True}))
    with pytest.raises(RecipeError, match="distributed.sync_bn"):
        check_recipe(r, search=True)


# ---------------------------------------------------------------------------------------------------
def _run(args, probe_dir: Path, nproc: int | None = None, timeout: int = 420):
    env = dict(os.environ, NASREID_NO_PROGRESS="1", OMP_NUM_THREADS="1", PROBE_DIR=str(probe_dir))
    probe_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "nasreid", *args] + (["--nproc", str(nproc)] if nproc else [])
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:  # the failing rank's own lines first (torchrun prefixes them [rankN])
        ranks = "\n".join(line for line in p.stderr.splitlines() if line.startswith("[rank") or "rror" in line)
        pytest.fail(f"{' '.join(cmd)} exited {p.returncode}:\n{ranks[-4000:]}\n--- stderr tail ---\n{p.stderr[-2000:]}")
    return p


def _pis(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, shared_data):
    """One 2-process search + retrain, an interrupted-and-resumed 2-process search and a single-process search,
    all of the same recipe (global batch 16)."""
    import yaml

    if not (shared_data / "cuhk01").is_dir():
        missing(f"cuhk01 missing in {shared_data}")
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "probe_plugin.py").write_text(PROBE)
    recipe = json.loads(json.dumps(BASE))
    recipe["data"]["dataset"]["root"] = str(shared_data / "cuhk01")
    recipe["output_root"] = str(tmp / "results")
    retrain = {k: v for k, v in recipe.items() if k not in ("strategy", "plugins")}
    retrain.update(name="ddp_retrain", optim={**recipe["optim"], "epochs": 1})
    (tmp / "retrain.yaml").write_text(yaml.safe_dump(retrain))
    (tmp / "search.yaml").write_text(yaml.safe_dump({**recipe, "then_retrain": "retrain.yaml"}))
    (tmp / "search_only.yaml").write_text(yaml.safe_dump(recipe))
    out = {"tmp": tmp}
    _run(["search", str(tmp / "search.yaml"), "--out", str(tmp / "ddp")], tmp / "probe_ddp", nproc=2)
    out["ddp"] = tmp / "ddp"
    # killed (SIGTERM to torchrun and its workers) once epoch 1's checkpoint exists, resumed under DDP
    probe = tmp / "probe_res"
    probe.mkdir()
    env = dict(os.environ, NASREID_NO_PROGRESS="1", OMP_NUM_THREADS="1", PROBE_DIR=str(probe))
    proc = subprocess.Popen([sys.executable, "-m", "nasreid", "search", str(tmp / "search_only.yaml"), "--out",
                             str(tmp / "res"), "--nproc", "2"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp / "res" / "checkpoints" / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)
    out["killed_steps"] = len(_pis(probe / "pi_rank0.jsonl"))
    _run(["search", "--resume", str(tmp / "res")], probe, nproc=2)
    out["res"] = tmp / "res"
    _run(["search", str(tmp / "search_only.yaml"), "--out", str(tmp / "single")], tmp / "probe_single")
    out["single"] = tmp / "single"
    return out


def test_ddp_pi_identical_on_both_ranks_after_every_step(ddp_runs):
    tmp = ddp_runs["tmp"]
    r0, r1 = _pis(tmp / "probe_ddp" / "pi_rank0.jsonl"), _pis(tmp / "probe_ddp" / "pi_rank1.jsonl")
    assert len(r0) == len(r1) > 4
    assert r0 == r1                                        # bit-identical, every step
    assert r0[-1] != r0[0]                                 # and pi did move


def test_ddp_rank0_alone_writes(ddp_runs):
    run = ddp_runs["ddp"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["search_done"]
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1   # one SummaryWriter: rank 0's
    log = (run / "train.log").read_text()
    assert log.count("epoch 1/2") == 1 and log.count("epoch 2/2") == 1
    rows = (run / "alphas.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 6 * 4
    # the retrain ran under DDP too and was evaluated once, by rank 0
    train = Path(m["retrain_run"])
    tm = json.loads((train / "metrics.json").read_text())
    assert tm["world_size"] == 2 and len(tm["history"]) == 1
    assert tm["evaluation"]["cuhk01 (same-domain)"]["num_query"] > 0
    assert len(list((train / "tb").glob("events.out.tfevents.*"))) == 1
    assert (train / "model.pt").is_file()
    # the global batch: 16 images per step, 8 per rank: steps per epoch as in a single process
    single = json.loads((ddp_runs["single"] / "metrics.json").read_text())
    assert [h["steps"] for h in m["history"]] == [h["steps"] for h in single["history"]]


def test_ddp_resume_continues_exactly(ddp_runs):
    """Killed during epoch 2, resumed under DDP from epoch 1's checkpoint: the same steps as an uninterrupted
    2-epoch DDP run (CPU: bit-identical pi after every step, same losses)."""
    tmp = ddp_runs["tmp"]
    full = _pis(tmp / "probe_ddp" / "pi_rank0.jsonl")
    n1 = len(full) // 2                                      # steps of epoch 1 (equal epochs here)
    killed = ddp_runs["killed_steps"]
    assert n1 <= killed < len(full), "the run was not interrupted during epoch 2"
    for r in (0, 1):
        lines = _pis(tmp / "probe_res" / f"pi_rank{r}.jsonl")  # epoch 1, the lost part of epoch 2, epoch 2 again
        assert lines[:n1] == full[:n1]
        assert lines[killed:] == full[n1:]
    a = json.loads((ddp_runs["res"] / "metrics.json").read_text())
    b = json.loads((ddp_runs["ddp"] / "metrics.json").read_text())
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["final_probabilities"] == b["final_probabilities"]


def test_ddp_matches_single_process_of_the_same_global_batch(ddp_runs):
    """Same global batches, same init, same Gumbel noise and paths; what differs is that BatchNorm statistics
    are computed over 8 images per rank instead of 16 (SyncBatchNorm, CUDA only, removes that). Stated
    tolerance: epoch-mean losses within 2 % (measured about 0.1 %). pi itself is not compared: its gradient is
    a small inner product that per-rank BN statistics change as much as the gradient itself (measured: the
    mean of the two half-batch gradients differs from the full-batch one by about its own norm), so the
    exact step-for-step equality is asserted with fixed BN statistics below."""
    a = json.loads((ddp_runs["ddp"] / "metrics.json").read_text())["history"]
    b = json.loads((ddp_runs["single"] / "metrics.json").read_text())["history"]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["steps"] == y["steps"] and x["lr"] == y["lr"]
        assert abs(x["loss"] - y["loss"]) < 0.02 * y["loss"], (x["loss"], y["loss"])


def test_darts_tcm_alpha_and_memories_identical_on_both_ranks(tmp_path, shared_data):
    """DARTS-TCM under torchrun (no DDP wrapper: each update averages its own gradients; the twin memories are
    updated with the gathered global batch): alpha and both memories identical on the two ranks, every step."""
    import yaml

    (tmp_path / "probe_plugin.py").write_text(PROBE)
    recipe = {"name": "ddp_darts", "seed": 0, "device": "cpu", "output_root": str(tmp_path / "results"),
              "data": {"dataset": {"name": "cuhk01", "root": str(shared_data / "cuhk01"),
                                   "kwargs": {"split_seed": 0, "max_ids": 40}},
                       "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "workers": 0},
              "space": {"name": "msinet", "kwargs": {"width_mult": 0.125}},
              "strategy": {"name": "darts_probe", "kwargs": {"arch_lr": 0.05}},
              "optim": {"lr": 0.05, "epochs": 1, "scheduler": "constant", "warmup_epochs": 0},
              "plugins": ["probe_plugin.py"]}
    (tmp_path / "darts.yaml").write_text(yaml.safe_dump(recipe))
    _run(["search", str(tmp_path / "darts.yaml"), "--out", str(tmp_path / "run")], tmp_path / "probe", nproc=2)
    r0 = _pis(tmp_path / "probe" / "alpha_rank0.jsonl")
    r1 = _pis(tmp_path / "probe" / "alpha_rank1.jsonl")
    assert len(r0) == len(r1) >= 2
    assert r0 == r1
    assert r0[-1]["alpha"] != r0[0]["alpha"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("mode", ["ddp", "avg"])
def test_data_parallel_step_equals_the_global_batch_step(tmp_path, mode):
    """With BatchNorm statistics fixed, 2 ranks x 8 images = 1 process x 16 images, step for step (fp32
    summation order only: 1e-5). Both gradient paths: the DDP wrapper and ``average_gradients``."""
    script = tmp_path / "exact.py"
    script.write_text(EXACT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for cmd, out in (([sys.executable, str(script)], "single.pt"),
                     ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(script)], "ddp.pt")):
        p = subprocess.run(cmd + [str(tmp_path / out), mode], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    a, b = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())


def test_average_gradients_is_a_no_op_in_one_process():
    from nasreid.engine.distributed import all_gather_cat, average_gradients, info

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    average_gradients([p])
    assert p.grad.tolist() == [1.0, 2.0, 3.0]
    assert all_gather_cat(torch.arange(4)).tolist() == [0, 1, 2, 3]
    assert not info().enabled


def test_spos_under_torchrun_scores_each_candidate_once_on_rank_0(tmp_path, shared_data):
    """spos under torchrun: both ranks train the supernet, rank 0 alone runs the evolution (one ``evolution.csv``,
    no candidate scored twice, no interleaved rows), and the genotype is its best row."""
    import csv

    import yaml

    if not (shared_data / "cuhk01").is_dir():
        missing(f"cuhk01 missing in {shared_data}")
    recipe = {**{k: v for k, v in BASE.items() if k != "plugins"}, "name": "ddp_spos",
              "output_root": str(tmp_path / "results"),
              "strategy": {"name": "spos", "kwargs": {"population": 4, "iterations": 2, "parents": 2,
                                                      "bn_batches": 1, "exhaustive_max": 0}},
              "optim": {**BASE["optim"], "epochs": 1}, "eval": {"flip": False, "batch_size": 64}}
    recipe["data"] = {**BASE["data"], "val_ids": 4,
                      "dataset": {**BASE["data"]["dataset"], "root": str(shared_data / "cuhk01")}}
    (tmp_path / "spos.yaml").write_text(yaml.safe_dump(recipe))
    _run(["search", str(tmp_path / "spos.yaml"), "--out", str(tmp_path / "run"), "--no-retrain"], tmp_path / "probe",
         nproc=2)
    run = tmp_path / "run"
    with (run / "evolution.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert 4 <= len(rows) <= 8 and len({r["key"] for r in rows}) == len(rows)
    assert {r["generation"] for r in rows} == {"0", "1"}
    best = min(range(len(rows)), key=lambda j: (-float(rows[j]["val_mAP"]), j))
    geno = json.loads((run / "genotype.json").read_text())
    assert geno["choices"] == json.loads(rows[best]["choices"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["selection"]["candidates_scored"] == len(rows)
    assert (run / "train.log").read_text().count("spos: generation 2/2 done") == 1  # rank 0's evolution only
