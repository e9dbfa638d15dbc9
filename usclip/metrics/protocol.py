"""Metric protocols: the rules that turn masks into per-image Dice, IoU, HD95 and ASD values.

Two protocols, named in results files (``"metric_protocol"`` in ``results/test_metrics.json``, a column of
``results/test_per_image.csv``) so that numbers computed under different rules are never put in one table:

``"strict"`` (default)
    Every image counts. Empty masks follow an explicit policy (both empty: Dice = IoU = 1, distances 0; exactly
    one empty: Dice = IoU = 0, distances = the image diagonal). ASD is symmetric (over both boundaries). A pixel
    spacing, when given, is honoured.

``"authors"``
    The evaluation of the paper's released code (``MetricAccumulator`` in the authors' ``tools.py``), which
    calls MONAI per batch on the foreground channel (``include_background=False``) with MONAI's defaults:
    ``compute_dice`` / ``compute_iou`` with ``ignore_empty=True`` (NaN where the ground truth is empty),
    ``compute_hausdorff_distance(percentile=95)`` (symmetric, NaN / inf when a mask is empty) and
    ``compute_average_surface_distance`` with ``symmetric=False`` (directed, prediction -> ground truth), no
    spacing (pixels at the evaluated resolution, 224 x 224 in the paper), then keeps the per-image values and
    averages the finite ones (``np.mean`` / ``np.std`` over ``np.isfinite``). So an image with an empty ground
    truth never counts, and a missed lesion (empty prediction) counts as Dice 0 but vanishes from HD95 and ASD.
    Here the dropped values are NaN in the per-image table and left out of the means.

See docs/metrics.md for a worked comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from torch import Tensor

from usclip.metrics.functional import EmptyPolicy, SpacingLike, dice, iou, surface_distances

__all__ = [
    "METRIC_PROTOCOLS",
    "MetricProtocol",
    "ProtocolRules",
    "check_metric_protocol",
    "per_image_values",
    "protocol_rules",
]

log = logging.getLogger(__name__)

MetricProtocol = Literal["strict", "authors"]
METRIC_PROTOCOLS: tuple[MetricProtocol, ...] = get_args(MetricProtocol)


@dataclass(frozen=True)
class ProtocolRules:
    """What a protocol decides.

    Attributes:
        ignore_empty_target: Dice and IoU are NaN (left out of the mean) where the ground truth is empty
            (MONAI's ``ignore_empty=True``); otherwise they follow the fixed policy (1 both empty, 0 one empty).
        empty: policy of HD95 / ASD for empty masks (``"worst"``: diagonal / 0; ``"nan"``: left out).
        symmetric: default direction of ASD: both boundaries (``True``) or prediction -> ground truth.
        use_spacing: whether a pixel spacing is applied; ``False`` always reports pixels.
    """

    ignore_empty_target: bool
    empty: EmptyPolicy
    symmetric: bool
    use_spacing: bool


_RULES: dict[str, ProtocolRules] = {
    "strict": ProtocolRules(ignore_empty_target=False, empty="worst", symmetric=True, use_spacing=True),
    "authors": ProtocolRules(ignore_empty_target=True, empty="nan", symmetric=False, use_spacing=False),
}


def check_metric_protocol(value: object, name: str = "metric_protocol") -> MetricProtocol:
    """Return ``value`` as a protocol name, or raise naming the argument, the value and the choices.

    Args:
        value: the value received.
        name: the argument's name, for the message.

    Returns:
        ``value`` itself.

    Raises:
        ValueError: if ``value`` is not one of :data:`METRIC_PROTOCOLS`.
    """
    if value not in METRIC_PROTOCOLS:
        raise ValueError(
            f"`{name}` must be one of {list(METRIC_PROTOCOLS)} ('strict': every image counts, symmetric ASD; "
            f"'authors': the paper's code, non-finite values dropped, directed ASD), got {value!r}."
        )
    return value  # narrowed to MetricProtocol by the membership test


def protocol_rules(protocol: MetricProtocol) -> ProtocolRules:
    """The rules of a protocol (see :class:`ProtocolRules`).

    Raises:
        ValueError: for an unknown protocol.
    """
    return _RULES[check_metric_protocol(protocol, "protocol")]


def per_image_values(
    preds: Tensor,
    target: Tensor,
    protocol: MetricProtocol = "strict",
    include: Sequence[str] = ("dice", "iou", "hd95", "asd"),
    spacing: SpacingLike = None,
    percentile: float = 95.0,
    symmetric: bool | None = None,
) -> dict[str, Tensor]:
    """Per-image Dice, IoU, HD95 and ASD under a protocol.

    Args:
        preds: predicted masks (B, H, W), bool or integer (nonzero = foreground).
        target: ground-truth masks of the same shape.
        protocol: ``"strict"`` or ``"authors"`` (module docstring).
        include: which of ``"dice"``, ``"iou"``, ``"hd95"``, ``"asd"`` to compute.
        spacing: pixel spacing (see :func:`~usclip.metrics.functional.spacing_tensor`); ignored, with a warning,
            under ``"authors"``, whose distances are in pixels.
        percentile: percentile of the Hausdorff distance.
        symmetric: direction of ASD; ``None`` takes the protocol's (strict: symmetric, authors: directed).

    Returns:
        ``{name: float32 tensor (B,)}`` for each included metric; NaN marks a value the protocol leaves out.

    Raises:
        ValueError: on an unknown protocol or the errors of :mod:`usclip.metrics.functional`.
    """
    rules = protocol_rules(protocol)
    if spacing is not None and not rules.use_spacing:
        log.warning(
            "metric protocol %r reports distances in pixels (the authors pass no spacing): spacing=%r is ignored",
            protocol,
            spacing if not isinstance(spacing, Tensor) else tuple(spacing.shape),
        )
        spacing = None
    out: dict[str, Tensor] = {}
    if "dice" in include:
        out["dice"] = dice(preds, target, ignore_empty=rules.ignore_empty_target)
    if "iou" in include:
        out["iou"] = iou(preds, target, ignore_empty=rules.ignore_empty_target)
    if "hd95" in include or "asd" in include:
        distances = surface_distances(
            preds,
            target,
            spacing=spacing,
            percentile=percentile,
            symmetric=rules.symmetric if symmetric is None else symmetric,
            empty=rules.empty,
        )
        if "hd95" in include:
            out["hd95"] = distances.hd
        if "asd" in include:
            out["asd"] = distances.asd
    return out
