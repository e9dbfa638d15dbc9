"""Figures a paper can use (matplotlib): PNG/PDF/SVG at a set DPI, overlay legend, palettes, scale bars."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from usclip.visualize import (
    PALETTES,
    add_scale_bar,
    confusion_matrix_figure,
    nice_scale_length,
    overlay,
    overlay_grid_figure,
    overlay_text,
    read_overlay,
    roc_figure,
    save_figure,
    save_png,
)

CURVE = (np.array([0.0, 0.0, 0.5, 1.0]), np.array([0.0, 0.6, 0.9, 1.0]), "malignant (AUC 0.850)")


def _svg_text(path):
    """Every text of an SVG file, parsed as XML (a file that does not parse fails here)."""
    return " ".join(t for el in ET.parse(path).getroot().iter() for t in (el.text or "",) if t.strip())


def _colours(path):
    with Image.open(path) as im:
        return {tuple(c) for c in np.asarray(im.convert("RGB")).reshape(-1, 3)}


def _picture(h=60, w=80):
    """A non-square overlay with every colour class: missed, false positive, true positive."""
    pred, target = np.zeros((h, w)), np.zeros((h, w))
    pred[10:30, 10:40], target[20:40, 20:50] = 1, 1
    return pred, target


def test_each_format_is_written_parses_and_the_png_is_figsize_times_dpi(tmp_path):
    """Catches: a DPI not passed to savefig, tight cropping (size no longer figsize x dpi), text as paths in SVG."""
    files = save_figure(roc_figure([CURVE], size=2.0), tmp_path / "roc", dpi=60)
    assert [p.name for p in files] == ["roc.png", "roc.pdf", "roc.svg"]
    with Image.open(files[0]) as im:
        assert im.size == (120, 120)  # 2 inches x 60 dpi
    pdf = files[1].read_bytes()
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF") and b"/CreationDate" not in pdf
    assert b"/FontType 3" not in pdf and b"/Subtype /Type3" not in pdf  # TrueType (fonttype 42), not Type 3
    assert "malignant (AUC 0.850)" in _svg_text(files[2])  # text stays text: searchable, editable
    (png,) = save_figure(confusion_matrix_figure(np.array([[5, 2], [1, 7]]), ["benign", "malignant"]),
                         tmp_path / "cm", formats=["png"], dpi=40)  # fmt: skip
    with Image.open(png) as im:
        assert im.size == (120, 120)  # 3 x 3 inches x 40 dpi
    assert not (tmp_path / "cm.pdf").exists()
    pyplot = sys.modules.get("matplotlib.pyplot")  # other libraries may import it; usclip never opens a figure there
    assert pyplot is None or pyplot.get_fignums() == []  # Figure + Agg canvas: nothing stays open
    with pytest.raises(ValueError, match=r"figure formats must be a non-empty list of \['png', 'pdf', 'svg'\], got"):
        save_figure(roc_figure([CURVE]), tmp_path / "x", formats=["jpg"])
    with pytest.raises(ValueError, match="figure dpi must be a positive number"):
        save_figure(roc_figure([CURVE]), tmp_path / "x", dpi=0)


def test_overlay_grid_legend_names_the_colours_and_the_palette_colours_are_in_the_png(tmp_path):
    """Catches: no legend, a legend in the paper's colours over Okabe-Ito overlays, legend labels drawn as paths."""
    pred, target = _picture()
    image = np.full(pred.shape, 80, np.uint8)
    for name in ("okabe-ito", "paper"):
        cells = [[overlay(image, pred, target, palette=name), overlay(image, target, pred, palette=name)]]
        figure = overlay_grid_figure(cells, ["img_7"], ["my_method", "LoRA"], palette=name)
        png, svg = save_figure(figure, tmp_path / name, formats=["png", "svg"], dpi=80)
        text = _svg_text(svg)
        for label in ("missed lesion", "false positive", "true positive", "my_method", "LoRA", "img_7"):
            assert label in text
        colours, palette = _colours(png), PALETTES[name]
        assert {palette.missed, palette.false_positive, palette.true_positive} <= colours  # the legend's patches
    okabe = _colours(tmp_path / "okabe-ito.png")
    assert PALETTES["paper"].missed not in okabe and PALETTES["paper"].false_positive not in okabe


def test_scale_bar_is_length_over_column_spacing_for_anisotropic_pixels(tmp_path):
    """Catches: the row spacing used for a horizontal bar, a bar in display units, pixels shown square.

    Spacing (0.2, 0.5) mm (row, column): 10 mm is 20 columns, not 50 rows' worth.
    """
    h, w = 60, 80
    image = np.full((h, w, 3), 128, np.uint8)
    figure = overlay_grid_figure([[image]], spacings=[[(0.2, 0.5)]], legend=False, scale_bar_mm=10)
    (ax,) = figure.axes
    (bar,) = [p for p in ax.patches if p.get_gid() == "scale_bar"]
    assert bar.get_width() == pytest.approx(10 / 0.5)
    assert "10 mm" in [t.get_text() for t in ax.texts]
    (png,) = save_figure(figure, tmp_path / "bar", formats=["png"], dpi=200)
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    grey = np.abs(pixels - 128).sum(2) <= 3  # the picture
    rows = np.flatnonzero(grey.any(1))
    cols = np.flatnonzero(grey.any(0))
    shown_w, shown_h = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
    assert shown_h / shown_w == pytest.approx((h * 0.2) / (w * 0.5), rel=0.03)  # physical aspect: 12 mm x 40 mm
    inside = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    white = (inside >= 250).all(2)
    bar_px = max(white[r].sum() for r in range(white.shape[0]) if white[r].sum() < white.shape[1] * 0.6)
    assert bar_px / shown_w == pytest.approx(20 / w, abs=2 / shown_w)  # 20 of the 80 columns
    assert add_scale_bar(ax, (0.3, 0.1), w, h) == (2.0, pytest.approx(20.0))  # 8 mm wide: a 2 mm bar
    assert [nice_scale_length(x) for x in (8.0, 40.0, 100.0, 3.0)] == [2.0, 10.0, 20.0, 0.5]


def test_test_overlays_record_palette_and_spacing_at_the_model_size(tmp_path):
    """Catches: the original spacing stored for a resized crop, rows and columns swapped, NaN spacing stored."""
    from usclip.tasks.segmentation import _overlay_spacing

    batch = {
        "image": torch.zeros(2, 3, 64, 64),
        "spacing": torch.tensor([[0.1, 0.3], [float("nan"), float("nan")]]),
        "crop_box": torch.tensor([[10, 20, 138, 84], [0, 0, 64, 64]]),  # x0, y0, x1, y1: 128 wide, 64 high
    }
    spacing = _overlay_spacing(batch, 0)
    assert spacing == pytest.approx((0.1 * 64 / 64, 0.3 * 128 / 64))
    assert _overlay_spacing(batch, 1) is None and _overlay_spacing({"image": batch["image"]}, 0) is None
    pred, target = _picture()
    path = save_png(overlay(np.zeros(pred.shape), pred, target), tmp_path / "a.png", overlay_text("okabe-ito", spacing))
    array, palette, read = read_overlay(path)
    assert array.shape == (60, 80, 3) and palette == "okabe-ito" and read == pytest.approx(spacing)
    assert read_overlay(save_png(array, tmp_path / "b.png"))[1:] == (None, None)
