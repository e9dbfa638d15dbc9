"""Image-caption pairs for contrastive fine-tuning, from a CSV or JSONL file.

Accepted files (one pair per row or line; paths relative to the file's folder unless absolute):

- CSV with a header holding an image column (``image``, ``image_path``, ``path`` or ``file``) and a caption column
  (``caption`` or ``text``); or ``id`` instead of an image column, resolved to ``images/<id>.*`` next to the file
  (the layout of ``../shared/data/BUSI/captions.csv``);
- JSONL: one JSON object per line with the same keys.

Tokenising belongs to the model (the data layer does not know the tokenizer): :class:`CaptionDataset` returns the
caption as a string. :class:`CaptionDataModule` serves the pairs of a dataset folder with its usual split.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from usclip.data.crop import CROP_MODES, CropMode
from usclip.data.datamodules import BaseDataModule
from usclip.data.datasets import decode_sample
from usclip.data.layouts import list_images
from usclip.data.transforms import build_transform

log = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "image_path", "path", "file")
CAPTION_KEYS = ("caption", "text")


@dataclass(frozen=True)
class CaptionPair:
    """One image file and its caption."""

    image: Path
    caption: str


def _pick(keys: Sequence[str], options: Sequence[str]) -> str | None:
    return next((k for k in options if k in keys), None)


def read_captions(path: str | Path, check_files: bool = True) -> list[CaptionPair]:
    """Read image-caption pairs from a ``.csv`` or ``.jsonl`` file.

    Args:
        path: the file.
        check_files: require every image file to exist.

    Returns:
        The pairs, in file order.

    Raises:
        ValueError: on an unknown extension, missing columns, an empty caption or bad JSON (naming file and line).
        FileNotFoundError: if an image file does not exist (``check_files``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix == ".csv":
        with path.open(newline="") as f:
            rows = [(n, dict(r)) for n, r in enumerate(csv.DictReader(f), start=2)]
    elif suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {n}: not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    else:
        raise ValueError(f"{path}: captions must be a .csv or .jsonl file, got {suffix!r}")
    pairs: list[CaptionPair] = []
    images: dict[str, Path] | None = None
    for n, row in rows:
        image_key, caption_key = _pick(list(row), IMAGE_KEYS), _pick(list(row), CAPTION_KEYS)
        if caption_key is None or (image_key is None and "id" not in row):
            raise ValueError(
                f"{path}, line {n}: expected an image column ({' / '.join(IMAGE_KEYS)} or id) and a caption "
                f"column ({' / '.join(CAPTION_KEYS)}), got {sorted(row)}"
            )
        caption = str(row[caption_key] or "").strip()
        if not caption:
            raise ValueError(f"{path}, line {n}: empty caption")
        if image_key is not None:
            image = Path(str(row[image_key]))
            image = image if image.is_absolute() else path.parent / image
        else:
            if images is None:
                images = list_images(path.parent / "images")
            sid = str(row["id"])
            if sid not in images:
                raise FileNotFoundError(f"{path}, line {n}: id {sid!r} has no image in {path.parent / 'images'}")
            image = images[sid]
        if check_files and not image.is_file():
            raise FileNotFoundError(f"{path}, line {n}: image {image} does not exist")
        pairs.append(CaptionPair(image, caption))
    return pairs


class CaptionDataset(Dataset):
    """Images and captions: samples are ``image`` (float 3 x H x W in [0, 1]), ``caption`` (str), ``index``.

    Args:
        pairs: the image-caption pairs (:func:`read_captions`).
        transform: albumentations-style callable ``f(image=...) -> dict`` (resize, augment).
        crop: ``auto`` (scan area) or ``none``.
    """

    def __init__(
        self,
        pairs: Sequence[CaptionPair],
        transform: Callable[..., dict[str, Any]] | None = None,
        crop: CropMode = "auto",
    ) -> None:
        if crop not in CROP_MODES or crop == "boxes":
            raise ValueError(f"CaptionDataset: crop must be 'auto' or 'none', got {crop!r}")
        self.pairs = list(pairs)
        self.transform = transform
        self.crop: CropMode = crop

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        d = decode_sample(pair.image, None, self.crop)
        image: np.ndarray = d.image
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        img = torch.tensor(image, dtype=torch.float32).div_(255.0)
        return {
            "image": img.unsqueeze(0).expand(3, -1, -1).contiguous(),
            "caption": pair.caption,
            "index": torch.tensor(index),
            "crop_box": torch.tensor(d.box, dtype=torch.int64),
        }


class CaptionDataModule(BaseDataModule):
    """Image-caption pairs of a dataset folder for contrastive fine-tuning (``usclip fit`` with a caption task).

    The images and the split come from the dataset folder exactly as for the other DataModules (generic layout,
    ``groups.csv``-aware, label-stratified when ``labels.csv`` exists, predefined ``train/val/test.txt``, the
    ``synthetic`` option); the captions file adds one or more captions per image, matched by id (the ``id`` column,
    or the stem of the image path). An image with several captions gives one pair per caption, all in its split.
    Batches hold ``image`` (float ``B x 3 x H x W`` in [0, 1], resized to ``image_size``), ``caption`` (list of
    ``str``; the task tokenises them) and ``index``.

    Args:
        captions: the CSV/JSONL file (see :func:`read_captions`), relative to ``root`` unless absolute. With
            ``root`` unset, the file's folder is the dataset root.
        **kwargs: :class:`~usclip.data.BaseDataModule` arguments (``root``, ``image_size``, ``batch_size``,
            ``split_fractions``, ``split_seed``, ``synthetic``, ``crop``: ``auto`` or ``none``, ...).
    """

    def __init__(self, captions: str = "captions.csv", **kwargs: Any) -> None:
        if kwargs.get("root") is None and Path(captions).is_absolute():
            kwargs["root"] = str(Path(captions).parent)
        if kwargs.get("crop", "auto") == "boxes":
            raise ValueError("CaptionDataModule: crop must be 'auto' or 'none', got 'boxes'")
        super().__init__(**kwargs)
        self.captions = captions
        self._captions: dict[str, list[str]] = {}

    @property
    def captions_path(self) -> Path:
        """The captions file."""
        path = Path(self.captions)
        if path.is_absolute() or self.root is None:
            return path
        return self.root / path

    def setup(self, stage: str) -> None:
        """Index the folder, fix the split (:class:`BaseDataModule`), then attach the captions to the ids."""
        super().setup(stage)
        assert self._index is not None
        path = self.captions_path
        if not path.is_file():
            raise FileNotFoundError(f"data.captions={str(path)!r} does not exist; give a .csv or .jsonl file")
        by_path = {p.resolve(): i for i, p in self._index.images.items()}
        captions: dict[str, list[str]] = {}
        for pair in read_captions(path):
            image_id = by_path.get(pair.image.resolve(), pair.image.stem)
            if image_id not in self._index.images:
                raise ValueError(
                    f"{path}: image {pair.image} is not an image of the dataset {self.root} (expected one of "
                    f"{self.root}/images/<id>.*)"
                )
            captions.setdefault(image_id, []).append(pair.caption)
        self._captions = captions
        missing = [i for split in self.splits.values() for i in split if i not in captions]
        if missing:
            log.warning("%d images of %s have no caption in %s and are not used", len(missing), self.root, path)

    def _dataset(self, split: str) -> Dataset:
        if split == "predict":
            raise ValueError("CaptionDataModule has no predict split; use usclip fit/validate/test")
        if self._index is None:
            raise ValueError(f"data.root is required for the {split!r} split of a CaptionDataModule")
        ids = [i for i in self.splits.get(split) or [] if i in self._captions]
        if not ids:
            raise ValueError(f"the {split!r} split of {self.root} holds no captioned image; check split_fractions")
        pairs = [CaptionPair(self._index.images[i], c) for i in ids for c in self._captions[i]]
        augment = self.augmentations if split == "train" else None
        return CaptionDataset(pairs, build_transform(self.image_size, augment, seed=self.seed), crop=self.crop)
