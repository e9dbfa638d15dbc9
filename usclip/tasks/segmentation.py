"""SegmentationTask: lesion segmentation with the paper's head and MONAI's Dice + cross-entropy loss."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from monai.losses import DiceCELoss
from torch import nn

from usclip._io import write_text_atomic
from usclip.data.bad_samples import is_empty_batch, skipped_samples
from usclip.data.crop import paste_back
from usclip.metrics import MetricProtocol, SegmentationMetrics, check_metric_protocol
from usclip.models.authors_heads import AUTHORS_HEADS, build_authors_head
from usclip.models.heads import SegmentationHead
from usclip.tasks.base import BaseTask
from usclip.tasks.prediction import Prediction
from usclip.visualize import get_palette, overlay, overlay_text, save_png

log = logging.getLogger(__name__)

#: masks (MB) the validation and test metrics keep on the device before measuring them together (one host
#: synchronisation per loop instead of one per batch; ``SegmentationMetrics(defer_mb=...)``): 64 MB holds 660
#: prediction/reference pairs at 224 px
DEFER_METRICS_MB = 64.0


class SegmentationTask(BaseTask):
    """Segment the lesion with a frozen CLIP encoder, adapters and the paper's light head.

    Metrics (val and test): Dice, IoU, HD95 and ASD per image, averaged under ``metric_protocol`` (see
    ``docs/metrics.md``); the best checkpoint is the one with the highest ``val_dice``. ``usclip test`` writes
    ``results/test_metrics.json`` (with ``"metric_protocol"``), the per-image table ``results/test_per_image.csv``
    (with a ``metric_protocol`` column) and overlays into the run directory. ``predict_step`` returns masks and
    probabilities at each image's original size (:class:`~usclip.tasks.Prediction`); ``usclip predict`` writes them
    with :class:`~usclip.tasks.PredictionWriter`. The regions of a DICOM file read with ``data.regions: all`` are
    predicted one by one and pasted into one mask (and one overlay) per file, named by the file's id, at their
    places.

    Args:
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        dice_squared_pred: square the predictions in the Dice denominator (MONAI's ``squared_pred``; the authors'
            code: ``true``).
        dice_smooth: Dice smoothing added to numerator and denominator (MONAI's ``smooth_nr``/``smooth_dr``; 1e-5,
            MONAI's default; the authors' code: 1e-8).
        num_overlays: test images written as overlay pictures (PIL: fast; each PNG records its palette and, for
            DICOM input, its pixel spacing, which the overlay grids of ``usclip report`` use for scale bars).
        text_prompt: CLIPSeg's text prompt (``model_name: clipseg:...``): a dataset name (``busi``, ``ddti``,
            ``tn3k``, ``ln1``, ``ln2``, ``prostate``: the authors' prompt for it), an organ name or your own sentence.
        metric_protocol: ``strict`` (every image counts: an empty prediction is charged the image diagonal, an
            empty ground truth scores Dice 1 or 0; symmetric ASD) or ``authors`` (the paper's code: MONAI's values
            with NaN / inf dropped, so missed lesions leave HD95 / ASD and empty ground truths never count;
            directed ASD, prediction -> ground truth). Applies to validation (and so to the best checkpoint's
            choice) and test; recorded in every results file.
        palette: colours of the test overlays: ``paper`` (red missed, green false positive, yellow true positive)
            or ``okabe-ito`` (colour-blind-safe: vermillion, sky blue, yellow; docs/reports.md).
        **kwargs: encoder, head and optimiser arguments of :class:`~usclip.tasks.BaseTask` (``model_name``,
            ``pretrained``, ``adapter``, ``layers``, ``lr``, ...).
    """

    monitor = "val_dice"
    monitor_mode: Literal["min", "max"] = "max"
    num_val_overlays = 4  # validation images shown in TensorBoard each epoch (first validation batch)

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        dice_squared_pred: bool = False,
        dice_smooth: float = 1e-5,
        num_overlays: int = 8,
        text_prompt: str | None = None,
        metric_protocol: MetricProtocol = "strict",
        palette: str = "paper",
        **kwargs: Any,
    ) -> None:
        get_palette(palette)  # a bad name: an error now, not after the test
        if text_prompt is not None and not str(kwargs.get("model_name", "")).startswith("clipseg"):
            raise ValueError(
                f"text_prompt is for CLIPSeg (model_name: clipseg:<checkpoint>, head: native); model_name="
                f"{kwargs.get('model_name')!r} takes no prompt (set text_prompt: null)"
            )
        super().__init__(**kwargs)

    def build_head(self, in_channels: list[int]) -> nn.Module:  # noqa: D102
        hp = self.hparams
        if hp["head"] in AUTHORS_HEADS:
            return build_authors_head(hp["head"], "segmentation", in_channels, hp["num_classes"], hp["embed_dim"])
        return SegmentationHead(in_channels, hp["num_classes"], hp["embed_dim"], hp["fusion"])

    def configure_losses(self) -> None:  # noqa: D102
        self.criterion = DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            lambda_dice=self.hparams["lambda_dice"],
            lambda_ce=self.hparams["lambda_ce"],
            squared_pred=bool(self.hparams.get("dice_squared_pred", False)),
            smooth_nr=float(self.hparams.get("dice_smooth", 1e-5)),
            smooth_dr=float(self.hparams.get("dice_smooth", 1e-5)),
        )

    def configure_metrics(self) -> None:  # noqa: D102
        protocol = check_metric_protocol(self.hparams.get("metric_protocol", "strict"))
        # masks kept on the device and measured once per loop: no host synchronisation per batch
        self.val_metrics = SegmentationMetrics(protocol=protocol, defer_mb=DEFER_METRICS_MB)
        self.test_metrics = SegmentationMetrics(protocol=protocol, defer_mb=DEFER_METRICS_MB)

    def _loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits.float(), mask.unsqueeze(1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:  # noqa: D102
        if is_empty_batch(batch):  # every sample was a bad file (data.on_bad_sample: skip): no step
            return None
        loss = self._loss(self(batch["image"]), batch["mask"])
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch["image"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Any], metrics: SegmentationMetrics, stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self._loss(logits, batch["mask"])
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val", batch_size=logits.shape[0])
        pred = logits.argmax(1)
        metrics.update(pred > 0, batch["mask"] > 0, index=batch["index"])
        return pred

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # noqa: D102
        if is_empty_batch(batch):
            return
        pred = self._eval_step(batch, self.val_metrics, "val")
        if batch_idx == 0:
            self._log_val_overlays(batch, pred)

    def _log_val_overlays(self, batch: dict[str, Any], pred: torch.Tensor) -> None:
        """The first ``num_val_overlays`` validation images as overlays in TensorBoard, one step per epoch."""
        if not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return
        if not self.trainer.is_global_zero:
            return
        for j in range(min(self.num_val_overlays, pred.shape[0])):
            picture = _overlay(batch, pred, j, self.hparams.get("palette", "paper"))
            tag = f"val_overlays/{j}_{batch['id'][j]}"
            self.logger.experiment.add_image(tag, picture, self.current_epoch, dataformats="HWC")

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # noqa: D102
        if is_empty_batch(batch):
            return
        pred = self._eval_step(batch, self.test_metrics, "test")
        self._write_test_overlays(batch, pred)

    def on_test_epoch_end(self) -> None:  # noqa: D102
        values = self._log_metrics(self.test_metrics, "test")
        out = self.run_dir
        # under DDP every process joins the gather of the per-image columns (a no-op on one process); rank zero
        # then writes the table from the gathered state without gathering again
        self.test_metrics.sync()
        if out is None or not self.trainer.is_global_zero:
            self.test_metrics.reset()
            return
        dataset = self.trainer.test_dataloaders.dataset  # type: ignore[union-attr]
        gathered: torch.Tensor = self.test_metrics.index  # type: ignore[assignment]  # the synced index column
        num_images = int(gathered.numel())
        self.test_metrics.write_csv(out / "results" / "test_per_image.csv", ids=list(dataset.ids))
        summary: dict[str, float | int | str] = {k: float(v) for k, v in values.items()}
        summary |= {"num_images": num_images, "metric_protocol": self.test_metrics.protocol}
        summary |= skipped_samples(self.trainer, "test")
        write_text_atomic(out / "results" / "test_metrics.json", json.dumps(summary, indent=2) + "\n")
        log.info("test results written to %s", out / "results")
        self.test_metrics.reset()

    def _log_metrics(self, metrics: SegmentationMetrics, stage: str) -> dict[str, torch.Tensor]:
        values = metrics.compute()
        self.log(f"{stage}_dice", values["dice"].float(), prog_bar=stage == "val")
        self.log_dict({f"{stage}_{k}": v.float() for k, v in values.items() if k != "dice"})
        if stage == "val":
            metrics.reset()
        return values

    def _write_test_overlays(self, batch: dict[str, Any], pred: torch.Tensor) -> None:
        out = self.run_dir
        if out is None or not self.trainer.is_global_zero:
            return
        seen = int(batch["index"].min())
        palette = self.hparams.get("palette", "paper")  # checkpoints from before the option: the paper's
        for j in range(pred.shape[0]):
            if seen + j >= self.hparams["num_overlays"]:
                break
            picture = _overlay(batch, pred, j, palette)
            text = overlay_text(palette, _overlay_spacing(batch, j))
            save_png(picture, out / "overlays" / f"{batch['id'][j]}.png", text=text)

    def _predictions(self, batch: dict[str, Any], logits: torch.Tensor) -> list[Prediction]:
        """Masks and class probabilities at each image's original size (:meth:`BaseTask.predict_step`)."""
        predictions = []
        for j in range(logits.shape[0]):
            fields = self._prediction_fields(batch, j)
            (h, w), (x0, y0, x1, y1) = fields["size"], fields["crop_box"]
            # map the logits, not the hard mask, back through crop and resize: smoother boundaries; outside the
            # crop both logits are 0 and argmax picks background
            full = paste_back(logits[j].float(), fields["crop_box"], (h, w), mode="bilinear")
            mask = (full.argmax(0) > 0).cpu().numpy()
            probabilities = torch.zeros_like(full)
            probabilities[0] = 1.0  # outside the crop: background, as the mask says
            probabilities[:, y0:y1, x0:x1] = full[:, y0:y1, x0:x1].softmax(0)
            predictions.append(Prediction(mask=mask, probabilities=probabilities.cpu().numpy(), **fields))
        return predictions


def _overlay(batch: dict[str, Any], pred: torch.Tensor, j: int, palette: str = "paper") -> np.ndarray:
    """Overlay picture of sample ``j`` of a batch: its (model-size) image, prediction and ground truth."""
    image = batch["image"][j, 0].float().cpu().numpy()  # [0, 1]; overlay() converts to uint8
    return overlay(image, pred[j].cpu().numpy(), batch["mask"][j].cpu().numpy(), palette=palette)


def _overlay_spacing(batch: dict[str, Any], j: int) -> tuple[float, float] | None:
    """``(row, column)`` pixel spacing in mm of sample ``j`` at the model's size; ``None`` when unknown (not DICOM).

    The crop of ``w x h`` pixels was resized to the model's ``W x H``: row spacing x ``h / H``, column x ``w / W``.
    """
    if "spacing" not in batch or "crop_box" not in batch:
        return None
    sy, sx = (float(v) for v in batch["spacing"][j])
    if not (np.isfinite(sy) and np.isfinite(sx)):
        return None
    x0, y0, x1, y1 = (int(v) for v in batch["crop_box"][j])
    height, width = batch["image"].shape[-2:]
    return sy * (y1 - y0) / height, sx * (x1 - x0) / width
