"""Image transforms for re-ID training and testing (torchvision ``transforms.v2``).

Standard re-ID recipe: resize to H×W, random horizontal flip, optional pad + random crop, optional colour
jitter, ImageNet normalisation, optional random erasing (Zhong et al., "Random Erasing Data Augmentation",
AAAI 2020). Input is a ``PIL.Image`` (RGB); output a ``float32`` tensor ``[3, H, W]``, normalised.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

__all__ = ["build_transforms", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    Returns:
        ``v2.Compose`` mapping an RGB ``PIL.Image`` to a ``torch.float32`` tensor ``[3, height, width]``.

    Raises:
        ValueError: non-positive size, negative pad, or mean/std not of length 3.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got height={height}, width={width}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={tuple(mean)}, std={tuple(std)}")
    ops: list = [v2.ToImage(), v2.Resize((height, width), antialias=True)]
    if is_train:
        if flip:
            ops.append(v2.RandomHorizontalFlip(p=0.5))
        if pad > 0:
            ops += [v2.Pad(pad), v2.RandomCrop((height, width))]
        if color_jitter:
            ops.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if is_train and random_erasing:
        ops.append(v2.RandomErasing(p=0.5, value=0))
    ops.append(v2.ToPureTensor())
    return v2.Compose(ops)
