"""Figures a paper can use, drawn with matplotlib: ROC curves, confusion matrices and overlay grids.

:func:`save_figure` writes each as PNG, PDF and SVG at a set DPI (300 by default; the PNG is ``figsize x dpi``
pixels, no tight cropping). Text stays text: TrueType fonts in the PDF (``pdf.fonttype`` 42, what journals ask for
instead of Type 3) and ``<text>`` elements in the SVG (``svg.fonttype: none``), so labels can be edited and searched.
No creation date and a fixed SVG id salt: the same figure gives the same bytes.

matplotlib is imported inside the functions: :mod:`usclip.tasks` imports this package and most commands draw no
figure. Figures are :class:`matplotlib.figure.Figure` objects on an Agg canvas, never pyplot: nothing is registered
in pyplot's global figure list (so nothing stays open over many runs), no GUI backend is touched, nothing is shown.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from usclip._io import atomic_path
from usclip.visualize.pictures import OVERLAY_LABELS, Palette, get_palette

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURE_FORMATS = ("png", "pdf", "svg")
DEFAULT_DPI = 300
_RC: dict[str, Any] = {
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "svg.hashsalt": "usclip",
    "font.size": 8,
    "axes.titlesize": 8,
    "legend.fontsize": 7,
}
_METADATA: dict[str, dict[str, Any]] = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None},
    "svg": {"Date": None},
}


@contextlib.contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(_RC):  # type: ignore[arg-type]  # its stubs type the keys as a Literal of names
        yield


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    return colour[0] / 255, colour[1] / 255, colour[2] / 255


def check_figure_options(formats: Sequence[str], dpi: float) -> tuple[str, ...]:
    """The formats as a tuple, checked: each one of :data:`FIGURE_FORMATS`, at least one, and a positive DPI.

    Raises:
        ValueError: naming the value received and what was expected.
    """
    formats = tuple(formats)
    bad = [f for f in formats if f not in FIGURE_FORMATS]
    if bad or not formats:
        raise ValueError(f"figure formats must be a non-empty list of {list(FIGURE_FORMATS)}, got {list(formats)}")
    if not (isinstance(dpi, int | float) and math.isfinite(dpi) and dpi > 0):
        raise ValueError(f"figure dpi must be a positive number (e.g. 300), got {dpi!r}")
    return formats


def save_figure(
    fig: Figure, stem: str | Path, formats: Sequence[str] = FIGURE_FORMATS, dpi: float = DEFAULT_DPI
) -> list[Path]:
    """Write ``<stem>.png``, ``.pdf``, ``.svg`` (those of ``formats``) atomically, then clear the figure.

    Args:
        fig: a figure from this module (or any :class:`~matplotlib.figure.Figure`).
        stem: the path without suffix, e.g. ``results/test_roc``.
        formats: any of ``png``, ``pdf``, ``svg``.
        dpi: resolution of the PNG (and of images embedded in PDF/SVG); the PNG is ``figsize x dpi`` pixels.

    Returns:
        The files written, in the order of ``formats``.

    Raises:
        ValueError: on an unknown format or a DPI that is not positive.
    """
    formats = check_figure_options(formats, dpi)
    stem = Path(stem)
    written = []
    with _style():
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, metadata=_METADATA[fmt])
            written.append(path)
    fig.clear()  # free its artists now; the figure is in no global list, so it goes with its last reference
    return written


def roc_figure(
    curves: Sequence[tuple[np.ndarray, np.ndarray, str]],
    title: str = "ROC",
    palette: str | Palette = "paper",
    size: float = 3.4,
) -> Figure:
    """ROC curves: false positive rate on x, true positive rate on y, the chance diagonal dashed grey.

    Args:
        curves: ``(fpr, tpr, label)`` per curve; fpr and tpr in [0, 1], e.g. from :func:`usclip.metrics.roc_curve`.
        title: text above the plot.
        palette: the curves take the palette's ``curves`` colours in order.
        size: width and height in inches (3.4: one column of a two-column paper).
    """
    colours = get_palette(palette).curves
    with _style():
        fig = _new_figure(size, size)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=0.8, label="chance")
        for k, (fpr, tpr, label) in enumerate(curves):
            ax.plot(np.asarray(fpr), np.asarray(tpr), color=_rgb(colours[k % len(colours)]), linewidth=1.5, label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1.005), aspect="equal", title=title)
        ax.set_xlabel("false positive rate (1 − specificity)")
        ax.set_ylabel("true positive rate (sensitivity)")
        ax.grid(color="0.92", linewidth=0.5)
        ax.legend(loc="lower right", frameon=False)
    return fig


def confusion_matrix_figure(
    matrix: np.ndarray, class_names: Sequence[str], palette: str | Palette = "paper", size: float = 3.0
) -> Figure:
    """A confusion matrix: counts and row percentages (recall), cells shaded from white by the row fraction.

    Args:
        matrix: ``(C, C)`` counts, row = true class, column = predicted class.
        class_names: ``C`` names.
        palette: the shade runs from white to the palette's ``matrix`` colour.
        size: width and height in inches.

    Raises:
        ValueError: if the matrix is not square or the names do not match it.
    """
    from matplotlib.colors import LinearSegmentedColormap

    matrix = np.asarray(matrix)
    n = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"matrix {matrix.shape} must be C x C with C = {len(class_names)} class names")
    fraction = matrix / matrix.sum(1, keepdims=True).clip(min=1)
    cmap = LinearSegmentedColormap.from_list("usclip", [(1, 1, 1), _rgb(get_palette(palette).matrix)])
    with _style():
        fig = _new_figure(size, size)
        ax = fig.add_subplot()
        ax.imshow(fraction, cmap=cmap, vmin=0, vmax=1)
        for i in range(n):
            for j in range(n):
                ink = "white" if fraction[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(matrix[i, j])}\n{fraction[i, j]:.0%}", ha="center", va="center", color=ink)
        ax.set_xticks(range(n), [str(c) for c in class_names])
        ax.set_yticks(range(n), [str(c) for c in class_names])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.tick_params(length=0)
    return fig


def nice_scale_length(width_mm: float) -> float:
    """The scale bar's length in mm: the largest of 1, 2, 5 x 10^k mm that fits in 30 % of ``width_mm``."""
    target = 0.3 * width_mm
    exponent = math.floor(math.log10(target))
    return max(m * 10.0**exponent for m in (1, 2, 5) if m * 10.0**exponent <= target)


def add_scale_bar(
    ax: Axes, spacing: tuple[float, float], image_width: int, image_height: int, length_mm: float | None = None
) -> tuple[float, float]:
    """A horizontal scale bar in the lower left corner of an image drawn with ``imshow`` on ``ax``.

    Args:
        ax: the axes of the image (data coordinates: pixels).
        spacing: ``(row, column)`` pixel spacing in mm; the bar is horizontal, so its length uses the column one.
        image_width: the image's width in pixels.
        image_height: the image's height in pixels.
        length_mm: the bar's length; default :func:`nice_scale_length` of the image's width.

    Returns:
        ``(length in mm, length in image pixels)``: pixels = mm / column spacing.
    """
    from matplotlib.patches import Rectangle

    col_spacing = float(spacing[1])
    length = length_mm if length_mm is not None else nice_scale_length(image_width * col_spacing)
    pixels = length / col_spacing
    x0, thickness = 0.05 * image_width - 0.5, max(0.025 * image_height, 1.0)
    y0 = image_height - 0.5 - 0.06 * image_height - thickness
    ax.add_patch(Rectangle((x0, y0), pixels, thickness, facecolor="white", edgecolor="none", gid="scale_bar"))
    text = f"{length:g} mm"
    ax.text(x0 + pixels / 2, y0 - 0.02 * image_height, text, color="white", ha="center", va="bottom", fontsize=6)
    return length, pixels


def overlay_grid_figure(
    cells: Sequence[Sequence[np.ndarray | None]],
    row_titles: Sequence[str] = (),
    col_titles: Sequence[str] = (),
    spacings: Sequence[Sequence[tuple[float, float] | None]] | None = None,
    palette: str | Palette = "paper",
    legend: bool = True,
    scale_bar_mm: float | None = None,
    cell_inches: float = 1.6,
) -> Figure:
    """Overlays in a grid (rows: test images, columns: methods) with a legend of the colours and scale bars.

    Args:
        cells: rows of ``(H, W, 3)`` or ``(H, W)`` uint8 pictures; ``None`` leaves a blank cell.
        row_titles: one title per row (the image id), left of the row.
        col_titles: one title per column (the method), above the first row.
        spacings: per cell ``(row, column)`` pixel spacing in mm, or ``None``; where known the picture is shown at
            its physical aspect ratio and gets a scale bar (:func:`add_scale_bar`).
        palette: the palette the overlays were drawn in; the legend shows its colours.
        legend: add the legend (missed lesion, false positive, true positive) under the grid.
        scale_bar_mm: the bars' length in mm (default: a round length per picture).
        cell_inches: width of a cell in inches.

    Raises:
        ValueError: if there are no pictures or the titles or spacings do not match the rows / columns.
    """
    from matplotlib.patches import Patch

    pictures = [c for row in cells for c in row if c is not None]
    if not pictures:
        raise ValueError("overlay_grid_figure: cells holds no picture")
    n_rows, n_cols = len(cells), max(len(r) for r in cells)
    if row_titles and len(row_titles) != n_rows:
        raise ValueError(f"row_titles has {len(row_titles)} titles for {n_rows} rows")
    if col_titles and len(col_titles) != n_cols:
        raise ValueError(f"col_titles has {len(col_titles)} titles for {n_cols} columns")
    if spacings is not None and [len(r) for r in spacings] != [len(r) for r in cells]:
        raise ValueError("spacings must have one entry per cell (None where unknown)")
    colours = get_palette(palette)
    with _style():
        fig = _new_figure(cell_inches * n_cols + 0.3, cell_inches * n_rows + (0.45 if legend else 0.15))
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
        for r in range(n_rows):
            for c in range(n_cols):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                picture = cells[r][c] if c < len(cells[r]) else None
                if r == 0 and col_titles:
                    ax.set_title(col_titles[c])
                if c == 0 and row_titles:
                    ax.set_ylabel(row_titles[r])
                if picture is None:
                    continue
                spacing = spacings[r][c] if spacings is not None else None
                aspect = spacing[0] / spacing[1] if spacing is not None else 1.0  # rows x columns in mm
                ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, interpolation="nearest", aspect=aspect)
                if spacing is not None:
                    add_scale_bar(ax, spacing, picture.shape[1], picture.shape[0], scale_bar_mm)
        if legend:
            order = ("missed", "false_positive", "true_positive")
            handles = [Patch(facecolor=_rgb(getattr(colours, k)), label=OVERLAY_LABELS[k]) for k in order]
            fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False)
    return fig
