"""Paper-style result tables over seeds: methods x datasets, mean +- std, best and second best marked.

``usclip report RUN_DIR...`` (see :mod:`usclip.commands.report`) collects the test results that the tasks write
(``<run>/results/test_metrics.json``) together with each run's resolved ``config.yaml``, groups runs by task, method
and dataset, and aggregates over seeds. Two tables come out, laid out like the paper's: segmentation (Dice, IoU,
HD95, ASD) and classification (accuracy, AUC, sensitivity, specificity, F1), each as Markdown and CSV.

The std is the sample standard deviation over seeds (``ddof=1``; 0 for a single seed).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from PIL import Image

from usclip._io import atomic_path, write_text_atomic
from usclip.visualize import overlay_grid, save_png

log = logging.getLogger(__name__)

MethodFrom = Literal["config", "name"]

SEGMENTATION_METRICS = ("dice", "iou", "hd95", "asd")
CLASSIFICATION_METRICS = ("acc", "auc", "sensitivity", "specificity", "f1")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": SEGMENTATION_METRICS,
    "classification": CLASSIFICATION_METRICS,
}
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
class RunResult:
    """The test result of one run.

    Attributes:
        path: the run directory.
        task: ``"segmentation"`` or ``"classification"``.
        method: method name (from the config, or the logger name).
        dataset: the data root's folder name.
        seed: ``seed_everything`` of the run (``None`` when unset).
        metrics: the numbers of ``results/test_metrics.json``.
    """

    path: Path
    task: str
    method: str
    dataset: str
    seed: int | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """Mean and sample std of one metric of one (method, dataset) over seeds."""

    mean: float
    std: float
    n: int


def _nested(config: dict[str, Any], *keys: str) -> Any:
    node: Any = config
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def method_name(config: dict[str, Any], method_from: MethodFrom = "config") -> str:
    """The method of a run, from its resolved LightningCLI config.

    ``method_from="config"``: the adapter (``lora``, ``mona``), ``<model_name>`` for whole baseline models
    (``head: native``), ``<model_name>/<head>`` without an adapter. ``method_from="name"``: the logger's name.

    Raises:
        ValueError: if ``method_from`` is unknown or ``"name"`` is asked and the config has no logger name.
    """
    if method_from == "name":
        name = _nested(config, "trainer", "logger", "init_args", "name")
        if not name:
            raise ValueError("method_from='name' needs trainer.logger.init_args.name in the run's config.yaml")
        return str(name)
    if method_from != "config":
        raise ValueError(f"method_from must be 'config' or 'name', got {method_from!r}")
    args = _nested(config, "model", "init_args") or {}
    adapter, model, head = args.get("adapter"), args.get("model_name"), args.get("head")
    if adapter:
        return str(adapter)
    if head == "native":
        return str(model)
    return f"{model}/{head or 'paper'}"


def _task_of(config: dict[str, Any], metrics: dict[str, float]) -> str:
    class_path = str(_nested(config, "model", "class_path") or "")
    if "Segmentation" in class_path or "dice" in metrics:
        return "segmentation"
    if "Classification" in class_path or "acc" in metrics:
        return "classification"
    raise ValueError(
        f"cannot tell the task of model.class_path={class_path!r} (expected *SegmentationTask or *ClassificationTask)"
    )


def load_run(run_dir: str | Path, method_from: MethodFrom = "config") -> RunResult:
    """Read one run directory (``config.yaml`` and ``results/test_metrics.json``).

    Raises:
        FileNotFoundError: if either file is missing.
        ValueError: if a file cannot be parsed or the task is unknown.
    """
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "results" / "test_metrics.json"
    for path in (config_path, metrics_path):
        if not path.is_file():
            raise FileNotFoundError(f"run directory {run_dir} has no {path.relative_to(run_dir)} (run `usclip test`)")
    config = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a YAML mapping, got {type(config).__name__}")
    try:
        metrics = {k: float(v) for k, v in json.loads(metrics_path.read_text()).items() if k != "metric_protocol"}
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{metrics_path}: expected a JSON object of numbers ({err})") from err
    root = _nested(config, "data", "init_args", "root")
    seed = config.get("seed_everything")
    return RunResult(
        path=run_dir,
        task=_task_of(config, metrics),
        method=method_name(config, method_from),
        dataset=Path(str(root)).name if root else "unknown",
        seed=int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None,
        metrics=metrics,
    )


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories at or below ``paths``: folders holding ``config.yaml`` and ``results/test_metrics.json``.

    Raises:
        FileNotFoundError: if a path does not exist or holds no tested run.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"RUN_DIR {p} does not exist")
        runs = sorted(
            m.parent.parent for m in p.rglob("results/test_metrics.json") if (m.parent.parent / "config.yaml").is_file()
        )
        if not runs:
            raise FileNotFoundError(
                f"RUN_DIR {p} holds no tested run (no config.yaml next to results/test_metrics.json)"
            )
        found += [r for r in runs if r not in found]
    return found


def aggregate(runs: Sequence[RunResult]) -> dict[str, dict[tuple[str, str], dict[str, Cell]]]:
    """Mean and sample std over seeds.

    Returns:
        ``{task: {(method, dataset): {metric: Cell}}}`` for the metrics of :data:`TASK_METRICS` that the runs have;
        non-finite values (e.g. HD95 of an empty prediction) are left out of that metric's mean.
    """
    groups: dict[str, dict[tuple[str, str], list[RunResult]]] = {}
    for run in runs:
        groups.setdefault(run.task, {}).setdefault((run.method, run.dataset), []).append(run)
    table: dict[str, dict[tuple[str, str], dict[str, Cell]]] = {}
    for task, by_key in groups.items():
        for key, members in by_key.items():
            seeds = [r.seed for r in members]
            if len(set(seeds)) != len(seeds):
                log.warning("%s on %s: several runs share a seed (%s)", *key, seeds)
            cells: dict[str, Cell] = {}
            for metric in TASK_METRICS[task]:
                values = [r.metrics[metric] for r in members if math.isfinite(r.metrics.get(metric, math.nan))]
                if values:
                    std = statistics.stdev(values) if len(values) > 1 else 0.0
                    cells[metric] = Cell(statistics.fmean(values), std, len(values))
            table.setdefault(task, {})[key] = cells
    return table


def _ranks(cells: dict[tuple[str, str], dict[str, Cell]], dataset: str, metric: str) -> dict[str, int]:
    """Rank (0 best, 1 second) of each method in one column; ties share a rank."""
    means = {m: c[metric].mean for (m, d), c in cells.items() if d == dataset and metric in c}
    order = sorted(set(means.values()), reverse=metric not in LOWER_IS_BETTER)
    return {m: order.index(v) for m, v in means.items()}


def _fmt(cell: Cell, metric: str) -> str:
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    return f"{cell.mean * scale:.2f} ± {cell.std * scale:.2f}"


def _axes(cells: dict[tuple[str, str], dict[str, Cell]]) -> tuple[list[str], list[str]]:
    methods = sorted({m for m, _ in cells})
    datasets = sorted({d for _, d in cells})
    return methods, datasets


def format_markdown(task: str, cells: dict[tuple[str, str], dict[str, Cell]]) -> str:
    """One paper-style Markdown table: a row per method, a column per dataset and metric.

    Cells read ``mean ± std`` over seeds (percent for metrics in [0, 1]); the best mean of a column is **bold**,
    the second best _italic_; ↓ marks lower-is-better metrics, ↑ the others.
    """
    methods, datasets = _axes(cells)
    metrics = [m for m in TASK_METRICS[task] if any(m in c for c in cells.values())]
    header = ["Method"] + [
        f"{d} {METRIC_TITLES[m]} {'↓' if m in LOWER_IS_BETTER else '↑'}" for d in datasets for m in metrics
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ranks = {(d, m): _ranks(cells, d, m) for d in datasets for m in metrics}
    for method in methods:
        row = [method]
        for d in datasets:
            for m in metrics:
                cell = cells.get((method, d), {}).get(m)
                if cell is None:
                    row.append("–")
                    continue
                text, rank = _fmt(cell, m), ranks[d, m].get(method)
                row.append(f"**{text}**" if rank == 0 else f"_{text}_" if rank == 1 else text)
        lines.append("| " + " | ".join(row) + " |")
    n = sorted({c.n for cs in cells.values() for c in cs.values()})
    units = ", ".join(METRIC_TITLES[m] for m in metrics if m in PERCENT_METRICS) + " in %"
    if any(m in LOWER_IS_BETTER for m in metrics):
        units += "; " + ", ".join(METRIC_TITLES[m] for m in metrics if m in LOWER_IS_BETTER) + " in pixels"
    seeds = f"{'/'.join(map(str, n))} seed{'s' if n != [1] else ''}"
    lines.append("")
    lines.append(f"Mean ± std over {seeds}; {units}. **Best**, _second best_.")
    return "\n".join(lines) + "\n"


def write_csv(task: str, cells: dict[tuple[str, str], dict[str, Cell]], path: str | Path) -> Path:
    """The table as CSV: a row per method; ``<dataset>_<metric>_mean``, ``_std`` and ``_n`` columns (raw values)."""
    methods, datasets = _axes(cells)
    metrics = [m for m in TASK_METRICS[task] if any(m in c for c in cells.values())]
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method"] + [f"{d}_{m}_{s}" for d in datasets for m in metrics for s in ("mean", "std", "n")])
        for method in methods:
            row: list[str | float | int] = [method]
            for d in datasets:
                for m in metrics:
                    cell = cells.get((method, d), {}).get(m)
                    row += ["", "", 0] if cell is None else [repr(cell.mean), repr(cell.std), cell.n]
            writer.writerow(row)
    return path


def write_report(runs: Sequence[RunResult], out_dir: str | Path) -> dict[str, tuple[Path, Path, str]]:
    """Write ``<task>.md`` and ``<task>.csv`` per task into ``out_dir``.

    Returns:
        ``{task: (markdown path, csv path, markdown text)}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for task, cells in sorted(aggregate(runs).items()):
        text = format_markdown(task, cells)
        md = out_dir / f"{task}.md"
        write_text_atomic(md, f"# {task.capitalize()}\n\n{text}")
        written[task] = (md, write_csv(task, cells, out_dir / f"{task}.csv"), text)
    return written


def write_overlay_grids(
    runs: Sequence[RunResult], out_dir: str | Path, num_images: int = 4, min_size: int = 0
) -> list[Path]:
    """One grid per dataset comparing segmentation methods on the same test images (``overlays_<dataset>.png``).

    Rows are test images (the first ``num_images`` ids that every method has in ``<run>/overlays``), columns are
    methods; each method shows its run with the lowest seed. Pictures smaller than ``min_size`` pixels are
    enlarged (nearest neighbour) to that size.

    Returns:
        The grids written (none for a dataset whose methods share no overlay).
    """
    by_dataset: dict[str, dict[str, RunResult]] = {}
    for run in sorted(runs, key=lambda r: (r.seed is None, r.seed or 0)):
        if run.task == "segmentation":
            by_dataset.setdefault(run.dataset, {}).setdefault(run.method, run)
    written = []
    for dataset, chosen in sorted(by_dataset.items()):
        methods = sorted(chosen)
        stems = [{p.stem for p in (chosen[m].path / "overlays").glob("*.png")} for m in methods]
        ids = sorted(set.intersection(*stems))[:num_images]
        if not ids:
            log.warning("%s: the methods' runs share no overlay picture; no grid written", dataset)
            continue
        cells = []
        for image_id in ids:
            row = []
            for m in methods:
                with Image.open(chosen[m].path / "overlays" / f"{image_id}.png") as im:
                    row.append(np.asarray(im.convert("RGB")))
            cells.append(row)
        size = max(max(c.shape[0] for row in cells for c in row), min_size)
        grid = overlay_grid(cells, row_titles=ids, col_titles=methods, size=size)
        written.append(save_png(grid, Path(out_dir) / f"overlays_{dataset}.png"))
    return written
