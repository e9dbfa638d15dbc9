"""How close ``configs/augment/reference.yaml`` comes to the authors' PIL operations, op by op.

Each strong (intensity) operation of the authors' code (jinggqu/NextGen-UIA, ``dataset_seg.py``) is run with
PIL at fixed magnitudes and compared with the albumentations transform of the reference YAML at the same
magnitude, on BUSI images (224 px, the resize of the pipeline) or, without the data, synthetic scans. Prints a
Markdown table: largest and mean absolute difference in grey levels, over all pixels and without a 3-pixel border.

    python bench/augment_vs_pil.py                       # 20 BUSI images from ../shared/data/BUSI
    python bench/augment_vs_pil.py --root /data/BUSI --n 50
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from usclip.data.imageio import read_image
from usclip.data.pil_ops import PilEqualize, PilGaussianBlur, PilSharpness
from usclip.data.synthetic import generate_sample


def _cases() -> list[tuple[str, Callable[[Image.Image], Image.Image], A.BasicTransform]]:
    def jitter(**kw: tuple[float, float]) -> A.BasicTransform:
        args = {"brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "saturation": (1.0, 1.0), "hue": (0.0, 0.0)}
        return A.ColorJitter(**(args | kw), p=1.0)

    cases: list[tuple[str, Callable[[Image.Image], Image.Image], A.BasicTransform]] = [
        ("autocontrast (method pil, used)", ImageOps.autocontrast, A.AutoContrast(method="pil", p=1.0)),
        ("equalize (mode cv)", ImageOps.equalize, A.Equalize(mode="cv", p=1.0)),
        ("equalize (mode pil)", ImageOps.equalize, A.Equalize(mode="pil", p=1.0)),
        ("equalize (PilEqualize, used)", ImageOps.equalize, PilEqualize(p=1.0)),
    ]
    for s in (0.75, 1.0, 1.25):
        blur = A.GaussianBlur(blur_limit=0, sigma_limit=(s, s), p=1.0)
        cases.append((f"blur sigma {s}", lambda im, s=s: im.filter(ImageFilter.GaussianBlur(radius=s)), blur))
    pil_blur = PilGaussianBlur(sigma_limit=(0.75, 0.75), p=1.0)
    cases.append(
        ("blur sigma 0.75 (PilGaussianBlur, used)", lambda im: im.filter(ImageFilter.GaussianBlur(0.75)), pil_blur)
    )
    for v in (0.75, 1.25):
        cases.append(
            (
                f"contrast {v} (ColorJitter, used)",
                lambda im, v=v: ImageEnhance.Contrast(im).enhance(v),
                jitter(contrast=(v, v)),
            )
        )
        cases.append(
            (
                f"brightness {v} (ColorJitter, used)",
                lambda im, v=v: ImageEnhance.Brightness(im).enhance(v),
                jitter(brightness=(v, v)),
            )
        )
    for v in (1.1, 1.25):  # PIL's x + (v-1)(x - smooth(x)) is Sharpen's kernel at alpha = (v-1)/13, lightness 1
        a = (v - 1) / 13
        sharpen = A.Sharpen(alpha=(a, a), lightness=(1.0, 1.0), p=1.0)
        cases.append((f"sharpness {v} (Sharpen)", lambda im, v=v: ImageEnhance.Sharpness(im).enhance(v), sharpen))
    for v in (0.75, 1.25):
        pil_sharp = PilSharpness(factor_limit=(v, v), p=1.0)
        cases.append(
            (f"sharpness {v} (PilSharpness, used)", lambda im, v=v: ImageEnhance.Sharpness(im).enhance(v), pil_sharp)
        )
    for b in (4, 7):
        cases.append(
            (f"posterize {b} bits (used)", lambda im, b=b: ImageOps.posterize(im, b), A.Posterize(num_bits=b, p=1))
        )
    for t in (1, 128, 255):
        solarize = A.Solarize(threshold_range=(t / 255, t / 255), p=1.0)
        cases.append((f"solarize {t} (used)", lambda im, t=t: ImageOps.solarize(im, t), solarize))
    return cases


def _images(root: Path, n: int, size: int) -> list[np.ndarray]:
    files = sorted((root / "images").glob("*.png")) if (root / "images").is_dir() else []
    if files:
        picked = files[:: max(1, len(files) // n)][:n]
        return [cv2.resize(read_image(f), (size, size), interpolation=cv2.INTER_AREA) for f in picked]
    return [generate_sample(seed, seed % 2, size).image for seed in range(n)]


def main() -> None:
    """Print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).parents[2] / "shared" / "data" / "BUSI")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    images = _images(args.root, args.n, args.size)
    print(f"{len(images)} images of {args.size} px ({args.root if (args.root / 'images').is_dir() else 'synthetic'})")
    print("| operation | max abs diff | mean abs diff | max, border excluded | mean, border excluded |")
    print("|---|---|---|---|---|")
    warnings.simplefilter("ignore")
    for name, pil_op, transform in _cases():
        errors = []
        for img in images:
            ref = np.asarray(pil_op(Image.fromarray(img.copy())), dtype=np.int16)
            ours = A.Compose([transform], seed=0)(image=img.copy())["image"].astype(np.int16)
            errors.append(np.abs(ref - ours))
        full = np.stack(errors)
        inner = full[:, 3:-3, 3:-3]
        print(f"| {name} | {full.max()} | {full.mean():.3f} | {inner.max()} | {inner.mean():.3f} |")


if __name__ == "__main__":
    main()
