"""Segmentation metrics on batches of binary masks: Dice, IoU, HD95 and ASD.

The distance metrics reproduce MONAI's definitions (``monai.metrics.compute_hausdorff_distance`` and
``compute_average_surface_distance`` with the Euclidean metric, MONAI 1.6) to float32 precision, but run
batched on the masks' own device instead of one image at a time on the host. See ``docs/metrics.md`` for
the definitions, the empty-mask policy and the units.

How the distances are computed (written by hand: neither MONAI, torchmetrics nor scipy offers a batched,
device-resident surface distance):

1. Boundary = mask minus its erosion by a cross-shaped element, with zeros outside the image (scipy's
   ``binary_erosion`` default, which is what MONAI's ``get_mask_edges`` uses).
2. The boundary pixels of every image are gathered with one ``nonzero`` and padded into a
   (B, 2, L, 2) coordinate tensor. Boundaries are short (a lesion at 224 x 224 has a few hundred boundary
   pixels), so the exact nearest-boundary distance is a brute-force minimum over all pairs: batched
   matrix products of augmented integer coordinates per group of similar-sized images (exact integer
   arithmetic in float32; a spacing scales the per-axis terms), reduced along both axes to get both
   directions at once.
3. The percentile per image and direction is ``torch.nanquantile`` over the NaN-padded rows, which is
   ``torch.quantile`` (what MONAI calls) on the real values; the mean is a float64 sum.

MONAI (1.6) instead loops over images on the host, crops, erodes with scipy and queries a KD-tree per image.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "EmptyPolicy",
    "SpacingLike",
    "SurfaceDistances",
    "asd",
    "boundaries",
    "dice",
    "hd95",
    "iou",
    "spacing_tensor",
    "surface_distances",
]

EmptyPolicy = Literal["worst", "nan"]
SpacingLike = float | Sequence[float] | Tensor | None

_EMPTY_POLICIES = ("worst", "nan")
# Upper bound on the elements of one block of pairwise squared distances (images x rows x columns; 16 MiB).
_CHUNK_ELEMENTS = 1 << 22
# Largest side for which float32 squared distances from 2-D integer coordinates stay exact (below 2**24).
_MAX_EXACT_SIZE = 1024


class SurfaceDistances(NamedTuple):
    """Per-image surface distances, each of shape (B,), in pixels or in spacing units."""

    hd: Tensor
    """Hausdorff distance at the requested percentile: the larger of the two directed percentiles."""
    asd: Tensor
    """Average surface distance (symmetric: over both boundaries; directed: prediction to target)."""


def _check_masks(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a pair of mask batches and return them as bool tensors of shape (B, H, W)."""
    for name, x in (("preds", preds), ("target", target)):
        if not isinstance(x, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor of shape (B, H, W), got {type(x).__name__}.")
        if x.ndim != 3:
            raise ValueError(
                f"`{name}` must be a batch of masks of shape (B, H, W), got shape {tuple(x.shape)}; "
                f"add a batch dimension (`{name}[None]`) for a single mask, or take the foreground channel "
                "of one-hot masks."
            )
        if x.is_floating_point() or x.is_complex():
            raise ValueError(
                f"`{name}` must be a bool or integer mask (nonzero = foreground), got dtype {x.dtype}; "
                "threshold probabilities first, e.g. `probs > 0.5`."
            )
    if preds.shape != target.shape:
        raise ValueError(
            f"`preds` and `target` must have the same shape, got {tuple(preds.shape)} and {tuple(target.shape)}."
        )
    if preds.device != target.device:
        raise ValueError(f"`preds` and `target` must be on the same device, got {preds.device} and {target.device}.")
    return preds.bool(), target.bool()


def _check_empty(empty: str) -> None:
    if empty not in _EMPTY_POLICIES:
        raise ValueError(f"`empty` must be one of {_EMPTY_POLICIES}, got {empty!r}.")


def spacing_tensor(spacing: SpacingLike, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Normalise a pixel spacing to a float32 tensor of shape (B, 2) holding (row, column) spacings.

    Args:
        spacing: ``None`` (1 pixel), one number (isotropic), a pair ``(row_spacing, col_spacing)`` in (H, W)
            order like MONAI's, or a tensor of shape (), (2,), (B,) or (B, 2) for per-image spacings.
        batch_size: number of images B.
        device: device of the result.

    Returns:
        Tensor of shape (B, 2).

    Raises:
        ValueError: if the spacing has another shape, or a Python spacing is not positive and finite.
    """
    if spacing is None:
        return torch.ones(batch_size, 2, device=device)
    if isinstance(spacing, Tensor):
        s = spacing.detach().to(device=device, dtype=torch.float32)
        if s.ndim == 0 or s.shape == (1,):
            return s.reshape(1, 1).expand(batch_size, 2)
        if s.shape == (2,):
            return s.reshape(1, 2).expand(batch_size, 2)
        if s.shape == (batch_size,):
            return s.reshape(batch_size, 1).expand(batch_size, 2)
        if s.shape == (batch_size, 2):
            return s
        raise ValueError(
            f"`spacing` tensor must have shape (), (2,), ({batch_size},) or ({batch_size}, 2), got {tuple(s.shape)}."
        )
    values = [float(spacing)] if isinstance(spacing, int | float) else [float(v) for v in spacing]
    if len(values) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"`spacing` must be one positive number or a pair (row_spacing, col_spacing) of positive numbers, "
            f"got {spacing!r}."
        )
    row, col = values if len(values) == 2 else values * 2
    return torch.tensor([[row, col]], dtype=torch.float32, device=device).expand(batch_size, 2)


def dice(preds: Tensor, target: Tensor, ignore_empty: bool = False) -> Tensor:
    """Dice coefficient 2|P ∩ T| / (|P| + |T|) per image.

    Args:
        preds: predicted masks (B, H, W), bool or integer (nonzero = foreground).
        target: reference masks (B, H, W), same shape.
        ignore_empty: NaN wherever the target is empty (MONAI's ``ignore_empty=True``, used by the "authors"
            metric protocol), instead of 1 (both empty) or 0 (only the target empty).

    Returns:
        Float32 tensor (B,) on the input's device; 1 where both masks are empty, 0 where exactly one is
        (unless ``ignore_empty``).
    """
    p, t = _check_masks(preds, target)
    inter = (p & t).sum((1, 2)).float()
    total = (p.sum((1, 2)) + t.sum((1, 2))).float()
    out = torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), torch.ones_like(total))
    return _ignore_empty_target(out, t) if ignore_empty else out


def iou(preds: Tensor, target: Tensor, ignore_empty: bool = False) -> Tensor:
    """Intersection over union (Jaccard index) |P ∩ T| / |P ∪ T| per image.

    Args:
        preds: predicted masks (B, H, W), bool or integer (nonzero = foreground).
        target: reference masks (B, H, W), same shape.
        ignore_empty: NaN wherever the target is empty (MONAI's ``ignore_empty=True``), as for :func:`dice`.

    Returns:
        Float32 tensor (B,) on the input's device; 1 where both masks are empty, 0 where exactly one is
        (unless ``ignore_empty``).
    """
    p, t = _check_masks(preds, target)
    inter = (p & t).sum((1, 2)).float()
    union = (p | t).sum((1, 2)).float()
    out = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))
    return _ignore_empty_target(out, t) if ignore_empty else out


def _ignore_empty_target(values: Tensor, target: Tensor) -> Tensor:
    """``values`` (B,) with NaN where the bool target (B, H, W) is empty."""
    return torch.where(target.flatten(1).any(dim=1), values, math.nan)


def boundaries(masks: Tensor) -> Tensor:
    """Boundary pixels: the mask minus its erosion by a cross-shaped (4-connected) element.

    Pixels outside the image count as background, so foreground pixels on the image border are boundary
    pixels (scipy's ``binary_erosion`` default, as used by MONAI's ``get_mask_edges``).

    Args:
        masks: masks (B, H, W), bool or integer (nonzero = foreground).

    Returns:
        Bool tensor (B, H, W).
    """
    m, _ = _check_masks(masks, masks)
    return _padded_boundaries(m)[:, 1:-1, 1:-1]


def _padded_boundaries(m: Tensor) -> Tensor:
    """Boundaries of bool masks (B, H, W), returned zero-padded by one pixel: bool (B, H+2, W+2), contiguous.

    The erosion runs on the flattened padded batch, where the four neighbours are contiguous shifted slices
    (about twice as fast as strided 2-D slices); the padding itself is background, so it is never boundary.
    """
    b, h, w = m.shape
    flat = torch.nn.functional.pad(m.view(torch.uint8), (1, 1, 1, 1)).view(-1)  # (B * (H+2) * (W+2),)
    row = w + 2
    first, n = row + 1, flat.numel() - 2 * row - 2
    eroded = flat[first : first + n] & flat[first - 1 : first - 1 + n]
    for offset in (1, -row, row):
        eroded &= flat[first + offset : first + offset + n]
    edge = flat.clone()
    edge[first : first + n] ^= eroded  # eroded is a subset of the mask
    return edge.view(torch.bool).view(b, h + 2, w + 2)


def _plan_chunks(sizes: list[list[int]], budget: int) -> list[list[int]]:
    """Group images with two non-empty boundaries so each group's padded distance matrices stay small.

    Images are sorted by their larger boundary, so images of similar size share a group and padding wastes
    little; a group grows while ``images x max N x max M`` stays within ``budget``.

    Args:
        sizes: per image, the boundary pixel counts ``[N, M]`` of prediction and target.
        budget: element budget of one group's distance matrices.

    Returns:
        Lists of image indices.
    """
    order = sorted((i for i, (n, m) in enumerate(sizes) if n and m), key=lambda i: max(sizes[i]))
    chunks: list[list[int]] = []
    current: list[int] = []
    rows = cols = 0
    for i in order:
        n, m = sizes[i]
        if current and (len(current) + 1) * max(rows, n) * max(cols, m) > budget:
            chunks.append(current)
            current, rows, cols = [], 0, 0
        current.append(i)
        rows, cols = max(rows, n), max(cols, m)
    if current:
        chunks.append(current)
    return chunks


def _augment(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """Augmented coordinates whose batched product is the squared distance ``|a|^2 + |b|^2 - 2 a.b``.

    Args:
        src: coordinates (C, N, k).
        dst: coordinates (C, M, k).

    Returns:
        (C, N, k + 2) and (C, k + 2, M).
    """
    ones_src = src.new_ones((*src.shape[:-1], 1))
    ones_dst = dst.new_ones((*dst.shape[:-1], 1))
    src_aug = torch.cat([-2.0 * src, (src * src).sum(-1, keepdim=True), ones_src], dim=-1)
    dst_aug = torch.cat([dst, ones_dst, (dst * dst).sum(-1, keepdim=True)], dim=-1)
    return src_aug, dst_aug.transpose(1, 2)


@contextlib.contextmanager
def _full_float32_matmul() -> Iterator[None]:
    """Run float32 matrix products at full precision whatever ``torch.set_float32_matmul_precision`` says.

    The distance products below are exact only in true float32: with TF32 (``"high"``, which Lightning suggests on
    every tensor-core GPU) or bfloat16 passes (``"medium"``) HD95 moved by up to 1.8 px on an H200
    (docs/benchmarks.md). The global setting is restored on exit.
    """
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _nearest(src: Tensor, dst: Tensor, ratio: Tensor | None, budget: int) -> tuple[Tensor, Tensor]:
    """Squared distance from each point of ``src`` to the nearest point of ``dst`` and back, in blocks of rows.

    Squared distances come from batched matrix products of augmented integer pixel coordinates. Every term is
    an integer below 2**24, so float32 is exact (``torch.cdist`` is not: its direct mode is off by up to 1e-2
    in the squared distance, its matrix-product mode loses more with non-integer coordinates). Anisotropic
    spacing is applied as ``ratio * dy**2 + dx**2`` on the exact per-axis products (units of the column
    spacing squared), so coincident points still give exactly 0.

    Args:
        src: integer pixel coordinates (C, N, 2), (row, column).
        dst: integer pixel coordinates (C, M, 2).
        ratio: per-image ``(row_spacing / col_spacing) ** 2`` (C,), or ``None`` for isotropic pixels.
        budget: element budget of one block of the (C, rows, M) distance matrix.

    Returns:
        Minimum squared distances (C, N) from ``src`` to ``dst`` and (C, M) from ``dst`` to ``src``.
    """
    c, n, _ = src.shape
    m = dst.shape[1]
    if ratio is None:
        both_src, both_dst = _augment(src, dst)
    else:
        row_src, row_dst = _augment(src[..., :1], dst[..., :1])
        col_src, col_dst = _augment(src[..., 1:], dst[..., 1:])
        row_scale = ratio.to(src.dtype).view(c, 1, 1)
    step = max(1, budget // (c * m))
    to_dst: list[Tensor] = []
    to_src: Tensor | None = None
    for start in range(0, n, step):
        rows = slice(start, start + step)
        if ratio is None:
            d2 = torch.bmm(both_src[:, rows], both_dst)  # (C, rows, M)
        else:
            d2 = torch.bmm(row_src[:, rows], row_dst).mul_(row_scale).baddbmm_(col_src[:, rows], col_dst)
        to_dst.append(d2.amin(dim=2))
        block = d2.amin(dim=1)
        to_src = block if to_src is None else torch.minimum(to_src, block)
    assert to_src is not None  # n > 0 for every planned chunk
    return torch.cat(to_dst, dim=1), to_src


def _sqrt(squared: Tensor, scale: Tensor) -> Tensor:
    """``sqrt(squared * scale)`` per image, taken in float64 where available, returned as float32.

    torch's float32 CPU ``sqrt`` is not always correctly rounded (``sqrt(545)`` comes out one ulp low), while
    MONAI's distances are float64 square roots rounded to float32; this matches them bit for bit.

    Args:
        squared: squared distances (C, N).
        scale: per-image factor (C,), the squared column spacing.
    """
    if squared.device.type != "mps":
        squared, scale = squared.double(), scale.double()
    return (squared.clamp_min(0) * scale.view(-1, 1)).sqrt().float()


def surface_distances(
    preds: Tensor,
    target: Tensor,
    spacing: SpacingLike = None,
    percentile: float = 95.0,
    symmetric: bool = True,
    empty: EmptyPolicy = "worst",
) -> SurfaceDistances:
    """Percentile Hausdorff distance and average surface distance from one distance computation.

    Distances run between boundary pixels (see :func:`boundaries`): for each boundary pixel of one mask, the
    Euclidean distance to the nearest boundary pixel of the other mask. ``hd`` is the larger of the two
    directed ``percentile``-th percentiles (linear interpolation); ``asd`` is the mean over the boundary pixels
    of both masks (``symmetric=True``) or over the prediction's only. These equal MONAI's
    ``compute_hausdorff_distance(percentile=...)`` and ``compute_average_surface_distance(symmetric=...)``.

    Empty masks: both empty -> 0; exactly one empty -> the image diagonal ``hypot(H * sy, W * sx)`` with
    ``empty="worst"``, or NaN with ``empty="nan"``, which then also gives NaN where both are empty (MONAI
    returns inf or NaN in all these cases; see docs/metrics.md).

    The computation stays on the masks' device and synchronises with the host once per call (the boundary
    sizes, which set the padding); memory is bounded by grouping images and blocking rows.

    Args:
        preds: predicted masks (B, H, W), bool or integer (nonzero = foreground).
        target: reference masks (B, H, W), same shape.
        spacing: pixel spacing, see :func:`spacing_tensor`; ``None`` gives distances in pixels.
        percentile: percentile in [0, 100] for ``hd``; 100 gives the plain Hausdorff distance.
        symmetric: average over both boundaries (``True``) or from the prediction's boundary only.
        empty: policy for empty masks, ``"worst"`` or ``"nan"``.

    Returns:
        ``SurfaceDistances(hd, asd)``, float32 tensors (B,) on the input's device.

    Raises:
        ValueError: on masks of the wrong shape or dtype, a bad spacing, percentile or policy.
    """
    p, t = _check_masks(preds, target)
    _check_empty(empty)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"`percentile` must be in [0, 100], got {percentile}.")
    b, h, w = p.shape
    device = p.device
    sp = spacing_tensor(spacing, b, device)  # (B, 2): row, column spacing
    if b == 0:
        return SurfaceDistances(torch.zeros(0, device=device), torch.zeros(0, device=device))
    diagonal = torch.hypot(h * sp[:, 0], w * sp[:, 1])  # (B,)

    edges = _padded_boundaries(torch.stack((p, t), dim=1).view(b * 2, h, w))  # (2B, H+2, W+2), 0: pred, 1: target
    qb, qc, qi, qx = edges.view(b, 2, h + 2, w + 2).nonzero(as_tuple=True)  # sorted by image, then mask
    segment = qb * 2 + qc
    flat_counts = torch.bincount(segment, minlength=2 * b)
    counts = flat_counts.view(b, 2)  # boundary pixels; 0 only for an empty mask
    # Host synchronisation (with nonzero's): padding and grouping depend on the boundary sizes.
    sizes = counts.tolist()
    longest = max([1, *(max(s) for s in sizes)])

    # Integer boundary coordinates, padded per (image, mask): (B, 2, L, 2). Padding sits at
    # (-2 diagonal, -2 diagonal) pixels, farther from every pixel than any two pixels are from each other.
    pos = torch.arange(qb.shape[0], device=device) - (flat_counts.cumsum(0) - flat_counts)[segment]
    # float32 products of integer coordinates are exact up to _MAX_EXACT_SIZE (2D) or twice that per axis.
    separable = max(h, w) > _MAX_EXACT_SIZE or not (spacing is None or isinstance(spacing, int | float))
    big = max(h, w) > 2 * _MAX_EXACT_SIZE and device.type != "mps"
    dtype = torch.float64 if big else torch.float32
    pad = -2.0 * math.hypot(h, w)
    coords = torch.full((b, 2, longest, 2), pad, device=device, dtype=dtype)
    coords[qb, qc, pos] = torch.stack((qi, qx), dim=1).to(dtype) - 1.0  # undo the padding offset
    ratio = (sp[:, 0] / sp[:, 1]) ** 2  # (B,) row spacing relative to column spacing, squared
    col2 = sp[:, 1] ** 2  # (B,) squared column spacing: the unit of the squared distances

    # Nearest-boundary distances, padded with NaN: (B, 2, L); [:, 0] prediction -> target, [:, 1] back.
    dist = torch.full((b, 2, longest), math.nan, device=device)
    for chunk in _plan_chunks(sizes, _CHUNK_ELEMENTS):
        n = max(sizes[i][0] for i in chunk)
        m = max(sizes[i][1] for i in chunk)
        idx = torch.tensor(chunk, device=device)
        with _full_float32_matmul():
            to_target, to_pred = _nearest(
                coords[idx, 0, :n], coords[idx, 1, :m], ratio[idx] if separable else None, _CHUNK_ELEMENTS
            )
        dist[idx, 0, :n] = _sqrt(to_target, col2[idx])
        dist[idx, 1, :m] = _sqrt(to_pred, col2[idx])
    valid = torch.arange(longest, device=device) < counts.unsqueeze(-1)  # (B, 2, L)
    dist = torch.where(valid, dist, math.nan)  # padding inside a chunk holds distances to the padding

    # torch.nanquantile on NaN-padded rows is torch.quantile on the real values, which MONAI calls.
    hd = torch.nanquantile(dist, percentile / 100.0, dim=2).amax(dim=1)
    # float64 sums: a float32 running sum over thousands of distances drifts by more than 1e-4.
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    sums = torch.where(valid, dist, 0.0).to(acc_dtype).sum(dim=2)  # (B, 2)
    if symmetric:
        mean = (sums.sum(dim=1) / counts.sum(dim=1).clamp_min(1)).float()
    else:
        mean = (sums[:, 0] / counts[:, 0].clamp_min(1)).float()

    empty_pred, empty_target = counts[:, 0] == 0, counts[:, 1] == 0
    if empty == "worst":
        fill = torch.where(empty_pred & empty_target, torch.zeros_like(diagonal), diagonal)
    else:
        fill = torch.full((b,), math.nan, device=device)
    either = empty_pred | empty_target
    return SurfaceDistances(torch.where(either, fill, hd), torch.where(either, fill, mean))


def hd95(
    preds: Tensor,
    target: Tensor,
    spacing: SpacingLike = None,
    percentile: float = 95.0,
    empty: EmptyPolicy = "worst",
) -> Tensor:
    """95th-percentile Hausdorff distance per image (MONAI's ``compute_hausdorff_distance(percentile=95)``).

    The larger of the two directed 95th percentiles of boundary-to-boundary distances; see
    :func:`surface_distances` for the definition, the empty-mask policy and the arguments.

    Args:
        preds: predicted masks (B, H, W), bool or integer (nonzero = foreground).
        target: reference masks (B, H, W), same shape.
        spacing: pixel spacing; ``None`` gives pixels.
        percentile: percentile in [0, 100].
        empty: ``"worst"`` (image diagonal when one mask is empty) or ``"nan"``.

    Returns:
        Float32 tensor (B,) on the input's device.
    """
    return surface_distances(preds, target, spacing=spacing, percentile=percentile, empty=empty).hd


def asd(
    preds: Tensor,
    target: Tensor,
    spacing: SpacingLike = None,
    symmetric: bool = True,
    empty: EmptyPolicy = "worst",
) -> Tensor:
    """Average surface distance per image (MONAI's ``compute_average_surface_distance``).

    Mean boundary-to-boundary distance over the boundary pixels of both masks (``symmetric=True``) or of the
    prediction only; see :func:`surface_distances` for the definition, the empty-mask policy and the arguments.

    Args:
        preds: predicted masks (B, H, W), bool or integer (nonzero = foreground).
        target: reference masks (B, H, W), same shape.
        spacing: pixel spacing; ``None`` gives pixels.
        symmetric: average over both boundaries, or from the prediction's boundary only.
        empty: ``"worst"`` (image diagonal when one mask is empty) or ``"nan"``.

    Returns:
        Float32 tensor (B,) on the input's device.
    """
    return surface_distances(preds, target, spacing=spacing, symmetric=symmetric, empty=empty).asd
