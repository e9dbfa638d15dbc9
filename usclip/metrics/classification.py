"""Classification metrics: accuracy, AUC, sensitivity, specificity and F1 (torchmetrics), and the ROC curve.

Two classes are treated as a binary task on the probability of class 1 (the positive class, e.g.
malignant); more classes use torchmetrics' multiclass metrics with macro averaging, except accuracy, which
is the plain fraction of correct predictions (micro average).
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryRecall,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassRecall,
    MulticlassSpecificity,
)
from torchmetrics.functional.classification import binary_roc, multiclass_roc
from torchmetrics.wrappers import LambdaInputTransformer

__all__ = ["build_classification_metrics", "positive_class_probability", "roc_curve"]


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")


def positive_class_probability(probs: Tensor) -> Tensor:
    """Probability of class 1 from (N, 2) class probabilities; (N,) probabilities pass through.

    Args:
        probs: class probabilities (N, 2) or positive-class probabilities (N,).

    Returns:
        Tensor (N,).

    Raises:
        ValueError: for any other shape.
    """
    if probs.ndim == 2 and probs.shape[1] == 2:
        return probs[:, 1]
    if probs.ndim == 1:
        return probs
    raise ValueError(
        f"binary metrics take class probabilities of shape (N, 2) or positive-class probabilities of shape (N,), "
        f"got shape {tuple(probs.shape)}."
    )


def build_classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, AUC, sensitivity, specificity and F1 as one ``MetricCollection``.

    Keys: ``acc``, ``auc``, ``sensitivity``, ``specificity``, ``f1``. Update the collection with class
    probabilities (N, C) (softmax of the logits) and integer labels (N,).
    For ``num_classes == 2`` the metrics are binary on the probability of class 1 (thresholded at 0.5 where a
    decision is needed); (N,) positive-class probabilities are accepted too. Otherwise they are multiclass,
    macro-averaged over classes, and accuracy is micro-averaged (fraction of correct predictions).

    Args:
        num_classes: number of classes, at least 2.

    Returns:
        A ``MetricCollection``; clone it per stage with ``prefix=``.

    Raises:
        ValueError: if ``num_classes`` is not an integer >= 2.
    """
    _check_num_classes(num_classes)
    metrics: dict[str, Metric | MetricCollection]
    if num_classes == 2:
        binary: dict[str, Metric] = {
            "acc": BinaryAccuracy(),
            "auc": BinaryAUROC(),
            "sensitivity": BinaryRecall(),
            "specificity": BinarySpecificity(),
            "f1": BinaryF1Score(),
        }
        metrics = {
            name: LambdaInputTransformer(metric, transform_pred=positive_class_probability)
            for name, metric in binary.items()
        }
    else:
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "auc": MulticlassAUROC(num_classes, average="macro"),
            "sensitivity": MulticlassRecall(num_classes, average="macro"),
            "specificity": MulticlassSpecificity(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
    return MetricCollection(metrics)


def roc_curve(
    probs: Tensor, target: Tensor, num_classes: int
) -> tuple[Tensor | list[Tensor], Tensor | list[Tensor], Tensor | list[Tensor]]:
    """ROC curve: false positive rate, true positive rate and thresholds.

    Computed by torchmetrics' ``binary_roc`` (two classes) or ``multiclass_roc`` (one-vs-rest).

    Args:
        probs: class probabilities (N, C), or positive-class probabilities (N,) when ``num_classes == 2``.
        target: integer labels (N,).
        num_classes: number of classes, at least 2.

    Returns:
        ``(fpr, tpr, thresholds)``: tensors for two classes (the curve of class 1), one-vs-rest lists of C
        tensors otherwise.

    Raises:
        ValueError: if ``num_classes`` is not an integer >= 2 or ``probs`` has the wrong shape.
    """
    _check_num_classes(num_classes)
    if num_classes == 2:
        fpr, tpr, thresholds = binary_roc(positive_class_probability(probs), target)
        return fpr, tpr, thresholds
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(f"`probs` must have shape (N, {num_classes}), got {tuple(probs.shape)}.")
    fprs, tprs, thresholds_list = multiclass_roc(probs, target, num_classes=num_classes)
    return fprs, tprs, thresholds_list
