"""Lightning tasks."""

from usclip.tasks.base import BaseTask
from usclip.tasks.classification import ClassificationTask
from usclip.tasks.contrastive import CaptionFinetuneTask
from usclip.tasks.segmentation import SegmentationTask
from usclip.tasks.zeroshot import ZeroShotClassifier

__all__ = ["BaseTask", "CaptionFinetuneTask", "ClassificationTask", "SegmentationTask", "ZeroShotClassifier"]
