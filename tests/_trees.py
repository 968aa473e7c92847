"""Temporary dataset trees in official layouts, built in tmp folders from the real CUHK01 images
(never copied into the repository)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image


def cuhk_png(cuhk01_dir: Path, pid: int, idx: int) -> Path:
    return cuhk01_dir / f"{pid:04d}{idx:03d}.png"


def to_jpg(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").save(dst, quality=90)


def build_market_tree(root: Path, cuhk01_dir: Path, name_fn) -> None:
    """ids 1..6 train, 7..10 test (query: camera A image 001; gallery: camera B images), plus junk/distractors."""
    for pid in range(1, 7):
        for idx in range(1, 5):
            cam = 1 if idx <= 2 else 2
            to_jpg(cuhk_png(cuhk01_dir, pid, idx), root / "bounding_box_train" / name_fn(pid, cam, idx))
    for pid in range(7, 11):
        to_jpg(cuhk_png(cuhk01_dir, pid, 1), root / "query" / name_fn(pid, 1, 1))
        for idx in (3, 4):
            to_jpg(cuhk_png(cuhk01_dir, pid, idx), root / "bounding_box_test" / name_fn(pid, 2, idx))


def market_name(pid, cam, idx):
    return f"{pid:04d}_c{cam}s1_{idx:06d}_00.jpg"


def duke_name(pid, cam, idx):
    return f"{pid:04d}_c{cam}_f{idx:07d}.jpg"


def add_junk_and_distractors(root: Path, cuhk01_dir: Path) -> None:
    to_jpg(cuhk_png(cuhk01_dir, 20, 1), root / "bounding_box_train" / "-1_c1s1_000020_00.jpg")
    to_jpg(cuhk_png(cuhk01_dir, 21, 1), root / "bounding_box_train" / "0000_c2s1_000021_00.jpg")
    to_jpg(cuhk_png(cuhk01_dir, 20, 2), root / "bounding_box_test" / "-1_c1s1_000022_00.jpg")
    to_jpg(cuhk_png(cuhk01_dir, 21, 2), root / "bounding_box_test" / "0000_c2s1_000023_00.jpg")
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image, ignored")
