"""Samplers that make a run resumable bit for bit and evaluate each image exactly once under DDP.

**Training.** :class:`EpochSampler` shuffles with a seed derived from ``(seed, epoch)`` only (Lightning calls
``set_epoch`` at the start of every epoch) and yields ``(epoch, index)`` keys. :class:`EpochSeededDataset` turns a
key into a sample whose augmentation randomness is derived from ``(seed, epoch, index)``. Neither depends on how
much global random state earlier epochs consumed, nor on which worker serves the sample, so an epoch redone after a
resume (``--ckpt_path last``) sees exactly the order and augmentations it saw the first time. Under DDP the sampler
also shards, like :class:`torch.utils.data.DistributedSampler` (Lightning leaves subclasses of it in place).

**Mid-epoch resume.** A checkpoint written in the middle of an epoch records where the training loader stood
(:func:`training_position`: the epoch and the number of batches the loop had processed). The resumed process tells its
fresh sampler (:meth:`EpochSampler.resume_at`, through :func:`resume_sampler`), which then skips exactly those
``batches * batch_size`` keys of its shard in that epoch: the rest of the epoch is the tail of the uninterrupted order,
with the same augmentations, since both are pure functions of ``(seed, epoch, index)``.

**Evaluation.** :class:`EvalDistributedSampler` shards without padding: a plain ``DistributedSampler`` repeats
images to give every process the same count, which would count those images twice in the test metrics.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset, DistributedSampler

log = logging.getLogger(__name__)

__all__ = [
    "EpochSampler",
    "EpochSeededDataset",
    "EvalDistributedSampler",
    "build_sampler",
    "derive_seed",
    "resume_sampler",
    "training_position",
]


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
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, start: int) -> None:
        """Make the next pass over ``epoch`` start at position ``start`` of this process's shard.

        A mid-epoch resume: the interrupted run consumed the first ``start`` keys of the epoch (``batches *
        batch_size``). The request is used once, by the first pass over ``epoch``, and dropped by a pass over a later
        epoch; the length of the sampler stays the full epoch's (Lightning counts batches from the restored position).

        Raises:
            ValueError: if ``epoch`` or ``start`` is negative, or ``start`` is beyond this process's shard.
        """
        if epoch < 0 or not 0 <= start <= self.num_samples:
            raise ValueError(
                f"resume_at(epoch={epoch}, start={start}): expected epoch >= 0 and 0 <= start <= {self.num_samples} "
                "(the keys of this process's shard per epoch)"
            )
        self._resume = (epoch, start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        skip = 0
        if self._resume is not None:
            resume_epoch, start = self._resume
            skip = start if epoch == resume_epoch else 0
            if epoch >= resume_epoch:
                self._resume = None
        return ((epoch, int(i)) for i in itertools.islice(super().__iter__(), skip, None))


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


def training_position(trainer: Any) -> dict[str, int] | None:
    """Where the training loader stands in the middle of an epoch: ``{"epoch", "batches", "batch_size"}``, or ``None``.

    ``batches`` is the number of batches of the current epoch the loop has processed: a checkpoint written now
    resumes at that batch index (Lightning restores its counters; the sampler skips what they cover).
    ``global_step`` tells the loader of the resumed run from one built before the loop counters are restored, or by
    a later, unrelated ``fit`` of the same DataModule object. ``None`` when nothing is to be skipped on resume: no
    epoch under way or every batch of it processed (Lightning starts the next epoch), or a training loader that does
    not draw from an :class:`EpochSampler` (such runs redo the epoch).
    """
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or getattr(getattr(trainer, "state", None), "fn", None) != "fit":
        return None
    loader = trainer.train_dataloader
    sampler = getattr(loader, "sampler", None)
    batch_size = getattr(loader, "batch_size", None)
    if not isinstance(sampler, EpochSampler) or batch_size is None:
        return None
    processed = int(loop.epoch_loop.batch_progress.current.processed)
    if processed <= 0 or processed >= trainer.num_training_batches:
        return None
    return {
        "epoch": int(sampler.epoch),
        "batches": processed,
        "batch_size": int(batch_size),
        "global_step": int(trainer.global_step),
    }


def resume_sampler(sampler: Any, trainer: Any, batch_size: int, position: dict[str, int] | None) -> None:
    """Prepare a freshly built training ``sampler`` for the epoch ``trainer`` is about to run.

    Sets the sampler's epoch before the first iterator is created (with workers, creating it already draws keys,
    before Lightning calls ``set_epoch``), and, when the restored checkpoint was written in the middle of that epoch
    (``position`` from :func:`training_position`), skips the batches the interrupted run had processed.

    Args:
        sampler: the training loader's sampler (anything but an :class:`EpochSampler` is left alone).
        trainer: the Lightning trainer, after its checkpoint was restored.
        batch_size: the loader's batch size.
        position: the training position stored in the checkpoint, or ``None``.

    Raises:
        ValueError: if the batch size differs from the checkpoint's (the consumed keys would not line up).
    """
    loop = getattr(trainer, "fit_loop", None)
    if not isinstance(sampler, EpochSampler) or loop is None:
        return
    epoch = int(loop.epoch_progress.current.processed)
    sampler.set_epoch(epoch)
    if not position or position["epoch"] != epoch or position.get("global_step") != trainer.global_step:
        return
    if position["batch_size"] != batch_size:
        raise ValueError(
            f"data.batch_size={batch_size}, but the checkpoint was written in the middle of epoch {epoch} with "
            f"batch_size={position['batch_size']}: resume with the same batch size (or from an end-of-epoch checkpoint)"
        )
    sampler.resume_at(epoch, position["batches"] * batch_size)
    # this loader is resumable (the sampler skips); Lightning looks for state_dict() on the loader and would say not
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    log.info("resuming in the middle of epoch %d: skipping its first %d batches", epoch, position["batches"])
