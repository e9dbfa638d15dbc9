"""Atomic file writes: results, split files, adapter files and caches are never seen half-written."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success, remove it on failure.

    The parent folder is created. An interrupted write leaves ``path`` as it was (absent or the previous file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename, so readers never see half a file.

    The data is flushed to disk before the rename, so the file is whole after a power cut too.
    """
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def csv_text(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """CSV text through the :mod:`csv` module: fields with commas, quotes or line breaks are quoted."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv_atomic(path: str | os.PathLike[str], header: Sequence[object], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV file atomically (:func:`write_text_atomic`); ids such as ``a,b`` or ``say "x"`` round-trip."""
    write_text_atomic(path, csv_text(header, rows))
