"""``usclip data``: dataset tools.

- ``usclip data check ROOT``: read every file, print counts, sizes, mask coverage, label balance, the DICOM files
  (header, regions, whether they decode, a summary per kind) and every problem (exit code 1 when there are
  errors); ROOT may also be a folder of images without ``images/``, or one file;
- ``usclip data duplicates ROOT``: find near-duplicate images and write ``groups.csv`` (never over an existing
  file unless ``--overwrite``).

Both show a progress bar on a terminal (none in logs or pipes). The logic lives in :mod:`usclip.data.checks` and
:mod:`usclip.data.duplicates`; this module only parses arguments and prints reports (program output on stdout,
errors on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# Choices spelt out here so that `usclip data --help` imports neither torch nor OpenCV (usclip.data.crop does);
# tests/test_commands.py checks them against usclip.data.crop.CROP_MODES and usclip.data.layouts.LAYOUTS.
CROP_MODES = ("auto", "boxes", "none")
LAYOUTS = ("auto", "folder", "busi")

log = logging.getLogger(__name__)


#: `data duplicates` warns when its largest group exceeds this share of the images (and _CHAIN_MIN_IMAGES images)
_CHAIN_SHARE = 0.05
_CHAIN_MIN_IMAGES = 10


def build_parser() -> argparse.ArgumentParser:
    """The ``usclip data`` argument parser."""
    parser = argparse.ArgumentParser(prog="usclip data", description="Dataset tools (see docs/data.md).")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print the library's log messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{check,duplicates}")

    check = sub.add_parser("check", help="validate a dataset and print a summary and every problem")
    check.add_argument(
        "root", type=Path, help="dataset folder (generic layout, BUSI release, or a folder of images), or one file"
    )
    check.add_argument("--layout", choices=LAYOUTS, default="auto", help="folder layout (default: auto)")
    check.add_argument("--crop", choices=CROP_MODES, default="auto", help="crop whose effect is reported")
    check.add_argument("--labels", help="expected class names, comma separated (e.g. benign,malignant)")
    check.add_argument("--groups", type=Path, help="groups file to use instead of ROOT/groups.csv")
    check.add_argument("--max-problems", type=int, default=200, help="problems printed at most (default: 200)")
    check.add_argument(
        "--max-dicom-files",
        type=int,
        default=200,
        help="DICOM files listed one by one at most (default: 200; 0: the summary per kind only)",
    )
    check.add_argument("--dicom-csv", type=Path, help="also write the DICOM listing, every file, to this CSV file")
    check.add_argument(
        "--max-image-pixels",
        type=int,
        default=64_000_000,  # usclip.data.imageio.MAX_IMAGE_PIXELS, spelt out so that --help stays light
        help="images larger than this many pixels are errors, as in training (default: 64000000; 0: no limit)",
    )

    dup = sub.add_parser("duplicates", help="find near-duplicate images and write groups.csv")
    dup.add_argument("root", type=Path, help="dataset folder (generic layout or the BUSI release)")
    dup.add_argument("--layout", choices=LAYOUTS, default="auto", help="folder layout (default: auto)")
    dup.add_argument("--threshold", type=float, default=0.93, help="NCC of 32x32 scan-area thumbnails (0.93)")
    dup.add_argument("--hash-distance", type=int, default=6, help="aHash Hamming distance of 256 bits (6)")
    dup.add_argument("--screen-threshold", type=float, default=0.98, help="NCC of the uncropped thumbnails (0.98)")
    dup.add_argument("--no-crop", action="store_true", help="compare whole screens instead of scan areas")
    dup.add_argument("--output", type=Path, help="groups file to write (default: ROOT/groups.csv)")
    dup.add_argument("--pairs", type=Path, help="also write the pairs (id_a,id_b,ncc32,ahash16_hamming) here")
    dup.add_argument("--overwrite", action="store_true", help="replace an existing groups file")
    dup.add_argument("--reference", type=Path, help="a groups.csv to score the result against (pair P/R)")
    return parser


def run_check(args: argparse.Namespace) -> int:
    """``usclip data check``; returns 1 when the dataset has errors."""
    if args.max_dicom_files < 0:
        raise ValueError(f"--max-dicom-files must be 0 or more, got {args.max_dicom_files}")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    from usclip.data.checks import check_dataset

    report = check_dataset(
        args.root,
        layout=args.layout,
        crop=args.crop,
        label_names=labels,
        groups_csv=args.groups,
        progress=True,
        max_image_pixels=args.max_image_pixels or None,
    )
    print(report.format(args.max_problems, args.max_dicom_files))
    if args.dicom_csv is not None:
        from usclip._io import write_csv_atomic
        from usclip.data.dicom_checks import CSV_HEADER

        write_csv_atomic(args.dicom_csv, CSV_HEADER, [f.row() for f in report.dicom])
        print(f"wrote {args.dicom_csv} ({len(report.dicom)} DICOM files)")
    return 1 if report.errors else 0


def run_duplicates(args: argparse.Namespace) -> int:
    """``usclip data duplicates``; returns 1 when the groups file exists and ``--overwrite`` is not given."""
    output = args.output or args.root / "groups.csv"
    if output.exists() and not args.overwrite:
        print(f"usclip data duplicates: {output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    from usclip.data.duplicates import (
        find_duplicates,
        group_ids,
        group_pairs,
        precision_recall,
        write_groups_csv,
        write_pairs_csv,
    )
    from usclip.data.layouts import index_dataset, read_csv_column

    index = index_dataset(args.root, args.layout, masks=False)
    pairs = find_duplicates(
        index.images,
        ncc_threshold=args.threshold,
        hash_distance=args.hash_distance,
        screen_threshold=args.screen_threshold,
        crop=not args.no_crop,
        progress=True,
    )
    groups = group_ids(index.ids, pairs)
    sizes = Counter(groups.values())
    multi = [n for n in sizes.values() if n > 1]
    print(
        f"{len(index.ids)} images: {len(pairs)} duplicate pairs, {len(multi)} groups with more than one image "
        f"({sum(multi)} images, largest {max(multi, default=1)})"
    )
    largest = max(multi, default=1)
    if largest > max(_CHAIN_MIN_IMAGES, _CHAIN_SHARE * len(index.ids)):
        print(
            f"warning: the largest group holds {largest} of {len(index.ids)} images "
            f"({100 * largest / len(index.ids):.1f} %): union-find chains pairs, so a few false pairs can merge "
            "scans of different patients, and a group-aware split keeps the whole group in one split. Check its "
            "pairs (--pairs FILE), or make pairs stricter (--threshold above 0.93, --hash-distance below 6)"
        )
    if index.labels:
        seen: dict[str, set[str | None]] = {}
        for i, g in groups.items():
            seen.setdefault(g, set()).add(index.labels.get(i))
        mixed = {g for g, labels in seen.items() if len(labels) > 1}
        if mixed:
            print(f"{len(mixed)} groups hold images with different labels: {sorted(mixed)[:10]}")
    if args.reference:
        reference = read_csv_column(args.reference, "group")
        p, r = precision_recall(group_pairs(groups), group_pairs(reference))
        print(f"against {args.reference}: pair precision {p:.3f}, recall {r:.3f}")
    write_groups_csv(groups, output, overwrite=args.overwrite)
    print(f"wrote {output}")
    if args.pairs:
        print(f"wrote {write_pairs_csv(pairs, args.pairs)}")
    return 0


def main(argv: Sequence[str]) -> int:
    """Run ``usclip data`` with ``argv`` (without the leading ``data``); returns the exit code."""
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(levelname)s %(message)s")
    if not args.verbose:  # pydicom logs each failed pixel decoder with a traceback; the report names file and error
        logging.getLogger("pydicom.pixels").setLevel(logging.CRITICAL)  # ("pydicom" itself is reset on import)
    try:
        return run_check(args) if args.command == "check" else run_duplicates(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"usclip data {args.command}: {err}", file=sys.stderr)
        return 2
