"""A cache of decoded and cropped images, so that PNG decoding and scan-area detection run once per file.

Two levels, both optional:

- in memory, per process (each DataLoader worker keeps its own; with ``persistent_workers`` it lives for the
  whole run), a least-recently-used dict bounded in megabytes;
- on disk, one uncompressed ``.npz`` per sample under ``directory``, shared by workers and later runs. Keys hold
  the file paths, their modification times and sizes, and the crop mode, so an edited file or another crop mode
  never reads a stale entry. Files are written through a temporary name and renamed, so concurrent workers
  never read half a file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usclip._io import atomic_path
from usclip.data.crop import Box

log = logging.getLogger(__name__)

_VERSION = 2  # bump when the cached content changes (reading or cropping rules; 2: DICOM palette scale)


@dataclass
class DecodedSample:
    """One sample after decoding and cropping, before resizing and augmentation.

    Attributes:
        image: h x w uint8, the crop.
        mask: h x w uint8 in {0, 1}, the crop; ``None`` without masks.
        box: ``(x0, y0, x1, y1)`` of the crop in the original image, end exclusive.
        orig_size: ``(H, W)`` of the original image.
        spacing: ``(row, column)`` pixel spacing in millimetres of the original image, when known (DICOM).
    """

    image: np.ndarray
    mask: np.ndarray | None
    box: Box
    orig_size: tuple[int, int]
    spacing: tuple[float, float] | None = None

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays."""
        return int(self.image.nbytes + (self.mask.nbytes if self.mask is not None else 0))


def file_key(paths: Sequence[Path], *extra: object) -> str:
    """A key that changes when any of ``paths`` is modified (path, mtime, size) or ``extra`` changes."""
    parts = [f"v{_VERSION}"]
    for p in paths:
        st = os.stat(p)
        parts.append(f"{Path(p).resolve()}|{st.st_mtime_ns}|{st.st_size}")
    parts += [repr(e) for e in extra]
    return "\n".join(parts)


class SampleCache:
    """Memory LRU and optional disk cache of :class:`DecodedSample`.

    Args:
        max_mb: memory budget of this process's LRU in megabytes (0 switches the memory level off).
        directory: folder of the disk level (created when needed); ``None`` switches it off.
    """

    def __init__(self, max_mb: float = 1024.0, directory: str | Path | None = None) -> None:
        if max_mb < 0:
            raise ValueError(f"cache max_mb must be >= 0 megabytes, got {max_mb}")
        self.max_bytes = int(max_mb * 2**20)
        self.directory = Path(directory) if directory is not None else None
        self._items: OrderedDict[str, DecodedSample] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def _disk_path(self, key: str) -> Path:
        assert self.directory is not None
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.directory / digest[:2] / f"{digest}.npz"

    def _remember(self, key: str, value: DecodedSample) -> None:
        if self.max_bytes <= 0 or value.nbytes > self.max_bytes:
            return
        self._items[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes

    def get(self, key: str, load: Callable[[], DecodedSample]) -> DecodedSample:
        """The cached value of ``key``, or ``load()`` (then stored in memory and on disk)."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        value = self._read_disk(key) if self.directory is not None else None
        if value is None:
            self.misses += 1
            value = load()
            if self.directory is not None:
                self._write_disk(key, value)
        else:
            self.hits += 1
        self._remember(key, value)
        return value

    def _read_disk(self, key: str) -> DecodedSample | None:
        path = self._disk_path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                meta = z["meta"]
                spacing = z["spacing"]
                return DecodedSample(
                    image=z["image"],
                    mask=z["mask"] if "mask" in z.files else None,
                    box=(int(meta[0]), int(meta[1]), int(meta[2]), int(meta[3])),
                    orig_size=(int(meta[4]), int(meta[5])),
                    spacing=(float(spacing[0]), float(spacing[1])) if spacing.size else None,
                )
        except (OSError, ValueError, KeyError) as err:  # a damaged entry is rebuilt, not fatal
            log.warning("cache entry %s is unreadable (%s); rebuilding it", path, err)
            return None

    def _write_disk(self, key: str, value: DecodedSample) -> None:
        path = self._disk_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "image": value.image,
            "meta": np.array([*value.box, *value.orig_size], np.int64),
            "spacing": np.array(value.spacing if value.spacing is not None else [], np.float64),
        }
        if value.mask is not None:
            arrays["mask"] = value.mask
        try:
            with atomic_path(path) as tmp, tmp.open("wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
        except OSError as err:  # a full or read-only disk slows the pipeline down but must not stop it
            log.warning("cannot write cache entry %s (%s); continuing without it", path, err)
