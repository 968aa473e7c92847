"""FeatureExtractor (nasreid.extractor) on real CUHK01 images: every input kind gives [B, D] unit-norm features,
the features equal the evaluation path's (build_test_loaders + extract_features + L2 normalisation), batching
and progress do not change them, and bad inputs are named in the error.

The run folder is built without training (random weights, BN statistics moved by train-mode passes over real
images): these are equality tests, not accuracy claims."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.functional import to_tensor

from _runs import make_untrained_run
from nasreid.data import (
    CorruptImageError,
    build_dataset,
    build_test_loaders,
)
from nasreid.engine.checkpoint import CheckpointError, load_checkpoint
from nasreid.engine.pipeline import load_run_model
from nasreid.errors import NasreidError
from nasreid.evaluation.features import extract_features
from nasreid.extractor import ExtractorError, FeatureExtractor
from nasreid.genotype import Genotype, preset_genotype

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CUHK01 = {"split_seed": 0, "max_ids": 40}  # 20 test ids: 40 query (camera A) and 40 gallery (camera B) images
SPACE_KWARGS = {"width_mult": 0.25, "feature_dim": 128}


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data, one_thread) -> Path:
    """A retrain run folder of recipes/osnet_ain_cpu_retrain.yaml (eval.flip: true) on real CUHK01, 128x64,
    width x0.25, untrained: random BN affine parameters, running statistics from train-mode passes."""
    return make_untrained_run(tmp_path_factory.mktemp("extractor"), shared_data, name="fx_tiny",
                              space_kwargs=SPACE_KWARGS, cuhk01=CUHK01)


@pytest.fixture(scope="module")
def dataset(run):
    _, recipe, _ = load_run_model(run)
    return build_dataset("cuhk01", recipe.data.dataset.root, **recipe.data.dataset.kwargs)


@pytest.fixture(scope="module")
def fx(run):
    return FeatureExtractor.from_run(run, progress=False)


@pytest.fixture(scope="module")
def paths(dataset):
    return [r.path for r in dataset.query[:5]]


@pytest.fixture(scope="module")
def ref(fx, paths):
    return fx(paths)


def _unit_rows(f: torch.Tensor, n: int, d: int = 128) -> None:
    assert f.shape == (n, d) and f.dtype == torch.float32 and f.device.type == "cpu"
    assert torch.allclose(f.norm(dim=1), torch.ones(n), atol=1e-5)


def test_features_equal_the_evaluation_path_on_real_query_images(run, dataset, fx):
    model, recipe, _ = load_run_model(run)
    assert recipe.eval.flip and fx.flip and (fx.height, fx.width) == (128, 64)  # from the run's recipe
    q, _ = build_test_loaders(dataset, height=128, width=64, batch_size=16)
    want, _, _, qpaths = extract_features(model, q, flip=True, normalize=True, progress=False)
    assert len(qpaths) == 40
    got = fx(qpaths)
    _unit_rows(got, 40)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got[0], got[1], atol=1e-2)  # distinct images, distinct features
    # the same network from genotype.json + model.pt, and from the preset + space_kwargs
    by_file = FeatureExtractor(run / "genotype.json", run / "model.pt", height=128, width=64, flip=True)
    assert by_file.genotype.space == "osnet_ain"
    assert torch.allclose(by_file(qpaths[:8]), want[:8], atol=1e-5, rtol=0)
    ck = load_checkpoint(run / "model.pt")
    kw = Genotype.load(run / "genotype.json").space_kwargs
    assert kw == {**SPACE_KWARGS, "head": "bnneck"}
    by_preset = FeatureExtractor("preset:osnet_ain", ck["model"], space="osnet_ain", space_kwargs=kw,
                                 height=128, width=64, flip=True)
    assert torch.allclose(by_preset(qpaths[:8]), want[:8], atol=1e-5, rtol=0)
    # without flip: the plain forward, also as in evaluation
    want_nf, _, _, _ = extract_features(model, q, flip=False, normalize=True, progress=False)
    no_flip = FeatureExtractor.from_run(run, flip=False)
    assert torch.allclose(no_flip(qpaths), want_nf, atol=1e-5, rtol=0)
    assert not torch.allclose(want_nf, want, atol=1e-3)


def test_every_input_kind_gives_unit_features_in_input_order(fx, paths, ref):
    _unit_rows(ref, 5)
    pils = [Image.open(p).convert("RGB") for p in paths]
    arrays = [np.asarray(im) for im in pils]
    assert all(a.shape == (160, 60, 3) and a.dtype == np.uint8 for a in arrays)
    # an image already resized as the evaluation resizes it (v2.ToImage, then v2.Resize on the uint8 image)
    resize = v2.Compose([v2.ToImage(), v2.Resize((128, 64), antialias=True), v2.ToPILImage()])
    resized = torch.stack([to_tensor(resize(im)) for im in pils])
    uint8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [5, 3, 160, 60], resized here
    cases = {
        "path": (paths[2], ref[2:3]),
        "PathLike": (Path(paths[2]), ref[2:3]),
        "tuple of paths": (tuple(paths[::-1]), ref.flip(0)),
        "PIL": (pils[1], ref[1:2]),
        "list of PIL": (pils, ref),
        "HWC array": (arrays[3], ref[3:4]),
        "list of arrays": (arrays, ref),
        "NHWC array": (np.stack(arrays), ref),
        "tensor [B,3,H,W] at the input size": (resized, ref),
        "tensor [3,H,W]": (resized[4], ref[4:5]),
        "list of [3,H,W] tensors": (list(resized[:2]), ref[:2]),
        "uint8 tensor [B,3,H,W] of any size": (uint8, ref),
        "uint8 tensor [3,H,W]": (uint8[1], ref[1:2]),
        "mixed list": ([paths[0], pils[1], arrays[2], resized[3], uint8[4]], ref),
        "grey PIL": (pils[0].convert("L"), None),
    }
    for name, (inp, want) in cases.items():
        got = fx(inp)
        _unit_rows(got, 1 if want is None else len(want))
        if want is not None:
            assert torch.allclose(got, want, atol=1e-5, rtol=0), name
    # a float tensor of another size is resized in float (no rounding to 8 bits in between): close, not equal
    got = fx(torch.stack([to_tensor(im) for im in pils]))
    _unit_rows(got, 5)
    assert bool(((got * ref).sum(dim=1) > 0.999).all())
    assert (got - ref).abs().max() < 0.05


def test_batching_and_progress_do_not_change_features(run, paths, ref, monkeypatch, capsys):
    monkeypatch.delenv("NASREID_NO_PROGRESS", raising=False)
    small = FeatureExtractor.from_run(run, batch_size=2, progress=True)
    capsys.readouterr()
    got = small(paths)
    err = capsys.readouterr().err
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    assert "features" in err and "/5 " in err  # a bar over the 5 images (3 batches of 2, 2 and 1)
    assert torch.allclose(small(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])), ref,
                          atol=1e-6, rtol=0)
    capsys.readouterr()
    monkeypatch.setenv("NASREID_NO_PROGRESS", "1")
    assert torch.allclose(small(paths), ref, atol=1e-6, rtol=0)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("NASREID_NO_PROGRESS")
    quiet = FeatureExtractor.from_run(run, batch_size=2, progress=False)
    assert torch.allclose(quiet(paths), ref, atol=1e-6, rtol=0) and capsys.readouterr().err == ""
    assert small.feature_dim == 128 and "osnet_ain" in repr(small)


def test_bad_inputs_are_named(fx, paths, tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match=r"inputs\[1\]: image file not found: .*nope\.png"):
        fx([paths[0], missing])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(CorruptImageError, match=r"inputs: cannot decode image .*broken\.png") as e:
        fx(bad)
    assert e.value.path == str(bad)
    img = np.asarray(Image.open(paths[0]).convert("RGB"))
    tensor = to_tensor(Image.open(paths[0]).convert("RGB"))
    cases = [
        (img.astype(np.float32) / 255, r"inputs: expected a uint8 RGB array .*dtype float32"),
        (np.ascontiguousarray(img.transpose(2, 0, 1)), r"inputs: .*shape \(3, 160, 60\).*channels first"),
        (img[..., 0], r"inputs: expected a uint8 RGB array .*shape \(160, 60\)"),
        ((tensor - 0.45) / 0.225, r"inputs: float images must be un-normalised RGB in \[0, 1\]"),
        (tensor * 255, r"inputs: float images must be .*0-255"),
        (tensor[:1], r"inputs: expected a tensor \[B, 3, H, W\].*shape \(1, 160, 60\)"),
        (tensor.long(), r"inputs: expected a float tensor .*dtype torch.int64"),
        (torch.full_like(tensor, float("nan")), "NaN"),
        ([], "inputs: empty list"),
        (5, r"inputs: expected a path, .*got int"),
        ([paths[0], paths[1], {"img": 1}], r"inputs\[2\]: expected a path.*got dict"),
        ([paths[0], img[..., 0]], r"inputs\[1\]: expected a uint8 RGB array \[H, W, 3\], got"),
        ([tensor[None]], r"inputs\[0\]: a list element must be one image \[3, H, W\]"),
    ]
    for inp, msg in cases:
        with pytest.raises(ExtractorError, match=msg):
            fx(inp)
    assert issubclass(ExtractorError, NasreidError) and issubclass(ExtractorError, ValueError)


def test_constructor_errors_name_the_argument(run, tmp_path):
    with pytest.raises(ExtractorError, match="a preset needs the space"):
        FeatureExtractor("preset:osnet_ain", run / "model.pt")
    with pytest.raises(ExtractorError, match=r"is a folder; for a run folder use FeatureExtractor.from_run"):
        FeatureExtractor(run)
    with pytest.raises(ExtractorError, match="amp=True needs a CUDA device"):
        FeatureExtractor.from_run(run, amp=True)
    with pytest.raises(ExtractorError, match="batch_size must be an integer >= 1"):
        FeatureExtractor.from_run(run, batch_size=0)
    with pytest.raises(ExtractorError, match="model_or_genotype must be"):
        FeatureExtractor(3.5)
    if not torch.cuda.is_available():
        with pytest.raises(ExtractorError, match="CUDA is not available"):
            FeatureExtractor.from_run(run, device="cuda")
    # weights of another network: a CheckpointError naming the file
    with pytest.raises(CheckpointError, match=r"model\.pt: the weights do not fit"):
        FeatureExtractor(preset_genotype("osnet_ain", "osnet", width_mult=0.5, feature_dim=128), run / "model.pt")
    bare = tmp_path / "no_weights"
    bare.mkdir()
    for f in ("recipe.yaml", "genotype.json"):
        (bare / f).write_text((run / f).read_text())
    with pytest.raises(NasreidError, match="no_weights"):
        FeatureExtractor.from_run(bare)


def test_module_input_and_genotype_object(run, paths, ref):
    model, _, _ = load_run_model(run)
    fx = FeatureExtractor(model, height=128, width=64, flip=True)
    assert not model.training  # the extractor puts its network in eval mode ...
    model.train()  # ... runs it so at every call and restores the caller's mode
    assert torch.allclose(fx(paths), ref, atol=1e-5, rtol=0) and model.training
    g = Genotype.load(run / "genotype.json")
    sd = {f"module.{k}": v for k, v in load_checkpoint(run / "model.pt")["model"].items()}  # DataParallel keys
    assert torch.allclose(FeatureExtractor(g, sd, height=128, width=64, flip=True)(paths), ref, atol=1e-5, rtol=0)
    # no genotype given: model.pt carries it
    from_ckpt = FeatureExtractor(None, run / "model.pt", height=128, width=64, flip=True)
    assert from_ckpt.genotype.choices == g.choices and from_ckpt.genotype.space_kwargs == g.space_kwargs
    assert torch.allclose(from_ckpt(paths), ref, atol=1e-5, rtol=0)
    with pytest.raises(ExtractorError, match="the given state_dict holds none"):
        FeatureExtractor(None, sd)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_match_cpu(run, paths, ref):
    gpu = FeatureExtractor.from_run(run, device="cuda")
    f = gpu(paths)
    assert f.device.type == "cuda" and f.shape == ref.shape
    assert (f.cpu() - ref).abs().max() < 5e-3  # cuDNN may use TF32 convolutions
    assert bool(((f.cpu() * ref).sum(dim=1) > 0.9999).all())
    half = FeatureExtractor.from_run(run, device="cuda", amp=True)(paths)
    assert half.dtype == torch.float32 and half.device.type == "cuda"
    assert bool(((half.cpu() * ref).sum(dim=1) > 0.99).all())
