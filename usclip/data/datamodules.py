"""LightningDataModules: a base over the generic folder layout, one per task, and the synthetic option.

Splits: predefined ``train.txt``/``val.txt``/``test.txt`` in ``root`` are used when present (a predefined
``test.txt`` alone is kept and the rest is split into train/val); otherwise a seeded group-aware, label-stratified
split is made. The split is written to ``<run dir>/splits`` and stored in every checkpoint (``state_dict``), so
``usclip test``/``predict`` with that checkpoint evaluate exactly the held-out ids.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from usclip.data.datasets import FolderDataset, encode_labels, list_images, read_csv_column
from usclip.data.splits import SPLITS, read_split_file, split_ids, write_splits
from usclip.data.transforms import DEFAULT_AUGMENTATIONS, build_transform

log = logging.getLogger(__name__)


@dataclass
class SyntheticSpec:
    """Generate a synthetic ultrasound dataset into ``root`` before use (see ``usclip.data.synthetic``).

    Args:
        num_samples: number of images.
        size: side length of the generated images in pixels.
        seed: generator seed (the dataset is a pure function of these fields).
        malignant_fraction: share of malignant lesions.
    """

    num_samples: int = 200
    size: int = 256
    seed: int = 0
    malignant_fraction: float = 0.5


class BaseDataModule(L.LightningDataModule):
    """Ultrasound images in the generic folder layout (``images/``, ``masks/``, ``labels.csv``, ``groups.csv``).

    Args:
        root: dataset folder. May be ``None`` for a test-only run on ``test_root``.
        image_size: side length images are resized to (224 in the paper).
        batch_size: samples per batch (32 in the paper).
        num_workers: DataLoader worker processes.
        split_fractions: train, val and test fractions when no split files exist (8:1:1 in the paper).
        split_seed: seed of the split (independent of the training seed).
        train_fraction: use only this seeded share of the training split (few-shot runs); 1.0 uses all.
        augmentations: train-time albumentations as ``{class name: kwargs}``; ``{}`` switches them off.
        label_names: class names in index order; inferred from ``labels.csv`` when ``None``.
        test_root: an external test set (same layout) used for ``test`` instead of the held-out split.
        predict_root: a folder of images (``images/`` or the images themselves) for ``predict``.
        synthetic: generate a synthetic dataset into ``root`` first (demo and tests).
        seed: seed of the augmentation pipeline.
    """

    #: whether samples must carry masks / labels; set by the task-specific subclasses.
    requires_masks: bool = False
    requires_labels: bool = False

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        split_seed: int = 0,
        train_fraction: float = 1.0,
        augmentations: dict[str, dict[str, Any]] | None = None,
        label_names: list[str] | None = None,
        test_root: str | None = None,
        predict_root: str | None = None,
        synthetic: SyntheticSpec | None = None,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        if root is None and synthetic is not None:
            raise ValueError("synthetic data needs a root folder to be written to; set data.root")
        self.save_hyperparameters(ignore=["synthetic"])
        self.root = Path(root) if root is not None else None
        self.test_root = Path(test_root) if test_root is not None else None
        self.predict_root = Path(predict_root) if predict_root is not None else None
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augmentations = DEFAULT_AUGMENTATIONS if augmentations is None else augmentations
        self.synthetic = synthetic
        self.seed = seed
        self.label_names = label_names
        self.splits: dict[str, list[str]] = {}
        self._labels: dict[str, int] | None = None

    # ----------------------------------------------------------------- preparation
    def prepare_data(self) -> None:
        """Write the synthetic dataset when asked for (idempotent: an identical dataset is reused)."""
        if self.synthetic is not None and self.root is not None:
            from usclip.data.synthetic import write_synthetic_dataset

            write_synthetic_dataset(self.root, **asdict(self.synthetic))

    def _read_labels(self, root: Path) -> dict[str, int] | None:
        path = root / "labels.csv"
        if not path.is_file():
            if self.requires_labels:
                raise FileNotFoundError(f"{path} is required for classification (header: id,label)")
            return None
        labels, names = encode_labels(read_csv_column(path, "label"), self.label_names)
        if self.label_names is None:
            self.label_names = names
        return labels

    @property
    def num_classes(self) -> int:
        """Number of classes: 2 (background, lesion) for segmentation; label classes for classification."""
        return 2 if not self.requires_labels else len(self.label_names or ("0", "1"))

    def _make_splits(self) -> dict[str, list[str]]:
        assert self.root is not None
        ids = sorted(list_images(self.root / "images"))
        predefined = {s: self.root / f"{s}.txt" for s in SPLITS if (self.root / f"{s}.txt").is_file()}
        if len(predefined) == 3:
            return {s: read_split_file(p) for s, p in predefined.items()}
        groups_path = self.root / "groups.csv"
        groups = read_csv_column(groups_path, "group") if groups_path.is_file() else None
        fractions = list(self.hparams["split_fractions"])
        held: list[str] = []
        if "test" in predefined:  # predefined test set; the rest split train:val in the remaining proportion
            held = read_split_file(predefined["test"])
            unknown = sorted(set(held) - set(ids))
            if unknown:
                raise ValueError(f"{predefined['test']} names ids without an image: {unknown[:5]}")
            ids = [i for i in ids if i not in set(held)]
            fractions[2] = 0.0
        splits = split_ids(ids, fractions, seed=self.hparams["split_seed"], groups=groups, labels=self._labels)
        if held:
            splits["test"] = sorted(held)
        return splits

    def setup(self, stage: str) -> None:
        """Read labels and fix the split (unless a checkpoint already carried one)."""
        if self.root is not None:
            self._labels = self._read_labels(self.root)
            if not self.splits:
                self.splits = self._make_splits()
                self._subsample_train()
            self._write_split_files()
        elif stage in ("fit", "validate"):
            raise ValueError(f"data.root is required for {stage!r}; only test/predict can run on test_root alone")

    def _subsample_train(self) -> None:
        frac = self.hparams["train_fraction"]
        if frac < 1.0:
            train = self.splits["train"]
            rng = np.random.default_rng(self.hparams["split_seed"])
            keep = max(1, round(frac * len(train)))
            self.splits["train"] = sorted(rng.choice(train, size=keep, replace=False).tolist())
            log.info("train_fraction=%s: using %d of %d training images", frac, keep, len(train))

    def _write_split_files(self) -> None:
        trainer = getattr(self, "trainer", None)
        log_dir = trainer.log_dir if trainer is not None else None
        if trainer is not None and log_dir is not None and trainer.is_global_zero:
            write_splits(self.splits, Path(log_dir) / "splits")

    # ----------------------------------------------------------------- checkpointed state
    def state_dict(self) -> dict[str, Any]:
        """The split travels inside every checkpoint."""
        return {"splits": self.splits, "label_names": self.label_names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the split of the run that wrote the checkpoint."""
        self.splits = {k: list(v) for k, v in state_dict.get("splits", {}).items()}
        self.label_names = state_dict.get("label_names", self.label_names)
        self._write_split_files()

    # ----------------------------------------------------------------- datasets and loaders
    def _dataset(self, split: str) -> Dataset:
        train = split == "train"
        transform = build_transform(self.image_size, self.augmentations if train else None, seed=self.seed)
        if split == "test" and self.test_root is not None:
            labels = self._read_labels(self.test_root)
            ids = sorted(list_images(self.test_root / "images"))
            return FolderDataset(self.test_root, ids, labels, transform, with_masks=self.requires_masks)
        if split == "predict":
            if self.predict_root is None:
                raise ValueError("predict needs data.predict_root: a folder of images (or with an images/ folder)")
            image_dir = "images" if (self.predict_root / "images").is_dir() else "."  # or a bare folder of images
            ids = sorted(list_images(self.predict_root / image_dir))
            return FolderDataset(self.predict_root, ids, None, transform, with_masks=False, image_dir=image_dir)
        if self.root is None:
            raise ValueError(f"data.root is required for the {split!r} split")
        ids = self.splits.get(split) or []
        if not ids:
            raise ValueError(f"the {split!r} split of {self.root} is empty; check split_fractions or the split files")
        return FolderDataset(self.root, ids, self._labels, transform, with_masks=self.requires_masks)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(self.splits.get(split, [])) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("predict")


class SegmentationDataModule(BaseDataModule):
    """Images with lesion masks (labels are loaded too when ``labels.csv`` exists, for stratified splits)."""

    requires_masks = True


class ClassificationDataModule(BaseDataModule):
    """Images with benign/malignant (or other) labels from ``labels.csv``."""

    requires_labels = True
