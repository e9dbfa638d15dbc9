"""Dataset layouts on disk, turned into one index: ids, image files, mask files, labels, groups and crop boxes.

Two layouts are read (see ``docs/data.md``):

- ``folder``, the generic layout::

    root/images/<id>.png          image (any of IMAGE_SUFFIXES; the file stem is the id)
    root/masks/<id>.png           lesion mask, same stem; optional
    root/labels.csv               id,label; optional
    root/groups.csv               id,group (duplicates, patients); optional
    root/boxes.csv                id,x0,y0,x1,y1 (scan-area crop box); optional
    root/{train,val,test}.txt     predefined splits, one id a line; optional

- ``busi``, the original BUSI release (Al-Dhabyani et al., Data in Brief 2020)::

    root/benign/benign (1).png  root/benign/benign (1)_mask.png  root/benign/benign (1)_mask_1.png ...
    root/malignant/...          root/normal/...  (normal is left out unless asked for)

  Ids are ``<class>_<N>`` with N zero-padded to three digits (``benign_001``), as in the reduced copy in
  ``../shared/data/BUSI``; the extra ``_mask_1``, ``_mask_2`` files of multi-lesion images are merged with the
  main mask (logical OR) when read; the label is the folder name.

Both give a :class:`DatasetIndex`; datasets only see the index, so both layouts give the same samples.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from usclip.data.crop import Box, read_boxes_csv

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
Layout = Literal["auto", "folder", "busi"]
LAYOUTS = ("auto", "folder", "busi")
BUSI_CLASSES = ("benign", "malignant", "normal")
_BUSI_NAME = re.compile(r"^(?P<cls>benign|malignant|normal) \((?P<n>\d+)\)(?P<mask>_mask(?:_(?P<k>\d+))?)?$")


@dataclass
class DatasetIndex:
    """What a dataset folder holds, before any pixel is read.

    Attributes:
        root: the dataset folder.
        layout: ``"folder"`` or ``"busi"``.
        images: id -> image file, sorted by id.
        masks: id -> mask files (OR-merged when read); empty when the dataset has no masks.
        labels: id -> label name as written (folder name for BUSI); empty when there are no labels.
        groups: id -> group (``groups.csv``); empty when there is none.
        boxes: id -> crop box (``boxes.csv``); empty when there is none.
    """

    root: Path
    layout: str
    images: dict[str, Path]
    masks: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    boxes: dict[str, Box] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        """All ids, sorted."""
        return sorted(self.images)


def list_images(folder: str | Path, duplicates: list[tuple[Path, Path]] | None = None) -> dict[str, Path]:
    """Map stem -> path for the image files in ``folder`` (sorted by stem).

    Args:
        folder: the folder.
        duplicates: when given, files sharing a stem are appended here (the first one is kept) instead of
            raising; ``usclip data check`` uses it to report every problem at once.

    Raises:
        FileNotFoundError: if ``folder`` does not exist or holds no image file.
        ValueError: if two files share a stem (``a.png`` and ``a.jpg``): the id would be ambiguous.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        if p.stem in files:
            if duplicates is not None:
                duplicates.append((files[p.stem], p))
                continue
            raise ValueError(
                f"duplicate id {p.stem!r} in {folder}: {files[p.stem].name} and {p.name}; "
                "ids are file stems, so keep one of the two files"
            )
        files[p.stem] = p
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return dict(sorted(files.items()))


def read_csv_column(path: str | Path, column: str) -> dict[str, str]:
    """Read ``id -> column`` from a CSV file with a header row holding ``id`` and ``column``.

    Raises:
        ValueError: if the header lacks ``id`` or ``column``, or an id appears twice.
    """
    path = Path(path)
    out: dict[str, str] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "id" not in fields or column not in fields:
            raise ValueError(f"{path}: expected a header with columns 'id' and {column!r}, got {fields}")
        for line, row in enumerate(reader, start=2):
            key = (row["id"] or "").strip()
            if key in out:
                raise ValueError(f"{path}, line {line}: id {key!r} appears twice")
            out[key] = (row[column] or "").strip()
    return out


def _read_extras(root: Path, ids: set[str]) -> tuple[dict[str, str], dict[str, str], dict[str, Box]]:
    """labels.csv, groups.csv and boxes.csv of ``root`` (rows for ids without an image are dropped, logged)."""
    found: list[dict] = []
    for name, reader in (
        ("labels.csv", lambda p: read_csv_column(p, "label")),
        ("groups.csv", lambda p: read_csv_column(p, "group")),
        ("boxes.csv", read_boxes_csv),
    ):
        path = root / name
        rows = reader(path) if path.is_file() else {}
        extra = sorted(set(rows) - ids)
        if extra:
            log.warning("%s: %d ids have no image and are ignored: %s", path, len(extra), extra[:5])
        found.append({k: v for k, v in rows.items() if k in ids})
    return found[0], found[1], found[2]


def index_folder(
    root: str | Path,
    image_dir: str = "images",
    masks: bool = True,
    duplicates: list[tuple[Path, Path]] | None = None,
) -> DatasetIndex:
    """Index the generic layout (``images/``, ``masks/``, ``labels.csv``, ``groups.csv``, ``boxes.csv``).

    Args:
        root: dataset folder.
        image_dir: image subfolder (``"."`` for a bare folder of images).
        masks: read ``masks/`` when it exists (a missing mask file is reported by the dataset, by id).
        duplicates: collect files sharing a stem here instead of raising (see :func:`list_images`).

    Raises:
        FileNotFoundError: if the image folder is missing or empty.
        ValueError: on duplicate ids or malformed CSV files.
    """
    root = Path(root)
    images = list_images(root / image_dir, duplicates)
    mask_files = list_images(root / "masks", duplicates) if masks and (root / "masks").is_dir() else {}
    labels, groups, boxes = _read_extras(root, set(images))
    extra = sorted(set(mask_files) - set(images))
    if extra:
        log.warning("%s: %d masks have no image and are ignored: %s", root / "masks", len(extra), extra[:5])
    return DatasetIndex(
        root=root,
        layout="folder",
        images=images,
        masks={k: (p,) for k, p in mask_files.items() if k in images},
        labels=labels,
        groups=groups,
        boxes=boxes,
    )


def index_busi_release(root: str | Path, include_normal: bool = False) -> DatasetIndex:
    """Index the original BUSI release: ``benign/``, ``malignant/`` (and ``normal/``) with ``name (N).png`` files.

    Args:
        root: the folder holding ``benign/`` and ``malignant/`` (``Dataset_BUSI_with_GT``).
        include_normal: also index ``normal/`` (images without a lesion; empty masks). Left out by default, as in
            the paper: a segmentation or benign/malignant model has no use for them.

    Returns:
        The index; ``groups.csv`` and ``boxes.csv`` in ``root`` are read too (ids ``benign_001`` ...).

    Raises:
        FileNotFoundError: if a class folder is missing or an image has no ``_mask`` file.
        ValueError: on a file name outside the release's pattern (named, with the expected pattern).
    """
    root = Path(root)
    images: dict[str, Path] = {}
    masks: dict[str, list[Path]] = {}
    labels: dict[str, str] = {}
    for cls in BUSI_CLASSES:
        folder = root / cls
        if cls == "normal" and not include_normal:
            continue
        if not folder.is_dir():
            if cls == "normal":
                continue
            raise FileNotFoundError(f"{folder} does not exist: the BUSI release has benign/, malignant/, normal/")
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            m = _BUSI_NAME.match(p.stem)
            if m is None or m["cls"] != cls:
                raise ValueError(
                    f"{p}: not a BUSI release file name; expected '{cls} (N).png', '{cls} (N)_mask.png' or "
                    f"'{cls} (N)_mask_K.png'"
                )
            sid = f"{cls}_{int(m['n']):03d}"
            if m["mask"]:
                masks.setdefault(sid, []).append(p)
            else:
                if sid in images:
                    raise ValueError(f"duplicate id {sid!r} in {folder}: {images[sid].name} and {p.name}")
                images[sid] = p
                labels[sid] = cls
    if not images:
        raise FileNotFoundError(f"no BUSI release images in {root} (expected benign/ and malignant/)")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        log.warning("%s: %d mask files have no image and are ignored: %s", root, len(orphans), orphans[:5])
    missing = sorted(set(images) - set(masks))
    if missing:
        raise FileNotFoundError(
            f"{root}: {len(missing)} images have no '_mask' file: {[images[i].name for i in missing[:5]]}"
        )
    ids = set(images)
    _, groups, boxes = _read_extras(root, ids)
    # "_mask" before "_mask_1", "_mask_2"
    merged = {k: tuple(sorted(v, key=lambda p: (len(p.stem), p.stem))) for k, v in masks.items() if k in ids}
    return DatasetIndex(
        root=root,
        layout="busi",
        images=dict(sorted(images.items())),
        masks=dict(sorted(merged.items())),
        labels=dict(sorted(labels.items())),
        groups=groups,
        boxes=boxes,
    )


_BUSI_ID = re.compile(r"^(benign|malignant|normal)_\d+$")


def looks_like_busi(index: DatasetIndex) -> bool:
    """Whether ``index`` is a BUSI release: the ``busi`` layout, or the generic one with BUSI ids or folder name."""
    if index.layout == "busi":
        return True
    return "busi" in index.root.resolve().name.lower() or (
        bool(index.images) and all(_BUSI_ID.match(i) for i in index.images)
    )


def busi_groups_warning(index: DatasetIndex, groups_source: str | Path | None = None) -> str | None:
    """The warning for a BUSI release without ``groups.csv``, or ``None`` when there is nothing to warn about.

    BUSI holds repeated scans of the same lesions; a random split without groups puts copies of one lesion on both
    sides of the split and inflates the test scores. The message names the command that writes the groups.

    Args:
        index: the indexed dataset.
        groups_source: where the groups came from when not ``<root>/groups.csv`` (``data.groups_csv``).
    """
    if index.groups or groups_source is not None or not looks_like_busi(index):
        return None
    return (
        f"{index.root} looks like a BUSI release and has no groups.csv: BUSI holds repeated scans of the same "
        "lesions, and a random split without groups can put duplicate scans on both sides of the split (test "
        f"scores then measure memorisation). Fix: `usclip data duplicates {index.root}` writes "
        f"{index.root / 'groups.csv'}; for a read-only folder, `usclip data duplicates {index.root} --output "
        "groups.csv` and pass --data.init_args.groups_csv groups.csv"
    )


def detect_layout(root: str | Path) -> str:
    """``"busi"`` when ``root`` holds ``benign/`` and ``malignant/`` but no ``images/``; otherwise ``"folder"``."""
    root = Path(root)
    if not (root / "images").is_dir() and (root / "benign").is_dir() and (root / "malignant").is_dir():
        return "busi"
    return "folder"


def index_dataset(root: str | Path, layout: str = "auto", masks: bool = True) -> DatasetIndex:
    """Index ``root`` in the given layout (``auto`` detects it; see :func:`detect_layout`).

    Raises:
        ValueError: on an unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "auto":
        layout = detect_layout(root)
    index = index_busi_release(root) if layout == "busi" else index_folder(root, masks=masks)
    if not masks:
        index.masks = {}
    return index
