"""Atomic writes and CSV files: ids holding commas, quotes or spaces round-trip; a failed write keeps the old file."""

from __future__ import annotations

import csv
import errno
import os
from pathlib import Path

import pytest

from usclip._io import atomic_path, csv_text, write_csv_atomic, write_text_atomic
from usclip.data.duplicates import write_groups_csv
from usclip.data.layouts import read_csv_column
from usclip.data.splits import write_splits

ODD_IDS = ["case 1, left", 'say "cheese"', "plain", "tab\there"]


def test_csv_rows_round_trip(tmp_path):
    path = tmp_path / "t.csv"
    rows = [[i, n, 0.25 * n] for n, i in enumerate(ODD_IDS)]
    write_csv_atomic(path, ["id", "label", "prob"], rows)
    with path.open(newline="") as f:
        back = list(csv.reader(f))
    assert back[0] == ["id", "label", "prob"]
    assert [r[0] for r in back[1:]] == ODD_IDS
    assert [float(r[2]) for r in back[1:]] == [0.0, 0.25, 0.5, 0.75]
    assert csv_text(["a"], [["x,y"]]) == 'a\n"x,y"\n'
    assert not list(tmp_path.glob(".*.tmp"))


def test_groups_csv_with_odd_ids_reads_back(tmp_path):
    groups = {i: f"g{n % 2}" for n, i in enumerate(ODD_IDS)}
    path = write_groups_csv(groups, tmp_path / "groups.csv")
    assert read_csv_column(path, "group") == groups


# ------------------------------------------------------------------ a write that fails half way
PREVIOUS = "id,group\nold,g0\n"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "groups.csv")


def _disk_full(*_args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_fails_after_the_data_went_out_keeps_the_previous_file(tmp_path, monkeypatch):
    """The new text is written and flushed, then the disk fills (fsync fails): the old file is byte-identical.

    Catches write_text_atomic writing straight into the target (the old file would be the new text, or truncated).
    """
    path = tmp_path / "groups.csv"
    path.write_bytes(PREVIOUS.encode())
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "id,group\n" + "new,g1\n" * 1000)
    with pytest.raises(OSError, match="No space left"):
        write_csv_atomic(path, ["id", "group"], [["new", "g1"]])
    assert path.read_bytes() == PREVIOUS.encode()
    assert _leftovers(tmp_path) == []  # no temporary file left beside it


def test_a_failed_rename_keeps_the_previous_file_and_removes_the_temporary(tmp_path, monkeypatch):
    """os.replace fails (read-only or vanished folder): previous file intact, its split files too, no ``.tmp``.

    Catches atomic_path not removing its temporary file when the write fails.
    """
    path = tmp_path / "groups.csv"
    path.write_bytes(PREVIOUS.encode())
    write_splits({"train": ["a", "b"]}, tmp_path / "splits")
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a, **k: _disk_full())
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "id,group\nnew,g1\n")
    with pytest.raises(OSError, match="No space left"):
        write_splits({"train": ["c"]}, tmp_path / "splits")
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == PREVIOUS.encode()
    assert (tmp_path / "splits" / "train.txt").read_text() == "a\nb\n"
    assert _leftovers(tmp_path) == ["splits"] and sorted(os.listdir(tmp_path / "splits")) == ["train.txt"]


def test_an_exception_inside_atomic_path_leaves_the_target_untouched(tmp_path):
    """Half a file written to the temporary path, then an error: the target keeps its bytes, nothing is left over.

    Catches atomic_path renaming (or keeping) a half-written temporary file when the body raises.
    """
    path = tmp_path / "groups.csv"
    path.write_bytes(PREVIOUS.encode())
    with pytest.raises(RuntimeError, match="stopped"), atomic_path(path) as tmp:
        tmp.write_text("id,gro")
        raise RuntimeError("stopped half way")
    assert path.read_bytes() == PREVIOUS.encode()
    assert _leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "new.csv") as tmp:  # Ctrl-C counts too
        tmp.write_text("x")
        raise KeyboardInterrupt
    assert _leftovers(tmp_path) == []
