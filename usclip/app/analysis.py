"""One uploaded scan -> what the web page shows: overlay, class probabilities, lesion area (no Gradio here).

Kept apart from :mod:`usclip.app.page` so that the numbers the page prints are computed, and tested, without a
browser or Gradio: the page only lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

#: the files the page accepts (PNG, JPEG, BMP, TIFF and ultrasound DICOM), as ``task.predict_image`` reads them
ACCEPTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
#: the suffix of DICOM files (the only files whose pixel spacing is read)
DICOM_SUFFIX = ".dcm"


class Predictor(Protocol):
    """What the page needs of a task: :meth:`usclip.tasks.BaseTask.predict_image` and the ``task`` kind."""

    task: str

    def predict_image(self, image: Any) -> Any:  # noqa: D102
        ...


@dataclass(frozen=True)
class Analysis:
    """The page's view of one scan.

    Attributes:
        name: the uploaded file's name.
        size: ``(H, W)`` of the scan as uploaded.
        overlay: uint8 RGB ``(H, W, 3)``: the scan with the predicted lesion drawn on it (segmentation), or the
            scan itself (classification); ``Prediction.overlay()``.
        probabilities: classification: ``{class name: probability}`` in class order; segmentation: ``None``.
        label_name: classification: the predicted class's name; segmentation: ``None``.
        lesion_pixels: segmentation: pixels of the predicted mask; classification: ``None``.
        spacing: ``(row, column)`` pixel spacing in millimetres from the DICOM file's largest tissue region;
            ``None`` for other files and DICOM files without a physical spacing in cm.
    """

    name: str
    size: tuple[int, int]
    overlay: np.ndarray
    probabilities: dict[str, float] | None = None
    label_name: str | None = None
    lesion_pixels: int | None = None
    spacing: tuple[float, float] | None = None

    @property
    def lesion_mm2(self) -> float | None:
        """The lesion's area in mm² (pixels times the row and column spacing); ``None`` without both."""
        if self.lesion_pixels is None or self.spacing is None:
            return None
        return self.lesion_pixels * self.spacing[0] * self.spacing[1]

    def summary(self) -> str:
        """The page's text under the image (Markdown): size, and the lesion area or the predicted class."""
        h, w = self.size
        lines = [f"**{self.name}**: {w} x {h} pixels (width x height)"]
        if self.lesion_pixels is not None:
            share = 100.0 * self.lesion_pixels / (h * w)
            lines.append(f"Lesion area: {self.lesion_pixels} pixels ({share:.2f}% of the image)")
            if self.lesion_mm2 is not None and self.spacing is not None:
                lines.append(
                    f"Lesion area: {self.lesion_mm2:.2f} mm² (pixel spacing {self.spacing[0]:.4g} x "
                    f"{self.spacing[1]:.4g} mm, row x column, from the DICOM file)"
                )
            else:
                lines.append("Lesion area in mm²: unknown (no pixel spacing: upload a DICOM file that gives it)")
        if self.label_name is not None:
            lines.append(f"Predicted class: {self.label_name}")
        return "\n\n".join(lines)


def check_upload(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path` if it is an existing file of an accepted kind.

    Raises:
        FileNotFoundError: if it does not exist.
        ValueError: naming the file and its suffix if it is not one of :data:`ACCEPTED_SUFFIXES`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"uploaded file {path.name} does not exist (at {path})")
    if path.suffix.lower() not in ACCEPTED_SUFFIXES:
        raise ValueError(
            f"{path.name}: files of type {path.suffix or '(no suffix)'!r} are not read; "
            f"expected one of {', '.join(ACCEPTED_SUFFIXES)}"
        )
    return path


def dicom_spacing(path: str | Path) -> tuple[float, float] | None:
    """The ``(row, column)`` pixel spacing in mm of a DICOM file (its largest tissue region), from its header.

    The region :func:`usclip.data.dicom.read_dicom` crops to, so the spacing is that of the pixels the model saw;
    ``None`` when the file gives no spacing in cm, and for files that are not DICOM (by suffix).
    """
    path = Path(path)
    if path.suffix.lower() != DICOM_SUFFIX:
        return None
    from usclip.data.dicom import read_dicom

    return read_dicom(path).spacing


def class_names(task: Any, num_classes: int) -> list[str]:
    """The task's class names in index order: its ``label_names`` (checkpoint or hyperparameters), else ``0``, ``1``."""
    names = getattr(task, "label_names", None)
    if not names:
        hparams = getattr(task, "hparams", None) or {}
        names = hparams.get("label_names") or hparams.get("class_names")
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def analyse(task: Predictor, path: str | Path) -> Analysis:
    """Run ``task`` on one uploaded file and collect what the page shows.

    Args:
        task: a loaded task (:func:`usclip.tasks.load_task`): its ``predict_image`` does the training crop,
            resize, forward pass and paste-back.
        path: the uploaded file (one of :data:`ACCEPTED_SUFFIXES`).

    Raises:
        FileNotFoundError, ValueError: for a missing file or one of another kind (see :func:`check_upload`); the
            readers' errors (``ImageReadError``) for a file that cannot be read.
    """
    path = check_upload(path)
    pred = task.predict_image(path)
    overlay = np.asarray(pred.overlay(), dtype=np.uint8)
    size = (int(pred.size[0]), int(pred.size[1]))
    if pred.mask is not None:
        return Analysis(
            name=path.name,
            size=size,
            overlay=overlay,
            lesion_pixels=int(np.count_nonzero(pred.mask)),
            spacing=dicom_spacing(path),
        )
    probs = np.asarray(pred.probabilities, dtype=np.float64).reshape(-1)
    names = class_names(task, len(probs))
    label_name = pred.label_name if pred.label_name is not None else names[int(pred.label)]
    return Analysis(
        name=path.name,
        size=size,
        overlay=overlay,
        probabilities={n: float(p) for n, p in zip(names, probs, strict=True)},
        label_name=label_name,
    )
