"""Atomic file writes: results, split files, adapter files and caches are never seen half-written.

A full disk (``ENOSPC``) or quota (``EDQUOT``) while writing raises :class:`DiskFullError`, naming the file, its
folder and that the previous version of the file is unchanged; the temporary file is removed.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

#: errno values that mean "no space left": a full disk, or a full quota (NFS, cluster home folders)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """No space left while writing a file (``errno`` ENOSPC or EDQUOT); the previous file is intact."""


def disk_full_error(path: str | os.PathLike[str], err: OSError, what: str = "file") -> DiskFullError:
    """A :class:`DiskFullError` for ``err`` raised while writing ``path``: what, where, and that nothing was lost."""
    path = Path(path)
    previous = "the previous version is unchanged" if path.exists() else "no partial file was left"
    return DiskFullError(
        err.errno,
        f"disk full ({errno.errorcode.get(err.errno or 0, err.errno)}) while writing the {what} {path}: "
        f"{err.strerror or err}; {previous}. Free space in "
        f"{path.parent} (or write elsewhere) and run again",
        str(path),
    )


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a "no space left" error (a full disk or quota)."""
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


@contextmanager
def disk_full_named(path: str | os.PathLike[str], what: str = "file") -> Iterator[None]:
    """Turn a "no space left" ``OSError`` raised inside the block into a :class:`DiskFullError` naming ``path``.

    Other errors, and a :class:`DiskFullError` raised further down, pass through unchanged.
    """
    try:
        yield
    except OSError as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise disk_full_error(path, err, what) from err
        raise


@contextmanager
def atomic_path(path: str | os.PathLike[str], what: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success, remove it on failure.

    The parent folder is created. An interrupted write leaves ``path`` as it was (absent or the previous file).
    ``what`` names the kind of file in the disk-full error (``checkpoint``, ``results``, ...).

    Raises:
        DiskFullError: when the disk or quota is full (``ENOSPC``/``EDQUOT``) at any step; ``path`` is unchanged.
    """
    path = Path(path)
    with disk_full_named(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    try:
        with disk_full_named(path, what):
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
