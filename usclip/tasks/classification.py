"""ClassificationTask: benign/malignant (or any label) classification with the paper's pooling head and focal loss."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from monai.losses import FocalLoss
from torch import nn

from usclip._io import write_csv_atomic, write_text_atomic
from usclip.data.bad_samples import is_empty_batch, skipped_samples
from usclip.metrics import MetricProtocol, build_classification_metrics, check_metric_protocol, roc_curve
from usclip.models.authors_heads import AUTHORS_HEADS, build_authors_head
from usclip.models.heads import ClassificationHead
from usclip.tasks.base import BaseTask
from usclip.tasks.prediction import Prediction
from usclip.visualize import confusion_matrix, draw_confusion_matrix, draw_roc, save_png

log = logging.getLogger(__name__)


class ClassificationTask(BaseTask):
    """Classify the lesion with a frozen CLIP encoder, adapters and the paper's head (1x1 conv, up-sampling, pooling).

    Metrics (val and test): accuracy, AUC, sensitivity, specificity and F1; the best checkpoint has the highest
    ``val_auc``. ``usclip test`` writes ``results/test_metrics.json``, ``results/test_predictions.csv`` (one row
    per image: id, label, class probabilities), the confusion matrix (``results/test_confusion_matrix.csv``/``.png``)
    and the ROC curve (``results/test_roc.png``); ``usclip predict`` writes ``predictions/probabilities.csv``
    (:class:`~usclip.tasks.PredictionWriter`).
    ``results/test_metrics.json`` records ``"metric_protocol"``.

    Args:
        gamma: focal-loss focusing parameter (0 gives cross-entropy).
        alpha: focal-loss weight of the positive class for two classes; ``None`` weighs classes equally.
        focal_activation: ``softmax`` over the classes (default) or ``sigmoid`` per class (MONAI's default, which
            the authors' ``FocalLoss(to_onehot_y=True)`` uses).
        best_by: validation metric that selects ``best.ckpt``: ``auc`` (default) or ``acc`` (the authors' code).
        metric_protocol: ``strict`` or ``authors``, recorded in ``results/test_metrics.json`` so that reports never
            mix protocols. The classification numbers are the same under both (the authors' binary torchmetrics
            over the whole test set, decisions at 0.5, are what this task computes; see ``docs/metrics.md``).
        **kwargs: encoder, head and optimiser arguments of :class:`~usclip.tasks.BaseTask` (``model_name``,
            ``pretrained``, ``adapter``, ``layers``, ``lr``, ...).
    """

    task: Literal["segmentation", "classification"] = "classification"
    monitor = "val_auc"
    monitor_mode: Literal["min", "max"] = "max"

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | None = None,
        focal_activation: Literal["softmax", "sigmoid"] = "softmax",
        best_by: Literal["auc", "acc"] = "auc",
        metric_protocol: MetricProtocol = "strict",
        **kwargs: Any,
    ) -> None:
        if focal_activation not in ("softmax", "sigmoid"):
            raise ValueError(f"focal_activation must be 'softmax' or 'sigmoid', got {focal_activation!r}")
        if best_by not in ("auc", "acc"):
            raise ValueError(f"best_by must be 'auc' or 'acc' (the validation metric of best.ckpt), got {best_by!r}")
        super().__init__(**kwargs)
        check_metric_protocol(metric_protocol)
        self.monitor = f"val_{best_by}"

    def build_head(self, in_channels: list[int]) -> nn.Module:  # noqa: D102
        hp = self.hparams
        if hp["head"] in AUTHORS_HEADS:
            return build_authors_head(hp["head"], "classification", in_channels, hp["num_classes"], hp["embed_dim"])
        return ClassificationHead(in_channels, hp["num_classes"], hp["embed_dim"], hp["fusion"])

    def configure_losses(self) -> None:  # noqa: D102
        alpha = self.hparams["alpha"]
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (weight of the positive class) or null, got {alpha}")
        softmax = self.hparams.get("focal_activation", "softmax") == "softmax"
        self.criterion = FocalLoss(to_onehot_y=True, use_softmax=softmax, gamma=self.hparams["gamma"], alpha=alpha)

    def configure_metrics(self) -> None:  # noqa: D102
        metrics = build_classification_metrics(self.hparams["num_classes"])
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    def _loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits.float(), label.view(-1, 1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:  # noqa: D102
        if is_empty_batch(batch):  # every sample was a bad file (data.on_bad_sample: skip): no step
            return None
        loss = self._loss(self(batch["image"]), batch["label"])
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch["image"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        self.log(f"{stage}_loss", self._loss(logits, batch["label"]), batch_size=logits.shape[0])
        probs = logits.float().softmax(1)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(probs, batch["label"])
        return probs

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # noqa: D102
        if is_empty_batch(batch):
            return
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def on_test_epoch_start(self) -> None:  # noqa: D102
        self._test_rows: list[list[Any]] = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # noqa: D102
        if is_empty_batch(batch):
            return
        probs = self._eval_step(batch, "test").cpu()
        for j, image_id in enumerate(batch["id"]):
            self._test_rows.append([image_id, int(batch["label"][j]), *(float(p) for p in probs[j])])

    def on_test_epoch_end(self) -> None:  # noqa: D102
        values = {k: float(v) for k, v in self.test_metrics.compute().items()}
        self.log_dict(values)
        self.test_metrics.reset()
        out = self.run_dir
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():  # rows from every process
            parts: list[list[list[Any]]] = [[] for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(parts, self._test_rows)
            self._test_rows = sorted((row for part in parts for row in part), key=lambda row: str(row[0]))
        if out is None or not self.trainer.is_global_zero:
            return
        header = ["id", "label", *self._probability_columns()]
        write_csv_atomic(out / "results" / "test_predictions.csv", header, self._test_rows)
        summary: dict[str, float | int | str] = {k.removeprefix("test_"): v for k, v in values.items()}
        protocol = self.hparams.get("metric_protocol", "strict")
        summary |= {"num_images": len(self._test_rows), "metric_protocol": protocol}
        summary |= skipped_samples(self.trainer, "test")
        write_text_atomic(out / "results" / "test_metrics.json", json.dumps(summary, indent=2) + "\n")
        self._write_test_figures(out / "results")
        log.info("test results written to %s", out / "results")

    def _write_test_figures(self, results: Path) -> None:
        """Confusion matrix (``test_confusion_matrix.csv``/``.png``, argmax predictions) and ``test_roc.png``."""
        if not self._test_rows:
            return
        num_classes = self.hparams["num_classes"]
        names = [c.removeprefix("prob_") for c in self._probability_columns()]
        labels = torch.tensor([row[1] for row in self._test_rows])
        probs = torch.tensor([row[2:] for row in self._test_rows], dtype=torch.float32)
        matrix = confusion_matrix(labels.numpy(), probs.argmax(1).numpy(), num_classes)
        rows = [[names[i], *(int(v) for v in matrix[i])] for i in range(num_classes)]
        write_csv_atomic(results / "test_confusion_matrix.csv", ["true\\predicted", *names], rows)
        save_png(draw_confusion_matrix(matrix, names), results / "test_confusion_matrix.png")
        if len(labels.unique()) < 2:  # a ROC curve needs both positives and negatives
            log.warning("test set has a single class: no ROC curve written")
            return
        fpr, tpr, _ = roc_curve(probs, labels, num_classes)
        if num_classes == 2:
            auc = float(torch.trapezoid(tpr, fpr))  # type: ignore[arg-type]
            curves = [(fpr.numpy(), tpr.numpy(), f"{names[1]} (AUC {auc:.3f})")]  # type: ignore[union-attr]
        else:
            curves = [
                (f.numpy(), t.numpy(), f"{n} vs rest (AUC {float(torch.trapezoid(t, f)):.3f})")
                for f, t, n in zip(fpr, tpr, names, strict=True)
            ]
        save_png(draw_roc(curves, title=f"ROC, {len(labels)} test images"), results / "test_roc.png")

    def _probability_columns(self) -> list[str]:
        names = self.class_names() or [str(i) for i in range(self.hparams["num_classes"])]
        return [f"prob_{n}" for n in names]

    def _predictions(self, batch: dict[str, Any], logits: torch.Tensor) -> list[Prediction]:
        """Class probabilities and the predicted class of each image (:meth:`BaseTask.predict_step`)."""
        probs = logits.float().softmax(1).cpu()
        names = self.class_names()
        predictions = []
        for j in range(probs.shape[0]):
            label = int(probs[j].argmax())
            name = names[label] if names else None
            p = probs[j].numpy().copy()
            predictions.append(
                Prediction(probabilities=p, label=label, label_name=name, **self._prediction_fields(batch, j))
            )
        return predictions
