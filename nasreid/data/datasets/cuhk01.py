"""CUHK01 (Li, Zhao & Wang, "Human Reidentification with Transferred Metric Learning", ACCV 2012).

Layout::

    root/campus/PPPPIII.png     # 3,884 images, 971 ids, 60x160 (w x h)

``PPPP`` = pid 0001..0971; ``III`` 001/002 = camera A (camid 0, front/back views), 003/004 = camera B
(camid 1, side views). Protocol (as in OSNet, Zhou et al. ICCV 2019, Table 4): 485 train ids / 486 test ids
split at random (``split_seed``); train holds all images of train ids (relabelled 0..N-1); query holds the
camera-``query_cam`` images of the test ids (both of them) and gallery the other camera's images. Query and
gallery keep the original pid. 13 id/camera pairs hold two byte-identical images; they are kept as they are.
Validation identities held out of train (recipe ``data.val_ids``) follow the same protocol: query from
``query_cam``, gallery from the other camera.

``protocol="all_ids"`` is an evaluation-only protocol over all 971 identities (for models trained elsewhere,
e.g. torchreid's zoo used zero-shot): no train split; query = the first camera-A image of every id
(``PPPP001``), gallery = both camera-B images (``PPPP003``, ``PPPP004``): 971 queries, 1,942 gallery images.
"""
from __future__ import annotations

import os
import re

import numpy as np

from .base import (
    DatasetLayoutError,
    ImageRecord,
    ReIDDataset,
    list_images,
    register_dataset,
    relabel,
    require_dir,
    resolve_root,
    warn_or_raise,
)

__all__ = ["CUHK01", "parse_cuhk01_name"]

_CUHK01_RE = re.compile(r"^(\d{4})(\d{3})\.(?:png|jpe?g|bmp)$", re.IGNORECASE)
TOTAL_IDS = 971
TRAIN_IDS = 485


def parse_cuhk01_name(filename: str | os.PathLike) -> tuple[int, int, int]:
    """Parse a CUHK01 name ``PPPPIII.png`` → ``(pid, camid, index)``; index 1..4, camid 0 (A) for 1-2, 1 (B) for 3-4.

    Raises:
        ValueError: the name does not match or the index is not 1..4; the message names the file.
    """
    base = os.path.basename(os.fspath(filename))
    m = _CUHK01_RE.match(base)
    if m is None:
        raise ValueError(f"not a CUHK01 image name (expected PPPPIII.png): {filename}")
    pid, idx = int(m.group(1)), int(m.group(2))
    if not 1 <= idx <= 4:
        raise ValueError(f"CUHK01 image index must be 001..004, got {idx:03d}: {filename}")
    return pid, (idx - 1) // 2, idx


@register_dataset("cuhk01")
class CUHK01(ReIDDataset):
    """CUHK01 with a seeded train/test identity split; see the module docstring.

    Args:
        root: folder holding ``campus/`` (or the ``campus`` folder itself); ``None`` → ``$NASREID_DATA/cuhk01``.
        num_train_ids: identities in train (default 485 of 971); the rest are test ids.
        split_seed: seed of the random identity split (same seed → same split).
        query_cam: ``"A"`` (default) or ``"B"``: camera whose images form the query; the other is the gallery.
        max_ids: if set, use only this many identities (chosen with ``split_seed``), scaling ``num_train_ids``
            by the same ratio (``round(max_ids * num_train_ids / #ids)``, at least 1 train and 1 test id).
        protocol: ``"split"`` (default: the seeded train/test split above) or ``"all_ids"`` (evaluation only,
            every identity: query ``PPPP001``, gallery ``PPPP003`` + ``PPPP004``; ``num_train_ids``, ``split_seed``,
            ``query_cam`` do not apply, ``max_ids`` takes the first ids in order).
        strict: raise on a non-matching image name (default) instead of warning and skipping.

    Raises:
        DatasetLayoutError: missing folder, bad name (strict), bad keyword value (naming it), empty split.
    """

    default_subdir = "cuhk01"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        num_train_ids: int = TRAIN_IDS,
        split_seed: int = 0,
        query_cam: str = "A",
        max_ids: int | None = None,
        strict: bool = True,
        protocol: str = "split",
    ):
        root = resolve_root(root, self.default_subdir, "cuhk01")
        img_dir = root / "campus"
        if not img_dir.is_dir() and root.name == "campus":
            img_dir = root
        require_dir(img_dir, "cuhk01")
        query_cam = str(query_cam).upper()
        if query_cam not in ("A", "B"):
            raise DatasetLayoutError(f"cuhk01: query_cam must be 'A' or 'B', got {query_cam!r}")

        by_pid: dict[int, list[ImageRecord]] = {}
        for path in list_images(img_dir):
            try:
                pid, camid, _ = parse_cuhk01_name(path.name)
            except ValueError as exc:
                warn_or_raise(strict, f"cuhk01: {exc} (in {img_dir})")
                continue
            by_pid.setdefault(pid, []).append(ImageRecord(str(path), pid, camid))
        if not by_pid:
            raise DatasetLayoutError(f"cuhk01: no images found in {img_dir}")
        pids = np.array(sorted(by_pid))
        n_total = len(pids)
        if protocol not in ("split", "all_ids"):
            raise DatasetLayoutError(f"cuhk01: protocol must be 'split' or 'all_ids', got {protocol!r}")
        if protocol == "all_ids":
            ids = [int(p) for p in pids[: max_ids or n_total]]
            query = [r for p in ids for r in by_pid[p] if os.path.basename(r.path)[4:7] == "001"]
            gallery = [r for p in ids for r in by_pid[p] if os.path.basename(r.path)[4:7] in ("003", "004")]
            self.train_pids, self.test_pids = [], ids
            self.split_seed, self.query_cam, self.protocol = None, "A", protocol
            super().__init__("cuhk01", [], query, gallery, root=root, allow_empty=("train",))
            return
        if not 1 <= num_train_ids < n_total:
            raise DatasetLayoutError(
                f"cuhk01: num_train_ids must be in 1..{n_total - 1} (found {n_total} ids), got {num_train_ids}"
            )
        rng = np.random.RandomState(split_seed)
        perm = pids[rng.permutation(n_total)]
        if max_ids is not None:
            if not 2 <= max_ids <= n_total:
                raise DatasetLayoutError(f"cuhk01: max_ids must be in 2..{n_total}, got {max_ids}")
            n_train = int(round(max_ids * num_train_ids / n_total))
            n_train = min(max(n_train, 1), max_ids - 1)
            perm = perm[:max_ids]
        else:
            n_train = num_train_ids
        train_pids = sorted(int(p) for p in perm[:n_train])
        test_pids = sorted(int(p) for p in perm[n_train:])

        q_camid = 0 if query_cam == "A" else 1
        train = relabel([r for p in train_pids for r in by_pid[p]])
        query = [r for p in test_pids for r in by_pid[p] if r.camid == q_camid]
        gallery = [r for p in test_pids for r in by_pid[p] if r.camid != q_camid]
        self.train_pids, self.test_pids = train_pids, test_pids
        self.split_seed, self.query_cam, self.protocol = split_seed, query_cam, protocol
        super().__init__("cuhk01", train, query, gallery, root=root)

    def validation_protocol(self, records):
        """Query / gallery of held-out training identities by CUHK01's test protocol
        (:func:`~nasreid.data.datasets.base.hold_out_validation`): the ``query_cam`` images are the query, the other
        camera's the gallery, as for the test identities.

        Returns:
            ``(query, gallery)`` lists of records, in the order of ``records``.
        """
        q_camid = 0 if self.query_cam == "A" else 1
        return [r for r in records if r.camid == q_camid], [r for r in records if r.camid != q_camid]
