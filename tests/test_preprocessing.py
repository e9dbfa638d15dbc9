"""Preprocessing switches: input normalisation (``clip`` / ``none``) and the authors' augmentation as YAML data.

``configs/augment/reference.yaml`` reproduces the strong/weak augmentation of the authors' code
(jinggqu/NextGen-UIA, ``dataset_seg.py``); each operation is checked for what it does on a synthetic image, with the
parameters read from the shipped YAML (not re-typed here).
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from usclip.cli import main
from usclip.data.datasets import FolderDataset
from usclip.data.layouts import index_folder
from usclip.data.synthetic import write_synthetic_dataset
from usclip.data.transforms import SeededCompose, build_augmentations, build_transform
from usclip.tasks import ClassificationTask, SegmentationTask

REPO = Path(__file__).parents[1]
REFERENCE = REPO / "configs" / "augment" / "reference.yaml"
TINY_CONF = REPO / "tests" / "conf" / "segmentation_lora.yaml"

# CLIP's constants (open_clip.OPENAI_DATASET_MEAN / _STD), written out so that a wrong constant is caught
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _tiny_task(normalization: str, **kwargs: Any) -> SegmentationTask:
    args = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 3], "image_size": 64, "embed_dim": 8}
    return SegmentationTask(normalization=normalization, **(args | kwargs))


def _encoder_input(task: torch.nn.Module, module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            task(images)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


# ----------------------------------------------------------------- normalisation
def test_normalization_none_feeds_the_unit_range_image_unchanged():
    task = _tiny_task("none")
    images = torch.rand(2, 3, 64, 64)
    x = _encoder_input(task, task.encoder, images)
    assert torch.equal(x, images)


def test_normalization_clip_uses_the_encoder_constants():
    task = _tiny_task("clip")
    assert task.encoder.image_mean == pytest.approx(CLIP_MEAN) and task.encoder.image_std == pytest.approx(CLIP_STD)
    images = torch.rand(2, 3, 64, 64)
    x = _encoder_input(task, task.encoder, images)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images - mean) / std)
    # known values on a non-square image: channel c holds c / 4 (so a swapped mean/std or channel order shows)
    grid = torch.arange(3.0).view(1, 3, 1, 1).expand(2, 3, 5, 7) / 4
    out = task.normalize(grid)
    assert out.shape == (2, 3, 5, 7)
    for c in range(3):
        assert torch.allclose(out[:, c], torch.tensor((c / 4 - CLIP_MEAN[c]) / CLIP_STD[c]))


def test_normalization_follows_timm_and_native_models():
    timm_task = SegmentationTask(
        model_name="timm:test_vit", pretrained=None, layers=[0, 1], image_size=64, embed_dim=8, normalization="clip"
    )
    images = torch.rand(1, 3, 64, 64)
    mean = torch.tensor(timm_task.encoder.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(timm_task.encoder.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(_encoder_input(timm_task, timm_task.encoder, images), (images - mean) / std)
    native = ClassificationTask(
        model_name="timm:resnet18", pretrained=None, head="native", image_size=64, normalization="none"
    )
    assert torch.equal(_encoder_input(native, native.net, images), images)


def test_normalization_rejects_unknown_values():
    with pytest.raises(ValueError, match=r"normalization must be one of \('clip', 'none'\), got 'imagenet'"):
        _tiny_task("imagenet")


# ----------------------------------------------------------------- three grey channels
def test_grey_images_are_copied_to_three_channels_in_unit_range(tmp_path: Path):
    root = write_synthetic_dataset(tmp_path / "syn", num_samples=2, size=40, seed=0)
    index = index_folder(root)
    ds = FolderDataset(root, index.ids[:1], transform=build_transform(32), index=index)
    image = ds[0]["image"]
    grey = cv2.resize(ds.decoded(0).image, (32, 32), interpolation=cv2.INTER_AREA)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    torch.testing.assert_close(image[0], torch.from_numpy(grey).float() / 255)


# ----------------------------------------------------------------- the reference YAML
def _reference_spec() -> Any:
    return yaml.safe_load(REFERENCE.read_text())["data"]["init_args"]["augmentations"]


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """The built pipeline and its parts: the Sequential, the two OneOf and one instance of each leaf op."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (seq,) = build_augmentations(_reference_spec(), image_size=48)
    strong, weak = seq.transforms
    ops: dict[str, list[A.BasicTransform]] = {}
    for t in strong.transforms[1].transforms + weak.transforms[1].transforms:
        ops.setdefault(type(t).__name__, []).append(t)
    return {"seq": seq, "strong": strong, "weak": weak, "ops": ops}


def test_reference_yaml_builds_the_authors_structure(reference):
    seq, strong, weak = reference["seq"], reference["strong"], reference["weak"]
    assert isinstance(seq, A.Sequential) and seq.p == 0.5
    assert yaml.safe_load(REFERENCE.read_text())["model"]["init_args"]["normalization"] == "none"
    for branch, kmax, names in (
        (strong, 9, ["NoOp", "AutoContrast", "PilEqualize", "PilGaussianBlur", "ColorJitter", "ColorJitter",
                     "PilSharpness", "Posterize", "Solarize"]),
        (weak, 4, ["RandomResizedCrop", "HorizontalFlip", "VerticalFlip", "NoOp"]),
    ):  # fmt: skip
        assert isinstance(branch, A.OneOf) and branch.p == 1.0
        assert [type(t).__name__ for t in branch.transforms] == ["RandomOrder"] * (kmax + 1)
        assert [t.n for t in branch.transforms] == list(range(kmax + 1))  # how many ops: uniform 0..kmax
        for t in branch.transforms:
            assert t.replace and t.p == 1.0 and [type(c).__name__ for c in t.transforms] == names
            assert all(c.p == 1.0 for c in t.transforms)


def _ramp(h: int = 16, w: int = 16) -> np.ndarray:
    return np.arange(h * w).reshape(h, w).astype(np.uint8)  # every grey level 0..255 once (16 x 16)


def _speckle(h: int = 40, w: int = 56, lo: int = 60, hi: int = 160) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(lo, hi + 1, (h, w)).astype(np.uint8)


def _apply(t: A.BasicTransform, seed: int, **data: np.ndarray) -> dict[str, np.ndarray]:
    pipe = SeededCompose([t], seed=seed)
    return pipe(**{k: v.copy() for k, v in data.items()})


def _mask(h: int = 40, w: int = 56) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[5:17, 9:30] = 1
    return m


@pytest.mark.parametrize(
    "name",
    ["NoOp", "AutoContrast", "PilEqualize", "PilGaussianBlur", "ColorJitter", "PilSharpness", "Posterize", "Solarize"],
)
def test_intensity_ops_leave_the_mask_alone(reference, name):
    for t in reference["ops"][name]:
        out = _apply(t, 3, image=_speckle(), mask=_mask())
        assert np.array_equal(out["mask"], _mask())
        assert out["image"].shape == (40, 56) and out["image"].dtype == np.uint8


def test_autocontrast_stretches_to_full_range(reference):
    (t,) = reference["ops"]["AutoContrast"]
    img = _speckle(lo=60, hi=160)
    out = _apply(t, 0, image=img)["image"]
    assert out.min() == 0 and out.max() == 255
    order = np.argsort(img, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)  # a monotone stretch


def test_equalize_flattens_the_histogram(reference):
    (t,) = reference["ops"]["PilEqualize"]
    img = np.clip(np.random.default_rng(2).normal(110, 12, (64, 64)), 0, 255).astype(np.uint8)
    out = _apply(t, 0, image=img)["image"]

    def gap(a: np.ndarray) -> float:  # largest distance of the CDF from the uniform one
        cdf = np.cumsum(np.bincount(a.ravel(), minlength=256)) / a.size
        return float(np.abs(cdf - (np.arange(256) + 1) / 256).max())

    assert gap(img) > 0.4 and gap(out) < 0.05


def test_posterize_keeps_the_top_4_to_7_bits(reference):
    (t,) = reference["ops"]["Posterize"]
    img = _ramp()
    bits = set()
    for seed in range(60):
        out = _apply(t, seed, image=img)["image"]
        kept = [b for b in range(1, 9) if np.array_equal(out, img & (0xFF << (8 - b) & 0xFF))]
        assert len(kept) == 1
        bits.add(kept[0])
    assert bits == {4, 5, 6, 7}


def test_solarize_inverts_above_the_threshold(reference):
    (t,) = reference["ops"]["Solarize"]
    img = _ramp()
    thresholds = []
    for seed in range(200):
        out = _apply(t, seed, image=img)["image"]
        changed = np.flatnonzero(out.ravel() != img.ravel())
        thr = int(changed[0]) if changed.size else 256  # the ramp holds grey level v at flat index v
        assert np.array_equal(out, np.where(img >= thr, 255 - img, img))
        thresholds.append(thr)
    assert 1 <= min(thresholds) < 30 and 225 < max(thresholds) <= 255  # uniform over 1..255 like PIL's draw


def test_blur_smooths_with_sigma_075_to_125(reference):
    (t,) = reference["ops"]["PilGaussianBlur"]
    img = _speckle()
    lo = cv2.GaussianBlur(img, (0, 0), 1.25).std()
    hi = cv2.GaussianBlur(img, (0, 0), 0.75).std()
    for seed in range(10):
        out = _apply(t, seed, image=img)["image"]
        assert lo - 0.5 <= out.std() <= hi + 0.5 < img.std()
        assert abs(float(out.mean()) - float(img.mean())) < 1.0


def test_contrast_and_brightness_factors_within_075_125(reference):
    contrast, brightness = reference["ops"]["ColorJitter"]
    img = _speckle()
    x = img.astype(float)
    seen_c, seen_b = [], []
    for seed in range(40):
        c = _apply(contrast, seed, image=img)["image"].astype(float)
        f = np.polyfit(x.ravel() - x.mean(), c.ravel() - x.mean(), 1)[0]  # contrast about the mean grey
        assert 0.74 <= f <= 1.26 and abs(c.mean() - x.mean()) < 1.0
        b = _apply(brightness, seed, image=img)["image"].astype(float)
        g = b.sum() / x.sum()  # brightness multiplies
        assert 0.74 <= g <= 1.26 and np.abs(b - g * x).max() <= 1.0
        seen_c.append(f)
        seen_b.append(g)
    assert min(seen_c) < 0.85 and max(seen_c) > 1.15 and min(seen_b) < 0.85 and max(seen_b) > 1.15


def test_sharpness_blurs_or_sharpens_with_pil_factor_075_to_125(reference):
    (t,) = reference["ops"]["PilSharpness"]
    img = cv2.GaussianBlur(_speckle(), (0, 0), 1.0)
    x = img.astype(np.float32)
    # PIL's Sharpness(f): x + (f - 1) * (x - smooth(x)), smooth = [[1,1,1],[1,5,1],[1,1,1]] / 13, border kept
    detail = (x - cv2.filter2D(x, -1, np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13))[1:-1, 1:-1]
    factors = []
    for seed in range(30):
        out = _apply(t, seed, image=img)["image"].astype(np.float32)
        assert np.array_equal(out[0], x[0]) and np.array_equal(out[:, -1], x[:, -1])
        f = 1 + float(np.sum((out[1:-1, 1:-1] - x[1:-1, 1:-1]) * detail) / np.sum(detail**2))
        assert np.abs(out[1:-1, 1:-1] - (x[1:-1, 1:-1] + (f - 1) * detail)).max() <= 1.5  # PIL's integer rounding
        factors.append(f)
    assert 0.74 <= min(factors) < 0.85 and 1.15 < max(factors) <= 1.26  # blurs and sharpens


def test_pil_ops_equal_pil_at_fixed_magnitudes():
    img = _speckle()
    pil = Image.fromarray(img)
    cases = [
        ({"PilEqualize": {"p": 1.0}}, ImageOps.equalize(pil)),
        ({"PilGaussianBlur": {"sigma_limit": [0.8, 0.8], "p": 1.0}}, pil.filter(ImageFilter.GaussianBlur(0.8))),
        ({"PilSharpness": {"factor_limit": [0.8, 0.8], "p": 1.0}}, ImageEnhance.Sharpness(pil).enhance(0.8)),
    ]
    for spec, expected in cases:
        (t,) = build_augmentations(spec)
        assert np.array_equal(_apply(t, 0, image=img)["image"], np.asarray(expected))
    # PIL's output feeds in-place albumentations ops (a read-only array from PIL made Posterize fail)
    chain = build_transform(40, [{"PilEqualize": {"p": 1.0}}, {"Posterize": {"num_bits": 4, "p": 1.0}}], seed=0)
    out = chain(image=cv2.resize(img, (40, 40), interpolation=cv2.INTER_AREA))["image"]
    assert out.shape == (40, 40) and not (out & 0x0F).any()
    with pytest.raises(ValueError, match=r"sigma_limit must be \[low, high\].*got \[2, 1\]"):
        build_augmentations({"PilGaussianBlur": {"sigma_limit": [2, 1]}})


def test_flips_move_a_marked_pixel_with_the_mask(reference):
    img = np.zeros((40, 56), np.uint8)
    mask = np.zeros((40, 56), np.uint8)
    img[3, 5] = 255
    mask[3, 5] = 1
    for name, where in (("HorizontalFlip", (3, 50)), ("VerticalFlip", (36, 5))):
        (t,) = reference["ops"][name]
        out = _apply(t, 0, image=img, mask=mask)
        assert np.argwhere(out["image"] == 255).tolist() == [list(where)]
        assert np.argwhere(out["mask"] == 1).tolist() == [list(where)]


def test_resized_crop_scale_and_mask_follow_the_image(reference):
    (t,) = reference["ops"]["RandomResizedCrop"]
    size = 48
    ids = np.arange(size * size, dtype=np.int32).reshape(size, size)  # every pixel's own label
    rect = np.zeros((size, size), np.uint8)
    rect[10:30, 14:40] = 1
    scales = []
    for seed in range(40):
        out = _apply(t, seed, image=rect * 255, mask=ids)
        assert out["image"].shape == (size, size) and out["mask"].shape == (size, size)
        rows, cols = np.divmod(out["mask"], size)  # nearest interpolation keeps labels: the crop box is visible
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert h == w  # ratio 1
        scales.append(h * w / size**2)
        follows = _apply(t, seed, image=rect * 255, mask=rect)
        m = follows["mask"]
        band = cv2.dilate(m, np.ones((3, 3), np.uint8)) != cv2.erode(m, np.ones((3, 3), np.uint8))
        disagree = (follows["image"] > 127) != (m == 1)
        assert not (disagree & ~band).any()  # image (linear) and mask (nearest) cut alike: only edge pixels differ
    assert 0.8 - 0.05 <= min(scales) < 0.85 and 0.95 < max(scales) <= 1.0


# ----------------------------------------------------------------- random choices
def test_strong_then_weak_with_probability_half_and_independent_counts(monkeypatch):
    """The authors: with p 0.5 strong then weak (k_s ~ U{0..9}, k_w ~ U{0..4}, ops drawn with replacement)."""
    pipe = build_transform(16, _reference_spec(), seed=0)
    strong, weak = pipe.transforms[1].transforms
    orders = {id(t): ("strong", t.n) for t in strong.transforms} | {id(t): ("weak", t.n) for t in weak.transforms}
    calls: list[tuple[str, int, list[int]]] = []
    original = A.RandomOrder._get_idx

    def record(self: A.RandomOrder) -> np.ndarray:
        idx = original(self)
        calls.append((*orders[id(self)], idx.tolist()))
        return idx

    monkeypatch.setattr(A.RandomOrder, "_get_idx", record)
    img, mask = _speckle(16, 16), _mask(16, 16)
    runs = []
    for seed in range(160):
        calls.clear()
        pipe.set_random_seed(seed)
        pipe(image=img, mask=mask)
        assert [c[0] for c in calls] in ([], ["strong", "weak"])  # both in that order, or neither
        runs.append(list(calls))
    applied = [r for r in runs if r]
    assert 0.38 < len(applied) / len(runs) < 0.62
    k_strong = Counter(r[0][1] for r in applied)
    k_weak = Counter(r[1][1] for r in applied)
    assert set(k_strong) == set(range(10)) and set(k_weak) == set(range(5))
    # independent draws: albumentations' own seeding made k_weak == k_strong // 2 every time
    assert sum(r[1][1] == r[0][1] // 2 for r in applied) < 0.5 * len(applied)
    picks = [r[0][2] for r in applied if r[0][1] >= 3]
    assert set(i for p in picks for i in p) == set(range(9))  # every strong op is drawn
    assert any(len(set(p)) < len(p) for p in picks)  # with replacement
    assert any(p != sorted(p) for p in picks)  # in the drawn order, not the list's


def test_seeded_compose_draws_independently_and_reproducibly():
    spec = [{"HorizontalFlip": {"p": 0.5}}, {"VerticalFlip": {"p": 0.5}}]
    pipe, again = build_transform(8, spec, seed=0), build_transform(8, spec, seed=0)
    img = np.zeros((8, 8), np.uint8)
    img[0, 0] = 255
    flips = []
    for seed in range(200):
        pipe.set_random_seed(seed)
        again.set_random_seed(seed)
        out = pipe(image=img)["image"]
        assert np.array_equal(out, again(image=img)["image"])
        flips.append((bool(out[:, -1].any()), bool(out[-1].any())))
    both = np.array(flips)
    assert 0.35 < both[:, 0].mean() < 0.65 and 0.35 < both[:, 1].mean() < 0.65
    assert 0.35 < (both[:, 0] == both[:, 1]).mean() < 0.65  # lockstep (the albumentations default) gives 1.0


# ----------------------------------------------------------------- spec errors
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"OneOf": {"transforms": [{"Flipp": {"p": 1.0}}]}}, r"augmentations\.OneOf\.transforms: 'Flipp' is not"),
        ({"OneOf": {"p": 1.0}}, r"augmentations\.OneOf: a container needs its children under 'transforms'"),
        ({"Compose": {"transforms": []}}, r"'Compose' is not .*nest pipelines with Sequential"),
        ([{"HorizontalFlip": {"p": 0.5}}, "VerticalFlip"], r"augmentations\[1\]: expected a mapping"),
        ({"Sequential": {"transforms": [{"HorizontalFlip": {"q": 1}}]}}, r"Sequential\.transforms\.HorizontalFlip"),
    ],
)
def test_bad_specs_name_the_place(spec, message):
    with pytest.raises(ValueError, match=message):
        build_augmentations(spec, image_size=32)


def test_crop_size_is_filled_from_image_size_unless_given():
    (auto,) = build_augmentations({"RandomResizedCrop": {"scale": [0.8, 1.0]}}, image_size=40)
    (given,) = build_augmentations({"RandomResizedCrop": {"size": [24, 24]}}, image_size=40)
    assert tuple(auto.size) == (40, 40) and tuple(given.size) == (24, 24)


# ----------------------------------------------------------------- through the real CLI
def test_reference_overlay_composes_and_trains_through_the_cli(tmp_path: Path):
    args = ["fit", "--config", str(TINY_CONF), "--config", str(REFERENCE)]
    args += [f"--data.init_args.root={tmp_path / 'data'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=1"]
    cli = main(args)
    assert cli.model.hparams["normalization"] == "none"
    assert cli.model.encoder_args["adapter"] == "lora"  # the overlay leaves the rest of the first config alone
    transform = cli.datamodule.train_dataloader().dataset.dataset.transform
    assert [type(t).__name__ for t in transform.transforms] == ["Resize", "Sequential"]
    assert cli.trainer.state.finished and cli.trainer.global_step == 1


@pytest.mark.parametrize("base", ["busi_seg", "busi_cls"])
@pytest.mark.parametrize("overlays", [["reference"], ["reference", "default"], ["reference", "none"]])
def test_augment_overlays_compose_after_paper_configs(base: str, overlays: list[str], tmp_path: Path):
    configs = [REPO / "configs" / f"{base}.yaml"] + [REPO / "configs" / "augment" / f"{o}.yaml" for o in overlays]
    args = [a for c in configs for a in ("--config", str(c))]
    args += ["--model.init_args.model_name=usclip-test-vit", "--model.init_args.layers=[1,2,3]"]
    args += ["--model.init_args.pretrained=null", "--data.init_args.image_size=64"]
    args += [f"--data.init_args.root={tmp_path}", f"--trainer.default_root_dir={tmp_path}"]
    cli = main(args, run=False)
    last = overlays[-1]
    assert cli.model.hparams["normalization"] == ("clip" if last == "default" else "none")
    assert cli.model.encoder_args["adapter"] == "mona"  # the paper config's adapter is kept
    spec = cli.datamodule.augmentations
    first = {"reference": "Sequential", "default": "HorizontalFlip", "none": None}[last]
    assert (next(iter(spec[0])) if spec else None) == first  # a later overlay replaces the list, never merges
