"""CSV files are written with the csv module: ids holding commas, quotes or spaces round-trip."""

from __future__ import annotations

import csv

from usclip._io import csv_text, write_csv_atomic
from usclip.data.duplicates import write_groups_csv
from usclip.data.layouts import read_csv_column

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
