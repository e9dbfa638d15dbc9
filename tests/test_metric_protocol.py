"""Metric protocols: ``strict`` (default) and ``authors`` (MONAI called the way the paper's code calls it).

The oracle, ``_AuthorsAccumulator``, does what the segmentation branch of the authors' ``MetricAccumulator``
(NextGen-UIA ``src/utils/tools.py``) does: argmax of two-class logits, one-hot, MONAI's ``compute_dice``,
``compute_iou``, ``compute_hausdorff_distance(percentile=95)`` and ``compute_average_surface_distance`` with
``include_background=False`` and otherwise default arguments against a one-channel 0/1 label, per batch, values
appended per image, then ``np.mean`` / ``np.std`` over the finite ones.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_iou
from PIL import Image
from torchmetrics.functional.classification import binary_auroc

from tests.test_metrics_monai import _monai_settings
from usclip.cli import main
from usclip.data.synthetic import generate_sample
from usclip.metrics import METRIC_PROTOCOLS, SegmentationMetrics, check_metric_protocol, per_image_values
from usclip.reporting import load_run

NAMES = ("dice", "iou", "hd95", "asd")
REPO = Path(__file__).parents[1]
CONF_DIR = Path(__file__).parent / "conf"


class _AuthorsAccumulator:
    """The authors' segmentation evaluation: MONAI per batch with their arguments, finite values averaged."""

    def __init__(self) -> None:
        self.values = {name: np.array([]) for name in NAMES}

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``logits`` (B, 2, H, W), ``labels`` (B, 1, H, W) with 0 / 1, as their data loader yields."""
        preds = F.one_hot(torch.argmax(logits, dim=1), num_classes=2).permute(0, 3, 1, 2).float()
        with _monai_settings():
            batch = {
                "dice": compute_dice(preds, labels, include_background=False),
                "iou": compute_iou(preds, labels, include_background=False),
                "hd95": compute_hausdorff_distance(preds, labels, include_background=False, percentile=95),
                "asd": compute_average_surface_distance(preds, labels, include_background=False),
            }
        for name, value in batch.items():
            self.values[name] = np.append(self.values[name], value.cpu().numpy())

    def compute(self) -> dict[str, float]:
        out = {}
        for name, value in self.values.items():
            finite = value[np.isfinite(value)]
            out[name], out[f"{name}_std"] = float(np.mean(finite)), float(np.std(finite))
        return out


def _logits(masks: torch.Tensor) -> torch.Tensor:
    """Two-class logits (B, 2, H, W) whose argmax is the bool mask batch (B, H, W)."""
    return torch.stack([(~masks).float(), masks.float()], dim=1)


def _evaluate_both(preds: torch.Tensor, targets: torch.Tensor, batch_size: int, **kwargs):
    """Ours under ``authors`` and the authors' oracle on the same batches."""
    ours = SegmentationMetrics(protocol="authors", **kwargs)
    oracle = _AuthorsAccumulator()
    for start in range(0, preds.shape[0], batch_size):
        p, t = preds[start : start + batch_size], targets[start : start + batch_size]
        ours.update(p, t)
        oracle.update(_logits(p), t[:, None].float())
    return ours, oracle


def _assert_equal_to_oracle(ours: SegmentationMetrics, oracle: _AuthorsAccumulator) -> None:
    table, summary, expected = ours.per_image(), ours.compute(), oracle.compute()
    for name in NAMES:
        reference = torch.from_numpy(oracle.values[name]).float()
        mine = table[name]
        assert torch.equal(torch.isnan(mine), ~torch.isfinite(reference)), f"{name}: dropped images differ"
        finite = torch.isfinite(reference)
        # docs/metrics.md: per image 0 (Dice, IoU, HD95) and float32 rounding for ASD (MONAI's float32 mean vs our
        # float64 sum); means and stds within float32 rounding (3e-7 measured, 1e-6 allowed)
        # ASD: at most two float32 ulps (relative 2.4e-7) of MONAI's value
        rtol = 2.4e-7 if name == "asd" else 0.0
        error = (mine[finite] - reference[finite]).abs() - rtol * reference[finite].abs()
        assert error.max().item() <= 0.0, name
        assert summary[name].item() == pytest.approx(expected[name], abs=1e-6), name
        assert summary[f"{name}_std"].item() == pytest.approx(expected[f"{name}_std"], abs=1e-6), name


def masks(*rows: str) -> torch.Tensor:
    """One (H, W) bool mask from strings of '.' and '#'."""
    return torch.tensor([[c == "#" for c in row] for row in rows])


# A 6 x 9 (non-square) image. Cases: a shifted lesion; a missed lesion (empty prediction); a false positive on an
# empty ground truth; both empty; and an asymmetric pair where the prediction has a second, distant blob.
LESION = masks(".........", ".###.....", ".###.....", ".###.....", ".........", ".........")
SHIFTED = masks(".........", "..###....", "..###....", "..###....", ".........", ".........")
NOTHING = torch.zeros(6, 9, dtype=torch.bool)
ONE_PIXEL = masks(".........", ".........", "..#......", ".........", ".........", ".........")
TWO_PIXELS = masks(".........", ".........", "..#...#..", ".........", ".........", ".........")
PREDS = torch.stack([SHIFTED, NOTHING, LESION, NOTHING, TWO_PIXELS])
TARGETS = torch.stack([LESION, LESION, NOTHING, NOTHING, ONE_PIXEL])
DIAGONAL = math.hypot(6, 9)


# --- the switch itself -----------------------------------------------------------------------------------------------


def test_protocol_names_and_errors():
    assert METRIC_PROTOCOLS == ("strict", "authors")
    assert check_metric_protocol("authors") == "authors"
    with pytest.raises(ValueError, match=r"`metric_protocol` must be one of \['strict', 'authors'\].*got 'paper'"):
        check_metric_protocol("paper")
    with pytest.raises(ValueError, match=r"`protocol` must be one of .*got 'Authors'"):
        SegmentationMetrics(protocol="Authors")  # type: ignore[arg-type]


def test_default_is_strict():
    assert SegmentationMetrics().protocol == "strict"
    assert per_image_values(PREDS, TARGETS)["hd95"][1].item() == pytest.approx(DIAGONAL)


# --- hand-computed differences ---------------------------------------------------------------------------------------


def test_directed_vs_symmetric_asd_hand_computed():
    # prediction: pixels (2, 2) and (2, 6); ground truth: (2, 2). Each single pixel is its own boundary.
    # prediction -> ground truth: {0, 4}; ground truth -> prediction: {0}.
    p, t = TWO_PIXELS[None], ONE_PIXEL[None]
    strict, authors = per_image_values(p, t, "strict"), per_image_values(p, t, "authors")
    assert authors["asd"].item() == pytest.approx(2.0)  # directed: mean of {0, 4}
    assert strict["asd"].item() == pytest.approx(4 / 3)  # symmetric: mean of {0, 4} and {0} pooled
    # HD95 is symmetric under both: the larger directed 95th percentile, 0.95 * 4 by linear interpolation
    assert strict["hd95"].item() == pytest.approx(3.8) and authors["hd95"].item() == pytest.approx(3.8)
    assert strict["dice"].item() == authors["dice"].item() == pytest.approx(2 * 1 / 3)


def test_empty_masks_counted_under_strict_dropped_under_authors():
    strict = per_image_values(PREDS, TARGETS, "strict")
    authors = per_image_values(PREDS, TARGETS, "authors")
    # image 1, missed lesion: Dice 0 under both; strict charges the diagonal, authors drop the distances
    assert strict["dice"][1].item() == 0.0 and authors["dice"][1].item() == 0.0
    assert strict["hd95"][1].item() == pytest.approx(DIAGONAL) and strict["asd"][1].item() == pytest.approx(DIAGONAL)
    assert math.isnan(authors["hd95"][1].item()) and math.isnan(authors["asd"][1].item())
    # image 2, false positive on an empty ground truth: strict Dice 0 and the diagonal, authors skip the image
    assert strict["dice"][2].item() == 0.0 and strict["iou"][2].item() == 0.0
    assert strict["hd95"][2].item() == pytest.approx(DIAGONAL)
    assert all(math.isnan(authors[name][2].item()) for name in NAMES)
    # image 3, both empty: strict Dice 1 and distance 0, authors skip it
    assert strict["dice"][3].item() == 1.0 and strict["hd95"][3].item() == 0.0
    assert all(math.isnan(authors[name][3].item()) for name in NAMES)
    # image 0, both non-empty: the same Dice, IoU and HD95 under both; shift by one column
    for name in ("dice", "iou", "hd95"):
        assert strict[name][0].item() == authors[name][0].item(), name
    assert strict["dice"][0].item() == pytest.approx(2 * 6 / 18)


def test_means_hand_computed_per_protocol():
    strict, authors = SegmentationMetrics(), SegmentationMetrics(protocol="authors")
    strict.update(PREDS, TARGETS)
    authors.update(PREDS, TARGETS)
    s, a = strict.compute(), authors.compute()
    dice0, dice4 = 2 * 6 / 18, 2 / 3
    assert s["dice"].item() == pytest.approx((dice0 + 0 + 0 + 1 + dice4) / 5)
    assert a["dice"].item() == pytest.approx((dice0 + 0 + dice4) / 3)  # empty ground truths (2, 3) skipped
    hd0 = per_image_values(PREDS[:1], TARGETS[:1])["hd95"].item()
    assert s["hd95"].item() == pytest.approx((hd0 + DIAGONAL + DIAGONAL + 0 + 3.8) / 5)
    assert a["hd95"].item() == pytest.approx((hd0 + 3.8) / 2)  # the missed lesion (1) vanishes too
    assert a["hd95_std"].item() == pytest.approx(abs(hd0 - 3.8) / 2)
    assert a["asd"].item() == pytest.approx((per_image_values(PREDS[:1], TARGETS[:1], "authors")["asd"].item() + 2) / 2)
    assert a["empty_preds"].item() == s["empty_preds"].item() == 2
    assert a["empty_targets"].item() == s["empty_targets"].item() == 2


# --- equal to MONAI called the authors' way ---------------------------------------------------------------------------


def test_authors_equals_monai_authors_call_on_hand_cases():
    ours, oracle = _evaluate_both(PREDS, TARGETS, batch_size=2)
    _assert_equal_to_oracle(ours, oracle)


def test_authors_ignores_anisotropic_spacing(caplog):
    with caplog.at_level(logging.WARNING, logger="usclip.metrics"):
        ours, oracle = _evaluate_both(PREDS, TARGETS, batch_size=5, spacing=(0.5, 2.0))
    _assert_equal_to_oracle(ours, oracle)  # the oracle has no spacing: pixels
    assert sum("spacing" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records) == 1
    # the same spacing does change strict values (row 0: a shift along columns, 2.0 per column)
    strict = SegmentationMetrics(spacing=(0.5, 2.0))
    strict.update(PREDS[:1], TARGETS[:1])
    assert strict.compute()["hd95"].item() == pytest.approx(2 * per_image_values(PREDS[:1], TARGETS[:1])["hd95"])
    # and a per-batch spacing is ignored as well
    again = SegmentationMetrics(protocol="authors")
    again.update(PREDS, TARGETS, spacing=torch.tensor([[0.5, 2.0]] * 5))
    assert torch.equal(again.per_image()["hd95"].nan_to_num(-1), ours.per_image()["hd95"].nan_to_num(-1))


def _shift(m: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    return torch.roll(m, shifts=(dy, dx), dims=(-2, -1))


def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(m[:, None].float(), 2 * r + 1, stride=1, padding=r)[:, 0] > 0


def _erode(m: torch.Tensor, r: int) -> torch.Tensor:
    return ~_dilate(~m, r)


def _pairs(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and ground truths from lesion masks (N, H, W): shifted, eroded (thin masks may vanish: missed
    lesions), dilated, shifted and dilated, missed lesions, false positives on empty ground truths, both empty."""
    n = targets.shape[0]
    empty = torch.zeros_like(targets)
    preds = [
        _shift(targets, 3, -5),
        _erode(targets, 3),
        _dilate(targets, 2),
        _shift(_dilate(targets, 1), -7, 4),
        empty,  # missed lesions
        targets,  # false positives, paired with empty ground truths below
        empty,  # both empty
    ]
    refs = [targets, targets, targets, targets, targets, empty, empty]
    order = torch.randperm(n * len(preds), generator=torch.Generator().manual_seed(0))  # mix cases across batches
    return torch.cat(preds)[order], torch.cat(refs)[order]


def _check_against_oracle(targets: torch.Tensor) -> None:
    preds, refs = _pairs(targets)
    ours, oracle = _evaluate_both(preds, refs, batch_size=32)  # the authors' batch size
    _assert_equal_to_oracle(ours, oracle)
    out = ours.compute()
    # the protocol made a difference on these pairs: strict counts what authors drop
    strict = SegmentationMetrics()
    strict.update(preds, refs)
    assert strict.compute()["hd95"].item() > out["hd95"].item()
    assert int(torch.isnan(ours.per_image()["dice"]).sum()) == int((~refs.flatten(1).any(1)).sum())


def _real_masks(root: Path, count: int) -> torch.Tensor:
    """``count`` BUSI and ``count`` DDTI masks, spread over each folder, loaded as the authors' data loader does:
    PIL mode "1", resized to 224 x 224 (PIL resizes mode "1" with nearest neighbours)."""
    out = []
    for dataset in ("BUSI", "DDTI"):
        files = sorted((root / dataset / "masks").glob("*.png"))
        assert len(files) >= count, f"expected at least {count} masks in {root / dataset / 'masks'}"
        for f in files[:: len(files) // count][:count]:
            with Image.open(f) as image:
                out.append(torch.from_numpy(np.array(image.convert("1").resize((224, 224)))).bool())
    return torch.stack(out)


@pytest.mark.realdata
def test_authors_equals_monai_on_real_masks(shared_data: Path):
    targets = _real_masks(shared_data, 3)  # 42 pairs, two batches of up to 32 (MONAI takes ~0.1 s a pair)
    assert targets.flatten(1).any(1).all()
    _check_against_oracle(targets)


@pytest.mark.realdata
@pytest.mark.slow
def test_authors_equals_monai_on_many_real_masks(shared_data: Path):
    _check_against_oracle(_real_masks(shared_data, 60))  # 840 pairs


def test_authors_equals_monai_on_synthetic_masks():
    # twin of the real-data test: synthetic lesion masks, non-square (96 x 128)
    targets = torch.stack([torch.from_numpy(generate_sample(i, i % 2, size=(96, 128)).mask > 0) for i in range(6)])
    assert targets.flatten(1).any(1).all()
    _check_against_oracle(targets)


# --- tasks, results files, YAML --------------------------------------------------------------------------------------


def _instantiate(configs: list[Path], tmp_path: Path):
    args = [a for c in configs for a in ("--config", str(c))]
    args += ["--model.init_args.model_name=usclip-test-vit", "--model.init_args.layers=[1,2,3]"]
    args += ["--model.init_args.pretrained=null", "--data.init_args.image_size=64", f"--data.init_args.root={tmp_path}"]
    return main(args, run=False).model


@pytest.mark.parametrize("base", ["busi_seg", "busi_cls"])
def test_yaml_overlay_chooses_the_protocol(base: str, tmp_path: Path):
    plain = _instantiate([REPO / "configs" / f"{base}.yaml"], tmp_path)
    assert plain.hparams["metric_protocol"] == "strict"
    model = _instantiate([REPO / "configs" / f"{base}.yaml", REPO / "configs" / "metrics" / "authors.yaml"], tmp_path)
    assert model.hparams["metric_protocol"] == "authors"
    if base == "busi_seg":
        assert model.val_metrics.protocol == model.test_metrics.protocol == "authors"
        assert plain.test_metrics.protocol == "strict"


def test_cli_rejects_unknown_protocol(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        main(
            ["--config", str(CONF_DIR / "segmentation_none.yaml"), "--model.init_args.metric_protocol=paper"], run=False
        )
    assert "metric_protocol" in capsys.readouterr().err


def _cli_args(conf: Path, tmp_path: Path) -> list[str]:
    return [
        "--config",
        str(conf),
        f"--data.init_args.root={tmp_path / 'data'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.init_args.metric_protocol",
        "authors",
    ]


def test_cli_segmentation_writes_the_protocol_into_results(tmp_path: Path):
    cli = main(["test", *_cli_args(CONF_DIR / "segmentation_none.yaml", tmp_path)])
    run = Path(cli.trainer.log_dir)
    metrics = json.loads((run / "results" / "test_metrics.json").read_text())
    assert metrics["metric_protocol"] == "authors"
    with (run / "results" / "test_per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["metric_protocol"] for r in rows} == {"authors"}
    for name in NAMES:  # the means in the JSON are the means of the finite per-image values
        column = np.array([float(r[name]) for r in rows])
        if np.isfinite(column).any():
            assert metrics[name] == pytest.approx(float(np.mean(column[np.isfinite(column)])), abs=1e-5), name
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["metric_protocol"] == "authors"
    assert load_run(run).metrics["num_images"] == len(rows)  # the report reader skips the string key


def test_cli_zero_shot_classification_writes_the_protocol(tmp_path: Path):
    vl = CONF_DIR / "vision_language"
    args = [*_cli_args(vl / "zeroshot.yaml", tmp_path), f"--model.init_args.prompts={vl / 'prompts_tiny.yaml'}"]
    cli = main(["test", *args])
    results = Path(cli.trainer.log_dir) / "results"
    metrics = json.loads((results / "test_metrics.json").read_text())
    assert metrics["metric_protocol"] == "authors"
    # the numbers are those of the written predictions: positive class 1, decisions at 0.5 (not only in [0, 1])
    with (results / "test_predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    positive = [float(r[list(r)[-1]]) for r in rows]  # last column: probability of class 1
    labels = [int(r["label"]) for r in rows]
    assert metrics["num_images"] == len(rows) and len(set(labels)) == 2
    expected_acc = np.mean([(p > 0.5) == bool(y) for p, y in zip(positive, labels, strict=True)])
    assert metrics["acc"] == pytest.approx(expected_acc, abs=1e-6)
    expected_auc = binary_auroc(torch.tensor(positive), torch.tensor(labels)).item()
    assert metrics["auc"] == pytest.approx(expected_auc, abs=1e-6)
