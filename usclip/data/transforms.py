"""albumentations pipelines for training and evaluation.

Augmentations are configs as data: a mapping from albumentations class name to its keyword arguments, e.g.
``{"HorizontalFlip": {"p": 0.5}, "RandomBrightnessContrast": {"p": 0.5}}`` in YAML.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import albumentations as A
import cv2

#: Default train-time augmentations, chosen for B-mode images: mild geometry (no vertical flip: depth has a
#: direction), gain/contrast changes, and speckle-like multiplicative noise.
DEFAULT_AUGMENTATIONS: dict[str, dict[str, Any]] = {
    "HorizontalFlip": {"p": 0.5},
    "Affine": {"scale": (0.9, 1.1), "translate_percent": (-0.05, 0.05), "rotate": (-10, 10), "p": 0.5},
    "RandomBrightnessContrast": {"brightness_limit": 0.15, "contrast_limit": 0.15, "p": 0.5},
    "MultiplicativeNoise": {"multiplier": (0.9, 1.1), "per_channel": False, "elementwise": True, "p": 0.3},
}


def build_augmentations(spec: Mapping[str, Mapping[str, Any]] | None) -> list[A.BasicTransform]:
    """Instantiate albumentations transforms from ``{class name: kwargs}``.

    Raises:
        ValueError: if a name is not an albumentations transform or its arguments are rejected.
    """
    transforms = []
    for name, kwargs in (spec or {}).items():
        cls = getattr(A, name, None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, A.BasicTransform):
            raise ValueError(f"augmentations: {name!r} is not an albumentations transform (e.g. 'HorizontalFlip')")
        try:
            with warnings.catch_warnings():
                # albumentations only warns about unknown arguments; a typo in YAML must not pass silently
                warnings.simplefilter("error")
                transforms.append(cls(**dict(kwargs or {})))
        except (TypeError, ValueError, UserWarning) as err:
            raise ValueError(f"augmentations: {name}({dict(kwargs or {})}) was rejected: {err}") from err
    return transforms


def build_transform(
    image_size: int, augmentations: Mapping[str, Mapping[str, Any]] | None = None, seed: int | None = None
) -> A.Compose:
    """Resize to ``image_size`` (area interpolation for images, nearest for masks), then augment.

    Args:
        image_size: output side length.
        augmentations: ``{class name: kwargs}``; ``None`` for evaluation.
        seed: albumentations ignores global seeds, so reproducible runs pass one here.
    """
    steps: list[A.BasicTransform] = [
        A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA, mask_interpolation=cv2.INTER_NEAREST)
    ]
    steps += build_augmentations(augmentations)
    return A.Compose(steps, seed=seed)
