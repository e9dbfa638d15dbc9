"""Lightning tasks, the one-image API (``load_task``, ``predict_image``) and the prediction writer."""

from usclip.tasks.base import BaseTask
from usclip.tasks.classification import ClassificationTask
from usclip.tasks.contrastive import CaptionFinetuneTask
from usclip.tasks.loading import load_task
from usclip.tasks.prediction import Prediction, PredictionWriter
from usclip.tasks.segmentation import SegmentationTask
from usclip.tasks.zeroshot import ZeroShotClassifier

__all__ = [
    "BaseTask",
    "CaptionFinetuneTask",
    "ClassificationTask",
    "Prediction",
    "PredictionWriter",
    "SegmentationTask",
    "ZeroShotClassifier",
    "load_task",
]
