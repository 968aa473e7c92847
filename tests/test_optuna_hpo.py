"""The Optuna strategy on real CUHK01 images: mutables -> suggest_* mapping, proxy runs with pruning, a study
resumed from its storage, two worker processes on one journal, a worker killed with SIGKILL whose trial is
failed by heartbeat and retried from its checkpoint, and the osnet_ain space searched by it."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
import yaml

from nasreid.config import load_recipe
from nasreid.engine import pipeline
from nasreid.genotype import Genotype
from nasreid.mutables import Categorical, LayerChoice, ModelSpace, Numerical
from nasreid.strategies import hpo_workers
from nasreid.strategies.base import StrategyConfigError
from nasreid.strategies.optuna_hpo import OptunaStrategy, open_study, pick_pareto, query_gallery_split, suggest_sample

TINY = {
    "name": "tinyhpo", "seed": 0, "device": "cpu",
    "data": {"dataset": {"name": "cuhk01", "root": None, "kwargs": {"split_seed": 0, "max_ids": 40}},
             "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "workers": 0},
    "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.125, "feature_dim": 64}},
    "strategy": {"name": "optuna", "kwargs": {"trials": 3, "epochs": 2, "val_fraction": 0.25, "pruner": "median",
                                              "pruner_kwargs": {"n_startup_trials": 1, "n_warmup_steps": 0}}},
    "optim": {"lr": 0.05, "epochs": 2},
    "eval": {"flip": False, "batch_size": 64},
}


@pytest.fixture
def hpo_recipe(write_recipe):
    return lambda **kwargs: write_recipe(TINY, **{f"strategy.kwargs.{k}": v for k, v in kwargs.items()})


class _Toy(ModelSpace):
    space_name = "toy"

    def __init__(self, num_classes: int = 0):
        super().__init__()
        import torch.nn as nn

        self.n = self.add_mutable(Categorical([1, 2, 3], label="branches"))
        self.s3 = self.add_mutable(Categorical([2, 4], label="stripes3"))
        self.lr = self.add_mutable(Numerical(1e-4, 1e-1, log=True, label="lr", recipe_key="optim.lr"))
        self.k = self.add_mutable(Numerical(2, 8, step=2, integer=True, label="k"))
        self.op = LayerChoice({"a": nn.Identity(), "b": nn.Identity()}, label="op")

    def is_active(self, label, sample):
        return label != "stripes3" or sample.get("branches", 0) >= 3


def test_suggest_maps_every_mutable_to_its_distribution():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = _Toy()
    seen_inactive = False
    for _ in range(12):
        trial = study.ask()
        sample = suggest_sample(trial, space)
        d = trial.distributions
        assert isinstance(d["branches"], optuna.distributions.CategoricalDistribution)
        assert d["branches"].choices == (1, 2, 3)
        assert isinstance(d["lr"], optuna.distributions.FloatDistribution) and d["lr"].log
        assert (d["lr"].low, d["lr"].high) == (1e-4, 1e-1)
        assert isinstance(d["k"], optuna.distributions.IntDistribution) and d["k"].step == 2
        assert d["op"].choices == ("a", "b")
        if sample["branches"] < 3:  # inactive: not suggested, default value in the sample
            assert "stripes3" not in d and sample["stripes3"] == 2
            seen_inactive = True
        else:
            assert "stripes3" in d
        assert sample["k"] in (2, 4, 6, 8) and 1e-4 <= sample["lr"] <= 1e-1
        study.tell(trial, 0.0)
    assert seen_inactive


def test_config_errors_name_the_key():
    with pytest.raises(StrategyConfigError, match="strategy.kwargs.trial"):
        OptunaStrategy.validate_kwargs({"trial": 3})
    with pytest.raises(StrategyConfigError, match="pruner"):
        OptunaStrategy.validate_kwargs({"objectives": ["mAP", "params"]})
    OptunaStrategy.validate_kwargs({"objectives": ["mAP", "params"], "pruner": "none"})


def test_one_shot_strategies_refuse_value_choices():
    from nasreid.strategies.gumbel import GumbelStrategy

    with pytest.raises(StrategyConfigError, match="value choices"):
        GumbelStrategy(_Toy())


def test_pareto_rules():
    T = optuna.trial.FrozenTrial
    mk = [optuna.trial.create_trial(values=v, state=optuna.trial.TrialState.COMPLETE) for v in
          ([50.0, 3.0], [40.0, 1.0], [48.0, 1.5])]
    assert all(isinstance(t, T) for t in mk)
    dirs = ["maximize", "minimize"]
    assert pick_pareto(mk, "best_first", dirs).values == [50.0, 3.0]
    assert pick_pareto(mk, "cheapest", dirs).values == [40.0, 1.0]
    assert pick_pareto(mk, "knee", dirs).values == [48.0, 1.5]


def test_query_gallery_split_has_cross_camera_matches(shared_data):
    from nasreid.data import build_dataset

    ds = build_dataset("cuhk01", str(shared_data / "cuhk01"), split_seed=0, max_ids=20)
    q, g = query_gallery_split(ds.train)
    assert {r.pid for r in q} == {r.pid for r in ds.train}
    for r in q:  # one query per (pid, camera), a match in the other camera
        assert any(x.pid == r.pid and x.camid != r.camid for x in g)
    assert len({(r.pid, r.camid) for r in q}) == len(q)


def test_hpo_searches_osnet_ain_and_resumes_from_storage(hpo_recipe, tmp_path):
    recipe = load_recipe(hpo_recipe(trials=2))
    run = hpo_workers.run_hpo(recipe, workers=1, run_dir=tmp_path / "run")
    g = Genotype.load(run / "genotype.json")
    assert g.space == "osnet_ain" and set(g.choices) == {f"conv{i}_{j}" for i in (2, 3, 4) for j in (1, 2)}
    net = g.build(num_classes=5)  # a valid fixed network
    assert sum(p.numel() for p in net.parameters()) > 0
    recs = sorted((run / "trials").glob("trial_*/record.json"))
    assert len(recs) == 2
    r0 = json.loads(recs[0].read_text())
    assert r0["state"] in ("COMPLETE", "PRUNED") and r0["val_mAP"] and r0["sample"]
    assert (run / "trials.csv").is_file() and (run / "plots" / "intermediate_values.png").is_file()
    # validation used held-out *training* identities, disjoint from the proxy's training identities
    split = json.loads((run / "hpo_split.json").read_text())
    assert split["val_only"] and not set(split["val_only"]) & set(split["train_only"])
    first = [json.loads(p.read_text())["sample"] for p in recs]
    # resume with a larger budget: the study continues from its storage (trial numbers 2, 3 are new)
    resumed = load_recipe(run / "recipe.yaml", {"strategy.kwargs.trials": 4})
    hpo_workers.run_hpo(resumed, workers=1, run_dir=run, resume=True)
    study = open_study(OptunaStrategy.validate_kwargs(resumed.strategy.kwargs), run, "tinyhpo", create=False)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    recs = sorted((run / "trials").glob("trial_*/record.json"))
    assert [json.loads(p.read_text())["sample"] for p in recs[:2]] == first
    assert yaml.safe_load((run / "recipe.yaml").read_text())["strategy"]["kwargs"]["trials"] == 4
    # nasreid plot asks the run's strategy (Strategy.plot_run): the study's report, not alpha trajectories
    from nasreid import cli

    assert cli.main(["plot", str(run)]) == 0
    assert (run / "plots" / "optimization_history.png").is_file() and not (run / "alpha_trajectories.png").exists()


def test_sampling_strategies_are_told_apart_by_class():
    """The engine and the CLI ask the class (SamplingStrategy, Strategy.plot_run), never a strategy's name."""
    from nasreid.registry import STRATEGIES
    from nasreid.strategies.base import SamplingStrategy, Strategy

    kinds = {name: issubclass(cls, SamplingStrategy) for name, cls in STRATEGIES.items()}
    assert kinds["optuna"] and not kinds["gumbel"] and not kinds["random"] and not kinds["darts_tcm"]
    assert STRATEGIES.get("optuna").plot_run.__func__ is not Strategy.plot_run.__func__
    assert STRATEGIES.get("gumbel").plot_run.__func__ is Strategy.plot_run.__func__
    assert not hasattr(pipeline, "run_hpo")  # hpo_workers imports the pipeline: no re-export (no import circle)


def test_hpo_refuses_a_one_shot_strategy(hpo_recipe, capsys):
    from nasreid import cli

    p = hpo_recipe()
    raw = yaml.safe_load(p.read_text())
    raw["strategy"] = {"name": "gumbel", "kwargs": {}}
    p.write_text(yaml.safe_dump(raw))
    assert cli.main(["hpo", str(p), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'gumbel' is not a sampling strategy with workers" in err


def test_two_workers_share_one_journal(hpo_recipe, tmp_path):
    recipe = load_recipe(hpo_recipe(trials=4))
    run = hpo_workers.run_hpo(recipe, workers=2, run_dir=tmp_path / "run2", threads=1)
    cfg = OptunaStrategy.validate_kwargs(recipe.strategy.kwargs)
    study = open_study(cfg, run, "tinyhpo", create=False)
    states = [t.state for t in study.trials]
    assert len(study.trials) == 4 and all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                                          for s in states)
    workers = {t.user_attrs["worker"].rsplit(":", 1)[-1] for t in study.trials}
    assert workers == {"0", "1"}  # both processes ran trials
    assert len({t.number for t in study.trials}) == 4


def test_killed_worker_trial_is_failed_by_heartbeat_and_retried(hpo_recipe, tmp_path, caplog):
    recipe = load_recipe(hpo_recipe(trials=1, epochs=6, pruner="none", heartbeat_seconds=0.3, grace_seconds=1.5))
    run = tmp_path / "run3"
    pipeline._prepare_run(recipe, run, resume=False)
    env = dict(os.environ, NASREID_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "nasreid.cli", "hpo-worker", str(run), "--threads", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "trials" / "trial_0000" / "checkpoints" / "last.pt"
    t0 = time.time()
    while not ckpt.is_file() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    assert ckpt.is_file(), "the worker never finished an epoch"
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 mid-trial
    proc.wait()
    from nasreid.engine.checkpoint import load_checkpoint

    done_before = len(load_checkpoint(ckpt)["history"])
    assert done_before < 6
    # a new worker: after the grace period it fails trial 0 and runs its retry from the checkpoint
    threads_before = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="nasreid"):
        n = hpo_workers.run_hpo_worker(run, worker=1, threads=1)
    assert n == 1
    assert torch.get_num_threads() == threads_before  # in-process: the caller's thread count is restored
    cfg = OptunaStrategy.validate_kwargs(recipe.strategy.kwargs)
    study = open_study(cfg, run, "tinyhpo", create=False)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params
    rec = json.loads((run / "trials" / "trial_0001" / "record.json").read_text())
    assert rec["retry_of"] == 0 and rec["epochs_run"] == 6
    # the retry continued the killed run from its checkpoint instead of starting over
    assert f"(epoch {done_before} done)" in caplog.text and "marked failed and retried" in caplog.text


def test_hpo_on_rmgl_then_train_applies_the_searched_rsa(hpo_recipe, tmp_path):
    """The RMGL space through the whole path: Optuna samples its value choices (stripes, RP depth, ABP, RSA),
    the proxy runs train, derive writes a genotype, and ``nasreid train`` on it applies the searched RSA values
    to the retrain recipe (recipe_key -> data.augment.rsa)."""
    d = yaml.safe_load(hpo_recipe(trials=2, epochs=1, pruner="none").read_text())
    d["space"] = {"name": "rmgl", "kwargs": {"backbone": "osnet", "width_mult": 0.125, "reduce_dim": 16,
                                             "branch_choices": [1, 2], "stripe_choices": [1, 2]}}
    d["loss"] = {"name": "rmgl", "kwargs": {"margin": 0.6}}
    p = tmp_path / "rmgl_hpo.yaml"
    p.write_text(yaml.safe_dump(d))
    run = hpo_workers.run_hpo(load_recipe(p), workers=1, run_dir=tmp_path / "rmgl_run")
    g = Genotype.load(run / "genotype.json")
    assert g.space == "rmgl" and g.choices["rsa.p"] != 0.5  # a sampled value, not the default
    assert g.provenance["trial"] in (0, 1) and g.provenance["rule"].startswith("best trial")
    df = __import__("pandas").read_csv(run / "trials.csv")
    assert {"params_rsa.p", "params_rp_depth", "params_num_branches"} <= set(df.columns)
    d.pop("strategy")
    d["optim"]["epochs"] = 1
    q = tmp_path / "rmgl_train.yaml"
    q.write_text(yaml.safe_dump(d))
    train = pipeline.run_train(load_recipe(q), genotype=run / "genotype.json", run_dir=tmp_path / "rmgl_train")
    rsa = yaml.safe_load((train / "recipe.yaml").read_text())["data"]["augment"]["rsa"]
    assert rsa == {k.split(".", 1)[1]: v for k, v in g.choices.items() if k.startswith("rsa.")}
    ev = json.loads((train / "metrics.json").read_text())["evaluation"]
    assert any(k.startswith("cuhk01") for k in ev)


def test_multi_objective_study_derives_a_pareto_point(hpo_recipe, tmp_path):
    """mAP vs inference parameters with NSGA-II: derive picks a point of the Pareto front by pareto_rule."""
    recipe = load_recipe(hpo_recipe(trials=3, epochs=1, pruner="none", objectives=["mAP", "params"],
                                    pareto_rule="cheapest"))
    run = hpo_workers.run_hpo(recipe, workers=1, run_dir=tmp_path / "mo")
    cfg = OptunaStrategy.validate_kwargs(recipe.strategy.kwargs)
    study = open_study(cfg, run, "tinyhpo", create=False)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
    g = Genotype.load(run / "genotype.json")
    front = study.best_trials
    cheapest = min(t.values[1] for t in front)
    assert g.provenance["trial"] in {t.number for t in front}
    assert g.provenance["values"]["params"] == cheapest and "Pareto" in g.provenance["rule"]
    assert (run / "plots" / "pareto_front.png").is_file()


def test_a_trial_that_always_fails_stops_the_worker_with_a_clear_error(hpo_recipe, tmp_path):
    from nasreid.strategies.optuna_hpo import HPOError

    # P = 64 / 4 = 16 identities per batch, but the proxy trains on 15 (20 train ids, 25 % held out): every
    # trial fails alike when its loader is built
    recipe = load_recipe(hpo_recipe(trials=5, epochs=1, max_failures=2))
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"batch_size": 64})})
    with pytest.raises(HPOError, match="2 trials in a row failed"):
        hpo_workers.run_hpo(recipe, workers=1, run_dir=tmp_path / "fail")
    recs = sorted((tmp_path / "fail" / "trials").glob("trial_*/record.json"))
    assert len(recs) == 2 and all(json.loads(p.read_text())["state"] == "FAIL" for p in recs)
    assert "error" in json.loads(recs[0].read_text())
