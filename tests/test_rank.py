"""``nasreid rank`` on real CUHK01 images: candidates of a gumbel, a random and a DARTS-TCM (MSINet) supernet scored
with inherited weights (``nasreid.ranking``): one row per candidate with finite validation scores, BN recalibration
(SPOS Sec. 3.3) as a cumulative average that changes the statistics and the scores, the frozen argmax candidate
equal to the gumbel supernet's eval forward, arch log-probabilities from the checkpoint (nan for random), resume,
refusals (other settings, no validation identities), and no test image read."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import missing
from nasreid.config import load_recipe
from nasreid.engine import pipeline
from nasreid.engine.checkpoint import load_checkpoint
from nasreid.ranking import RankingError, SupernetRanker, arch_logprob, load_supernet, rank_run, recalibrate_bn

pytestmark = pytest.mark.usefixtures("one_thread")

GUMBEL = {
    "name": "tiny_rank",
    "seed": 0,
    "device": "cpu",
    "data": {
        "dataset": {"name": "cuhk01", "root": None, "kwargs": {"split_seed": 0, "max_ids": 24}},
        "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "workers": 0, "val_ids": 4,
    },
    "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.125, "feature_dim": 64}},
    "strategy": {"name": "gumbel", "kwargs": {"mode": "hard", "lambda_start": 3.0, "arch_lr": 1.0}},
    "optim": {"lr": 0.05, "epochs": 1, "scheduler": "cosine"},
    "eval": {"flip": False, "batch_size": 64},
}
RANDOM = {**GUMBEL, "strategy": {"name": "random", "kwargs": {}}}
DARTS = {**GUMBEL, "data": {**GUMBEL["data"], "dataset": {"name": "cuhk01", "root": None,
                                                          "kwargs": {"split_seed": 0, "max_ids": 40}}},
         "space": {"name": "msinet", "kwargs": {"width_mult": 0.125}},
         "strategy": {"name": "darts_tcm", "kwargs": {"arch_lr": 0.05}}}


def _search(root: Path, data: Path, base: dict, name: str) -> Path:
    d = json.loads(json.dumps(base))
    d["data"]["dataset"]["root"] = str(data / "cuhk01")
    d["output_root"] = str(root)
    d["name"] = name
    (root / f"{name}.yaml").write_text(yaml.safe_dump(d))
    return pipeline.run_search(load_recipe(root / f"{name}.yaml"), run_dir=root / name, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data, one_thread):
    if not (shared_data / "cuhk01" / "campus").is_dir():
        missing(f"cuhk01 not present in {shared_data}")
    root = tmp_path_factory.mktemp("rank")
    return {k: _search(root, shared_data, base, k) for k, base in
            (("gumbel", GUMBEL), ("random", RANDOM), ("darts", DARTS))}




def _rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _ckpt_logprob(run: Path, row: dict[str, str], labels) -> float:
    probs = load_checkpoint(run / "checkpoints" / "last.pt")["hooks"]["strategy"]["probabilities"]
    return sum(math.log(probs[label][row[label]]) for label in labels)


def test_gumbel_rank_rows_scores_resume_and_reads_no_test_image(runs, tmp_path, monkeypatch, read_paths, capsys):
    from nasreid.cli import main

    run = runs["gumbel"]
    gfile = tmp_path / "cands.yaml"
    (tmp_path / "genotype.json").write_text((run / "genotype.json").read_text())
    own = {"conv2_1": "os", "conv2_2": "os_in_in", "conv3_1": "os", "conv3_2": "os", "conv4_1": "os", "conv4_2": "os"}
    gfile.write_text(yaml.safe_dump(["preset:osnet", "osnet_ain", "genotype.json", own]))
    from nasreid.genotype import Genotype, preset_genotype

    expected = {"preset:osnet": preset_genotype("osnet_ain", "osnet").choices,
                "preset:osnet_ain": preset_genotype("osnet_ain", "osnet_ain").choices,
                "file:genotype.json": Genotype.load(run / "genotype.json").choices, "list[3]": own}
    distinct: dict[tuple, str] = {}
    for src, ch in expected.items():  # the search's argmax may coincide with a preset: one row per genotype
        distinct.setdefault(tuple(str(ch[k]) for k in own), src)
    calls = []
    orig = SupernetRanker.score

    def counting(self, sample):
        calls.append(dict(sample))
        return orig(self, sample)

    monkeypatch.setattr(SupernetRanker, "score", counting)
    out = tmp_path / "rank"
    assert main(["rank", str(run), "--genotypes", str(gfile), "--bn-batches", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "candidates/s" in printed
    rows = _rows(out / "rank.csv")
    assert len(rows) == len(calls) == len(distinct)
    assert [r["source"] for r in rows] == list(distinct.values())
    assert [r["key"] for r in rows] == ["/".join(k) for k in distinct]
    labels = json.loads((out / "rank_settings.json").read_text())["labels"]
    for r in rows:
        for k in ("val_rank1", "val_mAP", "val_mINP", "train_loss", "arch_logprob", "seconds"):
            assert math.isfinite(float(r[k])), (k, r)
        assert 0 <= float(r["val_mAP"]) <= 100
        # the strategy's own score: sum of log softmax(pi) of the chosen values, as the checkpoint holds them
        assert float(r["arch_logprob"]) == pytest.approx(_ckpt_logprob(run, r, labels), abs=1e-5)
    assert len({float(r["arch_logprob"]) for r in rows}) > 1  # pi moved (arch_lr 1.0): candidates differ
    md = (out / "rank.md").read_text()
    maps = [float(line.split("|")[4]) for line in md.splitlines() if line.startswith("| ") and "`" in line]
    assert maps == sorted(maps, reverse=True) and len(maps) == len(distinct)
    assert (out / "rank.png").stat().st_size > 1000

    # no test image read: only training (the fixed BN batches) and validation images
    from nasreid.engine.runs import build_run_dataset, load_run_recipe

    ds = build_run_dataset(load_run_recipe(run), run)
    test = {os.path.abspath(r.path) for r in ds.query + ds.gallery}
    allowed = {os.path.abspath(r.path) for r in ds.train + ds.val_query + ds.val_gallery}
    opened = set(read_paths)
    assert opened and not opened & test and opened <= allowed
    assert opened & {os.path.abspath(r.path) for r in ds.val_query}

    # resume: the same settings skip every row already there; new candidates are appended
    calls.clear()
    res = rank_run(run, genotypes=gfile, bn_batches=2, out=out, echo=lambda s: None)
    assert res.scored == 0 and res.skipped == 4 and not calls  # 4 candidates, duplicates included
    res = rank_run(run, sample=3, seed=1, bn_batches=2, out=out, echo=lambda s: None)
    assert res.scored == len(calls) and len(_rows(out / "rank.csv")) == len(distinct) + res.scored
    assert res.scored + res.skipped == 3
    # other settings are refused by name
    with pytest.raises(RankingError, match="bn_batches"):
        rank_run(run, genotypes=gfile, bn_batches=1, out=out)
    with pytest.raises(RankingError, match="loss_batches"):
        rank_run(run, genotypes=gfile, bn_batches=2, loss_batches=1, out=out)


def test_frozen_argmax_candidate_equals_the_gumbel_supernet_in_eval(runs):
    supernet, strategy, ctx, ckpt = load_supernet(runs["gumbel"], progress=False)
    ranker = SupernetRanker(supernet, strategy, ctx, bn_batches=0)
    argmax = strategy.export()
    assert argmax == {k: v for k, v in ckpt["hooks"]["strategy"]["sample"].items()}
    net = ranker.candidate(argmax)  # inherited weights and statistics
    x = ranker.batches()[0]["img"]  # real training images, test transform
    assert x.shape[1:] == (3, 64, 32)
    with torch.no_grad():
        f_net, f_super = net(x), supernet.eval()(x)
    assert f_net.shape == f_super.shape == (x.shape[0], 64)
    torch.testing.assert_close(f_net, f_super, rtol=1e-5, atol=1e-5)
    # another candidate is another network: features differ
    other = {k: next(v for v in strategy.choices[k].values if v != argmax[k]) for k in argmax}
    with torch.no_grad():
        assert not torch.allclose(ranker.candidate(other)(x), f_super, atol=1e-3)


def test_bn_recalibration_is_a_cumulative_average_and_changes_scores(runs):
    supernet, strategy, ctx, _ = load_supernet(runs["gumbel"], progress=False)
    sample = strategy.export()
    r0 = SupernetRanker(supernet, strategy, ctx, bn_batches=0)
    r2 = SupernetRanker(supernet, strategy, ctx, bn_batches=2)
    assert [b["img"].shape[0] for b in r2.batches()] == [16, 16]
    net0, net2 = r0.candidate(sample), r2.candidate(sample)
    bn0 = [m for m in net0.modules() if isinstance(m, nn.BatchNorm2d)]
    bn2 = [m for m in net2.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn0 and len(bn0) == len(bn2)
    assert all(int(m.num_batches_tracked) == 2 and m.momentum == 0.1 for m in bn2)  # momentum restored
    assert not torch.allclose(bn0[0].running_mean, bn2[0].running_mean)
    # the first BN's running mean is the plain average of the two batches' means of its input (momentum None)
    first = bn2[0]
    seen = []
    h = first.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().mean(dim=(0, 2, 3))))
    recalibrate_bn(net2, [b["img"] for b in r2.batches()])
    h.remove()
    assert len(seen) == 2 and not net2.training
    torch.testing.assert_close(first.running_mean, (seen[0] + seen[1]) / 2, rtol=1e-5, atol=1e-6)
    # the same fixed batches give the same statistics for every candidate (and every call)
    torch.testing.assert_close(r2.candidate(sample).state_dict(), net2.state_dict())
    # and the scores change
    s0, s2 = r0.score(sample), r2.score(sample)
    assert s0["key"] == s2["key"]
    assert (s0["val_mAP"], s0["train_loss"]) != (s2["val_mAP"], s2["train_loss"])
    # the supernet itself is left as it was
    saved = load_checkpoint(runs["gumbel"] / "checkpoints" / "last.pt")["model"]
    stats = [k for k in saved if k.endswith("running_mean")]
    assert stats and all(supernet.state_dict()[k].equal(saved[k]) for k in stats)


def test_random_and_darts_tcm_runs_rank(runs, tmp_path):
    res = rank_run(runs["random"], sample=2, seed=0, bn_batches=1, out=tmp_path / "random", echo=lambda s: None)
    rows = _rows(res.csv)
    assert res.scored == 2 == len(rows)
    for r in rows:
        assert math.isnan(float(r["arch_logprob"]))  # the random baseline has no distribution
        assert all(math.isfinite(float(r[k])) for k in ("val_rank1", "val_mAP", "train_loss"))

    run = runs["darts"]
    gfile = tmp_path / "msinet.json"
    gfile.write_text(json.dumps(["preset:msinet_paper", "msinet_none"]))
    res = rank_run(run, genotypes=gfile, bn_batches=1, out=tmp_path / "darts", echo=lambda s: None)
    rows = _rows(res.csv)
    assert [r["source"] for r in rows] == ["preset:msinet_paper", "preset:msinet_none"]
    labels = json.loads((tmp_path / "darts" / "rank_settings.json").read_text())["labels"]
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("val_rank1", "val_mAP", "train_loss"))
        assert float(r["arch_logprob"]) == pytest.approx(_ckpt_logprob(run, r, labels), abs=1e-5)
    # arch_logprob is softmax(alpha) of the supernet itself
    supernet, strategy, _, _ = load_supernet(run, progress=False)
    sample = strategy.export()
    lp = sum(float(torch.log_softmax(op.alpha.detach(), 0)[op.values.index(sample[lbl])])
             for lbl, op in strategy.ops.items())
    assert arch_logprob(strategy.probabilities(), sample) == pytest.approx(lp, abs=1e-5)


def test_refusals_name_the_cause(runs, tmp_path, capsys):
    import shutil

    from nasreid.cli import main

    # a run whose recipe holds out no validation identities: one line naming data.val_ids
    run = tmp_path / "noval"
    shutil.copytree(runs["gumbel"], run, ignore=shutil.ignore_patterns("rank*", "tb"))
    raw = yaml.safe_load((run / "recipe.yaml").read_text())
    raw["data"]["val_ids"] = None
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["rank", str(run), "--sample", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.val_ids" in err[0] and err[0].startswith("nasreid rank: error:")
    with pytest.raises(RankingError, match="exactly one"):
        rank_run(runs["gumbel"], sample=1, all_candidates=True)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["no_such_preset"]))
    with pytest.raises(RankingError, match="no_such_preset"):
        rank_run(runs["gumbel"], genotypes=bad, out=tmp_path / "o")
    bad.write_text(json.dumps([{"conv2_1": "nope"}]))
    with pytest.raises(RankingError, match="conv2_1"):
        rank_run(runs["gumbel"], genotypes=bad, out=tmp_path / "o")
    with pytest.raises(RankingError, match="4096 candidates"):
        rank_run(runs["gumbel"], sample=5000, out=tmp_path / "o")


def test_a_killed_ranking_keeps_its_rows_and_all_prints_size_and_time_first(runs, tmp_path, monkeypatch):
    run = runs["gumbel"]
    orig = SupernetRanker.score
    calls = []

    def killed_at(n):
        def score(self, sample):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt("simulated kill")
            return orig(self, sample)
        return score

    monkeypatch.setattr(SupernetRanker, "score", killed_at(3))
    with pytest.raises(KeyboardInterrupt):
        rank_run(run, sample=3, seed=2, bn_batches=1, out=tmp_path / "s", echo=lambda s: None)
    assert len(_rows(tmp_path / "s" / "rank.csv")) == 2  # every finished candidate was written
    monkeypatch.setattr(SupernetRanker, "score", orig)
    res = rank_run(run, sample=3, seed=2, bn_batches=1, out=tmp_path / "s", echo=lambda s: None)
    assert (res.scored, res.skipped) == (1, 2) and len(_rows(res.csv)) == 3

    said: list[str] = []
    calls.clear()
    monkeypatch.setattr(SupernetRanker, "score", killed_at(3))
    with pytest.raises(KeyboardInterrupt):
        rank_run(run, all_candidates=True, bn_batches=1, out=tmp_path / "all", echo=said.append)
    assert said[0] == "--all: the space holds 4096 candidates"
    assert said[1].startswith("--all: first candidate took") and "remaining 4095" in said[1]
    rows = _rows(tmp_path / "all" / "rank.csv")
    assert [r["key"] for r in rows] == ["os/os/os/os/os/os", "os/os/os/os/os/os_in_in"]
