"""Image-caption pairs for contrastive fine-tuning, from a CSV or JSONL file.

Accepted files (one pair per row or line; paths relative to the file's folder unless absolute):

- CSV with a header holding an image column (``image``, ``image_path``, ``path`` or ``file``) and a caption column
  (``caption`` or ``text``); or ``id`` instead of an image column, resolved to ``images/<id>.*`` next to the file
  (the layout of ``../shared/data/BUSI/captions.csv``);
- JSONL: one JSON object per line with the same keys.

Tokenising belongs to the model (the data layer does not know the tokenizer): :class:`CaptionDataset` returns the
caption as a string.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from usclip.data.crop import CROP_MODES, CropMode
from usclip.data.datasets import decode_sample
from usclip.data.layouts import list_images

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
