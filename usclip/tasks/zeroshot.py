"""ZeroShotClassifier: classify with CLIP's image-text similarity to class prompts, no training.

Prompts come from YAML (``{classes: {benign: [prompt, ...], malignant: [...]}}``): a path, or the name of a file
shipped in ``usclip/prompts`` (``breast``, ``lymph_node``: the paper's prompts; ``prompt_set`` picks the authors'
code's words instead, ``<name>_release.yaml`` or ``<name>_later.yaml``). Each prompt is embedded with the model's own
tokenizer and text tower and L2-normalised; a class's prompts are averaged and renormalised (CLIP's prompt
ensembling). Logits are ``exp(logit_scale) * cos(image, class)`` with the model's learned logit scale (or a fixed
``logit_scale``). Classes are ordered as the data's ``label_names`` (matched by name, case-insensitively), so
predictions and metrics line up with the labels. The visual adapters of a caption fine-tuning run load through
``adapter_checkpoint``.

Run it with ``usclip test --config configs/vision_language/zeroshot_busi.yaml`` (the test split of a
``ZeroShotDataModule``, or every image with ``score_on: all``; ``configs/vision_language/zeroshot_authors.yaml`` adds
the authors' input and prompts). Accuracy, AUC and the other classification metrics, ``results/test_metrics.json``
and ``results/test_predictions.csv`` are written by :class:`~usclip.tasks.ClassificationTask`'s test code, which
this task inherits. ``usclip fit`` is refused: there is nothing to train.
"""

from __future__ import annotations

import logging
import math
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

#: whose words a shipped prompt name stands for: ``paper`` (``<name>.yaml``, the paper's text), ``release`` (the
#: code of the paper's release, ``<name>_release.yaml``) or ``later`` (the authors' later ``src/`` code,
#: ``<name>_later.yaml``)
PROMPT_SETS = ("paper", "release", "later")
PromptSet = Literal["paper", "release", "later"]


def list_prompt_files() -> list[str]:
    """Names of the prompt files shipped with usclip (``breast``, ``breast_release``, ``lymph_node``, ...)."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))


def read_prompts(prompts: str | Path, prompt_set: PromptSet = "paper") -> dict[str, list[str]]:
    """Class prompts from a YAML file or a shipped file's name.

    Args:
        prompts: a ``.yaml`` path, or one of :func:`list_prompt_files`.
        prompt_set: for a shipped name, whose words to read (:data:`PROMPT_SETS`): ``paper`` reads
            ``<prompts>.yaml``, ``release`` ``<prompts>_release.yaml`` (the authors' ``clip_cls_zero_shot.py`` at the
            paper's release), ``later`` ``<prompts>_later.yaml`` (their later ``src/models/zero_shot_prompt.py``).

    Returns:
        ``{class name: [prompt, ...]}`` in file order.

    Raises:
        FileNotFoundError: neither a file nor a shipped name, or no such variant is shipped.
        ValueError: an unknown ``prompt_set``, a variant asked of a file path, or not
            ``{classes: {name: [non-empty str, ...]}}`` with at least two classes.
    """
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"prompt_set must be one of {PROMPT_SETS}, got {prompt_set!r}")
    path = Path(prompts)
    if path.is_file() and prompt_set != "paper":
        raise ValueError(
            f"prompt_set={prompt_set!r} picks a variant of a shipped prompt file, but prompts={str(prompts)!r} is a "
            "file of its own; give a shipped name (breast, lymph_node) or prompt_set='paper'"
        )
    if not path.is_file():
        name = str(prompts) if prompt_set == "paper" else f"{prompts}_{prompt_set}"
        shipped = PROMPT_DIR / f"{name}.yaml"
        if not shipped.is_file():
            what = "neither a YAML file nor a shipped prompt set" if prompt_set == "paper" else "not shipped"
            subject = f"prompts={str(prompts)!r}" if prompt_set == "paper" else f"prompt file {name!r}"
            raise FileNotFoundError(f"{subject} (prompt_set={prompt_set!r}) is {what} ({list_prompt_files()})")
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
        prompt_set: whose words a shipped name stands for (:func:`read_prompts`): ``paper`` (default: the paper's
            text), ``release`` (the authors' code at the paper's release, which produced the published zero-shot
            numbers: "lost hilum", "posterior shadowing", a final ".") or ``later`` (their later code: ten prompts
            per class).
        class_names: class order when no DataModule provides ``label_names`` (library use); ``None`` takes the
            DataModule's, or the YAML's order.
        text_adapter_checkpoint: text LoRA file from caption fine-tuning with ``text_adapter: lora``
            (``adapters/text_best.safetensors``).
        prompt_averaging: how several prompts of a class combine: ``embedding`` (default: the renormalised mean
            of the unit prompt embeddings, CLIP's prompt ensembling) or ``similarity`` (the mean over prompts of
            the scaled cosine similarities, no renormalisation: the authors' later ``src/models/clip/zero_shot.py``;
            their release script has one prompt per class). With one prompt per class both give the same logits;
            with several, the classes' mean embeddings have different norms, so predictions and AUC can differ.
        logit_scale: the factor of the cosine similarities; ``None`` (default) uses the model's learned
            ``exp(logit_scale)``, a number fixes it (the authors' scripts write ``100.0``). A positive factor changes
            neither the predicted class nor the AUC, only the probabilities.
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
        prompt_set: PromptSet = "paper",
        logit_scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        if prompt_averaging not in ("embedding", "similarity"):
            raise ValueError(f"prompt_averaging must be 'embedding' or 'similarity', got {prompt_averaging!r}")
        if prompt_set not in PROMPT_SETS:
            raise ValueError(f"prompt_set must be one of {PROMPT_SETS}, got {prompt_set!r}")
        if logit_scale is not None and not (math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f"logit_scale must be a positive number or null (the model's own), got {logit_scale!r}")
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

        self.prompts = read_prompts(hp["prompts"], hp.get("prompt_set", "paper"))
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
        log.info("zero-shot classes %s from %s (%s)", labels, self.hparams["prompts"], self.hparams.get("prompt_set"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)``: the logit scale times the cosine to each class embedding."""
        if self.class_embeddings is None:
            self.prepare_classes()
        assert self.class_embeddings is not None
        image = self.encoder.encode_image(self.normalize(images)).float()
        fixed = self.hparams.get("logit_scale")
        scale = self.encoder.logit_scale.exp().float() if fixed is None else float(fixed)
        return scale * image @ self.class_embeddings.T

    # ----------------------------------------------------------------- stages
    def setup(self, stage: str) -> None:
        """Refuse ``fit``: a zero-shot classifier has nothing to train."""
        if stage == "fit":
            raise RuntimeError(
                "ZeroShotClassifier trains nothing: run `usclip test` (or validate/predict) with this config; to "
                "adapt the model first, fine-tune it on captions (CaptionFinetuneTask) and pass adapter_checkpoint"
            )
        super().setup(stage)

    def on_validation_start(self) -> None:  # noqa: D102
        self.prepare_classes()

    def on_test_start(self) -> None:  # noqa: D102
        self.prepare_classes()

    def on_predict_start(self) -> None:  # noqa: D102
        self.prepare_classes()
