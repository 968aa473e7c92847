"""Core types shared by every re-ID dataset layout.

A dataset is three lists of :class:`ImageRecord` (``train``, ``query``, ``gallery``) plus a way to read an
image (:meth:`ReIDDataset.read_image`). Parsers for the official layouts live in sibling modules and register
themselves with :func:`register_dataset`; :func:`build_dataset` looks them up by name.

Label conventions (shared with ``nasreid.evaluation``):

* train pids are relabelled to ``0..num_train_pids-1`` (contiguous, sorted by original pid);
* query/gallery pids keep the original pid of the layout; ``-1`` marks junk images (excluded by evaluation)
  and ``0`` marks Market-1501 distractors;
* camids are 0-based camera indices;
* ``dsetid`` is the domain index for multi-source training (``build_dataset(..., dsetid=k)``).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from nasreid.errors import NasreidError, RecipeError
from nasreid.registry import DATASETS

__all__ = [
    "ImageRecord",
    "ReIDDataset",
    "CorruptImageError",
    "DatasetLayoutError",
    "register_dataset",
    "build_dataset",
    "available_datasets",
    "resolve_root",
    "relabel",
    "IMAGE_EXTENSIONS",
    "list_images",
    "read_image_file",
    "hold_out_validation",
    "validation_count",
    "validation_view",
]

#: file extensions treated as images by the folder parsers (case-insensitive); others (e.g. ``Thumbs.db``)
#: are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


class CorruptImageError(NasreidError, OSError):
    """An image file exists but cannot be decoded (truncated, garbage bytes, not an image).

    The message always names the file; the path is also available as ``.path``. Picklable, so it
    survives being raised inside a ``DataLoader`` worker.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:  # OSError formats single-arg messages fine, keep it explicit
        return str(self.args[0]) if self.args else ""


class DatasetLayoutError(NasreidError, ValueError):
    """The on-disk layout does not match what the parser expects.

    Raised for a missing root/folder/list file, a file name that does not follow the layout's naming
    scheme, an empty split, or a bad keyword value. The message names the offending path or value.
    """


@dataclass(frozen=True)
class ImageRecord:
    """One image of a re-ID split.

    Attributes:
        path: file path, or for procedurally generated data a ``"synthetic://seed/pid/cam/idx"`` key.
        pid: identity label. Train: relabelled ``0..N-1``; query/gallery: the layout's original pid;
            ``-1`` junk; ``0`` distractor (Market-1501).
        camid: 0-based camera index.
        dsetid: domain/dataset index (multi-source training), default 0.
        seq: video sequence index of the camera (Market-1501 ``sS``: frame numbers restart in each sequence), or
            ``None`` when the layout has none.
        frame: frame number in the camera's video (Market-1501, DukeMTMC-reID, MSMT17 names), ``None`` unknown.
        time: capture time in **seconds** on a clock shared by the cameras, ``None`` unless known: DukeMTMC-reID
            from its frame numbers and the devkit's camera offsets; Market-1501 with ``timestamps: true``
            (frames made cumulative per camera over its sessions, 25 fps, QAConv/TLift Sec. 5.2); a custom
            parser may set it. ``seq``/``frame``/``time`` feed time-aware post-processors
            such as TLift (see :mod:`nasreid.evaluation.matchers`).

    Positional construction ``ImageRecord(path, pid, camid[, dsetid])`` is unchanged.
    """

    path: str
    pid: int
    camid: int
    dsetid: int = 0
    seq: int | None = None
    frame: int | None = None
    time: float | None = None


def read_image_file(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully and return it as an RGB ``PIL.Image``.

    Raises:
        FileNotFoundError: the file does not exist (message names it).
        CorruptImageError: the file exists but cannot be decoded (message names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(f"cannot decode image {path}: {type(exc).__name__}: {exc}", path=path) from exc


class ReIDDataset:
    """A person re-identification dataset: ``train``, ``query`` and ``gallery`` lists of :class:`ImageRecord`.

    Subclasses parse one on-disk layout (or generate images) and call ``super().__init__`` with the three
    lists. The constructor checks that no split is empty and computes ``num_train_pids`` / ``num_train_cams``.

    Args:
        name: dataset name (registry key).
        train, query, gallery: record lists.
        root: dataset root folder (for messages), ``None`` for generated data.
        allow_empty: names of splits allowed to be empty (e.g. ``("query", "gallery")`` for a train-only
            source domain, ``("train",)`` for an evaluation-only target); by default every split must be
            non-empty.

    Raises:
        DatasetLayoutError: a split is empty (message names the split and root), or train pids are not
            contiguous ``0..N-1``.
    """

    name: str = "reid"

    def __init__(
        self,
        name: str,
        train: Sequence[ImageRecord],
        query: Sequence[ImageRecord],
        gallery: Sequence[ImageRecord],
        root: str | os.PathLike | None = None,
        allow_empty: Iterable[str] = (),
    ):
        self.name = name
        self.root = None if root is None else str(root)
        self.train = list(train)
        self.query = list(query)
        self.gallery = list(gallery)
        allow_empty = set(allow_empty)
        for split in ("train", "query", "gallery"):
            if not getattr(self, split) and split not in allow_empty:
                raise DatasetLayoutError(
                    f"{name}: split '{split}' is empty (root: {self.root if self.root is not None else '<none>'})"
                )
        pids = sorted({r.pid for r in self.train})
        if pids and pids != list(range(len(pids))):
            raise DatasetLayoutError(
                f"{name}: train pids must be relabelled to 0..N-1, got {pids[:5]}... (root: {self.root})"
            )
        self.num_train_pids = len(pids)
        self.num_train_cams = len({r.camid for r in self.train})
        #: validation query / gallery of training identities held out by :func:`hold_out_validation` (empty
        #: unless a run's ``data.val_ids`` asks for them); ``val_split`` describes the draw
        self.val_query: list[ImageRecord] = []
        self.val_gallery: list[ImageRecord] = []
        self.val_split: dict | None = None

    # ------------------------------------------------------------------ reading
    def read_image(self, record: ImageRecord) -> Image.Image:
        """Read the image of ``record`` as an RGB ``PIL.Image`` (H×W×3 uint8 when converted to array).

        Raises:
            FileNotFoundError: the file does not exist.
            CorruptImageError: the file cannot be decoded; the message names the file.
        """
        return read_image_file(record.path)

    # ------------------------------------------------------------------ stats
    @staticmethod
    def split_stats(records: Sequence[ImageRecord]) -> tuple[int, int, int]:
        """``(#ids, #images, #cams)`` of a record list."""
        return len({r.pid for r in records}), len(records), len({r.camid for r in records})

    def summary(self) -> str:
        """A plain-text table of ``#ids``, ``#images`` and ``#cams`` per split (with ``val query`` / ``val gallery``
        rows when validation identities are held out, :func:`hold_out_validation`), under the dataset's root relative
        to the current folder (a committed log names no machine's absolute paths)."""
        rows = [(split, getattr(self, split)) for split in ("train", "query", "gallery")]
        val_query, val_gallery = getattr(self, "val_query", []), getattr(self, "val_gallery", [])
        if val_query or val_gallery:
            rows += [("val query", val_query), ("val gallery", val_gallery)]
        w = max(8, *(len(name) for name, _ in rows))
        dashes = "  " + "-" * (w + 32)
        lines = [
            f"=> {self.name}" + (f" ({os.path.relpath(self.root)})" if self.root else ""),  # logs stay portable
            dashes,
            f"  {'subset':<{w}} | # ids | # images | # cameras",
            dashes,
        ]
        for split, records in rows:
            n_ids, n_img, n_cam = self.split_stats(records)
            lines.append(f"  {split:<{w}} | {n_ids:5d} | {n_img:8d} | {n_cam:9d}")
        lines.append(dashes)
        return "\n".join(lines)

    def validation_protocol(self, records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
        """Query / gallery of held-out training identities by this dataset's own test protocol
        (:func:`hold_out_validation`). Default (a layout without a protocol of its own): per identity the first image
        of each camera is a query and the others are gallery, then every query without a gallery image of the same
        identity from another camera moves to the gallery (so every query has a cross-camera match, the re-ID
        protocol's condition, and an identity seen by two or more cameras keeps at least one query). A dataset with
        its own protocol (CUHK01: one camera's images are the query, the other's the gallery) overrides it.

        Args:
            records: the held-out images, in a fixed order (pids and camids as they will be evaluated).

        Returns:
            ``(query, gallery)`` lists of records, each in the order of ``records``.
        """
        by_pid: dict[int, list[ImageRecord]] = {}
        for r in records:
            by_pid.setdefault(r.pid, []).append(r)
        is_query: dict[int, bool] = {}  # id(record) -> query?
        for recs in by_pid.values():
            seen_cams: set[int] = set()
            for r in recs:
                is_query[id(r)] = r.camid not in seen_cams
                seen_cams.add(r.camid)
            moved = True
            while moved:  # a query with no cross-camera gallery match becomes a gallery image
                moved = False
                for r in recs:
                    if is_query[id(r)] and not any(not is_query[id(g)] and g.camid != r.camid for g in recs):
                        is_query[id(r)] = False
                        moved = True
                        break
        return [r for r in records if is_query[id(r)]], [r for r in records if not is_query[id(r)]]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, train={len(self.train)}, query={len(self.query)}, "
            f"gallery={len(self.gallery)}, num_train_pids={self.num_train_pids})"
        )

    def with_dsetid(self, dsetid: int) -> "ReIDDataset":
        """Set ``dsetid`` on every record (in place) and return ``self``."""
        for split in ("train", "query", "gallery"):
            setattr(self, split, [dataclasses.replace(r, dsetid=int(dsetid)) for r in getattr(self, split)])
        return self


# ---------------------------------------------------------------------- helpers
def relabel(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Map the pids of ``records`` to ``0..N-1`` in sorted order of the original pid."""
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [dataclasses.replace(r, pid=mapping[r.pid]) for r in records]


def validation_count(val_ids: int | float, num_ids: int) -> int:
    """Identities that ``data.val_ids`` holds out of ``num_ids`` training identities: the count itself, or
    ``round(fraction * num_ids)``.

    Raises:
        RecipeError: fewer than 2, or not fewer than ``num_ids`` (no training identity would be left); the message
            names ``data.val_ids``.
    """
    n = int(val_ids) if isinstance(val_ids, int) else int(round(float(val_ids) * num_ids))
    if n < 2:
        raise RecipeError(f"data.val_ids: {val_ids!r} of {num_ids} training identities holds out {n}; a validation "
                          "set needs at least 2 identities")
    if n >= num_ids:
        raise RecipeError(f"data.val_ids: {val_ids!r} holds out {n} of {num_ids} training identities and leaves none "
                          "to train on")
    return n


def hold_out_validation(dataset: ReIDDataset, val_ids: int | float, seed: int = 0,
                        labels: Sequence[int] | None = None) -> ReIDDataset:
    """Hold training identities of ``dataset`` out as a validation query / gallery set (recipe ``data.val_ids``).

    ``val_ids`` identities (a count, or ``round(fraction * #train ids)``) are drawn without replacement with
    ``numpy.random.default_rng([seed, 27])`` among the train identities seen by two or more cameras (an identity
    seen by one camera cannot form a cross-camera query / gallery pair, the same-cameras rule of the evaluation);
    the engine passes the split's seed (``dataset.split_seed`` where the dataset draws its own identity split, as
    CUHK01's ``split_seed``; 0 for a layout with a fixed split), so the validation identities belong to the split,
    not to the search seed. Their images leave ``train`` (the remaining train pids are relabelled ``0..N-1`` with
    :func:`relabel`, in the order of their original pids) and form ``val_query`` / ``val_gallery`` by the dataset's
    own test protocol (:meth:`ReIDDataset.validation_protocol`). Validation pids are the original pids where the
    dataset records them (``train_pids``, as CUHK01), else the train label shifted past the largest test pid; either
    way no validation pid is a test pid, and train, validation and test identities and images are disjoint.

    Args:
        dataset: a dataset with a non-empty ``train`` (not changed: a shallow copy is returned).
        val_ids: a count (>= 2) or a fraction in (0, 1).
        seed: the draw's seed.
        labels: the train labels (of ``dataset.train``, before the hold-out) to hold out instead of drawing them: a
            run's recorded draw (``val_split.json``), so that a resumed run and later commands see the same split.

    Returns:
        A copy of ``dataset`` with ``train`` reduced and relabelled, ``num_train_pids`` / ``num_train_cams`` updated,
        ``val_query`` / ``val_gallery`` set and ``val_split`` describing the draw (``val_ids``, ``seed``, ``labels``:
        the held-out train labels, ``pids``: their validation pids, ``original_pids``: whether those are the
        layout's pids, image counts, ``train_ids`` / ``train_images`` left).

    Raises:
        RecipeError: too few or too many identities asked for, more than the identities seen by two or more cameras,
            or recorded ``labels`` that are not train labels of ``dataset``; the message names ``data.val_ids``.
    """
    by_label: dict[int, list[ImageRecord]] = {}
    for r in dataset.train:
        by_label.setdefault(r.pid, []).append(r)
    num_ids = len(by_label)
    n = validation_count(val_ids, num_ids)
    if labels is not None:
        held = sorted(int(x) for x in labels)
        unknown = [x for x in held if x not in by_label]
        if unknown or len(held) != n:
            raise RecipeError(f"data.val_ids: the recorded validation identities {held[:8]} do not fit the train "
                              f"split of {dataset.name} ({num_ids} identities, {n} to hold out)")
    else:
        eligible = sorted(p for p, recs in by_label.items() if len({r.camid for r in recs}) >= 2)
        if n > len(eligible):
            raise RecipeError(f"data.val_ids: {val_ids!r} asks for {n} validation identities, the train split of "
                              f"{dataset.name} has {num_ids} identities of which {len(eligible)} are seen by two or "
                              "more cameras")
        rng = np.random.default_rng([int(seed), 27])
        held = sorted(int(x) for x in rng.choice(eligible, size=n, replace=False))
    held_set = set(held)
    original = getattr(dataset, "train_pids", None)
    has_original = isinstance(original, (list, tuple)) and len(original) == num_ids
    if has_original:
        assert original is not None  # for mypy: has_original checks it
        val_pid = {x: int(original[x]) for x in held}
    else:
        offset = max((r.pid for r in [*dataset.query, *dataset.gallery]), default=-1) + 1
        val_pid = {x: offset + x for x in held}
    val_records = [dataclasses.replace(r, pid=val_pid[r.pid]) for r in dataset.train if r.pid in held_set]
    query, gallery = dataset.validation_protocol(val_records)
    gallery_cams: dict[int, set[int]] = {}
    for g in gallery:
        gallery_cams.setdefault(g.pid, set()).add(g.camid)
    matched = {q.pid for q in query if gallery_cams.get(q.pid, set()) - {q.camid}}
    unmatched = [val_pid[x] for x in held if val_pid[x] not in matched]
    if unmatched:
        raise RecipeError(f"data.val_ids: validation identities {unmatched[:8]} of {dataset.name} have no query with "
                          "a gallery image from another camera")
    new = copy.copy(dataset)
    new.train = relabel([r for r in dataset.train if r.pid not in held_set])
    new.num_train_pids = num_ids - n
    new.num_train_cams = len({r.camid for r in new.train})
    new.val_query, new.val_gallery = query, gallery
    if has_original:
        assert original is not None
        new.train_pids = [int(original[x]) for x in sorted(by_label) if x not in held_set]  # type: ignore[attr-defined]
        new.val_pids = [val_pid[x] for x in held]  # type: ignore[attr-defined]
    new.val_split = {
        "dataset": dataset.name, "val_ids": val_ids, "seed": int(seed), "labels": held,
        "pids": [val_pid[x] for x in held], "original_pids": has_original,
        "num_query": len(query), "num_gallery": len(gallery),
        "train_ids": new.num_train_pids, "train_images": len(new.train),
    }
    return new


def validation_view(dataset: ReIDDataset) -> ReIDDataset:
    """A copy of ``dataset`` whose ``query`` / ``gallery`` are its validation query / gallery
    (:func:`hold_out_validation`) and whose name is ``<name>-val``: what the evaluation functions take.

    Raises:
        RecipeError: ``dataset`` holds no validation identities (``data.val_ids`` is not set).
    """
    if not getattr(dataset, "val_query", None) or not getattr(dataset, "val_gallery", None):
        raise RecipeError(f"{dataset.name}: no validation identities are held out; set data.val_ids (a count or a "
                          "fraction of the training identities)")
    view = copy.copy(dataset)
    view.query, view.gallery = list(dataset.val_query), list(dataset.val_gallery)
    view.name = f"{dataset.name}-val"
    return view


def resolve_root(root: str | os.PathLike | None, default_subdir: str, name: str) -> Path:
    """Resolve a dataset root.

    ``root=None`` means ``$NASREID_DATA/<default_subdir>``. If ``root`` exists and contains
    ``default_subdir`` it is also accepted as the parent folder.

    Raises:
        DatasetLayoutError: root is ``None`` and ``NASREID_DATA`` is unset, or the folder does not exist
            (message names the path).
    """
    if root is None:
        base = os.environ.get("NASREID_DATA")
        if not base:
            raise DatasetLayoutError(
                f"{name}: no root given and environment variable NASREID_DATA is not set "
                f"(expected $NASREID_DATA/{default_subdir})"
            )
        path = Path(base) / default_subdir
    else:
        path = Path(root)
    path = path.expanduser()
    if not path.is_dir():
        raise DatasetLayoutError(f"{name}: dataset root does not exist or is not a folder: {path}")
    return path


def list_images(folder: Path) -> list[Path]:
    """Sorted image files (by :data:`IMAGE_EXTENSIONS`) directly inside ``folder``."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def require_dir(path: Path, name: str) -> Path:
    """Return ``path`` if it is a folder, else raise :class:`DatasetLayoutError` naming it."""
    if not path.is_dir():
        raise DatasetLayoutError(f"{name}: expected folder not found: {path}")
    return path


def warn_or_raise(strict: bool, message: str) -> None:
    """Raise :class:`DatasetLayoutError` (strict) or emit a ``UserWarning`` with ``message``."""
    if strict:
        raise DatasetLayoutError(message)
    warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------------- registry
def register_dataset(name: str) -> Callable:
    """Class/function decorator registering a dataset factory under ``name`` in
    :data:`nasreid.registry.DATASETS` (used by :func:`build_dataset`).

    The factory is called as ``factory(root=root, **kwargs)``.

    Raises:
        RegistryError: ``name`` is already registered to a different factory.
    """
    return DATASETS.register(name)


def available_datasets() -> list[str]:
    """Sorted names accepted by :func:`build_dataset`."""
    return DATASETS.names()


def _accepts(factory: Callable, keyword: str) -> bool:
    """Whether ``factory`` (a class or function) takes ``keyword`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_dataset(name: str, root: str | os.PathLike | None = None, *, dsetid: int = 0, eval_only: bool = False,
                  **kwargs) -> ReIDDataset:
    """Build a registered dataset by name.

    Args:
        name: one of :func:`available_datasets` (``market1501``, ``dukemtmc``, ``msmt17``, ``cuhk03np``,
            ``cuhk01``, ``folder``, ``synthetic``), case-insensitive.
        root: dataset folder; ``None`` → ``$NASREID_DATA/<default subdir>`` (ignored by ``synthetic``).
        dsetid: domain index stamped on every record (multi-source training).
        eval_only: the dataset is only evaluated on (a cross-domain target): only query and gallery are read,
            the training folder / list files may be missing and ``train`` is empty. Passed to factories whose
            signature takes ``eval_only`` (``market1501``, ``dukemtmc``, ``cuhk03np``, ``msmt17``, ``folder``);
            ignored by the others (``cuhk01``, ``synthetic``: they always build every split).
        **kwargs: layout-specific options (see each dataset class).

    Raises:
        RegistryError (a ``KeyError``): unknown name (message lists the known ones).
        DatasetLayoutError: missing root, bad layout, empty split.
    """
    factory = DATASETS.get(name)
    if eval_only and _accepts(factory, "eval_only"):
        kwargs["eval_only"] = True
    ds = factory(root=root, **kwargs)
    if dsetid:
        ds.with_dsetid(dsetid)
    return ds
