"""A trained task as a folder a colleague loads in one line, and back.

The folder (:func:`save_pretrained`)::

    model.safetensors    the weights that cannot be rebuilt (adapters, head; the backbone when needed, see below)
    config.json          the task class, its init arguments, the backbone's source and SHA-256, the input contract
    preprocessing.json   the crop / resize / colour settings the model was trained with (task.preprocessing)
    README.md            a Hugging Face model card: test metrics, training data and config, research-use warning

and ``usclip.sharing.load_pretrained(folder or "hf-hub:owner/name")`` rebuilds the task in eval mode.

**The frozen backbone.** A backbone trained from an open_clip tag or an ``hf-hub:`` id (``pretrained: openai``) is
public and frozen: the folder leaves it out (a ViT-B/16 is 330 MB, the adapters and head a few MB), and loading
re-fetches it by its tag, as the task's own checkpoints do, then checks it against the SHA-256 of every backbone
tensor recorded in ``config.json``. Random weights (``pretrained: null``) and weights from a local file (which a
colleague does not have) are stored; the folder then builds the encoder with ``pretrained: null`` and the resolved
``quick_gelu`` (nothing to fetch) and loads every tensor, so such models round-trip exactly. ``backbone="always"``
stores the backbone of any model (a self-contained folder, no download when it loads); ``backbone="never"`` leaves
it out of any model that has a source to rebuild it from.

Why not ``huggingface_hub.PyTorchModelHubMixin``: its ``from_pretrained`` is a class method of one model class and
loads every key strictly from ``model.safetensors``; here one loader serves every task class (named in the config
and checked to be a usclip task), and the backbone is left out and re-fetched with a checksum, so both of its
``_save_pretrained`` and ``_from_pretrained`` would be overridden, which is all it does. The Hub side uses
``huggingface_hub`` directly (:mod:`usclip.sharing.hub`), the card its ``ModelCard`` (:mod:`usclip.sharing.card`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from safetensors.torch import load_file, save_file

from usclip import __version__
from usclip._io import write_text_atomic
from usclip.sharing.layout import (
    CARD_FILE,
    CONFIG_FILE,
    FOLDER_FILES,
    FORMAT,
    FORMAT_VERSION,
    PREPROCESSING_FILE,
    WEIGHTS_FILE,
    SharingError,
    read_config,
)

if TYPE_CHECKING:
    from usclip.models import CLIPEncoder
    from usclip.tasks import BaseTask

log = logging.getLogger(__name__)

BackbonePolicy = Literal["auto", "always", "never"]
BACKBONE_POLICIES = ("auto", "always", "never")


# ----------------------------------------------------------------- the run a task comes from
def load_run(path: str | Path) -> tuple[BaseTask, dict[str, Any]]:
    """A trained task from a run directory or a ``.ckpt`` file, and what the model card says about its run.

    Args:
        path: a run directory (``runs/<name>/version_<n>``: its ``checkpoints/best.ckpt``, else ``last.ckpt``) or a
            checkpoint (:func:`usclip.tasks.load_task`).

    Returns:
        ``(task in eval mode, run info)``: info holds ``checkpoint`` (the file used), ``run_dir`` (or ``None``),
        ``test_metrics`` (``results/test_metrics.json`` of the run, when present) and ``data`` (the DataModule's
        init arguments stored in the checkpoint).

    Raises:
        SharingError: no such run directory or checkpoint.
        ValueError: a file that is not a usclip checkpoint (:func:`usclip.tasks.load_task`).
    """
    from usclip.tasks import load_task
    from usclip.tasks.loading import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(Path(path).expanduser())
    except FileNotFoundError as err:
        raise SharingError(str(err).replace("load_task: ", "")) from err
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    task = load_task(ckpt)
    meta = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    info: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "data": _public(meta.get("datamodule_hyper_parameters") or {}),
        "data_class": (meta.get("datamodule_hyper_parameters") or {}).get("_class_path"),
        "test_metrics": None,
    }
    metrics_file = run_dir / "results" / "test_metrics.json" if run_dir is not None else None
    if metrics_file is not None and metrics_file.is_file():
        info["test_metrics"] = json.loads(metrics_file.read_text())
    return task, info


def _public(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters without Lightning's and jsonargparse's private keys (``_class_path``, ``_instantiator``)."""
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


# ----------------------------------------------------------------- the backbone
def backbone_keys(task: BaseTask) -> list[str]:
    """State-dict keys of the frozen backbone that its ``pretrained`` source rebuilds (adapters excluded)."""
    adapters: set[str] = set()
    adapter_state = getattr(task.encoder, "adapter_state_dict", None)
    if adapter_state is not None:
        adapters = {f"encoder.{k}" for k in adapter_state()}
    return [k for k in task._frozen_keys() if k not in adapters]


def backbone_sha256(state: Mapping[str, torch.Tensor], keys: list[str]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``keys`` of ``state`` (in sorted order)."""
    h = hashlib.sha256()
    for k in sorted(keys):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _store_backbone(task: BaseTask, policy: BackbonePolicy) -> bool:
    from usclip.models.encoder import looks_like_path

    if policy not in BACKBONE_POLICIES:
        raise SharingError(f"backbone={policy!r}: expected one of {BACKBONE_POLICIES}")
    pretrained = task.encoder_args.get("pretrained")
    if policy == "never" and pretrained is None:
        raise SharingError(
            "backbone='never' but the model was trained from random weights (pretrained: null), which nothing can "
            "rebuild: use backbone='auto'"
        )
    if policy != "auto":
        return policy == "always"
    return pretrained is None or looks_like_path(pretrained) or bool(task.hparams.get("save_frozen_backbone"))


def _clip_encoder_built_here(task: BaseTask) -> bool:
    """Whether the encoder is an open_clip tower whose architecture ``pretrained: null`` rebuilds without a source."""
    from usclip.models import CLIPEncoder

    return isinstance(task.encoder, CLIPEncoder)


# ----------------------------------------------------------------- save
def _check_shareable(task: Any) -> None:
    from usclip.tasks import ClassificationTask, SegmentationTask

    if not isinstance(task, (SegmentationTask, ClassificationTask)):
        raise SharingError(
            f"save_pretrained shares segmentation and classification tasks (predict_image), got "
            f"{type(task).__name__}; caption-tuned adapters are shared with usclip.adapters.save_adapters"
        )


def _init_args(task: BaseTask, store_backbone: bool) -> dict[str, Any]:
    args = _public(task.hparams)
    encoder = task.encoder
    adapter_config = getattr(encoder, "adapter_config", None)
    if args.get("adapter_checkpoint") is not None and adapter_config is not None:
        # the adapter file's weights are in model.safetensors; its type and config go into the arguments
        args |= {"adapter": adapter_config.name, "adapter_kwargs": adapter_config.to_dict(), "adapter_checkpoint": None}
    if store_backbone and args.get("pretrained") is not None and _clip_encoder_built_here(task):
        # every tensor is in the folder: build the same architecture without fetching or reading any file
        quick_gelu = cast("CLIPEncoder", encoder).encoder_config["quick_gelu"]
        args |= {"pretrained": None, "quick_gelu": quick_gelu}
    return json.loads(json.dumps(args))  # tuples -> lists; a value JSON cannot hold fails here


def save_pretrained(
    source: BaseTask | str | Path,
    out_dir: str | Path,
    *,
    backbone: BackbonePolicy = "auto",
    test_metrics: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    model_id: str | None = None,
    run_info: Mapping[str, Any] | None = None,
) -> Path:
    """Write a trained task as a shareable folder (weights, config, preprocessing, model card).

    Args:
        source: a task, or a run directory / ``.ckpt`` file (then the card gets the run's test metrics and data).
        out_dir: the folder to write (created; existing files of the same names are refused unless ``overwrite``).
        backbone: ``auto``: store the frozen backbone only when nothing can rebuild it (random weights, a local
            weights file); ``always``: store it (a self-contained folder); ``never``: leave it out whenever it has a
            source (tag, Hub id or file) to be rebuilt from.
        test_metrics: the metrics shown on the card (default: the run's ``results/test_metrics.json``).
        overwrite: replace the folder's files.
        model_id: the Hub repository id the card's usage snippet names (``owner/name``).
        run_info: what :func:`load_run` returned with a task given as ``source`` (the card's data and metrics).

    Returns:
        ``out_dir``.

    Raises:
        SharingError: a missing source, files already there, a bad ``backbone``.
    """
    from usclip.sharing.card import model_card

    if isinstance(source, (str, Path)):
        task, info = load_run(source)
    else:
        task, info = source, dict(run_info or {})
    _check_shareable(task)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SharingError(f"out_dir {str(out_dir)!r} is a file: expected a folder to write the model into")
    present = [n for n in FOLDER_FILES if (out / n).exists()]
    if present and not overwrite:
        raise SharingError(
            f"{out} already holds {', '.join(present)}: choose another folder or overwrite (usclip export --overwrite)"
        )
    store = _store_backbone(task, backbone)
    state = {k: v.detach().cpu() for k, v in task.state_dict().items()}
    backbone_only = backbone_keys(task)
    left_out = set() if store else set(backbone_only)
    weights = {k: v.contiguous() for k, v in state.items() if k not in left_out}
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "usclip_version": __version__,
        "task_class": f"{type(task).__module__}.{type(task).__qualname__}",
        "task": task.task,
        "label_names": task.class_names(),
        "init_args": _init_args(task, store),
        "backbone": {
            "stored": store,
            "model_name": task.encoder_args.get("model_name"),
            "pretrained": task.encoder_args.get("pretrained"),
            "keys": len(backbone_only),
            "sha256": backbone_sha256(state, backbone_only),
        },
        "normalization": {
            "kind": task.hparams.get("normalization", "clip"),
            "mean": [float(v) for v in task.pixel_mean.flatten()],
            "std": [float(v) for v in task.pixel_std.flatten()],
        },
        "input": {
            "name": "images",
            "shape": ["batch", 3, int(task.hparams["image_size"]), int(task.hparams["image_size"])],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "note": "preprocessed as preprocessing.json says (crop, resize, colour); normalised inside the model",
        },
        "output": {
            "name": "logits",
            "shape": ["batch", int(task.hparams["num_classes"])]
            + (["height", "width"] if task.task == "segmentation" else []),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_FILE)
    write_text_atomic(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    write_text_atomic(out / PREPROCESSING_FILE, json.dumps(task.preprocessing.to_dict(), indent=2) + "\n")
    metrics = test_metrics if test_metrics is not None else info.get("test_metrics")
    card = model_card(
        config,
        metrics=metrics,
        data=info.get("data"),
        data_class=info.get("data_class"),
        repo=model_id,
        name=None if model_id else out.resolve().name,
    )
    write_text_atomic(out / CARD_FILE, card)
    log.info("wrote %s (%d tensors, backbone %s)", out, len(weights), "stored" if store else "re-fetched when it loads")
    return out


# ----------------------------------------------------------------- load
def _task_class(name: Any, where: Path) -> type[BaseTask]:
    from usclip.tasks import BaseTask

    if not isinstance(name, str) or not name.startswith("usclip.") or "." not in name:
        raise SharingError(f"{where}: task_class={name!r} is not a usclip task class (usclip.tasks....)")
    module_name, _, cls_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as err:
        raise SharingError(f"{where}: task_class={name!r} cannot be imported ({err}); is usclip up to date?") from err
    if not (isinstance(cls, type) and issubclass(cls, BaseTask)):
        raise SharingError(f"{where}: task_class={name!r} is not a usclip task (a BaseTask subclass)")
    return cls


def load_pretrained(
    source: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    map_location: str | torch.device = "cpu",
) -> BaseTask:
    """Load a shared model: a folder written by :func:`save_pretrained`, or ``hf-hub:owner/name`` on the Hub.

    Args:
        source: the folder, or ``hf-hub:owner/name`` (downloaded with ``huggingface_hub.snapshot_download`` into
            the Hugging Face cache, or read from it under ``HF_HUB_OFFLINE=1``).
        revision: the Hub revision (branch, tag or commit); ``None``: ``main``.
        cache_dir: the Hugging Face cache to use instead of ``HF_HUB_CACHE``.
        token: the Hub token for private repositories (``None``: the logged-in one).
        map_location: where the weights go.

    Returns:
        The task in eval mode, ``predict_image`` ready (``task.preprocessing`` set from ``preprocessing.json``).

    Raises:
        SharingError: a source that is not such a folder or Hub id, weights that do not match the config, a
            backbone rebuilt from its source that differs from the one the model was trained on.
    """
    from usclip.data import Preprocessing
    from usclip.sharing.hub import resolve_source

    folder = resolve_source(source, revision=revision, cache_dir=cache_dir, token=token)
    config = read_config(folder)
    cls = _task_class(config.get("task_class"), folder / CONFIG_FILE)
    backbone = config.get("backbone", {})
    task = cls(**config["init_args"])
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        raise SharingError(f"{folder} has no {WEIGHTS_FILE}: the folder is incomplete")
    saved = load_file(str(weights_file), device="cpu")
    state = task.state_dict()
    expected_missing = set() if backbone.get("stored", True) else set(backbone_keys(task))
    missing = sorted(set(state) - set(saved) - expected_missing)
    unexpected = sorted(set(saved) - set(state))
    if missing or unexpected:
        raise SharingError(
            f"{weights_file} does not fit {cls.__name__}({config['init_args'].get('model_name')!r}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    if not backbone.get("stored", True):
        got = backbone_sha256(state, backbone_keys(task))
        if backbone.get("sha256") is not None and got != backbone["sha256"]:
            raise SharingError(
                f"the backbone rebuilt from model_name={backbone.get('model_name')!r} pretrained="
                f"{backbone.get('pretrained')!r} differs from the one {folder} was trained on (SHA-256 {got[:12]}... "
                f"!= {str(backbone['sha256'])[:12]}...): other weights under the same name; export the model with "
                "backbone='always' to share the backbone too"
            )
    task.load_state_dict({**state, **saved}, strict=True)
    normalization = config.get("normalization")
    if normalization:  # the statistics it was trained with, also where the encoder was built without its source
        task.pixel_mean.copy_(torch.tensor(normalization["mean"]).view_as(task.pixel_mean))
        task.pixel_std.copy_(torch.tensor(normalization["std"]).view_as(task.pixel_std))
    preprocessing = folder / PREPROCESSING_FILE
    if not preprocessing.is_file():
        raise SharingError(f"{folder} has no {PREPROCESSING_FILE}: the folder is incomplete")
    task.preprocessing = Preprocessing.from_dict(json.loads(preprocessing.read_text()))
    if config.get("label_names"):
        task.label_names = [str(n) for n in config["label_names"]]
    return task.to(map_location).eval()
