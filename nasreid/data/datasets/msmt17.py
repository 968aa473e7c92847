"""MSMT17 (Wei et al., "Person Transfer GAN to Bridge Domain Gap for Person Re-Identification", CVPR 2018).

Layout (MSMT17_V1 list files)::

    root/train/<pid>/<name>.jpg        root/test/<pid>/<name>.jpg
    root/list_train.txt  root/list_val.txt  root/list_query.txt  root/list_gallery.txt

Each list line is ``relative/path.jpg pid``; train/val paths are relative to ``root/train`` and
query/gallery paths to ``root/test`` (a path already starting with ``train/`` or ``test/`` is taken relative
to ``root``). Image names are ``PPPP_III_CC_DDDDtime_FFFF_B[_ex].jpg``: pid, index, camera (01..15), date and
time of day, frame, box; camid = CC-1 is parsed from the name. 1,041 train ids (32,621 images train+val),
3,060 test ids. ``merge_val=True`` (default, as in the common protocol) trains on train+val.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .base import DatasetLayoutError, ImageRecord, ReIDDataset, register_dataset, relabel, resolve_root

__all__ = ["MSMT17", "parse_msmt17_name"]

_MSMT_RE = re.compile(
    r"^(\d+)_(\d+)_(\d+)_(\d+[a-z]+)_(\d+)_(\d+)(?:_ex)?\.(?:jpe?g|png|bmp)$", re.IGNORECASE
)


def parse_msmt17_name(filename: str | os.PathLike) -> tuple[int, int]:
    """Parse an MSMT17 image name → ``(pid, camid 0-based)``.

    ``0318_001_01_0303noon_0111_4_ex.jpg`` → ``(318, 0)``: fields are pid, index, camera 1..15, date+time,
    frame, box, optional ``_ex``.

    Raises:
        ValueError: the name does not match or the camera is outside 1..15; the message names the file.
    """
    base = os.path.basename(os.fspath(filename))
    m = _MSMT_RE.match(base)
    if m is None:
        raise ValueError(
            f"not an MSMT17 image name (expected PPPP_III_CC_DDDDtime_FFFF_B[_ex].jpg): {filename}"
        )
    pid, cam = int(m.group(1)), int(m.group(3))
    if not 1 <= cam <= 15:
        raise ValueError(f"MSMT17 camera must be in 1..15, got {cam}: {filename}")
    return pid, cam - 1


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
                _, camid = parse_msmt17_name(rel)
            except ValueError as exc:
                raise DatasetLayoutError(f"{name}: {list_path}:{lineno}: {exc}") from None
            path = root / img_dir / rel
            if not path.is_file():
                alt = root / rel
                if rel.split("/", 1)[0] in ("train", "test") and alt.is_file():
                    path = alt
                else:
                    raise DatasetLayoutError(f"{name}: {list_path}:{lineno}: image not found: {path}")
            records.append(ImageRecord(str(path), pid, camid))
    return records


@register_dataset("msmt17")
class MSMT17(ReIDDataset):
    """MSMT17 (V1 list files); see the module docstring for layout and protocol.

    Args:
        root: folder with ``train/``, ``test/`` and the four ``list_*.txt`` (``None`` → ``$NASREID_DATA/msmt17``).
        merge_val: train on ``list_train`` + ``list_val`` (default True); else ``list_train`` only.

    Raises:
        DatasetLayoutError: missing folder/list file, malformed list line, image listed but absent, a name that
            is not MSMT17 (all naming the file and line), empty split.
    """

    default_subdir = "msmt17"

    def __init__(self, root: str | os.PathLike | None = None, *, merge_val: bool = True):
        root = resolve_root(root, self.default_subdir, "msmt17")
        train = _read_list(root, "list_train.txt", "train", "msmt17")
        if merge_val:
            train += _read_list(root, "list_val.txt", "train", "msmt17")
        query = _read_list(root, "list_query.txt", "test", "msmt17")
        gallery = _read_list(root, "list_gallery.txt", "test", "msmt17")
        self.merge_val = merge_val
        super().__init__("msmt17", relabel(train), query, gallery, root=root)
