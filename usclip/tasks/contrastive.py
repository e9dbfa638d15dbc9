"""CaptionFinetuneTask: contrastive image-caption fine-tuning of the visual adapters (the paper's first stage).

The whole CLIP model is kept (``CLIPEncoder(keep_text=True)``); Mona or LoRA adapters in the visual tower train,
the text tower stays frozen unless ``text_adapter: lora`` adds LoRA to its attention blocks. Captions are tokenised
with the model's own open_clip tokenizer. The loss is the symmetric InfoNCE of CLIP (open_clip's ``ClipLoss``)
with CLIP's learned logit scale, trained too (``temperature: null``), the checkpoint's logit scale frozen
(``temperature: pretrained``: what the authors' ``clip_finetune.py`` does, 100 for OpenAI CLIP) or a fixed
``temperature`` (e.g. 0.07). Only trainable tensors reach the optimiser, so a frozen scale is not in it.

**Text embedding cache.** With the text tower frozen (no text LoRA, no trainable text parameter), a caption's
embedding never changes, so each one is computed once and reused in later epochs and validations
(``cache_text: true``, the default): a dictionary keyed by the caption's token ids. A batch with any caption not
yet cached is embedded whole, exactly as without the cache, and its rows are stored. The cache is emptied and
bypassed as soon as any text-tower parameter is trainable, and emptied whenever a state dict is loaded.

Validation embeds the whole validation split and reports image-to-text and text-to-image recall@1 and @5 over it.
**Duplicated captions** (templated captions such as BUSI's, where many images share one sentence): a retrieved
caption counts as a hit when its text equals the query image's own caption, and a retrieved image counts when its
own caption equals the query text; otherwise identical sentences would make recall depend on tie order.

Adapter-only files: after each validation of ``usclip fit``, ``<run dir>/adapters/last.safetensors`` and, when
``val_loss`` improved, ``best.safetensors`` (visual adapters, loadable by the segmentation and classification
tasks through ``model.adapter_checkpoint``; adapters of blocks their encoder prunes are skipped on load). With
``text_adapter: lora``, ``text_last.safetensors`` / ``text_best.safetensors`` hold the text LoRA (for
:class:`~usclip.tasks.ZeroShotClassifier`'s ``text_adapter_checkpoint``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from open_clip.loss import ClipLoss
from torch import nn

from usclip.adapters import adapter_layers, build_adapter_config, inject_adapters, save_adapters
from usclip.models import CLIPEncoder
from usclip.tasks.base import BaseTask

log = logging.getLogger(__name__)

#: CLIP clamps the learned logit scale at 100 (log 100 = 4.6052)
MAX_LOGIT_SCALE = 100.0
#: ``temperature`` value that freezes the checkpoint's own logit scale
PRETRAINED_TEMPERATURE = "pretrained"


def retrieval_recall(similarity: torch.Tensor, captions: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k of a square similarity matrix, duplicate captions counted as hits.

    Written by hand (a few tensor lines): torchmetrics' ``RetrievalHitRate`` computes the same per query but needs
    the matrix flattened into ``(preds, target, indexes)`` triples.

    Args:
        similarity: ``(N, N)``; row ``i`` = image ``i``, column ``j`` = caption ``j`` (pair ``i`` is ``(i, i)``).
        captions: the ``N`` caption texts; caption ``j`` is relevant to image ``i`` when
            ``captions[j] == captions[i]``.
        ks: cut-offs (clipped to ``N``).

    Returns:
        ``{"i2t_r1": ..., "t2i_r1": ..., "i2t_r5": ..., ...}``, fractions in [0, 1].
    """
    n = similarity.shape[0]
    if similarity.shape != (n, n) or len(captions) != n:
        raise ValueError(f"similarity must be (N, N) with N={len(captions)} captions, got {tuple(similarity.shape)}")
    codes = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([codes[c] for c in captions], device=similarity.device)
    relevant = ids[:, None] == ids[None, :]  # (N, N), symmetric
    out: dict[str, float] = {}
    for k in ks:
        kk = min(int(k), n)
        for name, sim in (("i2t", similarity), ("t2i", similarity.T)):
            top = sim.topk(kk, dim=1).indices  # (N, k) retrieved indices per query
            hit = relevant.gather(1, top).any(dim=1)
            out[f"{name}_r{k}"] = float(hit.float().mean())
    return out


def build_clip_with_text(task: BaseTask, purpose: str) -> nn.Module:
    """Give ``task`` a :class:`CLIPEncoder` that keeps the text tower, and its normalisation buffers.

    Shared by the caption fine-tuning and zero-shot tasks.

    Returns:
        The whole open_clip model (``task.encoder.text_model``).

    Raises:
        ValueError: a native head or a ``timm:`` backbone, which have no text tower.
    """
    args, hp = task.encoder_args, task.hparams
    if hp["head"] != "paper" or args["model_name"].startswith("timm:"):
        raise ValueError(
            f"{purpose} needs an open_clip CLIP model with its text tower; got "
            f"model_name={args['model_name']!r}, head={hp['head']!r} (use head: paper)"
        )
    task.encoder = CLIPEncoder(image_size=hp["image_size"], keep_text=True, **args)
    task.net = None
    task.register_buffer("pixel_mean", torch.tensor(task.encoder.image_mean).view(1, 3, 1, 1), persistent=False)
    task.register_buffer("pixel_std", torch.tensor(task.encoder.image_std).view(1, 3, 1, 1), persistent=False)
    clip = task.encoder.text_model
    assert clip is not None
    return clip


class CaptionFinetuneTask(BaseTask):
    """Fine-tune visual adapters on image-caption pairs with CLIP's contrastive loss.

    Args:
        text_adapter: ``lora`` adds LoRA to the text tower's attention blocks (trained too); ``None`` keeps the
            text tower frozen.
        text_adapter_kwargs: fields of :class:`~usclip.adapters.LoraConfig` for the text LoRA.
        temperature: ``None`` trains CLIP's learned logit scale from its pretrained value (clamped at 100, as CLIP
            does); ``"pretrained"`` keeps the checkpoint's logit scale frozen (``exp(logit_scale)``: 100 for OpenAI
            CLIP, i.e. temperature 0.01; the authors' paper-time ``clip_finetune.py``); a number fixes the softmax
            temperature (logits = cos / temperature, e.g. 0.07, the authors' later ``src/`` code). In the last two
            cases the logit scale is frozen and not in the optimiser.
        context_length: token length of the captions; ``None`` uses the model's (77 for CLIP ViT-B/16). Longer
            captions are truncated by the tokenizer (end-of-text token kept).
        cache_text: with a frozen text tower, embed each distinct caption once and reuse it (same loss, less
            compute per step: docs/benchmarks.md); ignored while any text-tower parameter is trainable.
        **kwargs: encoder and optimiser arguments of :class:`~usclip.tasks.BaseTask` (``model_name``,
            ``pretrained``, ``adapter``, ``adapter_kwargs``, ``adapter_checkpoint``, ``quick_gelu``, ``lr``,
            ``weight_decay``, ``betas``, ``warmup_steps``, ...). ``layers`` is only recorded in the adapter files
            (the whole visual tower runs); ``num_classes``, ``embed_dim`` and ``fusion`` are unused; ``head`` must
            be ``paper``; ``train_adapter`` must stay ``True`` (the adapters are what this task trains).
    """

    encoder: CLIPEncoder  # always an open_clip model with its text tower (build_clip_with_text)

    monitor = "val_loss"
    monitor_mode: Literal["min", "max"] = "min"

    def __init__(
        self,
        text_adapter: Literal["lora"] | None = None,
        text_adapter_kwargs: dict[str, Any] | None = None,
        temperature: float | Literal["pretrained"] | None = None,
        context_length: int | None = None,
        cache_text: bool = True,
        **kwargs: Any,
    ) -> None:
        #: token ids (bytes) -> float32 normalised text embedding; see the module docstring
        self._text_cache: dict[bytes, torch.Tensor] = {}
        if not kwargs.get("train_adapter", True):
            raise ValueError("train_adapter=False is for downstream tasks; caption fine-tuning trains the adapters")
        super().__init__(**kwargs)

    # ----------------------------------------------------------------- construction
    def configure_models(self) -> None:
        """The whole CLIP model with visual adapters, optional text LoRA, the tokenizer and the logit scale."""
        args, hp = self.encoder_args, self.hparams
        clip = build_clip_with_text(self, "caption fine-tuning")

        text_adapter, text_kwargs = hp["text_adapter"], hp["text_adapter_kwargs"]
        if text_adapter not in (None, "lora"):
            raise ValueError(f"text_adapter must be 'lora' or null, got {text_adapter!r}")
        if text_adapter is None and text_kwargs:
            raise ValueError(f"text_adapter_kwargs={text_kwargs} given without text_adapter; set text_adapter: lora")
        if text_adapter is not None:
            if not hasattr(clip, "transformer"):
                raise ValueError(f"text_adapter=lora needs an open_clip text transformer, not {type(clip).__name__}")
            inject_adapters(clip.get_submodule("transformer"), build_adapter_config(text_adapter, text_kwargs))

        temperature = hp["temperature"]
        if temperature is None:
            self.encoder.logit_scale.requires_grad_(True)
        elif temperature != PRETRAINED_TEMPERATURE and not (
            isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0
        ):
            raise ValueError(
                f"temperature must be a number > 0 (e.g. 0.07), 'pretrained' (the checkpoint's logit scale, frozen) "
                f"or null (learned); got {temperature!r}"
            )
        # every text-tower tensor but the logit scale (and bias): while all are frozen, caption embeddings are fixed
        self._text_params = [
            p
            for n, p in clip.named_parameters()
            if not n.startswith("visual.") and n not in ("logit_scale", "logit_bias")
        ]

        model_context = int(getattr(clip, "context_length", 0)) or None
        context = hp["context_length"]
        if context is not None and model_context is not None and not 0 < context <= model_context:
            raise ValueError(f"context_length must be in [1, {model_context}] for {args['model_name']}, got {context}")
        self.tokenizer = self.encoder.tokenizer(context)
        self.criterion = ClipLoss()
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info(
            "CaptionFinetuneTask(%s): trainable %s parameters (visual adapters%s%s); logit scale %s%s",
            args["model_name"],
            f"{n_train:,}",
            ", text LoRA" if text_adapter else "",
            ", logit scale" if temperature is None else "",
            "learned" if temperature is None else f"frozen at {float(self.logit_scale()):.4g}",
            "; text embeddings cached" if self.text_cache_active() else "",
        )

    def build_head(self, in_channels: list[int]) -> torch.nn.Module:  # noqa: D102
        raise NotImplementedError("CaptionFinetuneTask has no head")

    def configure_losses(self) -> None:  # noqa: D102
        pass  # set in configure_models (ClipLoss)

    def configure_metrics(self) -> None:  # noqa: D102
        self._eval: dict[str, list[Any]] = {"image": [], "text": [], "caption": [], "loss": []}

    # ----------------------------------------------------------------- forward
    def logit_scale(self) -> torch.Tensor:
        """The multiplier of the cosine similarities.

        ``exp(learned)`` clamped at 100 (``temperature: null``), ``exp`` of the frozen checkpoint value
        (``pretrained``), or ``1 / temperature``.
        """
        temperature = self.hparams["temperature"]
        if temperature is None:
            return self.encoder.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        if temperature == PRETRAINED_TEMPERATURE:
            return self.encoder.logit_scale.detach().exp()
        return torch.tensor(1.0 / temperature, device=self.pixel_mean.device)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids ``(B, context_length)`` on the module's device."""
        return self.tokenizer(list(captions)).to(self.pixel_mean.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, D)`` of ``[0, 1]`` images."""
        return self.encoder.encode_image(self.normalize(images))

    def text_cache_active(self) -> bool:
        """Whether caption embeddings are cached: ``cache_text`` on and no text-tower parameter trainable."""
        return bool(self.hparams["cache_text"]) and not any(p.requires_grad for p in self._text_params)

    def encode_captions(self, captions: Sequence[str]) -> torch.Tensor:
        """Normalised caption embeddings ``(B, D)`` in float32, from the cache where it applies.

        A batch with a caption not yet cached is embedded whole (the uncached computation, unchanged) and every row
        is stored; a batch whose captions are all cached is assembled from the cache without running the text
        tower.
        """
        tokens = self.tokenize(captions)
        if not self.text_cache_active():
            self._text_cache.clear()  # a trainable text tower makes stored embeddings stale
            return self.encoder.encode_text(tokens).float()
        keys = [row.tobytes() for row in tokens.cpu().numpy()]
        if all(k in self._text_cache for k in keys):
            return torch.stack([self._text_cache[k] for k in keys]).to(tokens.device)
        text = self.encoder.encode_text(tokens).float()
        # validation runs under inference mode; a tensor made there cannot join autograd later, so store a copy
        # made outside it (the text tower is frozen: the stored rows carry no graph either way)
        with torch.inference_mode(False), torch.no_grad():
            rows = text.detach().clone()
        for key, row in zip(keys, rows, strict=True):
            self._text_cache.setdefault(key, row)
        return text

    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and caption embeddings of a batch, in float32."""
        image = self(batch["image"]).float()
        return image, self.encode_captions(batch["caption"])

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load weights and empty the text embedding cache (the text tower may have changed)."""
        self._text_cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:  # noqa: D102
        image, text = self.embed(batch)
        scale = self.logit_scale()
        loss = self.criterion(image, text, scale)
        bsz = image.shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=bsz)
        self.log("logit_scale", scale.detach(), batch_size=bsz)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bsz)
        return loss

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, batch: dict[str, Any]) -> None:
        image, text = self.embed(batch)
        self._eval["image"].append(image)
        self._eval["text"].append(text)
        self._eval["caption"].extend(batch["caption"])
        self._eval["loss"].append((self.criterion(image, text, self.logit_scale()), image.shape[0]))

    def _eval_end(self, stage: str) -> dict[str, float]:
        if not self._eval["image"]:
            return {}
        image, text = torch.cat(self._eval["image"]), torch.cat(self._eval["text"])
        total = sum(n for _, n in self._eval["loss"])
        loss = sum(float(v) * n for v, n in self._eval["loss"]) / total  # per-batch InfoNCE, as in training
        values = {f"{stage}_loss": loss}
        values |= {f"{stage}_{k}": v for k, v in retrieval_recall(image @ text.T, self._eval["caption"]).items()}
        self.configure_metrics()
        self.log_dict(values, prog_bar=stage == "val")
        return values

    def on_validation_epoch_start(self) -> None:  # noqa: D102
        self.configure_metrics()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        values = self._eval_end("val")
        if values and not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            self._save_adapter_files(values["val_loss"])

    def on_test_epoch_start(self) -> None:  # noqa: D102
        self.configure_metrics()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:  # noqa: D102
        self._eval_end("test")

    # ----------------------------------------------------------------- adapter files
    def _save_adapter_files(self, val_loss: float) -> None:
        """``adapters/last.safetensors`` every validation, ``best.safetensors`` when ``val_loss`` improved."""
        out = self.run_dir
        if out is None or not self.trainer.is_global_zero:
            return
        best = val_loss < getattr(self, "_best_val_loss", math.inf)
        if best:
            self._best_val_loss = val_loss
        names = [n for n, _ in adapter_layers(self.encoder)]
        for prefix, stem in (("visual.", ""), ("text_model.", "text_")):
            if not any(n.startswith(prefix) for n in names):
                continue
            for tag in ("last", "best") if best else ("last",):
                save_adapters(self.encoder, out / "adapters" / f"{stem}{tag}.safetensors", prefix=prefix)

    # ----------------------------------------------------------------- checkpoints
    def _frozen_keys(self) -> list[str]:
        """Frozen encoder entries, leaving out trained tensors that ``state_dict`` lists twice.

        ``keep_text`` registers the visual tower as ``encoder.visual`` and again as ``encoder.text_model.visual``;
        a name-based test would count the second name of a trained adapter as frozen.
        """
        trained = {p.data_ptr() for p in self.parameters() if p.requires_grad}
        state = self.state_dict(keep_vars=True)
        return [k for k, v in state.items() if k.startswith("encoder.") and v.data_ptr() not in trained]
