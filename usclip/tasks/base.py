"""BaseTask: the LightningModule shared by the segmentation and classification tasks.

``__init__`` saves hyperparameters, then calls ``configure_models``, ``configure_losses`` and ``configure_metrics``
(the torchgeo trainer pattern). Images arrive in [0, 1] and are normalised here, on the device, with the
encoder's own mean and std. Only trainable parameters (adapters and head) go to the optimiser: AdamW with the
paper's betas (0.9, 0.95) and weight decay 1e-2, and a cosine schedule with optional linear warm-up.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from usclip.callbacks import (
    AtomicCheckpoints,
    FiniteLossGuard,
    MidEpochCheckpoint,
    OutOfMemoryAdvice,
    RunCheckpoint,
    SeedEachEpoch,
    ValidateOnEpochs,
)
from usclip.data.bad_samples import is_empty_batch
from usclip.data.crop import Box
from usclip.data.preprocessing import ImageInput, ImageInputs, Preprocessing
from usclip.models import CLIPEncoder
from usclip.models.authors_heads import AUTHORS_HEADS
from usclip.models.baselines import TimmEncoder, build_native_model
from usclip.models.encoder import check_weights_file
from usclip.run_dirs import run_dir_of
from usclip.tasks.prediction import Prediction, merge_region_predictions

log = logging.getLogger(__name__)

#: ``BaseTask(head=...)``: the paper's head, a whole native model, or one of the authors' heads
HEADS = ("paper", "native", *AUTHORS_HEADS)

#: input normalisations: the encoder's mean and std, or none (the authors' code)
NORMALIZATIONS = ("clip", "none")

#: the default of ``BaseTask(pretrained=...)``: not a value, an error asking for one (``null`` means random weights)
PRETRAINED_REQUIRED = "<required: an open_clip tag, a weights file, an hf-hub: id, or null for random weights>"


def _merge_key(p: Prediction) -> str | int:
    """The file id of a segmentation prediction of a DICOM region (merged per file), else a key of its own."""
    return p.region[0] if p.region is not None and p.mask is not None else id(p)


#: the settings of Lightning's own ``ModelCheckpoint()`` (added when the Trainer is given none); compared by
#: :func:`_lightning_default`
_CHECKPOINT_SETTINGS = (
    "dirpath",
    "filename",
    "monitor",
    "mode",
    "save_last",
    "save_top_k",
    "save_weights_only",
    "auto_insert_metric_name",
    "_every_n_train_steps",
    "_every_n_epochs",
    "_train_time_interval",
    "_save_on_train_epoch_end",
    "_enable_version_counter",
)


def _settings(callback: ModelCheckpoint) -> tuple[Any, ...]:
    return tuple(getattr(callback, name, None) for name in _CHECKPOINT_SETTINGS)


def _lightning_default(callback: Callback) -> bool:
    """Whether ``callback`` is the ``ModelCheckpoint()`` Lightning adds itself when the Trainer is given none.

    Lightning does not mark it; it is recognised by its type and settings, so a user's ``ModelCheckpoint()`` with
    every setting at its default counts as Lightning's (and is replaced by usclip's ``best``/``last`` pair, which
    write the same last checkpoint and more).
    """
    return type(callback) is ModelCheckpoint and _settings(callback) == _settings(ModelCheckpoint())


def _own(callback: Callback) -> Callback:
    """Mark ``callback`` as added by :meth:`BaseTask.configure_callbacks` (not passed by the user)."""
    callback.__dict__["_usclip_own"] = True
    return callback


def _is_own(callback: Callback) -> bool:
    return bool(callback.__dict__.get("_usclip_own"))


def early_stopping_conflict(patience: int, passed: str) -> str:
    """The message for early stopping set twice: ``early_stopping_patience`` and an ``EarlyStopping`` callback."""
    return (
        f"early stopping is set twice: model early_stopping_patience={patience} and the callback {passed} in the "
        "Trainer's callbacks (trainer.callbacks). Keep one: set early_stopping_patience to null (--model.init_args."
        "early_stopping_patience null) to use your callback, or drop your callback"
    )


class BaseTask(L.LightningModule):
    """Common training logic; subclasses define the head, the loss and the metrics.

    Args:
        model_name: open_clip model config (``ViT-B-16``) or ``hf-hub:org/repo``.
        pretrained: required (the default is an error). An open_clip tag (``openai``, ``metaclip_400m``), a local
            checkpoint file, an ``hf-hub:`` id, or ``null`` for random weights, written out: a config that forgets it
            stops instead of training a random encoder. Weights that cannot be found, fetched or loaded stop with one
            error saying where to get them.
        layers: 0-based encoder blocks whose patch features feed the head (the paper: 3, 6, 9).
        adapter: ``mona``, ``lora`` or ``null`` (frozen encoder, head only).
        adapter_kwargs: fields of the adapter's config (:class:`usclip.adapters.MonaConfig` /
            :class:`usclip.adapters.LoraConfig`).
        adapter_checkpoint: adapter-only file to start from (e.g. from caption fine-tuning).
        train_adapter: ``True``: the adapter trains with the head. ``False``: the adapter stays as built or loaded
            (``adapter_checkpoint``) and only the head trains, as the authors' later code treats LoRA from caption
            tuning (it trains only parameters named ``mona``); dropout inside the frozen adapter still acts in
            training mode, as theirs does. See docs/adapters.md, "LoRA after caption tuning".
        quick_gelu: force QuickGELU on or off; ``null`` follows the weights.
        allow_unsafe_torchscript: allow an OpenAI TorchScript ``.pt`` file (loading it can execute code).
        grad_checkpointing: recompute encoder activations in the backward pass to save memory.
        compile_encoder: run the encoder through ``torch.compile`` (the first steps compile; the state dict and
            checkpoints are unchanged). See docs/benchmarks.md for where it pays.
        head: ``paper``: the frozen encoder (CLIP, or a ``timm:<name>`` backbone such as DINOv2) under the paper's
            head; ``authors_release``, ``authors_src``, ``authors_timm``: the same encoder under the head of the
            authors' code (paper release; later ``src/`` code; later code for the medical CLIP rows), parameter for
            parameter (:mod:`usclip.models.authors_heads`; ``embed_dim`` is their ``reduce_dim``, ``fusion`` is
            unused); ``native``: a whole baseline model trained end to end with its own decoder or classifier
            (``smp:Unet/resnet34``, ``clipseg:CIDAS/clipseg-rd64-refined`` or the authors' ``unet`` for segmentation,
            ``timm:resnet18`` for classification, the authors' frozen ``dinov2:vitb14`` with their decoder or classifier
            for both).
        num_classes: output classes (linked from the DataModule by the CLI).
        image_size: input side length (linked from the DataModule by the CLI).
        normalization: ``clip`` feeds ``(x - mean) / std`` with the encoder's own mean and std (CLIP's, or the
            ``timm`` / native model's); ``none`` feeds the ``[0, 1]`` images unchanged, as the authors' code does.
        embed_dim: width each selected block is projected to before fusion (512, CLIP ViT-B/16's embedding width).
        fusion: how projected block features are fused by the paper's head: ``concat`` (the paper) or ``sum``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr: learning rate the cosine decays to (0; the authors' code: 1e-8, ``CosineAnnealingLR(eta_min)``).
        early_stopping_patience: stop after this many validation epochs without improvement; ``None`` never stops.
        validate_every: validate after the 0-based epochs ``e > 0`` with ``e % validate_every == 0``, as the authors'
            loops do (10: after epochs 10, 20, ..., 990 of 1000), and after no other
            (:class:`usclip.callbacks.ValidateOnEpochs`); ``None``: ``trainer.check_val_every_n_epoch`` decides
            (Lightning's ``(e + 1) % n == 0``: epochs 9, 19, ..., 999).
        validate_last_epoch: with ``validate_every``, also validate after the last epoch (the later ``src/`` code).
        checkpoint_every_n_steps: also write ``checkpoints/last.ckpt`` every this many optimiser steps in the middle
            of epochs (``--ckpt_path last`` continues at the next batch, bit for bit); ``null``: not by steps.
        checkpoint_every_minutes: also write it when this many minutes passed since the last checkpoint (30: a kill
            loses at most about half an hour; epochs shorter than that never trigger it, as every epoch end writes
            ``last.ckpt`` and restarts the clock); ``null``: not by time. See docs/reliability.md.
        save_frozen_backbone: store the frozen encoder weights in checkpoints. ``None`` (auto) stores them only for
            random initialisation (``pretrained: null``), which cannot be rebuilt; pretrained weights are reloaded from
            their source and checked against a fingerprint instead, so checkpoints hold adapters and head only.
        native_kwargs: options of a ``head: native`` model (:func:`usclip.models.baselines.build_native_model`):
            ``dinov2:<arch>`` takes ``layer_scale`` (``false``: the authors' model, which drops DINOv2's layer scale)
            and ``n_last_blocks`` (classification), ``unet`` takes ``init_channels``.
    """

    #: what the task predicts (selects native baseline models)
    task: Literal["segmentation", "classification"] = "segmentation"
    #: metric name that selects the best checkpoint, and its direction
    monitor: str = "val_loss"
    monitor_mode: Literal["min", "max"] = "min"

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = PRETRAINED_REQUIRED,
        layers: list[int] | tuple[int, ...] = (3, 6, 9),
        adapter: Literal["mona", "lora"] | None = None,
        adapter_kwargs: dict[str, Any] | None = None,
        adapter_checkpoint: str | None = None,
        train_adapter: bool = True,
        quick_gelu: bool | None = None,
        allow_unsafe_torchscript: bool = False,
        grad_checkpointing: bool = False,
        compile_encoder: bool = False,
        head: Literal["paper", "native", "authors_release", "authors_src", "authors_timm"] = "paper",
        num_classes: int = 2,
        image_size: int = 224,
        normalization: Literal["clip", "none"] = "clip",
        embed_dim: int = 512,
        fusion: Literal["concat", "sum"] = "concat",
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        early_stopping_patience: int | None = None,
        validate_every: int | None = None,
        validate_last_epoch: bool = False,
        checkpoint_every_n_steps: int | None = None,
        checkpoint_every_minutes: float | None = 30.0,
        save_frozen_backbone: bool | None = None,
        native_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        MidEpochCheckpoint(checkpoint_every_n_steps, checkpoint_every_minutes)  # bad values: an error now, not at fit
        if num_classes < 2:
            raise ValueError(
                f"num_classes must be at least 2 (background/benign and lesion/malignant), got {num_classes}"
            )
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if pretrained == PRETRAINED_REQUIRED:
            raise ValueError(
                "pretrained is required and was not given (model.init_args.pretrained in a config): write an "
                "open_clip tag (openai), a weights file, an hf-hub: id, or null for random weights. There is no "
                "default, so that a config that forgets it does not train a random encoder without saying so."
            )
        check_weights_file(pretrained, model_name)
        if validate_every is not None:
            ValidateOnEpochs(validate_every)  # a bad value: an error now, not at fit
        elif validate_last_epoch:
            raise ValueError("validate_last_epoch=True needs validate_every (the epochs validated before the last one)")
        self.save_hyperparameters()
        #: what the data pipeline does to an image before the network (crop, size, colour, DICOM regions): the
        #: DataModule's, copied at setup and stored in every checkpoint; the defaults for a task built in Python
        side = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.preprocessing = Preprocessing(image_size=side)
        #: class names in index order (the DataModule's ``label_names``, stored in checkpoints); ``None``: unknown
        self.label_names: list[str] | None = None
        #: the :class:`CLIPEncoder` arguments among the hyperparameters
        self.encoder_args: dict[str, Any] = {
            "model_name": model_name,
            "pretrained": pretrained,
            "layers": list(layers),
            "adapter": adapter,
            "adapter_kwargs": adapter_kwargs,
            "adapter_checkpoint": adapter_checkpoint,
            "quick_gelu": quick_gelu,
            "allow_unsafe_torchscript": allow_unsafe_torchscript,
            "grad_checkpointing": grad_checkpointing,
        }
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    # ----------------------------------------------------------------- construction
    def configure_models(self) -> None:
        """Build the encoder (frozen, with adapters) and the head, or a whole native baseline model.

        Named ``configure_models`` (as in torchgeo), not ``configure_model``: Lightning calls a hook of that name at
        the start of ``fit``, which would rebuild the encoder and discard loaded or random-initialised weights.
        """
        args = self.encoder_args
        name, size = args["model_name"], self.hparams["image_size"]
        self.encoder: CLIPEncoder | TimmEncoder | None = None
        self.net: nn.Module | None = None
        adapted = args["adapter"] is not None or args["adapter_checkpoint"] is not None
        if adapted and (self.hparams["head"] == "native" or name.startswith("timm:")):
            raise ValueError(
                f"adapter={args['adapter']!r} is for CLIP encoders under the paper's head; model_name={name!r} "
                f"with head={self.hparams['head']!r} takes no adapter (set adapter: null)"
            )
        if self.hparams["head"] == "native":
            self.net, mean, std = build_native_model(
                self.task,
                name,
                self.hparams["num_classes"],
                args["pretrained"],
                size,
                self.hparams.get("text_prompt"),
                self.hparams.get("native_kwargs"),
            )
        else:
            if self.hparams.get("native_kwargs"):
                raise ValueError(
                    f"native_kwargs={self.hparams['native_kwargs']!r} are options of head='native' models; "
                    f"head={self.hparams['head']!r} takes none (set native_kwargs: null)"
                )
            if name.startswith("timm:"):
                self.encoder = TimmEncoder(name.removeprefix("timm:"), args["pretrained"], args["layers"], size)
            else:
                self.encoder = CLIPEncoder(image_size=size, **args)
            mean, std = self.encoder.image_mean, self.encoder.image_std
            self.head = self.build_head(self.encoder.out_channels)
            if not self.hparams.get("train_adapter", True):  # checkpoints from before the switch: trained
                self._freeze_adapter()
        # Kept out of the module tree (``__dict__``), so state dicts keep the encoder's own keys.
        self.__dict__["_compiled_encoder"] = (
            torch.compile(self.encoder) if self.hparams.get("compile_encoder") and self.encoder is not None else None
        )
        self.pixel_mean: torch.Tensor
        self.pixel_std: torch.Tensor
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.parameters())
        log.info(
            "%s(%s, head=%s): trainable %s of %s parameters (%.2f%%)",
            type(self).__name__,
            name,
            self.hparams["head"],
            f"{n_train:,}",
            f"{n_all:,}",
            100.0 * n_train / max(n_all, 1),
        )

    def _freeze_adapter(self) -> None:
        """``train_adapter: false``: no encoder tensor (adapters included) trains; only the head does."""
        assert self.encoder is not None
        adapter_tensors = [p for p in self.encoder.parameters() if p.requires_grad]
        for p in adapter_tensors:
            p.requires_grad_(False)
        if adapter_tensors and self.encoder_args["adapter_checkpoint"] is None:
            log.info(
                "train_adapter=False without adapter_checkpoint: the %s adapter stays at its initialisation "
                "(LoRA: the identity, B = 0)",
                self.encoder_args["adapter"],
            )

    def build_head(self, in_channels: list[int]) -> nn.Module:
        """Return the task head over feature maps with ``in_channels``; implemented by subclasses."""
        raise NotImplementedError

    def configure_losses(self) -> None:
        """Set ``self.criterion``; implemented by subclasses."""
        raise NotImplementedError

    def configure_metrics(self) -> None:
        """Set per-stage metrics; implemented by subclasses."""
        raise NotImplementedError

    # ----------------------------------------------------------------- forward
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise ``[0, 1]`` images with the encoder's mean and std; unchanged with ``normalization: none``."""
        if self.hparams.get("normalization", "clip") == "none":  # checkpoints from before the switch: clip
            return images
        return (images - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for ``[0, 1]`` images ``(B, 3, H, W)``: ``(B, K, H, W)`` (segmentation) or ``(B, K)``."""
        x = self.normalize(images)
        if self.net is not None:
            return self.net(x)
        assert self.encoder is not None
        compiled = self.__dict__.get("_compiled_encoder")
        encoder = self.encoder if compiled is None else compiled
        return self.head(encoder(x), size=images.shape[-2:])

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        """AdamW over trainable parameters with linear warm-up and cosine decay per step."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: the encoder is frozen and the head has none")
        opt = torch.optim.AdamW(
            params, lr=self.hparams["lr"], betas=tuple(self.hparams["betas"]), weight_decay=self.hparams["weight_decay"]
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams["warmup_steps"], total - 1)
        lr, min_lr = float(self.hparams["lr"]), float(self.hparams.get("min_lr", 0.0))
        if not 0.0 <= min_lr <= lr:
            raise ValueError(f"min_lr={min_lr} must be in [0, lr={lr}] (the cosine decays from lr to min_lr)")
        floor = min_lr / lr if lr > 0 else 0.0

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self) -> list[Callback]:
        """Best and last checkpoints by the task's monitor, optional early stopping and validation schedule, guards.

        ``last.ckpt`` is written at every epoch end and, by :class:`usclip.callbacks.MidEpochCheckpoint`, every
        ``checkpoint_every_n_steps`` steps / ``checkpoint_every_minutes`` minutes and on SLURM's preemption signal.
        The guards (``usclip.callbacks``): per-epoch and per-batch reseeding for bit-exact resumes, a stop at the first
        non-finite training loss, advice on out-of-memory errors, and checkpoints written atomically.

        Callbacks passed to the Trainer are kept (Lightning alone would replace every one of a type returned here;
        docs/reliability.md, "Callbacks you pass"): a ``ModelCheckpoint`` of the user's writes its files beside
        usclip's ``best.ckpt`` and ``last.ckpt`` (which ``usclip test``, ``load_task(run_dir)`` and ``--ckpt_path
        last`` read), and an ``EarlyStopping`` of the user's is the run's early stopping.

        Raises:
            ValueError: if the Trainer has an ``EarlyStopping`` and ``early_stopping_patience`` is set too.
        """
        trainer = self._trainer
        given: list[Callback] = trainer.callbacks if trainer is not None else []  # type: ignore[attr-defined]
        passed = [c for c in given if not _is_own(c)]
        checkpoints: list[Callback] = [
            RunCheckpoint(
                monitor=self.monitor,
                mode=self.monitor_mode,
                filename="best",
                auto_insert_metric_name=False,
            ),
            # last.ckpt after every epoch, whether or not the monitor improved: Lightning 2.6's save_last=True only
            # writes it together with a new best, which would make a resumed run redo epochs. With validate_every,
            # at the end of every training epoch (after its validation, if any), also those without validation,
            # where Lightning would otherwise wait for a validation end that does not come
            RunCheckpoint(
                filename="last",
                enable_version_counter=False,
                save_on_train_epoch_end=True if self.hparams.get("validate_every") is not None else None,
            ),
        ]
        for callback in checkpoints:
            _own(callback)
        callbacks: list[Callback] = [SeedEachEpoch(), FiniteLossGuard(), OutOfMemoryAdvice(), AtomicCheckpoints()]
        if trainer is not None and any(isinstance(c, ModelCheckpoint) and not _lightning_default(c) for c in passed):
            # the user's ModelCheckpoint stays: usclip's go into the Trainer's list beside it (returned from here,
            # they would replace it). Those of an earlier fit/test with this Trainer are replaced, not repeated
            trainer.callbacks = [c for c in given if not _is_own(c)] + checkpoints  # type: ignore[attr-defined]
        else:  # Lightning's default ModelCheckpoint (or none): usclip's replace it
            callbacks += checkpoints
        # the same last.ckpt in the middle of epochs (steps, minutes) and on SLURM's preemption signal
        callbacks.append(
            MidEpochCheckpoint(
                self.hparams.get("checkpoint_every_n_steps"), self.hparams.get("checkpoint_every_minutes")
            )
        )
        if self.hparams.get("validate_every") is not None:
            callbacks.append(ValidateOnEpochs(self.hparams["validate_every"], self.hparams["validate_last_epoch"]))
        patience = self.hparams["early_stopping_patience"]
        if patience is not None:
            theirs = [c for c in passed if isinstance(c, EarlyStopping)]
            if theirs:
                raise ValueError(early_stopping_conflict(patience, type(theirs[0]).__name__))
            callbacks.append(
                _own(
                    EarlyStopping(
                        monitor=self.monitor,
                        mode=self.monitor_mode,
                        patience=patience,
                        # after each validation, never at a training epoch end: with validate_every (or
                        # check_val_every_n_epoch > 1) an epoch without validation would count, with stale metrics
                        check_on_train_epoch_end=False,
                    )
                )
            )
        return callbacks

    # ----------------------------------------------------------------- checkpoints without the frozen backbone
    def _frozen_keys(self) -> list[str]:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        # the CLIP / timm encoder, and the frozen backbone of a native DINOv2 model (dinov2:<arch>)
        frozen = ("encoder.", "net.backbone.")
        return [k for k in self.state_dict() if k.startswith(frozen) and k not in trainable]

    def _frozen_fingerprint(self) -> str:
        state = self.state_dict()
        h = hashlib.sha256()
        for k in self._frozen_keys():
            t = state[k].detach().float().flatten()
            h.update(k.encode())
            h.update(t[:: max(1, t.numel() // 64)].cpu().numpy().tobytes())  # a strided sample is enough to detect
        return h.hexdigest()

    def _keep_backbone(self) -> bool:
        flag = self.hparams["save_frozen_backbone"]
        return self.encoder_args.get("pretrained") is None if flag is None else bool(flag)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the task class, preprocessing and class names; drop the frozen, reloadable backbone."""
        checkpoint["usclip_task"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["usclip_preprocessing"] = self.preprocessing.to_dict()
        checkpoint["usclip_label_names"] = self.class_names()
        if self._keep_backbone():
            return
        for k in self._frozen_keys():
            checkpoint["state_dict"].pop(k, None)
        checkpoint["usclip_frozen_backbone"] = {"fingerprint": self._frozen_fingerprint()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore preprocessing and class names; refill the frozen backbone after checking it is the same one."""
        self._restore_preprocessing(checkpoint)
        info = checkpoint.get("usclip_frozen_backbone")
        if info is None:
            return
        if info["fingerprint"] != self._frozen_fingerprint():
            raise RuntimeError(
                "the checkpoint was trained on a different frozen backbone than the one built from "
                f"encoder={self.encoder_args}: set model.encoder.model_name/pretrained to the training run's values"
            )
        state = self.state_dict()
        for k in self._frozen_keys():
            checkpoint["state_dict"].setdefault(k, state[k])

    # ----------------------------------------------------------------- preprocessing and class names
    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def setup(self, stage: str) -> None:
        """Copy the DataModule's preprocessing and class names (stored in every checkpoint from then on)."""
        p = getattr(self._datamodule(), "preprocessing", None)
        if isinstance(p, Preprocessing):
            self.preprocessing = p

    def _restore_preprocessing(self, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's preprocessing and class names; the attached DataModule's settings win (they run)."""
        saved = checkpoint.get("usclip_preprocessing")
        if saved is None:  # checkpoints from before the entry: the DataModule's hyperparameters hold the settings
            hp = checkpoint.get("datamodule_hyper_parameters") or {}
            keys = ("image_size", "crop", "colour", "regions", "max_image_pixels")
            saved = {k: hp[k] for k in keys if k in hp} or None
        if saved is not None:
            restored = Preprocessing.from_dict(saved)
            running = getattr(self._datamodule(), "preprocessing", None)
            if isinstance(running, Preprocessing) and running != restored:
                changed = {k: (v, getattr(running, k)) for k, v in vars(restored).items() if getattr(running, k) != v}
                log.warning(
                    "the DataModule prepares images otherwise than the checkpoint's training data (checkpoint -> now: "
                    "%s); predictions may differ from the trained model's",
                    changed,
                )
            else:
                self.preprocessing = restored
        names = checkpoint.get("usclip_label_names")
        if names is None:  # the DataModule's state (its label_names travel with the split)
            states = [v for v in checkpoint.values() if isinstance(v, dict) and "splits" in v and "label_names" in v]
            names = states[0]["label_names"] if states else None
        if names:
            self.label_names = [str(n) for n in names]

    def class_names(self) -> list[str] | None:
        """Class names in index order: the DataModule's ``label_names``, else those stored in the checkpoint."""
        n = int(self.hparams["num_classes"])
        for names in (getattr(self._datamodule(), "label_names", None), self.label_names):
            if names and len(names) == n:
                return [str(x) for x in names]
        return None

    # ----------------------------------------------------------------- prediction
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[Prediction]:
        """One :class:`~usclip.tasks.Prediction` per image, at its original size; writes nothing.

        Files are written by :class:`~usclip.tasks.PredictionWriter` (``usclip predict`` adds it). A region of a
        multi-region DICOM file (``data.regions: all``) is its own prediction (id ``<stem>@r<k>``, pasted into the
        full frame, ``region`` set); the writer and :meth:`predict_image` merge the regions of each file.
        """
        if is_empty_batch(batch):  # every sample was a bad file (data.on_bad_sample: skip)
            return []
        return self._predictions(batch, self(batch["image"]))

    def _predictions(self, batch: dict[str, Any], logits: torch.Tensor) -> list[Prediction]:
        raise NotImplementedError(f"{type(self).__name__} does not predict images (segmentation and classification do)")

    def _prediction_fields(self, batch: dict[str, Any], j: int) -> dict[str, Any]:
        """``id``, ``size``, ``crop_box``, ``path``, ``image`` and ``region`` of sample ``j`` of a predict batch."""
        dataset = self.__dict__.get("_predict_inputs")
        if dataset is None:
            dataset = self.trainer.predict_dataloaders.dataset  # type: ignore[union-attr]
        h, w = (int(v) for v in batch["orig_size"][j])
        box = tuple(int(v) for v in batch["crop_box"][j]) if "crop_box" in batch else (0, 0, w, h)
        path, image, region = dataset.source(int(batch["index"][j]))
        return {"id": batch["id"][j], "size": (h, w), "crop_box": box, "path": path, "image": image, "region": region}

    @overload
    def predict_image(self, image: ImageInput, batch_size: int = ..., crop_box: Box | None = ...) -> Prediction: ...

    @overload
    def predict_image(
        self,
        image: list[ImageInput] | tuple[ImageInput, ...],
        batch_size: int = ...,
        crop_box: Sequence[Box | None] | None = ...,
    ) -> list[Prediction]: ...

    def predict_image(
        self,
        image: ImageInput | Sequence[ImageInput],
        batch_size: int = 8,
        crop_box: Box | Sequence[Box | None] | None = None,
    ) -> Prediction | list[Prediction]:
        """Predict one image (or a list) as ``usclip predict`` does: crop, resize, forward, paste back.

        The same functions as ``usclip predict`` (:class:`usclip.data.preprocessing.ImageInputs` reads files with
        the DataModule's ``decode_sample``; :meth:`predict_step` pastes back), with :attr:`preprocessing`: the
        crop, size, colour and DICOM region settings the model was trained with. Runs in eval mode without
        gradients on the task's device and restores the training mode afterwards.

        Args:
            image: a path (PNG, JPEG, BMP, TIFF, DICOM), a numpy array ``(H, W)`` or ``(H, W, 3)`` (uint8, uint16 or
                float in ``[0, 1]`` / ``[0, 255]``), a PIL image, or a list of these.
            batch_size: images per forward pass.
            crop_box: ``(x0, y0, x1, y1)`` of the scan area (one per image for a list) instead of the crop mode;
                required when :attr:`preprocessing` crops to given boxes (``crop: boxes``).

        Returns:
            A :class:`~usclip.tasks.Prediction` (a list for a list): mask and probabilities at the original size
            (segmentation), probabilities and label (classification). A DICOM file with several tissue regions and
            ``preprocessing.regions == "all"`` gives one segmentation prediction (the regions merged as the writer
            merges them); a classification prediction per region.

        Raises:
            FileNotFoundError: for a path that does not exist.
            ValueError: for an input of another kind, shape or dtype, or a bad ``batch_size``.
        """
        single = not isinstance(image, (list, tuple))
        inputs: list[ImageInput] = [image] if single else list(image)  # type: ignore[list-item,arg-type]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"predict_image: batch_size must be a positive integer, got {batch_size!r}")
        boxes = None if crop_box is None else ([crop_box] if single else list(crop_box))
        dataset = ImageInputs(inputs, self.preprocessing, boxes)  # type: ignore[arg-type]
        training = self.training
        self.eval()
        self.__dict__["_predict_inputs"] = dataset
        predictions: list[Prediction] = []
        try:
            with torch.inference_mode():
                for i, batch in enumerate(DataLoader(dataset, batch_size=batch_size)):
                    batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    predictions += self.predict_step(batch, i)
        finally:
            del self.__dict__["_predict_inputs"]
            self.train(training)
        merged: list[Prediction] = []
        # the regions of one DICOM file are consecutive samples: one segmentation prediction per file
        for key, group in itertools.groupby(predictions, key=_merge_key):
            parts = list(group)
            merged.append(merge_region_predictions(parts, key) if isinstance(key, str) else parts[0])
        return merged[0] if single and len(merged) == 1 else merged

    # ----------------------------------------------------------------- run directory
    @property
    def run_dir(self) -> Path | None:
        """The run directory (``runs/<name>/version_<n>``): config, checkpoints, splits and results.

        For every logger (TensorBoard, CSV, MLflow, W&B) the folder that holds ``checkpoints/``
        (:func:`usclip.run_dirs.run_dir_of`).

        Looked up once per trainer and stage: ``trainer.log_dir`` is a broadcast under DDP, and processes with
        different numbers of test or predict batches must not call it a different number of times.
        """
        trainer = self._trainer
        if trainer is None:
            return None
        key = (id(trainer), trainer.state.fn)
        cached = self.__dict__.get("_run_dir_cache")
        if cached is None or cached[0] != key:
            cached = (key, run_dir_of(trainer))
            self.__dict__["_run_dir_cache"] = cached
        return cached[1]
