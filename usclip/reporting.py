"""Paper-style result tables over seeds: the paper's Tables 2 and 3 from tested runs, mean ± std, best marked.

``usclip report RUN_DIR...`` (see :mod:`usclip.commands.report`) collects the test results that the tasks write
(``<run>/results/test_metrics.json``) and says which cell of the paper's tables each run fills: from the run's
``sweep_run.json`` (written by ``usclip sweep``: the paper's table, row group, method, dataset and seed) or, without
one, from its resolved ``config.yaml``. Runs of one (table, group, method, dataset) are seeds of one experiment; the
report lays out Table 2 (segmentation: Dice, IoU, HD95, ASD) and Table 3 (classification: zero-shot and supervised
groups, Acc and AUC) in the paper's row and column order (:data:`usclip.paper.TABLES`), as Markdown and CSV, and can
set the paper's published numbers beside ours (:func:`usclip.paper.published`).

The std is the sample standard deviation over seeds (``ddof=1``; 0 for a single seed). Best and second best are
marked among the compared methods of each row group; the reference rows (UNet, ResNet18) are not ranked. Runs of
``usclip sweep`` carry the sweep's *protocol* (``authors``: the code that made the published numbers; ``usclip``:
usclip's defaults): a table holds one :class:`ResultTable` per protocol, printed as rows side by side with a
Protocol column and ranked within each protocol. Within one protocol a table never mixes metric protocols
(``"metric_protocol"`` of ``test_metrics.json``: ``strict``, the default, or ``authors``).
"""

from __future__ import annotations

import csv
import logging
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from usclip._io import atomic_path, write_text_atomic
from usclip.paper import TABLES, PaperTable, published_lookup
from usclip.run_results import (
    PROTOCOLS,
    SWEEP_RUN_FILE,
    MethodFrom,
    RunResult,
    dataset_name,
    find_run_dirs,
    load_run,
    method_name,
    weights_name,
)
from usclip.visualize import DEFAULT_DPI, FIGURE_FORMATS, overlay_grid_figure, read_overlay, save_figure

__all__ = [
    "PROTOCOLS",
    "SWEEP_RUN_FILE",
    "Cell",
    "MethodFrom",
    "ReportFiles",
    "ResultTable",
    "RunResult",
    "aggregate",
    "aggregate_by_protocol",
    "dataset_name",
    "find_run_dirs",
    "format_latex",
    "format_markdown",
    "format_protocol_comparison",
    "latex_escape",
    "load_run",
    "method_name",
    "missing_paper_cells",
    "ranks",
    "short_title",
    "weights_name",
    "write_csv",
    "write_overlay_grids",
    "write_protocol_comparison_csv",
    "write_report",
]

log = logging.getLogger(__name__)

# --all-metrics: what each table shows besides the paper's metrics
EXTRA_METRICS: dict[str, tuple[str, ...]] = {"table2": (), "table3": ("sensitivity", "specificity", "f1")}
LOWER_IS_BETTER = frozenset({"hd95", "asd"})
# shown as percentages in Markdown (fractions in [0, 1]); CSVs keep the raw values
PERCENT_METRICS = frozenset({"dice", "iou", "acc", "auc", "sensitivity", "specificity", "f1"})
METRIC_TITLES = {
    "dice": "Dice",
    "iou": "IoU",
    "hd95": "HD95",
    "asd": "ASD",
    "acc": "Acc",
    "auc": "AUC",
    "sensitivity": "Sens",
    "specificity": "Spec",
    "f1": "F1",
}


@dataclass(frozen=True)
class Cell:
    """Mean and sample std of one metric of one (method, dataset) over seeds.

    ``once``: the sweep ran the cell once by design (nothing trains: every seed would give the same numbers).
    """

    mean: float
    std: float
    n: int
    once: bool = False


@dataclass(frozen=True)
class ResultTable:
    """One of the paper's tables filled with our runs: cells over seeds, in the paper's order.

    Attributes:
        spec: the paper's layout of this table.
        protocol: the runs' metric protocol (one per table and sweep protocol).
        cells: ``{(group, method, dataset): {metric: Cell}}``.
        references: ``(group, method)`` of the reference rows.
        runs: the runs aggregated.
        sweep_protocol: the ``usclip sweep`` protocol of every run here (``None``: runs without one).
    """

    spec: PaperTable
    protocol: str
    cells: dict[tuple[str, str, str], dict[str, Cell]]
    references: frozenset[tuple[str, str]]
    runs: tuple[RunResult, ...]
    sweep_protocol: str | None = None

    @property
    def name(self) -> str:
        """``"table2"`` or ``"table3"``."""
        return self.spec.name

    def groups(self) -> list[str]:
        """Row groups with runs, in the paper's order."""
        present = {g for g, _, _ in self.cells}
        return [g for g in self.spec.groups if g in present]

    def methods(self, group: str) -> list[str]:
        """The group's methods with runs: the paper's, in its order, then others alphabetically."""
        present = {m for g, m, _ in self.cells if g == group}
        paper = self.spec.methods.get(group, ())
        return [m for m in paper if m in present] + sorted(present - set(paper))

    def datasets(self) -> list[str]:
        """Datasets with runs: the paper's, in its order, then others alphabetically."""
        present = {d for _, _, d in self.cells}
        return [d for d in self.spec.datasets if d in present] + sorted(present - set(self.spec.datasets))

    def metrics(self, all_metrics: bool = False) -> list[str]:
        """The paper's metrics of this table (and :data:`EXTRA_METRICS` with ``all_metrics``) that runs have."""
        wanted = self.spec.metrics + (EXTRA_METRICS.get(self.name, ()) if all_metrics else ())
        return [m for m in wanted if any(m in c for c in self.cells.values())]

    def seed_counts(self) -> list[int]:
        """The distinct numbers of seeds behind the cells, ascending (cells run once by design left out)."""
        return sorted({c.n for cs in self.cells.values() for c in cs.values() if not c.once})

    @property
    def label(self) -> str:
        """The sweep protocol as printed: its name, or ``–`` for runs without one."""
        return self.sweep_protocol or "–"


def _check_one_protocol(name: str, runs: Sequence[RunResult], scope: str = "") -> str:
    first = runs[0]
    for run in runs[1:]:
        if run.protocol != first.protocol:
            raise ValueError(
                f"{name} mixes metric protocols{scope}: {first.path} has metric_protocol {first.protocol!r} and "
                f"{run.path} has {run.protocol!r}; report them separately (one `usclip report` per protocol)"
            )
    return first.protocol


def _protocol_order(protocol: str | None) -> tuple[bool, str]:
    return protocol is None, protocol or ""


def _result_table(name: str, members: list[RunResult], sweep_protocol: str | None) -> ResultTable:
    where = name if sweep_protocol is None else f"{name} (protocol {sweep_protocol})"
    protocol = _check_one_protocol(name, members, "" if sweep_protocol is None else f" in its {sweep_protocol} runs")
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for run in members:
        groups.setdefault((run.group, run.method, run.dataset), []).append(run)
    cells: dict[tuple[str, str, str], dict[str, Cell]] = {}
    for key, seeds_runs in groups.items():
        seeds = [r.seed for r in seeds_runs]
        if len(set(seeds)) != len(seeds):
            log.warning("%s: %s on %s: several runs share a seed (%s)", where, key[1], key[2], seeds)
        once = all(r.deterministic for r in seeds_runs)
        cells[key] = {}
        for metric in sorted({k for r in seeds_runs for k in r.metrics}):
            values = [r.metrics[metric] for r in seeds_runs if math.isfinite(r.metrics.get(metric, math.nan))]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells[key][metric] = Cell(statistics.fmean(values), std, len(values), once and len(values) == 1)
    references = frozenset((r.group, r.method) for r in members if r.reference)
    return ResultTable(TABLES[name], protocol, cells, references, tuple(members), sweep_protocol)


def aggregate_by_protocol(runs: Sequence[RunResult]) -> dict[str, list[ResultTable]]:
    """Mean and sample std over seeds, per table and sweep protocol.

    Returns:
        ``{table name: [ResultTable per sweep protocol]}``, tables in the paper's order, protocols alphabetically
        (``authors``, ``usclip``) and runs without a protocol last; a cell per (group, method, dataset) and metric
        that the runs have (every numeric key of ``test_metrics.json``); non-finite values (e.g. HD95 of an empty
        prediction) are left out of that metric's mean.

    Raises:
        ValueError: if the runs of one table and sweep protocol differ in metric protocol (the message names two).
    """
    by_table: dict[str, dict[str | None, list[RunResult]]] = {}
    for run in runs:
        if run.table not in TABLES:
            raise ValueError(f"{run.path}: table must be one of {sorted(TABLES)}, got {run.table!r}")
        by_table.setdefault(run.table, {}).setdefault(run.sweep_protocol, []).append(run)
    return {
        name: [_result_table(name, by_table[name][p], p) for p in sorted(by_table[name], key=_protocol_order)]
        for name in TABLES
        if name in by_table
    }


def aggregate(runs: Sequence[RunResult]) -> dict[str, ResultTable]:
    """Mean and sample std over seeds, per table, for runs of one sweep protocol (:func:`aggregate_by_protocol`).

    Returns:
        ``{table name: ResultTable}`` in the paper's order.

    Raises:
        ValueError: if the runs of one table differ in metric protocol or in sweep protocol (use
            :func:`aggregate_by_protocol` for several sweep protocols).
    """
    tables = {}
    for name, parts in aggregate_by_protocol(runs).items():
        if len(parts) > 1:
            raise ValueError(
                f"{name} holds runs of several sweep protocols {[p.label for p in parts]}: use aggregate_by_protocol"
            )
        tables[name] = parts[0]
    return tables


def _scale(metric: str) -> float:
    return 100.0 if metric in PERCENT_METRICS else 1.0


def ranks(table: ResultTable, group: str, dataset: str, metric: str) -> dict[str, int]:
    """Rank (0 best, 1 second, ...) of each compared method of ``group`` in one column.

    Reference rows are left out. Means are compared as printed (two decimals, in percent or pixels), so methods
    that print the same value share a rank. A lone compared method (nothing to compare it with in that column)
    gets no rank: empty.
    """
    shown = {
        m: round(c[metric].mean * _scale(metric), 2)
        for (g, m, d), c in table.cells.items()
        if g == group and d == dataset and metric in c and (g, m) not in table.references
    }
    if len(shown) < 2:
        return {}
    order = sorted(set(shown.values()), reverse=metric not in LOWER_IS_BETTER)
    return {m: order.index(v) for m, v in shown.items()}


def _paper_value(table: ResultTable, group: str, method: str, dataset: str, metric: str) -> float | None:
    return published_lookup().get((table.name, group, method, dataset, metric))


def missing_paper_cells(table: ResultTable) -> list[tuple[str, str, str, str]]:
    """``(group, method, dataset, metric)`` of the paper's cells of this table that no run fills, in print order."""
    spec = table.spec
    return [
        (g, m, d, k)
        for g in spec.groups
        for m in spec.methods[g]
        for d in spec.datasets
        for k in spec.metrics
        if k not in table.cells.get((g, m, d), {})
    ]


def _fmt(cell: Cell, metric: str) -> str:
    """``mean ± std``; the mean alone for a cell over one seed (no spread to show: never ``± 0.00``)."""
    scale = _scale(metric)
    mean = f"{cell.mean * scale:.2f}"
    return mean if cell.once or cell.n == 1 else f"{mean} ± {cell.std * scale:.2f}"


def _units(metrics: Sequence[str]) -> str:
    parts = []
    percent = [METRIC_TITLES[m] for m in metrics if m in PERCENT_METRICS]
    pixels = [METRIC_TITLES[m] for m in metrics if m in LOWER_IS_BETTER]
    if percent:
        parts.append(", ".join(percent) + " in %")
    if pixels:
        parts.append(", ".join(pixels) + " in pixels")
    return "; ".join(parts)


def _cell_text(table: ResultTable, key: tuple[str, str, str], metric: str, rank: int | None, most_seeds: int) -> str:
    cell = table.cells.get(key, {}).get(metric)
    if cell is None:
        return "–"
    text = _fmt(cell, metric) + (f" (n={cell.n})" if cell.n < most_seeds and not cell.once else "")
    return f"**{text}**" if rank == 0 else f"<u>{text}</u>" if rank == 1 else text


def _ordered(present: set[str], paper: Sequence[str]) -> list[str]:
    return [x for x in paper if x in present] + sorted(present - set(paper))


def _as_parts(table: ResultTable | Sequence[ResultTable]) -> list[ResultTable]:
    parts = [table] if isinstance(table, ResultTable) else list(table)
    if not parts or len({p.name for p in parts}) != 1:
        raise ValueError(f"expected the ResultTables of one paper table, got {[p.name for p in parts]}")
    return parts


def _layout(parts: list[ResultTable], all_metrics: bool) -> tuple[list[str], list[str], list[str]]:
    """Groups, datasets and metrics of the parts together, in the paper's order."""
    spec = parts[0].spec
    groups = _ordered({g for p in parts for g in p.groups()}, spec.groups)
    datasets = _ordered({d for p in parts for d in p.datasets()}, spec.datasets)
    wanted = spec.metrics + (EXTRA_METRICS.get(spec.name, ()) if all_metrics else ())
    metrics = [m for m in wanted if any(m in p.metrics(all_metrics) for p in parts)]
    return groups, datasets, metrics


@dataclass(frozen=True)
class _Grid:
    """What the Markdown and LaTeX tables share: the parts, their layout, the lead columns and the dataset blocks."""

    parts: list[ResultTable]
    groups: list[str]
    datasets: list[str]
    metrics: list[str]
    step: int  # datasets per block

    @classmethod
    def of(cls, table: ResultTable | Sequence[ResultTable], all_metrics: bool, datasets_per_block: int) -> _Grid:
        parts = _as_parts(table)
        groups, datasets, metrics = _layout(parts, all_metrics)
        step = datasets_per_block if datasets_per_block > 0 else max(len(datasets), 1)
        return cls(parts, groups, datasets, metrics, step)

    @property
    def several(self) -> bool:
        """Whether the table holds the runs of several sweep protocols (a Protocol column)."""
        return len(self.parts) > 1

    @property
    def show_group(self) -> bool:
        return len(self.parts[0].spec.groups) > 1

    def most_seeds(self, part: ResultTable) -> int:
        """The most seeds of any cell of ``part``: fewer are marked ``(n=k)``."""
        return max(part.seed_counts(), default=0)

    def lead(self) -> list[str]:
        """Titles of the columns before the metrics."""
        return (["Group"] if self.show_group else []) + ["Method"] + (["Protocol"] if self.several else [])

    def lead_cells(self, i: int, group: str, method: str, part: ResultTable) -> list[str]:
        """Row ``i`` of ``group``'s lead cells: the group on its first row, the method (``†``: reference), protocol."""
        row = [group.capitalize() if i == 0 else ""] if self.show_group else []
        row.append(method + (" †" if (group, method) in part.references else ""))
        return row + ([part.label] if self.several else [])

    def blocks(self) -> list[list[str]]:
        """The datasets in blocks of ``step`` (one table each)."""
        return [self.datasets[k : k + self.step] for k in range(0, max(len(self.datasets), 1), self.step)]


def _rows(parts: list[ResultTable], group: str) -> list[tuple[str, ResultTable]]:
    """(method, part) of a group: methods in the paper's order, each method's protocols side by side."""
    methods = _ordered({m for p in parts for m in p.methods(group)}, parts[0].spec.methods.get(group, ()))
    return [(m, p) for m in methods for p in parts if m in p.methods(group)]


def format_markdown(
    table: ResultTable | Sequence[ResultTable],
    compare_paper: bool = False,
    all_metrics: bool = False,
    datasets_per_block: int = 3,
) -> str:
    """One of the paper's tables in Markdown: a row per method, grouped as the paper does; a column per metric.

    Cells read ``mean ± std`` over seeds (percent for Dice/IoU/Acc/AUC, pixels for HD95/ASD); ``(n=k)`` marks a
    cell over fewer seeds than the table's others; a cell the sweep ran once by design (zero-shot: nothing trains)
    reads ``mean``. Within each row group the best compared method of a column is **bold**, the second best
    underlined (``<u>``), as in the paper; reference rows (†) are not ranked. ↓ marks lower-is-better metrics, ↑
    the others. With ``compare_paper`` a cell reads ``ours (paper, ours − paper)`` where the paper has that cell.
    Like the paper, the datasets are split over tables of ``datasets_per_block`` datasets (0: one table). A list
    under the table gives the units, the protocols and, when comparing ``strict`` runs with the paper (``authors``
    metric protocol), a warning.

    Given the tables of several sweep protocols (:func:`aggregate_by_protocol`), a Protocol column tells which
    protocol produced each row, a method's protocols are adjacent rows, and marks rank within each protocol; with
    ``compare_paper`` a second table sets the protocols side by side with the paper's number
    (:func:`format_protocol_comparison`).
    """
    grid = _Grid.of(table, all_metrics, datasets_per_block)
    parts, groups, metrics = grid.parts, grid.groups, grid.metrics
    compared = 0
    blocks = []
    for block in grid.blocks():
        header = grid.lead()
        header += [f"{d} {METRIC_TITLES[m]} {'↓' if m in LOWER_IS_BETTER else '↑'}" for d in block for m in metrics]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group in groups:
            for i, (method, part) in enumerate(_rows(parts, group)):
                row = grid.lead_cells(i, group, method, part)
                for d in block:
                    for m in metrics:
                        rank = ranks(part, group, d, m).get(method)
                        text = _cell_text(part, (group, method, d), m, rank, grid.most_seeds(part))
                        paper = _paper_value(part, group, method, d, m) if compare_paper else None
                        cell = part.cells.get((group, method, d), {}).get(m)
                        if paper is not None and cell is not None:
                            compared += 1
                            text += f" ({paper:.2f}, {cell.mean * _scale(m) - paper:+.2f})"
                        row.append(text)
                lines.append("| " + " | ".join(row) + " |")
        blocks.append("\n".join(lines) + "\n")
    notes = _notes(parts, metrics, compare_paper, compared)
    text = "\n".join(blocks) + "\n" + "".join(f"- {note}\n" for note in notes)
    if compare_paper and grid.several:
        text += "\n" + format_protocol_comparison(parts, all_metrics)
    return text


def _notes(parts: list[ResultTable], metrics: list[str], compare_paper: bool, compared: int) -> list[str]:
    counts = sorted({n for p in parts for n in p.seed_counts()})
    most_seeds = max(counts, default=0)
    seeds = f"{'/'.join(map(str, counts))} seed{'s' if counts != [1] else ''}" if counts else "seeds"
    if counts == [1]:
        notes = [f"One seed per cell (n=1): the value alone, no std; {_units(metrics)}."]
    else:
        notes = [f"Mean ± std (sample std) over {seeds}; {_units(metrics)}."]
    if len(counts) > 1:
        notes[0] += f" (n=…): a cell over fewer than {most_seeds} seeds" + ("; (n=1): no std." if 1 in counts else ".")
    if any(c.once for p in parts for cs in p.cells.values() for c in cs.values()):
        notes.append("A value without ± ran once: nothing trains (zero-shot), so every seed gives the same numbers.")
    several = len(parts) > 1
    rank_scope = " and protocol" if several else ""
    notes.append(
        f"**Best**, <u>second best</u> among the compared methods of each group{rank_scope}; † reference, not ranked."
    )
    if several:
        notes.append(
            "Protocol: the `usclip sweep` protocol that produced the row (`authors`: the authors' code as it made the "
            "published numbers; `usclip`: usclip's defaults; `–`: runs not made by a sweep with protocols)."
        )
        notes.append("Metric protocol: " + ", ".join(f"`{p.protocol}` ({p.label} rows)" for p in parts) + ".")
    else:
        if parts[0].sweep_protocol is not None:
            notes.append(f"Protocol: `{parts[0].sweep_protocol}` (`usclip sweep`), every cell.")
        notes.append(f"Metric protocol: `{parts[0].protocol}`.")
    if not compare_paper:
        return notes
    notes.append(
        "Paper comparison: ours (paper, ours − paper); differences in percentage points for "
        "Dice/IoU/Acc/AUC and pixels for HD95/ASD; the paper's values are means of three runs under the "
        f"authors' metric protocol ({compared} cells compared)."
    )
    for part in parts:
        missing = missing_paper_cells(part)
        if missing:
            group, method, dataset, metric = missing[0]
            under = f" under protocol `{part.label}`" if several else ""
            notes.append(
                f"{len(missing)} of the paper's cells of this table have no run{under} "
                f"(the first: {method} on {dataset}, {METRIC_TITLES[metric]}, {group})."
            )
        if part.protocol != "authors":
            rows = f" ({part.label} rows)" if several else ""
            warning = (
                f"Warning: these runs{rows} use the `{part.protocol}` metric protocol and the paper's numbers the "
                "authors' (non-finite HD95/ASD dropped, directed ASD, empty ground truth skipped): the comparison is "
                "not like for like."
            )
            notes.append(f"**{warning}**")
            log.warning("%s: %s", part.name, warning.removeprefix("Warning: "))
    return notes


def _comparison_rows(
    parts: list[ResultTable], all_metrics: bool
) -> list[tuple[str, str, str, str, float | None, list[Cell | None]]]:
    """(group, method, dataset, metric, paper, cell per part) where at least two protocols have the cell."""
    groups, datasets, metrics = _layout(parts, all_metrics)
    rows = []
    for group in groups:
        methods = _ordered({m for p in parts for m in p.methods(group)}, parts[0].spec.methods.get(group, ()))
        for method in methods:
            for d in datasets:
                for m in metrics:
                    cells = [p.cells.get((group, method, d), {}).get(m) for p in parts]
                    if sum(c is not None for c in cells) >= 2:
                        rows.append((group, method, d, m, _paper_value(parts[0], group, method, d, m), cells))
    return rows


# LaTeX: characters with a meaning in LaTeX, then the Unicode marks the Markdown uses
_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "↓": r"$\downarrow$",
    "↑": r"$\uparrow$",
    "†": r"$^\dagger$",
    "–": "--",
    "−": "$-$",
    "…": r"\ldots{}",
}


def latex_escape(text: str) -> str:
    r"""``text`` safe inside a LaTeX table: ``& % $ # _ { } ~ ^ \`` escaped, ``± ↓ ↑ † – − …`` as LaTeX."""
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def format_latex(
    table: ResultTable | Sequence[ResultTable], all_metrics: bool = False, datasets_per_block: int = 3
) -> str:
    r"""One of the paper's tables as LaTeX (``booktabs``): the cells, marks and notes of :func:`format_markdown`.

    One ``tabular`` per block of ``datasets_per_block`` datasets (0: one), a ``\cmidrule`` under each dataset,
    ``\midrule`` between row groups. Best **bold** (``\textbf``), second best underlined (``\underline``),
    ``±`` as ``$\pm$``, ``↑``/``↓`` as ``$\uparrow$``/``$\downarrow$``, reference rows ``$^\dagger$``; every
    name is escaped (:func:`latex_escape`: method names and datasets hold ``_``, ``&``, ``%``). The notes go into
    the caption. Needs ``\usepackage{booktabs}`` in the document (a comment on the first line says so). The
    paper comparison (``--compare-paper``) stays in the Markdown.
    """
    grid = _Grid.of(table, all_metrics, datasets_per_block)
    parts, groups, metrics = grid.parts, grid.groups, grid.metrics
    lead = grid.lead()
    notes = " ".join(_notes(parts, metrics, False, 0))
    notes = re.sub(r"\*\*(.+?)\*\*", r"\\textbf{\1}", latex_escape(notes))
    notes = re.sub(r"<u>(.+?)</u>", r"\\underline{\1}", notes.replace("`", ""))
    spec = parts[0].spec
    out = [
        "% usclip report; needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{latex_escape(spec.title)}. {notes}}}",
        f"\\label{{tab:usclip-{spec.name}}}",
    ]
    for k, block in enumerate(grid.blocks()):
        n_lead, width = len(lead), len(metrics)
        out += ["\\par\\medskip"] if k else []
        out.append("\\begin{tabular}{" + "l" * n_lead + ("c" * width) * len(block) + "}")
        out.append("\\toprule")
        heads = [f"\\multicolumn{{{width}}}{{c}}{{{latex_escape(d)}}}" for d in block]
        out.append(" & ".join([""] * n_lead + heads) + " \\\\")
        rules = [f"\\cmidrule(lr){{{n_lead + 1 + k * width}-{n_lead + (k + 1) * width}}}" for k in range(len(block))]
        out.append(" ".join(rules))
        titles = [f"{METRIC_TITLES[m]} {'↓' if m in LOWER_IS_BETTER else '↑'}" for _ in block for m in metrics]
        out.append(" & ".join(latex_escape(t) for t in lead + titles) + " \\\\")
        for group in groups:
            out.append("\\midrule")
            for i, (method, part) in enumerate(_rows(parts, group)):
                cells = [latex_escape(x) for x in grid.lead_cells(i, group, method, part)]
                for d in block:
                    for m in metrics:
                        rank = ranks(part, group, d, m).get(method)
                        text = latex_escape(_cell_text(part, (group, method, d), m, None, grid.most_seeds(part)))
                        cells.append(
                            f"\\textbf{{{text}}}" if rank == 0 else f"\\underline{{{text}}}" if rank == 1 else text
                        )
                out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}"]
    out.append("\\end{table}")
    return "\n".join(out) + "\n"


def format_protocol_comparison(parts: Sequence[ResultTable], all_metrics: bool = False) -> str:
    """The sweep protocols side by side with the paper's number: a row per cell that two or more protocols ran.

    Columns: the cell (group, method, dataset, metric), the paper's value, each protocol's mean, and each
    protocol's mean minus the paper's (percentage points for Dice/IoU/Acc/AUC, pixels for HD95/ASD).
    """
    parts = _as_parts(parts)
    labels = [p.label for p in parts]
    header = ["Group", "Method", "Dataset", "Metric", "Paper", *labels, *[f"{x} − paper" for x in labels]]
    lines = [
        "Protocols side by side (cells that two or more protocols ran):",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    rows = _comparison_rows(parts, all_metrics)
    for group, method, dataset, metric, paper, cells in rows:
        scale = _scale(metric)
        means = ["–" if c is None else _fmt(c, metric) for c in cells]
        diffs = ["–" if c is None or paper is None else f"{c.mean * scale - paper:+.2f}" for c in cells]
        shown = "–" if paper is None else f"{paper:.2f}"
        lines.append("| " + " | ".join([group, method, dataset, METRIC_TITLES[metric], shown, *means, *diffs]) + " |")
    if not rows:
        lines.append("| " + " | ".join(["–"] * len(header)) + " |")
    return "\n".join(lines) + "\n"


def write_csv(
    table: ResultTable | Sequence[ResultTable],
    path: str | Path,
    compare_paper: bool = False,
    all_metrics: bool = False,
) -> Path:
    """The table as CSV, raw values (fractions for Dice/IoU/Acc/AUC, pixels for HD95/ASD).

    Columns: ``table, group, method, reference, protocol`` (the metric protocol), ``sweep_protocol`` (the
    ``usclip sweep`` protocol, empty for runs without one; one row per method and sweep protocol), then per dataset
    and metric ``<dataset>_<metric>_mean``, ``_std`` and ``_n`` (seeds counted); with ``compare_paper`` also
    ``_paper`` (the published value in the same raw units: percent / 100 for Dice/IoU/Acc/AUC) and ``_diff``
    (mean − paper), empty where the paper has no value.
    """
    parts = _as_parts(table)
    groups, datasets, metrics = _layout(parts, all_metrics)
    stats = ("mean", "std", "n", "paper", "diff") if compare_paper else ("mean", "std", "n")
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        header = ["table", "group", "method", "reference", "protocol", "sweep_protocol"]
        writer.writerow(header + [f"{d}_{m}_{s}" for d in datasets for m in metrics for s in stats])
        for group in groups:
            for method, part in _rows(parts, group):
                row: list[str | float | int] = [part.name, group, method, int((group, method) in part.references)]
                row += [part.protocol, part.sweep_protocol or ""]
                for d in datasets:
                    for m in metrics:
                        cell = part.cells.get((group, method, d), {}).get(m)
                        row += ["", "", 0] if cell is None else [repr(cell.mean), repr(cell.std), cell.n]
                        if compare_paper:
                            paper = _paper_value(part, group, method, d, m)
                            raw = None if paper is None else paper / _scale(m)
                            row.append("" if raw is None else repr(raw))
                            row.append("" if raw is None or cell is None else repr(cell.mean - raw))
                writer.writerow(row)
    return path


def write_protocol_comparison_csv(parts: Sequence[ResultTable], path: str | Path, all_metrics: bool = False) -> Path:
    """:func:`format_protocol_comparison` as CSV, raw values like :func:`write_csv`.

    Columns: ``table, group, method, dataset, metric, paper``, then per protocol ``<protocol>_mean``, ``_std``,
    ``_n`` and ``_diff`` (mean − paper); empty where a protocol has no run or the paper no value.
    """
    parts = _as_parts(parts)
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        stats = ("mean", "std", "n", "diff")
        writer.writerow(["table", "group", "method", "dataset", "metric", "paper"] + [
            f"{p.label}_{s}" for p in parts for s in stats
        ])  # fmt: skip
        for group, method, dataset, metric, paper, cells in _comparison_rows(parts, all_metrics):
            raw = None if paper is None else paper / _scale(metric)
            row: list[str | int] = [parts[0].name, group, method, dataset, metric, "" if raw is None else repr(raw)]
            for c in cells:
                row += ["", "", 0, ""] if c is None else [repr(c.mean), repr(c.std), c.n]
                row += [] if c is None else ["" if raw is None else repr(c.mean - raw)]
            writer.writerow(row)
    return path


class ReportFiles(NamedTuple):
    """What :func:`write_report` wrote for one table: its files and the Markdown text."""

    markdown: Path
    csv: Path
    latex: Path
    text: str


def write_report(
    runs: Sequence[RunResult],
    out_dir: str | Path,
    compare_paper: bool = False,
    all_metrics: bool = False,
    datasets_per_block: int = 3,
) -> dict[str, ReportFiles]:
    """Write ``<table>.md``, ``<table>.csv`` and ``<table>.tex`` (``table2``, ``table3``) into ``out_dir``.

    ``compare_paper``, ``all_metrics`` and ``datasets_per_block`` as in :func:`format_markdown`, :func:`write_csv`
    and :func:`format_latex`. Runs of several sweep protocols share each table (a Protocol column); with
    ``compare_paper`` the protocols side by side with the paper's number also go to ``<table>_protocols.csv``.

    Returns:
        ``{table name: ReportFiles}``.

    Raises:
        ValueError: if one table's runs of one sweep protocol mix metric protocols.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, parts in aggregate_by_protocol(runs).items():
        text = format_markdown(parts, compare_paper, all_metrics, datasets_per_block)
        md = out_dir / f"{name}.md"
        write_text_atomic(md, f"# {parts[0].spec.title}\n\n{text}")
        tex = out_dir / f"{name}.tex"
        write_text_atomic(tex, format_latex(parts, all_metrics, datasets_per_block))
        csv_path = write_csv(parts, out_dir / f"{name}.csv", compare_paper, all_metrics)
        written[name] = ReportFiles(md, csv_path, tex, text)
        if compare_paper and len(parts) > 1:
            write_protocol_comparison_csv(parts, out_dir / f"{name}_protocols.csv", all_metrics)
    return written


def short_title(name: str, max_chars: int) -> str:
    """``name`` cut in the middle (``…``) to ``max_chars`` characters, keeping its start and its end.

    Method names made from a config differ at both ends (``OpenAI CLIP ViT-B-16 + Mona`` vs ``... (ft.)``), so
    both stay visible in a picture's column title.
    """
    if len(name) <= max_chars:
        return name
    keep = max(max_chars - 1, 2)
    head = (keep + 1) // 2
    return name[:head] + "…" + name[len(name) - (keep - head) :]


def write_overlay_grids(
    runs: Sequence[RunResult],
    out_dir: str | Path,
    num_images: int = 4,
    formats: Sequence[str] = FIGURE_FORMATS,
    dpi: float = DEFAULT_DPI,
) -> list[Path]:
    """One figure per dataset comparing segmentation methods on the same test images (``overlays_<dataset>``).

    Rows are test images (the first ``num_images`` ids that every method has in ``<run>/overlays``), columns are
    methods (``method [protocol]`` when the runs come from several sweep protocols); each method shows its run with
    the lowest seed. Drawn with matplotlib (:func:`usclip.visualize.overlay_grid_figure`) as ``formats`` at ``dpi``:
    a legend of the overlay colours in the palette the runs drew them in (recorded in each PNG), and a scale bar on
    pictures whose pixel spacing is known (DICOM input, recorded in each PNG). Column titles longer than a picture is
    wide are cut in the middle (:func:`short_title`; the full names go to the log).

    Returns:
        The files written (none for a dataset whose methods share no overlay).
    """
    by_dataset: dict[str, dict[str, RunResult]] = {}
    several = len({r.sweep_protocol for r in runs if r.task == "segmentation"}) > 1
    for run in sorted(runs, key=lambda r: (r.seed is None, r.seed or 0)):
        if run.task == "segmentation":
            name = f"{run.method} [{run.sweep_protocol or '–'}]" if several else run.method
            by_dataset.setdefault(run.dataset, {}).setdefault(name, run)
    written: list[Path] = []
    for dataset, chosen in sorted(by_dataset.items()):
        methods = sorted(chosen)
        stems = [{p.stem for p in (chosen[m].path / "overlays").glob("*.png")} for m in methods]
        ids = sorted(set.intersection(*stems))[:num_images]
        if not ids:
            log.warning("%s: the methods' runs share no overlay picture; no grid written", dataset)
            continue
        cells, spacings = [], []
        palettes: dict[str, Path] = {}
        for image_id in ids:
            row, row_spacing = [], []
            for m in methods:
                picture, palette, spacing = read_overlay(chosen[m].path / "overlays" / f"{image_id}.png")
                row.append(picture)
                row_spacing.append(spacing)
                palettes.setdefault(palette or "paper", chosen[m].path)  # no name: drawn before the option
            cells.append(row)
            spacings.append(row_spacing)
        if len(palettes) > 1:  # one legend cannot tell both: no grid rather than a wrong one
            (a, run_a), (b, run_b) = list(palettes.items())[:2]
            log.warning(
                "%s: no overlay grid: the runs drew their overlays in different palettes (%s: %s, %s: %s); test them "
                "with one model.init_args.palette",
                dataset, run_a, a, run_b, b,
            )  # fmt: skip
            continue
        titles = [short_title(m, 22) for m in methods]
        log.info("overlays_%s columns: %s", dataset, "; ".join(methods))
        figure = overlay_grid_figure(cells, ids, titles, spacings, palette=next(iter(palettes)))
        written += save_figure(figure, Path(out_dir) / f"overlays_{dataset}", formats, dpi)
    return written
