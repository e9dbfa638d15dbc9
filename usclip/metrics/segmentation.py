"""Per-image segmentation metrics as a torchmetrics ``Metric``: Dice, IoU, HD95 and ASD with an empty-mask policy.

The values per image come from :mod:`usclip.metrics.functional` under a metric protocol
(:mod:`usclip.metrics.protocol`: ``"strict"`` or ``"authors"``); this class keeps them (one scalar per image and
metric), reports mean and standard deviation plus the counts of empty predictions and targets, and writes the
per-image table as CSV. See docs/metrics.md.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from usclip._io import atomic_path
from usclip.metrics.functional import SpacingLike, _check_masks, spacing_tensor
from usclip.metrics.protocol import MetricProtocol, check_metric_protocol, per_image_values, protocol_rules

__all__ = ["SEGMENTATION_METRICS", "SegmentationMetricName", "SegmentationMetrics"]

log = logging.getLogger(__name__)

SegmentationMetricName = Literal["dice", "iou", "hd95", "asd"]
SEGMENTATION_METRICS: tuple[SegmentationMetricName, ...] = ("dice", "iou", "hd95", "asd")
_FLAGS = ("empty_pred", "empty_target")


class SegmentationMetrics(Metric):
    """Dice, IoU, HD95 and ASD per image, reduced to mean and standard deviation over images.

    Every image is kept as one scalar per metric and nothing else (states are per-image columns reduced
    with ``"cat"``, so DDP gathers every image), which gives the per-image table (:meth:`per_image`,
    :meth:`write_csv`) and exact means over the whole test set.

    Under ``protocol="strict"`` (default) every image counts and empty masks follow an explicit policy: both
    empty -> Dice = IoU = 1 and distances 0; exactly one empty -> Dice = IoU = 0 and distances = the image
    diagonal (in spacing units); ASD is symmetric. Under ``protocol="authors"`` the values are those of the
    paper's released code (MONAI's defaults, non-finite values dropped): Dice and IoU are NaN where the ground
    truth is empty, HD95 and ASD where either mask is empty, ASD is directed (prediction -> ground truth) and
    distances are in pixels; NaN values stay in the per-image table and are left out of means and stds.
    ``compute()`` reports how many predictions and targets were empty under both.

    Standard deviations are population standard deviations (``numpy.std``'s default, ``ddof=0``).

    Example:
        >>> metric = SegmentationMetrics()
        >>> metric.update(preds, target)  # (B, H, W) bool or integer masks
        >>> metric.compute()["hd95"]
    """

    is_differentiable = False
    higher_is_better = None  # Dice / IoU up, distances down
    full_state_update = False

    def __init__(
        self,
        include: Sequence[SegmentationMetricName] = SEGMENTATION_METRICS,
        spacing: float | Sequence[float] | None = None,
        protocol: MetricProtocol = "strict",
        percentile: float = 95.0,
        symmetric: bool | None = None,
        defer_mb: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """Create the metric.

        Args:
            include: which of ``"dice"``, ``"iou"``, ``"hd95"``, ``"asd"`` to compute.
            spacing: default pixel spacing, one number or ``(row, column)``; ``None`` reports distances in
                pixels at the evaluated resolution. ``update`` can override it per batch. Ignored (with a
                warning) under ``protocol="authors"``, which reports pixels.
            protocol: metric protocol, ``"strict"`` or ``"authors"`` (see the class docstring and
                :mod:`usclip.metrics.protocol`); written into :meth:`write_csv`'s table.
            percentile: percentile of the Hausdorff distance (95 for HD95).
            symmetric: ASD over both boundaries (MONAI's ``symmetric=True``) or prediction to target only;
                ``None`` takes the protocol's (strict: symmetric, authors: directed).
            defer_mb: keep up to this many megabytes of masks (on their device) and compute their values in one
                go when the budget is full, at :meth:`compute`, :meth:`per_image`, a synchronisation or
                :meth:`sync`; 0 (default) computes each batch at ``update``. HD95 and ASD size their work from
                the boundary lengths, which waits on the device once per computation: deferring turns one host
                synchronisation per validation batch into one per validation (the tasks use it). The values are
                the same (the distances are exact integer arithmetic per image).
            **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

        Raises:
            ValueError: if ``include`` is empty or names an unknown metric, or ``spacing``/``percentile``/
                ``protocol`` is invalid.
        """
        super().__init__(**kwargs)
        include = tuple(include)
        unknown = [name for name in include if name not in SEGMENTATION_METRICS]
        if not include or unknown or len(set(include)) != len(include):
            raise ValueError(
                f"`include` must be a non-empty selection without repeats from {SEGMENTATION_METRICS}, got {include!r}."
            )
        self.protocol: MetricProtocol = check_metric_protocol(protocol, "protocol")
        self._use_spacing = protocol_rules(protocol).use_spacing
        if spacing is not None:
            spacing_tensor(spacing, 1)  # validate now rather than at the first update
            self._warn_spacing_ignored(spacing)
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"`percentile` must be in [0, 100], got {percentile}.")
        if not defer_mb >= 0.0:
            raise ValueError(f"`defer_mb` must be >= 0 megabytes (0: no deferral), got {defer_mb}.")
        self.defer_bytes = int(defer_mb * 2**20)
        #: masks kept for a later computation: (preds, target, index) bool/bool/long batches of one H x W
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.include: tuple[SegmentationMetricName, ...] = include
        self.spacing = spacing
        self.percentile = percentile
        self.symmetric = symmetric
        # One growing tensor per column rather than a list of per-batch tensors: a few long-lived allocations
        # instead of one per batch, which otherwise pin glibc heap pages between large temporaries and make
        # the resident size creep over a long test. Copying the column on each update costs O(images).
        self.add_state("index", default=torch.zeros(0, dtype=torch.long), dist_reduce_fx="cat")
        for name in (*include, *_FLAGS):
            self.add_state(name, default=torch.zeros(0), dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, index: Tensor | None = None, spacing: SpacingLike = None) -> None:
        """Add a batch of images.

        Args:
            preds: predicted binary masks (B, H, W), bool or integer (nonzero = foreground). Threshold or
                argmax logits before calling; any H x W works (e.g. masks mapped back to the original size).
            target: reference masks of the same shape.
            index: optional integer tensor (B,) of sample indices, stored to map rows of the per-image table
                to image ids; by default rows are numbered on from the number of images seen so far (pass it
                explicitly under DDP, where each process would count on its own).
            spacing: pixel spacing for this batch, overriding the one given at construction: one number,
                ``(row, column)`` or a tensor (B,) / (B, 2) of per-image spacings. Ignored under ``"authors"``.

        Raises:
            ValueError: on masks of the wrong shape or dtype, or an ``index`` that is not (B,) integers.
        """
        preds, target = _check_masks(preds, target)
        batch = preds.shape[0]
        if index is None:
            seen = self._column("index").numel() + sum(p[2].numel() for p in self._pending)
            index = torch.arange(seen, seen + batch, device=preds.device)
        elif not isinstance(index, Tensor) or index.shape != (batch,) or index.is_floating_point():
            raise ValueError(
                f"`index` must be an integer tensor of shape ({batch},) matching the batch of `preds`, got "
                f"{index.dtype if isinstance(index, Tensor) else type(index).__name__} of shape "
                f"{tuple(index.shape) if isinstance(index, Tensor) else '?'}."
            )
        if spacing is not None:
            self._warn_spacing_ignored(spacing)
        if self.defer_bytes and spacing is None:
            if self._pending and self._pending[0][0].shape[1:] != preds.shape[1:]:
                self.flush()  # batches of one mask size are computed together
            self._pending.append((preds.detach(), target.detach(), index.detach().long()))
            if sum(p.numel() + t.numel() for p, t, _ in self._pending) > self.defer_bytes:
                self.flush()
            return
        self.flush()  # keep the order of the columns
        self._add_values(preds, target, index, spacing)

    def flush(self) -> None:
        """Compute the values of the masks kept by ``defer_mb`` (one host synchronisation) and add them."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        preds, target, index = (torch.cat([p[k] for p in pending]) for k in range(3))
        self._add_values(preds, target, index, None)

    def _add_values(self, preds: Tensor, target: Tensor, index: Tensor, spacing: SpacingLike) -> None:
        """Compute the per-image values of a batch and append them to the columns."""
        spacing = self.spacing if spacing is None else spacing
        values = per_image_values(
            preds,
            target,
            protocol=self.protocol,
            include=self.include,
            spacing=spacing if self._use_spacing else None,
            percentile=self.percentile,
            symmetric=self.symmetric,
        )
        # The masks are validated by now. Flags are stored as float 0/1: bool does not gather on every backend.
        values["empty_pred"] = (~preds.bool().flatten(1).any(dim=1)).float()
        values["empty_target"] = (~target.bool().flatten(1).any(dim=1)).float()
        values["index"] = index.detach().long()
        for name in ("index", *self.include, *_FLAGS):
            column = self._column(name)
            setattr(self, name, torch.cat([column, values[name].detach().to(column)]))

    def _warn_spacing_ignored(self, spacing: SpacingLike) -> None:
        """Warn once per metric that a spacing is ignored by a protocol that reports pixels."""
        if self._use_spacing or getattr(self, "_spacing_warned", False):
            return
        self._spacing_warned = True
        shown = tuple(spacing.shape) if isinstance(spacing, Tensor) else spacing
        log.warning("metric protocol %r reports distances in pixels: spacing %r is ignored", self.protocol, shown)

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any | None = None) -> None:
        """Gather the columns as lists, which torchmetrics concatenates.

        Gathered tensor states are stacked, which fails when processes hold different numbers of images
        (evaluation shards without padding, ``usclip.data.samplers.EvalDistributedSampler``). Deferred masks are
        computed first.
        """
        self.flush()
        for name in self._reductions:
            state = getattr(self, name)
            if isinstance(state, Tensor):
                setattr(self, name, [state])
        if dist_sync_fn is None:
            super()._sync_dist(process_group=process_group)
        else:
            super()._sync_dist(dist_sync_fn, process_group)

    def _column(self, name: str) -> Tensor:
        """One state as a flat tensor; the list a synchronisation may leave is concatenated."""
        state = getattr(self, name)
        return dim_zero_cat(state) if isinstance(state, list) else state

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """Compute the deferred masks, then ``torchmetrics.Metric.sync`` (which ``compute`` also calls)."""
        self.flush()
        super().sync(*args, **kwargs)

    def reset(self) -> None:
        """Forget every image, the deferred masks included."""
        self._pending = []
        super().reset()

    def compute(self) -> dict[str, Tensor]:
        """Reduce over every image seen.

        Returns:
            A flat dict: for each included metric ``name`` its mean ``name`` and population standard deviation
            ``name_std`` (over finite values: under ``"authors"`` the images the protocol leaves out, NaN in the
            table, are skipped; NaN when no image is left),
            plus ``empty_preds`` and ``empty_targets``, the numbers of empty predicted and reference masks.
        """
        self.flush()
        out: dict[str, Tensor] = {}
        for name in self.include:
            values = self._column(name).double()
            finite = torch.isfinite(values)
            count = finite.sum()
            zeroed = torch.where(finite, values, 0.0)
            mean = zeroed.sum() / count  # NaN when nothing is finite
            var = torch.where(finite, (values - mean) ** 2, 0.0).sum() / count
            out[name] = mean.float()
            out[f"{name}_std"] = var.sqrt().float()
        out["empty_preds"] = self._column("empty_pred").sum().long()
        out["empty_targets"] = self._column("empty_target").sum().long()
        return out

    def per_image(self) -> dict[str, Tensor]:
        """The per-image table, sorted by sample index, gathered from every process under DDP.

        Returns:
            Columns of equal length N: ``index`` (int64), one float column per included metric (NaN where
            the protocol leaves a value out), ``empty_pred`` and ``empty_target`` (bool). Their finite
            means equal the means of :meth:`compute`.
        """
        self.flush()
        with self.sync_context(should_sync=not self._is_synced, should_unsync=True):
            columns = {name: self._column(name) for name in ("index", *self.include, *_FLAGS)}
        for name in _FLAGS:
            columns[name] = columns[name].bool()
        order = torch.argsort(columns["index"], stable=True)
        return {name: column[order] for name, column in columns.items()}

    def write_csv(self, path: str | os.PathLike[str], ids: Sequence[str] | None = None) -> Path:
        """Write the per-image table as CSV, atomically (temporary file in the same folder, then rename).

        Columns: ``index``, ``id`` (with ``ids``), the included metrics (``nan`` where the protocol leaves a value
        out), ``empty_pred``, ``empty_target`` (0/1) and ``metric_protocol`` (the same name on every row).

        Under DDP every process gathers the table; call this on rank zero only.

        Args:
            path: destination file; missing parent folders are created.
            ids: optional image ids looked up by sample index (``ids[index]``), written as an ``id`` column.

        Returns:
            The path written.

        Raises:
            ValueError: if a sample index falls outside ``ids``.
        """
        table = self.per_image()
        index = table["index"].tolist()
        header = ["index"]
        names: list[str] = []
        if ids is not None:
            bad = [i for i in index if not 0 <= i < len(ids)]
            if bad:
                raise ValueError(
                    f"`ids` has {len(ids)} entries but the table holds sample indices {bad[:5]}; pass one id per "
                    "sample index of the evaluated dataset."
                )
            header.append("id")
            names = [str(ids[i]) for i in index]
        header += [*self.include, *_FLAGS, "metric_protocol"]
        columns = [table[name].tolist() for name in (*self.include, *_FLAGS)]
        path = Path(path)
        with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for row, sample in enumerate(index):
                cells: list[object] = [sample, *([names[row]] if ids is not None else [])]
                cells += [int(col[row]) if isinstance(col[row], bool) else col[row] for col in columns]
                cells.append(self.protocol)
                writer.writerow(cells)
            handle.flush()
            os.fsync(handle.fileno())
        log.info("Wrote %d per-image rows to %s", len(index), path)
        return path
