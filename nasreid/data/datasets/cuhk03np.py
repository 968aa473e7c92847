"""CUHK03-NP: the new protocol for CUHK03 (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017; images from Li et al., "DeepReID", CVPR 2014).

Layout::

    root/labeled/{bounding_box_train,bounding_box_test,query}/<name>.png    # variant="labeled"
    root/detected/{bounding_box_train,bounding_box_test,query}/<name>.png   # variant="detected"

767 train ids / 700 test ids. Names follow Market-1501 (``PPPP_cCsS_FFFFFF_BB``) or the short form shipped
with CUHK03-NP, ``PPPP_cC_N.png`` (pid, camera 1..2, index); camid = C-1; train pids relabelled 0..N-1.
Market-style names also fill ``ImageRecord.seq`` / ``frame`` (the short form has neither).
Non-matching names raise :class:`DatasetLayoutError` naming the file (``strict=False``: warn and skip).
"""
from __future__ import annotations

import os
import re

from .base import DatasetLayoutError, ReIDDataset, register_dataset, require_dir, resolve_root
from .market1501 import market1501_fields, parse_bbox_layout

__all__ = ["CUHK03NP", "parse_cuhk03np_name"]

_SHORT_RE = re.compile(r"^(-?\d+)_c(\d+)_(\d+)\.(?:jpe?g|png|bmp)$", re.IGNORECASE)


def _cuhk03np_fields(filename: str | os.PathLike) -> dict:
    """``{pid, camid}`` plus ``seq``/``frame`` for Market-style names; ValueError naming the file otherwise."""
    try:
        return market1501_fields(filename)
    except ValueError:
        pass
    base = os.path.basename(os.fspath(filename))
    m = _SHORT_RE.match(base)
    if m is None or int(m.group(2)) < 1:
        raise ValueError(
            f"not a CUHK03-NP image name (expected PPPP_cCsS_FFFFFF_BB.png or PPPP_cC_N.png): {filename}"
        )
    return dict(pid=int(m.group(1)), camid=int(m.group(2)) - 1)


def parse_cuhk03np_name(filename: str | os.PathLike) -> tuple[int, int]:
    """Parse a CUHK03-NP image name → ``(pid, camid 0-based)``.

    Accepts Market-style ``PPPP_cCsS_FFFFFF_BB.ext`` and short ``PPPP_cC_N.ext``.

    Raises:
        ValueError: neither pattern matches; the message names the file.
    """
    fields = _cuhk03np_fields(filename)
    return fields["pid"], fields["camid"]


@register_dataset("cuhk03np")
class CUHK03NP(ReIDDataset):
    """CUHK03-NP dataset (new protocol); see the module docstring.

    Args:
        root: folder holding ``labeled/`` and/or ``detected/`` (``None`` → ``$NASREID_DATA/cuhk03np``).
        variant: ``"labeled"`` (hand-drawn boxes, default) or ``"detected"`` (DPM boxes).
        strict: raise on a non-matching image name (default) instead of warning and skipping.
        eval_only: evaluation-only target: ``bounding_box_train`` is not read (may be missing), train is empty.

    Raises:
        DatasetLayoutError: bad ``variant``, missing folder, non-matching name (strict), empty split.
    """

    default_subdir = "cuhk03np"

    def __init__(self, root: str | os.PathLike | None = None, *, variant: str = "labeled", strict: bool = True,
                 eval_only: bool = False):
        if variant not in ("labeled", "detected"):
            raise DatasetLayoutError(f"cuhk03np: variant must be 'labeled' or 'detected', got {variant!r}")
        root = resolve_root(root, self.default_subdir, "cuhk03np")
        sub = require_dir(root / variant, "cuhk03np")
        train, query, gallery = parse_bbox_layout(sub, _cuhk03np_fields, "cuhk03np", strict=strict,
                                                  eval_only=eval_only)
        self.variant = variant
        super().__init__("cuhk03np", train, query, gallery, root=root, allow_empty=("train",) if eval_only else ())
