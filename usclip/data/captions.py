"""Image-caption pairs for contrastive fine-tuning, from CSV or JSONL files.

Accepted files (one pair per row or line, UTF-8; paths relative to the file's folder, or to the source's
``images`` folder, unless absolute):

- CSV with a header holding an image column (``image``, ``image_path``, ``path`` or ``file``) and a caption column
  (``caption`` or ``text``, or the column named by ``caption_key``); or ``id`` instead of an image column, resolved
  to ``images/<id>.*`` next to the file (the layout of ``../shared/data/BUSI/captions.csv``);
- JSONL: one JSON object per line with the same keys (the output of ``usclip captions refine`` is one).

Tokenising belongs to the model (the data layer does not know the tokenizer): :class:`CaptionDataset` returns the
caption as a string. :class:`CaptionDataModule` serves either the pairs of one dataset folder with its usual split,
or several caption sources (:class:`CaptionSource`: PMC-OA-style pairs with their own split files, CURD-style
report captions split by patient) together; see docs/data.md, "Caption data (PMC-OA, CURD)".
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from usclip.data.coerce import as_dataclass
from usclip.data.colour import ColourMode, check_colour_mode
from usclip.data.crop import CROP_MODES, CropMode
from usclip.data.datamodules import BaseDataModule
from usclip.data.datasets import decode_sample
from usclip.data.layouts import list_images
from usclip.data.splits import split_ids
from usclip.data.transforms import build_transform

log = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "image_path", "path", "file")
CAPTION_KEYS = ("caption", "text")


@dataclass(frozen=True)
class CaptionPair:
    """One image file and its caption; ``group`` (a patient id, say) keeps related pairs in one split."""

    image: Path
    caption: str
    group: str | None = None


def _pick(keys: Sequence[str], options: Sequence[str]) -> str | None:
    return next((k for k in options if k in keys), None)


def read_captions(
    path: str | Path,
    check_files: bool = True,
    image_root: str | Path | None = None,
    caption_key: str | None = None,
    group_key: str | None = None,
) -> list[CaptionPair]:
    """Read image-caption pairs from a ``.csv`` or ``.jsonl`` file (UTF-8; a CSV may start with a byte-order mark).

    Args:
        path: the file.
        check_files: require every image file to exist.
        image_root: folder that relative image paths (and ``id`` lookups) start from; ``None``: the file's folder
            for paths, its ``images/`` subfolder for ids.
        caption_key: the caption column (e.g. ``refined`` in the authors' JSONL); ``None``: ``caption`` or ``text``.
        group_key: a column every row must have whose value groups pairs (``CaptionPair.group``); ``None``: none.

    Returns:
        The pairs, in file order.

    Raises:
        ValueError: on an unknown extension, missing columns, an empty caption or bad JSON (naming file and line).
        FileNotFoundError: if an image file does not exist (``check_files``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    base = Path(image_root) if image_root is not None else None
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [(n, dict(r)) for n, r in enumerate(csv.DictReader(f), start=2)]
    elif suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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
    captions_wanted = [caption_key] if caption_key else list(CAPTION_KEYS)
    for n, row in rows:
        image_key, text_key = _pick(list(row), IMAGE_KEYS), _pick(list(row), captions_wanted)
        if text_key is None or (image_key is None and "id" not in row):
            raise ValueError(
                f"{path}, line {n}: expected an image column ({' / '.join(IMAGE_KEYS)} or id) and a caption "
                f"column ({' / '.join(captions_wanted)}), got {sorted(row)}"
            )
        caption = str(row[text_key] or "").strip()
        if not caption:
            raise ValueError(f"{path}, line {n}: empty caption")
        group = None
        if group_key is not None:
            if row.get(group_key) in (None, ""):
                raise ValueError(f"{path}, line {n}: group_key={group_key!r} is missing or empty, got {sorted(row)}")
            group = str(row[group_key])
        if image_key is not None:
            image = Path(str(row[image_key]))
            image = image if image.is_absolute() else (base if base is not None else path.parent) / image
        else:
            folder = base if base is not None else path.parent / "images"
            if images is None:
                images = list_images(folder)
            sid = str(row["id"])
            if sid not in images:
                raise FileNotFoundError(f"{path}, line {n}: id {sid!r} has no image in {folder}")
            image = images[sid]
        if check_files and not image.is_file():
            raise FileNotFoundError(f"{path}, line {n}: image {image} does not exist")
        pairs.append(CaptionPair(image, caption, group))
    return pairs


CaptionSplitRule = Literal["files", "fraction"]


@dataclass
class CaptionSource:
    """One source of image-caption pairs for ``CaptionDataModule(sources=[...])``, with its own split rule.

    Give either ``train`` and ``val`` (the source's own split files: the **files** rule, e.g. PMC-OA's release
    split) or ``captions`` (one file split by ``val_fraction``, seeded by the DataModule's ``split_seed``: the
    **fraction** rule, e.g. CURD, grouped by patient with ``group_key``). Caption sources have no test split
    (Table 1 of the paper: PMC-OA 4,942 / 534, CURD 13,228 / 1,500 train / val). Relative paths start from the
    DataModule's ``root`` when it is set, else from the working directory.

    Args:
        name: short name, unique among the sources; prefixes the image keys in the run's split files.
        captions: one CSV/JSONL file holding every pair of the source (fraction rule).
        train: the training pairs (files rule).
        val: the validation pairs (files rule).
        images: folder the image paths (or ids) in the files are relative to; ``None``: each file's folder (ids:
            its ``images/`` subfolder).
        caption_key: the caption column; ``None``: ``caption`` or ``text`` (``refined`` for the authors' JSONL).
        group_key: column whose rows share a split (patient id); fraction rule only.
        val_fraction: share of the images (of the groups) that go to validation; fraction rule only.
    """

    name: str
    captions: str | None = None
    train: str | None = None
    val: str | None = None
    images: str | None = None
    caption_key: str | None = None
    group_key: str | None = None
    val_fraction: float = 0.1

    @property
    def rule(self) -> CaptionSplitRule:
        """``files`` (own train/val files) or ``fraction`` (one file, split by ``val_fraction``)."""
        return "fraction" if self.captions is not None else "files"

    def check(self) -> None:
        """Raise ``ValueError`` naming the source and the field when the description is inconsistent."""
        where = f"data.sources[{self.name!r}]"
        if not self.name or "/" in self.name:
            raise ValueError(f"data.sources: name must be a non-empty string without '/', got {self.name!r}")
        if self.captions is not None and (self.train is not None or self.val is not None):
            raise ValueError(f"{where}: give either captions (split by val_fraction) or train and val, not both")
        if self.captions is None and (self.train is None or self.val is None):
            raise ValueError(
                f"{where}: give captions (one file, split by val_fraction) or both train and val (split files); "
                f"got train={self.train!r}, val={self.val!r}"
            )
        if self.rule == "fraction" and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"{where}: val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.rule == "files" and self.group_key is not None:
            raise ValueError(f"{where}: group_key applies to the fraction rule (captions:), not to split files")


class CaptionDataset(Dataset):
    """Images and captions: samples are ``image`` (float 3 x H x W in [0, 1]), ``caption`` (str), ``index``.

    Args:
        pairs: the image-caption pairs (:func:`read_captions`).
        transform: albumentations-style callable ``f(image=...) -> dict`` (resize, augment).
        crop: ``auto`` (scan area) or ``none``.
        colour: ``keep`` or ``replace`` coloured pixels of colour files (see :mod:`usclip.data.colour`).
    """

    def __init__(
        self,
        pairs: Sequence[CaptionPair],
        transform: Callable[..., dict[str, Any]] | None = None,
        crop: CropMode = "auto",
        colour: ColourMode = "keep",
    ) -> None:
        if crop not in CROP_MODES or crop == "boxes":
            raise ValueError(f"CaptionDataset: crop must be 'auto' or 'none', got {crop!r}")
        self.pairs = list(pairs)
        self.transform = transform
        self.crop: CropMode = crop
        self.colour: ColourMode = check_colour_mode(colour)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        d = decode_sample(pair.image, None, self.crop, colour=getattr(self, "colour", "keep"))
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
    """Image-caption pairs for contrastive fine-tuning (``usclip fit`` with a caption task).

    Two ways to give the pairs:

    - **A dataset folder** (``root`` + ``captions``): the images and the split come from the folder exactly as for
      the other DataModules (generic layout, ``groups.csv``-aware, label-stratified when ``labels.csv`` exists,
      predefined ``train/val/test.txt``, the ``synthetic`` option); the captions file adds one or more captions per
      image, matched by id (the ``id`` column, or the stem of the image path). An image with several captions gives
      one pair per caption, all in its split.
    - **Caption sources** (``sources``: a list of :class:`CaptionSource`): several sources served together, each
      with its own files, image folder and split rule (the paper's PMC-OA + CURD). ``root``, when set, is the folder
      their relative paths start from. Train and val only: ``usclip test`` is refused.

    Batches hold ``image`` (float ``B x 3 x H x W`` in [0, 1], resized to ``image_size``), ``caption`` (list of
    ``str``; the task tokenises them) and ``index``. ``augmentations: {}`` switches train-time augmentation off,
    so that training images go through exactly the evaluation transform (the authors' caption fine-tuning).

    Args:
        captions: the CSV/JSONL file (see :func:`read_captions`), relative to ``root`` unless absolute. With
            ``root`` unset, the file's folder is the dataset root. Unused with ``sources``.
        sources: caption sources to serve together instead of one dataset folder.
        **kwargs: :class:`~usclip.data.BaseDataModule` arguments (``root``, ``image_size``, ``batch_size``,
            ``split_fractions``, ``split_seed``, ``train_fraction``, ``augmentations``, ``synthetic``, ``crop``:
            ``auto`` or ``none``, ...).
    """

    def __init__(
        self, captions: str = "captions.csv", sources: list[CaptionSource] | None = None, **kwargs: Any
    ) -> None:
        if sources is not None:
            if not sources:
                raise ValueError("data.sources is empty; give one or more caption sources, or null")
            sources = [as_dataclass(s, CaptionSource, f"data.sources[{i}]") for i, s in enumerate(sources)]
            for source in sources:
                source.check()
            names = [s.name for s in sources]
            if len(set(names)) != len(names):
                raise ValueError(f"data.sources: names must be unique, got {names}")
            if kwargs.get("synthetic") is not None:
                raise ValueError("data.synthetic generates one dataset folder; it cannot be combined with sources")
        elif kwargs.get("root") is None and Path(captions).is_absolute():
            kwargs["root"] = str(Path(captions).parent)
        if kwargs.get("crop", "auto") == "boxes":
            raise ValueError("CaptionDataModule: crop must be 'auto' or 'none', got 'boxes'")
        super().__init__(**kwargs)
        self.captions = captions
        self.sources = sources
        self._captions: dict[str, list[str]] = {}
        self._source_pairs: dict[str, list[CaptionPair]] = {}

    @property
    def captions_path(self) -> Path:
        """The captions file."""
        path = Path(self.captions)
        if path.is_absolute() or self.root is None:
            return path
        return self.root / path

    def setup(self, stage: str) -> None:
        """Index the folder, fix the split (:class:`BaseDataModule`), then attach the captions to the ids.

        With ``sources``: read every source and split each by its own rule (a split restored from a checkpoint is
        kept).
        """
        if self.sources is not None:
            self._setup_sources()
            self._write_split_files()
            return
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

    # ----------------------------------------------------------------- caption sources
    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() or self.root is None else self.root / path

    def _read_source(self, source: CaptionSource, file: str, field: str) -> list[CaptionPair]:
        path = self._path(file)
        if not path.is_file():
            raise FileNotFoundError(
                f"data.sources[{source.name!r}].{field}={str(path)!r} does not exist; give a .csv or .jsonl file"
            )
        images = self._path(source.images) if source.images is not None else None
        if images is not None and not images.is_dir():
            raise FileNotFoundError(f"data.sources[{source.name!r}].images={str(images)!r} is not a folder")
        pairs = read_captions(path, image_root=images, caption_key=source.caption_key, group_key=source.group_key)
        if not pairs:
            raise ValueError(f"data.sources[{source.name!r}].{field}={str(path)!r} holds no image-caption pair")
        return pairs

    @staticmethod
    def _image_key(source: CaptionSource, pair: CaptionPair, base: Path) -> str:
        """``<source name>/<image path relative to the source's image folder>``: the id in the split files."""
        try:
            rel = pair.image.relative_to(base).as_posix()
        except ValueError:
            rel = pair.image.as_posix()
        return f"{source.name}/{rel}"

    def _setup_sources(self) -> None:
        assert self.sources is not None
        restored = {k: s for s, keys in self.splits.items() for k in keys}  # a checkpoint's split, if any
        by_split: dict[str, list[tuple[str, CaptionPair]]] = {"train": [], "val": []}
        for source in self.sources:
            if source.rule == "files":
                assert source.train is not None and source.val is not None
                assigned: list[tuple[str, str, CaptionPair]] = []
                for split_name, file in (("train", source.train), ("val", source.val)):
                    base = self._path(source.images) if source.images else self._path(file).parent
                    found = self._read_source(source, file, split_name)
                    assigned += [(split_name, self._image_key(source, p, base), p) for p in found]
                both = {k for s, k, _ in assigned if s == "train"} & {k for s, k, _ in assigned if s == "val"}
                if both:
                    log.warning(
                        "caption source %s: %d images are in both its train and val files (e.g. %s); they leak "
                        "between the splits",
                        source.name,
                        len(both),
                        sorted(both)[:3],
                    )
            else:
                assert source.captions is not None
                found_pairs = self._read_source(source, source.captions, "captions")
                base_dir = self._path(source.images) if source.images else self._path(source.captions).parent
                pairs = [(self._image_key(source, p, base_dir), p) for p in found_pairs]
                keys = list(dict.fromkeys(k for k, _ in pairs))
                groups = {k: f"{source.name}/{p.group}" for k, p in pairs if p.group is not None}
                if len(keys) < 2:
                    raise ValueError(f"data.sources[{source.name!r}]: a fraction split needs two or more images")
                split = split_ids(
                    keys, (1.0 - source.val_fraction, source.val_fraction, 0.0), self.hparams["split_seed"], groups
                )
                split_of = {k: name for name in ("train", "val") for k in split[name]}
                assigned = [(split_of[k], k, p) for k, p in pairs]
            for split_name, key, pair in assigned:
                split_name = restored.get(key, split_name) if restored else split_name
                if split_name in by_split:
                    by_split[split_name].append((key, pair))
            counts = {s: sum(1 for n, _, _ in assigned if n == s) for s in ("train", "val")}
            log.info(
                "caption source %s (%s split): %d train / %d val pairs",
                source.name,
                source.rule,
                counts["train"],
                counts["val"],
            )
        if not restored:
            self.splits = {s: list(dict.fromkeys(k for k, _ in items)) for s, items in by_split.items()}
            self._subsample_train()
        train_keys = set(self.splits.get("train", []))
        by_split["train"] = [(k, p) for k, p in by_split["train"] if k in train_keys]
        self._source_pairs = {s: [p for _, p in items] for s, items in by_split.items()}

    # ----------------------------------------------------------------- datasets
    def _dataset(self, split: str) -> Dataset:
        augment = self.augmentations if split == "train" else None
        transform = build_transform(self.image_size, augment, seed=self.seed)
        if self.sources is not None:
            if split not in ("train", "val"):
                raise ValueError(
                    f"caption sources have train and val splits only (no {split!r} split); use usclip fit or validate"
                )
            pairs = self._source_pairs.get(split) or []
            if not pairs:
                raise ValueError(f"the {split!r} split of data.sources holds no pair; check the files and val_fraction")
            return CaptionDataset(pairs, transform, crop=self.crop, colour=self.colour)
        if split == "predict":
            raise ValueError("CaptionDataModule has no predict split; use usclip fit/validate/test")
        if self._index is None:
            raise ValueError(f"data.root is required for the {split!r} split of a CaptionDataModule")
        ids = [i for i in self.splits.get(split) or [] if i in self._captions]
        if not ids:
            raise ValueError(f"the {split!r} split of {self.root} holds no captioned image; check split_fractions")
        pairs = [CaptionPair(self._index.images[i], c) for i in ids for c in self._captions[i]]
        return CaptionDataset(pairs, transform, crop=self.crop, colour=self.colour)
