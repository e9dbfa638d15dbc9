"""``usclip report RUN_DIR...``: the paper's Tables 2 and 3 (mean ± std over seeds) from tested runs.

Each ``RUN_DIR`` is a run directory (``runs/<name>/version_<n>``, or ``<runs_root>/<table>/<dataset>/<method>/
seed_<seed>`` from ``usclip sweep``) or a folder above several; every folder below that holds
``results/test_metrics.json`` and ``sweep_run.json`` or ``config.yaml`` counts. Runs of several ``usclip sweep``
protocols (``runs/paper/authors``, ``runs/paper/usclip``) share a table: a Protocol column names each row's. The
logic lives in :mod:`usclip.reporting` (and :mod:`usclip.run_results`); docs/reports.md describes the tables.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from usclip.reporting import find_run_dirs, load_run, write_overlay_grids, write_report
from usclip.visualize.figures import check_figure_options

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The ``usclip report`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="usclip report", description="The paper's result tables over seeds (docs/reports.md)."
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories or folders above")
    parser.add_argument(
        "--output", type=Path, default=Path("report"), help="folder for <table>.md/.csv/.tex and the figures (report/)"
    )
    parser.add_argument(
        "--method-from",
        choices=("auto", "config", "name"),
        default="auto",
        help="row names: the paper's from sweep_run.json, else made from the config (auto; default); always from "
        "the config (encoder, weights, adapter, ft.); or the logger name",
    )
    parser.add_argument(
        "--compare-paper",
        action="store_true",
        help="set the paper's published value and the difference beside each cell: ours (paper, ours - paper); "
        "with runs of several sweep protocols also a table of the protocols side by side with the paper's number "
        "(and <table>_protocols.csv)",
    )
    parser.add_argument("--all-metrics", action="store_true", help="Table 3 also shows sensitivity, specificity and F1")
    parser.add_argument(
        "--datasets-per-block",
        type=int,
        default=3,
        help="datasets side by side in one Markdown table; more go into another below, as in the paper "
        "(default: 3; 0: one wide table)",
    )
    parser.add_argument(
        "--grid-images",
        type=int,
        default=4,
        help="test images in each overlay grid figure, overlays_<dataset>.png/.pdf/.svg (default: 4; 0: no grid)",
    )
    parser.add_argument(
        "--formats",
        default="png,pdf,svg",
        help="formats of the figures, comma-separated, any of png, pdf, svg (default: png,pdf,svg)",
    )
    parser.add_argument("--dpi", type=float, default=300, help="resolution of the figures' PNG (default: 300)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print the library's log messages")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``usclip report`` with ``argv`` (without the leading ``report``); returns the exit code."""
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        formats = check_figure_options([f.strip() for f in args.formats.split(",") if f.strip()], args.dpi)
        dirs = find_run_dirs(args.run_dirs)
        runs = [load_run(d, args.method_from) for d in tqdm(dirs, desc="reading runs", unit="run", disable=None)]
        written = write_report(runs, args.output, args.compare_paper, args.all_metrics, args.datasets_per_block)
        grids = (
            write_overlay_grids(runs, args.output, args.grid_images, formats, args.dpi) if args.grid_images > 0 else []
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"usclip report: {err}", file=sys.stderr)
        return 2
    for name, files in written.items():
        print(f"## {name} ({sum(r.table == name for r in runs)} runs)\n\n{files.text}")
        print(f"wrote {files.markdown}, {files.csv} and {files.latex}\n")
    for grid in grids:
        print(f"wrote {grid}")
    return 0
