"""Datasets over an indexed ultrasound folder (generic layout or BUSI release; see ``usclip.data.layouts``).

Samples are dicts:

- ``image``: float32, 3 x H x W in [0, 1] (grayscale repeated to CLIP's three channels);
- ``mask``: int64, H x W in {0, 1}, where masks exist;
- ``label``: int64, where labels exist;
- ``id`` (str), ``index`` (int64, position in the dataset);
- ``orig_size``: int64 ``[H, W]`` of the file on disk;
- ``crop_box``: int64 ``[x0, y0, x1, y1]`` of the crop in the original image (end exclusive), so that a
  prediction maps back with :func:`usclip.data.crop.paste_back`;
- ``spacing``: float32 ``[row, column]`` pixel spacing of the original image in millimetres (DICOM), NaN when
  unknown.

A DICOM file with several tissue regions is one sample per region under ``regions="all"`` (ids ``<stem>@r0``,
``<stem>@r1`` ...; see :func:`usclip.data.layouts.expand_regions`): each crops its own region box, carries its own
spacing, and its ``crop_box`` and ``orig_size`` place it in the full frame.

Normalisation with the encoder's mean and std happens in the task, on the device: the data does not know the
model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from usclip.data.bad_samples import (
    BAD_FILE_ERRORS,
    ON_BAD_SAMPLE,
    BadSample,
    OnBadSample,
    bad_sample_error,
)
from usclip.data.cache import DecodedSample, SampleCache, file_key
from usclip.data.colour import ColourMode, check_colour_mode
from usclip.data.crop import CROP_MODES, Box, CropMode, check_box, crop_box_for
from usclip.data.dicom import REGION_ID_SEPARATOR, RegionsMode, check_regions_mode
from usclip.data.imageio import (
    MAX_IMAGE_PIXELS,
    ImageReadError,
    _note_once,
    check_max_pixels,
    load_grayscale,
    read_image,
    read_mask,
)
from usclip.data.layouts import IMAGE_SUFFIXES, DatasetIndex, expand_regions, index_folder, list_images, read_csv_column
from usclip.data.transforms import RESIZE_INTERPOLATION, build_resize

log = logging.getLogger(__name__)

#: the end of a region sample's id (``<stem>@r0``)
REGION_ID_PATTERN = re.compile(re.escape(REGION_ID_SEPARATOR) + r"\d+$")

__all__ = [
    "IMAGE_SUFFIXES",
    "FolderDataset",
    "decode_array",
    "decode_sample",
    "encode_labels",
    "list_images",
    "load_grayscale",
    "make_sample",
    "read_csv_column",
    "resize_decoded",
]


def encode_labels(
    raw: Mapping[str, str], label_names: Sequence[str] | None, source: str | Path = "labels.csv"
) -> tuple[dict[str, int], list[str]]:
    """Turn raw label strings into class indices.

    Args:
        raw: id -> label as written in ``labels.csv`` (a class name or an integer).
        label_names: class names in index order; ``None`` infers them (sorted names, or integers as given).
        source: where the labels come from, for error messages.

    Returns:
        ``(id -> index, label_names)``.

    Raises:
        ValueError: if a label is not one of ``label_names`` (naming the ids that carry it).
    """
    values = sorted(set(raw.values()))
    if label_names is None:
        if values and all(v.lstrip("-").isdigit() for v in values):
            if min(int(v) for v in values) < 0:
                raise ValueError(f"{source}: integer labels must be >= 0, got {values}")
            n = max(int(v) for v in values) + 1
            return {k: int(v) for k, v in raw.items()}, [str(i) for i in range(n)]
        label_names = values
    names = list(label_names)
    lookup = {n: i for i, n in enumerate(names)} | {str(i): i for i in range(len(names))}
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        ids = sorted(k for k, v in raw.items() if v in unknown)
        raise ValueError(
            f"{source}: labels {unknown} (ids {ids[:5]}) are not among label_names={names}; "
            "fix the CSV or set data.label_names"
        )
    return {k: lookup[v] for k, v in raw.items()}, names


def decode_sample(
    image_path: Path,
    mask_paths: Sequence[Path] | None = None,
    crop: CropMode = "none",
    box: tuple[int, int, int, int] | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    colour: ColourMode = "keep",
    regions: RegionsMode = "largest",
    region: int | None = None,
) -> DecodedSample:
    """Read an image (and its merged mask) and crop both to the scan area.

    Args:
        image_path: the image file.
        mask_paths: its mask file(s), OR-merged; ``None`` for no mask.
        crop: ``auto`` finds the scan area (DICOM: the file's ultrasound region), ``boxes`` uses ``box``,
            ``none`` keeps the whole image.
        box: the crop box for ``crop="boxes"``.
        max_pixels: largest image or mask read, in pixels (see :func:`usclip.data.imageio.read_image`); DICOM
            files are checked from ``Rows x Columns`` before decoding.
        colour: ``keep`` coloured pixels (colour Doppler, coloured calipers) as their luminance, or ``replace``
            them by the median of their grey neighbours (see :mod:`usclip.data.colour`); in a DICOM file, inside
            its 2-D regions (so each region sample gets its own region's replaced pixels).
        regions: a DICOM file with several tissue regions, read whole (``region=None``): ``largest`` (and ``all``)
            uses the largest and warns once naming the others, ``error`` refuses it
            (see :func:`usclip.data.dicom.read_dicom`).
        region: the tissue region of a DICOM file to serve (``r0`` is 0; see
            :attr:`usclip.data.dicom.DicomImage.regions`): the image and mask are cropped to its box and the sample
            carries its spacing. Needs ``crop="auto"``. ``None`` reads the file whole.

    Raises:
        ImageReadError: for unreadable images and bad masks (see ``usclip.data.imageio``), and for a ``region`` the
            file does not hold.
        ValueError: for a box outside the image, or a ``region`` with another crop than ``auto`` or of a file
            that is not DICOM.
    """
    spacing = None
    dicom_box: Box | None = None
    region_boxes: list[Box] = []  # every tissue region of the file, when serving one of them
    if region is not None and (crop != "auto" or image_path.suffix.lower() != ".dcm"):
        raise ValueError(
            f"{image_path}: region r{region} asked for, but regions are served only from DICOM files with "
            f"crop='auto' (got crop={crop!r})"
        )
    if image_path.suffix.lower() == ".dcm":
        from usclip.data.dicom import read_dicom

        if region is None:
            dcm = read_dicom(
                image_path,
                regions="error" if regions == "error" else "largest",
                colour=colour,
                max_pixels=max_pixels,
            )
            image, spacing, dicom_box = dcm.image, dcm.spacing, dcm.region
        else:
            dcm = read_dicom(image_path, regions="all", colour=colour, max_pixels=max_pixels)
            if not 0 <= region < len(dcm.regions):
                raise ImageReadError(
                    f"{image_path}: region r{region} asked for, but the file holds {len(dcm.regions)} tissue regions "
                    "(was it replaced after the dataset was indexed?)"
                )
            image, spacing, dicom_box = dcm.image, dcm.regions[region].spacing, dcm.regions[region].box
            region_boxes = [r.box for r in dcm.regions]
    else:
        image = read_image(image_path, max_pixels, colour)
    mask = read_mask(mask_paths, image.shape, max_pixels) if mask_paths else None
    return _crop_decoded(image, mask, crop, box, image_path, dicom_box, region_boxes, spacing)


def decode_array(
    image: np.ndarray, crop: CropMode = "none", box: Box | None = None, where: str = "image"
) -> DecodedSample:
    """Crop an H x W uint8 grey image held in memory, as :func:`decode_sample` crops a file's pixels.

    ``usclip.tasks.BaseTask.predict_image`` feeds arrays and PIL images through it (after
    :func:`usclip.data.preprocessing.gray_image`), so they take the crop step of every file.

    Args:
        image: H x W uint8 grey image.
        crop: ``auto`` (:func:`usclip.data.crop.find_scan_box`), ``boxes`` (``box``) or ``none``.
        box: the crop box for ``crop="boxes"``.
        where: the image's name for messages.

    Raises:
        KeyError: for ``crop="boxes"`` without a box.
        ValueError: for a box outside the image.
    """
    return _crop_decoded(image, None, crop, box, where, None, [], None)


def _crop_decoded(
    image: np.ndarray,
    mask: np.ndarray | None,
    crop: CropMode,
    box: tuple[int, int, int, int] | None,
    image_path: Path | str,
    dicom_box: Box | None,
    region_boxes: list[Box],
    spacing: tuple[float, float] | None,
) -> DecodedSample:
    """The crop step of :func:`decode_sample` (and :func:`decode_array`): box, cropped image and mask."""
    if crop == "boxes":
        if box is None:
            raise KeyError(f"{image_path}: crop='boxes' but there is no box for this image in boxes.csv")
        crop_box = check_box(box, image.shape, str(image_path))
    elif crop == "auto" and dicom_box is not None:
        crop_box = dicom_box
    else:
        crop_box = crop_box_for(image, crop, where=str(image_path))
    x0, y0, x1, y1 = crop_box
    if mask is not None:
        cropped = mask[y0:y1, x0:x1]
        if region_boxes:  # lesion pixels in the file's other regions belong to their samples: not lost
            covered = np.zeros(mask.shape, bool)
            for bx0, by0, bx1, by1 in region_boxes:
                covered[by0:by1, bx0:bx1] = True
            lost = int(mask[~covered].sum())
            boxes_text = f"every tissue region's box {region_boxes}"
        else:
            lost = int(mask.sum()) - int(cropped.sum())
            boxes_text = f"the crop box {crop_box}"
        if lost:
            _note_once(
                "lost",
                image_path,
                "%s: %d lesion pixels of the mask lie outside %s and are dropped (check the crop, or use crop='none')",
                image_path,
                lost,
                boxes_text,
                level=logging.WARNING,
            )
        mask = np.ascontiguousarray(cropped)
    return DecodedSample(
        image=np.ascontiguousarray(image[y0:y1, x0:x1]),
        mask=mask,
        box=crop_box,
        orig_size=(int(image.shape[0]), int(image.shape[1])),
        spacing=spacing,
    )


class FolderDataset(Dataset):
    """Images (and masks, labels) of an indexed dataset folder, for a given list of ids.

    Args:
        root: dataset folder (generic layout: ``images/``, optionally ``masks/``).
        ids: the sample ids to serve, in order.
        labels: id -> class index; ``None`` for no labels.
        transform: an albumentations-style callable ``f(image=..., mask=...) -> dict`` applied to the uint8 crops.
        with_masks: serve masks; an id without a mask file is an error.
        image_dir: image subfolder of ``root`` (``"."`` for a bare folder of images).
        crop: ``auto`` (find the scan area), ``boxes`` (``boxes.csv``) or ``none``.
        index: a prepared :class:`DatasetIndex` (e.g. of the BUSI release); ``None`` indexes ``root``.
        cache: cache of decoded and cropped arrays; ``None`` decodes every time.
        on_bad_sample: what a file that cannot be read when a sample is loaded does: ``raise`` a
            :class:`~usclip.data.bad_samples.BadSampleError` naming it, or ``skip``: return a
            :class:`~usclip.data.bad_samples.BadSample` marker instead of the sample (see
            :mod:`usclip.data.bad_samples`; batch with :func:`~usclip.data.bad_samples.collate_skipping_bad`).
        max_image_pixels: largest image or mask read, in pixels; larger files are bad files (``None``: no limit).
        colour: ``keep`` or ``replace`` coloured pixels of colour files (see :func:`decode_sample`).
        regions: DICOM files with several tissue regions: ``largest`` serves each file whole, cropped to its
            largest region (warning once per file about the others), ``all`` serves each region as a sample (ids
            ``<stem>@r0`` ...; needs ``crop="auto"``), ``error`` refuses such files. A given ``index`` is used as
            it is: expand it with :func:`usclip.data.layouts.expand_regions` first.
        resize: ``(height, width)``: with a ``cache``, each crop is resized once
            (:func:`usclip.data.transforms.build_resize`, the first step of ``transform``, which then leaves it
            unchanged) and the resized uint8 arrays are cached instead of the crop: decoding, cropping and resizing
            run once per sample and run, and a cached sample takes ``height x width`` bytes (plus its mask) rather
            than the crop's. The key holds the size and the interpolation, as it holds the file, crop and colour
            settings, so another size never reads a stale entry. ``None`` (or no cache) caches the crop.

    Raises:
        FileNotFoundError: if an id has no image or (``with_masks``) no mask, naming the ids and folder.
        KeyError: if ``crop="boxes"`` and an id has no row in ``boxes.csv``.
        ValueError: if an id has no label, ``crop``, ``on_bad_sample``, ``colour`` or ``regions`` is unknown, or the
            index holds region samples and ``crop`` is not ``auto``.
    """

    def __init__(
        self,
        root: str | Path,
        ids: Sequence[str],
        labels: Mapping[str, int] | None = None,
        transform: Callable[..., dict[str, Any]] | None = None,
        with_masks: bool = True,
        image_dir: str = "images",
        crop: CropMode = "none",
        index: DatasetIndex | None = None,
        cache: SampleCache | None = None,
        on_bad_sample: OnBadSample = "raise",
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        colour: ColourMode = "keep",
        regions: RegionsMode = "largest",
        resize: tuple[int, int] | None = None,
    ) -> None:
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        self.regions: RegionsMode = check_regions_mode(regions)
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.on_bad_sample: OnBadSample = on_bad_sample
        self.max_image_pixels = check_max_pixels(max_image_pixels)
        self.colour: ColourMode = check_colour_mode(colour)
        self.root = Path(root)
        self.ids = list(ids)
        if index is None:
            index = expand_regions(index_folder(self.root, image_dir, masks=with_masks), regions)
            image_folder = self.root / image_dir
        else:
            image_folder = self.root
        self.index = index
        if self.index.regions and crop != "auto":
            raise ValueError(
                f"regions='all' serves each tissue region of a DICOM file cropped to its box, so it needs "
                f"crop='auto'; got crop={crop!r}"
            )
        missing = [i for i in self.ids if i not in self.index.images]
        if missing:
            hint = ""
            if any(REGION_ID_PATTERN.search(i) for i in missing) and not self.index.regions:
                hint = " (ids <stem>@r<k> name the regions of a DICOM file: read them with regions='all')"
            raise FileNotFoundError(f"{len(missing)} ids have no image in {image_folder}: {missing[:5]}{hint}")
        self.image_paths = [self.index.images[i] for i in self.ids]
        self.mask_paths: list[tuple[Path, ...]] | None = None
        if with_masks:
            missing = [i for i in self.ids if i not in self.index.masks]
            if missing:
                where = self.root / "masks" if self.index.layout == "folder" else self.root
                raise FileNotFoundError(f"{len(missing)} ids have no mask in {where}: {missing[:5]}")
            self.mask_paths = [self.index.masks[i] for i in self.ids]
        if crop == "boxes":
            missing = [i for i in self.ids if i not in self.index.boxes]
            if missing:
                raise KeyError(
                    f"crop='boxes' but {self.root / 'boxes.csv'} has no box for {len(missing)} ids: {missing[:5]}; "
                    "add them (id,x0,y0,x1,y1) or use crop='auto'"
                )
        if labels is not None:
            missing = [i for i in self.ids if i not in labels]
            if missing:
                raise ValueError(f"{len(missing)} ids have no label in {self.root / 'labels.csv'}: {missing[:5]}")
        self.labels = labels
        self.transform = transform
        self.crop: CropMode = crop
        self.cache = cache
        if resize is not None and (len(resize) != 2 or min(resize) < 1):
            raise ValueError(f"resize must be (height, width) in pixels >= 1, got {resize!r}")
        self.resize = None if resize is None else (int(resize[0]), int(resize[1]))

    def __len__(self) -> int:
        return len(self.ids)

    def source(self, index: int) -> tuple[Path, None, tuple[str, int] | None]:
        """Sample ``index``'s file, no in-memory image, and ``(file id, region)`` for a region of a DICOM file."""
        return self.image_paths[index], None, getattr(self.index, "regions", {}).get(self.ids[index])

    def decoded(self, index: int) -> DecodedSample:
        """The decoded and cropped arrays of sample ``index`` (from the cache when there is one)."""
        return self._cached(index, None)

    def prepared(self, index: int) -> DecodedSample:
        """What ``transform`` starts from: the crop, or with ``resize`` and a cache the resized crop (cached)."""
        size = getattr(self, "resize", None)  # datasets pickled before the option
        return self._cached(index, size if self.cache is not None else None)

    def _cached(self, index: int, size: tuple[int, int] | None) -> DecodedSample:
        """Sample ``index`` decoded and cropped, then resized to ``size`` when given, through the cache."""
        image_path = self.image_paths[index]
        masks = self.mask_paths[index] if self.mask_paths is not None else None
        box = self.index.boxes.get(self.ids[index]) if self.crop == "boxes" else None
        region_of = getattr(self.index, "regions", {})  # indices pickled before regions
        region = region_of[self.ids[index]][1] if self.ids[index] in region_of else None

        max_pixels = getattr(self, "max_image_pixels", MAX_IMAGE_PIXELS)  # datasets pickled before the option
        colour: ColourMode = getattr(self, "colour", "keep")
        regions: RegionsMode = getattr(self, "regions", "largest")

        def load() -> DecodedSample:
            d = decode_sample(image_path, masks, self.crop, box, max_pixels, colour, regions, region)
            return d if size is None else resize_decoded(d, size)

        if self.cache is None:
            return load()
        extra: tuple[object, ...] = (self.crop, box, colour)
        if region is not None:
            extra += (f"region {region}",)
        if size is not None:
            extra += ("resized", size, RESIZE_INTERPOLATION)
        return self.cache.get(file_key([image_path, *(masks or ())], *extra), load)

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        """Sample ``index`` as a dict (see the module docstring), or a :class:`BadSample` marker.

        The marker comes when a file of the sample cannot be read and ``on_bad_sample="skip"``.

        Raises:
            BadSampleError: when its image or mask cannot be read and ``on_bad_sample="raise"`` (names the file).
        """
        try:
            d = self.prepared(index)
        except BAD_FILE_ERRORS as err:  # read failures only: a transform error below is a bug, not a bad file
            path = str(self.image_paths[index])
            if getattr(self, "on_bad_sample", "raise") == "raise":
                raise bad_sample_error(index, self.ids[index], path, err) from err
            _note_once("bad", path, "%s: bad sample %r skipped: %s", path, self.ids[index], err, level=logging.DEBUG)
            return BadSample(index=index, id=self.ids[index], path=path, reason=str(err))
        sample = make_sample(d, self.transform, self.ids[index], index)
        if self.labels is not None:
            sample["label"] = torch.tensor(self.labels[self.ids[index]], dtype=torch.long)
        return sample


def resize_decoded(d: DecodedSample, size: tuple[int, int]) -> DecodedSample:
    """``d`` with its image and mask resized to ``size`` = ``(height, width)``.

    By :func:`usclip.data.transforms.build_resize` (area / nearest), the first step of every pipeline; the box,
    the original size and the spacing are unchanged.
    """
    arrays: dict[str, np.ndarray] = {"image": d.image}
    if d.mask is not None:
        arrays["mask"] = d.mask
    out = build_resize(size)(**arrays)
    mask = out.get("mask")
    return DecodedSample(
        image=np.ascontiguousarray(out["image"]),
        mask=None if mask is None else np.ascontiguousarray(mask),
        box=d.box,
        orig_size=d.orig_size,
        spacing=d.spacing,
    )


def make_sample(
    d: DecodedSample, transform: Callable[..., dict[str, Any]] | None, sample_id: str, index: int
) -> dict[str, Any]:
    """The sample dict of decoded arrays (see the module docstring), through ``transform`` (resize, augmentation).

    Every sample of :class:`FolderDataset` and of ``usclip.tasks.BaseTask.predict_image`` is made here.
    """
    sample: dict[str, Any] = {
        "id": sample_id,
        "index": torch.tensor(index),
        "orig_size": torch.tensor(d.orig_size),
        "crop_box": torch.tensor(d.box, dtype=torch.int64),
        "spacing": torch.tensor(d.spacing if d.spacing is not None else (float("nan"),) * 2, dtype=torch.float32),
    }
    arrays: dict[str, np.ndarray] = {"image": d.image}
    if d.mask is not None:
        arrays["mask"] = d.mask
    if transform is not None:
        arrays = transform(**arrays)
    # (H, W) uint8 -> (3, H, W) float in [0, 1]; grayscale is repeated to CLIP's three channels.
    img = torch.tensor(arrays["image"], dtype=torch.float32).div_(255.0)  # a copy: cached arrays stay intact
    sample["image"] = img.unsqueeze(0).expand(3, -1, -1).contiguous()
    if "mask" in arrays:
        sample["mask"] = torch.tensor(arrays["mask"], dtype=torch.long)
    return sample
