"""Methods studies in ``nasreid study`` (issue 28): retrain arms (training methods / recipes compared on the same
genotypes), fixed genotype files, extra evaluations of each run (e.g. re-ranking) and a zero-shot row per arm's
init. Schema errors, the job graph of the committed recipes, and a tiny methods study end to end on synthetic
data (trained, re-evaluated, zero-shot, report, resumed with nothing left)."""
import csv
import io
import json
import shlex
from pathlib import Path

import pytest
import yaml

from nasreid import study as S
from nasreid.config import RecipeError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RERANK = {"eval.postprocessors": [{"name": "rerank"}]}

#: the synthetic study's shared settings (study_tiny.yaml's retrain settings)
TINY_SET = {
    "data.dataset.kwargs": {"num_ids": 16, "num_train_ids": 8, "num_cams": 2, "images_per_id_per_cam": 2},
    "data.height": 64, "data.width": 32, "data.batch_size": 16,
    "space.kwargs": {"width_mult": 0.125, "feature_dim": 32, "head": "bnneck"},
    "optim.epochs": 1, "optim.warmup_epochs": 0, "eval.batch_size": 64}
TARGET = {"name": "synthetic", "kwargs": {"num_ids": 12, "num_train_ids": 6, "num_cams": 2,
                                          "images_per_id_per_cam": 2, "seed": 7}}


def _weights(tmp_path: Path) -> Path:
    """A nasreid weights file of the tiny network (preset osnet, x0.125, 32-d BNNeck head): the arms' init."""
    import torch

    from nasreid.genotype import Genotype, preset_genotype

    g = preset_genotype("osnet_ain", "osnet")
    g = Genotype(space=g.space, choices=g.choices,
                 space_kwargs={**g.space_kwargs, "width_mult": 0.125, "feature_dim": 32, "head": "bnneck"})
    torch.manual_seed(0)
    net = g.build(num_classes=0)
    path = tmp_path / "init.pt"
    torch.save(net.state_dict(), path)
    return path


def _study(tmp_path: Path, **over) -> Path:
    """A methods study YAML in ``tmp_path``: arms ``ce`` (with an extra euclidean evaluation) and ``tri``
    (triplet on), hand design osnet, zero-shot on, one split and seed of the synthetic data."""
    raw = {
        "name": "study_methods_tiny", "output_root": str(tmp_path / "runs"), "hand_designed": ["osnet"],
        "retrain": {"recipe": str(RECIPES / "quickstart_retrain.yaml"), "seeds": 1,
                    "set": {**TINY_SET, "model.pretrained": str(_weights(tmp_path)),
                            "eval.metric": "cosine"}},
        "retrain_arms": [
            {"name": "ce", "set": {"loss.kwargs.triplet_weight": 0.0},
             "evaluations": [{"name": "euclid", "set": {"eval.metric": "euclidean"}}]},
            {"name": "tri", "set": {"loss.kwargs.triplet_weight": 1.0}}],
        "zero_shot": True, "splits": [0], "split_key": "data.dataset.kwargs.seed",
        "evaluation": {"targets": [TARGET]}, "workers": 1}
    raw.update(over)
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _error(tmp_path, **over) -> str:
    with pytest.raises(RecipeError) as e:
        S.load_study(_study(tmp_path, **over))
    return str(e.value)


def test_schema_errors_name_the_key(tmp_path):
    arm = {"name": "ce"}
    msg = _error(tmp_path, retrain_arms=[{"name": "ce", "evaluations": [{"name": "x", "set": {"optim.lr": 1}}]}])
    assert "retrain_arms.0.evaluations.0.set" in msg and "optim.lr" in msg and "study.yaml" in msg
    msg = _error(tmp_path, retrain_arms=[arm, {"name": "ce"}])
    assert "retrain_arms names must be unique" in msg
    msg = _error(tmp_path, retrain_arms=[{"name": "ce", "genotypes": ["osnet_ibn"]}])
    assert "retrain_arms.0.genotypes" in msg and "osnet_ibn" in msg
    assert "genotypes: fixed genotype files are retrained by retrain_arms" in _error(
        tmp_path, retrain_arms=[], zero_shot=False, genotypes={"g": "g.json"})
    assert "zero_shot: needs retrain_arms" in _error(tmp_path, retrain_arms=[])
    assert "split_key: null" in _error(tmp_path, split_key=None, splits=[0, 1])
    sel = {"validation": TARGET}
    assert "selection: a methods study" in _error(tmp_path, selection=sel)
    msg = _error(tmp_path, genotypes={"mine": "nowhere/genotype.json"})
    assert "genotypes.mine: file not found: nowhere/genotype.json" in msg
    msg = _error(tmp_path, retrain_arms=[{"name": "ce", "recipe": str(RECIPES / "quickstart_retrain.yaml"),
                                          "set": {"model.pretrained": None}}])
    assert "retrain_arms.0: zero_shot" in msg and "model.pretrained" in msg
    msg = _error(tmp_path, retrain_arms=[{"name": "ce", "evaluations": [{"name": "m", "set": {"eval.metric": "l1"}}]}])
    assert "retrain_arms.0.evaluations.0" in msg and "eval.metric" in msg
    # a genotype file of another space, named by its key
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"space": "msinet", "choices": {}}))
    msg = _error(tmp_path, genotypes={"other": str(g)})
    assert "retrain_arms.0" in msg and "genotypes.other" in msg


def _cmd(job) -> str:
    return shlex.join(job.command("new"))


def test_qaconv_study_job_graph(tmp_path):
    st = S.load_study(RECIPES / "study_qaconv_pretrained_cpu.yaml", {"output_root": str(tmp_path)})
    jobs = S.enumerate_jobs(st)
    zero = [j for j in jobs if j.phase == "zero_shot"]
    train = [j for j in jobs if j.phase == "train"]
    assert len(jobs) == 12 and [j.phase for j in jobs[:2]] == ["zero_shot"] * 2
    arms = ["ce", "memory", "ce_sgd", "qaconv_conv4", "qaconv_trans3"]
    assert [j.id for j in train] == [f"train/{a}/osnet/split0_seed{r}" for r in (0, 1) for a in arms]
    assert [j.id for j in zero] == ["zero_shot/osnet/ce_split0", "zero_shot/osnet/ce+rerank_split0"]
    assert zero[0].owners == arms and zero[1].owners == [f"{a}+rerank" for a in arms]  # one init, 2 evaluations
    for j in train:
        assert j.variants == [("rerank", RERANK)] and j.genotype == "preset:osnet"
        c = _cmd(j)
        assert "recipes/osnet_finetune_cuhk03_cpu.yaml" in c and f"--set seed={j.retrain_seed}" in c
        assert "split_seed" not in c  # CUHK03 has one fixed split (split_key null)
    c4 = _cmd(train[3])
    assert "--set training.method=qaconv" in c4 and "stage: conv4" in c4 and "eval.matcher={name: qaconv" in c4
    assert "stage: trans3" in _cmd(train[4]) and "--set data.height=128 --set data.width=64" in c4
    for j in (train[2], train[3], train[4]):  # the paper's optimiser (Sec. 5.1) for QAConv and its CE baseline
        assert "--set optim.name=sgd --set optim.lr=0.001" in _cmd(j)
    assert "optim.lr_mult={qaconv.*: 10}" in c4 and "optim.lr_mult={head.classifier.*: 10}" in _cmd(train[2])
    assert "optim." not in _cmd(train[0])
    assert "class_memory" in _cmd(train[1]) and "training.method" not in _cmd(train[0])
    z0, z1 = _cmd(zero[0]), _cmd(zero[1])
    assert " evaluate --weights ../shared/weights/osnet_x0_25_msmt17/osnet_x0_25_msmt17.pth" in z0
    assert "--genotype preset:osnet --space osnet_ain" in z0 and "--set data.height=128 --set data.width=64" in z0
    assert "--target cuhk03np=cuhk03 --target cuhk01=cuhk01:protocol=all_ids" in z0 and "matcher" not in z0
    assert "'eval.postprocessors=[]'" in z0 and "'eval.postprocessors=[{name: rerank}]'" in z1
    assert z0.endswith(f"--out {tmp_path}/study_qaconv_pretrained_cpu/zero_shot/osnet/ce_split0")
    assert [t.name for t in zero[0].targets] == ["cuhk03np", "cuhk01"]


def test_domainmix_rsa_and_in_study_job_graphs(tmp_path):
    over = {"output_root": str(tmp_path)}
    dm = S.enumerate_jobs(S.load_study(RECIPES / "study_domainmix_pretrained_cpu.yaml", over))
    assert len(dm) == 9 and sum(j.phase == "zero_shot" for j in dm) == 1
    assert dm[0].owners == ["a_only", "directmix_initial", "directmix_refined", "domainmix"]
    by = {j.retrain_arm: _cmd(j) for j in dm if j.retrain_seed == 0}
    assert "training.kwargs.unlabelled=null" in by["a_only"]
    assert ("training.kwargs.adversarial=false --set training.kwargs.cluster.b_l=1 "
            "--set training.kwargs.cluster.b_h=1000000") in by["directmix_initial"]  # Table 1 "initial": no Eq. 1
    assert "training.kwargs.cluster.every=1 " in by["directmix_refined"] + " "
    assert "training.kwargs.adversarial=true" in by["domainmix"]
    assert "--target synthetic:" in _cmd(dm[0]) and "--target cuhk03np=cuhk03" in _cmd(dm[0])

    rsa = S.enumerate_jobs(S.load_study(RECIPES / "study_rsa_rmgl_pretrained_cpu.yaml", over))
    assert [j.id for j in rsa] == ["zero_shot/osnet/plain_split0", "zero_shot/global_rsa/rmgl_split0",
                                   "zero_shot/rmgl_paper/rmgl_split0",
                                   *(f"train/{a}/split0_seed{r}" for r in (0, 1) for a in
                                     ("plain/osnet", "rsa/osnet", "rmgl/global_rsa", "rmgl/rmgl_paper"))]
    assert "data.augment.rsa=" in _cmd(rsa[4]) and "augment" not in _cmd(rsa[3])
    assert "rmgl_finetune_cuhk03_cpu.yaml --genotype preset:rmgl_paper" in _cmd(rsa[6])  # the RMGL head's own recipe

    c01 = S.enumerate_jobs(S.load_study(RECIPES / "study_rsa_cuhk01_pretrained_cpu.yaml", over))
    zero = [j for j in c01 if j.phase == "zero_shot"]
    assert len(c01) == 15 and [j.split for j in zero] == [0, 1, 2]
    assert "--target cuhk01=cuhk01:split_seed=2 --target cuhk03np=cuhk03" in _cmd(zero[2])
    assert "--set data.dataset.kwargs.split_seed=1" in _cmd([j for j in c01 if j.phase == "train"][4])

    ind = S.enumerate_jobs(S.load_study(RECIPES / "study_in_dg_cpu.yaml", over))
    zero = [j for j in ind if j.phase == "zero_shot"]
    train = [j for j in ind if j.phase == "train"]
    assert len(zero) == 9 and len(train) == 18
    assert [j.arm for j in zero][:4] == ["osnet", "osnet_ibn", "osnet_ain_torchreid", "gumbel_s0_0"]
    g = [j for j in train if j.arm == "gumbel_s1_1"][0]
    assert g.kind == "fixed" and g.id == "train/finetune/gumbel_s1_1/split0_seed0"
    assert g.genotype == str(ROOT / "results/study_osnet_ain_warm_cpu/search/gumbel/split1_seed1/genotype.json")
    assert "warm_start: true" in _cmd(zero[1])  # the init of an IN genotype is the warm start, as in the run


def test_legacy_study_jobs_are_unchanged(tmp_path):
    """A study without retrain_arms keeps its jobs, folders and commands (no zero-shot phase)."""
    st = S.load_study(RECIPES / "study_tiny.yaml", {"output_root": str(tmp_path)})
    jobs = S.enumerate_jobs(st)
    assert [j.id for j in jobs] == ["search/gumbel/split0_seed0", "train/gumbel/split0_search0_seed0",
                                    "train/osnet/split0_seed0"]
    buf = io.StringIO()
    S.print_commands(st, file=buf)
    assert "zero_shot" not in buf.getvalue() and "# phase 2: train" in buf.getvalue()


def test_tiny_methods_study_end_to_end(tmp_path):
    """Two retrain arms on the synthetic data (one with an extra euclidean evaluation), zero-shot rows of their
    init, the report's paired section (trained - zero-shot, evaluation - own, arm - arm), resumed with nothing to
    do; a later extra evaluation is added to the finished runs by nasreid evaluate only."""
    st = S.load_study(_study(tmp_path))
    jobs = S.enumerate_jobs(st)
    assert [j.id for j in jobs] == ["zero_shot/osnet/ce_split0", "zero_shot/osnet/ce+euclid_split0",
                                    "train/ce/osnet/split0_seed0", "train/tri/osnet/split0_seed0"]
    assert jobs[0].owners == ["ce", "tri"] and jobs[1].owners == ["ce+euclid"]
    res = S.run_study(st, workers=1, echo=lambda s: None)
    assert not res["failed"] and len(res["ran"]) == 4, res
    for j in S.enumerate_jobs(st):
        assert j.state() == S.DONE, j.id
    log = (st.study_dir / "train" / "ce" / "osnet" / "split0_seed0" / "job.log").read_text()
    assert log.count("# exit 0") == 2 and "evaluate" in log and "eval.metric=euclidean" in log  # train, then eval
    ev = json.loads((st.study_dir / "train" / "ce" / "osnet" / "split0_seed0" / "metrics.json").read_text())
    assert any(k.endswith("[eval.metric=euclidean]") for k in ev["evaluation"])
    z = json.loads((st.study_dir / "zero_shot" / "osnet" / "ce_split0" / "metrics.json").read_text())
    assert z["kind"] == "zero_shot" and z["metric"] == "cosine" and z["load_report"]["loaded"] > 0
    src = "synthetic[images_per_id_per_cam=2,num_cams=2,num_ids=16,num_train_ids=8,seed=0] (cross-domain)"
    assert src in z["evaluation"]  # the source's test split, as a target
    again = S.run_study(st, report=False, echo=lambda s: None)
    assert not again["ran"] and len(again["skipped"]) == 4

    report = Path(res["report"]).read_text()
    assert "# Study `study_methods_tiny`" in report and "(2 trainings, 2 zero-shot evaluations)" in report
    assert "| ce | osnet | trained | 1 |" in report and "| ce | osnet | zero-shot | 1 |" in report
    assert "| ce+euclid | osnet | trained | 1 |" in report and "| tri | osnet | zero-shot | 1 |" in report
    assert "| ce/osnet − zero-shot | training | 1 |" in report
    assert "| ce+euclid/osnet − ce/osnet | evaluation | 1 |" in report
    assert "| tri/osnet − ce/osnet | method | 1 |" in report
    assert "### same-domain" in report and "### cross-domain synthetic" in report
    rows = list(csv.DictReader(io.StringIO((st.study_dir / "study_results.csv").read_text())))
    assert [(r["source"], r["kind"]) for r in rows] == [
        ("ce/osnet", "zero_shot"), ("tri/osnet", "zero_shot"), ("ce+euclid/osnet", "zero_shot"),
        ("ce/osnet", "hand"), ("ce+euclid/osnet", "hand"), ("tri/osnet", "hand")]
    for r in rows:
        assert r["status"] == "done"
        for c in ("same_mAP", "cross_synthetic_mAP"):
            assert 0 <= float(r[c]) <= 100
    # zero-shot rows of arms sharing an init are the same numbers; the euclidean evaluation differs from cosine
    assert rows[0]["same_mAP"] == rows[1]["same_mAP"]
    assert float(rows[3]["train_seconds"]) > 0 and rows[0]["retrain_seed"] == ""
    assert (st.study_dir / "plots" / "mAP_same.png").is_file()

    # a later extra evaluation on tri: its finished run is re-evaluated, not retrained; its zero-shot row added
    st2 = S.load_study(_study(tmp_path, retrain_arms=[
        {"name": "ce", "set": {"loss.kwargs.triplet_weight": 0.0},
         "evaluations": [{"name": "euclid", "set": {"eval.metric": "euclidean"}}]},
        {"name": "tri", "set": {"loss.kwargs.triplet_weight": 1.0},
         "evaluations": [{"name": "flip", "set": {"eval.flip": True}}]}]))
    tri = [j for j in S.enumerate_jobs(st2) if j.retrain_arm == "tri"][0]
    assert tri.state() == S.EVALUATE
    cmd = tri.command()
    assert cmd[3] == "evaluate" and "eval.flip=true" in cmd and "train" not in cmd
    res = S.run_study(st2, report=False, echo=lambda s: None)
    assert not res["failed"] and sorted(r["id"] for r in res["ran"]) == [
        "train/tri/osnet/split0_seed0", "zero_shot/osnet/tri+flip_split0"]
