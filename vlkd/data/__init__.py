"""Datasets as dict samples ``{"pixel_values", "label"?, "caption"?}``, built from specs such as ``shapes:32``."""

from vlkd.data.assets import assets_dir
from vlkd.data.base import VlkdDataset
from vlkd.data.collate import collate
from vlkd.data.spec import build_dataset, dataset_info

__all__ = ["VlkdDataset", "assets_dir", "build_dataset", "collate", "dataset_info"]
