"""Checkpoint arguments of ``usclip fit|validate|test|predict``: ``--ckpt_path last`` and safe loading.

- ``--ckpt_path last`` picks the newest ``checkpoints/last.ckpt`` among the runs of the configured logger
  (``<save_dir>/<name>/version_*``) and, for ``fit``, sets the logger's ``version`` to that run, so a resumed run
  keeps writing into the directory it was killed in. Lightning alone would look in a fresh ``version_N`` and start
  from scratch with a warning; usclip raises a clear error instead.
- A requeued SLURM job continues its run without ``--ckpt_path``: when ``fit`` starts with no checkpoint in a job
  that SLURM restarted (``SLURM_RESTART_COUNT`` > 0), the run whose ``slurm_job.json`` names this job and is not
  finished (written by :class:`usclip.callbacks.MidEpochCheckpoint`) is resumed from its ``last.ckpt``, in its folder.
- Checkpoints load with ``weights_only=True``: a file that would run code when unpickled is refused before
  anything is built (:func:`check_checkpoint`), and the Trainer gets ``weights_only=True`` too.
- ``predict`` does not keep what ``predict_step`` returns (``return_predictions=False``): results are written to
  disk batch by batch, and memory stays flat however many images there are.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from usclip.callbacks import SLURM_MARKER, slurm_job_id
from usclip.run_dirs import local_path

log = logging.getLogger(__name__)

__all__ = [
    "UnsafeCheckpointError",
    "check_checkpoint",
    "find_last_checkpoint",
    "find_requeued_run",
    "prepare_subcommand",
]


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds Python objects that could run code when loaded, or cannot be read at all."""


def check_checkpoint(path: str | Path) -> None:
    """Open ``path`` with ``torch.load(weights_only=True)`` (memory-mapped: cheap) and raise a clear error if refused.

    Raises:
        UnsafeCheckpointError: if unpickling needs anything beyond tensors and plain containers (loading it could
            run code), or the file is not a readable torch checkpoint (e.g. truncated).
    """
    path = Path(path)
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle of Python objects at all (an image, random bytes): unreadable
            raise _unreadable(path, err) from err
        raise UnsafeCheckpointError(
            f"ckpt_path={str(path)!r}: refused to load: the file holds Python objects other than tensors and plain "
            f"containers (it calls or builds {found.group(1)}), and unpickling them could run code. usclip loads "
            "checkpoints with weights_only=True; use checkpoints written by usclip, or re-save a trusted file as a "
            "plain state dict (torch.save(model.state_dict())) or safetensors"
        ) from err
    except Exception as err:  # any other failure: not a checkpoint (a text file: KeyError, a truncated zip: ...)
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: BaseException) -> UnsafeCheckpointError:
    """The error for a file that is no torch checkpoint, naming what it looks like (and torch's reason for one)."""
    kind = _describe_file(path)
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    detail = kind if kind in ("an image", "a text file", "the file is empty") else f"{kind}: {reason}"
    return UnsafeCheckpointError(
        f"ckpt_path={str(path)!r} is not a readable torch checkpoint ({detail}): give a .ckpt file written by "
        "usclip fit (runs/<name>/version_<n>/checkpoints/best.ckpt or last.ckpt), or --ckpt_path last"
    )


def _describe_file(path: Path) -> str:
    """A few words on what ``path`` holds, from its first bytes (a checkpoint is a zip or a pickle)."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    if not head:
        return "the file is empty"
    if head.startswith(b"\x89PNG") or head[:3] == b"\xff\xd8\xff" or head.startswith(b"GIF8"):
        return "an image"
    if head.startswith(b"PK"):
        return "a zip archive without a torch checkpoint in it"
    return "binary data" if b"\x00" in head else "a text file"


def _version_key(path: Path) -> tuple[float, int]:
    match = re.fullmatch(r"version_(\d+)", path.parents[1].name)
    return path.stat().st_mtime, int(match.group(1)) if match else -1


def find_last_checkpoint(runs_dir: str | Path) -> Path:
    """The most recently written ``<runs_dir>/*/checkpoints/last.ckpt`` (ties: the highest ``version_N``).

    Runs one level deeper (``<runs_dir>/<experiment>/<run id>/checkpoints``: MLflow) are found when there are none
    at the first level.

    Raises:
        FileNotFoundError: if no run under ``runs_dir`` has a ``last.ckpt``.
    """
    runs_dir = Path(runs_dir)
    found = [p for p in runs_dir.glob("*/checkpoints/last.ckpt") if p.is_file()]
    found = found or [p for p in runs_dir.glob("*/*/checkpoints/last.ckpt") if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path last: no run under {runs_dir} has checkpoints/last.ckpt (runs: "
            f"{sorted(p.name for p in runs_dir.glob('*'))[:5] or 'none'}); start with `usclip fit` without "
            "--ckpt_path, or give the checkpoint file itself"
        )
    return max(found, key=_version_key)


def find_requeued_run(runs_dir: str | Path, job_id: str) -> Path | None:
    """``last.ckpt`` of the newest unfinished run under ``runs_dir`` trained by SLURM job ``job_id``, or ``None``.

    A run is this job's when its ``slurm_job.json`` (:data:`usclip.callbacks.SLURM_MARKER`) names ``job_id``, and
    unfinished while that file says ``"finished": false``. Runs one level deeper (MLflow) are looked at too.
    """
    runs_dir = Path(runs_dir)
    found = []
    for marker in [*runs_dir.glob(f"*/{SLURM_MARKER}"), *runs_dir.glob(f"*/*/{SLURM_MARKER}")]:
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        last = marker.parent / "checkpoints" / "last.ckpt"
        if str(info.get("job_id")) == job_id and not info.get("finished") and last.is_file():
            found.append(last)
    return max(found, key=_version_key) if found else None


def _continue_run(path: Path, logger_args: Any) -> None:
    """Point the logger at the run ``path`` (``<run>/checkpoints/last.ckpt``) came from: ``fit`` writes there."""
    run = path.parents[1].name
    match = re.fullmatch(r"version_(\d+)", run)
    if "run_id" in logger_args:  # MLflow: continue the tracked run
        logger_args["run_id"] = run
    elif "version" in logger_args:
        logger_args["version"] = int(match.group(1)) if match else run


def _logger_args(trainer: Any) -> Any | None:
    """``init_args`` of the (first) configured logger, or ``None`` for Lightning's default logger."""
    logger = trainer.get("logger") if hasattr(trainer, "get") else None
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if logger is None or isinstance(logger, bool):
        return None
    return logger.get("init_args") if hasattr(logger, "get") else None


def _runs_dir(trainer: Any) -> tuple[Path, Any | None]:
    """The folder holding the runs of the configured logger, and the logger's ``init_args``.

    TensorBoard, CSV: ``<save_dir>/<name>``; W&B: ``<save_dir>/<project>`` (its ``name`` is the run's display
    name); MLflow: the local folder of its tracking URI (``<save_dir>``; runs are ``<experiment id>/<run id>``),
    ``default_root_dir`` for a remote tracking server.
    """
    args = _logger_args(trainer)
    root = trainer.get("default_root_dir") or "."
    if trainer.get("logger") is False:
        raise ValueError("--ckpt_path last needs a logger (trainer.logger is false): give the checkpoint file itself")
    if args is None:  # Lightning's default TensorBoardLogger(save_dir=default_root_dir, name="lightning_logs")
        return Path(root) / "lightning_logs", None
    if "experiment_name" in args:  # MLflow
        uri = args.get("tracking_uri")
        if uri:
            local = local_path(uri) if str(uri).startswith("file:") else None
            return Path(local) if local else Path(root), args
        return Path(args.get("save_dir") or root), args
    save_dir = args.get("save_dir") or root
    name = args.get("project") if "project" in args else args.get("name")
    return Path(save_dir) / (name or ""), args


def prepare_subcommand(subcommand: str, config: Any) -> None:
    """Resolve ``ckpt_path: last``, check the checkpoint, set ``weights_only`` and (predict) ``return_predictions``.

    Args:
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        config: the subcommand's parsed configuration (jsonargparse ``Namespace``); changed in place.

    Raises:
        ValueError: if ``weights_only`` is set to false.
        FileNotFoundError: if ``ckpt_path`` is ``last`` and there is no run to resume.
        UnsafeCheckpointError: if the checkpoint would run code when loaded, or is unreadable.
    """
    if "weights_only" in config:
        if config["weights_only"] is False:
            raise ValueError(
                "weights_only=false: usclip loads checkpoints only with weights_only=True (a checkpoint from the "
                "internet must not be able to run code); drop --weights_only"
            )
        config["weights_only"] = True
    if subcommand == "predict" and config.get("return_predictions") is None:
        config["return_predictions"] = False
    ckpt = config.get("ckpt_path")
    job = slurm_job_id()
    if subcommand == "fit" and ckpt is None and job is not None and os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
        ckpt = config["ckpt_path"] = _requeued_checkpoint(config, job)
    if subcommand == "fit" and ckpt is None and job is not None:
        _refuse_stray_hpc_checkpoints(config["trainer"].get("default_root_dir") or ".")
    if ckpt == "last":
        runs_dir, logger_args = _runs_dir(config["trainer"])
        version = logger_args.get("version") if logger_args is not None else None
        if version is not None:  # an explicit version: resume that run
            name = version if isinstance(version, str) else f"version_{version}"
            path = runs_dir / name / "checkpoints" / "last.ckpt"
            if not path.is_file():
                raise FileNotFoundError(f"--ckpt_path last: {path} does not exist (trainer.logger version={version})")
        else:
            path = find_last_checkpoint(runs_dir)
            if subcommand == "fit" and logger_args is not None:  # keep writing into the resumed run's directory
                _continue_run(path, logger_args)
        log.info("--ckpt_path last: %s", path)
        config["ckpt_path"] = ckpt = str(path)
    if ckpt and Path(ckpt).is_file():
        check_checkpoint(ckpt)
    elif ckpt and ckpt not in _LIGHTNING_CKPT_NAMES and "://" not in str(ckpt):
        raise FileNotFoundError(_missing_checkpoint(Path(ckpt)))


#: ``ckpt_path`` values Lightning resolves itself (no file of that name is meant)
_LIGHTNING_CKPT_NAMES = ("best", "hpc", "registry")


def _missing_checkpoint(path: Path) -> str:
    """The message for a ``ckpt_path`` that is no file: a run folder names its checkpoints, anything else is missing."""
    if path.is_dir():
        found = sorted(path.glob("checkpoints/*.ckpt")) or sorted(path.glob("*.ckpt"))
        hint = f"e.g. --ckpt_path {found[0]}" if found else "it holds no .ckpt file (a run keeps them in checkpoints/)"
        return f"ckpt_path={str(path)!r} is a folder; give a checkpoint file ({hint})"
    return (
        f"ckpt_path={str(path)!r} does not exist; give a .ckpt file written by usclip fit "
        "(runs/<name>/version_<n>/checkpoints/best.ckpt or last.ckpt), or --ckpt_path last"
    )


def _requeued_checkpoint(config: Any, job: str) -> str | None:
    """``ckpt_path`` for a ``fit`` in a requeued SLURM job: its unfinished run's ``last.ckpt`` (logger set to it)."""
    if config["trainer"].get("logger") is False:
        return None
    runs_dir, logger_args = _runs_dir(config["trainer"])
    version = logger_args.get("version") if logger_args is not None else None
    path = find_requeued_run(runs_dir, job)
    if version is not None and path is not None:  # an explicit version: only that run
        path = path if path.parents[1].name == (version if isinstance(version, str) else f"version_{version}") else None
    if path is None:
        log.info("SLURM job %s was restarted, and no unfinished run of it has a last.ckpt: fit starts afresh", job)
        return None
    if logger_args is not None:
        _continue_run(path, logger_args)
    log.info("SLURM job %s was requeued: continuing the run %s from %s", job, path.parents[1], path)
    return str(path)


def _refuse_stray_hpc_checkpoints(root: str | Path) -> None:
    """Stop when Lightning would silently resume a SLURM ``fit`` from an ``hpc_ckpt_<n>.ckpt`` in ``root``.

    Lightning loads the newest such file of ``default_root_dir`` in any SLURM job started without a checkpoint,
    whichever run wrote it; usclip never writes them (``usclip.callbacks.MidEpochCheckpoint`` saves ``last.ckpt``
    in the run folder instead).

    Raises:
        FileExistsError: if ``root`` holds ``hpc_ckpt_*.ckpt`` files.
    """
    stray = sorted(Path(root).glob("hpc_ckpt_*.ckpt"))
    if stray:
        raise FileExistsError(
            f"trainer.default_root_dir={str(root)!r} holds {[p.name for p in stray]} (Lightning's SLURM checkpoints, "
            "not written by usclip), and Lightning would resume this fit from the newest of them, whichever run wrote "
            f"it. Continue from one explicitly (--ckpt_path {stray[-1]}) or move them away"
        )
