"""End to end on real CUHK01 images: search -> derive -> train -> evaluate -> plot, interrupted-run
resume, and clear errors for corrupt images and bad CLI input."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from nasreid import cli
from nasreid.config import load_recipe
from nasreid.engine import pipeline
from nasreid.engine.checkpoint import load_checkpoint
from nasreid.genotype import Genotype

TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {
        "dataset": {"name": "cuhk01", "root": None, "kwargs": {"split_seed": 0, "max_ids": 24}},
        "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "workers": 0,
        "augment": {"flip": True, "color_jitter": True},
    },
    "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.125, "feature_dim": 64}},
    "strategy": {"name": "gumbel", "kwargs": {"mode": "hard", "lambda_start": 3.0, "lambda_step": 1.0,
                                                "lambda_every": 1, "lambda_min": 1.0, "arch_lr": 0.5}},
    "optim": {"lr": 0.05, "epochs": 3, "scheduler": "cosine"},
    "eval": {"flip": False, "batch_size": 64},
}


@pytest.fixture
def tiny_recipe(write_recipe):
    return lambda **over: write_recipe(TINY, **over)


def test_search_derive_train_evaluate_plot_on_cuhk01(tiny_recipe, tmp_path, market_root):
    search_run = pipeline.run_search(load_recipe(tiny_recipe()), run_dir=tmp_path / "search", progress=False)
    # alphas.csv: one row per (epoch, label, value); probabilities are distributions
    rows = (search_run / "alphas.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 * 6 * 4
    geno = Genotype.load(search_run / "genotype.json")
    assert geno.space == "osnet_ain" and len(geno.choices) == 6
    for label, probs in geno.probabilities.items():
        assert abs(sum(probs.values()) - 1) < 1e-5
        assert geno.choices[label] == max(probs, key=probs.get)  # derive = argmax pi
    # pi learnt: softmax(pi) left its near-uniform start (pi ~ N(0, 1e-3): p within ~3e-4 of 0.25). How far, and
    # which decision moves most, depends on float rounding (thread count, kernels): the largest move was measured
    # 0.007 (1 thread) to 0.024 (2 threads); in one of those runs a decision moved only 6e-4, so no per-decision floor
    assert max(abs(v - 0.25) for p in geno.probabilities.values() for v in p.values()) > 5e-3
    metrics = json.loads((search_run / "metrics.json").read_text())
    assert [h["lambda"] for h in metrics["history"]] == [3.0, 2.0, 1.0]
    assert (search_run / "genotype.graphml").is_file()
    # TensorBoard: lambda per epoch and every choice's softmax(pi)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(search_run / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("epoch/lambda")] == [3.0, 2.0, 1.0]
    final_p = acc.Scalars(f"alpha/conv4_2/{geno.choices['conv4_2']}")[-1].value
    assert abs(final_p - geno.probabilities["conv4_2"][geno.choices["conv4_2"]]) < 1e-6
    assert "train/loss" in acc.Tags()["scalars"]

    # CLI derive and plot on the same run
    assert cli.main(["derive", str(search_run)]) == 0
    assert cli.main(["plot", str(search_run)]) == 0
    assert (search_run / "alpha_trajectories.png").stat().st_size > 0

    train_recipe = tiny_recipe(name="tiny_train", strategy=None, **{"optim.epochs": 2, "loss": {"triplet_weight": 1.0},
                                                                  "eval.every": 1})
    run = pipeline.run_train(load_recipe(train_recipe), genotype=search_run / "genotype.json",
                             run_dir=tmp_path / "train", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    # evaluation every N epochs is a hook: after epoch 1, not after the last one (evaluated in full)
    assert 0 <= m["history"][0]["eval_mAP"] <= 100 and "eval_mAP" not in m["history"][1]
    ev = m["evaluation"]["cuhk01 (same-domain)"]
    assert ev["num_query"] == ev["num_gallery"] > 0
    assert 0 <= ev["mAP"] <= 100 and ev["rank1"] <= ev["rank5"] <= ev["rank10"]
    # the trained network is exactly the genotype's
    net = Genotype.load(run / "genotype.json").build(num_classes=12)
    variants = [b.variant for b in (*net.conv2, *net.conv3, *net.conv4)]
    assert variants == list(geno.choices.values())

    # cross-domain evaluation on another layout: a Market-1501 tree (with junk and distractors)
    res = pipeline.run_evaluate(run, targets=[pipeline.DatasetRef(name="market1501", root=str(market_root))],
                                same_domain=False)
    key = "market1501 (cross-domain)"
    assert key in res and res[key]["num_query"] > 0 and 0 <= res[key]["mAP"] <= 100
    assert key in json.loads((run / "metrics.json").read_text())["evaluation"]
    assert res[key]["num_skipped_queries"] == 0 and ev["num_skipped_queries"] == 0
    # a test-only target (query + gallery, no training folder) is enough for cross-domain evaluation
    shutil.rmtree(market_root / "bounding_box_train")
    assert cli.main(["evaluate", str(run), "--no-same-domain", "--target", f"market1501={market_root}"]) == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_search_resumes_exactly(tiny_recipe, tmp_path, monkeypatch, workers):
    """Bit-identical on CPU, with loader workers too (each epoch's loader is seeded from (seed, epoch))."""
    recipe = load_recipe(tiny_recipe(**{"optim.epochs": 2, "data.workers": workers}))
    ref = pipeline.run_search(recipe, run_dir=tmp_path / "ref", progress=False)
    ref_state = load_checkpoint(ref / "checkpoints" / "last.pt")

    from nasreid.strategies.gumbel import GumbelStrategy
    orig = GumbelStrategy.train_step
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # first epoch has 3 steps: die inside the second epoch
            raise KeyboardInterrupt("simulated interruption")
        return orig(self, *a, **k)

    monkeypatch.setattr(GumbelStrategy, "train_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_search(recipe, run_dir=tmp_path / "cut", progress=False)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["epoch"] == 0
    monkeypatch.setattr(GumbelStrategy, "train_step", orig)
    # a fresh start on an existing run is refused; --resume continues it
    assert cli.main(["search", str(tiny_recipe()), "--out", str(tmp_path / "cut")]) == 2
    assert cli.main(["search", "--resume", str(tmp_path / "cut")]) == 0
    cut_state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert cut_state["epoch"] == 1
    # the log names the checkpoint relative to the run folder, so it reads the same wherever the run moves
    log_text = (tmp_path / "cut" / "train.log").read_text()
    assert "resumed from checkpoints/last.pt (epoch 1 done)" in log_text and str(tmp_path) not in log_text
    for k, v in ref_state["model"].items():
        assert torch.equal(v, cut_state["model"][k]), k
    assert json.loads((tmp_path / "cut" / "genotype.json").read_text())["choices"] == \
        json.loads((ref / "genotype.json").read_text())["choices"]
    # alphas.csv has each epoch once despite the interruption
    rows = (tmp_path / "cut" / "alphas.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 6 * 4


def test_interrupted_retrain_is_resumed_by_search_resume(tiny_recipe, tmp_path, monkeypatch):
    """search -> then_retrain, killed inside the retrain: ``search --resume`` finishes that same retrain."""
    retrain = tiny_recipe(name="tiny_retrain", strategy=None, **{"optim.epochs": 2})
    search = tiny_recipe(**{"optim.epochs": 1, "then_retrain": str(retrain)})
    from nasreid.methods import SupervisedMethod

    orig, calls = SupervisedMethod.step, {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # retrain epoch 2 (3 steps per epoch)
            raise KeyboardInterrupt("simulated interruption")
        return orig(self, *a, **k)

    monkeypatch.setattr(SupervisedMethod, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_search(load_recipe(search), run_dir=tmp_path / "s", progress=False)
    monkeypatch.setattr(SupervisedMethod, "step", orig)
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    train_dir = Path(m["retrain_run"])
    assert train_dir.is_absolute() and load_checkpoint(train_dir / "checkpoints" / "last.pt")["epoch"] == 0
    assert (tmp_path / "s" / "retrain_recipe.yaml").is_file()  # the run folder carries its retrain recipe
    search.unlink()
    retrain.unlink()  # self-contained: the original recipe files are not needed any more
    assert cli.main(["search", "--resume", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["retrain_run"] == str(train_dir)
    tm = json.loads((train_dir / "metrics.json").read_text())
    assert len(tm["history"]) == 2 and "cuhk01 (same-domain)" in tm["evaluation"]
    assert [p.name for p in (tmp_path / "results").iterdir()] == [train_dir.name]  # no second retrain folder


def test_recipe_typos_fail_before_training(tiny_recipe, tmp_path, capsys):
    bad = tiny_recipe(**{"space.kwargs": {"widht_mult": 0.125}})
    assert cli.main(["search", str(bad), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "tiny.yaml" in err and "space.kwargs.widht_mult" in err and "width_mult" in err
    # a bad cross-domain target of the retrain recipe is found before the search starts, not after it
    retrain = tiny_recipe(name="r", strategy=None, **{"eval.targets": [{"name": "market1501",
                                                                        "kwargs": {"strct": False}}]})
    good_search = tiny_recipe(**{"then_retrain": str(retrain)})
    assert cli.main(["search", str(good_search), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "r.yaml" in err and "eval.targets[0].kwargs.strct" in err
    assert not (tmp_path / "b" / "checkpoints").exists()
    unknown = tiny_recipe(**{"data.dataset.name": "market1502"})
    assert cli.main(["search", str(unknown)]) == 2
    assert "data.dataset.name: unknown dataset 'market1502'" in capsys.readouterr().err


def test_derive_refuses_nan_architecture_weights(tiny_recipe, tmp_path):
    from nasreid.engine.checkpoint import save_checkpoint
    from nasreid.genotype import GenotypeError

    run = pipeline.run_search(load_recipe(tiny_recipe(**{"optim.epochs": 1})), run_dir=tmp_path / "s", progress=False)
    ck = run / "checkpoints" / "last.pt"
    st = load_checkpoint(ck)
    st["hooks"]["strategy"]["probabilities"]["conv3_1"]["os"] = float("nan")
    save_checkpoint(ck, st)
    with pytest.raises(GenotypeError, match="conv3_1.*not finite"):
        pipeline.derive(run)


def test_corrupt_image_is_reported_by_name(tiny_recipe, tmp_path, shared_data):
    from nasreid.data import build_dataset

    root = tmp_path / "cuhk01"
    shutil.copytree(shared_data / "cuhk01", root)
    kwargs = TINY["data"]["dataset"]["kwargs"]
    victim = Path(build_dataset("cuhk01", root, **kwargs).train[0].path)
    victim.write_bytes(b"\x89PNG\r\n\x1a\n garbage, not an image")
    recipe = load_recipe(tiny_recipe(**{"data.dataset.root": str(root), "optim.epochs": 1}))
    with pytest.raises(Exception, match=victim.name):
        pipeline.run_search(recipe, run_dir=tmp_path / "bad", progress=False)
    # with on_corrupt: skip the run goes on and warns, naming the file
    recipe = load_recipe(tiny_recipe(**{"data.dataset.root": str(root), "data.on_corrupt": "skip", "optim.epochs": 1}))
    with pytest.warns(UserWarning, match=victim.name):
        run = pipeline.run_search(recipe, run_dir=tmp_path / "skip", progress=False)
    assert (run / "genotype.json").is_file()


def test_cli_reports_bad_input(tmp_path, capsys, tiny_recipe):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {dataset: {name: cuhk01}}\nspace: {name: osnet_ain}\nstrategy: {name: gumbel}\n"
                   "optim: {lr: fast}\n")
    assert cli.main(["search", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "optim.lr" in err
    assert cli.main(["derive", str(tmp_path)]) == 2
    assert "not a nasreid run folder" in capsys.readouterr().err
    p = tiny_recipe(**{"strategy.name": "evolution"})
    assert cli.main(["search", str(p)]) == 2
    assert "unknown strategy 'evolution'" in capsys.readouterr().err


def _hand_made_search_run(tiny_recipe, tmp_path, metrics: dict, retrain_recipe: bool = False) -> Path:
    """A search run folder as ``nasreid search`` leaves it, written by hand (no training): the search recipe,
    a genotype, a supernet checkpoint whose weights fit no fixed network, and ``metrics``."""
    from nasreid.engine.checkpoint import save_checkpoint
    from nasreid.genotype import preset_genotype

    recipe = load_recipe(tiny_recipe())
    run = tmp_path / "search_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe.model_copy(update={"source": None}).to_yaml())
    preset_genotype("osnet_ain", "osnet_ain", **recipe.space.kwargs).save(run / "genotype.json")
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": {"supernet.mixed_op.pi": torch.zeros(3)}})
    if retrain_recipe:
        (run / "retrain_recipe.yaml").write_text("name: retrain\n")
    (run / "metrics.json").write_text(json.dumps({"kind": "search", "search_done": True, **metrics}))
    return run


def test_evaluate_on_a_search_run_names_its_retrain_run(tiny_recipe, tmp_path, capsys):
    """``nasreid evaluate SEARCH_RUN`` says it is a search run and where its retrained network is, instead of
    a state-dict mismatch; export / visualize / the extractor (``load_run_model``) say the same."""
    from nasreid.engine.runs import is_search_run, load_run_model
    from nasreid.errors import RunFolderError

    retrain = tmp_path / "results" / "retrain_20250101"
    retrain.mkdir(parents=True)
    run = _hand_made_search_run(tiny_recipe, tmp_path, {"retrain_run": str(retrain)})
    assert is_search_run(run)
    assert cli.main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nasreid evaluate: error:")
    assert "is a search run" in err and str(retrain) in err
    assert "do not fit" not in err and "state_dict" not in err
    with pytest.raises(RunFolderError, match="search run"):
        load_run_model(run)


def test_evaluate_on_a_search_run_without_retrain_says_what_to_run(tiny_recipe, tmp_path, capsys):
    run = _hand_made_search_run(tiny_recipe, tmp_path, {})
    assert cli.main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a search run" in err
    assert f"nasreid train <retrain recipe> --genotype {run / 'genotype.json'}" in err
    # a search that copied its then_retrain recipe: the command names that copy; a recorded retrain run that
    # is gone is said to be missing
    shutil.rmtree(run)
    run = _hand_made_search_run(tiny_recipe, tmp_path, {"retrain_run": str(tmp_path / "gone")}, retrain_recipe=True)
    assert cli.main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"nasreid train {run / 'retrain_recipe.yaml'} --genotype {run / 'genotype.json'}" in err
    assert "missing" in err and str(tmp_path / "gone") in err


def test_cli_keeps_the_traceback_of_bugs(tiny_recipe, monkeypatch, capsys):
    """Only nasreid's own (user-input) errors become one line + exit 2; a bug propagates with its traceback."""
    def boom(*a, **k):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(pipeline, "run_search", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["search", str(tiny_recipe())])


def test_identity_split_with_overlap_is_saved_and_stable(tiny_recipe, tmp_path):
    """SearchContext.split_identities (MSINet TCM): a fraction of ids in both sets, the rest disjoint,
    relabelled 0..n-1 in each, written to the run folder and read back unchanged."""
    from nasreid.data import build_dataset
    from nasreid.engine.context import SearchContext
    from nasreid.engine.trainer import device_context

    recipe = load_recipe(tiny_recipe())
    ds = build_dataset("cuhk01", recipe.data.dataset.root, split_seed=0, max_ids=24)
    ctx = SearchContext(recipe=recipe, run_dir=tmp_path, device=device_context("cpu"), dataset=ds)
    train, val = ctx.split_identities(overlap=0.25)
    saved = json.loads((tmp_path / "split.json").read_text())
    n = ds.num_train_pids
    assert len(saved["shared"]) == round(0.25 * n)
    assert sorted(saved["shared"] + saved["train_only"] + saved["val_only"]) == list(range(n))
    paths_t, paths_v = {r.path for r in train}, {r.path for r in val}
    assert not paths_t & paths_v and len(paths_t) + len(paths_v) == len(ds.train)  # every image once
    by_path = {r.path: r.pid for r in ds.train}
    shared_t = {by_path[p] for p in paths_t} & {by_path[p] for p in paths_v}
    assert shared_t == set(saved["shared"])
    for recs in (train, val):
        assert sorted({r.pid for r in recs}) == list(range(len({r.pid for r in recs})))
    # read back from the run folder (resume): the same split, whatever the arguments now
    again_t, again_v = ctx.split_identities(overlap=0.9, seed=123)
    assert [r.path for r in again_t] == [r.path for r in train] and [r.path for r in again_v] == [r.path for r in val]
    loader = ctx.loader(val, batch_size=8, num_instances=2)
    assert next(iter(loader))["img"].shape[0] == 8
