"""The synthetic B-mode generator: determinism, geometry, lesion appearance per class, and the dataset writer."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from usclip.data import synthetic
from usclip.data.synthetic import LABEL_NAMES, SyntheticSample, generate_sample, write_synthetic_dataset

N_PER_CLASS = 20
SIZE = 128  # the demo's resolution


@pytest.fixture(scope="module")
def samples() -> dict[int, list[SyntheticSample]]:
    return {label: [generate_sample(seed, label, SIZE) for seed in range(N_PER_CLASS)] for label in (0, 1)}


def _box_mask(sample: SyntheticSample) -> np.ndarray:
    inside = np.zeros(sample.image.shape, bool)
    x0, y0, x1, y1 = sample.box
    inside[y0:y1, x0:x1] = True
    return inside


def _ring(mask: np.ndarray, image: np.ndarray, width: int = 4) -> np.ndarray:
    """Pixels within ``width`` of the lesion, outside it, inside the scan area."""
    grown = cv2.dilate(mask, np.ones((2 * width + 1, 2 * width + 1), np.uint8)) > 0
    return grown & (mask == 0) & (image > 0)


def _solidity(mask: np.ndarray) -> float:
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    return cv2.contourArea(contour) / cv2.contourArea(cv2.convexHull(contour))


def _width_over_height(mask: np.ndarray) -> float:
    m = cv2.moments(mask, binaryImage=True)
    return float(np.sqrt(m["mu20"] / m["mu02"]))


def test_same_seed_same_sample_different_seed_different():
    a, b = generate_sample(7, 1, 96), generate_sample(7, 1, 96)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert (a.box, a.caption, a.geometry, a.label) == (b.box, b.caption, b.geometry, b.label)
    c = generate_sample(8, 1, 96)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("geometry", ["sector", "linear"])
@pytest.mark.parametrize("size", [64, (96, 160), (200, 120)])
def test_shapes_dtypes_and_box(size, geometry):
    sample = generate_sample(3, 0, size, geometry)
    h, w = (size, size) if isinstance(size, int) else size
    assert sample.image.shape == (h, w) and sample.image.dtype == np.uint8
    assert sample.mask.shape == (h, w) and sample.mask.dtype == np.uint8
    assert set(np.unique(sample.mask)) == {0, 255}
    assert sample.geometry == geometry and sample.label == 0
    x0, y0, x1, y1 = sample.box
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert all(isinstance(v, int) for v in sample.box)


def test_random_geometry_gives_both():
    assert {generate_sample(seed, 0, 64).geometry for seed in range(20)} == {"sector", "linear"}


def test_mask_nonempty_inside_scan_area(samples):
    for sample in samples[0] + samples[1]:
        lesion = sample.mask > 0
        assert lesion.any()
        assert not (lesion & ~_box_mask(sample)).any()
        assert (sample.image[lesion] > 0).all()  # the lesion lies on scan pixels, not on the black screen
        scan_area = (sample.image > 0) & _box_mask(sample)
        assert 0.02 <= lesion.sum() / scan_area.sum() <= 0.25


def test_box_is_tight_and_surroundings_black_with_marks(samples):
    for sample in samples[0] + samples[1]:
        x0, y0, x1, y1 = sample.box
        scan = sample.image[y0:y1, x0:x1] > 0
        # Tight: the scan area touches all four sides of the box.
        assert scan[0].any() and scan[-1].any() and scan[:, 0].any() and scan[:, -1].any()
        outside = sample.image[~_box_mask(sample)]
        assert (outside == 0).mean() > 0.85 and (outside < 40).mean() > 0.9  # black screen, sparse UI marks
        assert (outside > 100).sum() > 10  # burnt-in text and marks
        # Linear scans fill their box; sector scans leave the box's bottom corners black.
        if sample.geometry == "linear":
            assert scan.all()
        else:
            assert not scan[-1, 0] and not scan[-1, -1]


def test_benign_wider_than_tall_malignant_taller_than_wide(samples):
    benign = [_width_over_height(s.mask) for s in samples[0]]
    malignant = [_width_over_height(s.mask) for s in samples[1]]
    assert np.mean(benign) > 1.2 and np.mean(malignant) < 0.85
    assert np.mean(np.array(benign) > 1) >= 0.9 and np.mean(np.array(malignant) < 1) >= 0.9


def test_lesions_are_hypoechoic(samples):
    for label in (0, 1):
        diffs = [s.image[_ring(s.mask, s.image)].mean() - s.image[s.mask > 0].mean() for s in samples[label]]
        assert np.mean(diffs) > 15, LABEL_NAMES[label]
        assert np.mean(np.array(diffs) > 0) >= 0.9, LABEL_NAMES[label]


def _posterior_ratio(sample: SyntheticSample) -> float:
    """Mean of a band below the lesion over the mean of the tissue beside that band, at the same depth."""
    ys, xs = np.nonzero(sample.mask)
    x_min, x_max, width = xs.min(), xs.max(), xs.max() - xs.min()
    x_lo, x_hi = np.percentile(xs, [25, 75]).astype(int)
    rows = slice(ys.max() + 2, min(sample.box[3], ys.max() + 2 + max(4, (ys.max() - ys.min()) // 2)))
    below = sample.image[rows, x_lo : x_hi + 1]
    beside = np.concatenate(
        [
            sample.image[rows, max(0, x_min - 3 - width) : max(0, x_min - 3)],
            sample.image[rows, x_max + 4 : x_max + 4 + width],
        ],
        axis=1,
    )
    return float(below[below > 0].mean()) / float(beside[beside > 0].mean())


def test_posterior_enhancement_vs_shadowing(samples):
    benign = np.mean([_posterior_ratio(s) for s in samples[0]])
    malignant = np.mean([_posterior_ratio(s) for s in samples[1]])
    assert benign > 1.1 and malignant < 0.85


def test_malignant_margins_more_irregular(samples):
    benign = np.mean([_solidity(s.mask) for s in samples[0]])
    malignant = np.mean([_solidity(s.mask) for s in samples[1]])
    assert benign > 0.95 and benign - malignant > 0.05


def test_captions_follow_label(samples):
    for sample in samples[0]:
        text = sample.caption.lower()
        assert "enhancement" in text and "shadow" not in text
        assert "parallel" in text or "wider-than-tall" in text
        assert "taller-than-wide" not in text and "non-parallel" not in text
    for sample in samples[1]:
        text = sample.caption.lower()
        assert "shadow" in text and "enhancement" not in text
        assert "taller-than-wide" in text or "non-parallel" in text
    captions = [s.caption for s in samples[0] + samples[1]]
    assert all(len(c.split()) < 60 for c in captions)
    assert len(set(captions)) > len(captions) // 2  # varied templates
    assert any("thyroid" in c.lower() for c in captions) and any("breast" in c.lower() for c in captions)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"label": 2}, "label"),
        ({"size": 16}, "size"),
        ({"size": (64, 20)}, "size"),
        ({"geometry": "convex"}, "geometry"),
        ({"seed": -1}, "seed"),
    ],
)
def test_generate_sample_rejects_bad_arguments(kwargs, match):
    args = {"seed": 0, "label": 0, "size": 64, "geometry": "random"} | kwargs
    with pytest.raises(ValueError, match=match):
        generate_sample(**args)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_write_dataset_layout_and_balance(tmp_path):
    root = write_synthetic_dataset(tmp_path / "syn", num_samples=10, size=64, seed=1, malignant_fraction=0.3)
    assert root == tmp_path / "syn"
    ids = [f"syn_{i:05d}" for i in range(10)]
    assert sorted(p.stem for p in (root / "images").glob("*.png")) == ids
    assert sorted(p.stem for p in (root / "masks").glob("*.png")) == ids
    headers = {"labels.csv": ["id", "label"], "captions.csv": ["id", "caption", "label"]}
    headers |= {"boxes.csv": ["id", "x0", "y0", "x1", "y1"], "groups.csv": ["id", "group"]}
    for name, header in headers.items():
        rows = _read(root / name)
        assert list(rows[0]) == header, name
        assert [r["id"] for r in rows] == ids, name
    labels = [r["label"] for r in _read(root / "labels.csv")]
    assert labels.count("malignant") == 3 and labels.count("benign") == 7
    assert labels != sorted(labels, reverse=True)  # shuffled, not all malignant first
    assert len({r["group"] for r in _read(root / "groups.csv")}) == 10
    for row in _read(root / "boxes.csv"):
        image = cv2.imread(str(root / "images" / f"{row['id']}.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(root / "masks" / f"{row['id']}.png"), cv2.IMREAD_UNCHANGED)
        assert image.shape == mask.shape == (64, 64) and image.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert mask[y0:y1, x0:x1].sum() == mask.sum() > 0
    params = json.loads((root / "synthetic.json").read_text())
    assert params["num_samples"] == 10 and params["seed"] == 1 and params["size"] == 64
    assert "synthetic" in (root / "README.md").read_text().lower()
    assert not list(root.glob("*.tmp")) and not (root / ".synthetic_incomplete.json").exists()


@pytest.mark.parametrize(("n", "fraction"), [(7, 0.5), (5, 0.0), (5, 1.0), (9, 0.25)])
def test_class_count_is_rounded_fraction(tmp_path, n, fraction):
    root = write_synthetic_dataset(tmp_path, num_samples=n, size=32, malignant_fraction=fraction)
    labels = [r["label"] for r in _read(root / "labels.csv")]
    assert labels.count("malignant") == round(n * fraction)


def test_dataset_is_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", num_samples=4, size=48, seed=5)
    b = write_synthetic_dataset(tmp_path / "b", num_samples=4, size=48, seed=5)
    for name in ("labels.csv", "captions.csv", "boxes.csv", "images/syn_00003.png", "masks/syn_00002.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_reuse_does_not_rewrite_and_other_params_need_overwrite(tmp_path):
    root = write_synthetic_dataset(tmp_path, num_samples=4, size=48)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    for p in files:  # push mtimes into the past so that a rewrite would be visible
        os.utime(p, ns=(10**18, 10**18))
    write_synthetic_dataset(tmp_path, num_samples=4, size=48)
    assert all(p.stat().st_mtime_ns == 10**18 for p in files)
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        write_synthetic_dataset(root, num_samples=5, size=48)
    write_synthetic_dataset(root, num_samples=5, size=48, overwrite=True)
    assert len(list((root / "images").glob("*.png"))) == 5
    assert json.loads((root / "synthetic.json").read_text())["num_samples"] == 5


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("someone else's data")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        write_synthetic_dataset(tmp_path, num_samples=2, size=32)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "benign_001.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match="benign_001"):
        write_synthetic_dataset(tmp_path, num_samples=2, size=32, overwrite=True)
    assert (tmp_path / "images" / "benign_001.png").exists() and (tmp_path / "notes.txt").exists()


def test_interrupted_run_does_not_look_complete_and_is_resumed(tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return generate_sample(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(tmp_path, num_samples=4, size=32)
    assert not (tmp_path / "synthetic.json").exists()
    monkeypatch.undo()
    write_synthetic_dataset(tmp_path, num_samples=4, size=32)  # same parameters: finishes without overwrite
    assert (tmp_path / "synthetic.json").exists() and len(list((tmp_path / "images").glob("*.png"))) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"malignant_fraction": 1.5}, "malignant_fraction"),
        ({"malignant_fraction": -0.1}, "malignant_fraction"),
        ({"size": 16}, "size"),
        ({"geometry": "convex"}, "geometry"),
        ({"seed": -3}, "seed"),
    ],
)
def test_write_dataset_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_synthetic_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
