"""WiSE-FT (``nasreid interpolate``; Wortsman et al., CVPR 2022, Eq. 1): Eq. 1 on small state dicts, and the curve
of a tiny real fine-tune (torchreid's MSMT17 OSNet x0.25 on 12 CUHK01 identities, 1 epoch at 128x64) whose ends
are the run's own figures (alpha 1) and the zero-shot figures of the file (alpha 0)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from nasreid import cli
from nasreid.config import RecipeError
from nasreid.evaluation.wise_ft import (
    InterpolationError,
    interpolate_state,
    parse_alphas,
    pretrained_init,
    run_wise_ft,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
MSMT17 = "osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth"
SETS = ["eval.metric=cosine", "data.height=128", "data.width=64"]  # the tiny run's evaluation settings


# ---- Eq. 1 on small tensors ------------------------------------------------------------------------------
def _states():
    t0 = {"w": torch.tensor([[0.0, 1.0], [2.0, -4.0]]), "bn.running_var": torch.tensor([1.0, 2.0]),
          "bn.num_batches_tracked": torch.tensor(7), "cls.weight": torch.zeros(2, 3)}
    t1 = {"w": torch.tensor([[10.0, 1.0], [-2.0, 4.0]]), "bn.running_var": torch.tensor([3.0, 0.0]),
          "bn.num_batches_tracked": torch.tensor(12), "cls.weight": torch.ones(5, 3)}
    return t0, t1


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.3])
def test_interpolate_state_is_eq_1(alpha):
    t0, t1 = _states()
    out = interpolate_state(t0, t1, alpha, take_from_1=["cls.weight"])
    want_w = {0.0: [[0.0, 1.0], [2.0, -4.0]], 1.0: [[10.0, 1.0], [-2.0, 4.0]],
              0.3: [[3.0, 1.0], [0.8, -1.6]]}[alpha]
    want_v = {0.0: [1.0, 2.0], 1.0: [3.0, 0.0], 0.3: [1.6, 1.4]}[alpha]
    torch.testing.assert_close(out["w"], torch.tensor(want_w), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["bn.running_var"], torch.tensor(want_v), rtol=0, atol=1e-6)  # buffers mixed
    if alpha in (0.0, 1.0):  # the ends are exact, not merely close
        src = t0 if alpha == 0.0 else t1
        assert torch.equal(out["w"], src["w"]) and torch.equal(out["bn.running_var"], src["bn.running_var"])
    assert out["bn.num_batches_tracked"].item() == 12 and out["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(out["cls.weight"], t1["cls.weight"])  # listed: taken from theta_1 despite the shape
    assert list(out) == list(t1)
    assert torch.equal(t0["w"], _states()[0]["w"])  # inputs unchanged


def test_interpolate_state_names_the_bad_key():
    t0, t1 = _states()
    with pytest.raises(InterpolationError, match="'cls.weight': shape \\(2, 3\\) .* \\(5, 3\\)"):
        interpolate_state(t0, t1, 0.5)
    t0b = {k: v for k, v in t0.items() if k != "w"}
    with pytest.raises(InterpolationError, match="'w' is in the fine-tuned state dict only"):
        interpolate_state(t0b, t1, 0.5, take_from_1=["cls.weight"])
    t0c = {**t0, "extra.bias": torch.zeros(2)}
    with pytest.raises(InterpolationError, match="'extra.bias' is in the pretrained state dict only"):
        interpolate_state(t0c, t1, 0.5, take_from_1=["cls.weight"])
    with pytest.raises(InterpolationError, match="alpha must be in \\[0, 1\\]"):
        interpolate_state(t0, t1, 1.5, take_from_1=["cls.weight"])


def test_parse_alphas():
    assert parse_alphas("0,0.25,0.5,0.75,1") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("0:1:0.1") == [round(0.1 * i, 10) for i in range(11)]
    assert parse_alphas("0.5,0.5,1") == [0.5, 1.0]
    for bad in ("1.5", "-0.1,0.5", "a,b", "0:1", "0:1:0", "1:0:0.1", "", "nan"):
        with pytest.raises(RecipeError, match="--alpha"):
            parse_alphas(bad)


# ---- a tiny real fine-tune ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data, shared_weights):
    """``nasreid train`` of the MSMT17 OSNet x0.25 on CUHK01 (24 ids: 12 train, 12 test; split seed 0), 1 epoch at
    128x64, backbone open from the first step (so the fine-tune moves the whole network), cross-domain target
    CUHK01 all_ids (first 20 ids)."""
    from nasreid.config import load_recipe
    from nasreid.engine import pipeline

    tmp = tmp_path_factory.mktemp("wise_ft")
    raw = yaml.safe_load((ROOT / "recipes" / "osnet_finetune_cpu.yaml").read_text())
    raw.update(name="wise_tiny", output_root=str(tmp / "results"))
    raw["data"].update(dataset={"name": "cuhk01", "root": str(shared_data / "cuhk01"),
                                "kwargs": {"split_seed": 0, "max_ids": 24}},
                       height=128, width=64, batch_size=16, workers=0)
    raw["model"]["pretrained"] = str(shared_weights / MSMT17)
    raw["training"] = {"freeze_backbone_epochs": 0}
    raw["optim"].update(epochs=1)
    raw["eval"]["targets"] = [{"name": "cuhk01", "root": str(shared_data / "cuhk01"),
                               "kwargs": {"protocol": "all_ids", "max_ids": 20}}]
    (tmp / "r.yaml").write_text(yaml.safe_dump(raw))
    return pipeline.run_train(load_recipe(tmp / "r.yaml"), genotype=None, run_dir=tmp / "run",
                              progress=False)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_curve_ends_at_the_run_and_at_the_zero_shot_file(run, tmp_path, shared_data, shared_weights, capsys):
    metrics = json.loads((run / "metrics.json").read_text())["evaluation"]
    same = "cuhk01 (same-domain)"
    cross = next(k for k in metrics if k.endswith("(cross-domain)"))
    out = run_wise_ft(run, [1.0, 0.0])
    rows = {r["alpha"]: r for r in _rows(out / "wise_ft.csv")}
    assert set(rows) == {"1", "0"}
    for key in (same, cross):  # alpha 1: the run's own evaluation (metrics.json), to the CSV's 6 decimals
        for m in ("rank1", "mAP", "mINP"):
            assert float(rows["1"][f"{key}/{m}"]) == pytest.approx(metrics[key][m], abs=1e-4), (key, m)
    # alpha 0: the zero-shot figures of the file, by nasreid evaluate --weights (no run folder, no training)
    target = f"cuhk01={shared_data / 'cuhk01'}:protocol=all_ids,max_ids=20"
    sets = [a for s in ["space.kwargs.width_mult=0.25", *SETS] for a in ("--set", s)]
    assert cli.main(["evaluate", "--weights", str(shared_weights / MSMT17), "--genotype", "preset:osnet", *sets,
                     "--target", target, "--out", str(tmp_path / "zs")]) == 0
    (zs,) = json.loads((tmp_path / "zs" / "metrics.json").read_text())["evaluation"].values()
    for m in ("rank1", "mAP", "mINP"):
        assert float(rows["0"][f"{cross}/{m}"]) == pytest.approx(zs[m], abs=1e-4), m
    # the fine-tune moved the network: the two ends differ (else the test would not tell init from run)
    assert rows["0"][f"{same}/mAP"] != rows["1"][f"{same}/mAP"]
    md = (out / "wise_ft.md").read_text()
    assert md.splitlines()[0] == f"# WiSE-FT: {os.path.relpath(run)}"  # no machine path in a committed table
    assert "best same-domain" in md and "best cross-domain" in md and "alpha 0 (zero-shot)" in md \
        and "alpha 1 (fine-tuned)" in md
    assert (out / "wise_ft.png").stat().st_size > 1000


def test_the_init_is_the_file_and_the_run_started_from_it(run, shared_weights):
    """pretrained_init: every tensor but the classifier is the file's (load_pretrained into a fresh network of
    the genotype); the classifier is the seeded random one of the run's start (the same values twice)."""
    from nasreid.genotype import Genotype
    from nasreid.models.pretrained import load_pretrained

    a, b = pretrained_init(run).state_dict(), pretrained_init(run).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = Genotype.load(run / "genotype.json").build(num_classes=0)
    load_pretrained(ref, shared_weights / MSMT17)
    r = ref.state_dict()
    assert set(r) == {k for k in a if not k.startswith("head.classifier")} and len(r) > 100
    assert all(torch.equal(a[k], r[k]) for k in r)
    trained = torch.load(run / "model.pt", weights_only=False)["model"]
    assert set(a) == set(trained)
    assert any(not torch.equal(a[k], trained[k]) for k in r if a[k].is_floating_point())


def test_cli_resumes_and_refuses(run, tmp_path, capsys):
    out = tmp_path / "curve"
    assert cli.main(["interpolate", str(run), "--alpha", "0,0.5", "--no-same-domain", "--out", str(out)]) == 0
    first = _rows(out / "wise_ft.csv")
    assert [r["alpha"] for r in first] == ["0", "0.5"] and all("same-domain" not in k for k in first[0])
    before = (out / "wise_ft.csv").read_text()
    capsys.readouterr()
    assert cli.main(["interpolate", str(run), "--alpha", "0:1:0.5", "--no-same-domain", "--out", str(out)]) == 0
    after = (out / "wise_ft.csv").read_text()
    assert after.startswith(before)  # the done rows are kept as they were
    assert [r["alpha"] for r in _rows(out / "wise_ft.csv")] == ["0", "0.5", "1"]  # only alpha 1 evaluated
    capsys.readouterr()
    for bad in ("1.5", "0,x"):
        assert cli.main(["interpolate", str(run), "--alpha", bad, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--alpha" in err, err
    assert (out / "wise_ft.csv").read_text() == after


def test_a_run_without_pretrained_weights_is_refused(run, tmp_path, capsys):
    import shutil

    other = tmp_path / "scratch_run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("wise_ft", "tb", "checkpoints"))
    rec = yaml.safe_load((other / "recipe.yaml").read_text())
    rec["model"]["pretrained"] = None
    (other / "recipe.yaml").write_text(yaml.safe_dump(rec))
    with pytest.raises(RecipeError, match="model.pretrained"):
        pretrained_init(other)
    assert cli.main(["interpolate", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.pretrained" in err, err
    assert not (other / "wise_ft").exists()
