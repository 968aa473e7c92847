"""Data layer: dataset parsers (one per official layout), PK sampler, transforms and loaders.

Typical use::

    from nasreid.data import build_dataset, build_train_loader, build_test_loaders
    ds = build_dataset("cuhk01", split_seed=0)          # root from $NASREID_DATA/cuhk01
    train = build_train_loader(ds, height=256, width=128, batch_size=64, num_instances=4)
    query, gallery = build_test_loaders(ds, height=256, width=128)
"""
from .datasets import (
    CUHK01,
    CUHK03NP,
    MSMT17,
    CorruptImageError,
    DatasetLayoutError,
    DukeMTMCreID,
    FolderDataset,
    ImageRecord,
    Market1501,
    ReIDDataset,
    SyntheticReID,
    available_datasets,
    build_dataset,
    parse_cuhk01_name,
    parse_cuhk03np_name,
    parse_dukemtmc_name,
    parse_market1501_name,
    parse_msmt17_name,
    register_dataset,
    render_person,
)
from .loaders import ImageDataset, build_test_loaders, build_train_loader, verify_image
from .samplers import PKSampler
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

__all__ = [
    "ImageRecord", "ReIDDataset", "CorruptImageError", "DatasetLayoutError", "build_dataset", "register_dataset",
    "available_datasets", "parse_market1501_name", "parse_msmt17_name", "parse_dukemtmc_name",
    "parse_cuhk03np_name", "parse_cuhk01_name", "Market1501", "DukeMTMCreID", "MSMT17", "CUHK03NP", "CUHK01",
    "FolderDataset", "SyntheticReID", "render_person", "ImageDataset", "verify_image", "PKSampler",
    "build_transforms", "IMAGENET_MEAN", "IMAGENET_STD", "build_train_loader", "build_test_loaders",
]
