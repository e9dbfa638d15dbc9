"""Scale (issue #18, item 6): algorithmic properties that keep the pipeline near-linear at 50,000 scans.

No test times anything: each one asserts a property that a quadratic or unbounded version breaks (elements hashed,
directory listings, passes over the labels, memory of the duplicate search), so it fails on any machine.
Figures: ``bench/scale.py`` and docs/benchmarks.md, "Scale".
"""

from __future__ import annotations

import pathlib
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

import usclip.data.datamodules as datamodules
from usclip.data import BaseDataModule
from usclip.data.checks import DatasetReport, _check_labels, check_dataset
from usclip.data.duplicates import _compare_signatures, find_duplicates, signatures
from usclip.data.imageio import read_image
from usclip.data.layouts import DatasetIndex
from usclip.data.synthetic import generate_sample


def _empty_images(root: Path, n: int) -> list[str]:
    """``root/images/<id>.png`` as empty files: indexing and splitting never read pixels."""
    (root / "images").mkdir(parents=True)
    ids = [f"s{i:05d}" for i in range(n)]
    for sid in ids:
        (root / "images" / f"{sid}.png").touch()
    return ids


# ------------------------------------------------------------------------------------------- fit-time split
def test_fit_split_with_a_predefined_test_file_hashes_each_id_a_bounded_number_of_times(tmp_path, monkeypatch):
    """A predefined test.txt: the held-out set is built once (it was built once per id: n x |test| hashes)."""
    ids = _empty_images(tmp_path, 400)
    (tmp_path / "test.txt").write_text("".join(f"{i}\n" for i in ids[::4]))  # 100 held out
    hashed = [0]

    class CountingSet(set):
        def __init__(self, items=()):
            items = list(items)
            hashed[0] += len(items)
            super().__init__(items)

    monkeypatch.setattr(datamodules, "set", CountingSet, raising=False)  # module globals shadow the builtin
    dm = BaseDataModule(str(tmp_path), cache_mb=0)
    dm.setup("fit")
    assert sorted(dm.splits["test"]) == ids[::4]
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 300
    assert not set(dm.splits["test"]) & (set(dm.splits["train"]) | set(dm.splits["val"]))
    assert 0 < hashed[0] <= 3 * 400  # quadratic: 300 x 100 = 30,000


def _count_listings(monkeypatch) -> dict[str, int]:
    calls = {"iterdir": 0, "glob": 0, "listdir": 0, "scandir": 0}
    for cls, name in ((pathlib.Path, "iterdir"), (pathlib.Path, "glob")):
        original = getattr(cls, name)

        def counted(self, *a, _original=original, _name=name, **k):
            calls[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(cls, name, counted)
    for name in ("listdir", "scandir"):
        original = getattr(pathlib.os, name)

        def counted_os(*a, _original=original, _name=name, **k):
            calls[_name] += 1
            return _original(*a, **k)

        monkeypatch.setattr(pathlib.os, name, counted_os)
    return calls


@pytest.mark.parametrize("with_test_txt", [False, True])
def test_fit_setup_lists_each_folder_once_whatever_the_number_of_images(tmp_path, monkeypatch, with_test_txt):
    """Indexing plus the split at fit start: directory listings do not grow with the images (no per-file glob)."""
    counts = []
    for n in (20, 200):
        root = tmp_path / str(n)
        ids = _empty_images(root, n)
        if with_test_txt:
            (root / "test.txt").write_text("\n".join(ids[:: n // 10]))
        calls = _count_listings(monkeypatch)
        dm = BaseDataModule(str(root), cache_mb=0)
        dm.setup("fit")
        monkeypatch.undo()
        assert sum(len(v) for v in dm.splits.values()) == n
        counts.append(dict(calls))
    assert counts[0] == counts[1]
    assert sum(counts[1].values()) <= 4


def _write_scans(root: Path, n: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        cv2.imwrite(str(root / "images" / f"s{i:04d}.png"), rng.integers(1, 255, (12, 10), np.uint8))
        cv2.imwrite(str(root / "masks" / f"s{i:04d}.png"), np.zeros((12, 10), np.uint8))


def test_data_check_lists_each_folder_once_whatever_the_number_of_images(tmp_path, monkeypatch):
    counts = []
    for n in (10, 60):
        _write_scans(tmp_path / str(n), n)
        calls = _count_listings(monkeypatch)
        report = check_dataset(tmp_path / str(n), crop="none")
        monkeypatch.undo()
        assert report.num_images == n and report.num_masks == n and not report.errors
        counts.append(dict(calls))
    assert counts[0] == counts[1]


def test_unknown_labels_are_collected_in_one_pass_over_the_ids():
    """One distinct wrong label per image (a wrong column in labels.csv): still one pass, one error per label."""
    n = 300
    passes = [0]

    class CountingDict(dict):
        def items(self):
            passes[0] += 1
            return super().items()

    labels = CountingDict({f"s{i:04d}": f"x{i}" for i in range(n)})
    index = DatasetIndex(root=Path("ds"), layout="folder", images={k: Path(k) for k in labels}, labels=labels)
    report = DatasetReport(root=index.root)
    _check_labels(index, report, ["benign", "malignant"])
    unknown = [p for p in report.problems if "unknown label" in p.message]
    assert len(unknown) == n
    assert "unknown label 'x17' (ids ['s0017'])" in " ".join(p.message for p in unknown)
    assert passes[0] <= 3  # one pass per unknown label before: 300


# ------------------------------------------------------------------------------------------- duplicate search
@pytest.fixture(scope="module")
def dup_folder(tmp_path_factory) -> dict[str, Path]:
    """9 distinct scans and 4 near-duplicates, so that duplicates fall inside and across tiles of 2, 3 or 5."""
    folder = tmp_path_factory.mktemp("scale_dups")
    images: dict[str, Path] = {}
    bases = [generate_sample(seed, seed % 2, (72, 88)).image for seed in range(9)]
    rng = np.random.default_rng(1)
    extra = {
        "d0": np.clip(bases[0].astype(np.float32) * 1.1 + 4, 0, 255).astype(np.uint8),
        "d4": np.clip(bases[4] + rng.normal(0, 4, bases[4].shape), 0, 255).astype(np.uint8),
        "d7": np.roll(bases[7], 2, axis=1),
        "e7": bases[7].copy(),
    }
    for name, img in [(f"a{k}", b) for k, b in enumerate(bases)] + list(extra.items()):
        images[name] = folder / f"{name}.png"
        cv2.imwrite(str(images[name]), img)
    return images


@pytest.mark.parametrize("block", [1, 2, 3, 5])
def test_tiled_duplicate_search_equals_one_tile(dup_folder, block):
    """Tiles of any size find the same pairs with the same scores, each pair once, never an image with itself."""
    whole = find_duplicates(dup_folder, block=4096)
    tiled = find_duplicates(dup_folder, block=block)
    assert {("a0", "d0"), ("a4", "d4"), ("a7", "e7")} <= {(p.id_a, p.id_b) for p in whole}
    key = sorted((p.id_a, p.id_b, p.hamming, p.ncc) for p in tiled)  # by id: NCC ties (1.0) may order differently
    ref = sorted((p.id_a, p.id_b, p.hamming, p.ncc) for p in whole)
    assert [k[:3] for k in key] == [r[:3] for r in ref]
    assert np.allclose([k[3] for k in key], [r[3] for r in ref], atol=1e-5)
    assert [p.ncc for p in tiled] == sorted((p.ncc for p in tiled), reverse=True)
    assert all(p.id_a < p.id_b for p in tiled)
    # the reported Hamming distance is the number of differing aHash bits, computed directly
    bits = {k: signatures(read_image(v))[2] for k, v in dup_folder.items()}
    assert all(p.hamming == int((bits[p.id_a] != bits[p.id_b]).sum()) for p in tiled)


@pytest.mark.parametrize("block", [0, -3, 2.5])
def test_duplicate_search_rejects_a_bad_block(dup_folder, block):
    with pytest.raises(ValueError, match=rf"block must be a positive int .*got {block}"):
        find_duplicates(dup_folder, block=block)


def test_duplicate_search_memory_is_bounded_by_the_tile_not_the_image_count():
    """2,000 random signatures, tiles of 64: temporaries stay tile-sized (a row block against all N: 16x more)."""
    n, block = 2000, 64
    rng = np.random.default_rng(0)

    def unit(rows: int) -> np.ndarray:
        x = rng.normal(size=(rows, 1024)).astype(np.float32)
        x -= x.mean(axis=1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    v, w = unit(n), unit(n)
    b = (rng.random((n, 256)) < 0.5).astype(np.float32)
    v[1500], b[1500] = v[3], b[3]  # one duplicate pair, far apart (different tiles)
    ids = [f"s{i:04d}" for i in range(n)]
    tracemalloc.start()
    try:
        pairs = _compare_signatures(ids, v, w, b, 0.93, 6, 0.98, block)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(p.id_a, p.id_b, p.hamming) for p in pairs] == [("s0003", "s1500", 0)]
    assert peak < 12 * block * block * 4  # about six tile-sized arrays; one row block x N is 512 KiB each
