"""Bad files met during a run: stop naming the file (the default) or skip the sample, count it and cap the share.

On network file systems a file can turn bad in the middle of a run (truncated, replaced, deleted, unreadable).
:class:`usclip.data.datasets.FolderDataset` turns such a read failure into

- ``on_bad_sample="raise"`` (default): a :class:`BadSampleError` naming the sample, the file and the reason. The
  run stops; checkpoints of earlier epochs (``last.ckpt``, ``best.ckpt``) are left as they were.
- ``on_bad_sample="skip"``: a :class:`BadSample` marker instead of the sample. :func:`collate_skipping_bad` drops
  markers from the batch (so a batch with a bad file is one sample shorter; evaluation sees every good image once
  and no image twice) and hands them to the main process under :data:`BAD_SAMPLES_KEY`. There
  :class:`BadSampleCounter` (driven by the DataModule's ``on_before_batch_transfer``) logs each bad file once,
  counts the distinct bad files of each split, and raises :class:`TooManyBadSamplesError` as soon as more than
  ``max_bad_fraction`` of the split's samples are bad. Workers only return markers, so the count is right for
  any ``num_workers``.

Which sample replaces nothing: order and augmentations stay a function of ``(seed, epoch, index)``
(:mod:`usclip.data.samplers`), so a resumed run skips exactly what the first run skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch.utils.data import default_collate

from usclip.data.imageio import ImageReadError

log = logging.getLogger(__name__)

__all__ = [
    "BAD_FILE_ERRORS",
    "BAD_SAMPLES_KEY",
    "ON_BAD_SAMPLE",
    "BadSample",
    "BadSampleCounter",
    "BadSampleError",
    "OnBadSample",
    "TooManyBadSamplesError",
    "collate_skipping_bad",
]

OnBadSample = Literal["raise", "skip"]
ON_BAD_SAMPLE: tuple[str, ...] = ("raise", "skip")

#: read failures that mean "this file is bad" (not "the code or the configuration is wrong"): unreadable, truncated,
#: empty, oversized or replaced files (:class:`ImageReadError`), and missing or unreachable ones (``OSError``)
BAD_FILE_ERRORS: tuple[type[BaseException], ...] = (ImageReadError, OSError)

#: batch key under which the skipped samples' markers travel from the workers to the main process
BAD_SAMPLES_KEY = "bad_samples"


class BadSampleError(ImageReadError):
    """A sample whose file could not be read during a run (``on_bad_sample="raise"``); names the file."""


class TooManyBadSamplesError(RuntimeError):
    """More than ``max_bad_fraction`` of a split's samples were skipped as bad files."""


@dataclass(frozen=True)
class BadSample:
    """Marker returned instead of a sample whose file could not be read (``on_bad_sample="skip"``).

    Attributes:
        index: position of the sample in its dataset.
        id: the sample id.
        path: the sample's image file.
        reason: the read error's message (it names the file that failed: the image or a mask).
    """

    index: int
    id: str
    path: str
    reason: str


def bad_sample_error(index: int, sample_id: str, path: str, err: BaseException) -> BadSampleError:
    """The error of ``on_bad_sample="raise"``: names the sample, its file, the reason and the two ways out."""
    return BadSampleError(
        f"bad sample {sample_id!r} (index {index}, image {path}): {err}. Fix or remove the file (usclip data check "
        "ROOT lists every bad file), or set data.init_args.on_bad_sample: skip to skip such samples"
    )


def collate_skipping_bad(samples: Sequence[Any]) -> dict[str, Any]:
    """``default_collate`` of the good samples, with the :class:`BadSample` markers as a list under ``bad_samples``.

    A batch whose samples are all bad has only the ``bad_samples`` key (the tasks skip it).
    """
    good = [s for s in samples if not isinstance(s, BadSample)]
    bad = [s for s in samples if isinstance(s, BadSample)]
    batch: dict[str, Any] = default_collate(good) if good else {}
    batch[BAD_SAMPLES_KEY] = bad
    return batch


def is_empty_batch(batch: Mapping[str, Any]) -> bool:
    """Whether every sample of ``batch`` was skipped as bad (nothing to train on or evaluate)."""
    return "image" not in batch


def skipped_samples(trainer: Any, split: str) -> dict[str, int]:
    """``{"skipped_samples": n}`` for a results file when the run skips bad samples (``on_bad_sample: skip``).

    Empty when the run's DataModule does not skip (every sample was read, or the run stopped).
    """
    datamodule = getattr(trainer, "datamodule", None)
    counter = getattr(datamodule, "bad_samples", None)
    if getattr(datamodule, "on_bad_sample", "raise") != "skip" or not isinstance(counter, BadSampleCounter):
        return {}
    return {"skipped_samples": counter.skipped(split)}


class BadSampleCounter:
    """Count the distinct bad files of each split in the main process and enforce ``max_bad_fraction``.

    Args:
        max_fraction: largest share of a split's samples that may be skipped; more raises.
    """

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction = max_fraction
        self.sizes: dict[str, int] = {}
        self.files: dict[str, dict[str, str]] = {}  # split -> {image path: reason}

    def set_size(self, split: str, size: int) -> None:
        """The number of samples this process loads from ``split`` per epoch (the share's denominator)."""
        self.sizes[split] = size

    def skipped(self, split: str) -> int:
        """Distinct bad samples skipped so far in ``split``."""
        return len(self.files.get(split, {}))

    def record(self, split: str, bad: Sequence[BadSample]) -> bool:
        """Count the markers of one batch; log new bad files once. Returns whether any file was new.

        Raises:
            TooManyBadSamplesError: when more than ``max_fraction`` of the split's samples are bad.
        """
        files = self.files.setdefault(split, {})
        new = False
        for b in bad:
            if b.path in files:
                continue
            files[b.path] = b.reason
            new = True
            log.warning(
                "skipping bad sample %r (%s) of the %s split (on_bad_sample=skip): %s", b.id, b.path, split, b.reason
            )
        size = self.sizes.get(split, 0)
        if new and size and len(files) > self.max_fraction * size:
            first = list(files)[:3]
            raise TooManyBadSamplesError(
                f"{len(files)} of {size} {split} samples ({len(files) / size:.1%}) were skipped as bad files, more "
                f"than data.init_args.max_bad_fraction={self.max_fraction:g} ({self.max_fraction:.1%}); first: "
                f"{first}. Fix the files (usclip data check ROOT) or raise max_bad_fraction"
            )
        return new

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per split: samples per epoch, distinct skipped samples, their share and ``{image path: reason}``."""
        out: dict[str, dict[str, Any]] = {}
        for split, files in self.files.items():
            size = self.sizes.get(split, 0)
            out[split] = {
                "samples": size,
                "skipped": len(files),
                "share": len(files) / size if size else 0.0,
                "files": dict(files),
            }
        return out
