"""ZeroShotClassifier: classify with CLIP's image-text similarity to class prompts, no training.

Prompts come from YAML (``{classes: {benign: [prompt, ...], malignant: [...]}}``): a path, or the name of a file
shipped in ``usclip/prompts`` (``breast``, ``lymph_node``: the paper's prompts). Each prompt is embedded with the
model's own tokenizer and text tower and L2-normalised; a class's prompts are averaged and renormalised (CLIP's
prompt ensembling). Logits are ``exp(logit_scale) * cos(image, class)`` with the model's learned logit scale.
Classes are ordered as the data's ``label_names`` (matched by name, case-insensitively), so predictions and metrics
line up with the labels. The visual adapters of a caption fine-tuning run load through ``adapter_checkpoint``.

Run it with ``usclip test --config configs/zeroshot/busi.yaml`` (the test split of a ``ClassificationDataModule``):
accuracy, AUC and the other classification metrics, ``results/test_metrics.json`` and
``results/test_predictions.csv`` are written by :class:`~usclip.tasks.ClassificationTask`'s test code, which this
task inherits. ``usclip fit`` is refused: there is nothing to train.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
import yaml

from usclip.adapters import build_adapter_config, inject_adapters, load_adapters, read_adapter_metadata
from usclip.models import CLIPEncoder
from usclip.tasks.classification import ClassificationTask
from usclip.tasks.contrastive import build_clip_with_text

log = logging.getLogger(__name__)

PROMPT_DIR = Path(__file__).parents[1] / "prompts"


def list_prompt_files() -> list[str]:
    """Names of the prompt files shipped with usclip (``breast``, ``lymph_node``)."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))


def read_prompts(prompts: str | Path) -> dict[str, list[str]]:
    """Class prompts from a YAML file or a shipped file's name.

    Args:
        prompts: a ``.yaml`` path, or one of :func:`list_prompt_files`.

    Returns:
        ``{class name: [prompt, ...]}`` in file order.

    Raises:
        FileNotFoundError: neither a file nor a shipped name.
        ValueError: not ``{classes: {name: [non-empty str, ...]}}`` with at least two classes.
    """
    path = Path(prompts)
    if not path.is_file():
        shipped = PROMPT_DIR / f"{prompts}.yaml"
        if not shipped.is_file():
            raise FileNotFoundError(
                f"prompts={str(prompts)!r} is neither a YAML file nor a shipped prompt set ({list_prompt_files()})"
            )
        path = shipped
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, dict) or len(classes) < 2:
        raise ValueError(f"{path}: expected {{classes: {{<class>: [prompt, ...], ...}}}} with two or more classes")
    out: dict[str, list[str]] = {}
    for name, texts in classes.items():
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"{path}: class {name!r} needs a non-empty list of non-empty prompts, got {texts!r}")
        out[str(name)] = [t.strip() for t in texts]
    return out


def count_tokens(tokenizer: Any, text: str) -> int | None:
    """Tokens of ``text`` without truncation, start and end tokens included (open_clip BPE tokenizers only)."""
    if isinstance(tokenizer, open_clip.SimpleTokenizer):
        return len(tokenizer.encode(text)) + 2
    return None


def class_embedding(text_embeddings: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    """One class embedding ``(D,)`` from its prompts' embeddings ``(P, D)``: normalise, average, renormalise.

    With ``renormalize=False`` the average of the unit prompt embeddings is kept as it is, so that
    ``image @ embedding`` is the mean over the prompts of the cosine similarities (the authors' scoring).
    """
    mean = F.normalize(text_embeddings, dim=-1).mean(0)
    return F.normalize(mean, dim=-1) if renormalize else mean


class ZeroShotClassifier(ClassificationTask):
    """Zero-shot benign/malignant (or any label) classification by image-prompt similarity.

    Args:
        prompts: prompts YAML path or shipped name (``breast``, ``lymph_node``).
        class_names: class order when no DataModule provides ``label_names`` (library use); ``None`` takes the
            DataModule's, or the YAML's order.
        text_adapter_checkpoint: text LoRA file from caption fine-tuning with ``text_adapter: lora``
            (``adapters/text_best.safetensors``).
        prompt_averaging: how several prompts of a class combine: ``embedding`` (default: the renormalised mean
            of the unit prompt embeddings, CLIP's prompt ensembling) or ``similarity`` (the mean over prompts of
            the scaled cosine similarities, no renormalisation: the authors' ``clip_cls_zero_shot.py``). With one
            prompt per class both give the same logits; with several, the classes' mean embeddings have different
            norms, so predictions and AUC can differ.
        **kwargs: :class:`~usclip.tasks.BaseTask` arguments; used: ``model_name``, ``pretrained``,
            ``adapter_checkpoint`` (visual adapters, e.g. ``adapters/best.safetensors``), ``quick_gelu``,
            ``allow_unsafe_torchscript``, ``image_size``, ``num_classes`` (linked from the data), ``layers``
            (recorded only; must be valid block indices for the model).
    """

    encoder: CLIPEncoder  # always an open_clip model with its text tower (build_clip_with_text)

    def __init__(
        self,
        prompts: str = "breast",
        class_names: list[str] | None = None,
        text_adapter_checkpoint: str | None = None,
        prompt_averaging: Literal["embedding", "similarity"] = "embedding",
        **kwargs: Any,
    ) -> None:
        if prompt_averaging not in ("embedding", "similarity"):
            raise ValueError(f"prompt_averaging must be 'embedding' or 'similarity', got {prompt_averaging!r}")
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        """The whole CLIP model, frozen, with the given adapter files, and the tokenised prompts."""
        args, hp = self.encoder_args, self.hparams
        clip = build_clip_with_text(self, "zero-shot classification")
        text_file = hp["text_adapter_checkpoint"]
        if text_file is not None:
            meta = read_adapter_metadata(text_file)
            inject_adapters(clip.get_submodule("transformer"), build_adapter_config(meta["adapter"], meta["config"]))
            load_adapters(self.encoder, text_file, prefix="text_model.")
        for p in self.parameters():
            p.requires_grad_(False)

        self.prompts = read_prompts(hp["prompts"])
        tokenizer = self.encoder.tokenizer()
        context = int(getattr(tokenizer, "context_length", 0))
        for name, texts in self.prompts.items():
            for text in texts:
                n = count_tokens(tokenizer, text)
                if n is not None and context and n > context:
                    raise ValueError(
                        f"prompts={hp['prompts']!r}: a {name!r} prompt has {n} tokens but {args['model_name']!r} reads "
                        f"{context}; shorten it (it would be truncated): {text[:80]!r}..."
                    )
        self.tokenizer = tokenizer
        self.class_embeddings: torch.Tensor | None = None
        self.class_order: list[str] = []

    # ----------------------------------------------------------------- classes
    def _label_names(self) -> list[str]:
        datamodule = getattr(self._trainer, "datamodule", None)
        names = getattr(datamodule, "label_names", None) or self.hparams["class_names"]
        return [str(n) for n in names] if names else list(self.prompts)

    @torch.no_grad()
    def prepare_classes(self) -> None:
        """Embed the prompts and order the classes as the data's labels.

        Raises:
            ValueError: the label names and the prompt classes differ (the message lists both).
        """
        labels = self._label_names()
        by_lower = {k.lower(): k for k in self.prompts}
        if sorted(n.lower() for n in labels) != sorted(by_lower):
            raise ValueError(
                f"prompts={self.hparams['prompts']!r} has classes {list(self.prompts)} but the data's label_names "
                f"are {labels}; the names must match (case-insensitive). Set data.label_names or edit the prompts"
            )
        if len(labels) != self.hparams["num_classes"]:
            raise ValueError(f"num_classes={self.hparams['num_classes']} but the prompts define {len(labels)} classes")
        rows = []
        for name in labels:
            tokens = self.tokenizer(self.prompts[by_lower[name.lower()]]).to(self.pixel_mean.device)
            renormalize = self.hparams.get("prompt_averaging", "embedding") == "embedding"
            rows.append(class_embedding(self.encoder.encode_text(tokens, normalize=False).float(), renormalize))
        self.class_embeddings = torch.stack(rows)  # (K, D)
        self.class_order = labels
        log.info("zero-shot classes %s from %s", labels, self.hparams["prompts"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)``: the model's logit scale times the cosine to each class embedding."""
        if self.class_embeddings is None:
            self.prepare_classes()
        assert self.class_embeddings is not None
        image = self.encoder.encode_image(self.normalize(images)).float()
        return self.encoder.logit_scale.exp().float() * image @ self.class_embeddings.T

    # ----------------------------------------------------------------- stages
    def setup(self, stage: str) -> None:
        """Refuse ``fit``: a zero-shot classifier has nothing to train."""
        if stage == "fit":
            raise RuntimeError(
                "ZeroShotClassifier trains nothing: run `usclip test` (or validate/predict) with this config; to "
                "adapt the model first, fine-tune it on captions (CaptionFinetuneTask) and pass adapter_checkpoint"
            )

    def on_validation_start(self) -> None:  # noqa: D102
        self.prepare_classes()

    def on_test_start(self) -> None:  # noqa: D102
        self.prepare_classes()

    def on_predict_start(self) -> None:  # noqa: D102
        self.prepare_classes()
