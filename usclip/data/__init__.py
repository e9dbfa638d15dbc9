"""Data: datasets over the generic folder layout, transforms, splits, DataModules and the synthetic generator."""

from usclip.data.captions import CaptionDataModule, CaptionSource
from usclip.data.datamodules import BaseDataModule, ClassificationDataModule, SegmentationDataModule, SyntheticSpec

__all__ = [
    "BaseDataModule",
    "CaptionDataModule",
    "CaptionSource",
    "ClassificationDataModule",
    "SegmentationDataModule",
    "SyntheticSpec",
]
