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
:func:`expand_regions` then makes each tissue region of a multi-region DICOM its own sample (``regions: all``).
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
        regions: id -> ``(file id, tissue region number)`` for the samples of a DICOM file with several tissue
            regions (:func:`expand_regions` with ``all``); ids not in it are whole files.
    """

    root: Path
    layout: str
    images: dict[str, Path]
    masks: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    boxes: dict[str, Box] = field(default_factory=dict)
    regions: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        """All ids, sorted."""
        return sorted(self.images)

    def file_id(self, sid: str) -> str:
        """The id of the file sample ``sid`` comes from (``sid`` itself unless it is a region of a file)."""
        return self.regions[sid][0] if sid in self.regions else sid

    def region_ids(self) -> dict[str, list[str]]:
        """File id -> the ids of its region samples, in region order, for the files split into regions."""
        out: dict[str, list[str]] = {}
        for sid, (fid, _) in sorted(self.regions.items(), key=lambda kv: kv[1]):
            out.setdefault(fid, []).append(sid)
        return out


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


def index_predict_inputs(spec: str | Path, name: str = "predict_root") -> DatasetIndex:
    """Index what ``usclip predict`` reads: a folder of images, one image file, or a glob of image files.

    A folder is read as :func:`index_folder` reads it (``images/`` when it has one, else the images in the folder
    itself; ``boxes.csv`` beside them); a file or a glob gives the files themselves (ids: file stems), with the
    ``boxes.csv`` of their common folder when there is one.

    Args:
        spec: the folder, file or glob (``scans/*.png``, ``scans/**/*.dcm``).
        name: the setting's name, for messages.

    Raises:
        FileNotFoundError: naming ``spec`` when it is no folder, no file and no glob that matches image files.
        ValueError: for a file that is not an image (by suffix), or two files sharing a stem.
    """
    import glob as globbing
    import os

    text = os.fspath(spec)
    path = Path(text)
    suffixes = ", ".join(IMAGE_SUFFIXES)
    if path.is_dir():
        return index_folder(path, "images" if (path / "images").is_dir() else ".", masks=False)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{name}={text!r} is not an image file; expected one of {suffixes}, a folder or a glob")
        files = [path]
    elif globbing.has_magic(text):
        files = [Path(f) for f in sorted(globbing.glob(text, recursive=True))]
        files = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
        if not files:
            raise FileNotFoundError(f"{name}={text!r}: the glob matches no image file ({suffixes})")
    else:
        raise FileNotFoundError(
            f"{name}={text!r} does not exist; expected a folder of images (or one holding images/), an image file "
            f"({suffixes}) or a glob such as 'scans/*.png'"
        )
    images: dict[str, Path] = {}
    for f in files:
        if f.stem in images:
            raise ValueError(
                f"{name}={text!r}: {images[f.stem]} and {f} share the id {f.stem!r} (ids are file stems); "
                "narrow the glob or rename one of them"
            )
        images[f.stem] = f
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    boxes_csv = root / "boxes.csv"  # only the rows of these files: the folder may hold many more
    boxes = {k: v for k, v in read_boxes_csv(boxes_csv).items() if k in images} if boxes_csv.is_file() else {}
    return DatasetIndex(root=root, layout="folder", images=dict(sorted(images.items())), boxes=boxes)


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


def expand_regions(index: DatasetIndex, regions: str) -> DatasetIndex:
    """Make each tissue region of a multi-region DICOM file its own sample (``all``), or refuse such files (``error``).

    Reads the header of every ``.dcm`` file of the index (no pixel is decoded; see
    :func:`usclip.data.dicom.dicom_regions`). With ``all``, a file with several tissue regions becomes the ids
    ``<id>@r0``, ``<id>@r1`` ... (:func:`usclip.data.dicom.region_id`; regions in the order of the file's
    ``SequenceOfUltrasoundRegions``), which share the file's image, its full-frame mask (each region's sample crops
    its own box), its label and its group; a file without a row in ``groups.csv`` is a group of its own (named by
    its id), so the regions of one file always land in the same split. Other files keep their ids. ``largest``
    returns ``index`` as it is (the dataset then warns once per file about the regions it leaves out).

    Args:
        index: a file-level index (from :func:`index_dataset`, with groups applied).
        regions: ``largest``, ``all`` or ``error`` (:data:`usclip.data.dicom.REGIONS_MODES`).

    Returns:
        The index with region samples (a new object; ``index`` is not changed).

    Raises:
        ValueError: on an unknown ``regions``; with ``error``, when files hold several tissue regions (naming up to
            five files and their regions); with ``all``, when a region's id is the id of another file.
    """
    from usclip.data.dicom import check_regions_mode, dicom_regions, region_id
    from usclip.data.imageio import ImageReadError

    check_regions_mode(regions, "data.regions")
    if regions == "largest":
        return index
    several: dict[str, int] = {}
    described: dict[str, str] = {}
    for sid, path in index.images.items():
        if path.suffix.lower() != ".dcm" or sid in index.regions:
            continue
        try:
            found = dicom_regions(path)
        except (ImageReadError, FileNotFoundError) as err:  # reported when its sample is read
            log.debug("%s: regions not read (%s)", path, err)
            continue
        if len(found) > 1:
            several[sid] = len(found)
            described[sid] = "; ".join(r.describe(k) for k, r in enumerate(found))
    if not several:
        return index
    if regions == "error":
        listed = "\n".join(f"  {index.images[sid]}: {described[sid]}" for sid in list(several)[:5])
        raise ValueError(
            f"data.regions='error': {len(several)} DICOM files of {index.root} hold several tissue regions "
            f"(first {min(5, len(several))}):\n{listed}\nuse regions='largest' (the largest region of each file, "
            "with a warning) or regions='all' (each region one sample, ids <id>@r0, <id>@r1 ...)"
        )
    images: dict[str, Path] = {}
    masks: dict[str, tuple[Path, ...]] = {}
    labels: dict[str, str] = {}
    groups: dict[str, str] = {}
    boxes: dict[str, Box] = {}
    region_of = dict(index.regions)
    for sid, path in index.images.items():
        numbered = [(region_id(sid, k), k) for k in range(several[sid])] if sid in several else [(sid, None)]
        for nid, k in numbered:
            if k is not None and nid in index.images:
                raise ValueError(
                    f"{index.root}: {nid!r}, the id of region r{k} of {path.name}, is also the id of "
                    f"{index.images[nid].name}; rename one of the two files"
                )
            images[nid] = path
            if sid in index.masks:
                masks[nid] = index.masks[sid]
            if sid in index.labels:
                labels[nid] = index.labels[sid]
            if k is not None:
                groups[nid] = index.groups.get(sid, sid)
                region_of[nid] = (sid, k)
            else:
                if sid in index.groups:
                    groups[nid] = index.groups[sid]
                if sid in index.boxes:
                    boxes[nid] = index.boxes[sid]
    log.info(
        "data.regions='all': %d DICOM files of %s hold several tissue regions; %d region samples",
        len(several),
        index.root,
        sum(several.values()),
    )
    return DatasetIndex(
        root=index.root,
        layout=index.layout,
        images=dict(sorted(images.items())),
        masks=dict(sorted(masks.items())),
        labels=dict(sorted(labels.items())),
        groups=groups,
        boxes=boxes,
        regions=region_of,
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
