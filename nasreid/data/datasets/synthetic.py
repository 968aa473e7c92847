"""Procedural synthetic re-ID data, rendered on the fly from a seed (no files).

Every identity is a cartoon pedestrian with its own clothing (upper/lower colours, upper-body pattern: plain,
stripes, checks or logo; shoes), body proportions (torso/leg ratio, width, head size), hair and skin tone.
Every camera has its own illumination gain, colour cast, blur, scale, crop offset, background and noise level.
Each image adds a small jitter (pose offset, leg stance, arm swing, sensor noise). The same identity therefore
looks alike across cameras (same clothes and body), differing only through the camera effects and jitter: a
learnable re-ID task for smoke tests, CPU recipes and benchmarks.

``camera_style`` (default 0: off) adds a strong per-camera *style*: exposure, contrast, colour cast and haze,
an affine map of each image's colour channels that is the same for every image of a camera. Up to clipping it
changes only the per-image channel statistics (mean and spread), which is what instance normalisation removes:
with ``camera_style=1`` raw colours no longer match an identity across cameras, per-image standardised colours
still do, and where a network puts IN decides whether it matches people or cameras. The cameras' styles are
spread along each axis by low-discrepancy sequences, so the cameras of a seed have clearly different styles.

Rendering is pure numpy into a ``PIL.Image`` (about 0.5 ms for 128×64; ``benchmarks/bench_synthetic.py``)
and deterministic per ``(seed, pid, cam, index, camera_style)``. Records use the key
``synthetic://<seed>/<pid>/<cam>/<idx>`` as path, where pid is the original identity (0..num_ids-1);
:meth:`SyntheticReID.read_image` renders it (with the dataset's ``camera_style``).

Split: ids ``0..num_train_ids-1`` are train (all images), the rest test. With ``images_per_id_per_cam >= 2``
the query holds image 0 of every camera of each test id and the gallery the rest; with 1 image per camera the
query holds one image per test id (camera ``pid % num_cams``) and the gallery the other cameras.
"""
from __future__ import annotations

import colorsys
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from .base import DatasetLayoutError, ImageRecord, ReIDDataset, register_dataset, relabel

__all__ = ["SyntheticReID", "render_person", "identity_attributes", "camera_attributes", "PATTERNS"]

PATTERNS = ("plain", "stripes", "checks", "logo")
_ID_STREAM, _CAM_STREAM, _IMG_STREAM, _STYLE_STREAM = 1, 2, 3, 4
#: Camera style at ``camera_style=1``: ranges of log exposure and log contrast (darker/flatter more than brighter,
#: to limit clipping), largest per-channel |log cast|, largest haze mix.
_STYLE_RANGE: dict[str, Any] = {"exposure": (-0.65, 0.25), "contrast": (-0.5, 0.4), "cast": 0.35, "haze": 0.35}
_STYLE_STEPS = (0.6180339887, 0.7548776662, 0.5698402910, 0.4142135624)  # 1/phi, 1/rho, 1/rho^2, sqrt(2)-1


def _hsv(rng: np.random.Generator, s_lo=0.25, s_hi=1.0, v_lo=0.2, v_hi=0.95) -> np.ndarray:
    h, s, v = rng.uniform(), rng.uniform(s_lo, s_hi), rng.uniform(v_lo, v_hi)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


@lru_cache(maxsize=4096)
def identity_attributes(seed: int, pid: int) -> dict:
    """Appearance of identity ``pid`` (deterministic in ``(seed, pid)``): colours in 0..255 RGB, proportions
    as fractions of the person height/image width."""
    rng = np.random.default_rng([seed, _ID_STREAM, pid])
    upper = _hsv(rng)
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    # pattern colour: contrasting value
    pv = 0.9 if colorsys.rgb_to_hsv(*(upper / 255.0))[2] < 0.55 else 0.15
    pcol = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.8), pv), dtype=np.float32) * 255.0
    skin = np.array([224, 172, 140], np.float32) * rng.uniform(0.45, 1.05)
    return dict(
        upper=upper,
        lower=_hsv(rng, 0.1, 0.9, 0.1, 0.85),
        pattern=pattern,
        pattern_color=pcol,
        period=float(rng.uniform(0.025, 0.05)),  # stripe/check period, fraction of person height
        shoes=_hsv(rng, 0.0, 0.5, 0.05, 0.6),
        hair=_hsv(rng, 0.1, 0.7, 0.03, 0.5),
        skin=np.clip(skin, 0, 255),
        torso_leg_ratio=float(rng.uniform(0.65, 1.1)),
        body_width=float(rng.uniform(0.36, 0.58)),  # torso width / image width
        head=float(rng.uniform(0.06, 0.08)),  # head radius / person height
        hair_len=float(rng.uniform(0.1, 0.9)),
        bag=bool(rng.uniform() < 0.3),
        bag_color=_hsv(rng, 0.0, 0.6, 0.05, 0.7),
    )


@lru_cache(maxsize=256)
def camera_attributes(seed: int, cam: int) -> dict:
    """Imaging conditions of camera ``cam`` (deterministic in ``(seed, cam)``).

    ``gain`` .. ``noise`` are the mild camera effects every image gets. The ``style_*`` entries are the
    camera's style at ``camera_style=1`` (see :func:`render_person`); they come from their own random stream,
    so adding them left the other entries (and every ``camera_style=0`` image) unchanged.
    """
    rng = np.random.default_rng([seed, _CAM_STREAM, cam])
    attrs = dict(
        gain=float(rng.uniform(0.7, 1.25)),
        cast=rng.uniform(0.85, 1.15, size=3).astype(np.float32),
        blur=int(rng.integers(0, 3)),  # passes of a [1,2,1]/4 filter
        scale=float(rng.uniform(0.8, 0.97)),  # person height / image height
        offset=(float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.03, 0.03))),  # (x/W, y/H)
        background=_hsv(rng, 0.0, 0.4, 0.3, 0.8),
        floor=_hsv(rng, 0.0, 0.3, 0.2, 0.6),
        noise=float(rng.uniform(2.0, 7.0)),
    )
    attrs.update(_camera_style(seed, cam))
    return attrs


def _camera_style(seed: int, cam: int) -> dict:
    """Style of camera ``cam`` at full strength: log exposure, log contrast, cast hue angle, haze.

    The cameras' positions along each style axis follow additive recurrences ``frac(o + cam * c)`` (a seed-level
    random offset ``o``, irrational ``c``; low-discrepancy, Kronecker sequences), so any two cameras of a seed
    are well apart on at least one axis whatever the number of cameras; a small per-camera draw breaks the
    regularity.
    """
    base = np.random.default_rng([seed, _STYLE_STREAM]).uniform(size=4)
    rng = np.random.default_rng([seed, _STYLE_STREAM, cam])
    t = (base + cam * np.array(_STYLE_STEPS)) % 1.0
    j = rng.uniform(-0.05, 0.05, size=4)
    hue = 2 * np.pi * (t[0] + j[0])  # direction of the colour cast on the colour wheel
    return dict(
        style_exposure=float(_lerp(_STYLE_RANGE["exposure"], t[1] + j[1])),  # log gain
        style_contrast=float(_lerp(_STYLE_RANGE["contrast"], t[2] + j[2])),  # log contrast
        # log per-channel gains, zero mean (a pure colour change): cos(hue - 0/120/240 deg)
        style_cast=(_STYLE_RANGE["cast"] * np.cos(hue - np.arange(3) * 2 * np.pi / 3)).astype(np.float32),
        style_haze=float(np.clip(t[3] + j[3], 0, 1) * _STYLE_RANGE["haze"]),  # mix towards the haze colour
        style_haze_color=np.array(colorsys.hsv_to_rgb((t[0] + 0.5) % 1.0, 0.25, 0.8), np.float32) * 255.0,
    )


def _lerp(lo_hi: tuple[float, float], t: float) -> float:
    return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * t


def _apply_style(img: np.ndarray, ca: dict, strength: float) -> np.ndarray:
    """Per-camera affine colour transform of ``img`` (H, W, 3 float): contrast about the image mean, exposure,
    colour cast, haze; each camera's style scaled by ``strength``. Per image and channel it is ``a * x + b``:
    the statistics that instance normalisation removes."""
    s = strength
    mean = img.mean((0, 1), keepdims=True)
    img = mean + (img - mean) * np.float32(np.exp(s * ca["style_contrast"]))
    img *= np.exp(s * (ca["style_exposure"] + ca["style_cast"])).astype(np.float32)
    h = np.float32(min(s * ca["style_haze"], 0.9))
    return img * (1 - h) + h * ca["style_haze_color"]


def _blur(img: np.ndarray, passes: int) -> np.ndarray:
    """``passes`` rounds of a separable [1, 2, 1] / 4 filter (edges replicated)."""
    for _ in range(passes):
        out = img * 0.5
        out[1:] += 0.25 * img[:-1]
        out[:-1] += 0.25 * img[1:]
        out[0] += 0.25 * img[0]
        out[-1] += 0.25 * img[-1]
        img = out
        out = img * 0.5
        out[:, 1:] += 0.25 * img[:, :-1]
        out[:, :-1] += 0.25 * img[:, 1:]
        out[:, 0] += 0.25 * img[:, 0]
        out[:, -1] += 0.25 * img[:, -1]
        img = out
    return img


def render_person(seed: int, pid: int, cam: int, index: int, height: int = 128, width: int = 64,
                  camera_style: float = 0.0) -> Image.Image:
    """Render one synthetic pedestrian image.

    Args:
        seed: dataset seed; pid: identity; cam: camera; index: image index within (pid, cam).
        height, width: output size in pixels.
        camera_style: strength of the per-camera style shift (>= 0): 0 gives the mild camera effects only
            (gain x0.7-1.25, cast +-15%); 1 adds each camera's exposure (x0.5-1.3), contrast about the image
            mean (x0.6-1.55), colour cast (x0.7-1.42 per channel, zero mean in log) and haze (mix 0-0.35
            towards a pale colour); other values scale the log exposure, contrast and cast and the haze mix.

    Returns:
        RGB ``PIL.Image`` of size ``width × height``; identical for identical arguments.
    """
    ida = identity_attributes(seed, pid)
    ca = camera_attributes(seed, cam)
    rng = np.random.default_rng([seed, _IMG_STREAM, pid, cam, index])
    H, W = height, width
    yy = np.arange(H, dtype=np.float32)[:, None]
    xx = np.arange(W, dtype=np.float32)[None, :]

    # Paint a label map (cheap boolean ops on H×W), then look colours up in a palette.
    BG, FLOOR, LOWER, SHOES, SLEEVE, SKIN, UPPER, PATTERN, BAG, HAIR = range(10)
    palette = np.stack([
        ca["background"], ca["floor"], ida["lower"], ida["shoes"], ida["upper"] * 0.85, ida["skin"],
        ida["upper"], ida["pattern_color"], ida["bag_color"], ida["hair"],
    ]).astype(np.float32)
    label = np.zeros((H, W), np.uint8)
    label[max(int(H * (0.62 + ca["offset"][1])), 0):] = FLOOR

    # geometry (pixels)
    hp = H * ca["scale"] * rng.uniform(0.97, 1.03)
    y0 = (H - hp) / 2 + ca["offset"][1] * H + rng.uniform(-2, 2)
    cx = W / 2 + ca["offset"][0] * W + rng.uniform(-2.5, 2.5)
    wscale = hp / H
    r = ida["head"] * hp
    neck = 0.02 * hp
    shoe_h = 0.035 * hp
    body_len = hp - 2 * r - neck - shoe_h
    torso_len = body_len * ida["torso_leg_ratio"] / (1 + ida["torso_leg_ratio"])
    ys = y0 + 2 * r + neck
    yh = ys + torso_len
    yf = y0 + hp - shoe_h
    bw = ida["body_width"] * W * wscale / 2  # torso half width
    dx = np.abs(xx - cx)

    # legs (lower garment) with per-image stance, hips, shoes
    gap = bw * rng.uniform(0.3, 0.6)
    lw = bw * 0.45
    leg_cols = (np.abs(xx - (cx - gap)) < lw) | (np.abs(xx - (cx + gap)) < lw)
    label[((yy >= yh) & (yy < yf)) & leg_cols] = LOWER
    label[((yy >= yh - 1) & (yy < yh + 0.12 * (yf - yh))) & (dx < bw * 0.95)] = LOWER
    shoe_cols = (np.abs(xx - (cx - gap)) < lw * 1.15) | (np.abs(xx - (cx + gap)) < lw * 1.15)
    label[((yy >= yf) & (yy < y0 + hp)) & shoe_cols] = SHOES

    # arms (sleeves) with a per-image swing, hands in skin tone
    aw = bw * 0.28
    swing = rng.uniform(-0.15, 0.15) * bw
    arm_end = ys + torso_len * 0.95
    arm_rows = (yy >= ys + 1) & (yy < arm_end)
    hand_rows = (yy >= arm_end) & (yy < arm_end + 0.05 * hp)
    for side in (-1, 1):
        ax = cx + side * (bw + aw * 0.9) + swing * side * 0.3
        adx = np.abs(xx - ax)
        label[arm_rows & (adx < aw)] = SLEEVE
        label[hand_rows & (adx < aw * 0.9)] = SKIN

    # torso with pattern
    taper = 1.0 - 0.1 * (yy - ys) / max(torso_len, 1.0)
    torso = (yy >= ys) & (yy < yh) & (dx < bw * taper)
    p = max(ida["period"] * hp, 2.0)
    pat = ida["pattern"]
    if pat == "stripes":
        pmask = torso & (((yy - ys) // p) % 2 == 1)
    elif pat == "checks":
        pmask = torso & ((((yy - ys) // p) + ((xx - cx + 10 * p) // p)) % 2 == 1)
    elif pat == "logo":
        ly = ys + torso_len * 0.3
        pmask = torso & (np.abs(yy - ly) < torso_len * 0.15) & (dx < bw * 0.45)
    else:
        pmask = None
    label[torso] = UPPER
    if pmask is not None:
        label[pmask] = PATTERN

    # bag on one side
    if ida["bag"]:
        label[((yy >= yh - torso_len * 0.35) & (yy < yh + torso_len * 0.1))
              & (np.abs(xx - (cx + bw)) < bw * 0.35)] = BAG

    # neck, head, hair
    hy = y0 + r
    label[((yy >= hy + r * 0.8) & (yy < ys + 1)) & (dx < r * 0.45)] = SKIN
    hx = cx + rng.uniform(-0.8, 0.8)
    d2 = (yy - hy) ** 2 + ((xx - hx) * 1.1) ** 2
    head = d2 < r * r
    label[head] = SKIN
    hair = (head & (yy < hy - r * (0.6 - 0.6 * ida["hair_len"]))) | ((d2 < (r * 1.12) ** 2) & (yy < hy - r * 0.3))
    label[hair] = HAIR

    img = palette[label]  # (H, W, 3)
    # scene lighting: vertical gradient; cylindrical shading on garments
    cloth = (label == LOWER) | (label == UPPER) | (label == PATTERN)
    shade = 1.0 - 0.25 * np.clip(dx / (bw + 1e-6), 0, 1)
    light = (0.85 + 0.3 * yy / H) * np.where(cloth, shade, 1.0)
    img *= light[..., None]

    # camera: illumination gain, colour cast, blur, sensor noise
    img *= ca["gain"] * ca["cast"] * rng.uniform(0.95, 1.05)
    if camera_style:
        img = _apply_style(img, ca, float(camera_style))
    img = _blur(img, ca["blur"])
    img += rng.standard_normal((H, W, 3), dtype=np.float32) * ca["noise"]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def parse_synthetic_key(path: str) -> tuple[int, int, int, int]:
    """``"synthetic://seed/pid/cam/idx"`` → ``(seed, pid, cam, idx)``.

    Raises:
        ValueError: malformed key (message names it).
    """
    prefix = "synthetic://"
    if not path.startswith(prefix):
        raise ValueError(f"not a synthetic image key: {path!r}")
    try:
        seed, pid, cam, idx = (int(x) for x in path[len(prefix):].split("/"))
    except ValueError:
        raise ValueError(f"malformed synthetic image key (expected synthetic://seed/pid/cam/idx): {path!r}") from None
    return seed, pid, cam, idx


@register_dataset("synthetic")
class SyntheticReID(ReIDDataset):
    """Procedurally generated re-ID dataset (no files); see the module docstring.

    Args:
        root: ignored (accepted for :func:`build_dataset` symmetry).
        num_ids: total identities (train + test), >= 2.
        images_per_id_per_cam: images of each identity in each camera, >= 1.
        num_cams: cameras, >= 2.
        height, width: image size in pixels (default 128×64).
        seed: appearance seed; same seed → identical images.
        num_train_ids: identities used for training (default ``num_ids // 2``); the rest form query/gallery.
        camera_style: strength of the per-camera style shift (exposure, contrast, colour cast, haze), >= 0;
            0 (default) gives the mild camera effects only; see :func:`render_person`.

    Raises:
        DatasetLayoutError: an argument out of range (message names it and its value).
    """

    def __init__(
        self,
        root=None,
        *,
        num_ids: int = 100,
        images_per_id_per_cam: int = 2,
        num_cams: int = 4,
        height: int = 128,
        width: int = 64,
        seed: int = 0,
        num_train_ids: int | None = None,
        camera_style: float = 0.0,
    ):
        if num_ids < 2:
            raise DatasetLayoutError(f"synthetic: num_ids must be >= 2, got {num_ids}")
        if num_cams < 2:
            raise DatasetLayoutError(f"synthetic: num_cams must be >= 2, got {num_cams}")
        if images_per_id_per_cam < 1:
            raise DatasetLayoutError(f"synthetic: images_per_id_per_cam must be >= 1, got {images_per_id_per_cam}")
        if height < 16 or width < 8:
            raise DatasetLayoutError(f"synthetic: image size must be at least 16x8, got {height}x{width}")
        if not camera_style >= 0:
            raise DatasetLayoutError(f"synthetic: camera_style must be >= 0, got {camera_style}")
        if num_train_ids is None:
            num_train_ids = num_ids // 2
        if not 1 <= num_train_ids < num_ids:
            raise DatasetLayoutError(f"synthetic: num_train_ids must be in 1..{num_ids - 1}, got {num_train_ids}")
        self.seed, self.height, self.width = int(seed), int(height), int(width)
        self.num_cams, self.images_per_id_per_cam = num_cams, images_per_id_per_cam
        self.camera_style = float(camera_style)

        def rec(pid, cam, idx):
            return ImageRecord(f"synthetic://{self.seed}/{pid}/{cam}/{idx}", pid, cam)

        train = [
            rec(p, c, i) for p in range(num_train_ids) for c in range(num_cams) for i in range(images_per_id_per_cam)
        ]
        query: list[ImageRecord] = []
        gallery: list[ImageRecord] = []
        for p in range(num_train_ids, num_ids):
            for c in range(num_cams):
                for i in range(images_per_id_per_cam):
                    if images_per_id_per_cam >= 2:
                        is_q = i == 0
                    else:
                        is_q = c == p % num_cams
                    (query if is_q else gallery).append(rec(p, c, i))
        super().__init__("synthetic", relabel(train), query, gallery, root=None)

    def read_image(self, record: ImageRecord) -> Image.Image:
        """Render ``record`` (its ``path`` key holds seed, original pid, camera, index) at this dataset's size.

        Raises:
            ValueError: the path is not a ``synthetic://`` key.
        """
        seed, pid, cam, idx = parse_synthetic_key(record.path)
        return render_person(seed, pid, cam, idx, self.height, self.width, self.camera_style)
