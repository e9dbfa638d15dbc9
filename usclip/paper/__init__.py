"""The paper's published results and the layout of its Tables 2 and 3, as data.

``tables.csv`` (shipped with the package) is a copy of the paper's Table 2 (segmentation) and Table 3
(classification: zero-shot and supervised groups), one number a row:
``table,task,method,dataset,metric,value_percent_or_px``. Dice, IoU, Acc and AUC are percentages, HD95 and ASD
pixels (at 224 x 224, under the authors' metric protocol: non-finite values dropped, ASD directed prediction ->
ground truth). Every value is the mean of three runs; the paper gives no standard deviations.

:data:`TABLES` holds the layout ``usclip report`` follows: the row groups, methods, datasets and metrics in the
order the paper prints them. UNet and ResNet18 are reference rows (:data:`REFERENCE_METHODS`), not ranked.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib import resources

__all__ = [
    "METRIC_KEYS",
    "REFERENCE_METHODS",
    "TABLES",
    "PaperTable",
    "PublishedValue",
    "published",
    "published_lookup",
]

# the paper's metric names -> the keys of results/test_metrics.json
METRIC_KEYS = {"Dice": "dice", "IoU": "iou", "HD95": "hd95", "ASD": "asd", "Acc": "acc", "AUC": "auc"}
PIXEL_METRICS = frozenset({"hd95", "asd"})
REFERENCE_METHODS = frozenset({"UNet", "ResNet18"})


@dataclass(frozen=True)
class PaperTable:
    """The layout of one of the paper's result tables.

    Attributes:
        name: ``"table2"`` or ``"table3"``.
        title: the caption's first words.
        groups: row groups in print order (the ``task`` column of ``tables.csv``).
        methods: each group's methods in print order (the paper's names).
        datasets: column groups in print order (the paper's dataset names).
        metrics: metric keys under each dataset, in print order.
    """

    name: str
    title: str
    groups: tuple[str, ...]
    methods: dict[str, tuple[str, ...]]
    datasets: tuple[str, ...]
    metrics: tuple[str, ...]


_COMPARED_CLIPS = ("BioMedCLIP", "UniMedCLIP", "MetaCLIP", "DINOv2", "CLIP (Mona)", "CLIP (Mona, ft.)")
TABLES: dict[str, PaperTable] = {
    "table2": PaperTable(
        name="table2",
        title="Table 2: segmentation",
        groups=("segmentation",),
        methods={"segmentation": ("UNet", "CLIP (LoRA)", "CLIP (LoRA, ft.)", "CLIPSeg", *_COMPARED_CLIPS)},
        datasets=("LN-1", "LN-2", "BUSI", "DDTI", "TN3K", "Prostate"),
        metrics=("dice", "iou", "hd95", "asd"),
    ),
    "table3": PaperTable(
        name="table3",
        title="Table 3: classification",
        groups=("zero-shot", "supervised"),
        methods={
            "zero-shot": ("CLIP (vanilla)", "CLIP (LoRA)", "CLIP (LoRA, ft.)", "CLIP (Mona)", "CLIP (Mona, ft.)"),
            "supervised": ("ResNet18", "CLIP (LoRA)", "CLIP (LoRA, ft.)", *_COMPARED_CLIPS),
        },
        datasets=("LN-1", "LN-2", "BUSI"),
        metrics=("acc", "auc"),
    ),
}


@dataclass(frozen=True)
class PublishedValue:
    """One number of the paper's tables.

    Attributes:
        table: ``"table2"`` or ``"table3"``.
        task: the row group: ``"segmentation"``, ``"zero-shot"`` or ``"supervised"``.
        method: the paper's method name, e.g. ``"CLIP (Mona, ft.)"``.
        dataset: the paper's dataset name, e.g. ``"LN-2"``.
        metric: the paper's metric name (``Dice``, ``IoU``, ``HD95``, ``ASD``, ``Acc``, ``AUC``).
        value: as printed: percent for Dice/IoU/Acc/AUC, pixels for HD95/ASD.
    """

    table: str
    task: str
    method: str
    dataset: str
    metric: str
    value: float

    @property
    def metric_key(self) -> str:
        """The metric's key in ``results/test_metrics.json`` (``dice``, ``hd95``, ``acc``, ...)."""
        return METRIC_KEYS[self.metric]

    @property
    def unit(self) -> str:
        """``"%"`` or ``"px"``."""
        return "px" if self.metric_key in PIXEL_METRICS else "%"


@functools.cache
def published() -> tuple[PublishedValue, ...]:
    """Every number of the paper's Tables 2 and 3, in the file's order.

    Raises:
        ValueError: if the shipped ``tables.csv`` has a row that does not parse (a packaging error).
    """
    text = resources.files(__name__).joinpath("tables.csv").read_text(encoding="utf-8")
    rows = []
    for line, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        try:
            if row["metric"] not in METRIC_KEYS:
                raise ValueError(f"metric {row['metric']!r} is not one of {sorted(METRIC_KEYS)}")
            rows.append(
                PublishedValue(
                    table=row["table"],
                    task=row["task"],
                    method=row["method"],
                    dataset=row["dataset"],
                    metric=row["metric"],
                    value=float(row["value_percent_or_px"]),
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"usclip/paper/tables.csv line {line}: {err}") from err
    return tuple(rows)


@functools.cache
def published_lookup() -> dict[tuple[str, str, str, str, str], float]:
    """The published values by ``(table, task, method, dataset, metric key)``.

    E.g. ``("table2", "segmentation", "CLIP (Mona)", "BUSI", "dice")`` -> percent (pixels for HD95/ASD).
    """
    return {(v.table, v.task, v.method, v.dataset, v.metric_key): v.value for v in published()}
