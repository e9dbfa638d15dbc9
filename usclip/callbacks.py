"""Reliability callbacks attached to every task (``BaseTask.configure_callbacks``).

- :class:`SeedEachEpoch` reseeds Python, NumPy and torch at the start of every training epoch from
  ``(seed_everything seed, epoch)``. Lightning does not store global random state in checkpoints, so without this
  an epoch redone after ``--ckpt_path last`` would draw different dropout masks (and worker seeds) than the
  first time. Together with :mod:`usclip.data.samplers` a resumed run ends with the same weights and metrics.
- :class:`AtomicCheckpoints` writes checkpoints through a temporary file in their own folder and a rename, so a
  kill never leaves a truncated ``last.ckpt`` behind.
- :class:`SeedEachEpoch` also stores the run's seed in the checkpoint and restores it on resume.
- :class:`FiniteLossGuard` stops training at the first NaN or infinite training loss, before the backward pass
  and the optimiser step spoil the weights, with a message naming the step and what to try.
- :class:`OutOfMemoryAdvice` logs, once, what to change when a run runs out of (GPU or CPU) memory.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from usclip._io import atomic_path
from usclip.data.samplers import derive_seed

log = logging.getLogger(__name__)

__all__ = [
    "OUT_OF_MEMORY_ADVICE",
    "AtomicCheckpointIO",
    "AtomicCheckpoints",
    "FiniteLossGuard",
    "NonFiniteLossError",
    "OutOfMemoryAdvice",
    "SeedEachEpoch",
    "is_out_of_memory",
]

OUT_OF_MEMORY_ADVICE = (
    "out of memory. Try, one at a time: a smaller batch (--data.init_args.batch_size, e.g. half), recomputing "
    "encoder activations in the backward pass (--model.init_args.grad_checkpointing true), half precision "
    "(--trainer.precision bf16-mixed; 16-mixed on GPUs without bf16), fewer DataLoader workers or a smaller "
    "image cache (--data.init_args.num_workers, --data.init_args.cache_mb) when it is CPU memory, or a GPU to "
    "yourself (another process may hold memory: nvidia-smi)."
)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class SeedEachEpoch(Callback):
    """Reseed the global random generators at each training epoch start from ``(PL_GLOBAL_SEED, epoch)``.

    Does nothing when no seed was set (``seed_everything: false`` / ``null`` without a seed in the environment):
    such runs are not meant to be reproducible.
    """

    def state_dict(self) -> dict[str, Any]:
        """The run's seed travels in the checkpoint, so a resumed run shuffles and augments as the first one did."""
        base = os.environ.get("PL_GLOBAL_SEED")
        return {} if base is None else {"seed": int(base)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue with the seed of the run that wrote the checkpoint (restored before any data is loaded)."""
        seed = state_dict.get("seed")
        if seed is None:
            return
        current = os.environ.get("PL_GLOBAL_SEED")
        if current is not None and int(current) != seed:
            log.warning("resuming with the checkpoint's seed %d (this process was started with seed %s)", seed, current)
        os.environ["PL_GLOBAL_SEED"] = str(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        base = os.environ.get("PL_GLOBAL_SEED")
        if base is None:
            return
        seed = derive_seed(int(base), trainer.current_epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # all devices too


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, plus a temporary file in the checkpoint's own folder and a rename.

    Lightning writes through an fsspec transaction whose temporary file lives in the system temporary folder; when
    that is another file system the final move is a copy, and a kill during it leaves a truncated ``last.ckpt``.
    A full disk raises :class:`usclip._io.DiskFullError` naming the checkpoint and leaves the previous file intact.
    Remote paths (``s3://`` ...) keep Lightning's behaviour.
    """

    def save_checkpoint(  # noqa: D102
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path, what="checkpoint") as tmp:  # a full disk: DiskFullError, the old file intact
            super().save_checkpoint(checkpoint, Path(tmp), storage_options)


class AtomicCheckpoints(Callback):
    """Swap the strategy's default checkpoint writer for :class:`AtomicCheckpointIO` (a custom one is kept)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        strategy = trainer.strategy
        if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()


class FiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` when the training loss is NaN or infinite, before its backward pass.

    The check reads the loss value each step (one device synchronisation). The message names the step, the epoch
    and the batch, the last good checkpoint, and what to try. Under DDP the process that sees the bad loss stops
    and Lightning ends the others.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:  # noqa: D102
        if bool(torch.isfinite(loss.detach()).all()):
            return
        value = "NaN" if bool(torch.isnan(loss.detach()).any()) else "infinite"
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none yet"
        raise NonFiniteLossError(
            f"training loss is {value} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {trainer.fit_loop.epoch_loop.batch_idx}); training stopped before the weights were updated. "
            f"Try: a lower learning rate (--model.init_args.lr, now {lr}); --trainer.precision bf16-mixed or "
            "32-true instead of 16-mixed; gradient clipping (--trainer.gradient_clip_val 1.0); checking the "
            "inputs (usclip data check ROOT) and the labels or masks of that batch. "
            f"Last checkpoint: {last} (resume with --ckpt_path last)."
        )


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a CUDA/MPS/CPU out-of-memory error (``torch.OutOfMemoryError`` or its messages)."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "DefaultCPUAllocator: can't allocate memory" in text
    )


class OutOfMemoryAdvice(Callback):
    """Log :data:`OUT_OF_MEMORY_ADVICE` once when fit/validate/test/predict fails for lack of memory.

    The error itself still propagates (the run exits non-zero); nothing is retried.
    """

    def __init__(self) -> None:
        self.advised = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:  # noqa: D102
        if self.advised or not is_out_of_memory(exception):
            return
        self.advised = True
        batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        where = f" (batch size {batch}, precision {trainer.precision})" if batch is not None else ""
        log.error("%s: %s%s", type(exception).__name__, OUT_OF_MEMORY_ADVICE, where)
