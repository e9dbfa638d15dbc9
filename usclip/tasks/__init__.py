"""Lightning tasks."""

from usclip.tasks.base import BaseTask, EncoderArgs
from usclip.tasks.segmentation import SegmentationTask

__all__ = ["BaseTask", "EncoderArgs", "SegmentationTask"]
