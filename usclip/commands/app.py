"""``usclip app RUN_DIR|CKPT``: serve a small web page to try a trained model on one's own scans (docs/app.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def _bool(value: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "yes", "1"):
        return True
    if low in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {value!r}")
    return port


def build_parser() -> argparse.ArgumentParser:
    """The ``usclip app`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="usclip app",
        description="Serve a web page where one uploads a scan (PNG, JPEG, BMP, TIFF or ultrasound DICOM) and sees "
        "the predicted lesion on it and its area (segmentation) or the class probabilities (classification). "
        "For research use only. Offline: no analytics, no CDN; listens on 127.0.0.1 unless --host says otherwise. "
        'Needs gradio: pip install "usclip[app]".',
    )
    parser.add_argument(
        "run", metavar="RUN_DIR|CKPT", help="a run directory (its checkpoints/best.ckpt is used) or a .ckpt file"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this computer only; 0.0.0.0: every network interface)",
    )
    parser.add_argument("--port", type=_port, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument(
        "--share",
        type=_bool,
        default=False,
        metavar="{true,false}",
        help="make a public gradio.live link through Gradio's servers (default: false; scans then leave this computer)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also print the library's log messages")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``usclip app`` with ``argv`` (without the leading ``app``); serves until Ctrl+C; returns the exit code."""
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not Path(args.run).exists():
        print(f"usclip app: {args.run} does not exist (expected a run directory or a .ckpt file)", file=sys.stderr)
        return 2
    from usclip.app.page import import_gradio

    try:
        import_gradio()  # before the model loads: a missing gradio is said at once
    except ImportError as err:
        print(f"usclip app: {err}", file=sys.stderr)
        return 2
    from usclip.app.page import serve
    from usclip.tasks import load_task

    try:
        task = load_task(args.run)
    except (FileNotFoundError, ValueError) as err:
        print(f"usclip app: {err}", file=sys.stderr)
        return 2
    serve(task, host=args.host, port=args.port, share=args.share)
    return 0
