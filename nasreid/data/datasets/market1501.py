"""Market-1501 (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015).

Layout::

    root/bounding_box_train/PPPP_cCsS_FFFFFF_BB.jpg   # 751 ids, 12,936 images
    root/bounding_box_test/PPPP_cCsS_FFFFFF_BB.jpg    # gallery: 750 ids + distractors (0000) + junk (-1)
    root/query/PPPP_cCsS_FFFFFF_BB.jpg                # 3,368 queries

``PPPP`` pid (``0000`` distractor, ``-1`` junk), ``C`` camera 1..6, ``S`` sequence, ``FFFFFF`` frame,
``BB`` box index; ``seq`` and ``frame`` are kept on each :class:`ImageRecord`. Protocol: junk and distractors
are dropped from train and kept in the gallery (evaluation ignores pid -1 and same-pid-same-camera matches);
train pids are relabelled 0..N-1; camid = C-1.
Non-image files (e.g. ``Thumbs.db``) are ignored; an image whose name does not match raises
:class:`DatasetLayoutError` naming it (``strict=False``: warn and skip it).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from .base import (
    ImageRecord,
    ReIDDataset,
    list_images,
    register_dataset,
    relabel,
    require_dir,
    resolve_root,
    warn_or_raise,
)

__all__ = ["Market1501", "parse_market1501_name", "market1501_fields", "parse_bbox_layout"]

_MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)s(\d+)_(\d+)_(\d+)\.(?:jpe?g|png|bmp)$", re.IGNORECASE)


def parse_market1501_name(filename: str | os.PathLike) -> tuple[int, int, int, int, int]:
    """Parse a Market-1501 image name ``PPPP_cCsS_FFFFFF_BB.jpg`` (directories are ignored).

    Returns:
        ``(pid, camid, seq, frame, box)`` with ``camid`` 0-based (``C - 1``); pid ``0`` is a distractor and
        ``-1`` junk.

    Raises:
        ValueError: the name does not follow the pattern or the camera index is 0; the message names the file.

    Example: ``0400_c2s1_046426_00.jpg`` → ``(400, 1, 1, 46426, 0)``.
    """
    base = os.path.basename(os.fspath(filename))
    m = _MARKET_RE.match(base)
    if m is None:
        raise ValueError(f"not a Market-1501 image name (expected PPPP_cCsS_FFFFFF_BB.jpg): {filename}")
    pid, cam, seq, frame, box = (int(g) for g in m.groups())
    if cam < 1:
        raise ValueError(f"camera index must be >= 1 in Market-1501 name: {filename}")
    if pid < -1:
        raise ValueError(f"pid must be >= -1 in Market-1501 name: {filename}")
    return pid, cam - 1, seq, frame, box


def market1501_fields(filename: str | os.PathLike) -> dict:
    """:func:`parse_market1501_name` as :class:`ImageRecord` fields ``{pid, camid, seq, frame}`` (box dropped).

    Raises:
        ValueError: as :func:`parse_market1501_name`.
    """
    pid, camid, seq, frame, _ = parse_market1501_name(filename)
    return dict(pid=pid, camid=camid, seq=seq, frame=frame)


def _parse_split(folder: Path, parse: Callable[[str], dict | tuple], name: str, strict: bool) -> list[ImageRecord]:
    records = []
    for path in list_images(folder):
        try:
            parsed = parse(str(path))
        except ValueError as exc:
            warn_or_raise(strict, f"{name}: {exc}")
            continue
        if isinstance(parsed, dict):
            records.append(ImageRecord(str(path), **parsed))
        else:
            records.append(ImageRecord(str(path), int(parsed[0]), int(parsed[1])))
    return records


def parse_bbox_layout(
    root: Path,
    parse: Callable[[str], dict | tuple],
    name: str,
    *,
    strict: bool = True,
    drop_train_pids: tuple[int, ...] = (-1, 0),
    eval_only: bool = False,
    train_dir: str = "bounding_box_train",
    query_dir: str = "query",
    gallery_dir: str = "bounding_box_test",
) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
    """Parse a Market-style ``bounding_box_train / query / bounding_box_test`` layout.

    ``parse(filename)`` returns :class:`ImageRecord` keyword fields (``{"pid", "camid", "seq", "frame"}``,
    e.g. :func:`market1501_fields`) or a tuple ``(pid, camid, ...)`` (extra items ignored). Train records with
    a pid in ``drop_train_pids`` (junk, distractor) are dropped and the rest relabelled; query/gallery keep
    original pids. ``eval_only``: the train folder is not read (it may be missing) and train is empty.

    Raises:
        DatasetLayoutError: a folder is missing, or (``strict``) a file name does not parse.
    """
    train = [] if eval_only else _parse_split(require_dir(root / train_dir, name), parse, name, strict)
    query = _parse_split(require_dir(root / query_dir, name), parse, name, strict)
    gallery = _parse_split(require_dir(root / gallery_dir, name), parse, name, strict)
    train = relabel([r for r in train if r.pid not in drop_train_pids])
    return train, query, gallery


@register_dataset("market1501")
class Market1501(ReIDDataset):
    """Market-1501 dataset (Zheng et al., ICCV 2015); see the module docstring for layout and protocol.

    Args:
        root: folder holding ``bounding_box_train``, ``bounding_box_test``, ``query``
            (``None`` → ``$NASREID_DATA/market1501``).
        strict: raise on a non-matching image name (default) instead of warning and skipping it.
        eval_only: evaluation-only target: ``bounding_box_train`` is not read (may be missing), train is empty.

    Records carry ``seq`` and ``frame`` from the name (``PPPP_cCsS_FFFFFF_BB``).

    Raises:
        DatasetLayoutError: missing root/folder, non-matching name (strict), empty split.
    """

    default_subdir = "market1501"

    def __init__(self, root: str | os.PathLike | None = None, *, strict: bool = True, eval_only: bool = False):
        root = resolve_root(root, self.default_subdir, "market1501")
        train, query, gallery = parse_bbox_layout(root, market1501_fields, "market1501", strict=strict,
                                                  eval_only=eval_only)
        super().__init__("market1501", train, query, gallery, root=root,
                         allow_empty=("train",) if eval_only else ())
