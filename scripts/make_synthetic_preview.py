"""Draw a grid of synthetic B-mode samples with their lesion outlines: ``docs/images/synthetic_examples.png``.

Usage::

    python scripts/make_synthetic_preview.py [--out docs/images/synthetic_examples.png] [--size 208] [--seed 0]

Top row benign, bottom row malignant; sector and linear fields of view alternate. Outlines: green = benign
mask, red = malignant mask, blue = scan-area box. The file is a palette PNG (grey levels plus three colours),
which keeps it well under 200 KB.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from usclip.data.synthetic import LABEL_NAMES, SyntheticSample, generate_sample

log = logging.getLogger("make_synthetic_preview")

# Palette indices 0..252 are grey levels; the last three are the outline colours.
_GREEN, _RED, _BLUE = 253, 254, 255
_STRIP = 16  # pixels of text under each tile


def _tile(sample: SyntheticSample) -> np.ndarray:
    """One sample as palette indices, with its mask outline, scan box and a one-line label underneath."""
    h, w = sample.image.shape
    tile = np.zeros((h + _STRIP, w), np.uint8)
    tile[:h] = (sample.image.astype(np.uint16) * 252 // 255).astype(np.uint8)
    x0, y0, x1, y1 = sample.box
    cv2.rectangle(tile, (x0 - 1, y0 - 1), (x1, y1), _BLUE, 1)
    contours, _ = cv2.findContours(sample.mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(tile, contours, -1, _RED if sample.label else _GREEN, 1)
    text = f"{LABEL_NAMES[sample.label]}, {sample.geometry}"
    cv2.putText(tile, text, (4, h + _STRIP - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 252, 1, cv2.LINE_AA)
    return tile


def make_preview(out: Path, size: int = 208, seed: int = 0, per_row: int = 4) -> Path:
    """Generate ``2 * per_row`` samples and save the annotated grid to ``out``.

    Args:
        out: PNG file to write (parent folders are created).
        size: side of each generated image in pixels.
        seed: seed of the first sample; sample ``k`` of a row uses ``seed + k``.
        per_row: samples per row (benign row, malignant row).

    Returns:
        ``out``.
    """
    rows = []
    for label in (0, 1):
        tiles = []
        for k in range(per_row):
            sample = generate_sample(seed + k, label, size, "sector" if k % 2 == 0 else "linear")
            log.info("%s: %s", LABEL_NAMES[label], sample.caption)
            tiles.append(_tile(sample))
            tiles.append(np.zeros((size + _STRIP, 4), np.uint8))
        rows.append(np.hstack(tiles[:-1]))
        rows.append(np.zeros((4, rows[-1].shape[1]), np.uint8))
    grid = np.vstack(rows[:-1])
    palette = [v for g in range(253) for v in (g * 255 // 252,) * 3] + [0, 230, 0, 255, 40, 40, 60, 110, 255]
    image = Image.fromarray(grid, mode="P")
    image.putpalette(palette)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    log.info("wrote %s (%d x %d, %.0f KB)", out, grid.shape[1], grid.shape[0], out.stat().st_size / 1024)
    return out


def main(args: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/synthetic_examples.png"))
    parser.add_argument("--size", type=int, default=208)
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_preview(ns.out, ns.size, ns.seed)


if __name__ == "__main__":
    main()
