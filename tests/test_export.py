"""ONNX export of a retrain run (nasreid.export) on real CUHK01 images: PyTorch/onnxruntime feature parity and
identical rankings, dynamic batch axis, preprocessing metadata, and clear errors.

The run folders are built without training (random weights with BN affine parameters and running statistics
moved away from their defaults by train-mode passes over real images): parity is an equality test, not an
accuracy claim."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import nasreid
from _runs import make_untrained_run
from nasreid.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, build_transforms
from nasreid.engine.checkpoint import load_checkpoint, save_checkpoint
from nasreid.engine.pipeline import load_run_model
from nasreid.errors import NasreidError, RunFolderError
from nasreid.export import (
    ExportError,
    check_parity,
    default_opset,
    export_onnx,
    read_metadata,
    run_export,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CUHK01 = {"split_seed": 0, "max_ids": 40}  # 20 test ids: 40 query (camera A) and 40 gallery (camera B) images


def make_run(root: Path, data: Path, recipe_file: str, name: str, space_kwargs: dict, preset: str) -> Path:
    """A retrain run folder (recipe.yaml, genotype.json, model.pt) of ``recipe_file`` on real CUHK01, untrained."""
    return make_untrained_run(root, data, recipe_file, name, space_kwargs, preset, CUHK01)


@pytest.fixture(scope="module")
def osnet_run(tmp_path_factory, shared_data, one_thread) -> Path:
    return make_run(tmp_path_factory.mktemp("export"), shared_data, "osnet_ain_cpu_retrain.yaml", "osnet_tiny",
                    {"width_mult": 0.25, "feature_dim": 128}, "osnet_ain")


@pytest.fixture(scope="module")
def exported(osnet_run) -> dict:
    return run_export(osnet_run, num_query=20, num_gallery=40, batch_sizes=(1, 7))


def _real_images(run: Path, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` query then ``n`` gallery images of the run's CUHK01 split, preprocessed as in evaluation."""
    _, recipe, _ = load_run_model(run)
    ds = build_dataset("cuhk01", recipe.data.dataset.root, **recipe.data.dataset.kwargs)
    recs = ds.query[:n] + ds.gallery[:n]
    tf = build_transforms(recipe.data.height, recipe.data.width, is_train=False)
    return torch.stack([tf(ds.read_image(r)) for r in recs]), [r.path for r in recs]


def test_onnx_features_match_pytorch_on_real_cuhk01_images(osnet_run, exported):
    p = exported["parity"]
    assert exported["path"] == str(osnet_run / "export" / "model.onnx") and Path(exported["path"]).is_file()
    assert not list((osnet_run / "export").glob("*.data")) and not list((osnet_run / "export").glob(".*tmp"))
    assert p["passed"] is True
    assert p["max_abs_diff"] <= 1e-4 and p["atol"] == 1e-4
    assert p["max_abs_feature"] > 0.1  # the features are not trivially small
    assert p["top10_identical"] is True and p["rankings_identical"] is True and p["num_queries_ranking_differs"] == 0
    assert (p["num_query"], p["num_gallery"], p["feature_dim"]) == (20, 40, 128)
    assert p["batch_sizes"] == [1, 7] and set(p["max_abs_diff_per_batch_size"]) == {"1", "7"}
    assert p["providers"] == ["CPUExecutionProvider"]
    assert p["opset"] == exported["opset"] == default_opset() == min(onnx.defs.onnx_opset_version(), 23)
    saved = json.loads((osnet_run / "export" / "parity.json").read_text())
    assert saved["max_abs_diff"] == p["max_abs_diff"] and saved["passed"] is True


def test_dynamic_batch_axis_and_rankings_checked_independently(osnet_run, exported):
    """ORT at batch sizes 3 and 5 (neither used by the parity run) on real images, against the PyTorch model."""
    model, _, _ = load_run_model(osnet_run)
    x, _ = _real_images(osnet_run, 10)
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(exported["path"], providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, out.name) == ("images", "features")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 128, 64]  # symbolic batch, fixed image size
    for b in (3, 5):
        got = np.concatenate([sess.run(None, {"images": x[i:i + b].numpy()})[0] for i in range(0, len(x), b)])
        assert got.shape == ref.shape == (20, 128)
        assert np.abs(got - ref).max() <= 1e-4

        def ranks(f):
            f = f / np.linalg.norm(f, axis=1, keepdims=True)
            return np.argsort(-(f[:10] @ f[10:].T), axis=1, kind="stable")

        assert (ranks(got) == ranks(ref)).all()


def test_metadata_describes_the_preprocessing(osnet_run, exported):
    proto = onnx.load(exported["path"])
    onnx.checker.check_model(proto, full_check=True)
    meta = read_metadata(exported["path"])
    assert meta == {p.key: p.value for p in proto.metadata_props}
    assert (meta["input.name"], meta["input.layout"], meta["input.channel_order"]) == ("images", "NCHW", "RGB")
    assert (meta["input.height"], meta["input.width"], meta["input.pixel_divisor"]) == ("128", "64", "255")
    assert json.loads(meta["input.mean"]) == pytest.approx(list(IMAGENET_MEAN))
    assert json.loads(meta["input.std"]) == pytest.approx(list(IMAGENET_STD))
    assert (meta["output.name"], meta["output.feature_dim"], meta["output.l2_normalized"]) == ("features", "128",
                                                                                               "false")
    assert meta["output.eval_flip"] == "true" and meta["output.eval_metric"] == "cosine"  # the recipe's eval
    assert meta["nasreid.space"] == "osnet_ain" and meta["nasreid.version"] == nasreid.__version__
    assert json.loads(meta["nasreid.genotype"]) == json.loads((osnet_run / "genotype.json").read_text())
    sess = ort.InferenceSession(exported["path"], providers=["CPUExecutionProvider"])
    assert sess.get_modelmeta().custom_metadata_map["input.height"] == "128"
    assert "not L2-normalised" in proto.doc_string


def test_parity_fails_when_the_onnx_file_does_not_match_the_weights(osnet_run, exported, tmp_path):
    other = tmp_path / "changed"
    shutil.copytree(osnet_run, other)
    ck = load_checkpoint(other / "model.pt")
    key = next(k for k, v in ck["model"].items() if k.endswith("running_var") and v.numel() > 1)
    ck["model"][key] = ck["model"][key] * 4
    save_checkpoint(other / "model.pt", ck)
    rep = check_parity(other, onnx_path=exported["path"], num_query=10, num_gallery=20, batch_sizes=(2, 5))
    assert rep["passed"] is False and rep["max_abs_diff"] > 1e-4
    assert json.loads((other / "export" / "parity.json").read_text())["passed"] is False


def test_bad_format_exporter_and_opset_are_export_errors(osnet_run, tmp_path):
    with pytest.raises(ExportError, match=r"unknown export format 'tflite'.*onnx"):
        run_export(osnet_run, fmt="tflite")
    with pytest.raises(ExportError, match="unknown ONNX exporter 'jit'"):
        export_onnx(osnet_run, out=tmp_path / "m.onnx", exporter="jit")
    with pytest.raises(ExportError, match=r"opset must be an integer in \[7, 23\].*got 99"):
        export_onnx(osnet_run, out=tmp_path / "m.onnx", opset=99)
    assert issubclass(ExportError, NasreidError) and not (tmp_path / "m.onnx").exists()
    with pytest.raises(ExportError, match="ONNX file not found"):
        check_parity(osnet_run, onnx_path=tmp_path / "missing.onnx")


def test_run_folders_without_weights_or_recipe_are_named(osnet_run, tmp_path):
    bare = tmp_path / "no_weights"
    bare.mkdir()
    for f in ("recipe.yaml", "genotype.json"):
        shutil.copy(osnet_run / f, bare / f)
    with pytest.raises(NasreidError, match="no_weights"):
        export_onnx(bare)
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(RunFolderError, match="not_a_run"):
        run_export(empty)
    assert not (bare / "export" / "model.onnx").exists()


def test_msinet_network_exports_with_parity(tmp_path, shared_data):
    run = make_run(tmp_path, shared_data, "msinet_cpu_retrain.yaml", "msinet_tiny",
                   {"width_mult": 0.25, "local_dim": 64}, "msinet_paper")
    summary = run_export(run, out=tmp_path / "msinet.onnx", num_query=12, num_gallery=24, batch_sizes=(2, 5))
    p = summary["parity"]
    assert summary["path"] == str(tmp_path / "msinet.onnx")
    assert p["passed"] and p["max_abs_diff"] <= 1e-4 and p["top10_identical"]
    assert read_metadata(summary["path"])["nasreid.space"] == "msinet"


@pytest.mark.parametrize("preset", ["rmgl_paper", "baseline_2_3"])
def test_rmgl_network_exports_with_parity(tmp_path, shared_data, preset):
    """RMGL: the paper's network (receptive partition, ABP stripes at test time: data-dependent boundaries) and the
    2+3-stripe baseline (equal stripes that overlap by a row on an 8-row map) export with parity."""
    run = make_run(tmp_path, shared_data, "rmgl_cpu_retrain.yaml", "rmgl_tiny",
                   {"width_mult": 0.25, "reduce_dim": 32}, preset)
    summary = run_export(run, num_query=16, num_gallery=32, batch_sizes=(1, 5))
    p = summary["parity"]
    assert p["passed"] and p["max_abs_diff"] <= 1e-4 and p["top10_identical"], p
    assert read_metadata(summary["path"])["nasreid.space"] == "rmgl"


def test_legacy_torchscript_exporter_gives_the_same_parity(osnet_run, tmp_path):
    path = export_onnx(osnet_run, out=tmp_path / "ts.onnx", exporter="torchscript")
    assert onnx.load(str(path)).opset_import[0].version == default_opset("torchscript") == min(
        onnx.defs.onnx_opset_version(), 20)
    rep = check_parity(osnet_run, onnx_path=path, num_query=10, num_gallery=20, batch_sizes=(1, 4), save=False)
    assert rep["passed"] and rep["max_abs_diff"] <= 1e-4 and rep["top10_identical"]
    assert read_metadata(path)["input.height"] == "128"


def test_missing_optional_packages_say_what_to_install(osnet_run, exported, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ExportError, match=r"optional package 'onnxruntime'.*pip install \"nasreid\[onnx\]\""):
        check_parity(osnet_run, onnx_path=exported["path"])
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ExportError, match=r"optional package 'onnx'.*pip install \"nasreid\[onnx\]\""):
        run_export(osnet_run)
