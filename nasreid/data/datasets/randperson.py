"""RandPerson (Wang et al., "Surpassing Real-World Source Training Data: Random 3D Characters for Generalizable
Person Re-Identification", ACM MM 2020): the labelled synthetic source A of DomainMix (Sec. 4.1: its subset, 8,000
identities in 132,145 images from 19 cameras in 11 scenes, training only).

Layout: ``<root>/randperson_subset/randperson_subset/*.jpg`` as released (``<root>/randperson_subset/*.jpg`` and
``<root>/*.jpg`` are accepted too). File names ``<pid>_s<scene>_c<camera>_f<frame>.jpg``, e.g.
``00000123_s04_c01_f002345.jpg``: ``pid`` the character, ``scene`` 0..10, ``camera`` the camera index within the
scene (0-based), ``frame`` the frame in that scene's video. The 19 cameras are numbered scene by scene: scene ``s``
has cameras ``SCENE_CAMERA_OFFSET[s] + c`` (scenes 0-3 two cameras each, 4 and 5 one, 6 two, 7-9 one, 10 four),
the camera table of the released data. Train only: ``query`` and ``gallery`` are empty (DomainMix trains on it and
evaluates elsewhere).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .base import (
    DatasetLayoutError,
    ImageRecord,
    ReIDDataset,
    list_images,
    register_dataset,
    relabel,
    resolve_root,
    warn_or_raise,
)

__all__ = ["RandPerson", "parse_randperson_name", "SCENE_CAMERA_OFFSET"]

#: first global camera index of each of the 11 scenes (19 cameras in all)
SCENE_CAMERA_OFFSET = (0, 2, 4, 6, 8, 9, 10, 12, 13, 14, 15)
_CAMS_PER_SCENE = (2, 2, 2, 2, 1, 1, 2, 1, 1, 1, 4)
_NAME = re.compile(r"^(\d+)_s(\d+)_c(\d+)_f(\d+)\.[A-Za-z]+$")


def parse_randperson_name(name: str) -> tuple[int, int, int]:
    """``(pid, camid, frame)`` of a RandPerson file name (camid 0..18, see the module docstring).

    Raises:
        ValueError: the name does not follow ``<pid>_s<scene>_c<camera>_f<frame>.<ext>`` or names a scene or
            camera that RandPerson does not have (the message names the file).
    """
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"not a RandPerson image name (<pid>_s<scene>_c<camera>_f<frame>.jpg): {name!r}")
    pid, scene, cam, frame = (int(x) for x in m.groups())
    if scene >= len(SCENE_CAMERA_OFFSET) or cam >= _CAMS_PER_SCENE[scene]:
        raise ValueError(f"{name!r}: RandPerson has no camera c{cam:02d} in scene s{scene:02d}")
    return pid, SCENE_CAMERA_OFFSET[scene] + cam, frame


@register_dataset("randperson")
class RandPerson(ReIDDataset):
    """The RandPerson subset as a train-only labelled dataset (see the module docstring).

    Args:
        root: the folder holding ``randperson_subset/`` (or the image folder itself); ``None`` →
            ``$NASREID_DATA/randperson``.
        max_ids: keep only the first ``max_ids`` identities (sorted pid) -- for small CPU runs.
        strict: raise on a file whose name does not parse (default) instead of warning and skipping it.

    Raises:
        DatasetLayoutError: missing folder, no images, a bad name (strict), ``max_ids < 1``.
    """

    default_subdir = "randperson"

    def __init__(self, root: str | os.PathLike | None = None, *, max_ids: int | None = None, strict: bool = True):
        root = resolve_root(root, self.default_subdir, "randperson")
        img_dir = next((d for d in (root / "randperson_subset" / "randperson_subset", root / "randperson_subset",
                                    root) if d.is_dir() and any(True for _ in _images(d))), None)
        if img_dir is None:
            raise DatasetLayoutError(f"randperson: no images in {root} (expected "
                                     f"{root / 'randperson_subset' / 'randperson_subset'}/*.jpg)")
        if max_ids is not None and max_ids < 1:
            raise DatasetLayoutError(f"randperson: max_ids must be >= 1, got {max_ids}")
        records = []
        for path in _images(img_dir):
            try:
                pid, camid, frame = parse_randperson_name(path.name)
            except ValueError as exc:
                warn_or_raise(strict, f"randperson: {exc} (in {img_dir})")
                continue
            records.append(ImageRecord(str(path), pid, camid, frame=frame))
        if max_ids is not None:
            keep = set(sorted({r.pid for r in records})[:max_ids])
            records = [r for r in records if r.pid in keep]
        super().__init__("randperson", relabel(records), [], [], root=root, allow_empty=("query", "gallery"))


def _images(folder: Path):
    return list_images(folder)
