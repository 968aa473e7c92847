"""Random shifting augmentation (RMGL, Wang et al., TIP 2020, Sec. III-D) on real CUHK01 images."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from nasreid.data.transforms import RandomShift, build_transforms

H, W = 128, 64


@pytest.fixture(scope="module")
def images(cuhk01_dir) -> list[tv_tensors.Image]:
    """Three real images as uint8 ``tv_tensors.Image`` ``[3, 128, 64]``."""
    paths = sorted(cuhk01_dir.glob("*.png"))[:3]
    assert len(paths) == 3
    to_img, resize = v2.ToImage(), v2.Resize((H, W), antialias=True)
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(resize(to_img(im.convert("RGB"))))
    return out


def _as_float(img):
    return v2.ToDtype(torch.float32, scale=True)(img)


def _outside_mask(prm) -> torch.Tensor:
    mask = torch.ones(H, W, dtype=torch.bool)
    mask[prm["top"]:prm["top"] + prm["height"], prm["left"]:prm["left"] + prm["width"]] = False
    return mask


@pytest.mark.parametrize("dtype", ["uint8", "float"])
def test_size_dtype_and_type_kept(images, dtype):
    torch.manual_seed(0)
    t = RandomShift(p=1.0)
    for img in images:
        x = img if dtype == "uint8" else _as_float(img)
        y = t(x)
        assert y.shape == x.shape == (3, H, W)
        assert y.dtype == x.dtype
        assert isinstance(y, tv_tensors.Image)
        # a plain tensor stays a plain tensor
        z = t(x.as_subclass(torch.Tensor))
        assert type(z) is torch.Tensor and z.shape == (3, H, W)


@pytest.mark.parametrize("dtype,fill", [("uint8", 127), ("float", 0.5)])
def test_fill_outside_patch_and_patch_content(images, dtype, fill):
    t = RandomShift(p=1.0, p_c=0.5)
    torch.manual_seed(1)
    for k in range(12):
        img = images[k % len(images)]
        x = img if dtype == "uint8" else _as_float(img)
        state = torch.get_rng_state()
        prm = t.get_params(H, W)
        torch.set_rng_state(state)
        y = t(x)  # forward draws the same geometry from the same RNG state
        assert prm["applied"]
        assert 0 <= prm["top"] and prm["top"] + prm["height"] <= H
        assert 0 <= prm["left"] and prm["left"] + prm["width"] <= W
        assert 0 <= prm["crop_top"] and prm["crop_top"] + prm["crop_height"] <= H
        assert prm["height"] >= 1 and prm["width"] >= 1
        outside = y[:, _outside_mask(prm)]
        assert bool((outside == fill).all())
        band = x[:, prm["crop_top"]:prm["crop_top"] + prm["crop_height"], :]
        expect = TF.resize(band.as_subclass(torch.Tensor), [prm["height"], prm["width"]], antialias=True)
        patch = y[:, prm["top"]:prm["top"] + prm["height"], prm["left"]:prm["left"] + prm["width"]]
        assert torch.equal(patch.as_subclass(torch.Tensor), expect)


def test_p_zero_is_identity(images):
    t = RandomShift(p=0.0, p_c=1.0)
    torch.manual_seed(2)
    for img in images:
        assert torch.equal(t(img), img)
        f = _as_float(img)
        assert torch.equal(t(f), f)
    assert not t.get_params(H, W)["applied"]


def test_distribution_crop_and_no_crop():
    torch.manual_seed(3)
    t = RandomShift(p=1.0, p_c=0.5, r_c_min=0.7, r_h_min=0.5, r_w_min=0.5)
    draws = [t.get_params(H, W) for _ in range(400)]
    cropped = [d for d in draws if d["crop_height"] < H]
    frac = len(cropped) / len(draws)
    assert 0.35 < frac < 0.65  # p_c = 0.5 (a few crops round to H: r_c > 1 - 1/(2H))
    assert all(round(0.7 * H) <= d["crop_height"] <= H for d in draws)
    assert all(d["crop_top"] == 0 for d in draws if d["crop_height"] == H)
    assert all(round(0.5 * W) <= d["width"] <= W for d in draws)
    # r_h ~ U(r_h_min, 1/r_c): heights reach near H both with and without a crop, never exceed it
    assert max(d["height"] for d in cropped) > 0.9 * H
    assert all(d["height"] >= int(0.5 * d["crop_height"]) for d in draws)
    # positions vary in both directions
    assert len({d["top"] for d in draws}) > 10 and len({d["left"] for d in draws}) > 5
    t.p = 0.5
    applied = sum(t.get_params(H, W)["applied"] for _ in range(400)) / 400
    assert 0.4 < applied < 0.6


def test_build_transforms_with_rsa(images, cuhk01_dir):
    rsa = dict(p=1.0, p_c=0.5, r_c_min=0.7, r_h_min=0.5, r_w_min=0.5)
    tr = build_transforms(H, W, is_train=True, rsa=rsa)
    names = [type(op).__name__ for op in tr.transforms]
    assert "RandomShift" in names
    assert names.index("RandomShift") == names.index("RandomHorizontalFlip") + 1
    assert names.index("RandomShift") < names.index("ToDtype") < names.index("Normalize")
    rs = tr.transforms[names.index("RandomShift")]
    assert (rs.p, rs.p_c, rs.r_c_min, rs.r_h_min, rs.r_w_min) == (1.0, 0.5, 0.7, 0.5, 0.5)
    with Image.open(min(cuhk01_dir.glob("*.png"))) as im:
        pil = im.convert("RGB")
    torch.manual_seed(4)
    out = tr(pil)
    assert type(out) is torch.Tensor and out.shape == (3, H, W) and out.dtype == torch.float32
    assert "RandomShift" not in [type(op).__name__ for op in build_transforms(H, W, is_train=False, rsa=rsa).transforms]
    assert "RandomShift" not in [type(op).__name__ for op in build_transforms(H, W, is_train=True).transforms]


@pytest.mark.parametrize("kwargs,name", [
    (dict(p=1.5), "p"), (dict(p=-0.1), "p"), (dict(p_c=2), "p_c"), (dict(r_c_min=0), "r_c_min"),
    (dict(r_h_min=1.2), "r_h_min"), (dict(r_w_min=-1), "r_w_min"), (dict(r_w_min=float("nan")), "r_w_min"),
    (dict(p="x"), "p"),
])
def test_invalid_args(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        RandomShift(**kwargs)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        build_transforms(H, W, is_train=True, rsa=kwargs)


def test_refuses_pil_and_odd_dtypes(cuhk01_dir):
    with Image.open(min(cuhk01_dir.glob("*.png"))) as im:
        pil = im.convert("RGB")
    with pytest.raises(TypeError, match="ToImage"):
        RandomShift(p=1.0)(pil)
    with pytest.raises(TypeError, match="int32"):
        RandomShift(p=1.0)(torch.zeros(3, 8, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="rsa"):
        build_transforms(H, W, is_train=True, rsa=[0.5])
