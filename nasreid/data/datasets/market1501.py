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

Time stamps (``Market1501(timestamps=True)``, for time-aware post-processors such as TLift): Market-1501 has
no shared clock, only frame numbers that restart in every sequence (session) ``sS`` of a camera. Following
Liao & Shao (ECCV 2020, Sec. 5.2: "we simply made a cumulative frame record by assuming continuous video
sessions", FPS 25), :func:`market1501_times` lays each camera's sessions end to end: the offset of session
``s`` is the sum of the lengths of that camera's earlier sessions, a session's length being the largest frame
number seen for it over **all** records of the dataset (train + query + gallery, so the clock does not depend
on the split), and ``time = (offset + frame) / 25`` seconds. This is an assumption (sessions are contiguous,
and the cameras' clocks start together), which is why it is opt-in.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

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

__all__ = ["Market1501", "parse_market1501_name", "market1501_fields", "parse_bbox_layout", "market1501_times",
           "MARKET1501_FPS"]

#: frame rate of the Market-1501 videos used to turn frame numbers into seconds (Liao & Shao, ECCV 2020, Sec. 5.2)
MARKET1501_FPS = 25.0

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


def market1501_times(camids, seqs, frames, fps: float = MARKET1501_FPS) -> np.ndarray:
    """Capture times in seconds of Market-1501 images on a cumulative per-camera clock (see the module docstring).

    Per camera, sessions are laid end to end in the order ``s1, s2, ...``: the offset of session ``s`` is the
    sum of the lengths of the camera's earlier sessions, a session's length being the **largest frame number
    given for that (camera, session)** in these arrays (a session that never occurs has length 0). So pass the
    stamps of *every* image of the dataset at once (train + query + gallery) for a split-independent clock.

    Args:
        camids, seqs, frames: ``[N]`` integer camera / session / frame number of each image; a negative (or
            ``None``) ``seq`` or ``frame`` means unknown.
        fps: frames per second (25 for Market-1501).

    Returns:
        float64 ``[N]``: ``(offset(camera, seq) + frame) / fps``; ``nan`` where the seq or frame is unknown.

    Raises:
        ValueError: arrays of different lengths, or ``fps <= 0``.

    Example: a camera with sessions ``s1`` (largest frame 1000) and ``s2``: frame 40 of ``s2`` is at
    ``(1000 + 40) / 25 = 41.6`` s, later than every frame of ``s1``.
    """
    def ints(a):
        return np.array([-1 if v is None else int(v) for v in np.asarray(a, dtype=object).ravel()], dtype=np.int64)

    cam, seq, frame = ints(camids), ints(seqs), ints(frames)
    if not (len(cam) == len(seq) == len(frame)):
        raise ValueError(f"camids, seqs and frames must have the same length, got {len(cam)}, {len(seq)}, "
                         f"{len(frame)}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    known = (seq >= 0) & (frame >= 0)
    length: dict[tuple[int, int], int] = {}
    for c, q, f in zip(cam[known].tolist(), seq[known].tolist(), frame[known].tolist()):
        if f > length.get((c, q), -1):
            length[(c, q)] = f
    offset: dict[tuple[int, int], int] = {}
    for c in sorted({c for c, _ in length}):
        total = 0
        for q in sorted(q for cc, q in length if cc == c):
            offset[(c, q)] = total
            total += length[(c, q)]
    out = np.full(len(cam), np.nan, dtype=np.float64)
    idx = np.flatnonzero(known)
    out[idx] = [(offset[(c, q)] + f) / fps for c, q, f in zip(cam[idx].tolist(), seq[idx].tolist(),
                                                                  frame[idx].tolist())]
    return out


def _with_market_times(splits: list[list[ImageRecord]], extra: Sequence[tuple[int, int, int]] = ()
                       ) -> list[list[ImageRecord]]:
    """``splits`` with ``time`` from :func:`market1501_times` over all their records (plus ``extra``
    ``(camid, seq, frame)`` stamps that only lengthen sessions, e.g. of a train folder that is not loaded)."""
    recs = [r for split in splits for r in split]
    stamps = [(r.camid, r.seq, r.frame) for r in recs] + list(extra)
    if not stamps:
        return splits
    cam, seq, frame = zip(*stamps)
    times = market1501_times(cam, seq, frame)
    out, i = [], 0
    for split in splits:
        new = []
        for r in split:
            t = times[i]
            new.append(dataclasses.replace(r, time=None if np.isnan(t) else float(t)))
            i += 1
        out.append(new)
    return out


def _folder_stamps(folder: Path) -> list[tuple[int, int, int]]:
    """``(camid, seq, frame)`` of the Market-named images in ``folder`` (others ignored); ``[]`` if missing."""
    if not folder.is_dir():
        return []
    out = []
    for path in list_images(folder):
        try:
            _, camid, seq, frame, _ = parse_market1501_name(path.name)
        except ValueError:
            continue
        out.append((camid, seq, frame))
    return out


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
        timestamps: give every record a ``time`` in seconds on the cumulative per-camera clock of
            :func:`market1501_times` (25 fps, sessions assumed continuous; Liao & Shao, ECCV 2020, Sec. 5.2),
            e.g. for the ``tlift`` post-processor. Session lengths come from all records (train + query +
            gallery, from every Market-named file of ``bounding_box_train`` -- also with ``eval_only``, when
            that folder exists: it is only listed, not loaded). Default ``False``: ``time`` stays ``None``.

    Records carry ``seq`` and ``frame`` from the name (``PPPP_cCsS_FFFFFF_BB``).

    Raises:
        DatasetLayoutError: missing root/folder, non-matching name (strict), empty split.
    """

    default_subdir = "market1501"

    def __init__(self, root: str | os.PathLike | None = None, *, strict: bool = True, eval_only: bool = False,
                 timestamps: bool = False):
        root = resolve_root(root, self.default_subdir, "market1501")
        train, query, gallery = parse_bbox_layout(root, market1501_fields, "market1501", strict=strict,
                                                  eval_only=eval_only)
        if timestamps:
            # every Market name of the train folder counts (also its dropped junk / distractors, and with
            # eval_only, where train is not loaded), so the clock is the same whichever records are kept
            extra = _folder_stamps(root / "bounding_box_train")
            train, query, gallery = _with_market_times([train, query, gallery], extra)
        super().__init__("market1501", train, query, gallery, root=root,
                         allow_empty=("train",) if eval_only else ())
