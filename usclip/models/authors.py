"""Load what the authors' CLIP scripts save into the equivalent usclip task.

The authors' training scripts (github.com/jinggqu/NextGen-UIA) save the best model as one ``torch.save`` dict:

* paper release, ``adapter_components.pth`` (release:clip_seg.py:178-192, release:clip_cls.py:180-193):
  ``{"reduces": sd, "blocks": sd, "seg_head" | "cls_head": sd, "mona": {name: tensor}}``, where ``mona`` holds every
  parameter of their ``CLIPAdapter`` whose name contains ``mona``:
  ``clip_model.visual.transformer.resblocks.{i}.mona.<param>`` for the 12 vision blocks and
  ``clip_model.transformer.resblocks.{i}.mona.<param>`` for the 12 text blocks (their ``model.py`` builds a Mona in
  every block of both towers, release:models/openai/model.py:263);
* later code, ``best_model.pth`` (later:src/models/clip/segmentation.py:228-242, classification.py:229-243, and the
  same in ``src/models/{biomedclip,metaclip,unimedclip}``): the same dict; Mona keys only for the vision blocks and,
  on open_clip models, under their batch-first wrapper (``...{i}.mona.clip_mona.<param>``, on BiomedCLIP's trunk
  ``clip_model.visual.trunk.blocks.{i}.mona.clip_mona.<param>``). LoRA weights are not in these files (their
  scripts keep only names containing ``mona``).

:func:`convert_authors_state_dict` renames these tensors to the keys of a usclip task: the head parts to
``head.<part>.<key>`` (:class:`usclip.models.authors_heads.AuthorsHead` has their names), the Mona tensors to
``encoder.visual.transformer.resblocks.{i}.<mona_attr>.<param>`` (``<param>`` keeps their names). Two groups of
their tensors never act on an output and are dropped, with a log line: the text tower's Mona (the text has 77
tokens and their Mona runs only where the token count minus one is a square, release:models/openai/model.py:270-284)
and, when a task is given, the Mona of blocks after the deepest tapped one (usclip does not build those blocks; in
their code they run but feed nothing). :func:`load_authors_checkpoint` reads a file (``weights_only=True``),
converts it for a task and loads it strictly: every key must exist in the task with the same shape, and every
trainable tensor of the task must come from the file.

The equivalent task: the head that matches their adapter class (``head: authors_release`` for the paper release's
``CLIPAdapter``, ``authors_src`` for the later ``CLIPAdapter``, ``authors_timm`` for ``TimmCLIPAdapter``),
``layers: [3, 6, 9]``, ``embed_dim: 512`` and, for their Mona, ``adapter: mona`` with the placement that matches
their code (the release applies one Mona module twice per block: ``placement: released``; the later code one Mona
after the block, with its variant). See docs/adapters.md, "The authors' model classes in usclip".
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: the head parts of their checkpoints, as saved (``model.reduces.state_dict()`` ...)
HEAD_PARTS = ("reduces", "blocks", "seg_head", "cls_head")
#: the top-level keys their scripts save
CHECKPOINT_KEYS = (*HEAD_PARTS, "mona")
#: usclip's key prefix of the vision blocks, by tower layout
CLIP_BLOCKS = "encoder.visual.transformer.resblocks."
TRUNK_BLOCKS = "encoder.visual.trunk.blocks."
#: the classification heads' parameter indices in their three adapter classes, for error messages
_CLS_HEAD_OF = {"1": "authors_release", "2": "authors_src", "5": "authors_src", "3": "authors_timm"}

# clip_model.[visual.](transformer.resblocks|trunk.blocks).{i}.mona.[clip_mona.]<param>
_MONA_KEY = re.compile(
    r"^(?:clip_model\.)?(?P<visual>visual\.)?(?:transformer\.resblocks|trunk\.blocks)\.(?P<block>\d+)\.mona\."
    r"(?:clip_mona\.)?(?P<param>.+)$"
)


def _blocks_prefix_of(state: Mapping[str, Any]) -> str:
    return TRUNK_BLOCKS if any(k.startswith(TRUNK_BLOCKS) for k in state) else CLIP_BLOCKS


def _mona_attr_of(state: Mapping[str, Any], blocks_prefix: str) -> str:
    """The task's per-block Mona attribute (``mona``: placement ``released``; ``mona_mlp``: ``mlp``)."""
    pattern = re.compile(rf"^{re.escape(blocks_prefix)}\d+\.(mona\w*)\.")
    attrs = {m.group(1) for k in state if (m := pattern.match(k))}
    if len(attrs) > 1:
        raise ValueError(
            f"the task has Mona modules {sorted(attrs)} in each block; the authors' code has one Mona module per "
            "block (adapter_kwargs.placement: released for the paper release, mlp for the later code)"
        )
    return attrs.pop() if attrs else "mona"


def _tensor(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where} must be a tensor, got {type(value).__name__}")
    return value


def convert_authors_state_dict(
    saved: Mapping[str, Any],
    task: nn.Module | None = None,
    *,
    blocks_prefix: str | None = None,
    mona_attr: str | None = None,
    head_prefix: str = "head.",
) -> dict[str, torch.Tensor]:
    """Rename a checkpoint of the authors' CLIP scripts to the state-dict keys of the equivalent usclip task.

    Args:
        saved: the dict their scripts ``torch.save`` (``reduces``, ``blocks``, ``seg_head`` or ``cls_head``, and
            optionally ``mona``; see the module docstring).
        task: the usclip task to load into. With a task, ``blocks_prefix`` and ``mona_attr`` default to its own
            (``encoder.visual.transformer.resblocks.`` or ``encoder.visual.trunk.blocks.``; ``mona`` or
            ``mona_mlp``) and the Mona of blocks it does not build (after the deepest tapped one) is dropped.
        blocks_prefix: usclip key prefix of the vision blocks (without a task:
            ``encoder.visual.transformer.resblocks.``).
        mona_attr: the Mona module's attribute on usclip's block wrapper (without a task: ``mona``, the released
            layout).
        head_prefix: usclip key prefix of the head (``head.``).

    Returns:
        ``{usclip key: tensor}``; the text tower's Mona is dropped (it never runs in their code).

    Raises:
        ValueError: ``saved`` is not their format: unknown or missing top-level keys, both or neither of
            ``seg_head`` and ``cls_head``, a Mona key of no known form, or a value that is not a tensor. The
            message names the keys.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(f"expected the authors' checkpoint dict ({CHECKPOINT_KEYS}), got {type(saved).__name__}")
    unknown = sorted(set(saved) - set(CHECKPOINT_KEYS))
    if unknown:
        raise ValueError(f"unknown top-level keys {unknown} in the authors' checkpoint; expected {CHECKPOINT_KEYS}")
    missing = [k for k in ("reduces", "blocks") if k not in saved]
    heads = [k for k in ("seg_head", "cls_head") if k in saved]
    if missing or len(heads) != 1:
        raise ValueError(
            f"the authors' checkpoint needs 'reduces', 'blocks' and one of 'seg_head' / 'cls_head'; missing {missing}, "
            f"task heads present {heads} (top-level keys: {sorted(saved)})"
        )
    state = task.state_dict() if task is not None else None
    if blocks_prefix is None:
        blocks_prefix = _blocks_prefix_of(state) if state is not None else CLIP_BLOCKS
    if mona_attr is None:
        mona_attr = _mona_attr_of(state, blocks_prefix) if state is not None else "mona"

    out: dict[str, torch.Tensor] = {}
    for part in (p for p in HEAD_PARTS if p in saved):
        if not isinstance(saved[part], Mapping):
            raise ValueError(f"saved[{part!r}] must be a state dict, got {type(saved[part]).__name__}")
        for key, value in saved[part].items():
            out[f"{head_prefix}{part}.{key}"] = _tensor(value, f"saved[{part!r}][{key!r}]")

    text, pruned, unparsed = [], [], []
    for key, value in (saved.get("mona") or {}).items():
        m = _MONA_KEY.match(key)
        if m is None:
            unparsed.append(key)
            continue
        if not m.group("visual"):
            text.append(key)
            continue
        block = f"{blocks_prefix}{m.group('block')}."
        if state is not None and not any(k.startswith(block) for k in state):
            pruned.append(key)
            continue
        out[f"{block}{mona_attr}.{m.group('param')}"] = _tensor(value, f"saved['mona'][{key!r}]")
    if unparsed:
        raise ValueError(
            f"{len(unparsed)} Mona keys of no known form, e.g. {unparsed[:3]}; expected "
            "clip_model.visual.transformer.resblocks.{i}.mona.<param> (or trunk.blocks, or .mona.clip_mona.<param>)"
        )
    if text:
        log.info("dropped %d Mona tensors of the text tower (never applied in the authors' code)", len(text))
    if pruned:
        log.info("dropped %d Mona tensors of blocks after the deepest tapped one (they feed no output)", len(pruned))
    return out


def _head_hint(converted: Mapping[str, torch.Tensor], head_prefix: str) -> str:
    indices = {k.split(".")[2] for k in converted if k.startswith(f"{head_prefix}cls_head.")}
    guesses = sorted({_CLS_HEAD_OF[i] for i in indices if i in _CLS_HEAD_OF})
    return f"; the file's cls_head is that of head: {' / '.join(guesses)}" if guesses else ""


def load_authors_checkpoint(
    task: nn.Module, checkpoint: str | os.PathLike[str] | Mapping[str, Any], mona_attr: str | None = None
) -> dict[str, torch.Tensor]:
    """Load a checkpoint of the authors' CLIP scripts into a usclip task, strictly.

    Build the task with the equivalent config first (``head: authors_release`` / ``authors_src`` /
    ``authors_timm``, the same ``layers``, ``embed_dim`` (their ``reduce_dim``), ``num_classes`` and adapter); the
    frozen encoder comes from the task's ``pretrained`` weights, not from the file. A ``head: native`` task built from
    ``configs/baselines/{dinov2,unet,resnet18}_authors.yaml`` takes the ``best_model.pth`` of their baseline scripts
    instead (:func:`usclip.models.authors_baselines.convert_authors_baseline`, loaded strictly into ``task.net``).

    Args:
        task: a :class:`~usclip.tasks.SegmentationTask` or :class:`~usclip.tasks.ClassificationTask` with an authors'
            head.
        checkpoint: path of their ``adapter_components.pth`` / ``best_model.pth`` (read with ``weights_only=True``),
            or the dict already loaded.
        mona_attr: the Mona attribute on usclip's block wrapper; ``None`` takes the task's.

    Returns:
        The tensors loaded, by usclip key.

    Raises:
        ValueError: the task's head is not an authors' head or is for the other task; the file is not their format;
            keys the task does not have, shapes that differ, or trainable tensors of the task the file does not
            hold (all named).
    """
    if isinstance(checkpoint, Mapping):
        saved: Any = checkpoint
        source = "the checkpoint dict"
    else:
        source = os.fspath(checkpoint)
        saved = torch.load(source, map_location="cpu", weights_only=True)
    head = getattr(task, "hparams", {}).get("head")
    net = getattr(task, "net", None)
    if head == "native" and isinstance(net, nn.Module):  # their baselines: DINOv2, UNet, ResNet18
        from usclip.models.authors_baselines import convert_authors_baseline

        if not isinstance(saved, Mapping):
            raise ValueError(f"{source} holds a {type(saved).__name__}, not a state dict of the authors' baselines")
        converted = convert_authors_baseline(saved, net)
        net.load_state_dict(converted, strict=True)
        log.info("loaded %d tensors from %s into %s.net", len(converted), source, type(task).__name__)
        return {f"net.{k}": v for k, v in converted.items()}
    if not str(head).startswith("authors_"):
        raise ValueError(
            f"the task has head={head!r}; an authors' checkpoint loads into head: authors_release, authors_src or "
            "authors_timm (their CLIP scripts), or a head: native task of configs/baselines/*_authors.yaml (their "
            "baseline scripts)"
        )
    kind = getattr(task, "task", None)
    expected = {"segmentation": "seg_head", "classification": "cls_head"}.get(str(kind))
    if isinstance(saved, Mapping) and expected is not None and expected not in saved:
        raise ValueError(f"{source} has no {expected!r}: it is not a {kind} checkpoint (keys: {sorted(saved)})")
    converted = convert_authors_state_dict(saved, task, mona_attr=mona_attr)

    state = task.state_dict()
    unexpected = sorted(k for k in converted if k not in state)
    shapes = [
        f"{k}: file {tuple(v.shape)}, task {tuple(state[k].shape)}"
        for k, v in converted.items()
        if k in state and v.shape != state[k].shape
    ]
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(converted))
    if unexpected or shapes or missing:
        problems = []
        if unexpected:
            problems.append(f"{len(unexpected)} keys the task does not have: {unexpected[:8]}")
        if shapes:
            problems.append(f"{len(shapes)} shapes that differ: {shapes[:8]}")
        if missing:
            problems.append(f"{len(missing)} trainable tensors of the task not in the file: {missing[:8]}")
        adapter = getattr(task, "encoder_args", {}).get("adapter")
        raise ValueError(
            f"{source} does not fit the task (head={head!r}, adapter={adapter!r}): {'; '.join(problems)}"
            f"{_head_hint(converted, 'head.')}"
        )
    task.load_state_dict(converted, strict=False)
    log.info("loaded %d tensors from %s into %s", len(converted), source, type(task).__name__)
    return converted
