"""Evaluation metrics: per-image segmentation metrics (Dice, IoU, HD95, ASD) and classification metrics.

See docs/metrics.md for the definitions, the empty-mask policy and the relation to MONAI.
"""

from usclip.metrics import functional
from usclip.metrics.classification import build_classification_metrics, roc_curve
from usclip.metrics.functional import asd, boundaries, dice, hd95, iou, surface_distances
from usclip.metrics.segmentation import SEGMENTATION_METRICS, SegmentationMetrics

__all__ = [
    "SEGMENTATION_METRICS",
    "SegmentationMetrics",
    "asd",
    "boundaries",
    "build_classification_metrics",
    "dice",
    "functional",
    "hd95",
    "iou",
    "roc_curve",
    "surface_distances",
]
