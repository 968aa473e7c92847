"""Image transforms for re-ID training and testing (torchvision ``transforms.v2``).

Standard re-ID recipe: resize to H×W, random horizontal flip, optional random shifting augmentation
(:class:`RandomShift`, RSA; Wang et al., "Receptive Multi-granularity Representation for Person
Re-Identification", TIP 2020, Sec. III-D), optional pad + random crop, optional colour jitter, ImageNet
normalisation, optional random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020). Input is a
``PIL.Image`` (RGB); output a ``float32`` tensor ``[3, H, W]``, normalised.

All randomness is drawn from torch's global RNG, so the DataLoader's per-worker seeding makes it reproducible.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import PIL.Image
import torch
from pydantic import BaseModel, ConfigDict, Field
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from nasreid.registry import AUGMENTATIONS

__all__ = ["build_transforms", "RandomShift", "IMAGENET_MEAN", "IMAGENET_STD", "STAGES"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_unit(name: str, value: Any, *, open_low: bool) -> float:
    """``value`` as a float in ``(0, 1]`` (``open_low``) or ``[0, 1]``; ValueError naming ``name`` otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"RandomShift: {name} must be a number, got {value!r}") from None
    ok = (0.0 < v <= 1.0) if open_low else (0.0 <= v <= 1.0)  # False for NaN
    if not ok or isinstance(value, bool):
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ValueError(f"RandomShift: {name} must be in {interval}, got {value!r}")
    return v


#: where a registered augmentation runs in :func:`build_transforms` (its class attribute ``stage``):
#: ``"geometric"`` on the uint8 image right after resize and flip (before pad/crop), ``"pixel"`` after the geometric
#: and colour augmentations, before normalisation
STAGES = ("geometric", "pixel")


@AUGMENTATIONS.register("rsa")
class RandomShift(v2.Transform):
    """Random shifting augmentation (RSA): Wang et al., "Receptive Multi-granularity Representation for Person
    Re-Identification", TIP 2020, Sec. III-D, Fig. 6.

    With probability ``p``, for an image of size H×W:

    1. *Crop*: with probability ``p_c`` keep a full-width band of height ``round(r_c·H)`` at a uniformly random
       vertical position, ``r_c ~ U(r_c_min, 1)``; otherwise ``r_c = 1`` and the patch is the whole image.
    2. *Resize*: the patch becomes ``round(r_h · patch_height)`` × ``round(r_w · W)`` pixels with
       ``r_h ~ U(r_h_min, 1/r_c)`` and ``r_w ~ U(r_w_min, 1)`` (bilinear; each side clamped to ``[1, H]`` /
       ``[1, W]``, so the patch always fits).
    3. *Shift*: the resized patch is placed at a uniformly random position fully inside an H×W canvas whose
       uncovered area is the constant 0.5 (float images, values in [0, 1]) or 127 (uint8), in every channel.

    The output has the input's size, dtype and type. Run it on a tensor image, i.e. after ``v2.ToImage()`` (and
    before ``v2.ToDtype``/``v2.Normalize``: the fill assumes un-normalised pixel values). Other tv_tensors in the
    sample (boxes, masks) are passed through unchanged.

    Args:
        p: probability of applying RSA at all, in ``[0, 1]`` (the paper does not give it; 0.5 by default).
        p_c: probability of the crop step, in ``[0, 1]`` (paper, Sec. IV-E: best 0.5).
        r_c_min: lower bound of the crop height ratio, in ``(0, 1]`` (paper: 0.7).
        r_h_min: lower bound of the height rescale rate, in ``(0, 1]``.
        r_w_min: lower bound of the width rescale rate, in ``(0, 1]``.
        antialias: antialiasing of the bilinear resize (``v2.functional.resize``).

    Input/output: ``tv_tensors.Image`` or a plain tensor ``[..., C, H, W]``, ``uint8`` or floating point.

    Raises:
        ValueError: (constructor) an argument outside its interval; the message names the argument.
        TypeError: (call) a PIL image (convert with ``v2.ToImage()`` first) or a dtype other than uint8/float.
    """

    stage = "geometric"

    class Config(BaseModel):
        """``data.augment.rsa``: the paper's Sec. IV-A defaults (``p`` itself is not given there; 0.5 here)."""

        model_config = ConfigDict(extra="forbid")
        p: float = Field(0.5, ge=0, le=1)
        p_c: float = Field(0.5, ge=0, le=1)
        r_c_min: float = Field(0.7, gt=0, le=1)
        r_h_min: float = Field(0.5, gt=0, le=1)
        r_w_min: float = Field(0.5, gt=0, le=1)

    def __init__(self, p: float = 0.5, p_c: float = 0.5, r_c_min: float = 0.7, r_h_min: float = 0.5,
                 r_w_min: float = 0.5, antialias: bool = True):
        super().__init__()
        self.p = _check_unit("p", p, open_low=False)
        self.p_c = _check_unit("p_c", p_c, open_low=False)
        self.r_c_min = _check_unit("r_c_min", r_c_min, open_low=True)
        self.r_h_min = _check_unit("r_h_min", r_h_min, open_low=True)
        self.r_w_min = _check_unit("r_w_min", r_w_min, open_low=True)
        self.antialias = bool(antialias)

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return float(torch.empty(1).uniform_(low, high).item()) if high > low else float(low)

    @staticmethod
    def _randint(high_inclusive: int) -> int:
        return int(torch.randint(0, high_inclusive + 1, (1,)).item())

    def get_params(self, height: int, width: int) -> dict[str, Any]:
        """Draw the geometry of one RSA application for an image of ``height`` × ``width`` pixels.

        Returns:
            ``dict(applied, crop_top, crop_height, top, left, height, width)`` in pixels: the source band is rows
            ``[crop_top, crop_top + crop_height)`` (all columns); it is resized to ``height`` × ``width`` and
            pasted at rows ``[top, top + height)``, columns ``[left, left + width)``. When not applied, the band is
            the whole image and the box the whole canvas (``top = left = 0``).

        Raises:
            ValueError: non-positive ``height`` or ``width``.
        """
        H, W = int(height), int(width)
        if H <= 0 or W <= 0:
            raise ValueError(f"RandomShift: image size must be positive, got height={height}, width={width}")
        identity = {"applied": False, "crop_top": 0, "crop_height": H, "top": 0, "left": 0, "height": H, "width": W}
        if not torch.rand(1).item() < self.p:
            return identity
        if torch.rand(1).item() < self.p_c:  # Crop (Sec. III-D, r_c ~ U(r_c_min, 1))
            r_c = self._uniform(self.r_c_min, 1.0)
        else:
            r_c = 1.0
        crop_h = min(max(round(r_c * H), 1), H)
        crop_top = self._randint(H - crop_h)
        r_h = self._uniform(self.r_h_min, 1.0 / r_c)  # Resize: r_h ~ U(r_h_min, 1/r_c), r_w ~ U(r_w_min, 1)
        r_w = self._uniform(self.r_w_min, 1.0)
        new_h = min(max(round(r_h * crop_h), 1), H)
        new_w = min(max(round(r_w * W), 1), W)
        top, left = self._randint(H - new_h), self._randint(W - new_w)  # Shift: fully inside the H×W box
        return {"applied": True, "crop_top": crop_top, "crop_height": crop_h, "top": top, "left": left,
                "height": new_h, "width": new_w}

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """v2 hook: one geometry per call (shared by all images of the sample); see :meth:`get_params`."""
        for inpt in flat_inputs:
            if isinstance(inpt, PIL.Image.Image):
                raise TypeError("RandomShift needs a tensor image [C, H, W]; got a PIL image — put v2.ToImage() "
                                "before it")
        H, W = None, None
        for inpt in flat_inputs:
            if isinstance(inpt, torch.Tensor) and inpt.ndim >= 2:
                H, W = int(inpt.shape[-2]), int(inpt.shape[-1])
                break
        if H is None or W is None:  # set together
            return {"applied": False}
        return self.get_params(H, W)

    @staticmethod
    def fill_value(dtype: torch.dtype) -> int | float:
        """The canvas fill of Sec. III-D: 127 for ``uint8``, 0.5 for floating-point images.

        Raises:
            TypeError: any other dtype.
        """
        if dtype == torch.uint8:
            return 127
        if dtype.is_floating_point:
            return 0.5
        raise TypeError(f"RandomShift supports uint8 or floating-point images, got dtype {dtype}")

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """v2 hook: apply the geometry ``params`` (from :meth:`get_params`) to one image ``[..., C, H, W]``."""
        if isinstance(inpt, PIL.Image.Image):
            raise TypeError("RandomShift needs a tensor image [C, H, W]; got a PIL image — put v2.ToImage() "
                            "before it")
        if not params.get("applied", False):
            return inpt
        if not isinstance(inpt, tv_tensors.Image) and isinstance(inpt, tv_tensors.TVTensor):
            return inpt  # boxes / masks / videos: passed through (documented)
        fill = self.fill_value(inpt.dtype)
        img = inpt.as_subclass(torch.Tensor)
        c0, ch = params["crop_top"], params["crop_height"]
        t, left, h, w = params["top"], params["left"], params["height"], params["width"]
        patch = TF.resize(img[..., c0:c0 + ch, :], [h, w], interpolation=v2.InterpolationMode.BILINEAR,
                          antialias=self.antialias)
        out = torch.full_like(img, fill)
        out[..., t:t + h, left:left + w] = patch
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out

    # torchvision < 0.21 calls the private names
    _get_params = make_params
    _transform = transform


def build_transforms(
    height: int,
    width: int,
    *,
    is_train: bool,
    flip: bool = True,
    color_jitter: bool = False,
    random_erasing: bool = False,
    pad: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    **augmentations: Mapping[str, Any] | None,
) -> v2.Compose:
    """Build the train or test transform pipeline.

    Args:
        height, width: output size in pixels.
        is_train: add the augmentations below (test: resize + normalise only).
        flip: random horizontal flip (p=0.5), train only.
        color_jitter: brightness/contrast/saturation 0.2, hue 0 (p=1), train only.
        random_erasing: random erasing (p=0.5, ImageNet-mean-free value 0 after normalisation), train only.
        pad: zero padding in pixels before a random crop back to H×W (0 disables), train only.
        mean, std: per-channel normalisation (RGB, in [0, 1] units).
        **augmentations: registered augmentations (``nasreid list augmentations``; the recipe's
            ``data.augment.<name>``), train only: ``name=None`` disables one, a mapping of its arguments adds it
            at its ``stage`` (:data:`STAGES`), in the order given. Built in: ``rsa`` (:class:`RandomShift`, RMGL,
            TIP 2020, Sec. III-D: on the uint8 image right after resize and flip, before pad/crop, colour jitter
            and normalisation) and ``random_block`` (:class:`~nasreid.data.random_block.RandomBlock`, QAConv,
            ECCV 2020, Sec. 5.1: after the geometric augmentations, before normalisation, so "white" is 255).

    Returns:
        ``v2.Compose`` mapping an RGB ``PIL.Image`` to a ``torch.float32`` tensor ``[3, height, width]``.

    Raises:
        ValueError: non-positive size, negative pad, mean/std not of length 3, or an augmentation's value out of
            range.
        TypeError: an augmentation's settings that are not a mapping, or with an unknown key.
        RegistryError: an unknown augmentation name (lists the known ones).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got height={height}, width={width}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={tuple(mean)}, std={tuple(std)}")
    staged: dict[str, list] = {s: [] for s in STAGES}
    for name, kwargs in augmentations.items():
        if kwargs is None:
            continue
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"{name} must be a mapping of the augmentation's arguments or None, got "
                            f"{type(kwargs).__name__}")
        cls = AUGMENTATIONS.get(name)
        stage = getattr(cls, "stage", "pixel")
        if stage not in STAGES:
            raise ValueError(f"augmentation {name!r} declares stage {stage!r}; expected one of {list(STAGES)}")
        staged[stage].append(cls(**kwargs))
    ops: list = [v2.ToImage(), v2.Resize((height, width), antialias=True)]
    if is_train:
        if flip:
            ops.append(v2.RandomHorizontalFlip(p=0.5))
        ops += staged["geometric"]
        if pad > 0:
            ops += [v2.Pad(pad), v2.RandomCrop((height, width))]
        if color_jitter:
            ops.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0))
        ops += staged["pixel"]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if is_train and random_erasing:
        ops.append(v2.RandomErasing(p=0.5, value=0))
    ops.append(v2.ToPureTensor())
    return v2.Compose(ops)
