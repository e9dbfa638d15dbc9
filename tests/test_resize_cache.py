"""The resized level of the sample cache (issue #25): crops resized once, cached as uint8, never stale.

Non-square files (40 x 50) resized to a non-square size (24 x 32), so that a transposed size shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from usclip.data import SegmentationDataModule
from usclip.data.cache import SampleCache
from usclip.data.datasets import FolderDataset
from usclip.data.transforms import DEFAULT_AUGMENTATIONS, build_transform

from .test_data import make_folder

IDS = [f"s{i:02d}" for i in range(6)]


def _samples(ds: FolderDataset) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("augment", [False, True])
def test_resized_cache_gives_the_samples_of_no_cache(tmp_path, augment):
    """Catches: the cached arrays resized with another interpolation, or the mask resized like the image."""
    root = make_folder(tmp_path / "d", n=6)
    spec = DEFAULT_AUGMENTATIONS if augment else None
    plain = FolderDataset(root, IDS, transform=build_transform((24, 32), spec, seed=3))
    cached = FolderDataset(
        root, IDS, transform=build_transform((24, 32), spec, seed=3), cache=SampleCache(64), resize=(24, 32)
    )
    for _ in range(2):  # the second pass reads the cache
        for a, b in zip(_samples(plain), _samples(cached), strict=True):
            assert a["image"].shape == (3, 24, 32)
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
            assert torch.equal(a["crop_box"], b["crop_box"]) and torch.equal(a["orig_size"], b["orig_size"])
    assert cached.cache is not None and cached.cache.hits == 6 and cached.cache.misses == 6
    entry = next(iter(cached.cache._items.values()))
    assert entry.image.shape == entry.mask.shape == (24, 32) and entry.image.dtype == np.uint8
    assert set(np.unique(entry.mask)) <= {0, 1}
    assert cached.decoded(0).image.shape == (40, 50)  # decoded() is still the crop


def test_resized_cache_keys_hold_the_size_and_crop(tmp_path):
    """One cache shared by datasets of other sizes and crop settings never hands one the other's arrays."""
    root = make_folder(tmp_path / "d", n=6)
    cache = SampleCache(64)
    for size in ((24, 32), (32, 24), (16, 16)):
        ds = FolderDataset(root, IDS[:2], transform=build_transform(size), cache=cache, resize=size)
        assert ds[0]["image"].shape == (3, *size) and ds[1]["mask"].shape == size
    boxes = root / "boxes.csv"
    boxes.write_text("id,x0,y0,x1,y1\n" + "".join(f"{i},5,4,45,36\n" for i in IDS[:2]))
    plain = FolderDataset(root, IDS[:1], transform=build_transform(16), crop="boxes")[0]
    boxed = FolderDataset(root, IDS[:1], transform=build_transform(16), cache=cache, crop="boxes", resize=(16, 16))
    assert torch.equal(boxed[0]["image"], plain["image"]) and boxed[0]["crop_box"].tolist() == [5, 4, 45, 36]
    assert len(cache) == 2 * 3 + 1


def test_resized_cache_on_disk_is_read_by_a_new_cache(tmp_path):
    root = make_folder(tmp_path / "d", n=6)
    first = FolderDataset(
        root, IDS, transform=build_transform((24, 32)), cache=SampleCache(0, tmp_path / "c"), resize=(24, 32)
    )
    expected = _samples(first)
    again = SampleCache(0, tmp_path / "c")
    second = FolderDataset(root, IDS, transform=build_transform((24, 32)), cache=again, resize=(24, 32))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(expected, _samples(second), strict=True))
    assert (again.hits, again.misses) == (6, 0)


def test_datamodule_caches_resized_images(tmp_path):
    root = make_folder(tmp_path / "d", n=20)
    dm = SegmentationDataModule(str(root), image_size=32, batch_size=4, augmentations={}, cache_mb=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert dm.cache is not None and {v.image.shape for v in dm.cache._items.values()} == {(32, 32)}


def test_resize_must_be_a_size(tmp_path):
    root = make_folder(tmp_path / "d", n=2)
    with pytest.raises(ValueError, match=r"resize must be \(height, width\) in pixels >= 1, got \(0, 32\)"):
        FolderDataset(root, IDS[:1], resize=(0, 32))
