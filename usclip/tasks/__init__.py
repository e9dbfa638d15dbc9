"""Lightning tasks."""

from usclip.tasks.base import BaseTask
from usclip.tasks.classification import ClassificationTask
from usclip.tasks.segmentation import SegmentationTask

__all__ = ["BaseTask", "ClassificationTask", "SegmentationTask"]
