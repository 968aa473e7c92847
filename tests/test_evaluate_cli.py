"""``nasreid evaluate`` as a user types it, on real CUHK01 images and the real torchreid files: a command that stops
on an input error leaves no run folder behind (issue 25 item 6), and ``evaluate RUN --set`` applies each key or
refuses it by name (item 3)."""
from __future__ import annotations

import json
import shutil

import pytest

from _runs import make_untrained_run
from nasreid import cli

MSMT17 = "osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth"
ONNX = "torchreid_onnx_reference/osnet_x0_25_msmt17_torchreid_export.onnx"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the CLI with ``tmp_path`` as the working directory (the default ``results/`` lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _bad_weights(kind: str, tmp, weights) -> tuple[str, list[str], str]:
    """(weights file, extra --set, a word of the expected message) for one way a weights file can be wrong."""
    if kind == "missing":
        return str(tmp / "nowhere.pth"), [], "not found"
    if kind == "truncated":
        cut = tmp / "cut.pth"
        cut.write_bytes((weights / MSMT17).read_bytes()[:100_000])
        return str(cut), [], "cannot read"
    if kind == "onnx":
        return str(weights / ONNX), [], "ONNX"
    if kind == "wrong_width":  # the x0.25 file into an x0.5 network
        return str(weights / MSMT17), ["space.kwargs.width_mult=0.5"], "shape"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "truncated", "onnx", "wrong_width"])
def test_failed_evaluate_weights_leaves_no_run_folder(kind, in_tmp, shared_weights, shared_data, capsys):
    if not (shared_weights / ONNX).is_file():
        from conftest import missing

        missing(f"{ONNX} not found in {shared_weights}")
    path, extra, word = _bad_weights(kind, in_tmp, shared_weights)
    sets = [a for s in ["space.kwargs.width_mult=0.25", *extra] for a in ("--set", s)]
    rc = cli.main(["evaluate", "--weights", path, "--genotype", "preset:osnet", *sets,
                   "--target", f"cuhk01={shared_data / 'cuhk01'}:protocol=all_ids"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and word in err, err
    assert not (in_tmp / "results").exists() or not any((in_tmp / "results").iterdir()), \
        list((in_tmp / "results").iterdir())


def test_failed_train_on_missing_data_leaves_no_run_folder(in_tmp, capsys):
    """A retrain whose dataset folder does not exist stops with one line and removes the folder it created."""
    recipe = in_tmp / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "nodata", "device": "cpu", "output_root": str(in_tmp / "results"),
        "data": {"dataset": {"name": "cuhk01", "root": str(in_tmp / "no_such_dataset")}, "workers": 0},
        "space": {"name": "osnet_ain", "kwargs": {"width_mult": 0.25}}, "model": {"preset": "osnet"},
        "optim": {"epochs": 1}}))
    rc = cli.main(["train", str(recipe)])
    err = capsys.readouterr().err
    assert rc == 2 and "no_such_dataset" in err, err
    assert not any((in_tmp / "results").iterdir()), list((in_tmp / "results").iterdir())


def test_an_existing_folder_is_never_removed(in_tmp, shared_weights, shared_data, capsys):
    """``--out`` naming a folder that already exists: the failed command leaves it and what it held."""
    out = in_tmp / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = cli.main(["evaluate", "--weights", str(in_tmp / "nowhere.pth"), "--genotype", "preset:osnet",
                   "--out", str(out), "--target", f"cuhk01={shared_data / 'cuhk01'}"])
    assert rc == 2 and (out / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data):
    return make_untrained_run(tmp_path_factory.mktemp("evaluate_set"), shared_data, name="ev_tiny",
                              space_kwargs={"width_mult": 0.25, "feature_dim": 64},
                              cuhk01={"split_seed": 0, "max_ids": 40})


def test_evaluate_run_set_applies_evaluation_keys(run, capsys, tmp_path):
    """``--set eval.metric=euclidean`` on a run evaluated with cosine changes the figures (it used to be accepted
    and ignored, printing the cosine figures to the last digit) and tags the result keys with the setting."""
    cosine = json.loads((lambda: (cli.main(["evaluate", str(run)]), capsys.readouterr().out)[1])())
    assert cli.main(["evaluate", str(run), "--set", "eval.metric=euclidean"]) == 0
    euclid = json.loads(capsys.readouterr().out)
    (key,) = [k for k in cosine if "same-domain" in k]
    assert f"{key} [eval.metric=euclidean]" in euclid
    a, b = cosine[key], euclid[f"{key} [eval.metric=euclidean]"]
    assert (a["mAP"], a["rank1"]) != (b["mAP"], b["rank1"])
    stored = json.loads((run / "metrics.json").read_text())["evaluation"]
    assert stored[key] == a and stored[f"{key} [eval.metric=euclidean]"] == b  # both kept, side by side


@pytest.mark.parametrize("key", ["optim.lr=0.1", "space.kwargs.width_mult=0.5", "data.height=128"])
def test_evaluate_run_set_refuses_what_it_cannot_apply(run, key, capsys):
    before = (run / "metrics.json").read_text() if (run / "metrics.json").is_file() else None
    assert cli.main(["evaluate", str(run), "--set", key]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key.split("=")[0] in err and "evaluation settings" in err, err
    after = (run / "metrics.json").read_text() if (run / "metrics.json").is_file() else None
    assert before == after


def test_removal_is_limited_to_setup_files(tmp_path, monkeypatch):
    """A new folder that holds a checkpoint or metrics is kept: only a folder with nothing but setup files goes."""
    from nasreid.engine import runs

    monkeypatch.setattr(runs, "_NEW_RUNS", [])

    empty, done = tmp_path / "empty", tmp_path / "done"
    for d in (empty, done):
        (d / "tb").mkdir(parents=True)
        (d / "recipe.yaml").write_text("name: x\n")
        runs.track_new_run(d)
    (done / "metrics.json").write_text("{}")
    assert runs.discard_new_runs() == [empty]
    assert not empty.exists() and done.is_dir()
    shutil.rmtree(done)
