"""Group-aware, label-stratified dataset splits and split files.

scikit-learn's ``StratifiedGroupKFold`` would do part of this but is not a dependency, and it yields folds rather
than an 8:1:1 split with fixed fractions, so the small greedy assignment below is written by hand.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from usclip._io import write_text_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_ids(
    ids: Sequence[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
    labels: Mapping[str, int] | None = None,
) -> dict[str, list[str]]:
    """Split ids into train/val/test, keeping each group on one side and stratifying by label.

    Groups (duplicate scans, patients) are assigned whole. Within each label stratum (a group's most common
    label), groups are shuffled with ``seed`` and each goes to the split furthest below its target size (targets
    and counts run over all strata, so every split gets its share of each label and the totals hit the fractions).

    Args:
        ids: sample ids.
        fractions: train, val and test fractions (normalised to sum to 1); a zero fraction gives an empty split.
        seed: shuffling seed.
        groups: id -> group; ids without a group form their own group.
        labels: id -> class index, for stratification.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted.

    Raises:
        ValueError: on negative fractions, a wrong number of fractions or an empty id list.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test), got {list(fractions)}")
    if not ids:
        raise ValueError("cannot split an empty list of ids")
    total = float(sum(fractions))
    frac = np.array(fractions, dtype=float) / total
    members: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        members[groups.get(i, f"__{i}") if groups else f"__{i}"].append(i)

    strata: dict[int, list[str]] = defaultdict(list)
    for g, m in members.items():
        if labels:
            vals = [labels[i] for i in m if i in labels]
            key = max(set(vals), key=vals.count) if vals else -1
        else:
            key = -1
        strata[key].append(g)

    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    counts = np.zeros(3)  # running totals across strata, so rounding does not drift per stratum
    done = 0
    for key in sorted(strata):
        group_names = sorted(strata[key])
        rng.shuffle(group_names)
        done += sum(len(members[g]) for g in group_names)
        target = frac * done
        for g in group_names:
            k = int(np.argmax(target - counts))
            counts[k] += len(members[g])
            out[SPLITS[k]].extend(members[g])
    return {s: sorted(v) for s, v in out.items()}


def subsample_ids(
    ids: Sequence[str], fraction: float, seed: int = 0, labels: Mapping[str, int] | None = None
) -> list[str]:
    """A seeded, label-stratified share of ``ids`` (few-shot training on 1 % ... 50 % of the training split).

    The total is ``round(fraction * len(ids))`` (at least 1); it is shared among labels by largest remainder,
    so each label keeps its proportion, and every label keeps at least one id when the total allows.

    Raises:
        ValueError: if ``fraction`` is not in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0 or not ids:
        return sorted(ids)
    strata: dict[int, list[str]] = defaultdict(list)
    for i in sorted(ids):
        strata[labels.get(i, -1) if labels else -1].append(i)
    keys = sorted(strata)
    total = max(1, round(fraction * len(ids)))
    exact = np.array([fraction * len(strata[k]) for k in keys])
    take = np.floor(exact).astype(int)
    if total >= len(keys):
        take = np.maximum(take, 1)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    j = 0
    while take.sum() < total:
        k = order[j % len(keys)]
        if take[k] < len(strata[keys[k]]):
            take[k] += 1
        j += 1
    while take.sum() > total:  # the minimum of one per label overshot: trim the largest strata
        take[int(np.argmax(take))] -= 1
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for k, n in zip(keys, take, strict=True):
        out += rng.choice(strata[k], size=int(n), replace=False).tolist()
    return sorted(out)


def read_split_file(path: str | Path) -> list[str]:
    """Ids listed in a split file (one per line; blank lines and ``#`` comments ignored)."""
    lines = Path(path).read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def write_splits(splits: Mapping[str, Sequence[str]], directory: str | Path) -> Path:
    """Write ``<split>.txt`` files (one id per line) into ``directory``; returns the directory."""
    directory = Path(directory)
    for name, ids in splits.items():
        write_text_atomic(directory / f"{name}.txt", "".join(f"{i}\n" for i in ids))
    return directory


def validate_split_files(splits: Mapping[str, Sequence[str]], files: Mapping[str, Path], ids: Sequence[str]) -> None:
    """Check predefined split files against the dataset: every id exists and no id is in two splits.

    Args:
        splits: split name -> ids read from its file.
        files: split name -> the file, for messages.
        ids: the dataset's ids.

    Raises:
        ValueError: naming the split file and the ids that have no image or appear twice.
    """
    known = set(ids)
    seen: dict[str, str] = {}
    for name, members in splits.items():
        unknown = [i for i in members if i not in known]
        if unknown:
            raise ValueError(
                f"{files[name]}: {len(unknown)} ids have no image in the dataset: {unknown[:5]}; "
                "remove them from the split file or add the images"
            )
        for i in members:
            if i in seen:
                where = "twice" if seen[i] == name else f"in {files[seen[i]]} too"
                raise ValueError(f"{files[name]}: id {i!r} is listed {where}; an id belongs to one split")
            seen[i] = name


def groups_across_splits(splits: Mapping[str, Sequence[str]], groups: Mapping[str, str]) -> dict[str, list[str]]:
    """Groups whose members lie in more than one split: group -> the splits it spans (empty when none)."""
    where: dict[str, set[str]] = defaultdict(set)
    for name, members in splits.items():
        for i in members:
            if i in groups:
                where[groups[i]].add(name)
    return {g: sorted(s) for g, s in sorted(where.items()) if len(s) > 1}
