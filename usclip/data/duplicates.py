"""Near-duplicate images: repeated scans of one lesion that a random split would spread over train and test.

Each image is cropped to its scan area (so that identical screen layouts do not look alike), then reduced to two
signatures:

- a 32 x 32 area-downscaled thumbnail, compared by normalised cross-correlation (NCC, Pearson correlation of the
  pixels), which tolerates gain and contrast changes;
- a 16 x 16 average hash (aHash: bit = pixel above the thumbnail's mean), compared by Hamming distance, which
  tolerates small shifts and overlays such as calipers.

A pair is a duplicate when NCC >= ``ncc_threshold`` or the Hamming distance <= ``hash_distance`` (the rule used to
build ``../shared/data/BUSI/groups.csv``), or when the whole screens are nearly identical (NCC of the uncropped
thumbnails >= ``screen_threshold``: two crops of one scan can end at different depths when the deepest rows are
almost black). Comparing crops matters: on DDTI, different nodules recorded with the same screen layout reach
NCC 0.85-0.95 on the whole screen but 0.56-0.83 on the scan areas. Duplicates are joined into groups by
union-find (connected components), written as ``groups.csv`` (``id,group``), which the splits keep on one side.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from usclip._io import atomic_path, write_csv_atomic
from usclip.data.crop import find_scan_box
from usclip.data.imageio import read_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DuplicatePair:
    """Two ids that look like the same scan, with the scores that say so."""

    id_a: str
    id_b: str
    ncc: float
    hamming: int


def signatures(image: np.ndarray, crop: bool = True, size: int = 32, hash_size: int = 16) -> tuple[np.ndarray, ...]:
    """Signatures of one image: NCC vectors of the crop and of the whole screen, aHash bits of the crop.

    Returns:
        ``(ncc, ncc_screen, ahash)``: two zero-mean, unit-norm vectors of ``size**2`` values (the scan-area crop
        and the uncropped image) and ``hash_size**2`` booleans.
    """

    def ncc_vector(a: np.ndarray) -> np.ndarray:
        small = cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
        small -= small.mean()
        return small / max(float(np.linalg.norm(small)), 1e-6)

    screen = ncc_vector(image)
    if crop:
        x0, y0, x1, y1 = find_scan_box(image)
        image = image[y0:y1, x0:x1]
    tiny = cv2.resize(image, (hash_size, hash_size), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    return ncc_vector(image) if crop else screen, screen, tiny > tiny.mean()


def find_duplicates(
    images: Mapping[str, Path],
    ncc_threshold: float = 0.93,
    hash_distance: int = 6,
    screen_threshold: float = 0.98,
    crop: bool = True,
    block: int = 1024,
    progress: bool = False,
) -> list[DuplicatePair]:
    """All pairs of near-duplicate images.

    Every pair is compared (the search is exact), tile by tile: the upper triangle of the N x N score matrices
    in ``block x block`` tiles, three matrix products per tile (crop NCC, screen NCC, aHash agreement). Cost:
    N² / 2 x 4,608 floating-point operations (about 5.8e12 at 50,000 images); memory: the signatures, 9,216 bytes
    per image (461 MB at 50,000), plus a few ``block x block`` float32 tiles (4 MiB each at 1024), whatever N is.
    Figures: docs/benchmarks.md, "Scale".

    Args:
        images: id -> image file.
        ncc_threshold: NCC of the 32 x 32 scan-area thumbnails at or above which a pair is a duplicate.
        hash_distance: aHash Hamming distance (of 256 bits) at or below which a pair is a duplicate; -1 disables.
        screen_threshold: NCC of the uncropped thumbnails at or above which a pair is a duplicate; above 1
            disables.
        crop: compare the scan areas (recommended) rather than the whole screens.
        block: side of the tiles compared at once (memory grows with ``block²``, not with the number of images).
        progress: show progress bars while the images are read and compared (on a terminal only:
            ``tqdm(disable=None)``).

    Returns:
        The pairs, ``id_a < id_b``, sorted by decreasing NCC (of the crops).

    Raises:
        ValueError: if ``block`` is not a positive integer.
    """
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive int (side of the compared tiles), got {block!r}")
    ids = sorted(images)
    n = len(ids)
    if n < 2:
        return []
    disable = None if progress else True
    v = w = b = np.empty((0, 0), np.float32)
    for k, sid in enumerate(tqdm(ids, desc="reading images", unit="image", disable=disable)):
        ncc_vec, screen_vec, bits = signatures(read_image(images[sid]), crop)
        if k == 0:  # filled in place: no list of N signatures next to the stacked copy
            v = np.empty((n, ncc_vec.size), np.float32)
            w = np.empty((n, screen_vec.size), np.float32)
            b = np.empty((n, bits.size), np.float32)
        v[k], w[k], b[k] = ncc_vec, screen_vec, bits
    pairs = _compare_signatures(ids, v, w, b, ncc_threshold, hash_distance, screen_threshold, block, progress)
    pairs.sort(key=lambda p: (-p.ncc, p.id_a, p.id_b))
    log.info("%d duplicate pairs among %d images", len(pairs), n)
    return pairs


def _compare_signatures(
    ids: Sequence[str],
    v: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    ncc_threshold: float,
    hash_distance: int,
    screen_threshold: float,
    block: int,
    progress: bool = False,
) -> list[DuplicatePair]:
    """The duplicate pairs among N signatures (rows of ``v``, ``w``, ``b``), tile by tile over the upper triangle.

    Temporaries are ``block x block`` tiles whatever N is; every pair ``i < j`` is scored exactly once.
    """
    n = len(ids)
    ones = b.sum(axis=1)  # set bits per hash; Hamming = ones_a + ones_b - 2 a.b (integers, exact in float32)
    pairs: list[DuplicatePair] = []
    disable = None if progress else True
    for r0 in tqdm(range(0, n, block), desc="comparing", unit="block", disable=disable):
        r1 = min(r0 + block, n)
        for c0 in range(r0, n, block):  # upper triangle only: the scores are symmetric
            c1 = min(c0 + block, n)
            ncc = v[r0:r1] @ v[c0:c1].T  # (r, c)
            hit = ncc >= ncc_threshold
            ham = ones[r0:r1, None] + ones[None, c0:c1] - 2.0 * (b[r0:r1] @ b[c0:c1].T)
            if hash_distance >= 0:
                hit |= ham <= hash_distance
            hit |= (w[r0:r1] @ w[c0:c1].T) >= screen_threshold
            if c0 == r0:
                hit &= np.triu(np.ones(hit.shape, bool), k=1)  # diagonal tile: each pair once, never an image itself
            rows, cols = np.nonzero(hit)
            pairs += [
                DuplicatePair(ids[r0 + r], ids[c0 + c], float(ncc[r, c]), round(float(ham[r, c])))
                for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
            ]
    return pairs


def group_ids(ids: Iterable[str], pairs: Iterable[DuplicatePair | tuple[str, str]]) -> dict[str, str]:
    """Connected components of the duplicate pairs (union-find): id -> group ``g0000`` ... in order of ids."""
    parent = {i: i for i in sorted(ids)}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        a, b = (p.id_a, p.id_b) if isinstance(p, DuplicatePair) else p
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    names: dict[str, str] = {}
    out = {}
    for i in parent:
        root = find(i)
        names.setdefault(root, f"g{len(names):04d}")
        out[i] = names[root]
    return out


def group_pairs(groups: Mapping[str, str]) -> set[tuple[str, str]]:
    """Every pair of ids that share a group (``a < b``): the pairs a group-aware split keeps together."""
    members: dict[str, list[str]] = {}
    for i, g in groups.items():
        members.setdefault(g, []).append(i)
    return {(a, b) for m in members.values() for a, b in combinations(sorted(m), 2)}


def precision_recall(found: set[tuple[str, str]], reference: set[tuple[str, str]]) -> tuple[float, float]:
    """Precision and recall of ``found`` pairs against ``reference`` pairs (1.0 when a set is empty)."""
    hits = len(found & reference)
    precision = hits / len(found) if found else 1.0
    recall = hits / len(reference) if reference else 1.0
    return precision, recall


def write_groups_csv(groups: Mapping[str, str], path: str | Path, overwrite: bool = False) -> Path:
    """Write ``id,group`` rows (sorted by id).

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    write_csv_atomic(path, ["id", "group"], sorted(groups.items()))
    return path


def write_pairs_csv(pairs: Sequence[DuplicatePair], path: str | Path) -> Path:
    """Write the pairs as ``id_a,id_b,ncc32,ahash16_hamming`` (the columns of the shared ``duplicates.csv``)."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id_a", "id_b", "ncc32", "ahash16_hamming"])
        w.writerows([p.id_a, p.id_b, f"{p.ncc:.4f}", p.hamming] for p in pairs)
    return path
