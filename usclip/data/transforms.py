"""albumentations pipelines for training and evaluation.

Augmentations are configs as data. A spec is a mapping from albumentations class name to its keyword arguments,
``{"HorizontalFlip": {"p": 0.5}, "RandomBrightnessContrast": {"p": 0.5}}``, or a list of such one-entry mappings
(the same transform may then appear twice). Containers (``OneOf``, ``SomeOf``, ``RandomOrder``, ``Sequential``,
``OneOrOther``) take their children as a nested spec under ``transforms:``, so random choices between whole
pipelines are data too (``configs/augment/reference.yaml`` reproduces the authors' strong/weak augmentation).
A crop transform whose ``size`` is left out gets ``(image_size, image_size)``. Besides albumentations' classes, a
spec may name usclip's PIL-exact operations (``PilEqualize``, ``PilGaussianBlur``, ``PilSharpness``, see
``usclip.data.pil_ops``).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2

from usclip.data.pil_ops import PIL_TRANSFORMS

#: One augmentation spec as YAML data: ``{class name: kwargs}`` or ``[{class name: kwargs}, ...]``.
AugmentationSpec = dict[str, Any] | list[dict[str, Any]]

#: Default train-time augmentations, chosen for B-mode images: mild geometry (no vertical flip: depth has a
#: direction), gain/contrast changes, and speckle-like multiplicative noise.
DEFAULT_AUGMENTATIONS: dict[str, dict[str, Any]] = {
    "HorizontalFlip": {"p": 0.5},
    "Affine": {"scale": (0.9, 1.1), "translate_percent": (-0.05, 0.05), "rotate": (-10, 10), "p": 0.5},
    "RandomBrightnessContrast": {"brightness_limit": 0.15, "contrast_limit": 0.15, "p": 0.5},
    "MultiplicativeNoise": {"multiplier": (0.9, 1.1), "per_channel": False, "elementwise": True, "p": 0.3},
}

#: Top-level pipelines own seeding and target handling; nested pipelines use ``Sequential`` instead.
_NOT_NESTABLE = ("Compose", "ReplayCompose")


class SeededCompose(A.Compose):
    """``A.Compose`` whose transforms draw from one shared random stream.

    albumentations 2.0 seeds every nested transform with the *same* seed (``Compose.set_random_seed`` passes the
    seed down), so each transform owns an identical generator and they draw in lockstep: two ``p=0.5`` flips are
    applied together or not at all, and a ``OneOf`` over 10 branches and one over 5 pick correlated branches. Here
    the transforms share the pipeline's generators instead (``set_random_state``), so their draws are independent
    while one seed still fixes the whole pipeline.
    """

    def set_random_seed(self, seed: int | None) -> None:
        """Seed the pipeline and hand its generators (not copies of the seed) to every nested transform."""
        super().set_random_seed(seed)
        self.set_random_state(self.random_generator, self.py_random)


def _entries(spec: Any, where: str) -> list[tuple[str, Any]]:
    if isinstance(spec, Mapping):
        return list(spec.items())
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        entries: list[tuple[str, Any]] = []
        for i, item in enumerate(spec):
            if not isinstance(item, Mapping) or not item:
                raise ValueError(
                    f"{where}[{i}]: expected a mapping {{class name: kwargs}} such as "
                    f"{{'HorizontalFlip': {{'p': 0.5}}}}, got {item!r}"
                )
            entries += list(item.items())
        return entries
    raise ValueError(
        f"{where}: expected a mapping {{class name: kwargs}} or a list of them, got {type(spec).__name__} {spec!r}"
    )


def _needs_size(cls: type) -> bool:
    try:
        param = inspect.signature(cls).parameters.get("size")
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return param is not None and param.default is inspect.Parameter.empty


def build_augmentations(
    spec: AugmentationSpec | Mapping[str, Any] | None,
    image_size: int | tuple[int, int] | None = None,
    where: str = "augmentations",
) -> list[A.BasicTransform | A.BaseCompose]:
    """Instantiate albumentations transforms from YAML data, containers included.

    Args:
        spec: ``{class name: kwargs}`` or a list of one-entry mappings; a container's ``transforms`` is a nested
            spec. ``None`` or ``{}`` gives no transforms.
        image_size: fills ``size`` of crop transforms that require it and leave it out (``RandomResizedCrop``):
            a side length or ``(height, width)``.
        where: the spec's location, for error messages.

    Returns:
        The transforms in order.

    Raises:
        ValueError: if a name is not an albumentations transform or container, a container has no ``transforms``,
            or a transform's arguments are rejected (unknown arguments too: albumentations only warns about them).
    """
    transforms: list[A.BasicTransform | A.BaseCompose] = []
    for name, kwargs in _entries(spec or {}, where):
        here = f"{where}.{name}"
        cls = (PIL_TRANSFORMS.get(name) or getattr(A, name, None)) if isinstance(name, str) else None
        if name in _NOT_NESTABLE or not (isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose))):
            hint = " (nest pipelines with Sequential)" if name in _NOT_NESTABLE else ""
            raise ValueError(
                f"{where}: {name!r} is not an albumentations transform or container{hint}; expected a class name "
                f"such as 'HorizontalFlip', 'OneOf' or 'Sequential', or one of usclip's {sorted(PIL_TRANSFORMS)}"
            )
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ValueError(f"{here}: expected a mapping of keyword arguments, got {kwargs!r}")
        args = dict(kwargs or {})
        if issubclass(cls, A.BaseCompose):
            if "transforms" not in args:
                raise ValueError(f"{here}: a container needs its children under 'transforms', got {sorted(args)}")
            args["transforms"] = build_augmentations(args["transforms"], image_size, f"{here}.transforms")
        elif "size" not in args and image_size is not None and _needs_size(cls):
            args["size"] = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        try:
            with warnings.catch_warnings():
                # albumentations only warns about unknown arguments; a typo in YAML must not pass silently
                warnings.simplefilter("error")
                transforms.append(cls(**args))
        except (TypeError, ValueError, UserWarning) as err:
            raise ValueError(f"{here}({dict(kwargs or {})}) was rejected: {err}") from err
    return transforms


#: how :func:`build_resize` interpolates images and masks (part of the keys of cached resized images)
RESIZE_INTERPOLATION = ("area", "nearest")


def build_resize(image_size: int | tuple[int, int]) -> A.Resize:
    """The resize step of every pipeline: area interpolation for images, nearest for masks.

    :func:`build_transform` starts with it, and ``usclip.data.datasets.FolderDataset`` applies the same step
    before caching resized crops (the pipeline's own resize then leaves them as they are).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return A.Resize(height, width, interpolation=cv2.INTER_AREA, mask_interpolation=cv2.INTER_NEAREST)


def build_transform(
    image_size: int | tuple[int, int],
    augmentations: AugmentationSpec | Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> A.Compose:
    """Resize to ``image_size`` (area interpolation for images, nearest for masks), then augment.

    Args:
        image_size: output side length, or ``(height, width)`` (``usclip.data.Preprocessing.image_size``).
        augmentations: a spec for :func:`build_augmentations`; ``None`` for evaluation.
        seed: albumentations ignores global seeds, so reproducible runs pass one here.

    Returns:
        A :class:`SeededCompose` (one random stream shared by all transforms).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    steps: list[A.BasicTransform | A.BaseCompose] = [build_resize((height, width))]
    steps += build_augmentations(augmentations, (height, width))
    return SeededCompose(steps, seed=seed)
