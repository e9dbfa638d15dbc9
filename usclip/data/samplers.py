"""Samplers that make a run resumable bit for bit and evaluate each image exactly once under DDP.

**Training.** :class:`EpochSampler` shuffles with a seed derived from ``(seed, epoch)`` only (Lightning calls
``set_epoch`` at the start of every epoch) and yields ``(epoch, index)`` keys. :class:`EpochSeededDataset` turns a
key into a sample whose augmentation randomness is derived from ``(seed, epoch, index)``. Neither depends on how
much global random state earlier epochs consumed, nor on which worker serves the sample, so an epoch redone after a
resume (``--ckpt_path last``) sees exactly the order and augmentations it saw the first time. Under DDP the sampler
also shards, like :class:`torch.utils.data.DistributedSampler` (Lightning leaves subclasses of it in place).

**Evaluation.** :class:`EvalDistributedSampler` shards without padding: a plain ``DistributedSampler`` repeats
images to give every process the same count, which would count those images twice in the test metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["EpochSampler", "EpochSeededDataset", "EvalDistributedSampler", "build_sampler", "derive_seed"]


def derive_seed(*values: int) -> int:
    """A 32-bit seed that depends on every value and their order (NumPy ``SeedSequence`` mixing)."""
    if any(v < 0 for v in values):
        raise ValueError(f"seeds must be non-negative integers, got {values}")
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


class EpochSampler(DistributedSampler):
    """Shuffle by ``(seed, epoch)`` and yield ``(epoch, index)`` keys for :class:`EpochSeededDataset`.

    Args:
        dataset: the (wrapped) training dataset.
        seed: base seed of the order and of the augmentations.
        num_replicas: number of processes (``trainer.world_size``); 1 without DDP.
        rank: this process's rank (``trainer.global_rank``).
        drop_last: drop the tail instead of padding it with repeated images so that processes get equal shares.
    """

    def __init__(
        self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0, drop_last: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(i)) for i in super().__iter__())


class EpochSeededDataset(Dataset):
    """Serve ``(epoch, index)`` keys with augmentations seeded by ``(seed, epoch, index)``.

    The wrapped dataset's ``transform`` must be an albumentations ``Compose`` (it has ``set_random_seed``); a plain
    integer key serves the sample with the transform's current random state. Other attributes (``ids``, ...) are
    those of the wrapped dataset.

    Args:
        dataset: a dataset with a ``transform`` attribute (:class:`usclip.data.datasets.FolderDataset`).
        seed: base seed of the augmentations.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            epoch, index = key
            transform = getattr(self.dataset, "transform", None)
            if transform is not None and hasattr(transform, "set_random_seed"):
                transform.set_random_seed(derive_seed(self.seed, epoch, index))
            return self.dataset[index]
        return self.dataset[key]

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found on the wrapper: forward to the wrapped dataset
        if name == "dataset":  # not set yet (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EvalDistributedSampler(DistributedSampler):
    """Shard in order and without padding: every image is evaluated once, by one process.

    Process ``r`` of ``n`` gets indices ``r, r + n, r + 2n, ...`` (Lightning's ``UnrepeatedDistributedSampler``
    rule). Metrics that gather a ``cat`` state per image (``SegmentationMetrics``) then see each image exactly once.

    Args:
        dataset: the evaluation dataset.
        num_replicas: number of processes.
        rank: this process's rank.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        total = len(dataset)  # type: ignore[arg-type]
        self._indices = list(range(rank, total, num_replicas))
        self.num_samples = len(self._indices)
        self.total_size = total

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return self.num_samples


def build_sampler(
    dataset: Dataset, train: bool, seed: int | None, num_replicas: int = 1, rank: int = 0
) -> tuple[Dataset, DistributedSampler | None]:
    """The dataset to load from and its sampler (``None``: the DataLoader's own, and ``shuffle=train``).

    Args:
        dataset: the split's dataset.
        train: shuffled training split (:class:`EpochSampler` over :class:`EpochSeededDataset` when ``seed`` is set).
        seed: base seed; ``None`` keeps PyTorch's unseeded shuffling (not resumable bit for bit).
        num_replicas: number of processes.
        rank: this process's rank.
    """
    if train:
        if seed is None:
            return dataset, None
        wrapped = EpochSeededDataset(dataset, seed)
        return wrapped, EpochSampler(wrapped, seed, num_replicas=num_replicas, rank=rank)
    if num_replicas > 1:
        return dataset, EvalDistributedSampler(dataset, num_replicas=num_replicas, rank=rank)
    return dataset, None
