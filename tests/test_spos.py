"""Selection on validation on real CUHK01 images: the ``spos`` strategy (Guo et al., ECCV 2020: uniform single-path
supernet, BN-recalibrated candidates scored on ``data.val_ids``, Algorithm 1's evolution, or every candidate of a small
space) and gumbel's ``nasreid derive RUN --top-k K``. Tiny runs (64x32, OSNet-AIN x0.125, 20 training + 4 validation
identities, 1 epoch, 1 BN batch): registration and refusals, the genotype equal to the best row of ``evolution.csv``,
no key scored twice, crossover children made of their parents' values, deterministic scores, no test image read, a
real SIGKILL during the evolution resumed to the rows and genotype of an uninterrupted run, an exhaustive selection,
and the top-k derive (exact top-k by probability, the best on validation returned, the search kwarg and the CLI
giving the same rows, runs without validation identities refused)."""
from __future__ import annotations

import csv
import filecmp
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import missing, opened_images
from nasreid.config import RecipeError, load_recipe
from nasreid.engine import pipeline
from nasreid.engine.checkpoint import load_checkpoint
from nasreid.engine.runs import build_run_dataset, load_run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SPOS = {
    "name": "tiny_spos", "seed": 0, "device": "cpu",
    "data": {"dataset": {"name": "cuhk01", "root": None, "kwargs": {"split_seed": 0, "max_ids": 24}},
             "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "workers": 0, "val_ids": 4},
    "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.125, "feature_dim": 64}},
    # 4,096 candidates > exhaustive_max: the evolution, 5 x 4 generations
    "strategy": {"name": "spos", "kwargs": {"population": 5, "iterations": 4, "parents": 2, "bn_batches": 1,
                                            "exhaustive_max": 0}},
    "optim": {"lr": 0.05, "epochs": 1, "scheduler": "cosine"},
    "eval": {"flip": False, "batch_size": 64},
}
GUMBEL = {**SPOS, "name": "tiny_gumbel",
          "strategy": {"name": "gumbel", "kwargs": {"mode": "hard", "lambda_start": 3.0, "arch_lr": 1.0}}}
COLUMNS = ("key", "generation", "source", "choices", "val_rank1", "val_mAP", "val_mINP")


def _write(root: Path, data: Path, base: dict, name: str, **over) -> Path:
    d = json.loads(json.dumps(base))
    d["data"]["dataset"]["root"] = str(data / "cuhk01")
    d["output_root"] = str(root)
    d["name"] = name
    for k, v in over.items():
        node = d
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _edit_run(src: Path, dst: Path, **kwargs) -> Path:
    """A copy of run ``src`` whose recipe.yaml sets ``strategy.kwargs`` ``kwargs``, without its selection: its
    resume reloads the finished supernet (no epoch left) and selects again."""
    shutil.copytree(src, dst)
    d = yaml.safe_load((dst / "recipe.yaml").read_text())
    d["strategy"]["kwargs"].update(kwargs)
    (dst / "recipe.yaml").write_text(yaml.safe_dump(d))
    for f in ("genotype.json", "genotype.graphml", "metrics.json", "evolution.csv", "evolution.json",
              "derive_top_k.csv"):
        (dst / f).unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data, one_thread):
    """An uninterrupted spos run (every image it opens recorded) and a gumbel run, both with 4 validation ids."""
    if not (shared_data / "cuhk01" / "campus").is_dir():
        missing(f"cuhk01 not present in {shared_data}")
    root = tmp_path_factory.mktemp("spos")
    recipe = _write(root, shared_data, SPOS, "spos")
    with opened_images() as opened:
        ref = pipeline.run_search(load_recipe(recipe), run_dir=root / "ref", progress=False)
    gumbel = pipeline.run_search(load_recipe(_write(root, shared_data, GUMBEL, "gumbel")), run_dir=root / "g",
                                 progress=False)
    return {"recipe": recipe, "ref": ref, "opened": opened, "gumbel": gumbel, "root": root}


def test_spos_is_registered_listed_and_refuses_without_val_ids(tmp_path, shared_data, capsys):
    from nasreid.cli import main
    from nasreid.registry import SPACES, STRATEGIES
    from nasreid.strategies.base import StrategyConfigError
    from nasreid.strategies.random import RandomStrategy
    from nasreid.strategies.spos import SPOSStrategy

    assert main(["list", "strategies"]) == 0
    assert "spos" in capsys.readouterr().out
    assert STRATEGIES.get("spos") is SPOSStrategy and issubclass(SPOSStrategy, RandomStrategy)  # its training reused
    with pytest.raises(StrategyConfigError, match=r"strategy\.kwargs\.populaton: unknown key"):
        SPOSStrategy.validate_kwargs({"populaton": 4})
    with pytest.raises(StrategyConfigError, match=r"parents .* must not exceed population"):
        SPOSStrategy.validate_kwargs({"population": 4, "parents": 5})
    space = SPACES.build("osnet_ain", {"width_mult": 0.125, "feature_dim": 16}, "test", num_classes=4)
    with pytest.raises(StrategyConfigError, match=r"strategy\.kwargs\.fixed\.conv9_9"):
        SPOSStrategy(space, fixed={"conv9_9": "os"})
    with pytest.raises(StrategyConfigError, match=r"strategy\.kwargs\.fixed\.conv2_1: 'bogus'"):
        SPOSStrategy(space, fixed={"conv2_1": "bogus"})
    assert SPOSStrategy(space, fixed={"conv2_1": "os"}).space_size() == 4 ** 5
    # no validation identities: refused by name before any training step
    if not (shared_data / "cuhk01" / "campus").is_dir():
        missing(f"cuhk01 not present in {shared_data}")
    path = _write(tmp_path, shared_data, SPOS, "noval", **{"data.val_ids": None})
    with pytest.raises(RecipeError, match=r"noval\.yaml: data\.val_ids: strategy 'spos' selects"):
        pipeline.run_search(load_recipe(path), run_dir=tmp_path / "noval_run", progress=False)
    assert not (tmp_path / "noval_run" / "checkpoints" / "last.pt").exists()


def test_evolution_returns_the_best_row_never_rescores_and_reads_no_test_image(runs, tmp_path):
    from nasreid.cli import main
    from nasreid.ranking import SupernetRanker, load_supernet

    run = runs["ref"]
    rows = _rows(run / "evolution.csv")
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) >= 10  # never scored twice
    gens = [int(r["generation"]) for r in rows]
    assert gens == sorted(gens) and set(gens) == {0, 1, 2, 3}
    assert all(sum(g == i for g in gens) <= 5 for i in range(4))
    assert {r["source"] for r in rows if r["generation"] == "0"} == {"init"}
    assert {r["source"] for r in rows if r["generation"] != "0"} <= {"crossover", "mutation", "random"}
    # crossover children take every value from one of the top-2 parents among the rows scored before them
    crossed = 0
    for g in (1, 2, 3):
        before = [r for r in rows if int(r["generation"]) < g]
        top = sorted(range(len(before)), key=lambda j: (-float(before[j]["val_mAP"]), j))[:2]
        parents = [json.loads(before[j]["choices"]) for j in top]
        for r in rows:
            if int(r["generation"]) == g and r["source"] == "crossover":
                child = json.loads(r["choices"])
                assert all(child[k] in {p[k] for p in parents} for k in child), (g, r["key"])
                crossed += 1
    assert crossed >= 3
    # the genotype is the best row (val_mAP, ties to the first scored); probabilities one-hot on it
    best = min(range(len(rows)), key=lambda j: (-float(rows[j]["val_mAP"]), j))
    geno = json.loads((run / "genotype.json").read_text())
    assert geno["choices"] == json.loads(rows[best]["choices"])
    assert all(p[geno["choices"][k]] == 1.0 and sum(p.values()) == 1.0 for k, p in geno["probabilities"].items())
    prov = geno["provenance"]
    assert prov["key"] == rows[best]["key"] and prov["candidates_scored"] == len(rows)
    assert prov["selection"] == "evolution" and prov["selection_done"] is True
    assert prov["score_value"] == pytest.approx(float(rows[best]["val_mAP"]))
    assert prov["train_seconds"] > 0 and prov["scoring_seconds"] > 0
    sel = json.loads((run / "metrics.json").read_text())["selection"]  # the same figures in metrics.json
    assert sel["candidates_scored"] == len(rows) and sel["scoring_seconds"] == prov["scoring_seconds"]
    assert sel["val_mAP"] == prov["val_mAP"] and sel["selection"] == "evolution" and sel["rule"] == prov["rule"]
    state = json.loads((run / "evolution.json").read_text())
    assert state["done"] and state["generation"] == 4 and state["summary"]["candidates_scored"] == len(rows)
    assert main(["derive", str(run), "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "genotype.json").read_text())["choices"] == geno["choices"]
    # the uniform (training) and one-hot (selected) probabilities feed the entropy statistics and plots
    from nasreid.study.statistics import decision_entropy, entropy_per_epoch

    assert all(h == 0.0 for h, _ in decision_entropy(geno["probabilities"]).values())
    h, log_k = entropy_per_epoch(run / "alphas.csv")
    assert list(h) == pytest.approx([log_k]) and log_k == pytest.approx(math.log(4))  # uniform while training
    assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    assert list((tmp_path / "plots").glob("*.png"))
    # scores are deterministic: the supernet of the checkpoint rescoring the best candidate gives its row
    supernet, strategy, ctx, _ = load_supernet(run, progress=False)
    res = SupernetRanker(supernet, strategy, ctx, bn_batches=1, loss_batches=0).score(geno["choices"])
    assert f"{res['val_mAP']:.10g}" == rows[best]["val_mAP"] and f"{res['val_rank1']:.10g}" == rows[best]["val_rank1"]
    # no test image read by the search: training and validation images only, validation ones included
    ds = build_run_dataset(load_run_recipe(run), run)
    test = {os.path.abspath(r.path) for r in ds.query + ds.gallery}
    allowed = {os.path.abspath(r.path) for r in ds.train + ds.val_query + ds.val_gallery}
    opened = set(runs["opened"])
    assert opened and not opened & test and opened <= allowed
    assert opened & {os.path.abspath(r.path) for r in ds.val_query}


def test_a_spos_search_killed_during_the_evolution_resumes_to_the_same_rows_and_genotype(runs, tmp_path):
    run = tmp_path / "killed"
    env = dict(os.environ, NASREID_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "nasreid.cli", "search"]
    with open(tmp_path / "killed.log", "w") as err:
        proc = subprocess.Popen([*cmd, str(runs["recipe"]), "--out", str(run), "--no-retrain"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    from nasreid.strategies.spos import read_evolution

    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and len(read_evolution(run)) < 2:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    ref_rows = _rows(runs["ref"] / "evolution.csv")
    done = read_evolution(run)
    assert 2 <= len(done) < len(ref_rows), "not killed during the evolution:\n" + \
        (tmp_path / "killed.log").read_text()[-2000:]
    assert not (run / "genotype.json").exists()
    with (run / "evolution.csv").open("a") as f:  # as if killed while writing a row: a line cut short
        f.write(done[-1]["key"] + ",9,init,{")
    with open(tmp_path / "resumed.log", "w") as err:
        rc = subprocess.run([*cmd, "--resume", str(run), "--no-retrain"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=err, timeout=300).returncode
    assert rc == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    log = (run / "train.log").read_text()
    assert "resumed from checkpoints/last.pt (epoch 1 done)" in log  # the supernet reloaded, not retrained
    assert f"spos: {len(done)} candidates already scored" in log and "ended with an incomplete row" in log
    got = _rows(run / "evolution.csv")
    assert [r["key"] for r in got[:len(done)]] == [r["key"] for r in done]  # finished rows kept, not rescored
    assert [{k: r[k] for k in COLUMNS} for r in got] == [{k: r[k] for k in COLUMNS} for r in ref_rows]
    a, b = (json.loads((r / "genotype.json").read_text()) for r in (run, runs["ref"]))
    assert a["choices"] == b["choices"] and a["provenance"]["key"] == b["provenance"]["key"]


def test_a_small_constrained_space_is_scored_exhaustively(runs, tmp_path):
    ref = runs["ref"]
    best = json.loads((ref / "genotype.json").read_text())["choices"]
    fixed = {k: best[k] for k in list(best)[:-1]}  # 4 candidates left: the last choice's values
    run = _edit_run(ref, tmp_path / "exh", fixed=fixed, exhaustive_max=4)
    from nasreid.genotype import GenotypeError

    with pytest.raises(GenotypeError, match="evolution.csv holds no scored candidate yet"):
        pipeline.derive(run)  # the supernet is trained, nothing selected yet
    pipeline.run_search(load_run_recipe(run), run_dir=run, resume=True, progress=False)
    assert filecmp.cmp(run / "checkpoints" / "last.pt", ref / "checkpoints" / "last.pt", shallow=False)  # no training
    rows = _rows(run / "evolution.csv")
    last = list(best)[-1]
    assert [json.loads(r["choices"])[last] for r in rows] == ["os", "os_in_in", "os_in_out", "os_in_in_out"]
    assert all(json.loads(r["choices"])[k] == v for r in rows for k, v in fixed.items())
    assert {r["source"] for r in rows} == {"all"} and {r["generation"] for r in rows} == {"0"}
    i = min(range(4), key=lambda j: (-float(rows[j]["val_mAP"]), j))
    geno = json.loads((run / "genotype.json").read_text())
    assert geno["choices"] == json.loads(rows[i]["choices"]) and geno["provenance"]["selection"] == "exhaustive"
    # the rows the evolution scored too have the same scores (one supernet, the same fixed BN batches)
    ref_rows = {r["key"]: r for r in _rows(ref / "evolution.csv")}
    for r in rows:
        if r["key"] in ref_rows:
            assert r["val_mAP"] == ref_rows[r["key"]]["val_mAP"]
    # the evolution's best is one of the 4: the exhaustive best scores at least as well
    ref_best = json.loads((ref / "genotype.json").read_text())["provenance"]
    assert ref_best["key"] in [r["key"] for r in rows]
    assert float(rows[i]["val_mAP"]) >= ref_best["score_value"]


def test_gumbel_derive_top_k_scores_the_most_probable_on_validation(runs, tmp_path, capsys):
    from nasreid.cli import main
    from nasreid.strategies.gumbel import top_k_samples

    run = runs["gumbel"]
    argmax = json.loads((run / "genotype.json").read_text())["choices"]
    assert main(["derive", str(run), "--top-k", "3", "--bn-batches", "1", "--out", str(tmp_path / "d")]) == 0
    rows = _rows(run / "derive_top_k.csv")
    assert [int(r["prob_rank"]) for r in rows] == [1, 2, 3]
    lps = [float(r["log_prob"]) for r in rows]
    assert lps == sorted(lps, reverse=True)
    # exact top 3 of prod softmax(pi), brute force over the 4,096 genotypes of the checkpoint's probabilities
    probs = load_checkpoint(run / "checkpoints" / "last.pt")["hooks"]["strategy"]["probabilities"]
    labels = list(probs)
    every = sorted(itertools.product(*(probs[k].items() for k in labels)),
                   key=lambda vs: -sum(math.log(p) for _, p in vs))
    assert [r["key"] for r in rows] == ["/".join(v for v, _ in vs) for vs in every[:3]]
    assert json.loads(rows[0]["choices"]) == argmax  # the most probable is plain derive's argmax
    assert top_k_samples(probs, 60) == top_k_samples(probs, 60, enumerate_max=0)  # best-first == enumeration
    best = min(range(3), key=lambda j: (-float(rows[j]["val_mAP"]), j))
    geno = json.loads((tmp_path / "d" / "genotype.json").read_text())
    assert geno["choices"] == json.loads(rows[best]["choices"])
    assert geno["provenance"]["prob_rank"] == best + 1 and geno["provenance"]["top_k"] == 3
    assert geno["provenance"]["score_value"] == pytest.approx(float(rows[best]["val_mAP"]))
    # plain derive unchanged: the argmax
    assert main(["derive", str(run), "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "genotype.json").read_text())["choices"] == argmax
    # the search kwarg calls the same selection: top 2 of the reloaded supernet, the same rows
    kw = _edit_run(run, tmp_path / "kw", validate_top_k=2, validate_bn_batches=1)
    pipeline.run_search(load_run_recipe(kw), run_dir=kw, resume=True, progress=False)
    kw_rows = _rows(kw / "derive_top_k.csv")
    strip = [{k: r[k] for k in ("key", "log_prob", "val_rank1", "val_mAP")} for r in rows[:2]]
    assert [{k: r[k] for k in ("key", "log_prob", "val_rank1", "val_mAP")} for r in kw_rows] == strip
    j = min(range(2), key=lambda i: (-float(kw_rows[i]["val_mAP"]), i))
    assert json.loads((kw / "genotype.json").read_text())["choices"] == json.loads(kw_rows[j]["choices"])
    sel = json.loads((kw / "metrics.json").read_text())["selection"]  # what the selection did and cost
    assert sel["candidates_scored"] == 2 and sel["top_k"] == 2 and sel["prob_rank"] == j + 1
    assert sel["scoring_seconds"] == pytest.approx(sum(float(r["seconds"]) for r in kw_rows))
    assert json.loads((run / "metrics.json").read_text())["selection"] == {}  # plain argmax: nothing scored
    # a run without validation identities is refused by name, nothing scored
    noval = _edit_run(run, tmp_path / "noval")
    d = yaml.safe_load((noval / "recipe.yaml").read_text())
    d["data"]["val_ids"] = None
    (noval / "recipe.yaml").write_text(yaml.safe_dump(d))
    capsys.readouterr()
    assert main(["derive", str(noval), "--top-k", "2"]) == 2
    assert "data.val_ids" in capsys.readouterr().err
    assert not (noval / "derive_top_k.csv").exists()
