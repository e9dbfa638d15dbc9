"""Data: datasets over the generic folder layout, transforms, splits, DataModules and the synthetic generator.

The DataModules are imported on first use (PEP 562), so that the dataset tools (``usclip data ...``), which need
only :mod:`usclip.data.checks`, :mod:`~usclip.data.duplicates` and friends, do not import Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from usclip.data.captions import CaptionDataModule, CaptionSource
    from usclip.data.datamodules import (
        BaseDataModule,
        ClassificationDataModule,
        SegmentationDataModule,
        SyntheticSpec,
        ZeroShotDataModule,
    )
    from usclip.data.preprocessing import Preprocessing

__all__ = [
    "BaseDataModule",
    "CaptionDataModule",
    "CaptionSource",
    "ClassificationDataModule",
    "Preprocessing",
    "SegmentationDataModule",
    "SyntheticSpec",
    "ZeroShotDataModule",
]

_LAZY = {
    "CaptionDataModule": "usclip.data.captions",
    "CaptionSource": "usclip.data.captions",
    "BaseDataModule": "usclip.data.datamodules",
    "ClassificationDataModule": "usclip.data.datamodules",
    "Preprocessing": "usclip.data.preprocessing",
    "SegmentationDataModule": "usclip.data.datamodules",
    "SyntheticSpec": "usclip.data.datamodules",
    "ZeroShotDataModule": "usclip.data.datamodules",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
