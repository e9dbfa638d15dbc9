"""usclip.metrics on hand-computed masks: definitions, empty-mask policy, spacing, per-image table, classification."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from usclip.metrics import (
    SegmentationMetrics,
    asd,
    boundaries,
    build_classification_metrics,
    dice,
    hd95,
    iou,
    roc_curve,
    surface_distances,
)
from usclip.metrics import functional as F


def masks(*rows: str) -> torch.Tensor:
    """One (H, W) bool mask from strings of '.' and '#'."""
    return torch.tensor([[c == "#" for c in row] for row in rows])


def batch(*ms: torch.Tensor) -> torch.Tensor:
    return torch.stack(ms)


# --- Dice and IoU ------------------------------------------------------------------------------------------


def test_dice_iou_hand_computed():
    pred = masks("##..", "##..", "....", "....")
    target = masks(".##.", ".##.", "....", "....")  # overlap 2, sizes 4 and 4, union 6
    same = masks("....", ".##.", ".#..", "....")
    p, t = batch(pred, same), batch(target, same)
    assert dice(p, t).tolist() == pytest.approx([0.5, 1.0])
    assert iou(p, t).tolist() == pytest.approx([1 / 3, 1.0])
    assert dice(p, t).dtype == torch.float32


def test_integer_masks_nonzero_is_foreground():
    pred = masks("##..", "##..", "....", "....")
    target = masks(".##.", ".##.", "....", "....")
    as_255 = (batch(pred) * 255).to(torch.uint8), (batch(target) * 255).to(torch.uint8)
    assert dice(*as_255).item() == pytest.approx(0.5)
    assert hd95(*as_255).item() == hd95(batch(pred), batch(target)).item()


# --- Boundary ----------------------------------------------------------------------------------------------


def test_boundary_is_mask_minus_cross_erosion():
    plus = masks(".....", "..#..", ".###.", "..#..", ".....")
    # The centre has all four 4-neighbours: interior for a cross element (it would be boundary for a 3x3 square).
    expected = masks(".....", "..#..", ".#.#.", "..#..", ".....")
    assert torch.equal(boundaries(batch(plus))[0], expected)


def test_boundary_counts_outside_of_image_as_background():
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    expected = masks("####", "#..#", "#..#", "####")
    assert torch.equal(boundaries(full)[0], expected)
    block = masks(".....", ".###.", ".###.", ".###.", ".....")
    assert boundaries(batch(block))[0].sum().item() == 8  # ring of the 3x3 block; centre is interior


# --- HD95 and ASD ------------------------------------------------------------------------------------------


def test_hd95_asd_single_pixels():
    pred = masks("#...", "....", "....", "....")
    target = masks("...#", "....", "....", "....")
    p, t = batch(pred), batch(target)
    assert hd95(p, t).item() == pytest.approx(3.0)
    assert asd(p, t).item() == pytest.approx(3.0)
    # spacing is (row, column), like MONAI: the two pixels are 3 columns apart.
    assert hd95(p, t, spacing=(2.0, 0.5)).item() == pytest.approx(1.5)
    assert hd95(p, t, spacing=2.0).item() == pytest.approx(6.0)


def test_hd95_interpolates_and_asd_pools_both_boundaries():
    # 1 x 8 image: target {0}; prediction {0, 4}. Prediction -> target distances [0, 4], target -> prediction [0].
    pred = masks("#...#...")
    target = masks("#.......")
    p, t = batch(pred), batch(target)
    # Linear interpolation: rank 0.95 * (2 - 1) between 0 and 4.
    assert hd95(p, t).item() == pytest.approx(3.8)
    assert surface_distances(p, t, percentile=100.0).hd.item() == pytest.approx(4.0)
    assert surface_distances(p, t, percentile=50.0).hd.item() == pytest.approx(2.0)
    assert asd(p, t).item() == pytest.approx(4 / 3)  # mean over all three boundary pixels
    assert asd(p, t, symmetric=False).item() == pytest.approx(2.0)  # prediction -> target only
    # hd is the larger directed percentile whichever mask holds the outlier.
    assert hd95(t, p).item() == pytest.approx(3.8)


def test_distances_are_float64_square_roots_rounded_to_float32():
    """MONAI's distances are float64 square roots rounded to float32; ours must be bit-identical to them.

    Catches: the square root taken in float32 (torch's CPU float32 ``sqrt`` is one ulp low for 34, 37 and 545 on
    the x86 machines measured; docs/metrics.md step 3).
    """
    pred = torch.zeros(3, 24, 5, dtype=torch.bool)
    target = torch.zeros(3, 24, 5, dtype=torch.bool)
    pred[:, 0, 0] = True
    for i, (dy, dx) in enumerate(((5, 3), (6, 1), (23, 4))):  # squared distances 34, 37, 545
        target[i, dy, dx] = True
    expected = [float(np.float32(math.sqrt(d2))) for d2 in (34, 37, 545)]
    result = surface_distances(pred, target)
    assert result.hd.tolist() == expected  # exact: no tolerance
    assert result.asd.tolist() == expected


def test_distances_with_a_spacing_are_float64_square_roots_rounded_to_float32():
    """With a pixel spacing the squared distance is scaled before the root: that product too is taken in float64.

    Catches: the square root (and the scaling) taken in float32, on machines whose float32 ``sqrt`` is correctly
    rounded too (the unscaled test above relies on torch's CPU ``sqrt`` being one ulp low, which not every CPU shows):
    ``f32(13 * 0.49)`` is rounded before its root, which moves these results by one ulp.
    """
    pred = torch.zeros(3, 24, 5, dtype=torch.bool)
    target = torch.zeros(3, 24, 5, dtype=torch.bool)
    pred[:, 0, 0] = True
    offsets = ((2, 3), (5, 0), (7, 1))  # squared distances 13, 25, 50 pixels
    for i, (dy, dx) in enumerate(offsets):
        target[i, dy, dx] = True
    unit = float(np.float32(np.float32(0.7) ** 2))  # the squared spacing, as the float32 spacing tensor gives it
    expected = [float(np.float32(math.sqrt((dy * dy + dx * dx) * unit))) for dy, dx in offsets]
    result = surface_distances(pred, target, spacing=0.7)
    assert result.hd.tolist() == expected  # exact: no tolerance
    assert result.asd.tolist() == expected


def test_shifted_square_hand_computed():
    # A filled 5x5 square against itself shifted by one row: each boundary moves by one pixel.
    square = torch.zeros(9, 9, dtype=torch.bool)
    square[2:7, 2:7] = True
    shifted = torch.roll(square, 1, dims=0)
    p, t = batch(shifted), batch(square)
    # Shifted -> square, over the 16 pixels of the shifted ring (rows 3..7): the bottom row (row 7, 5 px) and
    # the three inner pixels of the top row (row 3, inside the square, 1 below its top row) are 1 away; the
    # rest lie on the square's ring (0). So 8 ones and 8 zeros: the 95th percentile is 1 and, by symmetry
    # of the other direction, the mean over all 32 boundary pixels is 16 / 32.
    assert hd95(p, t).item() == pytest.approx(1.0)
    result = surface_distances(p, t)
    assert result.asd.item() == pytest.approx(0.5)


def test_spacing_scales_distances():
    square = torch.zeros(12, 12, dtype=torch.bool)
    square[3:8, 3:9] = True
    pred = torch.roll(square, (2, 1), dims=(0, 1))
    p, t = batch(pred), batch(square)
    pixels = surface_distances(p, t)
    scaled = surface_distances(p, t, spacing=0.25)
    assert scaled.hd.item() == pytest.approx(0.25 * pixels.hd.item())
    assert scaled.asd.item() == pytest.approx(0.25 * pixels.asd.item())


def test_per_image_spacing_tensor_equals_separate_calls():
    square = torch.zeros(10, 10, dtype=torch.bool)
    square[2:6, 3:8] = True
    t = batch(square, square, square)
    p = batch(torch.roll(square, 2, 0), torch.roll(square, 3, 1), torch.roll(square, (1, 2), (0, 1)))
    spacings = torch.tensor([[1.0, 1.0], [0.5, 2.0], [3.0, 0.7]])
    together = surface_distances(p, t, spacing=spacings)
    for i in range(3):
        alone = surface_distances(p[i : i + 1], t[i : i + 1], spacing=tuple(spacings[i].tolist()))
        assert together.hd[i].item() == pytest.approx(alone.hd.item(), abs=1e-5)
        assert together.asd[i].item() == pytest.approx(alone.asd.item(), abs=1e-5)


# A 6 x 8 (non-square) batch for anisotropic spacing, hand-computed (and equal to MONAI 1.6.1 with the same spacing):
# 0: a 3 x 5 rectangle against itself shifted one row down. With spacing (row 2.0, column 0.5) the nearest boundary
#    pixel of some interior-facing pixels lies along the row (0.5 or 1.0 away), not across it (2.0).
#    Each direction: 4 zeros, 0.5 twice, 1.0 once, 2.0 five times -> HD95 2.0, ASD 24 / 24 = 1.0.
# 1: prediction one pixel P = (2, 2); ground truth A = (2, 5) (3 columns away) and B = (4, 2) (2 rows away).
#    In millimetres A is nearer (1.5 against 4.0); in pixels B is (2 against 3). P -> truth {1.5}; truth -> P
#    {1.5, 4.0}: HD95 = 1.5 + 0.95 * 2.5 = 3.875, ASD = (1.5 + 1.5 + 4.0) / 3.
# 2: missed lesion (empty prediction): the diagonal hypot(6 * 2.0, 8 * 0.5).
ANISO_PRED = batch(
    masks("........", "........", ".#####..", ".#####..", ".#####..", "........"),
    masks("........", "........", "..#.....", "........", "........", "........"),
    torch.zeros(6, 8, dtype=torch.bool),
)
ANISO_TARGET = batch(
    masks("........", ".#####..", ".#####..", ".#####..", "........", "........"),
    masks("........", "........", ".....#..", "........", "..#.....", "........"),
    masks("........", ".#####..", ".#####..", ".#####..", "........", "........"),
)


@pytest.mark.parametrize(
    "spacing",
    [(2.0, 0.5), [2.0, 0.5], torch.tensor([2.0, 0.5]), torch.tensor([[2.0, 0.5]] * 3)],
    ids=["tuple", "list", "tensor2", "tensorB2"],
)
def test_anisotropic_spacing_on_non_square_masks_hand_computed(spacing):
    """Spacing is (row, column) on a non-square image, where anisotropy changes which boundary pixel is nearest.

    Catches: the pair read as (column, row); boundary coordinates stored as (column, row); the row factor
    inverted; the empty-mask diagonal with the spacings swapped. The real-data MONAI test caught these only with
    the data folder present.
    """
    result = surface_distances(ANISO_PRED, ANISO_TARGET, spacing=spacing)
    diagonal = math.hypot(6 * 2.0, 8 * 0.5)
    assert result.hd.tolist() == pytest.approx([2.0, 3.875, diagonal], rel=1e-6)
    assert result.asd.tolist() == pytest.approx([1.0, 7 / 3, diagonal], rel=1e-6)
    directed = surface_distances(ANISO_PRED, ANISO_TARGET, spacing=spacing, symmetric=False)
    assert directed.asd.tolist() == pytest.approx([1.0, 1.5, diagonal], rel=1e-6)


def test_swapped_spacing_gives_the_other_hand_computed_values():
    """The same masks with (row 0.5, column 2.0), and in pixels: the spacing's order matters, in a known way."""
    swapped = surface_distances(ANISO_PRED, ANISO_TARGET, spacing=(0.5, 2.0))
    # 0: every non-zero distance is one row, 0.5. 1: P -> B 1.0, A -> P 6.0: HD95 1 + 0.95 * 5, ASD (1 + 6 + 1) / 3.
    assert swapped.hd.tolist() == pytest.approx([0.5, 5.75, math.hypot(6 * 0.5, 8 * 2.0)], rel=1e-6)
    assert swapped.asd.tolist() == pytest.approx([8 * 0.5 * 2 / 24, 8 / 3, math.hypot(3.0, 16.0)], rel=1e-6)
    pixels = surface_distances(ANISO_PRED, ANISO_TARGET)
    assert pixels.hd.tolist() == pytest.approx([1.0, 2.95, 10.0], rel=1e-6)
    assert pixels.asd.tolist() == pytest.approx([16 / 24, 7 / 3, 10.0], rel=1e-6)
    metric = SegmentationMetrics(include=("hd95", "asd"), spacing=(2.0, 0.5))
    metric.update(ANISO_PRED, ANISO_TARGET)
    out = metric.compute()
    assert out["hd95"].item() == pytest.approx((2.0 + 3.875 + math.hypot(12.0, 4.0)) / 3, rel=1e-6)
    assert out["asd"].item() == pytest.approx((1.0 + 7 / 3 + math.hypot(12.0, 4.0)) / 3, rel=1e-6)


def test_grouping_and_row_blocks_do_not_change_values(monkeypatch):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(6, 20, 24, generator=g) < 0.3
    p = torch.rand(6, 20, 24, generator=g) < 0.3
    reference = surface_distances(p, t)
    monkeypatch.setattr(F, "_CHUNK_ELEMENTS", 50)  # forces one image per group and few rows per block
    small = surface_distances(p, t)
    assert torch.equal(reference.hd, small.hd)
    assert torch.allclose(reference.asd, small.asd, atol=1e-6)


def test_masks_of_any_size_and_aspect():
    target = torch.zeros(1, 37, 91, dtype=torch.bool)
    target[0, 10:20, 40:70] = True
    pred = torch.roll(target, 4, dims=2)
    assert hd95(pred, target).item() == pytest.approx(4.0)


# --- Empty masks -------------------------------------------------------------------------------------------


def test_empty_policy_worst():
    lesion = masks("....", ".##.", ".##.")  # 3 x 4 image: diagonal 5
    nothing = torch.zeros(3, 4, dtype=torch.bool)
    p = batch(nothing, nothing, lesion)
    t = batch(nothing, lesion, nothing)
    assert dice(p, t).tolist() == [1.0, 0.0, 0.0]
    assert iou(p, t).tolist() == [1.0, 0.0, 0.0]
    result = surface_distances(p, t)
    assert result.hd.tolist() == pytest.approx([0.0, 5.0, 5.0])
    assert result.asd.tolist() == pytest.approx([0.0, 5.0, 5.0])
    # Diagonal in spacing units: hypot(3 * 2, 4 * 1).
    assert hd95(p, t, spacing=(2.0, 1.0))[1].item() == pytest.approx(math.hypot(6.0, 4.0))


def test_empty_policy_nan_matches_monai_non_finite_cases():
    lesion = masks("....", ".##.", ".##.")
    nothing = torch.zeros(3, 4, dtype=torch.bool)
    p = batch(nothing, nothing, lesion, lesion)
    t = batch(nothing, lesion, nothing, lesion)
    result = surface_distances(p, t, empty="nan")
    # MONAI gives NaN (both empty) or inf (one empty): all non-finite, so all become NaN here.
    assert torch.isnan(result.hd[:3]).all() and torch.isnan(result.asd[:3]).all()
    assert result.hd[3].item() == 0.0 and result.asd[3].item() == 0.0
    # Dice and IoU keep the fixed policy.
    assert dice(p, t).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_metric_counts_empty_masks_and_authors_protocol_drops_nonfinite():
    lesion = masks("....", ".##.", ".##.")
    shifted = masks("....", "..##", "..##")
    nothing = torch.zeros(3, 4, dtype=torch.bool)
    p = batch(lesion, nothing, shifted, nothing)
    t = batch(lesion, lesion, lesion, nothing)
    worst = SegmentationMetrics()
    worst.update(p, t)
    out = worst.compute()
    assert out["empty_preds"].item() == 2 and out["empty_targets"].item() == 1
    hd_shifted = hd95(batch(shifted), batch(lesion)).item()
    assert out["hd95"].item() == pytest.approx((0.0 + 5.0 + hd_shifted + 0.0) / 4)
    assert out["dice"].item() == pytest.approx((1.0 + 0.0 + 0.5 + 1.0) / 4)

    dropped = SegmentationMetrics(protocol="authors")
    dropped.update(p, t)
    out = dropped.compute()
    assert out["hd95"].item() == pytest.approx((0.0 + hd_shifted) / 2)  # images 1 and 3 dropped
    assert out["hd95_std"].item() == pytest.approx(hd_shifted / 2)  # population std of {0, h}
    assert out["dice"].item() == pytest.approx((1.0 + 0.0 + 0.5) / 3)  # the empty ground truth (3) is dropped
    assert out["empty_preds"].item() == 2 and out["empty_targets"].item() == 1


# --- Metric: table, index, CSV -----------------------------------------------------------------------------


def _random_batches(n_batches=3, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        t = torch.zeros(size, 16, 16, dtype=torch.bool)
        t[:, 4:12, 3:11] = True
        p = t ^ (torch.rand(size, 16, 16, generator=g) < 0.1)
        p[0] = False  # one empty prediction per batch
        yield p, t


@pytest.mark.parametrize("protocol", ["strict", "authors"])
def test_per_image_means_equal_compute(protocol):
    metric = SegmentationMetrics(protocol=protocol)
    for p, t in _random_batches():
        metric.update(p, t)
    out = metric.compute()
    table = metric.per_image()
    assert len(table["index"]) == 12
    for name in ("dice", "iou", "hd95", "asd"):
        column = table[name].double()
        finite = column[torch.isfinite(column)]
        assert out[name].item() == pytest.approx(finite.mean().item(), rel=1e-6)
        assert out[f"{name}_std"].item() == pytest.approx(finite.std(correction=0).item(), rel=1e-5)
    assert int(table["empty_pred"].sum()) == out["empty_preds"].item() == 3
    if protocol == "authors":
        assert int(torch.isnan(table["hd95"]).sum()) == 3


def test_index_defaults_continue_and_explicit_index_sorts_table():
    metric = SegmentationMetrics(include=("dice",))
    batches = list(_random_batches(2, size=3))
    metric.update(*batches[0])
    metric.update(*batches[1])
    assert metric.per_image()["index"].tolist() == [0, 1, 2, 3, 4, 5]
    metric.reset()
    metric.update(*batches[0], index=torch.tensor([7, 2, 5]))
    table = metric.per_image()
    assert table["index"].tolist() == [2, 5, 7]
    expected = dice(*batches[0])
    assert table["dice"].tolist() == pytest.approx([expected[1].item(), expected[2].item(), expected[0].item()])
    assert set(table) == {"index", "dice", "empty_pred", "empty_target"}
    with pytest.raises(ValueError, match="index"):
        metric.update(*batches[0], index=torch.tensor([1.0, 2.0, 3.0]))


def test_write_csv_content_and_ids(tmp_path):
    metric = SegmentationMetrics()
    lesion = masks("....", ".##.", ".##.")
    nothing = torch.zeros(3, 4, dtype=torch.bool)
    metric.update(batch(lesion, nothing), batch(lesion, lesion), index=torch.tensor([1, 0]))
    path = metric.write_csv(tmp_path / "out" / "per_image.csv", ids=["case_a", "case_b"])
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    header = ["index", "id", "dice", "iou", "hd95", "asd", "empty_pred", "empty_target", "metric_protocol"]
    assert list(rows[0]) == header
    assert {r["metric_protocol"] for r in rows} == {"strict"}
    assert [r["id"] for r in rows] == ["case_a", "case_b"]
    assert float(rows[0]["dice"]) == 0.0 and float(rows[0]["hd95"]) == pytest.approx(5.0)
    assert rows[0]["empty_pred"] == "1" and rows[0]["empty_target"] == "0"
    assert float(rows[1]["dice"]) == 1.0 and float(rows[1]["asd"]) == 0.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["per_image.csv"]  # no temporary file left
    with pytest.raises(ValueError, match="ids"):
        metric.write_csv(tmp_path / "bad.csv", ids=["only_one"])
    assert not (tmp_path / "bad.csv").exists()


def test_compute_before_update_is_nan_and_zero_counts():
    metric = SegmentationMetrics()
    with pytest.warns(UserWarning):
        out = metric.compute()
    assert math.isnan(out["dice"].item()) and out["empty_preds"].item() == 0


# --- Validation --------------------------------------------------------------------------------------------


def test_invalid_inputs_raise_with_names():
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"preds.*dtype"):
        dice(m.float(), m)
    with pytest.raises(ValueError, match="same shape"):
        dice(m, torch.zeros(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        hd95(m[0], m[0])
    with pytest.raises(ValueError, match="spacing"):
        hd95(m, m, spacing=(1.0, -1.0))
    with pytest.raises(ValueError, match="empty"):
        asd(m, m, empty="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="include"):
        SegmentationMetrics(include=("dice", "hd"))  # type: ignore[arg-type]


# --- Classification ----------------------------------------------------------------------------------------


def test_binary_classification_metrics_hand_computed():
    # Positive-class probabilities 0.9, 0.6, 0.4, 0.2, 0.7 for labels 1, 1, 1, 0, 0:
    # decisions at 0.5 -> 1, 1, 0, 0, 1: TP 2, FN 1, TN 1, FP 1.
    p1 = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.7])
    probs = torch.stack([1 - p1, p1], dim=1)
    target = torch.tensor([1, 1, 1, 0, 0])
    metrics = build_classification_metrics(2)
    metrics.update(probs, target)
    out = {k: v.item() for k, v in metrics.compute().items()}
    assert out["acc"] == pytest.approx(3 / 5)
    assert out["sensitivity"] == pytest.approx(2 / 3)
    assert out["specificity"] == pytest.approx(1 / 2)
    assert out["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # AUC: of the 6 (positive, negative) pairs, positives rank higher in 0.9>0.2, 0.9>0.7, 0.6>0.2, 0.4>0.2.
    assert out["auc"] == pytest.approx(4 / 6)
    # (N,) positive-class probabilities give the same values, and clones carry stage prefixes.
    val = build_classification_metrics(2).clone(prefix="val_")
    val.update(p1, target)
    assert val.compute()["val_auc"].item() == pytest.approx(4 / 6)


def test_multiclass_classification_metrics_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    target = torch.tensor([0, 1, 2, 1])  # predictions 0, 1, 2, 0: 3 of 4 correct
    metrics = build_classification_metrics(3)
    metrics.update(probs, target)
    out = {k: v.item() for k, v in metrics.compute().items()}
    assert out["acc"] == pytest.approx(3 / 4)  # micro: fraction correct
    assert out["sensitivity"] == pytest.approx((1 + 1 / 2 + 1) / 3)  # per-class recall, macro
    # Specificity: class 0 TN 2 / (2 + FP 1), class 1 TN 2 / 2, class 2 TN 3 / 3.
    assert out["specificity"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    # F1 per class: 2/3 (P 1/2, R 1), 2/3 (P 1, R 1/2), 1.
    assert out["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_multiclass_auc_is_macro_over_one_vs_rest_curves():
    """Multiclass AUC: the unweighted mean of the one-vs-rest AUCs (classes with 3, 1 and 1 samples).

    Catches: AUC weighted by class support (0.425 here) instead of macro-averaged like the other metrics.
    """
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.4, 0.3], [0.2, 0.2, 0.6], [0.4, 0.5, 0.1], [0.6, 0.1, 0.3]])
    target = torch.tensor([0, 0, 0, 1, 2])
    metrics = build_classification_metrics(3)
    metrics.update(probs, target)
    # one-vs-rest: class 0 ranks 1 of its 6 (positive, negative) pairs right; class 1 all 4; class 2 2 of 4 and
    # a tie (0.3 against 0.3) counted half.
    expected = (1 / 6 + 1.0 + 2.5 / 4) / 3
    assert metrics.compute()["auc"].item() == pytest.approx(expected, abs=1e-6)


def test_roc_curve_binary_and_multiclass():
    p1 = torch.tensor([0.9, 0.6, 0.2, 0.4])
    target = torch.tensor([1, 1, 0, 0])
    fpr, tpr, thresholds = roc_curve(torch.stack([1 - p1, p1], dim=1), target, num_classes=2)
    assert isinstance(fpr, torch.Tensor) and isinstance(tpr, torch.Tensor)
    assert fpr.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0])
    assert tpr.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    assert thresholds[1:].tolist() == pytest.approx([0.9, 0.6, 0.4, 0.2])
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])
    fprs, tprs, _ = roc_curve(probs, torch.tensor([0, 1, 2]), num_classes=3)
    assert isinstance(fprs, list) and len(fprs) == 3 and len(tprs) == 3
    with pytest.raises(ValueError, match="num_classes"):
        build_classification_metrics(1)


def test_empty_batch_gives_empty_results():
    none = torch.zeros(0, 5, 7, dtype=torch.bool)
    result = surface_distances(none, none)
    assert result.hd.shape == (0,) and result.asd.shape == (0,)
    assert dice(none, none).shape == (0,)


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_distance_products_run_at_full_float32_precision(monkeypatch, precision):
    """TF32 / bf16 matmul passes moved HD95 by up to 1.8 px on an H200: the distance code must switch them off."""
    from usclip.metrics import functional

    seen: list[str] = []
    real_bmm = torch.bmm

    def recording_bmm(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return real_bmm(*args, **kwargs)

    preds = torch.zeros(2, 20, 30, dtype=torch.bool)
    target = torch.zeros(2, 20, 30, dtype=torch.bool)
    preds[:, 3:12, 4:20] = True
    target[:, 5:15, 8:25] = True
    monkeypatch.setattr(functional.torch, "bmm", recording_bmm)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        reference = functional.surface_distances(preds, target)
        seen.clear()
        torch.set_float32_matmul_precision(precision)
        d = functional.surface_distances(preds, target)
        assert seen and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == precision  # the user's setting is restored
        assert torch.equal(d.hd, reference.hd) and torch.equal(d.asd, reference.asd)
    finally:
        torch.set_float32_matmul_precision(previous)
