"""Validation identities (``data.val_ids``) on real CUHK01 images: held-out training identities form a validation
query / gallery by the dataset's own protocol; train, validation and test are disjoint; the draw follows the split's
seed and is recorded in the run folder; a search with ``val_ids`` reads no test image, also when resumed; a retrain
states which identities it trained on and evaluates validation beside test."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nasreid.config import RecipeError, load_recipe
from nasreid.data import build_dataset
from nasreid.data.datasets.base import ReIDDataset, hold_out_validation, validation_view
from nasreid.engine import pipeline
from nasreid.engine.runs import VAL_SPLIT_FILE, build_run_dataset, load_run_recipe
from nasreid.engine.validate import check_recipe

TINY = {
    "name": "tiny_val",
    "seed": 0,
    "device": "cpu",
    "data": {
        "dataset": {"name": "cuhk01", "root": None, "kwargs": {"split_seed": 0, "max_ids": 24}},
        "height": 64, "width": 32, "batch_size": 16, "num_instances": 4, "workers": 0,
        "val_ids": 4,
    },
    "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.125, "feature_dim": 64}},
    "strategy": {"name": "gumbel", "kwargs": {"mode": "hard", "lambda_start": 3.0, "lambda_step": 1.0,
                                                "lambda_every": 1, "lambda_min": 1.0, "arch_lr": 0.5}},
    "optim": {"lr": 0.05, "epochs": 2, "scheduler": "cosine"},
    "eval": {"flip": False, "batch_size": 64},
}


@pytest.fixture(scope="module")
def cuhk01(shared_data):
    """The full CUHK01 protocol split 0 (485 train / 486 test identities)."""
    if not (shared_data / "cuhk01" / "campus").is_dir():
        from conftest import missing

        missing(f"cuhk01 not present in {shared_data}")
    return build_dataset("cuhk01", shared_data / "cuhk01", split_seed=0)




def _paths(records) -> set[str]:
    return {os.path.abspath(r.path) for r in records}


def test_hold_out_is_disjoint_by_protocol_and_seeded(cuhk01):
    held = hold_out_validation(cuhk01, 50, seed=0)
    info = held.val_split
    # counts: 50 of 485 held out, the rest relabelled 0..N-1
    assert len(info["labels"]) == 50 and held.num_train_pids == 435 == info["train_ids"]
    assert sorted({r.pid for r in held.train}) == list(range(435))
    assert len(held.val_query) == len(held.val_gallery) == 100  # CUHK01: 2 images per camera and identity
    # identities: validation pids are CUHK01's own, disjoint from the remaining train and the test identities
    val_pids = {r.pid for r in held.val_query} | {r.pid for r in held.val_gallery}
    assert val_pids == set(info["pids"]) == set(held.val_pids) and info["original_pids"]
    assert not val_pids & set(held.train_pids) and not val_pids & set(cuhk01.test_pids)
    assert not set(held.train_pids) & set(cuhk01.test_pids)
    assert val_pids | set(held.train_pids) == set(cuhk01.train_pids)
    # the relabelled train still maps label i to train_pids[i]: every image keeps its identity
    for r in held.train:
        assert int(Path(r.path).name[:4]) == held.train_pids[r.pid]
    for r in held.val_query + held.val_gallery:
        assert int(Path(r.path).name[:4]) == r.pid
    # images: train, validation and test disjoint; train + validation = the split's training images
    train, val = _paths(held.train), _paths(held.val_query + held.val_gallery)
    test = _paths(cuhk01.query + cuhk01.gallery)
    assert not train & val and not train & test and not val & test
    assert train | val == _paths(cuhk01.train)
    # CUHK01's protocol: query from camera A, gallery from camera B, for every validation identity
    for p in val_pids:
        assert {r.camid for r in held.val_query if r.pid == p} == {0}
        assert {r.camid for r in held.val_gallery if r.pid == p} == {1}
    # the input dataset is left as it was; the test split is the same object content
    assert cuhk01.num_train_pids == 485 and not cuhk01.val_query
    assert held.query == cuhk01.query and held.gallery == cuhk01.gallery
    # a fraction: round(0.2 * 485) = 97
    assert len(hold_out_validation(cuhk01, 0.2, seed=0).val_split["labels"]) == 97
    # the same seed draws the same identities, another seed others
    assert hold_out_validation(cuhk01, 50, seed=0).val_split["pids"] == info["pids"]
    assert hold_out_validation(cuhk01, 50, seed=1).val_split["pids"] != info["pids"]
    # the summary shows the validation rows; without them it is unchanged
    assert "val query" in held.summary() and "val gallery" in held.summary()
    assert "val query" not in cuhk01.summary()
    view = validation_view(held)
    assert view.query == held.val_query and view.gallery == held.val_gallery and view.name == "cuhk01-val"
    with pytest.raises(RecipeError, match="data.val_ids"):
        validation_view(cuhk01)


def test_hold_out_refuses_bad_counts(cuhk01):
    with pytest.raises(RecipeError, match="data.val_ids"):
        hold_out_validation(cuhk01, 485, seed=0)  # leaves no training identity
    with pytest.raises(RecipeError, match="data.val_ids"):
        hold_out_validation(cuhk01, 0.001, seed=0)  # rounds to 0 identities
    with pytest.raises(RecipeError, match="data.val_ids"):
        hold_out_validation(cuhk01, 4, seed=0, labels=[0, 1, 99999, 3])  # a record that does not fit


def test_generic_protocol_gives_every_query_a_cross_camera_match(market_root, cuhk01):
    """A layout without a protocol of its own (Market-1501 naming): one image per camera to the query, the rest to
    the gallery, a query without a cross-camera match moved to the gallery; pids kept apart from the test pids."""
    market = build_dataset("market1501", market_root)
    held = hold_out_validation(market, 2, seed=0)
    test_pids = {r.pid for r in market.query + market.gallery}
    val_pids = {r.pid for r in held.val_query + held.val_gallery}
    assert len(val_pids) == 2 and not val_pids & test_pids
    for q in held.val_query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in held.val_gallery)
    assert not _paths(held.train) & _paths(held.val_query + held.val_gallery)
    # one real image per camera of one identity: the first query has no match and moves to the gallery
    recs = [next(r for r in cuhk01.train if r.pid == 0 and r.camid == c) for c in (0, 1)]
    query, gallery = ReIDDataset.validation_protocol(cuhk01, recs)
    assert [r.camid for r in query] == [1] and [r.camid for r in gallery] == [0]


@pytest.mark.parametrize("bad", [0, 1, 1.5, 1.0, "four"])
def test_recipe_refuses_bad_val_ids(write_recipe, bad):
    with pytest.raises(RecipeError, match=r"tiny_val\.yaml: data\.val_ids"):
        load_recipe(write_recipe(TINY, **{"data.val_ids": bad}))


def test_recipe_checks_name_the_key(write_recipe, tmp_path):
    # more identities than the split holds: refused when the run builds its dataset, naming the key
    recipe = load_recipe(write_recipe(TINY, **{"data.val_ids": 30}))
    with pytest.raises(RecipeError, match=r"data\.val_ids: 30 holds out 30 of 12 training identities"):
        pipeline.run_search(recipe, run_dir=tmp_path / "too_many", progress=False)
    # eval.every_split: val needs data.val_ids; optuna's own held-out fraction is refused when data.val_ids is set
    with pytest.raises(RecipeError, match="eval.every_split"):
        check_recipe(load_recipe(write_recipe(TINY, **{"data.val_ids": None, "eval.every_split": "val"})))
    optuna = {"name": "optuna", "kwargs": {"trials": 1, "epochs": 1, "val_fraction": 0.3}}
    with pytest.raises(RecipeError, match=r"strategy\.kwargs\.val_fraction"):
        check_recipe(load_recipe(write_recipe(TINY, strategy=optuna)), search=True)


def test_search_with_val_ids_reads_no_test_image_and_resumes_on_the_same_split(write_recipe, tmp_path, monkeypatch,
                                                                               read_paths):
    from nasreid.engine.hooks import CheckpointHook

    recipe = load_recipe(write_recipe(TINY))
    orig_after_epoch = CheckpointHook.after_epoch

    def interrupt_after_first_epoch(self, trainer):
        orig_after_epoch(self, trainer)
        if trainer.epoch == 0:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(CheckpointHook, "after_epoch", interrupt_after_first_epoch)
    run = tmp_path / "search"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_search(recipe, run_dir=run, progress=False)
    monkeypatch.setattr(CheckpointHook, "after_epoch", orig_after_epoch)
    split_file = (run / VAL_SPLIT_FILE).read_text()
    pipeline.run_search(load_run_recipe(run), run_dir=run, resume=True, progress=False)
    assert (run / VAL_SPLIT_FILE).read_text() == split_file  # the resumed run kept the recorded draw

    ds = build_run_dataset(load_run_recipe(run), run)
    split = json.loads(split_file)
    assert split["pids"] == ds.val_split["pids"] and len(split["pids"]) == 4 and split["seed"] == 0
    test = _paths(ds.query + ds.gallery)
    val = _paths(ds.val_query + ds.val_gallery)
    opened = set(read_paths)
    assert opened, "the spy saw no image read"
    assert not opened & test, f"the search read test images: {sorted(opened & test)[:3]}"
    assert not opened & val  # a gumbel search trains on the training identities only
    assert opened <= _paths(ds.train)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_ids"] == 8 and metrics["val_ids_held_out"] == 4 and metrics["val_pids"] == split["pids"]
    assert len(metrics["history"]) == 2

    # later commands see the run's recorded draw, not a new one; a record for other settings is refused by name
    other = tmp_path / "other"
    other.mkdir()
    fresh = build_run_dataset(recipe)  # the same draw: seed 0 of split 0
    kept = sorted(set(range(12)) - set(split["labels"]))[:4]
    (other / VAL_SPLIT_FILE).write_text(json.dumps({**split, "labels": kept}))
    assert build_run_dataset(recipe, other).val_split["labels"] == kept != fresh.val_split["labels"]
    (other / VAL_SPLIT_FILE).write_text(json.dumps({**split, "val_ids": 5}))
    with pytest.raises(RecipeError, match="data.val_ids"):
        build_run_dataset(recipe, other)


def test_optuna_validates_on_the_held_out_identities(write_recipe, tmp_path):
    from nasreid.engine.context import SearchContext
    from nasreid.engine.runs import build_context
    from nasreid.strategies.optuna_hpo import OptunaStrategy

    optuna = {"name": "optuna", "kwargs": {"trials": 1, "epochs": 1}}
    recipe = load_recipe(write_recipe(TINY, strategy=optuna))
    (tmp_path / "hpo").mkdir()
    ctx = build_context(SearchContext, recipe, tmp_path / "hpo", False)
    train, query, gallery = OptunaStrategy(ctx.build_space(), trials=1, epochs=1)._splits(ctx)
    assert train == ctx.dataset.train and query == ctx.dataset.val_query and gallery == ctx.dataset.val_gallery
    assert not (tmp_path / "hpo" / "hpo_split.json").exists()
    ctx.writer.close()


def test_retrain_states_its_identities_and_evaluates_validation(write_recipe, tmp_path):
    base = {**TINY, "strategy": None, "model": {"preset": "osnet"}}
    # with val_ids: 8 identities trained on, validation every epoch (eval.every_split: val) and at the end beside test
    recipe = load_recipe(write_recipe(base, **{"eval.every": 1, "eval.every_split": "val", "optim.epochs": 2}))
    run = pipeline.run_train(recipe, run_dir=tmp_path / "val", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["train_ids"] == 8 and m["val_ids_held_out"] == 4
    assert "val_mAP" in m["history"][0] and "eval_mAP" not in m["history"][0]
    val = m["evaluation"]["cuhk01 (validation)"]
    assert val["protocol"] == "validation" and val["num_query"] == val["num_gallery"] == 8
    assert "cuhk01 (same-domain)" in m["evaluation"]
    assert json.loads((run / VAL_SPLIT_FILE).read_text())["pids"] == m["val_pids"]
    # a retrain after selection without val_ids trains on all 12 training identities again, and says so
    recipe = load_recipe(write_recipe(base, **{"data.val_ids": None, "optim.epochs": 1}))
    run = pipeline.run_train(recipe, run_dir=tmp_path / "all", progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["train_ids"] == 12 and m["val_ids_held_out"] == 0 and "val_pids" not in m
    assert "cuhk01 (validation)" not in m["evaluation"] and not (run / VAL_SPLIT_FILE).exists()
