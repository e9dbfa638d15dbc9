"""Reliability callbacks attached to every task (``BaseTask.configure_callbacks``).

- :class:`SeedEachEpoch` reseeds Python, NumPy and torch at the start of every training epoch from
  ``(seed_everything seed, epoch)`` and before every training batch from ``(seed, epoch, batch)``. Lightning does not
  store global random state in checkpoints, so without this a run resumed after ``--ckpt_path last`` (at an epoch
  boundary or in the middle of an epoch) would draw different dropout masks than the first time. Together with
  :mod:`usclip.data.samplers` a resumed run ends with the same weights and metrics.
- :class:`MidEpochCheckpoint` writes ``checkpoints/last.ckpt`` in the middle of epochs (every N optimiser steps or M
  minutes), and under SLURM saves it and requeues the job when the preemption signal arrives; the requeued job
  continues in the same run folder (:mod:`usclip._resume`).
- :class:`AtomicCheckpoints` writes checkpoints through a temporary file in their own folder and a rename, so a
  kill never leaves a truncated ``last.ckpt`` behind.
- :class:`SeedEachEpoch` also stores the run's seed in the checkpoint and restores it on resume.
- :class:`FiniteLossGuard` stops training at the first NaN or infinite training loss, before the backward pass
  and the optimiser step spoil the weights, with a message naming the step and what to try.
- :class:`OutOfMemoryAdvice` logs, once, what to change when a run runs out of (GPU or CPU) memory.
- :class:`ValidateOnEpochs` validates after exactly the epochs the authors' training loops validate (``epoch > 0 and
  epoch % 10 == 0``, counted from 0), which ``Trainer(check_val_every_n_epoch=...)`` cannot express.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from usclip._io import atomic_path, write_text_atomic
from usclip.data.samplers import EpochSampler, derive_seed, resume_sampler
from usclip.run_dirs import run_dir_of

log = logging.getLogger(__name__)

__all__ = [
    "EXIT_REQUEUED",
    "OUT_OF_MEMORY_ADVICE",
    "SLURM_MARKER",
    "TIMED_PHASES",
    "AtomicCheckpointIO",
    "AtomicCheckpoints",
    "FiniteLossGuard",
    "MidEpochCheckpoint",
    "NonFiniteLossError",
    "OutOfMemoryAdvice",
    "PhaseTimer",
    "RunCheckpoint",
    "SeedEachEpoch",
    "ValidateOnEpochs",
    "is_out_of_memory",
    "slurm_job_id",
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
        _reseed(trainer.current_epoch)

    def on_train_batch_start(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # per batch as well: a run resumed in the middle of an epoch (Lightning calls no epoch-start hook then) draws
        # the dropout masks of the uninterrupted run from its first batch on
        _reseed(trainer.current_epoch, batch_idx)


def _reseed(*values: int) -> None:
    """Seed Python, NumPy and torch (all devices) from ``(PL_GLOBAL_SEED, *values)``; nothing without a seed."""
    base = os.environ.get("PL_GLOBAL_SEED")
    if base is None:
        return
    seed = derive_seed(int(base), *values)
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


#: exit status of a process that saved its checkpoint and requeued its SLURM job (EX_TEMPFAIL: "try again later");
#: non-zero, so that a script running ``usclip fit`` and then ``usclip test`` does not test an unfinished run
EXIT_REQUEUED = 75
#: file in the run directory naming the SLURM job that trains it, and whether that training finished
SLURM_MARKER = "slurm_job.json"


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this SLURM job (``<array job>_<task>`` in a job array), or ``None``.

    ``None`` outside SLURM, and in an interactive allocation (job name ``bash`` / ``interactive``, which Lightning
    does not treat as a SLURM cluster either).
    """
    if not SLURMEnvironment.detect():
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _write_slurm_marker(trainer: L.Trainer, finished: bool) -> None:
    """Under SLURM, record in the run directory's :data:`SLURM_MARKER` this job's id and whether training finished.

    The run directory is looked up on every process (a broadcast under DDP); rank zero writes.
    """
    job = slurm_job_id()
    run = run_dir_of(trainer) if job is not None else None
    if run is not None and trainer.is_global_zero:
        write_text_atomic(run / SLURM_MARKER, json.dumps({"job_id": job, "finished": finished}) + "\n")


class MidEpochCheckpoint(Callback):
    """Write ``checkpoints/last.ckpt`` in the middle of epochs, and on SLURM's preemption signal save it and requeue.

    The epoch-end ``last.ckpt`` (a ``ModelCheckpoint`` in ``BaseTask.configure_callbacks``) stays; this callback adds
    saves to the same file between epoch ends, from which ``--ckpt_path last`` (or a requeued SLURM job) continues at
    the next batch, with the order, augmentations and dropout of an uninterrupted run (:mod:`usclip.data.samplers`,
    :class:`SeedEachEpoch`).

    Saves happen at the end of a training batch, and only where resuming is exact: after an optimiser step (not in
    the middle of gradient accumulation, whose partial gradients are not saved), not after the last batch of an
    epoch (the epoch-end checkpoint follows) and not before a validation run (Lightning would skip it on resume). A
    save that falls elsewhere moves to the next batch where it may happen. Each save restarts the clock of
    ``every_minutes``, and so does each epoch end.

    Preemption: under SLURM (Lightning's ``SLURMEnvironment`` with ``auto_requeue``, its default), the requeue signal
    (``SIGUSR1``; ``#SBATCH --signal=SIGUSR1@120``) replaces Lightning's own handler, which would save an
    ``hpc_ckpt_<n>.ckpt`` into ``default_root_dir`` at whatever instruction the signal interrupts. Here the signal
    only sets a flag; at the next batch where a save may happen ``last.ckpt`` is written (atomically, through
    :class:`AtomicCheckpointIO`), ``scontrol requeue <job id>`` is run on rank zero and every process exits with
    :data:`EXIT_REQUEUED`. If ``scontrol`` fails, training goes on. Under SLURM, :data:`SLURM_MARKER` in the run
    directory records the job id while training runs; the requeued job (same command) finds the run through it and
    continues there (:func:`usclip._resume.prepare_subcommand`).

    Args:
        every_n_steps: save every this many optimiser steps; ``None``: no step-based saves.
        every_minutes: save when this many minutes passed since the last save or epoch end; ``None``: no time-based
            saves. Under DDP the processes agree by one all-reduce of a flag per step.
        requeue: handle SLURM's requeue signal as above (when SLURM is detected and auto-requeue is on).
    """

    def __init__(
        self, every_n_steps: int | None = None, every_minutes: float | None = None, requeue: bool = True
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps must be a positive integer or null, got {every_n_steps!r}")
        if every_minutes is not None and not every_minutes > 0:
            raise ValueError(f"checkpoint_every_minutes must be a positive number or null, got {every_minutes!r}")
        self.every_n_steps = every_n_steps
        self.every_minutes = every_minutes
        self.requeue = requeue
        #: the requeue signal arrived and is not handled yet
        self.signalled = False
        self._requeue_signal: signal.Signals | None = None
        self._previous_handler: Any = None
        self._last_save = time.monotonic()
        self._saved_step = -1

    # ----------------------------------------------------------------- SLURM signal
    def _handle_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True  # acted on at the next batch end where a save may happen (never inside the handler)
        log.info("received signal %d: saving a checkpoint and requeueing at the next safe batch", signum)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        if stage != "fit":
            return
        _write_slurm_marker(trainer, finished=False)
        environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
        if (
            not self.requeue
            or not isinstance(environment, SLURMEnvironment)
            or not environment.auto_requeue
            or threading.current_thread() is not threading.main_thread()
        ):
            return
        # installed before Lightning's signal connector runs: it then leaves this signal to us
        self._requeue_signal = environment.requeue_signal or signal.SIGUSR1
        self._previous_handler = signal.signal(self._requeue_signal, self._handle_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        if self._requeue_signal is not None and signal.getsignal(self._requeue_signal) == self._handle_signal:
            signal.signal(self._requeue_signal, self._previous_handler)
        self._requeue_signal = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Give the signal back to its previous handler when fit fails (or exits after a requeue).

        Lightning's signal connector restores the handlers it found when fit started, this one among them, and no
        ``teardown`` hook follows an exception: the handler it will restore is replaced by the one before ours.
        """
        if self._requeue_signal is None:
            return
        originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(originals, dict) and originals.get(self._requeue_signal) == self._handle_signal:
            originals[self._requeue_signal] = self._previous_handler
        self.teardown(trainer, pl_module, "fit")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        _write_slurm_marker(trainer, finished=True)  # a requeue of this job must not resume a finished run

    # ----------------------------------------------------------------- saves
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a restore: the sampler continues at the restored epoch and batch, from a fresh loader iterator.

        Lightning builds the training loader (to estimate the number of steps) and its iterator before it restores
        the loop counters, so the position stored by the DataModule (``resume_position``) is applied here, and the
        iterator is made again: with workers, the first one has already drawn keys of the wrong epoch.
        """
        self._last_save = time.monotonic()
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if trainer.ckpt_path is None or not isinstance(sampler, EpochSampler):
            return
        position = getattr(getattr(trainer, "datamodule", None), "resume_position", None)
        resume_sampler(sampler, trainer, int(getattr(loader, "batch_size", 0) or 0), position)
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is not None:
            iter(fetcher)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._last_save = time.monotonic()  # the epoch-end last.ckpt is written now

    def on_train_batch_end(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._may_save(trainer, batch_idx):
            return
        step = trainer.global_step
        signalled = self.signalled
        timed = self.every_minutes is not None and time.monotonic() - self._last_save >= 60.0 * self.every_minutes
        if trainer.world_size > 1:  # all processes save together (a collective) or none does
            if self._requeue_signal is not None:
                signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
            if self.every_minutes is not None:
                timed = trainer.strategy.reduce_boolean_decision(timed, all=False)
        due = self.every_n_steps is not None and step % self.every_n_steps == 0
        if not (signalled or timed or due):
            return
        path = self._path(trainer)
        if step != self._saved_step:
            trainer.save_checkpoint(path)
            self._saved_step, self._last_save = step, time.monotonic()
            log.info(
                "checkpoint at global step %d (epoch %d, batch %d): %s", step, trainer.current_epoch, batch_idx, path
            )
        if signalled:
            self.signalled = False
            self._requeue_and_exit(trainer, path)

    def _may_save(self, trainer: L.Trainer, batch_idx: int) -> bool:
        """Whether a checkpoint written now resumes exactly (see the class docstring)."""
        if trainer.sanity_checking or trainer.fit_loop.epoch_loop._should_accumulate():
            return False
        if batch_idx + 1 >= trainer.num_training_batches:
            return False
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is None:
            return False
        try:  # validation after this batch: the resumed run would skip it
            return not trainer.fit_loop.epoch_loop._should_check_val_fx(fetcher)
        except (AttributeError, AssertionError, TypeError):  # another Lightning: its private API changed
            return False

    def _path(self, trainer: L.Trainer) -> str:
        """The ``last.ckpt`` of the epoch-end ``ModelCheckpoint`` (the run's ``checkpoints/`` folder)."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.filename == "last" and callback.dirpath:
                return os.path.join(callback.dirpath, "last" + callback.FILE_EXTENSION)
        run = run_dir_of(trainer)
        return str(Path(run if run is not None else trainer.default_root_dir) / "checkpoints" / "last.ckpt")

    def _requeue_and_exit(self, trainer: L.Trainer, path: str) -> None:
        job = slurm_job_id()
        ok = False
        if trainer.is_global_zero and job is not None:
            try:
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
                ok = done.returncode == 0
                detail = (done.stderr or done.stdout).strip()
            except OSError as err:
                detail = str(err)
            if not ok:
                log.warning("scontrol requeue %s failed (%s); training goes on (checkpoint: %s)", job, detail, path)
        ok = bool(trainer.strategy.broadcast(ok, src=0))
        if ok:
            log.warning(
                "SLURM job %s requeued; stopping here (exit status %d). The requeued job continues from %s",
                job,
                EXIT_REQUEUED,
                path,
            )
            raise SystemExit(EXIT_REQUEUED)


class RunCheckpoint(ModelCheckpoint):
    """usclip's ``best``/``last`` ``ModelCheckpoint``, whose saved state never mixes with a user's ``ModelCheckpoint``.

    Lightning stores each callback's state under its ``state_key``, which for ``ModelCheckpoint`` is built from the
    monitor, mode and saving interval only: a user's ``ModelCheckpoint(monitor="val_dice", mode="max")`` kept beside
    usclip's ``best`` (``BaseTask.configure_callbacks``) would share its key, one state would overwrite the other in
    the checkpoint, and on resume each would take the other's file list (and could delete the other's files). The key
    here adds ``usclip: <filename>``; checkpoints written before it load through ``_legacy_state_key`` (the plain
    ``ModelCheckpoint`` key).
    """

    def _settings_key(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "every_n_train_steps": self._every_n_train_steps,
            "every_n_epochs": self._every_n_epochs,
            "train_time_interval": self._train_time_interval,
        }

    @property
    def state_key(self) -> str:
        """The plain ``ModelCheckpoint`` key plus ``usclip: <filename>``."""
        return f"ModelCheckpoint{self._settings_key() | {'usclip': self.filename}!r}"

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        return f"ModelCheckpoint{self._settings_key()!r}"


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


class ValidateOnEpochs(Callback):
    """Validate after exactly the epochs the authors' training loops validate, and after no other.

    Their loops (``release:clip_seg.py:148``, ``release:clip_cls.py:149``) validate after the 0-based epoch ``e``
    when ``e > 0 and e % every == 0``: with ``every=10`` and 1000 epochs after epochs 10, 20, ..., 990, i.e. after
    the 11th, 21st, ..., 991st epoch of training, and never after the last nine. The later ``src/`` loops
    (``later:src/models/clip/segmentation.py:197``) also validate after the last epoch (``last=True``).
    Lightning's ``check_val_every_n_epoch=10`` validates after epochs 9, 19, ..., 999 instead: one epoch earlier,
    and always after the last epoch of a 1000-epoch run.

    Lightning decides per epoch with ``(current_epoch + 1) % trainer.check_val_every_n_epoch == 0``; this callback
    sets that attribute before every epoch and every batch (a run resumed in the middle of an epoch gets no
    epoch-start hook) to 1 on the epochs to validate and to a number that cannot divide otherwise. Checkpoint and
    early-stopping callbacks that judge at the end of a training epoch must read fresh validation metrics only:
    ``BaseTask`` builds its ``EarlyStopping`` with ``check_on_train_epoch_end=False`` (it would otherwise count
    every epoch, with the last validation's value, as one without improvement).

    Args:
        every: validate after the 0-based epochs ``e > 0`` with ``e % every == 0``.
        last: also validate after the last epoch (``trainer.max_epochs - 1``).

    Raises:
        ValueError: ``every`` is not a positive integer.
    """

    def __init__(self, every: int, last: bool = False) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of epochs, got {every!r}")
        self.every = every
        self.last = last

    def validates(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether the loop validates after the 0-based ``epoch`` of a run of ``max_epochs`` epochs."""
        if epoch > 0 and epoch % self.every == 0:
            return True
        return self.last and max_epochs is not None and max_epochs > 0 and epoch == max_epochs - 1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        if stage != "fit":
            return
        if trainer.check_val_every_n_epoch is None or trainer.val_check_interval != 1.0:
            raise ValueError(
                "validate_every validates at epoch ends; it needs trainer.check_val_every_n_epoch set (any value) and "
                f"trainer.val_check_interval 1.0, got check_val_every_n_epoch={trainer.check_val_every_n_epoch!r}, "
                f"val_check_interval={trainer.val_check_interval!r}"
            )

    def _apply(self, trainer: L.Trainer) -> None:
        epoch = trainer.current_epoch
        trainer.check_val_every_n_epoch = 1 if self.validates(epoch, trainer.max_epochs) else epoch + 2

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._apply(trainer)

    def on_train_batch_start(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(trainer)


#: phases :class:`PhaseTimer` records as (begin, end) pairs; nested phases take the time from the enclosing one
TIMED_PHASES = ("epoch", "train_step", "validation", "checkpoint", "test")


class PhaseTimer(Callback):
    """Timestamps of a run's phases, written as JSON beside the run (``bench/paper_run.py`` splits the wall time).

    Records wall-clock times (``time.time()``, comparable across processes) of: the callback's ``setup`` and
    ``teardown``, each training epoch (``epoch``), each training batch from ``on_train_batch_start`` to
    ``on_train_batch_end`` (``train_step``: forward, backward, optimiser step), each validation loop, sanity check
    included (``validation``), each checkpoint write (``checkpoint``: ``trainer.save_checkpoint`` wrapped, so the
    time to serialise and write the file is counted, not only the ``on_save_checkpoint`` hook) and the test loop
    (``test``). Time inside an epoch that no batch, validation or checkpoint covers is time spent waiting on the
    data loader (and loop bookkeeping). Nothing is timed on the device: without ``synchronize`` a CUDA step's
    end is when the host queued its last kernel.

    Written at ``teardown`` to ``path``, or ``<run dir>/results/phases_<stage>.json`` (``stage``: ``fit``,
    ``test``, ...), as ``{"stage", "events": [[name, "begin"|"end"|"mark", time], ...], "batch_sizes": {...}}``.
    Add it on the command line with ``--trainer.callbacks+=usclip.callbacks.PhaseTimer``.

    Args:
        path: where to write the JSON; ``None`` writes beside the run as above.
        synchronize: wait for the CUDA device at the end of each timed phase, so that the split reflects device
            time (costs a host synchronisation per batch; off by default).
    """

    def __init__(self, path: str | None = None, synchronize: bool = False) -> None:
        self.path = path
        self.synchronize = synchronize
        self.events: list[tuple[str, str, float]] = []
        self.train_images = 0
        self.validation_images = 0
        self._unwrap: Any = None

    def _add(self, name: str, kind: str) -> None:
        if kind == "end" and self.synchronize and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.events.append((name, kind, time.time()))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        self.events = []
        self._add("setup", "mark")
        original = trainer.save_checkpoint

        def save_checkpoint(*args: Any, **kwargs: Any) -> None:
            self._add("checkpoint", "begin")
            try:
                original(*args, **kwargs)
            finally:
                self._add("checkpoint", "end")

        trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
        self._unwrap = (trainer, original)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._add("epoch", "begin")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._add("epoch", "end")

    def on_train_batch_start(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._add("train_step", "begin")

    def on_train_batch_end(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._add("train_step", "end")
        self.train_images += _batch_len(batch)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._add("validation", "begin")

    def on_validation_batch_end(  # noqa: D102
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.validation_images += _batch_len(batch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._add("validation", "end")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._add("test", "begin")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._add("test", "end")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Restore ``trainer.save_checkpoint`` and write the events (rank zero only)."""
        self._add("teardown", "mark")
        if self._unwrap is not None:
            self._unwrap[0].save_checkpoint = self._unwrap[1]
            self._unwrap = None
        if not trainer.is_global_zero:
            return
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn enum ("fit", "test")
        if self.path is not None:
            path = Path(self.path)
        else:
            run = run_dir_of(trainer)
            if run is None:
                log.warning("PhaseTimer: the run has no folder and no path was given; nothing written")
                return
            path = run / "results" / f"phases_{stage}.json"
        summary = {
            "stage": stage,
            "pid": os.getpid(),
            "events": [list(e) for e in self.events],
            "train_images": self.train_images,
            "validation_images": self.validation_images,
        }
        write_text_atomic(path, json.dumps(summary) + "\n")


def _batch_len(batch: Any) -> int:
    """Number of samples of a batch dict (its ``image`` tensor), 0 when unknown."""
    image = batch.get("image") if isinstance(batch, dict) else None
    return int(image.shape[0]) if isinstance(image, torch.Tensor) else 0
