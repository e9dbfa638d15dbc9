"""Data: datasets over the generic folder layout, transforms, splits, DataModules and the synthetic generator."""

from usclip.data.captions import CaptionDataModule
from usclip.data.datamodules import (
    BaseDataModule,
    ClassificationDataModule,
    SegmentationDataModule,
    SyntheticSpec,
    ZeroShotDataModule,
)

__all__ = [
    "BaseDataModule", "CaptionDataModule", "ClassificationDataModule", "SegmentationDataModule", "SyntheticSpec",
    "ZeroShotDataModule",
]
