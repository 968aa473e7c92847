"""A warm-started search killed with SIGKILL resumes (``nasreid search --resume RUN``), through the very command a
study issues for its interrupted search job, and ends where an uninterrupted run of the same recipe ends. The run
folder's ``recipe.yaml`` writes every key with its default (``model.genotype: null``, ``model.warm_start: false``
...), which the recipe check must take as the defaults they are."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import missing
from nasreid.config import load_recipe
from nasreid.engine import pipeline
from nasreid.engine.checkpoint import load_checkpoint
from nasreid.engine.runs import load_run_recipe
from nasreid.engine.validate import check_recipe
from nasreid.study.jobs import PARTIAL, enumerate_jobs
from nasreid.study.schema import load_study

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "recipes" / "study_osnet_ain_warm_cpu.yaml"


def _short(shared_data: Path, shared_weights: Path) -> dict:
    """The study's warm-started search, cut to 12 CUHK01 training ids (3 steps of 16 images per epoch) and
    1 frozen + 2 open epochs at the recipe's 256x128 (the file's input size)."""
    return {"data.dataset.root": str(shared_data / "cuhk01"), "data.dataset.kwargs.max_ids": 24,
            "data.batch_size": 16, "data.workers": 0, "optim.epochs": 3, "model.calibrate_norms": 16,
            "model.pretrained": str(shared_weights / "osnet_x0_25_msmt17" / "osnet_x0_25_msmt17.pth")}


def _run(cmd: list[str], env: dict, log: Path) -> None:
    with open(log, "w") as err:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=600).returncode
    assert rc == 0, f"{' '.join(cmd[2:])} failed:\n" + log.read_text()[-2000:]


def test_a_killed_warm_started_study_search_resumes_exactly(tmp_path, shared_data, shared_weights):
    if not (shared_data / "cuhk01").is_dir():
        missing(f"cuhk01 missing in {shared_data}")
    study = load_study(STUDY, {"output_root": str(tmp_path / "study")})
    job = next(j for j in enumerate_jobs(study) if j.phase == "search" and j.arm == "gumbel")
    short = _short(shared_data, shared_weights)
    sets = [a for k, v in short.items() for a in ("--set", f"{k}={v}")]
    env = dict(os.environ, NASREID_NO_PROGRESS="1", OMP_NUM_THREADS="1")

    # the study's fresh command, shortened; SIGKILL once the frozen epoch's checkpoint is written
    with open(tmp_path / "killed.log", "w") as err:
        proc = subprocess.Popen([*job.command(), *sets], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    ckpt = job.run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    assert ckpt.is_file(), "the search never finished an epoch:\n" + (tmp_path / "killed.log").read_text()[-2000:]
    assert load_checkpoint(ckpt)["epoch"] == 0  # killed in the second of three epochs
    assert not (job.run_dir / "genotype.json").exists()

    # recipe.yaml holds the defaults written back; the check takes them, the study resumes the job
    written = load_run_recipe(job.run_dir)
    assert written.model.genotype is None and written.model.preset is None and written.model.warm_start is False
    check_recipe(written, search=True)
    assert job.state() == PARTIAL and job.command()[3:5] == ["search", "--resume"]
    _run(job.command(), env, tmp_path / "resumed.log")
    assert "resumed from checkpoints/last.pt (epoch 1 done)" in (job.run_dir / "train.log").read_text()

    # an uninterrupted run of the same recipe (in this process, one thread as the subprocesses)
    recipe = load_recipe(job.recipe, {**dict(job.sets), **short, "then_retrain": None})
    ref = pipeline.run_search(recipe, run_dir=tmp_path / "ref", progress=False)
    got, want = (json.loads((r / "genotype.json").read_text()) for r in (job.run_dir, ref))
    assert got["choices"] == want["choices"]
    assert got["probabilities"] == want["probabilities"]
    assert max(max(p.values()) for p in want["probabilities"].values()) > 0.26  # pi moved off uniform (0.25)
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (job.run_dir, ref))
    assert a["epoch"] == b["epoch"] == 2
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    history = json.loads((job.run_dir / "metrics.json").read_text())["history"]
    assert [h.get("frozen_backbone") for h in history] == [1.0, None, None]


def test_every_recipe_as_a_run_folder_writes_it_passes_the_check(tmp_path):
    """The defaults a run folder's ``recipe.yaml`` writes back (every key of the schema) never trigger a
    refusal: each shipped search / train recipe, written as ``prepare_run`` writes it and read back, passes
    :func:`check_recipe` as the recipe itself does; a search recipe that *sets* a fixed-network key is still
    refused by name."""
    from nasreid.config import RecipeError

    checked = 0
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        if "space" not in yaml.safe_load(path.read_text()):  # study recipes
            continue
        recipe = load_recipe(path)
        search = recipe.strategy is not None
        check_recipe(recipe, search=search)
        (tmp_path / "recipe.yaml").write_text(recipe.model_copy(update={"source": None, "then_retrain": None})
                                              .to_yaml())
        check_recipe(load_recipe(tmp_path / "recipe.yaml"), search=search)
        checked += 1
    assert checked > 10
    from nasreid.genotype import preset_genotype

    preset_genotype("osnet_ain", "osnet", width_mult=0.25).save(tmp_path / "g.json")
    for key, value in (("model.genotype", str(tmp_path / "g.json")), ("model.preset", "osnet"),
                       ("model.warm_start", True)):
        with pytest.raises(RecipeError, match=rf"osnet_ain_warm_cpu\.yaml: {key}: a search recipe does not honour"):
            check_recipe(load_recipe(ROOT / "recipes" / "osnet_ain_warm_cpu.yaml", {key: value}), search=True)
