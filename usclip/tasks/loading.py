"""``load_task``: a trained task from a checkpoint file or a run directory, in one call, ready to predict.

The task class comes from the checkpoint: the ``usclip_task`` entry every usclip checkpoint carries, else
LightningCLI's ``_class_path`` among the hyperparameters, else the run's ``config.yaml`` (``model.class_path``).
The checkpoint is read with ``weights_only=True`` (it cannot run code), and only subclasses of
:class:`usclip.tasks.BaseTask` are built from it.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch

from usclip.tasks.base import BaseTask

log = logging.getLogger(__name__)

__all__ = ["load_task", "resolve_checkpoint"]


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file of ``path``: the file itself, or a run directory's ``checkpoints/best.ckpt`` / ``last.ckpt``.

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist, or is a folder without those checkpoints.
    """
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for folder in (p / "checkpoints", p):
            for name in ("best.ckpt", "last.ckpt"):
                if (folder / name).is_file():
                    return folder / name
        raise FileNotFoundError(
            f"load_task: {str(p)!r} is a folder without checkpoints/best.ckpt or checkpoints/last.ckpt; expected a "
            "run directory (runs/<name>/version_<n>) or a .ckpt file"
        )
    raise FileNotFoundError(
        f"load_task: {str(p)!r} does not exist; expected a .ckpt file or a run directory (runs/<name>/version_<n>)"
    )


def _read(ckpt: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unsafe-global errors alike: not a checkpoint usclip can load
        raise ValueError(
            f"load_task: {str(ckpt)!r} is not a readable torch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); expected a .ckpt file written by usclip fit"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"load_task: {str(ckpt)!r} is not a Lightning checkpoint of a usclip task (no state_dict and "
            f"hyper_parameters; found {found}); expected a .ckpt file written by usclip fit"
        )
    return checkpoint


def _class_path(checkpoint: dict[str, Any], ckpt: Path) -> str:
    found = checkpoint.get("usclip_task") or checkpoint["hyper_parameters"].get("_class_path")
    if found:
        return str(found)
    config = ckpt.parent.parent / "config.yaml" if ckpt.parent.name == "checkpoints" else None
    if config is not None and config.is_file():
        import yaml

        model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        if isinstance(model, dict) and model.get("class_path"):
            return str(model["class_path"])
    raise ValueError(
        f"load_task: {str(ckpt)!r} does not say which task wrote it (no usclip_task entry, no _class_path "
        "hyperparameter, no config.yaml beside its checkpoints/); load it with the class itself: "
        "SegmentationTask.load_from_checkpoint(path)"
    )


def _task_class(path: str, ckpt: Path) -> type[BaseTask]:
    module, _, name = path.rpartition(".")
    cls: Any = None
    try:
        cls = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, BaseTask)):
        raise ValueError(
            f"load_task: {str(ckpt)!r} names the task {path!r}, which is not an importable usclip.tasks.BaseTask "
            "subclass"
        )
    return cls


def load_task(path: str | Path, map_location: Any = "cpu") -> BaseTask:
    """Load a trained task, in eval mode, with the preprocessing it was trained with (``task.preprocessing``).

    Args:
        path: a ``.ckpt`` file, or a run directory (``runs/busi_seg/version_0``): its ``checkpoints/best.ckpt``,
            else ``checkpoints/last.ckpt``.
        map_location: where the tensors go (``torch.load``'s argument): ``"cpu"``, ``"cuda"``, a device.

    Returns:
        The task (:class:`~usclip.tasks.SegmentationTask`, :class:`~usclip.tasks.ClassificationTask`, ...), in eval
        mode; ``task.predict_image(image)`` predicts.

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist or a run directory holds no checkpoint.
        ValueError: for a file that is not a usclip checkpoint, or one that names no task class.
    """
    ckpt = resolve_checkpoint(path)
    checkpoint = _read(ckpt)
    cls = _task_class(_class_path(checkpoint, ckpt), ckpt)
    del checkpoint
    task = cls.load_from_checkpoint(ckpt, map_location=map_location, weights_only=True)
    task.eval()
    log.info("loaded %s from %s", cls.__name__, ckpt)
    return task
