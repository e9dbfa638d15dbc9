"""Overlays (pixel by pixel), overlay grids, confusion matrices and ROC pictures; classification test figures."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usclip.cli import main
from usclip.visualize import FN_COLOUR, FP_COLOUR, PALETTES, TP_COLOUR, confusion_matrix, overlay

CONF = Path(__file__).parent / "conf" / "classification_lora.yaml"


def test_overlay_colours_pixel_by_pixel():
    image = np.full((4, 4), 100, dtype=np.uint8)
    pred = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    target = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    out = overlay(image, pred, target, alpha=0.5)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    expected = np.full((4, 4, 3), 100, dtype=np.uint8)
    blend = {c: tuple(round(0.5 * 100 + 0.5 * v) for v in c) for c in (TP_COLOUR, FP_COLOUR, FN_COLOUR)}
    assert blend[TP_COLOUR] == (178, 178, 50)  # yellow: true positive
    assert blend[FP_COLOUR] == (50, 178, 50)  # green: false positive
    assert blend[FN_COLOUR] == (178, 50, 50)  # red: missed
    expected[0:2, 1] = blend[TP_COLOUR]
    expected[0:2, 0] = blend[FP_COLOUR]
    expected[0:2, 2] = blend[FN_COLOUR]
    np.testing.assert_array_equal(out, expected)
    # alpha 1 paints the pure colours; no target colours every predicted pixel yellow
    assert tuple(overlay(image, pred, target, alpha=1.0)[0, 2]) == FN_COLOUR
    np.testing.assert_array_equal(overlay(image, pred, alpha=1.0)[pred > 0], np.tile(TP_COLOUR, (4, 1)))


def test_overlay_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same H x W"):
        overlay(np.zeros((4, 4)), np.zeros((4, 5)))


def test_confusion_matrix_counts():
    matrix = confusion_matrix([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2], 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 2, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match=r"pred labels must be in \[0, 2\)"):
        confusion_matrix([0, 1], [0, 2], 2)


def test_okabe_ito_overlay_uses_its_colours_and_unknown_palettes_are_refused():
    image = np.zeros((2, 3), dtype=np.uint8)
    pred, target = np.array([[1, 1, 0], [0, 0, 0]]), np.array([[0, 1, 1], [0, 0, 0]])
    out = overlay(image, pred, target, alpha=1.0, palette="okabe-ito")
    okabe = PALETTES["okabe-ito"]
    assert [tuple(out[0, k]) for k in range(3)] == [okabe.false_positive, okabe.true_positive, okabe.missed]
    assert okabe.missed == (213, 94, 0) and okabe.false_positive == (86, 180, 233)  # vermillion, sky blue
    with pytest.raises(ValueError, match=r"palette must be one of \['okabe-ito', 'paper'\], got 'viridis'"):
        overlay(image, pred, palette="viridis")


def test_classification_test_writes_roc_and_confusion_matrix(tmp_path):
    args = [
        "--config",
        str(CONF),
        f"--data.init_args.root={tmp_path / 'data'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]
    main(["fit", *args])
    best = tmp_path / "runs" / CONF.stem / "version_0" / "checkpoints" / "best.ckpt"
    cli = main(["test", *args, f"--ckpt_path={best}"])
    results = Path(cli.trainer.log_dir) / "results"
    with (results / "test_predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    labels = [int(r["label"]) for r in rows]
    preds = [int(float(r["prob_malignant"]) > float(r["prob_benign"])) for r in rows]
    with (results / "test_confusion_matrix.csv").open() as f:
        table = list(csv.reader(f))
    assert table[0] == ["true\\predicted", "benign", "malignant"]
    counts = np.array([[int(v) for v in row[1:]] for row in table[1:]])
    np.testing.assert_array_equal(counts, confusion_matrix(labels, preds, 2))
    with Image.open(results / "test_confusion_matrix.png") as im:
        assert im.size == (3 * 300, 3 * 300)  # matplotlib, 3 x 3 inches at the default 300 dpi
    assert (results / "test_confusion_matrix.pdf").read_bytes().startswith(b"%PDF")
    assert "malignant" in (results / "test_confusion_matrix.svg").read_text()
    if len(set(labels)) == 2:
        with Image.open(results / "test_roc.png") as im:
            assert im.size == (1020, 1020)  # 3.4 inches at 300 dpi


def test_tensorboard_gets_validation_overlays_and_learning_rate(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    conf = CONF.with_name("segmentation_lora.yaml")
    cli = main(
        [
            "fit",
            "--config",
            str(conf),
            f"--data.init_args.root={tmp_path / 'data'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--trainer.max_epochs=2",
        ]
    )
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"images": 0}).Reload()
    images = [t for t in events.Tags()["images"] if t.startswith("val_overlays/")]
    assert 1 <= len(images) <= 4
    steps = [e.step for e in events.Images(images[0])]
    assert steps == [0, 1]  # one picture per epoch, none from the sanity check
    picture = events.Images(images[0])[0]
    assert (picture.width, picture.height) == (64, 64)
    assert "lr" in events.Tags()["scalars"] and "val_dice" in events.Tags()["scalars"]
