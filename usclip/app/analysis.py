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

    @property
    def task(self) -> str:  # noqa: D102
        ...

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
        lesion_mm2: segmentation: the mask's area in mm² when the DICOM file gives the pixel spacing of every
            region the mask lies in (see :func:`lesion_area_mm2`); else ``None``.
        spacings: the distinct ``(row, column)`` pixel spacings in mm of the DICOM file's tissue regions; empty for
            other files.
        note: a remark shown under the numbers (e.g. which region of a multi-region file is classified).
    """

    name: str
    size: tuple[int, int]
    overlay: np.ndarray
    probabilities: dict[str, float] | None = None
    label_name: str | None = None
    lesion_pixels: int | None = None
    lesion_mm2: float | None = None
    spacings: tuple[tuple[float, float], ...] = ()
    note: str | None = None

    def summary(self) -> str:
        """The page's text beside the image (Markdown): size, and the lesion area or the predicted class."""
        h, w = self.size
        lines = [f"**{self.name}**: {w} x {h} pixels (width x height)"]
        if self.lesion_pixels is not None:
            share = 100.0 * self.lesion_pixels / (h * w)
            lines.append(f"Lesion area: {self.lesion_pixels} pixels ({share:.2f}% of the image)")
            spacing = "; ".join(f"{r:.4g} x {c:.4g} mm" for r, c in self.spacings)
            if self.lesion_mm2 is not None:
                lines.append(f"Lesion area: {self.lesion_mm2:.2f} mm² (pixel spacing {spacing}, row x column, DICOM)")
            elif self.spacings:
                lines.append(f"Lesion area in mm²: unknown (lesion pixels outside the regions of spacing {spacing})")
            else:
                lines.append("Lesion area in mm²: unknown (no pixel spacing: upload a DICOM file that gives it)")
        if self.label_name is not None:
            lines.append(f"Predicted class: {self.label_name}")
        if self.note:
            lines.append(self.note)
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


def lesion_area_mm2(mask: np.ndarray, path: str | Path) -> tuple[float | None, tuple[tuple[float, float], ...]]:
    """The area in mm² of ``mask`` on a DICOM frame, from its tissue regions' pixel spacing (header only).

    Each lesion pixel counts the ``row x column`` spacing of the tissue region (``SequenceOfUltrasoundRegions``,
    spacing given in cm) it lies in; where boxes overlap, the first region listed. A lesion pixel outside every
    region, or in one without a spacing, has no physical size: the area is then unknown (``None``).

    Args:
        mask: bool ``(H, W)``, the predicted lesion at the frame's size.
        path: the file; not DICOM (by suffix): ``(None, ())``.

    Returns:
        The area (``None`` when unknown) and the distinct spacings of the file's tissue regions.
    """
    path = Path(path)
    if path.suffix.lower() != DICOM_SUFFIX:
        return None, ()
    from usclip.data.dicom import dicom_regions

    regions = dicom_regions(path)
    spacings = tuple(dict.fromkeys(r.spacing for r in regions if r.spacing is not None))
    if not spacings:
        return None, ()
    areas = np.full(mask.shape, np.nan)
    for region in reversed(regions):  # the first region listed is written last: it wins where boxes overlap
        x0, y0, x1, y1 = region.box
        areas[y0:y1, x0:x1] = np.nan if region.spacing is None else region.spacing[0] * region.spacing[1]
    lesion = areas[mask.astype(bool)]
    if np.isnan(lesion).any():
        return None, spacings
    return float(lesion.sum()), spacings


def class_names(task: Any, num_classes: int) -> list[str]:
    """The task's class names in index order (``task.class_names()``, from the checkpoint), else ``0``, ``1``..."""
    names = task.class_names() if callable(getattr(task, "class_names", None)) else None
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
        FileNotFoundError: for a missing file (see :func:`check_upload`).
        ValueError: for a file of another kind; ``ImageReadError`` (a ``ValueError``) for one that cannot be read.
    """
    path = check_upload(path)
    pred = task.predict_image(path)
    note = None
    if isinstance(pred, list):  # classification of a DICOM file with several tissue regions (regions: all)
        note = f"The file holds {len(pred)} tissue regions; shown: the first ({pred[0].id})."
        pred = pred[0]
    overlay = np.asarray(pred.overlay(), dtype=np.uint8)
    size = (int(pred.size[0]), int(pred.size[1]))
    if pred.mask is not None:
        mm2, spacings = lesion_area_mm2(pred.mask, path)
        pixels = int(np.count_nonzero(pred.mask))
        return Analysis(path.name, size, overlay, lesion_pixels=pixels, lesion_mm2=mm2, spacings=spacings, note=note)
    probs = np.asarray(pred.probabilities, dtype=np.float64).reshape(-1)
    names = class_names(task, len(probs))
    label_name = pred.label_name if pred.label_name is not None else names[int(pred.label)]
    probabilities = {n: float(p) for n, p in zip(names, probs, strict=True)}
    return Analysis(path.name, size, overlay, probabilities=probabilities, label_name=label_name, note=note)
