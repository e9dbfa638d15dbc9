"""``usclip data check``: validate a dataset folder and summarise it (counts, sizes, masks, labels, problems).

Every file is read the way training reads it (``usclip.data.imageio``), so a dataset that passes the check does
not fail halfway through an epoch. DICOM files are also listed one by one (header, ultrasound regions, whether
they decode; see :mod:`usclip.data.dicom_checks`), with a summary per kind. Problems carry a severity: ``error``
(training would fail or be wrong), ``warning`` (probably a mistake: fixed on the fly or worth a look) and ``note``
(a logged, harmless conversion).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from usclip.data.colour import scan_area_colour_share
from usclip.data.crop import Box, CropMode, check_box, crop_box_for
from usclip.data.dicom_checks import DicomFileInfo, format_listing, read_dicom_header
from usclip.data.imageio import (
    _GREY_MODES,
    MAX_IMAGE_PIXELS,
    ImageReadError,
    binarise_mask,
    deep_bit_depth,
    open_header,
    read_image,
)
from usclip.data.layouts import (
    IMAGE_SUFFIXES,
    DatasetIndex,
    busi_groups_warning,
    detect_layout,
    index_busi_release,
    index_folder,
    read_csv_column,
)
from usclip.data.splits import SPLITS, groups_across_splits, read_split_file

log = logging.getLogger(__name__)

Severity = Literal["error", "warning", "note"]


@dataclass
class Problem:
    """One finding: ``severity``, the file (or folder) concerned and what is wrong, with the fix."""

    severity: Severity
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper():8s}{self.path}: {self.message}"


@dataclass
class DatasetReport:
    """Summary of a dataset folder; :meth:`format` renders it for the terminal."""

    root: Path
    layout: str = "?"
    num_images: int = 0
    sizes: Counter = field(default_factory=Counter)  # (W, H) -> count
    num_masks: int = 0
    coverage: list[float] = field(default_factory=list)  # lesion share of each mask
    labels: Counter = field(default_factory=Counter)
    num_groups: int = 0
    multi_groups: int = 0
    largest_group: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    crop_removed: list[float] = field(default_factory=list)  # share of pixels the crop removes
    colour_share: dict[str, float] = field(default_factory=dict)  # colour file -> coloured share of its scan area
    dicom: list[DicomFileInfo] = field(default_factory=list)  # the DICOM files: header, regions, decodes
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        """The problems of severity ``error``."""
        return [p for p in self.problems if p.severity == "error"]

    def add(self, severity: Severity, path: str | Path, message: str) -> None:
        """Record a problem."""
        self.problems.append(Problem(severity, str(path), message))

    def format(self, max_problems: int = 200, max_dicom_files: int | None = 200) -> str:
        """The report as text: one summary block, the DICOM listing, then every problem (errors first).

        Args:
            max_problems: problems printed at most.
            max_dicom_files: DICOM files listed one by one at most (``None``: all; 0: their summary only).
        """
        lines = [f"dataset {self.root} (layout: {self.layout})", f"  images: {self.num_images}"]
        if self.sizes:
            ws = [w for (w, _), n in self.sizes.items() for _ in range(n)]
            hs = [h for (_, h), n in self.sizes.items() for _ in range(n)]
            common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.sizes.most_common(3))
            ranges = f"width {min(ws)}-{max(ws)}, height {min(hs)}-{max(hs)}"
            lines.append(f"  sizes (W x H): {ranges}; most common {common}")
        if self.num_masks:
            c = np.array(self.coverage) * 100
            empty = int((c == 0).sum())
            lines.append(
                f"  masks: {self.num_masks}; lesion coverage mean {c.mean():.1f} %, median {np.median(c):.1f} %, "
                f"min {c.min():.2f} %, max {c.max():.1f} %; empty {empty}"
            )
        else:
            lines.append("  masks: none")
        if self.labels:
            total = sum(self.labels.values())
            parts = ", ".join(f"{k} {n} ({100 * n / total:.1f} %)" for k, n in sorted(self.labels.items()))
            lines.append(f"  labels: {parts}")
        else:
            lines.append("  labels: none")
        if self.num_groups:
            multi = f"{self.multi_groups} with more than one image, largest {self.largest_group}"
            lines.append(f"  groups: {self.num_groups} ({multi})")
        splits = ", ".join(f"{k} {n}" for k, n in self.splits.items()) or "none (a seeded split is made at fit time)"
        if self.layout != "file":
            lines.append(f"  split files: {splits}")
        if self.crop_removed:
            r = np.array(self.crop_removed) * 100
            lines.append(
                f"  auto crop: removes {r.mean():.1f} % of the pixels on average (median {np.median(r):.1f} %, "
                f"max {r.max():.1f} %)"
            )
        if self.colour_share:
            lines.append(_colour_line(self.colour_share))
        lines += format_listing(self.dicom, max_dicom_files)
        order = {"error": 0, "warning": 1, "note": 2}
        problems = sorted(self.problems, key=lambda p: (order[p.severity], p.path))
        counts = Counter(p.severity for p in problems)
        lines.append(
            f"problems: {counts['error']} errors, {counts['warning']} warnings, {counts['note']} notes"
            if problems
            else "problems: none"
        )
        lines += [f"  {p}" for p in problems[:max_problems]]
        if len(problems) > max_problems:
            lines.append(f"  ... and {len(problems) - max_problems} more")
        return "\n".join(lines)


def _colour_line(shares: dict[str, float], top: int = 3) -> str:
    """One summary line: how many colour files hold coloured pixels in their scan area, and the largest shares."""
    s = np.array(list(shares.values())) * 100
    worst = sorted(shares.items(), key=lambda kv: -kv[1])[:top]
    named = ", ".join(f"{Path(p).name} {100 * v:.2f} %" for p, v in worst if v > 0)
    return (
        f"  colour in the scan area: {int((s > 0).sum())} of {len(s)} colour files hold coloured pixels (mean "
        f"{s.mean():.2f} %, max {s.max():.2f} %){'; largest: ' + named if named else ''}"
        f"{' (data.colour: replace fills them with grey)' if named else ''}"
    )


def _is_flat_folder(root: Path) -> bool:
    """A folder of images without ``images/`` (what ``data.predict_root`` also accepts)."""
    if (root / "images").is_dir():
        return False
    return any(p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") for p in root.iterdir())


def _index(root: Path, layout: str, report: DatasetReport) -> DatasetIndex | None:
    layout = detect_layout(root) if layout == "auto" else layout
    report.layout = layout
    duplicates: list[tuple[Path, Path]] = []
    image_dir = "images"
    if layout == "folder" and _is_flat_folder(root):
        image_dir = "."
        report.add(
            "note",
            root,
            "no images/ folder: checked the image files in the folder itself (as data.predict_root reads them; "
            "training needs ROOT/images)",
        )
    try:
        index = index_busi_release(root) if layout == "busi" else index_folder(root, image_dir, duplicates=duplicates)
    except (FileNotFoundError, ValueError) as err:
        report.add("error", root, str(err))
        return None
    for first, second in duplicates:
        report.add(
            "error",
            second,
            f"duplicate id {second.stem!r}: {first.name} has the same stem; ids are file stems, keep one file",
        )
    if layout == "folder":
        for name, column in (("labels.csv", "label"), ("groups.csv", "group")):
            path = root / name
            if path.is_file():
                extra = sorted(set(read_csv_column(path, column)) - set(index.images))
                if extra:
                    report.add("warning", path, f"{len(extra)} ids have no image: {extra[:5]}")
        if (root / "masks").is_dir():
            extra = sorted({p.stem for p in (root / "masks").iterdir()} - set(index.images))
            if extra:
                report.add("warning", root / "masks", f"{len(extra)} masks have no image: {extra[:5]}")
    return index


def _peek_mode(path: Path) -> str | None:
    try:
        with open_header(path) as im:  # called after read_image accepted the size
            return str(im.mode)
    except (OSError, ValueError):
        return None


def _deep_image_note(path: Path, mode: str, report: DatasetReport) -> None:
    """The 16-bit note, and a warning when hot pixels above the chosen bit depth saturate (read twice: rare)."""
    with open_header(path) as im:  # called after read_image accepted the size
        bits, above = deep_bit_depth(np.asarray(im))
    report.add("note", path, f"{mode} (16-bit) image: scaled to 8 bits (from {bits} bits)")
    if above:
        report.add("warning", path, f"{above} pixels above the {bits}-bit range saturate at 255 (hot pixels?)")


def _check_mask(
    files: tuple[Path, ...], shape: tuple[int, int], report: DatasetReport, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> np.ndarray | None:
    merged: np.ndarray | None = None
    for p in files:
        try:
            raw = read_image(p, max_pixels)
        except (OSError, ValueError) as err:
            report.add("error", p, str(err).removeprefix(f"{p}: "))
            return None
        if raw.shape != shape:
            report.add(
                "error",
                p,
                f"mask is {raw.shape[1]}x{raw.shape[0]} but its image is {shape[1]}x{shape[0]} (W x H); "
                "masks must have the image's size",
            )
            return None
        values = np.unique(raw)
        try:
            m = binarise_mask(raw, p)
        except ImageReadError as err:
            report.add("error", p, str(err).removeprefix(f"{p}: "))
            return None
        if len(values) > 2:
            half = (int(values[-1]) + 1) // 2
            report.add("warning", p, f"mask has {len(values)} grey levels (anti-aliased); thresholded at {half}")
        elif len(values) == 2 and values[1] != 255:
            report.add("note", p, f"mask stored as 0/{values[1]}; read as binary (non-zero = lesion)")
        merged = m if merged is None else np.maximum(merged, m)
    return merged


def check_dataset(
    root: str | Path,
    layout: str = "auto",
    crop: CropMode = "auto",
    label_names: list[str] | None = None,
    groups_csv: str | Path | None = None,
    progress: bool = False,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> DatasetReport:
    """Read every file of a dataset folder and collect counts, statistics and problems.

    Args:
        root: the dataset folder (generic layout, BUSI release, or a folder of images without ``images/``), or one
            image file.
        layout: ``auto``, ``folder`` or ``busi``.
        crop: crop mode whose effect is reported (``auto``: the share of pixels the scan-area crop removes, and
            masks that reach outside it).
        label_names: the expected class names; other labels are errors. ``None`` accepts any label.
        groups_csv: read the groups from this file instead of ``<root>/groups.csv`` (a read-only folder).
        progress: show a progress bar while the images are read (on a terminal only: ``tqdm(disable=None)``).
        max_image_pixels: images and masks larger than this (pixels) are errors, as in training
            (``data.max_image_pixels``); they are not decoded.

    Returns:
        The report; ``report.errors`` is empty when training can use the folder as it is.
    """
    root = Path(root)
    report = DatasetReport(root=root)
    if root.is_file():  # one image: its own checks and, for DICOM, its listing
        report.layout = "file"
        index: DatasetIndex | None = DatasetIndex(root=root.parent, layout="file", images={root.stem: root})
    elif not root.is_dir():
        report.add("error", root, "folder does not exist")
        return report
    else:
        index = _index(root, layout, report)
    if index is None:
        return report
    if groups_csv is not None:
        try:
            groups = read_csv_column(groups_csv, "group")
        except (OSError, ValueError) as err:
            report.add("error", groups_csv, str(err))
        else:
            extra = sorted(set(groups) - set(index.images))
            if extra:
                report.add("warning", groups_csv, f"{len(extra)} ids have no image and are ignored: {extra[:5]}")
            index.groups = {k: v for k, v in groups.items() if k in index.images}
    report.num_images = len(index.images)
    for sid in tqdm(index.ids, desc="checking images", unit="image", disable=None if progress else True):
        path = index.images[sid]
        dicom = _dicom_header(path, root, report)
        try:
            image = read_image(path, max_image_pixels)  # DICOM: usclip.data.dicom.read_dicom
        except (OSError, ValueError, ImportError) as err:
            message = str(err).removeprefix(f"{path}: ")
            report.add("error", path, message)
            if dicom is not None:
                dicom.decoded(message)
            continue
        if dicom is not None:
            dicom.decoded()
        mode = _peek_mode(path)
        if mode in ("RGBA", "LA", "PA"):
            report.add("note", path, f"{mode} image: composited onto black and converted to grayscale")
        elif mode is not None and mode.startswith("I"):
            _deep_image_note(path, mode, report)
        report.sizes[(image.shape[1], image.shape[0])] += 1
        if path.suffix.lower() == ".dcm" or (mode is not None and mode not in _GREY_MODES):
            share = scan_area_colour_share(path, image, max_image_pixels)  # None for a grey file
            if share is not None:
                report.colour_share[str(path)] = share
                if dicom is not None:
                    dicom.colour_share = share
        mask = None
        if sid in index.masks:
            mask = _check_mask(index.masks[sid], image.shape, report, max_image_pixels)
            if mask is not None:
                report.num_masks += 1
                report.coverage.append(float(mask.mean()))
                if not mask.any():
                    report.add("note", index.masks[sid][0], "empty mask (no lesion)")
        elif index.masks or (root / "masks").is_dir():
            report.add("error", path, "has no mask file (expected masks/<id>.png with the same stem)")
        box: Box | None = None
        if sid in index.boxes:
            try:
                box = check_box(index.boxes[sid], image.shape, f"boxes.csv row {sid}")
            except ValueError as err:
                report.add("error", root / "boxes.csv", str(err))
        elif crop == "boxes":
            report.add("error", root / "boxes.csv", f"no box for id {sid!r} (needed by crop='boxes')")
        if crop != "none" and (box is not None or crop == "auto"):
            if crop == "auto" and path.suffix.lower() == ".dcm":
                from usclip.data.dicom import read_dicom

                box = read_dicom(path).region or crop_box_for(image, "auto")
            elif crop == "auto":
                box = crop_box_for(image, "auto")
            assert box is not None
            x0, y0, x1, y1 = box
            report.crop_removed.append(1.0 - (x1 - x0) * (y1 - y0) / image.size)
            if mask is not None and mask.sum() > mask[y0:y1, x0:x1].sum():
                lost = int(mask.sum() - mask[y0:y1, x0:x1].sum())
                report.add("warning", path, f"{lost} lesion pixels lie outside the {crop} crop box {box}")
    if report.layout != "file":
        _check_labels(index, report, label_names)
        _check_groups_and_splits(index, report, groups_csv)
    return report


def _dicom_header(path: Path, root: Path, report: DatasetReport) -> DicomFileInfo | None:
    """The header listing of a ``.dcm`` file (appended to ``report.dicom``); ``None`` for other files."""
    if path.suffix.lower() != ".dcm":
        return None
    try:
        name = str(path.relative_to(root)) if root.is_dir() else path.name
    except ValueError:
        name = str(path)
    info = read_dicom_header(path, name)
    report.dicom.append(info)
    tissue = [r for r in info.regions if r.spatial_format == 1 and r.data_type == 1 and r.box is not None]
    if len(tissue) > 1:  # data.regions decides: largest (one, the others left out), all (one sample each), error
        boxes = ", ".join(str(r.box) for r in tissue)
        report.add(
            "note",
            path,
            f"{len(tissue)} tissue regions {boxes}: data.regions: largest (default) trains on the largest and leaves "
            "the others out; all makes each one a sample; error refuses the file",
        )
    return info


def _check_labels(index: DatasetIndex, report: DatasetReport, label_names: list[str] | None) -> None:
    if not index.labels:
        return
    source = index.root / "labels.csv" if index.layout == "folder" else index.root
    report.labels = Counter(index.labels.values())
    missing = sorted(set(index.images) - set(index.labels))
    if missing:
        report.add("error", source, f"{len(missing)} images have no label: {missing[:5]}")
    empty = sorted(k for k, v in index.labels.items() if not v)
    if empty:
        report.add("error", source, f"{len(empty)} ids have an empty label: {empty[:5]}")
    if label_names is not None:
        allowed = set(label_names) | {str(i) for i in range(len(label_names))}
        unknown: dict[str, list[str]] = {}  # one pass over the ids, not one per unknown label
        for k, v in index.labels.items():
            if v not in allowed:
                unknown.setdefault(v, []).append(k)
        for name in sorted(unknown):
            ids = sorted(unknown[name])
            report.add("error", source, f"unknown label {name!r} (ids {ids[:5]}); expected one of {list(label_names)}")


def _check_groups_and_splits(index: DatasetIndex, report: DatasetReport, groups_csv: str | Path | None) -> None:
    root = index.root
    warning = busi_groups_warning(index, groups_csv)
    if warning and not (root / "train.txt").is_file():  # predefined train/val/test files need no groups
        report.add("warning", root, warning.removeprefix(f"{root} "))
    if index.groups:
        sizes = Counter(index.groups.values())
        report.num_groups = len(sizes) + len(set(index.images) - set(index.groups))
        report.multi_groups = sum(1 for n in sizes.values() if n > 1)
        report.largest_group = max(sizes.values())
        if index.labels:
            members: dict[str, set[str]] = {}
            for sid, g in index.groups.items():
                members.setdefault(g, set()).add(index.labels.get(sid, ""))
            mixed = sorted(g for g, labels in members.items() if len(labels - {""}) > 1)
            if mixed:
                report.add(
                    "warning",
                    root / "groups.csv",
                    f"{len(mixed)} groups hold images with different labels ({mixed[:5]}); the same scan labelled "
                    "twice? Splits keep them on one side and stratify by the group's majority label",
                )
    files = {s: root / f"{s}.txt" for s in SPLITS if (root / f"{s}.txt").is_file()}
    splits = {s: read_split_file(p) for s, p in files.items()}
    seen: dict[str, str] = {}
    for name, ids in splits.items():
        report.splits[name] = len(ids)
        unknown = [i for i in ids if i not in index.images]
        if unknown:
            report.add("error", files[name], f"{len(unknown)} ids have no image: {unknown[:5]}")
        for i in ids:
            if i in seen:
                report.add("error", files[name], f"id {i!r} is also listed in {seen[i]}.txt")
            seen[i] = name
    if splits and set(splits) not in ({"test"}, set(SPLITS)):
        report.add("error", root, f"split files {sorted(files)}: give all three, test.txt alone, or none")
    crossing = groups_across_splits(splits, index.groups)
    if crossing:
        report.add(
            "warning",
            root / "groups.csv",
            f"{len(crossing)} groups span several split files (e.g. {dict(list(crossing.items())[:3])}): leakage",
        )
