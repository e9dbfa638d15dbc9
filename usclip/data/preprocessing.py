"""What the data pipeline does to an image before the network at predict time, and one-image inputs through it.

:class:`Preprocessing` records the settings (crop of the non-imaging region, input size, colour mode, DICOM region
choice, pixel limit). A DataModule gives its own (``BaseDataModule.preprocessing``); the task copies them when it is
set up and stores them in every checkpoint, so a loaded task (``usclip.tasks.load_task``) prepares a new image as its
training data was prepared.

:class:`ImageInputs` is the dataset ``BaseTask.predict_image`` runs on: paths go through
:func:`usclip.data.datasets.decode_sample` (what ``usclip predict`` reads files with), arrays and PIL images through
:func:`gray_image` and :func:`usclip.data.datasets.decode_array`; both through
:func:`usclip.data.datasets.make_sample` with the evaluation transform. No second pipeline: the same functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from usclip.data.colour import ColourMode, check_colour_mode
from usclip.data.crop import CROP_MODES, Box, CropMode
from usclip.data.datasets import decode_array, decode_sample, make_sample
from usclip.data.dicom import RegionsMode, check_regions_mode
from usclip.data.imageio import MAX_IMAGE_PIXELS, check_max_pixels, gray_from_pil
from usclip.data.layouts import IMAGE_SUFFIXES, DatasetIndex, expand_regions
from usclip.data.transforms import build_transform

__all__ = ["ImageInput", "ImageInputs", "Preprocessing", "gray_image"]

#: what ``predict_image`` accepts as one image
ImageInput = str | Path | np.ndarray | Image.Image


@dataclass(frozen=True)
class Preprocessing:
    """The settings that turn a scan into the network's input at predict time.

    The defaults are :class:`usclip.data.BaseDataModule`'s, so a task built in Python without a DataModule prepares
    images as a DataModule with default settings would.

    Args:
        image_size: ``(height, width)`` the crop is resized to (area interpolation); an ``int`` means a square.
        crop: ``auto`` (the detected scan area; DICOM: the file's ultrasound region), ``boxes`` (a given box) or
            ``none`` (the whole image). See :mod:`usclip.data.crop`.
        colour: ``keep`` or ``replace`` coloured pixels (:mod:`usclip.data.colour`).
        regions: a DICOM file with several tissue regions: ``largest``, ``all`` (each region predicted, the masks
            merged into one per file) or ``error`` (see ``data.regions``).
        max_image_pixels: largest image file read, in pixels (``None``: no limit).

    Raises:
        ValueError: naming the field and the value, for a value outside its choices.
    """

    image_size: tuple[int, int] = (224, 224)
    crop: CropMode = "auto"
    colour: ColourMode = "keep"
    regions: RegionsMode = "largest"
    max_image_pixels: int | None = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        size = self.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[assignment]
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in size):
            raise ValueError(
                f"Preprocessing.image_size must be an int or (height, width) of at least 16 pixels, got "
                f"{self.image_size!r}"
            )
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        if self.crop not in CROP_MODES:
            raise ValueError(f"Preprocessing.crop must be one of {CROP_MODES}, got {self.crop!r}")
        check_colour_mode(self.colour, "Preprocessing.colour")
        check_regions_mode(self.regions, "Preprocessing.regions")
        check_max_pixels(self.max_image_pixels, "Preprocessing.max_image_pixels")
        if self.regions == "all" and self.crop != "auto":
            raise ValueError(
                f"Preprocessing.regions='all' needs crop='auto' (each region's own box), got {self.crop!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, strings, numbers) for a checkpoint or a JSON file."""
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict`; unknown keys are refused (naming them), missing ones take defaults.

        Raises:
            ValueError: for keys that are no field, or values outside their choices.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Preprocessing.from_dict: unknown keys {unknown}; expected some of {sorted(known)}")
        values = dict(d)
        if "image_size" in values and not isinstance(values["image_size"], int):
            values["image_size"] = tuple(values["image_size"])
        return cls(**values)

    def transform(self) -> Any:
        """The evaluation transform (resize only): :func:`usclip.data.transforms.build_transform`."""
        return build_transform(self.image_size)


def gray_image(image: np.ndarray | Image.Image, colour: ColourMode = "keep", where: str = "image") -> np.ndarray:
    """An in-memory image as H x W uint8 grey, by the rules of :func:`usclip.data.imageio.read_image` for files.

    Arrays become a PIL image and take the same conversion as a decoded file: ``uint8`` ``(H, W)`` is grey,
    ``(H, W, 3)`` RGB and ``(H, W, 4)`` RGBA (ITU-R 601 luminance; alpha composited onto black), ``uint16``
    ``(H, W)`` a 16-bit scan (scaled from its bit depth). Float arrays are read as ``[0, 1]`` when their maximum is
    at most 1, else as ``[0, 255]``, and rounded to ``uint8``; other integer arrays must hold ``[0, 255]``.

    Args:
        image: the array or PIL image.
        colour: ``keep`` or ``replace`` coloured pixels (RGB input only).
        where: its name for messages.

    Raises:
        ValueError: for a shape, dtype or value range outside the above (naming ``where`` and what was received).
    """
    if isinstance(image, Image.Image):
        image.load()
        return np.ascontiguousarray(gray_from_pil(image, where, colour))
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"{where}: expected a numpy array, a PIL image or a path, got {type(image).__name__}"
        )  # pragma: no cover - callers dispatch on type first
    a = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2], default=0) == 0:
        raise ValueError(
            f"{where}: expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}"
        )
    if a.dtype == np.uint16 and a.ndim == 2:
        return np.ascontiguousarray(gray_from_pil(Image.fromarray(a), where, colour))
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: the float image holds NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: float images must hold values in [0, 1] or [0, 255], got [{lo:g}, {hi:g}]")
        a = np.round(a * 255.0 if hi <= 1.0 else a).astype(np.uint8)
    elif a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{where}: expected a uint8, uint16 or float image array, got dtype {a.dtype}")
    elif a.dtype != np.uint8:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{where}: a {a.dtype} image must hold values in [0, 255], got [{lo}, {hi}] "
                "(16-bit scans: pass a uint16 array)"
            )
        a = a.astype(np.uint8)
    # uint8 (H, W) -> mode L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA: what a PNG of that array decodes to
    return np.ascontiguousarray(gray_from_pil(Image.fromarray(np.ascontiguousarray(a)), where, colour))


@dataclass
class _Item:
    id: str
    path: Path | None
    image: np.ndarray | None  # the grey original of an in-memory input
    region: tuple[str, int] | None  # (file id, tissue region number) of a region of a DICOM file
    box: Box | None


class ImageInputs(Dataset):
    """The images given to ``predict_image`` as samples of :class:`usclip.data.datasets.FolderDataset`'s kind.

    Ids: a path's file stem; an in-memory image ``image`` (one) or ``image_<k>`` (the k-th of a list). A DICOM file
    with several tissue regions and ``regions: all`` is one sample per region (``<stem>@r<k>``), as in
    :func:`usclip.data.layouts.expand_regions`.

    Args:
        inputs: paths (PNG, JPEG, BMP, TIFF, DICOM), arrays or PIL images.
        preprocessing: the settings to prepare them with.
        crop_boxes: one ``(x0, y0, x1, y1)`` per input (or ``None`` for an input), used instead of the crop mode;
            required for every input when ``preprocessing.crop`` is ``boxes``.

    Attributes:
        ids: the sample ids, in order.

    Raises:
        FileNotFoundError: for a path that does not exist (naming it).
        ValueError: for a file of another kind, an array of the wrong shape or dtype, or ``crop: boxes`` without
            a box.
    """

    def __init__(
        self,
        inputs: Sequence[ImageInput],
        preprocessing: Preprocessing,
        crop_boxes: Sequence[Box | None] | None = None,
    ) -> None:
        self.preprocessing = preprocessing
        self.transform = preprocessing.transform()
        if crop_boxes is not None and len(crop_boxes) != len(inputs):
            raise ValueError(f"crop_box: got {len(crop_boxes)} boxes for {len(inputs)} images; give one per image")
        self.items: list[_Item] = []
        single = len(inputs) == 1
        for k, source in enumerate(inputs):
            box = tuple(int(v) for v in crop_boxes[k]) if crop_boxes is not None and crop_boxes[k] is not None else None
            if box is None and preprocessing.crop == "boxes":
                raise ValueError(
                    f"input {k}: the task's preprocessing crops to given boxes (crop='boxes', as its training data "
                    "had boxes.csv), so predict_image needs crop_box=(x0, y0, x1, y1) for every image"
                )
            if isinstance(source, (str, Path)):
                self.items += self._file_items(Path(source), box)  # type: ignore[arg-type]
            elif isinstance(source, (np.ndarray, Image.Image)):
                name = "image" if single else f"image_{k}"
                gray = gray_image(source, preprocessing.colour, where=f"input {k} ({name})")
                self.items.append(_Item(name, None, gray, None, box))  # type: ignore[arg-type]
            else:
                raise ValueError(
                    f"input {k}: expected a path (str or Path), a numpy array or a PIL image, got "
                    f"{type(source).__name__}"
                )
        self.ids = [i.id for i in self.items]

    def _file_items(self, path: Path, box: Box | None) -> list[_Item]:
        if not path.is_file():
            what = "a folder" if path.is_dir() else "no file"
            raise FileNotFoundError(
                f"image {str(path)!r} is {what}; expected an image file ({', '.join(IMAGE_SUFFIXES)}). "
                "For a folder or a glob use `usclip predict --data.init_args.predict_root`"
            )
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"image {str(path)!r}: not an image file; expected one of {', '.join(IMAGE_SUFFIXES)}")
        index = DatasetIndex(root=path.parent, layout="folder", images={path.stem: path})
        index = expand_regions(index, self.preprocessing.regions)  # the data.regions semantics, messages included
        return [_Item(sid, path, None, index.regions.get(sid), box) for sid in index.ids]

    def __len__(self) -> int:
        return len(self.items)

    def source(self, index: int) -> tuple[Path | None, np.ndarray | None, tuple[str, int] | None]:
        """Sample ``index``'s file (or ``None``), its in-memory grey original (or ``None``), and its region."""
        item = self.items[index]
        return item.path, item.image, item.region

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index``: the dict of :class:`usclip.data.datasets.FolderDataset` (no mask, no label)."""
        item, p = self.items[index], self.preprocessing
        crop: CropMode = "boxes" if item.box is not None else p.crop
        if item.path is not None:
            region = item.region[1] if item.region is not None else None
            d = decode_sample(item.path, None, crop, item.box, p.max_image_pixels, p.colour, p.regions, region)
        else:
            assert item.image is not None
            d = decode_array(item.image, crop, item.box, where=item.id)
        return make_sample(d, self.transform, item.id, index)
