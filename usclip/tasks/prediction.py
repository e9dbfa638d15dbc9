"""What a task predicts for one image (:class:`Prediction`), and the callback that writes predictions to files.

``predict_step`` of the segmentation and classification tasks returns a list of :class:`Prediction` (masks and
probabilities at each image's original size) and writes nothing; ``BaseTask.predict_image`` returns them for images
given in Python. :class:`PredictionWriter` writes them: ``usclip predict`` adds it; a user of plain Lightning adds
it to the Trainer's callbacks (without it, ``trainer.predict`` writes no file). It writes per batch, so a long
prediction run keeps flat memory when ``trainer.predict(..., return_predictions=False)`` drops the returned lists
(``usclip predict`` does: ``usclip._resume.prepare_subcommand``).

Files, under ``<run dir>/predictions`` (or ``output_dir``):

- segmentation: ``masks/<id>.png`` (0/255 at the original size) and ``overlays/<id>.png``; the regions of a
  multi-region DICOM file (``data.regions: all``) are kept under ``.regions/<file id>/`` until the epoch ends and
  then merged (logical OR) into the file's one mask and overlay;
- classification: ``probabilities.csv`` (``id, prediction, prob_<class>...``), streamed into one hidden part file
  per process and joined at the epoch end, so an interrupted run never leaves a truncated table.
"""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from usclip._io import atomic_path, disk_full_named
from usclip.data.crop import Box
from usclip.data.imageio import load_grayscale
from usclip.visualize import overlay, save_png

log = logging.getLogger(__name__)

__all__ = ["Prediction", "PredictionWriter", "merge_region_predictions"]

#: where the writer keeps each region's mask of a multi-region DICOM until the file's mask is merged
REGION_PARTS = ".regions"


@dataclass(eq=False)
class Prediction:
    """The prediction for one image, at its original size.

    Attributes:
        id: the file stem, ``image`` / ``image_<k>`` for an image given in memory, ``<stem>@r<k>`` for a region of a
            multi-region DICOM file (``predict_image`` merges the regions into one prediction named by the file).
        size: ``(H, W)`` of the original image.
        mask: segmentation: bool ``(H, W)``, the lesion; classification: ``None``.
        probabilities: segmentation: float32 ``(C, H, W)`` (outside the crop box: background, probability 1);
            classification: float32 ``(C,)``.
        label: classification: the predicted class index; segmentation: ``None``.
        label_name: the class name of ``label`` when the task knows its class names; else ``None``.
        crop_box: ``(x0, y0, x1, y1)`` of the area the model saw, in original pixels (end exclusive).
        path: the image file, ``None`` for an image given in memory.
        image: the grey original (H, W) uint8 of an image given in memory; files are read again by :meth:`overlay`.
        region: ``(file id, region number)`` for a region of a multi-region DICOM file, else ``None``.
    """

    id: str
    size: tuple[int, int]
    mask: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    label: int | None = None
    label_name: str | None = None
    crop_box: Box | None = None
    path: Path | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    region: tuple[str, int] | None = None

    def original(self) -> np.ndarray:
        """The original image as H x W uint8 grey (read from :attr:`path` unless it was given in memory)."""
        if self.image is not None:
            return self.image
        if self.path is None:
            raise ValueError(f"prediction {self.id!r} holds neither its image nor its file")
        return load_grayscale(self.path, None)  # already read once under the run's pixel limit

    def overlay(self) -> np.ndarray:
        """uint8 RGB ``(H, W, 3)``: the original image with the mask drawn on it (classification: no mask).

        The colours of :func:`usclip.visualize.overlay` (what ``usclip predict`` writes to ``overlays/``).
        """
        original = self.original()
        if self.mask is None:
            return np.repeat(original[..., None], 3, axis=2)
        return overlay(original, self.mask)


def merge_region_predictions(parts: list[Prediction], file_id: str) -> Prediction:
    """One prediction for a DICOM file from those of its tissue regions (each already at the frame's size).

    The mask is the union (logical OR) of the regions' masks, as :class:`PredictionWriter` merges them; the
    probabilities are each region's inside its crop box (a later region wins where boxes overlap), background
    elsewhere.
    """
    first = parts[0]
    mask = np.zeros(first.size, bool)
    probabilities = None
    if first.probabilities is not None:
        probabilities = np.zeros_like(first.probabilities)
        probabilities[0] = 1.0
    for p in parts:
        assert p.mask is not None and p.crop_box is not None
        mask |= p.mask
        if probabilities is not None and p.probabilities is not None:
            x0, y0, x1, y1 = p.crop_box
            probabilities[:, y0:y1, x0:x1] = p.probabilities[:, y0:y1, x0:x1]
    return Prediction(
        id=file_id,
        size=first.size,
        mask=mask,
        probabilities=probabilities,
        crop_box=None,
        path=first.path,
        image=first.image,
    )


def merge_masks(paths: list[Path], shape: tuple[int, ...]) -> np.ndarray:
    """The union (logical OR) of full-frame 0/255 mask files, as a {0, 1} uint8 array of ``shape``."""
    merged = np.zeros(shape, bool)
    for p in paths:
        with Image.open(p) as im:
            merged |= np.asarray(im) > 0
    return merged.astype(np.uint8)


class PredictionWriter(BasePredictionWriter):
    """Write what ``predict_step`` returns: masks and overlays (segmentation) or ``probabilities.csv``.

    ``usclip predict`` adds one; with plain Lightning, ``L.Trainer(callbacks=[PredictionWriter()])``. Writes after
    every batch (``write_interval="batch"``); under DDP each process writes its own images and rank zero merges
    the regions of multi-region DICOM files and joins the per-process CSV parts after a barrier.

    Args:
        output_dir: the folder to write into; ``None``: ``<run dir>/predictions`` (the run directory of the
            trainer's logger, ``default_root_dir`` without one).
    """

    def __init__(self, output_dir: str | Path | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._out: Path | None = None
        self._csv_part: Path | None = None
        self._paths: dict[str, Path] = {}  # file id -> its file, for the regions this process wrote

    # ----------------------------------------------------------------- where
    def _folder(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        if self.output_dir is not None:
            return self.output_dir
        from usclip.run_dirs import run_dir_of

        # the task's lookup is cached per stage (a broadcast under DDP: every process must ask equally often)
        run = pl_module.run_dir if hasattr(type(pl_module), "run_dir") else run_dir_of(trainer)  # type: ignore[attr-defined]
        return run / "predictions" if run is not None else None

    @staticmethod
    def _classification(pl_module: L.LightningModule) -> bool:
        return getattr(pl_module, "task", None) == "classification"

    def _csv_columns(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        names = pl_module.class_names() if hasattr(pl_module, "class_names") else None
        if not names:
            names = [str(i) for i in range(int(pl_module.hparams["num_classes"]))]
        return ["id", "prediction", *(f"prob_{n}" for n in names)]

    # ----------------------------------------------------------------- hooks
    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._out = self._folder(trainer, pl_module)
        self._csv_part = None
        self._paths = {}
        if self._out is None:
            return
        if self._classification(pl_module):
            # rows stream into a hidden per-process part file; the epoch end renames (one process) or joins (DDP)
            self._csv_part = self._out / f".probabilities.rank{trainer.global_rank}.csv.part"
            self._csv_part.parent.mkdir(parents=True, exist_ok=True)
            with self._csv_part.open("w", newline="") as f:
                if trainer.global_rank == 0:
                    csv.writer(f).writerow(self._csv_columns(trainer, pl_module))
            return
        if trainer.is_global_zero:
            shutil.rmtree(self._out / REGION_PARTS, ignore_errors=True)  # left by an interrupted run
        trainer.strategy.barrier("predict_regions_start")

    def write_on_batch_end(  # noqa: D102
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        out = self._out
        if out is None or not prediction:
            return
        if self._csv_part is not None:
            rows = []
            for p in prediction:
                assert p.probabilities is not None
                rows.append([p.id, p.label, *p.probabilities.tolist()])
            with disk_full_named(out / "probabilities.csv", "predictions"), self._csv_part.open("a", newline="") as f:
                csv.writer(f).writerows(rows)
            return
        for p in prediction:
            assert p.mask is not None
            picture = (p.mask * 255).astype(np.uint8)
            if p.region is not None:
                file_id, k = p.region
                save_png(picture, out / REGION_PARTS / file_id / f"r{k}.png")
            else:
                save_png(picture, out / "masks" / f"{p.id}.png")
                save_png(p.overlay(), out / "overlays" / f"{p.id}.png")

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Join the CSV parts (classification) or merge the regions of multi-region DICOM files (segmentation)."""
        out = self._out
        if out is None:
            return
        if self._csv_part is not None:
            trainer.strategy.barrier("predict_csv")
            if not trainer.is_global_zero:
                return
            final = out / "probabilities.csv"
            parts = [out / f".probabilities.rank{r}.csv.part" for r in range(trainer.world_size)]
            with atomic_path(final, what="predictions") as tmp, tmp.open("wb") as f:
                for part in parts:
                    f.write(part.read_bytes())
            for part in parts:
                part.unlink()
            log.info("predictions written to %s", final)
            return
        trainer.strategy.barrier("predict_regions")
        parts_dir = out / REGION_PARTS
        if not trainer.is_global_zero or not parts_dir.is_dir():
            return
        dataset = trainer.predict_dataloaders.dataset  # type: ignore[union-attr]
        index = dataset.index
        paths = {file_id: index.images[sid] for sid, (file_id, _) in index.regions.items()}
        for folder in sorted(parts_dir.iterdir()):
            original = load_grayscale(paths[folder.name], dataset.max_image_pixels)
            mask = merge_masks(sorted(folder.glob("r*.png")), original.shape)
            save_png((mask * 255).astype(np.uint8), out / "masks" / f"{folder.name}.png")
            save_png(overlay(original, mask), out / "overlays" / f"{folder.name}.png")
        shutil.rmtree(parts_dir)
