"""Dataset parsers, one module per layout; importing this package registers them all."""
from .base import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    DatasetLayoutError,
    ImageRecord,
    ReIDDataset,
    available_datasets,
    build_dataset,
    hold_out_validation,
    read_image_file,
    register_dataset,
    relabel,
    resolve_root,
    validation_view,
)
from .cuhk01 import CUHK01, parse_cuhk01_name
from .cuhk03np import CUHK03NP, parse_cuhk03np_name
from .dukemtmc import DukeMTMCreID, parse_dukemtmc_name
from .folder import FolderDataset
from .market1501 import Market1501, parse_market1501_name
from .msmt17 import MSMT17, parse_msmt17_name
from .randperson import RandPerson, parse_randperson_name
from .synthetic import SyntheticReID, render_person

__all__ = [
    "IMAGE_EXTENSIONS", "CorruptImageError", "DatasetLayoutError", "ImageRecord", "ReIDDataset",
    "available_datasets", "build_dataset", "hold_out_validation", "read_image_file", "register_dataset", "relabel",
    "resolve_root", "validation_view",
    "Market1501", "parse_market1501_name", "DukeMTMCreID", "parse_dukemtmc_name", "MSMT17", "parse_msmt17_name",
    "CUHK03NP", "parse_cuhk03np_name", "CUHK01", "parse_cuhk01_name", "FolderDataset", "SyntheticReID",
    "render_person", "RandPerson", "parse_randperson_name",
]
