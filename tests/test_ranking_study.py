"""The ranking study of ``nasreid study`` (:mod:`nasreid.study.ranking`): the statistics it reports, the fixed
selection spread over a scored pool, the job graph (search -> pool -> score -> train), and a tiny ranking study run
end to end on synthetic data and resumed."""
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from nasreid import study as S
from nasreid.config import RecipeError
from nasreid.study.ranking import rank_correlation, ranking_scores, regret, select_genotypes

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "study_tiny.yaml"
LABELS = ["conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv4_1", "conv4_2"]


def ranking_study(tmp_path, **over):
    """study_tiny with a ranking section: two supernets (gumbel, uniform) trained on 6 of the 8 training identities
    (2 held out for validation), a pool of 4, 2 selected (+ the osnet hand design), 2 retrain seeds, BN recalibrated
    on 2 batches."""
    base = yaml.safe_load(TINY.read_text())
    val_ids = over.pop("val_ids", (2, 2))
    return S.load_study(TINY, {
        "output_root": str(tmp_path / "runs"), "selection": None, "evaluation.targets": [],
        "search.arms": [{"name": "gumbel", "retrain": False},
                        {"name": "uniform", "strategy": "random", "retrain": False}],
        "search.set": {**base["search"]["set"], "data.val_ids": val_ids[0]},
        "retrain.set": {**base["retrain"]["set"], "data.val_ids": val_ids[1]}, "retrain.seeds": 2,
        "ranking": {"supernets": ["gumbel", "uniform"], "pool": 4, "select": 2, "bn_batches": 2}, **over})


def test_rank_correlation_and_regret_known_values():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    c = rank_correlation(x, [10.0, 20.0, 30.0, 40.0, 50.0], n_boot=200)
    assert c["tau"] == pytest.approx(1.0) and c["rho"] == pytest.approx(1.0) and c["n"] == 5
    assert c["tau_low"] <= c["tau"] <= c["tau_high"]
    c = rank_correlation(x, [50.0, 40.0, 30.0, 20.0, 10.0], n_boot=200)
    assert c["tau"] == pytest.approx(-1.0)
    # one discordant pair of 10: tau = (9 - 1) / 10
    assert rank_correlation(x, [10.0, 30.0, 20.0, 40.0, 50.0], n_boot=200)["tau"] == pytest.approx(0.8)
    c = rank_correlation([1.0, math.nan, 3.0, 2.0], [1.0, 2.0, 3.0, 2.5], n_boot=200)
    assert c["n"] == 3  # the pair with a nan score is dropped
    assert math.isnan(rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], n_boot=50)["tau"])
    mAP = [30.0, 50.0, 40.0, 10.0]
    assert regret([4.0, 3.0, 2.0, 1.0], mAP, 1) == pytest.approx(20.0)  # the score's best has 30, the best 50
    assert regret([4.0, 3.0, 2.0, 1.0], mAP, 2) == pytest.approx(0.0)
    assert regret([math.nan, 1.0, 3.0, 2.0], mAP, 1) == pytest.approx(10.0)  # nan ranks last


#: the ranking study on the warm-started CUHK01 recipes, pool 9, 4 selected, the osnet hand design (nothing is run)
WARM = {"ranking.pool": 9, "ranking.select": 4, "hand_designed": ["osnet"],
        "search.recipe": str(ROOT / "recipes" / "osnet_ain_warm_cpu.yaml"),
        "retrain.recipe": str(ROOT / "recipes" / "osnet_ain_warm_retrain_cpu.yaml"),
        "split_key": "data.dataset.kwargs.split_seed", "search.set": {"data.val_ids": 2},
        "retrain.set": {"data.val_ids": 2}}


def _write_pool(d: Path, scores: list[float]) -> list[str]:
    """A scored pool as ``nasreid rank`` leaves it (rank.csv, rank_settings.json, rank.md); returns the keys."""
    values = ["os", "os_in_in", "os_in_out", "os_in_in_out"]
    rows, keys = [], []
    for i, s in enumerate(scores):
        ch = [values[(i >> (2 * b)) % 4] for b in range(6)]
        ch[5] = values[(i // 4 + 1) % 4]  # never all "os" (the osnet preset) unless asked
        keys.append("/".join(ch))
        rows.append({"key": keys[-1], "source": "sample(seed=0)", **dict(zip(LABELS, ch)), "val_rank1": s,
                     "val_mAP": s, "val_mINP": s, "train_loss": 1.0, "arch_logprob": -8.0, "seconds": 1.0,
                     "note": ""})
    d.mkdir(parents=True)
    with open(d / "rank.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (d / "rank_settings.json").write_text(json.dumps({"labels": LABELS}))
    (d / "rank.md").write_text("done\n")
    return keys


def test_selection_is_spread_over_the_pool_skips_hand_designs_and_is_fixed_once(tmp_path):
    st = ranking_study(tmp_path, **WARM)
    d = S.jobs.ranking_dir(st, 0)
    assert select_genotypes(st, 0) is None  # the pool is not scored yet
    scores = [5.0, 9.0, 1.0, 7.0, 3.0, 8.0, 2.0, 6.0, 4.0]
    keys = _write_pool(d / "pool", scores)
    by_score = [keys[i] for i in np.argsort(-np.asarray(scores), kind="stable")]
    path = select_genotypes(st, 0)
    sel = json.loads(path.read_text())
    assert sorted(v["place"] for v in sel["ranked"].values()) == [0, 3, 5, 8]  # round(i * 8 / 3)
    assert [v["key"] for v in sel["ranked"].values()] == [by_score[p] for p in (0, 3, 5, 8)]
    assert [v["pool_score"] for v in sel["ranked"].values()] == [9.0, 6.0, 4.0, 1.0]
    assert set(sel["ranked"]) == {"r0", "r3", "r5", "r8"}
    g = json.loads((d / "genotypes" / "r3.json").read_text())
    assert "/".join(g["choices"][lb] for lb in LABELS) == by_score[3] and g["space"] == "osnet_ain"
    cands = json.loads((d / "candidates.json").read_text())
    assert len(cands) == 5 and cands[-1] == "preset:osnet"
    # the train jobs follow the selection; a second call never rewrites it
    train = [j for j in S.enumerate_jobs(st) if j.phase == "train" and j.kind == "ranked"]
    assert sorted(j.id for j in train) == sorted(f"train/{n}/split0_seed{r}" for n in sel["ranked"] for r in (0, 1))
    assert all(j.ready() and ("data.val_ids", 2) in j.sets for j in train)
    before = path.read_text()
    (d / "pool" / "rank.csv").write_text((d / "pool" / "rank.csv").read_text().replace(",9.0,", ",0.5,"))
    assert select_genotypes(st, 0).read_text() == before
    # a pool candidate equal to a hand design gives way to the next free place
    st2 = ranking_study(tmp_path / "b", **WARM)
    d2 = S.jobs.ranking_dir(st2, 0)
    keys = _write_pool(d2 / "pool", scores)
    csv_text = (d2 / "pool" / "rank.csv").read_text().replace(keys[1], "os/os/os/os/os/os")
    (d2 / "pool" / "rank.csv").write_text(csv_text)  # the pool's best is plain OSNet
    sel2 = json.loads(select_genotypes(st2, 0).read_text())
    assert sorted(v["place"] for v in sel2["ranked"].values()) == [1, 3, 5, 8]


def test_ranking_study_recipe_checks(tmp_path):
    with pytest.raises(RecipeError, match="ranking.supernets names no search arm: nope"):
        ranking_study(tmp_path, **{"ranking.supernets": ["gumbel", "nope"]})
    with pytest.raises(RecipeError, match="ranking.select_by 'x' is not one of ranking.supernets"):
        ranking_study(tmp_path, **{"ranking.select_by": "x"})
    with pytest.raises(RecipeError, match=r"arm 'gumbel' searches without data.val_ids"):
        ranking_study(tmp_path, val_ids=(None, 2))
    with pytest.raises(RecipeError, match=r"the retrain holds out data.val_ids=3, the supernet of arm 'gumbel' 2"):
        ranking_study(tmp_path, val_ids=(2, 3))
    real = S.load_study(ROOT / "recipes" / "study_ranking_osnet_ain_warm_cpu.yaml")
    jobs = S.enumerate_jobs(real)
    assert [j.phase for j in jobs].count("search") == 4 and [j.phase for j in jobs].count("score") == 8
    fair = next(j for j in jobs if j.arm == "uniform_fair" and j.phase == "search")
    assert ("strategy.kwargs", {"fair": True}) in fair.sets
    assert [j.id for j in jobs if j.phase == "pool"] == ["ranking/split0/pool"]
    pool = next(j for j in jobs if j.phase == "pool")
    assert pool.command()[3:] == ["rank", str(real.study_dir / "search" / "gumbel" / "split0_seed0"), "--sample",
                                  "100", "--seed", "0", "--bn-batches", "10", "--out", str(pool.run_dir)]
    assert not pool.ready()  # its search has not run
    # the selection study (issue 27 item 5): 3 arms x 2 seeds x 3 splits, searches on 385 ids, retrains on all 485
    sel = S.load_study(ROOT / "recipes" / "study_selection_osnet_ain_warm_cpu.yaml")
    jobs = S.enumerate_jobs(sel)
    assert [j.phase for j in jobs].count("search") == 18 and [j.phase for j in jobs].count("train") == 27
    search = next(j for j in jobs if j.arm == "gumbel_val")
    assert ("data.val_ids", 100) in search.sets and ("strategy.kwargs.validate_top_k", 8) in search.sets
    assert all(k != "data.val_ids" for j in jobs if j.phase == "train" for k, _ in j.sets)


def test_tiny_ranking_study_end_to_end_and_resumed(tmp_path):
    """Two tiny supernets on synthetic data, the pool, the fixed selection, the scores and the stand-alone runs
    through the runner; the report's correlation table; a second run finds nothing to do."""
    st = ranking_study(tmp_path)
    res = S.run_study(st, workers=1, echo=lambda s: None)
    assert not res["failed"] and not res["blocked"], res
    ids = [r["id"] for r in res["ran"]]
    assert ids[:3] == ["search/gumbel/split0_seed0", "search/uniform/split0_seed0", "ranking/split0/pool"]
    assert sorted(ids[3:7]) == sorted(f"ranking/split0/{a}_bn{k}" for a in ("gumbel", "uniform") for k in (2, 0))
    sel = json.loads((S.jobs.ranking_dir(st, 0) / "selected.json").read_text())
    assert len(sel["ranked"]) == 2
    assert len(ids) == 7 + (2 + 1) * 2  # 2 ranked genotypes + the osnet hand design, 2 seeds each
    rows = ranking_scores(st, 0)
    assert sorted(r["genotype"] for r in rows) == sorted([*sel["ranked"], "osnet"])
    assert all(math.isfinite(r["standalone_mAP"]) for r in rows)
    assert all(math.isfinite(r["gumbel_bn2_val_mAP"]) and math.isfinite(r["uniform_bn0_val_mAP"]) for r in rows)
    assert all(math.isfinite(r["gumbel_bn2_arch_logprob"]) and math.isnan(r["uniform_bn2_arch_logprob"])
               for r in rows)
    report = Path(res["report"]).read_text()
    assert "## Ranking: does the supernet's score predict stand-alone accuracy?" in report
    assert "| gumbel: validation mAP, BN recalibrated on 2 batches | 3 |" in report
    assert "| ceiling: stand-alone seed 0 vs seed 1 | 3 |" in report
    assert (st.study_dir / "ranking_results.csv").is_file()
    assert (st.study_dir / "plots" / "ranking_split0_gumbel_bn2_val_mAP.png").is_file()
    again = S.run_study(st, report=False, echo=lambda s: None)
    assert not again["ran"] and not again["failed"]
    # listing the commands (an external scheduler's path) fixes a scored pool's selection the same way
    fixed = S.jobs.ranking_dir(st, 0) / "selected.json"
    text = fixed.read_text()
    fixed.unlink()
    listed = S.print_commands(st, pending_only=False, file=io.StringIO())
    assert fixed.read_text() == text and sum("ranking/split0/gumbel_bn2" in c for c in listed) == 1
