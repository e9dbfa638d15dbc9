"""Evaluation metrics: per-image segmentation metrics (Dice, IoU, HD95, ASD) and classification metrics.

See docs/metrics.md for the definitions, the metric protocols (``"strict"``, ``"authors"``) and the relation to
MONAI.
"""

from usclip.metrics import functional
from usclip.metrics.classification import build_classification_metrics, roc_curve
from usclip.metrics.functional import asd, boundaries, dice, hd95, iou, surface_distances
from usclip.metrics.protocol import METRIC_PROTOCOLS, MetricProtocol, check_metric_protocol, per_image_values
from usclip.metrics.segmentation import SEGMENTATION_METRICS, SegmentationMetrics

__all__ = [
    "METRIC_PROTOCOLS",
    "SEGMENTATION_METRICS",
    "MetricProtocol",
    "SegmentationMetrics",
    "asd",
    "boundaries",
    "build_classification_metrics",
    "check_metric_protocol",
    "dice",
    "functional",
    "hd95",
    "iou",
    "per_image_values",
    "roc_curve",
    "surface_distances",
]
