"""Pictures of results: per-image overlays (PIL, fast) and the figures a paper uses (matplotlib).

- :mod:`usclip.visualize.pictures`: overlays in the paper's colours (Fig. 4: red missed, green false positive,
  yellow true positive) or a colour-blind-safe palette (:data:`PALETTES`), PNG writing with metadata, confusion
  matrix counts. ``usclip test`` writes one overlay per test image, so these stay PIL and numpy.
- :mod:`usclip.visualize.figures`: ROC curves, confusion matrices and overlay grids with a legend and scale bars,
  written as PNG, PDF and SVG at a set DPI (:func:`save_figure`); matplotlib is imported only when one is drawn.
"""

from __future__ import annotations

from usclip.visualize.figures import (
    DEFAULT_DPI,
    FIGURE_FORMATS,
    add_scale_bar,
    check_figure_options,
    confusion_matrix_figure,
    nice_scale_length,
    overlay_grid_figure,
    roc_figure,
    save_figure,
)
from usclip.visualize.pictures import (
    FN_COLOUR,
    FP_COLOUR,
    OVERLAY_LABELS,
    PALETTES,
    TP_COLOUR,
    Palette,
    confusion_matrix,
    get_palette,
    overlay,
    overlay_text,
    read_overlay,
    save_png,
)

__all__ = [
    "DEFAULT_DPI",
    "FIGURE_FORMATS",
    "FN_COLOUR",
    "FP_COLOUR",
    "OVERLAY_LABELS",
    "PALETTES",
    "TP_COLOUR",
    "Palette",
    "add_scale_bar",
    "check_figure_options",
    "confusion_matrix",
    "confusion_matrix_figure",
    "get_palette",
    "nice_scale_length",
    "overlay",
    "overlay_grid_figure",
    "overlay_text",
    "read_overlay",
    "roc_figure",
    "save_figure",
    "save_png",
]
