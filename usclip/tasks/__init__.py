"""Lightning tasks."""

from usclip.tasks.base import BaseTask
from usclip.tasks.segmentation import SegmentationTask

__all__ = ["BaseTask", "SegmentationTask"]
