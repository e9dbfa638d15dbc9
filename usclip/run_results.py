"""Tested run directories: their results and the cell of the paper's tables each run fills.

A run directory holds ``results/test_metrics.json`` (written by ``usclip test``) and either ``sweep_run.json``
(written by ``usclip sweep``: the paper's table, row group, method, dataset and seed) or the resolved
``config.yaml``, from which :func:`load_run` derives the same (see docs/reports.md). Runs trained from Python (a
plain ``lightning.Trainer``, no ``config.yaml``) stand in a config made from the logger's ``hparams.yaml`` and the
checkpoint (:func:`config_from_hparams`). Used by :mod:`usclip.reporting`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from usclip.paper import REFERENCE_METHODS, TABLES

log = logging.getLogger(__name__)

MethodFrom = Literal["auto", "config", "name"]
PROTOCOLS = ("strict", "authors")
SWEEP_RUN_FILE = "sweep_run.json"
# files that say which cell a run fills: usclip sweep's, LightningCLI's resolved config, a Python run's hparams
_RUN_FILES = (SWEEP_RUN_FILE, "config.yaml", "hparams.yaml")

# row group of a run without sweep_run.json -> the paper's table
TABLE_OF_GROUP = {"segmentation": "table2", "zero-shot": "table3", "supervised": "table3"}
# data folder names -> the paper's dataset names (compared lower-case, without punctuation); microUS: the authors'
DATASET_ALIASES = {
    "ln1": "LN-1",
    "ln2": "LN-2",
    "busi": "BUSI",
    "ddti": "DDTI",
    "tn3k": "TN3K",
    "prostate": "Prostate",
    "microus": "Prostate",
}
ADAPTER_TITLES = {"mona": "Mona", "lora": "LoRA"}
# runs named from their config: whole models trained end to end (head: native) from these are reference rows (unet:
# the authors' UNet; dinov2: is a compared method)
REFERENCE_MODEL_PREFIXES = ("smp:", "timm:resnet", "unet")
_WEIGHT_FILE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".safetensors", ".ckpt"})


@dataclass(frozen=True)
class RunResult:
    """The test result of one run and the cell of the paper's tables it fills.

    Attributes:
        path: the run directory.
        table: ``"table2"`` or ``"table3"``.
        group: the row group: ``"segmentation"``, ``"zero-shot"`` or ``"supervised"``.
        method: the row: the paper's method name (``sweep_run.json``) or one made from the config.
        dataset: the paper's dataset name (``LN-1``, ``BUSI``, ...) or the data folder's name.
        seed: the run's seed (``None`` when unset).
        metrics: the numbers of ``results/test_metrics.json``.
        protocol: its ``metric_protocol`` (``"strict"`` when absent).
        reference: a reference row (UNet, ResNet18), shown but not ranked.
        sweep_protocol: the ``usclip sweep`` protocol that made it (``"authors"``, ``"usclip"``; ``sweep_run.json``),
            ``None`` for runs made by hand or by a manifest without protocols.
        deterministic: the manifest runs this cell once (nothing trains, so every seed gives the same numbers).
    """

    path: Path
    table: str
    group: str
    method: str
    dataset: str
    seed: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    protocol: str = "strict"
    reference: bool = False
    sweep_protocol: str | None = None
    deterministic: bool = False

    @property
    def task(self) -> str:
        """``"segmentation"`` or ``"classification"``."""
        return "segmentation" if self.group == "segmentation" else "classification"


def _nested(config: dict[str, Any], *keys: str) -> Any:
    node: Any = config
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def weights_name(model_name: Any, pretrained: Any) -> str:
    """A readable name for an encoder and its weights.

    ``openai`` -> ``OpenAI CLIP <model>``; a BiomedCLIP hf-hub id -> ``BiomedCLIP``; other hf-hub ids -> the repo id;
    a MetaCLIP tag -> ``MetaCLIP <model> (<tag>)``; a local weights file -> ``<model> (<file name>)``; ``None`` ->
    ``<model> (random init)``; any other tag -> ``<model> (<tag>)``.
    """
    model = str(model_name)
    if pretrained is None:
        return f"{model} (random init)"
    tag = str(pretrained)
    low = tag.lower()
    if low == "openai":
        return f"OpenAI CLIP {model}"
    if "biomedclip" in low:
        return "BiomedCLIP"
    if low.startswith("hf-hub:"):
        return tag.removeprefix("hf-hub:")
    if "metaclip" in low:
        return f"MetaCLIP {model} ({tag})"
    if "/" in tag or "\\" in tag or Path(tag).suffix.lower() in _WEIGHT_FILE_SUFFIXES:
        return f"{model} ({Path(tag).name})"
    return f"{model} ({tag})"


def method_name(config: dict[str, Any], method_from: Literal["config", "name"] = "config") -> str:
    """The method of a run, from its resolved LightningCLI config.

    ``method_from="config"``: the encoder and its weights (:func:`weights_name`), ``+ <adapter>``, ``+ <head> head``
    for heads other than the paper's, and ``(ft.)`` when ``adapter_checkpoint`` is set (adapters from a caption
    fine-tuning run), e.g. ``OpenAI CLIP ViT-B-16 + Mona (ft.)`` or ``BiomedCLIP + Mona``: runs that share an
    adapter but not the encoder, weights or starting point get separate rows. ``method_from="name"``: the logger's
    name (``trainer.logger.init_args.name``).

    Raises:
        ValueError: if ``method_from`` is unknown or ``"name"`` is asked and the config has no logger name.
    """
    if method_from == "name":
        name = _nested(config, "trainer", "logger", "init_args", "name")
        if not name:
            raise ValueError("method_from='name' needs trainer.logger.init_args.name in the run's config.yaml")
        return str(name)
    if method_from != "config":
        raise ValueError(f"method_from must be 'config' or 'name', got {method_from!r}")
    args = _nested(config, "model", "init_args") or {}
    model = args.get("model_name")
    parts = [weights_name(model, args["pretrained"]) if "pretrained" in args else str(model)]
    adapter, head = args.get("adapter"), args.get("head")
    if adapter:
        parts.append(ADAPTER_TITLES.get(str(adapter), str(adapter)))
    if head not in (None, "paper", "native"):
        parts.append(f"{head} head")
    name = " + ".join(parts)
    return f"{name} (ft.)" if args.get("adapter_checkpoint") else name


def dataset_name(folder: str) -> str:
    """The paper's name of a data folder (``ln_1`` -> ``LN-1``, ``microUS`` -> ``Prostate``); others unchanged."""
    return DATASET_ALIASES.get(re.sub(r"[^0-9a-z]", "", folder.lower()), folder)


def _group_of(config: dict[str, Any], metrics: dict[str, float]) -> str:
    class_path = str(_nested(config, "model", "class_path") or "")
    if "Segmentation" in class_path or "dice" in metrics:
        return "segmentation"
    if "ZeroShot" in class_path:
        return "zero-shot"
    if "Classif" in class_path or "acc" in metrics:
        return "supervised"
    raise ValueError(
        f"cannot tell the task of model.class_path={class_path!r} "
        "(expected *SegmentationTask, *ClassificationTask or *ZeroShotClassifier)"
    )


def _is_reference_config(config: dict[str, Any]) -> bool:
    args = _nested(config, "model", "init_args") or {}
    model = str(args.get("model_name") or "")
    return args.get("head") == "native" and model.startswith(REFERENCE_MODEL_PREFIXES)


def _read_metrics(path: Path) -> tuple[dict[str, float], str]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of numbers, got {type(raw).__name__}")
    protocol = raw.pop("metric_protocol", "strict")
    if protocol not in PROTOCOLS:
        raise ValueError(f"{path}: metric_protocol must be one of {PROTOCOLS}, got {protocol!r}")
    metrics = {k: float(v) for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return metrics, str(protocol)


def _read_sweep_run(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}")
    missing = [k for k in ("table", "group", "method", "dataset") if not info.get(k)]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (expected table, group, method, dataset, seed)")
    table = TABLES.get(str(info["table"]))
    if table is None:
        raise ValueError(f"{path}: table must be one of {sorted(TABLES)}, got {info['table']!r}")
    if info["group"] not in table.groups:
        raise ValueError(f"{path}: group of {table.name} must be one of {table.groups}, got {info['group']!r}")
    return info


def sweep_protocol_of(info: dict[str, Any]) -> str | None:
    """The sweep protocol of a ``sweep_run.json``: its ``protocol`` (``None`` for a manifest without protocols).

    Files written by the paper manifest before protocols existed (no such key) get ``"usclip"``: the only protocol
    there was, usclip's defaults.
    """
    if "protocol" in info:
        return None if info["protocol"] is None else str(info["protocol"])
    return "usclip" if info.get("manifest") == "paper" else None


# a task's hyperparameter that only it has -> its class (runs from Python record no class path)
_TASK_OF_HPARAM = (
    ("prompts", "usclip.tasks.ZeroShotClassifier"),
    ("lambda_dice", "usclip.tasks.SegmentationTask"),
    ("gamma", "usclip.tasks.ClassificationTask"),
)


class _LenientLoader(yaml.SafeLoader):
    """A safe YAML loader that reads an object another tool tagged (``!!python/object:...``) as plain data."""


def _plain(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_LenientLoader.add_multi_constructor("", _plain)


def _run_checkpoint(run_dir: Path) -> Path | None:
    """``checkpoints/best.ckpt``, else ``last.ckpt``, else the newest ``checkpoints/*.ckpt``; ``None`` without one."""
    folder = run_dir / "checkpoints"
    for name in ("best.ckpt", "last.ckpt"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return found[-1] if found else None


def config_from_hparams(run_dir: str | Path) -> dict[str, Any]:
    """A stand-in for ``config.yaml`` of a run trained from Python (plain ``lightning.Trainer``, no LightningCLI).

    The task's and the DataModule's hyperparameters come from the logger's ``hparams.yaml`` (TensorBoard and CSV
    loggers write it at fit and test), else from the checkpoint (``hyper_parameters``, ``datamodule_hyper_parameters``);
    the seed from the checkpoint (:class:`usclip.callbacks.SeedEachEpoch` stores the ``seed_everything`` seed); the
    task class from a hyperparameter only it has (``prompts``: zero-shot, ``lambda_dice``: segmentation, ``gamma``:
    classification); the logger name from the run directory's parent folder (``<save_dir>/<name>/version_<n>``).
    The checkpoint is read with ``torch.load(weights_only=True)``, as everywhere in usclip.

    Returns:
        ``{"model": {"class_path", "init_args"}, "data": {"init_args"}, "seed_everything", "trainer"}`` as far as
        known; an empty dict when the run has neither file.

    Raises:
        ValueError: if ``hparams.yaml`` is not a YAML mapping.
    """
    run_dir = Path(run_dir)
    hparams: dict[str, Any] = {}
    path = run_dir / "hparams.yaml"
    if path.is_file():
        loaded = yaml.load(path.read_text(), Loader=_LenientLoader) or {}  # a safe loader's subclass
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a YAML mapping of hyperparameters, got {type(loaded).__name__}")
        hparams = loaded
    seed, ckpt = None, _run_checkpoint(run_dir)
    if ckpt is not None:
        from usclip._resume import UnsafeCheckpointError, check_checkpoint  # torch: only for runs from Python

        try:
            check_checkpoint(ckpt)  # refuses a file that would run code when unpickled
            import torch

            state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except UnsafeCheckpointError as err:
            log.warning("%s; no hyperparameters or seed from it", err)
            state = {}
        if not hparams:
            hparams = dict(state.get("hyper_parameters") or {}) | dict(state.get("datamodule_hyper_parameters") or {})
        seed = (state.get("callbacks", {}).get("SeedEachEpoch") or {}).get("seed")
    if not hparams and seed is None:
        return {}
    class_path = next((cls for key, cls in _TASK_OF_HPARAM if key in hparams), "")
    return {
        "seed_everything": seed,
        "trainer": {"logger": {"init_args": {"name": run_dir.resolve().parent.name}}},
        "model": {"class_path": class_path, "init_args": hparams},
        "data": {"init_args": hparams},
    }


def _seed(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def load_run(run_dir: str | Path, method_from: MethodFrom = "auto") -> RunResult:
    """Read one run directory: ``results/test_metrics.json`` and ``sweep_run.json`` or ``config.yaml``.

    A run trained from Python has no ``config.yaml``: its ``hparams.yaml`` and checkpoint stand in
    (:func:`config_from_hparams`).

    With ``sweep_run.json`` (written by ``usclip sweep``), the table, row group, method, dataset, seed and sweep
    protocol (:func:`sweep_protocol_of`) are the paper's, from that file. Without it they come from
    ``config.yaml``: the group from ``model.class_path``, the method from :func:`method_name`, the dataset from the
    folder name of ``data.init_args.test_root`` (the external test set, when set) or ``root``
    (:func:`dataset_name`), the seed from ``seed_everything``; such runs have no sweep protocol.

    Args:
        run_dir: the run directory.
        method_from: ``"auto"`` (``sweep_run.json``, else the config), ``"config"`` (:func:`method_name`) or
            ``"name"`` (the logger's name).

    Raises:
        FileNotFoundError: if the metrics file is missing, or ``sweep_run.json`` and every source of a config
            (``config.yaml``, ``hparams.yaml``, a checkpoint), or the config when ``method_from`` needs it.
        ValueError: if a file cannot be parsed, ``metric_protocol`` is unknown or the task cannot be told.
    """
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "results" / "test_metrics.json"
    sweep_path = run_dir / SWEEP_RUN_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"run directory {run_dir} has no results/test_metrics.json (run `usclip test`)")
    needs_config = not sweep_path.is_file() or method_from in ("config", "name")
    config: dict[str, Any] = {}
    if config_path.is_file():
        loaded = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path}: expected a YAML mapping, got {type(loaded).__name__}")
        config = loaded
    elif needs_config:
        config = config_from_hparams(run_dir)  # a run trained from Python
        if not config:
            raise FileNotFoundError(
                f"run directory {run_dir} has no config.yaml, hparams.yaml or checkpoints/*.ckpt (and no "
                f"{SWEEP_RUN_FILE}): nothing says which task, method and dataset it is"
            )
    metrics, protocol = _read_metrics(metrics_path)
    sweep_protocol, deterministic = None, False
    if sweep_path.is_file():
        info = _read_sweep_run(sweep_path)
        table, group, dataset = str(info["table"]), str(info["group"]), str(info["dataset"])
        method, seed = str(info["method"]), _seed(info.get("seed"))
        sweep_protocol, deterministic = sweep_protocol_of(info), info.get("deterministic") is True
    else:
        group = _group_of(config, metrics)
        table = TABLE_OF_GROUP[group]
        data = _nested(config, "data", "init_args") or {}
        root = data.get("test_root") or data.get("root")
        dataset = dataset_name(Path(str(root)).name) if root else "unknown"
        method, seed = method_name(config), _seed(config.get("seed_everything"))
    if method_from in ("config", "name"):
        method = method_name(config, method_from)
    reference = method in REFERENCE_METHODS or (bool(config) and _is_reference_config(config))
    return RunResult(
        run_dir, table, group, method, dataset, seed, metrics, protocol, reference, sweep_protocol, deterministic
    )


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Tested runs at or below ``paths``.

    A tested run is a folder with ``results/test_metrics.json`` and ``sweep_run.json``, ``config.yaml``, or (a run
    trained from Python) ``hparams.yaml`` or ``checkpoints/*.ckpt``.

    Raises:
        FileNotFoundError: if a path does not exist or holds no tested run.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"RUN_DIR {p} does not exist")
        runs = []
        for metrics in sorted(p.rglob("results/test_metrics.json")):
            run = metrics.parent.parent
            if any((run / name).is_file() for name in _RUN_FILES) or _run_checkpoint(run) is not None:
                runs.append(run)
            else:
                log.warning("%s: test results without %s or a checkpoint; skipped", run, " or ".join(_RUN_FILES))
        unfinished = [s.parent for s in sorted(p.rglob(SWEEP_RUN_FILE)) if s.parent not in runs]
        if unfinished:
            log.warning(
                "%s: %d sweep run(s) without results/test_metrics.json (not finished) left out, e.g. %s",
                p,
                len(unfinished),
                unfinished[0],
            )
        if not runs:
            raise FileNotFoundError(
                f"RUN_DIR {p} holds no tested run (no {', '.join(_RUN_FILES)} or checkpoints/ next to "
                "results/test_metrics.json)"
            )
        found += [r for r in runs if r not in found]
    return found
