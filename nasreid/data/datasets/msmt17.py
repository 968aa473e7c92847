"""MSMT17 (Wei et al., "Person Transfer GAN to Bridge Domain Gap for Person Re-Identification", CVPR 2018).

Layout (MSMT17_V1 list files)::

    root/train/<pid>/<name>.jpg        root/test/<pid>/<name>.jpg
    root/list_train.txt  root/list_val.txt  root/list_query.txt  root/list_gallery.txt

Each list line is ``relative/path.jpg pid``; train/val paths are relative to ``root/train`` and
query/gallery paths to ``root/test`` (a path already starting with ``train/`` or ``test/`` is taken relative
to ``root``). Image names are ``PPPP_III_CC_DDDDtime_FFFF_B[_ex].jpg``: pid, index, camera (01..15), date and
time of day, frame, box; camid = CC-1 and ``ImageRecord.frame`` = FFFF are parsed from the name. 1,041 train
ids (32,621 images train+val), 3,060 test ids (11,659 query, 82,161 gallery images). ``merge_val=True``
(default, as in the common protocol) trains on train+val.

``combine_all=True`` trains on all 126,441 images of the 4,101 identities (train + val + query + gallery), as
the search of OSNet-AIN does (Zhou et al., "Learning Generalisable Omni-Scale Representations for Person
Re-Identification", TPAMI 2021). Train and test pids are separate id spaces in the list files (both start at
0), so train ids are relabelled ``0..T-1`` and test ids ``T..T+3059`` (sorted by original pid); query and gallery
stay the test split with their original pids.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from .base import DatasetLayoutError, ImageRecord, ReIDDataset, register_dataset, relabel, resolve_root

__all__ = ["MSMT17", "parse_msmt17_name", "msmt17_frame"]

_MSMT_RE = re.compile(
    r"^(\d+)_(\d+)_(\d+)_(\d+[a-z]+)_(\d+)_(\d+)(?:_ex)?\.(?:jpe?g|png|bmp)$", re.IGNORECASE
)


def _match(filename: str | os.PathLike) -> re.Match:
    base = os.path.basename(os.fspath(filename))
    m = _MSMT_RE.match(base)
    if m is None:
        raise ValueError(
            f"not an MSMT17 image name (expected PPPP_III_CC_DDDDtime_FFFF_B[_ex].jpg): {filename}"
        )
    if not 1 <= int(m.group(3)) <= 15:
        raise ValueError(f"MSMT17 camera must be in 1..15, got {int(m.group(3))}: {filename}")
    return m


def parse_msmt17_name(filename: str | os.PathLike) -> tuple[int, int]:
    """Parse an MSMT17 image name → ``(pid, camid 0-based)``.

    ``0318_001_01_0303noon_0111_4_ex.jpg`` → ``(318, 0)``: fields are pid, index, camera 1..15, date+time,
    frame, box, optional ``_ex`` (the frame is read by :func:`msmt17_frame`).

    Raises:
        ValueError: the name does not match or the camera is outside 1..15; the message names the file.
    """
    m = _match(filename)
    return int(m.group(1)), int(m.group(3)) - 1


def msmt17_frame(filename: str | os.PathLike) -> int:
    """Frame number ``FFFF`` of an MSMT17 name: ``0318_001_01_0303noon_0111_4_ex.jpg`` → ``111``.

    Raises:
        ValueError: as :func:`parse_msmt17_name`.
    """
    return int(_match(filename).group(5))


def _read_list(root: Path, list_name: str, img_dir: str, name: str) -> list[ImageRecord]:
    list_path = root / list_name
    if not list_path.is_file():
        raise DatasetLayoutError(f"{name}: list file not found: {list_path}")
    records = []
    with open(list_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DatasetLayoutError(
                    f"{name}: {list_path}:{lineno}: expected 'relative/path.jpg pid', got {line!r}"
                )
            rel, pid_s = parts
            try:
                pid = int(pid_s)
            except ValueError:
                raise DatasetLayoutError(f"{name}: {list_path}:{lineno}: pid is not an integer: {pid_s!r}") from None
            try:
                m = _match(rel)
            except ValueError as exc:
                raise DatasetLayoutError(f"{name}: {list_path}:{lineno}: {exc}") from None
            path = root / img_dir / rel
            if not path.is_file():
                alt = root / rel
                if rel.split("/", 1)[0] in ("train", "test") and alt.is_file():
                    path = alt
                else:
                    raise DatasetLayoutError(f"{name}: {list_path}:{lineno}: image not found: {path}")
            records.append(ImageRecord(str(path), pid, int(m.group(3)) - 1, frame=int(m.group(5))))
    return records


@register_dataset("msmt17")
class MSMT17(ReIDDataset):
    """MSMT17 (V1 list files); see the module docstring for layout and protocol.

    Args:
        root: folder with ``train/``, ``test/`` and the four ``list_*.txt`` (``None`` → ``$NASREID_DATA/msmt17``).
        merge_val: train on ``list_train`` + ``list_val`` (default True); else ``list_train`` only.
        combine_all: train on train + val + query + gallery (all 4,101 ids; see the module docstring); query
            and gallery are still the test split. Includes ``list_val`` whatever ``merge_val`` says.
        eval_only: evaluation-only target: ``list_train.txt`` / ``list_val.txt`` are not read (may be missing),
            train is empty. Cannot be combined with ``combine_all``.

    Raises:
        DatasetLayoutError: missing folder/list file, malformed list line, image listed but absent, a name that
            is not MSMT17 (all naming the file and line), empty split, ``combine_all`` with ``eval_only``.
    """

    default_subdir = "msmt17"

    def __init__(self, root: str | os.PathLike | None = None, *, merge_val: bool = True, combine_all: bool = False,
                 eval_only: bool = False):
        if combine_all and eval_only:
            raise DatasetLayoutError("msmt17: combine_all=True trains on the test split; it cannot be eval_only")
        root = resolve_root(root, self.default_subdir, "msmt17")
        lists = [] if eval_only else ["list_train.txt"] + (["list_val.txt"] if merge_val or combine_all else [])
        train = [r for name in lists for r in _read_list(root, name, "train", "msmt17")]
        query = _read_list(root, "list_query.txt", "test", "msmt17")
        gallery = _read_list(root, "list_gallery.txt", "test", "msmt17")
        train = relabel(train)
        if combine_all:  # test ids after train's: the two id spaces overlap numerically
            offset = len({r.pid for r in train})
            train += [dataclasses.replace(r, pid=r.pid + offset) for r in relabel(query + gallery)]
        self.merge_val, self.combine_all = merge_val, combine_all
        super().__init__("msmt17", train, query, gallery, root=root, allow_empty=("train",) if eval_only else ())
