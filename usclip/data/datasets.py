"""Datasets over the generic ultrasound folder layout.

Layout (see ``docs/data.md``)::

    root/images/<id>.png        grayscale or RGB image
    root/masks/<id>.png         lesion mask, same stem (0 = background, > 0 = lesion); optional
    root/labels.csv             id,label   (label: class name or integer); optional
    root/groups.csv             id,group   (duplicates, patients: kept on one side of a split); optional
    root/{train,val,test}.txt   predefined split files; optional

Samples are dicts: ``image`` (float32, 3 x H x W in [0, 1]), ``mask`` (int64, H x W in {0, 1}) where masks exist,
``label`` (int64) where labels exist, ``id`` (str), ``index`` (int64, position in the dataset) and
``orig_size`` (int64, [H, W] of the file on disk).
Normalisation with the encoder's mean and std happens in the model, on the device.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_images(folder: str | Path) -> dict[str, Path]:
    """Map stem -> path for the image files in ``folder`` (sorted by stem).

    Raises:
        FileNotFoundError: if ``folder`` does not exist or holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def read_csv_column(path: str | Path, column: str) -> dict[str, str]:
    """Read ``id -> column`` from a CSV file with a header row holding ``id`` and ``column``.

    Raises:
        ValueError: if the header lacks ``id`` or ``column``.
    """
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "id" not in fields or column not in fields:
            raise ValueError(f"{path}: expected a header with columns 'id' and {column!r}, got {fields}")
        return {row["id"]: row[column] for row in reader}


def encode_labels(raw: dict[str, str], label_names: Sequence[str] | None) -> tuple[dict[str, int], list[str]]:
    """Turn raw label strings into class indices.

    Args:
        raw: id -> label as written in ``labels.csv`` (a class name or an integer).
        label_names: class names in index order; ``None`` infers them (sorted names, or integers as given).

    Returns:
        ``(id -> index, label_names)``.

    Raises:
        ValueError: if a label is not one of ``label_names``.
    """
    values = sorted(set(raw.values()))
    if label_names is None:
        if all(v.lstrip("-").isdigit() for v in values):
            n = max(int(v) for v in values) + 1
            return {k: int(v) for k, v in raw.items()}, [str(i) for i in range(n)]
        label_names = values
    names = list(label_names)
    lookup = {n: i for i, n in enumerate(names)} | {str(i): i for i in range(len(names))}
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        raise ValueError(f"labels {unknown} are not among label_names={names}; fix labels.csv or label_names")
    return {k: lookup[v] for k, v in raw.items()}, names


def load_grayscale(path: Path) -> np.ndarray:
    """Load an image file as an H x W uint8 array (RGB is converted to luminance)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


class FolderDataset(Dataset):
    """Images (and masks, labels) of the generic folder layout, for a given list of ids.

    Args:
        root: dataset folder holding ``images/`` (and optionally ``masks/``).
        ids: the sample ids (file stems) to serve, in order.
        labels: id -> class index; ``None`` for no labels.
        transform: an albumentations-style callable ``f(image=..., mask=...) -> dict`` applied to the uint8 arrays.
        with_masks: read ``masks/<id>.*``; a missing mask file is an error.
        image_dir: image subfolder of ``root`` (``"."`` for a bare folder of images).
    """

    def __init__(
        self,
        root: str | Path,
        ids: Sequence[str],
        labels: dict[str, int] | None = None,
        transform: Callable[..., dict[str, Any]] | None = None,
        with_masks: bool = True,
        image_dir: str = "images",
    ) -> None:
        self.root = Path(root)
        self.ids = list(ids)
        images = list_images(self.root / image_dir)
        missing = [i for i in self.ids if i not in images]
        if missing:
            raise FileNotFoundError(f"{len(missing)} ids have no image in {self.root / image_dir}: {missing[:5]}")
        self.image_paths = [images[i] for i in self.ids]
        self.mask_paths: list[Path] | None = None
        if with_masks:
            masks = list_images(self.root / "masks")
            missing = [i for i in self.ids if i not in masks]
            if missing:
                raise FileNotFoundError(f"{len(missing)} ids have no mask in {self.root / 'masks'}: {missing[:5]}")
            self.mask_paths = [masks[i] for i in self.ids]
        if labels is not None:
            missing = [i for i in self.ids if i not in labels]
            if missing:
                raise ValueError(f"{len(missing)} ids have no label in {self.root / 'labels.csv'}: {missing[:5]}")
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = load_grayscale(self.image_paths[index])
        sample: dict[str, Any] = {
            "id": self.ids[index],
            "index": torch.tensor(index),
            "orig_size": torch.tensor(image.shape[:2]),
        }
        arrays: dict[str, np.ndarray] = {"image": image}
        if self.mask_paths is not None:
            mask = load_grayscale(self.mask_paths[index])
            if mask.shape != image.shape:
                raise ValueError(
                    f"mask {self.mask_paths[index]} is {mask.shape[::-1]} but image is {image.shape[::-1]} (W x H)"
                )
            arrays["mask"] = (mask > 0).astype(np.uint8)
        if self.transform is not None:
            arrays = self.transform(**arrays)
        # (H, W) uint8 -> (3, H, W) float in [0, 1]; grayscale is repeated to CLIP's three channels.
        img = torch.from_numpy(np.ascontiguousarray(arrays["image"])).float().div_(255.0)
        sample["image"] = img.unsqueeze(0).expand(3, -1, -1).contiguous()
        if "mask" in arrays:
            sample["mask"] = torch.from_numpy(np.ascontiguousarray(arrays["mask"])).long()
        if self.labels is not None:
            sample["label"] = torch.tensor(self.labels[self.ids[index]], dtype=torch.long)
        return sample
