"""``usclip configs``: list the configs shipped in the package (the paper's settings and the overlays)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from usclip.packaged_configs import list_configs, packaged_configs_dir


def build_parser() -> argparse.ArgumentParser:
    """The ``usclip configs`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="usclip configs",
        description="List the configs shipped in the package. Any of them works as --config NAME (e.g. "
        "usclip fit --config busi_seg.yaml) when no file of that name exists in the working folder.",
    )
    parser.add_argument("--path", action="store_true", help="print the folder that holds them instead")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``usclip configs``; returns the exit code."""
    args = build_parser().parse_args(list(argv))
    if args.path:
        print(packaged_configs_dir())
        return 0
    for name in list_configs():
        print(name)
    return 0
