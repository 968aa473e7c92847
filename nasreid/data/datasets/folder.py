"""Generic custom layout ("folder") for your own re-ID data.

Two equivalent ways to describe each split ``train``, ``query``, ``gallery`` (chosen per split):

1. **CSV** — if ``root/<split>.csv`` exists it is used. Header ``path,pid,camid`` (extra columns ignored);
   ``path`` is absolute or relative to ``root``; ``pid`` an integer (``-1`` = junk); ``camid`` a 0-based
   integer camera index::

       path,pid,camid
       images/p001_a.jpg,1,0

2. **Folder tree** — otherwise ``root/<split>/<pid>/<camid>_<anything>.<ext>``: the folder name is the
   integer pid, the file name starts with the 0-based integer camid followed by ``_``::

       root/train/0007/0_frame12.jpg     # pid 7, camid 0
       root/query/0012/3_a.png           # pid 12, camid 3

Train pids are relabelled 0..N-1; query/gallery keep the given pid. Every error names the file (and CSV line)
or folder at fault. Non-image files are ignored in the folder form.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .base import (
    IMAGE_EXTENSIONS,
    DatasetLayoutError,
    ImageRecord,
    ReIDDataset,
    register_dataset,
    relabel,
    resolve_root,
)

__all__ = ["FolderDataset"]

SPLITS = ("train", "query", "gallery")


def _read_csv(csv_path: Path, root: Path) -> list[ImageRecord]:
    records = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "pid", "camid"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetLayoutError(
                f"folder: {csv_path}: missing column(s) {sorted(missing)}; header must contain path,pid,camid"
            )
        for lineno, row in enumerate(reader, 2):
            try:
                pid, camid = int(row["pid"]), int(row["camid"])
            except (TypeError, ValueError):
                raise DatasetLayoutError(
                    f"folder: {csv_path}:{lineno}: pid/camid must be integers, got pid={row['pid']!r} "
                    f"camid={row['camid']!r}"
                ) from None
            if camid < 0:
                raise DatasetLayoutError(f"folder: {csv_path}:{lineno}: camid must be >= 0, got {camid}")
            if pid < -1:
                raise DatasetLayoutError(f"folder: {csv_path}:{lineno}: pid must be >= -1, got {pid}")
            path = Path(row["path"])
            if not path.is_absolute():
                path = root / path
            if not path.is_file():
                raise DatasetLayoutError(f"folder: {csv_path}:{lineno}: image not found: {path}")
            records.append(ImageRecord(str(path), pid, camid))
    return records


def _read_tree(split_dir: Path) -> list[ImageRecord]:
    records = []
    for pid_dir in sorted(split_dir.iterdir()):
        if not pid_dir.is_dir():
            if pid_dir.suffix.lower() in IMAGE_EXTENSIONS:
                raise DatasetLayoutError(
                    f"folder: image outside a <pid> folder: {pid_dir} (expected {split_dir}/<pid>/<camid>_x.jpg)"
                )
            continue
        try:
            pid = int(pid_dir.name)
        except ValueError:
            raise DatasetLayoutError(f"folder: pid folder name is not an integer: {pid_dir}") from None
        for path in sorted(pid_dir.iterdir()):
            if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            head = path.stem.split("_", 1)[0]
            if "_" not in path.stem or not head.isdigit():
                raise DatasetLayoutError(
                    f"folder: file name must start with '<camid>_' (0-based integer camera): {path}"
                )
            records.append(ImageRecord(str(path), pid, int(head)))
    return records


@register_dataset("folder")
class FolderDataset(ReIDDataset):
    """A custom dataset in the generic folder or CSV layout (see the module docstring).

    Args:
        root: dataset folder (``None`` → ``$NASREID_DATA/custom``).
        name: name shown in summaries (default ``"folder"``).
        eval_only: evaluation-only target: the train split is not read (may be missing) and is empty.

    Raises:
        DatasetLayoutError: a split has neither ``<split>.csv`` nor ``<split>/``; a bad CSV header/line, pid
            folder or file name (naming it); an empty split (naming the split and root).
    """

    default_subdir = "custom"

    def __init__(self, root: str | os.PathLike | None = None, *, name: str = "folder", eval_only: bool = False):
        root = resolve_root(root, self.default_subdir, name)
        splits: dict[str, list[ImageRecord]] = {"train": []}
        for split in SPLITS[1:] if eval_only else SPLITS:
            csv_path, split_dir = root / f"{split}.csv", root / split
            if csv_path.is_file():
                splits[split] = _read_csv(csv_path, root)
            elif split_dir.is_dir():
                splits[split] = _read_tree(split_dir)
            else:
                raise DatasetLayoutError(f"{name}: split '{split}' has neither {csv_path} nor folder {split_dir}")
        super().__init__(name, relabel(splits["train"]), splits["query"], splits["gallery"], root=root,
                         allow_empty=("train",) if eval_only else ())
