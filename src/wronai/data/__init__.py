"""Data processing: sources -> formats -> tokenization and masking -> packing/collation."""

from wronai.data.collate import PackedCollator, PaddingCollator, pack_examples
from wronai.data.prepare import build_datasets
from wronai.data.stats import DataStats, PreparedData

__all__ = [
    "DataStats",
    "PackedCollator",
    "PaddingCollator",
    "PreparedData",
    "build_datasets",
    "pack_examples",
]
