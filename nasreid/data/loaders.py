"""Torch datasets and data loaders for re-ID training and evaluation.

* :class:`ImageDataset` wraps a list of :class:`ImageRecord` with a reader and a transform, and handles corrupt
  images explicitly (``on_corrupt="error"`` raises :class:`CorruptImageError` naming the file;
  ``"skip"`` drops them up-front with a warning naming each one).
* :func:`build_train_loader`: PK-sampled (P ids × K images), ``drop_last`` training loader. Call
  ``loader.sampler.set_epoch(epoch)`` at the start of every epoch for a fresh, reproducible order.
* :func:`build_test_loaders`: ``(query_loader, gallery_loader)`` in record order, no shuffling.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .datasets.base import CorruptImageError, ImageRecord, ReIDDataset, read_image_file
from .samplers import PKSampler
from .transforms import build_transforms

__all__ = ["ImageDataset", "build_train_loader", "build_test_loaders", "verify_image"]

_ON_CORRUPT = ("error", "skip")


def verify_image(path: str) -> str | None:
    """Cheap integrity check of an image file with ``PIL.Image.verify`` (no full decode).

    Returns:
        ``None`` if the file looks valid, else a short reason string.
    """
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types for bad files
        return f"{type(exc).__name__}: {exc}"
    return None


def _read_record(record: ImageRecord) -> Image.Image:
    return read_image_file(record.path)


class ImageDataset(Dataset):
    """Map-style torch dataset over re-ID records.

    Args:
        records: the images (their order defines the indices).
        reader: ``reader(record) -> PIL.Image`` (RGB), e.g. ``ReIDDataset.read_image``; default reads the file.
        transform: applied to the PIL image; should return a tensor ``[3, H, W]`` (see ``build_transforms``).
        on_corrupt: ``"error"`` (default): a corrupt image raises :class:`CorruptImageError` naming the file when
            it is read. ``"skip"``: :meth:`validate` runs at construction (``PIL.Image.verify`` for files, a trial
            read for non-file records such as ``synthetic://``) and drops every corrupt record with a
            ``warnings.warn`` naming it; an image that passes ``verify`` but fails to decode later is replaced by
            another image of the same pid (same camera preferred) with a warning — labels are never changed.

    ``__getitem__(i)`` returns ``dict(img=Tensor[3,H,W], pid=int, camid=int, dsetid=int, frame=int, path=str,
    index=int)``; ``frame`` is the record's frame number, ``-1`` when unknown (so batches collate). ``index`` is
    the position in :attr:`records` (after ``"skip"`` validation), through which evaluation finds each image's
    record (``seq`` / ``frame`` / ``time``).

    Raises:
        ValueError: unknown ``on_corrupt``.
        FileNotFoundError: a record's file is missing (never skipped: that is a layout bug, not bad bytes).
    """

    #: most bytes of decoded pixels :attr:`cache` keeps (later images are read from their files every time)
    CACHE_BYTES = 2 << 30

    def __init__(
        self,
        records: Sequence[ImageRecord],
        reader: Callable[[ImageRecord], Image.Image] | None = None,
        transform: Callable | None = None,
        on_corrupt: str = "error",
        cache: bool = False,
    ):
        if on_corrupt not in _ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {_ON_CORRUPT}, got {on_corrupt!r}")
        self.records = list(records)
        self.reader = reader if reader is not None else _read_record
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.skipped: list[ImageRecord] = []
        #: keep each decoded image (``PIL.Image``, before the transform) in memory once read, up to
        #: :data:`CACHE_BYTES`: later epochs skip reading and decoding. The cache lives in the process that reads,
        #: so it pays with ``workers=0`` (the CPU default) or persistent workers
        self.cache = bool(cache)
        self._cached: dict[int, Image.Image] = {}
        self._cached_bytes = 0
        if on_corrupt == "skip":
            self.validate()

    def validate(self) -> list[ImageRecord]:
        """Drop corrupt records (warning naming each); return the dropped ones.

        Files are checked with ``PIL.Image.verify``; non-file records (e.g. ``synthetic://``) by a trial read.

        Raises:
            FileNotFoundError: a record's path looks like a file path but does not exist.
        """
        keep, bad = [], []
        for rec in self.records:
            if "://" in rec.path:
                try:
                    self.reader(rec)
                    reason = None
                except (CorruptImageError, OSError, ValueError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
            else:
                if not os.path.isfile(rec.path):
                    raise FileNotFoundError(f"image file not found: {rec.path}")
                reason = verify_image(rec.path)
            if reason is None:
                keep.append(rec)
            else:
                bad.append(rec)
                warnings.warn(f"skipping corrupt image {rec.path} (pid={rec.pid}, camid={rec.camid}): {reason}",
                              stacklevel=2)
        self.records = keep
        self.skipped.extend(bad)
        return bad

    def __len__(self) -> int:
        return len(self.records)

    @property
    def pids(self) -> list[int]:
        """Identity label of every item, in index order."""
        return [r.pid for r in self.records]

    def _load(self, index: int) -> tuple[Image.Image, ImageRecord]:
        rec = self.records[index]
        hit = self._cached.get(index)
        if hit is not None:
            return hit, rec
        try:
            img = self.reader(rec)
            if self.cache:
                size = img.width * img.height * len(img.getbands())
                if self._cached_bytes + size <= self.CACHE_BYTES:
                    self._cached[index] = img
                    self._cached_bytes += size
            return img, rec
        except CorruptImageError as exc:
            if self.on_corrupt == "error":
                raise
            # passed verify() but fails to decode: substitute an image of the same identity
            candidates = [i for i, r in enumerate(self.records) if r.pid == rec.pid and i != index]
            candidates.sort(key=lambda i: self.records[i].camid != rec.camid)
            for i in candidates:
                try:
                    img = self.reader(self.records[i])
                except CorruptImageError:
                    continue
                warnings.warn(f"corrupt image {rec.path} replaced by {self.records[i].path} (same pid {rec.pid}): "
                              f"{exc}", stacklevel=2)
                return img, rec
            raise CorruptImageError(
                f"corrupt image {rec.path} and no readable image of the same pid {rec.pid} to substitute: {exc}",
                path=rec.path,
            ) from exc

    def __getitem__(self, index: int) -> dict:
        img, rec = self._load(index)
        if self.transform is not None:
            img = self.transform(img)
        frame = -1 if rec.frame is None else rec.frame
        return dict(img=img, pid=rec.pid, camid=rec.camid, dsetid=rec.dsetid, frame=frame, path=rec.path, index=index)


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_train_loader(
    dataset: ReIDDataset,
    *,
    height: int,
    width: int,
    batch_size: int,
    num_instances: int,
    workers: int = 0,
    seed: int = 0,
    on_corrupt: str = "error",
    persistent_workers: bool | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    cache_images: bool = False,
    **aug,
) -> DataLoader:
    """PK-sampled training loader over ``dataset.train``.

    Args:
        dataset: a :class:`ReIDDataset`; images are read with its ``read_image``.
        height, width: image size in pixels.
        batch_size: P × K; num_instances: K (images per identity per batch).
        workers: DataLoader worker processes.
        seed: seed of the PK order (with the epoch, see ``loader.sampler.set_epoch``) and of the augmentations.
        on_corrupt: ``"error"`` or ``"skip"`` (see :class:`ImageDataset`).
        persistent_workers: keep workers alive between epochs (default: ``workers > 0``).
        num_replicas, rank: data-parallel share (:class:`PKSampler`): ``batch_size`` stays the global batch, the
            loader yields ``batch_size / num_replicas`` images per step.
        cache_images: keep decoded images in memory across epochs (:attr:`ImageDataset.cache`).
        **aug: forwarded to :func:`build_transforms` (``flip``, ``color_jitter``, ``random_erasing``, ``pad``,
            ``mean``, ``std``, and registered augmentations by name: ``None`` or a dict of their arguments, e.g.
            ``rsa``, random shifting augmentation, RMGL Sec. III-D -- the recipe's ``data.augment``).

    Returns:
        ``DataLoader`` with ``drop_last=True`` yielding dicts with ``img`` ``[B, 3, H, W]`` float32, ``pid``,
        ``camid``, ``dsetid``, ``frame`` (-1 unknown), ``index`` ``[B]`` int64 tensors and ``path`` (list of str).

    Raises:
        ValueError: too few identities for P, bad batch_size/num_instances, unknown augmentation keyword.
    """
    transform = build_transforms(height, width, is_train=True, **aug)
    ds = ImageDataset(dataset.train, dataset.read_image, transform, on_corrupt=on_corrupt, cache=cache_images)
    sampler = PKSampler(ds.pids, num_instances=num_instances, batch_size=batch_size, seed=seed,
                        num_replicas=num_replicas, rank=rank)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size // num_replicas,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=(workers > 0) if persistent_workers is None else (persistent_workers and workers > 0),
        worker_init_fn=_seed_worker,
        generator=gen,
    )


def build_test_loaders(
    dataset: ReIDDataset,
    *,
    height: int,
    width: int,
    batch_size: int = 128,
    workers: int = 0,
    on_corrupt: str = "error",
    **norm,
) -> tuple[DataLoader, DataLoader]:
    """Query and gallery loaders (record order, no shuffling, no augmentation, last batch kept).

    Args:
        dataset: a :class:`ReIDDataset`.
        height, width: image size in pixels.
        batch_size: images per batch; workers: DataLoader worker processes.
        on_corrupt: ``"error"`` or ``"skip"`` (skipped images are absent from evaluation, with a warning).
        **norm: ``mean`` / ``std`` forwarded to :func:`build_transforms`.

    Returns:
        ``(query_loader, gallery_loader)``; batches as in :func:`build_train_loader`.
    """
    transform = build_transforms(height, width, is_train=False, **norm)
    loaders = []
    for records in (dataset.query, dataset.gallery):
        ds = ImageDataset(records, dataset.read_image, transform, on_corrupt=on_corrupt)
        loaders.append(
            DataLoader(
                ds,
                batch_size=batch_size,
                shuffle=False,
                num_workers=workers,
                drop_last=False,
                pin_memory=torch.cuda.is_available(),
            )
        )
    return loaders[0], loaders[1]


def calibration_batches(dataset: ReIDDataset, n: int, *, height: int, width: int, batch_size: int = 32,
                        on_corrupt: str = "error", workers: int = 0):
    """The ``n`` training images a warm start calibrates its new IN layers on
    (:func:`~nasreid.models.pretrained.calibrate_instance_norms`): evenly spaced over ``dataset.train`` in record
    order (every ``len(train) // n``-th, the first ``n``), the test transform, batches of ``batch_size``. One
    definition for a run's start and for a zero-shot evaluation of the same start.

    Returns:
        An iterator of image batches ``[B, 3, height, width]`` (float, normalised, on the CPU).

    Raises:
        ValueError: the dataset has no training images.
    """
    train = list(dataset.train)
    if not train:
        raise ValueError(f"{dataset.name}: no training images to calibrate IN layers on")
    records = train[:: max(1, len(train) // n)][:n]
    ds = ImageDataset(records, dataset.read_image, build_transforms(height, width, is_train=False),
                      on_corrupt=on_corrupt)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=False)
    return (b["img"] for b in loader)
