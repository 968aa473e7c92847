"""Random Block (RB) augmentation of QAConv: S. Liao and L. Shao, "Interpretable and Generalizable Person
Re-Identification with Query-Adaptive Convolution and Temporal Lifting", ECCV 2020, Sec. 5.1 and Table 1.

A simpler Random Erasing (Zhong et al., AAAI 2020): one *square* block, of side at most ``0.8 x width``, filled
with white pixels, always fully inside the image, so no rejection sampling is needed. Table 1 of the paper: RB
beats RE for QAConv (Market -> Duke rank-1 54.4 vs 51.6).
"""
from __future__ import annotations

import math
from typing import Any, cast

import PIL.Image
import torch
from pydantic import BaseModel, ConfigDict, Field
from torchvision import tv_tensors
from torchvision.transforms import v2

from nasreid.registry import AUGMENTATIONS

__all__ = ["RandomBlock"]

#: PIL modes whose white is 255 in every band (palette and other colour spaces are refused)
_PIL_8BIT = {"1", "L", "LA", "RGB", "RGBA", "RGBX"}


def _check(name: str, value: Any, *, open_low: bool) -> float:
    if isinstance(value, bool):
        raise ValueError(f"RandomBlock: {name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"RandomBlock: {name} must be a number, got {value!r}") from None
    ok = (0.0 < v <= 1.0) if open_low else (0.0 <= v <= 1.0)  # False for NaN
    if not ok:
        raise ValueError(f"RandomBlock: {name} must be in {'(0, 1]' if open_low else '[0, 1]'}, got {value!r}")
    return v


@AUGMENTATIONS.register("random_block")
class RandomBlock(v2.Transform):
    """Random Block (QAConv, ECCV 2020, Sec. 5.1): with probability ``p`` paint one white square inside the image.

    For an image of ``H x W`` pixels: side ``s ~ U{1, ..., floor(max_ratio * W)}`` (clamped to ``H`` for images
    wider than tall, so it fits), top-left corner ``(top, left)`` uniform over the positions that keep the square
    fully inside (``top ~ U{0..H-s}``, ``left ~ U{0..W-s}``); the ``s x s`` pixels are set to white in every
    channel. If ``floor(max_ratio * W) < 1`` (images narrower than ``1 / max_ratio`` pixels) nothing is painted.

    "White" is the maximum pixel value of the un-normalised image: 255 for ``uint8`` tensors and PIL images
    (every band; modes ``1, L, LA, RGB, RGBA, RGBX``), 1.0 for floating-point tensors in ``[0, 1]``. Apply RandomBlock
    **before** ``v2.Normalize``: after ImageNet normalisation white is ``(1 - mean) / std`` = (2.25, 2.43, 2.64) per RGB
    channel, not 1.0. (Sec. 5.1: RB and a random horizontal flip are the paper's only augmentations.)

    Args:
        p: probability of painting a block, in ``[0, 1]`` (paper: not given; 0.5 as Random Erasing).
        max_ratio: largest side as a fraction of the width, in ``(0, 1]`` (paper: 0.8).

    Input/output: a ``PIL.Image`` (modes ``1, L, LA, RGB, RGBA, RGBX``), a ``tv_tensors.Image`` or a plain tensor
    ``[..., C, H, W]`` (``uint8`` or floating point); the output has the input's type, size, mode/dtype. A batch
    ``[N, C, H, W]`` gets the same block on every image (one draw per call). Other tv_tensors (boxes, masks) pass
    unchanged.
    Randomness: torch's global RNG (reproducible under the DataLoader's per-worker seeding).

    Raises:
        ValueError: (constructor) ``p`` or ``max_ratio`` outside its interval.
        TypeError: (call) another PIL mode (palette, YCbCr ...), or a tensor dtype other than uint8 / floating point.
    """

    stage = "pixel"

    class Config(BaseModel):
        """``data.augment.random_block``: a white square of side up to ``max_ratio`` x image width with
        probability ``p`` (Sec. 5.1)."""

        model_config = ConfigDict(extra="forbid")
        p: float = Field(0.5, ge=0, le=1)
        max_ratio: float = Field(0.8, gt=0, le=1)

    def __init__(self, p: float = 0.5, max_ratio: float = 0.8):
        super().__init__()
        self.p = _check("p", p, open_low=False)
        self.max_ratio = _check("max_ratio", max_ratio, open_low=True)

    def get_params(self, height: int, width: int) -> dict[str, Any]:
        """Draw one block for an image of ``height x width`` pixels.

        Returns:
            ``dict(applied, top, left, size)``: the block covers rows ``[top, top + size)`` and columns
            ``[left, left + size)``; ``applied`` False (and ``size`` 0) when no block is painted.

        Raises:
            ValueError: non-positive ``height`` or ``width``.
        """
        H, W = int(height), int(width)
        if H <= 0 or W <= 0:
            raise ValueError(f"RandomBlock: image size must be positive, got height={height}, width={width}")
        none = {"applied": False, "top": 0, "left": 0, "size": 0}
        if not torch.rand(1).item() < self.p:
            return none
        max_side = min(math.floor(self.max_ratio * W + 1e-9), H)
        if max_side < 1:
            return none
        size = int(torch.randint(1, max_side + 1, (1,)).item())
        top = int(torch.randint(0, H - size + 1, (1,)).item())
        left = int(torch.randint(0, W - size + 1, (1,)).item())
        return {"applied": True, "top": top, "left": left, "size": size}

    @staticmethod
    def _size(inpt: Any) -> tuple[int, int] | None:
        if isinstance(inpt, PIL.Image.Image):
            return inpt.height, inpt.width
        if isinstance(inpt, torch.Tensor) and inpt.ndim >= 2 and (
                isinstance(inpt, tv_tensors.Image) or not isinstance(inpt, tv_tensors.TVTensor)):
            return int(inpt.shape[-2]), int(inpt.shape[-1])
        return None

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """v2 hook: one block per call, from the first image's size (see :meth:`get_params`)."""
        for inpt in flat_inputs:
            hw = self._size(inpt)
            if hw is not None:
                return self.get_params(*hw)
        return {"applied": False, "top": 0, "left": 0, "size": 0}

    @staticmethod
    def white(inpt: Any) -> int | float | tuple[int, ...]:
        """The fill value: 255 (uint8), 1.0 (float), or 255 per band (PIL modes listed in the class docstring).

        Raises:
            TypeError: other dtypes / PIL modes.
        """
        if isinstance(inpt, PIL.Image.Image):
            if inpt.mode not in _PIL_8BIT:
                raise TypeError(f"RandomBlock supports PIL modes {sorted(_PIL_8BIT)} (white = 255 per band), "
                                f"got mode {inpt.mode!r}; convert the image first")
            bands = len(inpt.getbands())
            return 255 if bands == 1 else (255,) * bands
        if inpt.dtype == torch.uint8:
            return 255
        if inpt.dtype.is_floating_point:
            return 1.0
        raise TypeError(f"RandomBlock supports uint8 or floating-point images, got dtype {inpt.dtype}")

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """v2 hook: paint the block ``params`` (from :meth:`get_params`) on one image."""
        if isinstance(inpt, tv_tensors.TVTensor) and not isinstance(inpt, tv_tensors.Image):
            return inpt  # boxes / masks / videos: passed through
        if not isinstance(inpt, (PIL.Image.Image, torch.Tensor)):
            return inpt
        fill = self.white(inpt)
        if not params.get("applied", False):
            return inpt
        t, left, s = params["top"], params["left"], params["size"]
        if isinstance(inpt, PIL.Image.Image):
            out = inpt.copy()
            out.paste(fill, (left, t, left + s, t + s))
            return out
        img = inpt.as_subclass(torch.Tensor).clone()
        img[..., t:t + s, left:left + s] = cast("int | float", fill)  # a tensor's white is a scalar (bands: PIL)
        return tv_tensors.wrap(img, like=inpt) if isinstance(inpt, tv_tensors.Image) else img

    # torchvision < 0.21 calls the private names
    _get_params = make_params
    _transform = transform

    def extra_repr(self) -> str:
        return f"p={self.p}, max_ratio={self.max_ratio}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
