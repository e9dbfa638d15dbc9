"""LightningDataModules: a base over the generic folder layout, one per task, and the synthetic option.

Splits: predefined ``train.txt``/``val.txt``/``test.txt`` in ``root`` are used when present (a predefined
``test.txt`` alone is kept and the rest is split 8:2 into train/val, as the paper does for TN3K and micro-US);
otherwise a seeded group-aware, label-stratified 8:1:1 split is made. The split is written to ``<run dir>/splits``
and stored in every checkpoint (``state_dict``), so ``usclip test``/``predict`` with that checkpoint evaluate
exactly the held-out ids.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader, Dataset

from usclip._io import write_text_atomic
from usclip.data.bad_samples import (
    BAD_SAMPLES_KEY,
    ON_BAD_SAMPLE,
    BadSampleCounter,
    OnBadSample,
    TooManyBadSamplesError,
    collate_skipping_bad,
)
from usclip.data.cache import SampleCache
from usclip.data.coerce import as_dataclass
from usclip.data.colour import ColourMode, check_colour_mode
from usclip.data.crop import CROP_MODES, CropMode
from usclip.data.datasets import FolderDataset, encode_labels
from usclip.data.dicom import RegionsMode, check_regions_mode
from usclip.data.imageio import MAX_IMAGE_PIXELS, check_max_pixels
from usclip.data.layouts import (
    LAYOUTS,
    DatasetIndex,
    Layout,
    busi_groups_warning,
    expand_regions,
    index_dataset,
    index_predict_inputs,
    read_csv_column,
)
from usclip.data.preprocessing import Preprocessing
from usclip.data.samplers import build_sampler, derive_seed, training_position
from usclip.data.splits import (
    SPLITS,
    groups_across_splits,
    read_split_file,
    split_ids,
    subsample_ids,
    validate_split_files,
    write_splits,
)
from usclip.data.synthetic import check_synthetic_root
from usclip.data.transforms import DEFAULT_AUGMENTATIONS, AugmentationSpec, build_transform
from usclip.run_dirs import run_dir_of

log = logging.getLogger(__name__)

#: ``num_workers: auto`` starts this many DataLoader workers at most, fewer when fewer cores are available (the
#: shipped configs' value before ``auto``; every worker keeps its own image cache of ``cache_mb``)
AUTO_MAX_WORKERS = 4


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: what a cluster job or ``taskset`` grants it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def resolve_num_workers(requested: int | str, name: str = "data.num_workers") -> int:
    """The number of DataLoader worker processes to start for ``requested``, fitted to the machine.

    ``"auto"`` gives ``min(AUTO_MAX_WORKERS, cores)``; a number is kept, but capped at the available cores with a
    logged note (more workers than cores only compete for them, and PyTorch warns). ``0`` loads in the main
    process.

    Args:
        requested: ``"auto"`` or a number of workers (>= 0).
        name: the setting's name, for the messages.

    Raises:
        ValueError: naming ``name`` and the value when it is neither ``"auto"`` nor a number >= 0.
    """
    cores = available_cores()
    if requested == "auto":
        return min(AUTO_MAX_WORKERS, cores)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"{name} must be 'auto' or a number of worker processes >= 0, got {requested!r}")
    if requested > cores:
        log.info(
            "%s=%d is more than the %d CPU cores this process may use: starting %d DataLoader workers "
            "(%s: auto fits the number to the machine)",
            name,
            requested,
            cores,
            cores,
            name,
        )
        return cores
    return requested


def check_data_folder(path: str | os.PathLike[str], name: str, alternative: str = "") -> None:
    """Raise ``FileNotFoundError`` naming ``name`` and the path when ``path`` is not an existing folder.

    Called at construction, so that a mistyped path stops a run before the task is built, not after.
    """
    folder = Path(path)
    if folder.is_dir():
        return
    state = "is a file, not a folder" if folder.exists() else "does not exist"
    where = "" if folder.is_absolute() else f" (from {Path.cwd()})"
    raise FileNotFoundError(
        f"{name}={str(path)!r} {state}{where}: give the dataset folder (images/, masks/, labels.csv: see "
        f"docs/data.md){', ' + alternative if alternative else ''}"
    )


#: the loop that is running -> the split its batches come from
_SPLIT_OF_STAGE = {
    RunningStage.TRAINING: "train",
    RunningStage.SANITY_CHECKING: "val",
    RunningStage.VALIDATING: "val",
    RunningStage.TESTING: "test",
    RunningStage.PREDICTING: "predict",
}


@dataclass
class SyntheticSpec:
    """Generate a synthetic ultrasound dataset into ``root`` before use (see ``usclip.data.synthetic``).

    Args:
        num_samples: number of images.
        size: side length of the generated images in pixels.
        seed: generator seed (the dataset is a pure function of these fields).
        malignant_fraction: share of malignant lesions.
        overwrite: replace a synthetic dataset that ``root`` holds with other settings (YAML
            ``data.init_args.synthetic.overwrite: true``, or ``--data.synthetic.overwrite true``). Files not written
            by the generator are never replaced.
    """

    num_samples: int = 200
    size: int = 256
    seed: int = 0
    malignant_fraction: float = 0.5
    overwrite: bool = False


#: how a user switches ``SyntheticSpec.overwrite`` on, in the words of the config and of the command line
SYNTHETIC_OVERWRITE = "set data.synthetic.overwrite: true (on the command line: --data.synthetic.overwrite true)"


class BaseDataModule(L.LightningDataModule):
    """Ultrasound images in the generic folder layout or the original BUSI release (see docs/data.md).

    Images are read as grayscale, cropped to the scan area (``crop``), resized to ``image_size`` (area
    interpolation; masks nearest) and repeated to three channels; the task normalises them with the encoder's own
    mean and std.

    Args:
        root: dataset folder. May be ``None`` for a test-only run on ``test_root``.
        image_size: side length images are resized to (224 in the paper).
        batch_size: samples per batch (32 in the paper).
        num_workers: DataLoader worker processes. ``auto`` (the shipped configs' value) starts ``min(4, available
            cores)``; a number is kept but capped at the available cores (logged); ``0`` (the default) loads in the
            main process.
        split_fractions: train, val and test fractions when no split files exist (8:1:1 in the paper). With a
            predefined ``test.txt`` alone, the other images are split train : (val + test), i.e. 8:2.
        split_seed: seed of the split (independent of the training seed).
        train_fraction: use only this seeded, label-stratified share of the training split (few-shot runs:
            0.01 ... 0.5); 1.0 uses all. The validation and test splits are unchanged.
        augmentations: train-time albumentations as ``{class name: kwargs}`` or a list of such mappings;
            containers (``OneOf``, ``RandomOrder``, ``Sequential``, ...) nest a spec under ``transforms``
            (``configs/augment/reference.yaml``: the authors' strong/weak augmentation). ``{}`` switches them off;
            ``null`` uses the defaults (``configs/augment/default.yaml``).
        label_names: class names in index order; inferred from ``labels.csv`` when ``None``.
        test_root: an external test set (same layouts) used for ``test`` instead of the held-out split; it is
            never split or trained on.
        predict_root: what ``predict`` reads: a folder of images (``images/`` or the images themselves), one image
            file (PNG, JPEG, BMP, TIFF, DICOM) or a glob (``'scans/*.png'``, quoted so the shell leaves it); ``None``
            predicts the held-out test split (or ``test_root``). See docs/inference.md.
        synthetic: generate a synthetic dataset into ``root`` first (demo and tests).
        seed: seed of the augmentation pipeline.
        layout: ``folder`` (generic), ``busi`` (the original release: ``benign/``, ``malignant/``) or ``auto``.
        crop: ``auto`` crops each image to its detected scan area (DICOM: the file's ultrasound region),
            ``boxes`` to the boxes in ``boxes.csv`` (``id,x0,y0,x1,y1``), ``none`` keeps the whole image.
            Samples carry ``crop_box`` so that predictions map back to the original image.
        cache_mb: memory budget (MB) of each worker's cache of decoded, cropped and resized images (uint8 at
            ``image_size``, keyed by file, crop, colour and size); 0 switches it off.
        cache_dir: also cache decoded, cropped and resized images as ``.npz`` files here (shared by workers and
            runs).
        groups_csv: read the groups (``id,group``) from this file instead of ``<root>/groups.csv``: for a
            read-only dataset folder, write them elsewhere with ``usclip data duplicates ROOT --output PATH``.
            Nothing is ever written into ``root`` (split files go to ``<run dir>/splits``), except the synthetic
            dataset when ``synthetic`` asks for it.
        on_bad_sample: a file that cannot be read when its sample is loaded (truncated, replaced, deleted or
            unreadable after the run started, or refused by ``max_image_pixels``): ``raise`` stops the run with an
            error naming the file (checkpoints of earlier epochs stay as they were); ``skip`` leaves the sample out
            of its batch, logs the file once, counts it in ``<run dir>/results/bad_samples.json`` (and in
            ``test_metrics.json`` as ``skipped_samples``) and fails when more than ``max_bad_fraction`` of a split
            is bad. See docs/reliability.md.
        max_bad_fraction: largest share of a split's samples that ``on_bad_sample: skip`` may skip (0.01: one
            percent); more stops the run naming the share and the limit. Under DDP each process checks its shard.
        max_image_pixels: largest image read, in pixels (64 million, e.g. 8000 x 8000), checked from the file header
            before decoding, so a decompression bomb or a huge scan cannot exhaust memory (one read holds at most
            about 12 bytes per pixel, 3 for 8-bit grey: 770 MB at the default). ``null`` lifts the limit. DICOM
            files are checked from ``Rows x Columns`` in their header.
        colour: what happens to coloured pixels of colour files (colour or power Doppler, coloured calipers):
            ``keep`` their luminance (the default: the image as stored, as before the option existed), or
            ``replace`` them by the median of their grey neighbours (in a DICOM file, inside its 2-D regions).
            ``usclip data check`` reports the share of coloured pixels in each scan area. See docs/data.md.
        regions: DICOM files with several tissue regions (a dual view): ``largest`` (default) crops each file to
            its largest region and warns once per file naming the regions left out; ``all`` makes each region a
            sample of its own (ids ``<stem>@r0``, ``<stem>@r1`` ..., its own crop box and spacing; the file's mask,
            label and group; regions of one file always in one split; needs ``crop: auto``); ``error`` refuses
            such files before anything runs, naming them and their regions. See docs/data.md.
    """

    #: whether samples must carry masks / labels; set by the task-specific subclasses.
    requires_masks: bool = False
    requires_labels: bool = False

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int | Literal["auto"] = 0,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        split_seed: int = 0,
        train_fraction: float = 1.0,
        augmentations: AugmentationSpec | None = None,
        label_names: list[str] | None = None,
        test_root: str | None = None,
        predict_root: str | None = None,
        synthetic: SyntheticSpec | None = None,
        seed: int | None = 0,
        layout: Layout = "auto",
        crop: CropMode = "auto",
        cache_mb: float = 1024.0,
        cache_dir: str | None = None,
        groups_csv: str | None = None,
        on_bad_sample: OnBadSample = "raise",
        max_bad_fraction: float = 0.01,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        colour: ColourMode = "keep",
        regions: RegionsMode = "largest",
    ) -> None:
        super().__init__()
        check_regions_mode(regions, "data.regions")
        if regions == "all" and crop != "auto":
            raise ValueError(
                f"data.regions='all' crops each tissue region of a DICOM file to its own box, so it needs "
                f"data.crop='auto'; got crop={crop!r}"
            )
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"data.on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(
                f"data.max_bad_fraction must be a share in [0, 1] of a split's samples, got {max_bad_fraction}"
            )
        check_max_pixels(max_image_pixels, "data.max_image_pixels")
        check_colour_mode(colour, "data.colour")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        if crop not in CROP_MODES:
            raise ValueError(f"data.crop must be one of {CROP_MODES}, got {crop!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"data.layout must be one of {LAYOUTS}, got {layout!r}")
        if cache_mb < 0:
            raise ValueError(f"data.cache_mb must be >= 0 (0 switches the memory cache off), got {cache_mb}")
        if synthetic is not None:
            synthetic = as_dataclass(synthetic, SyntheticSpec, "data.synthetic")
        if root is None and synthetic is not None:
            raise ValueError("synthetic data needs a root folder to be written to; set data.root")
        # before the task is built (its weights may take minutes to load): the folders must be there
        if synthetic is not None:
            assert root is not None
            try:
                check_synthetic_root(root, **asdict(synthetic), how_to_overwrite=SYNTHETIC_OVERWRITE)
            except FileExistsError as err:
                raise FileExistsError(f"data.root={str(root)!r}: {err}") from None
        elif root is not None:
            check_data_folder(root, "data.root", "or set data.synthetic to generate a synthetic dataset there")
        if test_root is not None:
            check_data_folder(test_root, "data.test_root")
        self.save_hyperparameters(ignore=["synthetic"])
        self.root = Path(root) if root is not None else None
        self.groups_csv = Path(groups_csv) if groups_csv is not None else None
        self.test_root = Path(test_root) if test_root is not None else None
        self.predict_root = predict_root  # a folder, an image file or a glob (index_predict_inputs)
        self.image_size = image_size
        self.batch_size = batch_size
        #: the worker processes started, fitted to the machine (hparams keep the value asked for)
        self.num_workers = resolve_num_workers(num_workers)
        self.augmentations: AugmentationSpec = DEFAULT_AUGMENTATIONS if augmentations is None else augmentations
        build_transform(image_size, self.augmentations)  # a bad spec fails here, naming the transform, not in a worker
        self.synthetic = synthetic
        self.seed = seed
        self.label_names = label_names
        self.layout = layout
        self.crop: CropMode = crop
        self.cache = SampleCache(cache_mb, cache_dir) if cache_mb > 0 or cache_dir else None
        self.on_bad_sample: OnBadSample = on_bad_sample
        self.max_image_pixels = max_image_pixels
        self.colour: ColourMode = colour
        self.regions: RegionsMode = regions
        #: bad files skipped so far (``on_bad_sample: skip``), per split
        self.bad_samples = BadSampleCounter(max_bad_fraction)
        self._run_dir: Path | None = None
        self.splits: dict[str, list[str]] = {}
        self._labels: dict[str, int] | None = None
        self._index: DatasetIndex | None = None

    @property
    def preprocessing(self) -> Preprocessing:
        """What this DataModule does to an image before the network at predict time (crop, size, colour, regions).

        The task copies it when set up and stores it in its checkpoints (``usclip.tasks.BaseTask.preprocessing``).
        """
        return Preprocessing(
            image_size=(self.image_size, self.image_size),
            crop=self.crop,
            colour=self.colour,
            regions=self.regions,
            max_image_pixels=self.max_image_pixels,
        )

    # ----------------------------------------------------------------- preparation
    def prepare_data(self) -> None:
        """Write the synthetic dataset when asked for (idempotent: an identical dataset is reused)."""
        if self.synthetic is not None and self.root is not None:
            from usclip.data.synthetic import write_synthetic_dataset

            write_synthetic_dataset(self.root, **asdict(self.synthetic))

    def _encode_labels(self, index: DatasetIndex) -> dict[str, int] | None:
        source = index.root / "labels.csv" if index.layout == "folder" else index.root
        if not index.labels:
            if self.requires_labels:
                raise FileNotFoundError(f"{source} is required for classification (header: id,label)")
            return None
        labels, names = encode_labels(index.labels, self.label_names, source=source)
        if self.label_names is None:
            self.label_names = names
        return labels

    @property
    def num_classes(self) -> int:
        """Number of classes: 2 (background, lesion) for segmentation; label classes for classification."""
        return 2 if not self.requires_labels else len(self.label_names or ("0", "1"))

    def _make_splits(self) -> dict[str, list[str]]:
        assert self.root is not None and self._index is not None
        index = self._index
        ids = index.ids
        files = {s: self.root / f"{s}.txt" for s in SPLITS if (self.root / f"{s}.txt").is_file()}
        predefined = {s: self._region_samples(read_split_file(p)) for s, p in files.items()}
        validate_split_files(predefined, files, ids)
        self._check_regions_in_one_split(predefined, files)
        if len(predefined) == 3:
            unused = len(ids) - sum(len(v) for v in predefined.values())
            if unused:
                log.warning("%d images of %s are in none of the split files and are not used", unused, self.root)
            splits = predefined
        elif predefined and set(predefined) != {"test"}:
            raise ValueError(
                f"{self.root}: found split files {sorted(p.name for p in files.values())}; give all three "
                "(train.txt, val.txt, test.txt), test.txt alone (the rest is split train:val), or none"
            )
        else:
            warning = busi_groups_warning(index, self.groups_csv)
            if warning:
                log.warning(warning)
            fractions = list(self.hparams["split_fractions"])
            held = predefined.get("test", [])
            if held:  # predefined test set (TN3K, micro-US): the rest is split train : (val + test), 8:2 for 8:1:1
                held_ids = set(held)  # built once: a set per id made this loop quadratic (docs/benchmarks.md, Scale)
                ids = [i for i in ids if i not in held_ids]
                fractions = [fractions[0], fractions[1] + fractions[2], 0.0]
            groups = index.groups or None
            splits = split_ids(ids, fractions, seed=self.hparams["split_seed"], groups=groups, labels=self._labels)
            if held:
                splits["test"] = sorted(held)
        crossing = groups_across_splits(splits, index.groups)
        if crossing:
            log.warning(
                "%d groups of %s span several splits (e.g. %s); duplicates may leak between them",
                len(crossing),
                self.groups_csv or "groups.csv",
                dict(list(crossing.items())[:3]),
            )
        return splits

    def _region_samples(self, ids: list[str], index: DatasetIndex | None = None) -> list[str]:
        """``ids`` with the id of each file split into regions (``regions: all``) replaced by its region ids."""
        index = index if index is not None else self._index
        by_file = index.region_ids() if index is not None else {}
        if not by_file:
            return ids
        return [r for i in ids for r in by_file.get(i, [i])]

    def _check_regions_in_one_split(self, splits: dict[str, list[str]], files: dict[str, Path]) -> None:
        """Split files must keep the regions of one DICOM file together (they show the same acquisition)."""
        assert self._index is not None
        where: dict[str, set[str]] = {}
        for name, ids in splits.items():
            for i in ids:
                if i in self._index.regions:
                    where.setdefault(self._index.regions[i][0], set()).add(name)
        apart = {f: sorted(s) for f, s in where.items() if len(s) > 1}
        if apart:
            raise ValueError(
                f"{sorted(p.name for p in files.values())}: the regions of {len(apart)} DICOM files lie in several "
                f"splits (e.g. {dict(list(apart.items())[:3])}); list each file's regions in one split, or the "
                "file id alone (it stands for all its regions)"
            )

    def setup(self, stage: str) -> None:
        """Read labels and fix the split (unless a checkpoint already carried one)."""
        trainer = getattr(self, "trainer", None)
        # looked up here, on every process (a broadcast under DDP), for files written later by one process only
        self._run_dir = run_dir_of(trainer) if trainer is not None else None
        if self.root is not None:
            self._index = index_dataset(self.root, self.layout, masks=self.requires_masks)
            if self.groups_csv is not None:
                self._index.groups = self._read_groups(self.groups_csv, set(self._index.images))
            # after the groups: a file's regions share its group (and its label)
            self._index = expand_regions(self._index, self.regions)
            self._labels = self._encode_labels(self._index)
            if not self.splits:
                self.splits = self._make_splits()
                self._subsample_train()
            self._write_split_files()
        elif stage in ("fit", "validate"):
            raise ValueError(f"data.root is required for {stage!r}; only test/predict can run on test_root alone")

    @staticmethod
    def _read_groups(path: Path, ids: set[str]) -> dict[str, str]:
        """``data.groups_csv``: ``id -> group`` for the ids that have an image (others are logged and dropped)."""
        if not path.is_file():
            raise FileNotFoundError(
                f"data.groups_csv={str(path)!r} does not exist; expected a CSV file with the header id,group "
                "(written by `usclip data duplicates ROOT --output PATH`)"
            )
        groups = read_csv_column(path, "group")
        extra = sorted(set(groups) - ids)
        if extra:
            log.warning("%s: %d ids have no image and are ignored: %s", path, len(extra), extra[:5])
        if not set(groups) & ids:
            raise ValueError(
                f"data.groups_csv={str(path)!r}: none of its {len(groups)} ids is an image id of the dataset "
                f"(e.g. {sorted(ids)[:3]}); is it the groups file of another dataset?"
            )
        return {k: v for k, v in groups.items() if k in ids}

    def _subsample_train(self) -> None:
        frac = self.hparams["train_fraction"]
        if frac < 1.0:
            train = self.splits["train"]
            self.splits["train"] = subsample_ids(train, frac, seed=self.hparams["split_seed"], labels=self._labels)
            log.info("train_fraction=%s: using %d of %d training images", frac, len(self.splits["train"]), len(train))

    def _write_split_files(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and not trainer.loggers and trainer.state.fn == "predict":
            return  # plain trainer.predict(logger=False): no run directory, nothing written (docs/inference.md)
        run = run_dir_of(trainer) if trainer is not None else None
        if trainer is not None and run is not None and trainer.is_global_zero:
            write_splits(self.splits, run / "splits")

    # ----------------------------------------------------------------- checkpointed state
    def state_dict(self) -> dict[str, Any]:
        """The split travels inside every checkpoint, and so does a mid-epoch position of the training loader."""
        state: dict[str, Any] = {"splits": self.splits, "label_names": self.label_names}
        position = training_position(getattr(self, "trainer", None))
        if position is not None:  # see usclip.data.samplers: a resume skips the batches already processed
            state["train_position"] = position
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the split of the run that wrote the checkpoint (and where its training loader stood)."""
        self.splits = {k: list(v) for k, v in state_dict.get("splits", {}).items()}
        self.label_names = state_dict.get("label_names", self.label_names)
        #: where the training loader stood if the checkpoint was written in the middle of an epoch (else ``None``);
        #: ``usclip.callbacks.MidEpochCheckpoint`` makes the resumed sampler skip what was already processed
        self.resume_position: dict[str, int] | None = state_dict.get("train_position")
        self._write_split_files()

    # ----------------------------------------------------------------- datasets and loaders
    def _folder_dataset(
        self,
        index: DatasetIndex,
        ids: list[str],
        labels: dict[str, int] | None,
        train: bool = False,
        masks: bool = True,
    ) -> Dataset:
        transform = build_transform(self.image_size, self.augmentations if train else None, seed=self.seed)
        if labels is not None and not self.requires_labels and any(i not in labels for i in ids):
            log.warning("%s: some images have no label; samples are served without labels", index.root)
            labels = None
        return FolderDataset(
            index.root,
            ids,
            labels,
            transform,
            with_masks=masks,
            crop=self.crop,
            index=index,
            cache=self.cache,
            on_bad_sample=self.on_bad_sample,
            max_image_pixels=self.max_image_pixels,
            colour=self.colour,
            regions=self.regions,
            resize=(self.image_size, self.image_size),
        )

    def _dataset(self, split: str) -> Dataset:
        if split == "predict" and self.predict_root is not None:
            index = expand_regions(index_predict_inputs(self.predict_root, "data.predict_root"), self.regions)
            return self._folder_dataset(index, index.ids, None, masks=False)
        if split in ("test", "predict") and self.test_root is not None:
            test = split == "test"
            masks = self.requires_masks and test
            index = expand_regions(index_dataset(self.test_root, self.layout, masks=masks), self.regions)
            return self._folder_dataset(index, index.ids, self._encode_labels(index) if test else None, masks=masks)
        if self.root is None or self._index is None:
            raise ValueError(f"data.root is required for the {split!r} split (or data.test_root for test/predict)")
        name = "test" if split == "predict" else split
        ids = self._region_samples(self.splits.get(name) or [])  # a checkpoint's file ids -> their regions
        if not ids:
            raise ValueError(f"the {name!r} split of {self.root} is empty; check split_fractions or the split files")
        predict = split == "predict"
        labels = None if predict else self._labels
        return self._folder_dataset(
            self._index, ids, labels, train=split == "train", masks=self.requires_masks and not predict
        )

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        # order and augmentations from (seed, epoch, index) so that a resumed epoch repeats exactly; evaluation
        # shards without padding under DDP (see usclip.data.samplers)
        trainer = getattr(self, "trainer", None)
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = None if self.seed is None else derive_seed(self.seed, int(os.environ.get("PL_GLOBAL_SEED", 0)))
        dataset = self._dataset(split)
        if split == "predict" and isinstance(dataset, FolderDataset):
            dataset.cache = None  # each image is read once: a cache would only grow with the number of images
        dataset, sampler = build_sampler(dataset, shuffle, seed, replicas, rank)
        self.bad_samples.set_size(split, len(sampler) if sampler is not None else len(dataset))  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            # creating an iterator draws the workers' base seed: from this generator, not the global RNG state
            generator=None if seed is None else torch.Generator().manual_seed(seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(self.splits.get(split, [])) > self.batch_size,
            collate_fn=collate_skipping_bad if self.on_bad_sample == "skip" else None,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the samples the workers skipped as bad files (``on_bad_sample: skip``) and drop their markers.

        Runs in the main process, so the count covers every worker. A new bad file is logged once and recorded in
        ``<run dir>/results/bad_samples.json``.

        Raises:
            TooManyBadSamplesError: when more than ``max_bad_fraction`` of the split is bad.
        """
        if not isinstance(batch, dict) or BAD_SAMPLES_KEY not in batch:
            return batch
        bad = batch.pop(BAD_SAMPLES_KEY)
        if bad:
            trainer = getattr(self, "trainer", None)
            split = _SPLIT_OF_STAGE.get(trainer.state.stage, "unknown") if trainer is not None else "unknown"
            try:
                new = self.bad_samples.record(split, bad)
            except TooManyBadSamplesError:
                self._write_bad_samples()
                raise
            if new:
                self._write_bad_samples()
        return batch

    def _write_bad_samples(self) -> None:
        """``<run dir>/results/bad_samples.json``: per split the distinct skipped samples, their share and files."""
        trainer = getattr(self, "trainer", None)
        run: Path | None = getattr(self, "_run_dir", None)
        if run is None or trainer is None or not trainer.is_global_zero:
            return
        summary = {"on_bad_sample": self.on_bad_sample, "max_bad_fraction": self.bad_samples.max_fraction}
        summary |= {"splits": self.bad_samples.summary()}  # type: ignore[dict-item]
        write_text_atomic(run / "results" / "bad_samples.json", json.dumps(summary, indent=2) + "\n")

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


class ZeroShotDataModule(ClassificationDataModule):
    """Labelled images for zero-shot scoring: the held-out test split (default) or every image of ``root``.

    Args:
        score_on: ``test`` scores the test split (the same 8:1:1 split as the supervised runs, so zero-shot and
            supervised numbers come from the same images); ``all`` scores every image of ``root`` (train, val and
            test: what the authors' zero-shot script does, and what the paper's Table 3 zero-shot numbers are
            computed on). Nothing is trained either way; ``test_root`` (an external set) is always scored whole.
        **kwargs: :class:`ClassificationDataModule` arguments.
    """

    def __init__(self, score_on: Literal["test", "all"] = "test", **kwargs: Any) -> None:
        if score_on not in ("test", "all"):
            raise ValueError(f"data.score_on must be 'test' or 'all', got {score_on!r}")
        super().__init__(**kwargs)
        self.score_on = score_on

    def _make_splits(self) -> dict[str, list[str]]:
        splits = super()._make_splits()
        if self.score_on == "all":
            assert self._index is not None
            splits["test"] = list(self._index.ids)
            log.info("data.score_on=all: scoring all %d images of %s", len(splits["test"]), self.root)
        return splits
