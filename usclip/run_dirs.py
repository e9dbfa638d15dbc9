"""Where a run writes: one directory per run, whichever logger the YAML chooses.

A usclip run directory holds ``config.yaml``, ``checkpoints/``, ``splits/``, ``results/``, ``overlays/`` and
``predictions/``; ``usclip report`` and ``--ckpt_path last`` read them from there. Lightning's ``trainer.log_dir``
is that directory for the TensorBoard and CSV loggers (``<save_dir>/<name>/version_<n>``) but is the bare
``save_dir`` for the others (MLflow, W&B), where every run would write over the previous one. :func:`run_dir_of`
gives, for every logger, the folder that ``ModelCheckpoint`` already puts ``checkpoints/`` in:
``<save_dir>/<name>/<version>`` (MLflow: ``<save_dir>/<experiment id>/<run id>``).

Logger overlays: ``configs/loggers/{tensorboard,csv,mlflow,wandb}.yaml`` (``--config configs/loggers/csv.yaml``
after the task's config). :func:`check_logger_installed` turns a missing ``mlflow``/``wandb`` package into one clear
message before anything is built.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

__all__ = ["LOGGER_EXTRAS", "LOGGER_PACKAGES", "check_logger_installed", "checkpoint_run", "local_path", "run_dir_of"]

#: logger class name -> the package it needs (beyond Lightning's own dependencies)
LOGGER_PACKAGES: dict[str, str] = {
    "MLFlowLogger": "mlflow",
    "WandbLogger": "wandb",
    "CometLogger": "comet_ml",
    "NeptuneLogger": "neptune",
}

#: package -> the usclip extra that installs it (pyproject.toml's optional dependencies)
LOGGER_EXTRAS: dict[str, str] = {"mlflow": "mlflow", "wandb": "wandb"}


def _install_hint(package: str) -> str:
    extra = LOGGER_EXTRAS.get(package)
    return f"`pip install 'usclip[{extra}]'`" if extra else f"`pip install {package}`"


def check_logger_installed(class_path: str | None) -> None:
    """Raise a clear error when the configured logger needs a package that is not installed.

    Args:
        class_path: ``trainer.logger.class_path`` (e.g. ``lightning.pytorch.loggers.MLFlowLogger``), or ``None``.

    Raises:
        ModuleNotFoundError: naming the logger, the package and the alternatives.
    """
    if not class_path:
        return
    name = class_path.rsplit(".", 1)[-1]
    package = LOGGER_PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(
            f"trainer.logger={class_path}: the {package!r} package is not installed; {_install_hint(package)}, "
            "or choose a logger that needs nothing more: --config configs/loggers/csv.yaml (or tensorboard.yaml)"
        )


def local_path(path: Any) -> str | None:
    """A filesystem path from a logger's ``save_dir`` (``file:`` URIs of MLflow included); ``None`` otherwise."""
    if path is None:
        return None
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if text.startswith("file:"):
        text = text.removeprefix("file:")
        if text.startswith("//"):
            text = text[2:]
    return text


def run_dir_of(trainer: Any) -> Path | None:
    """The run directory of ``trainer`` for any logger (call it on every process: it is broadcast under DDP).

    TensorBoard and CSV loggers: ``trainer.log_dir`` (``<save_dir>/<name>/version_<n>``). Other loggers: the
    folder that holds ``checkpoints/`` (``<save_dir or default_root_dir>/<name>/<version>``). No logger:
    ``default_root_dir``.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = list(getattr(trainer, "loggers", []) or [])
    if not loggers or isinstance(loggers[0], (TensorBoardLogger, CSVLogger)):
        log_dir = trainer.log_dir
        return Path(log_dir) if log_dir is not None else None
    path: str | None = None
    if trainer.is_global_zero:  # MLflow creates its run (and id) on rank zero only
        logger = loggers[0]
        save_dir = local_path(logger.save_dir) or str(trainer.default_root_dir)
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        path = os.path.join(save_dir, str(logger.name), version)
    path = trainer.strategy.broadcast(path)
    return Path(path) if path is not None else None


def checkpoint_run(ckpt_path: str | Path | None) -> Path | None:
    """The run directory a checkpoint was written in (``<run>/checkpoints/<file>.ckpt``), or ``None``."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    return path.parents[1] if path.parent.name == "checkpoints" and len(path.parents) > 1 else None
