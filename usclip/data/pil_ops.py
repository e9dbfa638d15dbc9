"""PIL's equalize, Gaussian blur and sharpness as albumentations transforms, for the authors' augmentation.

``configs/augment/reference.yaml`` reproduces the authors' strong augmentation (jinggqu/NextGen-UIA,
``dataset_seg.py``, written with PIL) with albumentations where albumentations gives PIL's result (posterize,
solarize, brightness exactly; contrast and autocontrast within 1-2 grey levels). For three operations it does not:

- ``Equalize``: albumentations' ``mode="pil"`` counts each grey level's own pixels into its lookup value (PIL
  counts only the levels below it), and ``mode="cv"`` is OpenCV's formula; on BUSI both differ from
  ``ImageOps.equalize`` by up to 115 grey levels (mean 4-5, ``bench/augment_vs_pil.py``).
- ``GaussianBlur``: PIL approximates the Gaussian with box blurs and extends edges; on BUSI up to 34 grey levels
  apart at the border and 9 inside.
- ``Sharpen``: cannot blur (its ``alpha`` must be >= 0), while PIL's sharpness factor 0.75-1 blurs.

These transforms call PIL itself on the uint8 image, so they equal the authors' operations by construction. They
act on the image only (masks and labels untouched) and draw their magnitude from the pipeline's random stream.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

__all__ = ["PIL_TRANSFORMS", "PilEqualize", "PilGaussianBlur", "PilSharpness"]


def _check_range(name: str, value: tuple[float, float] | list[float], low: float) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not low <= lo <= hi:
        raise ValueError(f"{name} must be [low, high] with {low} <= low <= high, got {list(value)}")
    return lo, hi


def _with_pil(img: np.ndarray, op: Any) -> np.ndarray:
    if img.dtype != np.uint8:
        raise ValueError(f"PIL operations need uint8 images, got {img.dtype}")
    grey = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img  # (H, W, 1) -> (H, W)
    if grey.ndim != 2:
        raise ValueError(f"PIL operations here take single-channel (grey) images, got shape {img.shape}")
    out = np.array(op(Image.fromarray(grey)), dtype=np.uint8)  # a writable copy: later ops may work in place
    return out.reshape(img.shape)


class PilEqualize(A.ImageOnlyTransform):
    """``PIL.ImageOps.equalize``: histogram equalisation exactly as PIL computes it.

    Args:
        p: probability of applying the transform.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:  # noqa: D102
        return _with_pil(img, ImageOps.equalize)

    def get_transform_init_args_names(self) -> tuple[str, ...]:  # noqa: D102
        return ()


class PilGaussianBlur(A.ImageOnlyTransform):
    """``PIL.ImageFilter.GaussianBlur(radius=sigma)`` with ``sigma`` drawn uniformly from ``sigma_limit``.

    Args:
        sigma_limit: range of the standard deviation in pixels (the authors: 0.75-1.25).
        p: probability of applying the transform.
    """

    def __init__(self, sigma_limit: tuple[float, float] = (0.75, 1.25), p: float = 0.5) -> None:
        super().__init__(p=p)
        self.sigma_limit = _check_range("PilGaussianBlur.sigma_limit", sigma_limit, 0.0)

    def get_params(self) -> dict[str, float]:  # noqa: D102
        return {"sigma": self.py_random.uniform(*self.sigma_limit)}

    def apply(self, img: np.ndarray, sigma: float = 1.0, **params: Any) -> np.ndarray:  # noqa: D102
        return _with_pil(img, lambda im: im.filter(ImageFilter.GaussianBlur(radius=sigma)))

    def get_transform_init_args_names(self) -> tuple[str, ...]:  # noqa: D102
        return ("sigma_limit",)


class PilSharpness(A.ImageOnlyTransform):
    """``PIL.ImageEnhance.Sharpness(img).enhance(factor)``, ``factor`` uniform in ``factor_limit``.

    A factor below 1 blends towards PIL's 3x3 smoothing (blurs), above 1 away from it (sharpens); the one-pixel
    border is left as it is, as in PIL.

    Args:
        factor_limit: range of the factor (the authors: 0.75-1.25).
        p: probability of applying the transform.
    """

    def __init__(self, factor_limit: tuple[float, float] = (0.75, 1.25), p: float = 0.5) -> None:
        super().__init__(p=p)
        self.factor_limit = _check_range("PilSharpness.factor_limit", factor_limit, 0.0)

    def get_params(self) -> dict[str, float]:  # noqa: D102
        return {"factor": self.py_random.uniform(*self.factor_limit)}

    def apply(self, img: np.ndarray, factor: float = 1.0, **params: Any) -> np.ndarray:  # noqa: D102
        return _with_pil(img, lambda im: ImageEnhance.Sharpness(im).enhance(factor))

    def get_transform_init_args_names(self) -> tuple[str, ...]:  # noqa: D102
        return ("factor_limit",)


#: usclip's own transforms that augmentation specs may name next to albumentations' classes.
PIL_TRANSFORMS: dict[str, type[A.ImageOnlyTransform]] = {
    "PilEqualize": PilEqualize,
    "PilGaussianBlur": PilGaussianBlur,
    "PilSharpness": PilSharpness,
}
