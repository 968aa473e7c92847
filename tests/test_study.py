"""``nasreid.study``: study recipes, job enumeration and resume, the paired bootstrap, the report end to end
on a tiny synthetic study, and the committed CPU study's report rebuilt from its committed runs (no real data
needed)."""
import csv
import io
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from nasreid import study as S
from nasreid.cli import _overrides, build_parser
from nasreid.config import RecipeError, load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "study_tiny.yaml"


def tiny(tmp_path, **over):
    return S.load_study(TINY, {"output_root": str(tmp_path / "runs"), **over})


def bigger(tmp_path):
    """The tiny study with two arms, 2 search seeds, 2 hand designs, 2 retrain seeds, 2 splits."""
    return tiny(tmp_path, **{"search.arms": [{"name": "gumbel"}, {"name": "random", "set": {"optim.epochs": 1}}],
                             "search.seeds": 2, "hand_designed": ["osnet", "osnet_ibn"], "retrain.seeds": 2,
                             "splits": [0, 1]})


def sets_of(cmd):
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]


# ---------------------------------------------------------------------------------------------------
def test_yaml_value_round_trips_through_cli_set():
    for v in [1e-5, 0.5, 3, "cuhk01", None, True, {"a": [1, 2], "b": "x y"}, [{"name": "cuhk03np", "root": "cuhk03"}]]:
        assert yaml.safe_load(S.jobs._yaml_value(v)) == v
        assert "\n" not in S.jobs._yaml_value(v)


def test_study_recipe_errors_name_file_and_key(tmp_path):
    base = yaml.safe_load(TINY.read_text())
    base["search"]["recipe"] = str(ROOT / "recipes" / "quickstart.yaml")
    base["retrain"]["recipe"] = str(ROOT / "recipes" / "quickstart_retrain.yaml")

    def write(**changes):
        d = json.loads(json.dumps(base))
        for k, v in changes.items():
            node = d
            *head, last = k.split(".")
            for kk in head:
                node = node[kk]
            node[last] = v
        p = tmp_path / "s.yaml"
        p.write_text(yaml.safe_dump(d))
        return p

    with pytest.raises(RecipeError, match=r"s\.yaml: unknown key 'search\.arms\.0\.strateg'"):
        S.load_study(write(**{"search.arms": [{"name": "g", "strateg": "gumbel"}]}))
    with pytest.raises(RecipeError, match=r"s\.yaml: retrain\.recipe: file not found"):
        S.load_study(write(**{"retrain.recipe": "nope.yaml"}))
    with pytest.raises(RecipeError, match=r"folder without study\.yaml.*--set output_root"):
        S.load_study(tmp_path)  # a committed results folder: its resolved study.yaml is not committed
    with pytest.raises(RecipeError, match=r"hand_designed\.0: .*no preset 'osnet_xx'"):
        S.load_study(write(hand_designed=["osnet_xx"]))
    with pytest.raises(RecipeError, match=r"search\.arms\.0\.strategy: .*nope"):
        S.load_study(write(**{"search.arms": [{"name": "nope"}]}))
    with pytest.raises(RecipeError, match=r"search\.seeds: .*>= 1"):
        S.load_study(write(**{"search.seeds": 0}))
    with pytest.raises(RecipeError, match=r"selection\.validation: the validation domain is the final test target"):
        S.load_study(write(**{"selection.validation": base["evaluation"]["targets"][0]}))
    train_ds = {"name": "synthetic", "kwargs": {"num_ids": 16, "num_train_ids": 8, "num_cams": 2,
                                                "images_per_id_per_cam": 2, "seed": 3}}
    with pytest.raises(RecipeError, match=r"selection\.validation: 'synthetic' is the training dataset"):
        S.load_study(write(**{"selection.validation": train_ds}))  # another split of the training data
    with pytest.raises(RecipeError, match=r"search\.arms\.0: .*strategy\.kwargs\.lambda_start"):
        S.load_study(write(**{"search.arms": [{"name": "gumbel", "kwargs": {"lambda_start": -1}}]}))
    with pytest.raises(RecipeError, match=r"retrain: .*data\.dataset\.kwargs\.split_seed: unknown argument"):
        S.load_study(write(split_key="data.dataset.kwargs.split_seed"))  # synthetic has no split_seed


def test_real_cpu_study_recipe_is_valid():
    st = S.load_study(ROOT / "recipes" / "study_osnet_ain_cpu.yaml")
    jobs = S.enumerate_jobs(st)
    search = [j for j in jobs if j.phase == "search"]
    train = [j for j in jobs if j.phase == "train"]
    # gumbel + random + gumbel_decisive x 3 seeds x 3 CUHK01 splits; (9 searched + 3 hand designs + 2 IN
    # ablations) x 3 splits
    assert (len(search), len(train), len(jobs)) == (27, 42, 69)
    assert {j.arm for j in train if j.kind == "hand"} == {"osnet", "osnet_ibn", "osnet_ain", "osnet_ain_shallow",
                                                          "osnet_ain_plain_in"}
    assert sorted({j.split for j in jobs}) == [0, 1, 2]
    t = train[0]
    assert [x.name for x in t.targets] == ["cuhk03np", "synthetic"]  # the test target, then the validation domain
    assert any(s == "data.dataset.kwargs.split_seed=0" for s in sets_of(t.command()))


def test_enumeration_counts_folders_and_commands(tmp_path):
    st = bigger(tmp_path)
    jobs = S.enumerate_jobs(st)
    search = [j for j in jobs if j.phase == "search"]
    train = [j for j in jobs if j.phase == "train"]
    assert len(search) == 2 * 2 * 2  # arms x search seeds x splits
    assert len(train) == (2 * 2 + 2) * 2 * 2  # (searched sources per split + hands) x retrain seeds x splits
    assert jobs[:len(search)] == search  # phase 1 first
    assert len({j.run_dir for j in jobs}) == len(jobs)
    d = st.study_dir
    assert d == (tmp_path / "runs" / "study_tiny").resolve()
    ids = {j.id for j in jobs}
    assert {"search/gumbel/split1_seed0", "search/random/split0_seed1", "train/gumbel/split1_search1_seed0",
            "train/random/split0_search0_seed1", "train/osnet_ibn/split1_seed1"} <= ids

    parser = build_parser()
    g = next(j for j in search if j.id == "search/gumbel/split1_seed1")
    cmd = g.command()
    assert cmd[1:4] == ["-m", "nasreid", "search"] and "--no-retrain" in cmd
    args = parser.parse_args(cmd[3:])
    assert Path(args.out) == g.run_dir and Path(args.recipe) == ROOT / "recipes" / "quickstart.yaml"
    rec = load_recipe(args.recipe, _overrides(args.set))  # what the CLI will run
    assert rec.seed == 1 and rec.strategy.name == "gumbel" and rec.strategy.kwargs["seed"] == 1
    assert rec.strategy.kwargs["mode"] == "hard"  # the recipe's own strategy settings are kept
    assert rec.data.dataset.kwargs["seed"] == 1 and rec.data.height == 64 and rec.optim.epochs == 1

    r = next(j for j in search if j.id == "search/random/split0_seed1")
    rec = load_recipe(r.recipe, _overrides(parser.parse_args(r.command()[3:]).set))
    assert rec.strategy.name == "random" and rec.strategy.kwargs == {"seed": 1} and rec.seed == 1
    assert r.kind == "random" and g.kind == "searched"

    t = next(j for j in train if j.id == "train/gumbel/split1_search0_seed1")
    args = parser.parse_args(t.command()[3:])
    assert args.command == "train" and Path(args.out) == t.run_dir
    assert args.genotype == str(d / "search" / "gumbel" / "split1_seed0" / "genotype.json")
    assert t.search_run == d / "search" / "gumbel" / "split1_seed0"
    rec = load_recipe(args.recipe, _overrides(args.set))
    assert rec.seed == 1 and rec.data.dataset.kwargs["seed"] == 1 and rec.space.kwargs["width_mult"] == 0.125
    assert [x.model_dump() for x in rec.eval.targets] == [x.model_dump() for x in
                                                          st.evaluation.targets + [st.selection.validation]]
    h = next(j for j in train if j.id == "train/osnet/split0_seed1")
    assert h.kind == "hand" and h.search_seed is None and h.search_run is None and h.ready()
    assert parser.parse_args(h.command()[3:]).genotype == "preset:osnet"
    assert not t.ready()  # its search has not run

    out = io.StringIO()
    cmds = S.print_commands(st, file=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "# phase 1: search (8 of 8 jobs pending)"
    assert lines[9] == "# phase 2: train (24 of 24 jobs pending)"
    assert len(cmds) == 32 and all(" -m nasreid " in c for c in cmds)


def _finish_search(job, probs=None, choices=None, seconds=12.0):
    """The files a finished ``nasreid search`` run leaves (metrics.json with search_done, genotype.json)."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    labels = ("conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv4_1", "conv4_2")
    values = ("os", "os_in_in", "os_in_out", "os_in_in_out")
    choices = choices or {k: "os" for k in labels}
    probs = probs or {k: {v: 0.25 for v in values} for k in labels}
    (job.run_dir / "recipe.yaml").write_text("name: x\n")
    (job.run_dir / "genotype.json").write_text(json.dumps({"space": "osnet_ain", "choices": choices,
                                                           "probabilities": probs}))
    (job.run_dir / "metrics.json").write_text(json.dumps({"kind": "search", "search_done": True,
                                                          "search_seconds": seconds, "final_probabilities": probs}))


def _key(ref, kind="cross-domain"):
    tag = "[" + ",".join(f"{k}={v}" for k, v in sorted(ref.kwargs.items())) + "]" if ref.kwargs else ""
    return f"{ref.name}{tag} ({kind})"


def _finish_train(job, same, cross, val, skip_val=False, seconds=30.0, triplet=None):
    """The metrics.json of a finished ``nasreid train`` run (keys as evaluate_run_model writes them); with
    ``triplet``, a one-epoch history whose training triplet loss is that value."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / "recipe.yaml").write_text("name: x\n")
    (job.run_dir / "model.pt").write_bytes(b"")
    ev = {"synthetic (same-domain)": {"rank1": same + 10, "mAP": same, "mINP": same - 5, "protocol": "same-domain"}}
    ev[_key(job.targets[0])] = {"rank1": cross + 5, "mAP": cross, "mINP": cross - 1, "protocol": "cross-domain",
                                "dataset_kwargs": job.targets[0].kwargs}
    if not skip_val:
        ev[_key(job.targets[1])] = {"rank1": val, "mAP": val, "mINP": val, "protocol": "cross-domain",
                                    "dataset_kwargs": job.targets[1].kwargs}
    hist = [] if triplet is None else [{"epoch": 0, "loss": 1.0, "triplet": triplet, "acc": 1.0}]
    (job.run_dir / "metrics.json").write_text(json.dumps({"kind": "train", "train_seconds": seconds,
                                                          "evaluation": ev, "history": hist}))


def test_resume_skips_finished_jobs_and_resumes_started_ones(tmp_path, monkeypatch):
    st = tiny(tmp_path, **{"search.seeds": 2})
    jobs = {j.id: j for j in S.enumerate_jobs(st)}
    assert set(jobs) == {"search/gumbel/split0_seed0", "search/gumbel/split0_seed1",
                         "train/gumbel/split0_search0_seed0", "train/gumbel/split0_search1_seed0",
                         "train/osnet/split0_seed0"}
    s0, s1 = jobs["search/gumbel/split0_seed0"], jobs["search/gumbel/split0_seed1"]
    t0, t1, h = (jobs["train/gumbel/split0_search0_seed0"], jobs["train/gumbel/split0_search1_seed0"],
                 jobs["train/osnet/split0_seed0"])
    assert {j.state() for j in jobs.values()} == {S.NEW}
    _finish_search(s0)
    s1.run_dir.mkdir(parents=True)
    (s1.run_dir / "recipe.yaml").write_text("name: x\n")  # started, interrupted
    (s1.run_dir / "metrics.json").write_text(json.dumps({"kind": "search"}))
    _finish_train(h, 20, 10, 5)
    t0.run_dir.mkdir(parents=True)
    (t0.run_dir / "recipe.yaml").write_text("name: x\n")
    assert [s0.state(), s1.state(), t0.state(), t1.state(), h.state()] == [S.DONE, S.PARTIAL, S.PARTIAL, S.NEW, S.DONE]
    assert s1.command()[3:] == ["search", "--resume", str(s1.run_dir), "--no-retrain"]
    assert t0.command()[3:] == ["train", "--resume", str(t0.run_dir), "--genotype", str(s0.run_dir / "genotype.json")]
    assert build_parser().parse_args(t0.command()[3:]).resume == str(t0.run_dir)
    assert t0.ready() and not t1.ready()

    # a finished retrain that lacks an expected evaluation (the validation domain): nasreid evaluate adds it
    _finish_train(h, 20, 10, 5, skip_val=True)
    assert h.state() == S.EVALUATE and h.missing_targets() == [h.targets[1]]
    cmd = h.command()
    assert cmd[3:5] == ["evaluate", str(h.run_dir)] and cmd[-1] == "--no-same-domain"
    args = build_parser().parse_args(cmd[3:])
    from nasreid.cli import _targets

    assert [t.model_dump() for t in _targets(args.target)] == [h.targets[1].model_dump()]
    _finish_train(h, 20, 10, 5)

    out = io.StringIO()
    assert len(S.print_commands(st, file=out)) == 3  # s1, t0, t1
    assert len(S.print_commands(st, pending_only=False, file=io.StringIO())) == 5

    calls, envs = [], []

    def fake_run(cmd, **kw):  # the runner's only way out: a plain CLI command
        calls.append(cmd[3:])
        envs.append(kw["env"])
        if cmd[3:5] == ["search", "--resume"]:
            _finish_search(s1)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(S.runner.subprocess, "run", fake_run)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    res = S.run_study(st, workers=2, report=False, echo=lambda s: None)
    cores = max(1, (os.cpu_count() or 1) // 2)
    assert all(e["OMP_WAIT_POLICY"] == "PASSIVE" and e["OMP_NUM_THREADS"] == str(cores)
               and e["NASREID_NO_PROGRESS"] == "1" for e in envs)  # idle OpenMP threads sleep
    assert calls[0] == ["search", "--resume", str(s1.run_dir), "--no-retrain"]
    assert sorted(c[0] for c in calls[1:]) == ["train", "train"]
    assert ["train", "--resume", str(t0.run_dir), "--genotype", str(s0.run_dir / "genotype.json")] in calls
    fresh = next(c for c in calls if c[:2] == ["train", str(t1.recipe)])
    assert fresh[fresh.index("--genotype") + 1] == str(s1.run_dir / "genotype.json")
    assert set(res["skipped"]) == {s0.id, h.id} and not res["blocked"]
    assert {r["id"] for r in res["failed"]} == {t0.id, t1.id}  # the fake train wrote nothing
    assert (st.study_dir / "study.yaml").is_file() and (s1.run_dir / "job.log").read_text().startswith("# ")
    assert S.load_study(st.study_dir).study_dir == st.study_dir  # the study folder reloads its recipe

    # a failed search blocks its retrains instead of starting them
    calls.clear()
    (s1.run_dir / "metrics.json").unlink()
    (s1.run_dir / "genotype.json").unlink()
    monkeypatch.setattr(S.runner.subprocess, "run",
                        lambda cmd, **kw: (calls.append(cmd[3:]), subprocess.CompletedProcess(cmd, 1))[1])
    res = S.run_study(st, report=False, echo=lambda s: None)
    assert res["blocked"] == [t1.id] and [c[0] for c in calls] == ["search", "train"]


# ---------------------------------------------------------------------------------------------------
def test_paired_bootstrap_known_difference():
    rng = np.random.default_rng(0)
    a = rng.normal(40, 8, size=12)
    b = a + 2 + rng.normal(0, 0.3, size=12)
    r = S.paired_bootstrap(a, b, n_boot=4000, seed=1, level=0.95)
    assert abs(r.mean_diff - 2) < 0.3 and r.low < 2 < r.high and r.low > 0
    assert r.n == 12 and r.n_boot == 4000 and r.level == 0.95
    assert S.paired_bootstrap(a, b, n_boot=4000, seed=1) == r  # seeded
    r90 = S.paired_bootstrap(a, b, n_boot=4000, seed=1, level=0.5)
    assert r.low <= r90.low <= r90.high <= r.high
    z = S.paired_bootstrap(a, a)
    assert (z.mean_diff, z.low, z.high) == (0.0, 0.0, 0.0)
    s = S.paired_bootstrap(b, a, n_boot=2000)
    assert s.mean_diff == pytest.approx(-r.mean_diff) and s.high < 0
    with pytest.raises(ValueError, match="same length"):
        S.paired_bootstrap([1, 2], [1])
    with pytest.raises(ValueError, match="no pairs"):
        S.paired_bootstrap([], [])


def test_decision_entropy_and_agreement():
    ent = S.decision_entropy({"u": {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}, "one": {"a": 1.0, "b": 0.0},
                              "p": {"a": 0.5, "b": 0.5}})
    assert ent["u"] == pytest.approx((math.log(4), math.log(4)))
    assert ent["one"] == pytest.approx((0.0, math.log(2)))
    assert ent["p"][0] == pytest.approx(math.log(2))
    assert (S.genotype_agreement({"x": "os", "y": "os", "z": "a"}, {"x": "os", "y": "b", "z": "a"})
            == pytest.approx(2 / 3))
    assert math.isnan(S.genotype_agreement({"x": 1}, {"y": 1}))


def test_report_on_constructed_study(tmp_path):
    """Known numbers in faked finished runs: per-source means, paired differences, best-of-k selection,
    entropy and agreement as the report states them."""
    st = bigger(tmp_path)
    jobs = S.enumerate_jobs(st)
    values = ("os", "os_in_in", "os_in_out", "os_in_in_out")
    for j in jobs:
        if j.phase == "search":
            if j.arm == "gumbel":  # decided (p = 0.85 on the choice); seeds disagree on one block of six
                ch = {k: "os" for k in ("conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv4_1", "conv4_2")}
                ch["conv4_2"] = "os_in_in" if j.search_seed else "os"
                probs = {k: {v: 0.85 if v == c else 0.05 for v in values} for k, c in ch.items()}
                _finish_search(j, probs=probs, choices=ch)
            else:
                _finish_search(j, seconds=3.0)
    for j in jobs:
        if j.phase != "train":
            continue
        off = j.split + 0.1 * j.retrain_seed
        if j.kind == "hand":
            base = {"osnet": 20.0, "osnet_ibn": 22.0}[j.arm]
            _finish_train(j, base + off, 5 + off, 10)
        elif j.arm == "gumbel":  # seed 1 is better on test and on validation
            _finish_train(j, 28 + 4 * j.search_seed + off, 6 + j.search_seed + off, 10 + j.search_seed)
        else:
            _finish_train(j, 25 + off, 5 + off, 10 - j.search_seed)
    report = S.build_report(st)
    assert report == st.study_dir / "study_report.md"
    text = report.read_text()
    for section in ("## Results per genotype source", "## Selection rules: each seed as it comes vs best of k",
                    "## Paired comparisons", "### same-domain", "### cross-domain synthetic",
                    "## How decided were the searches?", "## Do the derived genotypes of different seeds agree?",
                    "## Cost", "## All points"):
        assert section in text, section
    rows = list(csv.DictReader(io.StringIO((st.study_dir / "study_results.csv").read_text())))
    assert len(rows) == 24
    for col in ("source", "kind", "search_seed", "retrain_seed", "split", "same_rank1", "same_mAP", "same_mINP",
                "cross_synthetic_rank1", "cross_synthetic_mAP", "cross_synthetic_mINP", "val_synthetic_mAP",
                "params", "macs", "search_seconds", "entropy_mean", "entropy_max"):
        assert col in rows[0], col
    assert {r["kind"] for r in rows} == {"searched", "random", "hand"}
    g = [r for r in rows if r["source"] == "gumbel"]
    assert float(g[0]["entropy_max"]) == pytest.approx(math.log(4))
    h = -(0.85 * math.log(0.85) + 3 * 0.05 * math.log(0.05))
    assert float(g[0]["entropy_mean"]) == pytest.approx(h)
    assert f"| entropy (nats) | {h:.3f} ± 0.000 |" in text
    assert all(float(r["params"]) > 0 and float(r["macs"]) > 0 for r in rows)
    assert float(next(r for r in rows if r["source"] == "random")["search_seconds"]) == 3.0
    # paired: gumbel (each seed: mean of 28 and 32 = 30) − osnet (20) = +10 on every unit
    line = next(x for x in text.splitlines() if x.startswith("| gumbel − osnet | each seed | 4 |"))
    assert "+10.00 [+10.00, +10.00]" in line
    # best of k by validation mAP picks seed 1 (32) for gumbel and seed 0 (25) for random
    line = next(x for x in text.splitlines() if x.startswith("| gumbel − random | best of k | 4 |"))
    assert "+7.00 [+7.00, +7.00]" in line
    # hand designs against the first listed one, one rule: osnet_ibn (22) − osnet (20) = +2 on every unit
    line = next(x for x in text.splitlines() if x.startswith("| osnet_ibn − osnet | – | 4 |"))
    assert "+2.00 [+2.00, +2.00]" in line and "osnet − osnet_ibn" not in text
    sel = next(x for x in text.splitlines() if x.startswith("| gumbel | best of k |"))
    assert "split 0/r0: s1" in sel and "split 1/r1: s1" in sel
    assert "| gumbel | 0.83 ± 0.00 |" in text  # agreement: 5 of 6 decisions within a split
    for name in ("mAP_same.png", "mAP_cross_synthetic.png", "mAP_val_synthetic.png"):
        assert (st.study_dir / "plots" / name).stat().st_size > 0


def test_tiny_study_end_to_end(tmp_path):
    """recipes/study_tiny.yaml run for real through the runner (a gumbel search, its retrain and the osnet
    hand design on synthetic data), then resumed (nothing left to run), and its report."""
    st = tiny(tmp_path)
    res = S.run_study(st, workers=1, echo=lambda s: None)
    assert not res["failed"] and len(res["ran"]) == 3, res
    assert [r["id"] for r in res["ran"]] == ["search/gumbel/split0_seed0", "train/gumbel/split0_search0_seed0",
                                             "train/osnet/split0_seed0"]
    for j in S.enumerate_jobs(st):
        assert j.state() == S.DONE
        assert "# exit 0" in (j.run_dir / "job.log").read_text()
    train = st.study_dir / "train" / "gumbel" / "split0_search0_seed0"
    searched = json.loads((st.study_dir / "search" / "gumbel" / "split0_seed0" / "genotype.json").read_text())
    assert json.loads((train / "genotype.json").read_text())["choices"] == searched["choices"]
    again = S.run_study(st, report=False, echo=lambda s: None)
    assert not again["ran"] and len(again["skipped"]) == 3
    report = Path(res["report"]).read_text()
    assert "| gumbel | searched | 1 |" in report and "| osnet | hand | 1 |" in report
    assert "| gumbel − osnet | each seed | 1 |" in report
    rows = list(csv.DictReader(io.StringIO((st.study_dir / "study_results.csv").read_text())))
    assert [r["source"] for r in rows] == ["gumbel", "osnet"]
    for r in rows:
        for c in ("same_mAP", "cross_synthetic_mAP", "val_synthetic_mAP"):
            assert 0 <= float(r[c]) <= 100
    assert float(rows[0]["search_seconds"]) > 0 and not rows[1]["search_run"]
    assert rows[0]["search_run"] == "search/gumbel/split0_seed0" and rows[1]["run_dir"].startswith("train/osnet/")
    assert (st.study_dir / rows[1]["run_dir"] / "metrics.json").is_file()  # relative to the study: no machine paths
    assert (st.study_dir / "plots" / "mAP_same.png").is_file()
    assert (st.study_dir / "plots" / "decision_entropy.png").is_file()  # from the search's alphas.csv
    assert all(0.0 <= float(r["train_acc"]) <= 1.0 and float(r["train_triplet"]) >= 0.0 for r in rows)
    assert "| train triplet / acc |" in report
    assert "](plots/decision_entropy.png)" in report
    assert "| device (search / retrain) |" in report and "| cpu / cpu |" in report and "| – / cpu |" in report


def test_recipe_seed_reaches_the_strategy_unless_the_recipe_sets_its_own():
    """``--set seed=S`` alone must give another search: the random baseline's draw and the Gumbel noise come from
    the strategy's own seed, which defaults to the recipe's."""
    from nasreid.engine.pipeline import strategy_kwargs
    from nasreid.registry import SPACES, STRATEGIES

    def draw(**over):
        r = load_recipe(ROOT / "recipes" / "osnet_ain_cpu.yaml",
                        {"strategy.name": "random", "strategy.kwargs": {}, **over})
        space = SPACES.get("osnet_ain")(num_classes=4, width_mult=0.125, feature_dim=16)
        return STRATEGIES.get("random")(space, **strategy_kwargs(r)).export()

    assert draw(seed=1) == draw(seed=1)
    assert draw(seed=1) != draw(seed=2)
    assert draw(seed=1, **{"strategy.kwargs.seed": 5}) == draw(seed=2, **{"strategy.kwargs.seed": 5})
    g = load_recipe(ROOT / "recipes" / "osnet_ain_cpu.yaml", {"seed": 4})
    assert strategy_kwargs(g)["seed"] == 4 and "seed" not in g.strategy.kwargs


def test_search_only_arms_have_no_retrains(tmp_path):
    st = tiny(tmp_path, **{"search.arms": [{"name": "gumbel"}, {"name": "g_soft", "strategy": "gumbel",
                                                                 "retrain": False,
                                                                 "set": {"strategy.kwargs.mode": "soft"}}]})
    jobs = S.enumerate_jobs(st)
    assert {j.arm for j in jobs if j.phase == "search"} == {"gumbel", "g_soft"}
    assert "g_soft" not in {j.arm for j in jobs if j.phase == "train"}
    real = S.load_study(ROOT / "recipes" / "study_gumbel_decisiveness_cpu.yaml")
    jobs = S.enumerate_jobs(real)
    assert len(jobs) == 18 and all(j.phase == "search" for j in jobs)  # 6 arms x 3 seeds


def test_entropy_per_epoch_from_a_constructed_alphas_log(tmp_path):
    rows = ["epoch,step,label,value,probability,lambda"]
    for lab in ("b1", "b2"):  # epoch 0 uniform over 4, epoch 1 one-hot, epoch 2: b1 uniform, b2 one-hot
        rows += [f"0,10,{lab},c{i},0.25,10" for i in range(4)]
        rows += [f"1,20,{lab},c{i},{1.0 if i == 0 else 0.0},9" for i in range(4)]
    rows += [f"2,30,b1,c{i},0.25,8" for i in range(4)] + [f"2,30,b2,c{i},{float(i == 3)},8" for i in range(4)]
    f = tmp_path / "alphas.csv"
    f.write_text("\n".join(rows) + "\n")
    ep, logk = S.entropy_per_epoch(f)
    assert list(ep.index) == [0, 1, 2] and logk == pytest.approx(math.log(4))
    assert ep.tolist() == pytest.approx([math.log(4), 0.0, math.log(4) / 2], abs=1e-9)
    f.write_text("epoch,label\n0,b1\n")
    with pytest.raises(KeyError):
        S.entropy_per_epoch(f)


def test_a_later_searched_arm_is_paired_with_each_earlier_one(tmp_path):
    """Two searched arms (the committed setting and a changed one, like study_osnet_ain_cpu's gumbel and
    gumbel_decisive): the report pairs the later against the earlier, with the known difference, once."""
    st = tiny(tmp_path, **{"search.arms": [{"name": "gumbel"}, {"name": "decisive", "strategy": "gumbel",
                                                                "set": {"strategy.kwargs.arch_lr": 10.0}},
                                           {"name": "random", "set": {"optim.epochs": 1}}],
                           "search.seeds": 1, "hand_designed": ["osnet"], "splits": [0, 1]})
    jobs = S.enumerate_jobs(st)
    for j in jobs:
        if j.phase == "search":
            _finish_search(j)
    for j in jobs:
        if j.phase == "train":
            same = {"gumbel": 20.0, "decisive": 23.5, "random": 19.0, "osnet": 25.0}[j.arm] + j.split
            _finish_train(j, same, 2.0, 10.0, triplet=0.5 - same / 100)  # the better the run, the lower
    text = S.build_report(st).read_text()
    # the triplet/mAP relation the CPU study found, stated and plotted: here exactly monotone, rho = -1
    assert "over 8 retrains: ρ = -1.00" in text
    assert (st.study_dir / "plots" / "mAP_vs_train_triplet.png").stat().st_size > 0
    assert "![mAP vs training triplet](plots/mAP_vs_train_triplet.png)" in text
    line = next(x for x in text.splitlines() if x.startswith("| decisive − gumbel | each seed | 2 |"))
    assert "+3.50 [+3.50, +3.50]" in line
    assert "| gumbel − decisive |" not in text and "| decisive − random | each seed | 2 |" in text


def test_triplet_margin_of_the_plot_follows_the_study_retrain_set(tmp_path):
    """The margin line of plots/mAP_vs_train_triplet.png is the margin the retrains ran with, i.e. after the
    study's ``retrain.set``; without a triplet term there is no line."""
    st = tiny(tmp_path, **{"retrain.set": {"loss.triplet_weight": 1.0, "loss.triplet_margin": 0.5}})
    assert S.plots._triplet_margin(st) == 0.5
    assert S.plots._triplet_margin(tiny(tmp_path, **{"retrain.set": {"loss.triplet_weight": 0.0}})) is None


COMMITTED = ROOT / "results" / "study_osnet_ain_cpu"


def test_committed_study_report_is_rebuilt_byte_for_byte(tmp_path, monkeypatch):
    """``nasreid study recipes/study_osnet_ain_cpu.yaml --report-only`` on a copy of the committed runs gives the
    committed ``study_report.md`` byte for byte: every mean, std, Spearman rho and paired-bootstrap interval
    (scipy.stats.bootstrap, paired percentile, seed 0) as committed; and the same ``study_results.csv``, run
    folders included (they are relative to the study's folder, so the copy names them as the committed one)."""
    monkeypatch.chdir(ROOT)  # the report shows the recipes relative to the current folder
    shutil.copytree(COMMITTED, tmp_path / COMMITTED.name)
    st = S.load_study(ROOT / "recipes" / "study_osnet_ain_cpu.yaml", {"output_root": str(tmp_path)})
    report = S.build_report(st)
    assert report == tmp_path / COMMITTED.name / "study_report.md"
    assert report.read_bytes() == (COMMITTED / "study_report.md").read_bytes()

    def table(path):
        return list(csv.DictReader(io.StringIO(path.read_text())))

    assert table(report.parent / "study_results.csv") == table(COMMITTED / "study_results.csv")


def test_package_exports_and_one_pair_bootstrap():
    """The package keeps every name the former ``nasreid/study.py`` module exported; one pair (scipy's bootstrap
    needs two) gives the point as its interval."""
    import nasreid.study

    for name in nasreid.study.__all__ + ["NEW", "PARTIAL", "EVALUATE", "DONE", "METRICS", "Seeds"]:
        assert hasattr(nasreid.study, name), name
    r = S.paired_bootstrap([3.0], [5.5], n_boot=100)
    assert (r.mean_diff, r.low, r.high, r.n) == (2.5, 2.5, 2.5, 1)


def test_paired_bootstrap_draws_match_a_plain_resampling_loop():
    """scipy's paired percentile bootstrap with ``default_rng(seed)`` draws the pair indices exactly as
    ``rng.integers(0, n, (n_boot, n))`` does (the former home-made bootstrap), so the intervals agree to rounding.
    With the committed study's 3 units per comparison the 95 % interval is [min, max] of the 3 differences for any
    seed (all three draws on one unit has chance 1/27 > 2.5 %), so the committed report alone could not tell."""
    rng = np.random.default_rng(7)
    for n, level, seed in [(12, 0.95, 0), (5, 0.9, 3), (2, 0.5, 11)]:
        a = rng.normal(40, 8, size=n)
        b = a + rng.normal(1, 2, size=n)
        d = b - a
        idx = np.random.default_rng(seed).integers(0, n, size=(3000, n))
        lo, hi = np.quantile(d[idx].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
        r = S.paired_bootstrap(a, b, n_boot=3000, seed=seed, level=level)
        assert (r.low, r.high) == pytest.approx((lo, hi), abs=1e-12)
        assert r.mean_diff == pytest.approx(d.mean(), abs=1e-12)


def test_search_seconds_count_the_validation_selection():
    """A search that selects on validation costs its supernet's epochs plus the scoring of its candidates (spos's
    evolution, gumbel's ``validate_top_k``); a plain search its epochs only; no search: nan."""
    from nasreid.study.report import _search_seconds

    assert _search_seconds({"search_seconds": 100.0}, {"provenance": {"scoring_seconds": 250.5}}) == 350.5
    assert _search_seconds({"search_seconds": 100.0}, {"provenance": {"rule": "argmax"}}) == 100.0
    assert math.isnan(_search_seconds({}, {}))
